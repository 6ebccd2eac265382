"""The canonical pairwise-preference schema (DESIGN §3) and its validation.

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
OPTIONAL_TEXT = ("pair_id", "reference", "split")
EMBEDDING = ("chosen_emb", "rejected_emb")
SPLIT_VALUES = ("train", "test")
MAX_LISTED = 10


class DataValidationError(ValueError):
    """Bad preference data; the message names column, row and user of each problem."""


def _table(data) -> pa.Table:
    return data.data.table if hasattr(data, "data") else data


def _rows_where(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.flatnonzero(pc.fill_null(mask, True).to_numpy(zero_copy_only=False))


def _fail(source: str, problems: list[str]) -> None:
    shown = problems[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DataValidationError(f"{source}: {len(problems)} problem(s) in the preference data:\n  "
                              + "\n  ".join(shown) + more)


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
        _fail(source, problems)

    users = table["user_id"]

    def where(rows: np.ndarray, what: str) -> None:
        for r in rows[:MAX_LISTED]:
            u = users[int(r)].as_py()
            problems.append(f"row {int(r)} (user {u!r}): {what}")
        if len(rows) > MAX_LISTED:
            problems.append(f"... {len(rows) - MAX_LISTED} more rows: {what}")

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
        lengths = pc.list_value_length(table[col]).to_numpy(zero_copy_only=False)
        null_rows = np.flatnonzero(pc.is_null(table[col]).to_numpy(zero_copy_only=False))
        where(null_rows, f"column '{col}' is missing")
        valid = lengths[~np.isnan(lengths.astype(float))] if lengths.dtype == object else lengths
        if len(valid):
            dim = int(np.bincount(valid.astype(np.int64)).argmax())
            where(np.flatnonzero((lengths != dim) & ~pc.is_null(table[col]).to_numpy(zero_copy_only=False)),
                  f"column '{col}' has a length other than {dim}")
            flat = pc.list_flatten(table[col]).to_numpy(zero_copy_only=False).astype(np.float64)
            if not np.isfinite(flat).all():
                row_of = np.repeat(np.arange(table.num_rows), np.nan_to_num(lengths.astype(float)).astype(np.int64))
                bad_rows = np.unique(row_of[~np.isfinite(flat)])
                where(bad_rows, f"column '{col}' contains NaN or inf")
    if "chosen_emb" in table.column_names and "rejected_emb" not in table.column_names:
        problems.append("column 'chosen_emb' is present but 'rejected_emb' is not")
    if problems:
        _fail(source, problems)
