"""`plrm export`: the export reloads without the training code to the training code's rewards (LoRA adapter,
merged model, frozen encoders), the head and user weights survive, reward statistics, and clear refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from plrm import registry, runner
from plrm.cli import main
from plrm.data.splits import TRAIN
from plrm.export import ExportError, export, load_exported
from plrm.runner import Run
from tests.conftest import _text_recipe, write_length_pairs


def _fit(tmp, backbone: dict, methods: dict):
    data = write_length_pairs(tmp / "pairs.jsonl", n_users=12, pairs_per_user=8)
    recipe = _text_recipe(tmp, data, backbone, methods, split={"k": 2}, eval={"k_list": [2]})
    return runner.fit(recipe, show=False).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, plrm_cache):
    backbone = {"name": "transformer", "model": "tiny-random:qwen2", "lr": 3e-3, "lora_r": 4, "lora_dropout": 0.0}
    methods = {"lore": {"rank": 2, "lr": 0.02, "batch_size": 32, "max_epochs": 3, "adapt_steps": 30}}
    return _fit(tmp_path_factory.mktemp("lora"), backbone, methods)


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, plrm_cache):
    backbone = {"name": "frozen_encoder", "model": "tiny-random:bert", "normalize": True, "standardize": True}
    methods = {"bt": {"max_epochs": 3, "batch_size": 32},
               "lore": {"rank": 2, "max_epochs": 3, "batch_size": 32, "adapt_steps": 30},
               "mrm": {"basis": "linear", "max_epochs": 3},
               "mrm_none": {"name": "mrm", "basis": "none", "hidden": 8, "max_epochs": 1}}
    return _fit(tmp_path_factory.mktemp("frozen"), backbone, methods)


class Reference:
    """The training code's model of a run (rebuilt as `plrm test` does) and its texts."""

    def __init__(self, run_dir, label, checkpoint=None):
        run = Run.open(run_dir)
        self.prepared, self.split, self.dm = run.prepared, run.split(0), run.datamodule(0)
        self.model = run.load_method(label, 0, checkpoint)

    @torch.no_grad()
    def rewards(self, rows: np.ndarray, side: str = "chosen") -> torch.Tensor:
        batch = self.dm.batch(torch.from_numpy(rows))
        return self.model.reward(batch[side], batch["user_idx"])

    def texts(self, rows: np.ndarray, side: str = "chosen") -> tuple[list, list, list]:
        table = self.prepared.data.pairs.data.table
        col = lambda name: list(table[name].to_numpy(zero_copy_only=False)[rows])  # noqa: E731
        return col("prompt"), col(side), list(self.split.user_ids[self.split.row_user[rows]].astype(str))

    def rows(self, unseen: bool) -> np.ndarray:
        return np.flatnonzero(self.split.unseen[self.split.row_user] == unseen)


def test_lora_export_reloads_to_the_training_rewards_and_merges(lora_run, tmp_path):
    out = export(lora_run, tmp_path / "rm", merge=True, show=False)
    meta = json.loads((out / "plrm_export.json").read_text())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == yaml.safe_load((lora_run / "recipe.yaml").read_text())
    assert meta["method"] == {"name": "lore", "label": "lore", "class": "LoRe"} and meta["merged"]
    b = meta["backbone"]
    assert (b["model"], b["architecture"], b["pooling"], b["chat_template"]) == ("tiny-random:qwen2", "decoder",
                                                                                 "last", True)
    head = load_file(str(out / "head.safetensors"))
    assert [op["op"] for op in meta["head"]] == ["linear"] and head["user_weights"].shape == (12, 2)

    ref = Reference(lora_run, "lore")
    rows = ref.rows(unseen=False)[:40]
    direct = ref.rewards(rows)
    exported = load_exported(out).reward(*ref.texts(rows))
    merged = load_exported(out, merged=True).reward(*ref.texts(rows))
    assert (exported - direct).abs().max() < 1e-5
    assert (merged - direct).abs().max() < 1e-4

    # (6) reward statistics: every response of the seen users' train pairs, each for its own user
    train = ref.split.rows(TRAIN)
    all_r = torch.cat([ref.rewards(train, "chosen"), ref.rewards(train, "rejected")]).double()
    assert meta["reward"]["n"] == 2 * len(train)
    assert abs(meta["reward"]["mean"] - float(all_r.mean())) < 1e-5
    assert abs(meta["reward"]["std"] - float(all_r.std())) < 1e-5
    rm = load_exported(out)
    calibrated = rm.reward(*ref.texts(rows), calibrated=True)
    torch.testing.assert_close(calibrated, (exported - rm.reward_mean) / rm.reward_std)

    # users: trained ones only; a fit checkpoint has not adapted the unseen users
    seen_ids = set(ref.split.user_ids[ref.split.seen_users].astype(str))
    assert set(rm.trained_user_ids) == seen_ids and len(rm.user_ids) == 12
    p, r, _ = ref.texts(rows[:1])
    with pytest.raises(KeyError, match="unknown user 'nobody'.*e.g. u"):
        rm.reward(p, r, ["nobody"])
    unseen_id = str(ref.split.user_ids[ref.split.unseen_users[0]])
    with pytest.raises(KeyError, match="did not adapt"):
        rm.reward(p, r, [unseen_id])


def test_adapted_checkpoint_exports_the_unseen_users(lora_run, tmp_path):
    runner.adapt(lora_run, k=2, show=False)
    out = export(lora_run, tmp_path / "rm", checkpoint="lore.adapted-k2.ckpt", show=False)
    rm = load_exported(out)
    assert len(rm.trained_user_ids) == 12
    ref = Reference(lora_run, "lore", checkpoint="lore.adapted-k2.ckpt")
    rows = ref.rows(unseen=True)[:30]
    assert (rm.reward(*ref.texts(rows)) - ref.rewards(rows)).abs().max() < 1e-5


def test_export_loads_and_scores_without_the_training_code(lora_run, tmp_path):
    out = export(lora_run, tmp_path / "rm", show=False)
    ref = Reference(lora_run, "lore")
    rows = ref.rows(unseen=False)[:20]
    (tmp_path / "items.json").write_text(json.dumps(ref.texts(rows)))
    code = (
        "import json, sys\n"
        "from plrm.export import load_exported\n"
        f"p, r, u = json.load(open({str(tmp_path / 'items.json')!r}))\n"
        f"print(json.dumps(load_exported({str(out)!r}).reward(p, r, u).tolist()))\n"
        "bad = [m for m in ('lightning', 'plrm.methods', 'plrm.runner') if m in sys.modules]\n"
        "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (rewards - ref.rewards(rows)).abs().max() < 1e-5


@pytest.mark.parametrize("label", ["bt", "lore", "mrm"])
def test_head_and_user_weights_reproduce_the_reward_over_a_frozen_encoder(frozen_run, tmp_path, label):
    code = main(["export", "--run", str(frozen_run), "--out", str(tmp_path / "rm"), "--method", label])
    assert code == 0
    meta = json.loads((tmp_path / "rm" / "plrm_export.json").read_text())
    assert [op["op"] for op in meta["feature_ops"]] == ["l2_normalize", "standardize"]
    assert meta["files"]["adapter"] is None and meta["backbone"]["architecture"] == "encoder"
    ref = Reference(frozen_run, label)
    rows = np.concatenate([ref.rows(unseen=False)[:30], ref.rows(unseen=True)[:10]])
    rm = load_exported(tmp_path / "rm")
    if label == "bt":  # one model for everyone: every user, known or not, is served
        assert rm.generic and len(rm.trained_user_ids) == 12
        p, r, _ = ref.texts(rows[:1])
        torch.testing.assert_close(rm.reward(p, r, ["someone new"]), ref.rewards(rows[:1]), atol=1e-4, rtol=0)
    else:
        rows = rows[:30]  # seen users
    assert (rm.reward(*ref.texts(rows)) - ref.rewards(rows)).abs().max() < 1e-4
    # the head alone, on the training code's own features
    feats = ref.dm.batch(torch.from_numpy(rows))["chosen"]
    head = load_file(str(tmp_path / "rm" / "head.safetensors"))
    from plrm.export import apply_ops

    users = ref.dm.row_user[torch.from_numpy(rows)]
    mine = (apply_ops(meta["head"], head, feats) * head["user_weights"][users]).sum(-1)
    torch.testing.assert_close(mine, ref.rewards(rows), atol=1e-5, rtol=1e-5)


def test_refusals_are_clear_and_leave_nothing_behind(frozen_run, lora_run, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        export(lora_run, busy, show=False)
    with pytest.raises(ExportError, match="several methods; choose one with --method: bt, lore, mrm, mrm_none"):
        export(frozen_run, tmp_path / "a", show=False)
    with pytest.raises(ExportError, match="basis: none adapts a whole MLP per user"):
        export(frozen_run, tmp_path / "a", method="mrm_none", show=False)
    with pytest.raises(ExportError, match="--merge merges a LoRA adapter.*'frozen_encoder' has none"):
        export(frozen_run, tmp_path / "a", method="lore", merge=True, show=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no partial or temporary directory

    # a 4-bit run refuses --merge before loading anything
    recipe = yaml.safe_load((lora_run / "recipe.yaml").read_text())
    recipe["backbone"]["quantization"] = "4bit"
    qrun = tmp_path / "qrun"
    qrun.mkdir()
    (qrun / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["export", "--run", str(qrun), "--out", str(tmp_path / "q"), "--merge"]) == 2
    assert "--merge refused: the base model is 4bit quantized" in capsys.readouterr().err

    registry.ensure_builtins()
    if "shrunk_individual" in registry.methods.names():
        recipe["methods"] = {"shrunk": {"name": "shrunk_individual"}}
        recipe["backbone"]["quantization"] = "none"
        (qrun / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        with pytest.raises(ExportError, match="method 'shrunk_individual' .* has no export_head"):
            export(qrun, tmp_path / "q", show=False)


def test_export_verb_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "usage: plrm export" in out and "--merge" in out and "--checkpoint" in out
