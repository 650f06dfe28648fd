"""Kernels: Triton kernels and the Python side of the CUDA ones, each beside its PyTorch reference.

Installed as `step3vl_kernels`. Run from the repository root, this folder would also be importable as the top-level
`kernels`, the name of a PyPI package that transformers imports; imported under that name, it hands the import on
to the real package (or fails as if `kernels` were absent).
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _repo = Path(__file__).resolve().parents[1]
    _path = [p for p in sys.path if Path(p or ".").resolve() != _repo]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del sys.modules["kernels"]
        raise ImportError("No module named 'kernels' (the repository's kernels/ folder is step3vl_kernels' source, "
                          "not the PyPI package)", name="kernels")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)


def triton_available() -> bool:
    """Whether Triton is installed (the `cuda` extra): the GPU kernels need it, the CPU paths never import it."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None
