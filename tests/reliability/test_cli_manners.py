"""The command line's manners: input that needs no model is refused at once (before torch or Lightning is
imported), with one line that says what is wrong and what to do, exit status 2, and nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harness import assert_bad_input, tree_digest  # tests/reliability/harness.py (on sys.path via conftest)

# ---- no heavy import for what needs no model ----------------------------------------------------------------------
PROBE = """
import sys
from plrm.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help, --version paths that argparse ends
    code = exc.code
heavy = sorted(m for m in ("torch", "lightning", "transformers") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), "CODE:" + str(code), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [
    ["recipes", "list"],
    ["--help"],
    ["--version"],
    ["fit", "--recipe", "nope"],
    ["test", "--run", "nope"],
    ["adapt", "--run", "nope", "--k", "-2"],
    ["bench", "--recipe", "nope"],
    ["recipes", "copy", "quickstart", "missing/folder/q.yaml"],
], ids=" ".join)
def test_answers_without_importing_torch_or_lightning(args, tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("HEAVY:"), proc.stderr[-2000:]
    assert last.split()[0] == "HEAVY:", f"{' '.join(args)} imported {last.split()[0][6:]}"
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---- bad input: one line, exit 2, nothing changed -------------------------------------------------------------------
BAD_INPUT = [
    # (args, texts the error must contain)
    (["fit", "--recipe", "nope"], ["recipe 'nope' is neither a file nor a known recipe", "plrm recipes list"]),
    (["fit", "--recipe", "quickstrat"], ["Did you mean 'quickstart'?"]),
    (["fit", "--recipe", "mine/missing.yaml"], ["recipe 'mine/missing.yaml' is neither a file"]),
    (["embed", "--recipe", "nope"], ["recipe 'nope' is neither a file"]),
    (["bench", "--recipe", "nope"], ["recipe 'nope' is neither a file"]),
    (["bench", "--recipe", "bench/quick", "--shard", "4/4"], ["--shard '4/4': expected i/N with 0 <= i < N"]),
    (["bench", "--recipe", "bench/quick", "--shard", "one"], ["--shard 'one': expected i/N"]),
    (["test", "--run", "nope"], ["run directory nope does not exist", "`plrm fit` printed"]),
    (["test", "--run", "notes"], ["notes is not a plrm run directory (no recipe.yaml)"]),
    (["export", "--run", "notes", "--out", "exported"], ["notes is not a plrm run directory"]),
    (["tax", "--run", "notes"], ["notes is not a plrm run directory"]),
    (["tax", "--run", "notes", "--worst", "0"], ["--worst must be >= 1, got 0"]),
    (["adapt", "--run", "notes"], ["notes is not a plrm run directory"]),
    (["adapt", "--run", "notes", "--k", "-2"], ["--k must be >= 1, got -2"]),
    (["adapt", "--run", "notes", "--k", "0"], ["--k must be >= 1, got 0"]),
    (["adapt", "--run", "notes", "--k", "two"], ["argument --k: invalid int value: 'two'"]),
    (["adapt", "--run", "notes", "--active", "--budget", "0"], ["--budget must be >= 1, got 0"]),
    (["adapt", "--run", "notes", "--active", "--budget", "5", "--eval-at", "0", "3", "6"],
     ["--eval-at values must be in 1..budget (1..5), got 0, 6"]),
    (["adapt", "--run", "notes", "--active", "--eval-at", "41"], ["(1..40), got 41"]),
    (["adapt", "--run", "notes", "--budget", "5"], ["--budget only applies to interactive sessions: add --active"]),
    (["adapt", "--run", "notes", "--pairs", "new.jsonl", "--k", "3"], ["with --pairs every pair in the file"]),
    (["adapt", "--run", "notes", "--active", "--k", "3"], ["does not combine with --k or --pairs"]),
    (["fit"], ["the following arguments are required: --recipe"]),
    (["recipes", "copy", "quickstart", "new/sub/q.yaml"],
     ["folder new/sub does not exist", "--make-parents"]),
    (["recipes", "copy", "quickstart", "new/"], ["folder new does not exist", "--make-parents"]),
    (["recipes", "copy", "quickstart", "notes/todo.txt"], ["notes/todo.txt exists; not overwriting it"]),
    (["recipes", "copy", "quickstart", "notes/todo.txt/q.yaml", "--make-parents"],
     ["cannot write into folder notes/todo.txt: notes/todo.txt is a file"]),
    (["recipes", "copy", "nope", "new/q.yaml", "--make-parents"], ["recipe 'nope' is neither a file"]),
]


@pytest.mark.parametrize("args,needles", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(args, needles, plrm_cmd, workdir):
    before = tree_digest(workdir)
    outcome = plrm_cmd(*args)
    assert_bad_input(outcome, *needles)
    assert len([line for line in outcome.err.splitlines() if "error:" in line]) == 1, outcome.err
    assert tree_digest(workdir) == before


def test_make_parents_creates_the_missing_folders(plrm_cmd, workdir):
    outcome = plrm_cmd("recipes", "copy", "quickstart", "new/sub/q.yaml", "--make-parents")
    assert outcome.code == 0, outcome.err
    assert (workdir / "new" / "sub" / "q.yaml").read_text().startswith("# copied from plrm recipe 'quickstart'")
    outcome = plrm_cmd("recipes", "copy", "bench/quick", "more/", "--make-parents")
    assert outcome.code == 0, outcome.err
    assert "plrm bench --recipe more/quick.yaml" in (workdir / "more" / "quick.yaml").read_text()
    assert sorted(p.name for p in (workdir / "new" / "sub").iterdir()) == ["q.yaml"]  # no temporary file left
