"""The registries as data, cached on disk: what ``plrm list``, ``plrm recipes show|keys``, ``plrm fit
--print-config`` and recipe errors need, without importing torch or Lightning.

Every method subclasses Lightning's LightningModule, so reading a method's options means importing Lightning
(torchmetrics, torch._dynamo: seconds). The catalog describes each registered method, dataset and backbone --
origin, docstring, capabilities, and every option of its ``Config`` (type, default, help, bounds, input path,
:class:`~plrm.config.Forbid` rules) -- as JSON, and rebuilds from it stand-in classes whose ``Config`` is a
dataclass with the same fields, so that plrm.recipe validates a recipe against them with the same code and the
same messages. A Config with code of its own (a ``check()`` method or ``__post_init__``, which a plugin may
have) cannot be described: its stand-in raises :class:`NeedsImport` where that code would run, and the caller
validates again with the real classes.

The file lives in ``$PLRM_CACHE/catalog`` (default ``~/.cache/plrm/catalog``), named by a
hash of everything the registries depend on: plrm's version and source files, the Python interpreter, the
installed distributions (the folders on ``sys.path``), every plugin entry point and its package's source files,
and ``PLRM_PLUGINS`` / ``PLRM_DISABLE_PLUGIN_AUTOLOAD``. A change to any of them names another file, which the
first command then builds by importing everything (seconds, once). ``PLRM_CATALOG=off`` turns the cache off; a
cache folder that cannot be written only costs the speed. (No library does this for a plugin registry: written
here.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from plrm import registry
from plrm.config import Forbid, Not, bounds_of, default_of, forbidden, help_of, is_path, opt, type_hints
from plrm.registry import BrokenPlugin, Origin, Registry

FORMAT = 1  # bump when the file's layout changes
KEEP = 8  # catalog files kept in the cache folder (other keys: other environments, older sources)
CLASS_ATTRIBUTES = ("needs", "provides", "adapts_new_users", "licence", "homepage")  # what `plrm list` shows


class NeedsImport(Exception):
    """A check of a recipe section needs the real class: its Config has code of its own (``check()`` or
    ``__post_init__``) that the catalog cannot run. Validate again with the real registry ``registry``
    ("methods", "datasets" or "backbones"): :func:`registries` takes it with ``real=``."""

    def __init__(self, message: str, registry: str) -> None:
        super().__init__(message)
        self.registry = registry


class Uncacheable(Exception):
    """A registry entry that the catalog cannot describe exactly (an option type or default JSON cannot hold)."""


# ---- where, and under which name ------------------------------------------------------------------------------
def cache_dir() -> Path | None:
    """The folder of catalog files, ``$PLRM_CACHE/catalog`` (default ``~/.cache/plrm/catalog``, beside plrm's
    model and feature caches), or None when ``PLRM_CATALOG=off`` (or 0, false, no)."""
    if os.environ.get("PLRM_CATALOG", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return Path(os.environ.get("PLRM_CACHE", "~/.cache/plrm")).expanduser() / "catalog"


def _stat_tree(h: Any, root: Path) -> None:
    """Feed every .py file under ``root`` (or ``root`` itself) to ``h``: relative path, mtime, size."""
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{st.st_mtime_ns}:{st.st_size};".encode())


def _module_root(module: str) -> Path | None:
    """The file or folder of top-level package ``module``, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin and os.path.exists(spec.origin) else None


def key(package_dir: Path | None = None) -> str:
    """The hash that names the catalog of this environment (see the module docstring for what it covers)."""
    h = hashlib.sha256(f"format {FORMAT}; plrm {registry.plrm_version()}; {sys.version}; {sys.prefix};".encode())
    for var in ("PLRM_PLUGINS", "PLRM_DISABLE_PLUGIN_AUTOLOAD"):
        h.update(f"{var}={os.environ.get(var, '')};".encode())
    _stat_tree(h, package_dir or Path(__file__).resolve().parent)
    for entry in sys.path[1:]:  # installing or removing a distribution changes its folder's mtime; sys.path[0] is
        if not os.path.isdir(entry):  # the script's folder or the working directory, not where pip installs
            continue
        h.update(f"{entry}:{os.stat(entry).st_mtime_ns};".encode())
    tops: set[str] = set()
    for group in registry.PLUGIN_GROUPS:
        for ep in registry.entry_points(group):
            origin = registry.entry_point_origin(ep)
            h.update(f"{group}:{ep.name}={ep.value}@{origin.distribution}=={origin.version};".encode())
            tops.add(ep.value.split(":")[0].strip().split(".")[0])
    for top in sorted(tops):  # an editable plugin's sources change without a new version
        root = _module_root(top)
        h.update(f"plugin {top}:".encode())
        if root is not None:
            _stat_tree(h, root)
    return h.hexdigest()[:24]


# ---- option types as JSON -------------------------------------------------------------------------------------
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "Any": Any}


def encode_type(tp: Any) -> Any:
    """An option's annotation as JSON: "int", {"list": ...}, {"union": [...]}, {"literal": [...]}, ...; raises
    Uncacheable for anything plrm.config.check_value would check with isinstance on some other class."""
    for name, scalar in _SCALARS.items():
        if tp is scalar:
            return name
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if not all(_exact_json(a) for a in args):
            raise Uncacheable(f"Literal of {args!r}")
        return {"literal": list(args)}
    if origin in (Union, types.UnionType):
        return {"union": [encode_type(a) for a in args]}
    if origin is list or tp is list:  # a bare ``list`` is kept bare (null), as type_name shows it
        return {"list": encode_type(args[0]) if args else None}
    if origin is dict or tp is dict:
        return {"dict": [encode_type(a) for a in args] if args else None}
    raise Uncacheable(f"option type {tp!r}")


def decode_type(data: Any) -> Any:
    if isinstance(data, str):
        return _SCALARS[data]
    (kind, value), = data.items()
    if kind == "literal":
        return Literal[tuple(value)]
    if kind == "union":
        return Union[tuple(decode_type(v) for v in value)]
    if kind == "list":
        return list if value is None else list[decode_type(value)]
    if kind == "dict":
        return dict if value is None else dict[decode_type(value[0]), decode_type(value[1])]
    raise ValueError(f"unknown type {data!r}")


def _exact_json(value: Any) -> bool:
    """Whether ``value`` comes back from JSON equal and of the same types (no tuples, sets, non-str keys)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(map(_exact_json, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _exact_json(v) for k, v in value.items())
    return False


def _json_value(value: Any, what: str) -> Any:
    if not _exact_json(value):
        raise Uncacheable(f"{what} {value!r} does not survive JSON")
    return value


def _encode_match(value: Any) -> dict:
    if isinstance(value, Not):
        return {"not": [_json_value(v, "Forbid value") for v in value.values]}
    if isinstance(value, tuple):
        return {"any": [_json_value(v, "Forbid value") for v in value]}
    return {"is": _json_value(value, "Forbid value")}


def _decode_match(data: dict) -> Any:
    (kind, value), = data.items()
    return Not(*value) if kind == "not" else tuple(value) if kind == "any" else value


# ---- Config classes as JSON -----------------------------------------------------------------------------------
def _own_code(cls: type) -> list[str]:
    """The methods of Config ``cls`` the catalog cannot run: ``check`` and ``__post_init__`` if it has them."""
    return [name for name in ("check", "__post_init__") if callable(getattr(cls, name, None))]


def describe_config(cls: type) -> dict:
    """Config dataclass ``cls`` as JSON: every field (type, default, help, bounds, path), its Forbid rules, and
    which code of its own it has."""
    if not dataclasses.is_dataclass(cls):
        raise Uncacheable(f"{cls!r} is not a dataclass")
    hints = type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            raise Uncacheable(f"{cls.__qualname__}.{f.name} is not an __init__ argument")
        default = default_of(f)
        bounds = bounds_of(f)
        fields.append({
            "name": f.name, "type": encode_type(hints[f.name]), "help": help_of(f), "path": is_path(f),
            "required": default is dataclasses.MISSING,
            "default": None if default is dataclasses.MISSING else _json_value(default, f"default of {f.name}"),
            "bounds": None if bounds is None else {
                k: (_json_value(list(v), f"bounds of {f.name}") if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(bounds).items()},
        })
    rules = [{"when": {k: _encode_match(v) for k, v in rule.when.items()}, "message": rule.message}
             for rule in forbidden(cls)]
    return {"name": cls.__name__, "qualname": cls.__qualname__, "module": cls.__module__, "doc": cls.__doc__,
            "fields": fields, "forbid": rules, "code": _own_code(cls)}


def _needs_import(qualname: str, code: list[str], registry_name: str):
    def check(self: Any) -> list[str]:
        raise NeedsImport(f"{qualname} has {' and '.join(code)}: validate with the real class", registry_name)

    return check


def config_from(desc: dict, registry_name: str) -> type:
    """A dataclass with the options ``desc`` (from :func:`describe_config`) describes: the same field names,
    types, defaults, help, bounds and Forbid rules, in the same order."""
    fields = []
    for fd in desc["fields"]:
        b = fd["bounds"] or {}
        bounds = {k: tuple(v) if k in ("choices", "also") and v is not None else v for k, v in b.items()}
        f = opt(dataclasses.MISSING if fd["required"] else fd["default"], fd["help"], path=fd["path"], **bounds)
        fields.append((fd["name"], decode_type(fd["type"]), f))
    namespace: dict[str, Any] = {
        "forbid": tuple(Forbid({k: _decode_match(v) for k, v in r["when"].items()}, r["message"])
                        for r in desc["forbid"]),
        "__module__": desc["module"], "__doc__": desc["doc"]}
    if desc["code"]:
        namespace["check"] = _needs_import(desc["qualname"], desc["code"], registry_name)
    cls = dataclasses.make_dataclass(desc["name"], fields, namespace=namespace, kw_only=True)
    cls.__qualname__ = desc["qualname"]
    return cls


# ---- registries as JSON ---------------------------------------------------------------------------------------
def _attribute(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return {"set": sorted(value)}
    return _json_value(value, "class attribute")


def describe(registries: dict[str, Registry]) -> dict:
    """Every entry (and broken plugin) of ``registries`` as JSON."""
    out: dict[str, Any] = {"format": FORMAT, "registries": {}}
    for reg_name, reg in registries.items():
        entries = []
        for name, cls in reg.items():
            origin = reg.origin(name)
            entries.append({
                "name": name, "origin": [origin.distribution, origin.version, origin.entry_point],
                "class": {"name": cls.__name__, "qualname": cls.__qualname__, "module": cls.__module__,
                          "doc": cls.__doc__},
                "attributes": {a: _attribute(getattr(cls, a)) for a in CLASS_ATTRIBUTES if hasattr(cls, a)},
                "config": describe_config(cls.Config),
            })
        announced = reg.announced()
        broken = [{"name": b.name, "group": b.group, "error": b.error, "announced": b.name in announced,
                   "origin": [b.origin.distribution, b.origin.version, b.origin.entry_point]} for b in reg.broken()]
        out["registries"][reg_name] = {"kind": reg.kind, "group": reg.group, "entries": entries, "broken": broken}
    return out


class CatalogRegistry(Registry):
    """A registry filled from a catalog: stand-in classes (docstring, capabilities, ``Config``), origins and
    broken plugins as the real registry had them. Its first lookup says on stderr what loading the plugins said
    (``PLRM_PLUGINS`` naming no plugin, or one that failed)."""

    def __init__(self, kind: str, group: str) -> None:
        super().__init__(kind, group, None)
        self._plugins_loaded = True
        self._replayed = False
        self._announced_names: set[str] = set()  # the broken plugins the real registry announced

    def load_plugins(self) -> None:
        if self._replayed:
            return
        self._replayed = True
        allow = registry.allowed_plugins()
        if registry.autoload_disabled() or not allow:
            return
        self.say_unknown_allowed(allow)
        for name in sorted(self._announced_names):
            self.announce_failure(name)


def _stand_in(entry: dict, registry_name: str) -> type:
    c = entry["class"]
    attributes = {a: frozenset(v["set"]) if isinstance(v, dict) and set(v) == {"set"} else v
                  for a, v in entry["attributes"].items()}
    cls = type(c["name"], (), {"__doc__": c["doc"], "__module__": c["module"], "catalog_stand_in": True,
                               "Config": config_from(entry["config"], registry_name), **attributes})
    cls.__qualname__ = c["qualname"]
    return cls


def registries_from(data: dict) -> dict[str, Registry]:
    """Registries rebuilt from :func:`describe`'s JSON."""
    if data.get("format") != FORMAT:
        raise ValueError(f"catalog format {data.get('format')!r}, expected {FORMAT}")
    out: dict[str, Registry] = {}
    for reg_name, reg_data in data["registries"].items():
        reg = CatalogRegistry(reg_data["kind"], reg_data["group"])
        for e in reg_data["entries"]:
            reg._entries[e["name"]] = _stand_in(e, reg_name)
            reg._origins[e["name"]] = Origin(*e["origin"])
        for b in reg_data["broken"]:
            reg._broken[b["name"]] = BrokenPlugin(b["name"], b["group"], Origin(*b["origin"]), b["error"])
        reg._announced_names = {b["name"] for b in reg_data["broken"] if b["announced"]}
        out[reg_name] = reg
    return out


# ---- the registries a command uses ----------------------------------------------------------------------------
def real_registries(names: tuple[str, ...] | set[str] | None = None) -> dict[str, Registry]:
    """plrm's registries ``names`` (default all) with their built-ins imported and every plugin loaded (what a
    catalog describes)."""
    names = tuple(registry.REGISTRIES) if names is None else tuple(names)
    registry.ensure_builtins(*(registry.REGISTRIES[n].kind for n in names))
    for n in names:
        registry.REGISTRIES[n].load_plugins()
    return {n: registry.REGISTRIES[n] for n in names}


def _write(path: Path, data: dict) -> None:
    """Write the catalog atomically (a temporary file, then a rename) and keep the KEEP newest catalogs."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        old = sorted(path.parent.glob("catalog-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]
        for p in old:
            p.unlink(missing_ok=True)
    except OSError:  # a read-only or full disk costs the speed only
        pass


def registries(real: set[str] | tuple[str, ...] = ()) -> dict[str, Registry]:
    """The registries for a command that trains nothing: from this environment's catalog when there is one (but
    the real registries named in ``real``: those a :class:`NeedsImport` named), else the real ones (importing
    every built-in and plugin), after writing the catalog for the next command."""
    folder = cache_dir()
    if folder is None:
        return real_registries()
    path = folder / f"catalog-{key()}.json"
    try:
        found = registries_from(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: build it again
        pass
    else:
        return {**found, **real_registries(real)} if real else found
    real = real_registries()
    try:
        data = describe(real)
    except Uncacheable:  # a plugin whose options JSON cannot hold: every command imports it
        return real
    _write(path, data)
    return real


def checked(validate: Any) -> Any:
    """``validate(registries)`` (a recipe check) against the catalog, again with a real registry each time the
    catalog cannot run a check (:class:`NeedsImport`): the answer of the real classes, importing no more of them
    than it needs."""
    real: set[str] = set()
    while True:
        try:
            return validate(registries(real))
        except NeedsImport as exc:
            if exc.registry in real:  # cannot happen: a real registry's classes are the real ones
                raise
            real.add(exc.registry)
