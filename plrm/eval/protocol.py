"""The evaluation protocol (LoRe, Bose et al., arXiv 2504.14439, §5): seen, unseen (few-shot) and overall users.

* seen users: scored on their test pairs with the trained per-user state;
* unseen users: for every k of the few-shot curve, ``adapt`` fits their state from their first k support
  pairs, then they are scored on their test pairs; the headline unseen accuracy is at ``split.k``, which is
  adapted last, so the model leaves evaluation holding the k-shot state;
* overall: seen and unseen users together (unseen at ``split.k``), each user weighing the same.

Scores of a factored method come from ``pair_logit`` on item embeddings computed once per unique item, so millions
of (user, pair) rows cost one embedding per item plus a cheap per-pair head. A user-conditioned method
(``reward_shape = 'conditioned'``) is scored in chunks of rows, chosen and rejected in one forward under the rows'
users, with its user-independent ``item_statistics`` computed once per unique item. Methods that cannot adapt new users
(``adapts_new_users = 'no'``) get None (printed n/a) for unseen users, never a fallback number.

Distributed (after a DDP fit every rank runs the protocol): each rank scores a contiguous part of the rows and
the logits are gathered back in row order before any per-user aggregation, so a user whose pairs fall on two
ranks counts once, with all their pairs, and every rank holds the same metrics. ``adapt`` runs on every rank
from the same support pairs, then rank 0's per-user state (``user_state``) is broadcast so that all ranks
score with identical state. In one process nothing of this runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from plrm.data.datamodule import PreferenceDataModule
from plrm.distributed import gather_shards, rank_and_world, shard, to_device
from plrm.eval.metrics import summarize
from plrm.methods.base import CONDITIONED, PersonalizedRewardModel

ITEM_CHUNK = 8192
PAIR_CHUNK_BYTES = 256 * 2**20  # gathered item embeddings per pair chunk
# A method's (item x user) reward table (PersonalizedRewardModel.reward_table) replaces per-row scoring when it
# has at most this many entries per row to score: every user on the same test prompts, as in the synthetic worlds.
TABLE_ENTRIES_PER_ROW = 8
TABLE_CHUNK_ENTRIES = 2**20    # (item, user) rewards per table chunk (4 MB of float32; an MLP head holds H times that)


@dataclass
class EvalResult:
    metrics: dict             # {'seen': {...}, 'unseen': {...} | None, 'overall': {...}, 'fewshot': [...]}
    per_user: pd.DataFrame    # user_id, group, k, n_test, accuracy


@torch.no_grad()
def score_rows(model: PersonalizedRewardModel, dm: PreferenceDataModule, rows: np.ndarray,
               max_pairs: int = 262144) -> torch.Tensor:
    """Preference logits (len(rows),) of the given canonical rows under the model's current state; under DDP
    each rank scores its part of ``rows`` and every rank gets all the logits, in row order (collective)."""
    rank, world = rank_and_world()
    if world == 1:
        return _score_rows(model, dm, rows, max_pairs)
    return gather_shards(_score_rows(model, dm, rows[shard(len(rows), rank, world)], max_pairs))


def sync_user_state(model: PersonalizedRewardModel) -> None:
    """Under DDP, give every rank rank 0's per-user tensors (``user_state``): what ``adapt`` or other updates
    outside autograd wrote (collective; nothing in one process)."""
    if rank_and_world()[1] == 1:
        return
    state = model.state_dict(keep_vars=True)
    for name in model.user_state:
        torch.distributed.broadcast(state[name].data, src=0)


def _item_chunks(model: PersonalizedRewardModel, prepared, items: torch.Tensor):
    """The backbone inputs of ``items`` on the model's device, ITEM_CHUNK items at a time."""
    for i in range(0, len(items), ITEM_CHUNK):
        yield to_device(prepared.backbone.inputs(items[i:i + ITEM_CHUNK]), model.device)


@torch.no_grad()
def embed_items(model: PersonalizedRewardModel, prepared, items: torch.Tensor) -> torch.Tensor:
    """Item embeddings (len(items), Z) of the prepared backbone's items ``items``, encoded ITEM_CHUNK at a time."""
    if not len(items):
        return torch.empty(0, 1)
    return torch.cat([model.item_embedding(model.encode(x)) for x in _item_chunks(model, prepared, items)])


@torch.no_grad()
def item_statistics(model: PersonalizedRewardModel, prepared, items: torch.Tensor) -> torch.Tensor | None:
    """A conditioned method's user-independent item statistics (len(items), S), once per item, ITEM_CHUNK at a
    time; None when the method has none."""
    parts = []
    for x in _item_chunks(model, prepared, items):
        part = model.item_statistics(x)
        if part is None:
            return None
        parts.append(part)
    return torch.cat(parts) if parts else None


@dataclass
class _Rows:
    """The rows to score as items: each row's chosen / rejected item, the unique items (sorted) and each row's
    position among them, and each row's user."""

    chosen: torch.Tensor   # (R,) item index
    rejected: torch.Tensor
    items: torch.Tensor    # (I,) sorted unique items of the rows
    pos_c: torch.Tensor    # (R,) position of chosen in items
    pos_r: torch.Tensor
    users: torch.Tensor    # (R,)

    @classmethod
    def of(cls, dm: PreferenceDataModule, rows: np.ndarray) -> _Rows:
        rows_t = torch.from_numpy(rows)
        chosen, rejected = dm.prepared.chosen_item[rows_t], dm.prepared.rejected_item[rows_t]
        items = torch.unique(torch.cat([chosen, rejected]))  # sorted
        return cls(chosen, rejected, items, torch.searchsorted(items, chosen), torch.searchsorted(items, rejected),
                   dm.row_user[rows_t])


def _score_rows(model: PersonalizedRewardModel, dm: PreferenceDataModule, rows: np.ndarray,
                max_pairs: int) -> torch.Tensor:
    if model.reward_shape == CONDITIONED:
        return _score_rows_conditioned(model, dm, rows, max_pairs)
    r = _Rows.of(dm, rows)
    device = model.device
    z = embed_items(model, dm.prepared, r.items)
    users = torch.unique(r.users)
    if len(users) * len(r.items) <= TABLE_ENTRIES_PER_ROW * len(rows):
        logits = _score_rows_by_table(model, z, users, r)
        if logits is not None:
            return logits
    step = max(1, min(max_pairs, PAIR_CHUNK_BYTES // (2 * z.shape[1] * z.element_size())))
    out = [model.pair_logit(z[r.pos_c[s:s + step]], z[r.pos_r[s:s + step]], r.users[s:s + step].to(device)).float()
           .cpu() for s in range(0, len(rows), step)]
    return torch.cat(out) if out else torch.empty(0)


def _score_rows_by_table(model: PersonalizedRewardModel, z: torch.Tensor, users: torch.Tensor,
                         r: _Rows) -> torch.Tensor | None:
    """Rows scored from the method's (item x user) reward table, computed for chunks of users (None: the method
    has no table). Rows are grouped by user so each chunk's table is read only by its own rows."""
    device = z.device
    step = max(1, TABLE_CHUNK_ENTRIES // max(1, len(r.items)))
    order = torch.argsort(r.users, stable=True)
    bounds = torch.searchsorted(r.users[order], users[::step].contiguous()).tolist() + [len(order)]
    out = torch.empty(len(order))
    for i, start in enumerate(range(0, len(users), step)):
        chunk = users[start:start + step]
        table = model.reward_table(z, chunk.to(device))  # (I, C)
        if table is None:
            return None
        rows = order[bounds[i]:bounds[i + 1]]
        col = torch.searchsorted(chunk, r.users[rows]).to(device)
        out[rows] = (table[r.pos_c[rows].to(device), col] - table[r.pos_r[rows].to(device), col]).float().cpu()
    return out


def _score_rows_conditioned(model: PersonalizedRewardModel, dm: PreferenceDataModule, rows: np.ndarray,
                            max_pairs: int) -> torch.Tensor:
    """Rows of a user-conditioned reward: each chunk of (user, pair) rows is one forward of its chosen and
    rejected items under the rows' users; what does not depend on the user is computed once per unique item."""
    r = _Rows.of(dm, rows)
    stats = item_statistics(model, dm.prepared, r.items)                          # (I, S) or None
    inputs, device = dm.prepared.backbone.inputs, model.device
    step = max(1, min(max_pairs, ITEM_CHUNK // 2))  # 2 * step items per forward, as when embedding items
    out = []
    for s in range(0, len(rows), step):
        sl = slice(s, s + step)
        pair_stats = None if stats is None else (stats[r.pos_c[sl]], stats[r.pos_r[sl]])
        out.append(model.conditioned_pair_logit(to_device(inputs(r.chosen[sl]), device),
                                                to_device(inputs(r.rejected[sl]), device),
                                                r.users[sl].to(device), pair_stats).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def adapt_unseen(model: PersonalizedRewardModel, dm: PreferenceDataModule, k: int) -> None:
    """Fit every unseen user's state from their first k support pairs (one vectorized call)."""
    rows = dm.support_rows(k)
    support = to_device(dm.batch(torch.from_numpy(rows)), model.device)
    users = torch.from_numpy(dm.split.unseen_users).to(model.device)
    model.adapt(support, users)
    sync_user_state(model)


def per_user_frame(dm, users: np.ndarray, acc: torch.Tensor, count: torch.Tensor, group: str, k) -> pd.DataFrame:
    idx = torch.as_tensor(users, dtype=torch.long)
    # k: a nullable integer (<NA> for seen users), so a frame read back from parquet (a resumed run) is identical
    return pd.DataFrame({"user_id": dm.split.user_ids[users].astype(str), "group": group,
                         "k": pd.array([k] * len(idx), dtype="Int64"), "n_test": count[idx].numpy(),
                         "accuracy": acc[idx].numpy()})


def evaluate(model: PersonalizedRewardModel, dm: PreferenceDataModule, k: int, k_list: list[int],
             worst_fractions: list[float], max_pairs: int = 262144) -> EvalResult:
    model.eval()
    split = dm.split
    seen_users, unseen_users, n_users = split.seen_users, split.unseen_users, dm.n_users
    seen_rows = dm.test_rows(unseen=False)
    seen_logits = score_rows(model, dm, seen_rows, max_pairs)
    seen_user_idx = dm.row_user[torch.from_numpy(seen_rows)]
    seen, acc_s, cnt_s = summarize(seen_logits, seen_user_idx, seen_users, n_users, worst_fractions)
    frames = [per_user_frame(dm, seen_users, acc_s, cnt_s, "seen", None)]
    metrics: dict = {"seen": seen, "unseen": None, "overall": None, "fewshot": []}
    if model.adapts_new_users == "no" or len(unseen_users) == 0:
        metrics["overall"] = seen if len(unseen_users) == 0 else None
        return EvalResult(metrics, pd.concat(frames, ignore_index=True))
    unseen_rows = dm.test_rows(unseen=True)
    unseen_user_idx = dm.row_user[torch.from_numpy(unseen_rows)]
    for k_i in [k_ for k_ in sorted(set(k_list)) if k_ != k] + [k]:  # the headline k last
        start = time.perf_counter()
        adapt_unseen(model, dm, k_i)
        metrics["adapt_seconds"] = time.perf_counter() - start  # wall time of adapting every unseen user at k
        logits = score_rows(model, dm, unseen_rows, max_pairs)
        unseen, acc_u, cnt_u = summarize(logits, unseen_user_idx, unseen_users, n_users, worst_fractions)
        metrics["fewshot"].append({"k": k_i, **unseen})
    metrics["fewshot"].sort(key=lambda r: r["k"])
    metrics["unseen"] = unseen
    frames.append(per_user_frame(dm, unseen_users, acc_u, cnt_u, "unseen", k))
    all_logits = torch.cat([seen_logits, logits])
    all_users = torch.cat([seen_user_idx, unseen_user_idx])
    metrics["overall"], _, _ = summarize(all_logits, all_users, np.arange(n_users), n_users, worst_fractions)
    return EvalResult(metrics, pd.concat(frames, ignore_index=True))


def evaluate_oracle(logits_all_rows: np.ndarray, dm: PreferenceDataModule, worst_fractions: list[float]) -> EvalResult:
    """The same metrics for a ground-truth scorer given as one logit per canonical row."""
    logits = torch.from_numpy(np.asarray(logits_all_rows, dtype=np.float32))
    out, frames = {}, []
    n_users = dm.n_users
    for group, unseen, users in (("seen", False, dm.split.seen_users), ("unseen", True, dm.split.unseen_users)):
        rows = dm.test_rows(unseen=unseen)
        out[group], acc, cnt = summarize(logits[rows], dm.row_user[torch.from_numpy(rows)], users, n_users,
                                         worst_fractions)
        frames.append(per_user_frame(dm, users, acc, cnt, group, None))
    rows = dm.all_test_rows()
    out["overall"], _, _ = summarize(logits[rows], dm.row_user[torch.from_numpy(rows)], np.arange(n_users),
                                     n_users, worst_fractions)
    out["fewshot"] = []
    return EvalResult(out, pd.concat(frames, ignore_index=True))
