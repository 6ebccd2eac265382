"""The `plrm` command: help for every verb, exit codes and messages, W&B without credentials."""

import os
import re
import subprocess
import sys

import pytest

from plrm.cli import main

PLRM = [sys.executable, "-m", "plrm.cli"]


@pytest.mark.parametrize("verb", ["fit", "test", "adapt", "list", "recipes"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: plrm {verb}" in out and len(out.splitlines()) > 3


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("fit", "test", "adapt", "list", "recipes"):
        assert verb in out


def test_mistyped_key_exits_2_with_path_and_suggestion(capsys):
    assert main(["fit", "--recipe", "quickstart", "methods.lore.rnak=4", "data.n_user=5"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "methods.lore.rnak: unknown key; did you mean 'rank'?" in err
    assert "data.n_user: unknown key; did you mean 'n_users'?" in err


def test_unknown_recipe_suggests_builtin(capsys):
    assert main(["fit", "--recipe", "quickstrat"]) == 2
    assert "Did you mean 'quickstart'?" in capsys.readouterr().err


def test_print_config_shows_defaults(capsys):
    assert main(["fit", "--recipe", "quickstart", "--print-config", "methods.lore.rank=7"]) == 0
    out = capsys.readouterr().out
    assert "rank: 7" in out and "adapt_steps: 300" in out


def test_recipes_list_show_copy_keys(tmp_path, capsys):
    assert main(["recipes", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert re.match(r"name +from +description$", listing[0])
    assert any(re.match(r"quickstart +built-in +LoRe vs Global RM", line) for line in listing)
    assert main(["recipes", "copy", "quickstart", str(tmp_path)]) == 0
    copied = tmp_path / "quickstart.yaml"
    assert copied.is_file() and "plrm fit --recipe" in copied.read_text()
    assert main(["recipes", "copy", "quickstart", str(tmp_path)]) == 2  # never overwrites
    assert main(["recipes", "keys", "--filter", "basis_l2"]) == 0
    assert "methods.<label>[lore].basis_l2" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_without_wandb_credentials_runs_offline_without_prompt(tmp_path, tiny_overrides):
    """No API key, no WANDB_MODE, stdin closed, a fresh HOME: fit completes offline, says so once, and the
    offline W&B run holds the metrics and the per-user table."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    overrides = [o for o in tiny_overrides if not o.startswith("logger.")] + ["logger.kind=wandb", "~methods.bt"]
    proc = subprocess.run([*PLRM, "fit", "--recipe", "quickstart", *overrides], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("no W&B credentials found") == 1
    runs = list((tmp_path / "quickstart" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"eval/lore/unseen/accuracy" in log and b"eval/lore/seen/accuracy" in log
    tables = list(runs[0].glob("files/media/table/eval/per_user_*.table.json"))
    assert len(tables) == 1 and b"user_id" in tables[0].read_bytes()


def test_help_examples_are_accepted(capsys):
    """The override examples that `plrm fit --help` and `plrm bench --help` print are valid for that verb."""
    from plrm import cli
    from plrm.bench.spec import load_bench
    from plrm.recipe import load_recipe

    for verb, example in (("fit", cli.FIT_OVERRIDES), ("bench", cli.BENCH_OVERRIDES)):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert " ".join(example.split()) in " ".join(capsys.readouterr().out.split())
    load_recipe("quickstart", cli.FIT_OVERRIDES.split())
    spec = load_bench("bench/quick", cli.BENCH_OVERRIDES.split())
    assert spec.bench.seeds == [0, 1, 2] and spec.method_options["lore"]["rank"] == 5
    bench_lines = [line.strip().split("  ")[0].split() for line in cli.EPILOG.splitlines()
                   if line.strip().startswith("plrm bench --recipe")]
    assert any(len(words) > 4 for words in bench_lines)  # one example has overrides
    for words in bench_lines:
        load_bench("bench/quick", [w for w in words[4:] if "=" in w])
    assert "plrm fit --recipe quickstart --resume" in cli.EPILOG


def test_fit_resume_is_passed_on_and_ctrl_c_exits_130(monkeypatch, capsys):
    from plrm import runner

    calls = []
    monkeypatch.setattr(runner, "fit", lambda recipe, **kw: calls.append((recipe.run.name, kw)))
    assert main(["fit", "--recipe", "quickstart", "--resume"]) == 0
    assert main(["fit", "--recipe", "quickstart"]) == 0
    assert calls == [("quickstart", {"resume": True}), ("quickstart", {"resume": False})]
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "seed-<s>/<label>.last.ckpt" in " ".join(capsys.readouterr().out.split())

    def interrupted(recipe, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "fit", interrupted)
    assert main(["fit", "--recipe", "quickstart"]) == 130


def test_adapt_active_gets_its_defaults(monkeypatch, tmp_path):
    from plrm import runner

    (tmp_path / "recipe.yaml").write_text("{}\n")  # a run directory, as far as the command line checks
    calls = []
    monkeypatch.setattr(runner, "active", lambda *a: calls.append(a))
    assert main(["adapt", "--run", str(tmp_path), "--active"]) == 0
    assert main(["adapt", "--run", str(tmp_path), "--active", "--budget", "6", "--eval-at", "2", "6",
                 "--strategy", "random", "--answers", "oracle"]) == 0
    assert calls == [(str(tmp_path), 40, ("uncertainty", "random"), "labels", None),
                     (str(tmp_path), 6, ("random",), "oracle", [2, 6])]


def test_list_plugins_says_when_none_is_installed(monkeypatch, capsys):
    from plrm import cli, recipe, registry

    assert main(["list", "plugins"]) == 0  # the example plugin is installed: its method and its recipe
    out = capsys.readouterr().out
    assert "shrunk_individual" in out and "shrinkage_quickstart" in out
    for reg in registry.REGISTRIES.values():
        builtin = [(n, c) for n, c in reg.items() if reg.origin(n).is_builtin]
        monkeypatch.setattr(reg, "items", lambda builtin=builtin: builtin)
        monkeypatch.setattr(reg, "broken", lambda: [])
    monkeypatch.setattr(recipe, "plugin_recipes", lambda: recipe.PluginRecipes({}, [], {}))
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    assert main(["list", "plugins"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no plugins installed") and "pip install" in out and "CONTRIBUTING.md" in out
    assert "plugins/plrm-shrinkage" in cli.no_plugins_message()
