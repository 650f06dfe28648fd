import os

import torch

# The Triton interpreter must be chosen before any @triton.jit function runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
