"""``optimizer: lbfgs``: full-batch L-BFGS for BT and LoRe over frozen features (the quasi-Newton schedule of
the performance work): it reaches a stationary point of the full-batch loss, refuses minibatches and weight
decay with messages that say what to change, and a run through the runner trains with it."""

import lightning as L
import pytest
import torch

from plrm import runner
from plrm.data.datamodule import PreferenceDataModule
from plrm.data.splits import TRAIN
from plrm.errors import PlrmError
from plrm.methods.bt import GlobalBT
from plrm.methods.lore import LoRe
from plrm.recipe import RecipeError, load_recipe


@pytest.fixture
def world(tiny_overrides):
    recipe = load_recipe("quickstart", tiny_overrides)
    prepared = runner.prepare(recipe)
    split = runner.seed_split(recipe, prepared, 0)
    return prepared, split


def _train(model, prepared, split, batch_size, epochs):
    dm = PreferenceDataModule(prepared, split, batch_size=batch_size, difference_cache=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return dm


def _full_batch_gradient_norm(model, dm) -> tuple[float, float]:
    (batch,) = list(dm.train_dataloader())
    model.zero_grad()
    loss = model.loss(batch) + model.regularization(batch)
    loss.backward()
    return float(loss.detach()), float(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm())


@pytest.mark.parametrize("cls", [LoRe, GlobalBT])
def test_lbfgs_reaches_a_stationary_point_of_the_full_batch_loss_where_adam_does_not(world, cls):
    prepared, split = world
    extra = {"rank": 3, "basis_l2": 0.01} if cls is LoRe else {}
    results = {}
    for optimizer, epochs in (("lbfgs", 4), ("adam", 4)):
        L.seed_everything(0, verbose=False)
        model = cls(cls.Config(optimizer=optimizer, batch_size=10**9, lr=0.05, **extra), n_users=len(split.user_ids),
                    feature_dim=prepared.backbone.feature_dim)
        dm = _train(model, prepared, split, 10**9, epochs)
        results[optimizer] = _full_batch_gradient_norm(model, dm)
    (lbfgs_loss, lbfgs_grad), (adam_loss, adam_grad) = results["lbfgs"], results["adam"]
    # 4 full-batch Adam steps barely move; 4 x 20 L-BFGS iterations end near a stationary point
    assert lbfgs_loss < adam_loss and lbfgs_grad < 1e-2 * adam_grad and lbfgs_grad < 1e-2


def test_lbfgs_refuses_minibatches_and_weight_decay_with_what_to_change(world, tmp_path):
    prepared, split = world
    model = LoRe(LoRe.Config(optimizer="lbfgs", batch_size=64, rank=3), n_users=len(split.user_ids),
                 feature_dim=prepared.backbone.feature_dim)
    n_train = len(split.rows(TRAIN))
    assert model.training_batch_size(n_train) == n_train  # what plrm fit batches: batch_size does not apply
    # a datamodule built by hand with minibatches is refused
    with pytest.raises(PlrmError, match=r"LoRe: optimizer: lbfgs needs the full batch at every step, but the "
                                        r"datamodule makes \d+ batches per epoch; give it a batch_size of at least "
                                        r"the number of train pairs"):
        _train(model, prepared, split, 64, 1)
    with pytest.raises(RecipeError, match="optimizer: lbfgs has no decoupled weight decay; set weight_decay: 0"):
        load_recipe("quickstart", ["methods.lore.optimizer=lbfgs", "methods.lore.weight_decay=0.01"])


def test_a_run_trains_lore_with_lbfgs(tiny_overrides):
    # the recipe's minibatch batch_size (64) stays: under lbfgs every step is the full batch
    result = runner.fit("quickstart", tiny_overrides + ["methods.lore.optimizer=lbfgs", "~methods.bt",
                                                        "methods.lore.batch_size=64"], show=False)
    lore = result.per_seed[0]["lore"]
    assert lore["seen"]["accuracy"] > 0.85 and lore["unseen"]["accuracy"] > 0.8
