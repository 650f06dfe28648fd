import pytest
import torch


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the kernels allocate (outputs, split partials, rotated K) starts as NaN / -1, so an element
    a kernel forgets to write fails the comparison instead of passing by luck."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", nan_empty)
