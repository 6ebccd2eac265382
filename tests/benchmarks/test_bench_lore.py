"""The LoRe benchmark still runs (its --quick mode), and its equivalence checks hold."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_runs_and_checks_equivalence(tmp_path):
    out = tmp_path / "lore.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lore.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["workload"]["n_users"] < 1000  # the quick workload, not the committed full one
    assert out.with_suffix(".md").is_file()
