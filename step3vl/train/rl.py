"""Reinforcement learning with outcome rewards: the engine samples a group of responses per prompt, a reward
function scores each finished response, and the policy takes a clipped policy-gradient (PPO) step on
group-normalised advantages (GRPO). No value model, no KL term (PaCoRe's recipe, PACORE.md: strict on-policy,
no KL; GRPO-style advantages are its lighter common variant).

One iteration:
1. rollout: every prompt goes to the `LLM` with n = group_size and a seed of its own (reproducible);
2. reward: reward_fn(response text, answer) in [0, 1];
3. advantage: per group, r - mean (and / std with "grpo"); a group whose rewards are all equal carries no signal
   and is left out of the update;
4. update: token-level PPO loss on the response tokens, averaged over every response token of the iteration;
   each prompt is packed once with its group's responses as branches (share_prompt); `ppo_epochs` > 1 reuses
   the rollouts with the ratio against the policy that sampled them (clipped at 1 ± clip_eps);
5. sync: the engine receives the new weights (`LLM.update_weights`); with `engine_sleep_level` the engine sleeps
   through the update (its KV pool, and at level 2 its weights, freed for the trainer) and wakes after the sync.

The sampled distribution is softmax(logits / temperature); the policy's log-probabilities are taken at the same
temperature. top_p / top_k truncation is not modelled in the ratio (keep them off for RL, as the recipes do).
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from step3vl.distributed import DistEnv
from step3vl.engine import LLM, SamplingParams
from step3vl.model.vlm import Step3VLForCausalLM
from step3vl.train.checkpoint import load_train_state, read_train_state, save_train_state
from step3vl.train.data import IGNORE, PackedBatch, SampleGroup, TrainExample, pack, pack_groups, token_budget_batches
from step3vl.train.fsdp import full_tensors, is_sharded, shard_model
from step3vl.train.logprobs import target_logprobs
from step3vl.train.optim import OptimConfig, build_optimizer, clip_and_step
from step3vl.train.parallel import filler_example, lock_step, with_stand_in
from step3vl.train.pretrain import enable_activation_checkpointing, set_trainable, single_process

ADVANTAGES = ("grpo", "mean")


@dataclass
class RLConfig:
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.0))
    total_steps: int = 100  # for the lr schedule
    group_size: int = 8  # responses per prompt
    temperature: float = 1.0
    max_tokens: int = 1024  # per response
    # A response cut off at max_tokens gets this reward instead of reward_fn's (None: reward_fn decides). Its
    # reasoning may hold a tentative boxed answer that must not be rewarded as a conclusion.
    truncated_reward: float | None = 0.0
    advantage: str = "grpo"  # "grpo": (r - mean) / (std + eps); "mean": r - mean (no std scaling)
    clip_eps: float = 0.2
    ppo_epochs: int = 1  # 1 = strict on-policy
    max_tokens_per_batch: int = 8192  # packed micro-batch size in the update
    share_prompt: bool = True  # a group's responses train as branches of one prompt computed once
    # Truncated importance sampling: weight each token's loss by min(p_policy / p_engine, cap), correcting for the
    # sampler computing in another precision or with other kernels than the trainer (None: off). Needs
    # temperature 1 (the engine reports the log-probs of the unscaled distribution).
    engine_is_cap: float | None = None
    # KL penalty towards a frozen reference policy (k3 estimator, per token, averaged like the loss); 0: none, as in
    # PaCoRe's recipe. Needs RLTrainer(ref_model=...).
    kl_coef: float = 0.0
    train_vision: bool = False
    seed: int = 0
    chunk_rows: int = 1024
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU, with fp32 weights
    # LLM.sleep during the update, so the trainer has the device's memory: 1 frees the KV pool (and moves the engine's
    # weights to host memory on a GPU), 2 also discards the engine's weights (update_weights brings the new ones).
    engine_sleep_level: int | None = None

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"RLConfig.advantage = {self.advantage!r}: choose from {ADVANTAGES}")
        for name in ("group_size", "max_tokens", "ppo_epochs", "max_tokens_per_batch", "total_steps", "chunk_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name} = {getattr(self, name)!r}: must be an int >= 1")
        if not self.temperature > 0:
            raise ValueError(f"RLConfig.temperature = {self.temperature!r}: must be > 0 (RL samples)")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"RLConfig.clip_eps = {self.clip_eps!r}: must be in (0, 1)")
        if self.truncated_reward is not None and not 0.0 <= self.truncated_reward <= 1.0:
            raise ValueError(f"RLConfig.truncated_reward = {self.truncated_reward!r}: must be in [0, 1] or None")
        if self.engine_sleep_level not in (None, 1, 2):
            raise ValueError(f"RLConfig.engine_sleep_level = {self.engine_sleep_level!r}: choose None, 1 or 2")
        if not self.kl_coef >= 0.0:
            raise ValueError(f"RLConfig.kl_coef = {self.kl_coef!r}: must be >= 0")
        if self.engine_is_cap is not None and (not self.engine_is_cap >= 1.0 or self.temperature != 1.0):
            raise ValueError(f"RLConfig.engine_is_cap = {self.engine_is_cap!r}: must be >= 1, with temperature 1")


@dataclass
class RLPrompt:
    messages: list[dict]  # a chat; images as content parts
    answer: Any  # what reward_fn compares against
    id: str = ""


@dataclass
class Rollout:
    prompt_index: int
    sample_index: int
    prompt: TrainExample  # the prompt's ids, images and image slots: one object shared by its group
    response: list[int]  # the sampled tokens; all of them are targets
    text: str
    reward: float
    advantage: float = 0.0
    finish_reason: str | None = None
    engine_logprobs: list[float] = field(default_factory=list)

    @property
    def num_response_tokens(self) -> int:
        return len(self.response)

    @property
    def example(self) -> TrainExample:
        """Prompt + response as one sequence, targets on the response only."""
        p = self.prompt
        return TrainExample(p.input_ids + self.response, [IGNORE] * len(p) + self.response, p.images,
                            p.image_positions)


@dataclass
class TrainingBatch:
    rollouts: list[Rollout]  # in the order of their targets in `packed`
    packed: PackedBatch
    advantages: torch.Tensor  # [T]: each target position's advantage, 0 elsewhere
    engine_logprobs: torch.Tensor  # [T]: the engine's log-prob of each target as it sampled it, 0 elsewhere


@dataclass
class RLStepLog:
    step: int
    reward_mean: float
    solved_fraction: float  # responses with reward >= 0.5
    trained_groups: int  # groups with a non-zero advantage
    loss: float
    grad_norm: float
    lr: float
    response_tokens: int
    clip_fraction: float  # response tokens whose ratio was clipped
    kl: float | None  # mean per-token KL estimate to the reference policy (kl_coef > 0)
    logprob_gap: float | None  # mean |policy - engine| log-prob of the sampled tokens (temperature 1 only)
    rollout_seconds: float
    update_seconds: float
    sync_seconds: float  # handing the new weights to the engine
    eval_reward: float | None = None  # mean reward on held-out prompts, when evaluated after this step


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """rewards [G, n] -> advantages [G, n]: minus the group mean, and for "grpo" over the group's (unbiased)
    standard deviation; all-equal groups give zeros."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if kind == "mean":
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred[:, :1])
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def ppo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate -min(ratio A, clip(ratio) A) and whether each token was clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def _group_tokens(rollouts: list[Rollout]) -> int:
    """Packed size of rollouts sharing one prompt: the prefix once, then a branch of 1 + response each."""
    return len(rollouts[0].prompt) - 1 + sum(1 + len(r.response) for r in rollouts)


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


class RLTrainer:
    """`model`: the policy being trained (fp32 weights; its own copy, not the engine's). `llm`: the engine that
    samples, loaded from the same checkpoint. reward_fn(text, answer) -> float in [0, 1].
    env: the run's ranks; with more than one, the policy (and the reference) are sharded here (FSDP2), each rank's
    engine samples whole groups for its share of each step's prompts, and every engine gets the new weights."""

    def __init__(self, model: Step3VLForCausalLM, llm: LLM, reward_fn: Callable[[str, Any], float],
                 cfg: RLConfig | None = None, ref_model: Step3VLForCausalLM | None = None, env: DistEnv | None = None):
        self.model, self.llm, self.reward_fn = model, llm, reward_fn
        self.cfg = cfg or RLConfig()
        self.env = env or single_process(model)
        if self.cfg.kl_coef > 0 and ref_model is None:
            raise ValueError("RLConfig.kl_coef > 0 needs ref_model (e.g. a second load_model of the initial checkpoint)")
        self.ref_model = ref_model.requires_grad_(False).eval() if ref_model is not None else None
        set_trainable(model, self.cfg.train_vision)
        if self.cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.env.is_distributed:
            shard_model(model, self.env)
            if self.ref_model is not None:
                shard_model(self.ref_model, self.env)
        # One optimizer update per PPO epoch: the schedule spans them all. Built after sharding (FSDP2 replaces the
        # parameters with their shards).
        self.opt, self.sched = build_optimizer(model, self.cfg.optim, self.cfg.total_steps * self.cfg.ppo_epochs)
        self.steps_done = 0

    def save_state(self, path, source, extra: dict | None = None) -> None:
        """A resumable step checkpoint at `path` (weights, optimizer, schedule, steps done, which also seed the
        rollouts; `extra`: e.g. the prompt sampler's state); every rank calls it."""
        save_train_state(path, source, self.model, self.opt,
                         {"kind": "rl", "steps_done": self.steps_done, "scheduler": self.sched.state_dict(),
                          **(extra or {})}, self.env)

    def load_state(self, path) -> dict:
        """Resume from a step checkpoint (any world size): policy, optimizer and schedule restored, the engine given
        the policy's weights; returns the saved trainer state (with any `extra`)."""
        state = read_train_state(path)
        if state.get("kind") != "rl":
            raise ValueError(f"resume {path}: not an RL state (kind {state.get('kind')!r})")
        load_train_state(path, self.model, self.opt)
        self.sched.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]
        self.sync_engine()
        return state

    def sync_engine(self) -> None:
        """The engine takes the policy's weights (a sharded policy is gathered tensor by tensor on every rank)."""
        if is_sharded(self.model):
            self.llm.update_weights(full_tensors(self.model))
        else:
            self.llm.update_weights(self.model.state_dict())

    # -- rollout ------------------------------------------------------------------------------------

    def evaluate(self, prompts: list[RLPrompt], samples: int = 1, seed: int = 12345) -> float:
        """Mean reward of `samples` responses per held-out prompt under the current policy (the engine's
        weights), sampled like the rollouts (same temperature, max_tokens and truncation reward) with fixed
        seeds, so evaluations at different steps compare the policies, not the draws."""
        if not prompts:
            raise ValueError("RLTrainer.evaluate: no prompts")
        mine = self.env.shard(list(range(len(prompts))))  # each rank's engine samples its share
        requests = [self._request(prompts[i]) for i in mine]
        params = [self._params(samples, _stable_seed(seed, i, prompts[i].id)) for i in mine]
        outs = self.llm.generate(requests, params, use_tqdm=False) if mine else []
        rewards = [self._reward(c, prompts[i].answer, i) for i, out in zip(mine, outs) for c in out.outputs]
        return self.env.all_sum(sum(rewards)) / self.env.all_sum(len(rewards))

    def _request(self, p: RLPrompt) -> dict:
        text, sources = self.llm.processor.apply_chat_template(p.messages, add_generation_prompt=True)
        return {"prompt": text, "images": sources}

    def _params(self, n: int, seed: int, logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(n=n, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens,
                              logprobs=logprobs, seed=seed)

    def _reward(self, completion, answer: Any, i: int) -> float:
        truncated = completion.finish_reason == "length" and self.cfg.truncated_reward is not None
        reward = self.cfg.truncated_reward if truncated else float(self.reward_fn(completion.text, answer))
        if not 0.0 <= reward <= 1.0 or math.isnan(reward):
            raise ValueError(f"prompt {i} sample {completion.index}: reward_fn returned {reward}, expected [0, 1]")
        return reward

    def rollout(self, prompts: list[RLPrompt], indices: list[int] | None = None) -> list[Rollout]:
        """Group of responses for each prompt; indices: each prompt's place in the step's whole batch (what seeds
        its samples, so a prompt draws the same samples on whichever rank samples it)."""
        indices = list(range(len(prompts))) if indices is None else indices
        requests, inputs, params = [], [], []
        for i, p in zip(indices, prompts):
            requests.append(self._request(p))
            inputs.append(self.llm.processor.process(requests[-1]["prompt"], requests[-1]["images"]))
            longest = len(inputs[-1].input_ids) + self.cfg.max_tokens
            if longest > self.cfg.max_tokens_per_batch:  # checked before any sampling work is spent
                raise ValueError(f"prompt {i} ({p.id!r}): {len(inputs[-1].input_ids)} prompt tokens + max_tokens "
                                 f"{self.cfg.max_tokens} exceed max_tokens_per_batch {self.cfg.max_tokens_per_batch}")
            params.append(self._params(self.cfg.group_size, _stable_seed(self.cfg.seed, self.steps_done, i, p.id), 0))
        outs = self.llm.generate(requests, params, use_tqdm=False) if prompts else []
        rollouts = []
        for i, (p, inp, out) in enumerate(zip(prompts, inputs, outs)):
            if out.prompt_token_ids != inp.input_ids:
                raise RuntimeError(f"prompt {i}: the engine tokenised the prompt differently from the processor")
            prompt = TrainExample(inp.input_ids, [IGNORE] * len(inp.input_ids), inp.images, inp.image_positions)
            for c in out.outputs:
                reward = self._reward(c, p.answer, i)
                lps = [d[t] for d, t in zip(c.logprobs or [], c.token_ids)]
                rollouts.append(Rollout(i, c.index, prompt, list(c.token_ids), c.text, reward,
                                        finish_reason=c.finish_reason, engine_logprobs=lps))
        return rollouts

    def assign_advantages(self, rollouts: list[Rollout], num_prompts: int) -> None:
        n = self.cfg.group_size
        rewards = torch.zeros(num_prompts, n, dtype=torch.float64)
        for r in rollouts:
            rewards[r.prompt_index, r.sample_index] = r.reward
        adv = group_advantages(rewards, self.cfg.advantage)
        for r in rollouts:
            r.advantage = float(adv[r.prompt_index, r.sample_index])

    # -- update -------------------------------------------------------------------------------------

    def training_batches(self, rollouts: list[Rollout]) -> list[TrainingBatch]:
        """Packed micro-batches of at most cfg.max_tokens_per_batch tokens. With cfg.share_prompt, the responses
        of one prompt are branches of one copy of it (a group too large for one batch is split, each part with
        the prompt); otherwise each response is packed with its own copy of the prompt."""
        budget = self.cfg.max_tokens_per_batch
        if not self.cfg.share_prompt:
            return [self._batch(g, pack([r.example for r in g]), [len(r.prompt) - 1 for r in g])
                    for g in token_budget_batches(rollouts, budget, key=lambda r: len(r.prompt) + len(r.response))]
        units: list[list[Rollout]] = []  # consecutive rollouts of one prompt that fit one batch together
        size = 0
        for r in rollouts:
            if not units or units[-1][0].prompt is not r.prompt or size + 1 + len(r.response) > budget:
                units.append([])
                size = len(r.prompt) - 1
            units[-1].append(r)
            size += 1 + len(r.response)
        out = []
        for part in token_budget_batches(units, budget, key=_group_tokens):
            packed = pack_groups([SampleGroup(u[0].prompt, [r.response for r in u]) for u in part])
            flat = [r for u in part for r in u]
            out.append(self._batch(flat, packed, [len(u[0].prompt) - 1 if r is u[0] else 0 for u in part for r in u]))
        return out

    @staticmethod
    def _batch(rollouts: list[Rollout], packed: PackedBatch, lead: list[int]) -> TrainingBatch:
        """lead[i]: positions before rollout i's span that carry no advantage (its prompt but the last token, or
        its group's prefix). The span is the position that predicts the first response token (the prompt's last
        token) and the response; its last position predicts nothing (masked by the targets)."""
        parts = []
        for r, n in zip(rollouts, lead):
            parts += [torch.zeros(n), torch.full((1 + len(r.response),), r.advantage)]
        is_target = packed.targets != IGNORE
        adv = torch.cat(parts).to(torch.float32) * is_target
        engine = torch.zeros(len(packed.targets))
        if all(len(r.engine_logprobs) == len(r.response) for r in rollouts):
            engine[is_target] = torch.tensor([x for r in rollouts for x in r.engine_logprobs], dtype=torch.float32)
        return TrainingBatch(rollouts, packed, adv, engine)

    def update(self, rollouts: list[Rollout]) -> tuple[float, float, float, float | None, float | None]:
        """PPO epochs over the rollouts that carry a signal -> (loss, grad norm, clip fraction, gap, kl)."""
        # Without a KL term, a zero-advantage response contributes nothing; with one, every response does.
        active = [r for r in rollouts if r.num_response_tokens > 0 and (r.advantage != 0.0 or self.cfg.kl_coef > 0)]
        if not self.env.all_sum(len(active)):  # every group's rewards were equal: nothing to learn from this batch
            return 0.0, 0.0, 0.0, None, None
        batches = self.training_batches(active) if active else []
        self.model.train()
        ref = None
        if self.cfg.kl_coef > 0:
            with torch.no_grad():
                ref = self._logprobs_all(batches, self.ref_model)
        old = None  # one epoch is on-policy: the training pass itself gives the old log-probs (ratio 1)
        if self.cfg.ppo_epochs > 1:
            with torch.no_grad():
                old = self._logprobs_all(batches, self.model)
        loss = clip_frac = norm = 0.0
        kl = None
        for _ in range(self.cfg.ppo_epochs):
            loss, clip_frac, kl, seen = self.accumulate_gradients(batches, old, ref)
            old = old or seen
            norm = clip_and_step(self.model, self.opt, self.sched, self.cfg.optim.max_grad_norm)
        self.model.eval()
        return loss, norm, clip_frac, self._logprob_gap(batches, old), kl

    def _logprobs(self, b: TrainingBatch, model: Step3VLForCausalLM | None = None) -> torch.Tensor:
        model = model or self.model
        autocast = (torch.autocast(model.device.type, dtype=self.cfg.autocast_dtype)
                    if self.cfg.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            return target_logprobs(model, b.packed, self.cfg.chunk_rows, self.cfg.temperature)

    def _lock_step(self, batches: list[TrainingBatch], run: Callable[[int, TrainingBatch, float], None],
                   model: Step3VLForCausalLM) -> None:
        """run() over the batches in step with the other ranks (parallel.lock_step)."""
        lock_step(self.env, model, batches, run, self._filler, lambda b: bool(b.packed.images),
                  lambda b: self._with_stand_in(b, model))

    def _logprobs_all(self, batches: list[TrainingBatch], model: Step3VLForCausalLM) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        self._lock_step(batches, lambda k, b, w: out.append(self._logprobs(b, model)), model)
        return out

    @staticmethod
    def _filler() -> TrainingBatch:
        packed = pack([filler_example()])
        zeros = torch.zeros(len(packed.targets))
        return TrainingBatch([], packed, zeros, zeros.clone())

    @staticmethod
    def _with_stand_in(b: TrainingBatch, model: Step3VLForCausalLM) -> TrainingBatch:
        packed = with_stand_in(b.packed, model)
        pad = torch.zeros(len(packed.targets) - len(b.packed.targets))
        return TrainingBatch(b.rollouts, packed, torch.cat([b.advantages, pad]), torch.cat([b.engine_logprobs, pad]))

    def accumulate_gradients(self, batches: list[TrainingBatch], old: list[torch.Tensor] | None,
                             ref: list[torch.Tensor] | None = None
                             ) -> tuple[float, float, float | None, list[torch.Tensor]]:
        """Backward of the PPO loss (+ kl_coef × the k3 KL estimate exp(r) - r - 1, r = ref - policy log-prob),
        averaged over every response token of all batches of all ranks (no optimizer step).
        old: the sampling policy's log-probs per batch; None = this pass's own (on-policy, ratio 1).
        ref: the reference policy's log-probs per batch (with kl_coef > 0).
        Returns (loss, fraction of tokens clipped, mean KL or None, this pass's log-probs, detached)."""
        n_tokens = self.env.all_sum(sum(b.packed.num_targets for b in batches))
        # FSDP averages the ranks' gradients: scaled by world_size they sum, as one process's would.
        world = float(self.env.world_size)
        sums = {"loss": 0.0, "clipped": 0.0, "kl": 0.0}
        seen: list[torch.Tensor] = []

        def run(k: int, b: TrainingBatch, weight: float) -> None:
            mask = (b.packed.targets != IGNORE).to(self.model.device)
            adv = b.advantages.to(self.model.device)
            logp = self._logprobs(b)
            seen.append(logp.detach())
            old_lp = seen[-1] if old is None else old[k]
            loss_tok, was_clipped = ppo_token_loss(logp, old_lp, adv, self.cfg.clip_eps)
            if self.cfg.engine_is_cap is not None:
                if any(len(r.engine_logprobs) != len(r.response) for r in b.rollouts):
                    raise ValueError("engine_is_cap needs the engine's log-prob of every response token")
                behaviour = b.engine_logprobs.to(old_lp.device)
                loss_tok = loss_tok * torch.exp(old_lp - behaviour).clamp(max=self.cfg.engine_is_cap)
            if ref is not None:
                r = (ref[k] - logp) * mask
                kl_tok = torch.exp(r) - r - 1
                loss_tok = loss_tok + self.cfg.kl_coef * kl_tok
                sums["kl"] += weight * float((kl_tok.detach() * mask).sum())
            loss = (loss_tok * mask).sum() * (world * weight) / n_tokens
            loss.backward()
            sums["loss"] += loss.item() / world
            sums["clipped"] += weight * int((was_clipped & mask).sum())

        self._lock_step(batches, run, self.model)
        total = {k: self.env.all_sum(v) for k, v in sums.items()}
        return (total["loss"], total["clipped"] / n_tokens, total["kl"] / n_tokens if ref is not None else None,
                seen)

    def _logprob_gap(self, batches: list[TrainingBatch], old: list[torch.Tensor]) -> float | None:
        """Mean |policy - engine| log-prob of the sampled tokens over all ranks (None at temperature != 1)."""
        if self.cfg.temperature != 1.0:
            return None
        total, count = 0.0, 0
        for b, lp in zip(batches, old):
            if all(len(r.engine_logprobs) == len(r.response) for r in b.rollouts):
                is_target = b.packed.targets != IGNORE
                diff = (lp.cpu()[:len(is_target)][is_target] - b.engine_logprobs[is_target]).abs()
                total, count = total + float(diff.sum()), count + diff.numel()
        count = self.env.all_sum(count)
        return self.env.all_sum(total) / count if count else None

    # -- the loop -----------------------------------------------------------------------------------

    def step(self, prompts: list[RLPrompt]) -> RLStepLog:
        """One iteration on `prompts` (the whole step's batch; under N ranks each samples and trains on its share,
        whole groups each)."""
        if not prompts:
            raise ValueError("RLTrainer.step: no prompts")
        t0 = time.perf_counter()
        mine = self.env.shard(list(range(len(prompts))))
        rollouts = self.rollout([prompts[i] for i in mine], mine)
        self.assign_advantages(rollouts, len(mine))
        t1 = time.perf_counter()
        lr = self.opt.param_groups[0]["lr"]
        sleep = self.cfg.engine_sleep_level
        if sleep is not None:
            self.llm.sleep(sleep)
        try:
            loss, norm, clip_frac, gap, kl = self.update(rollouts)
        except BaseException:
            if sleep is not None:  # wake mirroring the policy, not the checkpoint the engine was loaded from
                self.sync_engine()
                self.llm.wake_up()
            raise
        t2 = time.perf_counter()
        self.sync_engine()
        if sleep is not None:
            self.llm.wake_up()
        self.steps_done += 1
        total = lambda xs: self.env.all_sum(float(sum(xs)))  # noqa: E731
        count = total(1 for _ in rollouts)
        trained = total(1 for i in {r.prompt_index for r in rollouts if r.advantage != 0.0})
        return RLStepLog(self.steps_done, total(r.reward for r in rollouts) / count,
                         total(r.reward >= 0.5 for r in rollouts) / count, int(trained), loss, norm, lr,
                         int(total(r.num_response_tokens for r in rollouts)), clip_frac, kl, gap,
                         t1 - t0, t2 - t1, time.perf_counter() - t2)
