"""Checkpoints during training, for ``plrm fit --resume``: ``seed-<s>/<label>.last.ckpt``.

:class:`ResumePoints` is a Lightning callback that writes the Trainer's full checkpoint (the method's trained
tensors, optimizer and scheduler states, loop progress, the training DataLoader's place in its epoch
(plrm.data.resumable) and the random number generators' states) every ``every_n_steps`` training batches and at
the end of every epoch, through a temporary file and a rename, so a kill at any moment leaves the previous one
whole. ``min_interval`` seconds bounds how often it writes (a full-batch method runs an epoch in milliseconds).
``trainer.fit(..., ckpt_path=<it>)`` continues from it; a resumed run then trains on the same batches with the
same random numbers, and ends with the same weights, as an uninterrupted one.

Only trained tensors are saved (``checkpoint_state()`` of a method: a LoRA backbone's frozen base weights are
rebuilt from the model files, not written every few steps); the resumed model is loaded non-strictly for that
reason, its missing keys being exactly those frozen weights.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) global generators, as tensors and lists (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss],
              "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumePoints(L.Callback):
    """Writes ``path`` (a full Lightning checkpoint) after every ``every_n_steps`` batches (0: none) and after
    each epoch, at most once per ``min_interval`` seconds; restores the global RNG states on resume.

    A checkpoint that is due is written when the next training batch starts (``on_train_batch_start``), not when
    the previous one ends: whatever runs in between (validation, ``fit_seen_users``, the next epoch's DataLoader
    iterator, which draws from the global generator) has then run, and a resumed Trainer, whose own start-up
    draws differ, gets the RNG states back at that same point, the start of that batch. That batch counts as
    not yet trained: Lightning trains it again on resume, and the DataLoader's state leaves it undrawn."""

    def __init__(self, path: Path, every_n_steps: int = 0, min_interval: float = 0.0):
        self.path, self.every_n_steps, self.min_interval = Path(path), every_n_steps, min_interval
        self.last_saved = time.monotonic()
        self.due = False
        self.saved_at: int | None = None  # batches trained when the last checkpoint was written
        self._restore: dict | None = None  # RNG states of the checkpoint resumed from, set at its batch's start

    @property
    def state_key(self) -> str:
        return "ResumePoints"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps and (trainer.fit_loop.total_batch_idx + 1) % self.every_n_steps == 0:
            self.due = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.due = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._restore is not None:
            set_rng_states(self._restore)
            self._restore = None
        if not self.due:
            return
        self.due = False
        if time.monotonic() - self.last_saved < self.min_interval:
            return
        loader = trainer.train_dataloader
        position = getattr(loader, "position", None)
        if position is not None:
            position.in_flight = 1  # this batch is drawn but not trained
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it; global rank 0 writes
        finally:
            if position is not None:
                position.in_flight = 0
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.last_saved, self.saved_at = time.monotonic(), trainer.fit_loop.total_batch_idx

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if hasattr(pl_module, "checkpoint_state"):  # trained tensors only (not a frozen backbone's weights)
            checkpoint["state_dict"] = pl_module.checkpoint_state()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict["rng"]


def resume_point(path: Path) -> Path | None:
    """``path`` if a training checkpoint is there to resume from, else None (a stale temporary file is ignored)."""
    return path if Path(path).is_file() else None
