"""The difference table (``difference_cache``): training batches of e+ - e- rows built once per run give the
same loss and gradients as the ordinary batches, and a batch of every train pair is the table itself."""

import pytest
import torch

from plrm import registry, runner
from plrm.data import datamodule
from plrm.data.datamodule import PreferenceDataModule
from plrm.data.splits import TRAIN
from plrm.methods.bt import GlobalBT as BT
from plrm.methods.individual import IndividualRM as Individual
from plrm.recipe import load_recipe


@pytest.fixture
def world(tiny_overrides):
    recipe = load_recipe("quickstart", tiny_overrides)
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    return recipe, prepared, split


def _batches(prepared, split, batch_size, cache):
    dm = PreferenceDataModule(prepared, split, batch_size=batch_size, seed=3, difference_cache=cache)
    return dm, list(dm.train_dataloader())


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model.loss(batch) + model.regularization(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ["lore", "bt", "individual", "pref", "further_ft"])
def test_minibatches_of_the_table_are_the_same_pairs_with_the_same_loss_and_gradients(world, name):
    _, prepared, split = world
    cls = registry.methods.get(name)
    torch.manual_seed(0)
    model = cls(cls.Config(), n_users=len(split.user_ids), feature_dim=prepared.backbone.feature_dim)
    with torch.no_grad():  # away from zero-initialised heads, so that every gradient is non-trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert model.trains_on_differences
    _, plain = _batches(prepared, split, 64, cache=False)
    _, cached = _batches(prepared, split, 64, cache=True)
    assert len(plain) == len(cached) > 1
    for a, b in zip(plain, cached):
        assert torch.equal(a["row"], b["row"]) and torch.equal(a["user_idx"], b["user_idx"])
        assert "chosen" not in b and "rejected" not in b
        torch.testing.assert_close(b["difference"], a["chosen"] - a["rejected"], rtol=0, atol=0)
        loss_a, grads_a = _loss_and_grads(model, a)
        loss_b, grads_b = _loss_and_grads(model, b)
        torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def test_the_full_batch_is_the_table_itself_with_the_loss_of_the_shuffled_batch(world):
    recipe, prepared, split = world
    model = runner.build_model(recipe, "lore", prepared, len(split.user_ids))
    n = len(split.rows(TRAIN))
    _, (plain,) = _batches(prepared, split, 10**9, cache=False)
    dm, (cached,) = _batches(prepared, split, 10**9, cache=True)
    table = dm._difference_rows.table
    assert cached["difference"].data_ptr() == table.data_ptr() and table.shape == (n, prepared.backbone.feature_dim)
    assert torch.equal(cached["row"].sort().values, plain["row"].sort().values)  # the same pairs, table order
    loss_a, grads_a = _loss_and_grads(model, plain)
    loss_b, grads_b = _loss_and_grads(model, cached)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)  # only the order of the sum differs
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
    assert len(dm.train_dataloader()) == 1 and dm._difference_rows.table is table  # built once per run


def test_which_methods_and_settings_use_the_table():
    bt = BT(BT.Config(batch_size=100), n_users=3, feature_dim=4)
    assert bt.uses_difference_cache(n_train_pairs=100, n_items=10)      # the batch is every pair
    assert bt.uses_difference_cache(n_train_pairs=1000, n_items=1000)   # the table no larger than the features
    assert not bt.uses_difference_cache(n_train_pairs=1000, n_items=999)
    on = BT(BT.Config(batch_size=100, difference_cache="always"), n_users=3, feature_dim=4)
    assert on.uses_difference_cache(n_train_pairs=1000, n_items=10)
    off = BT(BT.Config(batch_size=10**9, difference_cache="never"), n_users=3, feature_dim=4)
    assert not off.uses_difference_cache(n_train_pairs=100, n_items=10)
    mlp = Individual(Individual.Config(hidden=4), n_users=3, feature_dim=4)  # not linear in the features
    assert not mlp.uses_difference_cache(n_train_pairs=100, n_items=10)
    trainable = BT(BT.Config(batch_size=10**9), n_users=3, feature_dim=4, encoder=torch.nn.Linear(4, 4))
    assert not trainable.uses_difference_cache(n_train_pairs=100, n_items=10)  # an encoder to train


def test_a_run_trains_the_same_model_from_the_table(tiny_overrides, monkeypatch):
    built = []
    init = datamodule._DifferenceRows.__init__
    monkeypatch.setattr(datamodule._DifferenceRows, "__init__", lambda self, *a: built.append(1) or init(self, *a))
    common = tiny_overrides + ["methods.lore.batch_size=64", "methods.bt.difference_cache=never"]
    off = runner.fit("quickstart", common + ["methods.lore.difference_cache=never", "run.name=never"], show=False)
    assert not built
    on = runner.fit("quickstart", common + ["methods.lore.difference_cache=always", "run.name=always"], show=False)
    assert built == [1]  # lore's, for the one split seed
    assert on.per_seed[0]["lore"]["unseen"] == off.per_seed[0]["lore"]["unseen"]
    assert on.per_seed[0]["lore"]["seen"] == off.per_seed[0]["lore"]["seen"]


def test_bf16_mixed_runs_store_the_table_in_bf16_and_train_to_the_fp32_accuracy(tiny_overrides, monkeypatch):
    tables = []
    init = datamodule._DifferenceRows.__init__
    monkeypatch.setattr(datamodule._DifferenceRows, "__init__", lambda self, *a: init(self, *a) or tables.append(self))
    common = tiny_overrides + ["methods.lore.difference_cache=always", "methods.bt.difference_cache=never"]
    fp32 = runner.fit("quickstart", common + ["run.name=fp32"], show=False)
    bf16 = runner.fit("quickstart", common + ["run.name=bf16", "trainer.precision=bf16-mixed"], show=False)
    assert [t.table.dtype for t in tables] == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(tables[1].table, tables[0].table.bfloat16(), rtol=0, atol=0)  # rounded once
    for group in ("seen", "unseen"):
        assert bf16.per_seed[0]["lore"][group]["accuracy"] == pytest.approx(
            fp32.per_seed[0]["lore"][group]["accuracy"], abs=0.02)
