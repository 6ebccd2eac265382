"""The PReF study (benchmarks/pref_study.py) still runs end to end in its --quick mode, and its headline
checks hold there too: PReF beats Global RM on unseen AUROC with 10 answers, and uncertainty-guided
questions reach random selection's accuracy at the budget with at most half the answers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_pref_study_runs_and_its_checks_hold(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pref_study.py"), "--quick",
                           "--out-dir", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    dense = json.loads((tmp_path / "out" / "pref_dense.json").read_text())
    assert dense["checks"]["pref_auroc_beats_global_rm_at_k10"]
    assert dense["checks"]["active_reaches_random_at_budget_within_half"]
    assert dense["active"]["budget"] == 20
    for name in ("pref_dense.md", "pref_sparse.md", "pref_sparse.json"):
        assert (tmp_path / "out" / name).stat().st_size > 500
    assert (tmp_path / "out" / "pref_active.png").read_bytes()[:4] == b"\x89PNG"
