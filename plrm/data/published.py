"""Reading public datasets as they are published: files from the Hugging Face Hub or a local copy, and the
load report that accounts for every row a source could not use.

Every real source (PRISM, TL;DR, PersonalLLM, P-SOUPS, Pref-LaMP, RewardBench) takes the same three options
(:class:`PublishedConfig`): ``repo_id`` + ``revision`` (the Hub, by default), or ``path`` (a local directory laid
out as the Hub publishes the repository, e.g. a ``git clone`` or ``snapshot_download`` of it), or ``files`` (an
explicit file list). :func:`resolve_files` turns them into local files through one code path: the Hub is only
a way to obtain the directory, after which the same patterns select the same files.

Nothing is dropped silently (README "Data"): a source drops a row only through :meth:`LoadReport.drop`, with a
named rule; the report counts drops per reason and per user, is printed in the load summary, logged, and
stored in ``results.json``. Malformed input raises :class:`~plrm.data.schema.DataValidationError` naming the
file, the row and the column (:func:`require_columns`, :func:`malformed`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from plrm.config import opt
from plrm.data.schema import MAX_LISTED
from plrm.errors import (
    DataUnavailableError,  # noqa: F401  (re-exported: plrm.errors defines every error class)
    DataValidationError,
)
from plrm.items import ITEM_SEP
from plrm.lazy import lazy_module

pd = lazy_module("pandas")  # imported at first use: `plrm list` imports this module, reads no data

if TYPE_CHECKING:
    import datasets


# ---- where the files come from --------------------------------------------------------------------------------
@dataclass
class PublishedConfig:
    """The options every published source shares (subclass it and give ``repo_id`` / ``revision`` defaults)."""

    repo_id: str = opt("", "Hugging Face Hub dataset id the files are downloaded from (when path/files are unset).")
    revision: str = opt("main", "Hub revision (branch, tag or commit) to download.")
    path: str = opt("", "A local directory laid out as the Hub repository (a clone or snapshot); "
                        "read instead of the Hub, same files.", path=True)
    files: list[str] = opt([], "Explicit local files to read instead (overrides path and the Hub).", path=True)


def resolve_files(config: PublishedConfig, patterns: list[str], what: str) -> list[Path]:
    """The local files matching ``patterns`` (fnmatch globs relative to the repository root), sorted.

    ``config.files`` wins, then ``config.path``, then a Hub snapshot of ``config.repo_id`` at ``config.revision``
    restricted to ``patterns`` (huggingface_hub caches it; ``HF_HUB_OFFLINE=1`` reads the cache only).
    """
    if config.files:
        files = [Path(f).expanduser() for f in config.files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataValidationError(f"{what}: data.files: no such file(s): {missing}")
        return files
    if config.path:
        root = Path(config.path).expanduser()
        if not root.is_dir():
            raise DataValidationError(f"{what}: data.path: {root} is not a directory (expected a local copy of "
                                      f"the Hub repository {config.repo_id or '(none)'}, with {patterns})")
    else:
        if not config.repo_id:
            raise DataUnavailableError(f"{what}: no Hub repository is known for this source: set data.path (a local "
                                       "copy) or data.files")
        root = _snapshot(config, patterns, what)
    found = sorted({p for p in root.rglob("*") if p.is_file()
                    and any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in patterns)})
    if not found:
        raise DataValidationError(f"{what}: no files matching {patterns} under {root}")
    return found


def _snapshot(config: PublishedConfig, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(config.repo_id, repo_type="dataset", revision=config.revision,
                                      allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise DataUnavailableError(
            f"{what}: cannot download {patterns} of the Hub dataset {config.repo_id}@{config.revision} "
            f"({type(exc).__name__}: {exc}). Without network access, point data.path at a local copy of the "
            "repository (same layout) or data.files at the files") from exc


# ---- reading files -----------------------------------------------------------------------------------------------
def read_table(path: Path, what: str) -> pd.DataFrame:
    """A parquet, JSON-lines or JSON (array of records) file as a DataFrame; an unreadable file names itself."""
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):  # a single record, or {"data": [...]}-style wrappers are not guessed at
                data = [data]
            if not isinstance(data, list):
                raise ValueError(f"expected a JSON array of records, got {type(data).__name__}")
            return pd.DataFrame.from_records(data)
        if path.suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{what}: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    raise DataValidationError(f"{what}: {path}: unsupported file type '{path.suffix}' "
                              "(expected .parquet, .jsonl, .json or .csv)")


def is_text(series: pd.Series) -> np.ndarray:
    """(N,) bool: which values are strings (a published column can hold anything: numbers, lists, nulls)."""
    return series.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)


def require_columns(frame: pd.DataFrame, columns: list[str] | tuple[str, ...], path: Path | str, what: str) -> None:
    """Fail naming the file and the missing columns (and the ones found)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{what}: {path}: missing column(s) {missing}; found {list(frame.columns)}")


def malformed(path: Path | str, rows, column: str, problem: str, what: str) -> None:
    """Raise for rows (indices within the file) whose ``column`` is malformed; lists up to MAX_LISTED of them."""
    rows = [int(r) for r in np.atleast_1d(np.asarray(rows))]
    if not rows:
        return
    shown = ", ".join(str(r) for r in rows[:MAX_LISTED]) + (f" and {len(rows) - MAX_LISTED} more" if
                                                            len(rows) > MAX_LISTED else "")
    raise DataValidationError(f"{what}: {path}: column '{column}' {problem} in {len(rows)} row(s): row {shown}")


# ---- the canonical table --------------------------------------------------------------------------------------
def load_fingerprint(config, files: list[Path]) -> str:
    """A datasets fingerprint of what a load read: the options and each file's path, size and modification time."""
    h = hashlib.blake2b(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode(), digest_size=8)
    for f in files:
        st = Path(f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def canonical_dataset(table: pa.Table | pd.DataFrame, config, files: list[Path]) -> datasets.Dataset:
    """The canonical pairs as a ``datasets.Dataset`` fingerprinted by :func:`load_fingerprint`: without an explicit
    fingerprint, ``datasets`` hashes the table by pickling it, a copy of gigabytes of text at PersonalLLM size."""
    import datasets  # imported when used: it takes ~1 s, and `plrm list` needs none
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=load_fingerprint(config, files))


def order_free_pair_ids(prompts, a, b) -> np.ndarray:
    """16-hex-digit id of each (prompt, {a, b}) item: the same for (a, b) and (b, a), so every user who compared
    the same two responses to the same prompt shares it, whichever they listed first."""
    a, b = pd.Series(a, dtype=object), pd.Series(b, dtype=object)
    low, high = a.where(a <= b, b), b.where(a <= b, a)
    keys = pd.Series(prompts, dtype=object).reset_index(drop=True) + ITEM_SEP + low.reset_index(drop=True) \
        + ITEM_SEP + high.reset_index(drop=True)
    return np.char.mod("%016x", pd.util.hash_array(keys.to_numpy(dtype=object), categorize=False))


# ---- the load report ---------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a source read, what it kept, and every row it dropped with the rule that dropped it.

    Units: ``read`` counts the source's own units (rows, turns, comparisons: ``unit`` names them); drops are in the
    same unit; ``kept`` counts canonical pairs produced. ``notes`` are facts worth printing (files read, users
    selected by a preset, ...).
    """

    source: str
    unit: str = "rows"
    read: int = 0
    kept: int = 0
    drops: dict[str, int] = field(default_factory=dict)                  # reason -> count
    drops_by_user: dict[str, dict[str, int]] = field(default_factory=dict)  # reason -> user -> count
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, mask, users=None) -> np.ndarray:
        """Record the rows where ``mask`` is true as dropped for ``reason`` (with their ``users`` when given,
        aligned with ``mask``) and return ``~mask``, the rows to keep."""
        mask = np.asarray(mask, dtype=bool)
        n = int(mask.sum())
        if n:
            self.drops[reason] = self.drops.get(reason, 0) + n
            if users is not None:
                per = pd.Series(np.asarray(users, dtype=object)[mask]).astype(str).value_counts()
                bucket = self.drops_by_user.setdefault(reason, {})
                for user, count in per.items():
                    bucket[user] = bucket.get(user, 0) + int(count)
        return ~mask

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def to_dict(self) -> dict:
        return {"source": self.source, "unit": self.unit, "read": self.read, "kept": self.kept,
                "drops": dict(self.drops), "drops_by_user": {r: dict(u) for r, u in self.drops_by_user.items()},
                "notes": list(self.notes)}

    def render(self, max_users: int = 5) -> str:
        """The load summary printed by ``plrm fit`` / ``plrm profile``."""
        lines = [f"{self.source}: read {self.read:,} {self.unit}, kept {self.kept:,} pairs"
                 + (f"; dropped {self.dropped:,} {self.unit}:" if self.drops else "; nothing dropped")]
        for reason, count in sorted(self.drops.items(), key=lambda kv: -kv[1]):
            users = self.drops_by_user.get(reason, {})
            top = sorted(users.items(), key=lambda kv: -kv[1])[:max_users]
            who = (f" [{len(users)} user(s); most: " + ", ".join(f"{u} {c}" for u, c in top) + "]") if users else ""
            lines.append(f"  - {count:,} {reason}{who}")
        lines.extend(f"  {n}" for n in self.notes)
        return "\n".join(lines)
