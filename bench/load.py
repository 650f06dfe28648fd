"""Peak RSS while loading the `small` preset, as a multiple of the checkpoint's bytes (target ≤ 1.2× in bf16).

    python bench/load.py [--ckpt DIR] [--dtypes bf16,fp32]

Each measurement runs in a fresh subprocess: it imports torch and step3vl first, records VmRSS, resets the
kernel's peak-RSS mark (/proc/self/clear_refs, falling back to ru_maxrss when that is not allowed), loads,
and reports VmHWM − RSS-before. mmap'ed file pages count in RSS, so the figure includes them.

Rows: `cold` is the honest figure (a fresh process: everything load_model pulls in counts, including any
library torch imports lazily on first use); `warm` pre-imports torch._dynamo before the baseline, which
isolates the loader's own footprint (torch's meta-device decompositions import it, ~150 MB, on first use);
`naive` (safetensors.load_file of every shard + a normally built module + load_state_dict) is for context.
The verdict uses the cold bf16 row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import checkpoint_bytes, environment, print_table, small_checkpoint, write_json

TARGET = 1.2
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(ckpt: str, dtype_name: str, method: str) -> None:
    import torch

    from step3vl.loader import load_model

    if method == "warm":
        import torch._dynamo  # noqa: F401  (a one-time library cost, kept out of the warm figure)

    dtype = getattr(torch, dtype_name)
    before = _status_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    model = _naive_load(ckpt, dtype) if method == "naive" else load_model(ckpt, dtype=dtype)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    after = _status_kib("VmRSS")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"before_kib": before, "peak_kib": peak, "after_kib": after, "peak_reset": reset,
                      "seconds": seconds, "model_bytes": model_bytes,
                      "dynamo_imported": "torch._dynamo" in sys.modules}))


def _naive_load(ckpt: str, dtype):
    from safetensors.torch import load_file

    from step3vl.config import Step3VLConfig
    from step3vl.model.vlm import Step3VLForCausalLM

    state = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        state.update(load_file(f))
    model = Step3VLForCausalLM(Step3VLConfig.from_pretrained(ckpt)).to(dtype)
    model.load_state_dict(state)
    return model


def measure(ckpt: Path, dtype: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(ckpt), "--dtype", DTYPES[dtype], "--method", method]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    ckpt_b = checkpoint_bytes(ckpt)
    delta = (r["peak_kib"] - r["before_kib"]) * 1024
    return {"method": method, "dtype": dtype, "ckpt_MB": ckpt_b / 1e6, "model_MB": r["model_bytes"] / 1e6,
            "peak_delta_MB": delta / 1e6, "peak/ckpt": delta / ckpt_b, "peak/model": delta / r["model_bytes"],
            "retained_MB": (r["after_kib"] - r["before_kib"]) * 1024 / 1e6, "load_s": r["seconds"],
            "peak_reset": r["peak_reset"], "dynamo": r["dynamo_imported"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint directory (default: bench/out/ckpt-small, generated once)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--no-baseline", action="store_true", help="skip the naive load_file baseline")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="cold", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dtype, args.method)
    ckpt = small_checkpoint(args.ckpt)
    methods = ["cold", "warm"] + ([] if args.no_baseline else ["naive"])
    rows = [measure(ckpt, d, m) for d in args.dtypes.split(",") for m in methods]
    print(f"checkpoint {ckpt} ({checkpoint_bytes(ckpt) / 1e6:.1f} MB, bf16 on disk)")
    print_table(rows, ["method", "dtype", "ckpt_MB", "model_MB", "peak_delta_MB", "peak/ckpt", "peak/model",
                       "retained_MB", "load_s", "dynamo"])
    ours_bf16 = [r for r in rows if r["method"] == "cold" and r["dtype"] == "bf16"]
    verdict = None
    if ours_bf16:
        verdict = ours_bf16[0]["peak/ckpt"] <= TARGET
        ratio = ours_bf16[0]["peak/ckpt"]
        print(f"cold bf16 peak/ckpt = {ratio:.3f} (target ≤ {TARGET}): {'PASS' if verdict else 'FAIL'}")
    path = write_json("load", {"checkpoint": str(ckpt), "target_peak_over_ckpt": TARGET, "pass": verdict,
                               "rows": rows, "env": environment()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
