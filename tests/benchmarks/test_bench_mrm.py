"""The MRM step benchmark still runs (its --quick mode), and its equality check of the three paths holds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_runs_and_the_paths_agree(tmp_path):
    out = tmp_path / "mrm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mrm.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (record,) = json.loads(out.read_text())["results"]
    assert record["users"] == 64
    assert record["max_abs_loss_diff"] < 1e-5 and record["max_abs_grad_diff"] < 1e-4
    assert len(record["seconds_vectorized"]) == 3 and record["speedup_vs_loop_per_user"] > 0
    assert "speed-up" in out.with_suffix(".md").read_text()
