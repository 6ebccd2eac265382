"""The LoRe benchmark still runs (its --quick mode), and its equivalence checks hold."""

import json

import pytest


@pytest.mark.slow
def test_quick_benchmark_runs_and_checks_equivalence(tmp_path, run_benchmark):
    out = tmp_path / "lore.json"
    run_benchmark("bench_lore.py", "--quick", "--out", str(out), timeout=300)
    results = json.loads(out.read_text())
    assert results["workload"]["n_users"] < 1000  # the quick workload, not the committed full one
    assert out.with_suffix(".md").is_file()
