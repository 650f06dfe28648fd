"""vLLM's --generation-config: a model's generation_config.json gives the sampling defaults of requests that leave
them unset ("auto"), "vllm" ignores it, a folder path reads that folder's file. Reference: the same request with
the values given explicitly."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from step3vl.engine import LLM, SamplingParams
from step3vl.engine.async_llm import AsyncLLM
from step3vl.engine.generation_config import sampling_defaults
from step3vl.serve.background import BackgroundServer
from step3vl.serve.server import OpenAIServer

ENGINE = dict(kv_cache_memory="8MiB")


@pytest.fixture(scope="module")
def greedy_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny model with a generation config that asks for greedy decoding and 3 new tokens."""
    out = tmp_path_factory.mktemp("genconf") / "ckpt"
    shutil.copytree(tiny_ckpt, out)
    conf = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**conf, "temperature": 0.0, "top_k": 5,
                                                            "max_new_tokens": 3, "do_sample": False}))
    return out


def test_sampling_defaults_read_the_file(greedy_ckpt, tmp_path):
    assert sampling_defaults("auto", greedy_ckpt) == {"temperature": 0.0, "top_p": 1.0, "top_k": 5, "max_tokens": 3}
    assert sampling_defaults("vllm", greedy_ckpt) == {}
    assert sampling_defaults(str(greedy_ckpt), tmp_path) == sampling_defaults("auto", greedy_ckpt)
    assert sampling_defaults("auto", tmp_path) == {}  # no file: nothing to apply
    with pytest.raises(ValueError, match=f"no generation_config.json in {tmp_path}"):
        sampling_defaults(str(tmp_path), greedy_ckpt)
    (tmp_path / "generation_config.json").write_text('{"top_p": 2.0}')
    with pytest.raises(ValueError, match=r"generation_config.json: .*top_p"):
        sampling_defaults(str(tmp_path), greedy_ckpt)


def test_llm_applies_them_when_no_params_are_given(greedy_ckpt):
    llm = LLM(greedy_ckpt, **ENGINE)
    default = llm.generate(["a b c"], use_tqdm=False)[0].outputs[0].token_ids
    explicit = llm.generate(["a b c"], SamplingParams(temperature=0.0, top_k=5, max_tokens=3),
                            use_tqdm=False)[0].outputs[0].token_ids
    assert len(default) == 3 and default == explicit
    assert llm.get_default_sampling_params().temperature == 0.0
    plain = LLM(greedy_ckpt, generation_config="vllm", **ENGINE)
    assert plain.sampling_defaults == {} and plain.get_default_sampling_params() == SamplingParams()


def test_the_server_fills_only_what_the_request_leaves_unset(greedy_ckpt):
    # chat: its max_tokens has no default of its own (/v1/completions keeps OpenAI's 16, as vLLM's does)
    srv = OpenAIServer(AsyncLLM(LLM(greedy_ckpt, **ENGINE)))
    name = srv.config.served_model_name
    with BackgroundServer(srv.app) as url:
        def complete(**body):
            r = httpx.post(url + "/v1/chat/completions", timeout=60,
                           json={"model": name, "messages": [{"role": "user", "content": "a b c"}], **body})
            assert r.status_code == 200, r.text
            return json.dumps(r.json()["choices"][0]["message"]), r.json()["usage"]["completion_tokens"]
        unset = complete()
        assert unset[1] == 3 and unset == complete(temperature=0.0, top_k=5, max_tokens=3)
        assert complete(max_tokens=5)[1] == 5  # what the request gives wins
        sampled = {complete(temperature=1.0, top_k=0, seed=s)[0] for s in range(6)}
        assert len(sampled) > 1  # and a temperature given turns the default greedy off
