"""Live progress: one tqdm bar per round, counting finished trajectories over all problems."""

from __future__ import annotations

import time

from tqdm.auto import tqdm


class RoundProgress:
    def __init__(self, schedule: list[int], num_problems: int, enabled: bool = True):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.tokens = 0
        self.schedule = list(schedule)
        self.bars = []
        if not enabled:
            return
        last = len(schedule) - 1
        for r, k in enumerate(schedule):
            name = "final" if r == last else f"round {r + 1}"
            self.bars.append(tqdm(total=k * num_problems, desc=f"{name} (K={k})", unit="traj", position=r,
                                  leave=True, dynamic_ncols=True))

    def trajectories_done(self, round_index: int, count: int, tokens: int) -> None:
        if not self.enabled or not count:
            return
        self.tokens += tokens
        bar = self.bars[round_index]
        bar.update(count)
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        bar.set_postfix_str(f"{self.tokens} tok, {rate:.0f} tok/s", refresh=False)

    def problem_skipped(self, from_round: int) -> None:
        """A problem that errored will not run its remaining rounds: shrink their totals."""
        if not self.enabled:
            return
        for r in range(from_round, len(self.bars)):
            bar = self.bars[r]
            bar.total = max(bar.n, bar.total - self.schedule[r])
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars:
            bar.close()

