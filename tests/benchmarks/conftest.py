"""Running a benchmark script as a user would: its own process, from the repository root."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 300, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> <args>``; fails with the output's tail unless it exits with ``expect_rc``."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture
def run_benchmark():
    return _run
