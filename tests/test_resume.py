"""``plrm fit --resume``: a run stopped during training continues to the results of an uninterrupted run.

In-process, a stop is a failure raised inside ``trainer.fit`` after a given number of training batches of one
(seed, method) unit; the run is then resumed with the same recipe. A real SIGKILL of a ``plrm fit`` process is in
tests/test_resume_kill.py (slow)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from plrm import runner
from plrm.checkpoint import load_checkpoint
from plrm.errors import RecipeError
from plrm.resume import ResumePoints
from plrm.rundir import MARKER, read_marker

WORLD = ["data.n_users=60", "data.pairs_per_user=20", "data.n_train_prompts=200", "data.n_test_prompts=30",
         "data.test_prompts_per_user=10", "data.feature_dim=16", "data.n_functions=3", "data.alpha=0.05",
         "eval.k_list=[1,3]", "split.k=3", "logger.kind=none", "trainer.progress_bar=false",
         "run.checkpoint_interval=0"]


class Stop(Exception):
    pass


def stop_after(monkeypatch, label: str, seed: int, batches: int) -> None:
    """Make the training of (seed, label) fail once ``batches`` training batches are done."""
    original = ResumePoints.on_train_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        if self.path.name == f"{label}.last.ckpt" and self.path.parent.name == f"seed-{seed}" \
                and trainer.fit_loop.total_batch_idx + 1 == batches:
            raise Stop(f"stopped after {batches} batches")

    monkeypatch.setattr(ResumePoints, "on_train_batch_end", on_train_batch_end)


def comparable(result: runner.RunResult) -> dict:
    """Per-seed metrics without wall times."""
    def strip(m):
        if isinstance(m, dict):
            return {k: strip(v) for k, v in m.items() if not str(k).endswith("_seconds")}
        if isinstance(m, list):
            return [strip(v) for v in m]
        return m
    return strip(result.per_seed)


def assert_same_run(a: runner.RunResult, b: runner.RunResult, labels: list[str], seeds: list[int]) -> None:
    assert comparable(a) == comparable(b)
    pd.testing.assert_frame_equal(a.per_user.reset_index(drop=True), b.per_user.reset_index(drop=True))
    for seed in seeds:
        for label in labels:
            sa = load_checkpoint(a.run_dir / f"seed-{seed}" / f"{label}.ckpt")["state_dict"]
            sb = load_checkpoint(b.run_dir / f"seed-{seed}" / f"{label}.ckpt")["state_dict"]
            assert sa.keys() == sb.keys()
            for key in sa:
                assert torch.equal(sa[key], sb[key]), f"seed {seed} {label}: {key} differs"


CASES = [
    # (recipe, overrides, (label, seed, batches to stop after, whether its last checkpoint is mid-epoch))
    pytest.param("quickstart", ["methods.bt.max_epochs=3", "methods.bt.batch_size=64", "methods.lore.max_epochs=3",
                                "methods.lore.rank=3", "methods.lore.batch_size=100", "run.checkpoint_every_n_steps=2"],
                 ("lore", 0, 5, True), id="automatic-optimization-mid-epoch"),
    pytest.param("quickstart", ["methods.bt.max_epochs=4", "methods.lore.max_epochs=4", "methods.lore.rank=3",
                                "run.checkpoint_every_n_steps=0"],
                 ("bt", 0, 3, False), id="full-batch-epoch-ends"),
    pytest.param("quickstart", ["~methods.bt", "methods.lore.max_epochs=3", "methods.lore.rank=3",
                                "+methods.alt.name=lore_alt", "+methods.alt.max_epochs=3", "+methods.alt.rank=3",
                                "+methods.alt.batch_size=100", "run.checkpoint_every_n_steps=1"],
                 ("alt", 0, 5, True), id="manual-optimization-lore-alt"),
    pytest.param("quickstart", ["methods.bt.max_epochs=2", "methods.lore.max_epochs=3", "methods.lore.rank=3",
                                "methods.lore.batch_size=100", "split.seeds=[0,1]", "run.checkpoint_every_n_steps=2"],
                 ("lore", 1, 5, True), id="second-seed"),
]


@pytest.mark.parametrize("recipe, overrides, stop", CASES)
def test_a_stopped_run_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch, recipe, overrides, stop):
    base = WORLD + overrides + [f"run.output_dir={tmp_path}"]
    whole = runner.fit(recipe, base + ["run.name=whole"], show=False)

    label, seed, batches, mid_epoch = stop
    with monkeypatch.context() as mp:
        stop_after(mp, label, seed, batches)
        with pytest.raises(Stop):
            runner.fit(recipe, base + ["run.name=cut"], show=False)
    cut = tmp_path / "cut"
    assert read_marker(cut)["status"] == "running"
    last = torch.load(cut / f"seed-{seed}" / f"{label}.last.ckpt", weights_only=True)
    (loader,) = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the DataLoader's place in its epoch
    assert (loader["batches"] > 0) == mid_epoch
    assert not (cut / "results.json").exists()
    with pytest.raises(RecipeError, match="an incomplete run .* Resume it by running the same command with --resume"):
        runner.fit(recipe, base + ["run.name=cut"], show=False)

    resumed = runner.fit(recipe, base + ["run.name=cut"], show=False, resume=True)
    assert_same_run(whole, resumed, [lbl for lbl in resumed.per_seed[seed] if not lbl.startswith("oracle")],
                    sorted(resumed.per_seed))
    assert read_marker(cut)["status"] == "complete"
    assert not list(cut.glob("seed-*/*.last.ckpt"))  # finished units keep no training checkpoint


def test_resume_refuses_another_recipe(tmp_path, monkeypatch):
    base = WORLD + ["methods.bt.max_epochs=2", "methods.lore.max_epochs=2", "methods.lore.rank=3",
                    f"run.output_dir={tmp_path}", "run.name=r"]
    with monkeypatch.context() as mp:
        stop_after(mp, "lore", 0, 1)
        with pytest.raises(Stop):
            runner.fit("quickstart", base, show=False)
    with pytest.raises(RecipeError, match=r"cannot resume .*differs from the one it was started with at "
                                          r"methods.lore.rank"):
        runner.fit("quickstart", base + ["methods.lore.rank=4"], show=False, resume=True)
    marker = json.loads((tmp_path / "r" / MARKER).read_text())
    assert marker["status"] == "running"


EVERY_METHOD = ["data.n_users=60", "data.pairs_per_user=12", "data.n_train_prompts=300", "data.n_test_prompts=30",
                "data.test_prompts_per_user=10", "data.feature_dim=16", "data.n_functions=3", "data.alpha=0.05",
                "data.labels=bradley_terry", "eval.k_list=[1,3]", "split.k=3", "logger.kind=none",
                "trainer.progress_bar=false", "run.checkpoint_interval=0", "run.checkpoint_every_n_steps=2"]


def method_names() -> list[str]:
    """Every registered method (built-ins and installed plugins)."""
    from plrm import registry

    registry.ensure_builtins()
    return sorted(name for name, _ in registry.methods.items())


def _text_backbone(method: str) -> str | None:
    """The backbone a method that reads text needs: causal_lm (log-probabilities), transformer (every token's
    hidden state), or None (frozen features)."""
    from plrm import capabilities as cap
    from plrm import registry

    needs = registry.methods.get(method).needs
    return "causal_lm" if cap.LM in needs else "transformer" if cap.TOKEN_STATES in needs else None


def _feature_options(method: str) -> dict:
    """Four epochs of several steps each: 64-pair batches, or 8 users per meta-batch for episodic methods."""
    from plrm import registry

    fields = {f.name for f in dataclasses.fields(registry.methods.get(method).Config)}
    wanted = {"max_epochs": 4, "batch_size": 64, "meta_batch_size": 8}
    return {k: v for k, v in wanted.items() if k in fields}


def _frozen_judge(method: str) -> bool:
    from plrm import registry

    return registry.methods.get(method).pairwise_only


def _text_options(method: str) -> dict:
    """Two short epochs; a method that trains nothing (the RAG judge: one epoch, no optimizer step) gets small
    batches instead, so it is still interrupted mid-epoch."""
    from plrm import registry

    cls = registry.methods.get(method)
    if cls.pairwise_only:
        return {"batch_size": 8}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    return {k: v for k, v in {"max_epochs": 2, "batch_size": 24, "adapt_steps": 2}.items() if k in fields}


@pytest.mark.parametrize("method", method_names())
def test_every_method_resumes_to_the_uninterrupted_results(tmp_path, monkeypatch, method, length_pairs, text_recipe):
    """Each method (its own optimizers, schedulers, episodes drawn from the global RNG, data hooks) stopped
    mid-training and resumed ends with an uninterrupted run's weights and metrics. Methods on frozen features
    train on the low-rank world; methods that read text (P-DPO, GenARM, the RAG judge on a causal LM; Conditional
    RM and Global RM-v2 on a transformer) on text pairs with a tiny random Qwen2 + LoRA."""
    backbone_name = _text_backbone(method)
    if backbone_name:
        backbone = {"name": backbone_name, "model": "tiny-random:qwen2", "lora_dropout": 0.0, "dtype": "float32"}
        if _frozen_judge(method):
            backbone["finetune"] = "frozen"  # a judge trains nothing and refuses trainable weights
        recipe = text_recipe(tmp_path, length_pairs, backbone, {method: _text_options(method)})
        base = ["logger.kind=none", "trainer.progress_bar=false", "run.checkpoint_interval=0",
                "run.checkpoint_every_n_steps=2", f"run.output_dir={tmp_path}"]
    else:
        recipe = {"extends": "quickstart", "methods": {method: {"name": method, **_feature_options(method)}}}
        base = EVERY_METHOD + [f"run.output_dir={tmp_path}", "~methods.bt", "~methods.lore"]
    if method in ("bt", "lore"):
        base = [o for o in base if o != f"~methods.{method}"]
    whole = runner.fit(recipe, base + ["run.name=whole"], show=False)
    with monkeypatch.context() as mp:
        stop_after(mp, method, 0, 5)
        with pytest.raises(Stop):
            runner.fit(recipe, base + ["run.name=cut"], show=False)
    resumed = runner.fit(recipe, base + ["run.name=cut"], show=False, resume=True)
    assert_same_run(whole, resumed, [method], [0])
