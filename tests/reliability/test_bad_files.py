"""Bad files of the catalogue: a damaged file in a finished run, a plugin that exits when imported, a W&B logger
asked to go online without credentials. Each gives one clear error (exit 2, naming the file or the plugin and what
to do), never a traceback, never torch's advice to load unsafely, and leaves every other file as it was.

A finished run is fitted once per module and copied into each case's working directory (a fit takes seconds).
The plugin cases install a real distribution (a package plus a ``.dist-info`` folder) on ``sys.path`` in this
process, and make the registries and the recipe index read the entry points again before and after.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from harness import TINY_FIT, assert_bad_input, tree_digest  # noqa: E402  (tests/reliability/harness.py, on sys.path via conftest)

from plrm import cli, registry
from plrm import recipe as recipe_module
from plrm.errors import RecipeError
from plrm.tracking import check_logger

RUN = Path("runs") / "done"
SEED = RUN / "seed-0"


# ---- damaged files of a finished run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def done_template(tmp_path_factory) -> Path:
    """One finished tiny run (``runs/done``, fitted with the working directory as cwd), copied by each case."""
    root = tmp_path_factory.mktemp("template")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = cli.main(["fit", *TINY_FIT, "run.name=done"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return root / RUN


@pytest.fixture
def done(workdir, done_template) -> Path:
    shutil.copytree(done_template, workdir / RUN)
    return workdir / RUN


class Evil:
    """Pickles as a call of os.system: what a tampered checkpoint holds. Loading it must never run it."""

    def __reduce__(self):
        return os.system, ("touch PWNED",)


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def malicious(path: Path) -> None:
    good = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({**good, "method": Evil()}, path)  # a real checkpoint, plus one object that runs a command


DAMAGED_CHECKPOINT = "is damaged or not a plrm checkpoint"
UNPICKLE = "holds objects plrm will not unpickle"
DAMAGED_SPLIT = "is damaged"

# (file in the run, damage, command after `plrm`, what the one-line error must also say)
DAMAGE_CASES = [
    ("bt.ckpt", random_bytes, ["test"], [DAMAGED_CHECKPOINT, "plrm fit --recipe"]),
    ("bt.ckpt", truncated, ["test"], [DAMAGED_CHECKPOINT, "truncated"]),
    ("bt.ckpt", empty, ["test"], [DAMAGED_CHECKPOINT, "empty (0 bytes)"]),
    ("bt.ckpt", malicious, ["test"], [UNPICKLE, "system", "do not load it by other means"]),
    ("lore.ckpt", truncated, ["test"], [DAMAGED_CHECKPOINT]),
    ("bt.ckpt", truncated, ["adapt"], [DAMAGED_CHECKPOINT]),
    ("lore.ckpt", malicious, ["adapt"], [UNPICKLE]),  # adapt reads every checkpoint before writing any
    ("bt.ckpt", random_bytes, ["export", "--method", "bt", "--out", "x"], [DAMAGED_CHECKPOINT]),
    ("bt.ckpt", malicious, ["export", "--method", "bt", "--out", "x"], [UNPICKLE]),
    ("split.parquet", truncated, ["test"], [DAMAGED_SPLIT, "cannot be rebuilt from it"]),
    ("split.parquet", random_bytes, ["test"], [DAMAGED_SPLIT, "cannot be rebuilt from it"]),
    ("split.parquet", empty, ["adapt"], [DAMAGED_SPLIT]),
    ("split.parquet", truncated, ["export", "--method", "bt", "--out", "x"], [DAMAGED_SPLIT]),
]


def _case_id(case) -> str:
    name, damage, verb, _ = case.values if hasattr(case, "values") else case
    return f"{name}-{damage.__name__}-{verb[0]}"


@pytest.mark.parametrize("name, damage, verb, says", DAMAGE_CASES, ids=[_case_id(c) for c in DAMAGE_CASES])
def test_damaged_run_file_is_one_clear_error_and_changes_nothing(done, workdir, plrm_cmd, name, damage, verb, says):
    damaged = SEED / name
    damage(workdir / damaged)
    before = tree_digest(workdir)
    outcome = plrm_cmd(verb[0], "--run", str(RUN), *verb[1:])
    assert_bad_input(outcome, str(damaged), *says)
    assert "weights_only=False" not in outcome.err and "weights_only" not in outcome.out
    assert tree_digest(workdir) == before  # nothing written (test_results.json, x/), nothing removed
    assert not (workdir / "PWNED").exists()


def test_checkpoint_of_another_run_names_both_runs(tmp_path):
    """The lead's Run calls checkpoint_mismatch_error when a checkpoint's tensors do not fit: it names the run
    that wrote the file and the run that reads it."""
    from plrm.checkpoint import checkpoint_mismatch_error

    try:
        torch.nn.Linear(3, 4).load_state_dict({"weight": torch.zeros(5, 3), "bias": torch.zeros(5)})
    except RuntimeError as exc:
        error = checkpoint_mismatch_error(tmp_path / "bt.ckpt", {"run": "aaa111"}, "bbb222", exc)
    message = str(error)
    for text in (str(tmp_path / "bt.ckpt"), "size mismatch for weight", "written by run 'aaa111'", "'bbb222'"):
        assert text in message
    assert "weights_only" not in message


# ---- a plugin that exits when it is imported --------------------------------------------------------------------
EXITING_MODULE = """\
import argparse

parser = argparse.ArgumentParser(prog="exiting-tool")
parser.add_argument("--config", required=True)
parser.parse_args([])  # a script's command line, parsed at import: argparse prints its usage and exits 2
"""


def write_exiting_plugin(site: Path, dist: str, group: str, entry: str) -> None:
    package = dist.replace("-", "_")
    (site / package).mkdir()
    (site / package / "__init__.py").write_text(EXITING_MODULE)
    info = site / f"{package}-0.0.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.5\n")
    attr = "recipes" if group == "plrm.recipes" else "Method"
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry} = {package}:{attr}\n")


def forget_plugins() -> None:
    importlib.invalidate_caches()
    registry.forget_plugins()
    recipe_module.plugin_recipes.cache_clear()


@pytest.fixture
def install(monkeypatch, tmp_path_factory):
    """``install(dist, group, entry)``: an installed distribution whose entry point exits when imported."""
    sites = []

    def _install(dist: str, group: str, entry: str) -> None:
        site = tmp_path_factory.mktemp("site")
        write_exiting_plugin(site, dist, group, entry)
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.delenv("PLRM_PLUGINS", raising=False)
        monkeypatch.delenv("PLRM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        sites.append(str(site))
        forget_plugins()

    yield _install
    for site in sites:  # gone before the registries read the entry points again: later tests see what is installed
        if site in sys.path:
            sys.path.remove(site)
    forget_plugins()


def fit_naming_the_plugin(workdir: Path) -> list[str]:
    (workdir / "uses_exiting.yaml").write_text("extends: quickstart\nmethods:\n  exiting_method: {}\n")
    return ["fit", "--recipe", "uses_exiting.yaml", "logger.kind=none"]


# (id, PLRM_PLUGINS, command, exit code, text in stdout, text in stderr, text stderr must not have)
PLUGIN_CASES = [
    ("list", None, lambda w: ["list"], 0,
     ["broken plugins", "exiting_method", "exiting-plugin 0.0.5", "raised SystemExit(2) at import"], [],
     ["usage: exiting-tool"]),
    ("list-methods", None, lambda w: ["list", "methods"], 0, ["lore", "bt"], [], ["usage: exiting-tool"]),
    ("recipes-list", None, lambda w: ["recipes", "list"], 0, ["quickstart"], [], ["usage:"]),
    ("allowlisted", "exiting_method", lambda w: ["list", "methods"], 0, [],
     ["PLRM_PLUGINS names 'exiting_method', a method plugin of exiting-plugin 0.0.5, which failed to load",
      "SystemExit(2)"], ["no installed", "usage: exiting-tool"]),
    ("allowlisted-by-distribution", "exiting-plugin", lambda w: ["list", "methods"], 0, [],
     ["'exiting-plugin', which is a distribution, not an entry point", "exiting_method"],
     ["no installed dataset plugin", "no installed backbone plugin"]),
    ("recipe-naming-it", None, fit_naming_the_plugin, 2, [],
     ["exiting_method", "exiting-plugin 0.0.5, which failed to load", "raised SystemExit(2) at import"],
     ["usage: exiting-tool"]),
]


@pytest.mark.parametrize("env, command, code, out_has, err_has, err_lacks",
                         [c[1:] for c in PLUGIN_CASES], ids=[c[0] for c in PLUGIN_CASES])
def test_plugin_exiting_at_import_is_isolated(install, workdir, plrm_cmd, monkeypatch, env, command, code, out_has,
                                              err_has, err_lacks):
    install("exiting-plugin", "plrm.methods", "exiting_method")
    if env is not None:
        monkeypatch.setenv("PLRM_PLUGINS", env)
    args = command(workdir)
    before = tree_digest(workdir)
    outcome = plrm_cmd(*args)
    if code == 2:
        assert_bad_input(outcome, *err_has)
    else:
        assert outcome.code == code, outcome.err
        assert "Traceback" not in outcome.err
        for text in err_has:
            assert text in outcome.err, outcome.err
    for text in out_has:
        assert text in outcome.out, outcome.out
    for text in err_lacks:
        assert text not in outcome.err, outcome.err
    assert tree_digest(workdir) == before


def test_plugin_exiting_at_import_leaves_other_runs_working(install, workdir, plrm_cmd, tiny_fit):
    install("exiting-plugin", "plrm.methods", "exiting_method")
    outcome = plrm_cmd("fit", *tiny_fit, "run.name=ok")
    assert outcome.code == 0, outcome.err
    assert "usage: exiting-tool" not in outcome.err
    assert (workdir / "runs" / "ok" / "results.json").is_file()


def test_recipes_entry_point_exiting_at_import_is_isolated(install, workdir, plrm_cmd):
    install("exiting-recipes", "plrm.recipes", "exiting_recipes")
    outcome = plrm_cmd("list")
    assert outcome.code == 0, outcome.err
    assert "exiting_recipes" in outcome.out and "raised SystemExit(2) at import" in outcome.out
    outcome = plrm_cmd("recipes", "list")
    assert outcome.code == 0, outcome.err
    assert "quickstart" in outcome.out and "usage: exiting-tool" not in outcome.err


# ---- W&B online without credentials -------------------------------------------------------------------------------
@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path_factory):
    """No W&B key anywhere: no WANDB_API_KEY, and HOME / NETRC pointing at an empty folder."""
    home = tmp_path_factory.mktemp("home")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    return home


# (id, logger overrides, WANDB_MODE, what the error names)
ONLINE_CASES = [
    ("mode-online", ["logger.kind=wandb", "logger.mode=online"], None, "logger.mode=online"),
    ("auto-with-WANDB_MODE", ["logger.kind=wandb", "logger.mode=auto"], "online",
     "logger.mode=auto with WANDB_MODE=online"),
]


@pytest.mark.parametrize("overrides, wandb_mode, names", [c[1:] for c in ONLINE_CASES],
                         ids=[c[0] for c in ONLINE_CASES])
def test_wandb_online_without_credentials_is_refused_before_any_write(no_wandb_credentials, workdir, plrm_cmd,
                                                                      tiny_fit, monkeypatch, overrides, wandb_mode,
                                                                      names):
    if wandb_mode:
        monkeypatch.setenv("WANDB_MODE", wandb_mode)
    before = tree_digest(workdir)
    outcome = plrm_cmd("fit", *tiny_fit, *overrides, "run.name=online")
    assert_bad_input(outcome, names, "needs W&B credentials", "wandb login", "WANDB_API_KEY", "logger.mode=offline")
    assert tree_digest(workdir) == before  # no run directory was started


# (kind, mode, WANDB_MODE, WANDB_API_KEY, a netrc entry for api.wandb.ai, refused)
LOGGER_CASES = [
    ("wandb", "online", None, None, False, True),
    ("wandb", "auto", "online", None, False, True),
    ("wandb", "online", None, "k" * 40, False, False),
    ("wandb", "online", None, None, True, False),
    ("wandb", "offline", None, None, False, False),
    ("wandb", "auto", None, None, False, False),  # auto without credentials is offline (said once), not an error
    ("csv", "online", None, None, False, False),  # logger.mode only concerns W&B
]


@pytest.mark.parametrize("kind, mode, env_mode, key, netrc_entry, refused", LOGGER_CASES)
def test_check_logger(no_wandb_credentials, monkeypatch, kind, mode, env_mode, key, netrc_entry, refused):
    from plrm.recipe import LoggerSection

    if env_mode:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    if netrc_entry:
        netrc_file = no_wandb_credentials / ".netrc"
        netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
        netrc_file.chmod(0o600)
    monkeypatch.setitem(sys.modules, "wandb", None)  # the check never needs wandb itself
    section = LoggerSection(kind=kind, mode=mode)
    if refused:
        with pytest.raises(RecipeError, match="needs W&B credentials.*wandb login.*WANDB_API_KEY.*logger.mode=offline"):
            check_logger(section)
    else:
        check_logger(section)
