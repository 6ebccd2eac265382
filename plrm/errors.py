"""Every exception plrm raises for a problem a user can fix, in one low module that any layer may import.

All derive from :class:`PlrmError`; ``plrm`` (the CLI) prints any ``PlrmError`` as one line,
``plrm <verb>: error: <message>``, and exits with status 2, with no traceback. A plugin raises these (or a
subclass of ``PlrmError``) for the same clean error; anything else is a bug and shows its traceback.
Each class keeps the builtin base it always had (``ValueError``, ``LookupError``), so ``except ValueError``
written against earlier plrm versions still catches it.
"""

from __future__ import annotations


class PlrmError(Exception):
    """Base of the errors the CLI reports as one line (exit status 2)."""


class RecipeError(PlrmError, ValueError):
    """A recipe that cannot be used; the message lists every problem with its key path."""


class RegistryError(PlrmError, LookupError):
    """An unknown name, a clash, or a plugin that could not be loaded."""


class DataValidationError(PlrmError, ValueError):
    """Bad preference data; the message names column, row and user of each problem."""


class DataUnavailableError(DataValidationError):
    """The files cannot be obtained here (no local copy given and the Hub cannot be reached): nothing is wrong
    with the data itself. ``plrm bench`` lists such datasets as skipped rather than failed."""


class SplitError(PlrmError, ValueError):
    """A split that cannot be made or does not match the data."""


class BackboneError(PlrmError, ValueError):
    """A backbone that cannot be built (unknown alias, missing optional package, bad model directory)."""


class SessionError(PlrmError, ValueError):
    """An interactive (active-learning) session that cannot run as asked (budget, strategy, answers)."""


class TaxError(PlrmError, ValueError):
    """A run or dataset the personalization tax cannot be measured on."""


class ExportError(PlrmError, ValueError):
    """A run that cannot be exported as asked, or an export directory that cannot be read."""


class CheckpointError(PlrmError, ValueError):
    """A checkpoint that cannot be used: damaged, not written by plrm, holding objects plrm will not unpickle, or
    belonging to another run than the one that reads it. The message names the file and what to do."""


def refit_command(run_dir) -> str:
    """The command that fits a run again into its own directory, replacing it: the run's recipe.yaml with the
    directory spelled out (the recipe's own run.output_dir/run.name may name another place if the run was moved)."""
    import shlex
    from pathlib import Path

    run_dir = Path(run_dir)
    return (f"plrm fit --recipe {shlex.quote(str(run_dir / 'recipe.yaml'))} "
            f"run.output_dir={shlex.quote(str(run_dir.parent))} run.name={shlex.quote(run_dir.name)} "
            "run.overwrite=true")
