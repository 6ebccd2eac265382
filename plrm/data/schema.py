"""The canonical pairwise-preference schema (README "Data") and its validation.

One row per (user, prompt, chosen, rejected) judgement, in a ``datasets.Dataset``:

============== ======================= ===============================================================
column         type                    meaning
============== ======================= ===============================================================
user_id        str (required)          annotator / user; a first-class column, never folded into text
prompt         str (required)          the context x
chosen         str (required)          y+, the response the user preferred
rejected       str (required)          y-
pair_id        str (optional)          the (x, y1, y2) item across users (factorization, profiling)
reference      str (optional)          the user's own ground-truth completion
split          str (optional)          a dataset's own pair-level split: 'train' or 'test'
group_id       str (optional)          a unit kept whole by per-user splits (a PRISM conversation, a TL;DR post)
source_split   str (optional)          the published split a row came from ('train', 'validation', ...)
chosen_emb     list[float] (optional)  precomputed features of (prompt, chosen)
rejected_emb   list[float] (optional)  precomputed features of (prompt, rejected)
============== ======================= ===============================================================

Validation fails loudly with the column, row and user of each problem; nothing is dropped.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REQUIRED = ("user_id", "prompt", "chosen", "rejected")
OPTIONAL_TEXT = ("pair_id", "reference", "split", "group_id", "source_split")
EMBEDDING = ("chosen_emb", "rejected_emb")
SPLIT_VALUES = ("train", "test")
MAX_LISTED = 10  # rows listed per kind of problem; the count covers all of them


from plrm.errors import DataValidationError  # noqa: E402,F401  (defined in the low errors module; re-exported)


def _table(data) -> pa.Table:
    return data.data.table if hasattr(data, "data") else data


def _rows_where(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.flatnonzero(pc.fill_null(mask, True).to_numpy(zero_copy_only=False))


def _fail(source: str, problems: list[str], n_bad: int) -> None:
    """``problems`` are the lines to show (already capped per kind); ``n_bad`` counts every bad cell."""
    raise DataValidationError(f"{source}: {n_bad} problem(s) in the preference data:\n  " + "\n  ".join(problems))


def validate_pairs(data, source: str = "dataset") -> None:
    """Check a canonical table; raise DataValidationError listing each bad (column, row, user)."""
    table = _table(data)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DataValidationError(
            f"{source}: missing required column(s) {missing}; found columns {table.column_names}. "
            f"The canonical schema needs {list(REQUIRED)} (see plrm/data/schema.py)")
    if table.num_rows == 0:
        raise DataValidationError(f"{source}: the dataset has no rows")
    problems: list[str] = []
    for col in (*REQUIRED, *OPTIONAL_TEXT):
        if col in table.column_names and not pa.types.is_string(table[col].type) \
                and not pa.types.is_large_string(table[col].type):
            problems.append(f"column '{col}': expected strings, got {table[col].type}")
    if problems:
        _fail(source, problems, len(problems))

    users = table["user_id"]
    n_bad = 0

    def where(rows: np.ndarray, what: str) -> None:
        nonlocal n_bad
        n_bad += len(rows)
        for r in rows[:MAX_LISTED]:
            u = users[int(r)].as_py()
            problems.append(f"row {int(r)} (user {u!r}): {what}")
        if len(rows) > MAX_LISTED:
            problems.append(f"... and {len(rows) - MAX_LISTED} more rows where {what}")

    for col in REQUIRED:
        empty = pc.or_(pc.is_null(table[col]), pc.equal(pc.utf8_trim_whitespace(table[col]), ""))
        where(_rows_where(empty), f"column '{col}' is empty")
    same = pc.equal(table["chosen"], table["rejected"])
    where(_rows_where(pc.fill_null(same, False)), "columns 'chosen' and 'rejected' are identical")
    if "split" in table.column_names:
        bad = pc.invert(pc.is_in(table["split"], value_set=pa.array(SPLIT_VALUES)))
        where(_rows_where(bad), f"column 'split' must be one of {list(SPLIT_VALUES)}")
    for col in EMBEDDING:
        if col not in table.column_names:
            continue
        is_null = pc.is_null(table[col]).to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(table[col]), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        where(np.flatnonzero(is_null), f"column '{col}' is missing")
        if (~is_null).any():
            dim = int(np.bincount(lengths[~is_null]).argmax())
            where(np.flatnonzero(~is_null & (lengths != dim)), f"column '{col}' has a length other than {dim}")
            flat = pc.list_flatten(table[col]).to_numpy(zero_copy_only=False).astype(np.float64)
            row_of = np.repeat(np.arange(table.num_rows), np.maximum(lengths, 0))
            where(np.unique(row_of[~np.isfinite(flat)]), f"column '{col}' contains NaN or inf")
    if "chosen_emb" in table.column_names and "rejected_emb" not in table.column_names:
        problems.append("column 'chosen_emb' is present but 'rejected_emb' is not")
        n_bad += 1
    if problems:
        _fail(source, problems, n_bad)
