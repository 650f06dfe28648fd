from step3vl.engine.async_llm import AsyncLLM, EngineDeadError
from step3vl.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from step3vl.engine.llm import LLM
from step3vl.engine.outputs import CompletionOutput, RequestOutput
from step3vl.engine.prompts import PreparedPrompt
from step3vl.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "EngineDeadError", "PreparedPrompt", "SamplingParams", "RequestOutput",
           "CompletionOutput", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"]
