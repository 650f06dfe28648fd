"""PaCoRe synthesis episodes for RL: one problem plus a sampled set of cached messages.

One episode is one synthesis step: the problem's conversation with its last user turn replaced by the
official synthesis template over M messages (|M| ~ U(min_refs, max_refs)) drawn without replacement
from a pool of cached responses (the conclusions of earlier trajectories). The policy writes one
trajectory for it and is rewarded for the correctness of its final message.

Instances whose drawn messages are mostly right already are filtered out (fraction correct >
max_correct_fraction), so that copying the majority cannot be what the policy learns.

Sampling is reproducible: each problem has its own `random.Random`, seeded from (seed, problem id)
with a stable hash, so an episode does not depend on the order of the problems or on PYTHONHASHSEED.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Iterable

from step3vl.train.rewards import RewardFn, math_reward
from step3vl.train.rl import RLPrompt

from step3vl_pacore.problem import Problem
from step3vl_pacore.result import PaCoReResult
from step3vl_pacore.template import synthesis_messages


@dataclass
class EpisodeConfig:
    min_refs: int = 16
    max_refs: int = 24
    # an instance is filtered out when the fraction of correct drawn messages is above this
    max_correct_fraction: float = 0.75
    seed: int = 0

    def __post_init__(self):
        for name in ("min_refs", "max_refs", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"EpisodeConfig.{name} must be an int, got {v!r}")
        if self.min_refs < 1:
            raise ValueError(f"EpisodeConfig.min_refs must be >= 1, got {self.min_refs}")
        if self.max_refs < self.min_refs:
            raise ValueError(f"EpisodeConfig.max_refs ({self.max_refs}) must be >= min_refs ({self.min_refs})")
        f = self.max_correct_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"EpisodeConfig.max_correct_fraction must be a number in [0, 1], got {f!r}")


@dataclass
class SynthesisEpisode:
    problem_id: str
    messages: list[dict]  # the synthesis conversation (system and earlier turns kept, image parts kept)
    ref_responses: list[str]  # the drawn messages, in the order they appear in the prompt
    ground_truth: Any
    ref_correct_fraction: float  # of ref_responses, by the reward function (reward > 0.5)

    def rl_prompt(self) -> RLPrompt:
        """This episode as a prompt of the RL loop (`step3vl.train.rl.RLTrainer.step`)."""
        return RLPrompt(self.messages, self.ground_truth, id=self.problem_id)


def episode_seed(seed: int, problem_id: str) -> int:
    """The seed of a problem's sampler: stable across processes (unlike hash()), distinct across problems."""
    h = hashlib.blake2b(f"episode\0{seed}\0{problem_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def make_episode(problem: Problem, pool: list[str], cfg: EpisodeConfig, rng: random.Random,
                 reward_fn: RewardFn = math_reward) -> SynthesisEpisode | None:
    """One episode for `problem` from `pool`, or None when its drawn messages are mostly correct.

    Draws |M| ~ U(min_refs, max_refs) messages without replacement; a pool smaller than |M| is used whole,
    shuffled. A message counts as correct when reward_fn(message, ground_truth) > 0.5.
    """
    if problem.ground_truth is None:
        raise ValueError(f"problem {problem.id!r} has no ground_truth: its episodes cannot be rewarded")
    if not pool:
        raise ValueError(f"problem {problem.id!r}: the pool of cached responses is empty")
    n = rng.randint(cfg.min_refs, cfg.max_refs)
    refs = rng.sample(pool, min(n, len(pool)))
    try:  # before filtering, so a malformed problem is an error whatever its draw
        messages = synthesis_messages(problem.messages, refs)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"problem {problem.id!r}: cannot render the synthesis prompt: {e}") from None
    correct = sum(reward_fn(r, problem.ground_truth) > 0.5 for r in refs) / len(refs)
    if correct > cfg.max_correct_fraction:
        return None
    return SynthesisEpisode(problem.id, messages, refs, problem.ground_truth, correct)


def pool_from_result(result: dict | PaCoReResult) -> list[str]:
    """The messages of a PaCoRe result record: every round's `round_responses` entries that were passed on
    (not dropped, non-empty `content`), round by round. Entries may be dicts or plain strings."""
    rec = result.to_dict() if isinstance(result, PaCoReResult) else result
    if not isinstance(rec, dict):
        raise ValueError(f"a PaCoRe result must be a dict or PaCoReResult, got {type(result).__name__}")
    rid = rec.get("request_id", "?")
    rounds = rec.get("round_responses")
    if not isinstance(rounds, list):
        raise ValueError(f"result {rid!r}: 'round_responses' must be a list of rounds, got {type(rounds).__name__}")
    pool = []
    for r, entries in enumerate(rounds):
        if not isinstance(entries, list):
            raise ValueError(f"result {rid!r}: round_responses[{r}] must be a list, got {type(entries).__name__}")
        for j, e in enumerate(entries):
            if isinstance(e, str):
                content = e
            elif isinstance(e, dict):
                if e.get("dropped"):
                    continue
                content = e.get("content")
                if not isinstance(content, str) and content is not None:
                    raise ValueError(f"result {rid!r}: round_responses[{r}][{j}]['content'] must be a string")
            else:
                raise ValueError(f"result {rid!r}: round_responses[{r}][{j}] must be a dict or a string")
            if content and content.strip():
                pool.append(content)
    return pool


def make_episodes(problems: Iterable[Problem | dict], pools: dict[str, list[str]], cfg: EpisodeConfig,
                  reward_fn: RewardFn = math_reward) -> list[SynthesisEpisode]:
    """The episodes of `problems` (in their order), filtered ones left out; deterministic given cfg.seed,
    and each problem's episode independent of the others and of their order."""
    out, seen = [], set()
    for i, p in enumerate(problems):
        p = p if isinstance(p, Problem) else Problem.from_record(p, default_id=f"req_{i}")
        if p.id in seen:
            raise ValueError(f"duplicate problem id {p.id!r}")  # same id, same seed: identical draws
        seen.add(p.id)
        if p.id not in pools:
            raise ValueError(f"problem {p.id!r} has no pool of cached responses")
        ep = make_episode(p, pools[p.id], cfg, random.Random(episode_seed(cfg.seed, p.id)), reward_fn)
        if ep is not None:
            out.append(ep)
    return out


class EpisodeBatches:
    """The prompts of an RL run on synthesis episodes: each step, up to `batch_size` episodes drawn afresh (new
    reference sets, seeded by (cfg.seed, step, problem id)) from problems taken in reshuffled passes; problems whose
    draw is filtered are passed over, at most one pass per step. Resumable (state_dict / load_state_dict)."""

    def __init__(self, problems: list[Problem], pools: dict[str, list[str]], cfg: EpisodeConfig, batch_size: int,
                 reward_fn: RewardFn = math_reward):
        from step3vl.train.run import PromptBatches

        usable = [p for p in problems if pools.get(p.id)]
        if not usable:
            raise ValueError("no problem has a pool of cached responses (match the results' request_id to the ids)")
        self.pools, self.cfg, self.batch_size, self.reward_fn = pools, cfg, batch_size, reward_fn
        self.order = PromptBatches(usable, 1, cfg.seed)

    def __call__(self, step: int) -> list[RLPrompt]:
        seed = episode_seed(self.cfg.seed, f"step{step}")
        ids = self.order.take_ids(len(self.order.prompts))  # every problem at most once this step
        episodes = []
        for used, i in enumerate(ids):
            if len(episodes) == self.batch_size:
                self.order.put_back(ids[used:])
                break
            p = self.order.prompts[i]
            ep = make_episode(p, self.pools[p.id], self.cfg, random.Random(episode_seed(seed, p.id)), self.reward_fn)
            if ep is not None:
                episodes.append(ep)
        if not episodes:
            raise ValueError(f"step {step}: every synthesis episode was filtered out (its references were mostly "
                             f"right already)")
        return [e.rl_prompt() for e in episodes]

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
