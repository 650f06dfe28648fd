"""vLLM's serve flags reach what they configure: each is given to `step3vl serve MODEL ...` in process (uvicorn's
run stubbed to capture the app), and the engine or server built from it is inspected."""

from __future__ import annotations

import httpx
import pytest

from step3vl.cli import main
from step3vl.engine import LLM, SamplingParams
from step3vl.serve.background import BackgroundServer


@pytest.fixture
def serve(tiny_ckpt, monkeypatch):
    """serve(*flags) -> (the app's OpenAIServer, uvicorn's options); serve returns (and shuts its engine down)
    once the stubbed uvicorn.run does."""
    import uvicorn

    from step3vl.serve import server as server_module

    built = {}
    original = server_module.OpenAIServer.__init__

    def keep(self, engine, config=None):
        original(self, engine, config)
        built["server"] = self

    monkeypatch.setattr(server_module.OpenAIServer, "__init__", keep)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: built.update(uvicorn=kw))

    def run(*flags: str):
        assert main(["serve", str(tiny_ckpt), "--kv-cache-memory", "8MiB", "--pacore-presets", "", *flags]) == 0
        return built["server"], built["uvicorn"]
    return run


def test_engine_flags(serve):
    srv, _ = serve("--seed", "7", "--max-logprobs", "3", "--gpu-memory-utilization", "0.3", "--max-num-seqs", "5",
                   "--no-enable-prefix-caching", "--tensor-parallel-size", "1", "--max-model-len", "256")
    cfg = srv.llm.config
    assert (cfg.seed, cfg.max_logprobs, cfg.gpu_memory_utilization, cfg.max_num_seqs) == (7, 3, 0.3, 5)
    assert cfg.enable_prefix_caching is False and srv.llm.max_model_len == 256
    assert srv.llm.engine.config.scheduler.max_num_seqs == 5


def test_reasoning_parser_and_tool_choice_flags(serve):
    assert serve("--reasoning-parser", "deepseek_r1")[0].config.reasoning_parser is True
    assert serve("--reasoning-parser", "none")[0].config.reasoning_parser is False
    assert serve("--enable-auto-tool-choice")[0].config.tool_call_parser is True


def test_uvicorn_log_level_and_image_limit(serve):
    srv, options = serve("--uvicorn-log-level", "trace", "--limit-mm-per-prompt", '{"image": 1}')
    assert options["log_level"] == "trace" and srv.config.max_images_per_prompt == 1
    with BackgroundServer(srv.app) as url:
        part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        r = httpx.post(url + "/v1/chat/completions", json={"model": srv.config.served_model_name, "max_tokens": 1,
                       "messages": [{"role": "user", "content": [part, part, {"type": "text", "text": "?"}]}]})
    # (refused before any picture is decoded, and before the engine: serve has shut it down already)
    assert r.status_code == 400 and "2 images are over this server's limit of 1" in r.json()["error"]["message"]


def test_a_bad_image_limit_is_refused(tiny_ckpt, capsys):
    assert main(["serve", str(tiny_ckpt), "--limit-mm-per-prompt", '{"video": 2}']) == 2
    assert "--limit-mm-per-prompt" in capsys.readouterr().err


def test_prefix_caching_off_shares_nothing_across_requests(tiny_ckpt):
    prompt, greedy = "the same prompt, long enough to fill a block or two " * 3, SamplingParams(max_tokens=2)
    on = LLM(tiny_ckpt, kv_cache_memory="8MiB")
    off = LLM(tiny_ckpt, kv_cache_memory="8MiB", enable_prefix_caching=False)
    for llm in (on, off):
        llm.generate([prompt], greedy, use_tqdm=False)
    assert on.generate([prompt], greedy, use_tqdm=False)[0].num_cached_tokens > 0
    again = off.generate([prompt], SamplingParams(n=3, max_tokens=2), use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and len(again.outputs) == 3


def test_generation_config_flag(serve, tiny_ckpt):
    auto = serve()[0].llm  # the tiny checkpoint's generation_config.json: temperature 1, top_p 1, top_k 0
    assert auto.config.generation_config == "auto" and auto.sampling_defaults == {"temperature": 1.0, "top_p": 1.0,
                                                                                    "top_k": 0}
    off = serve("--generation-config", "vllm")[0].llm
    assert off.config.generation_config == "vllm" and off.sampling_defaults == {}
    folder = serve("--generation-config", str(tiny_ckpt))[0].llm
    assert folder.sampling_defaults == auto.sampling_defaults


def test_connection_timeout_flags(serve):
    _, options = serve("--header-timeout", "7", "--timeout-keep-alive", "3")
    assert options["timeout_keep_alive"] == 3.0 and options["http"].header_timeout_s == 7.0
    _, options = serve()
    assert options["timeout_keep_alive"] == 5.0 and options["http"].header_timeout_s == 30.0
