"""Registries of methods, datasets and backbones, with entry-point plugins.

Built-ins register with a decorator (``@methods.register("lore")``). Third-party packages declare entry
points in the groups ``plrm.methods``, ``plrm.datasets`` and ``plrm.backbones``; the entry-point name is
the registry key and its value points at the class. Plugins load lazily, each on its own: one that fails
to import is recorded (name, distribution, version, error) and shown by ``plrm list``; the rest keep
working. "Fails" includes ``SystemExit`` (a module that runs argparse or ``sys.exit`` when imported); only
``KeyboardInterrupt`` passes through. A plugin may not replace a built-in, nor another plugin, of the same
name. A fourth group, ``plrm.recipes``, names a folder of recipes; plrm.recipe reads it under the same rules.

Environment variables: ``PLRM_DISABLE_PLUGIN_AUTOLOAD=1`` loads no plugin; ``PLRM_PLUGINS=a,b`` loads only
the entry points named there.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from plrm.errors import RegistryError  # noqa: F401  (re-exported: plrm.errors defines every error class)

T = TypeVar("T")

BUILTIN = "plrm"




@dataclass(frozen=True)
class Origin:
    """Where a registry entry came from."""

    distribution: str
    version: str
    entry_point: str | None = None  # "module:attr" for plugins

    @property
    def is_builtin(self) -> bool:
        return self.distribution == BUILTIN

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


@dataclass(frozen=True)
class BrokenPlugin:
    name: str
    group: str
    origin: Origin
    error: str


def plrm_version() -> str:
    """The installed plrm's version (the origin of built-in entries)."""
    from plrm import __version__

    return __version__


def _origin_of_module(module: str) -> Origin:
    top = module.split(".")[0]
    if top in ("plrm", "", "__main__"):
        return Origin(BUILTIN, plrm_version())
    dists = md.packages_distributions().get(top, [])
    if not dists:
        return Origin(top, "?")
    return Origin(dists[0], md.version(dists[0]))


def entry_points(group: str) -> list[md.EntryPoint]:
    """The installed distributions' entry points of ``group`` (e.g. ``plrm.methods``)."""
    return list(md.entry_points(group=group))


PLUGIN_GROUPS = ("plrm.methods", "plrm.datasets", "plrm.backbones", "plrm.recipes")
_GROUP_KINDS = {"plrm.methods": "method", "plrm.datasets": "dataset", "plrm.backbones": "backbone",
                "plrm.recipes": "recipes"}
_said_unknown: set[tuple[str, Callable]] = set()  # (name, entry-point lookup) warned about already


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def autoload_disabled() -> bool:
    """``PLRM_DISABLE_PLUGIN_AUTOLOAD=1``: no plugin of any group is loaded."""
    return os.environ.get("PLRM_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")


def allowed_plugins() -> set[str]:
    """The entry-point names ``PLRM_PLUGINS=a,b`` restricts loading to, in every group (empty: no restriction)."""
    return {n.strip() for n in os.environ.get("PLRM_PLUGINS", "").split(",") if n.strip()}


def entry_point_origin(ep: md.EntryPoint) -> Origin:
    """The distribution (name, version) that declares entry point ``ep``, and its value."""
    dist = getattr(ep, "dist", None)
    return Origin(dist.metadata["Name"] if dist is not None else "unknown", dist.version if dist is not None else "?",
                  ep.value)


def closest(name: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


class PluginLoadError(Exception):
    """A plugin's entry point could not be loaded: ``cause`` is what its import raised (``SystemExit`` included),
    ``printed`` what it wrote to stdout/stderr while failing (argparse's usage line, say), kept out of plrm's
    output."""

    def __init__(self, cause: BaseException, printed: str = ""):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.printed = printed


class _HeldStream:
    """Stands in for sys.stdout/sys.stderr while a plugin imports: what is written is held back, and given to the
    real stream when the import succeeds (dropped when it fails: the error keeps it). Once released it writes
    straight through, so a logging handler that captured it during the import still reaches the terminal."""

    def __init__(self, real):
        self._real = real
        self._held: list[str] | None = []

    def write(self, text: str) -> int:
        if self._held is None:
            return self._real.write(text)
        self._held.append(text)
        return len(text)

    def flush(self) -> None:
        if self._held is None:
            self._real.flush()

    def release(self, show: bool) -> str:
        text, self._held = "".join(self._held or []), None
        if show and text:
            self._real.write(text)
        return text

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self._real, name)


def run_isolated(load: Callable[[], T]) -> T:
    """``load()`` (code of a plugin: importing it, reading its entry point), with every failure turned into
    :class:`PluginLoadError`: any exception, and ``SystemExit`` too (a module that parses the command line or
    calls ``sys.exit`` when imported would otherwise end plrm with a usage line that never names the plugin).
    Only ``KeyboardInterrupt`` (the user's Ctrl-C) passes through. What it prints is shown when it succeeds,
    kept for the error when it fails."""
    out, err = _HeldStream(sys.stdout), _HeldStream(sys.stderr)
    sys.stdout, sys.stderr = out, err
    try:
        return load()
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001  (SystemExit included, on purpose)
        printed = out.release(False) + err.release(False)
        raise PluginLoadError(exc, printed) from exc
    finally:
        if sys.stdout is out:
            sys.stdout = out._real
        if sys.stderr is err:
            sys.stderr = err._real
        out.release(True)  # what a successful (or interrupted) import printed; a no-op after a failure
        err.release(True)


def load_isolated(ep: md.EntryPoint) -> Any:
    """``ep.load()`` under :func:`run_isolated`: the entry point's object, or :class:`PluginLoadError`."""
    return run_isolated(ep.load)


def plugin_failure(exc: BaseException, origin: Origin, printed: str = "") -> str:
    """The one-line description of a plugin that failed to load, as ``plrm list`` shows it: what its import raised
    (and, for an exit, the last line it printed), then what to do."""
    if isinstance(exc, SystemExit):
        said = next((ln.strip() for ln in reversed(printed.splitlines()) if ln.strip()), "")
        what = f"raised SystemExit({exc.code!r}) at import" + (f" after printing {said!r}" if said else "")
        what += " (a plugin module must not exit or parse the command line when it is imported)"
    else:
        what = f"{type(exc).__name__}: {exc}"
    return f"{what} (fix or reinstall {origin.distribution}, or leave it out with PLRM_PLUGINS=<names to load>)"


class Registry(Generic[T]):
    """Name -> class, with a required base class, lazy plugin discovery and "did you mean"."""

    def __init__(self, kind: str, group: str, base: type | Callable[[], type] | None = None):
        self.kind = kind  # "method", "dataset", "backbone": used in messages
        self.group = group
        self._base = base
        self._entries: dict[str, T] = {}
        self._origins: dict[str, Origin] = {}
        self._broken: dict[str, BrokenPlugin] = {}
        self._announced: set[str] = set()  # broken plugins named by PLRM_PLUGINS, said on stderr when they failed
        self._plugins_loaded = False
        self._entry_points_fn = entry_points  # tests swap in fake entry points

    # -- registration -------------------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator for built-ins: ``@methods.register("lore")``. (Plugins use entry points; if a plugin module
        uses the decorator anyway, the entry is attributed to the plugin's distribution, not to plrm.)"""

        def decorator(obj: T) -> T:
            self._add(name, obj, _origin_of_module(getattr(obj, "__module__", "")))
            return obj

        return decorator

    def _base_class(self) -> type | None:
        base = self._base
        if base is not None and not isinstance(base, type):
            base = base()  # resolved lazily to avoid import cycles
        return base

    def _check(self, name: str, obj: Any) -> None:
        base = self._base_class()
        if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
            raise RegistryError(
                f"{self.kind} '{name}' must be a subclass of {base.__module__}.{base.__qualname__}, "
                f"got {obj!r}"
            )

    def _add(self, name: str, obj: T, origin: Origin) -> None:
        self._check(name, obj)
        if name in self._entries and self._entries[name] is not obj:
            raise RegistryError(
                f"{self.kind} '{name}' is already registered by {self._origins[name]}; "
                f"{origin} cannot register the same name"
            )
        self._entries[name] = obj
        self._origins[name] = origin

    # -- plugins ------------------------------------------------------------------------------------------
    def load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if autoload_disabled():
            return
        ensure_builtins(self.kind)  # its built-ins first, so a plugin can never take a built-in's name
        allow = allowed_plugins()
        entry_points = self._entry_points_fn(self.group)
        if allow:
            self._say_unknown_allowed(allow, entry_points)
        for ep in entry_points:
            if allow and ep.name not in allow:
                continue
            origin = entry_point_origin(ep)
            if ep.name in self._entries and not self._entries_from(ep.name, origin):
                existing = self._origins[ep.name]
                what = "a built-in" if existing.is_builtin else f"the one from {existing}"
                self._broken[ep.name] = BrokenPlugin(
                    ep.name, self.group, origin,
                    f"name clash: {self.kind} '{ep.name}' would replace {what}; rename the entry point",
                )
                continue  # checked before import: a clashing plugin's code never runs
            try:
                obj = load_isolated(ep)
            except PluginLoadError as exc:  # a plugin's import error must never break plrm
                self._broken[ep.name] = BrokenPlugin(ep.name, self.group, origin, plugin_failure(exc.cause, origin,
                                                                                                  exc.printed))
                if allow:  # asked for by name: say at once that it is not there, and why
                    self.announce_failure(ep.name)
                continue
            if self._entries.get(ep.name) is obj:  # the plugin also used the decorator: same object
                self._origins[ep.name] = origin
                continue
            try:
                self._add(ep.name, obj, origin)
            except RegistryError as exc:
                self._broken[ep.name] = BrokenPlugin(ep.name, self.group, origin, str(exc))

    def announce_failure(self, name: str) -> None:
        """Say on stderr that plugin ``name``, which ``PLRM_PLUGINS`` asks for, failed to load, and why."""
        b = self._broken[name]
        print(f"plrm: PLRM_PLUGINS names '{name}', a {self.kind} plugin of {b.origin}, which failed to load: "
              f"{b.error}", file=sys.stderr)
        self._announced.add(name)

    def announced(self) -> set[str]:
        """The broken plugins whose failure :meth:`announce_failure` said (plrm.catalog replays it)."""
        return set(self._announced)

    def say_unknown_allowed(self, allow: set[str]) -> None:
        """Warn about each name of ``PLRM_PLUGINS`` that is no installed entry point (see below)."""
        self._say_unknown_allowed(allow, list(self._entry_points_fn(self.group)))

    def _say_unknown_allowed(self, allow: set[str], entry_points: list) -> None:
        """Warn (once per name and view of the installed plugins, not once per registry) about each name of
        ``PLRM_PLUGINS`` that is no entry point of any plugin group. A name of another group's entry point (a
        recipes folder, say) is no typo; a distribution's name is answered with its entry points' names."""
        by_group = {group: list(entry_points) if group == self.group else list(self._entry_points_fn(group))
                    for group in dict.fromkeys((self.group, *PLUGIN_GROUPS))}
        known = {ep.name for eps in by_group.values() for ep in eps}
        for name in sorted(allow - known):
            key = (name, self._entry_points_fn)
            if key in _said_unknown:
                continue
            _said_unknown.add(key)
            of_dist = sorted({ep.name for eps in by_group.values() for ep in eps
                              if _normalized(entry_point_origin(ep).distribution) == _normalized(name)})
            if of_dist:
                text = (f"PLRM_PLUGINS names '{name}', which is a distribution, not an entry point; name its entry "
                        f"points instead: {', '.join(of_dist)}")
            else:
                others = [_GROUP_KINDS.get(g, g) for g in PLUGIN_GROUPS if _GROUP_KINDS.get(g, g) != self.kind]
                text = (f"PLRM_PLUGINS names '{name}', but no installed {self.kind} plugin has that name (nor does "
                        f"any {', '.join(others[:-1])} or {others[-1]} plugin; see `plrm list`)")
            print(f"plrm: {text}", file=sys.stderr)

    def _entries_from(self, name: str, origin: Origin) -> bool:
        """Whether the entry ``name`` was registered (by decorator) from ``origin``'s own distribution."""
        return self._origins[name].distribution == origin.distribution

    # -- lookup -------------------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        self.load_plugins()
        if name in self._entries:
            return self._entries[name]
        if name in self._broken:
            b = self._broken[name]
            raise RegistryError(f"{self.kind} '{name}' comes from plugin {b.origin}, which failed to load: {b.error}")
        hint = closest(name, self.names())
        did_you_mean = f" Did you mean '{hint}'?" if hint else ""
        raise RegistryError(
            f"unknown {self.kind} '{name}'.{did_you_mean} Available: {', '.join(self.names()) or '(none)'}"
        )

    def origin(self, name: str) -> Origin:
        self.get(name)
        return self._origins[name]

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def broken(self) -> list[BrokenPlugin]:
        self.load_plugins()
        return list(self._broken.values())

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]


def _method_base() -> type:
    from plrm.methods.base import PersonalizedRewardModel

    return PersonalizedRewardModel


def _dataset_base() -> type:
    from plrm.data.source import DatasetSource

    return DatasetSource


def _backbone_base() -> type:
    from plrm.backbones.base import Backbone

    return Backbone


methods: Registry = Registry("method", "plrm.methods", _method_base)
datasets: Registry = Registry("dataset", "plrm.datasets", _dataset_base)
backbones: Registry = Registry("backbone", "plrm.backbones", _backbone_base)
REGISTRIES = {"methods": methods, "datasets": datasets, "backbones": backbones}


def forget_plugins() -> None:
    """Drop every plugin entry and broken-plugin record of the registries, so the next lookup reads the installed
    entry points again (tests that install a plugin mid-process; built-ins stay). Clear importlib.metadata's
    path caches too (``importlib.invalidate_caches()``) when the files on sys.path changed."""
    for reg in REGISTRIES.values():
        for name in [n for n, o in reg._origins.items() if not o.is_builtin]:
            del reg._entries[name], reg._origins[name]
        reg._broken.clear()
        reg._announced.clear()
        reg._plugins_loaded = False
    _said_unknown.clear()


def ensure_builtins(*kinds: str) -> None:
    """Import the built-in modules so their decorators run: those of the registries of ``kinds`` ("method",
    "dataset", "backbone"), all of them by default. The datasets' need neither torch nor Lightning."""
    if not kinds or "backbone" in kinds:
        import plrm.backbones  # noqa: F401
    if not kinds or "dataset" in kinds:
        import plrm.data  # noqa: F401
    if not kinds or "method" in kinds:
        import plrm.methods  # noqa: F401


def plugin_provenance(used: dict[str, list[str]]) -> list[dict[str, str]]:
    """Which non-built-in entries (and versions) a run used, for results.json."""
    out = []
    for reg_name, names in used.items():
        reg = REGISTRIES[reg_name]
        for n in names:
            o = reg.origin(n)
            if not o.is_builtin:
                out.append({"registry": reg_name, "name": n, "distribution": o.distribution,
                            "version": o.version, "entry_point": o.entry_point or ""})
    return out
