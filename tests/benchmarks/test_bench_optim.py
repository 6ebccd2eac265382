"""The fused-Adam benchmark runs (its --quick mode) and both paths do the same arithmetic."""

import json

import pytest


@pytest.mark.slow
def test_quick_optimizer_benchmark_writes_its_tables_and_the_paths_agree(tmp_path, run_benchmark):
    run_benchmark("bench_optim.py", "--quick", "--reps", "1", "--threads", "1", "--out", str(tmp_path), timeout=300)
    r = json.loads((tmp_path / "optim_cpu_quick.json").read_text())
    assert (tmp_path / "optim_cpu_quick.md").is_file() and len(r["cases"]) == 4
    for name, case in r["cases"].items():
        assert case["default_ms"] > 0 and case["fused_ms"] > 0, name
        assert case["max_abs_diff"] < 1e-5, name  # rounding only: the same Adam update
