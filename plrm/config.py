"""Typed option declarations shared by the recipe schema, methods, datasets and backbones.

Every option is declared once, as a dataclass field made with :func:`opt`, carrying its default and its
help text. Recipe validation, ``plrm recipes keys`` and the docs all read them from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin


def opt(default: Any = MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002 - "help" is the natural name
    """A dataclass field with help text. Mutable defaults (lists) are copied per instance."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


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
