"""The bad-input catalogue's plain helpers (tests/reliability/conftest.py holds its fixtures and puts this folder on
``sys.path``, so every test file here can ``from harness import ...``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256 of its bytes (or 'dir')} of everything under ``root`` (empty if it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_bad_input(outcome: Outcome, *needles: str, code: int = 2) -> None:
    """The command failed with ``code`` and one clear message naming every ``needle``, without a traceback."""
    assert outcome.code == code, f"exit {outcome.code}, stderr:\n{outcome.err}"
    assert "Traceback" not in outcome.err, outcome.err
    for needle in needles:
        assert needle in outcome.err, f"{needle!r} not in:\n{outcome.err}"


# the quickstart recipe shrunk to a run of a few seconds (its world is tiny); runs land in <workdir>/runs
TINY_FIT = ["--recipe", "quickstart", "data.n_users=80", "data.pairs_per_user=20", "data.n_train_prompts=300",
            "data.n_test_prompts=40", "data.test_prompts_per_user=10", "data.feature_dim=16", "data.n_functions=3",
            "data.alpha=0.05", "methods.bt.max_epochs=2", "methods.lore.max_epochs=2", "methods.lore.rank=3",
            "eval.k_list=[1,3]", "split.k=3", "logger.kind=none", "trainer.progress_bar=false"]
