"""A benchmark directory's unit records and the facts stored with them, shared by plrm.bench.run (which writes
them) and plrm.bench.report (which reads them, also from the shards of ``plrm bench --merge``).

A record is one JSON file per (dataset, method, seed) unit, ``cells/<dataset>/<method>/seed-<s>.json``, whose
``status`` is DONE (with metrics), SKIPPED (with a reason) or FAILED (with the error); ``bench.yaml``
(SPEC_FILE) beside ``cells/`` is the resolved benchmark recipe.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from plrm.bench.spec import Unit
from plrm.eval.report import write_json
from plrm.registry import REGISTRIES

SPEC_FILE = "bench.yaml"
CELLS_DIR = "cells"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"


def record_path(bench_dir: Path, unit: Unit) -> Path:
    return bench_dir / CELLS_DIR / unit.dataset / unit.method / f"seed-{unit.seed}.json"


def write_record(bench_dir: Path, unit: Unit, record: dict) -> Path:
    """Write ``record`` atomically, so an interrupt loses at most the unit in flight."""
    path = record_path(bench_dir, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return path


def read_records(bench_dir: Path) -> dict[str, dict]:
    """Every record under ``bench_dir/cells`` by unit key (a record that cannot be read is left out: its unit
    simply runs again)."""
    out = {}
    for path in sorted((bench_dir / CELLS_DIR).glob("*/*/seed-*.json")):
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        out[Unit(rec["dataset"], rec["method"], rec["seed"]).key] = rec
    return out


# ---- facts recorded with every result ------------------------------------------------------------------------
def git_commit() -> str | None:
    """The commit of the plrm checkout in use (None for an installed wheel or without git); '+dirty' if modified."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def broken_plugins() -> list[dict]:
    """Every plugin that failed to load, as stored in results.json (group, name, distribution, error)."""
    return [{"group": b.group, "name": b.name, "distribution": str(b.origin), "error": b.error}
            for reg in REGISTRIES.values() for b in reg.broken()]
