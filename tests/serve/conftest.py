"""The server tests: a tiny checkpoint served over real HTTP on a background thread, and an independent
in-process `LLM` on the same checkpoint as the reference (seeded samples do not depend on the batch)."""

from __future__ import annotations

import openai
import pytest

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
