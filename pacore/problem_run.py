"""One problem's PaCoRe rounds as a state machine, independent of who drives the engine.

`start()` gives the first round's request; `finish_round(output)` compacts a finished round and gives the next
round's request (or None when the problem is done). The synchronous runner (`runner.py`, over `LLM.step`) and
the server's async driver (`serve.py`, over `AsyncLLM`) both drive this same machine, so a problem's prompts,
seeds, messages and result are the same whichever runs it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass

from step3vl.engine.sampling_params import SamplingParams

from step3vl_pacore.compaction import compact_round, order_trajectories, passed_on
from step3vl_pacore.config import PaCoReConfig
from step3vl_pacore.problem import PreparedProblem, Problem, prepare
from step3vl_pacore.result import PaCoReResult, RoundStats
from step3vl_pacore.seeds import round_seed
from step3vl_pacore.template import synthesis_messages


@dataclass(slots=True)
class RoundRequest:
    """What to add to the engine for one round: n = K_r samples of one shared prompt."""
    request_id: str
    prompt: dict  # {"prompt": text, "images": [...]}
    params: SamplingParams


class ProblemRun:
    """resume: a `journal_entry` of an earlier run of this problem with the same config: the run continues at
    the round after it, with that run's messages, records and stats (what it would have had uninterrupted)."""

    def __init__(self, problem: Problem, config: PaCoReConfig, processor, marker: list[int], device, tag: str,
                 resume: dict | None = None):
        self.problem, self.config, self.processor = problem, config, processor
        self.resume = resume
        self.journal_entry: dict | None = None  # set when a non-final round finishes: the state to resume from
        self.marker, self.device, self.tag = marker, device, tag
        self.result = PaCoReResult(request_id=problem.id)
        self.t0 = time.perf_counter()
        self.prepared: PreparedProblem | None = None
        self.round = 0
        self.request: RoundRequest | None = None  # the current round's, once it is built
        self.round_t0 = 0.0
        self.samples_done: set[int] = set()  # indices of this round's finished samples
        self.stats: list[RoundStats] = []
        self.done = False

    @property
    def rounds_left_from(self) -> int:
        """First round a failed problem did not run (its request was never added, or it ran)."""
        return self.round if self.request is None else self.round + 1

    def start(self) -> RoundRequest | None:
        try:
            self.prepared = prepare(self.problem)
        except ValueError as e:
            self._fail(str(e))
            return None
        if self.resume is not None:
            return self._resumed_request(self.resume)
        return self._round_request(0, self.prepared.messages)

    def _resumed_request(self, entry: dict) -> RoundRequest | None:
        r = int(entry["round"])
        if not 0 <= r < self.config.num_rounds - 1:
            self._fail(f"resume: the journal's round {r + 1} does not fit this config's {self.config.num_rounds} rounds")
            return None
        res = self.result
        res.round_responses = [list(x) for x in entry["round_responses"]]
        res.tokens_per_round = list(entry["tokens_per_round"])
        self.stats = [RoundStats(**d) for d in entry["stats"]]
        p = self.prepared
        return self._round_request(r + 1, synthesis_messages(p.messages, entry["messages"], p.original_prompt))

    def submit_failed(self, error: Exception) -> None:
        """The engine refused the round's request (too long, bad image): the problem fails, nothing else."""
        self.stats.pop()  # the round never ran
        self.request = None
        self._fail(f"round {self.round + 1}: {type(error).__name__}: {error}")

    def count_done(self, out) -> tuple[int, int]:
        """(newly finished samples, their tokens) in a progress update of this round's request."""
        new = [c for c in out.outputs if c.finish_reason is not None and c.index not in self.samples_done]
        self.samples_done.update(c.index for c in new)
        return len(new), sum(len(c.token_ids) for c in new)

    def finish_round(self, out) -> RoundRequest | None:
        """Compact a finished round; the next round's request, or None when the problem is done."""
        cfg, r = self.config, self.round
        final = r == cfg.num_rounds - 1
        trajs = compact_round(out.outputs, self.processor.tokenizer, self.marker,
                              None if final else cfg.message_max_tokens, cfg.unclosed_policy, self.device)
        self._record_round(out, trajs)
        if final:
            self._final(trajs[0])
            return None
        ordered = order_trajectories(trajs, cfg.seed)
        self.result.round_responses.append([t.record(cfg.record_reasoning) for t in ordered])
        messages = passed_on(ordered)
        if not messages:
            stats = self.stats[r]
            reasons = ", ".join(f"{n} {_why(k)}" for k, n in sorted(stats.dropped.items()))
            self._fail(f"round {r + 1}: none of its {len(trajs)} trajectories yielded a message ({reasons})")
            return None
        res = self.result
        self.journal_entry = {"request_id": self.problem.id, "round": r, "messages": messages,
                              "round_responses": [list(x) for x in res.round_responses],
                              "tokens_per_round": list(res.tokens_per_round),
                              "stats": [asdict(s) for s in self.stats[:r + 1]]}
        p = self.prepared
        return self._round_request(r + 1, synthesis_messages(p.messages, messages, p.original_prompt))

    # -- internals ------------------------------------------------------------------------------------

    def _round_request(self, r: int, messages: list[dict]) -> RoundRequest | None:
        cfg, k = self.config, self.config.schedule[r]
        self.round, self.samples_done, self.round_t0, self.request = r, set(), time.perf_counter(), None
        stats = RoundStats(k=k)
        self.stats.append(stats)
        try:
            text, images = self.processor.apply_chat_template(messages)
            if cfg.record_prompts:
                stats.prompt = text
            params = SamplingParams(n=k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                    seed=round_seed(cfg.seed, self.problem.id, r))
            if cfg.sampling_hook is not None:
                params = cfg.sampling_hook(self.problem.id, r, params)
                if params.n != k:
                    raise ValueError(f"sampling_hook changed n from {k} to {params.n}")
        except Exception as e:  # a bad prompt fails its problem only (template error, bad hook)
            self.submit_failed(e)
            return None
        self.request = RoundRequest(f"{self.tag}/{self.problem.id}/r{r}", {"prompt": text, "images": images}, params)
        return self.request

    def _record_round(self, out, trajs) -> None:
        stats, res = self.stats[self.round], self.result
        stats.prompt_tokens, stats.prefix_hit_tokens = len(out.prompt_token_ids), out.num_cached_tokens
        stats.generated_tokens = sum(t.num_tokens for t in trajs)
        stats.dropped = dict(Counter(t.dropped for t in trajs if t.dropped))
        stats.truncated = sum(t.truncated for t in trajs)
        stats.messages = sum(not t.dropped for t in trajs)
        stats.seconds = time.perf_counter() - self.round_t0
        res.tokens_per_round.append(stats.generated_tokens)

    def _final(self, t) -> None:
        res = self.result
        res.round_responses.append([t.record()])
        res.final_response, res.final_reasoning_content = t.message, t.reasoning
        if t.dropped:
            self._fail(f"final round: the trajectory gave no answer ({_why(t.dropped)}, "
                       f"finish_reason={t.finish_reason})")
        else:
            self._finish()

    def _fail(self, error: str) -> None:
        self.result.error = error
        self._finish()

    def _finish(self) -> None:
        res = self.result
        res.rounds = self.stats
        res.effective_ttc = sum(res.tokens_per_round)
        res.prompt_tokens = sum(s.prompt_tokens for s in self.stats)
        res.prefix_hit_tokens = sum(s.prefix_hit_tokens for s in self.stats)
        res.wall_time = time.perf_counter() - self.t0
        self.done = True


def _why(reason: str) -> str:
    return {"unclosed": "never closed its reasoning with </think> (unclosed_policy='drop')",
            "empty": "empty after </think>", "aborted": "aborted"}.get(reason, reason)
