"""Individual RM (Dong et al., arXiv 2502.19158, §3.2): one head per user, nothing shared. The reward by hand, the
training loss as the sum of per-user objectives, new users fitted exactly as a loop of per-user torch modules,
Lightning's full-batch training equal to the per-user routine, and known truth on the low-rank world."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import plrm.methods.further_ft  # noqa: F401  (registers further_ft for the minority-world test)
import plrm.methods.similar_user  # noqa: F401  (registers similar_user for the minority-world test)
from plrm import runner
from plrm.data.datamodule import PreferenceDataModule
from plrm.data.splits import TRAIN
from plrm.errors import RecipeError
from plrm.eval.metrics import worst_fraction_mean
from plrm.export import export
from plrm.methods.individual import IndividualRM
from plrm.recipe import build_section, load_recipe
from tests.conftest import calibration_world, export_support

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

D = 4


def _model(n_users=6, encoder=None, **changes):
    torch.manual_seed(0)
    return IndividualRM(IndividualRM.Config(**changes), n_users=n_users, feature_dim=D, encoder=encoder)


def _support(users, pairs=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    user_idx = users.repeat_interleave(pairs)[torch.randperm(len(users) * pairs, generator=g)]  # not grouped
    return {"user_idx": user_idx, "chosen": torch.randn(len(user_idx), D, generator=g),
            "rejected": torch.randn(len(user_idx), D, generator=g)}


def test_reward_is_each_users_own_linear_head_by_hand():
    """v_0 = (1, 2, 0, 0), v_1 = (-1, 0, 0, 1); h = (3, 1, 5, 2): r_0 = 5, r_1 = -1. A pair (h, 0): logit r_u(h)."""
    model = _model(n_users=2)
    with torch.no_grad():
        model.heads.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 1.0]]))
    h = torch.tensor([[3.0, 1.0, 5.0, 2.0]]).repeat(2, 1)
    torch.testing.assert_close(model.reward(h, torch.tensor([0, 1])), torch.tensor([5.0, -1.0]))
    batch = {"user_idx": torch.tensor([0, 1]), "chosen": h, "rejected": torch.zeros(2, D)}
    torch.testing.assert_close(model.preference_logit(batch), torch.tensor([5.0, -1.0]))


def test_full_batch_loss_is_the_mean_of_the_per_user_objectives():
    """Users 0 and 2 with 1 and 3 pairs (user 1 absent), v_0 = (1, 0, 0, 0), v_2 = (0, 2, 0, 0), each pair's
    difference e_1 = (1, 0, 0, 0): logits 1 (user 0) and 0 (user 2). With the datamodule's weights |D|/U_seen / |D_u|
    = 2 / |D_u|, loss + penalty = 1/2 [(-log sigmoid(1) + l2 * 1) + (-log sigmoid(0) + l2 * 4)]."""
    model = _model(n_users=3, l2=0.1)
    with torch.no_grad():
        model.heads.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [7.0, 7, 7, 7], [0, 2.0, 0, 0]]))
    n_pairs = torch.tensor([1.0, 0.0, 3.0])
    user_idx = torch.tensor([2, 0, 2, 2])
    batch = {"user_idx": user_idx, "chosen": torch.eye(D)[[0, 0, 0, 0]], "rejected": torch.zeros(4, D),
             "pair_weight": (4 / 2 / n_pairs)[user_idx]}
    total = model.loss(batch) + model.regularization(batch)
    expected = 0.5 * ((-F.logsigmoid(torch.tensor(1.0)) + 0.1) + (-F.logsigmoid(torch.tensor(0.0)) + 0.4))
    torch.testing.assert_close(total, expected)


def _own_module(hidden: int, start: dict) -> nn.Module:
    """One user's head as an ordinary torch module holding ``start`` (that user's rows)."""
    if not hidden:
        m = nn.Linear(D, 1, bias=False)
        m.weight.data = start["weight"].view(1, -1).clone()
        return m
    m = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    m[0].weight.data, m[0].bias.data = start["w1"].T.clone(), start["b1"].clone()
    m[2].weight.data, m[2].bias.data = start["w2"].view(1, -1).clone(), start["b2"].view(1).clone()
    return m


def _flat(m: nn.Module, hidden: int) -> list[torch.Tensor]:
    if not hidden:
        return [m.weight.detach()[0]]
    return [m[0].weight.detach().T, m[0].bias.detach(), m[2].weight.detach()[0], m[2].bias.detach()[0]]


@pytest.mark.parametrize("hidden", [0, 3])
def test_new_users_are_fitted_as_a_loop_of_per_user_modules(hidden):
    """adapt (all new users at once) equals, user by user, an ordinary module trained alone from the fresh head
    with Adam on its own mean NLL + l2 ||theta||^2; the other users' heads are untouched."""
    steps, lr, l2 = 60, 0.05, 0.01
    model = _model(n_users=7, hidden=hidden, adapt_steps=steps, lr=lr, l2=l2)
    users = torch.tensor([1, 2, 4, 6])
    support = _support(users)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.adapt(support, users)
    fresh = model.fresh_heads(1)
    for u in users.tolist():
        m = _own_module(hidden, {k: v[0] for k, v in fresh.items()})
        if hidden:
            m[2].bias.requires_grad_(False)  # b2 cancels in the pair logit: plrm keeps it at the initialisation
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
        rows = support["user_idx"] == u
        for _ in range(steps):
            opt.zero_grad()
            logit = (m(support["chosen"][rows]) - m(support["rejected"][rows]))[:, 0]
            loss = -F.logsigmoid(logit).mean() + l2 * sum(p.pow(2).sum() for p in m.parameters())
            loss.backward()
            opt.step()
        tol = dict(rtol=1e-4, atol=1e-5) if hidden else dict(rtol=1e-5, atol=1e-6)  # ReLU: more float drift
        for mine, theirs in zip([getattr(model.heads, n)[u] for n in model.heads.names], _flat(m, hidden)):
            torch.testing.assert_close(mine, theirs, **tol)
    for key, value in model.state_dict().items():
        if key.startswith("heads."):
            others = [u for u in range(7) if u not in users.tolist()]
            assert torch.equal(value[others], before[key][others]), key
        else:
            assert torch.equal(value, before[key]), key


def test_a_linear_head_starts_from_zero_and_an_mlp_head_from_the_seeded_shared_head():
    linear = _model()
    assert torch.equal(linear.heads.weight, torch.zeros(6, D))
    a, b = _model(hidden=3), _model(hidden=3)
    assert torch.equal(a.heads.w1, b.heads.w1) and torch.equal(a.heads.w1[0], a.heads.w1[5])   # seeded, shared
    torch.testing.assert_close(a.fresh_heads(2)["w1"][1], a.heads.w1[0], rtol=0, atol=0)


def test_a_trainable_backbone_is_refused():
    encoder = nn.Linear(D, D)  # e.g. LoRA adapters: trainable weights every user would share
    with pytest.raises(RecipeError, match="trains one head per user on frozen features and shares nothing"):
        _model(encoder=encoder)
    assert _model(encoder=nn.Linear(D, D).requires_grad_(False)).heads.weight.shape == (6, D)


def test_export_head_is_the_linear_heads_and_mlp_heads_say_why_not():
    model = _model()
    modules, weights = model.export_head()
    assert modules == [] and torch.equal(weights, model.heads.weight)
    with pytest.raises(NotImplementedError, match="an MLP head per user is not W"):
        _model(hidden=2).export_head()


@pytest.mark.parametrize(("changes", "message"), [
    ({"hidden": -1}, "methods.individual.hidden: must be >= 0, got -1"),
    ({"l2": -0.1}, "methods.individual.l2: must be >= 0, got -0.1"),
    ({"activation": "swish"}, "methods.individual.activation"),
    ({"max_steps": -1}, "max_epochs: -1 together with max_steps: -1 never stops training"),
])
def test_bad_options_name_their_key(changes, message):
    problems: list[str] = []
    build_section(IndividualRM.Config, changes, "methods.individual", problems)
    assert any(message in p for p in problems), problems


def _world(tmp_path, *extra):
    return calibration_world(tmp_path, "individual", *extra)


@pytest.mark.slow
def test_known_truth_on_the_low_rank_world(tmp_path):
    """Measured (seed 0; 7 s of training): seen 0.992 (personal oracle 1.0), median cosine between v_u and the
    user's true direction V w_u 0.953 (min 0.899), unseen at k = 10 0.924 (non-personalized oracle 0.807).
    Lightning's full-batch training equals the per-user routine (PerUserHeads.fit) on the same pairs: max
    |delta v| 3e-7 (the loss is 1/U_seen of the routine's; Adam's epsilon is all that differs)."""
    recipe = load_recipe("quickstart", _world(tmp_path))
    result = runner.fit(recipe, show=False)
    res = result.per_seed[0]
    assert res["individual"]["seen"]["accuracy"] >= res["oracle/personal"]["seen"]["accuracy"] - 0.03
    assert res["individual"]["unseen"]["accuracy"] >= 0.9
    assert res["individual"]["unseen"]["accuracy"] > res["oracle/non-personalized"]["unseen"]["accuracy"] + 0.08

    heads = torch.load(result.run_dir / "seed-0" / "individual.ckpt", weights_only=True)["state_dict"]["heads.weight"]
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    seen = torch.from_numpy(split.seen_users)
    truth = prepared.data.truth
    world_user = np.array([int(u.removeprefix("user")) for u in split.user_ids])
    true_direction = torch.from_numpy((truth["directions"] @ truth["user_weights"][world_user].T).T.copy())  # (U, D)
    cosine = F.cosine_similarity(heads[seen], true_direction[seen].float(), dim=1)
    assert cosine.median() >= 0.9

    rows = torch.from_numpy(split.rows(TRAIN))
    batch = PreferenceDataModule(prepared, split).batch(rows)
    model = runner.build_model(recipe, "individual", prepared, len(split.user_ids))
    owner = torch.searchsorted(seen, batch["user_idx"])
    routine = model.heads.fit(model.fresh_heads(len(seen)), seen, batch["chosen"], batch["rejected"], owner,
                              steps=300, lr=0.05, l2=0.01)
    torch.testing.assert_close(heads[seen], routine["weight"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [0, 8])
def test_reload_and_new_users_from_a_pairs_file(tmp_path, tiny_overrides, hidden):
    """`plrm test` reloads the same scores; `plrm adapt --pairs` (a model of the new users only) saves exactly the
    per-user tensors ``heads.*``, equal to the heads the same users get inside the run; `plrm export` of a linear
    one reproduces its rewards."""
    overrides = tiny_overrides + ["~methods.lore", "~methods.bt", "+methods.individual={}",
                                  "methods.individual.max_steps=100", f"methods.individual.hidden={hidden}"]
    result = runner.fit("quickstart", overrides, show=False)
    res = result.per_seed[0]["individual"]
    assert res["seen"]["accuracy"] > 0.8 and res["unseen"]["accuracy"] > 0.6
    again = runner.test(result.run_dir, show=False).per_seed[0]["individual"]
    assert again["seen"] == res["seen"] and again["unseen"] == res["unseen"]

    runner.adapt(result.run_dir, k=3, show=False)
    in_run = torch.load(result.run_dir / "seed-0" / "individual.adapted-k3.ckpt", weights_only=True)["state_dict"]
    path = tmp_path / "newcomers.jsonl"
    new_ids = export_support(result.run_dir, 3, path)
    split = pd.read_parquet(result.run_dir / "seed-0" / "split.parquet")
    runner.adapt_new_users(result.run_dir, path, show=False)
    saved = torch.load(result.run_dir / "seed-0" / "individual.users-newcomers.ckpt", weights_only=True)
    names = ["heads.weight"] if not hidden else ["heads.b1", "heads.b2", "heads.w1", "heads.w2"]
    assert sorted(saved["state_dict"]) == names
    user_ids = sorted(split.user_id.unique())
    index = [user_ids.index(u) for u in new_ids]
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(value, in_run[key][index], rtol=1e-5, atol=1e-6)
    if not hidden:  # plrm export checks that W[u] . h (here g is the identity) reproduces the method's rewards
        assert (export(result.run_dir, tmp_path / "export", show=False) / "head.safetensors").is_file()


@pytest.mark.slow
def test_minority_users_are_served_by_every_personalized_head_method(tmp_path):
    """The calibration world with a planted minority (10% of users with negated true weights; Dong et al. Fig. 5).
    Measured (seed 0; 13 seen and 7 unseen minority users; worst 10% = the worst 2 / 1 of them): the Global RM
    orders 0.19 / 0.18 of a minority user's pairs (worst 10%: 0.13 / 0.09), Individual RM 0.99 / 0.95 (0.95 /
    0.90). Worst 10% of the minority, seen / unseen: Individual 0.955 / 0.90, Similar-user 0.955 / 0.69,
    Further-FT 0.305 / 0.15: each above the Global RM's."""
    recipe = load_recipe("quickstart", [o for o in _world(tmp_path) if o != "~methods.bt"] + [
        "data.minority_fraction=0.1", "+methods.similar_user={}",
        "+methods.further_ft={lr: 0.01, max_epochs: 20, ft_lr: 0.05}"])
    result = runner.fit(recipe, show=False)
    minority = runner.prepare(recipe).data.truth["minority"]
    per_user = result.per_user
    per_user = per_user[minority[per_user.user_id.str.removeprefix("user").astype(int).to_numpy()]]
    accuracy = {key: torch.tensor(frame.accuracy.to_numpy()) for key, frame in per_user.groupby(["method", "group"])}
    assert accuracy[("bt", "seen")].mean() <= 0.3 and accuracy[("bt", "unseen")].mean() <= 0.3
    assert accuracy[("individual", "seen")].mean() >= 0.9 and accuracy[("individual", "unseen")].mean() >= 0.85
    for group in ("seen", "unseen"):
        global_rm = worst_fraction_mean(accuracy[("bt", group)], 0.1)
        for method in ("individual", "similar_user", "further_ft"):
            assert worst_fraction_mean(accuracy[(method, group)], 0.1) > global_rm, (method, group)
