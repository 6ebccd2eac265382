"""The Python API behind the CLI: ``fit``, ``test`` and ``adapt`` take the same recipes (or a run directory).

Run directory (``<run.output_dir>/<run.name>``)::

    recipe.yaml            the resolved recipe (test/adapt rebuild everything from it)
    results.json           per-seed and aggregated metrics, package versions, plugins used
    per_user.parquet       per-user accuracies of every method and oracle, every seed
    seed-<s>/split.parquet the split of seed s (reused by test and adapt)
    seed-<s>/<label>.ckpt  each method's trained state (weights-only checkpoint)
    wandb/ csv/ tensorboard/  the tracker's files

Distributed (``trainer.strategy=ddp`` with ``trainer.devices`` > 1 or ``trainer.num_nodes`` > 1): Lightning
starts the other ranks at the first ``trainer.fit`` by running the same command again (or torchrun / SLURM
start them all), so every rank executes :func:`fit` from the top. All ranks load the data, make the same
splits, train together (plrm.data.datamodule: each rank takes its part of every global batch) and run the
evaluation protocol together (plrm.eval.protocol: scoring sharded, logits gathered before per-user metrics);
only global rank 0 touches the run directory (checks, checkpoints, results, tracker). Later ``trainer.fit``
calls of the same process (more methods, more split seeds) reuse the processes and the process group.

Notebook use::

    import plrm.runner as run
    result = run.fit("quickstart", ["run.name=demo"])
    result.summary["lore"]["unseen"]["accuracy"]
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from plrm import __version__, registry
from plrm import capabilities as cap
from plrm.checkpoint import load_checkpoint, save_model, save_state
from plrm.data.datamodule import PreferenceDataModule, PreparedData
from plrm.data.hooks import MethodHooks
from plrm.data.splits import VAL, Split, load_split, make_split
from plrm.eval import report
from plrm.eval.metrics import per_user_accuracy, summarize
from plrm.eval.protocol import adapt_unseen, evaluate, evaluate_oracle, per_user_frame, score_rows, sync_user_state
from plrm.recipe import Recipe, RecipeError, load_recipe
from plrm.tracking import PlainProgress, finish, log_results, make_logger

RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"


@dataclass
class RunResult:
    run_dir: Path
    per_seed: dict[int, dict[str, dict]]   # seed -> entry (method label or oracle) -> metrics
    summary: dict[str, dict]               # entry -> group -> metric -> {mean, std, n}
    per_user: pd.DataFrame


# ---- building blocks ----------------------------------------------------------------------------------------
def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_data(recipe: Recipe) -> PreparedData:
    """Load and validate the dataset and build the backbone (not yet prepared: ``PreparedData`` does that)."""
    if recipe.trainer.num_threads:
        torch.set_num_threads(recipe.trainer.num_threads)
        # Lightning's process launcher sets torch's threads to cores / processes unless OMP_NUM_THREADS is set
        os.environ.setdefault("OMP_NUM_THREADS", str(recipe.trainer.num_threads))
    data = registry.datasets.get(recipe.data.name)(recipe.data.config).load()
    if data.load_report is not None:  # a published source: what it read, kept and dropped, by rule
        print(data.load_report.render(), file=sys.stderr)
    backbone = registry.backbones.get(recipe.backbone.name)(recipe.backbone.config)
    return data, backbone


def method_problems(recipe: Recipe, data, backbone) -> list[str]:
    """Why each of the recipe's methods cannot run on its dataset and backbone (plrm.capabilities)."""
    problems = []
    for label, comp in recipe.methods.items():
        for reason in cap.cell_problems(comp.name, registry.methods.get(comp.name).needs, recipe.data.name,
                                        data.provides, recipe.backbone.name, backbone.needs, backbone.provides):
            problems.append(f"methods.{label}: {reason}")
    return problems


def prepare(recipe: Recipe) -> PreparedData:
    """Load and validate the dataset, check every method's needs, prepare the backbone."""
    data, backbone = load_data(recipe)
    problems = method_problems(recipe, data, backbone)
    if problems:
        raise RecipeError("cannot run:\n  " + "\n  ".join(problems))
    return PreparedData(data, backbone)


def _split_for_seed(recipe: Recipe, prepared: PreparedData, seed: int, stored: Path | None) -> Split:
    s = recipe.split
    need = max([s.k, *recipe.eval.k_list])
    args = dict(unseen_fraction=s.unseen_fraction, test_fraction=s.test_fraction, val_fraction=s.val_fraction)
    table = prepared.data.pairs.data.table
    source = stored or (Path(s.from_file) if s.from_file else None)
    if source is not None:
        return load_split(source, table, seed, args, need, prepared.data.name)
    return make_split(table, seed, need_support=need, source=prepared.data.name, **args)


def build_model(recipe: Recipe, label: str, prepared: PreparedData, n_users: int):
    comp = recipe.methods[label]
    cls = registry.methods.get(comp.name)
    return cls(comp.config, n_users=n_users, feature_dim=prepared.backbone.feature_dim,
               encoder=prepared.backbone.encoder())


def _strategy(recipe: Recipe, model=None, world: int = 1):
    """The recipe's strategy; 'ddp' (or 'auto' over several processes, which Lightning makes ddp) for a method
    whose steps leave parameters without gradients becomes DDP that looks for them
    (``PersonalizedRewardModel.ddp_find_unused_parameters``)."""
    strategy = recipe.trainer.strategy
    if model is None:
        return strategy
    if "fsdp" in str(strategy).lower() and not model.automatic_optimization:
        raise RecipeError(f"{type(model).__name__} optimizes manually (backward passes inside its training step), "
                          f"which FSDP does not support; train it with trainer.strategy=ddp")
    if strategy in ("ddp", "auto") and world > 1 and model.ddp_find_unused_parameters:
        return DDPStrategy(find_unused_parameters=True)
    return strategy


def distribution(recipe: Recipe) -> tuple[int, int]:
    """(global rank, world size) this process will have in the recipe's Trainers, known before the first fit
    (Lightning's own cluster detection: its launcher's LOCAL_RANK / NODE_RANK, torchrun, SLURM). Trainer
    settings Lightning rejects fail here, as a RecipeError, before any data is loaded or file written."""
    t = recipe.trainer
    if "fsdp" in str(t.strategy).lower() and (t.accelerator == "cpu" or not torch.cuda.is_available()):
        raise RecipeError(f"trainer.strategy={t.strategy} shards a large backbone over GPUs and needs "
                          "trainer.accelerator=gpu on a machine with CUDA GPUs; on CPU use trainer.strategy=ddp")
    try:
        probe = L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                          strategy=_strategy(recipe), precision=t.precision, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except (ValueError, TypeError, MisconfigurationException) as exc:
        raise RecipeError(f"trainer (accelerator={t.accelerator}, devices={t.devices}, num_nodes={t.num_nodes}, "
                          f"strategy={t.strategy}, precision={t.precision}): {exc}") from exc
    return probe.global_rank, probe.world_size


def _full_parameters(trainer: L.Trainer):
    """After an FSDP fit each rank holds shards of the parameters: gather them for checkpointing and evaluation
    (writeback: what adapt() writes stays). Any other strategy leaves whole parameters: nothing to do."""
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=True)
    return contextlib.nullcontext()


def _trainer(recipe: Recipe, model, logger, label: str, validate: bool, world: int = 1, dm=None) -> L.Trainer:
    t = recipe.trainer
    cfg = model.config
    show_bars = sys.stderr.isatty() if t.progress_bar == "auto" else t.progress_bar
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(recipe, model, world),
        precision=t.precision, max_epochs=cfg.max_epochs, max_steps=cfg.max_steps,
        logger=logger if logger is not None else False,
        callbacks=([MethodHooks(dm)] if dm is not None else []) + ([] if show_bars else [PlainProgress(label)]),
        enable_progress_bar=show_bars,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
        gradient_clip_val=t.gradient_clip_val if model.automatic_optimization else None,
        # the datamodule shards every global batch itself (same batches as one process, split protocol kept)
        use_distributed_sampler=False,
    )


def _flat(label: str, metrics: dict) -> dict[str, float]:
    out = {}
    for group in report.GROUPS:
        for key, value in (metrics.get(group) or {}).items():
            out[f"eval/{label}/{group}/{key}"] = value
    for row in metrics.get("fewshot", []):
        out[f"eval/{label}/fewshot/k={row['k']}/accuracy"] = row["accuracy"]
    return out


def _data_metrics(prepared: PreparedData) -> dict[str, float]:
    """A published source's load report as tracker scalars: pairs kept, units read, drops per rule."""
    rep = prepared.data.load_report
    if rep is None:
        return {}
    out = {"data/read": float(rep.read), "data/kept": float(rep.kept)}
    out.update({f"data/dropped/{reason}": float(n) for reason, n in rep.drops.items()})
    return out


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    return {"plrm": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}


def _provenance(recipe: Recipe) -> list[dict]:
    return registry.plugin_provenance({"methods": sorted({c.name for c in recipe.methods.values()}),
                                       "datasets": [recipe.data.name], "backbones": [recipe.backbone.name]})


def _finish_run(recipe: Recipe, run_dir: Path, per_seed: dict, frames: list[pd.DataFrame], file: str,
                show: bool, backbone_stats: dict | None = None, write: bool = True,
                data_report: dict | None = None) -> RunResult:
    summary = report.aggregate(per_seed)
    per_user = pd.concat(frames, ignore_index=True)
    if not write:  # a distributed rank other than 0: it computed the same numbers, rank 0 writes them
        return RunResult(run_dir, per_seed, summary, per_user)
    report.write_json(run_dir / file, {
        "recipe": recipe.raw, "versions": _versions(), "plugins": _provenance(recipe),
        "backbone": backbone_stats or {}, "data": data_report or {},
        "per_seed": {str(s): r for s, r in per_seed.items()}, "summary": summary})
    if file == RESULTS_FILE:
        tmp = run_dir / "per_user.parquet.tmp"
        per_user.to_parquet(tmp, index=False)
        tmp.replace(run_dir / "per_user.parquet")
    if show:
        report.render(summary, recipe.split.k)
        print(f"run directory: {run_dir}")
    return RunResult(run_dir, per_seed, summary, per_user)


def _oracles(prepared: PreparedData, dm: PreferenceDataModule, recipe: Recipe, seed: int,
             results: dict, frames: list) -> None:
    for name, logits in prepared.data.oracle_logits.items():
        ev = evaluate_oracle(logits, dm, recipe.eval.worst_fractions)
        results[name] = ev.metrics
        frames.append(ev.per_user.assign(method=name, seed=seed))


# ---- verbs ------------------------------------------------------------------------------------------------------
def fit(recipe: str | dict | Recipe, overrides: list[str] | None = None, show: bool = True,
        prepared: PreparedData | None = None) -> RunResult:
    """Train every method of the recipe on seen users, adapt unseen users, evaluate; per split seed.

    ``prepared``: the recipe's dataset and backbone already prepared (the benchmark runner reuses one across the
    cells of a dataset); its needs must already have been checked (:func:`method_problems`)."""
    _quiet_lightning()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    run_dir = Path(recipe.run.output_dir).expanduser() / recipe.run.name
    rank, world = distribution(recipe)
    main = rank == 0  # only global rank 0 writes; the others (started after it made run_dir) compute alongside
    exists = main and run_dir.exists() and any(run_dir.iterdir())
    if exists and not recipe.run.overwrite:
        raise RecipeError(f"run directory {run_dir} already exists; choose another run.name=... "
                          "or set run.overwrite=true")
    prepared = prepared or prepare(recipe)  # bad data fails here, before an old run is replaced or a new one starts
    if exists:
        shutil.rmtree(run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECIPE_FILE).write_text(recipe.to_yaml())
    per_seed: dict[int, dict] = {}
    frames: list[pd.DataFrame] = []
    for seed in recipe.split.seeds:
        seed_dir = run_dir / f"seed-{seed}"
        split = _split_for_seed(recipe, prepared, seed, stored=None)
        if main:
            seed_dir.mkdir(exist_ok=True)
            split.save(seed_dir / "split.parquet")
        results: dict[str, dict] = {}
        train_seed = recipe.run.seed + (seed if recipe.run.seed_per_split else 0)
        for label, comp in recipe.methods.items():
            L.seed_everything(train_seed, verbose=False)
            model = build_model(recipe, label, prepared, len(split.user_ids))
            dm = PreferenceDataModule(prepared, split, batch_size=comp.config.batch_size, seed=train_seed,
                                      users_per_batch=model.users_per_batch)
            logger = make_logger(recipe.logger, run_dir, name=f"seed-{seed}/{label}",
                                 group=recipe.logger.group or recipe.run.name, run_name=recipe.run.name,
                                 config={**recipe.raw, "label": label, "split_seed": seed}) if main else None
            trainer = _trainer(recipe, model, logger, f"seed {seed} {label}", validate=bool((split.role == VAL).any()),
                               world=world, dm=dm)
            start = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            train_seconds = time.perf_counter() - start
            with _full_parameters(trainer):
                sync_user_state(model)  # per-user state written outside autograd (e.g. MRM's seen users): rank 0's
                if main:
                    save_model(model, seed_dir / f"{label}.ckpt", {"method": comp.name, "label": label})
                start = time.perf_counter()
                ev = evaluate(model, dm, recipe.split.k, recipe.eval.k_list, recipe.eval.worst_fractions,
                              recipe.eval.batch_size)
            results[label] = {**ev.metrics, "adapts_new_users": model.adapts_new_users,
                              "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start}
            diagnostics = model.diagnostics()
            if diagnostics:
                results[label]["diagnostics"] = diagnostics
            per_user = ev.per_user.assign(method=label, seed=seed)
            frames.append(per_user)
            log_results(logger, {**_flat(label, ev.metrics), **_data_metrics(prepared)}, {"eval/per_user": per_user})
            finish(logger)
        _oracles(prepared, dm, recipe, seed, results, frames)
        per_seed[seed] = results
    report_dict = prepared.data.load_report.to_dict() if prepared.data.load_report is not None else None
    return _finish_run(recipe, run_dir, per_seed, frames, RESULTS_FILE, show and main, prepared.backbone.stats(),
                       write=main, data_report=report_dict)


def _read_run(run_dir: str | Path) -> tuple[Path, Recipe]:
    _quiet_lightning()
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / RECIPE_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a plrm run directory (no {RECIPE_FILE}); "
                                "pass the directory that `plrm fit` printed")
    return run_dir, load_recipe(yaml.safe_load((run_dir / RECIPE_FILE).read_text()))


def _load_run(run_dir: str | Path) -> tuple[Path, Recipe, PreparedData]:
    run_dir, recipe = _read_run(run_dir)
    return run_dir, recipe, prepare(recipe)


def _load_model(recipe: Recipe, label: str, prepared: PreparedData, split: Split, seed_dir: Path):
    model = build_model(recipe, label, prepared, len(split.user_ids))
    model.load_checkpoint_state(load_checkpoint(seed_dir / f"{label}.ckpt")["state_dict"])
    return model


def test(run_dir: str | Path, show: bool = True) -> RunResult:
    """Re-evaluate a finished run from its checkpoints and stored splits (writes test_results.json)."""
    run_dir, recipe, prepared = _load_run(run_dir)
    per_seed, frames = {}, []
    for seed in recipe.split.seeds:
        seed_dir = run_dir / f"seed-{seed}"
        split = _split_for_seed(recipe, prepared, seed, stored=seed_dir / "split.parquet")
        results = {}
        for label in recipe.methods:
            model = _load_model(recipe, label, prepared, split, seed_dir)
            dm = PreferenceDataModule(prepared, split, seed=recipe.run.seed)
            ev = evaluate(model, dm, recipe.split.k, recipe.eval.k_list, recipe.eval.worst_fractions,
                          recipe.eval.batch_size)
            results[label] = {**ev.metrics, "adapts_new_users": model.adapts_new_users}
            frames.append(ev.per_user.assign(method=label, seed=seed))
        _oracles(prepared, dm, recipe, seed, results, frames)
        per_seed[seed] = results
    return _finish_run(recipe, run_dir, per_seed, frames, "test_results.json", show)


def adapt(run_dir: str | Path, k: int | None = None, show: bool = True) -> RunResult:
    """Fit the unseen users of a finished run from their first k support pairs with the trained checkpoints;
    saves ``seed-<s>/<label>.adapted-k<k>.ckpt`` and reports unseen accuracy (adapt_results.json)."""
    run_dir, recipe, prepared = _load_run(run_dir)
    k = k or recipe.split.k
    per_seed, frames = {}, []
    for seed in recipe.split.seeds:
        seed_dir = run_dir / f"seed-{seed}"
        split = _split_for_seed(recipe, prepared, seed, stored=seed_dir / "split.parquet")
        if (split.support_rank >= 0).sum() and k > int(split.support_rank.max()) + 1:
            raise RecipeError(f"k={k}: the unseen users of {seed_dir} have at most "
                              f"{int(split.support_rank.max()) + 1} support pairs")
        results = {}
        for label in recipe.methods:
            model = _load_model(recipe, label, prepared, split, seed_dir)
            if model.adapts_new_users == "no":
                results[label] = {"seen": None, "unseen": None, "overall": None, "fewshot": []}
                continue
            dm = PreferenceDataModule(prepared, split, seed=recipe.run.seed)
            model.eval()
            start = time.perf_counter()
            adapt_unseen(model, dm, k)
            seconds = time.perf_counter() - start
            save_model(model, seed_dir / f"{label}.adapted-k{k}.ckpt", {"method": recipe.methods[label].name,
                                                                         "label": label, "k": k})
            rows = dm.test_rows(unseen=True)
            logits = score_rows(model, dm, rows, recipe.eval.batch_size)
            unseen, acc, cnt = summarize(logits, dm.row_user[torch.from_numpy(rows)], split.unseen_users,
                                         dm.n_users, recipe.eval.worst_fractions)
            results[label] = {"seen": None, "unseen": unseen, "overall": None, "fewshot": [{"k": k, **unseen}],
                              "adapt_seconds": seconds}
            frames.append(per_user_frame(dm, split.unseen_users, acc, cnt, "unseen", k).assign(method=label, seed=seed))
        per_seed[seed] = results
    return _finish_run(recipe, run_dir, per_seed, frames, "adapt_results.json", show)


def adapt_new_users(run_dir: str | Path, pairs: str | Path, show: bool = True) -> dict:
    """Fit the state of users who are not in the run from their own pairs (a canonical-schema file), with each
    method's trained shared parameters. Writes ``seed-<s>/<label>.users-<file stem>.ckpt`` (the new users'
    per-user tensors plus their ids) and ``adapt_<file stem>.json`` with how well each user's state orders
    their own pairs (a fit, not a test accuracy: there are no held-out pairs)."""
    from plrm.data.files import PreferenceFiles
    from plrm.data.splits import support_only_split

    run_dir, recipe = _read_run(run_dir)
    new = PreferenceFiles(PreferenceFiles.Config(path=str(pairs))).load()
    backbone = registry.backbones.get(recipe.backbone.name)(recipe.backbone.config)
    if new.features is None and cap.FEATURES in backbone.provides:
        new.features = prepare(recipe).data.features  # the run's own items (e.g. a synthetic world's)
    prepared = PreparedData(new, backbone)
    split = support_only_split(new.pairs.data.table)
    user_ids = split.user_ids
    support = PreferenceDataModule(prepared, split).batch(torch.arange(len(split.row_user)))  # gathered once
    users = torch.arange(len(user_ids))
    stem = Path(pairs).stem
    out: dict = {"pairs": str(pairs), "n_users": len(user_ids), "n_pairs": len(split.row_user), "per_seed": {}}
    for seed in recipe.split.seeds:
        seed_dir = run_dir / f"seed-{seed}"
        results = {}
        for label, comp in recipe.methods.items():
            model = build_model(recipe, label, prepared, len(user_ids))
            if model.adapts_new_users == "no":
                results[label] = None
                continue
            model.load_shared_state(load_checkpoint(seed_dir / f"{label}.ckpt")["state_dict"])
            model.eval()
            model.adapt(support, users)
            with torch.no_grad():
                fit, _ = per_user_accuracy(model.preference_logit(support), support["user_idx"], len(user_ids))
            path = None
            if model.user_state:  # a generic method (bt) has no per-user state to save
                path = seed_dir / f"{label}.users-{stem}.ckpt"
                save_state({k: v for k, v in model.state_dict().items() if k in model.user_state}, path,
                           {"user_ids": [str(u) for u in user_ids], "method": comp.name})
            results[label] = {"support_accuracy": float(fit.mean()), "checkpoint": str(path) if path else None}
        out["per_seed"][str(seed)] = results
    report.write_json(run_dir / f"adapt_{stem}.json", out)
    if show:
        for seed, results in out["per_seed"].items():
            for label, r in results.items():
                text = "n/a (method cannot adapt new users)" if r is None else \
                    f"{r['support_accuracy']:.3f} of their own pairs ordered correctly" + \
                    (f" -> {r['checkpoint']}" if r["checkpoint"] else " (one model for all users: nothing to save)")
                print(f"seed {seed} {label}: {len(user_ids)} new users, {text}")
    return out


def active(run_dir: str | Path, budget: int = 40, strategies: tuple[str, ...] = ("uncertainty", "random"),
           answers: str = "labels", eval_at: list[int] | None = None, show: bool = True) -> dict:
    """Simulated interactive sessions (papers/002 Algorithm 2) with the unseen users of a finished run: each
    method with each strategy asks every unseen user ``budget`` questions from their support pool, re-fits
    them after every answer and scores their test pairs. Writes ``active_results.json`` (curves per seed,
    mean +- std, the answers uncertainty needs to match random at ``budget``), ``active_curve.png`` and
    ``seed-<s>/<label>.active-<strategy>.parquet`` (which pair each user was asked at each t)."""
    from plrm.eval.active import SessionError, answers_to_match, run_session
    from plrm.eval.plots import active_curves

    run_dir, recipe, prepared = _load_run(run_dir)
    eval_at = sorted(set(eval_at)) if eval_at else list(range(1, budget + 1))
    per_seed: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for seed in recipe.split.seeds:
        seed_dir = run_dir / f"seed-{seed}"
        split = _split_for_seed(recipe, prepared, seed, stored=seed_dir / "split.parquet")
        dm = PreferenceDataModule(prepared, split, seed=recipe.run.seed)
        results: dict[str, dict] = {}
        for label in recipe.methods:
            model = _load_model(recipe, label, prepared, split, seed_dir)
            if model.adapts_new_users == "no":
                skipped[label] = "the method cannot adapt new users"
                continue
            results[label] = {}
            for strategy in strategies:
                if strategy == "uncertainty" and not model.has_uncertainty:
                    skipped[f"{label} ({strategy})"] = f"{type(model).__name__} has no uncertainty score"
                    continue
                start = time.perf_counter()
                session = run_session(model, dm, budget, strategy, eval_at, recipe.eval.worst_fractions, answers,
                                      recipe.eval.batch_size)
                results[label][strategy] = {"curve": session.curve, "seconds": time.perf_counter() - start}
                asked = pd.DataFrame({"user_id": np.repeat(session.user_ids.astype(str), budget),
                                      "t": np.tile(np.arange(1, budget + 1), len(session.user_ids)),
                                      "row": session.asked.ravel()})
                tmp = seed_dir / f"{label}.active-{strategy}.parquet.tmp"
                asked.to_parquet(tmp, index=False)
                tmp.replace(seed_dir / f"{label}.active-{strategy}.parquet")
        per_seed[str(seed)] = results
    summary, matches = {}, {}
    for label in recipe.methods:
        runs = [r[label] for r in per_seed.values() if label in r]
        if not runs:
            continue
        summary[label] = {}
        for strategy in runs[0]:
            curves = [r[strategy]["curve"] for r in runs]
            summary[label][strategy] = [
                {"t": rows[0]["t"], **{m: report._mean_std([row[m] for row in rows]) for m in ("accuracy", "auroc")}}
                for rows in zip(*curves)]
        means = {s: [{"t": r["t"], "accuracy": r["accuracy"]["mean"]} for r in rows]
                 for s, rows in summary[label].items()}
        matches[label] = answers_to_match(means)
    if not summary:
        raise SessionError("no method of the run can adapt new users: nothing to run a session with")
    out = {"budget": budget, "answers": answers, "strategies": list(strategies), "eval_at": eval_at,
           "per_seed": per_seed, "summary": summary, "answers_to_match": matches, "skipped": skipped,
           "versions": _versions()}
    report.write_json(run_dir / "active_results.json", out)
    active_curves(summary, run_dir / "active_curve.png",
                  f"{recipe.run.name}: interactive sessions, answers from {answers}, "
                  f"{len(recipe.split.seeds)} seed(s)")
    if show:
        report.render_active(summary, matches, skipped)
        print(f"wrote {run_dir / 'active_results.json'} and {run_dir / 'active_curve.png'}")
    return out
