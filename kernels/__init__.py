"""Kernels: Triton kernels and the Python side of the CUDA ones, each beside its PyTorch reference.

Installed as `step3vl_kernels`. Run from the repository root, this folder would also be importable as the top-level
`kernels`, the name of a PyPI package that transformers imports; imported under that name, it hands the import on
to the real package (or fails as if `kernels` were absent).
"""

if __name__ == "kernels":
    from .bare_name import hand_on

    hand_on("kernels", __file__, "step3vl_kernels", "the PyPI package")


def triton_available() -> bool:
    """Whether Triton is installed (the `cuda` extra): the GPU kernels need it, the CPU paths never import it."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None
