"""Paged attention backends the engine hands to the model for one step.

Token order in a step: first one token per decoding sequence, then the prefill chunks. Decoding sequences
are grouped by the prompt blocks they share (the samples forked from one prompt): each group's queries
attend to the shared prefix together — read once per group, not once per sequence — and each sequence
attends to its own suffix; the two parts are merged by log-sum-exp (natural log, empty part = -inf).

`TorchPagedAttention` is the plain PyTorch path (a correct fallback anywhere). Where a sequence's blocks are
consecutive in the pool, it attends to a view of the pool instead of gathering a dense copy.
`CpuPagedAttention` is the CPU default: the same, with decode through the C++ cascade kernel
(step3vl_kernels.cascade_decode_cpu), which streams the paged pool in place.
`TritonPagedAttention` runs the step3vl_kernels Triton kernels on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from step3vl.engine.kv_cache import KVCache


@dataclass(slots=True)
class DecodeGroup:
    rows: list[int]  # indices into the decode rows
    prefix_blocks: list[int]  # shared full blocks


@dataclass(slots=True)
class PrefillChunk:
    q_start: int
    q_len: int
    context_len: int  # tokens with KV after this chunk (cached + earlier chunks + this one)
    block_table: list[int]


@dataclass(eq=False)
class StepMetadata:
    block_size: int
    slot_mapping: torch.Tensor  # [T] int64, where each new token's K/V goes
    num_decode: int
    groups: list[DecodeGroup] = field(default_factory=list)
    suffix_tables: list[list[int]] = field(default_factory=list)  # per decode row: blocks after its prefix
    suffix_lens: list[int] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    cascade: bool = True  # GPU path: shared-prefix cascade kernel (else plain paged decode over full tables)
    _cache: dict = field(default_factory=dict)

    def suffix_blocks(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nb] block ids of each decode row's suffix (padded with block 0) and [B] token lengths.

        Whole blocks are gathered (contiguous block_size·heads·dim runs) rather than single slots.
        """
        if "suffix" not in self._cache:
            nb = -(-max(self.suffix_lens, default=0) // self.block_size)
            tables = torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in self.suffix_tables],
                                  dtype=torch.int64).view(len(self.suffix_tables), nb)
            lens = torch.tensor(self.suffix_lens, dtype=torch.int64)
            self._cache["suffix"] = (tables.to(device), lens.to(device))
        return self._cache["suffix"]

    def context_index(self, key: tuple, blocks: list[int], length: int, device: torch.device) -> int | torch.Tensor:
        """Where `length` tokens over `blocks` sit in the flat pool: a start offset when the blocks are
        consecutive (read as a view, no copy), else the slot indices to gather. Once per step, for every layer."""
        if key not in self._cache:
            bs = self.block_size
            used = blocks[:-(-length // bs)]
            if used == list(range(used[0], used[0] + len(used))):
                self._cache[key] = used[0] * bs
            else:
                offs = torch.arange(length)
                table = torch.tensor(used, dtype=torch.int64)
                self._cache[key] = (table[offs // bs] * bs + offs % bs).to(device)
        return self._cache[key]

    def seq_group(self) -> list[int]:
        """The group of each decode row."""
        out = [0] * self.num_decode
        for gi, g in enumerate(self.groups):
            for r in g.rows:
                out[r] = gi
        return out

    def group_rows(self, i: int, device: torch.device) -> torch.Tensor:
        key = ("rows", i)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.groups[i].rows, device=device)
        return self._cache[key]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, M, D], k/v [H, N, D] → (out [H, M, D], lse [H, M]); fp32."""
    s = torch.matmul(q, k.transpose(1, 2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def _merge(o1, lse1, o2, lse2) -> torch.Tensor:
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return o1 * w1 + o2 * w2


class TorchPagedAttention:
    def __init__(self, kv: KVCache, meta: StepMetadata):
        self.kv, self.meta = kv, meta

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        kflat, vflat = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])
        kflat.index_copy_(0, self.meta.slot_mapping, k.to(kc.dtype))
        vflat.index_copy_(0, self.meta.slot_mapping, v.to(vc.dtype))
        out = torch.empty_like(q)
        nd = self.meta.num_decode
        if nd:
            out[:nd] = self._decode(q[:nd], kc, vc, scale).to(q.dtype)
        for i, chunk in enumerate(self.meta.prefills):
            qs = q[chunk.q_start:chunk.q_start + chunk.q_len]
            where = self.meta.context_index(("prefill", i), chunk.block_table, chunk.context_len, q.device)
            out[chunk.q_start:chunk.q_start + chunk.q_len] = self._prefill(qs, chunk, kflat, vflat, where, scale)
        return out

    @staticmethod
    def _context(flat: torch.Tensor, where: int | torch.Tensor, length: int) -> torch.Tensor:
        return flat[where:where + length] if isinstance(where, int) else flat[where]

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scale: float) -> torch.Tensor:
        b, hq, d = q.shape
        hkv = kc.shape[2]
        kflat, vflat = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
        r = hq // hkv
        qh = q.float().view(b, hkv, r, d)
        o_p = torch.zeros(b, hkv, r, d, device=q.device)
        lse_p = torch.full((b, hkv, r), float("-inf"), device=q.device)
        for i, g in enumerate(self.meta.groups):
            if not g.prefix_blocks:
                continue
            plen = len(g.prefix_blocks) * self.meta.block_size
            where = self.meta.context_index(("prefix", i), g.prefix_blocks, plen, q.device)
            kp = self._context(kflat, where, plen).float().transpose(0, 1)
            vp = self._context(vflat, where, plen).float().transpose(0, 1)
            rows = self.meta.group_rows(i, q.device)
            qg = qh[rows].permute(1, 0, 2, 3).reshape(hkv, len(g.rows) * r, d)
            o, lse = _attend(qg, kp, vp, scale)
            o_p[rows] = o.view(hkv, len(g.rows), r, d).permute(1, 0, 2, 3)
            lse_p[rows] = lse.view(hkv, len(g.rows), r).permute(1, 0, 2)
        tables, lens = self.meta.suffix_blocks(kc.device)
        if tables.shape[1] == 0:
            return o_p.view(b, hq, d)
        width = tables.shape[1] * self.meta.block_size
        # Keep the gathered K/V in their [B, S·Hkv, D] pool layout: score every q head against every kv head
        # (Hkv× the flops, which are negligible here) and keep the matching pairs, instead of transposing
        # megabytes of K/V per layer into [B, Hkv, S, D].
        ks = kc[tables].view(b, width * hkv, d).float()
        vs = vc[tables].view(b, width * hkv, d).float()
        s_all = torch.bmm(qh.reshape(b, hkv * r, d), ks.transpose(1, 2)).view(b, hkv, r, width, hkv)
        s = s_all.diagonal(dim1=1, dim2=4).permute(0, 3, 1, 2) * scale  # [B, Hkv, r, S]
        valid = torch.arange(width, device=q.device) < lens[:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        lse_s = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse_s[..., None]).nan_to_num(0.0)
        p_all = torch.zeros(b, hkv, r, width, hkv, device=q.device)
        p_all.diagonal(dim1=1, dim2=4).copy_(p.permute(0, 2, 3, 1))
        o_s = torch.bmm(p_all.view(b, hkv * r, width * hkv), vs).view(b, hkv, r, d)
        return _merge(o_p, lse_p, o_s, lse_s).view(b, hq, d)

    def _prefill(self, q: torch.Tensor, chunk: PrefillChunk, kflat: torch.Tensor, vflat: torch.Tensor,
                 where: int | torch.Tensor, scale: float) -> torch.Tensor:
        n, ql = chunk.context_len, chunk.q_len
        k = self._context(kflat, where, n).transpose(0, 1)
        v = self._context(vflat, where, n).transpose(0, 1)
        qt, k, v = q.transpose(0, 1)[None], k[None], v[None]  # 4-D: the CPU flash kernel, not math
        if ql == n:
            o = F.scaled_dot_product_attention(qt, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            mask = torch.arange(n, device=q.device)[None, :] <= (n - ql + torch.arange(ql, device=q.device))[:, None]
            o = F.scaled_dot_product_attention(qt, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                               enable_gqa=True)
        return o[0].transpose(0, 1)


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32).view(len(rows), width)


def cpu_cascade_tables(meta: StepMetadata):
    """The cascade kernel's int32 tables for a step's decode rows -> ((prefix_tables, prefix_lens, seq_group,
    suffix_tables, suffix_lens), plan); built once per step, shared by every layer."""
    from step3vl_kernels.cascade_decode_cpu import cpu_cascade_plan

    seq_group = torch.tensor(meta.seq_group(), dtype=torch.int32)
    bs = meta.block_size
    tables = (_padded([g.prefix_blocks for g in meta.groups]),
              torch.tensor([len(g.prefix_blocks) * bs for g in meta.groups], dtype=torch.int32),
              seq_group, _padded(meta.suffix_tables), torch.tensor(meta.suffix_lens, dtype=torch.int32))
    return tables, cpu_cascade_plan(seq_group, len(meta.groups))


class CpuPagedAttention(TorchPagedAttention):
    """Decode rows through the C++ cascade kernel; prefill as the torch path."""

    def __init__(self, kv: KVCache, meta: StepMetadata):
        from step3vl_kernels.cascade_decode_cpu import cascade_decode_cpu

        super().__init__(kv, meta)
        self._kernel = cascade_decode_cpu
        if meta.num_decode:
            self._args, self._plan = cpu_cascade_tables(meta)

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scale: float) -> torch.Tensor:
        return self._kernel(q, kc, vc, *self._args, scale, plan=self._plan)


class TritonPagedAttention:
    """The same step on CUDA through step3vl_kernels (Triton): KV write, cascade decode, paged prefill."""

    def __init__(self, kv: KVCache, meta: StepMetadata):
        from step3vl_kernels import kv_write, paged_decode, paged_prefill

        self.kv, self.meta = kv, meta
        self._write, self._cascade, self._prefill = kv_write.write_kv, paged_decode.cascade_decode, paged_prefill.paged_prefill
        self._decode = paged_decode.paged_decode
        self._tensors = self._build_tensors(kv.k[0].device)
        # The row grouping depends only on the step, so one plan serves every layer.
        self._plan = (paged_decode.cascade_plan(self._tensors["seq_group"], len(meta.groups))
                      if meta.num_decode and meta.cascade else None)

    def _build_tensors(self, device: torch.device) -> dict:
        m, i32 = self.meta, dict(dtype=torch.int32, device=device)

        def padded(rows: list[list[int]]) -> torch.Tensor:
            return _padded(rows).to(device)

        t = {}
        if m.num_decode and m.cascade:
            t["prefix_tables"] = padded([g.prefix_blocks for g in m.groups])
            t["prefix_lens"] = torch.tensor([len(g.prefix_blocks) * m.block_size for g in m.groups], **i32)
            t["seq_group"] = torch.tensor(m.seq_group(), **i32)
            t["suffix_tables"] = padded(m.suffix_tables)
            t["suffix_lens"] = torch.tensor(m.suffix_lens, **i32)
        elif m.num_decode:  # plain paged decode: each row's full table = its group's prefix + its suffix
            tables, lens = [None] * m.num_decode, [0] * m.num_decode
            for g in m.groups:
                for r in g.rows:
                    tables[r] = g.prefix_blocks + m.suffix_tables[r]
                    lens[r] = len(g.prefix_blocks) * m.block_size + m.suffix_lens[r]
            t["decode_tables"] = padded(tables)
            t["decode_lens"] = torch.tensor(lens, **i32)
        if m.prefills:
            starts = [c.q_start - m.num_decode for c in m.prefills] + [sum(c.q_len for c in m.prefills)]
            t["cu_seqlens_q"] = torch.tensor(starts, **i32)
            t["seq_lens"] = torch.tensor([c.context_len for c in m.prefills], **i32)
            t["block_tables"] = padded([c.block_table for c in m.prefills])
        return t

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        kc, vc, t, nd = self.kv.k[layer], self.kv.v[layer], self._tensors, self.meta.num_decode
        self._write(k.to(kc.dtype), v.to(vc.dtype), kc, vc, self.meta.slot_mapping)
        parts = []
        if nd and self.meta.cascade:
            parts.append(self._cascade(q[:nd].contiguous(), kc, vc, t["prefix_tables"], t["prefix_lens"],
                                       t["seq_group"], t["suffix_tables"], t["suffix_lens"], scale, plan=self._plan))
        elif nd:
            parts.append(self._decode(q[:nd].contiguous(), kc, vc, t["decode_tables"], t["decode_lens"], scale))
        if self.meta.prefills:
            parts.append(self._prefill(q[nd:].contiguous(), kc, vc, t["cu_seqlens_q"], t["seq_lens"],
                                       t["block_tables"], scale))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
