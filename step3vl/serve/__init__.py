"""The OpenAI-compatible HTTP server (`step3vl serve`): FastAPI over `AsyncLLM`.

The names below are imported on first use, so that a light submodule (http_protocol, whose timeout default the
CLI reads while building `--help`) does not pull in FastAPI and the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from step3vl.lazy import lazy_exports

_EXPORTS = {"MediaPolicy": "step3vl.serve.media", "ChatCompletionRequest": "step3vl.serve.protocol",
            "RequestError": "step3vl.serve.protocol", "OpenAIServer": "step3vl.serve.server",
            "ServerConfig": "step3vl.serve.server"}

__all__ = ["OpenAIServer", "ServerConfig", "MediaPolicy", "ChatCompletionRequest", "RequestError"]

if TYPE_CHECKING:
    from step3vl.serve.media import MediaPolicy
    from step3vl.serve.protocol import ChatCompletionRequest, RequestError
    from step3vl.serve.server import OpenAIServer, ServerConfig


__getattr__ = lazy_exports(globals(), _EXPORTS)
