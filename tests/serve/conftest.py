"""The server tests: a tiny checkpoint served over real HTTP on a background thread, and an independent
in-process `LLM` on the same checkpoint as the reference (seeded samples do not depend on the batch)."""

from __future__ import annotations

import openai
import pytest
import torch

from step3vl.engine import LLM, AsyncLLM
from step3vl.serve import OpenAIServer, ServerConfig
from step3vl.serve.background import BackgroundServer
from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

MODEL = "tiny"
ENGINE = dict(kv_cache_memory="8MiB", max_model_len=512)


@pytest.fixture(autouse=True, scope="module")
def _tiny_shapes_one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve-tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt, **ENGINE)


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    """(OpenAIServer, base URL) of a running server; reasoning split on."""
    engine = AsyncLLM(LLM(tiny_ckpt, **ENGINE))
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL))
    with BackgroundServer(srv.app) as url:
        yield srv, url
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


class Script:
    """A logits processor that writes `text` (after `</think>`) and then ends; empty text: the model is free."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.end = tokenizer.eos_token_ids[0]

    def say(self, text: str) -> None:
        self.ids = [self.tokenizer.think_end_id] + self.tokenizer.encode(text) if text else []

    def __call__(self, out_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not self.ids:
            return logits
        forced = self.ids[len(out_ids)] if len(out_ids) < len(self.ids) else self.end
        return torch.full_like(logits, float("-inf")).index_fill(0, torch.tensor([forced]), 0.0)


class CloseAt3:
    """Free text, with the reasoning closed at output position 3 (so the answer is what structured outputs shape)."""

    def __init__(self, think_id: int):
        self.think = think_id

    def __call__(self, out_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(out_ids) != 3:
            return logits.index_fill(0, torch.tensor([self.think]), float("-inf"))
        return torch.full_like(logits, float("-inf")).index_fill(0, torch.tensor([self.think]), 0.0)


def _serve(tiny_ckpt, processor_of):
    """A server whose every request goes through one logits processor (its context fits a prompt with tools)."""
    llm = LLM(tiny_ckpt, kv_cache_memory="16MiB", max_model_len=2048)
    proc = processor_of(llm.get_tokenizer())
    engine = AsyncLLM(llm)
    srv = OpenAIServer(engine, ServerConfig(served_model_name=MODEL, logits_processors=[proc]))
    return engine, srv, proc


@pytest.fixture(scope="module")
def scripted(tiny_ckpt):
    """(client, script, server): answers scripted with `script.say(text)`."""
    engine, srv, script = _serve(tiny_ckpt, Script)
    with BackgroundServer(srv.app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120), script, srv
    engine.shutdown()


@pytest.fixture(scope="module")
def free(tiny_ckpt):
    """A client whose model writes free text with `</think>` at output position 3."""
    engine, srv, _ = _serve(tiny_ckpt, lambda tok: CloseAt3(tok.think_end_id))
    with BackgroundServer(srv.app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    engine.shutdown()
