"""The ``plrm`` command: a thin layer over plrm.runner, plrm.recipe and plrm.registry.

The library raises exceptions; only this module turns them into messages and exit codes (2: bad input).

Startup cost matters for a command line: importing torch and Lightning takes seconds. Everything that can be
checked without a model -- the arguments, whether a recipe name or file exists, whether ``--run`` is a run
directory -- is checked here first, with light imports only, so that a mistyped command answers at once; the
heavy modules are imported inside the verbs that need them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

EPILOG = """\
examples:
  plrm fit --recipe quickstart                       train and evaluate (built-in recipe by name)
  plrm fit --recipe my.yaml methods.lore.rank=5      a recipe file, with overrides (OmegaConf dotlist)
  plrm fit --recipe quickstart --resume              continue a killed or interrupted run where it stopped
  plrm test --run runs/quickstart                    re-evaluate a finished run from its checkpoints and split
  plrm adapt --run runs/quickstart --k 3             re-fit unseen users from k support pairs
  plrm adapt --run runs/pref_dense --active          interactive sessions: uncertainty vs random questions
  plrm export --run runs/lora --out rm --merge       head + user weights, peft adapter, merged model
  plrm embed --recipe my.yaml                        encode a frozen_encoder recipe's texts into the cache
  plrm bench --recipe bench/quick                    every method x dataset x seed: report.md, results.json, plots
  plrm bench --recipe bench/quick bench.seeds=[0,1,2] method_options.lore.rank=5    benchmark overrides
  plrm bench --recipe bench/lowrank --shard 0/4      one of 4 deterministic slices (e.g. a SLURM array task)
  plrm bench --merge bench/lowrank/shard-*           one report from the shards
  plrm profile --dataset lowrank_world n_users=500    statistics of arXiv 2502.19158 Table 2: report + plots
  plrm list                                          methods, datasets, backbones, plugins (and broken ones)
  plrm recipes list | show NAME | copy NAME DEST [--make-parents] | keys
"""

ACTIVE_BUDGET = 40
RUN_RECIPE_FILE = "recipe.yaml"  # what makes a folder a run directory (plrm.runner.RECIPE_FILE; not imported: heavy)
FIT_OVERRIDES = "methods.lore.rank=5 split.seeds=[0,1,2]"
BENCH_OVERRIDES = "bench.seeds=[0,1,2] method_options.lore.rank=5 cell.trainer.num_threads=2"


def _add_overrides(p: argparse.ArgumentParser, example: str = FIT_OVERRIDES) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"recipe overrides in OmegaConf dotlist syntax (e.g. {example}); ~key deletes a key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plrm", description="Personalized reward modeling on PyTorch Lightning.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("fit", help="train on seen users, adapt unseen users, evaluate (per split seed)",
                       description="Train every method of the recipe on the seen users' train pairs, adapt the "
                       "unseen users from k support pairs, evaluate seen / unseen / overall accuracy, the "
                       "few-shot curve and the oracles; writes the run directory (see plrm.runner).")
    p.add_argument("--recipe", required=True, help="recipe name, built-in or from a plugin (see `plrm recipes "
                                                   "list`), or YAML path")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or interrupted run of the same recipe: finished (seed, method) units are "
                        "kept, the interrupted one resumes from its last checkpoint (seed-<s>/<label>.last.ckpt); "
                        "same as run.resume=true")
    _add_overrides(p)

    p = sub.add_parser("bench", help="run the benchmark matrix (methods x datasets x seeds), resumable and shardable",
                       description="Run every (method, dataset) cell of a benchmark recipe over its split seeds "
                       "(methods/datasets 'all' = every registered one, installed plugins included). A cell whose "
                       "needs are not met (plrm.capabilities) is listed as skipped with the reason; a cell that "
                       "raises is recorded with its error and traceback and the benchmark goes on. Finished "
                       "(cell, seed) results are kept: rerunning the same command runs only what is missing, also "
                       "after Ctrl-C or a killed job. Writes <bench.output_dir>/<bench.name>/: report.md, "
                       "results.json, fewshot.png, worst_users.png, per_user.png, accuracy_vs_time.png, and per "
                       "unit cells/ (records), runs/ (run directories and logs). Exit status: 0 all cells ran or "
                       "were skipped, 1 some cell failed, 2 bad input, 130 interrupted.")
    p.add_argument("--recipe", help="built-in benchmark recipe (bench/quick, bench/lowrank) or YAML path")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="run only the i-th of N deterministic slices of the (cell, seed) units, into "
                        "<name>/shard-i-of-N (a SLURM job array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="build one report from these shard directories (same benchmark recipe) instead of running")
    p.add_argument("--out", default=None, help="benchmark directory (default <bench.output_dir>/<bench.name>; "
                                               "with --merge: the shards' parent directory)")
    p.add_argument("--print-config", action="store_true", help="print the resolved benchmark recipe and the "
                                                               "(cell, seed) units, and exit")
    _add_overrides(p, BENCH_OVERRIDES)

    p = sub.add_parser("profile", help="dataset statistics: users, pairs per user, divergence, MV-ACC, minorities",
                       description="Load a registered dataset (key=value options, as under `data:` in a recipe) and "
                       "report what Dong et al. (arXiv 2502.19158) §4.2, Table 2, measures: samples, users, pairs "
                       "per user (distribution), "
                       "items shared across users, preference divergence rate, highly-controversial rate (>= 30%% of "
                       "an item's users disagree with its majority), majority-vote accuracy per user (MV-ACC) and its "
                       "range, minority users (MV-ACC < 0.5), and the room for personalization (with the personal and "
                       "non-personalized oracles where the data knows them). Statistics that need items shared by two "
                       "or more users are reported as undefined, with the reason, on data without them. Writes "
                       "profile.md, profile.json, mv_acc_per_user.png and pairs_per_user.png.")
    p.add_argument("--dataset", required=True, help="registered dataset name (see `plrm list datasets`)")
    p.add_argument("--out", default=None, help="output directory (default profiles/<dataset>)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dataset options, e.g. n_users=500 path=/data/prism (a data. prefix is accepted too)")

    p = sub.add_parser("tax", help="personalization tax: RewardBench sections, non-personalized vs each user",
                       description="Dong et al. (arXiv 2502.19158) §4.3: score RewardBench (the reward_bench "
                       "dataset) with one trained "
                       "method of a run -- its non-personalized reward (the mean of the seen users' rewards) and "
                       "each seen user's personalized reward -- through the run's text backbone, and report Chat / "
                       "Chat Hard / Safety / Reasoning scores (RewardBench's weighting), the change per section and "
                       "per user, and the users who lose most. Writes tax-<method>-seed<s>.json and .md into the "
                       "run directory (or --out).")
    p.add_argument("--run", required=True, help="run directory printed by `plrm fit` (trained with a text backbone)")
    p.add_argument("--method", default=None, help="method label (default: the run's only method)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the run's first)")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p.add_argument("--worst", type=int, default=5, help="users listed per section, >= 1 (default 5)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="reward_bench options, e.g. path=/data/reward-bench (a local copy) or revision=<commit>")

    p = sub.add_parser("embed", help="precompute a recipe's frozen-encoder features into the cache",
                       description="Load the recipe's dataset and encode every unique (prompt, response) item with "
                       "its frozen_encoder backbone into the on-disk feature cache, so that later runs and every run "
                       "of a sweep encode nothing. Prints how many items were encoded and how many were cached.")
    p.add_argument("--recipe", required=True, help="built-in recipe name or YAML path")
    _add_overrides(p)

    p = sub.add_parser("test", help="re-evaluate a finished run with its stored split and checkpoints",
                       description="Rebuild the data from the run's recipe.yaml, reuse seed-*/split.parquet and "
                       "the checkpoints, evaluate again and write test_results.json.")
    p.add_argument("--run", required=True, help="run directory printed by `plrm fit`")

    p = sub.add_parser("adapt", help="fit new users' state from their pairs with trained checkpoints",
                       description="Without --pairs: load each method's checkpoint, fit the stored split's unseen "
                       "users from their first k support pairs, save seed-*/<label>.adapted-k<k>.ckpt and report "
                       "their test accuracy (adapt_results.json). With --pairs FILE: fit users who are not in the "
                       "run from all their pairs in FILE (canonical schema: user_id, prompt, chosen, rejected; "
                       "features from chosen_emb/rejected_emb or the run's dataset) and save their state to "
                       "seed-*/<label>.users-<file stem>.ckpt. With --active: simulated interactive sessions "
                       "(PReF, Shenfeld et al., arXiv 2503.06358, Algorithm 2): every unseen user is asked "
                       "--budget questions from their support "
                       "pool, chosen by the method's uncertainty score (PReF: ||phi||_{H^-1}) or at random, is "
                       "re-fit after each answer and scored on their test pairs; writes active_results.json, "
                       "active_curve.png and the pairs asked (seed-*/<label>.active-<strategy>.parquet).")
    p.add_argument("--run", required=True, help="run directory printed by `plrm fit`")
    p.add_argument("--k", type=int, default=None, help="support pairs per user, >= 1 (default: the recipe's "
                                                            "split.k)")
    p.add_argument("--pairs", default=None, help="parquet/jsonl/csv of new users' pairs (canonical schema)")
    g = p.add_argument_group("interactive sessions (--active)")
    g.add_argument("--active", action="store_true", help="run simulated interactive sessions")
    g.add_argument("--budget", type=int, default=None,
                   help=f"questions per user, T >= 1 (default {ACTIVE_BUDGET}, PReF Fig. 3C)")
    g.add_argument("--strategy", nargs="+", choices=["uncertainty", "random"], default=None,
                   help="question selection strategies to compare (default: both)")
    g.add_argument("--answers", choices=["labels", "oracle"], default=None,
                   help="labels: the held-out labels of the user's pool; oracle: the synthetic world's personal "
                        "oracle (the user's noise-free preference)")
    g.add_argument("--eval-at", type=int, nargs="+", default=None,
                   help="numbers of answers at which unseen users are scored, each in 1..budget (default: "
                        "every t in 1..budget)")

    p = sub.add_parser("generate", help="decode test prompts under each trained reward model (ARGS, GenARM, P-DPO)",
                       description="Load each method of a finished run, adapt its unseen users on their first split.k "
                       "support pairs, and decode their test prompts with the run's policy: reward-guided decoding "
                       "(ARGS, Khanov et al., arXiv 2402.01694: top-k of the policy, score log pi + lambda r) for "
                       "reward models, GenARM's own decoding with --decoder genarm for token-level ones, P-DPO from "
                       "its personalized policy; and the base policy alone (zero-shot). Settings default to the "
                       "run's policy: section. Writes a table of user, prompt, generation, method, seed and the "
                       "decoder settings (default <run>/generations.parquet).")
    p.add_argument("--run", required=True, help="run directory printed by `plrm fit`")
    p.add_argument("--method", nargs="+", default=None, help="method labels (default: every method of the run)")
    p.add_argument("--seed", type=int, nargs="+", default=None, help="split seeds (default: all of the run's)")
    p.add_argument("--users", nargs="+", default=None, help="user ids (default: the run's unseen users)")
    p.add_argument("--decoder", choices=["args", "genarm"], default=None,
                   help="args (every reward model) or genarm (token-level methods decode GenARM's way)")
    p.add_argument("--k", type=int, default=None, help="ARGS candidates per step (top-k of the policy)")
    p.add_argument("--weight", default=None, help="lambda: a number, or auto (maximize policy accuracy on the seen "
                                                  "users' test pairs)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generated tokens per prompt at most")
    p.add_argument("--prompts-per-user", type=int, default=None, help="test prompts per user")
    p.add_argument("--mode", choices=["greedy", "sample"], default=None, help="greedy or sampled decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--policy", default=None, help="the base policy model (default: the run's policy.model)")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the base policy's own generations")
    p.add_argument("--out", default=None, help="output table: .parquet, .csv or .jsonl")

    p = sub.add_parser("export", help="write a trained method as a save_pretrained-style directory (safetensors)",
                       description="Write one method of a run (one split seed, one checkpoint) to a new directory "
                       "that reloads without the training code (plrm.export.load_exported): plrm_export.json "
                       "(base model, feature options, head ops, user ids, reward mean / std), recipe.yaml, "
                       "head.safetensors (the reward head and per-user weights), tokenizer/, adapter/ (the LoRA "
                       "adapter in peft's format) or model/ (finetune=full), and with --merge merged/ (the base "
                       "model with the adapter merged in). The directory is written under a temporary name and "
                       "renamed at the end; an existing non-empty --out is refused.")
    p.add_argument("--run", required=True, help="run directory printed by `plrm fit`")
    p.add_argument("--out", required=True, help="directory to create (must not exist, or be empty)")
    p.add_argument("--method", default=None, help="method label (default: the run's only method)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the run's first)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file in seed-<s>/ (default <label>.ckpt; <label>.adapted-k<k>.ckpt from "
                        "`plrm adapt` exports the unseen users too)")
    p.add_argument("--merge", action="store_true",
                   help="also write the base model with the LoRA adapter merged in (not for 4/8-bit bases)")

    p = sub.add_parser("list", help="registered methods, datasets, backbones and plugins",
                       description="Every registry entry with the package and version it came from, what it "
                       "needs or provides, and plugins that failed to load with their error.")
    p.add_argument("what", nargs="?", choices=["methods", "datasets", "backbones", "plugins"], default=None,
                   help="only this part (plugins: what installed plugin packages bring, and the broken ones)")

    p = sub.add_parser("recipes", help="list, show (resolved), copy recipes; list every recipe key",
                       description="list: the built-in recipes and those installed plugins ship (entry points "
                       "plrm.recipes), with where each comes from. show NAME [key=value ...]: the resolved recipe. "
                       "copy NAME DEST: a copy to edit. keys: every key with its default and help.")
    rs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    rs.add_parser("list", help="built-in and plugin recipes with their origin and description, and plugin recipes "
                               "left out (name clash, broken entry point)")
    q = rs.add_parser("show", help="print a recipe resolved (extends merged, overrides applied, defaults filled)")
    q.add_argument("name")
    _add_overrides(q, f"{FIT_OVERRIDES}; of a benchmark recipe: {BENCH_OVERRIDES}")
    q = rs.add_parser("copy", help="copy a recipe (with its extends chain merged) to edit")
    q.add_argument("name")
    q.add_argument("dest", help="file to write, or an existing folder (or one ending in /) to write NAME.yaml into")
    q.add_argument("--make-parents", action="store_true",
                   help="create DEST's missing parent folders (without it, a missing folder is an error)")
    q = rs.add_parser("keys", help="every recipe key with its type, default and help")
    q.add_argument("--filter", default="", help="only keys containing this text")
    return parser


def _resolved_with_defaults(recipe) -> dict:
    import dataclasses

    out = {"description": recipe.description}
    for name in ("run", "data", "backbone", "split", "eval", "trainer", "logger"):
        section = getattr(recipe, name)
        if hasattr(section, "config"):
            out[name] = {"name": section.name, **dataclasses.asdict(section.config)}
        else:
            out[name] = dataclasses.asdict(section)
    out["methods"] = {label: {"name": c.name, **dataclasses.asdict(c.config)} for label, c in recipe.methods.items()}
    return out


def checked_recipe(name: str, overrides: list[str]):
    """The recipe ``name`` with ``overrides``, validated against plrm.catalog's description of the registries: the
    same answer (or RecipeError) as the real classes give, without importing torch when the catalog is warm."""
    from plrm import catalog
    from plrm.recipe import load_recipe

    return catalog.checked(lambda regs: load_recipe(name, overrides, registries=regs))


def _number(flag: str, value: str) -> float:
    from plrm.errors import PlrmError

    try:
        number = float(value)
    except ValueError:
        raise PlrmError(f"{flag} {value!r}: give a number >= 0 or auto") from None
    if number < 0:
        raise PlrmError(f"{flag} {value!r}: must be >= 0")
    return number


def cmd_list(what: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from plrm import catalog
    from plrm.recipe import plugin_recipes

    console = Console(width=max(120, shutil.get_terminal_size().columns))
    plugin_rows = 0
    registries = catalog.registries()
    for reg_name, reg in registries.items():
        if what not in (None, reg_name, "plugins"):
            continue
        table = Table(title=reg_name)
        for col in ("name", "from", "needs / provides", "description"):
            table.add_column(col)
        for name, cls in reg.items():
            origin = reg.origin(name)
            plugin_rows += not origin.is_builtin
            if what == "plugins" and origin.is_builtin:
                continue
            caps = getattr(cls, "needs", None)
            caps_text = ("needs " + ", ".join(sorted(caps))) if caps is not None else \
                ("provides " + ", ".join(sorted(getattr(cls, "provides", ()))))
            if reg_name == "methods":
                caps_text += f"; new users: {cls.adapts_new_users}"
            description = (cls.__doc__ or "").strip().splitlines()[0]
            if getattr(cls, "licence", ""):
                description += f" (licence: {cls.licence})"
            table.add_row(name, str(origin), caps_text, description)
        if table.row_count or what != "plugins":
            console.print(table)
    shipped = plugin_recipes()
    if what == "plugins" and shipped.recipes:
        table = Table(title="recipes")
        for col in ("name", "from", "file"):
            table.add_column(col)
        for name, recipe in shipped.recipes.items():
            table.add_row(name, str(recipe.origin), str(recipe.path))
        console.print(table)
    broken = [b for reg in registries.values() for b in reg.broken()] + shipped.broken
    if broken:
        table = Table(title="broken plugins (not loaded)")
        for col in ("group", "name", "from", "error"):
            table.add_column(col)
        for b in broken:
            table.add_row(b.group, b.name, str(b.origin), b.error)
        console.print(table)
    if what == "plugins" and not (plugin_rows or shipped.recipes or broken):
        print(no_plugins_message())


def no_plugins_message() -> str:
    """What ``plrm list plugins`` says when no plugin is in use: why (none installed, autoload off, PLRM_PLUGINS
    leaves them out) and what to do."""
    from plrm import registry

    installed = sorted({ep.name for group in registry.PLUGIN_GROUPS for ep in registry.entry_points(group)})
    if not installed:
        return ("no plugins installed: no installed package declares plrm entry points ("
                + ", ".join(registry.PLUGIN_GROUPS) + "). A plugin is a pip package: install one with pip (from a "
                "plrm checkout: pip install ./plugins/plrm-shrinkage, the example), and see CONTRIBUTING.md, "
                "\"Add a plugin package\", to write your own.")
    if registry.autoload_disabled():
        return (f"no plugins loaded: PLRM_DISABLE_PLUGIN_AUTOLOAD is set, so the installed ones "
                f"({', '.join(installed)}) are left out; unset it to load them")
    return (f"no plugins loaded: PLRM_PLUGINS={os.environ.get('PLRM_PLUGINS', '')} names none of the installed "
            f"ones ({', '.join(installed)})")


def cmd_embed(args) -> None:
    checked_recipe(args.recipe, args.overrides)  # a bad recipe fails before torch is imported
    from plrm import registry
    from plrm.data.datamodule import PreparedData
    from plrm.recipe import RecipeError, load_recipe, load_source

    recipe = load_recipe(args.recipe, args.overrides)
    cls = registry.backbones.get(recipe.backbone.name)
    if not getattr(cls, "caches_features", False):
        raise RecipeError(f"backbone '{recipe.backbone.name}' has no feature cache to fill "
                          "(backbone frozen_encoder has one)")
    data = load_source(registry.datasets.get(recipe.data.name)(recipe.data.config), recipe.data.name)
    stats = PreparedData(data, cls(recipe.backbone.config)).backbone.stats()
    rate = f", {stats['texts_per_second']} texts/s" if stats["texts_per_second"] else ""
    print(f"encoded {stats['encoded']} of {stats['items']} unique items ({stats['from_cache']} from the cache"
          f"{rate}) -> {stats['cache']}")


def cmd_bench(args) -> int:
    from plrm.bench.spec import parse_shard  # light: no torch; the checks below need no model
    from plrm.recipe import RecipeError, find_recipe

    if args.merge:
        if args.recipe or args.shard or args.overrides:
            raise RecipeError("--merge builds a report from finished shard directories; it takes no --recipe, "
                              "--shard or overrides (the shards' bench.yaml says what was run)")
        from plrm.bench.report import merge

        payload = merge(args.merge, args.out)
        return 1 if any(c.get("errors") for c in payload["cells"]) else 0
    if not args.recipe:
        raise RecipeError("plrm bench needs --recipe NAME (see `plrm recipes list`, bench/*) or --merge DIRS")
    shard = parse_shard(args.shard)
    find_recipe(args.recipe)  # an unknown name fails here, before the methods are imported
    from plrm.bench.spec import load_bench, shard_units

    spec = load_bench(args.recipe, args.overrides)
    if args.print_config:
        print(spec.to_yaml(), end="")
        units = shard_units(spec.units(), shard)
        print(f"# {len(units)} (dataset, method, seed) units" + (f" in shard {args.shard}" if args.shard else ""))
        for unit in units:
            print(f"#   {unit.key}" + (f"  (skipped: {spec.not_configured[unit.dataset]})"
                                       if unit.dataset in spec.not_configured else ""))
        return 0
    from plrm.bench.run import run_bench

    try:
        outcome = run_bench(spec, shard, args.out)
    except KeyboardInterrupt:
        return 130
    return 1 if outcome.failed else 0


def cmd_recipes(args) -> None:
    import yaml

    from plrm.recipe import all_recipes, plugin_recipes, read_recipe, schema_rows

    if args.action == "list":
        recipes = all_recipes()
        origins = {name: "built-in" if r.origin.is_builtin else str(r.origin) for name, r in recipes.items()}
        width, from_width = max(map(len, recipes)) + 2, max(map(len, origins.values())) + 2
        print(f"{'name':{width}s}{'from':{from_width}s}description")
        for name, recipe in recipes.items():
            desc = (yaml.safe_load(recipe.path.read_text()) or {}).get("description", "")
            print(f"{name:{width}s}{origins[name]:{from_width}s}{desc}")
        for b in plugin_recipes().broken:  # what `plrm list` shows under broken plugins
            print(f"left out: {b.group} entry point '{b.name}' of {b.origin}: {b.error}")
    elif args.action == "show":
        if "bench" in read_recipe(args.name):  # a benchmark recipe: resolved by its own schema
            from plrm.bench.spec import load_bench

            print(load_bench(args.name, args.overrides).to_yaml(), end="")
            return
        recipe = checked_recipe(args.name, args.overrides)
        print(yaml.safe_dump(_resolved_with_defaults(recipe), sort_keys=False), end="")
    elif args.action == "copy":
        raw = read_recipe(args.name)  # an unknown recipe fails before anything is written
        dest = copy_destination(args.name, args.dest, args.make_parents)
        verb = "bench" if "bench" in raw else "fit"
        if verb == "fit":  # relative input paths were relative to the source's folder: the copy holds them absolute
            from plrm import catalog
            from plrm.recipe import read_recipe_with_origins, resolve_paths

            raw, origins = read_recipe_with_origins(args.name)
            resolve_paths(raw, origins, catalog.registries())
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(f"# copied from plrm recipe '{args.name}' (extends merged); run with:\n"
                       f"#   plrm {verb} --recipe {dest}\n" + yaml.safe_dump(raw, sort_keys=False))
        tmp.replace(dest)
        print(f"wrote {dest}")
    elif args.action == "keys":
        from plrm import catalog

        for key, tp, default, help_text in schema_rows(catalog.registries()):
            line = f"{key}  ({tp}, default {default!r})\n    {help_text}"
            if args.filter in line:
                print(line)


def copy_destination(name: str, dest_arg: str, make_parents: bool) -> Path:
    """The file ``plrm recipes copy NAME DEST`` writes: DEST, or DEST/<NAME>.yaml when DEST is a folder (one that
    exists, or any path ending in a slash). Its folder must exist unless ``make_parents``, which creates it; an
    existing file is never overwritten."""
    dest = Path(dest_arg).expanduser()
    if dest.is_dir() or dest_arg.endswith(("/", os.sep)):
        base = Path(name).name
        folder, dest = dest, dest / (base if base.endswith((".yaml", ".yml")) else f"{base}.yaml")
    else:
        folder = dest.parent
    if dest.exists():
        raise FileExistsError(f"{dest} exists; not overwriting it")
    if not folder.is_dir():
        blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise FileExistsError(f"cannot write into folder {folder}: {blocking} is a file")
        if not make_parents:
            raise FileNotFoundError(f"folder {folder} does not exist; create it first, or pass --make-parents to "
                                    "create it")
        folder.mkdir(parents=True)
    return dest


def check_arguments(args) -> None:
    """Argument values argparse's types cannot check, said the way a user typed them (exit 2, nothing read yet)."""
    from plrm.errors import PlrmError

    def at_least_one(flag: str, value: int | None) -> None:
        if value is not None and value < 1:
            raise PlrmError(f"{flag} must be >= 1, got {value}")

    if args.verb == "adapt":
        if args.pairs and args.k is not None:
            raise PlrmError("--k selects support pairs of the run's unseen users; with --pairs every pair in the "
                            "file is used")
        if args.active and (args.pairs or args.k is not None):
            raise PlrmError("--active asks the run's unseen users up to --budget questions; it does not combine "
                            "with --k or --pairs")
        at_least_one("--k", args.k)
        at_least_one("--budget", args.budget)
        if not args.active:
            given = [flag for flag, value in (("--budget", args.budget), ("--strategy", args.strategy),
                                              ("--answers", args.answers), ("--eval-at", args.eval_at))
                     if value is not None]
            if given:
                one = len(given) == 1
                raise PlrmError(f"{' and '.join(given)} only appl{'ies' if one else 'y'} to interactive sessions: "
                                f"add --active, or leave {'it' if one else 'them'} out")
        budget = ACTIVE_BUDGET if args.budget is None else args.budget
        bad = [t for t in args.eval_at or () if not 1 <= t <= budget]
        if bad:
            raise PlrmError(f"--eval-at values must be in 1..budget (1..{budget}), got {', '.join(map(str, bad))}")
    elif args.verb == "tax":
        at_least_one("--worst", args.worst)


def check_run_dir(run: str) -> None:
    """A ``--run`` folder must hold the recipe.yaml ``plrm fit`` wrote (checked before torch is imported; the
    runner checks the same when it opens the run)."""
    path = Path(run).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist; pass the directory that `plrm fit` printed")
    if not (path / RUN_RECIPE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a plrm run directory (no {RUN_RECIPE_FILE}); pass the directory "
                                "that `plrm fit` printed")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from plrm import __version__

        print(f"plrm {__version__}")
        return 0
    if args.verb is None:
        parser.print_help()
        return 2
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data only: no telemetry request
    # torch 2.13 deprecates an API that lightning 2.6 still calls on every batch; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    from plrm.errors import PlrmError

    try:
        check_arguments(args)
        if getattr(args, "run", None) is not None:  # test, adapt, tax, export
            check_run_dir(args.run)
        if args.verb in ("fit", "embed"):
            from plrm.recipe import find_recipe

            find_recipe(args.recipe)  # an unknown name or a missing file fails before the methods are imported
        if args.verb == "fit":
            recipe = checked_recipe(args.recipe, args.overrides)  # a bad recipe fails before torch is imported
            if args.print_config:
                import yaml

                print(yaml.safe_dump(_resolved_with_defaults(recipe), sort_keys=False), end="")
                return 0
            from plrm import runner
            from plrm.recipe import load_recipe

            try:
                runner.fit(load_recipe(args.recipe, args.overrides), resume=args.resume)
            except KeyboardInterrupt:  # the runner has said what was saved and how to resume
                return 130
        elif args.verb == "bench":
            return cmd_bench(args)
        elif args.verb == "profile":
            from plrm import catalog
            from plrm.recipe import dataset_options

            catalog.checked(lambda regs: dataset_options(args.dataset, args.overrides, regs))  # before torch
            from plrm.eval.profile import run_profile

            stats = run_profile(args.dataset, args.overrides, args.out)
            print(f"{stats['n_samples']:,} pairs, {stats['n_users']:,} users -> "
                  f"{args.out or 'profiles/' + args.dataset}/profile.md")
        elif args.verb == "tax":
            from plrm.tax import personalization_tax

            personalization_tax(args.run, args.method, args.seed, args.overrides, args.out, args.worst)
        elif args.verb == "embed":
            cmd_embed(args)
        elif args.verb == "test":
            from plrm import runner

            runner.test(args.run)
        elif args.verb == "adapt":
            from plrm import runner

            if args.active:
                runner.active(args.run, ACTIVE_BUDGET if args.budget is None else args.budget,
                              tuple(args.strategy or ("uncertainty", "random")), args.answers or "labels",
                              args.eval_at)
            elif args.pairs:
                runner.adapt_new_users(args.run, args.pairs)
            else:
                runner.adapt(args.run, args.k)
        elif args.verb == "generate":
            from plrm import runner

            weight = args.weight if args.weight in (None, "auto") else _number("--weight", args.weight)
            runner.generate(args.run, args.method, args.seed, args.users, not args.no_zero_shot, args.out,
                            decoder=args.decoder, k=args.k, weight=weight, max_new_tokens=args.max_new_tokens,
                            prompts_per_user=args.prompts_per_user, mode=args.mode, temperature=args.temperature,
                            model=args.policy)
        elif args.verb == "export":
            from plrm.export import export

            export(args.run, args.out, args.method, args.seed, args.checkpoint, args.merge)
        elif args.verb == "list":
            cmd_list(args.what)
        elif args.verb == "recipes":
            cmd_recipes(args)
    except (PlrmError, FileNotFoundError, FileExistsError) as exc:
        print(f"plrm {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
