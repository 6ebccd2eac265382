"""Scores of whole responses under a policy and a guide: the per-pair numbers every policy-level accuracy is a
function of (The Reward Model Selection Crisis in Personalized Alignment, Rezk et al., arXiv 2512.23067, eq. 3-7).

For each response y of a pair, with the policy pi and the guide's per-token reward r:

    LL  = sum_t log pi(y_t | x, y_<t)          (the response ends with the policy's EOS, which counts)
    LLn = LL / |y|                             (eq. 4 and 7 are length-normalised; eq. 5 and 6 are sums)
    R   = sum_t r(y_t | x, y_<t)               (a sequence RM: the reward of each prefix r(x, y_<=t), and for the
                                                closing EOS the reward of the whole response -- exactly what ARGS
                                                adds along the trajectory; a token RM: its token rewards)
    RM  = the guide's reward of the whole response (what RM accuracy compares)

and per pair the chosen-minus-rejected differences dLL, dLLn, dR, dRM. RM accuracy is 1[dRM > 0], the base
policy's 1[dLLn > 0], reward-guided decoding's 1[dLL + lambda dR > 0]: one forward of each model per response,
for any lambda (plrm.eval.policy chooses it exactly).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from plrm.decoding.guides import Guide, SequenceGuide, TextGuide
from plrm.decoding.policy import Policy


@torch.no_grad()
def score_items(policy: Policy, guide: Guide | None, items: dict, guide_items: dict | None,
                users: Tensor) -> dict[str, Tensor]:
    """LL, LLn, R and RM (each (N,) float32) of token batches: ``items`` in the policy's tokenization (prompt ++
    response, ``prompt_lengths``), ``guide_items`` the same responses in the guide's; without a guide R and RM
    are 0."""
    logps, valid = policy.response_logprobs(items, users.to(policy.device))
    ll = logps.sum(1)
    out = {"ll": ll, "lln": ll / valid.sum(1).clamp_min(1), "r": torch.zeros_like(ll), "rm": torch.zeros_like(ll)}
    if guide is None:
        return out
    u = users.to(guide.device)
    rewards, g_valid = guide.response_rewards(guide_items, u)
    total = (rewards * g_valid).sum(1)
    whole = guide.sequence_reward(guide_items, u)
    if isinstance(guide, (SequenceGuide, TextGuide)):  # the policy's closing EOS: the response without it
        ends = torch.isin(_last_tokens(items), policy.stop_ids.to(items["ids"].device)).to(total.device)
        total = total + whole * ends
    return {**out, "r": total, "rm": whole}


@torch.no_grad()
def response_scores(policy: Policy, guide: Guide | None, prompts: list[str], responses: list[str], users: Tensor,
                    batch_size: int = 16) -> dict[str, np.ndarray]:
    """:func:`score_items` of texts, each model tokenizing them its own way, in batches: (N,) float64 each."""
    out = {name: np.zeros(len(prompts)) for name in ("ll", "lln", "r", "rm")}
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        p, r = list(prompts[rows]), list(responses[rows])
        scores = score_items(policy, guide, policy.tokenize(p, r), guide.tokenize(p, r) if guide else None,
                             users[rows])
        for name, value in scores.items():
            out[name][rows] = value.double().cpu().numpy()
    return out


def _last_tokens(items: dict) -> Tensor:
    return items["ids"][torch.cumsum(items["lengths"], 0) - 1]


def pair_differences(policy: Policy, guide: Guide | None, prompts: list[str], chosen: list[str],
                     rejected: list[str], users: Tensor, batch_size: int = 16) -> dict[str, np.ndarray]:
    """dLL, dLLn, dR, dRM (chosen minus rejected) of each pair."""
    n = len(prompts)
    both = response_scores(policy, guide, list(prompts) * 2, list(chosen) + list(rejected), torch.cat([users, users]),
                           batch_size)
    return {f"d{name}": values[:n] - values[n:] for name, values in both.items()}
