"""step3vl: STEP3-VL-10B in lean PyTorch, with a paged-KV engine built for PaCoRe."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine pulls in the processor and the native module: import it only when asked for.
    if name in ("LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "BeamSearchParams"):
        from step3vl import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'step3vl' has no attribute {name!r}")


__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "BeamSearchParams",
           "__version__"]
