"""Pure-decode steps on the CPU in one native call for the whole decoder stack (csrc/cpu_decoder.cpp).

At decode batch sizes the module path spends as much time dispatching small ops from Python (norms, rotary,
residual adds, KV writes, a dozen module calls per layer) as computing them. When the engine runs the native
CPU decoder (cpu_modules: packed linears, native norms) over an fp32 KV cache, a step with no prefill chunks
goes through decode_stack instead: the same arithmetic, layer by layer, with no Python in between. Steps with
prefill chunks keep the module path.
"""

from __future__ import annotations

import torch

from step3vl.engine.cpu_modules import NativeRMSNorm, PackedLinear
from step3vl.engine.kv_cache import KVCache
from step3vl_kernels.linear_cpu import weight_layout
from step3vl_kernels.native import native


def _linears(layer) -> list:
    """A decoder layer's linears in the order of the native layer table (cpu_decoder.h)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


class CpuDecodeStack:
    def __init__(self, model, kv: KVCache):
        self._native = step3vl_native = native()
        text = model.model
        cfg = text.cfg
        self.dims = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, cfg.intermediate_size, float(cfg.rms_norm_eps), cfg.head_dim ** -0.5)
        rows = []
        for i, layer in enumerate(text.layers):
            attn = layer.self_attn
            linears = _linears(layer)
            q, k, v, o, gate, up, down = (lin.packed.data_ptr() for lin in linears)
            rows.append([layer.input_layernorm.weight.data_ptr(), q, k, v, attn.q_norm.weight.data_ptr(),
                         attn.k_norm.weight.data_ptr(), o, layer.post_attention_layernorm.weight.data_ptr(), gate,
                         up, down, kv.k[i].data_ptr(), kv.v[i].data_ptr(),
                         *(weight_layout(lin.packed) for lin in linears)])
        self.table = torch.tensor(rows, dtype=torch.int64)
        assert self.table.shape[1] == step3vl_native.CPU_DECODER_LAYER_SLOTS
        self.num_blocks, self.block_size = kv.num_blocks, kv.block_size

    @staticmethod
    def supported(model, kv: KVCache) -> bool:
        """Every decoder linear packed (no bias), every norm native, an fp32 cache on the CPU."""
        if kv.k[0].dtype != torch.float32 or kv.k[0].device.type != "cpu":
            return False
        for layer in model.model.layers:
            attn = layer.self_attn
            norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm]
            if not all(isinstance(m, PackedLinear) and m.bias is None for m in _linears(layer)):
                return False
            if not all(isinstance(m, NativeRMSNorm) for m in norms):
                return False
        return True

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, tables) -> torch.Tensor:
        """x [B, hidden] embeddings -> the last layer's output (in place); cos/sin [B, D]; slots [B] int64;
        tables: attention.cpu_cascade_tables(meta)."""
        (pt, pl, _, st, sl), plan = tables
        x, cos, sin = x.float().contiguous(), cos.contiguous(), sin.contiguous()
        slots = slots.to(torch.int64).contiguous()
        self._native.cpu_decode_stack(
            *self.dims, self.table.data_ptr(), x.data_ptr(), x.shape[0], cos.data_ptr(), sin.data_ptr(),
            slots.data_ptr(), self.num_blocks, self.block_size, plan.num_groups, pt.data_ptr(), pt.shape[1],
            pl.data_ptr(), plan.rows.data_ptr(), plan.indptr.data_ptr(), st.data_ptr(), st.shape[1], sl.data_ptr())
        return x
