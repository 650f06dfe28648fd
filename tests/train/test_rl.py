"""RL with outcome rewards: advantages and the clipped loss against hand-computed values, the update's gradient
against a per-sequence plain-PyTorch reference, engine/policy log-prob agreement, weight sync, and learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image

from step3vl.engine import LLM, SamplingParams
from step3vl.loader import load_model
from step3vl.model.attention import DenseAttention
from step3vl.saver import save_checkpoint
from step3vl.train.data import IGNORE, TrainExample
from step3vl.train.optim import OptimConfig
from step3vl.train.rl import RLConfig, RLPrompt, RLTrainer, Rollout, group_advantages, ppo_token_loss




def _contains(text: str, answer: str) -> float:
    return float(answer in text)


PROMPTS = [RLPrompt([{"role": "user", "content": "Say cat."}], "a", id="p0"),
           RLPrompt([{"role": "user", "content": "Hello?"}], "e", id="p1")]


# -- advantages and the surrogate -------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    std0 = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    std2 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    want = torch.tensor([[0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], [0, 0, 0, 0],
                         [0.75 / std2, -0.25 / std2, -0.25 / std2, -0.25 / std2]], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, "grpo", eps=0.0), want)
    torch.testing.assert_close(group_advantages(r, "mean"), r - r.mean(1, keepdim=True))
    # One sample per group: no spread, no signal.
    assert group_advantages(torch.tensor([[1.0], [0.0]]), "grpo").abs().sum() == 0


def test_ppo_token_loss_clips_only_in_the_advantage_direction():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = ppo_token_loss(logp, old, adv, clip_eps=0.2)
    # ratio 1.5, A>0: min(1.5, 1.2) -> 1.2 (clipped); A<0: min(-1.5, -1.2) -> -1.5 (not clipped);
    # ratio 0.5, A>0: min(0.5, 0.8) -> 0.5 (not); A<0: min(-0.5, -0.8) -> -0.8 (clipped).
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="RLConfig.advantage"):
        RLConfig(advantage="ppo")
    with pytest.raises(ValueError, match="RLConfig.group_size"):
        RLConfig(group_size=0)
    with pytest.raises(ValueError, match="RLConfig.temperature"):
        RLConfig(temperature=0.0)


# -- the update's gradient against a plain reference ------------------------------------------------

def _response_logprobs(model, r: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log p(response tokens) of one rollout run alone with full logits."""
    ids = torch.tensor(r.example.input_ids)
    hidden = model(ids, torch.arange(len(ids)), DenseAttention([len(ids)]))
    logp = torch.log_softmax(model.compute_logits(hidden).float() / temperature, -1)
    labels = torch.tensor(r.example.labels)
    rows = (labels[1:] != IGNORE).nonzero()[:, 0]
    return logp[rows, labels[1:][rows]]


def _reference_grads(model, rollouts: list[Rollout], temperature: float, weights=None) -> dict[str, torch.Tensor]:
    """-(1/N) sum_r A_r sum_t w_t log p(response token t), each sequence run alone with full logits (the PPO
    surrogate's gradient at ratio 1; w = 1 unless given per rollout)."""
    model = copy.deepcopy(model)
    n_tokens = sum(r.num_response_tokens for r in rollouts)
    total = 0.0
    for i, r in enumerate(rollouts):
        w = 1.0 if weights is None else weights[i]
        total = total - r.advantage * (w * _response_logprobs(model, r, temperature)).sum()
    (total / n_tokens).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _rollouts() -> list[Rollout]:
    """Three prompts with three, one and two responses of various lengths; each group's rollouts share their
    prompt object, as the trainer's rollouts do."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 400, (n,), generator=g).tolist()  # noqa: E731
    out = []
    for i, (plen, responses) in enumerate([(7, [(5, 1.3), (2, -0.7), (6, 0.2)]), (3, [(9, -0.4)]),
                                           (11, [(1, 0.8), (4, -1.1)])]):
        prompt = TrainExample(rand(plen), [IGNORE] * plen)
        for j, (n, adv) in enumerate(responses):
            out.append(Rollout(i, j, prompt, rand(n), "", 0.0, adv, "length", [0.0] * n))
    return out


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "activation-checkpointing"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prefix", "one-copy-each"])
@pytest.mark.parametrize("on_policy", [True, False], ids=["old-from-this-pass", "old-given"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_update_gradient_matches_per_sequence_reference(tiny_ckpt, temperature, on_policy, share_prompt,
                                                        checkpointing):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    model.requires_grad_(True)
    rollouts = _rollouts()
    want = _reference_grads(model, rollouts, temperature)
    # A tight token budget splits the rollouts over several packed micro-batches (and the first group in two).
    cfg = RLConfig(temperature=temperature, max_tokens_per_batch=20, chunk_rows=4, share_prompt=share_prompt,
                   activation_checkpointing=checkpointing)
    trainer = RLTrainer(model, llm=None, reward_fn=_contains, cfg=cfg)
    batches = trainer.training_batches(rollouts)
    assert len(batches) >= 3
    assert sum(b.packed.num_targets for b in batches) == sum(r.num_response_tokens for r in rollouts)
    old = None
    if not on_policy:
        with torch.no_grad():
            old = [trainer._logprobs(b) for b in batches]
    trainer.accumulate_gradients(batches, old)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prompt_packs_each_prompt_once():
    rollouts = _rollouts()
    shared = RLTrainer.__new__(RLTrainer)
    shared.cfg = RLConfig(max_tokens_per_batch=4096, share_prompt=True)
    (batch,) = shared.training_batches(rollouts)
    prompts = {id(r.prompt): len(r.prompt) for r in rollouts}
    assert len(batch.packed.input_ids) == sum(p - 1 for p in prompts.values()) + sum(
        1 + r.num_response_tokens for r in rollouts)
    shared.cfg = RLConfig(max_tokens_per_batch=4096, share_prompt=False)
    (plain,) = shared.training_batches(rollouts)
    assert len(plain.packed.input_ids) == sum(len(r.prompt) + r.num_response_tokens for r in rollouts)


# -- with the engine --------------------------------------------------------------------------------

def _trainer(ckpt, **kw) -> RLTrainer:
    llm = LLM(ckpt, kv_cache_memory="16MiB")
    model = load_model(ckpt, dtype=torch.float32)
    # The random-weight model rarely ends a response by itself: the toy rewards judge truncated text too.
    cfg = RLConfig(**{"optim": OptimConfig(lr=3e-3, weight_decay=0.0), "group_size": 8, "max_tokens": 8,
                      "total_steps": 20, "truncated_reward": None, **kw})
    return RLTrainer(model, llm, _contains, cfg)


def test_rollout_groups_rewards_and_engine_logprobs(tiny_ckpt):
    tr = _trainer(tiny_ckpt)
    rollouts = tr.rollout(PROMPTS)
    assert len(rollouts) == 2 * 8
    for r in rollouts:
        prompt_len = sum(t == IGNORE for t in r.example.labels)
        response = r.example.input_ids[prompt_len:]
        assert r.example.labels[prompt_len:] == response and 1 <= len(response) <= 8
        assert r.reward == _contains(r.text, PROMPTS[r.prompt_index].answer)
        assert len(r.engine_logprobs) == len(response)
    # The engine drew what the policy would: its log-probs equal the trainer's recomputation (fp32 both sides).
    tr.assign_advantages(rollouts, 2)
    loss, norm, clip_frac, gap, kl = tr.update(rollouts)
    assert gap is not None and gap < 1e-4
    assert clip_frac == 0.0  # one epoch: ratio exactly 1
    # Same seeds, same step -> same rollouts (reproducible runs).
    tr2 = _trainer(tiny_ckpt)
    assert [r.example.input_ids for r in tr2.rollout(PROMPTS)] == [r.example.input_ids for r in rollouts]


def test_image_prompt_rollouts_train(tiny_ckpt):
    img = Image.new("RGB", (60, 40), (10, 200, 30))
    prompt = RLPrompt([{"role": "user", "content": [{"type": "image", "image": img},
                                                     {"type": "text", "text": "Colour?"}]}], "a", id="img")
    tr = _trainer(tiny_ckpt, group_size=4, train_vision=True)
    before = {n: p.detach().clone() for n, p in tr.model.vision_model.named_parameters()}
    log = tr.step([prompt])
    assert log.trained_groups == 1, "the fixed seeds give this group mixed rewards"
    changed = [n for n, p in tr.model.vision_model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "vision weights did not move although the group carried a signal"
    assert log.logprob_gap < 1e-4


def test_step_syncs_the_engine_with_the_policy(tiny_ckpt, tmp_path):
    tr = _trainer(tiny_ckpt)
    for _ in range(2):
        tr.step(PROMPTS)
    saved = save_checkpoint(tr.model, tmp_path / "policy", tiny_ckpt, dtype=None)
    fresh = LLM(saved, kv_cache_memory="16MiB")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0)
    a = tr.llm.generate(["Say cat."], greedy, use_tqdm=False)[0].outputs[0]
    b = fresh.generate(["Say cat."], greedy, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids
    assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-5)


def test_rl_raises_the_reward(tiny_ckpt):
    """A deterministic run (fixed seeds, one thread): the mean reward of the last steps beats the first."""
    tr = _trainer(tiny_ckpt)
    logs = [tr.step(PROMPTS) for _ in range(12)]
    first = sum(l.reward_mean for l in logs[:3]) / 3
    last = sum(l.reward_mean for l in logs[-3:]) / 3
    assert last > first + 0.15, [round(l.reward_mean, 3) for l in logs]


def test_bad_reward_is_an_error(tiny_ckpt):
    tr = _trainer(tiny_ckpt)
    tr.reward_fn = lambda text, answer: 2.0
    with pytest.raises(ValueError, match=r"reward_fn returned 2.0"):
        tr.step(PROMPTS)


def test_ppo_epochs_reuse_rollouts_and_the_schedule_spans_every_update(tiny_ckpt):
    tr = _trainer(tiny_ckpt, ppo_epochs=3, total_steps=2, clip_eps=0.05,
                  optim=OptimConfig(lr=3e-2, weight_decay=0.0, min_lr_ratio=0.0))
    rollouts = tr.rollout(PROMPTS)
    tr.assign_advantages(rollouts, 2)
    lrs = []
    tr.opt.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    loss, norm, clip_frac, gap, kl = tr.update(rollouts)
    assert len(lrs) == 3  # one optimizer update per epoch
    # 2 iterations x 3 epochs = 6 updates on the cosine: the first iteration's three are the top half of it.
    from step3vl.train.optim import lr_factor
    assert lrs == pytest.approx([3e-2 * lr_factor(i, 0, 6, 0.0) for i in range(3)])
    assert clip_frac > 0  # later epochs moved away from the sampling policy by more than clip_eps
    assert gap < 1e-4  # measured against the sampling policy, not the updated one


def test_truncated_responses_get_the_truncation_reward(tiny_ckpt):
    tr = _trainer(tiny_ckpt, max_tokens=2, truncated_reward=0.0)  # every response is cut off
    tr.reward_fn = lambda text, answer: 1.0
    rollouts = tr.rollout(PROMPTS)
    assert all(r.finish_reason == "length" and r.reward == 0.0 for r in rollouts)
    tr.cfg.truncated_reward = None  # reward_fn decides
    assert all(r.reward == 1.0 for r in tr.rollout(PROMPTS))


def test_prompt_over_the_batch_budget_fails_before_sampling(tiny_ckpt):
    tr = _trainer(tiny_ckpt, max_tokens_per_batch=16)
    with pytest.raises(ValueError, match=r"prompt 0 \('p0'\): \d+ prompt tokens \+ max_tokens 8 exceed max_tokens_per_batch 16"):
        tr.rollout(PROMPTS)
    assert tr.llm.kv_stats()["decode_tokens_computed"] == 0


def test_a_groups_shared_image_is_encoded_once_with_the_same_result(tiny_ckpt):
    from step3vl.processor import Step3VLProcessor
    from step3vl.train.data import chat_example, pack
    from step3vl.train.logprobs import target_logprobs

    proc = Step3VLProcessor.from_pretrained(tiny_ckpt)
    img = Image.new("RGB", (60, 40), (10, 200, 30))
    ex = chat_example(proc, [{"role": "user", "content": [{"type": "image", "image": img},
                                                          {"type": "text", "text": "Colour?"}]},
                             {"role": "assistant", "content": "Green."}])
    twin = TrainExample(ex.input_ids, ex.labels, copy.deepcopy(ex.images), ex.image_positions)
    model = load_model(tiny_ckpt, dtype=torch.float32)
    model.requires_grad_(True)
    seen = []
    encode = model.encode_images
    model.encode_images = lambda images, *a: seen.append(len(images)) or encode(images, *a)
    first_vision = next(model.vision_model.parameters())
    shared = target_logprobs(model, pack([ex, ex]))
    shared.sum().backward()
    g_shared = first_vision.grad.clone()
    model.zero_grad()
    separate = target_logprobs(model, pack([ex, twin]))
    separate.sum().backward()
    g_separate = first_vision.grad
    assert seen == [1, 2]
    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_shared, g_separate, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prefix", "one-copy-each"])
def test_engine_importance_weights_are_truncated_ratios(tiny_ckpt, share_prompt):
    """With engine_is_cap, each token's loss is weighted by min(p_policy / p_engine, cap)."""
    model = load_model(tiny_ckpt, dtype=torch.float32)
    model.requires_grad_(True)
    rollouts = _rollouts()
    g = torch.Generator().manual_seed(1)
    weights = []
    with torch.no_grad():
        for r in rollouts:  # the engine's log-probs off by a known factor: ratios 3 (capped to 2), 0.5 or 1
            mine = _response_logprobs(model, r)
            shift = torch.tensor([3.0, 0.5, 1.0])[torch.randint(0, 3, (len(mine),), generator=g)]
            r.engine_logprobs = (mine - shift.log()).tolist()
            weights.append(shift.clamp(max=2.0))
    want = _reference_grads(model, rollouts, 1.0, weights)
    cfg = RLConfig(max_tokens_per_batch=20, engine_is_cap=2.0, share_prompt=share_prompt)
    trainer = RLTrainer(model, llm=None, reward_fn=_contains, cfg=cfg)
    trainer.accumulate_gradients(trainer.training_batches(rollouts), None)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="engine_is_cap"):
        RLConfig(engine_is_cap=2.0, temperature=0.7)


def test_engine_importance_weights_need_engine_logprobs(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    rollouts = _rollouts()
    rollouts[1].engine_logprobs = []
    trainer = RLTrainer(model, llm=None, reward_fn=_contains, cfg=RLConfig(engine_is_cap=2.0))
    with pytest.raises(ValueError, match="engine_is_cap needs the engine's log-prob of every response token"):
        trainer.accumulate_gradients(trainer.training_batches(rollouts), None)


def test_kl_penalty_gradient_matches_the_k3_formula(tiny_ckpt):
    """kl_coef > 0: every response (zero-advantage ones too) adds beta * (exp(r) - r - 1), r = log p_ref - log p."""
    model = load_model(tiny_ckpt, dtype=torch.float32)
    model.requires_grad_(True)
    ref_model = load_model(tiny_ckpt, dtype=torch.float32)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rollouts = _rollouts()
    rollouts[3].advantage = 0.0  # still trained: its KL term
    beta = 0.3
    reference = copy.deepcopy(model)
    n_tokens = sum(r.num_response_tokens for r in rollouts)
    total = 0.0
    for r in rollouts:
        logp = _response_logprobs(reference, r)
        with torch.no_grad():
            ref_lp = _response_logprobs(ref_model, r)
        d = ref_lp - logp
        total = total + (-r.advantage * logp + beta * (torch.exp(d) - d - 1)).sum()
    (total / n_tokens).backward()
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    trainer = RLTrainer(model, llm=None, reward_fn=_contains, ref_model=ref_model,
                        cfg=RLConfig(kl_coef=beta, max_tokens_per_batch=20))
    batches = trainer.training_batches(rollouts)
    with torch.no_grad():
        ref = [trainer._logprobs(b, ref_model) for b in batches]
    _, _, kl, _ = trainer.accumulate_gradients(batches, None, ref)
    assert kl > 0
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in ref_model.parameters())
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_model"):
        RLTrainer(model, llm=None, reward_fn=_contains, cfg=RLConfig(kl_coef=0.1))


def test_evaluate_is_the_mean_reward_of_seeded_samples(tiny_ckpt):
    tr = _trainer(tiny_ckpt, max_tokens=6)
    held = [RLPrompt([{"role": "user", "content": "Name a fruit."}], "a", id="h0"),
            RLPrompt([{"role": "user", "content": "Count to three."}], "e", id="h1")]
    first = tr.evaluate(held, samples=4)
    assert first == tr.evaluate(held, samples=4)  # fixed seeds: the same draws
    from step3vl.train.rl import _stable_seed
    want = []
    for i, p in enumerate(held):
        text, _ = tr.llm.processor.apply_chat_template(p.messages)
        params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=_stable_seed(12345, i, p.id))
        want += [_contains(c.text, p.answer) for c in tr.llm.generate([text], params, use_tqdm=False)[0].outputs]
    assert first == pytest.approx(sum(want) / len(want))


@pytest.mark.parametrize("level", [1, 2])
def test_engine_sleeping_through_the_updates_changes_nothing(tiny_ckpt, level):
    """The engine sleeps while the trainer updates (its pool, at level 2 its weights, freed) and wakes with the new
    policy: the run is the one without sleeping, step for step."""
    awake, sleeping = _trainer(tiny_ckpt), _trainer(tiny_ckpt, engine_sleep_level=level)
    for _ in range(2):
        a, b = awake.step(PROMPTS), sleeping.step(PROMPTS)
        assert (a.reward_mean, a.loss, a.response_tokens) == (b.reward_mean, pytest.approx(b.loss, abs=1e-6),
                                                              b.response_tokens)
        assert not sleeping.llm.is_sleeping()
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    assert (awake.llm.generate(["Say cat."], greedy, use_tqdm=False)[0].outputs[0].token_ids ==
            sleeping.llm.generate(["Say cat."], greedy, use_tqdm=False)[0].outputs[0].token_ids)
    with pytest.raises(ValueError, match="RLConfig.engine_sleep_level"):
        RLConfig(engine_sleep_level=3)
