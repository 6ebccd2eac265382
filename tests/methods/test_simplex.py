"""Batched projected Newton on the simplex (plrm.methods.simplex): projection and derivatives by hand and by
autograd, every user's KKT conditions at the solution, agreement with scipy's SLSQP solving one user at a time,
and LoRe's adapt_solver 'newton' writing those weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from plrm.methods.lore import LoRe
from plrm.methods.simplex import (
    fit_simplex,
    gradient_and_hessian,
    kkt_residual,
    objective,
    pad_pairs,
    project_to_simplex,
)


def test_projection_by_hand():
    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.6, -1.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]],
                            dtype=torch.float64)
    torch.testing.assert_close(project_to_simplex(v), expected)


def test_padding_keeps_each_users_pairs_in_order():
    diffs = torch.arange(10.0).view(5, 2)
    padded, mask = pad_pairs(diffs, torch.tensor([2, 0, 2, 2, 0]), 4)
    assert padded.shape == (4, 3, 2) and mask.tolist() == [[True, True, False], [False] * 3, [True] * 3, [False] * 3]
    assert padded[0, :2].tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert padded[2].tolist() == [[0.0, 1.0], [4.0, 5.0], [6.0, 7.0]]


def test_objective_gradient_and_hessian_equal_autograd():
    torch.manual_seed(0)
    d, mask = torch.randn(3, 4, 5, dtype=torch.float64), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    w = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    ridge = 0.3
    # user 1 by hand: the mean over its 2 pairs of -log sigmoid(w.d) plus the ridge around the uniform weights
    by_hand = -F.logsigmoid(d[1, :2] @ w[1]).mean() + ridge * ((w[1] - 0.2) ** 2).sum()
    torch.testing.assert_close(objective(w, d, mask, ridge)[1], by_hand)
    g, h = gradient_and_hessian(w, d, mask, ridge)
    for u in range(3):
        def f(x, u=u):
            return objective(x[None], d[u:u + 1], mask[u:u + 1], ridge)[0]
        torch.testing.assert_close(g[u], torch.func.grad(f)(w[u]))
        torch.testing.assert_close(h[u], torch.func.hessian(f)(w[u]))


def _world(n_users: int, k: int, rank: int = 10, alpha: float = 0.05, seed: int = 0, pair_seed: int = 0):
    """k pairs d = R(y+) - R(y-) per user, labelled by the user's true Dirichlet(alpha) weights (drawn from
    ``seed``; the pairs from ``pair_seed``)."""
    torch.manual_seed(seed)
    true = torch.distributions.Dirichlet(torch.full((rank,), alpha)).sample((n_users,))
    d = torch.randn(n_users * k, rank, generator=torch.Generator().manual_seed(pair_seed))
    owner = torch.arange(n_users).repeat_interleave(k)
    return d * torch.sign((d * true[owner]).sum(1))[:, None], owner


def _slsqp(d: np.ndarray, ridge: float) -> np.ndarray:
    """One user's problem solved by scipy's SLSQP from the uniform weights, to a tight tolerance."""
    b = d.shape[1]

    def f(w):
        return np.logaddexp(0, -(d @ w)).mean() + ridge * ((w - 1 / b) ** 2).sum()

    def grad(w):
        return -(d * (1 / (1 + np.exp(d @ w)))[:, None]).mean(0) + 2 * ridge * (w - 1 / b)

    out = minimize(f, np.full(b, 1 / b), jac=grad, method="SLSQP", bounds=[(0, 1)] * b,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(b)}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    assert out.success, out.message
    return out.x


@pytest.mark.parametrize("k", [1, 3, 9, 40])
def test_every_user_meets_kkt_and_matches_slsqp_one_user_at_a_time(k):
    d, owner = _world(60, k)
    fit = fit_simplex(d, owner, 60, ridge=1e-3)
    w = fit.weights.double()
    assert fit.kkt_residual.max() < 1e-6
    assert torch.all(w >= 0) and torch.allclose(w.sum(1), torch.ones(60, dtype=torch.float64))
    # the KKT conditions recomputed here, from the returned weights
    padded, mask = pad_pairs(d.double(), owner, 60)
    g, _ = gradient_and_hessian(w, padded, mask, 1e-3)
    assert kkt_residual(w, g).max() < 1e-6
    for u in range(0, 60, 6):
        reference = _slsqp(d[owner == u].double().numpy(), 1e-3)
        np.testing.assert_allclose(w[u].numpy(), reference, atol=1e-5)
    if k >= 9:  # most users' solutions lie on a face of the simplex: the active set was found, not approached
        assert (w == 0).any(1).float().mean() > 0.5


def test_a_user_without_pairs_gets_the_uniform_weights_and_bad_ridge_is_refused():
    d, owner = _world(3, 5)
    fit = fit_simplex(d, owner, 4, ridge=1e-2)  # user 3 has no pairs
    torch.testing.assert_close(fit.weights[3], torch.full((10,), 0.1))
    with pytest.raises(ValueError, match="ridge must be > 0"):
        fit_simplex(d, owner, 3, ridge=0.0)


def test_lore_newton_adaptation_writes_the_simplex_solution_and_orders_held_out_pairs_as_well_as_adam():
    """LoRe with adapt_solver 'newton' (basis = identity, so support vectors are the pair differences): the
    softmax of the written logits is fit_simplex's solution, and the adapted users order held-out pairs at least
    as well as after the Adam path."""
    d, owner = _world(200, 9, seed=1)
    test_d, test_owner = _world(200, 50, seed=1, pair_seed=1)  # the same users, other pairs
    support = {"chosen": d, "rejected": torch.zeros_like(d), "user_idx": owner, "pair_weight": torch.ones(len(d))}
    accuracy = {}
    for solver in ("adam", "newton"):
        model = LoRe(LoRe.Config(rank=10, adapt_solver=solver), n_users=200, feature_dim=10)
        with torch.no_grad():
            model.basis.weight.copy_(torch.eye(10))
        model.adapt(support, torch.arange(200))
        w = torch.softmax(model.user_logits.detach(), -1)
        accuracy[solver] = float(((test_d * w[test_owner]).sum(1) > 0).float().mean())
        if solver == "newton":
            assert torch.isfinite(model.user_logits).all()
            torch.testing.assert_close(w, fit_simplex(d, owner, 200, ridge=1e-4).weights, rtol=0, atol=1e-6)
    assert accuracy["newton"] >= accuracy["adam"] - 0.005, accuracy
