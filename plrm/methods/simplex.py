"""Per-user logistic regression on the probability simplex, every user at once, by projected Newton.

    minimize over w_u in Delta^{B-1}:   f_u(w) = mean_{i in D_u} -log sigmoid(w^T d_i) + ridge * ||w - 1/B||^2

This is LoRe's few-shot step (Bose et al., arXiv 2504.14439, eq. 11: a new user's weights on the simplex, the
basis frozen, d_i = A (e(x, y+) - e(x, y-))). Each user's problem is small (B unknowns, a few pairs) and convex;
``ridge`` > 0 makes it strictly convex, so it has one minimizer even when the user has fewer pairs than B.
Instead of hundreds of first-order steps, every user takes Newton steps on their own (B, B) system, all users
in one tensor program, until each user's KKT conditions hold:

    g = grad f_u(w);  nu = the multiplier of sum(w) = 1;   g_b = nu where w_b > 0,   g_b >= nu where w_b = 0

One iteration (an active-set projected Newton method; Bertsekas, "Projected Newton methods for optimization
problems with simple constraints", SIAM J. Control Optim. 1982, adapted to the simplex):
  1. g (U, B) and H (U, B, B) in closed form from the padded pairs (U, S, B);
  2. the free set: coordinates above zero, and zeros whose gradient says f decreases by moving into them;
  3. the Newton direction within the simplex on the free set, from one batched Cholesky factor per iteration
     (``_direction``); a zero the direction would push below zero is fixed and that user's direction solved again;
  4. Armijo backtracking along the projection arc P(w + t s), per user (a full step may zero several weights);
users whose KKT residual is below ``tol`` stop moving.

No library solves a batch of small simplex-constrained problems on tensors (scipy's SLSQP takes one problem at a
time), hence this module. ``benchmarks/bench_adapt.py`` compares it with the Adam path it can replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from plrm.methods.meta import pad_groups

ZERO = 1e-12  # a weight at or below this is on the boundary


@dataclass
class SimplexFit:
    weights: Tensor       # (U, B) on the simplex
    iterations: int       # Newton iterations until every user met the tolerance (or max_iter)
    kkt_residual: Tensor  # (U,) each user's KKT residual at the returned weights


def pad_pairs(diffs: Tensor, owner: Tensor, n_users: int) -> tuple[Tensor, Tensor]:
    """Pairs (P, B) of users ``owner`` (P,) in [0, n_users) as a zero-padded (U, S, B) tensor and its mask (U, S),
    S = the most pairs of one user; pairs keep their order within a user (plrm.methods.meta.pad_groups)."""
    index, mask = pad_groups(owner, n_users)                                       # (U, S)
    return diffs[index] * mask[..., None], mask


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v (U, B) onto the simplex (sort-based; Held, Wolfe & Crowder 1974)."""
    u, _ = torch.sort(v, dim=1, descending=True)
    css = torch.cumsum(u, dim=1) - 1
    k = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    rho = (u * k > css).sum(1, keepdim=True)                                       # (U, 1), >= 1
    theta = css.gather(1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


def objective(w: Tensor, d: Tensor, mask: Tensor, ridge: float) -> Tensor:
    """f_u(w_u) (U,) for weights w (U, B) and padded pairs d (U, S, B) with mask (U, S)."""
    n = mask.sum(1).clamp_min(1)
    nll = (-F.logsigmoid(torch.bmm(d, w[:, :, None])[..., 0]) * mask).sum(1) / n
    return nll + ridge * (w - 1.0 / w.shape[1]).pow(2).sum(1)


def gradient_and_hessian(w: Tensor, d: Tensor, mask: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """g (U, B) and H (U, B, B) of f at w."""
    n = mask.sum(1).clamp_min(1).to(w.dtype)[:, None]
    p = torch.sigmoid(torch.bmm(d, w[:, :, None])[..., 0]) * mask                   # (U, S), 0 on padding
    g = -torch.bmm(((1 - p) * mask)[:, None, :], d)[:, 0] / n + 2 * ridge * (w - 1.0 / w.shape[1])
    h = torch.bmm(d.transpose(1, 2) * (p * (1 - p) / n)[:, None, :], d)              # (U, B, B)
    h.diagonal(dim1=1, dim2=2).add_(2 * ridge)
    return g, h


def kkt_residual(w: Tensor, g: Tensor) -> Tensor:
    """Each user's violation of the KKT conditions (U,): with nu the mean gradient over the support (w_b > 0),
    max(|g_b - nu| on the support, nu - g_b on the zeros, 0)."""
    support = w > ZERO
    nu = (g * support).sum(1) / support.sum(1).clamp_min(1)
    on_support = ((g - nu[:, None]).abs() * support).amax(1)
    at_zero = ((nu[:, None] - g).clamp_min(0) * ~support).amax(1)
    return torch.maximum(on_support, at_zero)


def _direction(g: Tensor, h: Tensor, free: Tensor) -> Tensor:
    """Newton direction s (U, B) on the free set within the simplex: zero off the free set, summing to 0, and
    minimizing the quadratic model g^T s + s^T H s / 2 there. With H~ = H on the free block and the identity
    elsewhere, a = H~^{-1} g_F and c = H~^{-1} 1_F (one Cholesky factor, two right-hand sides), the multiplier is
    nu = 1_F^T a / 1_F^T c and s = -(a - nu c)."""
    f = free.to(g.dtype)
    h_free = h * (f[:, :, None] * f[:, None, :]) + torch.diag_embed(1 - f)         # (U, B, B), positive definite
    chol, _ = torch.linalg.cholesky_ex(h_free)
    ac = torch.cholesky_solve(torch.stack([g * f, f], dim=2), chol)                 # (U, B, 2)
    a, c = ac[..., 0], ac[..., 1]
    nu = (a * f).sum(1, keepdim=True) / (c * f).sum(1, keepdim=True)
    return -(a - nu * c) * f


def fit_simplex(diffs: Tensor, owner: Tensor, n_users: int, ridge: float = 1e-4, init: Tensor | None = None,
                tol: float = 1e-7, max_iter: int = 100, dtype: torch.dtype = torch.float64) -> SimplexFit:
    """Minimize f_u over the simplex for every user u in [0, n_users) at once; ``diffs`` (P, B): each pair's
    d_i = R(x, y+) - R(x, y-), ``owner`` (P,): its user. A user without pairs gets the ridge's centre (uniform
    weights). ``init`` (U, B): starting weights on the simplex (default uniform). Works in ``dtype`` (float64:
    the tolerance is below float32's resolution of f) and returns weights in the input's dtype. Memory: the
    pairs padded to U x S x B, S = the most pairs of one user (few-shot support: S = k)."""
    if ridge <= 0:
        raise ValueError(f"fit_simplex: ridge must be > 0 (it makes each user's problem strictly convex), got {ridge}")
    b = diffs.shape[1]
    d, mask = pad_pairs(diffs.to(dtype), owner, n_users)
    w = (torch.full((n_users, b), 1.0 / b, dtype=dtype, device=diffs.device) if init is None
         else init.to(dtype).clone())
    idx = torch.arange(n_users, device=diffs.device)  # the users still moving: a user that meets tol stays put
    iterations = 0
    while len(idx) and iterations < max_iter:
        # while every user moves, read the tensors themselves, not gathered copies
        wa, da, ma = (w, d, mask) if len(idx) == n_users else (w[idx], d[idx], mask[idx])
        ga, ha = gradient_and_hessian(wa, da, ma, ridge)
        moving = kkt_residual(wa, ga) > tol
        if not moving.all():
            idx, wa, da, ma, ga, ha = idx[moving], wa[moving], da[moving], ma[moving], ga[moving], ha[moving]
            if not len(idx):
                break
        iterations += 1
        # free: the support, plus zeros whose gradient is below the support's mean (moving in lowers f)
        support = wa > ZERO
        nu = (ga * support).sum(1) / support.sum(1).clamp_min(1)
        free = support | (ga < nu[:, None])
        s = _direction(ga, ha, free)
        for _ in range(b):  # fix zeros the direction would push below zero, and solve again for those users
            leaving = free & (wa <= ZERO) & (s < 0)
            again = leaving.any(1).nonzero()[:, 0]
            if not len(again):
                break
            free[again] &= ~leaving[again]
            s[again] = _direction(ga[again], ha[again], free[again])
        # Armijo backtracking along the projection arc P(w + step s): a full step may zero several weights at
        # once; small steps stay inside the simplex (no free zero moves down), where s is a descent direction
        # (each halving re-evaluates only the users whose step was refused; 1e-12 |f| absorbs rounding)
        f0 = objective(wa, da, ma, ridge)
        candidate = project_to_simplex(wa + s)
        trial, step = torch.arange(len(idx), device=w.device), wa.new_ones(len(idx))
        for _ in range(40):
            c = candidate[trial]
            bound = f0[trial] + 1e-4 * (ga[trial] * (c - wa[trial])).sum(1) + 1e-12 * f0[trial].abs()
            trial = trial[objective(c, da[trial], ma[trial], ridge) > bound]
            if not len(trial):
                break
            step[trial] /= 2
            candidate[trial] = project_to_simplex(wa[trial] + step[trial, None] * s[trial])
        candidate = torch.where(candidate <= ZERO, torch.zeros_like(candidate), candidate)
        if len(idx) == n_users:
            w = candidate
        else:
            w[idx] = candidate
    g, _ = gradient_and_hessian(w, d, mask, ridge)
    return SimplexFit(w.to(diffs.dtype), iterations, kkt_residual(w, g))
