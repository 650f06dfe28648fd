"""Turns a scheduled step into one packed forward pass over the paged cache and returns the logits rows
the sampler needs."""

from __future__ import annotations

import torch

from step3vl.engine.attention import (CpuPagedAttention, DecodeGroup, PrefillChunk, StepMetadata, TorchPagedAttention,
                                     TritonPagedAttention, cpu_cascade_tables)
from step3vl.engine.config import RunnerConfig
from step3vl.engine.cpu_decode import CpuDecodeStack
from step3vl.engine.image_inputs import ImageInputs
from step3vl.engine.kv_cache import KVCache
from step3vl.engine.prompt_logprobs import record_prompt_logprobs, wants_prompt_logprobs
from step3vl.engine.scheduler import ScheduledStep
from step3vl.engine.sequence import Sequence
from step3vl.model.rope import rope_cos_sin
from step3vl.model.vision import sdpa_vision_attention
from step3vl.model.vlm import Step3VLForCausalLM


class ModelRunner:
    def __init__(self, model: Step3VLForCausalLM, kv: KVCache, config: RunnerConfig = RunnerConfig()):
        self.model, self.kv, self.config = model, kv, config
        use_kernels, cpu_kernels = config.use_kernels, config.cpu_kernels
        self.cascade_attention = config.cascade_attention
        self.block_size = kv.block_size
        self.device = model.device
        self.backend = TritonPagedAttention if use_kernels else TorchPagedAttention
        if not use_kernels and cpu_kernels and self.device.type == "cpu" and _native_cpu_attention(kv):
            self.backend = CpuPagedAttention
        # Pure-decode steps in one native call when the decoder runs the native CPU modules (cpu_decode.py).
        self.decode_stack = (CpuDecodeStack(model, kv) if self.backend is CpuPagedAttention
                             and CpuDecodeStack.supported(model, kv) else None)
        vision_attention = sdpa_vision_attention
        if use_kernels:
            from step3vl_kernels.vision_attention import vision_attention
        self.images = ImageInputs(model, vision_attention, config.encoder_cache_bytes)

    @torch.inference_mode()
    def run(self, step: ScheduledStep, sample_rows: list[int]) -> torch.Tensor:
        """Forward the step's tokens; return logits [len(sample_rows), vocab] (fp32) for those token rows."""
        ids, positions, slots, image_mask, features = self._inputs(step)
        meta = self._metadata(step, torch.tensor(slots, dtype=torch.int64, device=self.device))
        stacked = self.decode_stack is not None and meta.num_decode and not meta.prefills
        ids_t = torch.tensor(ids, dtype=torch.int64, device=self.device)
        embeds = self.model.model.embed_tokens(ids_t)
        positions_t = torch.tensor(positions, device=self.device)
        if stacked:
            text = self.model.model
            cos, sin = rope_cos_sin(positions_t, text.inv_freq)
            hidden = text.norm(self.decode_stack.run(embeds, cos, sin, meta.slot_mapping, cpu_cascade_tables(meta)))
        else:
            if features:
                mask = torch.tensor(image_mask, dtype=torch.bool, device=self.device)
                embeds[mask] = torch.cat(features).to(embeds.dtype)
            hidden = self.model.model(embeds, positions_t, self.backend(self.kv, meta))
            self._prompt_logprobs(step, hidden)
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(hidden[rows]).float()

    def _prompt_logprobs(self, step: ScheduledStep, hidden: torch.Tensor) -> None:
        q = len(step.decodes)  # prefill rows follow the decode rows, chunk after chunk
        for work in step.prefills:
            req = work.seq.request
            if work.seq.index == 0 and wants_prompt_logprobs(req, work.start, work.length):
                record_prompt_logprobs(self.model, hidden[q:q + work.length], req, work.start)
            q += work.length

    def _inputs(self, step: ScheduledStep):
        ids, positions, slots, image_mask = [], [], [], []
        for seq, slot in zip(step.decodes, step.decode_slots):
            ids.append(seq.token_ids[-1])
            positions.append(seq.num_tokens - 1)
            slots.append(slot)
            image_mask.append(False)
        bs = self.block_size
        for work in step.prefills:
            seq, a, b = work.seq, work.start, work.start + work.length
            ids += seq.token_ids[a:b] if not work.draft else seq.token_ids[a:] + work.draft
            positions += range(a, b)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(a, b)]
        mask, features = self.images.gather([(w.seq.request, w.start, w.start + w.length) for w in step.prefills])
        return ids, positions, slots, image_mask + mask, features

    def _metadata(self, step: ScheduledStep, slot_mapping: torch.Tensor) -> StepMetadata:
        """Decode rows, then prefill chunks. A speculative verify chunk's tokens are decode rows of one sample whose
        context lengths grow by one: every backend writes the step's K/V before any row attends, so each row sees
        the chunk up to its own token (causal), through the same attention, and so the same arithmetic, as that
        token decoded alone (in bf16 too)."""
        bs = self.block_size
        verify = [w for w in step.prefills if w.draft]
        if not all(w.draft for w in step.prefills[:len(verify)]):
            raise AssertionError("the scheduler must put verify chunks before prefill chunks")
        rows = [(seq, seq.num_tokens - 1) for seq in step.decodes]  # (sample, position of the row's token)
        rows += [(w.seq, p) for w in verify for p in range(w.start, w.start + w.length)]
        meta = StepMetadata(block_size=bs, slot_mapping=slot_mapping, num_decode=len(rows),
                            cascade=self.cascade_attention)
        groups: dict[tuple, DecodeGroup] = {}
        for row, (seq, position) in enumerate(rows):
            shared = seq.num_prompt_tokens // bs  # full prompt blocks: shared by every sample of a prompt
            shared = min(shared, position // bs)
            prefix = seq.block_table[:shared]
            key = tuple(prefix)
            if key not in groups:
                groups[key] = DecodeGroup(rows=[], prefix_blocks=prefix)
            groups[key].rows.append(row)
            meta.suffix_tables.append(seq.block_table[shared:])
            meta.suffix_lens.append(position + 1 - shared * bs)
        meta.groups = list(groups.values())
        q = len(rows)
        for work in step.prefills[len(verify):]:
            meta.prefills.append(PrefillChunk(q, work.length, work.start + work.length, work.seq.block_table))
            q += work.length
        return meta


def _native_cpu_attention(kv: KVCache) -> bool:
    """The C++ cascade kernel: fp32 / bf16 caches, and only where its AVX-512 path runs (head_dim a multiple of 16
    on an AVX-512 CPU; its portable loop is a correctness fallback, slower than the PyTorch path)."""
    from step3vl_kernels.native import cpu_has_avx512

    return (kv.k[0].dtype in (torch.float32, torch.bfloat16) and kv.k[0].shape[3] % 16 == 0
            and cpu_has_avx512())


def sample_rows_for(step: ScheduledStep) -> tuple[list[int], list[Sequence]]:
    """Token rows whose logits are needed: every decode, the last token of a prefill that completes, and every
    token of a speculative chunk (its sequence once per row)."""
    rows, seqs = list(range(len(step.decodes))), list(step.decodes)
    q = len(step.decodes)
    for work in step.prefills:
        if work.draft:
            rows += range(q, q + work.length)
            seqs += [work.seq] * work.length
        elif work.start + work.length == work.seq.num_tokens:
            rows.append(q + work.length - 1)
            seqs.append(work.seq)
        q += work.length
    return rows, seqs
