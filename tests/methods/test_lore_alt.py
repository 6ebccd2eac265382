"""LoRe-Alt (Rezk et al., arXiv 2512.23067, app. E.3): alternating user / basis steps; the reference-RM penalty."""

import numpy as np
import torch

from plrm import runner
from plrm.checkpoint import load_checkpoint
from plrm.methods.lore_alt import LoReAlt
from plrm.recipe import build_section


def test_config_requires_a_reference_for_the_penalty():
    problems: list[str] = []
    assert build_section(LoReAlt.Config, {"reference_weight": 1.0}, "methods.la", problems) is not None
    assert problems == ["methods.la.reference_weight: > 0 needs reference_checkpoint (the `bt` checkpoint of the "
                        "reference reward)"]
    problems = []
    build_section(LoReAlt.Config, {"reference_weight": 1.0, "reference_checkpoint": "bt.ckpt"}, "m", problems)
    build_section(LoReAlt.Config, {"reference_weight": 0.0}, "m", problems)
    assert problems == []


def test_alternating_training_learns_and_beats_the_global_model(tmp_path, tiny_overrides):
    result = runner.fit("quickstart", tiny_overrides + [
        "methods.bt.max_epochs=10", "+methods.lore_alt={}", "methods.lore_alt.rank=3",
        "methods.lore_alt.lr=0.05", "methods.lore_alt.max_epochs=10", "~methods.lore"], show=False)
    res = result.per_seed[0]
    assert res["lore_alt"]["seen"]["accuracy"] > res["bt"]["seen"]["accuracy"] + 0.03
    assert res["lore_alt"]["unseen"]["accuracy"] > res["bt"]["unseen"]["accuracy"] + 0.03


def test_reference_penalty_pulls_rewards_to_the_reference(tmp_path, tiny_overrides):
    """With a large reference_weight, every user's reward tracks the `bt` reference reward."""
    bt_run = runner.fit("quickstart", tiny_overrides + ["~methods.lore", "methods.bt.max_epochs=5",
                                                        "run.name=ref"], show=False)
    ref = bt_run.run_dir / "seed-0" / "bt.ckpt"
    common = tiny_overrides + ["~methods.bt", "~methods.lore", "+methods.lore_alt={}", "methods.lore_alt.rank=3",
                               "methods.lore_alt.max_epochs=5", "methods.lore_alt.lr=0.05"]
    free = runner.fit("quickstart", common + ["run.name=free"], show=False)
    tied = runner.fit("quickstart", common + ["run.name=tied", f"methods.lore_alt.reference_checkpoint={ref}",
                                              "methods.lore_alt.reference_weight=10.0"], show=False)
    v = load_checkpoint(ref)["state_dict"]["head_linear.weight"][0].numpy()

    def alignment(run):
        state = load_checkpoint(run.run_dir / "seed-0" / "lore_alt.ckpt")["state_dict"]
        w = torch.softmax(state["user_logits"], -1).numpy()        # (U, B)
        directions = w @ state["basis.weight"].numpy()              # (U, D): each user's reward direction
        cos = directions @ v / (np.linalg.norm(directions, axis=1) * np.linalg.norm(v))
        return float(cos.mean())

    assert alignment(tied) > 0.9
    assert alignment(tied) > alignment(free) + 0.1


def test_each_alternating_step_leaves_the_other_block_bit_identical(tiny_overrides):
    """The user step moves only the user weights, the basis step only the basis: every optimizer step is watched,
    and the block it does not own is bit-identical before and after it (weight decay on, so a stray parameter in
    the wrong group would move)."""
    import lightning as L

    from plrm.data.datamodule import PreferenceDataModule
    from plrm.data.splits import make_split
    from plrm.recipe import load_recipe

    recipe = load_recipe("quickstart", tiny_overrides)
    prepared = runner.prepare(recipe)
    split = make_split(prepared.data.pairs.data.table, 0, unseen_fraction=0.5, test_fraction=0.5, val_fraction=0.0,
                       need_support=3, source=recipe.data.name)
    torch.manual_seed(0)
    model = LoReAlt(LoReAlt.Config(rank=3, lr=0.05, weight_decay=0.1, max_steps=4, batch_size=64),
                    n_users=len(split.user_ids), feature_dim=prepared.backbone.feature_dim)
    steps = []

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            for name, opt in zip(("user", "basis"), trainer.optimizers):
                step = opt.step

                def watched(*args, _step=step, _name=name, **kwargs):
                    before = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
                    out = _step(*args, **kwargs)
                    after = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
                    steps.append((_name, before, after))
                    return out
                opt.step = watched

    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Watch()])
    trainer.fit(model, datamodule=PreferenceDataModule(prepared, split, batch_size=64))
    # Lightning counts every manual optimizer step: max_steps=4 is two batches of a user then a basis step
    assert [name for name, *_ in steps] == ["user", "basis"] * 2
    # each optimizer holds exactly its own block: AdamW skips a parameter without a gradient (weight decay
    # included), so bit-identity alone could pass with both blocks in both optimizers
    user_opt, basis_opt = trainer.optimizers
    held = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in (user_opt, basis_opt)]
    assert held[0] == {id(model.user_logits)}
    assert id(model.user_logits) not in held[1] and id(model.basis.weight) in held[1]
    for name, before, after in steps:
        moved, fixed = ("user_logits", "basis.weight") if name == "user" else ("basis.weight", "user_logits")
        assert torch.equal(before[fixed], after[fixed]), f"the {name} step changed {fixed}"
        assert not torch.equal(before[moved], after[moved]), f"the {name} step did not change {moved}"
