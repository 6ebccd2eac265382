"""Losses as pure functions of tensors: a test calls them with numbers, no model, no batch dict (Bradley-Terry,
MRM's robust objective, DPO and GenARM).

Methods compose them; the base class's ``nll`` is :func:`bradley_terry_nll` with the batch's user weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["sum", "mean"]


def bradley_terry_nll(logits: Tensor, pair_weight: Tensor | None = None) -> Tensor:
    """Mean over pairs of -log sigmoid(r+ - r-), the Bradley-Terry negative log-likelihood (LoRe, Bose et al.,
    arXiv 2504.14439, eq. 4). ``pair_weight`` (P,): each pair's weight, e.g. 1/|D_u| scaled to mean 1, which
    makes the mean LoRe's user-balanced eq. 10."""
    per_pair = -F.logsigmoid(logits)
    if pair_weight is not None:
        per_pair = per_pair * pair_weight
    return per_pair.mean()


def reduce_nll(nll: Tensor, reduction: Reduction) -> Tensor:
    """One user's pair NLL summed (MRM, Cai et al., eq. 7) or averaged."""
    return nll.sum() if reduction == "sum" else nll.mean()


def masked_bradley_terry_nll(logits: Tensor, mask: Tensor, reduction: Reduction = "mean") -> Tensor:
    """-log sigmoid(logit) over one user's unmasked pairs (P,), summed (MRM eq. 7) or averaged; 0 when none is
    unmasked (a padded slot's logit never reaches the result)."""
    nll = -F.logsigmoid(logits)
    m = mask.to(nll.dtype)
    total = (nll * m).sum()
    return total if reduction == "sum" else total / m.sum().clamp_min(1.0)


def robust_objective(losses: Tensor, rho: float, gamma: float, population: Tensor | None = None) -> Tensor:
    """The Robust Personalization Objective (MRM §4.2, eq. 13-15), averaged over the meta-batch.

    tau is the (1 - rho) quantile of the users' query losses (linear interpolation, as ``torch.quantile``),
    held constant as a threshold. gamma > 0: eq. 15, sum_i sigmoid((L_i - tau) / gamma) L_i, differentiated
    as written; gamma = 0: eq. 13, hard filtering, only users with L_i > tau count. Divided by the number of
    users so the step size does not depend on the meta-batch size.

    ``population``: the (detached) query losses of the whole meta-batch when ``losses`` are only some of its
    users (a DDP rank's): tau and the number of users come from it, so the parts' objectives sum to the whole's.
    """
    whole = losses.detach() if population is None else population
    tau = torch.quantile(whole, 1.0 - rho)
    if gamma == 0:
        weights = (losses.detach() > tau).to(losses.dtype)
    else:
        weights = torch.sigmoid((losses - tau) / gamma)
    return (weights * losses).sum() / len(whole)


def dpo_logits(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
               ref_rejected_logps: Tensor | None = None, beta: float = 0.1) -> Tensor:
    """beta [(log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))] of each pair (P,), from summed response
    log-probabilities: DPO's implicit reward margin (Rafailov et al., arXiv 2305.18290, eq. 7). Without a reference
    (None) it is beta (log pi(y+) - log pi(y-)): GenARM's (Xu et al., arXiv 2410.08193, eq. 4)."""
    margin = chosen_logps - rejected_logps
    if ref_chosen_logps is not None:
        margin = margin - (ref_chosen_logps - ref_rejected_logps)
    return beta * margin


def dpo_loss(logits: Tensor, label_smoothing: float = 0.0, margin: float = 0.0,
             pair_weight: Tensor | None = None) -> Tensor:
    """Mean over pairs of -(1 - eps) log sigmoid(l - gamma) - eps log sigmoid(-(l - gamma)), l = :func:`dpo_logits`:
    the DPO loss (eps = 0, gamma = 0), with conservative label smoothing eps (cDPO: each label flipped with
    probability eps) and GenARM's target margin gamma. ``pair_weight`` (P,) weighs each pair (user balance)."""
    shifted = logits - margin
    per_pair = -F.logsigmoid(shifted)
    if label_smoothing:
        per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-shifted)
    if pair_weight is not None:
        per_pair = per_pair * pair_weight
    return per_pair.mean()
