"""The L-BFGS benchmark runs (its --quick mode) and counts L-BFGS's full-batch evaluations."""

import json

import pytest


@pytest.mark.slow
def test_quick_lbfgs_benchmark_runs_both_schedules(tmp_path, run_benchmark):
    out = tmp_path / "lbfgs.json"
    run_benchmark("bench_lbfgs.py", "--quick", "--steps", "1", "3", "--out", str(out), timeout=300)
    r = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert set(r["variants"]) == {f"{m} {v}" for m in ("bt", "lore") for v in ("adam", "lbfgs x1", "lbfgs x3")}
    one, three = r["variants"]["lore lbfgs x1"], r["variants"]["lore lbfgs x3"]
    # at least one evaluation per iteration; 20 iterations per step unless it converges first
    assert 20 <= one["evaluations"] < three["evaluations"] <= 3 * 20 * 25
    for v in r["variants"].values():
        assert 0.5 < v["metrics"]["seen"]["accuracy"] <= 1 and v["metrics"]["train_seconds"] > 0
