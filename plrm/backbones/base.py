"""Backbone: turns (prompt, response) items into model inputs and an encoder module.

A backbone is prepared once per dataset with the unique items of the data (each unique text is handled once,
whatever the number of users), then serves ``inputs(item_ids)`` for batches. The trainable or frozen
``encoder()`` module maps those inputs to features ``h`` of shape (N, feature_dim); methods put their heads on
top. The HF transformer with LoRA (plrm.backbones.transformer) and the frozen encoder with its disk cache
(plrm.backbones.frozen) implement the same three calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plrm.config import Configured
from plrm.items import ItemIndex  # noqa: F401  (re-exported for backbones written against it)


class Backbone(Configured):
    """Base class of registered backbones. ``needs``: what it reads from the dataset (capability strings);
    ``provides``: what it adds for methods (plrm.capabilities)."""

    needs: frozenset[str] = frozenset()

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def prepare(self, data, items: ItemIndex) -> None:
        """Compute or look up what ``inputs`` serves, for every unique item of ``data``."""
        raise NotImplementedError

    def inputs(self, item_ids: torch.Tensor) -> Any:
        """Model inputs of these items (a tensor, or a dict of tensors for token batches)."""
        raise NotImplementedError

    def encoder(self) -> nn.Module:
        """The module mapping ``inputs`` to features (N, feature_dim); it may hold trainable parameters."""
        raise NotImplementedError

    def stats(self) -> dict:
        """JSON-able facts about preparing (texts encoded vs read from a cache, seconds), for results.json."""
        return {}
