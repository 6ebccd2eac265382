"""The PReF study (benchmarks/pref_study.py) still runs end to end in its --quick mode, and its headline
checks hold there too: PReF beats Global RM on unseen AUROC with 10 answers, and uncertainty-guided
questions reach random selection's accuracy at the budget with at most half the answers."""

import json

import pytest


@pytest.mark.slow
def test_quick_pref_study_runs_and_its_checks_hold(tmp_path, run_benchmark):
    run_benchmark("pref_study.py", "--quick", "--out-dir", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                  timeout=900)
    dense = json.loads((tmp_path / "out" / "pref_dense.json").read_text())
    assert dense["checks"]["pref_auroc_beats_global_rm_at_k10"]
    assert dense["checks"]["active_reaches_random_at_budget_within_half"]
    assert dense["active"]["budget"] == 20
    for name in ("pref_dense.md", "pref_sparse.md", "pref_sparse.json"):
        assert (tmp_path / "out" / name).stat().st_size > 500
    assert (tmp_path / "out" / "pref_active.png").read_bytes()[:4] == b"\x89PNG"
