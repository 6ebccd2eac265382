"""The Newton-vs-Adam adaptation benchmark runs (its --quick mode) and its exactness checks hold."""

import json

import pytest


@pytest.mark.slow
def test_quick_adaptation_benchmark_meets_kkt_and_matches_slsqp(tmp_path, run_benchmark):
    run_benchmark("bench_adapt.py", "--quick", "--reps", "1", "--threads", "1", "--out", str(tmp_path), timeout=300)
    r = json.loads((tmp_path / "adapt_cpu_quick.json").read_text())
    assert r["users"] == 5000 and (tmp_path / "adapt_cpu_quick.md").is_file()
    assert r["kkt_residual_max"] < 1e-6 and r["slsqp_max_abs_diff"] < 1e-5
    assert r["speedup_newton_over_adam"] > 5  # measured 41x on 5,000 users, one thread
    assert abs(r["held_out_accuracy"]["newton"] - r["held_out_accuracy"]["adam"]) < 0.005
