"""Functional meta-learning over users with ``torch.func``: MAML's inner loop for a whole meta-batch at once.

learn2learn (the library MAML code usually builds on) does not install on Python >= 3.11 (learnables/learn2learn#413),
and its ``clone()`` / ``adapt()`` run one task at a time. Here a task is a user, and the inner loop of every user
of a meta-batch runs as one program: ``torch.func.grad`` differentiates a user's support loss with respect to
the *fast* parameters (the ones adapted per user), ``torch.func.vmap`` maps that over users, and users with
different numbers of pairs are padded to a common length and masked. The result stays on the outer autograd
tape, so the query loss backpropagates through the inner steps to the shared initialization and to everything
the pair inputs were computed from (second-order MAML); ``first_order=True`` stops the gradient at the inner
gradients (FOMAML). Vocabulary follows learn2learn: :func:`adapt` is ``clone().adapt()`` for many users.

:func:`reference_adapt` is the per-user Python loop with ``torch.autograd.grad(create_graph=True)`` that the
vectorized path must equal (tests/methods/test_meta.py) and beat (benchmarks/bench_mrm.py); it is never used
for training.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from plrm.methods.losses import Reduction, masked_bradley_terry_nll, reduce_nll, robust_objective  # noqa: F401

Params = dict[str, Tensor]
# logit_fn(fast params of ONE user, that user's pair inputs (P, ...)) -> preference logits (P,)
LogitFn = Callable[[Params, Tensor], Tensor]


def pad_groups(group: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Lay out the positions of a flat (N,) group assignment as a padded (G, M) index and mask.

    Row g lists, in their original order, the positions i with group[i] == g; M is the largest group's size;
    padded slots hold index 0 and mask False. Pure tensor ops (a stable sort and a scatter), no loop.
    """
    counts = torch.bincount(group, minlength=n_groups)
    width = int(counts.max()) if len(group) else 0
    order = torch.sort(group, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    sorted_group = group[order]
    slot = torch.arange(len(group), device=group.device) - starts[sorted_group]
    index = torch.zeros(n_groups, width, dtype=torch.long, device=group.device)
    mask = torch.zeros(n_groups, width, dtype=torch.bool, device=group.device)
    index[sorted_group, slot] = order
    mask[sorted_group, slot] = True
    return index, mask


def episode_split(group: Tensor, n_groups: int, support_fraction: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """A random support / query split of every group's positions: True where a position is support.

    Each group with n >= 2 positions gets s = clamp(round(support_fraction * n), 1, n - 1) support positions
    (so both sets are non-empty); a group with a single position puts it in support and has no query.
    """
    counts = torch.bincount(group, minlength=n_groups)
    keys = group.to(torch.float64) + torch.rand(len(group), generator=generator, dtype=torch.float64,
                                                device=group.device)
    order = torch.argsort(keys)                               # grouped, random order inside each group
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group), device=group.device) - starts[group[order]]
    n_support = torch.round(support_fraction * counts.to(torch.float64)).long()
    n_support = torch.minimum(n_support.clamp_min(1), (counts - 1).clamp_min(1))
    return rank < n_support[group]


def masked_nll(logit_fn: LogitFn, fast: Params, x: Tensor, mask: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Bradley-Terry NLL of one user's unmasked pairs x under their fast parameters (plrm.methods.losses)."""
    return masked_bradley_terry_nll(logit_fn(fast, x), mask, reduction)


def adapt(logit_fn: LogitFn, fast0: Params, x: Tensor, mask: Tensor, steps: int, lr: float,
          first_order: bool = False, reduction: Reduction = "mean") -> Params:
    """``steps`` gradient steps w <- w - lr * grad L_support(w) from ``fast0`` for every user at once.

    x: (U, S, ...) padded support inputs, mask: (U, S). Returns the adapted fast parameters, each (U, ...),
    differentiable with respect to ``fast0`` and to ``x`` (unless ``first_order``, which treats the inner
    gradients as constants). ``reduction``: the support loss is the sum (eq. 7: the step grows with the number
    of support pairs) or the mean of the pairs' NLL.
    """
    def one_user(fast: Params, x_u: Tensor, mask_u: Tensor) -> Params:
        for _ in range(steps):
            g = grad(lambda p: masked_nll(logit_fn, p, x_u, mask_u, reduction))(fast)
            fast = {k: fast[k] - lr * (g[k].detach() if first_order else g[k]) for k in fast}
        return fast

    return vmap(one_user, in_dims=(None, 0, 0))(fast0, x, mask)


def query_losses(logit_fn: LogitFn, fast: Params, x: Tensor, mask: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Each user's query NLL (summed or averaged over their query pairs) under their own adapted parameters: (U,)."""
    return vmap(lambda p, x_u, m_u: masked_nll(logit_fn, p, x_u, m_u, reduction))(fast, x, mask)


def reference_adapt(logit_fn: LogitFn, fast0: Params, xs: list[Tensor], steps: int, lr: float,
                    first_order: bool = False, reduction: Reduction = "mean") -> list[Params]:
    """The same inner loop, one user at a time with ``torch.autograd.grad`` (unpadded per-user inputs ``xs``).
    Reference for tests and benchmarks only: Python loops over users never run in training."""
    out = []
    names = list(fast0)
    for x_u in xs:
        fast = dict(fast0)
        for _ in range(steps):
            loss = reduce_nll(-F.logsigmoid(logit_fn(fast, x_u)), reduction)
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=not first_order)
            fast = {k: fast[k] - lr * g for k, g in zip(names, grads)}
        out.append(fast)
    return out
