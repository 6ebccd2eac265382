"""What a dataset provides: the canonical pairs plus, optionally, item features and oracle logits.

A dataset source is a registered class with a ``Config`` dataclass and a ``load()`` that returns
:class:`PreferenceData`. Sources may be synthetic (known ground truth) or real (local files or the Hub).

A dataset never builds a model. One that needs an item encoder while it loads (Pref-LaMP mines hard negatives
by text similarity) declares it with ``encoder_request()`` and receives it built as ``load(encoder=...)``, from
plrm.recipe.load_source, which every caller that may load such a dataset goes through (the runner, ``plrm
profile``, ``plrm embed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from plrm import capabilities as cap
from plrm.config import Configured
from plrm.data.schema import validate_pairs
from plrm.errors import DataValidationError
from plrm.items import ITEM_SEP, item_keys  # noqa: F401  (re-exported: sources import them from here)


def shares_pairs(table: pa.Table) -> bool:
    """Whether some ``pair_id`` is labelled by two or more distinct users (PRISM's pair ids never repeat: a
    factorization method has nothing to share there)."""
    frame = pd.DataFrame({"pair": table["pair_id"].to_numpy(zero_copy_only=False),
                          "user": table["user_id"].to_numpy(zero_copy_only=False)}).dropna()
    return bool((frame.drop_duplicates().groupby("pair").size() > 1).any())


@dataclass
class FeatureTable:
    """Precomputed features of (prompt, response) items, stored once per unique item."""

    keys: np.ndarray    # (N,) uint64 item keys, see item_keys()
    matrix: np.ndarray  # (N, D) float32

    def __post_init__(self) -> None:
        # Sort an index, not the matrix: the matrix can be gigabytes (PersonalLLM size: 80k x 4096).
        self._order = np.argsort(self.keys, kind="stable")
        self._sorted = self.keys[self._order]
        if (self._sorted[1:] == self._sorted[:-1]).any():
            raise DataValidationError("feature table holds the same (prompt, response) item twice")

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key; -1 where the table has no features for it."""
        pos = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == keys, self._order[pos], -1)

    @classmethod
    def from_columns(cls, table: pa.Table) -> FeatureTable:
        """Features from the optional ``chosen_emb`` / ``rejected_emb`` columns, one row per unique item."""
        keys = np.concatenate([item_keys(table["prompt"].to_pylist(), table["chosen"].to_pylist()),
                               item_keys(table["prompt"].to_pylist(), table["rejected"].to_pylist())])
        emb = np.concatenate([np.asarray(table["chosen_emb"].to_pylist(), dtype=np.float32),
                              np.asarray(table["rejected_emb"].to_pylist(), dtype=np.float32)])
        uniq, first = np.unique(keys, return_index=True)
        return cls(uniq, emb[first])


@dataclass
class PreferenceData:
    """A loaded dataset: canonical pairs (validated), item features and oracle logits where known."""

    name: str
    pairs: datasets.Dataset
    provides: frozenset[str]
    features: FeatureTable | None = None
    # name -> (rows,) preference logit of a ground-truth scorer on every row, e.g. 'oracle/personal'
    oracle_logits: dict[str, np.ndarray] = field(default_factory=dict)
    # ground truth of synthetic worlds, for tests and analysis (e.g. 'directions', 'user_weights')
    truth: dict[str, object] = field(default_factory=dict)
    # per-user side information (PRISM's survey, LaMP profiles), one row per user, indexed by user_id
    user_info: pd.DataFrame | None = None
    # what a published source read, kept and dropped (plrm.data.published.LoadReport); None for synthetic data
    load_report: object | None = None

    def __post_init__(self) -> None:
        validate_pairs(self.pairs, self.name)
        table = self.pairs.data.table
        if self.features is None and "chosen_emb" in table.column_names:
            self.features = FeatureTable.from_columns(table)
        if self.features is not None:
            self.provides = self.provides | {cap.FEATURES}
        if self.oracle_logits:
            self.provides = self.provides | {cap.ORACLE}
        if pc.count_distinct(table["user_id"]).as_py() >= 2:  # RewardBench's one "__global__" user: an eval set
            self.provides = self.provides | {cap.USERS}
        if "pair_id" in table.column_names and shares_pairs(table):
            self.provides = self.provides | {cap.SHARED_PAIRS}
        if "reference" in table.column_names:
            self.provides = self.provides | {cap.REFERENCE}
        for key, logits in self.oracle_logits.items():
            if len(logits) != len(self.pairs):
                raise DataValidationError(
                    f"{self.name}: oracle '{key}' has {len(logits)} logits for {len(self.pairs)} rows")

    @property
    def n_rows(self) -> int:
        return len(self.pairs)


@dataclass(frozen=True)
class EncoderRequest:
    """The item encoder a dataset needs while it loads: a registered backbone and options of its ``Config``."""

    backbone: str  # registry name, e.g. "frozen_encoder"
    options: dict[str, Any] = field(default_factory=dict)


class DatasetSource(Configured):
    """Base class of registered datasets. Subclasses set ``Config`` and implement ``load``.

    ``licence`` and ``homepage`` are shown by ``plrm list`` (the licence of the data, not of plrm's code).
    """

    licence: str = ""
    homepage: str = ""

    def encoder_request(self) -> EncoderRequest | None:
        """The item encoder ``load`` needs, or None (most datasets need none, and then ``load()`` takes no
        argument). A source that asks for one implements ``load(encoder=...)``: the caller builds the backbone
        through the registry (plrm.recipe.load_source) and passes it in; the source only calls its
        ``prepare`` and ``inputs``."""
        return None

    def load(self) -> PreferenceData:
        raise NotImplementedError
