"""The CUDA sources build: nvcc for sm_80 and sm_90a (when nvcc is here), the headers as plain C++, and NVRTC
(which needs no GPU) with every entry point the Python side launches. Loading needs a GPU: tests/gpu."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from step3vl_kernels import cuda_launch as cl
from step3vl_kernels.paged_decode_cuda import GROUP_CHUNKS, HEAD_DIMS

ROOT = Path(__file__).resolve().parents[2]
CU_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CU_DIR.glob("*.cu"))
HEADERS = sorted(CU_DIR.glob("*.h"))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.is_file() else shutil.which("nvcc")


def _nvrtc_available() -> bool:
    try:
        cl.nvrtc_version()
        return True
    except Exception:  # cuda-python or libnvrtc missing
        return False


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
needs_nvrtc = pytest.mark.skipif(not _nvrtc_available(), reason="cuda-python NVRTC not available")

ENTRY_POINTS = {
    "block_copy": [f"block_copy_w{w}" for w in (16, 8, 4, 2, 1)],
    "compaction": ["compact_messages"],
    "paged_decode": [f"paged_decode_{dt}_d{d}_g{g}" for dt in ("f16", "bf16") for d in HEAD_DIMS
                     for g in GROUP_CHUNKS] + ["paged_decode_merge_f16", "paged_decode_merge_bf16"],
}


def test_every_source_has_its_entry_points_listed():
    assert sorted(p.stem for p in SOURCES) == sorted(ENTRY_POINTS)


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_builds_sm80_and_sm90a(source, tmp_path):
    out = tmp_path / f"{source.stem}.fatbin"
    cmd = [_nvcc(), "-fatbin", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
           "-std=c++17", "--threads", "2", "-I", str(ROOT / "csrc"), str(source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
@pytest.mark.parametrize("header", HEADERS, ids=lambda p: p.name)
def test_headers_compile_as_plain_cpp(header, tmp_path):
    unit = tmp_path / "unit.cpp"
    unit.write_text(f'#include "cuda/{header.name}"\n#include "cuda/{header.name}"\n')  # twice: include guard
    proc = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
                           f"-I{ROOT / 'csrc'}", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_nvrtc
@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_nvrtc_ptx_has_every_entry_point(name):
    ptx = cl.nvrtc_compile(cl.find_source(name), "compute_80").decode()
    for fn in ENTRY_POINTS[name]:
        assert f".entry {fn}(" in ptx, fn


@needs_nvrtc
def test_nvrtc_cubin_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("STEP3VL_CACHE_DIR", str(tmp_path))
    image, path = cl.cached_nvrtc_image("block_copy", (9, 0))
    assert path.parent == tmp_path / "cuda" and path.suffix == ".cubin" and path.read_bytes() == image
    assert image[:4] == b"\x7fELF"  # a cubin is an ELF image

    def no_compile(*args):
        raise AssertionError("recompiled although cached")

    monkeypatch.setattr(cl, "nvrtc_compile", no_compile)
    assert cl.cached_nvrtc_image("block_copy", (9, 0)) == (image, path)


@needs_nvrtc
def test_nvrtc_target_falls_back_to_ptx_for_unknown_archs():
    assert cl.nvrtc_target((8, 0)) == "sm_80"
    assert cl.nvrtc_target((9, 0)) == "sm_90"
    assert cl.nvrtc_target((99, 9)).startswith("compute_")


def test_sources_and_fatbins_are_found(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no_such_kernel.cu"):
        cl.find_source("no_such_kernel")
    assert cl.find_source("block_copy").read_bytes() == (CU_DIR / "block_copy.cu").read_bytes()
    # a fatbin older than the repo's sources is stale and skipped (NVRTC compiles the current source)
    monkeypatch.setattr(cl, "FATBIN_DIR", tmp_path)
    assert cl.find_fatbin("block_copy") is None
    fatbin = tmp_path / "block_copy.fatbin"
    fatbin.write_bytes(b"x")
    newest = max(p.stat().st_mtime for p in [*HEADERS, CU_DIR / "block_copy.cu"])
    os.utime(fatbin, (newest + 10, newest + 10))
    assert cl.find_fatbin("block_copy") == fatbin
    os.utime(fatbin, (newest - 10, newest - 10))
    assert cl.find_fatbin("block_copy") is None
