"""The architecture refactor changed no number: bench/quick (every installed method, the example plugin's
included) and the quickstart give the results recorded on main before it (benchmarks/invariance.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("plrm_shrinkage") is None,
                    reason="the reference includes the example plugin's rows: pip install ./plugins/plrm-shrinkage")
def test_bench_quick_and_quickstart_reproduce_the_pre_refactor_numbers():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "invariance.py")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "invariance: identical to the reference" in out.stdout
