"""Token selection: the step3vl_kernels sampler (Triton on CUDA, the reference with native uniforms on the
CPU, the plain reference elsewhere).

Every sample draws from its own counter-based stream keyed by (request seed, sample index, output step),
so its tokens do not depend on batch composition, preemption or block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from step3vl.engine.penalties import apply_penalties, has_penalties
from step3vl.engine.sequence import Sequence
from step3vl.engine.token_constraints import apply_constraints, has_constraints


NO_TOKEN = -1  # a row whose request's rules allow no token at all


@dataclass(slots=True)
class SampledToken:
    token: int
    logprob: float | None
    top_logprobs: dict[int, float] | None


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: set[int] = frozenset(), structured=None):
        self.device = device
        self.eos_token_ids = set(eos_token_ids)
        self.structured = structured  # StructuredOutputBackend or None
        if device.type == "cuda":
            from step3vl_kernels.sampling import sample
        elif device.type == "cpu":
            from step3vl_kernels.sampling_cpu import sample
        else:
            from step3vl_kernels.sampling_ref import sample
        self._sample = sample

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], ahead: list[int] | None = None) -> list[SampledToken]:
        """Log-probs are the model's own (vLLM's default "raw" log-probs): before the request's processors, rules
        and penalties, and before temperature. A row whose rules leave no token gets NO_TOKEN (the engine ends
        that sample) instead of an arbitrary draw. ahead[i]: row i draws for the output step that many tokens
        past the sample's current one (speculative verification rows; 0 otherwise)."""
        raw = logits
        params = [s.request.params for s in seqs]
        logits, dead = self._adjust(logits, seqs, params)
        if dead:
            logits = logits.clone()
            logits[dead] = 0.0  # any finite row: its draw is discarded
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            dev = logits.device
            f32, i64 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int64, device=dev)
            tokens = self._sample(
                logits,
                torch.tensor([p.temperature for p in params], **f32),
                torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int32, device=dev),
                torch.tensor([p.top_p for p in params], **f32),
                torch.tensor([p.min_p for p in params], **f32),
                torch.tensor([s.request.seed for s in seqs], **i64),
                torch.tensor([s.index for s in seqs], **i64),
                torch.tensor([len(s.token_ids) - s.num_prompt_tokens + (ahead[i] if ahead else 0)
                              for i, s in enumerate(seqs)], **i64),
            )
        token_list = tokens.tolist()
        for i in dead:
            token_list[i] = NO_TOKEN
        want = [p.logprobs is not None and t != NO_TOKEN for p, t in zip(params, token_list)]
        if not any(want):
            return [SampledToken(t, None, None) for t in token_list]
        logprobs = torch.log_softmax(raw.float(), dim=-1)
        out = []
        for i, (t, p) in enumerate(zip(token_list, params)):
            if not want[i]:
                out.append(SampledToken(t, None, None))
                continue
            top = {}
            if p.logprobs:
                vals, idx = logprobs[i].topk(p.logprobs)
                top = dict(zip(idx.tolist(), vals.tolist()))
            lp = float(logprobs[i, t])
            top[t] = lp
            out.append(SampledToken(t, lp, top))
        return out

    def _adjust(self, logits: torch.Tensor, seqs: list[Sequence], params: list) -> tuple[torch.Tensor, list[int]]:
        """Processors, the structured-output mask, allowed ids / bias / min_tokens, penalties (in that order);
        and the rows left without any allowed token."""
        logits = self._apply_processors(logits, seqs)
        broken: list[int] = []
        if self.structured is not None and any(s.request.grammar is not None for s in seqs):
            logits, broken = self.structured.mask(logits, seqs)
        if any(has_constraints(p) for p in params):
            logits = apply_constraints(logits, seqs, self.eos_token_ids)
        if any(has_penalties(p) for p in params):
            logits = apply_penalties(logits, seqs)
        if not (broken or any(has_constraints(p) or p.logits_processors or p.structured_outputs for p in params)):
            return logits, []
        allowed = torch.isfinite(logits).any(dim=-1).tolist()
        return logits, sorted(set(broken) | {i for i, ok in enumerate(allowed) if not ok})

    @staticmethod
    def _apply_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """vLLM-style per-request logits processors: fn(output_token_ids, logits_row) -> logits_row. A processor
        that raises (or returns something else than a row) ends its own sample, never the engine: the row allows
        no token, and the reason is kept for the sample's stop_reason."""
        if not any(s.request.params.logits_processors for s in seqs):
            return logits
        logits = logits.clone()
        for i, s in enumerate(seqs):
            for fn in s.request.params.logits_processors:
                try:
                    row = fn(s.output_ids, logits[i])
                    logits[i] = row
                except Exception as e:  # user code: any failure is that request's
                    s.rule_state["error"] = f"a logits processor raised {type(e).__name__}: {e}"
                    logits[i] = float("-inf")
                    break
        return logits
