"""The method registry: one module per method, found by name.

Adding a method means adding ``peft_lab/methods/<name>.py`` (with ``NAME``, a
``Config`` dataclass and a ``Method`` class) and ``conf/method/<name>.yaml``;
nothing else changes. Module top levels import only dataclasses and config
schemas, so listing methods stays as cheap as composing a config.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

_NOT_METHODS = {"base"}


@cache
def _modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_METHODS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.NAME] = module
    return found


def names() -> list[str]:
    return sorted(_modules())


def method_schemas() -> dict[str, type]:
    return {name: module.Config for name, module in _modules().items()}


def get_method_class(name: str):
    from peft_lab.errors import fail

    try:
        return _modules()[name].Method
    except KeyError:
        raise fail(f"unknown method '{name}'", f"use one of {names()}") from None
