"""The LightningDataModule: train / validation batches of seen users, support and test pairs for evaluation.

Heavy work happens once per dataset in :class:`PreparedData` (the unique-item index and the backbone's
inputs for every unique item); a :class:`PreferenceDataModule` is then a cheap view for one split and one
batch size. A batch is a dict:

``user_idx`` (B,) int64, ``chosen`` / ``rejected`` backbone inputs of the two responses, ``row`` (B,) int64
(the canonical row), ``pair_weight`` (B,) float32: the 1/|D_u| weight of LoRe (Bose et al., arXiv 2504.14439)
eq. 10, scaled to mean 1; training and validation batches also carry ``share`` (float, see below; 1.0 in one
process).

Training batches are random pairs by default. A method that learns *per user task* (MRM's meta-batches of
users, MRM (Cai et al., arXiv 2601.18731) Algorithm 2) sets ``users_per_batch``: each training batch is then
every train pair of that many randomly drawn seen users (grouped by user; an epoch visits every seen user with
train pairs once).

A method whose training reads a pair only as e+ - e- over a frozen feature table (``difference_cache``, set by
the runner from the method) gets training batches of ``row``, ``user_idx``, ``pair_weight``, ``share`` and
``difference`` (B, D), rows of a (train pairs, D) table of differences built once per run, with no ``chosen`` /
``rejected``: a batch then costs one gather of B rows instead of two gathers and a subtraction, each a fresh
(B, D) tensor, and a batch of every train pair is the table itself, in its own order (the loss is a mean over
the pairs, so the order is free), with no copy at all. Under ``trainer.precision: bf16-mixed`` the table is
stored in bf16 (autocast runs its GEMMs in bf16 whatever it holds): half the memory, bf16 matmul kernels.

Distributed (DDP, ``world`` processes): ``batch_size`` (or ``users_per_batch``) stays the *global* batch. Every
rank draws the same global batches (same seed) from the same rows -- seen users' train rows, validation rows --
and keeps its contiguous 1/world part of each (:func:`shard`), so the split protocol is untouched and the
Trainer runs with ``use_distributed_sampler=False``. ``share`` = world x (this rank's pairs or users) / (the
global batch's): a per-rank mean loss times ``share``, averaged over ranks by DDP, is exactly the global batch's
mean, also for an unequal last batch. A global batch smaller than the world gives the ranks left without
positions a copy of the whole batch with ``share`` 0 (under DDP every rank must run a backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from plrm.backbones.base import Backbone
from plrm.data.resumable import ResumableLoader
from plrm.data.source import PreferenceData
from plrm.data.splits import SUPPORT, TEST, TRAIN, VAL, Split
from plrm.distributed import (
    rank_and_world,
    shard,
    to_device,  # noqa: F401  (its old home: plugins written before plrm.distributed)
)
from plrm.items import ItemIndex, item_keys


class _Shards(Sampler):
    """This rank's part of every global batch of ``batches``, as (positions, share); see the module docstring."""

    def __init__(self, batches: BatchSampler, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            part = batch[shard(len(batch), self.rank, self.world)]
            yield (part, self.world * len(part) / len(batch)) if part else (batch, 0.0)


def build_item_index(data: PreferenceData) -> ItemIndex:
    """Unique (prompt, response) items of all rows; each is encoded once however many users judge it."""
    table = data.pairs.data.table
    prompts = table["prompt"].to_numpy(zero_copy_only=False)
    keys = np.concatenate([item_keys(prompts, table["chosen"].to_numpy(zero_copy_only=False)),
                           item_keys(prompts, table["rejected"].to_numpy(zero_copy_only=False))])
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    n = table.num_rows
    return ItemIndex(keys=uniq, chosen_item=inverse[:n].astype(np.int64), rejected_item=inverse[n:].astype(np.int64),
                     first_row=first % n)


@dataclass
class PairMatrix:
    """The users x item-pairs matrix of observed preferences (PReF, Shenfeld et al., arXiv 2503.06358,
    Algorithm 1), as sparse entries.

    An item pair is a ``pair_id``: one prompt with two responses y1, y2 in a fixed (canonical) order, so that
    +1 means the user preferred y1 and -1 that they preferred y2, whichever came first in their row.
    """

    user_idx: np.ndarray   # (N,) one entry per observed (user, pair)
    pair_idx: np.ndarray   # (N,) in [0, n_pairs)
    sign: np.ndarray       # (N,) float32, +1 / -1
    y1_item: np.ndarray    # (n_pairs,) item index of each pair's first response
    y2_item: np.ndarray    # (n_pairs,) item index of its second response
    n_users: int

    @property
    def n_pairs(self) -> int:
        return len(self.y1_item)


class PreparedData:
    """A dataset with its item index and a prepared backbone, shared by every split and method of a run."""

    def __init__(self, data: PreferenceData, backbone: Backbone):
        self.data = data
        self.backbone = backbone
        self.items = build_item_index(data)
        backbone.prepare(data, self.items)
        self.chosen_item = torch.from_numpy(self.items.chosen_item)
        self.rejected_item = torch.from_numpy(self.items.rejected_item)


class _PairRows(torch.utils.data.Dataset):
    """Indexed by a *list* of positions (a whole batch at once), so features are gathered in one op, with the
    batch's share (:class:`_Shards`)."""

    def __init__(self, dm: PreferenceDataModule, rows: np.ndarray):
        self.dm, self.rows = dm, torch.from_numpy(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item) -> dict:
        positions, share = item
        return {**self.dm.batch(self.rows[torch.as_tensor(positions)]), "share": share}


class _DifferenceRows(torch.utils.data.Dataset):
    """Training rows served from the run's difference table (module docstring); the same positions, batch for
    batch, as :class:`_PairRows` would serve."""

    CHUNK_ROWS = 4096  # the table is filled in chunks: no (P, D) temporaries for the two gathers

    def __init__(self, dm: PreferenceDataModule, rows: np.ndarray):
        self.dm, self.rows = dm, torch.from_numpy(rows)
        p = dm.prepared
        first = p.backbone.inputs(p.chosen_item[self.rows[:1]])
        self.table = first.new_empty((len(rows), first.shape[1]), dtype=dm.difference_dtype or first.dtype)  # (P, D)
        for start in range(0, len(rows), self.CHUNK_ROWS):
            part = self.rows[start:start + self.CHUNK_ROWS]
            torch.sub(p.backbone.inputs(p.chosen_item[part]), p.backbone.inputs(p.rejected_item[part]),
                      out=self.table[start:start + len(part)])
        self.users = dm.row_user[self.rows]
        self.weights = dm.user_weight[self.users]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item) -> dict:
        positions, share = item
        if len(positions) == len(self.rows):  # every train pair: the table itself
            return {"row": self.rows, "user_idx": self.users, "difference": self.table, "pair_weight": self.weights,
                    "share": share}
        pos = torch.as_tensor(positions)
        return {"row": self.rows[pos], "user_idx": self.users[pos], "difference": self.table[pos],
                "pair_weight": self.weights[pos], "share": share}


class _UserRows(torch.utils.data.Dataset):
    """Indexed by a list of *users* (positions in ``users``): the batch of all their rows, grouped by user."""

    def __init__(self, dm: PreferenceDataModule, rows: np.ndarray):
        owner = dm.split.row_user[rows]
        order = np.argsort(owner, kind="stable")
        self.dm, self.rows = dm, torch.from_numpy(rows[order])
        users, counts = np.unique(owner, return_counts=True)
        self.users, self.counts = torch.from_numpy(users), torch.from_numpy(counts)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, item) -> dict:
        positions, share = item
        pos = torch.as_tensor(positions)
        counts, starts = self.counts[pos], self.starts[pos]
        # every row of every chosen user in one gather: start of its user + offset inside it
        offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return {**self.dm.batch(self.rows[torch.repeat_interleave(starts, counts) + offset]), "share": share}


class PreferenceDataModule(L.LightningDataModule):
    def __init__(self, prepared: PreparedData, split: Split, batch_size: int = 1024, seed: int = 0,
                 users_per_batch: int | None = None, difference_cache: bool = False,
                 difference_dtype: torch.dtype | None = None):
        super().__init__()
        self.prepared, self.split, self.batch_size, self.seed = prepared, split, batch_size, seed
        self.users_per_batch = users_per_batch
        self.difference_cache = difference_cache
        # the table's dtype (None: the features'); bf16 under bf16-mixed training, where autocast runs the
        # table's GEMMs in bf16 anyway: half the memory and the bf16 matmul kernels (results/difference_cpu.md)
        self.difference_dtype = difference_dtype
        self._difference_rows: _DifferenceRows | None = None
        self.row_user = torch.from_numpy(split.row_user)
        train = split.role == TRAIN
        n_train = np.bincount(split.row_user[train], minlength=len(split.user_ids)).astype(np.float64)
        mean_pairs = train.sum() / max(1, (n_train > 0).sum())
        self.user_weight = torch.from_numpy((mean_pairs / np.maximum(n_train, 1)).astype(np.float32))

    @property
    def n_users(self) -> int:
        return len(self.split.user_ids)

    @property
    def feature_dim(self) -> int:
        return self.prepared.backbone.feature_dim

    def batch(self, rows: torch.Tensor) -> dict:
        p = self.prepared
        users = self.row_user[rows]
        return {
            "row": rows,
            "user_idx": users,
            "chosen": p.backbone.inputs(p.chosen_item[rows]),
            "rejected": p.backbone.inputs(p.rejected_item[rows]),
            "pair_weight": self.user_weight[users],
        }

    def _loader(self, ds: _PairRows | _UserRows, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)  # the same global batches on every rank
        base = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
        # batch_size=None + a batch sampler as sampler: the dataset receives whole index lists (one gather).
        sampler = _Shards(BatchSampler(base, batch_size, drop_last=False), *rank_and_world())
        # resumable: a checkpoint holds the place in the epoch (plrm fit --resume draws the same batches)
        return ResumableLoader(ds, sampler, generator if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        rows = self.split.rows(TRAIN)
        if self.users_per_batch is not None:
            return self._loader(_UserRows(self, rows), self.users_per_batch, shuffle=True)
        if self.difference_cache:
            if self._difference_rows is None:  # built once: Lightning asks again after a resume or per fit
                self._difference_rows = _DifferenceRows(self, rows)
            return self._loader(self._difference_rows, self.batch_size, shuffle=True)
        return self._loader(_PairRows(self, rows), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        rows = self.split.rows(VAL)
        return self._loader(_PairRows(self, rows), self.batch_size, shuffle=False) if len(rows) else []

    # ---- evaluation-side views ----------------------------------------------------------------------------
    def support_rows(self, k: int) -> np.ndarray:
        return self.split.support_rows(k)

    def seen_train_rows(self) -> np.ndarray:
        return np.flatnonzero((self.split.role == TRAIN) | (self.split.role == VAL))

    def test_rows(self, unseen: bool) -> np.ndarray:
        return self.split.test_rows(unseen)

    def pair_matrix(self, rows: np.ndarray) -> PairMatrix:
        """The sign matrix of these rows (e.g. the seen users' train rows); needs the ``pair_id`` column."""
        table = self.prepared.data.pairs.data.table
        if "pair_id" not in table.column_names:
            raise ValueError(f"{self.prepared.data.name}: a users x pairs matrix needs the 'pair_id' column")
        pair_ids = table["pair_id"].take(rows).to_numpy(zero_copy_only=False)
        pair_idx, _ = pd.factorize(pd.Series(pair_ids, dtype=object))
        chosen = self.prepared.items.chosen_item[rows]
        rejected = self.prepared.items.rejected_item[rows]
        y1, y2 = np.minimum(chosen, rejected), np.maximum(chosen, rejected)  # canonical order: by item index
        first = np.unique(pair_idx, return_index=True)[1]
        return PairMatrix(user_idx=self.split.row_user[rows], pair_idx=pair_idx.astype(np.int64),
                          sign=np.where(chosen == y1, 1.0, -1.0).astype(np.float32),
                          y1_item=y1[first], y2_item=y2[first], n_users=self.n_users)

    def support_pool_rows(self) -> np.ndarray:
        return self.split.rows(SUPPORT)

    def all_test_rows(self) -> np.ndarray:
        return self.split.rows(TEST)
