"""Frozen features shipped with the dataset (a feature table or chosen_emb/rejected_emb columns)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plrm import capabilities as cap
from plrm.backbones.base import Backbone
from plrm.config import opt
from plrm.errors import DataValidationError
from plrm.items import ItemIndex
from plrm.registry import backbones


@backbones.register("precomputed")
class PrecomputedFeatures(Backbone):
    """Features the dataset provides, one vector per unique (prompt, response); nothing is trained."""

    needs = frozenset({cap.FEATURES})
    provides = frozenset({cap.FEATURES})

    @dataclass
    class Config:
        standardize: bool = opt(False, "Scale features to zero mean and unit variance per dimension "
                                       "(statistics over all items of the dataset).")

    def prepare(self, data, items: ItemIndex) -> None:
        if data.features is None:
            raise DataValidationError(
                f"{data.name}: backbone 'precomputed' needs features, but the dataset ships none "
                "(no feature table and no chosen_emb/rejected_emb columns); pick an encoder backbone instead")
        rows = data.features.rows_of(items.keys)
        missing = (rows < 0).nonzero()[0]
        if len(missing):
            r = int(items.first_row[missing[0]])
            pairs = data.pairs.select([r])[0]
            raise DataValidationError(
                f"{data.name}: {len(missing)} item(s) have no precomputed features, e.g. row {r} "
                f"(user {pairs['user_id']!r}), prompt {pairs['prompt'][:60]!r}")
        matrix = torch.from_numpy(data.features.matrix)
        same_order = len(rows) == len(matrix) and bool((rows == torch.arange(len(rows)).numpy()).all())
        self._features = matrix if same_order else matrix[torch.from_numpy(rows)]  # (I, D)
        if self.config.standardize:
            mean, std = self._features.mean(0), self._features.std(0).clamp_min(1e-6)
            self._features = (self._features - mean) / std

    @property
    def feature_dim(self) -> int:
        return int(self._features.shape[1])

    def inputs(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self._features[item_ids]  # (N, D)

    def encoder(self) -> nn.Module:
        return nn.Identity()
