"""How the runner hands a method what it may know of the data: the seen users' train pairs, never the datamodule.

Methods declare what they need through three hooks of the base class (plrm.methods.base):
``before_fit(seen)`` (data-dependent initialisation, before the optimizer exists), ``fit_seen_users(seen)``
(per-user state derived from data, after training and before each validation epoch) and
``reference_checkpoints()`` / ``load_reference(name, state_dict)`` (another run's trained model, e.g. LoRe-Alt's
reference reward). :class:`MethodHooks` is the Lightning callback that calls them; :class:`SeenUsers` is the view
of the seen users' train pairs they receive. Nothing here imports a method: the hooks are called by name.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from plrm.checkpoint import load_checkpoint
from plrm.data.splits import TRAIN
from plrm.distributed import to_device


class SeenUsers:
    """The seen users' train pairs of one split (``plrm.methods.base.SeenUsersData``), on ``device``."""

    def __init__(self, dm, device: torch.device | str = "cpu"):
        self.dm, self.device = dm, device
        self.rows = dm.split.rows(TRAIN)
        self.users = torch.from_numpy(np.unique(dm.split.row_user[self.rows])).to(device)

    def pairs(self) -> dict:
        return to_device(self.dm.batch(torch.from_numpy(self.rows)), self.device)

    def pair_matrix(self):
        return self.dm.pair_matrix(self.rows)

    def item_inputs(self, item_ids: torch.Tensor) -> Any:
        return to_device(self.dm.prepared.backbone.inputs(torch.as_tensor(item_ids)), self.device)


def attach_references(model) -> None:
    """Load every checkpoint ``model.reference_checkpoints()`` names and hand it to ``model.load_reference``."""
    for name, path in model.reference_checkpoints().items():
        model.load_reference(name, load_checkpoint(path)["state_dict"])


class MethodHooks(L.Callback):
    """Calls a method's data hooks during ``trainer.fit`` (see the module docstring)."""

    def __init__(self, dm):
        self.dm = dm

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # Lightning calls callbacks' setup after the datamodule's and before the module's optimizer is built,
        # so before_fit may still resize parameters (PReF's rank: elbow).
        if stage == "fit":
            pl_module.data_hooks_attached = True
            attach_references(pl_module)
            pl_module.before_fit(SeenUsers(self.dm, pl_module.device))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._seen(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._seen(pl_module)

    def _seen(self, pl_module) -> None:
        # SeenUsers is lazy (pairs are gathered only when the method asks), so the base no-op costs nothing
        with torch.no_grad():
            pl_module.fit_seen_users(SeenUsers(self.dm, pl_module.device))
