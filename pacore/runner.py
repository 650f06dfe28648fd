"""PaCoRe on an `LLM`: the synchronous driver of every problem's round state machine (problem_run.py).

Every problem's current round is one engine request with n = K_r: the engine prefills the shared prompt
once and forks the K_r samples from it, and frees each sample's KV the moment it finishes. All problems
are in flight on the one engine; when the last sample of a problem's round finishes, its messages are
compacted and the next round's request is added at once, whatever the other problems are doing.

PaCoRe drives `llm.step()` itself, so it must be the engine's only user while `run` is going (a server shares
its engine through `AsyncLLM` and pacore/serve.py instead).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from typing import Iterable, Iterator

from step3vl_pacore.config import PaCoReConfig
from step3vl_pacore.problem import Problem
from step3vl_pacore.problem_run import ProblemRun, RoundRequest
from step3vl_pacore.progress import RoundProgress
from step3vl_pacore.result import PaCoReResult
from step3vl_pacore.seeds import THINK_END, round_seed, think_end_marker  # noqa: F401 - re-exported

__all__ = ["PaCoRe", "as_problem", "round_seed", "think_end_marker", "THINK_END"]


def as_problem(p, index: int) -> Problem:
    if isinstance(p, Problem):
        return p
    if isinstance(p, dict):
        return Problem.from_record(p, default_id=f"req_{index}")
    raise TypeError(f"problem {index}: expected a pacore.Problem or an {{'id', 'messages'}} dict, "
                    f"got {type(p).__name__}")


def check_unique_ids(problems: list[Problem]) -> None:
    dup = [pid for pid, c in Counter(p.id for p in problems).items() if c > 1]
    if dup:
        raise ValueError(f"duplicate problem id(s): {dup[:5]}")


class PaCoRe:
    def __init__(self, llm, config: PaCoReConfig | None = None):
        self.llm = llm
        self.config = config or PaCoReConfig()
        self.tokenizer = llm.get_tokenizer()
        self.marker = think_end_marker(self.tokenizer)
        self.device = llm.model.device
        self._runs = itertools.count()

    def run(self, problems: Iterable, progress: bool = False) -> list[PaCoReResult]:
        """Results in the order of `problems` (Problem objects or official {'id', 'messages'} records)."""
        problems = [as_problem(p, i) for i, p in enumerate(problems)]
        by_id = {r.request_id: r for r in self.run_iter(problems, progress)}
        return [by_id[p.id] for p in problems]

    def new_run(self, problem: Problem, tag: str, resume: dict | None = None) -> ProblemRun:
        return ProblemRun(problem, self.config, self.llm.processor, self.marker, self.device, tag, resume)

    def run_iter(self, problems: Iterable, progress: bool = False, journal=None) -> Iterator[PaCoReResult]:
        """Yields each problem's result the moment it is complete (completion order).
        journal: keeps finished rounds of unfinished problems (`journal.entry(id)` to resume from, `journal.record`
        called after each non-final round; see pacore/journal.py)."""
        problems = [as_problem(p, i) for i, p in enumerate(problems)]
        check_unique_ids(problems)
        tag = f"pacore{next(self._runs)}"
        limit = self.config.max_concurrent_problems
        bar = RoundProgress(self.config.schedule, len(problems), progress)
        pending, active = deque(problems), {}  # active: request id -> its ProblemRun
        try:
            while pending or active:
                while pending and (limit is None or len(active) < limit):  # one request per live problem
                    problem = pending.popleft()
                    run = self.new_run(problem, tag, journal.entry(problem.id) if journal is not None else None)
                    if self._submit(run, run.start(), active):
                        continue
                    bar.problem_skipped(run.rounds_left_from)
                    yield run.result
                if not active:
                    continue
                outs = self.llm.step()
                if not outs and not self.llm.has_unfinished_requests():
                    raise RuntimeError(f"the engine has no work left but {len(active)} PaCoRe round(s) are "
                                       f"unfinished (was one aborted from outside?)")
                for out in outs:
                    run = active.get(out.request_id)
                    if run is None:
                        continue  # not ours
                    bar.trajectories_done(run.round, *run.count_done(out))
                    if not out.finished:
                        continue
                    del active[out.request_id]
                    request = run.finish_round(out)
                    if journal is not None and request is not None and run.journal_entry is not None:
                        journal.record(run.journal_entry)
                    if self._submit(run, request, active):
                        continue
                    if run.result.error is not None:
                        bar.problem_skipped(run.rounds_left_from)
                    yield run.result
        finally:
            for rid in list(active):  # an early exit (exception, closed generator) leaves nothing running
                self.llm.abort(rid)
            bar.close()

    def _submit(self, run: ProblemRun, req: RoundRequest | None, active: dict) -> bool:
        """Add the run's next round to the engine; False when the problem is done (finished or failed)."""
        if req is None:
            return False
        try:
            self.llm.add_request(req.prompt, req.params, request_id=req.request_id)
        except Exception as e:  # a bad prompt fails its problem only (too long, bad image)
            run.submit_failed(e)
            return False
        active[req.request_id] = run
        return True
