"""step3vl's decoder forward vs transformers' Qwen3ForCausalLM on the same weights and shapes, on the CPU.

    python bench/model_forward.py [--ckpt DIR] [--batch 4] [--tokens 256] [--runs 7] [--dtypes fp32,bf16]

Weights: the `small` preset's decoder (generated once under bench/out/ckpt-small), loaded into step3vl with
load_model and into HF via a Qwen3Config built from text_config and the same state dict. Shape: a prefill of
`batch` prompts × `tokens` tokens, full logits; step3vl runs them packed (DenseAttention), HF as a [batch,
tokens] batch with use_cache=False (neither keeps a KV cache). Runs alternate between the two models; the
median of `runs` timed runs after a warm-up is reported, with ratio = step3vl / HF (target ≤ 1: not slower);
min_ratio (fastest run vs fastest run) is printed too, as it is steadier on a shared, busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from _common import environment, print_table, small_checkpoint, write_json
from step3vl.loader import load_model
from step3vl.model import DenseAttention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_from(model) -> Qwen3ForCausalLM:
    t = model.cfg.text
    cfg = Qwen3Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                      num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                      max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=t.tie_word_embeddings)
    cfg._attn_implementation = "sdpa"
    hf = Qwen3ForCausalLM(cfg).to(model.dtype)  # random init, overwritten next (not timed)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))}
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def bench(ckpt, dtype_name: str, batch: int, tokens: int, runs: int) -> dict:
    dtype = DTYPES[dtype_name]
    ours = load_model(ckpt, dtype=dtype)
    hf = hf_from(ours)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.cfg.text.vocab_size, (batch, tokens), generator=g)
    packed, positions = ids.flatten(), torch.arange(tokens).repeat(batch)
    attention = DenseAttention([tokens] * batch)

    def run_ours():
        return ours.compute_logits(ours(packed, positions, attention))

    def run_hf():
        return hf(input_ids=ids, use_cache=False).logits

    with torch.inference_mode():
        a, b = run_ours().float(), run_hf().float().flatten(0, 1)  # warm-up, and a correctness check
        max_diff, scale = (a - b).abs().max().item(), b.abs().max().item()
        t_ours, t_hf = [], []
        for _ in range(runs):  # alternate, so drift on a shared machine hits both alike
            for fn, out in ((run_ours, t_ours), (run_hf, t_hf)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    return {"dtype": dtype_name, "shape": f"{batch}x{tokens}", "step3vl_ms": 1e3 * m_ours, "hf_ms": 1e3 * m_hf,
            "ratio": m_ours / m_hf, "min_ratio": min(t_ours) / min(t_hf),
            "tok_per_s": batch * tokens / m_ours, "hf_tok_per_s": batch * tokens / m_hf,
            "max_abs_diff": max_diff, "max_abs_logit": scale,
            "step3vl_runs_ms": [1e3 * t for t in t_ours], "hf_runs_ms": [1e3 * t for t in t_hf]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint directory (default: bench/out/ckpt-small, generated once)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    ckpt = small_checkpoint(args.ckpt)
    rows = [bench(ckpt, d, args.batch, args.tokens, args.runs) for d in args.dtypes.split(",")]
    print(f"decoder prefill, {args.batch} prompts × {args.tokens} tokens, full logits, median of {args.runs} "
          f"({torch.get_num_threads()} threads)")
    print_table(rows, ["dtype", "shape", "step3vl_ms", "hf_ms", "ratio", "min_ratio", "tok_per_s", "max_abs_diff",
                       "max_abs_logit"])
    path = write_json("model_forward", {"checkpoint": str(ckpt), "rows": rows, "env": environment(),
                                        "args": vars(args)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
