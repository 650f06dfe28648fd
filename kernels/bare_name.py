"""A folder of this repository imported under its bare name. Run from the repository root, `kernels/` and `pacore/`
are importable as the top-level `kernels` and `pacore` too — names that other distributions own (PyPI's `kernels`,
which transformers imports; the official PaCoRe package). A folder imported that way hands the import on to the
other distribution, or fails as if the name were absent. Lives here because kernels/ imports nothing of step3vl
and pacore/ may import kernels/.
"""

from __future__ import annotations


def hand_on(name: str, package_file: str, ours: str, theirs: str) -> None:
    """Replace sys.modules[name] (the folder, mid-import) by the other distribution's package of that name."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    repo = Path(package_file).resolve().parents[1]
    spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if Path(p or ".").resolve() != repo])
    sys.modules.pop(f"{name}.bare_name", None)  # this helper, when the folder imported it relatively
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ImportError(f"No module named {name!r} (the repository's {name}/ folder is {ours}'s source, not "
                          f"{theirs})", name=name)
    real = importlib.util.module_from_spec(spec)
    sys.modules[name] = real
    spec.loader.exec_module(real)
