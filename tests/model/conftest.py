"""Shared fixtures for the model tests: one generated tiny checkpoint per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The `tiny` preset in the official on-disk format (2 shards + index). Treat as read-only."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), preset="tiny", seed=0, shards=2)
