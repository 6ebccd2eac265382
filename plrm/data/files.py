"""Preference pairs from local files already in the canonical schema (parquet, jsonl/json, csv)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets

from plrm import capabilities as cap
from plrm.config import opt
from plrm.data.schema import DataValidationError
from plrm.data.source import DatasetSource, PreferenceData
from plrm.registry import datasets as dataset_registry

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataset_registry.register("preference_files")
class PreferenceFiles(DatasetSource):
    """Canonical-schema pairs from local parquet / jsonl / csv files (see plrm/data/schema.py)."""

    provides = frozenset({cap.TEXT})

    @dataclass
    class Config:
        path: str = opt(help="A file, or a directory of files of one format, in the canonical schema.")

    def load(self) -> PreferenceData:
        path = Path(self.config.path).expanduser()
        files = sorted(p for p in path.iterdir() if p.suffix in BUILDERS) if path.is_dir() else [path]
        if not files or not all(p.is_file() for p in files):
            raise DataValidationError(f"data.path: no preference files at {path} (expected {sorted(BUILDERS)})")
        formats = {BUILDERS.get(p.suffix) for p in files}
        if None in formats or len(formats) != 1:
            raise DataValidationError(f"data.path: {path}: files must all be one of {sorted(BUILDERS)}, "
                                      f"got {[p.name for p in files]}")
        empty = [p.name for p in files if p.stat().st_size == 0]
        if empty:
            raise DataValidationError(f"data.path: {path}: empty file(s) {empty}; no preference pairs to read")
        try:
            pairs = datasets.load_dataset(formats.pop(), data_files=[str(p) for p in files], split="train")
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
            raise DataValidationError(f"data.path: cannot read {path} as preference pairs: {exc}") from exc
        return PreferenceData(name=str(path), pairs=pairs, provides=self.provides)
