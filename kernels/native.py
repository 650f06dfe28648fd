"""The one entry into the native module `step3vl_native` (csrc/, built by pybind11 with `pip install`): the CPU
kernels beside this file and the engine (its block pool, the CPU decoder) all take the module from here, so a
missing or stale build fails in one place, with one message that says how to build it.

The import is deferred to the first call: importing the kernels or the engine never requires the build, only
using a native path does.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def native() -> ModuleType:
    """The compiled module (Python's import cache makes repeated calls cheap)."""
    try:
        import step3vl_native
    except ImportError as e:
        raise ImportError(
            f"step3vl_native, step3vl's compiled module (csrc/), cannot be imported ({e}): build it with "
            "`pip install -e .` in the repository (CMake, Ninja and a C++17 compiler are needed)") from e
    return step3vl_native


def cpu_has_avx512() -> bool:
    return bool(native().cpu_has_avx512())


def cpu_has_amx() -> bool:
    return bool(native().cpu_has_amx())


def block_manager(num_blocks: int, block_size: int) -> Any:
    """The engine's KV block pool (ref counts, prefix hashing, LRU of freed cached blocks)."""
    return native().BlockManager(num_blocks, block_size)
