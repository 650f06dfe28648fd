"""Repetition / frequency / presence penalties: the batched version against the plain-Python definition, and
greedy generation with penalties against transformers' `generate` (its own repetition_penalty, and the
presence/frequency rule as a transformers LogitsProcessor)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from step3vl import LLM, SamplingParams
from step3vl.engine.penalties import apply_penalties, apply_penalties_ref
from step3vl.engine.sequence import Request, Sequence

VOCAB = 40


@given(st.lists(st.tuples(st.lists(st.integers(0, VOCAB - 1), max_size=12),
                          st.lists(st.integers(0, VOCAB - 1), max_size=12),
                          st.sampled_from([1.0, 0.5, 1.3, 2.0]), st.sampled_from([0.0, -0.7, 0.4]),
                          st.sampled_from([0.0, 1.5, -0.3])), min_size=1, max_size=5),
       st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_batched_penalties_equal_the_definition(rows, seed):
    logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(seed))
    params = [SamplingParams(repetition_penalty=r, frequency_penalty=f, presence_penalty=p) for _, _, r, f, p in rows]
    seqs = [_seq(prompt, [], sp) for (prompt, _, *_), sp in zip(rows, params)]
    for seq, (_, out, *_) in zip(seqs, rows):  # outputs arrive a token at a time, as in decoding
        for t in out:
            apply_penalties(logits, seqs)
            seq.token_ids.append(t)
    got = apply_penalties(logits, seqs)
    for i, (prompt, out, r, f, p) in enumerate(rows):
        want = apply_penalties_ref(logits[i].tolist(), prompt, out, r, f, p)
        torch.testing.assert_close(got[i], torch.tensor(want), rtol=1e-6, atol=1e-6)


def _seq(prompt: list[int], output: list[int], params: SamplingParams) -> Sequence:
    req = Request("r", None, list(prompt), params, seed=0, arrival=0)
    return Sequence(0, req, 0, list(prompt) + list(output))


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0)])
def test_out_of_range_penalties_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


class _PresenceFrequency:
    """transformers LogitsProcessor: the OpenAI presence/frequency rule on the generated tokens."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for b in range(scores.shape[0]):
            out = input_ids[b, self.prompt_len:].tolist()
            for t in set(out):
                scores[b, t] -= self.frequency * out.count(t) + self.presence
        return scores


@pytest.mark.parametrize("rep, freq, pres", [(1.5, 0.0, 0.0), (1.0, 0.6, 0.9), (1.2, 0.3, 0.5)])
def test_greedy_with_penalties_equals_transformers(qwen3_ckpt, rep, freq, pres):
    from transformers import LogitsProcessorList

    path, hf = qwen3_ckpt
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (5, 23)]
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB")
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20, repetition_penalty=rep,
                            frequency_penalty=freq, presence_penalty=pres)
    outs = llm.generate(prompts, params, use_tqdm=False)
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=20), use_tqdm=False)
    assert any(o.outputs[0].token_ids != p.outputs[0].token_ids for o, p in zip(outs, plain)), \
        "the penalties changed nothing: the test would not catch them missing"
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                              min_new_tokens=0, eos_token_id=None, pad_token_id=0, repetition_penalty=rep,
                              logits_processor=LogitsProcessorList([_PresenceFrequency(len(p), freq, pres)]))
        assert o.outputs[0].token_ids == gen[0, len(p):].tolist()
