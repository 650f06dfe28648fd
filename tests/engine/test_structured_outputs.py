"""Structured outputs: what comes out parses (JSON schema, json_object, regex, choice); greedy guided decoding
equals a plain loop over the dense reference with xgrammar's mask applied by hand; guided seeded sampling does
not depend on preemption; bad specs fail the request and name the field."""

from __future__ import annotations

import json
import re

import pytest
import torch

from step3vl import LLM, SamplingParams
from step3vl.engine.structured_outputs import StructuredOutputs

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"},
                                           "tag": {"enum": ["red", "green"]}},
          "required": ["n", "ok", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(tiny_ckpt, kv_cache_memory="8MiB")


def _finished(llm, spec, n=6, seed=0, max_tokens=160, min_done=None, **kw):
    """The texts of the samples that completed (stop): a random model may ramble until max_tokens."""
    out = llm.generate(["Answer:"], SamplingParams(n=n, seed=seed, max_tokens=max_tokens, structured_outputs=spec,
                                                    **kw), use_tqdm=False)[0]
    done = [c.text for c in out.outputs if c.finish_reason == "stop"]
    assert len(done) >= (min_done or n // 2), [c.finish_reason for c in out.outputs]
    return done


def test_json_schema_outputs_validate(llm):
    for text in _finished(llm, {"json": SCHEMA}):
        obj = json.loads(text)
        assert set(obj) == {"n", "ok", "tag"}
        assert isinstance(obj["n"], int) and isinstance(obj["ok"], bool) and obj["tag"] in ("red", "green")


def test_json_object_outputs_parse(llm):
    for text in _finished(llm, {"json_object": True}, n=8, seed=1, min_done=2):
        assert isinstance(json.loads(text), dict)


def test_regex_and_choice(llm):
    for text in _finished(llm, {"regex": r"[0-9]{2,4}-(ab|c)+"}, seed=2, max_tokens=24):
        assert re.fullmatch(r"[0-9]{2,4}-(ab|c)+", text)
    choices = ["yes", "no", 'say "hi"', "naïve"]
    got = _finished(llm, StructuredOutputs(choice=choices), n=12, seed=3, max_tokens=12)
    assert set(got) <= set(choices) and len(set(got)) > 1


def test_greedy_guided_equals_a_hand_masked_dense_loop(qwen3_ckpt, qwen3_dense):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    path, _ = qwen3_ckpt
    llm = LLM(path, dtype="float32", device="cpu", kv_cache_memory="4MiB")
    prompt = [7, 99, 31, 400, 12]
    regex = r"(a|b|c)+[0-9]{3}"
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, structured_outputs={"regex": regex}),
                       use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    eos = sorted(llm.engine.eos_token_ids)
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.tok), vocab_size=512,
                                              stop_token_ids=eos)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_regex(regex))
    ids, mask = list(prompt), xgr.allocate_token_bitmask(1, 512)
    for _ in range(20):
        logits = qwen3_dense.logits([ids])[0][-1][None].clone()
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        t = int(logits.argmax())
        ids.append(t)
        assert matcher.accept_token(t)
        if t in eos:
            break
    assert got.token_ids == ids[len(prompt):]
    assert re.fullmatch(regex, got.text)


def test_guided_sampling_is_the_same_through_preemption(tiny_ckpt):
    params = SamplingParams(n=4, seed=9, max_tokens=60, structured_outputs={"json": SCHEMA})
    roomy = LLM(tiny_ckpt, kv_cache_memory="8MiB").generate(["Answer:"], params, use_tqdm=False)[0]
    tight_llm = LLM(tiny_ckpt, kv_cache_memory=48 * 1024, block_size=16)  # a few blocks: samples get preempted
    tight = tight_llm.generate(["Answer:"], params, use_tqdm=False)[0]
    assert tight_llm.kv_stats()["preemptions"] > 0
    assert [c.token_ids for c in tight.outputs] == [c.token_ids for c in roomy.outputs]


@pytest.mark.parametrize("spec, words", [
    ({"regex": "(unclosed"}, "structured_outputs"),
    ({"json": "{not json"}, "structured_outputs"),
    ({"grammar": "root ::= missing_rule"}, "structured_outputs"),
    ({"regex": "a", "choice": ["b"]}, "exactly one of"),
    ({"choice": []}, "non-empty"),
    ({"shape": "x"}, "unknown field"),
])
def test_bad_specs_name_the_field(llm, spec, words):
    with pytest.raises(ValueError, match=words):
        llm.generate(["x"], SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert not llm.has_unfinished_requests()
