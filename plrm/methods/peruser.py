"""The shared per-user fitting routine: many small independent problems solved as one tensor program.

    minimize over theta_u, for every user u at once:   mean_{i in D_u} loss_i(theta_u) + l2 * ||theta_u||^2

Summing the per-user objectives gives one scalar whose gradient w.r.t. theta_u is exactly user u's own
gradient, and Adam is elementwise, so full-batch Adam on the stacked (U, ...) tensor takes, step for step,
the same trajectory as U separate Adam loops (tests/methods/test_peruser.py checks the equivalence;
benchmarks/bench_lore.py measures the speed-up). LoRe eq. 11, and later PReF, MPU and Individual RM use it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from plrm.methods.optim import adam


def fit_per_user(
    init: Tensor,                                # (U, ...) starting parameters of the users being fitted
    owner: Tensor,                               # (P,) int64 in [0, U): which user each pair belongs to
    pair_loss: Callable[[Tensor, Tensor], Tensor],  # (params of each pair's user (P, ...), pair positions (P,)) -> (P,)
    steps: int,
    lr: float,
    l2: float = 0.0,
) -> Tensor:
    """Fit every user's parameters on their own pairs; returns the fitted (U, ...) tensor (detached)."""
    params = init.detach().clone().requires_grad_(True)
    optimizer = adam([params], lr=lr)
    counts = torch.bincount(owner, minlength=init.shape[0]).clamp_min(1)
    weight = (1.0 / counts.to(init.dtype))[owner]  # per-user mean over that user's pairs
    positions = torch.arange(len(owner), device=owner.device)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = (pair_loss(params[owner], positions) * weight).sum()
            if l2:
                loss = loss + l2 * params.pow(2).sum()
            loss.backward()
            optimizer.step()
    return params.detach()


def fit_per_user_sets(
    init: dict[str, Tensor],                     # name -> (U, ...) starting parameters of the users being fitted
    user_losses: Callable[[dict[str, Tensor]], Tensor],  # parameters -> (U,) each user's mean loss on their pairs
    steps: int,
    lr: float,
    l2: float = 0.0,
) -> dict[str, Tensor]:
    """:func:`fit_per_user` for per-user parameters held as several (U, ...) tensors (an MLP head per user) whose
    losses the caller computes on the users' padded pair sets (``bmm`` over (U, S, D)), not on a per-pair gather:
    a gathered copy of every pair's user's weights would hold P x D x H numbers. The sum over users of their own
    mean losses again gives each user exactly their own gradient, so Adam follows U independent trajectories.
    Returns the fitted tensors (detached), same names."""
    params = {name: value.detach().clone().requires_grad_(True) for name, value in init.items()}
    optimizer = adam(list(params.values()), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = user_losses(params).sum()
            if l2:
                loss = loss + l2 * sum(p.pow(2).sum() for p in params.values())
            loss.backward()
            optimizer.step()
    return {name: p.detach() for name, p in params.items()}
