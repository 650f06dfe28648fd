"""A CPU install has neither triton nor xgrammar (they are the `cuda` and `structured` extras): the engine runs
without them and imports neither, and each feature that needs one says which extra to install.

The packages are hidden from a subprocess by an import hook (this environment has both: the interpreter tests
of the Triton kernels and the structured-output tests need them), which is what a CPU install looks like to the
code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# None in sys.modules: `import triton` raises ModuleNotFoundError and importlib.util.find_spec gives None, as
# when the package is absent
HIDE = """
import sys

sys.modules["triton"] = sys.modules["xgrammar"] = None
"""

RUN = HIDE + """
import pytest
from step3vl.engine.llm import LLM
from step3vl.engine.sampling_params import SamplingParams
from step3vl.engine.structured_outputs import StructuredOutputs
from step3vl_kernels import triton_available

assert not triton_available()
llm = LLM(sys.argv[1], kv_cache_memory="8MiB")
out = llm.generate(["hello"], SamplingParams(max_tokens=4, seed=0), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 4
with pytest.raises(ValueError, match=r"structured outputs need xgrammar.*pip install 'step3vl\\[structured\\]'"):
    llm.generate(["hello"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputs(choice=("a", "b"))),
                 use_tqdm=False)
with pytest.raises(ValueError, match=r"use_kernels=True needs Triton.*pip install 'step3vl\\[cuda\\]'"):
    LLM(sys.argv[1], kv_cache_memory="8MiB", use_kernels=True)
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("triton", "xgrammar"))
assert not loaded, loaded
print("ok")
"""


def test_the_engine_runs_without_triton_and_xgrammar(tiny_ckpt):
    out = subprocess.run([sys.executable, "-c", RUN, str(tiny_ckpt)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_triton_and_xgrammar_are_extras_not_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in reqs}
    assert not names(project["dependencies"]) & {"triton", "xgrammar"}
    extras = project["optional-dependencies"]
    assert "triton" in names(extras["cuda"]) and "xgrammar" in names(extras["structured"])
    assert {"triton", "xgrammar"} <= names(extras["test"])  # the interpreter and structured-output tests
