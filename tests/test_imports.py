"""Every module imports, and lint finds no undefined name or unused import anywhere in the package."""

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import plrm

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", sorted(m.name for m in pkgutil.walk_packages(plrm.__path__, "plrm.")))
def test_module_imports(module):
    importlib.import_module(module)


def test_lint_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: install the test extra (pip install -e '.[test]')")
    proc = subprocess.run([ruff, "check", "plrm", "tests", "plugins", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
