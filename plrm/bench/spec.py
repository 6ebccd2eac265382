"""Benchmark recipes: which methods on which datasets, over which seeds, with which options.

A benchmark recipe is YAML like a run recipe (``extends`` and ``key=value`` overrides work the same)::

    bench:                      # plrm.bench.spec.BenchSection
      name: quick
      methods: all              # every registered method, built-in or from an installed plugin; or a list
      datasets: [lowrank_world] # likewise
      seeds: [0, 1]             # split seeds: every cell runs once per seed
      k_list: [1, 3, 9]         # the few-shot curve
    cell:                       # any run-recipe section shared by every cell: split, eval, trainer, logger, backbone
      trainer: {num_threads: 1}
    method_options:             # per method: its recipe options (used wherever the method runs), and optionally
      lore: {rank: 4}           # a `backbone:` section for its cells
      pdpo: {backbone: {name: causal_lm, model: offline:smollm2}}
    dataset_options:            # per dataset: its options, and optionally a `backbone:` section for its cells
      attribute_world: {n_users: 60, backbone: {name: frozen_encoder}}

A cell's backbone is the method's own ``backbone:`` if it has one, else the dataset's, else ``cell.backbone``:
an LM-level method (P-DPO, GenARM: a causal LM) runs beside feature-based ones in one benchmark, and where its
backbone cannot read the dataset (a feature-only world has no text) the cell is skipped with that reason.

Each (dataset, method, seed) *unit* becomes an ordinary run recipe (:meth:`BenchSpec.cell_recipe`), validated
by plrm.recipe like any other, so every option error names its key path. Units come in a fixed order (datasets,
then methods, then seeds), which makes ``--shard i/N`` deterministic: shard i takes every N-th unit from i.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from typing import Literal

import yaml

from plrm import registry
from plrm.config import opt
from plrm.recipe import (
    FIXED_SECTIONS,
    SEED_MAX,
    Origins,
    Recipe,
    RecipeError,
    apply_overrides,
    build_component,
    build_section,
    component_config_class,
    did_you_mean,
    forget_origins,
    override_keys,
    read_recipe_with_origins,
    resolve,
    resolve_paths_of,
    validate,
)

TOP_LEVEL = ("bench", "cell", "method_options", "dataset_options", "extends", "description")
CELL_SECTIONS = (*FIXED_SECTIONS, "backbone")


@dataclass
class BenchSection:
    name: str = opt("bench", "Benchmark name: results go to <output_dir>/<name> (rerunning resumes there).",
                    nonempty=True)
    output_dir: str = opt("bench", "Where benchmark directories are written.", nonempty=True)
    methods: list[str] | Literal["all"] = opt(
        "all", "Methods to run: a list of registry names, or 'all' (every registered method, plugins included).",
        nonempty=True)
    datasets: list[str] | Literal["all"] = opt(
        "all", "Datasets to run: a list of registry names, or 'all' (every registered dataset, plugins included).",
        nonempty=True)
    exclude_methods: list[str] = opt([], "Methods left out of 'all'.")
    exclude_datasets: list[str] = opt([], "Datasets left out of 'all'.")
    seeds: list[int] = opt([0, 1], "Split seeds; every cell runs once per seed and reports mean +- std.",
                           nonempty=True, min=0, max=SEED_MAX)
    k: int = opt(9, "Support pairs per unseen user for the headline unseen accuracy (split.k of every cell).", min=1)
    k_list: list[int] = opt([1, 3, 9], "Few-shot curve: support sizes k (eval.k_list of every cell).",
                            nonempty=True, min=1)
    retry_failed: bool = opt(True, "On a rerun, run again the (cell, seed)s that failed before.")


@dataclass(frozen=True)
class Unit:
    """One (dataset, method, seed) run of a benchmark."""

    dataset: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}/seed-{self.seed}"


@dataclass
class BenchSpec:
    bench: BenchSection
    cell: dict
    method_options: dict
    dataset_options: dict
    description: str = ""
    raw: dict = field(default_factory=dict)
    source: str = "bench recipe"
    # datasets that 'all' brought in but that need options the recipe does not give (e.g. a path): skipped
    not_configured: dict[str, str] = field(default_factory=dict)

    # ---- what runs -----------------------------------------------------------------------------------------
    def method_names(self) -> list[str]:
        b = self.bench
        return [m for m in registry.methods.names() if m not in b.exclude_methods] if b.methods == "all" \
            else list(b.methods)

    def dataset_names(self) -> list[str]:
        b = self.bench
        return [d for d in registry.datasets.names() if d not in b.exclude_datasets] if b.datasets == "all" \
            else list(b.datasets)

    def units(self) -> list[Unit]:
        """Datasets, then methods, then seeds; within a dataset, methods that share a backbone run together (in
        their listed order), so each (dataset, backbone) is loaded and prepared once."""
        units, methods = [], self.method_names()
        for d in self.dataset_names():
            backbones = [yaml.safe_dump(self.backbone_raw(d, m), sort_keys=True) for m in methods]
            first = {b: i for i, b in reversed(list(enumerate(backbones)))}
            order = sorted(range(len(methods)), key=lambda i: first[backbones[i]])  # stable: listed order kept
            units += [Unit(d, methods[i], s) for i in order for s in self.bench.seeds]
        return units

    def backbone_raw(self, dataset: str, method: str) -> dict | None:
        """The backbone section of a (dataset, method) cell: the method's, else the dataset's, else the cell's."""
        for own in ((self.method_options.get(method) or {}), (self.dataset_options.get(dataset) or {})):
            if "backbone" in own:
                return copy.deepcopy(own["backbone"])
        return copy.deepcopy(self.cell.get("backbone"))

    # ---- the run recipe of one unit ------------------------------------------------------------------------------
    def cell_raw(self, unit: Unit, runs_dir: str) -> dict:
        raw = copy.deepcopy(self.cell)
        d_opts = copy.deepcopy(self.dataset_options.get(unit.dataset) or {})
        m_opts = copy.deepcopy(self.method_options.get(unit.method) or {})
        backbone = self.backbone_raw(unit.dataset, unit.method)
        d_opts.pop("backbone", None), m_opts.pop("backbone", None)
        if backbone is not None:
            raw["backbone"] = backbone
        raw["data"] = {"name": unit.dataset, **d_opts}
        raw["methods"] = {unit.method: {"name": unit.method, **m_opts}}
        raw.setdefault("run", {}).update(name=f"{unit.dataset}/{unit.method}/seed-{unit.seed}", output_dir=runs_dir,
                                         overwrite=True)  # a run left half-done by an interrupt is replaced
        raw.setdefault("split", {}).update(seeds=[unit.seed], k=self.bench.k)
        raw.setdefault("eval", {})["k_list"] = list(self.bench.k_list)
        raw.setdefault("logger", {}).setdefault("group", self.bench.name)  # one W&B group per benchmark
        raw["description"] = f"{self.bench.name}: {unit.method} on {unit.dataset}, split seed {unit.seed}"
        return raw

    def cell_recipe(self, unit: Unit, runs_dir: str) -> Recipe:
        try:
            return validate(self.cell_raw(unit, runs_dir), source=f"{self.source}, cell {unit.dataset} x {unit.method}")
        except RecipeError as exc:
            raise RecipeError(f"{exc}\n  (in a benchmark, data.* comes from dataset_options.{unit.dataset}, "
                              f"methods.{unit.method}.* from method_options.{unit.method}, the rest from cell.*)") \
                from exc

    def fingerprint(self, unit: Unit) -> str:
        """Identifies a unit's resolved recipe: a stored result is reused only while this is unchanged."""
        text = yaml.safe_dump(self.cell_raw(unit, "-"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/N' -> (i, N), 0 <= i < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise RecipeError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_units(units: list[Unit], shard: tuple[int, int]) -> list[Unit]:
    i, n = shard
    return units[i::n]


def load_bench(name_or_path: str | dict, overrides: list[str] | None = None) -> BenchSpec:
    """Read (``extends`` merged), override and validate a benchmark recipe; every problem listed at once."""
    source = name_or_path if isinstance(name_or_path, str) else "bench recipe"
    if isinstance(name_or_path, dict):
        raw, origins = copy.deepcopy(name_or_path), {}
    else:
        raw, origins = read_recipe_with_origins(name_or_path)
    raw.pop("extends", None)
    raw = resolve(apply_overrides(raw, overrides or []))
    _resolve_bench_paths(raw, forget_origins(origins, override_keys(overrides or [])))
    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            hint = did_you_mean(str(key), list(TOP_LEVEL))
            what = " (a run recipe? use `plrm fit`)" if key in ("data", "methods") else ""
            problems.append(f"{key}: unknown top-level key{hint}{what}")
    if "bench" not in raw:
        problems.append("bench: required section is missing (which methods and datasets to run)")
    bench = build_section(BenchSection, raw.get("bench") or {}, "bench", problems)
    cell = raw.get("cell") or {}
    if not isinstance(cell, dict):
        problems.append(f"cell: expected a mapping of run-recipe sections, got {type(cell).__name__}")
        cell = {}
    for key in cell:
        if key not in CELL_SECTIONS:
            hint = did_you_mean(str(key), list(CELL_SECTIONS))
            why = " (data and methods come from bench.datasets / bench.methods and dataset_options / method_options)"
            problems.append(f"cell.{key}: not a section a benchmark shares{hint}"
                            f"{why if key in ('data', 'methods') else ''}")
    options = {}
    for section, reg in (("method_options", registry.methods), ("dataset_options", registry.datasets)):
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of name -> options, got {type(values).__name__}")
            values = {}
        for name, opts in values.items():
            if name not in reg and name not in _broken_names(reg):
                hint = did_you_mean(str(name), reg.names())
                problems.append(f"{section}.{name}: unknown {reg.kind}{hint}")
            if opts is not None and not isinstance(opts, dict):
                problems.append(f"{section}.{name}: expected a mapping of options, got {type(opts).__name__}")
        options[section] = values
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    for listed, reg in ((bench.methods, registry.methods), (bench.datasets, registry.datasets)):
        if listed != "all":
            for name in listed:
                reg.get(name)  # an unknown or broken name fails here, with "did you mean" or the plugin's error
    spec = BenchSpec(bench, cell, options["method_options"], options["dataset_options"],
                     description=str(raw.get("description", "")), raw=raw, source=source)
    if bench.datasets == "all":
        for name in spec.dataset_names():
            missing = _missing_required(name, spec.dataset_options.get(name) or {})
            if missing and name not in spec.dataset_options:
                spec.not_configured[name] = (
                    f"dataset '{name}' needs {', '.join(f'data.{k}' for k in missing)}; set "
                    + ", ".join(f"dataset_options.{name}.{k}" for k in missing) + " to include it")
    for unit in {(u.dataset, u.method): u for u in spec.units()}.values():
        if unit.dataset not in spec.not_configured:
            spec.cell_recipe(unit, "-")  # every cell's options are checked before anything runs
    return spec


def _resolve_bench_paths(raw: dict, origins: Origins) -> None:
    """In place: path options (``opt(..., path=True)``) that the benchmark recipe file gives as relative paths
    become absolute against that file's folder, as in a run recipe (plrm.recipe.resolve_paths); every cell then
    gets the absolute path."""
    cell = raw.get("cell")
    if isinstance(cell, dict):
        for name, cls in FIXED_SECTIONS.items():
            resolve_paths_of(cell.get(name), cls, ("cell", name), origins)
        backbone = component_config_class(registry.backbones, cell.get("backbone"), "precomputed")
        if backbone is not None:
            resolve_paths_of(cell["backbone"], backbone, ("cell", "backbone"), origins)
    for section, reg in (("method_options", registry.methods), ("dataset_options", registry.datasets)):
        values = raw.get(section)
        for name, opts in (values.items() if isinstance(values, dict) else ()):
            if not isinstance(opts, dict):
                continue
            cls = component_config_class(reg, {}, str(name))
            if cls is not None:
                resolve_paths_of(opts, cls, (section, str(name)), origins)
            own = component_config_class(registry.backbones, opts.get("backbone"), "precomputed")
            if own is not None:
                resolve_paths_of(opts["backbone"], own, (section, str(name), "backbone"), origins)


def _missing_required(dataset: str, options: dict) -> list[str]:
    """Options of ``dataset`` that have no default and are not given."""
    problems: list[str] = []
    opts = {k: v for k, v in options.items() if k != "backbone"}
    build_component(registry.datasets, {"name": dataset, **opts}, "data", problems)
    found = [re.match(r"data\.(\w+): required key is missing", p) for p in problems]
    other = [p for p, m in zip(problems, found) if not m and "required positional argument" not in p]
    return [] if other else [m.group(1) for m in found if m]


def _broken_names(reg) -> set[str]:
    return {b.name for b in reg.broken()}
