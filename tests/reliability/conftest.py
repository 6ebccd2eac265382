"""The bad-input catalogue's fixtures: run a ``plrm`` command in this process (exit code and stderr, as a user
sees them) in a fresh working directory, and a finished run that no bad input may damage. The plain helpers
(``tree_digest``, ``assert_bad_input``, ``TINY_FIT``) are in harness.py beside this file.

Each ``test_*.py`` of this folder is one part of the catalogue (one parametrized table per concern): a case is a
command, the exit code it must give (2: bad input), the text its one-line error must contain (what is wrong and
where), and the folders that must be byte-identical before and after it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `from harness import ...` in this folder's test files

from harness import TINY_FIT, Outcome  # noqa: E402

from plrm import cli  # noqa: E402


@pytest.fixture
def plrm_cmd(capsys):
    """``plrm_cmd(*args)``: ``plrm.cli.main(args)`` in this process; returns Outcome(code, stdout, stderr).
    A SystemExit (argparse) is returned as its code, never raised."""

    def run(*args: str) -> Outcome:
        capsys.readouterr()
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory (the command's relative paths land here), with a user's own notes in it: the
    kind of thing no bad input may touch."""
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my own file\n")
    return tmp_path


@pytest.fixture
def tiny_fit():
    """``plrm fit`` arguments of a tiny quickstart run (a few seconds); append overrides such as run.name=x."""
    return list(TINY_FIT)


@pytest.fixture
def finished_run(workdir, plrm_cmd, tiny_fit):
    """``<workdir>/runs/done``: a finished tiny quickstart run (what overwrite and bad inputs must never damage)."""
    outcome = plrm_cmd("fit", *tiny_fit, "run.name=done")
    assert outcome.code == 0, outcome.err
    return workdir / "runs" / "done"
