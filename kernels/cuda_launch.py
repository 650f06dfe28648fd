"""Load the CUDA kernels of csrc/cuda and launch them with cuda-python's driver API on torch's current stream.

A module's binary comes from, in order:
  1. `<package>/_cubin/<name>.fatbin`, built by nvcc at install time (sm_80 + sm_90a);
  2. NVRTC at first use, for the current device's arch, from the `.cu` source found in `<package>/_csrc/`
     (copies shipped as package data) or `<repo>/csrc/cuda/` (editable installs and source checkouts);
     the result is cached on disk under `$STEP3VL_CACHE_DIR` or `~/.cache/step3vl`, in `cuda/<hash>.cubin`.
The fatbin is skipped, and NVRTC takes over, when the driver cannot load it (a GPU it has no code for) or when
the repo's sources are newer than it (an editable install whose kernels were edited since the build).
cuda-python is imported lazily, so the CPU paths of the callers never need it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
FATBIN_DIR = PACKAGE_DIR / "_cubin"
SOURCE_DIRS = (PACKAGE_DIR / "_csrc", PACKAGE_DIR.parent / "csrc" / "cuda")
NVRTC_OPTIONS = ("-std=c++17", "-default-device")


class CudaError(RuntimeError):
    """A CUDA driver or NVRTC call failed."""


def _check(result: Any, what: str) -> Any:
    """Unwrap cuda-python's (status, *values) tuples, raising CudaError on failure."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise CudaError(f"{what} failed: {status!r}")
    return values[0] if len(values) == 1 else tuple(values) or None


# ---------------------------------------------------------------- sources and NVRTC (no GPU needed)

def find_source(name: str) -> Path:
    """The `<name>.cu` file, from the shipped copies or the repo's csrc/cuda."""
    for folder in SOURCE_DIRS:
        if (folder / f"{name}.cu").is_file():
            return folder / f"{name}.cu"
    looked = ", ".join(str(d) for d in SOURCE_DIRS)
    raise FileNotFoundError(f"CUDA source {name}.cu not found (looked in {looked})")


def find_fatbin(name: str) -> Path | None:
    """The install-time fatbin, unless the repo's sources changed after it was built (editable installs)."""
    path = FATBIN_DIR / f"{name}.fatbin"
    if not path.is_file():
        return None
    repo = SOURCE_DIRS[-1]
    sources = [repo / f"{name}.cu", *repo.glob("*.h")] if (repo / f"{name}.cu").is_file() else []
    if any(src.stat().st_mtime > path.stat().st_mtime for src in sources):
        return None  # stale: NVRTC compiles the current source instead
    return path


def cache_dir() -> Path:
    root = os.environ.get("STEP3VL_CACHE_DIR") or Path.home() / ".cache" / "step3vl"
    return Path(root) / "cuda"


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    return _check(nvrtc.nvrtcVersion(), "nvrtcVersion")


def nvrtc_target(capability: tuple[int, int]) -> str:
    """`sm_XY` for a device NVRTC knows; otherwise PTX (`compute_XY`) for the newest arch it knows below it."""
    from cuda.bindings import nvrtc

    want = capability[0] * 10 + capability[1]
    known = _check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    if want in known:
        return f"sm_{want}"
    older = [a for a in known if a < want]
    if not older:
        raise CudaError(f"NVRTC {nvrtc_version()} cannot target compute capability {capability}")
    return f"compute_{max(older)}"


def _source_digest(source: Path, target: str) -> str:
    h = hashlib.sha256()
    for part in (source.name, target, repr(nvrtc_version()), repr(NVRTC_OPTIONS)):
        h.update(part.encode() + b"\0")
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def nvrtc_compile(source: Path, target: str) -> bytes:
    """Compile one .cu with NVRTC: `sm_XY` gives a cubin, `compute_XY` gives PTX (NUL-terminated)."""
    from cuda.bindings import nvrtc

    prog = _check(nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture={target}".encode(), f"-I{source.parent}".encode(),
                   *(o.encode() for o in NVRTC_OPTIONS)]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if int(status) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            _check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise CudaError(f"NVRTC failed to compile {source} for {target}:\n{log.decode(errors='replace')}")
        kind = "CUBIN" if target.startswith("sm_") else "PTX"
        size = _check(getattr(nvrtc, f"nvrtcGet{kind}Size")(prog), f"nvrtcGet{kind}Size")
        image = b" " * size
        _check(getattr(nvrtc, f"nvrtcGet{kind}")(prog, image), f"nvrtcGet{kind}")
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cached_nvrtc_image(name: str, capability: tuple[int, int]) -> tuple[bytes, Path]:
    """NVRTC image of `name` for a device, from the disk cache or compiled now and stored (atomically)."""
    source = find_source(name)
    target = nvrtc_target(capability)
    suffix = "cubin" if target.startswith("sm_") else "ptx"
    path = cache_dir() / f"{_source_digest(source, target)}.{suffix}"
    if path.is_file():
        return path.read_bytes(), path
    image = nvrtc_compile(source, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(image)
    tmp.replace(path)
    return image, path


# ---------------------------------------------------------------- driver side (GPU only)

@functools.cache
def _primary_context(device_index: int) -> Any:
    """torch's (primary) context of a device, retained once for the life of the process."""
    from cuda.bindings import driver

    torch.cuda.init()
    _check(driver.cuInit(0), "cuInit")
    return _check(driver.cuDevicePrimaryCtxRetain(_check(driver.cuDeviceGet(device_index), "cuDeviceGet")),
                  "cuDevicePrimaryCtxRetain")


def ensure_context(device_index: int) -> None:
    """Make the device's primary context current on this thread (a thread torch never used has none)."""
    from cuda.bindings import driver

    ctx = _primary_context(device_index)
    if int(_check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")) != int(ctx):
        _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class CudaModule:
    """A module loaded on one device, with its functions looked up once; `origin` names the binary used."""

    def __init__(self, image: bytes, device_index: int, origin: str):
        from cuda.bindings import driver

        ensure_context(device_index)
        self.handle = _check(driver.cuModuleLoadData(image), f"cuModuleLoadData({origin})")
        self.device_index = device_index
        self.origin = origin
        self._functions: dict[str, Any] = {}

    def function(self, name: str) -> Any:
        from cuda.bindings import driver

        if name not in self._functions:
            self._functions[name] = _check(driver.cuModuleGetFunction(self.handle, name.encode()),
                                           f"cuModuleGetFunction({name}) in {self.origin}")
        return self._functions[name]


@functools.cache
def load_module(name: str, device_index: int) -> CudaModule:
    """The module `name` on a device (cached per process): the install-time fatbin, else NVRTC's cubin."""
    fatbin = find_fatbin(name)
    if fatbin is not None:
        try:
            return CudaModule(fatbin.read_bytes(), device_index, f"fatbin:{fatbin}")
        except CudaError:
            pass  # no code for this GPU in the fatbin: compile for it below
    image, path = cached_nvrtc_image(name, torch.cuda.get_device_capability(device_index))
    return CudaModule(image, device_index, f"nvrtc:{path}")


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def i32(x: int) -> ctypes.c_int32:
    return ctypes.c_int32(int(x))


def i64(x: int) -> ctypes.c_int64:
    return ctypes.c_int64(int(x))


def f32(x: float) -> ctypes.c_float:
    return ctypes.c_float(float(x))


def launch(module: CudaModule, function: str, grid: Sequence[int], block: Sequence[int],
           args: Sequence[ctypes._SimpleCData], shared_mem: int = 0) -> None:
    """Launch `function` on torch's current stream of the module's device. `args` are ctypes values in the
    kernel's parameter order (ptr / i32 / i64 / f32)."""
    from cuda.bindings import driver

    gx, gy, gz = (*grid, 1, 1)[:3]
    bx, by, bz = (*block, 1, 1)[:3]
    if min(gx, gy, gz) <= 0:
        return
    ensure_context(module.device_index)
    params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
    stream = torch.cuda.current_stream(module.device_index).cuda_stream
    _check(driver.cuLaunchKernel(module.function(function), gx, gy, gz, bx, by, bz, shared_mem,
                                 driver.CUstream(stream), ctypes.addressof(params), 0),
           f"cuLaunchKernel({function})")
