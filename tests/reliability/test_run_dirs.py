"""Run directories: nothing a user owns is ever removed, a failed or killed overwrite leaves the old run, and a
stopped run is marked incomplete and resumable. Part of the bad-input catalogue (plrm.rundir)."""

from __future__ import annotations

import pytest
from harness import TINY_FIT, assert_bad_input, tree_digest

from plrm import runner
from plrm.resume import ResumePoints
from plrm.rundir import read_marker

# (overrides, text the one-line error must contain); each with run.overwrite=true, from <workdir>
REFUSED_NAMES = [
    pytest.param(["run.name=."], "run.name='.' must name a folder inside run.output_dir", id="dot"),
    pytest.param(["run.name=.."], "run.name='..' must name a folder inside run.output_dir", id="dot-dot"),
    pytest.param(["run.name=../notes"], "must name a folder inside run.output_dir", id="climbs-out"),
    pytest.param(["run.name=x/../.."], "must name a folder inside run.output_dir", id="climbs-out-nested"),
    pytest.param(["run.name={workdir}/notes"], "is an absolute path", id="absolute-non-run"),
    pytest.param(["run.output_dir={workdir}", "run.name=runs"], "is not a plrm run (no plrm-run.json)",
                 id="the-runs-root-itself"),
    pytest.param(["run.output_dir={workdir}", "run.name=notes"], "is not a plrm run (no plrm-run.json)",
                 id="a-users-folder"),
    pytest.param(["run.name=done/seed-0"], "would put a run inside the run", id="inside-a-run"),
    pytest.param(["run.name=done", "split.k=1000"], "1000", id="old-run-kept-when-the-split-fails"),
    pytest.param(["run.name=done", "methods.lore.rank=0"], "methods.lore.rank", id="old-run-kept-on-bad-option"),
    pytest.param(["run.name=''"], "run.name", id="empty-name"),
    pytest.param(["run.name=done/inner"], "would put a run inside the run", id="a-run-inside-a-run"),
]


@pytest.mark.parametrize("overrides, message", REFUSED_NAMES)
def test_overwrite_never_touches_what_is_not_a_run(finished_run, workdir, plrm_cmd, overrides, message):
    before = tree_digest(workdir)
    args = [o.format(workdir=workdir) for o in overrides]
    outcome = plrm_cmd("fit", *TINY_FIT, *args, "run.overwrite=true")
    assert_bad_input(outcome, message)
    assert tree_digest(workdir) == before


def test_existing_folder_that_is_not_a_run_is_refused_without_overwrite(workdir, plrm_cmd):
    (workdir / "runs" / "mine").mkdir(parents=True)
    (workdir / "runs" / "mine" / "data.csv").write_text("a,b\n")
    before = tree_digest(workdir)
    outcome = plrm_cmd("fit", *TINY_FIT, "run.name=mine")
    assert_bad_input(outcome, "runs/mine exists and is not a plrm run")
    assert tree_digest(workdir) == before


def test_overwrite_replaces_a_finished_run_and_leaves_no_staging(finished_run, workdir, plrm_cmd):
    old_id = read_marker(finished_run)["id"]
    outcome = plrm_cmd("fit", *TINY_FIT, "run.name=done", "run.overwrite=true", "methods.lore.rank=2")
    assert outcome.code == 0, outcome.err
    marker = read_marker(finished_run)
    assert marker["id"] != old_id and marker["status"] == "complete"
    assert "rank: 2" in (finished_run / "recipe.yaml").read_text()
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["done"]  # no staging or replaced folder


class Stop(Exception):
    pass


def test_a_stopped_overwrite_keeps_the_old_run_and_resumes(finished_run, workdir, monkeypatch):
    before = tree_digest(finished_run)
    args = TINY_FIT[2:] + ["run.name=done", "run.overwrite=true", "methods.lore.rank=2", "run.checkpoint_interval=0"]

    def stop(self, trainer, *a):
        raise Stop()

    with monkeypatch.context() as mp:
        mp.setattr(ResumePoints, "on_train_batch_end", stop)
        with pytest.raises(Stop):
            runner.fit("quickstart", args, show=False)
    assert tree_digest(finished_run) == before  # the old run, untouched
    staging = workdir / "runs" / ".done.plrm-staging"
    assert read_marker(staging)["status"] == "running"

    result = runner.fit("quickstart", args, show=False, resume=True)  # resumes the staged run, then swaps
    assert result.run_dir.resolve() == finished_run.resolve()
    assert read_marker(finished_run)["status"] == "complete"
    assert "rank: 2" in (finished_run / "recipe.yaml").read_text()
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["done"]


def test_an_incomplete_run_is_named_as_such_and_cannot_be_tested(workdir, plrm_cmd, monkeypatch):
    def stop(self, trainer, *a):
        raise Stop()

    with monkeypatch.context() as mp:
        mp.setattr(ResumePoints, "on_train_batch_end", stop)
        with pytest.raises(Stop):
            runner.fit("quickstart", TINY_FIT[2:] + ["run.name=cut"], show=False)
    before = tree_digest(workdir)
    outcome = plrm_cmd("fit", *TINY_FIT, "run.name=cut")
    assert_bad_input(outcome, "runs/cut already exists: an incomplete run", "--resume")
    outcome = plrm_cmd("test", "--run", "runs/cut")
    assert_bad_input(outcome, "runs/cut is an incomplete run", "--resume")
    assert tree_digest(workdir) == before
    outcome = plrm_cmd("fit", *TINY_FIT, "run.name=cut", "--resume")
    assert outcome.code == 0, outcome.err
    assert read_marker(workdir / "runs" / "cut")["status"] == "complete"


@pytest.mark.parametrize("what, make", [
    ("notes.txt", lambda run: (run / "notes.txt").write_text("mine\n")),
    ("analysis/", lambda run: (run / "analysis").mkdir() or (run / "analysis" / "fig.png").write_bytes(b"png")),
])
def test_overwrite_refuses_to_remove_what_plrm_did_not_write(finished_run, workdir, plrm_cmd, what, make):
    make(finished_run)
    before = tree_digest(workdir)
    outcome = plrm_cmd("fit", *TINY_FIT, "run.name=done", "run.overwrite=true")
    assert_bad_input(outcome, "run.overwrite=true would remove what plrm did not write in runs/done", what)
    assert tree_digest(workdir) == before


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"run: [unclosed\n", b"", b"42\n"],
                         ids=["binary", "bad-yaml", "empty", "scalar"])
def test_a_damaged_recipe_yaml_is_named(finished_run, workdir, plrm_cmd, content):
    (finished_run / "recipe.yaml").write_bytes(content)
    before = tree_digest(workdir)
    for verb in (["test", "--run", "runs/done"], ["adapt", "--run", "runs/done"]):
        outcome = plrm_cmd(*verb)
        assert_bad_input(outcome, "runs/done/recipe.yaml is damaged", "restore it")
    outcome = plrm_cmd("fit", *TINY_FIT, "run.name=done", "--resume")
    assert_bad_input(outcome, "runs/done/recipe.yaml is damaged")
    assert tree_digest(workdir) == before
