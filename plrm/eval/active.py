"""Simulated interactive sessions with new users: which pair to ask next (PReF, Shenfeld et al., arXiv 2503.06358, §4.2,
Algorithm 2).

Every unseen user of a split has a *candidate pool*: their support pairs. A session asks each user ``budget``
questions, one per round, all users at once:

* round 1 asks every user a random candidate (Algorithm 2, t = 0): the first of their support pool in the
  split's seeded order, the same pair the k-shot protocol gives them first;
* later rounds ask, per ``strategy``, either the candidate the method is most uncertain about
  (``uncertainty``: ``model.uncertainty``, e.g. PReF's ||phi||_{H^-1}, eq. 8) or the next one in the seeded
  order (``random``: the baseline, which makes the random session at t answers exactly the k = t few-shot
  protocol);
* after each answer the users' state is re-fit from everything they answered (``model.adapt``: PReF's
  regularized MLE, eq. 4), and their test pairs are scored at every t of ``eval_at``.

Answers come from the pool's held-out labels, or (``answers: oracle``) from the synthetic world's personal
oracle, i.e. the user's noise-free preference. Nothing here loops over users: each round is one batched
scoring of every candidate (the asked ones masked), one per-user argmax and one vectorized ``adapt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from plrm.data.datamodule import PreferenceDataModule
from plrm.data.splits import SUPPORT
from plrm.distributed import to_device
from plrm.errors import SessionError  # noqa: F401  (re-exported: plrm.errors defines every error class)
from plrm.eval.metrics import summarize
from plrm.eval.protocol import score_rows
from plrm.methods.base import PersonalizedRewardModel

STRATEGIES = ("uncertainty", "random")
PERSONAL_ORACLE = "oracle/personal"




@dataclass
class Session:
    strategy: str
    curve: list[dict]     # one row per t of eval_at: {"t": t, **unseen-user metrics}
    asked: np.ndarray     # (n_unseen, budget) canonical rows each user was asked, in order
    user_ids: np.ndarray  # (n_unseen,) the users, rows of ``asked``


def candidate_pools(dm: PreferenceDataModule, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(users (U,), pool (U, P_max) canonical rows in seeded order, -1 past a user's pool); checks the budget."""
    split = dm.split
    users = split.unseen_users
    if len(users) == 0:
        raise SessionError("the split has no unseen users to run a session with (split.unseen_fraction)")
    rows = split.rows(SUPPORT)
    position = np.searchsorted(users, split.row_user[rows])
    sizes = np.bincount(position, minlength=len(users))
    small = np.flatnonzero(sizes < budget)
    if len(small):
        u = small[np.argmin(sizes[small])]
        raise SessionError(f"budget T={budget} exceeds the candidate pool of {len(small)} unseen user(s), e.g. "
                           f"user {split.user_ids[users[u]]!r} with {sizes[u]} support pairs; lower --budget or "
                           "give unseen users more pairs")
    pool = np.full((len(users), sizes.max()), -1, dtype=np.int64)
    pool[position, split.support_rank[rows]] = rows
    return users, pool


def _answers(dm: PreferenceDataModule, answers: str) -> np.ndarray | None:
    """Per canonical row: whether the simulated user answers the reverse of the stored label."""
    if answers == "labels":
        return None
    oracle = dm.prepared.data.oracle_logits.get(PERSONAL_ORACLE)
    if oracle is None:
        raise SessionError(f"answers=oracle needs a dataset with a personal oracle (a synthetic world); "
                           f"'{dm.prepared.data.name}' has none -- use answers=labels")
    return np.asarray(oracle) < 0


def _where(flip: torch.Tensor, a, b):
    """Row-wise ``b if flip else a`` for backbone inputs: a tensor (B, ...) or a dict of them (token batches)."""
    if isinstance(a, dict):
        return {k: _where(flip, a[k], b[k]) for k in a}
    return torch.where(flip.view(-1, *([1] * (a.dim() - 1))), b, a)


def _batch(dm: PreferenceDataModule, rows: np.ndarray, flip: np.ndarray | None, device) -> dict:
    batch = dm.batch(torch.from_numpy(rows))
    if flip is not None and flip[rows].any():
        f = torch.from_numpy(flip[rows])
        batch["chosen"], batch["rejected"] = (_where(f, batch["chosen"], batch["rejected"]),
                                              _where(f, batch["rejected"], batch["chosen"]))
    return to_device(batch, device)


@torch.no_grad()
def run_session(model: PersonalizedRewardModel, dm: PreferenceDataModule, budget: int,
                strategy: Literal["uncertainty", "random"], eval_at: list[int], worst_fractions: list[float],
                answers: Literal["labels", "oracle"] = "labels", max_pairs: int = 262144) -> Session:
    """Ask every unseen user ``budget`` questions by ``strategy``; unseen-user test metrics at each t of eval_at."""
    if strategy not in STRATEGIES:
        raise SessionError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "uncertainty" and not model.has_uncertainty:
        raise SessionError(f"{type(model).__name__} has no uncertainty score; only strategy 'random' applies")
    if budget < 1:
        raise SessionError(f"budget must be >= 1, got {budget}")
    bad = [t for t in eval_at if not 1 <= t <= budget]
    if bad:
        raise SessionError(f"eval_at {bad} outside 1..budget={budget}")
    model.eval()
    flip = _answers(dm, answers)
    users_np, pool = candidate_pools(dm, budget)
    users = torch.from_numpy(users_np).to(model.device)
    n_users = len(users_np)
    test_rows = dm.test_rows(unseen=True)
    test_user = dm.row_user[torch.from_numpy(test_rows)]
    asked = np.full((n_users, budget), -1, dtype=np.int64)
    is_asked = np.zeros(pool.shape, dtype=bool)
    order_pos = np.zeros(n_users, dtype=np.int64)  # random: next position in the seeded order
    if strategy == "uncertainty":
        # every candidate's inputs gathered once; each round scores them all and masks the asked ones (a score
        # depends on its own pair and the user's state only; gathering the unasked ones cost more than scoring)
        candidates = _batch(dm, pool[pool >= 0], flip, model.device)
        if model.scores_differences():  # reward linear in frozen inputs: e+ - e- is all a score reads
            candidates = {**{k: v for k, v in candidates.items() if k not in ("chosen", "rejected")},
                          "difference": candidates["chosen"] - candidates["rejected"]}
    curve = []
    arange = np.arange(n_users)
    for t in range(1, budget + 1):
        if t == 1 or strategy == "random":
            # the first not-yet-asked candidate in seeded order (only 'random' ever asks from this cursor)
            pick = order_pos
            order_pos = order_pos + 1
        else:
            answered = asked[:, :t - 1].ravel()
            scores = model.uncertainty(_batch(dm, np.sort(answered), flip, model.device), users,
                                       candidates).cpu().numpy()
            grid = np.full(pool.shape, -np.inf)
            grid[pool >= 0] = scores
            grid[is_asked] = -np.inf
            pick = grid.argmax(axis=1)
        asked[:, t - 1] = pool[arange, pick]
        is_asked[arange, pick] = True
        model.adapt(_batch(dm, np.sort(asked[:, :t].ravel()), flip, model.device), users)
        if t in eval_at:
            logits = score_rows(model, dm, test_rows, max_pairs)
            metrics, _, _ = summarize(logits, test_user, users_np, dm.n_users, worst_fractions)
            curve.append({"t": t, **metrics})
    return Session(strategy, curve, asked, dm.split.user_ids[users_np])


def answers_to_match(curves: dict[str, list[dict]], reference: str = "random", target: str = "uncertainty",
                     metric: str = "accuracy") -> dict | None:
    """The fewest answers at which ``target``'s mean curve reaches ``reference``'s value at its last t.

    ``curves``: strategy -> rows {"t", metric: mean}. None when either curve is missing.
    """
    if reference not in curves or target not in curves or not curves[reference]:
        return None
    last = curves[reference][-1]
    goal = last[metric]
    reached = [row["t"] for row in curves[target] if row[metric] >= goal]
    return {"reference": reference, "reference_t": last["t"], "reference_value": goal, "target": target,
            "answers": min(reached) if reached else None}
