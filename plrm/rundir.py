"""Where a run lives and how it is replaced: nothing a user owns is ever removed.

A run directory is ``<run.output_dir>/<run.name>``. It is a plrm run only if it holds the marker ``plrm-run.json``,
written first when the run is created (``{"plrm": version, "id": ..., "created": ..., "status": "running" or
"complete"}``); ``status`` turns ``complete`` only after results.json is written, so a killed or failed
``plrm fit`` leaves a run marked incomplete, which ``plrm fit --resume`` continues.

- ``run.name`` must name a folder strictly inside ``run.output_dir``: ``.``, ``..``, the output folder itself,
  an absolute path elsewhere or a name that climbs out of it are refused before anything is read or written.
- An existing folder that is not a plrm run is never written to or removed, ``run.overwrite`` or not.
- ``run.overwrite=true`` builds the new run beside the old one, in ``<output_dir>/.<name>.plrm-staging``, and
  swaps the two only when the new run is complete: a failed or killed overwrite leaves the old run as it was
  (and ``--resume`` with ``run.overwrite=true`` continues the staged one).

Every (split seed, method) unit that finished is recorded in its seed folder (``<label>.metrics.json`` and
``<label>.per_user.parquet``, beside ``<label>.ckpt``), each written through a temporary file and a rename; a
resumed run reads them instead of training again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from plrm import __version__
from plrm.errors import RecipeError
from plrm.eval.report import write_json

MARKER = "plrm-run.json"
RUNNING, COMPLETE = "running", "complete"


def read_marker(run_dir: Path) -> dict | None:
    """The run's marker, or None when ``run_dir`` is not a plrm run (no marker, or one that does not parse)."""
    path = Path(run_dir) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "id" in marker else None


def new_marker(name: str) -> dict:
    """A new run's marker; its id (``<name>-<time>-<random>``) is recorded in every checkpoint the run writes."""
    return {"plrm": __version__, "id": f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": RUNNING}


def set_status(run_dir: Path, marker: dict, status: str) -> None:
    marker["status"] = status
    write_json(Path(run_dir) / MARKER, marker)


def run_path(output_dir: str, name: str) -> Path:
    """``<output_dir>/<name>``, refused unless it is a folder strictly inside ``output_dir``."""
    root = Path(output_dir).expanduser()
    if not name or not str(name).strip():
        raise RecipeError("run.name is empty; give the run a name (run.name=my_run)")
    if Path(name).expanduser().is_absolute():
        raise RecipeError(f"run.name={name!r} is an absolute path; run.name names a folder inside run.output_dir "
                          f"({root}): set run.output_dir to the parent folder and run.name to the run's own name")
    parts = Path(name).parts
    if any(part in (".", "..") for part in parts) or not parts:
        raise RecipeError(f"run.name={name!r} must name a folder inside run.output_dir ({root}), not "
                          f"{'the output folder itself' if set(parts) <= {'.'} else 'a folder above or beside it'} "
                          "('.' and '..' are refused)")
    run_dir = root / name
    resolved_root, resolved = root.resolve(), run_dir.resolve()
    if resolved == resolved_root or resolved_root not in resolved.parents:
        raise RecipeError(f"run.name={name!r} resolves to {resolved}, which is not inside run.output_dir "
                          f"({resolved_root}; a symbolic link?); choose another run.name")
    outer = inside_a_run(resolved_root, resolved)
    if outer is not None:
        raise RecipeError(f"run.name={name!r} would put a run inside the run {outer}; runs do not nest (an "
                          "overwrite of the outer run would remove it): choose a name outside it")
    return run_dir


# what plrm writes at the top of a run directory (fit, test, adapt, active, tax, the trackers): anything else there
# is the user's, and an overwrite, which replaces the whole folder, refuses to remove it
PLRM_ENTRIES = ("plrm-run.json", "recipe.yaml", "results.json", "per_user.parquet", "test_results.json",
                "adapt_results.json", "adapt_*.json", "active_results.json", "active_curve.png", "tax-*.json",
                "tax-*.md", "seed-*", "wandb", "wandb-staging", "csv", "tensorboard", "*.tmp")


def foreign_entries(run_dir: Path) -> list[str]:
    """Entries at the top of a run directory that plrm did not write (a user's notes, a run nested inside)."""
    out = []
    for entry in sorted(Path(run_dir).iterdir()):
        nested = entry.is_dir() and read_marker(entry) is not None
        if nested or not any(entry.match(pattern) for pattern in PLRM_ENTRIES):
            out.append(entry.name + ("/ (a plrm run)" if nested else "/" if entry.is_dir() else ""))
    return out


def inside_a_run(root: Path, run_dir: Path) -> Path | None:
    """The plrm run among the folders between ``root`` and ``run_dir`` (exclusive), if any."""
    for parent in run_dir.parents:
        if parent == root or root not in parent.parents:
            return None
        if read_marker(parent) is not None:
            return parent
    return None


def staging_path(run_dir: Path) -> Path:
    """Where ``run.overwrite=true`` builds the run that replaces ``run_dir``."""
    return run_dir.parent / f".{run_dir.name}.plrm-staging"


@dataclass
class Place:
    """Where a run about to start writes (``work``), whether that is a staged replacement of ``target``, and
    whether it continues a run already there (``resumed``)."""

    target: Path
    work: Path
    staged: bool
    resumed: bool
    marker: dict | None  # the marker of the run continued (resumed) or None for a new run


def describe(run_dir: Path, marker: dict) -> str:
    if marker.get("status") == COMPLETE:
        return "a finished run"
    done = len(list(Path(run_dir).glob("seed-*/*.metrics.json")))
    return f"an incomplete run (a killed or failed `plrm fit`; {done} (seed, method) unit(s) finished)"


def place(run_dir: Path, overwrite: bool, resume: bool) -> Place:
    """Decide where a new or resumed run writes, refusing anything that would touch what is not a plrm run.
    Reads only; nothing is created or removed here (:func:`claim` does that once every check has passed)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"run directory {run_dir} is a file, not a folder; choose another run.name")
    present = run_dir.is_dir() and any(run_dir.iterdir())
    marker = read_marker(run_dir) if present else None
    if present and marker is None:
        raise RecipeError(f"{run_dir} exists and is not a plrm run (no {MARKER}): plrm writes into or removes only "
                          "its own runs, with run.overwrite=true or not; choose another run.name or run.output_dir")
    if overwrite and present:
        foreign = foreign_entries(run_dir)
        if foreign:
            raise RecipeError(f"run.overwrite=true would remove what plrm did not write in {run_dir}: "
                              f"{', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''}; move it out of the "
                              "run first, or choose another run.name")
    if overwrite:
        staging = staging_path(run_dir)
        staged = read_marker(staging) if staging.is_dir() else None
        if staging.exists() and staged is None and any(staging.iterdir()):
            raise RecipeError(f"{staging} (where run.overwrite=true builds the replacement of {run_dir.name}) exists "
                              "and is not a plrm run; move it away")
        if not present:
            return Place(run_dir, run_dir, staged=False, resumed=False, marker=None)
        if resume and staged is not None and staged.get("status") != COMPLETE:
            return Place(run_dir, staging, staged=True, resumed=True, marker=staged)
        return Place(run_dir, staging, staged=True, resumed=False, marker=None)
    if not present:
        return Place(run_dir, run_dir, staged=False, resumed=False, marker=None)
    if resume:
        return Place(run_dir, run_dir, staged=False, resumed=True, marker=marker)
    incomplete = marker.get("status") != COMPLETE
    raise RecipeError(f"run directory {run_dir} already exists: {describe(run_dir, marker)}. "
                      + ("Resume it by running the same command with --resume (run.resume=true), choose"
                         if incomplete else "Choose")
                      + " another run.name=..., or replace it with run.overwrite=true (the old run is kept until "
                      "the new one is complete)")


def claim(where: Place) -> dict:
    """Create the folder a run writes (or take over the one it resumes) and return its marker. An earlier
    staged replacement that is being started afresh is removed first: it is plrm's own (its marker says so)."""
    if where.resumed:
        set_status(where.work, where.marker, RUNNING)
        return where.marker
    if where.staged and where.work.exists():
        shutil.rmtree(where.work)
    where.work.mkdir(parents=True, exist_ok=True)
    marker = new_marker(where.target.name)
    write_json(where.work / MARKER, marker)
    return marker


def complete(where: Place, marker: dict) -> None:
    """Mark the run complete; a staged replacement then takes the place of the old run (two renames, the old run
    removed only after the new one is in place)."""
    set_status(where.work, marker, COMPLETE)
    if not where.staged:
        return
    old = where.target.parent / f".{where.target.name}.plrm-replaced"
    if old.exists():  # left by a swap that was killed between its two renames: a plrm run, replaced since
        if read_marker(old) is None:
            raise RecipeError(f"{old} exists and is not a plrm run; move it away (the new run is complete in "
                              f"{where.work})")
        shutil.rmtree(old)
    os.replace(where.target, old)
    os.replace(where.work, where.target)
    shutil.rmtree(old)


def same_recipe(stored: dict, new: dict) -> list[str]:
    """Keys whose values differ between a run's stored recipe and the one resuming it (run.resume and
    run.overwrite aside)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flat(stored), flat(new)
    ignore = {"run.resume", "run.overwrite"}
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))


# ---- finished units ---------------------------------------------------------------------------------------------
def unit_files(seed_dir: Path, label: str) -> tuple[Path, Path]:
    return seed_dir / f"{label}.metrics.json", seed_dir / f"{label}.per_user.parquet"


def save_unit(seed_dir: Path, label: str, metrics: dict, per_user: pd.DataFrame | None) -> None:
    """Record a finished unit (its checkpoint is already written): per-user rows first, the metrics last, so
    a metrics file means the unit is whole."""
    metrics_file, per_user_file = unit_files(seed_dir, label)
    if per_user is not None:
        tmp = per_user_file.with_name(per_user_file.name + ".tmp")
        per_user.to_parquet(tmp, index=False)
        os.replace(tmp, per_user_file)
    write_json(metrics_file, {"metrics": metrics, "per_user": per_user is not None})


def load_unit(seed_dir: Path, label: str) -> tuple[dict, pd.DataFrame | None] | None:
    """A finished unit's (metrics, per-user rows), or None if it did not finish."""
    metrics_file, per_user_file = unit_files(seed_dir, label)
    if not metrics_file.is_file():
        return None
    record = json.loads(metrics_file.read_text())
    return record["metrics"], (pd.read_parquet(per_user_file) if record["per_user"] else None)
