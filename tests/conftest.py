import os
import sys
from pathlib import Path

import pytest
import torch

# The Triton interpreter must be chosen before any @triton.jit function runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the repository root on sys.path, where the kernels/ folder (installed as
# step3vl_kernels) would shadow the PyPI package `kernels` that transformers >= 5.25 imports. Our packages are
# installed (editable in CI), so the root is not needed on the path.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


@pytest.fixture(scope="module")
def one_torch_thread():
    """For suites of tiny shapes (their conftests make it autouse): a second OpenMP thread only adds spin-wait,
    which on a loaded 2-core machine makes every op orders of magnitude slower. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
