"""The native CPU kernels against what the engine would otherwise run, same run, same inputs (wall clock,
median of N; `torch.get_num_threads()` threads on both sides).

    python bench/cpu_kernels.py [--runs 30] [--out NAME_OR_PATH]

- linear: the `small` preset's 43 decode linears (6 layers x q/k/v/o/gate/up/down + LM head) at 1 / 16 / 64
  rows: fp32 F.linear (MKL) vs the packed kernel with bf16-exact weights (AVX-512 FMAs; AMX tiles where the CPU
  has them);
- decode attention: 16 samples over a shared 1024-token prompt + 128 own tokens each (12 q / 4 kv heads x 64,
  block 16, blocks scattered over a large pool): the engine's PyTorch path vs the C++ cascade kernel;
- sampling: 16 x 8192 logits, temperature 1: the PyTorch reference vs the native-hash sampler (same tokens);
- RMSNorm [16, 768]: the PyTorch formula vs the native call.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_seconds, print_table, write_json  # noqa: E402

import step3vl_native  # noqa: E402
from step3vl.engine.attention import CpuPagedAttention, DecodeGroup, StepMetadata, TorchPagedAttention  # noqa: E402
from step3vl.engine.kv_cache import KVCache  # noqa: E402
from step3vl_kernels import decoder_ops_cpu, sampling_cpu, sampling_ref  # noqa: E402
from step3vl_kernels.linear_cpu import linear_packed, pack_weight  # noqa: E402

SMALL_LINEARS = [(768, 768), (256, 768), (256, 768), (768, 768), (2048, 768), (2048, 768), (768, 2048)] * 6 + [(8192, 768)]


def _row(name: str, base_name: str, base_s: float, ours_name: str, ours_s: float) -> dict:
    return dict(case=name, baseline=base_name, baseline_ms=base_s * 1e3, ours=ours_name, ours_ms=ours_s * 1e3,
                speedup=base_s / ours_s)


def bench_linear(runs: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) * 0.02).bfloat16().float() for n, k in SMALL_LINEARS]
    avx = [pack_weight(w, torch.bfloat16) for w in weights]
    amx = [pack_weight(w, torch.bfloat16, amx=True) for w in weights] if step3vl_native.cpu_has_amx() else None
    rows = []
    for m in (1, 16, 64):
        xs = {k: torch.randn(m, k, generator=g) for k in (768, 2048)}
        base, _ = median_seconds(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], runs, warmup=3)
        ours, _ = median_seconds(lambda: [linear_packed(xs[w.shape[1]], p, w.shape[0]) for w, p in zip(weights, avx)],
                                 runs, warmup=3)
        rows.append(_row(f"43 linears, {m} rows", "F.linear fp32 (MKL)", base, "packed bf16 weights, AVX-512", ours))
        if amx is not None:
            t, _ = median_seconds(lambda: [linear_packed(xs[w.shape[1]], p, w.shape[0]) for w, p in zip(weights, amx)],
                                  runs, warmup=3)
            rows.append(_row(f"43 linears, {m} rows", "F.linear fp32 (MKL)", base, "packed bf16 weights, AMX x3", t))
    return rows


def bench_attention(runs: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows_, hq, hkv, d, bs, prefix, suffix = 16, 12, 4, 64, 16, 1024, 128
    pool = 20000
    k = torch.randn(pool, bs, hkv, d, generator=g)
    v = torch.randn(pool, bs, hkv, d, generator=g)
    perm = torch.randperm(pool, generator=g).tolist()
    pb = prefix // bs
    sb = -(-(suffix + 1) // bs)
    meta = StepMetadata(block_size=bs, slot_mapping=torch.zeros(0, dtype=torch.int64), num_decode=rows_)
    meta.groups = [DecodeGroup(rows=list(range(rows_)), prefix_blocks=perm[:pb])]
    meta.suffix_tables = [perm[pb + i * sb: pb + (i + 1) * sb] for i in range(rows_)]
    meta.suffix_lens = [suffix] * rows_
    kv = KVCache([k], [v], bs)
    q = torch.randn(rows_, hq, d, generator=g)
    torch_path, native = TorchPagedAttention(kv, meta), CpuPagedAttention(kv, meta)
    base, _ = median_seconds(lambda: torch_path._decode(q, k, v, d ** -0.5), runs, warmup=3)
    ours, _ = median_seconds(lambda: native._decode(q, k, v, d ** -0.5), runs, warmup=3)
    err = (torch_path._decode(q, k, v, d ** -0.5) - native._decode(q, k, v, d ** -0.5)).abs().max().item()
    print(f"decode attention: max |torch - native| = {err:.2e}")
    return [_row("decode attention, 16 x (1024 shared + 128 own), 1 layer", "engine PyTorch path", base,
                 "C++ cascade kernel", ours)]


def bench_sampling(runs: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    b, vocab = 16, 8192
    logits = torch.randn(b, vocab, generator=g)
    ones = torch.ones(b)
    args = (logits, ones, torch.zeros(b, dtype=torch.int32), ones, 0 * ones, torch.arange(b) * 7 + 1,
            torch.arange(b), torch.full((b,), 5))
    assert torch.equal(sampling_ref.sample(*args), sampling_cpu.sample(*args))
    base, _ = median_seconds(lambda: sampling_ref.sample(*args), runs, warmup=3)
    ours, _ = median_seconds(lambda: sampling_cpu.sample(*args), runs, warmup=3)
    return [_row("sampling 16 x 8192 (same tokens)", "PyTorch reference", base, "native hashes", ours)]


def bench_norm(runs: int) -> list[dict]:
    x, w = torch.randn(16, 768), torch.randn(768)
    base, _ = median_seconds(lambda: decoder_ops_cpu.rms_norm_ref(x, w, 1e-6), runs * 10, warmup=10)
    ours, _ = median_seconds(lambda: decoder_ops_cpu.rms_norm(x, w, 1e-6), runs * 10, warmup=10)
    return [_row("RMSNorm [16, 768]", "PyTorch ops", base, "one native call", ours)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="cpu_kernels")
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}, AVX-512 {step3vl_native.cpu_has_avx512()}, "
          f"AMX {step3vl_native.cpu_has_amx()}")
    rows = bench_linear(args.runs) + bench_attention(args.runs) + bench_sampling(args.runs) + bench_norm(args.runs)
    print_table(rows, ["case", "baseline", "baseline_ms", "ours", "ours_ms", "speedup"])
    path = write_json(args.out, dict(rows=rows, threads=torch.get_num_threads(), environment=environment()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
