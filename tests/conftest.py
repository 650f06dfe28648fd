import os

import pytest
import torch

# The Triton interpreter must be chosen before any @triton.jit function runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For suites of tiny shapes (their conftests make it autouse): a second OpenMP thread only adds spin-wait,
    which on a loaded 2-core machine makes every op orders of magnitude slower. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
