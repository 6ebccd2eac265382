"""Error paths not covered elsewhere: each feeds the bad input and asserts the message."""

import datasets
import numpy as np
import pytest
import torch

from plrm import capabilities as cap
from plrm import runner
from plrm.backbones.precomputed import PrecomputedFeatures
from plrm.data.datamodule import PreferenceDataModule, PreparedData
from plrm.data.hooks import attach_references
from plrm.data.schema import DataValidationError
from plrm.data.source import FeatureTable, PreferenceData, item_keys
from plrm.data.splits import make_split
from plrm.errors import RecipeError
from plrm.methods.bt import GlobalBT
from plrm.methods.lore import LoRe
from plrm.methods.lore_alt import LoReAlt
from plrm.registry import Registry, RegistryError


def _pairs(**extra):
    columns = {"user_id": ["a", "b"], "prompt": ["x", "x"], "chosen": ["y1", "y2"], "rejected": ["y2", "y1"],
               "split": ["train", "test"], **extra}
    return datasets.Dataset.from_dict(columns)


def test_precomputed_backbone_without_features_says_what_to_do():
    data = PreferenceData("toy", _pairs(), provides=frozenset({cap.TEXT}))
    with pytest.raises(DataValidationError, match="backbone 'precomputed' needs features, but the dataset ships none"):
        PreparedData(data, PrecomputedFeatures(PrecomputedFeatures.Config()))


def test_items_missing_from_the_feature_table_are_named():
    """The table knows (x, y1) only: (x, y2) has no features; the message names a row and its user."""
    table = FeatureTable(item_keys(["x"], ["y1"]), np.ones((1, 2), dtype=np.float32))
    data = PreferenceData("toy", _pairs(), provides=frozenset({cap.TEXT}), features=table)
    with pytest.raises(DataValidationError, match=r"1 item\(s\) have no precomputed features, e.g. row 1 \(user 'b'\)"):
        PreparedData(data, PrecomputedFeatures(PrecomputedFeatures.Config()))


def test_feature_table_rejects_a_duplicated_item():
    keys = item_keys(["x", "x"], ["y1", "y1"])
    with pytest.raises(DataValidationError, match=r"the same \(prompt, response\) item twice"):
        FeatureTable(keys, np.zeros((2, 3), dtype=np.float32))


def test_pair_matrix_needs_pair_id():
    columns = {"user_id": ["a", "a", "b", "b"], "prompt": ["x"] * 4, "chosen": ["y1", "y2", "y1", "y2"],
               "rejected": ["y2", "y1", "y2", "y1"], "split": ["train", "test"] * 2,
               "chosen_emb": [[1.0], [2.0]] * 2, "rejected_emb": [[2.0], [1.0]] * 2}
    data = PreferenceData("toy", datasets.Dataset.from_dict(columns), provides=frozenset({cap.TEXT}))
    prepared = PreparedData(data, PrecomputedFeatures(PrecomputedFeatures.Config()))
    dm = PreferenceDataModule(prepared, make_split(data.pairs.data.table, 0, 0.0, 0.0, 0.0, need_support=0))
    with pytest.raises(ValueError, match="toy: a users x pairs matrix needs the 'pair_id' column"):
        dm.pair_matrix(np.arange(4))


def test_loading_a_checkpoint_of_another_method_is_refused():
    lore = LoRe(LoRe.Config(rank=2), n_users=3, feature_dim=4)
    bt_state = GlobalBT(GlobalBT.Config(), n_users=3, feature_dim=4).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint does not match LoRe: \['basis.weight', 'head_linear.weight'\]"):
        lore.load_shared_state(bt_state)


def test_lore_alt_reference_must_be_a_bt_checkpoint(tmp_path):
    path = tmp_path / "lore.ckpt"
    torch.save({"state_dict": LoRe(LoRe.Config(rank=2), 3, 4).state_dict()}, path)
    config = LoReAlt.Config(rank=2, reference_checkpoint=str(path), reference_weight=1.0)
    model = LoReAlt(config, n_users=3, feature_dim=4)
    with pytest.raises(RecipeError, match=r"lore.ckpt: not a `bt` checkpoint over 4-d features"):
        attach_references(model)  # what the runner does before training (plrm.data.hooks.MethodHooks)


def test_test_and_adapt_need_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a plrm run directory \(no recipe.yaml\)"):
        runner.test(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"is not a plrm run directory"):
        runner.adapt_new_users(tmp_path, tmp_path / "pairs.jsonl")


def test_builtin_names_cannot_be_registered_twice():
    from plrm.methods.base import PersonalizedRewardModel

    reg = Registry("method", "plrm.test-none", PersonalizedRewardModel)
    reg.register("dup")(LoRe)
    with pytest.raises(RegistryError, match="method 'dup' is already registered by plrm"):
        reg.register("dup")(GlobalBT)


def test_plugin_allowlist_names_that_match_nothing_are_reported(monkeypatch, capsys):
    from plrm.methods.base import PersonalizedRewardModel

    monkeypatch.setenv("PLRM_PLUGINS", "nosuchplugin")
    reg = Registry("method", "plrm.test-none", PersonalizedRewardModel)
    reg._entry_points_fn = lambda group: []
    reg.names()
    assert "PLRM_PLUGINS names 'nosuchplugin', but no installed method plugin has that name" in capsys.readouterr().err
