"""Package attributes imported on first use (PEP 562), so that importing a light submodule of a package, or the
package to list what it offers, does not import everything the package exports."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of the package whose globals are `namespace`: `exports` maps each public name to the
    module that defines it; the value is imported once and cached in the namespace."""
    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value
    return __getattr__
