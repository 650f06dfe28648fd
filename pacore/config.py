"""PaCoReConfig: rounds, sampling, message bounds and the policies PACORE.md leaves to the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

PRESETS: dict[str, list[int]] = {"low": [4], "medium": [16], "high": [32, 4]}
UNCLOSED_POLICIES = ("drop", "keep")


@dataclass
class PaCoReConfig:
    """`rounds` are the parallel rounds; a final round of one trajectory is always appended.

    unclosed_policy: what a trajectory that never wrote `</think>` passes on. "drop" (default) passes nothing
    (what the official client gets from a reasoning-parsing server: no content); "keep" passes its whole text
    on, bounded like any message (the official `parse_answer` fallback). Aborted trajectories are always dropped.
    message_max_tokens bounds each message passed to the next round (None: unbounded, as the official client);
    the final answer is never cut.
    sampling_hook(problem_id, round_index, params) -> params lets callers adjust a round's sampling
    (e.g. logits processors in tests and benchmarks); it must keep params.n.
    """

    rounds: list[int] = field(default_factory=lambda: [16])
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 131072
    message_max_tokens: int | None = 4096
    seed: int = 42
    unclosed_policy: str = "drop"
    record_reasoning: bool = True  # keep each trajectory's reasoning in round_responses
    record_prompts: bool = False  # keep each round's prompt text in the result (debugging, tests)
    max_concurrent_problems: int | None = None  # None: every problem in flight at once
    sampling_hook: Callable | None = None

    def __post_init__(self) -> None:
        rounds = list(self.rounds)
        if not rounds or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in rounds):
            raise ValueError(f"PaCoReConfig.rounds = {self.rounds!r}: need a non-empty list of ints >= 1")
        self.rounds = rounds
        if self.unclosed_policy not in UNCLOSED_POLICIES:
            raise ValueError(f"PaCoReConfig.unclosed_policy = {self.unclosed_policy!r}: choose from {UNCLOSED_POLICIES}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"PaCoReConfig.max_tokens = {self.max_tokens!r}: must be an int >= 1")
        if self.message_max_tokens is not None and (not isinstance(self.message_max_tokens, int)
                                                    or self.message_max_tokens < 1):
            raise ValueError(f"PaCoReConfig.message_max_tokens = {self.message_max_tokens!r}: must be an int >= 1 "
                             f"or None")
        if self.max_concurrent_problems is not None and self.max_concurrent_problems < 1:
            raise ValueError(f"PaCoReConfig.max_concurrent_problems = {self.max_concurrent_problems!r}: must be >= 1")
        if not self.temperature >= 0.0:
            raise ValueError(f"PaCoReConfig.temperature = {self.temperature!r}: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"PaCoReConfig.top_p = {self.top_p!r}: must be in (0, 1]")

    @classmethod
    def preset(cls, name: str, **kwargs) -> "PaCoReConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown PaCoRe preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(rounds=list(PRESETS[name]), **kwargs)

    @property
    def schedule(self) -> list[int]:
        """Trajectories per round, the final round of one included."""
        return self.rounds + [1]

    @property
    def num_rounds(self) -> int:
        return len(self.rounds) + 1

    @property
    def trajectories_per_problem(self) -> int:
        return sum(self.schedule)
