"""PerUserHeads: stacked heads equal a loop of per-user modules, and fitting them equals one problem per user."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plrm.methods.heads import PerUserHeads
from plrm.methods.peruser import fit_per_user


def _randomize(heads: PerUserHeads, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in heads.names:
            p = getattr(heads, name)
            p.copy_(torch.randn(p.shape, generator=g))


def _modules(heads: PerUserHeads) -> list[nn.Module]:
    """One ordinary torch module per user holding that user's weights."""
    out = []
    for u in range(heads.n_users):
        if heads.is_linear:
            m = nn.Linear(heads.dim, 1, bias=False)
            m.weight.data = heads.weight[u].detach().view(1, -1).clone()
        else:
            m = nn.Sequential(nn.Linear(heads.dim, heads.hidden), nn.ReLU(), nn.Linear(heads.hidden, 1))
            m[0].weight.data = heads.w1[u].detach().T.clone()
            m[0].bias.data = heads.b1[u].detach().clone()
            m[2].weight.data = heads.w2[u].detach().view(1, -1).clone()
            m[2].bias.data = heads.b2[u].detach().view(1).clone()
        out.append(m)
    return out


@pytest.mark.parametrize("hidden", [0, 5])
@pytest.mark.parametrize("n_users", [6, 20])  # most users in the batch (padded over all) or few (their rows gathered)
def test_stacked_heads_equal_a_loop_of_per_user_modules(hidden, n_users):
    """Rows in any order, users repeated or absent: each row scored by its own user's module."""
    heads = PerUserHeads(n_users=n_users, dim=4, hidden=hidden)
    _randomize(heads)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(23, 4, generator=g)
    users = torch.tensor([3, 0, 3, 5, 1, 1, 0, 3, 5, 5, 1, 0, 3, 3, 0, 1, 5, 5, 3, 0, 1, 3, 0])  # user 2, 4 absent
    modules = _modules(heads)
    expected = torch.stack([modules[u](z[i]).squeeze() for i, u in enumerate(users.tolist())])
    torch.testing.assert_close(heads(z, users), expected, rtol=1e-5, atol=1e-6)
    every = torch.stack([modules[u](z).squeeze(-1) for u in range(n_users)], 1)    # (N, U)
    torch.testing.assert_close(heads.all_users(z), every, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads.all_users(z, torch.tensor([4, 1])), every[:, [4, 1]], rtol=1e-5, atol=1e-5)


def test_linear_reward_by_hand():
    """v_0 = (1, 2), v_1 = (-1, 0); z = (3, 1): r_0 = 5, r_1 = -3."""
    heads = PerUserHeads(n_users=2, dim=2)
    with torch.no_grad():
        heads.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.0]]))
    z = torch.tensor([[3.0, 1.0], [3.0, 1.0]])
    torch.testing.assert_close(heads(z, torch.tensor([0, 1])), torch.tensor([5.0, -3.0]))


def test_mlp_reward_by_hand():
    """W1 = I (D = H = 2), b1 = (0, -1), w2 = (1, 1), b2 = 0.5; z = (2, 0.5): relu((2, -0.5)) . (1, 1) + 0.5 = 2.5."""
    heads = PerUserHeads(n_users=1, dim=2, hidden=2)
    with torch.no_grad():
        heads.w1[0] = torch.eye(2)
        heads.b1[0] = torch.tensor([0.0, -1.0])
        heads.w2[0] = torch.tensor([1.0, 1.0])
        heads.b2[0] = 0.5
    torch.testing.assert_close(heads(torch.tensor([[2.0, 0.5]]), torch.tensor([0])), torch.tensor([2.5]))


def test_shared_init_is_one_head_and_mean_head_averages():
    heads = PerUserHeads(n_users=4, dim=3, hidden=2, seed=7)
    for name in heads.names:
        p = getattr(heads, name)
        assert torch.equal(p, p[:1].expand_as(p)), name
    again = PerUserHeads(n_users=2, dim=3, hidden=2, seed=7)
    assert torch.equal(again.w1[0], heads.w1[0])                                      # seeded
    _randomize(heads)
    mean = heads.mean_head(torch.tensor([0, 2]))
    torch.testing.assert_close(mean["w1"], (heads.w1[0] + heads.w1[2]) / 2)
    torch.testing.assert_close(mean["b2"], (heads.b2[0] + heads.b2[2]) / 2)


def test_write_touches_only_the_given_users():
    heads = PerUserHeads(n_users=5, dim=3, hidden=2)
    before = {n: getattr(heads, n).detach().clone() for n in heads.names}
    new = {n: torch.full(s, 9.0) for n, s in heads.shapes().items()}
    heads.write(torch.tensor([1, 3]), new)
    for name in heads.names:
        p = getattr(heads, name)
        assert (p[[1, 3]] == 9.0).all()
        assert torch.equal(p[[0, 2, 4]], before[name][[0, 2, 4]])


def _pairs(n_users=4, seed=0, dim=3):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([3, 1, 6, 2])[:n_users]
    owner = torch.repeat_interleave(torch.arange(n_users), counts)
    perm = torch.randperm(len(owner), generator=g)        # pairs not grouped by user
    return owner[perm], torch.randn(len(owner), dim, generator=g), torch.randn(len(owner), dim, generator=g)


def test_linear_fit_equals_the_per_pair_routine():
    """For linear heads the padded-set fit and plrm.methods.peruser.fit_per_user minimize the same objective
    with the same Adam: the same parameters."""
    owner, chosen, rejected = _pairs()
    heads = PerUserHeads(n_users=4, dim=3, init="zeros")
    init = heads.rows(torch.arange(4))
    fitted = heads.fit(init, torch.arange(4), chosen, rejected, owner, steps=40, lr=0.1, l2=0.01)
    diff = chosen - rejected
    reference = fit_per_user(torch.zeros(4, 3), owner, lambda th, pos: -F.logsigmoid((th * diff[pos]).sum(-1)),
                             steps=40, lr=0.1, l2=0.01)
    torch.testing.assert_close(fitted["weight"], reference, rtol=1e-5, atol=1e-6)


def test_mlp_fit_equals_one_user_at_a_time_and_lowers_each_loss():
    owner, chosen, rejected = _pairs()
    heads = PerUserHeads(n_users=4, dim=3, hidden=4, seed=3)
    users = torch.arange(4)
    init = heads.rows(users)
    together = heads.fit(init, users, chosen, rejected, owner, steps=30, lr=0.05, l2=0.001)
    for u in range(4):
        rows = owner == u
        alone = heads.fit({n: v[u:u + 1] for n, v in init.items()}, torch.tensor([u]), chosen[rows], rejected[rows],
                          torch.zeros(int(rows.sum()), dtype=torch.long), steps=30, lr=0.05, l2=0.001)
        for name in heads.names:
            torch.testing.assert_close(together[name][u], alone[name][0], rtol=1e-4, atol=1e-5)

    def user_nll(h):  # each user's mean BT NLL under heads h (U, ...)
        logit = _score(heads, h, chosen, owner) - _score(heads, h, rejected, owner)
        return torch.zeros(4).index_add(0, owner, -F.logsigmoid(logit)) / torch.bincount(owner)
    assert (user_nll(together) < user_nll(init)).all()
    assert all(torch.equal(getattr(heads, n), init[n]) for n in heads.names)          # the module itself untouched


def _score(heads, h, z, owner):
    """r_{owner[i]}(z_i) from explicit per-user rows h (U, ...)."""
    return heads.score({n: v[owner] for n, v in h.items()}, z[:, None]).squeeze(1)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        PerUserHeads(2, 3, hidden=2, activation="swish")
    with pytest.raises(ValueError, match="linear heads only"):
        PerUserHeads(2, 3, hidden=2, init="zeros")
