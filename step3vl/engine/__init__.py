from step3vl.engine.llm import LLM
from step3vl.engine.outputs import CompletionOutput, RequestOutput
from step3vl.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
