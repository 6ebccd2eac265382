"""The difference-table benchmark runs (its --quick mode) and its two plrm paths compute the same step."""

import json

import pytest


@pytest.mark.slow
def test_quick_difference_benchmark_runs_and_the_paths_agree(tmp_path, run_benchmark):
    run_benchmark("bench_difference.py", "--quick", "--reps", "1", "--out", str(tmp_path), timeout=300)
    r = json.loads((tmp_path / "difference_cpu_quick.json").read_text())
    assert (tmp_path / "difference_cpu_quick.md").is_file()
    assert r["pairs"] == 50 * 45 and r["dim"] == 512
    assert r["loss_table"] == pytest.approx(r["loss_per_batch"], rel=1e-6) and r["max_rel_grad_diff"] < 1e-5
    assert set(r["seconds_per_step"]) == {"per-batch", "table", "table-bf16", "loop", "probe", "copy"}
    # bf16-mixed: the same step to bf16 rounding, not equal
    assert r["loss_table_bf16"] == pytest.approx(r["loss_table"], rel=1e-2) and 0 < r["max_rel_grad_diff_bf16"] < 5e-2
