"""plrm.catalog: the registries described as JSON, so that `plrm list`, `recipes show|keys`, `fit --print-config`
and recipe errors answer without torch. The stand-ins must give exactly what the real classes give."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from plrm import catalog, registry
from plrm.config import Forbid, Not, check_value, forbidden, opt, type_name
from plrm.errors import RecipeError
from plrm.recipe import all_recipes, build_section, describe_dataclass, load_recipe, read_recipe, schema_rows


@pytest.fixture(scope="module")
def stand_ins():
    """The real registries, and the catalog's stand-ins rebuilt from their JSON (through a string, as on disk)."""
    real = catalog.real_registries()
    return real, catalog.registries_from(json.loads(json.dumps(catalog.describe(real))))


# ---- option types ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [int, float, str, bool, Any, type(None), list[str], list[int] | None, dict[str, Any],
                                Literal["a", "b"], int | Literal["elbow"], list[str] | str | None, dict, list])
def test_option_types_survive_json(tp):
    back = catalog.decode_type(json.loads(json.dumps(catalog.encode_type(tp))))
    assert type_name(back) == type_name(tp)
    for value in (1, 1.5, "a", "elbow", None, True, ["x"], [1, 2], {"k": 1}, [], "c"):
        assert check_value(value, back) == check_value(value, tp), (tp, value)


def test_an_option_type_json_cannot_hold_is_refused():
    class Custom:
        pass

    @dataclass
    class Config:
        x: tuple[int, int] = opt((1, 2), "a tuple")

    with pytest.raises(catalog.Uncacheable, match="option type"):
        catalog.encode_type(Custom)
    with pytest.raises(catalog.Uncacheable):
        catalog.describe_config(Config)


# ---- the stand-ins are the real classes, as far as a recipe can tell --------------------------------------------
def test_every_entry_is_described_exactly(stand_ins):
    real, cached = stand_ins
    assert set(cached) == set(real) == {"methods", "datasets", "backbones"}
    for name, reg in real.items():
        assert cached[name].names() == reg.names()
        assert [(b.name, b.error, b.origin) for b in cached[name].broken()] == \
            [(b.name, b.error, b.origin) for b in reg.broken()]
        for entry, cls in reg.items():
            twin = cached[name].get(entry)
            assert cached[name].origin(entry) == reg.origin(entry)
            assert twin.__doc__ == cls.__doc__ and twin.__qualname__ == cls.__qualname__
            for attribute in catalog.CLASS_ATTRIBUTES:
                assert getattr(twin, attribute, "absent") == getattr(cls, attribute, "absent"), (entry, attribute)
            assert describe_dataclass(twin.Config, "x") == describe_dataclass(cls.Config, "x"), entry
            assert forbidden(twin.Config) == forbidden(cls.Config)
            assert [f.name for f in dataclasses.fields(twin.Config)] == [f.name for f in dataclasses.fields(cls.Config)]
    assert schema_rows(cached) == schema_rows(real)


def _outcome(recipe: str, overrides: list[str], registries: Any) -> Any:
    """What loading the recipe gives: every section's options, or the error's text."""
    try:
        r = load_recipe(recipe, overrides, registries=registries)
    except RecipeError as exc:
        return f"error: {exc}"
    return {"data": (r.data.name, dataclasses.asdict(r.data.config)),
            "backbone": (r.backbone.name, dataclasses.asdict(r.backbone.config)),
            "methods": {label: (c.name, dataclasses.asdict(c.config)) for label, c in r.methods.items()}}


RUN_RECIPES = sorted(name for name, r in all_recipes().items() if "bench" not in read_recipe(str(r.path)))
BAD = [
    ["methods.lore.rank=0"],
    ["methods.lore.rank=two", "methods.bt.lr=-1", "data.n_users=0"],
    ["methods.bt.max_epochs=-1"],                       # a Forbid rule of MethodConfig
    ["data.pairs_per_user=100000"],                     # the dataset's own __post_init__: needs the real class
    ["methods.lore.name=lorre"],                        # did you mean
    ["methods.lore.rnak=3"],
    ["backbone.name=transformer"],                      # backbone.model: required (a Forbid rule)
    ["backbone.name=transformer", "backbone.model=m", "backbone.finetune=full", "backbone.quantization=4bit"],
    ["+methods.m={name: mrm, basis: none, meta_learning: false}"],
    ["+methods.la={name: lore_alt, reference_weight: 1.0}"],
    ["+methods.s={name: shrunk_individual}"],           # the example plugin, when installed
]


@pytest.mark.parametrize("recipe", RUN_RECIPES)
def test_every_recipe_checks_the_same_with_the_catalog(stand_ins, recipe):
    real, cached = stand_ins
    assert _checked(recipe, [], cached, real) == _outcome(recipe, [], real)


def _checked(recipe: str, overrides: list[str], cached: dict, real: dict) -> Any:
    """catalog.checked's loop over given registries: the stand-ins, with the real registry NeedsImport names."""
    take: set[str] = set()
    while True:
        try:
            return _outcome(recipe, overrides, {n: real[n] if n in take else cached[n] for n in cached})
        except catalog.NeedsImport as exc:
            assert exc.registry not in take
            take.add(exc.registry)


@pytest.mark.parametrize("overrides", BAD, ids=" ".join)
def test_bad_options_get_the_same_errors_from_the_catalog(stand_ins, overrides):
    real, cached = stand_ins
    expected = _outcome("quickstart", overrides, real)
    assert _checked("quickstart", overrides, cached, real) == expected


def test_a_config_with_code_of_its_own_asks_for_the_real_class():
    """A plugin's Config with check() (or __post_init__): its stand-in raises NeedsImport where that code would run
    (a section without problems), and reports type errors itself (where the code would not run)."""

    @dataclass
    class Config:
        a: int = opt(1, "a", min=0)
        b: int = opt(2, "b")

        def check(self) -> list[str]:
            return ["a: must not exceed b"] if self.a > self.b else []

    twin = catalog.config_from(json.loads(json.dumps(catalog.describe_config(Config))), "methods")
    problems: list[str] = []
    with pytest.raises(catalog.NeedsImport) as info:
        build_section(twin, {"a": 3}, "methods.p", problems)
    assert info.value.registry == "methods"
    assert build_section(twin, {"a": -1}, "methods.p", problems) is None
    assert problems == ["methods.p.a: must be >= 0, got -1"]
    problems = []
    build_section(Config, {"a": 3}, "methods.p", problems)
    assert problems == ["methods.p.a: must not exceed b"]


# ---- Forbid rules and unique lists ----------------------------------------------------------------------------
def test_forbid_rules_match_all_their_conditions_and_are_inherited():
    @dataclass
    class Base:
        mode: str = opt("a", "mode")
        n: int = opt(0, "n")
        path: str | None = opt(None, "path")
        forbid = (Forbid({"mode": ("b", "c"), "n": 0}, "mode: b and c need n > 0"),)

    @dataclass
    class Child(Base):
        forbid = (Forbid({"n": Not(0), "path": (None, "")}, "n: > 0 needs path"),)

    assert [r.message for r in forbidden(Child)] == ["mode: b and c need n > 0", "n: > 0 needs path"]
    cases = [({"mode": "b"}, ["s.mode: b and c need n > 0"]), ({"mode": "c", "n": 1}, ["s.n: > 0 needs path"]),
             ({"mode": "a", "n": 1, "path": "x"}, []), ({"mode": "b", "n": 0, "path": ""},
                                                         ["s.mode: b and c need n > 0"])]
    for values, expected in cases:
        problems: list[str] = []
        build_section(Child, values, "s", problems)
        assert problems == expected, values
    rows = {key: text for key, _, _, text in describe_dataclass(Child, "s")}
    assert rows["s.mode"] == "mode Refused: mode: b and c need n > 0."
    assert rows["s.n"] == "n Refused: n: > 0 needs path."


def test_unique_lists():
    @dataclass
    class Config:
        names: list[str] = opt(["a"], "names", unique=True, nonempty=True, choices=("a", "b", "c"))

    def problems(values):
        out: list[str] = []
        build_section(Config, {"names": values}, "d", out)
        return out

    assert problems(["a", "b"]) == []
    assert problems(["a", "b", "a", "b", "a"]) == ["d.names: must not repeat an item, got 'a', 'b' more than once"]
    assert problems(["a", "z", "z"]) == ["d.names[1]: must be one of 'a', 'b', 'c', got 'z'",
                                         "d.names[2]: must be one of 'a', 'b', 'c', got 'z'"]
    assert problems([]) == ["d.names: must not be empty"]
    assert describe_dataclass(Config, "d")[0][1] == "list[str], not empty, no repeats, each one of 'a', 'b', 'c'"


# ---- the file: where, when it is rebuilt, what it costs ---------------------------------------------------------
@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PLRM_CACHE", str(tmp_path))
    monkeypatch.delenv("PLRM_CATALOG", raising=False)
    return tmp_path / "catalog"


def test_the_first_call_writes_the_catalog_and_the_next_reads_it(cache_home):
    first = catalog.registries()
    assert first["methods"] is registry.methods  # built from the real registries, which it returns
    files = list(cache_home.glob("catalog-*.json"))
    assert [f.name for f in files] == [f"catalog-{catalog.key()}.json"]
    second = catalog.registries()
    assert isinstance(second["methods"], catalog.CatalogRegistry)
    assert second["methods"].names() == registry.methods.names()
    mixed = catalog.registries(real={"datasets"})  # what NeedsImport asks for: one real registry
    assert mixed["datasets"] is registry.datasets and isinstance(mixed["methods"], catalog.CatalogRegistry)


def test_a_damaged_catalog_is_rebuilt(cache_home):
    catalog.registries()
    (path,) = cache_home.glob("catalog-*.json")
    for damage in ("{not json", json.dumps({"format": 0}), json.dumps({"format": catalog.FORMAT})):
        path.write_text(damage)
        assert catalog.registries()["methods"] is registry.methods
        assert json.loads(path.read_text())["format"] == catalog.FORMAT


def test_an_unwritable_cache_or_catalog_off_costs_only_speed(tmp_path, monkeypatch):
    (tmp_path / "catalog").write_text("a file where the folder should be")
    monkeypatch.setenv("PLRM_CACHE", str(tmp_path))
    assert catalog.registries()["methods"] is registry.methods
    monkeypatch.setenv("PLRM_CATALOG", "off")
    assert catalog.cache_dir() is None and catalog.registries()["methods"] is registry.methods


def test_the_key_follows_sources_environment_and_plugins(tmp_path, monkeypatch):
    package = tmp_path / "plrm"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = catalog.key(package)
    assert catalog.key(package) == before
    os.utime(package / "a.py", ns=(1, 10**18))
    assert catalog.key(package) != before
    edited = catalog.key(package)
    monkeypatch.setenv("PLRM_PLUGINS", "shrunk_individual")
    assert catalog.key(package) != edited
    monkeypatch.delenv("PLRM_PLUGINS")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # a new folder on the path: a distribution may be there
    (tmp_path / "site").mkdir()
    assert catalog.key(package) != edited


# ---- the commands, in their own processes ------------------------------------------------------------------------
PROBE = """
import sys
from plrm.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "lightning", "transformers") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), "CODE:" + str(code), file=sys.stderr)
"""


def _probe(args: list[str], cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


COMPARED = (["list"], ["recipes", "show", "mrm_prism"])  # also run with the catalog off (8 s each); the in-process
# tests above compare every recipe and the bad options with the real classes


@pytest.mark.parametrize("args", [
    ["list"], ["list", "plugins"], ["recipes", "keys"], ["recipes", "show", "quickstart"],
    ["recipes", "show", "mrm_prism"], ["fit", "--recipe", "quickstart", "--print-config"],
    ["fit", "--recipe", "quickstart", "methods.lore.rank=0"], ["fit", "--recipe", "quickstart", "data.n_users=0"],
    ["profile", "--dataset", "nope"], ["embed", "--recipe", "quickstart", "backbone.nope=1"],
], ids=" ".join)
def test_commands_that_train_nothing_import_no_torch_once_the_catalog_is_written(args, tmp_path):
    warm = _probe(["list"], tmp_path)  # the first command of an environment writes the catalog
    assert warm.returncode == 0, warm.stderr[-2000:]
    proc = _probe(args, tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("HEAVY: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if list(args) not in COMPARED:
        return
    off = _probe(args, tmp_path, env={**os.environ, "PLRM_CATALOG": "off"})  # the real classes: the same answer
    assert (proc.stdout, proc.stderr.splitlines()[:-1]) == (off.stdout, off.stderr.splitlines()[:-1])
    assert off.stderr.splitlines()[-1].split()[-1] == last.split()[-1]  # the same exit code


def test_plugin_messages_are_said_again_from_the_catalog(tmp_path):
    env = {**os.environ, "PLRM_PLUGINS": "nope_plugin"}
    first, second = _probe(["list", "methods"], tmp_path, env), _probe(["list", "methods"], tmp_path, env)
    said = [line for line in first.stderr.splitlines() if "PLRM_PLUGINS names 'nope_plugin'" in line]
    assert said and said == [line for line in second.stderr.splitlines() if "nope_plugin" in line]
    assert first.stdout == second.stdout
