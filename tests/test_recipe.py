"""Recipes (plrm/recipe.py): every built-in recipe validates; every problem is reported with its key path."""

from __future__ import annotations

import re

import pytest
import yaml

import plrm.recipe as recipe_module
from plrm.methods.lore import LoRe
from plrm.recipe import (
    RecipeError,
    all_recipes,
    builtin_recipes,
    find_recipe,
    load_recipe,
    schema_rows,
)

BUILTIN = {n: p for n, p in builtin_recipes().items() if not n.startswith("bench/")}  # run recipes
BENCH = {n: p for n, p in builtin_recipes().items() if n.startswith("bench/")}  # tests/bench checks these


def small(**sections) -> dict:
    """A minimal valid recipe as a dict, with some sections replaced."""
    return {"data": {"name": "lowrank_world", "n_users": 40, "pairs_per_user": 10, "n_train_prompts": 100,
                     "n_test_prompts": 20, "feature_dim": 16},
            "methods": {"lore": {"rank": 2}}, **sections}


def problems_of(recipe, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, overrides)
    return str(err.value)


# ---- the shipped recipes ---------------------------------------------------------------------------------------
def test_there_are_builtin_recipes():
    assert "quickstart" in BUILTIN


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.methods, f"{name} runs no method"
    assert recipe.data.config is not None
    # the resolved recipe written to a run directory loads back to the same options
    again = load_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again.data == recipe.data and again.methods == recipe.methods and again.split == recipe.split


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_recipe_header_says_how_to_run_it(name):
    """STYLE.md: a header comment saying what the recipe runs and the `plrm fit --recipe` line."""
    header = BUILTIN[name].read_text().splitlines()[0]
    assert header.startswith("# ")
    assert f"plrm fit --recipe {name}" in BUILTIN[name].read_text()


def test_quickstart_values():
    recipe = load_recipe("quickstart")
    assert recipe.data.name == "lowrank_world" and recipe.data.config.n_users == 600
    assert recipe.backbone.name == "precomputed"
    assert recipe.methods["lore"].name == "lore" and recipe.methods["lore"].config.rank == 4
    assert recipe.eval.k_list == [1, 3, 9, 27]


# ---- unknown keys, wrong types, unknown names -------------------------------------------------------------------
def test_every_unknown_key_is_reported_with_its_path_and_a_suggestion():
    message = problems_of("quickstart", ["data.n_usres=3", "methods.lore.rnak=3", "trainer.acelerator=gpu"])
    assert message.startswith("quickstart: 3 problem(s):")
    assert "data.n_usres: unknown key; did you mean 'n_users'?" in message
    assert "methods.lore.rnak: unknown key; did you mean 'rank'?" in message
    assert "trainer.acelerator: unknown key; did you mean 'accelerator'?" in message


def test_unknown_section():
    message = problems_of(small(runn={"name": "x"}))
    assert "runn: unknown section; did you mean 'run'?" in message


def test_unknown_key_without_close_match_lists_the_valid_keys():
    message = problems_of(small(run={"zzzzzz": 1}))
    assert "run.zzzzzz: unknown key; valid keys: name, output_dir, seed, seed_per_split, overwrite" in message


def test_wrong_type():
    assert "split.k: expected int, got 'abc'" in problems_of("quickstart", ["split.k=abc"])
    assert "logger.kind: expected 'wandb' | 'csv' | 'tensorboard' | 'none', got 'mlflow'" in problems_of(
        small(logger={"kind": "mlflow"}))
    assert "split.seeds: expected list[int], got [0, 'one']" in problems_of(small(split={"seeds": [0, "one"]}))


def test_ints_are_accepted_as_floats():
    assert load_recipe(small(split={"unseen_fraction": 0}), None).split.unseen_fraction == 0.0


def test_unknown_method_name():
    message = problems_of("quickstart", ["methods.lore.name=lorre"])
    assert re.search(r"methods\.lore\.name: unknown method 'lorre'\. Did you mean 'lore'\? Available: .*lore", message)


def test_method_label_without_a_registered_name():
    message = problems_of(small(methods={"mine": {"rank": 2}}))
    assert "methods.mine.name: unknown method 'mine'." in message


def test_unknown_dataset_and_backbone():
    message = problems_of(small(data={"name": "lowrank_wrld"}, backbone={"name": "precomputd"}))
    assert "data.name: unknown dataset 'lowrank_wrld'. Did you mean 'lowrank_world'?" in message
    assert "backbone.name: unknown backbone 'precomputd'. Did you mean 'precomputed'?" in message


def test_missing_data_section():
    message = problems_of("quickstart", ["~data"])
    assert message == ("quickstart: 1 problem(s):\n  data: required section is missing "
                       "(which dataset to use; see `plrm list datasets`)")


def test_missing_methods_section():
    assert "methods: required section is missing or empty" in problems_of({"data": small()["data"]})


def test_missing_required_option():
    message = problems_of(small(data={"name": "preference_files"}))
    assert "data.path: required key is missing (A file, or a directory of files" in message


def test_range_checks():
    message = problems_of(small(split={"unseen_fraction": 1.0, "k": 0, "seeds": []}, eval={"k_list": [0, 3]}))
    assert "split.unseen_fraction: must be in [0, 1), got 1.0" in message
    assert "split.k: must be >= 1, got 0" in message
    assert "split.seeds: must not be empty" in message
    assert "eval.k_list[0]: must be >= 1, got 0" in message
    assert "4 problem(s)" in message


def test_config_post_init_error_is_reported_with_its_path():
    message = problems_of("quickstart", ["data.pairs_per_user=20000"])
    assert "data: pairs_per_user=20000 exceeds n_train_prompts=2000" in message


def test_section_that_is_not_a_mapping():
    assert "split: must be a mapping, got 3" in problems_of(small(split=3))


# ---- methods section ----------------------------------------------------------------------------------------------
def test_method_name_defaults_to_its_label():
    recipe = load_recipe(small(methods={"lore": {}, "bt": None}))
    assert recipe.methods["lore"].name == "lore" and recipe.methods["bt"].name == "bt"
    assert recipe.methods["lore"].config.rank == 10  # the declared default


def test_two_labels_of_one_method():
    recipe = load_recipe(small(methods={"lore_r2": {"name": "lore", "rank": 2}, "lore_r8": {"name": "lore", "rank": 8}}))
    assert [(m.name, m.config.rank) for m in recipe.methods.values()] == [("lore", 2), ("lore", 8)]


# ---- extends -----------------------------------------------------------------------------------------------------
def test_extends_chain(tmp_path):
    """child extends quickstart and sets lore's rank; grandchild extends child (a path relative to itself)."""
    (tmp_path / "child.yaml").write_text("extends: quickstart\nmethods:\n  lore:\n    rank: 2\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "grandchild.yaml").write_text("extends: ../child.yaml\nrun:\n  name: grandchild\n")
    child = load_recipe(str(tmp_path / "child.yaml"))
    assert child.methods["lore"].config.rank == 2
    assert child.methods["lore"].config.lr == 0.05       # the rest of quickstart's lore is kept
    assert child.methods["bt"].config.lr == 0.01
    assert child.data.config.n_users == 600
    grandchild = load_recipe(str(sub / "grandchild.yaml"))
    assert grandchild.run.name == "grandchild" and grandchild.methods["lore"].config.rank == 2
    assert "extends" not in grandchild.raw


def test_extends_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    message = problems_of(str(tmp_path / "a.yaml"))
    assert re.fullmatch(r"recipe 'extends' forms a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml", message)


def test_extends_must_be_a_name(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: [quickstart]\n")
    assert "'extends' must be a recipe name or path, got ['quickstart']" in problems_of(str(tmp_path / "a.yaml"))


def test_extends_an_unknown_recipe(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: quikstart\n")
    assert ("recipe 'quikstart' is neither a file nor a known recipe (built-in or from a plugin). Did you mean "
            "'quickstart'?") in problems_of(str(tmp_path / "a.yaml"))


def test_not_yaml_or_not_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    assert re.match(r".*bad\.yaml: not valid YAML", problems_of(str(tmp_path / "bad.yaml")))
    (tmp_path / "list.yaml").write_text("- quickstart\n")
    assert "list.yaml: a recipe must be a mapping of sections, got list" in problems_of(str(tmp_path / "list.yaml"))


# ---- overrides and interpolation --------------------------------------------------------------------------------
def test_dotlist_overrides():
    recipe = load_recipe("quickstart", ["methods.lore.rank=3", "split.seeds=[1,2]", "run.name=other"])
    assert recipe.methods["lore"].config.rank == 3
    assert recipe.split.seeds == [1, 2]
    assert recipe.run.name == "other"
    assert recipe.methods["bt"].config.lr == 0.01  # untouched


def test_override_adds_a_method():
    recipe = load_recipe("quickstart", ["methods.alt.name=lore_alt"])
    assert recipe.methods["alt"].name == "lore_alt"


def test_delete_override():
    recipe = load_recipe("quickstart", ["~methods.bt", "~methods.lore.lr"])
    assert list(recipe.methods) == ["lore"]
    assert recipe.methods["lore"].config.lr == LoRe.Config().lr != 0.05  # back to the declared default, not 0.05


def test_override_without_equals():
    assert problems_of("quickstart", ["methods.lore.rank"]) == \
        "override 'methods.lore.rank' is not of the form key=value"


def test_delete_a_missing_key():
    assert problems_of("quickstart", ["~methods.nope"]) == "override '~methods.nope': no such key to delete"


def test_interpolation_resolves():
    recipe = load_recipe(small(split={"k": 7}, eval={"k_list": [1, "${split.k}"]}, run={"name": "k${split.k}"}))
    assert recipe.eval.k_list == [1, 7]
    assert recipe.run.name == "k7"
    assert recipe.raw["eval"]["k_list"] == [1, 7]  # the run directory gets resolved values


def test_interpolation_of_a_missing_key():
    message = problems_of(small(run={"name": "${split.kk}"}))
    assert message.startswith("recipe interpolation failed: Interpolation key 'split.kk' not found")


# ---- finding recipes and the schema ------------------------------------------------------------------------------
def test_find_recipe():
    assert find_recipe("quickstart") == BUILTIN["quickstart"]
    assert find_recipe("quickstart.yaml") == BUILTIN["quickstart"]


def test_find_unknown_recipe_suggests_the_closest():
    with pytest.raises(RecipeError, match=r"recipe 'quickstrat' is neither a file nor a known recipe \(built-in or "
                                          r"from a plugin\)\. Did you mean 'quickstart'\? Recipes: .*quickstart"):
        find_recipe("quickstrat")


# ---- recipes from plugins: plrm.recipes entry points (fake ones, naming real package folders) ------------------
class FakeDist:
    def __init__(self, name: str, version: str):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Duck-types importlib.metadata.EntryPoint for plrm.recipe: name, value ("package:folder"), dist."""

    def __init__(self, name: str, value: str, dist: str = "recipe-plugin", version: str = "0.3.0"):
        self.name, self.value, self.dist = name, value, FakeDist(dist, version)


def write_package(root, package: str, recipes: dict[str, str], init: str = "") -> None:
    """An importable package ``root/package`` with ``recipes/<name>.yaml`` files (names may hold a '/')."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(init)
    for name, text in recipes.items():
        path = root / package / "recipes" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def recipe_plugins(monkeypatch, tmp_path):
    """``recipe_plugins(*entry_points)`` makes these the installed plrm.recipes entry points; packages written
    under tmp_path are importable. Package names differ per test: Python caches an imported package."""
    monkeypatch.delenv("PLRM_PLUGINS", raising=False)
    monkeypatch.delenv("PLRM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(recipe_module, "_clashes_said", set())

    def install(*entry_points: FakeEntryPoint) -> None:
        monkeypatch.setattr(recipe_module, "_recipe_entry_points", lambda: list(entry_points))
        recipe_module.plugin_recipes.cache_clear()

    yield install
    recipe_module.plugin_recipes.cache_clear()  # the next caller reads the real entry points again


def test_plugin_recipe_is_found_by_name_with_its_origin(recipe_plugins, tmp_path):
    write_package(tmp_path, "plugin_found", {"tiny_quickstart": "extends: quickstart\nrun: {name: tiny}\n",
                                             "sub/nested": "extends: tiny_quickstart\n"})
    recipe_plugins(FakeEntryPoint("found", "plugin_found:recipes"))
    folder = tmp_path / "plugin_found" / "recipes"
    assert find_recipe("tiny_quickstart") == folder / "tiny_quickstart.yaml"
    assert find_recipe("sub/nested.yaml") == folder / "sub" / "nested.yaml"
    origin = all_recipes()["tiny_quickstart"].origin
    assert (str(origin), origin.entry_point, origin.is_builtin) == ("recipe-plugin 0.3.0", "plugin_found:recipes", False)
    assert all_recipes()["quickstart"].origin.is_builtin
    # a plugin recipe extends built-ins and is extended by name, like any recipe
    recipe = load_recipe("sub/nested")
    assert recipe.run.name == "tiny" and recipe.data.name == "lowrank_world"
    assert recipe_module.plugin_recipes().broken == []


def test_plugin_recipe_named_like_a_builtin_is_left_out_and_reported(recipe_plugins, tmp_path, capsys):
    write_package(tmp_path, "plugin_clash", {"quickstart": "description: impostor\n", "own_recipe": "{}\n"})
    recipe_plugins(FakeEntryPoint("clash", "plugin_clash:recipes", dist="impostor", version="9.9"))
    (broken,) = recipe_module.plugin_recipes().broken
    assert (broken.name, broken.group, str(broken.origin)) == ("clash", "plrm.recipes", "impostor 9.9")
    assert broken.error == (f"name clash: recipe 'quickstart' ({tmp_path / 'plugin_clash' / 'recipes' / 'quickstart.yaml'})"
                            " would replace the built-in recipe, which is used; rename the file")
    assert find_recipe("quickstart") == BUILTIN["quickstart"]
    assert find_recipe("own_recipe") == tmp_path / "plugin_clash" / "recipes" / "own_recipe.yaml"
    find_recipe("quickstart")
    err = capsys.readouterr().err
    assert err.count("plrm: recipe 'quickstart' is the one from plrm ") == 1  # said once per process
    assert "the recipe of that name in impostor 9.9 is left out (name clash)" in err


def test_second_plugin_with_a_taken_recipe_name_is_left_out(recipe_plugins, tmp_path):
    write_package(tmp_path, "plugin_first", {"shared_name": "description: first\n"})
    write_package(tmp_path, "plugin_second", {"shared_name": "description: second\n"})
    recipe_plugins(FakeEntryPoint("first", "plugin_first:recipes", dist="first-plugin"),
                   FakeEntryPoint("second", "plugin_second:recipes", dist="second-plugin"))
    assert find_recipe("shared_name") == tmp_path / "plugin_first" / "recipes" / "shared_name.yaml"
    (broken,) = recipe_module.plugin_recipes().broken
    assert str(broken.origin) == "second-plugin 0.3.0"
    assert "name clash: recipe 'shared_name'" in broken.error
    assert "would replace the one from first-plugin 0.3.0, which is used" in broken.error


def test_broken_recipes_entry_points_are_recorded_and_the_rest_work(recipe_plugins, tmp_path):
    write_package(tmp_path, "plugin_raises", {"never_read": "{}\n"}, init="raise ImportError('boom: no numpy')\n")
    write_package(tmp_path, "plugin_no_folder", {})
    write_package(tmp_path, "plugin_empty", {})
    (tmp_path / "plugin_empty" / "recipes").mkdir()
    write_package(tmp_path, "plugin_good", {"good_recipe": "{}\n"})
    recipe_plugins(FakeEntryPoint("raises", "plugin_raises:recipes", dist="bad-recipes"),
                   FakeEntryPoint("no_folder", "plugin_no_folder:recipes"),
                   FakeEntryPoint("empty", "plugin_empty:recipes"),
                   FakeEntryPoint("missing_package", "plugin_not_installed:recipes"),
                   FakeEntryPoint("good", "plugin_good:recipes"))
    errors = {b.name: b.error for b in recipe_module.plugin_recipes().broken}
    assert set(errors) == {"raises", "no_folder", "empty", "missing_package"}
    assert errors["raises"] == ("ImportError: boom: no numpy (fix or reinstall bad-recipes, or leave it out with "
                                "PLRM_PLUGINS=<names to load>)")
    assert errors["no_folder"].startswith(f"FileNotFoundError: no folder {tmp_path / 'plugin_no_folder' / 'recipes'} "
                                          "(ship the recipes as package data of plugin_no_folder)")
    assert errors["empty"].startswith(f"FileNotFoundError: {tmp_path / 'plugin_empty' / 'recipes'} holds no *.yaml "
                                      "recipe")
    assert errors["missing_package"].startswith("ModuleNotFoundError: No module named 'plugin_not_installed'")
    assert find_recipe("good_recipe") == tmp_path / "plugin_good" / "recipes" / "good_recipe.yaml"
    with pytest.raises(RecipeError, match="recipe 'never_read' is neither a file nor a known recipe"):
        find_recipe("never_read")


def test_plugin_environment_variables_apply_to_recipes(recipe_plugins, tmp_path, monkeypatch):
    write_package(tmp_path, "plugin_env", {"env_recipe": "{}\n"})
    recipe_plugins(FakeEntryPoint("env", "plugin_env:recipes"))
    monkeypatch.setenv("PLRM_PLUGINS", "some_method")
    recipe_module.plugin_recipes.cache_clear()
    assert "env_recipe" not in all_recipes()
    monkeypatch.setenv("PLRM_PLUGINS", "env")
    recipe_module.plugin_recipes.cache_clear()
    assert "env_recipe" in all_recipes()
    monkeypatch.setenv("PLRM_DISABLE_PLUGIN_AUTOLOAD", "1")
    recipe_module.plugin_recipes.cache_clear()
    assert "env_recipe" not in all_recipes()


def test_schema_rows_document_every_option():
    rows = {key: (type_name, default, help_text) for key, type_name, default, help_text in schema_rows()}
    assert rows["methods.<label>[lore].rank"] == (
        "int, >= 1", 10, "B, the number of basis reward functions (LoRe: cross-validated in {2,..,50}).")
    assert rows["split.k"][:2] == ("int, >= 1", 9)
    assert rows["data[lowrank_world].labels"][1] == "extremes"
    assert rows["data[preference_files].path"][1] == "(required)"
    assert all(help_text for _, _, _, help_text in schema_rows()), "every option needs help text"
