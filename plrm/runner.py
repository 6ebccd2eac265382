"""The Python API behind the CLI: ``fit``, ``test``, ``adapt`` and ``active`` take the same recipes (or a run
directory), and :class:`Run` is the handle of a run directory.

Run directory (``<run.output_dir>/<run.name>``)::

    plrm-run.json          the marker: this folder is a plrm run; its status (running / complete)
    recipe.yaml            the resolved recipe (test/adapt rebuild everything from it)
    results.json           per-seed and aggregated metrics, package versions, plugins used
    per_user.parquet       per-user accuracies of every method and oracle, every seed
    seed-<s>/split.parquet the split of seed s (reused by test and adapt)
    seed-<s>/<label>.ckpt  each method's trained state (weights-only checkpoint)
    seed-<s>/<label>.metrics.json, .per_user.parquet   a finished unit's results (what --resume keeps)
    seed-<s>/<label>.last.ckpt  while a method trains: the Lightning checkpoint --resume continues from
    wandb/ csv/ tensorboard/  the tracker's files

Every verb on the run's own users is one step applied to each method at each split seed (a :class:`Unit`) by
:meth:`Run.each_unit`, the one seed x method loop; only the step differs (train, re-evaluate, adapt, interactive
sessions). ``adapt_new_users`` is the exception: its users and pairs are not the run's (a file of new users, one
support-only split shared by every seed), so it iterates the run's seeds and labels over its own data.

Distributed (``trainer.strategy=ddp`` with ``trainer.devices`` > 1 or ``trainer.num_nodes`` > 1): Lightning
starts the other ranks at the first ``trainer.fit`` by running the same command again (or torchrun / SLURM
start them all), so every rank executes :func:`fit` from the top. All ranks load the data, make the same
splits, train together (plrm.data.datamodule: each rank takes its part of every global batch) and run the
evaluation protocol together (plrm.eval.protocol: scoring sharded, logits gathered before per-user metrics);
only global rank 0 touches the run directory (checks, checkpoints, results, tracker). Later ``trainer.fit``
calls of the same process (more methods, more split seeds) reuse the processes and the process group.

Safety and resumption (plrm.rundir, plrm.resume): every check that can fail (recipe, trainer, logger, data,
capabilities, every seed's split) runs before anything is written; a folder that is not a plrm run is never
written to or removed; ``run.overwrite=true`` builds the new run beside the old and swaps them at the end;
``plrm fit --resume`` (``run.resume=true``) keeps finished (seed, method) units and continues the interrupted
one from its ``last.ckpt``, with the same results as an uninterrupted run.

Notebook use::

    import torch
    import plrm.runner as runner

    result = runner.fit("quickstart", ["run.name=demo"])
    result.summary["lore"]["unseen"]["accuracy"]          # {'mean': ..., 'std': ..., 'n': ...}

    run = runner.Run.open("runs/demo")                    # a finished run
    run.results["summary"]["lore"]["unseen"]["accuracy"]  # results.json
    model = run.load_method("lore", seed=0)               # trained state of split seed 0
    batch = run.datamodule(0).batch(torch.arange(8))      # its first 8 pairs, each with its user
    with torch.no_grad():
        model.preference_logit(batch)                     # r_u(chosen) - r_u(rejected), shape (8,)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
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
from plrm.checkpoint import checkpoint_mismatch_error, load_checkpoint, save_model, save_state
from plrm.data.datamodule import PreferenceDataModule, PreparedData
from plrm.data.hooks import MethodHooks
from plrm.data.splits import TRAIN, VAL, Split, load_split, make_split, stored_users
from plrm.errors import DataValidationError
from plrm.eval import report
from plrm.eval.metrics import per_user_accuracy, summarize
from plrm.eval.policy_stage import (
    Guided,
    ZeroShot,
    evaluate_baselines,
    evaluate_policy,
    generation_rows,
    policy_correlations,
    shared_zero_shot,
)
from plrm.eval.protocol import adapt_unseen, evaluate, evaluate_oracle, per_user_frame, score_rows, sync_user_state
from plrm.recipe import Recipe, RecipeError, load_recipe, load_source
from plrm.resume import ResumePoints
from plrm.rundir import (
    COMPLETE,
    Place,
    claim,
    complete,
    load_unit,
    place,
    read_marker,
    run_path,
    same_recipe,
    save_unit,
    staging_path,
)
from plrm.tracking import PlainProgress, check_logger, finish, log_results, make_logger

RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"
SPLIT_FILE = "split.parquet"


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
    # a dataset that needs an item encoder (Pref-LaMP's hard negatives) declares it; it is built and handed in here
    data = load_source(registry.datasets.get(recipe.data.name)(recipe.data.config), recipe.data.name)
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


def seed_split(recipe: Recipe, prepared: PreparedData, seed: int, stored: Path | None = None) -> Split:
    """The split of ``seed``: read from ``stored`` (a run's split.parquet) or ``split.from_file`` when given,
    else made from the recipe's fractions."""
    s = recipe.split
    need = max([s.k, *recipe.eval.k_list])
    args = dict(unseen_fraction=s.unseen_fraction, test_fraction=s.test_fraction, val_fraction=s.val_fraction)
    table = prepared.data.pairs.data.table
    source = stored or (Path(s.from_file) if s.from_file else None)
    if source is not None:
        return load_split(source, table, seed, args, need, prepared.data.name)
    return make_split(table, seed, need_support=need, source=prepared.data.name, **args)


def build_model(recipe: Recipe, label: str, prepared: PreparedData, n_users: int):
    """Method ``label`` of the recipe, untrained, for ``n_users`` users and the prepared backbone."""
    comp = recipe.methods[label]
    cls = registry.methods.get(comp.name)
    return cls(comp.config, n_users=n_users, feature_dim=prepared.backbone.feature_dim,
               encoder=prepared.backbone.encoder())


def versions() -> dict[str, str]:
    """Versions of plrm, Python and the libraries that decide the numbers (recorded with every result)."""
    import datasets
    import transformers

    return {"plrm": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}


def provenance(recipe: Recipe) -> list[dict]:
    """The plugin packages (name, version, entry point) behind the recipe's methods, dataset and backbone."""
    return registry.plugin_provenance({"methods": sorted({c.name for c in recipe.methods.values()}),
                                       "datasets": [recipe.data.name], "backbones": [recipe.backbone.name]})


# ---- the run directory --------------------------------------------------------------------------------------
def stored_recipe(run_dir: Path) -> dict:
    """The resolved recipe a run stored (``recipe.yaml``), or a RecipeError naming the file if it is damaged."""
    path = Path(run_dir) / RECIPE_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]}); the run cannot be "
                          "rebuilt without it: restore it from a copy, or re-run `plrm fit`") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} is damaged (it holds {type(raw).__name__}, not a recipe); the run cannot be "
                          "rebuilt without it: restore it from a copy, or re-run `plrm fit`")
    return raw


class Run:
    """A run directory: its recipe, splits, checkpoints and results. Get one with :meth:`create` (a new run,
    as ``fit`` does) or :meth:`open` (a run ``plrm fit`` wrote)."""

    def __init__(self, run_dir: Path, recipe: Recipe, prepared: PreparedData | None = None, rank: int = 0,
                 world: int = 1, new: bool = False):
        self.dir, self.recipe, self.rank, self.world = run_dir, recipe, rank, world
        self._prepared = prepared
        self._new = new  # splits are made afresh (and stored) rather than read back
        self._split: tuple[int, Split] | None = None  # the last split used: one seed's row arrays at a time
        self._made: dict[int, Split] = {}  # splits made (and stored) by create(), not yet used
        self.place: Place | None = None  # a run being created or resumed: where it writes, what it replaces
        self.marker: dict | None = None
        self.finished: list[tuple[int, str]] = []  # (seed, label) units finished, this process or before
        self.current: tuple[int, str, ResumePoints] | None = None  # the unit training now

    def zero_shot(self) -> ZeroShot:
        """The policy stage's base policy and its zero-shot generations (shared by seeds, methods and the cells of
        a benchmark in this process)."""
        return shared_zero_shot(self.recipe.policy)

    @property
    def resumed(self) -> bool:
        return self.place is not None and self.place.resumed

    @classmethod
    def create(cls, recipe: str | dict | Recipe, overrides: list[str] | None = None,
               prepared: PreparedData | None = None, resume: bool = False) -> Run:
        """Start the run directory ``<run.output_dir>/<run.name>`` of ``recipe`` (or continue it: ``resume`` or
        run.resume). ``prepared``: the dataset and backbone already prepared, their needs checked
        (:func:`method_problems`). Every check runs before anything is written or removed (plrm.rundir).
        Distributed, every rank creates the Run; only global rank 0 writes."""
        _quiet_lightning()
        recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
        resume = resume or bool(getattr(recipe.run, "resume", False))
        target = run_path(recipe.run.output_dir, recipe.run.name)
        rank, world = distribution(recipe)
        check_methods(recipe)
        check_logger(recipe.logger)
        main = rank == 0  # the other ranks (started after it made its folder) compute alongside
        if main:
            where = place(target, recipe.run.overwrite, resume)
        else:  # rank 0 has decided and created the folder already
            staging = staging_path(target)
            work = staging if recipe.run.overwrite and staging.is_dir() else target
            where = Place(target, work, staged=work != target, resumed=resume, marker=read_marker(work))
        if where.resumed:
            stored = load_recipe(stored_recipe(where.work)).raw
            changed = same_recipe(stored, recipe.raw)
            if changed:
                raise RecipeError(f"cannot resume {where.work}: the recipe differs from the one it was started "
                                  f"with at {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}; resume "
                                  "with the same recipe and overrides, or start a new run.name")
        run = cls(where.work, recipe, prepared, rank, world, new=True)
        run.place = where
        run.prepared  # bad data fails here, before an old run is replaced or a new one starts
        splits = {seed: run.split(seed, store=False) for seed in run.seeds}  # so does a split that cannot be made
        run._made = dict(splits)  # handed to the seed loop (Run.split) rather than made twice
        if main:
            run.marker = claim(where)
            (run.dir / RECIPE_FILE).write_text(recipe.to_yaml())
            for seed, split in splits.items():
                run.seed_dir(seed).mkdir(exist_ok=True)
                if not (where.resumed and (run.seed_dir(seed) / SPLIT_FILE).is_file()):
                    split.save(run.seed_dir(seed) / SPLIT_FILE)
        return run

    def complete(self) -> None:
        """Mark a created run complete (results written); a staged replacement takes the old run's place."""
        if self.place is None:
            return
        if self.main:
            complete(self.place, self.marker)
        self.dir = self.place.target

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """The run ``plrm fit`` wrote in ``run_dir`` (its recipe is read; the data is prepared when first needed)."""
        _quiet_lightning()
        run_dir = Path(run_dir).expanduser()
        if not (run_dir / RECIPE_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} is not a plrm run directory (no {RECIPE_FILE}); "
                                    "pass the directory that `plrm fit` printed")
        marker = read_marker(run_dir)
        if marker is not None and marker.get("status") != COMPLETE:
            raise RecipeError(f"{run_dir} is an incomplete run (a killed or failed `plrm fit`): finish it first by "
                              "running the same `plrm fit` command with --resume")
        run = cls(run_dir, load_recipe(stored_recipe(run_dir)))
        run.marker = marker
        return run

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory (global rank 0)."""
        return self.rank == 0

    @property
    def seeds(self) -> list[int]:
        return list(self.recipe.split.seeds)

    @property
    def methods(self) -> list[str]:
        """The method labels of the recipe, in its order."""
        return list(self.recipe.methods)

    @property
    def prepared(self) -> PreparedData:
        """The recipe's dataset and backbone, prepared on first use (:func:`prepare`)."""
        if self._prepared is None:
            self._prepared = prepare(self.recipe)
        return self._prepared

    @property
    def results(self) -> dict:
        """results.json: per-seed and aggregated metrics, versions, plugins."""
        path = self.dir / RESULTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir} has no {RESULTS_FILE}: its `plrm fit` has not finished "
                                    "(it writes the results last)")
        return json.loads(path.read_text())

    def seed_dir(self, seed: int) -> Path:
        return self.dir / f"seed-{seed}"

    def split(self, seed: int, store: bool = True) -> Split:
        """The split of ``seed``: ``seed-<s>/split.parquet``; in a run being created, made afresh (and stored,
        unless ``store`` is False)."""
        if self._split is None or self._split[0] != seed:
            stored = self.seed_dir(seed) / SPLIT_FILE
            if seed in self._made:
                split = self._made.pop(seed)
            elif self._new and not (self.resumed and stored.is_file()):  # a resumed run keeps its stored splits
                split = seed_split(self.recipe, self.prepared, seed)
                if self.main and store:
                    self.seed_dir(seed).mkdir(exist_ok=True)
                    split.save(stored)
            else:
                split = seed_split(self.recipe, self.prepared, seed, stored=stored)
            self._split = (seed, split)
        return self._split[1]

    def users(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(user ids in the order of the methods' per-user rows, whether each is an unseen user) of ``seed``,
        read from the stored split without loading the dataset."""
        if self._split is not None and self._split[0] == seed:
            return self._split[1].user_ids, self._split[1].unseen
        return stored_users(self.seed_dir(seed) / SPLIT_FILE)

    def datamodule(self, seed: int) -> PreferenceDataModule:
        """The pairs of ``seed``'s split as evaluation reads them (``.batch(rows)``, ``.test_rows(unseen)``)."""
        return PreferenceDataModule(self.prepared, self.split(seed), seed=self.recipe.run.seed)

    def _check_label(self, label: str) -> None:
        if label not in self.recipe.methods:
            raise RecipeError(f"no method labelled {label!r} in {self.dir}; its methods: {', '.join(self.methods)}")

    def checkpoint(self, label: str, seed: int, name: str | None = None) -> dict:
        """The checkpoint ``name`` (a file in ``seed-<s>/``, default ``<label>.ckpt``): its state_dict and meta."""
        self._check_label(label)
        path = self.seed_dir(seed) / (name or f"{label}.ckpt")
        if not path.is_file():
            have = sorted(p.name for p in path.parent.glob("*.ckpt"))
            raise FileNotFoundError(f"checkpoint {path} does not exist; {path.parent} has: {', '.join(have) or 'none'}")
        return load_checkpoint(path)

    def build_method(self, label: str, seed: int, prepared: PreparedData | None = None):
        """Method ``label``, untrained, sized for ``seed``'s users; on ``prepared`` (other data through the run's
        backbone, e.g. RewardBench) or the run's own data."""
        self._check_label(label)
        return build_model(self.recipe, label, prepared or self.prepared, len(self.users(seed)[0]))

    def load_method(self, label: str, seed: int, checkpoint: str | None = None):
        """Method ``label`` of split ``seed`` with the state of ``checkpoint`` (a file name in ``seed-<s>/``,
        default ``<label>.ckpt``; e.g. ``<label>.adapted-k5.ckpt``), in eval mode."""
        ckpt = self.checkpoint(label, seed, checkpoint)
        model = self.build_method(label, seed)
        try:
            model.load_checkpoint_state(ckpt["state_dict"])
        except (RuntimeError, ValueError) as exc:  # e.g. a checkpoint copied from another run: size mismatch
            path = self.seed_dir(seed) / (checkpoint or f"{label}.ckpt")
            raise checkpoint_mismatch_error(path, ckpt, (self.marker or {}).get("id"), exc) from exc
        return model.eval()

    def each_unit(self, step: Callable[[Unit], tuple[dict, pd.DataFrame | None] | None],
                  oracles: bool = False, after_seed: Callable[[int, PreferenceDataModule], dict] | None = None
                  ) -> tuple[dict[int, dict], list[pd.DataFrame]]:
        """The seed x method loop of every verb: ``step(unit)`` for each method (recipe order) at each split
        seed. A step returns (metrics, per-user frame or None), or None to leave the method out of the seed's
        results; ``oracles``: add the dataset's oracle scorers after each seed's methods. Returns
        ({seed: {label: metrics}}, the per-user frames in order)."""
        per_seed: dict[int, dict] = {}
        frames: list[pd.DataFrame] = []
        for seed in self.seeds:
            split = self.split(seed)
            data = self.datamodule(seed)
            results: dict[str, dict] = {}
            for label in self.methods:
                outcome = step(Unit(self, seed, split, label, data))
                if outcome is None:
                    continue
                results[label], per_user = outcome
                if per_user is not None:
                    frames.append(per_user)
            if after_seed is not None:  # seed-level rows of no method (the policy stage's baselines)
                results.update(after_seed(seed, data))
            if oracles:
                for name, logits in self.prepared.data.oracle_logits.items():
                    ev = evaluate_oracle(logits, data, self.recipe.eval.worst_fractions)
                    results[name] = ev.metrics
                    frames.append(ev.per_user.assign(method=name, seed=seed))
            per_seed[seed] = results
        return per_seed, frames


@dataclass
class Unit:
    """One method at one split seed of a run: what a verb's step works on."""

    run: Run
    seed: int
    split: Split
    label: str
    data: PreferenceDataModule  # the seed's evaluation datamodule, shared by its methods

    @property
    def seed_dir(self) -> Path:
        return self.run.seed_dir(self.seed)

    def load_method(self, checkpoint: str | None = None):
        return self.run.load_method(self.label, self.seed, checkpoint)

    def tag(self, per_user: pd.DataFrame) -> pd.DataFrame:
        """Per-user rows of this unit, with its method label and split seed."""
        return per_user.assign(method=self.label, seed=self.seed)


# ---- Lightning ----------------------------------------------------------------------------------------------
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


def _check_clipping(recipe: Recipe, label: str, method, manual: bool) -> None:
    """Lightning clips only under automatic optimization: a manual-optimization method (``method``: its class or
    an instance) that does not clip in its own step (``clips_gradients``) refuses trainer.gradient_clip_val
    rather than train unclipped."""
    clip = recipe.trainer.gradient_clip_val
    if clip is not None and manual and not getattr(method, "clips_gradients", False):
        name = method.__name__ if isinstance(method, type) else type(method).__name__
        raise RecipeError(f"trainer.gradient_clip_val={clip}: methods.{label} ({name}) optimizes manually (backward "
                          "passes inside its training step), where Lightning does not clip, and does not clip its "
                          "own gradients (clips_gradients); set trainer.gradient_clip_val=null")


def check_methods(recipe: Recipe) -> None:
    """What the recipe's method classes declare, checked against its trainer settings before anything is written
    (a method that turns manual optimization on in its own __init__ is checked when its Trainer is built)."""
    for label, comp in recipe.methods.items():
        cls = registry.methods.get(comp.name)
        _check_clipping(recipe, label, cls, getattr(cls, "manual_optimization", False))


def _gradient_clip_val(recipe: Recipe, label: str, model) -> float | None:
    """The Trainer's gradient_clip_val: the recipe's under automatic optimization; a manual-optimization method
    that clips in its own step gets it as ``model.gradient_clip_val`` (and the Trainer None)."""
    _check_clipping(recipe, label, model, not model.automatic_optimization)
    clip = recipe.trainer.gradient_clip_val
    if model.automatic_optimization or clip is None:
        model.gradient_clip_val = None
        return clip
    model.gradient_clip_val = clip
    return None


def make_trainer(recipe: Recipe, label: str, model, dm: PreferenceDataModule, logger=None, validate: bool = False,
                 world: int = 1, title: str | None = None, resume_points: ResumePoints | None = None) -> L.Trainer:
    """The Trainer that trains method ``label`` on ``dm``: the recipe's trainer settings, the method's data hooks
    (plrm.data.hooks.MethodHooks) and its gradient clipping. ``title`` names it in plain progress lines;
    ``resume_points``: the callback that writes its checkpoints during training (plrm.resume)."""
    t = recipe.trainer
    cfg = model.config
    show_bars = sys.stderr.isatty() if t.progress_bar == "auto" else t.progress_bar
    clip = _gradient_clip_val(recipe, label, model)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(recipe, model, world),
        precision=t.precision, max_epochs=cfg.max_epochs, max_steps=cfg.max_steps,
        logger=logger if logger is not None else False,
        callbacks=[MethodHooks(dm)] + ([] if show_bars else [PlainProgress(title or label)])
        + ([resume_points] if resume_points is not None else []),
        enable_progress_bar=show_bars,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, num_sanity_val_steps=0, limit_val_batches=1.0 if validate else 0,
        gradient_clip_val=clip,
        # the datamodule shards every global batch itself (same batches as one process, split protocol kept)
        use_distributed_sampler=False,
    )


# ---- results --------------------------------------------------------------------------------------------------
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


def _finish_run(run: Run, per_seed: dict, frames: list[pd.DataFrame], file: str, show: bool,
                backbone_stats: dict | None = None, data_report: dict | None = None) -> RunResult:
    summary = report.aggregate(per_seed)
    per_user = pd.concat(frames, ignore_index=True)
    if not run.main:  # a distributed rank other than 0: it computed the same numbers, rank 0 writes them
        run.complete()
        return RunResult(run.dir, per_seed, summary, per_user)
    payload = {"recipe": run.recipe.raw, "versions": versions(), "plugins": provenance(run.recipe),
               "backbone": backbone_stats or {}, "data": data_report or {},
               "per_seed": {str(s): r for s, r in per_seed.items()}, "summary": summary}
    correlations = policy_correlations(per_seed)
    if correlations:
        payload["policy_correlations"] = correlations
    report.write_json(run.dir / file, payload)
    if file == RESULTS_FILE:
        tmp = run.dir / "per_user.parquet.tmp"
        per_user.to_parquet(tmp, index=False)
        tmp.replace(run.dir / "per_user.parquet")
    run.complete()  # a run being created: marked complete, and a staged replacement swapped in
    if show:
        report.render(summary, run.recipe.split.k)
        report.render_policy(summary)
        print(f"run directory: {run.dir}")
    return RunResult(run.dir, per_seed, summary, per_user)


# ---- verbs ------------------------------------------------------------------------------------------------------
def fit(recipe: str | dict | Recipe, overrides: list[str] | None = None, show: bool = True,
        prepared: PreparedData | None = None, resume: bool = False) -> RunResult:
    """Train every method of the recipe on seen users, adapt unseen users, evaluate; per split seed.

    ``prepared``: the recipe's dataset and backbone already prepared (the benchmark runner reuses one across the
    cells of a dataset); its needs must already have been checked (:func:`method_problems`). ``resume`` (or
    run.resume): continue the run of the same recipe that a kill or a failure left incomplete -- finished
    (seed, method) units are kept, the interrupted one continues from its last checkpoint; a run that does not
    exist yet is started. On Ctrl-C, says what was saved and how to resume, and raises KeyboardInterrupt."""
    run = Run.create(recipe, overrides, prepared, resume=resume)
    try:
        per_seed, frames = run.each_unit(_fit_unit, oracles=True, after_seed=_policy_baselines(run))
    except KeyboardInterrupt:
        if run.main:
            print(interrupted_message(run), file=sys.stderr)
        raise
    rep = run.prepared.data.load_report
    return _finish_run(run, per_seed, frames, RESULTS_FILE, show and run.main, run.prepared.backbone.stats(),
                       data_report=rep.to_dict() if rep is not None else None)


def interrupted_message(run: Run) -> str:
    """What an interrupted ``plrm fit`` kept, and how to continue it."""
    lines = [f"plrm fit: interrupted; the run is kept, marked incomplete, in {run.dir}"]
    if run.finished:
        units = ", ".join(f"seed {seed} {label}" for seed, label in run.finished)
        lines.append(f"  finished and saved: {units}")
    if run.current is not None:
        seed, label, points = run.current
        lines.append(f"  seed {seed} {label}: " + (
            f"continues from its checkpoint after {points.saved_at} training batch(es) "
            f"({run.seed_dir(seed) / (label + '.last.ckpt')})" if points.saved_at is not None else
            "no training checkpoint yet; it starts again"))
    lines.append("  continue it: rerun the same `plrm fit` command with --resume (or run.resume=true)")
    return "\n".join(lines)


def _fit_unit(unit: Unit) -> tuple[dict, pd.DataFrame]:
    """Train one method on the seen users of one split, save it, and evaluate it (plrm.eval.protocol). In a
    resumed run, a unit that finished is read back, and one that was interrupted continues from its
    ``<label>.last.ckpt``."""
    run, recipe, label, seed = unit.run, unit.run.recipe, unit.label, unit.seed
    if run.resumed:
        done = load_unit(unit.seed_dir, label)
        if done is not None:
            run.finished.append((seed, label))
            return done
    comp = recipe.methods[label]
    train_seed = recipe.run.seed + (seed if recipe.run.seed_per_split else 0)
    L.seed_everything(train_seed, verbose=False)
    model = build_model(recipe, label, run.prepared, len(unit.split.user_ids))
    n_train = len(unit.split.rows(TRAIN))
    dm = PreferenceDataModule(run.prepared, unit.split, batch_size=model.training_batch_size(n_train), seed=train_seed,
                              users_per_batch=model.users_per_batch,
                              difference_cache=model.uses_difference_cache(n_train, run.prepared.items.n_items),
                              difference_dtype=torch.bfloat16 if str(recipe.trainer.precision).startswith("bf16")
                              else None)
    logger = make_logger(recipe.logger, run.dir, name=f"seed-{seed}/{label}",
                         group=recipe.logger.group or recipe.run.name, run_name=recipe.run.name,
                         config={**recipe.raw, "label": label, "split_seed": seed}) if run.main else None
    last = unit.seed_dir / f"{label}.last.ckpt"
    points = ResumePoints(last, recipe.run.checkpoint_every_n_steps, recipe.run.checkpoint_interval)
    trainer = make_trainer(recipe, label, model, dm, logger, validate=bool((unit.split.role == VAL).any()),
                           world=run.world, title=f"seed {seed} {label}", resume_points=points)
    ckpt_path = None
    if run.resumed and last.is_file():
        ckpt_path = last
        model.strict_loading = False  # the checkpoint holds trained tensors only (plrm.resume)
        if run.main:
            print(f"seed {seed} {label}: resuming from {last}", file=sys.stderr)
    run.current = (seed, label, points)
    start = time.perf_counter()
    _fit_interruptibly(trainer, model, dm, ckpt_path)
    train_seconds = time.perf_counter() - start
    with _full_parameters(trainer):
        sync_user_state(model)  # per-user state written outside autograd (e.g. MRM's seen users): rank 0's
        if run.main:
            save_model(model, unit.seed_dir / f"{label}.ckpt", {"method": comp.name, "label": label,
                                                                 "run": (run.marker or {}).get("id")})
        start = time.perf_counter()
        ev = evaluate(model, dm, recipe.split.k, recipe.eval.k_list, recipe.eval.worst_fractions,
                      recipe.eval.batch_size)
    metrics = {**ev.metrics, "adapts_new_users": model.adapts_new_users,
               "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - start}
    diagnostics = model.diagnostics()
    if diagnostics:
        metrics["diagnostics"] = diagnostics
    if recipe.policy.enabled:
        metrics.update(_policy_stage(unit, model))
    per_user = unit.tag(ev.per_user)
    log_results(logger, {**_flat(label, ev.metrics), **_data_metrics(run.prepared)}, {"eval/per_user": per_user})
    finish(logger)
    if run.main:
        save_unit(unit.seed_dir, label, metrics, per_user)
        last.unlink(missing_ok=True)  # the unit is whole: its training checkpoint is no longer needed
    run.finished.append((seed, label))
    run.current = None
    return metrics, per_user


def _policy_stage(unit: Unit, model) -> dict:
    """The policy stage of a trained unit (plrm.eval.policy_stage), its unseen users adapted: its metrics and
    settings for the unit's record, its generations and pair scores written next to the checkpoint. A method
    that cannot guide decoding gets policy None and the reason (the run goes on)."""
    run = unit.run
    if cap.TEXT not in run.prepared.data.provides:
        reason = (f"dataset '{run.recipe.data.name}' provides no prompt and response text: there is nothing for a "
                  "policy to generate")
        print(f"seed {unit.seed} {unit.label}: no policy stage: {reason}", file=sys.stderr)
        return {"policy": None, "policy_skipped": reason}
    if model.pairwise_only:
        reason = (f"{type(model).__name__} is a pairwise-only method (it judges pairs, it has no reward of one "
                  "response); not usable for ARGS / policy evaluation")
        print(f"seed {unit.seed} {unit.label}: no policy stage: {reason}", file=sys.stderr)
        return {"policy": None, "policy_skipped": reason}
    zero_shot = run.zero_shot()
    start = time.perf_counter()
    try:
        metrics, settings, generations, pairs = evaluate_policy(model, unit.data, run.recipe.policy,
                                                                zero_shot.policy, zero_shot)
    except RecipeError as exc:
        print(f"seed {unit.seed} {unit.label}: no policy stage: {exc}", file=sys.stderr)
        return {"policy": None, "policy_skipped": str(exc)}
    metrics["seconds"] = time.perf_counter() - start
    if run.main:
        for frame, suffix in ((generations.assign(method=unit.label, seed=unit.seed), "generations"),
                              (pairs.assign(method=unit.label, seed=unit.seed), "policy_pairs")):
            path = unit.seed_dir / f"{unit.label}.{suffix}.parquet"
            tmp = path.with_name(path.name + ".tmp")
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, path)
    return {"policy": metrics, "policy_settings": settings}


def _policy_baselines(run: Run) -> Callable[[int, PreferenceDataModule], dict] | None:
    """With a ``policy:`` section: per seed, the rows no reward model is part of (zero-shot, ICL, ICL-RAG;
    plrm.eval.policy_stage.evaluate_baselines), each an entry {'policy': metrics} of the seed's results."""
    section = run.recipe.policy
    if not section.enabled:
        return None

    def baselines(seed: int, data: PreferenceDataModule) -> dict:
        if not len(data.split.unseen_users) or cap.TEXT not in run.prepared.data.provides:
            return {}
        rows = evaluate_baselines(data, section, run.zero_shot(), run.recipe.split.k)
        return {name: {"policy": metrics} for name, metrics in rows.items()}
    return baselines


def _fit_interruptibly(trainer: L.Trainer, model, dm: PreferenceDataModule, ckpt_path: Path | None) -> None:
    """``trainer.fit``, with Ctrl-C raised as KeyboardInterrupt: Lightning turns it into SystemExit(1) after
    its own teardown and leaves SIGINT ignored."""
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    except SystemExit as exc:
        if trainer.interrupted:
            raise KeyboardInterrupt from exc
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and trainer.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def test(run_dir: str | Path, show: bool = True) -> RunResult:
    """Re-evaluate a finished run from its checkpoints and stored splits (writes test_results.json)."""
    run = Run.open(run_dir)
    per_seed, frames = run.each_unit(_test_unit, oracles=True)
    return _finish_run(run, per_seed, frames, "test_results.json", show)


def _test_unit(unit: Unit) -> tuple[dict, pd.DataFrame]:
    recipe = unit.run.recipe
    model = unit.load_method()
    ev = evaluate(model, unit.data, recipe.split.k, recipe.eval.k_list, recipe.eval.worst_fractions,
                  recipe.eval.batch_size)
    return {**ev.metrics, "adapts_new_users": model.adapts_new_users}, unit.tag(ev.per_user)


def adapt(run_dir: str | Path, k: int | None = None, show: bool = True) -> RunResult:
    """Fit the unseen users of a finished run from their first k support pairs with the trained checkpoints;
    saves ``seed-<s>/<label>.adapted-k<k>.ckpt`` and reports unseen accuracy (adapt_results.json)."""
    run = Run.open(run_dir)
    if k is not None and k < 1:
        raise RecipeError(f"--k must be >= 1 (support pairs per unseen user), got {k}")
    k = run.recipe.split.k if k is None else k
    for seed in run.seeds:  # every checkpoint read (damaged ones fail) before any adapted one is written
        for label in run.methods:
            run.checkpoint(label, seed)
    per_seed, frames = run.each_unit(lambda unit: _adapt_unit(unit, k))
    return _finish_run(run, per_seed, frames, "adapt_results.json", show)


def _adapt_unit(unit: Unit, k: int) -> tuple[dict, pd.DataFrame | None]:
    recipe, split = unit.run.recipe, unit.split
    if (split.support_rank >= 0).sum() and k > int(split.support_rank.max()) + 1:
        raise RecipeError(f"k={k}: the unseen users of {unit.seed_dir} have at most "
                          f"{int(split.support_rank.max()) + 1} support pairs")
    model = unit.load_method()
    if model.adapts_new_users == "no":
        return {"seen": None, "unseen": None, "overall": None, "fewshot": []}, None
    dm = unit.data
    start = time.perf_counter()
    adapt_unseen(model, dm, k)
    seconds = time.perf_counter() - start
    save_model(model, unit.seed_dir / f"{unit.label}.adapted-k{k}.ckpt",
               {"method": recipe.methods[unit.label].name, "label": unit.label, "k": k})
    rows = dm.test_rows(unseen=True)
    logits = score_rows(model, dm, rows, recipe.eval.batch_size)
    unseen, acc, cnt = summarize(logits, dm.row_user[torch.from_numpy(rows)], split.unseen_users, dm.n_users,
                                 recipe.eval.worst_fractions)
    metrics = {"seen": None, "unseen": unseen, "overall": None, "fewshot": [{"k": k, **unseen}],
               "adapt_seconds": seconds}
    return metrics, unit.tag(per_user_frame(dm, split.unseen_users, acc, cnt, "unseen", k))


def adapt_new_users(run_dir: str | Path, pairs: str | Path, show: bool = True) -> dict:
    """Fit the state of users who are not in the run from their own pairs (a canonical-schema file), with each
    method's trained shared parameters. Writes ``seed-<s>/<label>.users-<file stem>.ckpt`` (the new users'
    per-user tensors plus their ids) and ``adapt_<file stem>.json`` with how well each user's state orders
    their own pairs (a fit, not a test accuracy: there are no held-out pairs)."""
    from plrm.data.files import PreferenceFiles
    from plrm.data.splits import support_only_split

    run = Run.open(run_dir)
    recipe = run.recipe
    new = PreferenceFiles(PreferenceFiles.Config(path=str(pairs)), key="--pairs").load()
    if new.load_report is not None:  # what was read, kept and dropped (e.g. exact duplicate rows), by rule
        print(new.load_report.render(), file=sys.stderr)
    backbone = registry.backbones.get(recipe.backbone.name)(recipe.backbone.config)
    if new.features is None and cap.FEATURES in backbone.provides:
        new.features = run.prepared.data.features  # the run's own items (e.g. a synthetic world's)
    prepared = PreparedData(new, backbone)
    split = support_only_split(new.pairs.data.table)
    user_ids = split.user_ids
    known = set(map(str, run.users(run.seeds[0])[0]))
    already = [str(u) for u in user_ids if str(u) in known]
    if already:
        raise DataValidationError(
            f"--pairs {pairs}: {len(already)} of its {len(user_ids)} users are already users of the run "
            f"({', '.join(already[:5])}{' ...' if len(already) > 5 else ''}); --pairs fits users who are not in "
            "the run. Re-fit the run's own unseen users with `plrm adapt --run ... --k K`, or give the new users "
            "ids of their own")
    support = PreferenceDataModule(prepared, split).batch(torch.arange(len(split.row_user)))  # gathered once
    users = torch.arange(len(user_ids))
    stem = Path(pairs).stem
    out: dict = {"pairs": str(pairs), "n_users": len(user_ids), "n_pairs": len(split.row_user), "per_seed": {}}
    for seed in run.seeds:  # not Run.each_unit: these users are not the run's, nor is their split
        results = {}
        for label, comp in recipe.methods.items():
            model = build_model(recipe, label, prepared, len(user_ids))
            if model.adapts_new_users == "no":
                results[label] = None
                continue
            model.load_shared_state(run.checkpoint(label, seed)["state_dict"])
            model.eval()
            model.adapt(support, users)
            with torch.no_grad():
                fit, _ = per_user_accuracy(model.preference_logit(support), support["user_idx"], len(user_ids))
            path = None
            if model.user_state:  # a generic method (bt) has no per-user state to save
                path = run.seed_dir(seed) / f"{label}.users-{stem}.ckpt"
                save_state({k: v for k, v in model.state_dict().items() if k in model.user_state}, path,
                           {"user_ids": [str(u) for u in user_ids], "method": comp.name})
            results[label] = {"support_accuracy": float(fit.mean()), "checkpoint": str(path) if path else None}
        out["per_seed"][str(seed)] = results
    report.write_json(run.dir / f"adapt_{stem}.json", out)
    if show:
        for seed, results in out["per_seed"].items():
            for label, r in results.items():
                text = "n/a (method cannot adapt new users)" if r is None else \
                    f"{r['support_accuracy']:.3f} of their own pairs ordered correctly" + \
                    (f" -> {r['checkpoint']}" if r["checkpoint"] else " (one model for all users: nothing to save)")
                print(f"seed {seed} {label}: {len(user_ids)} new users, {text}")
    return out


def generate(run_dir: str | Path, methods: list[str] | None = None, seeds: list[int] | None = None,
             users: list[str] | None = None, zero_shot: bool = True, out: str | Path | None = None,
             show: bool = True, **settings) -> pd.DataFrame:
    """``plrm generate``: decode the test prompts of a finished run's users under each trained method (ARGS with
    its reward, GenARM's decoding, or P-DPO's own policy; plrm.eval.policy_stage) and, with ``zero_shot``, the base
    policy alone. ``settings`` override the run's ``policy:`` section (k, weight, max_new_tokens, decoder, mode,
    temperature, prompts_per_user, model, ...). ``users``: user ids (default: the unseen users, adapted on their
    first split.k support pairs as in evaluation). Writes one table -- user, prompt, generation, method, seed and
    the decoder settings -- to ``out`` (default <run>/generations.parquet; .csv / .jsonl by suffix), atomically."""
    run = Run.open(run_dir)
    known = {f.name for f in dataclasses.fields(run.recipe.policy)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise RecipeError(f"unknown policy setting(s) {unknown}; valid: {sorted(known)}")
    section = dataclasses.replace(run.recipe.policy, enabled=True,
                                  **{k: v for k, v in settings.items() if v is not None})
    labels = methods or run.methods
    for label in labels:
        if label not in run.methods:
            raise RecipeError(f"--method {label}: the run has no such method; it has "
                              f"{', '.join(run.methods)}")
    seeds = seeds or run.seeds
    bad = sorted(set(seeds) - set(run.seeds))
    if bad:
        raise RecipeError(f"--seed {bad[0]}: the run's split seeds are {run.seeds}")
    path = Path(out) if out is not None else run.dir / "generations.parquet"
    if path.suffix not in (".parquet", ".csv", ".jsonl"):
        raise RecipeError(f"--out {path}: write .parquet, .csv or .jsonl")
    zero = shared_zero_shot(section)
    policy = zero.policy
    frames = []
    for seed in seeds:
        split, dm = run.split(seed), run.datamodule(seed)
        if users is None:
            chosen = split.unseen_users
        else:
            index = {str(u): i for i, u in enumerate(split.user_ids)}
            missing = [u for u in users if u not in index]
            if missing:
                raise RecipeError(f"--users: {missing} are not users of {run.dir} (e.g. "
                                  f"{', '.join(map(str, split.user_ids[:5]))})")
            chosen = np.array(sorted(index[u] for u in users))
        rows = generation_rows(dm, chosen, section.prompts_per_user)
        if not len(rows):
            raise RecipeError(f"the chosen users have no test prompts in seed {seed}'s split")
        prompts = [str(p) for p in run.prepared.data.pairs.data.table["prompt"].to_numpy(zero_copy_only=False)[rows]]
        row_users = torch.from_numpy(split.row_user[rows])
        base = {"seed": seed, "row": rows, "user_id": split.user_ids[split.row_user[rows]].astype(str),
                "prompt": prompts, "max_new_tokens": section.max_new_tokens, "mode": section.mode,
                "policy_model": section.model}
        if zero_shot:
            texts = zero.generate(prompts)
            frames.append(pd.DataFrame({**base, "method": "zero_shot", "generation": texts, "decoder": "greedy",
                                        "k": 1, "weight": 0.0}))
        for label in labels:
            model = run.load_method(label, seed)
            if np.isin(chosen, split.unseen_users).any() and model.adapts_new_users != "no":
                adapt_unseen(model, dm, run.recipe.split.k)
            try:
                guided = Guided.of(model, run.prepared.backbone, policy)
            except RecipeError as exc:
                print(f"seed {seed} {label}: skipped: {exc}", file=sys.stderr)
                continue
            lam = guided.weight(guided.choose_lambda(dm, section), section)
            texts, seconds, n_tokens = guided.generate(prompts, row_users.to(model.device), lam, section,
                                                       torch.Generator().manual_seed(section.seed))
            if show:
                print(f"seed {seed} {label}: {len(prompts)} prompts, {n_tokens} tokens, "
                      f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s (lambda {lam:.3g})", file=sys.stderr)
            frames.append(pd.DataFrame({**base, "method": label, "generation": texts,
                                        "decoder": guided.decoder(section),
                                        "k": 1 if guided.kind == "own_policy" else section.k, "weight": lam}))
    table = pd.concat(frames, ignore_index=True)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(tmp, index=False)
    elif path.suffix == ".csv":
        table.to_csv(tmp, index=False)
    else:
        table.to_json(tmp, orient="records", lines=True)
    os.replace(tmp, path)
    if show:
        print(f"wrote {len(table)} generations to {path}")
    return table


def active(run_dir: str | Path, budget: int = 40, strategies: tuple[str, ...] = ("uncertainty", "random"),
           answers: str = "labels", eval_at: list[int] | None = None, show: bool = True) -> dict:
    """Simulated interactive sessions (PReF, Shenfeld et al., arXiv 2503.06358, Algorithm 2) with the unseen users
    of a finished run: each method with each strategy asks every unseen user ``budget`` questions from their
    support pool, re-fits them after every answer and scores their test pairs. Writes ``active_results.json``
    (curves per seed, mean +- std, the answers uncertainty needs to match random at ``budget``),
    ``active_curve.png`` and ``seed-<s>/<label>.active-<strategy>.parquet`` (which pair each user was asked at
    each t)."""
    from plrm.eval.active import SessionError, answers_to_match
    from plrm.eval.plots import active_curves

    run = Run.open(run_dir)
    recipe = run.recipe
    eval_at = sorted(set(eval_at)) if eval_at else list(range(1, budget + 1))
    skipped: dict[str, str] = {}
    by_seed, _ = run.each_unit(lambda unit: _active_unit(unit, budget, strategies, answers, eval_at, skipped))
    per_seed = {str(seed): results for seed, results in by_seed.items()}
    summary, matches = {}, {}
    for label in run.methods:
        runs = [r[label] for r in per_seed.values() if label in r]
        if not runs:
            continue
        summary[label] = {}
        for strategy in runs[0]:
            curves = [r[strategy]["curve"] for r in runs]
            summary[label][strategy] = [
                {"t": rows[0]["t"], **{m: report.mean_std([row[m] for row in rows]) for m in ("accuracy", "auroc")}}
                for rows in zip(*curves)]
        means = {s: [{"t": r["t"], "accuracy": r["accuracy"]["mean"]} for r in rows]
                 for s, rows in summary[label].items()}
        matches[label] = answers_to_match(means)
    if not summary:
        raise SessionError("no method of the run can adapt new users: nothing to run a session with")
    out = {"budget": budget, "answers": answers, "strategies": list(strategies), "eval_at": eval_at,
           "per_seed": per_seed, "summary": summary, "answers_to_match": matches, "skipped": skipped,
           "versions": versions()}
    report.write_json(run.dir / "active_results.json", out)
    active_curves(summary, run.dir / "active_curve.png",
                  f"{recipe.run.name}: interactive sessions, answers from {answers}, "
                  f"{len(run.seeds)} seed(s)")
    if show:
        report.render_active(summary, matches, skipped)
        print(f"wrote {run.dir / 'active_results.json'} and {run.dir / 'active_curve.png'}")
    return out


def _active_unit(unit: Unit, budget: int, strategies: tuple[str, ...], answers: str, eval_at: list[int],
                 skipped: dict[str, str]) -> tuple[dict, None] | None:
    """One method's sessions with the unseen users of one split, per strategy; what cannot run goes to
    ``skipped`` with the reason."""
    from plrm.eval.active import run_session

    recipe, label = unit.run.recipe, unit.label
    model = unit.load_method()
    if model.adapts_new_users == "no":
        skipped[label] = "the method cannot adapt new users"
        return None
    results = {}
    for strategy in strategies:
        if strategy == "uncertainty" and not model.has_uncertainty:
            skipped[f"{label} ({strategy})"] = f"{type(model).__name__} has no uncertainty score"
            continue
        start = time.perf_counter()
        session = run_session(model, unit.data, budget, strategy, eval_at, recipe.eval.worst_fractions, answers,
                              recipe.eval.batch_size)
        results[strategy] = {"curve": session.curve, "seconds": time.perf_counter() - start}
        asked = pd.DataFrame({"user_id": np.repeat(session.user_ids.astype(str), budget),
                              "t": np.tile(np.arange(1, budget + 1), len(session.user_ids)),
                              "row": session.asked.ravel()})
        tmp = unit.seed_dir / f"{label}.active-{strategy}.parquet.tmp"
        asked.to_parquet(tmp, index=False)
        tmp.replace(unit.seed_dir / f"{label}.active-{strategy}.parquet")
    return results, None
