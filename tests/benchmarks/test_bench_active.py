"""The interactive-session benchmark runs (its --quick mode) and its one-user-at-a-time reference asks the same
questions as plrm's batched session."""

import json

import pytest


@pytest.mark.slow
def test_quick_active_benchmark_matches_the_per_user_reference(tmp_path, run_benchmark):
    out = tmp_path / "active.json"
    run_benchmark("bench_active.py", "--quick", "--authors-steps", "200", "--runs", str(tmp_path / "runs"),
                  "--out", str(out), timeout=300)
    r = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert r["world"]["new_users"] == 100 and r["world"]["budget"] == 10
    assert r["same_questions_as_per_user"] == 1.0
    assert r["max_abs_lambda_diff_vs_per_user"] < 1e-5
    assert r["metrics"]["plrm"] == r["metrics"]["per_user"]     # same user vectors: the same test metrics
    assert r["metrics"]["authors"]["n_users"] == 1 and 0.5 < r["metrics"]["authors"]["auroc"] <= 1.0
