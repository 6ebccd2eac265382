"""fit / test / adapt through the Python API: the run directory, exact reproduction, errors."""

import json

import pandas as pd
import pytest
import torch

from plrm import runner
from plrm.data.schema import DataValidationError
from plrm.methods.base import MethodConfig, PersonalizedRewardModel
from plrm.recipe import RecipeError, load_recipe, read_recipe
from tests.conftest import export_support


@pytest.fixture
def finished_run(tmp_path, tiny_overrides):
    return runner.fit("quickstart", tiny_overrides, show=False)


def test_fit_writes_the_run_directory(finished_run):
    run_dir = finished_run.run_dir
    for name in ("recipe.yaml", "results.json", "per_user.parquet", "seed-0/split.parquet",
                 "seed-0/bt.ckpt", "seed-0/lore.ckpt"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["per_seed"]["0"]) == {"bt", "lore", "oracle/personal", "oracle/non-personalized"}
    assert results["versions"]["plrm"] and results["plugins"] == []
    lore = results["per_seed"]["0"]["lore"]
    assert [row["k"] for row in lore["fewshot"]] == [1, 3]
    assert lore["unseen"]["accuracy"] == lore["fewshot"][1]["accuracy"]  # headline k = split.k = 3
    per_user = pd.read_parquet(run_dir / "per_user.parquet")
    assert set(per_user["group"]) == {"seen", "unseen"}
    # one row per user and entry: 80 users x (2 methods + 2 oracles)
    assert len(per_user) == 80 * 4
    # overall = mean over all users of per-user accuracy (each user counts once)
    lore_users = per_user[per_user.method == "lore"]
    assert lore["overall"]["accuracy"] == pytest.approx(lore_users["accuracy"].mean())


def test_test_and_adapt_reproduce_fit_exactly(finished_run):
    fitted = finished_run.per_seed[0]
    tested = runner.test(finished_run.run_dir, show=False).per_seed[0]
    for entry in fitted:
        for group in ("seen", "unseen", "overall"):
            assert tested[entry][group] == fitted[entry][group], (entry, group)
    adapted = runner.adapt(finished_run.run_dir, show=False).per_seed[0]
    assert adapted["lore"]["unseen"] == fitted["lore"]["unseen"]
    assert (finished_run.run_dir / "seed-0" / "lore.adapted-k3.ckpt").is_file()
    k1 = runner.adapt(finished_run.run_dir, k=1, show=False).per_seed[0]
    assert k1["lore"]["unseen"]["accuracy"] == fitted["lore"]["fewshot"][0]["accuracy"]


def test_run_reads_a_finished_run(finished_run):
    """Run.open: recipe, seeds, methods, results.json, the stored split, and each method's trained state, which
    evaluates on the seed's pairs to the numbers fit reported."""
    from plrm.eval.protocol import evaluate

    run = runner.Run.open(finished_run.run_dir)
    assert run.seeds == [0] and run.methods == ["bt", "lore"]
    assert run.results["per_seed"]["0"]["lore"]["unseen"] == finished_run.per_seed[0]["lore"]["unseen"]
    user_ids, unseen = runner.Run.open(run.dir).users(0)  # from split.parquet alone, no dataset loaded
    split = run.split(0)
    stored = pd.read_parquet(run.dir / "seed-0" / "split.parquet")
    assert list(split.user_ids[split.row_user]) == list(stored.user_id)
    assert list(user_ids) == list(split.user_ids) and list(unseen) == list(split.unseen)
    model = run.load_method("lore", 0)
    r = run.recipe
    ev = evaluate(model, run.datamodule(0), r.split.k, r.eval.k_list, r.eval.worst_fractions, r.eval.batch_size)
    for group in ("seen", "unseen"):
        assert ev.metrics[group] == finished_run.per_seed[0]["lore"][group], group


def test_run_errors_name_what_is_missing(finished_run, tmp_path):
    run = runner.Run.open(finished_run.run_dir)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*seed-0/lore.adapted-k9.ckpt does not exist; "
                                                r".*seed-0 has: bt.ckpt, lore.ckpt"):
        run.load_method("lore", 0, "lore.adapted-k9.ckpt")
    with pytest.raises(RecipeError, match="no method labelled 'mrm' in .*; its methods: bt, lore"):
        run.load_method("mrm", 0)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((run.dir / "recipe.yaml").read_text())
    with pytest.raises(FileNotFoundError, match=r"unfinished has no results.json: its `plrm fit` has not finished"):
        runner.Run.open(unfinished).results


class ManualStep(PersonalizedRewardModel):
    """A method that optimizes manually (backward passes inside its training step, as alternating updates do)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False


class ClippingManualStep(ManualStep):
    clips_gradients = True  # clips inside its own step with self.gradient_clip_val


def test_gradient_clipping_goes_where_it_is_applied_or_is_refused(tiny_overrides):
    """trainer.gradient_clip_val: Lightning clips an automatic-optimization method; a manual-optimization method
    that clips itself gets the value; any other manual-optimization method refuses it (never silently unclipped)."""
    recipe = load_recipe("quickstart", tiny_overrides + ["trainer.gradient_clip_val=0.5"])
    tiny = dict(config=MethodConfig(), n_users=2, feature_dim=4)
    with pytest.raises(RecipeError, match=r"trainer.gradient_clip_val=0.5: methods.manual \(ManualStep\) optimizes "
                                          r"manually .* does not clip its own gradients \(clips_gradients\); set "
                                          r"trainer.gradient_clip_val=null"):
        runner.make_trainer(recipe, "manual", ManualStep(**tiny), dm=None)
    clipping = ClippingManualStep(**tiny)
    assert runner.make_trainer(recipe, "clipping", clipping, dm=None).gradient_clip_val is None
    assert clipping.gradient_clip_val == 0.5
    assert runner.make_trainer(recipe, "automatic", PersonalizedRewardModel(**tiny), dm=None).gradient_clip_val == 0.5
    unclipped = load_recipe("quickstart", tiny_overrides)
    assert runner.make_trainer(unclipped, "manual", ManualStep(**tiny), dm=None).gradient_clip_val is None


def test_adapt_rejects_k_beyond_the_support_pool(finished_run):
    with pytest.raises(RecipeError, match=r"k=99: the unseen users of .* have at most 20 support pairs"):
        runner.adapt(finished_run.run_dir, k=99, show=False)


def test_existing_run_directory_is_not_overwritten(finished_run, tiny_overrides):
    with pytest.raises(RecipeError, match="already exists: a finished run. Choose another run.name"):
        runner.fit("quickstart", tiny_overrides, show=False)
    again = runner.fit("quickstart", tiny_overrides + ["run.overwrite=true"], show=False)
    assert again.per_seed[0]["lore"]["seen"] == finished_run.per_seed[0]["lore"]["seen"]  # seeded


def test_several_split_seeds_give_mean_and_std(tmp_path, tiny_overrides):
    result = runner.fit("quickstart", tiny_overrides + ["split.seeds=[0,1]", "~methods.lore"], show=False)
    stat = result.summary["bt"]["seen"]["accuracy"]
    values = [result.per_seed[s]["bt"]["seen"]["accuracy"] for s in (0, 1)]
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(sum(values) / 2)
    assert stat["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)  # ddof=1 for two values
    assert (result.run_dir / "seed-1" / "split.parquet").is_file()


def test_split_from_file_reproduces_the_split(finished_run, tiny_overrides, tmp_path):
    stored = finished_run.run_dir / "seed-0" / "split.parquet"
    again = runner.fit("quickstart", tiny_overrides + ["run.name=reuse", f"split.from_file={stored}",
                                                       "split.seeds=[7]"], show=False)
    a = pd.read_parquet(stored)
    b = pd.read_parquet(again.run_dir / "seed-7" / "split.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_unmet_needs_name_method_and_dataset(tmp_path, tiny_overrides, monkeypatch):
    from plrm.methods.bt import GlobalBT

    monkeypatch.setattr(GlobalBT, "needs", frozenset({"lm"}))
    recipe = load_recipe("quickstart", tiny_overrides)
    with pytest.raises(RecipeError, match=r"methods.bt: method 'bt' needs a causal language model backbone .*\('lm'\), "
                                          r"which dataset 'lowrank_world' with backbone 'precomputed' does not provide"):
        runner.fit(recipe, show=False)


def test_backbone_without_its_input_is_refused_before_training(tmp_path, tiny_overrides):
    from plrm.recipe import read_recipe

    raw = read_recipe("quickstart")
    raw["data"] = {"name": "attribute_world", "n_users": 20}
    overrides = [o for o in tiny_overrides if not o.startswith("data.")]
    with pytest.raises(RecipeError, match=r"methods.bt: backbone 'precomputed' needs a feature vector per "
                                          r"\(prompt, response\) \('features'\), which dataset 'attribute_world' "
                                          "does not provide"):
        runner.fit(load_recipe(raw, overrides), show=False)


@pytest.mark.parametrize("kind, pattern", [("csv", "csv/seed-0/bt/metrics.csv"),
                                           ("tensorboard", "tensorboard/seed-0/bt/events.out.tfevents.*")])
def test_local_loggers_write_training_curves(tmp_path, tiny_overrides, kind, pattern):
    overrides = [o for o in tiny_overrides if not o.startswith("logger.")] + [f"logger.kind={kind}", "~methods.lore", "trainer.log_every_n_steps=1"]
    result = runner.fit("quickstart", overrides, show=False)
    files = list(result.run_dir.glob(pattern))
    assert files, sorted(str(p.relative_to(result.run_dir)) for p in result.run_dir.rglob("*"))
    if kind == "csv":
        metrics = pd.read_csv(files[0])
        assert "train/loss" in metrics.columns and "eval/bt/unseen/accuracy" in metrics.columns


def test_validation_split_is_evaluated_during_training(tmp_path, tiny_overrides):
    overrides = [o for o in tiny_overrides if not o.startswith("logger.")] + [
        "logger.kind=csv", "split.val_fraction=0.2", "~methods.bt"]
    result = runner.fit("quickstart", overrides, show=False)
    metrics = pd.read_csv(next(result.run_dir.glob("csv/seed-0/lore/metrics.csv")))
    assert metrics["val/accuracy"].notna().sum() == 3  # one validation pass per epoch (max_epochs=3)


def test_adapt_new_users_from_a_pairs_file_equals_adapting_them_in_the_run(finished_run, tmp_path):
    """Users fitted from a file they are alone in get the same state as the same users fitted from the same
    pairs inside the run (adapt touches only their rows and reads only shared weights)."""
    path = tmp_path / "newcomers.jsonl"
    unseen = export_support(finished_run.run_dir, 3, path)
    out = runner.adapt_new_users(finished_run.run_dir, path, show=False)
    assert out["n_users"] == len(unseen) == 40
    saved = torch.load(finished_run.run_dir / "seed-0" / "lore.users-newcomers.ckpt", weights_only=True)
    assert saved["user_ids"] == [f"new-{u}" for u in unseen]
    assert saved["state_dict"]["user_logits"].shape == (40, 3)
    assert out["per_seed"]["0"]["bt"]["checkpoint"] is None  # one model for everyone: no per-user state
    runner.adapt(finished_run.run_dir, k=3, show=False)
    in_run = torch.load(finished_run.run_dir / "seed-0" / "lore.adapted-k3.ckpt", weights_only=True)
    user_ids = pd.read_parquet(finished_run.run_dir / "seed-0" / "split.parquet").user_id.unique()
    index = [sorted(user_ids).index(u) for u in unseen]
    torch.testing.assert_close(saved["state_dict"]["user_logits"], in_run["state_dict"]["user_logits"][index],
                               rtol=1e-5, atol=1e-6)
    # each new user's weights order most of their own 3 pairs (bt, one reward for all, orders fewer)
    assert out["per_seed"]["0"]["lore"]["support_accuracy"] > out["per_seed"]["0"]["bt"]["support_accuracy"]


def test_cli_adapt_pairs_rejects_k(finished_run, tmp_path, capsys):
    from plrm.cli import main

    path = tmp_path / "p.jsonl"
    export_support(finished_run.run_dir, 1, path, rename=str)
    assert main(["adapt", "--run", str(finished_run.run_dir), "--pairs", str(path), "--k", "2"]) == 2
    assert "with --pairs every pair in the file is used" in capsys.readouterr().err


def test_bad_data_leaves_an_existing_run_untouched(finished_run, tiny_overrides, tmp_path):
    """overwrite=true with a dataset that fails validation: the old run stays whole, nothing new is written."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u0", "prompt": "p", "chosen": "same", "rejected": "same"}\n')
    before = sorted(p.name for p in finished_run.run_dir.rglob("*"))
    raw = read_recipe("quickstart") | {"data": {"name": "preference_files", "path": str(bad)}}
    overrides = [o for o in tiny_overrides if not o.startswith("data.")] + ["run.overwrite=true"]
    with pytest.raises(DataValidationError, match="columns 'chosen' and 'rejected' are identical"):
        runner.fit(load_recipe(raw, overrides), show=False)
    assert sorted(p.name for p in finished_run.run_dir.rglob("*")) == before


def test_wandb_staging_follows_each_run(tmp_path, monkeypatch):
    """Two runs in one process stage W&B files in their own directories."""
    from types import SimpleNamespace

    import plrm.tracking as tracking

    monkeypatch.setattr(tracking, "_USER_WANDB_DATA_DIR", None)
    monkeypatch.setenv("WANDB_DATA_DIR", "restored-after-the-test")
    cfg = SimpleNamespace(kind="wandb", mode="disabled", project="p", entity=None, tags=[])
    assert tracking.make_logger(cfg, tmp_path / "a", "x", "g", {}) is None  # disabled: nothing started
    cfg.mode = "offline"
    for name in ("a", "b"):
        logger = tracking.make_logger(cfg, tmp_path / name, "x", "g", {})
        assert tracking.os.environ["WANDB_DATA_DIR"] == str(tmp_path / name / "wandb-staging")
        tracking.finish(logger)


@pytest.mark.parametrize(("per_split", "expected"), [(False, [7, 7, 7, 7]), (True, [7, 7, 8, 8])])
def test_training_seed_follows_the_split_seed_only_when_asked(tmp_path, tiny_overrides, monkeypatch, per_split,
                                                              expected):
    """run.seed_per_split: model init and data order are seeded with run.seed + split seed (two methods,
    split seeds 0 and 1); otherwise every split trains from run.seed."""
    seeds = []
    monkeypatch.setattr(runner.L, "seed_everything", lambda s, verbose=True: seeds.append(s))
    runner.fit("quickstart", tiny_overrides + ["split.seeds=[0,1]", "run.seed=7", f"run.seed_per_split={per_split}",
                                               "methods.bt.max_epochs=1", "methods.lore.max_epochs=1"], show=False)
    assert seeds == expected


class DeclaredManualStep(PersonalizedRewardModel):
    """Manual optimization declared on the class, as LoRe-Alt does: the recipe is checked before any work."""

    manual_optimization = True


def test_a_declared_manual_method_refuses_gradient_clipping_before_the_run_directory_exists(
        monkeypatch, tiny_overrides, tmp_path):
    from plrm import registry

    monkeypatch.setitem(registry.methods._entries, "declared_manual", DeclaredManualStep)
    monkeypatch.setitem(registry.methods._origins, "declared_manual", registry.methods.origin("bt"))
    overrides = [o for o in tiny_overrides if not o.startswith("methods.")] + [
        "methods={m: {name: declared_manual}}", "trainer.gradient_clip_val=0.5", "run.name=clipped"]
    with pytest.raises(RecipeError, match=r"trainer.gradient_clip_val=0.5: methods.m \(DeclaredManualStep\) "
                                          r"optimizes manually"):
        runner.fit("quickstart", overrides, show=False)
    assert not (tmp_path / "clipped").exists()
    assert not DeclaredManualStep(PersonalizedRewardModel.Config(), 2, 3).automatic_optimization
