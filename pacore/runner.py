"""PaCoRe as a thin round state machine over the engine's step API.

Every problem's current round is one engine request with n = K_r: the engine prefills the shared prompt
once and forks the K_r samples from it, and frees each sample's KV the moment it finishes. All problems
are in flight on the one engine; when the last sample of a problem's round finishes, its messages are
compacted and the next round's request is added at once, whatever the other problems are doing.

PaCoRe drives `llm.step()` itself, so it must be the engine's only user while `run` is going.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from step3vl.engine.sampling_params import SamplingParams

from pacore.compaction import compact_round, order_trajectories, passed_on
from pacore.config import PaCoReConfig
from pacore.problem import PreparedProblem, Problem, prepare
from pacore.progress import RoundProgress
from pacore.result import PaCoReResult, RoundStats
from pacore.template import synthesis_messages

THINK_END = "</think>"


def think_end_marker(tokenizer) -> list[int]:
    tid = getattr(tokenizer, "think_end_id", None)
    if tid is not None:
        return [tid]
    ids = tokenizer.encode(THINK_END)
    if not ids:
        raise ValueError(f"the tokenizer encodes {THINK_END!r} to no tokens")
    return list(ids)


def round_seed(seed: int, problem_id: str, round_index: int) -> int:
    """The sampling seed of one round: reproducible per (seed, problem, round), distinct across them."""
    h = hashlib.blake2b(f"{seed}\0{problem_id}\0{round_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def as_problem(p, index: int) -> Problem:
    if isinstance(p, Problem):
        return p
    if isinstance(p, dict):
        return Problem.from_record(p, default_id=f"req_{index}")
    raise TypeError(f"problem {index}: expected a pacore.Problem or an {{'id', 'messages'}} dict, "
                    f"got {type(p).__name__}")


@dataclass(eq=False)
class _State:
    problem: Problem
    result: PaCoReResult
    t0: float
    prepared: PreparedProblem | None = None
    round: int = 0
    request_id: str | None = None
    round_t0: float = 0.0
    samples_done: set = field(default_factory=set)  # indices of finished samples this round
    done: bool = False
    stats: list[RoundStats] = field(default_factory=list)


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

    def run_iter(self, problems: Iterable, progress: bool = False) -> Iterator[PaCoReResult]:
        """Yields each problem's result the moment it is complete (completion order)."""
        problems = [as_problem(p, i) for i, p in enumerate(problems)]
        dup = [pid for pid, c in Counter(p.id for p in problems).items() if c > 1]
        if dup:
            raise ValueError(f"duplicate problem id(s): {dup[:5]}")
        tag = f"pacore{next(self._runs)}"
        limit = self.config.max_concurrent_problems
        bar = RoundProgress(self.config.schedule, len(problems), progress)
        pending, active, live = deque(problems), {}, 0
        try:
            while pending or active:
                while pending and (limit is None or live < limit):
                    st = self._start(pending.popleft(), tag)
                    if st.done:
                        bar.problem_skipped(self._rounds_left(st))
                        yield st.result
                    else:
                        active[st.request_id] = st
                        live += 1
                if not active:
                    continue
                outs = self.llm.step()
                if not outs and not self.llm.has_unfinished_requests():
                    raise RuntimeError(f"the engine has no work left but {len(active)} PaCoRe round(s) are "
                                       f"unfinished (was one aborted from outside?)")
                for out in outs:
                    st = active.get(out.request_id)
                    if st is None:
                        continue  # not ours
                    self._count_done(st, out, bar)
                    if not out.finished:
                        continue
                    del active[out.request_id]
                    self._end_round(st, out, tag)
                    if st.done:
                        live -= 1
                        if st.result.error is not None:
                            bar.problem_skipped(self._rounds_left(st))
                        yield st.result
                    else:
                        active[st.request_id] = st
        finally:
            for rid in list(active):  # an early exit (exception, closed generator) leaves nothing running
                self.llm.abort(rid)
            bar.close()

    @staticmethod
    def _rounds_left(st: _State) -> int:
        """First round a failed problem did not run (its request was never added, or it ran)."""
        return st.round if st.request_id is None else st.round + 1

    # -- one problem ---------------------------------------------------------------------------------

    def _start(self, problem: Problem, tag: str) -> _State:
        st = _State(problem, PaCoReResult(request_id=problem.id), time.perf_counter())
        try:
            st.prepared = prepare(problem)
        except ValueError as e:
            self._fail(st, str(e))
            return st
        self._submit(st, 0, st.prepared.messages, tag)
        return st

    def _submit(self, st: _State, r: int, messages: list[dict], tag: str) -> None:
        cfg = self.config
        k = cfg.schedule[r]
        st.round, st.samples_done, st.round_t0, st.request_id = r, set(), time.perf_counter(), None
        stats = RoundStats(k=k)
        st.stats.append(stats)
        try:
            text, images = self.llm.processor.apply_chat_template(messages)
            if cfg.record_prompts:
                stats.prompt = text
            params = SamplingParams(n=k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                    seed=round_seed(cfg.seed, st.problem.id, r))
            if cfg.sampling_hook is not None:
                params = cfg.sampling_hook(st.problem.id, r, params)
                if params.n != k:
                    raise ValueError(f"sampling_hook changed n from {k} to {params.n}")
            rid = f"{tag}/{st.problem.id}/r{r}"
            self.llm.add_request({"prompt": text, "images": images}, params, request_id=rid)
        except Exception as e:  # a bad prompt fails its problem only (too long, bad image, template error)
            st.stats.pop()  # the round never ran
            self._fail(st, f"round {r + 1}: {type(e).__name__}: {e}")
            return
        st.request_id = rid

    def _count_done(self, st: _State, out, bar: RoundProgress) -> None:
        new = [c for c in out.outputs if c.finish_reason is not None and c.index not in st.samples_done]
        if new:
            st.samples_done.update(c.index for c in new)
            bar.trajectories_done(st.round, len(new), sum(len(c.token_ids) for c in new))

    def _end_round(self, st: _State, out, tag: str) -> None:
        cfg, r = self.config, st.round
        final = r == cfg.num_rounds - 1
        bound = None if final else cfg.message_max_tokens
        trajs = compact_round(out.outputs, self.tokenizer, self.marker, bound, cfg.unclosed_policy, self.device)
        stats, res = st.stats[r], st.result
        stats.prompt_tokens, stats.prefix_hit_tokens = len(out.prompt_token_ids), out.num_cached_tokens
        stats.generated_tokens = sum(t.num_tokens for t in trajs)
        stats.dropped = dict(Counter(t.dropped for t in trajs if t.dropped))
        stats.truncated = sum(t.truncated for t in trajs)
        stats.messages = sum(not t.dropped for t in trajs)
        stats.seconds = time.perf_counter() - st.round_t0
        res.tokens_per_round.append(stats.generated_tokens)
        if final:
            t = trajs[0]
            res.round_responses.append([t.record()])
            res.final_response, res.final_reasoning_content = t.message, t.reasoning
            if t.dropped:
                self._fail(st, f"final round: the trajectory gave no answer ({_why(t.dropped)}, "
                               f"finish_reason={t.finish_reason})")
            else:
                self._finish(st)
            return
        ordered = order_trajectories(trajs, cfg.seed)
        res.round_responses.append([t.record(cfg.record_reasoning) for t in ordered])
        messages = passed_on(ordered)
        if not messages:
            reasons = ", ".join(f"{n} {_why(k)}" for k, n in sorted(stats.dropped.items()))
            self._fail(st, f"round {r + 1}: none of its {len(trajs)} trajectories yielded a message ({reasons})")
            return
        p = st.prepared
        self._submit(st, r + 1, synthesis_messages(p.messages, messages, p.original_prompt), tag)

    def _fail(self, st: _State, error: str) -> None:
        st.result.error = error
        self._finish(st)

    def _finish(self, st: _State) -> None:
        res = st.result
        res.rounds = st.stats
        res.effective_ttc = sum(res.tokens_per_round)
        res.prompt_tokens = sum(s.prompt_tokens for s in st.stats)
        res.prefix_hit_tokens = sum(s.prefix_hit_tokens for s in st.stats)
        res.wall_time = time.perf_counter() - st.t0
        st.done = True


def _why(reason: str) -> str:
    return {"unclosed": "never closed its reasoning with </think> (unclosed_policy='drop')",
            "empty": "empty after </think>", "aborted": "aborted"}.get(reason, reason)
