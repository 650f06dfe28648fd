"""Build: Python packages step3vl, step3vl_pacore (the pacore/ folder) and step3vl_kernels (the kernels/ folder),
the native module step3vl_native through CMake + Ninja, and, when nvcc is found, the CUDA fatbins of
csrc/cuda/*.cu.

Metadata and dependencies live in pyproject.toml. Set STEP3VL_SKIP_CUDA=1 to skip the fatbins.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Import names: every one starts with step3vl, so none clashes with another distribution (the PyPI names
# `kernels` and `pacore` belong to other projects; the official PaCoRe package installs a top-level `pacore`).
# import name -> source folder
FOLDERS = {"step3vl_pacore": "pacore", "step3vl_kernels": "kernels"}


def _tool(name: str, module: str, attr: str) -> str:
    """A build tool from PATH, else from its pip package (cmake / ninja wheels)."""
    path = shutil.which(name)
    if path:
        return path
    try:
        mod = __import__(module)
        candidate = Path(getattr(mod, attr)) / name
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise RuntimeError(f"building step3vl_native needs `{name}` (pip install {module})")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja; the .so lands where setuptools expects it."""

    def run(self):
        # setuptools clears `inplace` while building and copies afterwards, so remember it now.
        self._into_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        cmake, ninja = _tool("cmake", "cmake", "CMAKE_BIN_DIR"), _tool("ninja", "ninja", "BIN_DIR")
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # Editable installs import step3vl_kernels from the source folder, so the fatbins go there.
        if self._into_source:
            cubin_dir = ROOT / "kernels" / "_cubin"
        else:
            cubin_dir = Path(self.build_lib).resolve() / "step3vl_kernels" / "_cubin"
        build_dir = Path(self.build_temp).resolve() / "cmake"
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DSTEP3VL_NATIVE_OUTPUT_DIR={ext_path.parent}",
            f"-DSTEP3VL_CUBIN_DIR={cubin_dir}",
            f"-DSTEP3VL_BUILD_CUDA={'OFF' if os.environ.get('STEP3VL_SKIP_CUDA') == '1' else 'ON'}",
        ]
        self._fresh_build_dir(build_dir, [cmake, ninja, sys.executable, pybind11.get_cmake_dir()])
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir)], check=True)
        if not ext_path.exists():
            raise RuntimeError(f"CMake did not produce {ext_path}")
        if not self._into_source:
            # Ship the CUDA sources so NVRTC can compile them at first use where nvcc was absent at build.
            csrc_dir = Path(self.build_lib).resolve() / "step3vl_kernels" / "_csrc"
            csrc_dir.mkdir(parents=True, exist_ok=True)
            for src in (ROOT / "csrc" / "cuda").glob("*.[ch]*"):
                shutil.copy2(src, csrc_dir / src.name)

    @staticmethod
    def _fresh_build_dir(build_dir: Path, fingerprint: list[str]) -> None:
        # Isolated builds use throw-away tool paths; a cache pointing at deleted tools cannot be reused.
        stamp = build_dir / "step3vl-fingerprint.txt"
        text = "\n".join(fingerprint)
        if build_dir.exists() and (not stamp.exists() or stamp.read_text() != text):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(text)


def _packages() -> list[str]:
    found = find_packages(include=["step3vl", "step3vl.*"])
    for name, folder in FOLDERS.items():
        found += [name] + [f"{name}.{p}" for p in find_packages(folder)]
    return found


PACKAGES = _packages()
# shapes_demo/: the demo's trained checkpoint (bf16 safetensors, tokenizer, config, model card, plots)
STEP3VL_DATA = ["*.jinja", "*.json", "*.png", "*.jpg", "shapes_demo/*"]

setup(
    packages=PACKAGES,
    package_dir=FOLDERS,
    package_data={p: STEP3VL_DATA for p in PACKAGES if p.split(".")[0] == "step3vl"},
    ext_modules=[CMakeExtension("step3vl_native")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
