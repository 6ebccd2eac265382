"""LoRe-Alt (papers/001 app. E.3): alternating user / basis steps; the reference-RM penalty."""

import numpy as np
import torch

from plrm import runner
from plrm.checkpoint import load_checkpoint
from plrm.methods.lore_alt import LoReAlt


def test_config_requires_a_reference_for_the_penalty():
    import pytest

    with pytest.raises(ValueError, match="reference_weight > 0 needs reference_checkpoint"):
        LoReAlt.Config(reference_weight=1.0)


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
