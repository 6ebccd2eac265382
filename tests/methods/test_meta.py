"""The functional meta-learning helpers (plrm.methods.meta): layout, episodes, RPO, and the vectorized inner loop
against the per-user autograd loop and against finite differences."""

import math

import pytest
import torch
import torch.nn.functional as F

from plrm.methods import meta


def test_pad_groups_lays_out_positions_in_order_with_a_mask():
    group = torch.tensor([2, 0, 2, 2, 0])
    index, mask = meta.pad_groups(group, 4)
    assert index.tolist() == [[1, 4, 0], [0, 0, 0], [0, 2, 3], [0, 0, 0]]
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True], [False, False, False]]


def test_episode_split_sizes_follow_the_support_fraction():
    # group sizes 10, 7, 2, 1: round(0.1 n) clamped to [1, n - 1] -> 1, 1, 1; a single pair goes to support
    group = torch.tensor([0] * 10 + [1] * 7 + [2] * 2 + [3])
    support = meta.episode_split(group, 4, 0.1, torch.Generator().manual_seed(0))
    assert torch.bincount(group[support], minlength=4).tolist() == [1, 1, 1, 1]
    support = meta.episode_split(group, 4, 0.5, torch.Generator().manual_seed(0))
    assert torch.bincount(group[support], minlength=4).tolist() == [5, 4, 1, 1]  # round(3.5) = 4 (half to even)


def test_episode_split_is_random_per_episode_and_seeded():
    group = torch.zeros(50, dtype=torch.long)
    a = meta.episode_split(group, 1, 0.2, torch.Generator().manual_seed(1))
    b = meta.episode_split(group, 1, 0.2, torch.Generator().manual_seed(1))
    c = meta.episode_split(group, 1, 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.sum() == 10


def test_robust_objective_by_hand():
    """L = (1, 2, 3, 4), rho = 0.5: tau = median = 2.5 (torch.quantile interpolates).
    gamma = 0.5: weights sigmoid((L - 2.5) / 0.5) = sigmoid(-3, -1, 1, 3); objective = sum w L / 4.
    gamma = 0 (eq. 13): only 3 and 4 count: (3 + 4) / 4."""
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = (s(-3) * 1 + s(-1) * 2 + s(1) * 3 + s(3) * 4) / 4
    assert meta.robust_objective(losses, 0.5, 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert meta.robust_objective(losses, 0.5, 0.0).item() == pytest.approx(7 / 4)
    # rho = 1: tau = min; hard filtering keeps those strictly above it
    assert meta.robust_objective(losses, 1.0, 0.0).item() == pytest.approx(9 / 4)


def test_robust_objective_gradient_is_eq_15_differentiated_with_tau_fixed():
    """d/dL_i [sigmoid((L_i - tau)/g) L_i] = s_i + L_i s_i (1 - s_i) / g, over n = 2 users."""
    losses = torch.tensor([0.2, 1.0], requires_grad=True)
    meta.robust_objective(losses, 0.5, 0.5).backward()
    tau = 0.6
    s = torch.sigmoid((losses.detach() - tau) / 0.5)
    expected = (s + losses.detach() * s * (1 - s) / 0.5) / 2
    torch.testing.assert_close(losses.grad, expected)


def _problem(seed=0, users=5, dim=6, k=3):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 1, 4, 2, 5][:users]
    h_support = [torch.randn(n, dim, generator=g) for n in sizes]
    h_query = [torch.randn(n + 1, dim, generator=g) for n in sizes]
    basis = torch.randn(k, dim, generator=g).requires_grad_(True)
    w0 = torch.randn(k, generator=g).requires_grad_(True)
    return h_support, h_query, basis, w0


def _logit(fast, x):
    return x @ fast["w"]


def _vectorized_loss(h_support, h_query, basis, w0, steps, lr, first_order, reduction="mean"):
    """Support / query pairs as feature differences h, mapped through the basis A (so the outer gradient
    reaches A through the inner step), inner loop vmapped over padded users."""
    def padded(hs):
        group = torch.cat([torch.full((len(h),), u) for u, h in enumerate(hs)])
        idx, mask = meta.pad_groups(group, len(hs))
        return (torch.cat(hs) @ basis.T)[idx], mask
    xs, ms = padded(h_support)
    xq, mq = padded(h_query)
    fast = meta.adapt(_logit, {"w": w0}, xs, ms, steps, lr, first_order, reduction)
    return meta.query_losses(_logit, fast, xq, mq, reduction)


def _loop_loss(h_support, h_query, basis, w0, steps, lr, first_order, reduction="mean"):
    fast = meta.reference_adapt(_logit, {"w": w0}, [h @ basis.T for h in h_support], steps, lr, first_order,
                                reduction)
    nll = [-F.logsigmoid(_logit(f, h @ basis.T)) for f, h in zip(fast, h_query)]
    return torch.stack([n.sum() if reduction == "sum" else n.mean() for n in nll])


@pytest.mark.parametrize("steps,first_order,reduction", [(1, False, "mean"), (3, False, "mean"), (2, True, "mean"),
                                                         (3, False, "sum")])
def test_vmapped_inner_loop_equals_the_per_user_loop_outer_gradients(steps, first_order, reduction):
    hs, hq, basis, w0 = _problem()
    grads = []
    for fn in (_vectorized_loss, _loop_loss):
        basis.grad, w0.grad = None, None
        losses = fn(hs, hq, basis, w0, steps, 0.3, first_order, reduction)
        meta.robust_objective(losses, 0.5, 0.5).backward()
        grads.append((losses.detach(), basis.grad.clone(), w0.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_second_order_outer_gradient_matches_finite_differences():
    """The outer gradient w.r.t. w0 and the basis A (through 2 inner steps) against central differences in
    float64; first-order MAML gives a different gradient on the same problem."""
    hs, hq, basis, w0 = _problem(seed=3)
    hs, hq = [h.double() for h in hs], [h.double() for h in hq]
    basis = basis.detach().double().requires_grad_(True)
    w0 = w0.detach().double().requires_grad_(True)

    def objective(b, w, first_order=False):
        return _vectorized_loss(hs, hq, b, w, 2, 0.5, first_order).mean()

    objective(basis, w0).backward()
    eps = 1e-6
    for param, analytic in ((w0, w0.grad), (basis, basis.grad)):
        numeric = torch.zeros_like(param)
        for i in range(param.numel()):
            delta = torch.zeros_like(param).view(-1)
            delta[i] = eps
            delta = delta.view_as(param)
            with torch.no_grad():
                plus = objective(basis + delta if param is basis else basis, w0 + delta if param is w0 else w0)
                minus = objective(basis - delta if param is basis else basis, w0 - delta if param is w0 else w0)
            numeric.view(-1)[i] = (plus - minus) / (2 * eps)
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
    w0_second = w0.grad.clone()
    w0.grad = None
    objective(basis, w0, first_order=True).backward()
    assert (w0.grad - w0_second).abs().max() > 1e-3  # the second-order terms are not negligible here


def test_summed_loss_is_eq_7_and_scales_the_step_with_the_support_size():
    """eq. 7 sums the NLL over a user's pairs: user 0 with two copies of the same pair d takes twice the step
    of user 1 with d once; with the mean both take the same step. One step from w0 = 0: grad = -sigmoid(0) d."""
    d = torch.tensor([1.0, -2.0])
    x = torch.stack([torch.stack([d, d]), torch.stack([d, torch.zeros(2)])])
    mask = torch.tensor([[True, True], [True, False]])
    w0 = {"w": torch.zeros(2)}
    summed = meta.adapt(_logit, w0, x, mask, steps=1, lr=0.1, reduction="sum")["w"]
    torch.testing.assert_close(summed, torch.stack([0.1 * 0.5 * 2 * d, 0.1 * 0.5 * d]))
    averaged = meta.adapt(_logit, w0, x, mask, steps=1, lr=0.1, reduction="mean")["w"]
    torch.testing.assert_close(averaged, torch.stack([0.1 * 0.5 * d, 0.1 * 0.5 * d]))
    losses = meta.query_losses(_logit, {"w": torch.zeros(2, 2)}, x, mask, "sum")
    torch.testing.assert_close(losses, torch.tensor([2 * math.log(2), math.log(2)]))


def test_adapt_with_zero_support_pairs_keeps_the_initialization():
    w0 = torch.tensor([0.5, -1.0])
    x = torch.randn(2, 3, 2)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    fast = meta.adapt(_logit, {"w": w0}, x, mask, steps=2, lr=1.0)
    torch.testing.assert_close(fast["w"][1], w0)
    assert not torch.allclose(fast["w"][0], w0)
