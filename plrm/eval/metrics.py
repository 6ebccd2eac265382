"""Per-user preference metrics, as the papers report them.

LoRe (Bose et al., arXiv 2504.14439) eq. 15; When Personalization Meets Reality (Dong et al., arXiv 2502.19158)
§5; the worst-k% users of MRM (Cai et al., arXiv 2601.18731).

Accuracy is computed per user first (a pair is correct when its preference logit is > 0; a tie counts as
wrong and is counted), then averaged over users -- the papers' headline number -- so a user with many pairs
weighs as much as one with few. ``accuracy_pooled`` is the micro average over pairs. ``accuracy_worst_10pct``
is the mean of the ceil(10% * n_users) lowest per-user accuracies. AUROC is pooled over pairs: each pair
is scored in both orientations, (chosen, rejected) as a positive with logit s and (rejected, chosen) as a
negative with logit -s.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc


def per_user_accuracy(logits: torch.Tensor, user_idx: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy (U,), n_pairs (U,)); accuracy is NaN for users without pairs."""
    # .double(): bincount of an empty input returns int64 even with float weights (torch 2.13)
    correct = torch.bincount(user_idx, weights=(logits > 0).double(), minlength=n_users).double()
    count = torch.bincount(user_idx, minlength=n_users)
    acc = torch.where(count > 0, correct / count.clamp_min(1), torch.full_like(correct, float("nan")))
    return acc, count


def worst_fraction_mean(user_acc: torch.Tensor, fraction: float) -> float:
    """Mean accuracy of the ceil(fraction * n) worst users."""
    n = len(user_acc)
    if n == 0:
        return float("nan")
    m = max(1, math.ceil(fraction * n))
    return float(torch.sort(user_acc).values[:m].mean())


def pct_key(fraction: float) -> str:
    return f"accuracy_worst_{round(fraction * 100):d}pct"


def summarize(logits: torch.Tensor, user_idx: torch.Tensor, users: np.ndarray, n_users: int,
              worst_fractions: list[float]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Metrics of one group of users; returns (metrics, per-user accuracy (U,), per-user pair count (U,))."""
    acc, count = per_user_accuracy(logits, user_idx, n_users)
    group = torch.as_tensor(users, dtype=torch.long)
    group = group[count[group] > 0]
    group_acc = acc[group]
    n_pairs = len(logits)
    out = {
        "accuracy": float(group_acc.mean()) if len(group) else float("nan"),
        "accuracy_pooled": float((logits > 0).double().mean()) if n_pairs else float("nan"),
        "auroc": float(binary_auroc(torch.cat([logits, -logits]).float(),
                                    torch.cat([torch.ones(n_pairs), torch.zeros(n_pairs)]).long()))
        if n_pairs else float("nan"),
        "ties": int((logits == 0).sum()),
        "n_users": int(len(group)),
        "n_users_without_pairs": int(len(users) - len(group)),
        "n_pairs": int(n_pairs),
    }
    for q in worst_fractions:
        out[pct_key(q)] = worst_fraction_mean(group_acc, q)
    return out, acc, count
