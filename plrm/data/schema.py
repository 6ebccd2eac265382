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

Validation fails loudly with the column, row and user of each problem; nothing is dropped here. Rows are named
``row i`` (0-based) unless the caller says where each row came from (``row_label``: local files name the file
and line). :func:`duplicate_rows` finds exact repeats of an earlier row, which PreferenceData drops (counted) or
refuses.
"""

from __future__ import annotations

from collections.abc import Callable

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


def row_name(row: int) -> str:
    """How a row is named when nothing better is known: its 0-based position in the table."""
    return f"row {int(row)}"


def validate_pairs(data, source: str = "dataset", row_label: Callable[[int], str] | None = None) -> None:
    """Check a canonical table; raise DataValidationError listing each bad (column, row, user).

    ``row_label`` names a row in messages (e.g. ``pairs.jsonl line 7``); ``row i`` by default."""
    label = row_label or row_name
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
    for col in EMBEDDING:
        if col in table.column_names and not (_is_list(table[col].type)
                                              and _is_number(table[col].type.value_type)):
            problems.append(f"column '{col}': expected lists of numbers, got {table[col].type}"
                            + (" (text: a CSV file cannot hold embeddings; use parquet or jsonl)"
                               if pa.types.is_string(table[col].type) else ""))
    if problems:
        _fail(source, problems, len(problems))

    users = table["user_id"]
    n_bad = 0

    def where(rows: np.ndarray, what: str) -> None:
        nonlocal n_bad
        n_bad += len(rows)
        for r in rows[:MAX_LISTED]:
            u = users[int(r)].as_py()
            problems.append(f"{label(int(r))} (user {u!r}): {what}")
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
    present = [c for c in EMBEDDING if c in table.column_names]
    is_null = {c: pc.is_null(table[c]).to_numpy(zero_copy_only=False) for c in present}
    lengths = {c: pc.fill_null(pc.list_value_length(table[c]), -1).to_numpy(zero_copy_only=False).astype(np.int64)
               for c in present}
    given = np.concatenate([lengths[c][~is_null[c]] for c in present]) if present else np.empty(0, np.int64)
    dim = int(np.bincount(given).argmax()) if len(given) else 0  # the most common length, over both columns
    for col in present:
        where(np.flatnonzero(is_null[col]), f"column '{col}' is missing")
        if dim == 0:
            where(np.flatnonzero(~is_null[col]), f"column '{col}' is an empty list")
            continue
        where(np.flatnonzero(~is_null[col] & (lengths[col] != dim)), f"column '{col}' has a length other than {dim}")
        flat = pc.list_flatten(table[col]).to_numpy(zero_copy_only=False).astype(np.float64)
        row_of = np.repeat(np.arange(table.num_rows), np.maximum(lengths[col], 0))
        where(np.unique(row_of[~np.isfinite(flat)]), f"column '{col}' contains NaN or inf")
    if "chosen_emb" in table.column_names and "rejected_emb" not in table.column_names:
        problems.append("column 'chosen_emb' is present but 'rejected_emb' is not")
        n_bad += 1
    if problems:
        _fail(source, problems, n_bad)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """(rows,) int64 code of each value (equal values, equal codes) and the number of distinct values."""
    encoded = pc.dictionary_encode(column)
    chunks = encoded.chunks
    if len({len(c.dictionary) for c in chunks}) > 1:  # Arrow gives every chunk the one final dictionary; if not:
        encoded = pc.dictionary_encode(column.combine_chunks())
        chunks = [encoded]
    codes = [c.indices.to_numpy(zero_copy_only=False).astype(np.int64) for c in chunks]
    return (np.concatenate(codes) if codes else np.empty(0, np.int64)), (len(chunks[-1].dictionary) if chunks else 0)


def duplicate_rows(data) -> tuple[np.ndarray, np.ndarray]:
    """Exact repeats: rows whose (user_id, prompt, chosen, rejected) equals an earlier row's, and for each the
    first row with those values; both sorted by the repeating row. The same pair with chosen and rejected
    swapped is a different judgement (a contradiction, which is data), not a repeat.

    Exact text comparison: each column is dictionary-encoded by Arrow and the codes are combined column by
    column; it stops as soon as the columns seen so far already tell every row apart (usually after two). The
    table must have passed validate_pairs (no nulls)."""
    table = _table(data)
    none = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    key = None
    for col in ("prompt", "user_id", "chosen", "rejected"):
        codes, distinct = _codes(table[col])
        # key < rows and distinct <= rows: key * distinct + codes fits in int64 below 3e9 rows
        key = codes if key is None else np.unique(key * distinct + codes, return_inverse=True)[1].reshape(-1)
        if int(key.max(initial=-1)) + 1 == table.num_rows:  # compact codes: all distinct already
            return none
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    first_of_row = first[inverse.reshape(-1)]
    rows = np.flatnonzero(first_of_row != np.arange(table.num_rows))
    return rows.astype(np.int64), first_of_row[rows].astype(np.int64)
