"""The OpenAI-compatible HTTP server (`step3vl serve`): FastAPI over `AsyncLLM`."""

from step3vl.serve.media import MediaPolicy
from step3vl.serve.protocol import ChatCompletionRequest, RequestError
from step3vl.serve.server import OpenAIServer, ServerConfig

__all__ = ["OpenAIServer", "ServerConfig", "MediaPolicy", "ChatCompletionRequest", "RequestError"]
