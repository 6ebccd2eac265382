"""Typed option declarations shared by the recipe schema, methods, datasets and backbones.

Every option is declared once, as a dataclass field made with :func:`opt`, carrying its default, its help
text and, optionally, the values it accepts (a range, a set of choices, "not empty") and whether it names an
input file. Recipe validation, ``plrm recipes keys`` and the docs all read them from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin


@dataclass(frozen=True)
class Bounds:
    """The values an option accepts beyond its type, declared with :func:`opt`.

    Numbers are checked against ``min`` / ``max`` (inclusive) and ``gt`` / ``lt`` (exclusive); a value in
    ``also`` is accepted outside that range (``also=(-1,)``: -1 means "no limit"). Strings are checked against
    ``choices``. A list is checked item by item against all of these, must not be empty with ``nonempty`` (a
    string with ``nonempty`` must not be "") and must not repeat an item with ``unique``. ``None`` (an option that
    may be null) is never out of range.
    """

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    nonempty: bool = False
    unique: bool = False
    also: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.min is not None and self.gt is not None:
            raise TypeError("opt(): give min (inclusive) or gt (exclusive), not both")
        if self.max is not None and self.lt is not None:
            raise TypeError("opt(): give max (inclusive) or lt (exclusive), not both")

    @property
    def has_range(self) -> bool:
        return any(b is not None for b in (self.min, self.max, self.gt, self.lt))

    def range_text(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)', '-1 or >= 1', "one of 'a', 'b'" (empty when nothing is declared)."""
        low = (f"[{self.min}" if self.min is not None else f"({self.gt}" if self.gt is not None else None)
        high = (f"{self.max}]" if self.max is not None else f"{self.lt})" if self.lt is not None else None)
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = (">= " if low[0] == "[" else "> ") + low[1:]
        elif high:
            text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
        else:
            text = ""
        if self.choices is not None:
            text = " or ".join(filter(None, [text, "one of " + ", ".join(repr(c) for c in self.choices)]))
        if text and self.also:
            text = " or ".join([*(repr(a) for a in self.also), text])
        return text

    def describe(self, is_list: bool = False) -> str:
        """The whole constraint in words, as ``plrm recipes keys`` shows it beside the type."""
        text = self.range_text()
        if is_list:
            return ", ".join(filter(None, ["not empty" if self.nonempty else "", "no repeats" if self.unique else "",
                                           f"each {text}" if text else ""]))
        return ", ".join(filter(None, ["not empty" if self.nonempty else "", text]))

    def _item_problem(self, value: Any) -> str | None:
        if value is None or value in self.also:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                  and (self.gt is None or value > self.gt) and (self.lt is None or value < self.lt))
            if not ok or (self.choices is not None and not self.has_range and value not in self.choices):
                return f"must be {self.range_text()}, got {value!r}"
        elif isinstance(value, str):
            if self.choices is not None and value not in self.choices:
                return f"must be {self.range_text()}, got {value!r}"
        return None

    def problems(self, value: Any) -> list[tuple[str, str]]:
        """(where, what) for each way ``value`` breaks these bounds: where is "" for the value itself or "[i]" for
        item i of a list; what reads "must be >= 1, got 0". Empty when the value is fine."""
        if isinstance(value, (list, tuple)):
            if self.nonempty and not value:
                return [("", "must not be empty")]
            found = [(f"[{i}]", p) for i, v in enumerate(value) if (p := self._item_problem(v))]
            if self.unique and not found:
                repeated = sorted({repr(v) for i, v in enumerate(value) if v in value[:i]})
                if repeated:
                    found.append(("", f"must not repeat an item, got {', '.join(repeated)} more than once"))
            return found
        if self.nonempty and value == "":
            return [("", "must not be empty")]
        p = self._item_problem(value)
        return [("", p)] if p else []


def opt(default: Any = MISSING, help: str = "", *,  # noqa: A002 - "help" is the natural name
        min: float | None = None, max: float | None = None,  # noqa: A002 - the natural names of the bounds
        gt: float | None = None, lt: float | None = None, choices: tuple | list | None = None,
        nonempty: bool = False, unique: bool = False, also: tuple = (), path: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with help text, and the values it accepts beyond its type (see :class:`Bounds`).

    ``min`` / ``max``: inclusive bounds of a number; ``gt`` / ``lt``: exclusive ones; ``also``: values accepted
    outside that range (``opt(-1, ..., min=1, also=(-1,))``: -1 or >= 1); ``choices``: the strings accepted;
    ``nonempty``: a list (or string) that must not be empty. On a list option the bounds and choices apply to
    each item; ``unique``: a list that must not repeat an item. ``path=True`` marks an option that names an input
    file or folder (a string or a list of them): a
    relative path written in a recipe file is taken relative to that file's folder. Recipe validation reports a
    value out of bounds with its key path, e.g. ``methods.lore.rank: must be >= 1, got 0``. Mutable defaults
    (lists) are copied per instance.
    """
    bounds = Bounds(min=min, max=max, gt=gt, lt=lt, choices=None if choices is None else tuple(choices),
                    nonempty=nonempty, unique=unique, also=tuple(also))
    metadata: dict[str, Any] = {"help": help}
    if bounds != Bounds():
        metadata["bounds"] = bounds
    if path:
        metadata["path"] = True
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


class Not:
    """In a :class:`Forbid` condition: any value but these (``Not("none")``: the option is not "none")."""

    def __init__(self, *values: Any) -> None:
        self.values = values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Not) and other.values == self.values

    def __repr__(self) -> str:
        return f"Not({', '.join(map(repr, self.values))})"


@dataclass(frozen=True)
class Forbid:
    """A combination of option values a Config refuses, declared as data (so that ``plrm recipes keys`` shows it
    and plrm.catalog can check it without importing the class's module)::

        @dataclass
        class Config(MethodConfig):
            ...
            forbid = (Forbid({"basis": "none", "meta_learning": False},
                             "basis: none with meta_learning: false would train a whole MLP per user"),)

    ``when`` maps option names to a value, a tuple of values (any of them) or :class:`Not` (any value but
    these); the rule applies when every option matches. ``message`` starts with an option's name, like a
    ``check()`` message: recipe validation reports it as ``methods.mrm.basis: none with ...``. A Config's rules are
    those of its class and of every base class (``forbid`` is not a dataclass field: no annotation)."""

    when: dict[str, Any]
    message: str

    def matches(self, config: Any) -> bool:
        for name, wanted in self.when.items():
            value = getattr(config, name)
            if isinstance(wanted, Not):
                if value in wanted.values:
                    return False
            elif isinstance(wanted, tuple):
                if value not in wanted:
                    return False
            elif value != wanted:
                return False
        return True


def forbidden(cls: type) -> list[Forbid]:
    """The :class:`Forbid` rules of Config class ``cls``: its own and its bases', base classes first."""
    return [rule for k in reversed(cls.__mro__) for rule in vars(k).get("forbid", ())]


def bounds_of(f: dataclasses.Field) -> Bounds | None:
    """The values option ``f`` accepts beyond its type, or None when :func:`opt` declared none."""
    return f.metadata.get("bounds")


def is_path(f: dataclasses.Field) -> bool:
    """Whether option ``f`` names an input file or folder (``opt(..., path=True)``)."""
    return bool(f.metadata.get("path", False))


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list[{type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the annotation ``tp``; returns (ok, coerced value). Ints are accepted as floats."""
    if tp is Any:
        return True, value
    origin = get_origin(tp)
    if origin is Literal:
        return (value in get_args(tp)), value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            ok, v = check_value(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (inner,) = get_args(tp) or (Any,)
        out = []
        for v in value:
            ok, cv = check_value(v, inner)
            if not ok:
                return False, value
            out.append(cv)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


class Configured:
    """Base of registry entries built from their typed options: ``cls(cls.Config(...))`` (datasets, backbones)."""

    provides: ClassVar[frozenset[str]] = frozenset()  # capability strings, plrm.capabilities

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any) -> None:
        self.config = config
