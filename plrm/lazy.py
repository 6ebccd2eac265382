"""Modules imported at their first use.

``plrm list`` and recipe checks import the dataset modules (plrm.catalog, for their options' own checks) but read
no data; pandas alone is half of their import time. A module-level ``pd = lazy_module("pandas")`` imports pandas
when ``pd.<name>`` is first read. (importlib.util.LazyLoader does the same by putting a half-loaded module in
sys.modules for every importer; this proxy changes nothing outside the module that holds it.)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name``: the first attribute read imports it, and every read is the module's."""

    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name
        self.__dict__["_module"] = None

    def _load(self) -> ModuleType:
        if self._module is None:
            self.__dict__["_module"] = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{'' if self._module is None else ' (imported)'}>"


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when an attribute is first read (typed Any: use it as the
    module)."""
    return LazyModule(name)
