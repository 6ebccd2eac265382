"""Recipes: OmegaConf YAML files that name the dataset, backbone, methods, trainer, logger, eval and seeds.

A recipe is data, read with ``yaml.safe_load``; no code runs because of it. ``extends: <name-or-path>``
merges a base recipe first (several levels allowed). ``key=value`` overrides (OmegaConf dotlist syntax)
apply last. Validation walks the whole recipe against one schema -- the fixed sections below plus the
``Config`` dataclass of the chosen dataset, backbone and each method -- and reports every problem at once,
each with its full key path and, for an unknown key, the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.resources
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from omegaconf import OmegaConf

from plrm import registry
from plrm.config import bounds_of, check_value, default_of, forbidden, help_of, is_path, opt, type_hints, type_name
from plrm.errors import RecipeError  # noqa: F401  (re-exported: plrm.errors defines every error class)
from plrm.registry import BrokenPlugin, Origin

if TYPE_CHECKING:
    from plrm.backbones.base import Backbone
    from plrm.data.source import DatasetSource, EncoderRequest, PreferenceData


# ---- fixed sections --------------------------------------------------------------------------------------
SEED_MAX = 2**32 - 1  # Lightning's seed_everything and numpy take seeds in [0, 2**32)


@dataclass
class RunSection:
    name: str = opt("run", "Run name: the run directory is <output_dir>/<name>.", nonempty=True)
    output_dir: str = opt("runs", "Where run directories are written.", nonempty=True)
    seed: int = opt(0, "Seed of model initialisation and data order (split seeds are split.seeds).",
                    min=0, max=SEED_MAX)
    seed_per_split: bool = opt(False, "Seed model initialisation and data order with run.seed + the split seed, "
                               "so the spread over split.seeds includes training randomness, not only the split's.")
    overwrite: bool = opt(False, "Replace an existing run of the same name instead of failing. Only a plrm run (a "
                          "folder with plrm-run.json) is ever replaced, and only once the new run is complete: it is "
                          "built in <output_dir>/.<name>.plrm-staging and swapped in at the end.")
    resume: bool = opt(False, "Continue the incomplete run of this name (a killed or failed `plrm fit` of the same "
                       "recipe): finished (seed, method) units are kept, the interrupted one continues from "
                       "seed-<s>/<label>.last.ckpt; a run that does not exist yet is started. Same as --resume.")
    checkpoint_every_n_steps: int = opt(
        200, "While a method trains, write its resumable checkpoint (seed-<s>/<label>.last.ckpt) every this many "
        "training batches (0: only at epoch ends), and always at epoch ends.", min=0)
    checkpoint_interval: float = opt(
        30.0, "At most one resumable checkpoint per this many seconds (0: every one that is due); a full-batch "
        "method runs an epoch in milliseconds.", min=0)


@dataclass
class SplitSection:
    seeds: list[int] = opt([0], "Split seeds; the whole protocol repeats per seed and reports mean +- std.",
                           nonempty=True, min=0, max=SEED_MAX)
    unseen_fraction: float = opt(0.5, "Fraction of users held out as unseen (few-shot) users.", min=0, lt=1)
    test_fraction: float = opt(
        0.5, "Fraction of each user's pairs held out for test; ignored where the dataset has a 'split' column.",
        min=0, lt=1)
    val_fraction: float = opt(0.0, "Fraction of each seen user's train pairs held out for validation.", min=0, lt=1)
    k: int = opt(9, "Support pairs per unseen user for the headline unseen accuracy.", min=1)
    from_file: str | None = opt(
        None, "Reuse a split: a split.parquet written by an earlier run, or a JSON file "
        "{'seen_users': [...], 'unseen_users': [...]} such as a paper's published user split. A relative path "
        "written in a recipe file is relative to that file's folder.", path=True)


@dataclass
class EvalSection:
    k_list: list[int] = opt([1, 3, 9], "Few-shot curve: support sizes k at which unseen users are adapted and tested.",
                            nonempty=True, min=1)
    worst_fractions: list[float] = opt([0.1, 0.2, 0.5], "Report the mean accuracy of the worst q of users for each q.",
                                       gt=0, max=1)
    batch_size: int = opt(262144, "Pairs scored per chunk during evaluation (memory vs speed).", min=1)


@dataclass
class TrainerSection:
    accelerator: str = opt("cpu", "Lightning accelerator: cpu, gpu, auto.")
    devices: Any = opt(1, "Lightning devices per node: a count, a list of ids, or 'auto'. With strategy ddp and "
                          "accelerator cpu, the number of processes (gloo).")
    num_nodes: int = opt(1, "Machines of a distributed run (torchrun or SLURM start one process per device).", min=1)
    strategy: str = opt(
        "auto", "Lightning strategy: auto (one process), ddp (one process per device, on every node; batch_size "
        "stays the global batch, each rank trains on its part of it and evaluates its part of the rows), fsdp "
        "(ddp that also shards the parameters of a large trainable backbone: CUDA GPUs only, a CPU request is "
        "refused), or any other Lightning strategy name.")
    precision: str = opt("32-true", "Lightning precision string, e.g. 32-true, bf16-mixed. bf16 also stores the "
                                    "frozen-feature difference table (difference_cache) in bf16: half its memory, "
                                    "2-2.5x faster full-batch steps on CPUs with bf16 matmul.")
    gradient_clip_val: float | None = opt(None, "Clip gradient norm to this value (null: no clipping).", gt=0)
    deterministic: bool = opt(False, "torch deterministic algorithms.")
    log_every_n_steps: int = opt(10, "Logging interval in training steps.", min=1)
    progress_bar: bool | Literal["auto"] = opt(
        "auto", "Progress bars: true, false, or 'auto' (bars on a terminal, plain log lines in batch jobs).")
    num_threads: int | None = opt(None, "torch intra-op threads on CPU (null: torch's default).", min=1)


@dataclass
class LoggerSection:
    kind: Literal["wandb", "csv", "tensorboard", "none"] = opt("wandb", "Experiment tracker.")
    project: str = opt("plrm", "W&B project / TensorBoard and CSV sub-folder.")
    entity: str | None = opt(None, "W&B entity (team or user).")
    mode: Literal["auto", "online", "offline", "disabled"] = opt(
        "auto", "W&B mode. 'auto': WANDB_MODE if set, else online when credentials exist, else offline (said once).")
    tags: list[str] = opt([], "W&B tags.")
    group: str | None = opt(None, "W&B group of the run's W&B runs (null: the run name; `plrm bench`: the benchmark).")


@dataclass
class PolicySection:
    """The policy stage (The Reward Model Selection Crisis in Personalized Alignment, Rezk et al., arXiv
    2512.23067): after a method is trained and its unseen users adapted, a base policy LM decodes under its reward
    (ARGS) and is judged by policy accuracy, ROUGE / BERTScore against the users' reference completions, and the
    circular win rate."""

    enabled: bool = opt(False, "Run the policy stage. A recipe's policy: section turns it on unless it says "
                               "enabled: false.")
    model: str = opt("offline:smollm2", "The base policy: a causal LM (Hub id, directory or offline alias) that "
                                        "shares the reward model's tokenizer.", nonempty=True)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Policy weights dtype (auto: bfloat16 on a GPU that supports it, else float32).")
    chat_template: Literal["auto", "always", "never"] = opt(
        "auto", "Render prompts with the policy tokenizer's chat template (auto: when it has one).")
    max_length: int = opt(1024, "Tokens of prompt (+ response when scoring) the policy reads.", min=2)
    decoder: Literal["args", "genarm"] = opt(
        "args", "args: ARGS for every reward method (Khanov et al., arXiv 2402.01694); genarm: token-level methods "
                "decode GenARM's way, log pi + (lambda) r over the whole vocabulary (Xu et al., arXiv 2410.08193), "
                "the others ARGS. P-DPO always generates from its own personalized policy.")
    k: int = opt(10, "ARGS: candidates per step, the top-k of the policy (ARGS paper: 10).", min=1)
    weight: float | Literal["auto"] = opt(
        "auto", "lambda, the reward's weight in log pi + lambda r: a number, or auto = the lambda that maximizes "
                "policy accuracy on the seen users' test pairs, found exactly (Selection Crisis App. F.2).", min=0)
    lambda_max: float | None = opt(None, "auto: search lambda in [0, lambda_max] (null: 100 / std of the seen pairs' "
                                         "reward differences, so a flat reward cannot get an absurd weight).", gt=0)
    max_new_tokens: int = opt(32, "Generated tokens per prompt at most (a row stops at EOS / end of turn).", min=1)
    mode: Literal["greedy", "sample"] = opt("greedy", "Decoding: greedy (the paper's) or sampling.")
    temperature: float = opt(0.7, "Sampling temperature (mode: sample).", gt=0)
    seed: int = opt(0, "Seed of sampling.")
    prompts_per_user: int = opt(4, "Generations per unseen user: their first test prompts (distinct).", min=1)
    pairs_per_user: int | None = opt(None, "Policy accuracy: test pairs per user at most (null: all; the paper "
                                           "used 1 on PRISM).", min=1)
    batch_size: int = opt(8, "Prompts decoded (or pairs scored) together.", min=1)
    baselines: list[Literal["icl", "icl_rag"]] = opt(
        [], "Rows without a reward model, beside zero-shot: icl (the base policy reading icl_shots of the user's "
            "support pairs as demonstrations, drawn at random) and icl_rag (the most similar ones, MiniLM cosine "
            "of the prompts).", unique=True)
    icl_shots: int = opt(8, "Demonstrations per prompt of icl / icl_rag (Selection Crisis §4: 8), from the "
                            "user's first split.k support pairs (the ones the reward models adapt on).", min=1)
    bertscore_model: str | None = opt(None, "BERTScore-F1 against the references with this model (e.g. "
                                            "roberta-large on a cluster, offline:minilm offline; null: skip).")
    bertscore_layers: int | None = opt(None, "Hidden layer BERTScore reads (null: the model's last; roberta-large: "
                                             "17 in bert-score's defaults).", min=1)


FIXED_SECTIONS: dict[str, type] = {
    "run": RunSection,
    "split": SplitSection,
    "eval": EvalSection,
    "trainer": TrainerSection,
    "logger": LoggerSection,
    "policy": PolicySection,
}
DYNAMIC_SECTIONS = ("data", "backbone", "methods")
TOP_LEVEL = (*FIXED_SECTIONS, *DYNAMIC_SECTIONS, "extends", "description")


@dataclass
class Component:
    """A registry entry chosen by a recipe: its registry name and its typed options."""

    name: str
    config: Any


@dataclass
class Recipe:
    run: RunSection
    split: SplitSection
    eval: EvalSection
    trainer: TrainerSection
    logger: LoggerSection
    policy: PolicySection
    data: Component
    backbone: Component
    methods: dict[str, Component]
    description: str = ""
    raw: dict = dataclasses.field(default_factory=dict)  # resolved recipe as plain data (written to the run dir)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


# ---- finding and reading recipe files -------------------------------------------------------------------
RECIPE_GROUP = "plrm.recipes"


@dataclass(frozen=True)
class RecipeFile:
    """A recipe known by name: its file and where it came from (plrm itself, or a plugin's distribution)."""

    name: str
    path: Path
    origin: Origin


@dataclass
class PluginRecipes:
    """The recipes plugins ship (``plrm.recipes`` entry points), and what was left out, with the reason: an entry
    point that names no folder of recipes, or a recipe whose name a built-in or an earlier plugin already has."""

    recipes: dict[str, RecipeFile]
    broken: list[BrokenPlugin]  # shown by `plrm list` and `plrm recipes list`
    shadowed: dict[str, list[RecipeFile]]  # name -> the plugin recipes left out for it


def builtin_recipe_dir() -> Path:
    return Path(str(importlib.resources.files("plrm") / "recipes"))


def _recipes_in(root: Path) -> dict[str, Path]:
    """name (path below ``root`` without .yaml) -> file, for every YAML file under ``root``."""
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def builtin_recipes() -> dict[str, Path]:
    return _recipes_in(builtin_recipe_dir())


def _recipe_entry_points() -> list:
    return registry.entry_points(RECIPE_GROUP)  # tests swap in fake entry points


def recipe_folder(entry_point: Any) -> Path:
    """The folder a ``plrm.recipes`` entry point names: ``package:folder`` is ``folder`` inside the importable
    ``package`` (resolved with importlib.resources, so it works wherever pip put the package); a bare
    ``package`` is the package's own folder. Raises what importing the package raises, or FileNotFoundError."""
    package, _, folder = entry_point.value.partition(":")
    root = importlib.resources.files(package.strip())
    for part in filter(None, folder.strip().split("/")):
        root = root / part
    path = Path(str(root))
    if not path.is_dir():  # also a package installed zipped: its files are not a folder on disk
        raise FileNotFoundError(f"no folder {path} (ship the recipes as package data of {package.strip()})")
    if not any(path.rglob("*.yaml")):
        raise FileNotFoundError(f"{path} holds no *.yaml recipe (ship them as package data of {package.strip()})")
    return path


@functools.cache
def plugin_recipes() -> PluginRecipes:
    """Recipes of the installed plugins, read once per process. Each entry point is read on its own, like method
    plugins (plrm.registry): one that fails is recorded with its distribution and error and the rest are used. A
    built-in recipe, or one an earlier entry point brought, keeps its name; the later one is left out and the
    clash recorded. ``PLRM_DISABLE_PLUGIN_AUTOLOAD`` and ``PLRM_PLUGINS`` apply as to every plugin group."""
    found = PluginRecipes({}, [], {})
    if registry.autoload_disabled():
        return found
    allow = registry.allowed_plugins()
    builtin = builtin_recipes()
    for ep in _recipe_entry_points():
        if allow and ep.name not in allow:
            continue
        origin = registry.entry_point_origin(ep)
        try:  # a plugin's import error (SystemExit included) or missing folder must never break plrm
            folder = registry.run_isolated(lambda ep=ep: recipe_folder(ep))
        except registry.PluginLoadError as exc:
            found.broken.append(BrokenPlugin(ep.name, RECIPE_GROUP, origin,
                                             registry.plugin_failure(exc.cause, origin, exc.printed)))
            continue
        for name, path in _recipes_in(folder).items():
            recipe = RecipeFile(name, path, origin)
            if name in builtin or name in found.recipes:
                owner = "the built-in recipe" if name in builtin else f"the one from {found.recipes[name].origin}"
                found.shadowed.setdefault(name, []).append(recipe)
                found.broken.append(BrokenPlugin(ep.name, RECIPE_GROUP, origin, (
                    f"name clash: recipe '{name}' ({path}) would replace {owner}, which is used; rename the file")))
                continue
            found.recipes[name] = recipe
    return found


def all_recipes() -> dict[str, RecipeFile]:
    """Every recipe known by name: the built-ins, then the plugins' (``plrm recipes list``)."""
    builtin = Origin(registry.BUILTIN, registry.plrm_version())
    return {**{n: RecipeFile(n, p, builtin) for n, p in builtin_recipes().items()}, **plugin_recipes().recipes}


_clashes_said: set[str] = set()


def find_recipe(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A recipe file: a path (tried relative to ``relative_to`` first, for ``extends``), else a built-in recipe's
    name, else the name of a recipe a plugin ships (``plrm.recipes``)."""
    p = Path(name_or_path)
    candidates = [p] if p.is_absolute() else ([relative_to / p] if relative_to else []) + [p]
    for c in candidates:
        if c.is_file():
            return c
        if c.suffix == "" and c.with_suffix(".yaml").is_file():
            return c.with_suffix(".yaml")
    known = all_recipes()
    key = name_or_path.removesuffix(".yaml")
    if key in known:
        left_out = plugin_recipes().shadowed.get(key, [])
        if left_out and key not in _clashes_said:  # said once: extends chains look a name up repeatedly
            _clashes_said.add(key)
            others = ", ".join(str(r.origin) for r in left_out)
            print(f"plrm: recipe '{key}' is the one from {known[key].origin}; the recipe of that name in {others} "
                  "is left out (name clash)", file=sys.stderr)
        return known[key].path
    hint = difflib.get_close_matches(key, list(known), n=1)
    did = f" Did you mean '{hint[0]}'?" if hint else ""
    raise RecipeError(
        f"recipe '{name_or_path}' is neither a file nor a known recipe (built-in or from a plugin).{did} "
        f"Recipes: {', '.join(known)} (see `plrm recipes list`)")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, child: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


Origins = dict[tuple[str, ...], Path]  # key path of a value -> folder of the recipe file that set it


def _leaf_keys(data: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of every value of ``data`` that is not itself a mapping."""
    out = []
    for k, v in data.items():
        keys = (*prefix, str(k))
        if isinstance(v, dict):
            out += _leaf_keys(v, keys)  # an empty mapping merges into the base without replacing anything
        else:
            out.append(keys)
    return out


def read_recipe_with_origins(name_or_path: str, _seen: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    """:func:`read_recipe`, and for each value the folder of the recipe file it comes from (where a relative
    path option written there is resolved, :func:`resolve_paths`)."""
    path = find_recipe(name_or_path, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError(f"recipe 'extends' forms a cycle: {chain}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    origins = {keys: path.parent for keys in _leaf_keys(data)}
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: 'extends' must be a recipe name or path, got {parent!r}")
    base, base_origins = read_recipe_with_origins(parent, (*_seen, path))
    return _deep_merge(base, data), {**forget_origins(base_origins, list(origins)), **origins}


def read_recipe(name_or_path: str, _seen: tuple[Path, ...] = ()) -> dict:
    """The raw recipe with its ``extends`` chain merged (base first)."""
    return read_recipe_with_origins(name_or_path, _seen)[0]


def override_keys(overrides: list[str]) -> list[tuple[str, ...]]:
    """The key path each ``key=value`` / ``~key`` override sets or deletes (``a.b[0]`` -> ('a', 'b', '0'))."""
    keys = []
    for o in overrides:
        key = o.lstrip("~").removeprefix("+").split("=", 1)[0].strip()
        keys.append(tuple(filter(None, re.split(r"[.\[\]]+", key))))
    return keys


def forget_origins(origins: Origins, keys: list[tuple[str, ...]]) -> Origins:
    """``origins`` without the values that ``keys`` replace: the keys themselves, what lies below them, and a value
    of which one of them replaces a part (a list item)."""
    def replaced(known: tuple[str, ...]) -> bool:
        return any(known[:len(k)] == k or k[:len(known)] == known for k in keys)
    return {known: folder for known, folder in origins.items() if not replaced(known)}


def _absolute(value: Any, folder: Path) -> Any:
    if isinstance(value, str):
        return str(folder / value) if value and not Path(value).expanduser().is_absolute() else value
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    return value  # not a path: validation reports its type


def resolve_paths_of(values: Any, cls: type, keys: tuple[str, ...], origins: Origins) -> None:
    """In place: every path option (``opt(..., path=True)``) of dataclass ``cls`` in the mapping ``values`` (found
    at key path ``keys``) that a recipe file set to a relative path becomes that file's folder / the path. Values
    without an origin (command-line overrides, recipes given as dicts) are left as they are: relative to the
    working directory."""
    if not isinstance(values, dict) or not dataclasses.is_dataclass(cls):
        return
    for f in dataclasses.fields(cls):
        folder = origins.get((*keys, f.name))
        if is_path(f) and f.name in values and folder is not None:
            values[f.name] = _absolute(values[f.name], folder)


def component_config_class(reg: Any, values: Any, default_name: str | None) -> type | None:
    """The ``Config`` of the registry entry a component section names (``name``, else ``default_name``); None
    when it names none that can be loaded (validation reports that)."""
    name = values.get("name", default_name) if isinstance(values, dict) else None
    try:
        return reg.get(name).Config if name is not None else None
    except Exception:  # an unknown or broken name: validation reports it
        return None


def _registries(registries: dict | None) -> dict:
    """``registries`` (plrm.catalog's stand-ins), or plrm's own with the built-ins imported."""
    if registries is not None:
        return registries
    registry.ensure_builtins()
    return registry.REGISTRIES


def resolve_paths(raw: dict, origins: Origins, registries: dict | None = None) -> None:
    """In place: the relative path options of a run recipe, resolved against the folder of the recipe file that
    wrote each of them (:func:`resolve_paths_of`); the sections' classes are found as validation finds them (in
    ``registries``: see :func:`validate`)."""
    regs = _registries(registries)
    for name, cls in FIXED_SECTIONS.items():
        resolve_paths_of(raw.get(name), cls, (name,), origins)
    for section, reg, default in (("data", regs["datasets"], None), ("backbone", regs["backbones"], "precomputed")):
        cls = component_config_class(reg, raw.get(section), default)
        if cls is not None:
            resolve_paths_of(raw[section], cls, (section,), origins)
    methods = raw.get("methods")
    for label, values in (methods.items() if isinstance(methods, dict) else ()):
        cls = component_config_class(regs["methods"], values, str(label))
        if cls is not None:
            resolve_paths_of(values, cls, ("methods", str(label)), origins)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """OmegaConf dotlist overrides (``methods.lore.rank=5``); ``~key`` deletes a key; ``+key=value`` (Hydra's
    spelling for adding a key) is accepted the same as ``key=value``, since the schema decides what is valid."""
    deletes = [o[1:] for o in overrides if o.startswith("~")]
    sets = [o.removeprefix("+") for o in overrides if not o.startswith("~")]
    for o in sets:
        if "=" not in o:
            raise RecipeError(f"override '{o}' is not of the form key=value")
    cfg = OmegaConf.create(raw)
    for o in sets:  # one at a time, so that an override OmegaConf cannot merge is named
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o]))
        except Exception as exc:  # omegaconf raises TypeError and several of its own errors here
            raise RecipeError(f"override '{o}' cannot be applied: {exc} (a mapping can only be replaced key by "
                              "key, or deleted with ~key first)") from exc
    out = OmegaConf.to_container(cfg, resolve=False)
    for key in deletes:
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or last not in node:
            raise RecipeError(f"override '~{key}': no such key to delete")
        del node[last]
    return out


def resolve(raw: dict) -> dict:
    """Resolve ``${...}`` interpolations."""
    try:
        return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as exc:  # omegaconf raises several exception types for bad interpolations
        raise RecipeError(f"recipe interpolation failed: {exc}") from exc


# ---- validation --------------------------------------------------------------------------------------------
def did_you_mean(key: str, valid: list[str]) -> str:
    """"; did you mean 'x'?" for the closest of ``valid`` to ``key``, else the list of valid keys."""
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{hint[0]}'?" if hint else f"; valid keys: {', '.join(valid)}"


def build_section(cls: type, values: Any, path: str, problems: list[str], extra_valid: tuple[str, ...] = ()) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, appending every problem (with key path) to ``problems``.

    Each value is checked against its type, then against the bounds its :func:`~plrm.config.opt` declares
    (``methods.lore.rank: must be >= 1, got 0``). Only a section without problems is built: its ``__post_init__``
    may reject a combination of values, and a ``check(self) -> list[str]`` method, if the class has one, may add
    cross-field problems, each starting with the option's name (reported as ``<path>.<message>``), as do the
    combinations of values its :class:`~plrm.config.Forbid` rules refuse (checked first)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append(f"{path}: must be a mapping, got {values!r}")
        return None
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = list(fields) + list(extra_valid)
    before = len(problems)
    kwargs = {}
    for key, value in values.items():
        if key in extra_valid:
            continue
        if key not in fields:
            problems.append(f"{path}.{key}: unknown key{did_you_mean(str(key), valid)}")
            continue
        ok, coerced = check_value(value, hints[key])
        if not ok:
            problems.append(f"{path}.{key}: expected {type_name(hints[key])}, got {value!r}")
            continue
        bounds = bounds_of(fields[key])
        out_of_bounds = bounds.problems(coerced) if bounds is not None else []
        problems += [f"{path}.{key}{where}: {what}" for where, what in out_of_bounds]
        if not out_of_bounds:
            kwargs[key] = coerced
    for name, f in fields.items():
        if name not in kwargs and name not in values and default_of(f) is dataclasses.MISSING:
            problems.append(f"{path}.{name}: required key is missing ({help_of(f)})")
    if len(problems) > before:  # a Config's own checks would only repeat (or trip over) what is reported
        return None
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a Config's __post_init__ may reject a combination of values
        problems.append(f"{path}: {exc}")
        return None
    problems += [f"{path}.{rule.message}" for rule in forbidden(cls) if rule.matches(obj)]
    check = getattr(type(obj), "check", None)
    if callable(check):  # cross-field checks: messages start with the option's name ("max_steps: ...")
        problems += [f"{path}.{message}" for message in check(obj)]
    return obj


def build_component(registry: Any, values: Any, path: str, problems: list[str], default_name: str | None = None):
    """A recipe's component section (``name`` + the registered class's options) as a :class:`Component`,
    appending every problem (with key path) to ``problems``."""
    if not isinstance(values, dict):
        problems.append(f"{path}: must be a mapping with a 'name' key, got {values!r}")
        return None
    name = values.get("name", default_name)
    if name is None:
        problems.append(f"{path}.name: required key is missing (a registered {registry.kind}; see `plrm list`)")
        return None
    try:
        cls = registry.get(name)
    except LookupError as exc:
        problems.append(f"{path}.name: {exc}")
        return None
    config = build_section(cls.Config, values, path, problems, extra_valid=("name",))
    return Component(name=name, config=config)


def validate(raw: dict, source: str = "recipe", registries: dict | None = None) -> Recipe:
    """Check a resolved raw recipe against the schema; raise one RecipeError listing every problem.
    ``registries``: the registries to check against (``{"methods": ..., "datasets": ..., "backbones": ...}``;
    default plrm's own; plrm.catalog gives stand-ins that need no torch)."""
    regs = _registries(registries)
    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"{key}: unknown section{did_you_mean(str(key), list(TOP_LEVEL))}")
    sections = {name: build_section(cls, raw.get(name), name, problems) for name, cls in FIXED_SECTIONS.items()}
    if isinstance(raw.get("policy"), dict) and "enabled" not in raw["policy"] and sections["policy"] is not None:
        sections["policy"].enabled = True  # a policy: section asks for the stage
    data = build_component(regs["datasets"], raw.get("data"), "data", problems) if "data" in raw else None
    if "data" not in raw:
        problems.append("data: required section is missing (which dataset to use; see `plrm list datasets`)")
    backbone = build_component(regs["backbones"], raw.get("backbone", {}), "backbone", problems,
                               default_name="precomputed")
    methods: dict[str, Component] = {}
    raw_methods = raw.get("methods")
    if not isinstance(raw_methods, dict) or not raw_methods:
        problems.append("methods: required section is missing or empty (a mapping label -> {name: <method>, ...})")
    else:
        for label, values in raw_methods.items():
            comp = build_component(regs["methods"], values if values is not None else {}, f"methods.{label}",
                              problems, default_name=str(label))
            if comp is not None:
                methods[str(label)] = comp
    if problems:
        listing = "\n  ".join(problems)
        raise RecipeError(f"{source}: {len(problems)} problem(s):\n  {listing}")
    return Recipe(data=data, backbone=backbone, methods=methods, raw=raw,
                  description=str(raw.get("description", "")), **sections)


def read_with_overrides(name_or_path: str | dict, overrides: list[str] | None = None,
                        registries: dict | None = None) -> dict:
    """A recipe (name, path or dict) read, with ``extends`` merged, ``overrides`` applied, interpolations resolved
    and relative path options made absolute (:func:`resolve_paths`): what :func:`validate` checks. A path in a
    recipe file is relative to that file's folder; one in an override or in a dict, to the working directory."""
    overrides = list(overrides or [])
    if isinstance(name_or_path, dict):
        raw, origins = copy.deepcopy(name_or_path), {}
        parent = raw.pop("extends", None)
        if parent is not None:
            base, base_origins = read_recipe_with_origins(parent)
            raw, origins = _deep_merge(base, raw), forget_origins(base_origins, _leaf_keys(raw))
    else:
        raw, origins = read_recipe_with_origins(name_or_path)
    raw.pop("extends", None)
    raw = resolve(apply_overrides(raw, overrides))
    resolve_paths(raw, forget_origins(origins, override_keys(overrides)), registries)
    return raw


def load_recipe(name_or_path: str | dict, overrides: list[str] | None = None,
                registries: dict | None = None) -> Recipe:
    """Read, merge ``extends``, apply overrides, resolve and validate a recipe (name, path or dict), against
    ``registries`` (see :func:`validate`)."""
    source = str(name_or_path) if not isinstance(name_or_path, dict) else "recipe"
    raw = read_with_overrides(name_or_path, overrides, registries)
    raw.setdefault("backbone", {"name": "precomputed"})
    return validate(raw, source, registries)


# ---- a dataset on its own (plrm profile, plrm tax) -----------------------------------------------------------
def _data_key(override: str) -> str:
    """``n_users=5`` -> ``data.n_users=5``; ``~``/``+`` prefixes (plrm.recipe.apply_overrides) stay in front."""
    sign = override[0] if override[:1] in ("~", "+") else ""
    body = override[len(sign):]
    return override if body.startswith("data.") else f"{sign}data.{body}"


def dataset_options(dataset: str, overrides: list[str], registries: dict | None = None) -> Component:
    """The registered dataset ``dataset`` with ``key=value`` options (``data.`` prefix optional), validated by
    the recipe schema against ``registries`` (see :func:`validate`): a bad key or value raises RecipeError naming
    ``data.<key>``."""
    regs = _registries(registries)
    dotted = [_data_key(o) for o in overrides]
    if any(o.lstrip("~+").split("=", 1)[0] == "data.name" for o in dotted):
        raise RecipeError(f"data.name: the dataset is '{dataset}', named on its own; drop the name= override")
    raw = resolve(apply_overrides({"data": {"name": dataset}}, dotted))
    problems: list[str] = []
    component = build_component(regs["datasets"], raw["data"], "data", problems)
    if problems:
        raise RecipeError(f"dataset '{dataset}': {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return component


def build_dataset(dataset: str, overrides: list[str]):
    """The registered dataset ``dataset`` built with ``key=value`` options (see :func:`dataset_options`)."""
    component = dataset_options(dataset, overrides)
    return registry.datasets.get(component.name)(component.config)


# ---- loading a dataset, with the item encoder it asks for ----------------------------------------------------
def item_encoder(request: EncoderRequest, dataset: str = "dataset") -> Backbone:
    """The backbone a dataset asks for with ``encoder_request()``, built through the backbone registry; its
    options are checked like a recipe's ``backbone`` section."""
    from plrm import registry

    cls = registry.backbones.get(request.backbone)
    problems: list[str] = []
    config = build_section(cls.Config, dict(request.options), f"{dataset} encoder ({request.backbone})", problems)
    if problems:
        listing = "\n  ".join(problems)
        raise RecipeError(f"dataset '{dataset}' asks for an item encoder plrm cannot build:\n  {listing}")
    return cls(config)


def load_source(source: DatasetSource, name: str | None = None) -> PreferenceData:
    """``source.load()``, handing in the item encoder the dataset asks for (DatasetSource.encoder_request), so that
    a dataset never builds a model itself. The runner, ``plrm profile`` and ``plrm embed`` load through here."""
    request = source.encoder_request()
    if request is None:
        return source.load()
    return source.load(encoder=item_encoder(request, name or type(source).__name__))


# ---- documentation from the schema ---------------------------------------------------------------------------
def _is_list(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is list or (origin in (typing.Union, types.UnionType) and any(map(_is_list, typing.get_args(tp))))


def option_type(f: dataclasses.Field, tp: Any) -> str:
    """An option's type as ``plrm recipes keys`` shows it: the annotation, then the values it accepts beyond it
    (``int, >= 1``; ``list[int], not empty, each >= 1``) and whether it is an input path."""
    bounds = bounds_of(f)
    parts = [type_name(tp), bounds.describe(_is_list(tp)) if bounds is not None else "",
             "input path" if is_path(f) else ""]
    return ", ".join(filter(None, parts))


def describe_dataclass(cls: type, prefix: str) -> list[tuple[str, str, Any, str]]:
    """(key path, type, default, help) for every option of ``cls``; the type names the option's range or choices
    and marks input paths (:func:`option_type`)."""
    hints = type_hints(cls)
    refused: dict[str, list[str]] = {}  # each Forbid rule is shown under the first option it names
    for rule in forbidden(cls):
        refused.setdefault(next(iter(rule.when)), []).append(rule.message)
    rows = []
    for f in dataclasses.fields(cls):
        default = default_of(f)
        help_text = " ".join([help_of(f), *(f"Refused: {m}." for m in refused.get(f.name, []))]).strip()
        rows.append((f"{prefix}.{f.name}", option_type(f, hints[f.name]),
                     "(required)" if default is dataclasses.MISSING else default, help_text))
    return rows


def schema_rows(registries: dict | None = None) -> list[tuple[str, str, Any, str]]:
    """Every key plrm knows, for ``plrm recipes keys`` (``registries``: see :func:`validate`)."""
    regs = _registries(registries)
    rows = []
    for name, cls in FIXED_SECTIONS.items():
        rows += describe_dataclass(cls, name)
    sections = ((regs["datasets"], "data"), (regs["backbones"], "backbone"), (regs["methods"], "methods.<label>"))
    for reg, prefix in sections:
        for name, cls in reg.items():
            summary = (cls.__doc__ or "").strip().splitlines()[0]
            rows.append((f"{prefix}.name", "str", name, f"{reg.kind} '{name}': {summary}"))
            rows += describe_dataclass(cls.Config, f"{prefix}[{name}]")
    return rows
