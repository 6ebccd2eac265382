"""Preference pairs from local files already in the canonical schema (parquet, jsonl/json, csv).

Reading is strict, and every problem is one :class:`~plrm.errors.DataValidationError` that names the file and
the line (text formats) or row (parquet) before any training starts:

* text must be UTF-8 (a byte that is not is named with its line and offset);
* JSON Lines: one JSON object per line; blank lines are skipped (as JSON Lines readers do), so line numbers
  count them; a line cut off or holding anything but an object (``42``, ``[...]``) is refused;
* ``.json``: a JSON array of objects, or JSON Lines;
* CSV: a header line, then one row per pair with as many fields as the header; every cell is read as text
  (``NA`` or ``None`` stay the strings they are), so CSV cannot hold the embedding columns;
* a file with no pairs (only blank lines, or a header and nothing else) is refused.

The normal path costs nothing extra: the files are parsed once by ``datasets``; only when that fails, or the
result holds text that is not UTF-8 or a column of mixed JSON types, are the files scanned line by line in Python
to say where. Rows are named ``pairs.jsonl line 7`` (``pairs.parquet row 3``, 0-based, for parquet) in every
later message too (validation, duplicates, conflicting embeddings).

Exact duplicate rows (same user_id, prompt, chosen and rejected) are dropped through a counted rule of the load
report (``duplicates: drop``, the default) or refused (``duplicates: error``); see PreferenceData.
"""

from __future__ import annotations

import codecs
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plrm import capabilities as cap
from plrm.config import opt
from plrm.data.schema import EMBEDDING, OPTIONAL_TEXT, REQUIRED, DataValidationError
from plrm.data.source import DatasetSource, PreferenceData
from plrm.registry import datasets as dataset_registry

if TYPE_CHECKING:
    import datasets

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
TEXT_COLUMNS = (*REQUIRED, *OPTIONAL_TEXT)


@dataset_registry.register("preference_files")
class PreferenceFiles(DatasetSource):
    """Canonical-schema pairs from local parquet / jsonl / csv files (see plrm/data/schema.py).

    ``key`` is how messages name the option the path came from: ``data.path`` in a recipe, ``--pairs`` for
    ``plrm adapt``."""

    provides = frozenset({cap.TEXT})

    @dataclass
    class Config:
        path: str = opt(help="A file, or a directory of files of one format, in the canonical schema.", path=True)
        duplicates: Literal["drop", "error"] = opt(
            "drop", "Exact duplicate rows (same user_id, prompt, chosen and rejected): 'drop' keeps the first "
                    "copy and reports how many were dropped; 'error' refuses the data, naming the rows.")

    def __init__(self, config: Config, *, key: str = "data.path") -> None:
        super().__init__(config)
        self.key = key

    def load(self) -> PreferenceData:
        path, files, fmt = self._files()
        pairs = self._read(path, files, fmt)
        return PreferenceData(name=str(path), pairs=pairs, provides=self.provides,
                              duplicates=self.config.duplicates, row_label=RowNames(files, fmt, len(pairs)))

    def _files(self) -> tuple[Path, list[Path], str]:
        key = self.key
        if not str(self.config.path).strip():
            raise DataValidationError(f"{key}: no path given (a file or a directory of preference files)")
        path = Path(self.config.path).expanduser()
        files = sorted(p for p in path.iterdir() if p.suffix in BUILDERS) if path.is_dir() else [path]
        if not files or not all(p.is_file() for p in files):
            raise DataValidationError(f"{key}: no preference files at {path} (expected {sorted(BUILDERS)})")
        formats = {BUILDERS.get(p.suffix) for p in files}
        if None in formats or len(formats) != 1:
            raise DataValidationError(f"{key}: {path}: files must all be one of {sorted(BUILDERS)}, "
                                      f"got {[p.name for p in files]}")
        empty = [p.name for p in files if p.stat().st_size == 0]
        if empty:
            raise DataValidationError(f"{key}: {path}: empty file(s) {empty}; no preference pairs to read")
        return path, files, formats.pop()

    def _read(self, path: Path, files: list[Path], fmt: str) -> datasets.Dataset:
        import datasets  # imported when used: it takes ~1 s, and `plrm list` needs none
        options = {}
        if fmt == "csv":  # every cell as text: no guessed numbers, and 'NA' / 'None' stay what they say
            header = _csv_header(files[0])
            if header:
                options = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                           "keep_default_na": False}
        level = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log line of a failure: the error says it
        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()  # "Generating train split": noise before a one-line error
        try:
            pairs = datasets.load_dataset(fmt, data_files=[str(p) for p in files], split="train", **options)
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
            where = find_problem(files, fmt)
            if where:
                raise DataValidationError(f"{self.key}: {where}") from exc
            cause = exc.__cause__ or exc.__context__
            detail = f" ({type(cause).__name__}: {cause})" if cause is not None and str(cause) not in str(exc) else ""
            raise DataValidationError(f"{self.key}: cannot read {path} as preference pairs: {exc}{detail}") from exc
        finally:
            datasets.logging.set_verbosity(level)
            if bars:
                datasets.utils.logging.enable_progress_bar()
        table = pairs.data.table
        odd = [c for c in TEXT_COLUMNS if c in table.column_names and not _is_text(table[c].type)]
        odd += [c for c in EMBEDDING if c in table.column_names and not _is_list(table[c].type)]
        bad_text = [c for c in table.column_names if _is_text(table[c].type) and not _valid_utf8(table[c])]
        if odd or bad_text:
            where = find_problem(files, fmt)
            if where:
                raise DataValidationError(f"{self.key}: {where}")
            if bad_text:  # parquet: no lines to scan; name the first bad row
                column = bad_text[0]
                row = _first_invalid_utf8(table[column])
                names = RowNames(files, fmt, table.num_rows)
                raise DataValidationError(f"{self.key}: {names(row)}: column '{column}' holds text that is not "
                                          "UTF-8; write the file with valid UTF-8 strings")
            # otherwise validate_pairs names the column and its type
        return pairs


# ---- naming rows --------------------------------------------------------------------------------------------------
class RowNames:
    """Names a row of the table read from ``files`` by its file and line (``pairs.jsonl line 7``), for messages.

    Built lazily, on the first message: the files are re-read to find where each row starts (blank JSON Lines
    skipped, CSV records across several lines, a header). Falls back to ``row i`` of the table when the count of
    rows found does not match ``n_rows``."""

    def __init__(self, files: list[Path], fmt: str, n_rows: int):
        self.files, self.fmt, self.n_rows = list(files), fmt, n_rows
        self._index: tuple[np.ndarray, list] | None = None

    def __call__(self, row: int) -> str:
        row = int(row)
        if self._index is None:
            self._index = self._build()
        ends, per_file = self._index
        if not len(ends) or ends[-1] != self.n_rows:
            return f"row {row}"
        i = int(np.searchsorted(ends, row, side="right"))
        local = row - (int(ends[i - 1]) if i else 0)
        name, kind, lines = per_file[i]
        if kind == "line":
            return f"{name} line {int(lines[local])}"
        if kind == "record":
            return f"{name} record {local + 1}"
        return f"{name} row {local}"

    def _build(self) -> tuple[np.ndarray, list]:
        per_file, counts = [], []
        try:
            for path in self.files:
                if self.fmt == "parquet":
                    n = pq.ParquetFile(path).metadata.num_rows
                    per_file.append((path.name, "row", None))
                elif self.fmt == "csv":
                    lines = _csv_record_lines(path)
                    n = len(lines)
                    per_file.append((path.name, "line", lines))
                elif _is_json_document(path):
                    with open(path, encoding="utf-8-sig") as f:
                        n = len(json.load(f))
                    per_file.append((path.name, "record", None))
                else:
                    lines = _json_record_lines(path)
                    n = len(lines)
                    per_file.append((path.name, "line", lines))
                counts.append(n)
        except (OSError, ValueError, csv.Error, pa.ArrowException):
            return np.empty(0, dtype=np.int64), []
        return np.cumsum(counts, dtype=np.int64), per_file


def _json_record_lines(path: Path) -> np.ndarray:
    """1-based numbers of the non-blank lines of a JSON Lines file (its records)."""
    with open(path, "rb") as f:
        return np.array([number for number, raw in enumerate(f, 1) if raw.strip()], dtype=np.int64)


def _csv_record_lines(path: Path) -> np.ndarray:
    """1-based line where each record (after the header) of a CSV file starts; blank lines are no records."""
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        start = reader.line_num + 1
        for fields in reader:
            if fields:
                out.append(start)
            start = reader.line_num + 1
    return np.array(out, dtype=np.int64)


# ---- finding what is wrong, only when something is ---------------------------------------------------------------
def find_problem(files: list[Path], fmt: str) -> str | None:
    """The first problem in ``files``, as '<file> line <n>: <what>', or None when the scan finds none."""
    try:
        return _find_problem(files, fmt)
    except OSError as exc:
        return f"{Path(exc.filename or files[0]).name}: cannot be read ({exc.strerror or exc})"


def _find_problem(files: list[Path], fmt: str) -> str | None:
    if fmt == "csv":
        first_header = None
        for path in files:
            problem, header = _csv_problem(path)
            if problem:
                return problem
            if first_header is None:
                first_header = (path.name, header)
            elif header != first_header[1]:
                return (f"{path.name} line 1: columns {header} differ from those of {first_header[0]} "
                        f"{first_header[1]}; all files must share one header")
        return None
    for path in files:
        if fmt == "parquet":
            try:
                pq.ParquetFile(path)
            except (pa.ArrowException, OSError) as exc:
                return f"{path.name}: not a readable parquet file ({exc})"
            continue
        problem = _json_document_problem(path) if _is_json_document(path) else _json_lines_problem(path)
        if problem:
            return problem
    return None


def _not_utf8(byte: int, offset: int) -> str:
    return f"not UTF-8 (byte 0x{byte:02x} at offset {offset} of the line); save the file as UTF-8"


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _record_problem(value) -> str | None:
    """What is wrong with one decoded JSON record, or None."""
    if not isinstance(value, dict):
        return f"a JSON object per line is expected, got {_kind(value)}"
    for column in TEXT_COLUMNS:
        v = value.get(column)
        if v is not None and not isinstance(v, str):
            return f"column '{column}' is {_kind(v)}, expected a string (in quotes)"
    for column in EMBEDDING:
        v = value.get(column)
        if v is not None and not (isinstance(v, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            return f"column '{column}' is {_kind(v)}, expected a list of numbers"
    return None


def _json_lines_problem(path: Path) -> str | None:
    seen_record = False
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"{path.name} line {number}: {_not_utf8(raw[exc.start], exc.start)}"
            if not text.strip():
                continue
            seen_record = True
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())
                what = ("it ends early: truncated? a line must hold one whole object" if cut
                        else f"{exc.msg} at column {exc.colno}")
                return f"{path.name} line {number}: not valid JSON ({what})"
            problem = _record_problem(value)
            if problem:
                return f"{path.name} line {number}: {problem}"
    if not seen_record:
        return f"{path.name}: no preference pairs (the file holds only blank lines)"
    return None


def _is_json_document(path: Path) -> bool:
    """A ``.json`` file holding one JSON array (rather than JSON Lines)."""
    if path.suffix != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n")
    return head.startswith(b"[")


def _json_document_problem(path: Path) -> str | None:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        number = raw.count(b"\n", 0, exc.start) + 1
        return f"{path.name} line {number}: {_not_utf8(raw[exc.start], exc.start - line_start)}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())
        what = "it ends early: truncated?" if cut else exc.msg
        return f"{path.name} line {exc.lineno} column {exc.colno}: not valid JSON ({what})"
    if not value:
        return f"{path.name}: no preference pairs (an empty JSON array)"
    for i, record in enumerate(value, 1):
        problem = _record_problem(record)
        if problem:
            return f"{path.name} record {i}: {problem.replace('per line', 'per record')}"
    return None


def _csv_header(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error, OSError):
        return None  # the load fails and find_problem names the line


def _csv_problem(path: Path) -> tuple[str | None, list[str] | None]:
    """(the first problem of a CSV file, its header)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"{path.name} line {number}: {_not_utf8(raw[exc.start], exc.start)}", None
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            while header == []:
                header = next(reader, None)
            if header is None:
                return f"{path.name}: no header line and no rows", None
            rows, start = 0, reader.line_num + 1
            for fields in reader:
                if fields:
                    rows += 1
                    if len(fields) != len(header):
                        return (f"{path.name} line {start}: {len(fields)} field(s), but the header line has "
                                f"{len(header)} ({', '.join(header)}); quote text that holds commas"), header
                start = reader.line_num + 1
        except csv.Error as exc:
            return f"{path.name} line {reader.line_num}: not valid CSV ({exc})", None
    if not rows:
        return f"{path.name}: a header line but no rows", header
    return None, header


# ---- column checks of a table that did load ----------------------------------------------------------------------
def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _valid_utf8(column: pa.ChunkedArray) -> bool:
    """Whether every string is UTF-8 (Arrow's JSON and parquet readers do not check; a C++ pass)."""
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _first_invalid_utf8(column: pa.ChunkedArray) -> int:
    """Row of the first string that is not UTF-8 (bisection over slices; the column has one)."""
    offset = 0
    for chunk in column.chunks:
        lo, hi = 0, len(chunk)
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            while hi - lo > 1:  # invariant: [lo, hi) holds a bad value
                mid = (lo + hi) // 2
                try:
                    chunk.slice(lo, mid - lo).validate(full=True)
                    lo = mid
                except pa.ArrowInvalid:
                    hi = mid
            return offset + lo
        offset += len(chunk)
    return 0
