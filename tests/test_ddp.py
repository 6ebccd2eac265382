"""Distributed training and evaluation: DDP over gloo with 2 CPU processes reproduces one process.

The fast tests check the pieces without processes: how a global batch is cut into rank shares, how sharded
logits are put back together before per-user metrics, and that share-weighted per-rank losses give DDP the
gradient of the whole batch. The slow test runs ``plrm fit`` as a subprocess (in-process ``ddp`` would re-run
the pytest command line in the child, environment.md §5) once with one process and once with
``trainer.strategy=ddp trainer.devices=2`` and compares the run directories.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from plrm.checkpoint import load_checkpoint
from plrm.data.datamodule import _Shards
from plrm.distributed import concat_shards, shard
from plrm.eval.metrics import summarize
from plrm.methods import meta
from plrm.methods.lore import LoRe
from tests.conftest import TINY_WORLD


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_partition_every_global_batch(world):
    batches = list(BatchSampler(SequentialSampler(range(23)), 5, drop_last=False))  # 5, 5, 5, 5, 3
    per_rank = [list(_Shards(BatchSampler(SequentialSampler(range(23)), 5, drop_last=False), r, world))
                for r in range(world)]
    for b, batch in enumerate(batches):
        parts = [per_rank[r][b] for r in range(world)]
        assert sum((positions for positions, _ in parts), []) == batch  # contiguous, in order, no overlap
        assert sum(share for _, share in parts) == pytest.approx(world)
        assert [len(p) for p, _ in parts] == [len(range(len(batch))[shard(len(batch), r, world)]) for r in range(world)]


def test_a_global_batch_smaller_than_the_world_gives_the_other_ranks_a_zero_share_copy():
    parts = [next(iter(_Shards([[7]], r, 2))) for r in range(2)]
    assert parts == [([7], 2.0), ([7], 0.0)]


def test_per_user_accuracy_from_sharded_logits_counts_a_split_user_once():
    # user 1's four pairs straddle the boundary between rank 0 (rows 0-4) and rank 1 (rows 5-8)
    logits = torch.tensor([1.0, -1.0, 2.0, 0.5, -0.5, 3.0, -2.0, 1.0, 1.0])
    users = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2])
    group = np.arange(3)
    world = 2
    shards = [logits[shard(len(logits), r, world)] for r in range(world)]
    assert len(set(users[shard(len(logits), 0, world)].tolist()) & set(users[shard(len(logits), 1, world)].tolist()))
    width = max(len(s) for s in shards)
    padded = [torch.cat([s, torch.full((width - len(s),), 99.0)]) for s in shards]  # what all_gather returns
    gathered = concat_shards(padded, [len(s) for s in shards])
    assert torch.equal(gathered, logits)
    whole, acc, count = summarize(logits, users, group, 3, [0.5])
    again, acc2, count2 = summarize(gathered, users, group, 3, [0.5])
    assert again == whole and torch.equal(acc, acc2) and torch.equal(count, count2)
    assert acc[1] == 0.75 and count[1] == 4  # 3 of 4 right, one user, not two half-users
    # averaging per-rank per-user means instead would count user 1 twice (2/3 on rank 0, 1/1 on rank 1)
    rank_means = [summarize(s, users[shard(9, r, 2)], group, 3, [0.5])[0]["accuracy"] for r, s in enumerate(shards)]
    assert np.mean(rank_means) != pytest.approx(whole["accuracy"])


def test_share_weighted_rank_losses_average_to_the_global_batch_gradient():
    torch.manual_seed(0)
    model = LoRe(LoRe.Config(rank=3), n_users=4, feature_dim=5)
    n = 7  # rank shares of 4 and 3 pairs: the plain average of two per-rank means would be off
    batch = {"user_idx": torch.tensor([0, 1, 2, 3, 0, 1, 3]), "chosen": torch.randn(n, 5),
             "rejected": torch.randn(n, 5), "pair_weight": torch.rand(n) + 0.5}

    def grads(b: dict) -> list[torch.Tensor]:
        model.zero_grad()
        model.global_loss(model.loss(b) + model.regularization(b), b).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads({**batch, "share": 1.0})
    world = 2
    ranks = []
    for r in range(world):
        s = shard(n, r, world)
        ranks.append(grads({**{k: v[s] for k, v in batch.items()}, "share": world * (s.stop - s.start) / n}))
    for g, *per_rank in zip(whole, *ranks):
        torch.testing.assert_close(sum(per_rank) / world, g)  # what DDP's gradient average makes of them


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_mrm_objective_parts_sum_to_the_whole_meta_batch(gamma):
    losses = torch.tensor([0.3, 1.2, 0.7, 0.9, 0.1], requires_grad=True)
    whole = meta.robust_objective(losses, 0.5, gamma)
    parts = [meta.robust_objective(losses[s], 0.5, gamma, population=losses.detach()) for s in (slice(0, 3),
                                                                                                 slice(3, 5))]
    torch.testing.assert_close(sum(parts), whole)


# ---- 2 processes vs 1 ------------------------------------------------------------------------------------------
GROUPS = ("seen", "unseen", "overall")
COMPARED = ("bt", "lore", "lore_alt", "pref")


def _fit(tmp_path, name: str, extra: list[str]) -> subprocess.CompletedProcess:
    # batch_size 37: several batches an epoch, every one cut into unequal rank shares (19 + 18 pairs);
    # mrm meta-batches of 3 users: the last one leaves a rank with a zero-share copy
    overrides = TINY_WORLD + [
        f"run.output_dir={tmp_path}", f"run.name={name}", "logger.kind=none", "trainer.progress_bar=false",
        "split.k=3", "split.val_fraction=0.2", "eval.k_list=[1,3]",
        "methods.bt.batch_size=37", "methods.bt.max_epochs=2",
        "methods.lore.batch_size=37", "methods.lore.max_epochs=2", "methods.lore.rank=3",
        "methods.lore_alt.batch_size=37", "methods.lore_alt.max_epochs=2", "methods.lore_alt.rank=3",
        "methods.pref.batch_size=37", "methods.pref.max_epochs=2", "methods.pref.max_steps=-1", "methods.pref.rank=3",
        "methods.mrm.n_basis=3", "methods.mrm.meta_batch_size=3", "methods.mrm.max_epochs=1",
        "methods.mrm.inner_steps=2", "methods.mrm.inner_lr=0.3", "methods.mrm.support_fraction=0.5",
    ] + extra
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "plrm.cli", "fit", "--recipe", "quickstart", *overrides],
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_reproduces_one_process(tmp_path):
    _fit(tmp_path, "one", [])
    two = _fit(tmp_path, "two", ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                                 "trainer.num_threads=1"])
    assert "MEMBER: 2/2" in two.stdout + two.stderr  # really two processes
    assert two.stdout.count("run directory:") == 1  # rank 1 prints nothing of the results

    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    files = sorted(p.relative_to(one_dir) for p in one_dir.rglob("*"))
    assert sorted(p.relative_to(two_dir) for p in two_dir.rglob("*")) == files  # rank 1 wrote nothing else
    one = json.loads((one_dir / "results.json").read_text())["per_seed"]["0"]
    two = json.loads((two_dir / "results.json").read_text())["per_seed"]["0"]
    for label in [*COMPARED, "oracle/personal", "oracle/non-personalized"]:
        for group in GROUPS:
            for key in ("accuracy", "accuracy_pooled", "auroc", "n_pairs", "n_users"):
                assert two[label][group][key] == pytest.approx(one[label][group][key], abs=1e-6), (label, group, key)
    assert all(two["mrm"][g]["accuracy"] > 0.4 for g in GROUPS)  # runs; its random episodes differ per rank

    per_user_1 = pd.read_parquet(one_dir / "per_user.parquet")
    per_user_2 = pd.read_parquet(two_dir / "per_user.parquet")
    keep_1, keep_2 = per_user_1[per_user_1.method != "mrm"], per_user_2[per_user_2.method != "mrm"]
    pd.testing.assert_frame_equal(keep_2.drop(columns="accuracy"), keep_1.drop(columns="accuracy"))
    np.testing.assert_allclose(keep_2.accuracy, keep_1.accuracy, atol=1e-6)
    # the trained weights too: without the share weighting of unequal rank batches they differ by ~1e-3
    for label in COMPARED:
        a = load_checkpoint(one_dir / "seed-0" / f"{label}.ckpt")["state_dict"]
        b = load_checkpoint(two_dir / "seed-0" / f"{label}.ckpt")["state_dict"]
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=f"{label} {key}")


@pytest.mark.slow
def test_two_process_ddp_reproduces_one_process_for_lm_methods(tmp_path):
    """P-DPO (conditioned reward, soft user tokens, reference cache, adapt: fit) and GenARM on a tiny causal LM with
    LoRA: 2 gloo processes give the 1-process accuracies and weights."""
    import yaml

    from tests.conftest import _text_recipe, write_length_pairs

    data = write_length_pairs(tmp_path / "pairs.jsonl", n_users=12, pairs_per_user=8)
    backbone = {"name": "causal_lm", "model": "tiny-random:qwen2", "lr": 3e-3, "lora_dropout": 0.0,
                "dtype": "float32"}
    methods = {"pdpo": {"lr": 0.01, "batch_size": 13, "max_epochs": 1, "adapt_steps": 5, "adapt_lr": 0.01},
               "genarm": {"batch_size": 13, "max_epochs": 1}}
    recipe = _text_recipe(tmp_path, data, backbone, methods)
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}

    def fit(name: str, extra: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "plrm.cli", "fit", "--recipe", str(tmp_path / "lm.yaml"),
                               f"run.output_dir={tmp_path}", f"run.name={name}", *extra], cwd=tmp_path, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    fit("one", [])
    two = fit("two", ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.num_threads=1"])
    assert "MEMBER: 2/2" in two.stdout + two.stderr
    one = json.loads((tmp_path / "one" / "results.json").read_text())["per_seed"]["0"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["per_seed"]["0"]
    for label in methods:
        for group in GROUPS:
            for key in ("accuracy", "auroc", "n_pairs", "n_users"):
                assert two[label][group][key] == pytest.approx(one[label][group][key], abs=1e-6), (label, group, key)
        a = load_checkpoint(tmp_path / "one" / "seed-0" / f"{label}.ckpt")["state_dict"]
        b = load_checkpoint(tmp_path / "two" / "seed-0" / f"{label}.ckpt")["state_dict"]
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=f"{label} {key}")


def test_fsdp_on_cpu_is_refused_with_one_clear_message(tmp_path, tiny_overrides):
    from plrm import runner
    from plrm.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"trainer.strategy=fsdp shards a large backbone over GPUs .* on CPU use "
                                          r"trainer.strategy=ddp"):
        runner.fit("quickstart", tiny_overrides + ["trainer.strategy=fsdp"], show=False)
    assert not (tmp_path / "quickstart").exists()  # refused before anything was written
