"""Entry-point plugins: the example plugin plrm-shrinkage end to end, broken plugins, and the registry's rules.

plugins/plrm-shrinkage must be installed (CI does: ``pip install -c constraints/cpu.txt ./plugins/plrm-shrinkage``);
its absence is a failure, not a skip. The broken plugins are real distributions (a package plus a
``.dist-info`` folder) on PYTHONPATH, seen by ``importlib.metadata`` in a subprocess like any installed one: a
method whose import raises, a recipes folder whose package raises, and recipes of which one takes a built-in's
name. The registry rules use a fresh ``Registry`` with fake entry points through its ``_entry_points_fn`` hook
(tests/test_recipe.py does the same for recipe folders).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import plrm.runner
from plrm import registry
from plrm.cli import main
from plrm.methods.base import PersonalizedRewardModel
from plrm.methods.bt import GlobalBT
from plrm.methods.lore import LoRe
from plrm.recipe import all_recipes, find_recipe
from plrm.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parents[1]
PLUGIN_RECIPE = "shrinkage_quickstart"  # shipped in the package, found through the plrm.recipes entry point
PLRM = [sys.executable, "-m", "plrm.cli"]

# Quickstart shrunk to a few seconds. Measured with these sizes (split seed 0): shrunk_individual seen 98.2%,
# unseen 94.8% (k=9), bt unseen 85.7%, non-personalized oracle unseen 87.9%.
SMALL_WORLD = ["data.n_users=120", "data.n_train_prompts=300", "data.n_test_prompts=30",
               "data.test_prompts_per_user=20", "eval.k_list=[9]"]
TINY_QUICKSTART = ["data.n_users=60", "data.n_train_prompts=200", "data.n_test_prompts=20",
                   "data.test_prompts_per_user=10", "methods.bt.max_epochs=2", "methods.lore.max_epochs=2",
                   "logger.kind=none", "trainer.progress_bar=false", "trainer.num_threads=1"]


def run_cli(args: list[str], pythonpath: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "COLUMNS": "300"}  # wide enough that rich's tables do not wrap the names we look for
    env.pop("PLRM_PLUGINS", None)
    env.pop("PLRM_DISABLE_PLUGIN_AUTOLOAD", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([*PLRM, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# ---- the example plugin, installed --------------------------------------------------------------------------
def test_example_plugin_is_installed_with_its_entry_point():
    eps = {ep.name: ep for ep in md.entry_points(group="plrm.methods")}
    assert "shrunk_individual" in eps, ("plrm-shrinkage is not installed; run "
                                        "`pip install -c constraints/cpu.txt ./plugins/plrm-shrinkage`")
    ep = eps["shrunk_individual"]
    assert ep.value == "plrm_shrinkage.method:ShrunkIndividualRM"
    assert (ep.dist.metadata["Name"], ep.dist.version) == ("plrm-shrinkage", "0.1.0")
    recipes = {ep.name: ep for ep in md.entry_points(group="plrm.recipes")}
    assert recipes["shrinkage"].value == "plrm_shrinkage:recipes"


def test_example_plugin_recipe_is_found_by_name_in_the_installed_package():
    import plrm_shrinkage

    path = find_recipe(PLUGIN_RECIPE)
    assert path == Path(plrm_shrinkage.__file__).parent / "recipes" / "shrinkage_quickstart.yaml"
    assert not (REPO / "plugins" / "plrm-shrinkage" / "recipes").exists()  # moved into the package
    origin = all_recipes()[PLUGIN_RECIPE].origin
    assert (origin.distribution, origin.version, origin.entry_point) == (
        "plrm-shrinkage", "0.1.0", "plrm_shrinkage:recipes")
    assert f"plrm fit --recipe {PLUGIN_RECIPE}\n" in path.read_text()  # its header says how to run it


def test_example_plugin_recipe_shows_and_copies_by_name(tmp_path, capsys):
    assert main(["recipes", "show", PLUGIN_RECIPE]) == 0
    shown = capsys.readouterr().out
    assert "name: shrinkage_quickstart" in shown and "user_l2: 0.01" in shown
    assert main(["recipes", "copy", PLUGIN_RECIPE, str(tmp_path)]) == 0
    copied = (tmp_path / "shrinkage_quickstart.yaml").read_text()
    assert copied.startswith("# copied from plrm recipe 'shrinkage_quickstart' (extends merged)")
    assert "shrunk_individual:" in copied and "\nextends:" not in copied


def test_example_plugin_shows_in_plrm_list_with_its_package(plrm_list):
    assert plrm_list.returncode == 0, plrm_list.stderr
    assert "shrunk_individual" in plrm_list.stdout
    assert "plrm-shrinkage 0.1.0" in plrm_list.stdout
    assert not [b for b in registry.methods.broken() if b.origin.distribution == "plrm-shrinkage"]


def test_example_plugin_origin_and_builtins_unchanged():
    origin = registry.methods.origin("shrunk_individual")
    assert (origin.distribution, origin.version) == ("plrm-shrinkage", "0.1.0")
    assert origin.entry_point == "plrm_shrinkage.method:ShrunkIndividualRM"
    assert not origin.is_builtin
    assert registry.methods.origin("lore").is_builtin
    assert issubclass(registry.methods.get("shrunk_individual"), PersonalizedRewardModel)


def test_example_plugin_runs_from_its_recipe_and_is_recorded(tmp_path):
    result = plrm.runner.fit(PLUGIN_RECIPE, ["logger.kind=none", f"run.output_dir={tmp_path}",
                                                  "trainer.progress_bar=false", "~methods.lore", *SMALL_WORLD],
                             show=False)
    written = json.loads((result.run_dir / "results.json").read_text())
    assert written["plugins"] == [{
        "registry": "methods", "name": "shrunk_individual", "distribution": "plrm-shrinkage", "version": "0.1.0",
        "entry_point": "plrm_shrinkage.method:ShrunkIndividualRM"}]
    unseen = written["summary"]["shrunk_individual"]["unseen"]["accuracy"]["mean"]
    seen = written["summary"]["shrunk_individual"]["seen"]["accuracy"]["mean"]
    bt_unseen = written["summary"]["bt"]["unseen"]["accuracy"]["mean"]
    assert unseen > 0.85 and seen > 0.9  # measured 0.948 and 0.982
    assert unseen > bt_unseen + 0.03     # personalization pays from 9 pairs: measured 0.948 vs 0.857


def test_example_plugin_reward_table_equals_its_row_scores():
    """The plugin's (item x user) reward table, which evaluation reads instead of gathering a D-vector per row,
    equals user_reward on every (item, user)."""
    import torch

    torch.manual_seed(0)
    cls = registry.methods.get("shrunk_individual")
    model = cls(cls.Config(), n_users=6, feature_dim=5)
    with torch.no_grad():
        model.delta.normal_()
        model.shared.weight.normal_()
    z, users = torch.randn(7, 5), torch.tensor([1, 4, 5])
    table = model.reward_table(z, users)
    rows = model.user_reward(z.repeat_interleave(3, 0), users.repeat(7)).view(7, 3)
    torch.testing.assert_close(table, rows)


# ---- a broken plugin, installed for real ------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_plugin_path(tmp_path_factory, broken_plugin_writer) -> Path:
    """A directory that, on sys.path, holds an installed distribution whose entry point fails to import."""
    site = tmp_path_factory.mktemp("site")
    broken_plugin_writer(site)
    write_recipe_plugins(site)
    return site


def write_distribution(site: Path, name: str, version: str, entry_points: str) -> None:
    """The ``.dist-info`` folder that makes ``importlib.metadata`` see an installed distribution."""
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(entry_points)


def write_recipe_plugins(site: Path) -> None:
    """Two recipe plugins: 'clashing-recipes' ships quickstart (a built-in's name) and extra_quickstart;
    'broken-recipes' names a folder of broken_plugin, whose import raises (conftest.write_broken_plugin)."""
    folder = site / "clashing_recipes" / "recipes"
    folder.mkdir(parents=True)
    (site / "clashing_recipes" / "__init__.py").write_text("")
    (folder / "quickstart.yaml").write_text("description: not the built-in quickstart\n")
    (folder / "extra_quickstart.yaml").write_text("extends: quickstart\ndescription: quickstart from a plugin\n")
    write_distribution(site, "clashing-recipes", "0.0.2", "[plrm.recipes]\nclashing = clashing_recipes:recipes\n")
    write_distribution(site, "broken-recipes", "0.0.3", "[plrm.recipes]\nbroken_recipes = broken_plugin:recipes\n")


@pytest.fixture(scope="module")
def plrm_list(broken_plugin_path) -> subprocess.CompletedProcess:
    """One `plrm list` (a subprocess costs seconds of imports) with the broken plugin beside the example one."""
    return run_cli(["list"], pythonpath=broken_plugin_path)


def test_broken_plugin_is_listed_with_its_error(plrm_list):
    assert plrm_list.returncode == 0, plrm_list.stderr
    broken_table = plrm_list.stdout[plrm_list.stdout.index("broken plugins"):]
    for text in ("broken_method", "broken-plugin 0.0.1", "ImportError: boom: missing dependency"):
        assert text in broken_table
    assert "shrunk_individual" not in broken_table
    assert "lore" in plrm_list.stdout  # built-ins still list


def test_broken_recipes_entry_point_and_recipe_clash_are_listed(plrm_list):
    broken_table = plrm_list.stdout[plrm_list.stdout.index("broken plugins"):]
    for text in ("plrm.recipes", "broken_recipes", "broken-recipes 0.0.3", "ImportError: boom: missing dependency",
                 "clashing-recipes 0.0.2", "name clash: recipe 'quickstart'", "would replace the built-in recipe"):
        assert text in broken_table


def test_recipes_list_shows_plugin_recipes_with_their_origin_and_what_was_left_out(broken_plugin_path, tmp_path):
    proc = run_cli(["recipes", "list"], pythonpath=broken_plugin_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.match(r"name +from +description", lines[0])
    assert any(re.match(r"shrinkage_quickstart +plrm-shrinkage 0\.1\.0 +Individual RM with shrinkage", ln)
               for ln in lines)
    assert any(re.match(r"extra_quickstart +clashing-recipes 0\.0\.2 +quickstart from a plugin", ln) for ln in lines)
    assert any(re.match(r"quickstart +built-in +LoRe vs Global RM", ln) for ln in lines)  # the built-in kept its name
    left_out = [ln for ln in lines if ln.startswith("left out: ")]
    assert len(left_out) == 2
    assert any("plrm.recipes entry point 'clashing' of clashing-recipes 0.0.2: name clash: recipe 'quickstart'" in ln
               for ln in left_out)
    assert any("plrm.recipes entry point 'broken_recipes' of broken-recipes 0.0.3: ImportError: boom" in ln
               for ln in left_out)


def test_broken_plugin_does_not_break_other_runs(broken_plugin_path, tmp_path):
    out = tmp_path / "runs"
    proc = run_cli(["fit", "--recipe", "quickstart", *TINY_QUICKSTART, f"run.output_dir={out}"],
                   pythonpath=broken_plugin_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a plugin recipe of the same name is left out, and the run says so once
    assert proc.stderr.count("plrm: recipe 'quickstart' is the one from plrm ") == 1
    assert "the recipe of that name in clashing-recipes 0.0.2 is left out (name clash)" in proc.stderr
    written = json.loads((out / "quickstart" / "results.json").read_text())
    assert set(written["summary"]) >= {"bt", "lore"}
    assert written["plugins"] == []


def test_recipe_naming_broken_plugin_fails_with_its_error(broken_plugin_path, tmp_path):
    recipe = tmp_path / "uses_broken.yaml"
    recipe.write_text("extends: quickstart\nmethods:\n  broken_method: {}\n")
    proc = run_cli(["fit", "--recipe", str(recipe), *TINY_QUICKSTART, f"run.output_dir={tmp_path / 'runs'}"],
                   pythonpath=broken_plugin_path, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "methods.broken_method.name" in proc.stderr
    assert "broken-plugin 0.0.1, which failed to load" in proc.stderr
    assert "boom: missing dependency" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- registry rules, with fake entry points ---------------------------------------------------------------
class FakeDist:
    def __init__(self, name: str, version: str):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Duck-types importlib.metadata.EntryPoint: name, value, dist, load(); counts loads."""

    def __init__(self, name: str, obj: object = None, error: Exception | None = None,
                 dist: str = "fake-plugin", version: str = "1.2.3"):
        self.name, self.value, self.dist = name, f"fake_plugin:{name}", FakeDist(dist, version)
        self._obj, self._error, self.loads = obj, error, 0

    def load(self) -> object:
        self.loads += 1
        if self._error is not None:
            raise self._error
        return self._obj


class PluginMethod(PersonalizedRewardModel):
    """A stand-in plugin method."""


def fresh_registry(entry_points: list[FakeEntryPoint]) -> Registry:
    reg = Registry("method", "plrm.methods", PersonalizedRewardModel)
    reg.register("lore")(LoRe)
    reg.register("bt")(GlobalBT)
    reg._entry_points_fn = lambda group: entry_points if group == "plrm.methods" else []
    return reg


@pytest.fixture(autouse=True)
def _default_plugin_env(monkeypatch):
    monkeypatch.delenv("PLRM_PLUGINS", raising=False)
    monkeypatch.delenv("PLRM_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def test_plugin_loads_with_its_origin():
    reg = fresh_registry([FakeEntryPoint("a", PluginMethod)])
    assert reg.get("a") is PluginMethod
    assert reg.names() == ["a", "bt", "lore"]
    origin = reg.origin("a")
    assert (origin.distribution, origin.version, origin.entry_point) == ("fake-plugin", "1.2.3", "fake_plugin:a")
    assert str(origin) == "fake-plugin 1.2.3"


def test_plugin_named_like_a_builtin_is_a_name_clash_and_the_builtin_stays():
    reg = fresh_registry([FakeEntryPoint("lore", PluginMethod, dist="impostor", version="9.9")])
    assert reg.get("lore") is LoRe
    assert reg.origin("lore").is_builtin
    (broken,) = reg.broken()
    assert (broken.name, broken.group, str(broken.origin)) == ("lore", "plrm.methods", "impostor 9.9")
    assert "name clash" in broken.error and "would replace a built-in" in broken.error


def test_second_plugin_with_a_taken_name_is_a_name_clash():
    first = FakeEntryPoint("shared_name", PluginMethod, dist="first-plugin")
    second = FakeEntryPoint("shared_name", type("Other", (PersonalizedRewardModel,), {}), dist="second-plugin")
    reg = fresh_registry([first, second])
    assert reg.get("shared_name") is PluginMethod
    (broken,) = reg.broken()
    assert str(broken.origin).startswith("second-plugin")
    assert "name clash" in broken.error and "first-plugin 1.2.3" in broken.error


def test_plugin_that_is_not_a_method_class_is_broken():
    reg = fresh_registry([FakeEntryPoint("not_a_method", object), FakeEntryPoint("a_function", len)])
    assert reg.names() == ["bt", "lore"]
    errors = {b.name: b.error for b in reg.broken()}
    assert set(errors) == {"not_a_method", "a_function"}
    for error in errors.values():
        assert "must be a subclass of plrm.methods.base.PersonalizedRewardModel" in error


def test_plugin_import_error_is_recorded_and_the_rest_load():
    reg = fresh_registry([FakeEntryPoint("bad", error=ImportError("boom: missing dependency")),
                          FakeEntryPoint("good", PluginMethod)])
    assert reg.get("good") is PluginMethod
    (broken,) = reg.broken()
    assert broken.error.startswith("ImportError: boom: missing dependency (fix or reinstall fake-plugin")
    with pytest.raises(RegistryError, match=r"method 'bad' comes from plugin fake-plugin 1.2.3, which failed "
                                            r"to load: ImportError: boom"):
        reg.get("bad")


def test_unknown_name_suggests_the_closest():
    reg = fresh_registry([FakeEntryPoint("shrunk_individual", PluginMethod)])
    with pytest.raises(RegistryError, match=r"unknown method 'lora'\. Did you mean 'lore'\? "
                                            r"Available: bt, lore, shrunk_individual"):
        reg.get("lora")
    with pytest.raises(RegistryError, match="Did you mean 'shrunk_individual'"):
        reg.get("shrunk_individuals")


def test_disable_autoload_loads_no_plugin(monkeypatch):
    monkeypatch.setenv("PLRM_DISABLE_PLUGIN_AUTOLOAD", "1")
    ep = FakeEntryPoint("a", PluginMethod)
    reg = fresh_registry([ep, FakeEntryPoint("bad", error=ImportError("boom"))])
    assert reg.names() == ["bt", "lore"]
    assert reg.broken() == []
    assert ep.loads == 0
    with pytest.raises(RegistryError, match="unknown method 'a'"):
        reg.get("a")


def test_plrm_plugins_loads_only_the_named_ones(monkeypatch):
    monkeypatch.setenv("PLRM_PLUGINS", "a")
    a, b = FakeEntryPoint("a", PluginMethod), FakeEntryPoint("b", PluginMethod)
    reg = fresh_registry([a, b, FakeEntryPoint("bad", error=ImportError("boom"))])
    assert reg.names() == ["a", "bt", "lore"]
    assert reg.broken() == []
    assert (a.loads, b.loads) == (1, 0)


def test_plrm_plugins_naming_another_groups_entry_point_is_no_typo(monkeypatch, capsys):
    """PLRM_PLUGINS holds entry-point names of every group: a recipes folder's name is not reported by the
    method registry as unknown; a name no group has is."""
    monkeypatch.setenv("PLRM_PLUGINS", "a,shrinkage,nosuchplugin")
    groups = {"plrm.methods": [FakeEntryPoint("a", PluginMethod)], "plrm.recipes": [FakeEntryPoint("shrinkage")]}
    reg = fresh_registry([])
    reg._entry_points_fn = lambda group: groups.get(group, [])
    assert reg.names() == ["a", "bt", "lore"]
    err = capsys.readouterr().err
    assert "PLRM_PLUGINS names 'nosuchplugin', but no installed method plugin has that name" in err
    assert "'shrinkage'" not in err and "'a'" not in err
