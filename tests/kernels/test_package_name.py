"""The repository's kernels/ folder is step3vl_kernels' source; from the repository root it must not shadow the
PyPI package `kernels` (transformers imports it), and step3vl_kernels must still import."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_top_level_kernels_from_the_repo_root_is_the_pypi_package_or_absent():
    r = _run("import kernels; print(kernels.__file__)")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert r.returncode != 0 and "No module named 'kernels'" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().parent != ROOT / "kernels"


def test_step3vl_kernels_imports_from_the_repo_root():
    r = _run("import step3vl_kernels.sampling_ref as s; print(s.__name__)")
    assert r.returncode == 0 and r.stdout.strip() == "step3vl_kernels.sampling_ref", r.stderr
