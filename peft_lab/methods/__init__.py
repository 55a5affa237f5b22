"""The method registry: one module per method, or one YAML per generic PEFT method, found by name.

Adding a method means adding ``peft_lab/methods/<name>.py`` (with ``NAME``, a ``Config``
dataclass and a ``Method`` class) and ``conf/method/<name>.yaml``; nothing else changes.
A method that PEFT implements needs only the YAML: a ``conf/method/<name>.yaml`` whose
defaults list ``base_generic`` names a PEFT method and its config (``peft_lab/methods/generic.py``)
and is served by the generic module's ``Method``. Module top levels import only dataclasses
and config schemas, so listing methods stays as cheap as composing a config.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path
from types import ModuleType

_NOT_METHODS = {"base"}
GENERIC = "generic"  # the module serving every YAML built on its schema (``base_generic``)
METHOD_CONF = Path(__file__).resolve().parents[2] / "conf" / "method"


@cache
def _modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_METHODS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.NAME] = module
    return found


@cache
def generic_names() -> tuple[str, ...]:
    """Methods that are one YAML on the generic schema: ``conf/method/*.yaml`` whose defaults list
    ``base_generic`` (each named by its ``name`` key, else its file name)."""
    import yaml

    found = []
    for path in sorted(METHOD_CONF.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and f"base_{GENERIC}" in (doc.get("defaults") or []):
            found.append(str(doc.get("name") or path.stem))
    return tuple(found)


def names() -> list[str]:
    return sorted({*(n for n in _modules() if n != GENERIC), *generic_names()})


def method_schemas() -> dict[str, type]:
    """Each module's schema by its name (stored as ``method/base_<name>``; ``base_generic`` for generic methods)."""
    return {name: module.Config for name, module in _modules().items()}


def get_method_class(name: str):
    from peft_lab.errors import fail

    if name in generic_names():
        return _modules()[GENERIC].Method
    if name != GENERIC and name in _modules():
        return _modules()[name].Method
    raise fail(f"unknown method '{name}'", f"use one of {names()}")
