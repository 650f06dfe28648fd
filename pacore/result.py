"""Per-problem result records: the official fields plus accounting."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RoundStats:
    k: int  # trajectories
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache
    generated_tokens: int = 0
    messages: int = 0  # messages passed on (for the final round: 1 with an answer)
    dropped: dict = field(default_factory=dict)  # reason -> count
    truncated: int = 0  # messages cut to message_max_tokens
    seconds: float = 0.0  # from the round's request to its last sample
    prompt: str | None = None  # only with PaCoReConfig.record_prompts


@dataclass
class PaCoReResult:
    request_id: str
    final_response: str = ""
    final_reasoning_content: str = ""
    round_responses: list = field(default_factory=list)  # per round: [{"content", "reasoning_content", ...}]
    tokens_per_round: list = field(default_factory=list)
    effective_ttc: int = 0  # effective test-time compute: every token generated for the problem
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    wall_time: float = 0.0
    rounds: list = field(default_factory=list)  # RoundStats
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)
