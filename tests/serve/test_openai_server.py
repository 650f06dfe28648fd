"""The OpenAI-compatible server, through the official `openai` client over real HTTP, against an independent
in-process LLM on the same checkpoint."""

from __future__ import annotations

import base64
import io
import json
import re
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from step3vl.engine import SamplingParams
from step3vl.serve.reasoning import split_reasoning

MODEL = "tiny"  # the served name (conftest.py)

USER = [{"role": "user", "content": "Describe a small red square."}]


def _ref_chat(reference, messages, **kw):
    return reference.chat(messages, SamplingParams(**kw), use_tqdm=False)[0]


def _expect(text: str) -> tuple[str | None, str]:
    thought, content = split_reasoning(text, finished=True)
    return thought or None, content


def test_models_and_health(server, client):
    srv, url = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").status_code == 200
    stats = httpx.get(url + "/stats").json()
    assert stats["blocks_total"] > 0 and stats["blocks_used"] == 0


def test_chat_greedy_equals_the_in_process_engine(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=12)
    ref = _ref_chat(reference, USER, temperature=0, max_tokens=12)
    c = r.choices[0]
    assert (getattr(c.message, "reasoning_content", None), c.message.content) == _expect(ref.outputs[0].text)
    assert c.finish_reason == ref.outputs[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == 12 + len(ref.prompt_token_ids)


def test_seeded_samples_equal_the_reference(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=USER, n=3, seed=11, temperature=1.0, top_p=0.9,
                                       max_tokens=10, extra_body={"top_k": 50})
    ref = _ref_chat(reference, USER, n=3, seed=11, temperature=1.0, top_p=0.9, top_k=50, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, rc in zip(r.choices, ref.outputs):
        assert (getattr(c.message, "reasoning_content", None), c.message.content) == _expect(rc.text)
    assert len({c.message.reasoning_content for c in r.choices}) > 1  # distinct samples


def test_stream_concatenates_to_the_full_response(client):
    kw = dict(model=MODEL, messages=USER, n=2, seed=3, max_tokens=14)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    got = {0: ["", ""], 1: ["", ""]}
    roles, finish = {}, {}
    for ch in chunks[:-1]:
        assert ch.usage is None
        for c in ch.choices:
            roles.setdefault(c.index, c.delta.role)
            got[c.index][0] += getattr(c.delta, "reasoning_content", None) or ""
            got[c.index][1] += c.delta.content or ""
            if c.finish_reason:
                assert c.index not in finish, "a choice finished twice"
                finish[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    for c in full.choices:
        assert got[c.index] == [c.message.reasoning_content or "", c.message.content]
        assert finish[c.index] == c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_concurrent_requests_equal_their_references(client, reference):
    seeds = [1, 2, 3, 4, 5, 6]
    with ThreadPoolExecutor(len(seeds)) as pool:
        got = list(pool.map(lambda s: client.chat.completions.create(
            model=MODEL, messages=USER, seed=s, max_tokens=8 + s).choices[0], seeds))
    for s, c in zip(seeds, got):
        ref = _ref_chat(reference, USER, seed=s, max_tokens=8 + s).outputs[0]
        assert (getattr(c.message, "reasoning_content", None), c.message.content) == _expect(ref.text)


def test_chat_logprobs_match_the_engine(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=USER, seed=5, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    ref = _ref_chat(reference, USER, seed=5, max_tokens=6, logprobs=3).outputs[0]
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids) == 6
    for entry, tok, alts in zip(content, ref.token_ids, ref.logprobs):
        assert math.isclose(entry.logprob, alts[tok], rel_tol=1e-6, abs_tol=1e-6)
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert math.isclose(top[0], max(alts.values()), rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(sum(e.logprob for e in content), ref.cumulative_logprob, rel_tol=1e-5, abs_tol=1e-5)


def test_completions_prompts_n_echo_and_token_ids(client, reference):
    prompts = ["hello world", "abc"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, seed=9, max_tokens=5, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        ref = reference.generate(p, SamplingParams(n=2, seed=9, max_tokens=5), use_tqdm=False)[0]
        for j in range(2):
            assert r.choices[2 * i + j].text == p + ref.outputs[j].text
    ids = reference.get_tokenizer().encode("hello world")
    r2 = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=4, logprobs=2)
    ref2 = reference.generate(ids, SamplingParams(temperature=0, max_tokens=4, logprobs=2), use_tqdm=False)[0]
    c = r2.choices[0]
    assert c.text == ref2.outputs[0].text
    assert c.logprobs.token_logprobs == pytest.approx([d[t] for t, d in zip(ref2.outputs[0].token_ids,
                                                                              ref2.outputs[0].logprobs)], abs=1e-6)


def test_completions_stream_with_several_prompts(client):
    kw = dict(model=MODEL, prompt=["one", "two three"], n=2, seed=4, max_tokens=6)
    full = client.completions.create(**kw)
    text = {}
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
    assert text == {c.index: c.text for c in full.choices}


def test_penalties_reach_the_engine(client, reference):
    kw = dict(temperature=0, max_tokens=24, presence_penalty=1.5, frequency_penalty=0.5)
    r = client.chat.completions.create(model=MODEL, messages=USER, **kw, extra_body={"repetition_penalty": 2.0})
    ref = _ref_chat(reference, USER, **kw, repetition_penalty=2.0).outputs[0]
    plain = _ref_chat(reference, USER, temperature=0, max_tokens=24).outputs[0]
    assert ref.token_ids != plain.token_ids
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == _expect(ref.text)


def test_logit_bias_min_tokens_and_allowed_ids_reach_the_engine(client, reference):
    tok = reference.get_tokenizer()
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    r = client.chat.completions.create(model=MODEL, messages=USER, seed=1, max_tokens=8, logit_bias={str(a): 100},
                                       extra_body={"min_tokens": 8})
    assert r.choices[0].message.reasoning_content == "a" * 8
    r2 = client.completions.create(model=MODEL, prompt="x", seed=2, max_tokens=10,
                                   extra_body={"allowed_token_ids": [a, b]})
    assert set(r2.choices[0].text) <= {"a", "b"} and len(r2.choices[0].text) == 10
    r3 = client.completions.create(model=MODEL, prompt="x", seed=2, max_tokens=10,
                                   extra_body={"allowed_token_ids": [a, b], "bad_words": ["a"]})
    assert r3.choices[0].text == "b" * 10  # "a" banned as a word (as written and after a space)


def test_stop_strings(client, reference):
    base = _ref_chat(reference, USER, seed=8, max_tokens=16).outputs[0].text
    stop = base[5:7]
    assert stop.strip(), "pick a seed whose text has a visible pair of characters there"
    r = client.chat.completions.create(model=MODEL, messages=USER, seed=8, max_tokens=16, stop=[stop])
    ref = _ref_chat(reference, USER, seed=8, max_tokens=16, stop=[stop]).outputs[0]
    assert ref.finish_reason == "stop" and r.choices[0].finish_reason == "stop"
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == _expect(ref.text)


def _png_data_url(color=(200, 30, 30), size=(40, 28)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_data_url_equals_the_reference(client, reference):
    url = _png_data_url()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What colour?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=8)
    ref_msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 28), (200, 30, 30))},
                                             {"type": "text", "text": "What colour?"}]}]
    ref = _ref_chat(reference, ref_msgs, temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) > 100  # the image's tokens are in the prompt
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == _expect(ref.outputs[0].text)


def _error(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("kw, status, param, words", [
    (dict(max_tokens=10_000), 400, "max_tokens", "maximum context length is 512"),
    (dict(temperature=-1.0), 400, "temperature", "temperature"),
    (dict(top_p=0.0), 400, "top_p", "top_p"),
    (dict(presence_penalty=2.5), 400, "presence_penalty", "[-2, 2]"),
    (dict(extra_body={"repetition_penalty": 0}), 400, "repetition_penalty", "repetition_penalty"),
    (dict(logit_bias={"5": 101.0}), 400, "logit_bias", "[-100, 100]"),
    (dict(logit_bias={"100000": 1.0}), 400, "logit_bias", "outside the vocabulary"),
    (dict(model="no-such-model"), 404, "model", "does not exist"),
    (dict(extra_body={"top_k": -5}), 400, "top_k", "top_k"),
    (dict(n=65), 400, "n", "limit of 64"),
    (dict(extra_body={"priority": 3}), 400, "priority", "--scheduling-policy priority"),
])
def test_bad_requests_name_the_field(client, kw, status, param, words):
    args = dict(model=MODEL, messages=USER, max_tokens=4) | kw
    err = _error(lambda: client.chat.completions.create(**args))
    assert err.status_code == status
    body = err.body if isinstance(err.body, dict) else json.loads(err.response.text)["error"]
    assert body["param"] == param and words in body["message"]


def test_prompt_over_the_context_is_refused(client):
    long = [{"role": "user", "content": "word " * 2000}]
    err = _error(lambda: client.chat.completions.create(model=MODEL, messages=long, max_tokens=4))
    assert err.status_code == 400 and "maximum context length is 512" in err.message


def test_context_overflow_speaks_vllms_words_and_the_pacore_clients_fallback_works(client):
    """The official PaCoRe client sends a large max_tokens and, on vLLM's "Please reduce the length" 400, retries
    without max_tokens (the server then gives what is left of the context)."""
    messages = [{"role": "user", "content": "word " * 100}]
    err = _error(lambda: client.chat.completions.create(model=MODEL, messages=messages, max_tokens=100_000))
    n = int(re.search(r"\((\d+) in the messages", err.message).group(1))
    assert err.status_code == 400 and err.message.endswith(
        f"This model's maximum context length is 512 tokens. However, you requested {n + 100_000} tokens ({n} in the "
        f"messages, 100000 in the completion). Please reduce the length of the messages or completion.")
    if "Please reduce the length" in err.message:  # the client's own test
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens + r.usage.completion_tokens == 512
    err = _error(lambda: client.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=1))
    assert "tokens in the prompt, Please reduce the length of the prompt." in err.message


def test_truncate_prompt_tokens_keeps_the_tail(client, reference):
    ids = reference.get_tokenizer().encode("word " * 600)  # over the 512-token context
    r = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=4,
                                  extra_body={"truncate_prompt_tokens": 100})
    ref = reference.generate(ids[-100:], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert r.usage.prompt_tokens == 100 and r.choices[0].text == ref.outputs[0].text
    r2 = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=1,
                                   extra_body={"truncate_prompt_tokens": -1})
    assert r2.usage.prompt_tokens == 511


@pytest.mark.parametrize("part, words", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image 0: cannot decode"),
    ({"type": "image_url", "image_url": {"url": "/etc/passwd"}}, "local image paths are not allowed"),
    ({"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}, "local image paths are not allowed"),
    ({"type": "audio", "audio": "x"}, "unsupported content part"),
])
def test_bad_images_are_refused_clearly(client, part, words):
    msgs = [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]
    err = _error(lambda: client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4))
    assert err.status_code == 400 and words in err.message


def test_missing_messages_is_a_400(server):
    r = httpx.post(server[1] + "/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_errors_leave_the_server_serving(client, server):
    _error(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10_000))
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert httpx.get(server[1] + "/stats").json()["blocks_used"] == 0


def test_a_stream_the_engine_refuses_ends_with_an_error_event(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "stream": True, "logit_bias": {"100000": 1}}
    with httpx.stream("POST", server[1] + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 400 and err["param"] == "logit_bias" and "outside the vocabulary" in err["message"]


@pytest.fixture(scope="module")
def thinking_client(tiny_ckpt):
    """A server whose (random) model closes its reasoning with </think> at output position 3."""
    from step3vl.engine import LLM, AsyncLLM
    from step3vl.serve import OpenAIServer, ServerConfig
    from step3vl.serve.background import BackgroundServer

    llm = LLM(tiny_ckpt, kv_cache_memory="8MiB", max_model_len=512)
    think = llm.get_tokenizer().think_end_id

    def close_at_3(out_ids, logits):
        if len(out_ids) != 3:
            return logits.index_fill(0, torch.tensor([think]), float("-inf"))
        return torch.full_like(logits, float("-inf")).index_fill(0, torch.tensor([think]), 0.0)

    engine = AsyncLLM(llm)
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, logits_processors=[close_at_3]))
    with BackgroundServer(srv.app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    engine.shutdown()


def test_response_format_applies_to_the_answer_after_reasoning(thinking_client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = thinking_client.chat.completions.create(
        model=MODEL, messages=USER, n=6, seed=4, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema}})
    done = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 3
    for c in done:  # three free tokens of reasoning, </think>, then the schema
        assert c.message.reasoning_content and isinstance(json.loads(c.message.content)["n"], int)


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "(open"}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
])
def test_bad_structured_outputs_are_400s(client, extra, param):
    err = _error(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, extra_body=extra))
    assert err.status_code == 400 and err.body["param"] == param


def test_guided_choice_on_completions(client):
    r = client.completions.create(model=MODEL, prompt="Pick:", n=5, seed=6, max_tokens=8,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert {c.text for c in r.choices} <= {"left", "right"}


@pytest.mark.parametrize("kw, param", [
    (dict(prompt=""), "prompt"), (dict(prompt=[[]]), "prompt"), (dict(prompt=["a", ""]), "prompt"),
    (dict(prompt="a", logit_bias={"99999": 1}), "logit_bias"),
    (dict(prompt="a", extra_body={"priority": -1}), "priority"),
    (dict(prompt="a", extra_body={"truncate_prompt_tokens": 0}), "truncate_prompt_tokens"),
])
def test_completions_refusals_are_400s(client, kw, param):
    err = _error(lambda: client.completions.create(model=MODEL, max_tokens=3, **kw))
    assert err.status_code == 400 and err.body["param"] == param


def test_template_kwargs_and_malformed_urls_are_400s(client):
    err = _error(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2,
                                                        extra_body={"chat_template_kwargs": {"messages": 1}}))
    assert err.status_code == 400 and err.body["param"] == "chat_template_kwargs"
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://[::1"}}]}]
    err = _error(lambda: client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2))
    assert err.status_code == 400 and err.body["param"] == "messages[0].content[0]"


def test_null_fields_take_their_defaults(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 3, "stream": None, "logprobs": None, "n": None,
            "presence_penalty": None, "frequency_penalty": None, "temperature": None, "top_p": None}
    r = httpx.post(server[1] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] == 3


def test_streamed_completion_logprobs_keep_text_offsets(client):
    kw = dict(model=MODEL, prompt="abc", seed=3, max_tokens=8, logprobs=2)
    full = client.completions.create(**kw).choices[0].logprobs
    tokens, offsets = [], []
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            if c.logprobs:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset
    assert tokens == full.tokens and offsets == full.text_offset
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


def test_logprobs_are_the_models_own_under_masking_rules(server, reference):
    """vLLM's default (raw log-probs): the sampled token obeys the rules, its log-prob and the alternatives are the
    model's, all finite JSON numbers."""
    tok = reference.get_tokenizer()
    allowed = [tok.encode("a")[0], tok.encode("b")[0]]
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "seed": 1, "logprobs": True, "top_logprobs": 5,
            "allowed_token_ids": allowed}
    full = httpx.post(server[1] + "/v1/chat/completions", json=body, timeout=60).json()
    ref = _ref_chat(reference, USER, max_tokens=4, seed=1, logprobs=5, allowed_token_ids=allowed).outputs[0]
    for entry, t, alts in zip(full["choices"][0]["logprobs"]["content"], ref.token_ids, ref.logprobs):
        assert t in allowed and entry["logprob"] == pytest.approx(alts[t], abs=1e-6)
        assert len(entry["top_logprobs"]) == 5 and all(isinstance(x["logprob"], float) for x in entry["top_logprobs"])
    with httpx.stream("POST", server[1] + "/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                json.loads(line[6:], parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_echo_with_logprobs_scores_the_prompt(client, reference):
    ids = reference.get_tokenizer().encode("the quick brown fox")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=1)
    ref = reference.generate(ids, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1, logprobs=1),
                             use_tqdm=False)[0]
    lp = r.choices[0].logprobs
    n = len(ids)
    assert len(lp.tokens) == n + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [ref.prompt_logprobs[p][ids[p]] for p in range(1, n)]
    assert lp.token_logprobs[1:n] == pytest.approx(want, abs=1e-5)
    assert lp.token_logprobs[n:] == pytest.approx([d[t] for t, d in zip(ref.outputs[0].token_ids,
                                                                       ref.outputs[0].logprobs)], abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset)
    streamed = []
    for ch in client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True, logprobs=1,
                                        stream=True):
        for c in ch.choices:
            if c.logprobs:
                streamed += c.logprobs.token_logprobs
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def test_vllm_prompt_logprobs_field(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, extra_body={"prompt_logprobs": 2})
    plp = r.model_extra["prompt_logprobs"]
    ref = _ref_chat(reference, USER, max_tokens=1, prompt_logprobs=2)
    assert plp[0] is None and len(plp) == len(ref.prompt_token_ids)
    for p in range(1, len(plp)):
        tok = ref.prompt_token_ids[p]
        assert plp[p][str(tok)]["logprob"] == pytest.approx(ref.prompt_logprobs[p][tok], abs=1e-5)
        assert len(plp[p]) <= 3


def test_use_beam_search_equals_the_engines_beam_search(client, reference):
    from step3vl.engine import BeamSearchParams

    r = client.completions.create(model=MODEL, prompt="hello world", n=3, max_tokens=6,
                                  extra_body={"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5})
    want = reference.beam_search("hello world", BeamSearchParams(3, 6, ignore_eos=True, length_penalty=0.5))[0]
    assert [c.text for c in r.choices] == [s.output_text for s in want.sequences]
    assert r.usage.completion_tokens == sum(len(s.output_token_ids) for s in want.sequences)
    streamed = client.completions.create(model=MODEL, prompt="hello world", n=3, max_tokens=6, stream=True,
                                         extra_body={"use_beam_search": True, "ignore_eos": True,
                                                     "length_penalty": 0.5})
    texts = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(3)] == [c.text for c in r.choices]
    chat = client.chat.completions.create(model=MODEL, messages=USER, n=2, max_tokens=5,
                                          extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].finish_reason in ("stop", "length")
    for extra, param in [({"stop": ["x"]}, "stop"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                         ({"logprobs": 2}, "logprobs"), ({"guided_choice": ["a"]}, "use_beam_search")]:
        err = _error(lambda: client.completions.create(model=MODEL, prompt="a", max_tokens=3,
                                                       extra_body={"use_beam_search": True, **extra}))
        assert err.status_code == 400 and err.body["param"] == param
