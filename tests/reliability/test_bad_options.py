"""Bad option values: every value outside the range (or choices) its option declares is refused before any work,
with one error that names the key path, the value and the bound, and nothing is written.

The ranges are declared once, in the option schema (``opt(default, help, min=..., gt=..., choices=...)``);
``build_section`` checks them for every fixed section and every component's Config. The same file covers how path
options written in a recipe file are read (relative to that file's folder).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import assert_bad_input, tree_digest  # noqa: E402  (tests/reliability/harness.py, on sys.path via conftest)

from plrm import registry
from plrm.config import Bounds, bounds_of, is_path, opt
from plrm.recipe import (
    FIXED_SECTIONS,
    RecipeError,
    build_section,
    load_recipe,
    schema_rows,
)

# (override, text the error must contain besides the key path). Each is applied after the tiny quickstart's own
# overrides, so it wins over them.
BAD_OPTIONS = [
    ("methods.lore.rank=0", "methods.lore.rank: must be >= 1, got 0"),
    ("methods.bt.batch_size=0", "methods.bt.batch_size: must be >= 1, got 0"),
    ("methods.lore.lr=-1", "methods.lore.lr: must be > 0, got -1.0"),
    ("methods.lore.max_epochs=-3", "methods.lore.max_epochs: must be -1 or >= 1, got -3"),
    ("methods.bt.max_steps=0", "methods.bt.max_steps: must be -1 or >= 1, got 0"),
    ("methods.bt.weight_decay=-0.5", "methods.bt.weight_decay: must be >= 0, got -0.5"),
    ("methods.lore.adapt_lr=0", "methods.lore.adapt_lr: must be > 0, got 0.0"),
    ("methods.lore.adapt_steps=-1", "methods.lore.adapt_steps: must be >= 0, got -1"),
    ("methods.bt.max_epochs=-1", "methods.bt.max_epochs: -1 together with max_steps: -1 never stops training"),
    ("eval.k_list=[]", "eval.k_list: must not be empty"),
    ("eval.k_list=[1,0]", "eval.k_list[1]: must be >= 1, got 0"),
    ("eval.worst_fractions=[0.5,1.5]", "eval.worst_fractions[1]: must be in (0, 1], got 1.5"),
    ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
    ("split.unseen_fraction=1.0", "split.unseen_fraction: must be in [0, 1), got 1.0"),
    ("split.test_fraction=-0.1", "split.test_fraction: must be in [0, 1), got -0.1"),
    ("split.k=0", "split.k: must be >= 1, got 0"),
    ("split.seeds=[]", "split.seeds: must not be empty"),
    ("split.seeds=[0,-1]", "split.seeds[1]: must be in [0, 4294967295], got -1"),
    ("run.seed=-1", "run.seed: must be in [0, 4294967295], got -1"),
    ("run.name=''", "run.name: must not be empty"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps: must be >= 1, got 0"),
    ("trainer.num_threads=0", "trainer.num_threads: must be >= 1, got 0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val: must be > 0, got -1.0"),
    ("trainer.num_nodes=0", "trainer.num_nodes: must be >= 1, got 0"),
    ("data.n_users=0", "data.n_users: must be >= 1, got 0"),
    ("data.alpha=0", "data.alpha: must be > 0, got 0.0"),
    ("data.pair_choice=best", "data.pair_choice: must be one of 'extremes', 'random', got 'best'"),
    ("data.function_prevalence=[0.5,0.5,0]", "data.function_prevalence[2]: must be > 0, got 0.0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OPTIONS, ids=[o for o, _ in BAD_OPTIONS])
def test_bad_option_is_refused_before_any_work(plrm_cmd, workdir, tiny_fit, override, message):
    before = tree_digest(workdir)
    fit = plrm_cmd("fit", *tiny_fit, "run.name=bad", override)
    assert_bad_input(fit, "plrm fit: error:", message, "1 problem(s)")
    show = plrm_cmd("recipes", "show", "quickstart", override)
    assert_bad_input(show, "plrm recipes: error:", message)
    assert show.out == ""
    assert tree_digest(workdir) == before
    assert not (workdir / "runs").exists()


def test_every_bad_option_is_listed_in_one_error(plrm_cmd, workdir, tiny_fit):
    before = tree_digest(workdir)
    outcome = plrm_cmd("fit", *tiny_fit, "methods.lore.rank=0", "methods.bt.batch_size=0", "eval.k_list=[]",
                       "methods.lore.lr=-1")
    assert_bad_input(outcome, "4 problem(s)", "methods.lore.rank: must be >= 1", "methods.bt.batch_size: must be",
                     "eval.k_list: must not be empty", "methods.lore.lr: must be > 0")
    assert outcome.err.count("plrm fit: error:") == 1
    assert tree_digest(workdir) == before


def test_recipes_keys_shows_ranges_beside_types(plrm_cmd):
    outcome = plrm_cmd("recipes", "keys", "--filter", "[lore].rank")
    assert outcome.code == 0, outcome.err
    assert "methods.<label>[lore].rank  (int, >= 1, default 10)" in outcome.out
    rows = {key: tp for key, tp, _, _ in schema_rows()}
    assert rows["eval.k_list"] == "list[int], not empty, each >= 1"
    assert rows["split.unseen_fraction"] == "float, in [0, 1)"
    assert rows["methods.<label>[bt].max_steps"] == "int, -1 or >= 1"
    assert rows["data[lowrank_world].pair_choice"] == "str, one of 'extremes', 'random'"
    assert rows["split.from_file"] == "str | null, input path"


# ---- opt(...) and Bounds on their own ---------------------------------------------------------------------------
@pytest.mark.parametrize(("bounds", "text"), [
    (Bounds(min=1), ">= 1"),
    (Bounds(gt=0), "> 0"),
    (Bounds(max=1), "<= 1"),
    (Bounds(lt=1), "< 1"),
    (Bounds(min=0, lt=1), "in [0, 1)"),
    (Bounds(gt=0, max=1), "in (0, 1]"),
    (Bounds(min=1, also=(-1,)), "-1 or >= 1"),
    (Bounds(choices=("a", "b")), "one of 'a', 'b'"),
    (Bounds(nonempty=True), ""),
])
def test_bounds_read_as_text(bounds, text):
    assert bounds.range_text() == text


@pytest.mark.parametrize(("bounds", "value", "found"), [
    (Bounds(min=1), 0, [("", "must be >= 1, got 0")]),
    (Bounds(min=1), 1, []),
    (Bounds(gt=0), 0.0, [("", "must be > 0, got 0.0")]),
    (Bounds(gt=0), None, []),                                  # a null option is never out of range
    (Bounds(min=0, lt=1), 1.0, [("", "must be in [0, 1), got 1.0")]),
    (Bounds(min=0, lt=1), 0.0, []),
    (Bounds(min=1, also=(-1,)), -1, []),
    (Bounds(min=1, also=(-1,)), 0, [("", "must be -1 or >= 1, got 0")]),
    (Bounds(min=1), "elbow", []),                              # int | Literal['elbow']: the string is the type's
    (Bounds(choices=("a", "b")), "c", [("", "must be one of 'a', 'b', got 'c'")]),
    (Bounds(nonempty=True), "", [("", "must not be empty")]),
    (Bounds(nonempty=True, min=1), [], [("", "must not be empty")]),
    (Bounds(nonempty=True, min=1), [1, 0, 2, -3], [("[1]", "must be >= 1, got 0"), ("[3]", "must be >= 1, got -3")]),
    (Bounds(choices=("x", "y")), ["x", "z"], [("[1]", "must be one of 'x', 'y', got 'z'")]),
    (Bounds(min=1), [], []),                                   # an empty list is fine unless nonempty
])
def test_bounds_find_each_problem(bounds, value, found):
    assert bounds.problems(value) == found


def test_opt_stores_bounds_and_path_in_the_field():
    @dataclass
    class Config:
        rank: int = opt(8, "Rank.", min=1)
        plain: int = opt(3, "No bounds.")
        files: list[str] = opt([], "Inputs.", path=True)

    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert bounds_of(fields["rank"]) == Bounds(min=1)
    assert bounds_of(fields["plain"]) is None and bounds_of(fields["files"]) is None
    assert is_path(fields["files"]) and not is_path(fields["rank"])
    assert fields["rank"].metadata["help"] == "Rank."
    assert Config().files is not Config().files  # a list default is still copied per instance


def test_opt_refuses_two_lower_or_two_upper_bounds():
    with pytest.raises(TypeError, match="min .* or gt"):
        opt(1, "x", min=0, gt=0)
    with pytest.raises(TypeError, match="max .* or lt"):
        opt(1, "x", max=1, lt=1)


def test_build_section_reports_every_bound_and_skips_the_config_s_own_checks():
    calls = []

    @dataclass
    class Config:
        rank: int = opt(8, "Rank.", min=1)
        lr: float = opt(0.1, "Rate.", gt=0)
        ks: list[int] = opt([1], "Ks.", nonempty=True, min=1)

        def __post_init__(self) -> None:
            calls.append(self)

        def check(self) -> list[str]:
            return ["lr: larger than rank"] if self.lr > self.rank else []

    problems: list[str] = []
    assert build_section(Config, {"rank": 0, "lr": -1, "ks": [2, 0]}, "methods.m", problems) is None
    assert problems == ["methods.m.rank: must be >= 1, got 0", "methods.m.lr: must be > 0, got -1.0",
                        "methods.m.ks[1]: must be >= 1, got 0"]
    assert calls == []  # __post_init__ never saw the bad values
    problems = []
    assert build_section(Config, {"rank": 2, "lr": 3}, "methods.m", problems) is not None
    assert problems == ["methods.m.lr: larger than rank"]  # the cross-field check, with the key path in front


def test_every_built_in_default_is_within_its_own_bounds():
    registry.ensure_builtins()
    classes = dict(FIXED_SECTIONS)
    for reg in (registry.datasets, registry.backbones, registry.methods):
        classes.update({f"{reg.kind} {name}": cls.Config for name, cls in reg.items()})
    declared = 0
    for where, cls in classes.items():
        for f in dataclasses.fields(cls):
            bounds = bounds_of(f)
            if bounds is None or f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                continue
            declared += 1
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert bounds.problems(default) == [], f"{where}.{f.name}: default {default!r} breaks {bounds}"
    assert declared >= 60  # ranges are declared across the built-in schema, not on a handful of keys


# ---- path options are relative to the recipe file that writes them ----------------------------------------------
def _pairs_file(path: Path, n_users: int = 4, per_user: int = 3) -> None:
    rows = [{"user_id": f"u{u}", "prompt": f"prompt {u}-{i}", "chosen": f"good {u}-{i}", "rejected": f"bad {u}-{i}"}
            for u in range(n_users) for i in range(per_user)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_data_path_in_a_recipe_file_is_found_next_to_it_from_another_cwd(workdir, plrm_cmd, monkeypatch):
    folder = workdir / "project" / "recipes"
    folder.mkdir(parents=True)
    _pairs_file(folder / "pairs.jsonl")
    (folder / "mine.yaml").write_text("data:\n  name: preference_files\n  path: pairs.jsonl\nmethods:\n  bt: {}\n"
                                      "backbone:\n  name: frozen_encoder\n")
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    fields = {f.name: f for f in dataclasses.fields(registry.datasets.get("preference_files").Config)}
    assert is_path(fields["path"])
    recipe = load_recipe(str(folder / "mine.yaml"))
    assert recipe.data.config.path == str(folder / "pairs.jsonl")
    assert recipe.raw["data"]["path"] == str(folder / "pairs.jsonl")  # what the run dir's recipe.yaml holds
    data = registry.datasets.get("preference_files")(recipe.data.config).load()
    assert len(data.pairs) == 12
    shown = plrm_cmd("fit", "--recipe", str(folder / "mine.yaml"), "--print-config")
    assert shown.code == 0, shown.err
    assert f"path: {folder / 'pairs.jsonl'}" in shown.out


def test_split_file_in_a_base_recipe_is_relative_to_the_base_s_folder(workdir):
    base, child = workdir / "base", workdir / "child"
    base.mkdir()
    child.mkdir()
    (base / "b.yaml").write_text("extends: quickstart\nsplit:\n  from_file: users.json\n")
    (child / "c.yaml").write_text("extends: ../base/b.yaml\nrun:\n  name: c\n")
    (child / "own.yaml").write_text("extends: ../base/b.yaml\nsplit:\n  from_file: mine.json\n")
    (child / "abs.yaml").write_text(f"extends: ../base/b.yaml\nsplit:\n  from_file: {workdir / 'abs.json'}\n")
    assert load_recipe(str(child / "c.yaml")).split.from_file == str(base / "users.json")
    assert load_recipe(str(child / "own.yaml")).split.from_file == str(child / "mine.json")
    assert load_recipe(str(child / "abs.yaml")).split.from_file == str(workdir / "abs.json")
    # a command-line override stays relative to the working directory, and a recipe given as data has no folder
    assert load_recipe(str(child / "c.yaml"), ["split.from_file=cli.json"]).split.from_file == "cli.json"
    assert load_recipe({"extends": "quickstart", "split": {"from_file": "d.json"}}).split.from_file == "d.json"


def test_published_source_paths_and_file_lists_are_relative_to_the_recipe(workdir, monkeypatch):
    (workdir / "r.yaml").write_text("data:\n  name: psoups\n  path: psoups_copy\nmethods:\n  bt: {}\n")
    (workdir / "f.yaml").write_text("data:\n  name: psoups\n  files: [a.json, /abs/b.json]\nmethods:\n  bt: {}\n")
    sub = workdir / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert load_recipe(str(workdir / "r.yaml")).data.config.path == str(workdir / "psoups_copy")
    assert load_recipe(str(workdir / "f.yaml")).data.config.files == [str(workdir / "a.json"), "/abs/b.json"]
    # the empty default ("not set") stays empty
    assert load_recipe(str(workdir / "f.yaml")).data.config.path == ""


def test_bad_value_in_a_recipe_file_is_named_with_the_file(workdir, plrm_cmd):
    (workdir / "r.yaml").write_text("extends: quickstart\nmethods:\n  lore:\n    rank: 0\n")
    before = tree_digest(workdir)
    outcome = plrm_cmd("fit", "--recipe", "r.yaml", "logger.kind=none")
    assert_bad_input(outcome, "r.yaml", "methods.lore.rank: must be >= 1, got 0")
    assert tree_digest(workdir) == before


def test_a_bad_option_raises_recipe_error_for_python_callers():
    with pytest.raises(RecipeError, match=r"methods\.lore\.rank: must be >= 1, got 0"):
        load_recipe("quickstart", ["methods.lore.rank=0"])


# ---- benchmark recipes: the same bounds, the same paths --------------------------------------------------------
BAD_BENCH_OPTIONS = [
    ("bench.k=0", "bench.k: must be >= 1, got 0"),
    ("bench.seeds=[]", "bench.seeds: must not be empty"),
    ("bench.k_list=[0,3]", "bench.k_list[0]: must be >= 1, got 0"),
    ("method_options.lore.rank=0", "methods.lore.rank: must be >= 1, got 0"),
    ("dataset_options.lowrank_world.n_users=0", "data.n_users: must be >= 1, got 0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_BENCH_OPTIONS, ids=[o for o, _ in BAD_BENCH_OPTIONS])
def test_bad_bench_option_is_refused_before_any_work(plrm_cmd, workdir, override, message):
    before = tree_digest(workdir)
    outcome = plrm_cmd("bench", "--recipe", "bench/quick", override)
    assert_bad_input(outcome, "plrm bench: error:", message)
    assert_bad_input(plrm_cmd("recipes", "show", "bench/quick", override), "plrm recipes: error:", message)
    assert tree_digest(workdir) == before
    assert not (workdir / "bench").exists()


def test_bench_recipe_paths_are_relative_to_its_file(workdir, monkeypatch):
    from plrm.bench.spec import Unit, load_bench

    folder = workdir / "benches"
    folder.mkdir()
    (folder / "b.yaml").write_text("bench:\n  methods: [bt]\n  datasets: [psoups]\n"
                                   "dataset_options:\n  psoups:\n    path: psoups_copy\n"
                                   "cell:\n  split:\n    from_file: users.json\n")
    monkeypatch.chdir(workdir / "notes")
    spec = load_bench(str(folder / "b.yaml"))
    recipe = spec.cell_recipe(Unit("psoups", "bt", 0), "runs")
    assert recipe.data.config.path == str(folder / "psoups_copy")
    assert recipe.split.from_file == str(folder / "users.json")
    overridden = load_bench(str(folder / "b.yaml"), ["dataset_options.psoups.path=here"])
    assert overridden.cell_recipe(Unit("psoups", "bt", 0), "runs").data.config.path == "here"
