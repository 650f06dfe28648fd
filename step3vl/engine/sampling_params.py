"""SamplingParams: vLLM's names and defaults, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from step3vl.engine.structured_outputs import StructuredOutputs


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # see engine/penalties.py
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (-1: as many as fit)
    min_tokens: int = 0  # EOS / stop ids masked and no stop checked before this many output tokens
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled (see engine/token_constraints.py)
    bad_words: list[str] | None = None  # words the output never contains (vLLM's; engine/token_constraints.py)
    # JSON schema / json_object / regex / choice / EBNF grammar; a dict of those fields is accepted too.
    structured_outputs: StructuredOutputs | dict | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None  # top-k alternatives per token, besides the sampled one
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (engine/prompt_logprobs.py)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM-style: fn(output_token_ids, logits_row [vocab]) -> logits_row, applied before sampling.
    logits_processors: list = field(default_factory=list)
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            unknown = set(self.structured_outputs) - {"json", "json_object", "regex", "choice", "grammar", "after_token"}
            if unknown:
                raise ValueError(f"SamplingParams.structured_outputs: unknown field(s) {sorted(unknown)}")
            self.structured_outputs = StructuredOutputs(**self.structured_outputs)
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self._check_containers()
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _check_containers(self) -> None:
        """Wrong container types fail here, naming the field, not deep inside a step."""
        def seq_of_ints(v) -> bool:
            return isinstance(v, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if self.stop_token_ids is not None and not seq_of_ints(self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids = {self.stop_token_ids!r}: must be a list of token ids")
        if self.allowed_token_ids is not None and not seq_of_ints(self.allowed_token_ids):
            raise ValueError(f"SamplingParams.allowed_token_ids = {self.allowed_token_ids!r}: must be a list of "
                             f"token ids")
        if self.bad_words is not None and not (isinstance(self.bad_words, (list, tuple)) and all(
                isinstance(w, str) and w.strip() for w in self.bad_words)):
            raise ValueError(f"SamplingParams.bad_words = {self.bad_words!r}: must be a list of non-blank strings")
        if self.logit_bias is not None and not (isinstance(self.logit_bias, dict) and all(
                isinstance(t, int) and isinstance(b, (int, float)) and not isinstance(b, bool)
                for t, b in self.logit_bias.items())):
            raise ValueError(f"SamplingParams.logit_bias = {self.logit_bias!r}: must map token ids (ints) to "
                             f"numbers")

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: {why}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an int >= 1")
        if not 0.0 <= self.temperature < float("inf"):
            raise bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be an int: -1 or 0 (off) or >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not (k >= 1 or k == -1)):
            raise bad("truncate_prompt_tokens", "must be an int >= 1, or -1 (as many as max_model_len allows)")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "must be in (0, 10] (1 means off)")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an int >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", "must be an int in [0, max_tokens]")
        if self.logit_bias is not None and any(not isinstance(t, int) or t < 0 or not -100 <= b <= 100
                                               for t, b in self.logit_bias.items()):
            raise bad("logit_bias", "must map token ids (ints >= 0) to biases in [-100, 100]")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or any(
                not isinstance(t, int) or t < 0 for t in self.allowed_token_ids)):
            raise bad("allowed_token_ids", "must be a non-empty list of token ids (ints >= 0)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0 or self.seed >= 2**63):
            raise bad("seed", "must be an int in [0, 2**63)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(name, "must be an int >= 0 or None")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative ints")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
