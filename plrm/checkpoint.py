"""Method checkpoints: the module's state_dict plus what rebuilds it, written atomically, read weights-only."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_state(state_dict: dict, path: Path, meta: dict) -> None:
    """Write ``{'state_dict', **meta}`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state_dict, **meta}, tmp)
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, path: Path, meta: dict) -> None:
    """A method's trained state: ``checkpoint_state()`` (no frozen backbone weights) where the model has one."""
    state = model.checkpoint_state() if hasattr(model, "checkpoint_state") else model.state_dict()
    save_state(state, path, meta)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)
