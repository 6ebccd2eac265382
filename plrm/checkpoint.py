"""Method checkpoints: the module's state_dict plus what rebuilds it, written atomically, read weights-only.

A checkpoint is ``{'state_dict': {...}, **meta}``; meta holds plain values only (method, label, k, ``run``: the
id of the run that wrote it). Reading never unpickles arbitrary objects: a file that is damaged, is not a plrm
checkpoint, or holds anything but tensors and plain values is refused with a :class:`CheckpointError` naming the
file and what to do (restore it or re-run the fit), never with advice to load it unsafely.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from plrm.errors import CheckpointError, refit_command


def save_state(state_dict: dict, path: Path, meta: dict, run: str | None = None) -> None:
    """Write ``{'state_dict', **meta}`` to ``path`` via a temporary file and an atomic rename. ``run`` (or
    ``meta['run']``): the id of the run the checkpoint belongs to, which a mismatch error names."""
    path = Path(path)
    meta = {**meta, **({"run": run} if run is not None else {})}
    if "state_dict" in meta:
        raise ValueError("checkpoint meta may not have a 'state_dict' key")
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state_dict, **meta}, tmp)
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, path: Path, meta: dict, run: str | None = None) -> None:
    """A method's trained state: ``checkpoint_state()`` (no frozen backbone weights) where the model has one."""
    state = model.checkpoint_state() if hasattr(model, "checkpoint_state") else model.state_dict()
    save_state(state, path, meta, run=run)


def checkpoint_run(meta: dict) -> str | None:
    """The id of the run that wrote a checkpoint (None for one written before plrm recorded it)."""
    run = meta.get("run") if isinstance(meta, dict) else None
    return str(run) if run is not None else None


def _run_dir_of(path: Path) -> Path | None:
    """The run directory holding ``path`` when it sits in a run's ``seed-<s>/`` folder."""
    parent = path.parent
    if parent.name.startswith("seed-") and (parent.parent / "recipe.yaml").is_file():
        return parent.parent
    return None


def _what_to_do(path: Path) -> str:
    run_dir = _run_dir_of(path)
    if run_dir is None:
        return "use a checkpoint that `plrm fit` wrote, or re-run the fit that should have written it"
    return (f"restore the file from a backup, then re-run the command (e.g. `plrm test --run {run_dir}`); or "
            f"re-run the fit of that run: `{refit_command(run_dir)}` (it replaces {run_dir})")


def _first_line(text: str, limit: int = 160) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _first_sentence(text: str) -> str:
    """The first sentence of an error text (torch's zip errors go on with paragraphs of generic advice)."""
    return _first_line(text).split(". ")[0].rstrip(".")


def _load_error(path: Path, exc: Exception) -> CheckpointError:
    """The one CheckpointError for a checkpoint torch could not read (never torch's own unsafe-loading advice)."""
    text = str(exc)
    forbidden = re.search(r"GLOBAL ([\w.]+)", text)
    if forbidden and isinstance(exc, pickle.UnpicklingError):
        return CheckpointError(
            f"checkpoint {path} holds objects plrm will not unpickle ({forbidden.group(1)}): a plrm checkpoint holds "
            "only tensors and plain values, so this file was not written by plrm or was altered since; do not load "
            f"it by other means. To go on: {_what_to_do(path)}")
    if path.stat().st_size == 0:
        why = "it is empty (0 bytes)"
    elif isinstance(exc, EOFError):
        why = "it ends early (truncated)"
    elif isinstance(exc, RuntimeError) and "zip archive" in text:
        why = "it is truncated, or is not a file torch.save wrote"
    elif isinstance(exc, OSError) and not isinstance(exc, zipfile.BadZipFile):
        return CheckpointError(f"checkpoint {path} cannot be read: {exc}")
    else:
        why = "its contents are not a plrm checkpoint"
    detail = "" if "Weights only load failed" in text else f" ({type(exc).__name__}: {_first_sentence(text)})"
    return CheckpointError(f"checkpoint {path} is damaged or not a plrm checkpoint: {why}{detail}. To go on: "
                           f"{_what_to_do(path)}")


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint without unpickling arbitrary objects (``weights_only=True``): a dict with a
    ``state_dict`` of tensors and its meta. A file that cannot be read as one raises :class:`CheckpointError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with warnings.catch_warnings(record=True) as said:  # torch's warnings about a damaged file are noise
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (torch raises many kinds for a bad file: one message for all)
            raise _load_error(path, exc) from None
    for w in said:  # a good file: its warnings are shown as usual
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} is not a plrm checkpoint (no 'state_dict' in it). To go on: "
                              f"{_what_to_do(path)}")
    return state


def _mismatch_detail(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    sizes = [ln.rstrip(".") for ln in lines if ln.startswith("size mismatch")]
    if sizes:
        more = f" (and {len(sizes) - 2} more)" if len(sizes) > 2 else ""
        return "; ".join(sizes[:2]) + more
    return _first_line(str(exc), 300)


def checkpoint_mismatch_error(path: str | Path, meta: dict[str, Any], expected_run: str | None,
                              exc: BaseException) -> CheckpointError:
    """The error for a checkpoint whose tensors do not fit the method the run builds (``load_state_dict``'s
    ``size mismatch`` RuntimeError, or a missing/unexpected key): names the file, the run that wrote it (its
    meta's ``run``) and the run expected, and what to do. Raise it ``from exc``."""
    path = Path(path)
    written_by = checkpoint_run(meta)
    detail = _mismatch_detail(exc)
    if written_by is None:
        whose = "it records no run (it was written by an older plrm, or not by `plrm fit`)"
    elif expected_run is not None and written_by != expected_run:
        whose = (f"it was written by run '{written_by}', not by this run ('{expected_run}'), so it was probably "
                 "copied from another run")
    else:
        whose = (f"it is this run's own checkpoint (run '{written_by}'), so the run's recipe.yaml or split changed "
                 "after the fit")
    return CheckpointError(f"checkpoint {path} does not fit the model this run builds ({detail}); {whose}. To go "
                           f"on: {_what_to_do(path)}")
