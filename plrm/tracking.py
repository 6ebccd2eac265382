"""Experiment tracking: W&B by default (offline when there are no credentials), CSV or TensorBoard.

W&B with no API key and a closed stdin does not prompt, it fails (``UsageError: No API key configured``), so
plrm decides the mode itself before wandb is touched: the recipe's ``logger.mode`` if not 'auto', else
``WANDB_MODE``, else 'online' when an API key is configured (``WANDB_API_KEY`` or a ~/.netrc entry for the
W&B host, where ``wandb login`` stores it), else 'offline', said once on stderr. A run that asks for 'online'
without credentials is refused before it starts (:func:`check_logger`).
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from plrm.errors import RecipeError

_said_offline = False
_USER_WANDB_DATA_DIR = os.environ.get("WANDB_DATA_DIR")


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(_netrc_path()).authenticators(_wandb_host()) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check_logger(section: Any) -> None:
    """Refuse, before anything is written, a W&B logger that would fail once the run has started:
    ``logger.kind=wandb`` whose mode resolves to 'online' (``logger.mode=online``, or 'auto' with
    ``WANDB_MODE=online``) while no W&B credentials exist here. ``section``: the recipe's logger section (kind,
    mode, ...). Reads only the environment and ~/.netrc: wandb is not imported."""
    if getattr(section, "kind", None) != "wandb":
        return
    configured = getattr(section, "mode", "auto")
    mode = configured if configured != "auto" else os.environ.get("WANDB_MODE", "").strip()
    if mode not in ("online", "run") or has_wandb_credentials():
        return
    source = "logger.mode=online" if configured == "online" else f"logger.mode=auto with WANDB_MODE={mode}"
    raise RecipeError(
        f"{source} needs W&B credentials, and none are configured here (no WANDB_API_KEY, no entry for "
        f"{_wandb_host()} in {_netrc_path()}). Run `wandb login`, or set WANDB_API_KEY, or log without an "
        "account: logger.mode=offline (upload later with `wandb sync`), or logger.kind=csv")


def _wandb_host() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]


def _netrc_path() -> str:
    """Where ``wandb login`` keeps the key: $NETRC if set (wandb honours it), else ~/.netrc."""
    return os.environ.get("NETRC") or str(Path("~/.netrc").expanduser())


def wandb_mode(configured: str) -> str:
    global _said_offline
    if configured != "auto":
        return configured
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        return "offline" if env == "dryrun" else env
    if has_wandb_credentials():
        return "online"
    if not _said_offline:
        print("plrm: no W&B credentials found (WANDB_API_KEY or `wandb login`); logging offline. "
              "Upload later with `wandb sync <run dir>/wandb/offline-run-*`.", file=sys.stderr)
        _said_offline = True
    return "offline"


def make_logger(cfg, run_dir: Path, name: str, group: str, config: dict, run_name: str | None = None) -> Logger | None:
    """The Lightning logger of one (seed, method) training run; None when logging is off. W&B: the run is
    ``<run_name>/<name>`` (run_name defaults to the group) in the group ``group``."""
    if cfg.kind == "none":
        return None
    # absolute: W&B's service process may have been started by another process, in another working directory
    # (a parent's WANDB_SERVICE), and would resolve a relative dir against its own
    run_dir = Path(run_dir).resolve()
    if cfg.kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version=name)
    if cfg.kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=name)
    mode = wandb_mode(cfg.mode)
    if mode == "disabled":
        return None
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    # W&B stages table/artifact files under WANDB_DATA_DIR: keep them in this run's directory (every run,
    # not only the first of a process), unless the user chose a place.
    os.environ["WANDB_DATA_DIR"] = _USER_WANDB_DATA_DIR or str(run_dir / "wandb-staging")
    # Start the run here rather than through WandbLogger's kwargs, which pass wandb's deprecated `anonymous`.
    run = wandb.init(project=cfg.project, entity=cfg.entity, name=f"{run_name or group}/{name}", group=group,
                     tags=list(cfg.tags), dir=str(run_dir), mode=mode, config=config, settings=wandb_settings(),
                     reinit="finish_previous")
    return WandbLogger(experiment=run)


def wandb_settings() -> Any:
    """The ``wandb.Settings`` of every plrm W&B run: silent (it never asks anything on a terminal) and without
    the system monitor, which a short job does not need."""
    import wandb

    return wandb.Settings(silent=True, x_disable_stats=True)


def log_results(logger: Logger | None, metrics: dict[str, float], tables: dict[str, Any]) -> None:
    """Final metrics (flat keys) and tables (pandas DataFrames) of one run."""
    if logger is None:
        return
    logger.log_metrics({k: v for k, v in metrics.items() if v is not None})
    if hasattr(logger, "log_table"):  # WandbLogger: one W&B table per evaluation
        for key, frame in tables.items():  # W&B tables take None for a missing value, not pandas' <NA>
            logger.log_table(key=key, dataframe=frame.astype(object).where(frame.notna(), None))


def finish(logger: Logger | None) -> None:
    if logger is None:
        return
    logger.finalize("success")
    if type(logger).__name__ == "WandbLogger":
        import wandb

        wandb.finish()


class PlainProgress(L.Callback):
    """One log line per epoch in batch jobs (no terminal), instead of progress bars."""

    def __init__(self, label: str):
        self.label = label

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:  # one line per epoch, not one per rank
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        text = " ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        steps = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        print(f"[{self.label}] epoch {trainer.current_epoch + 1}{epochs} step {trainer.global_step}{steps} {text}",
              flush=True)
