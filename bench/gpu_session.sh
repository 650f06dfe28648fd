#!/usr/bin/env bash
# Everything worth measuring on a lent GPU machine, in one call (device time is scarce: start it once).
# Usage (device tool, from the repo root):  bash bench/gpu_session.sh   — logs and JSON land in $OUT (or bench/out).
# Then copy the figures, with the card and the date, into bench/RESULTS.md.
set -uo pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2        # native module + fatbins for this card
# The GPU machines have torch/triton but not every dependency (no network there): files that import a missing
# one (the server's fastapi/openai, xgrammar) fail to collect; the rest must still run.
python -m pytest -m gpu -q --continue-on-collection-errors 2>&1 | tee "$OUT/pytest-gpu.log" | tail -5
python -m pytest -q --continue-on-collection-errors tests/engine tests/pacore 2>&1 | tee "$OUT/pytest-engine-gpu.log" | tail -3
python bench/rl.py --out "$OUT/rl-cuda.json" 2>&1 | tail -8                # engine rollouts + update on the GPU
python bench/kernels.py --sweep --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -40
for c in off on; do
  python bench/pacore.py --use-kernels on --cascade $c --out "pacore-cuda-cascade-$c" 2>&1 | tail -12
done
python bench/pacore.py --use-kernels off --out pacore-cuda-torchattn 2>&1 | tail -12
cp bench/out/pacore-*.json "$OUT/" 2>/dev/null || true
python bench/speculative.py --device cuda --repeats 3 2>&1 | tail -14     # n-gram speculation, plain vs drafts
python bench/images.py --device cuda 2>&1 | tail -8                          # encoder cache / image keys on the GPU
python bench/sleep.py --out "$OUT/sleep-cuda.json" 2>&1 | tail -8            # RL peak memory, engine asleep or not
cp bench/out/speculative-cuda.json bench/out/images-*.json "$OUT/" 2>/dev/null || true
