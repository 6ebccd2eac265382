"""What a dataset provides: the canonical pairs plus, optionally, item features and oracle logits.

A dataset source is a registered class with a ``Config`` dataclass and a ``load()`` that returns
:class:`PreferenceData`. Sources may be synthetic (known ground truth) or real (local files or the Hub).

A dataset never builds a model. One that needs an item encoder while it loads (Pref-LaMP mines hard negatives
by text similarity) declares it with ``encoder_request()`` and receives it built as ``load(encoder=...)``, from
plrm.recipe.load_source, which every caller that may load such a dataset goes through (the runner, ``plrm
profile``, ``plrm embed``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plrm import capabilities as cap
from plrm.config import Configured
from plrm.data.published import LoadReport
from plrm.data.schema import MAX_LISTED, duplicate_rows, row_name, validate_pairs
from plrm.errors import DataValidationError
from plrm.items import ITEM_SEP, item_keys  # noqa: F401  (re-exported: sources import them from here)
from plrm.lazy import lazy_module

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

if TYPE_CHECKING:
    import datasets

# the load-report rule under which exact duplicate rows are dropped (PreferenceData, duplicates="drop")
DUPLICATES = "exact duplicates of an earlier row (same user_id, prompt, chosen and rejected)"


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
    def from_columns(cls, table: pa.Table, source: str = "dataset",
                     row_label: Callable[[int], str] | None = None) -> FeatureTable:
        """Features from the optional ``chosen_emb`` / ``rejected_emb`` columns, one row per unique item.

        An item that occurs in several rows must carry the same vector in each (up to float32 rounding);
        two different vectors for one (prompt, response) are refused, naming the item and both rows."""
        n = table.num_rows
        prompts = table["prompt"].to_numpy(zero_copy_only=False)
        keys = np.concatenate([item_keys(prompts, table["chosen"].to_numpy(zero_copy_only=False)),
                               item_keys(prompts, table["rejected"].to_numpy(zero_copy_only=False))])
        emb = np.concatenate([_matrix(table["chosen_emb"], n), _matrix(table["rejected_emb"], n)])
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        _refuse_conflicting_embeddings(table, emb, first[inverse], source, row_label or row_name)
        return cls(uniq, emb[first])


def _matrix(column: pa.ChunkedArray, n: int) -> np.ndarray:
    """(n, D) float32 of a list column whose rows all have D values (validate_pairs checked that)."""
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(n, len(flat) // max(n, 1))


def _refuse_conflicting_embeddings(table: pa.Table, emb: np.ndarray, ref: np.ndarray, source: str,
                                   row_label: Callable[[int], str]) -> None:
    """``emb``: (2n, D) the chosen then the rejected vector of every row; ``ref``: for each, the position of the
    item's first occurrence. Raise when some vector differs from its item's first one."""
    bad = []
    for start in range(0, len(emb), 1 << 16):  # blocks: the comparison never copies the whole matrix
        stop = min(len(emb), start + (1 << 16))
        block = emb[start:stop]
        differs = ~np.isclose(block, emb[ref[start:stop]], rtol=1e-5, atol=1e-6).all(axis=1)
        bad.extend((start + np.flatnonzero(differs)).tolist())
    if not bad:
        return
    n = table.num_rows
    items = {}
    for pos in bad:  # one line per item, with the first row that disagrees with its first occurrence
        items.setdefault(int(ref[pos]), pos)

    def where(pos: int) -> str:
        return f"{row_label(pos % n)} ('{'chosen' if pos < n else 'rejected'}_emb')"

    def short(text: str) -> str:
        return text if len(text) <= 40 else text[:37] + "..."

    lines = []
    for first, pos in list(items.items())[:MAX_LISTED]:
        row = first % n
        response = table["chosen" if first < n else "rejected"][row].as_py()
        lines.append(f"item (prompt {short(table['prompt'][row].as_py())!r}, response {short(response)!r}): "
                     f"{where(first)} and {where(pos)} differ")
    if len(items) > MAX_LISTED:
        lines.append(f"... and {len(items) - MAX_LISTED} more items")
    raise DataValidationError(
        f"{source}: {len(items)} (prompt, response) item(s) carry two different embeddings; an item must have "
        "one vector wherever it occurs:\n  " + "\n  ".join(lines))


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
    # what a source read, kept and dropped (plrm.data.published.LoadReport): published sources make one; any
    # dataset gets one when exact duplicate rows are dropped. None for synthetic data
    load_report: object | None = None
    # exact duplicate rows (same user_id, prompt, chosen, rejected): "drop" keeps the first copy of each and
    # counts the rest in load_report; "error" refuses the data, naming the rows
    duplicates: str = "drop"
    # how messages name a row, e.g. 'pairs.jsonl line 7' (local files); 'row i' (0-based) when None
    row_label: Callable[[int], str] | None = None
    # (rows,) how many identical rows of the source each row stands for, once exact duplicates were dropped
    # (repeated annotations are a signal for dataset statistics: weight by it to count them); None: one each
    copies: np.ndarray | None = None

    def __post_init__(self) -> None:
        validate_pairs(self.pairs, self.name, self.row_label)
        self._drop_duplicates()
        table = self.pairs.data.table
        if self.features is None and "chosen_emb" in table.column_names:
            self.features = FeatureTable.from_columns(table, self.name, self.row_label)
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

    def _drop_duplicates(self) -> None:
        """After loading, no (user, prompt, chosen, rejected) occurs twice, so no pair can sit on both sides of
        a split. Later copies are dropped through the load report's rule DUPLICATES, or refused."""
        import datasets  # imported when used: it takes ~1 s, and `plrm list` needs none
        if self.duplicates not in ("drop", "error"):
            raise DataValidationError(f"{self.name}: duplicates must be 'drop' or 'error', got {self.duplicates!r}")
        table = self.pairs.data.table
        rows, first = duplicate_rows(table)
        if not len(rows):
            return
        label = self.row_label or row_name

        def examples(limit: int) -> str:
            shown = "; ".join(f"{label(r)} repeats {label(f)}" for r, f in zip(rows[:limit], first[:limit]))
            return shown + (f"; and {len(rows) - limit} more" if len(rows) > limit else "")

        if self.duplicates == "error":
            raise DataValidationError(
                f"{self.name}: {len(rows)} exact duplicate row(s) (same user_id, prompt, chosen and rejected): "
                f"{examples(MAX_LISTED)}. Remove them, or let them be dropped (duplicates: drop keeps the first copy)")
        n = table.num_rows
        if self.load_report is None:
            self.load_report = LoadReport(self.name, unit="rows", read=n, kept=n)
        mask = np.zeros(n, dtype=bool)
        mask[rows] = True
        keep = self.load_report.drop(DUPLICATES, mask, table["user_id"].to_numpy(zero_copy_only=False))
        self.load_report.kept -= len(rows)
        self.load_report.note(f"duplicates dropped: {examples(3)}")
        digest = hashlib.blake2b(f"{self.pairs._fingerprint}:dedup".encode(), digest_size=8).hexdigest()
        self.pairs = datasets.Dataset(datasets.table.InMemoryTable(table.filter(pa.array(keep))),
                                      info=self.pairs.info.copy(), fingerprint=digest)
        self.oracle_logits = {k: np.asarray(v)[keep] if len(v) == n else v for k, v in self.oracle_logits.items()}
        self.row_label = _KeptRows(label, np.flatnonzero(keep))
        copies = np.ones(n, dtype=np.int64) if self.copies is None else np.asarray(self.copies, dtype=np.int64).copy()
        np.add.at(copies, first, copies[rows])
        self.copies = copies[keep]


@dataclass(frozen=True)
class _KeptRows:
    """Names row i of a table after rows were dropped by the name of the row it was read as (a file's line)."""

    label: Callable[[int], str]
    kept: np.ndarray  # (rows kept,) original row of each

    def __call__(self, row: int) -> str:
        return self.label(int(self.kept[int(row)]))


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
