"""A real ``plrm fit`` process killed mid-training (SIGKILL: no handler runs) and continued with ``--resume``
ends with the results, per-user table and checkpoints of an uninterrupted run; Ctrl-C (SIGINT) says what was
saved and how to continue, and exits 130.

The recipe trains LoRe (automatic optimization) and LoRe-Alt (manual optimization, two optimizers) over two split
seeds; the first kill lands in seed 0's LoRe, the second in seed 1's LoRe-Alt, each as soon as that unit has
written a training checkpoint (``seed-<s>/<label>.last.ckpt``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from plrm.checkpoint import load_checkpoint
from plrm.rundir import read_marker

ARGS = ["--recipe", "quickstart", "data.n_users=60", "data.pairs_per_user=20", "data.n_train_prompts=200",
        "data.n_test_prompts=30", "data.test_prompts_per_user=10", "data.feature_dim=16", "data.n_functions=3",
        "data.alpha=0.05", "eval.k_list=[1,3]", "split.k=3", "split.seeds=[0,1]", "logger.kind=none",
        "trainer.progress_bar=false", "~methods.bt", "methods.lore.max_epochs=60", "methods.lore.rank=3",
        "methods.lore.batch_size=100", "+methods.alt.name=lore_alt", "+methods.alt.max_epochs=60",
        "+methods.alt.rank=3", "+methods.alt.batch_size=100", "run.checkpoint_every_n_steps=5",
        "run.checkpoint_interval=0"]


def plrm(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "plrm.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"plrm fit ended before {path} appeared:\n{proc.stderr.read()}"
        assert time.monotonic() - start < timeout, f"{path} did not appear"
        time.sleep(0.01)


def kill_when(path: Path, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    wait_for(path, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def comparable(run: Path) -> dict:
    import json

    def strip(m):
        if isinstance(m, dict):
            return {k: strip(v) for k, v in m.items() if not k.endswith("_seconds")}
        return [strip(v) for v in m] if isinstance(m, list) else m
    return strip(json.loads((run / "results.json").read_text())["per_seed"])


@pytest.mark.slow
def test_killed_twice_and_resumed_equals_uninterrupted(tmp_path):
    whole = plrm("fit", *ARGS, "run.name=whole", cwd=tmp_path)
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err

    cut = tmp_path / "runs" / "cut"
    first = kill_when(cut / "seed-0" / "lore.last.ckpt", plrm("fit", *ARGS, "run.name=cut", cwd=tmp_path))
    assert first.returncode == -signal.SIGKILL
    assert read_marker(cut)["status"] == "running"
    second = plrm("fit", *ARGS, "run.name=cut", "--resume", cwd=tmp_path)
    killed = kill_when(cut / "seed-1" / "alt.last.ckpt", second)
    assert killed.returncode == -signal.SIGKILL
    assert "seed 0 lore: resuming from" in killed.stderr
    assert (cut / "seed-0" / "alt.metrics.json").is_file()  # seed 0 finished before the second kill

    last = plrm("fit", *ARGS, "run.name=cut", "--resume", cwd=tmp_path)
    _, err = last.communicate(timeout=600)
    assert last.returncode == 0, err
    assert "seed 1 alt: resuming from" in err

    a, b = tmp_path / "runs" / "whole", cut
    assert comparable(a) == comparable(b)
    pd.testing.assert_frame_equal(pd.read_parquet(a / "per_user.parquet"), pd.read_parquet(b / "per_user.parquet"))
    for seed in (0, 1):
        for label in ("lore", "alt"):
            sa = load_checkpoint(a / f"seed-{seed}" / f"{label}.ckpt")["state_dict"]
            sb = load_checkpoint(b / f"seed-{seed}" / f"{label}.ckpt")["state_dict"]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (seed, label)
    assert read_marker(b)["status"] == "complete"
    assert not list(b.glob("seed-*/*.last.ckpt"))


@pytest.mark.slow
def test_ctrl_c_says_what_was_saved_and_exits_130(tmp_path):
    cut = tmp_path / "runs" / "cut"
    done = kill_when(cut / "seed-0" / "alt.last.ckpt", plrm("fit", *ARGS, "run.name=cut", cwd=tmp_path),
                     signal.SIGINT)
    assert done.returncode == 130, done.stderr
    assert "plrm fit: interrupted; the run is kept, marked incomplete, in runs/cut" in done.stderr
    assert "finished and saved: seed 0 lore" in done.stderr
    assert "seed 0 alt: continues from its checkpoint after" in done.stderr
    assert "rerun the same `plrm fit` command with --resume" in done.stderr
    assert "Traceback" not in done.stderr
    assert read_marker(cut)["status"] == "running"
