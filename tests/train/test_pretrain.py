"""Next-token training: the loss and its gradients against transformers' Qwen3, chunked log-probs against a
plain log-softmax, gradient accumulation against one large batch with a hand-run AdamW, the schedule against
hand-computed values, activation checkpointing, frozen vision, and a short overfitting run."""

from __future__ import annotations

import math

import pytest
import torch

from step3vl.loader import load_model
from step3vl.train import pretrain as pretrain_mod
from step3vl.train.data import IGNORE, chat_example, pack, text_example
from step3vl.train.logprobs import hidden_states, next_token_loss, target_logprobs
from step3vl.train.optim import OptimConfig, build_optimizer, clip_and_step, lr_factor
from step3vl.train.pretrain import PretrainConfig, Pretrainer, set_trainable

VISION_PREFIXES = ("vision_model.", "vit_large_projector.")


@pytest.fixture
def tiny_model(tiny_ckpt):
    """A fresh fp32 copy of the tiny checkpoint for each call."""
    return lambda: load_model(tiny_ckpt, dtype=torch.float32)


def _text_examples(processor):
    return [
        text_example(processor, "The quick brown fox jumps over the lazy dog."),
        chat_example(processor, [{"role": "user", "content": "What is two plus two?"},
                                 {"role": "assistant", "content": "Four."}]),
        chat_example(processor, [{"role": "system", "content": "Answer in one word."},
                                 {"role": "user", "content": "Colour of the sky?"},
                                 {"role": "assistant", "content": "Blue."},
                                 {"role": "user", "content": "And grass?"},
                                 {"role": "assistant", "content": "Green, mostly."}]),
    ]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# -- (1) loss and gradients against transformers -----------------------------------------------------------

def test_loss_and_gradients_match_transformers(qwen3_ckpt, hf_qwen3, processor):
    exs = _text_examples(processor)
    assert len({len(ex) for ex in exs}) == 3  # different lengths: the packing is uneven
    ours = load_model(qwen3_ckpt, dtype=torch.float32, requires_grad=True)
    loss_sum, n = next_token_loss(ours, pack(exs))
    assert n == sum(sum(t != IGNORE for t in ex.labels[1:]) for ex in exs)
    loss = loss_sum / n
    loss.backward()

    # transformers: one sequence at a time, labels with -100 (it shifts them itself); its loss is the mean over
    # each sequence's targets, so the batch loss is the target-weighted mean.
    ref = 0.0
    for ex in exs:
        labels = torch.tensor([ex.labels])
        k = int((labels[0, 1:] != IGNORE).sum())
        ref = ref + hf_qwen3(input_ids=torch.tensor([ex.input_ids]), labels=labels).loss * k
    ref = ref / n
    ref.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    hf = dict(hf_qwen3.named_parameters())
    mine = dict(ours.named_parameters())
    assert set(mine) == set(hf)
    for name, p in mine.items():
        assert p.grad is not None and hf[name].grad is not None, name
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, hf[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# -- (2) chunked log-probs -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_a_plain_log_softmax(tiny_model, processor, temperature):
    batch = pack(_text_examples(processor))
    model = tiny_model()
    model.requires_grad_(True)
    w = torch.randn(len(batch.input_ids), generator=torch.Generator().manual_seed(0))  # a per-row weighting

    lp = target_logprobs(model, batch, chunk_rows=3, temperature=temperature)
    (lp * w).sum().backward()
    chunked = _grads(model)
    model.zero_grad(set_to_none=True)

    # Reference: the whole [T, vocab] logits at once, no checkpointing.
    logits = model.compute_logits(hidden_states(model, batch)).float() / temperature
    valid = batch.targets != IGNORE
    ref = torch.log_softmax(logits, -1).gather(-1, batch.targets.clamp(min=0)[:, None])[:, 0] * valid
    (ref * w).sum().backward()

    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-6)
    assert (lp[~valid] == 0).all() and (lp[valid] < 0).all()
    for name, g in _grads(model).items():
        if g is None:
            assert chunked[name] is None, name  # the vision tower: no image, no gradient either way
        else:
            # Chunks sum the LM head's gradient in another order: rounding-level differences only, measured
            # against the gradient's scale (an element that cancels to ~0 keeps the summands' rounding).
            atol = 1e-4 * float(g.abs().max())
            torch.testing.assert_close(chunked[name], g, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(target_logprobs(model, batch, chunk_rows=3, temperature=temperature), ref.detach(),
                                   rtol=1e-5, atol=1e-6)


# -- (3) gradient accumulation ---------------------------------------------------------------------------

def test_grad_accumulation_equals_one_large_batch(tiny_model, processor, monkeypatch):
    exs = _text_examples(processor)[1:]
    # eps=1 makes Adam's first step lr·g/(|g|+1): it depends on the gradient's scale, not just its sign; no
    # clipping (it would hide a scale error); no weight decay, so the reference is a plain AdamW.
    opt_cfg = OptimConfig(lr=1e-2, eps=1.0, weight_decay=0.0, max_grad_norm=None)
    calls = []
    real = pretrain_mod.next_token_loss
    monkeypatch.setattr(pretrain_mod, "next_token_loss", lambda m, b, c: calls.append(len(b.input_ids)) or real(m, b, c))

    split = tiny_model()
    cfg = PretrainConfig(optim=opt_cfg, grad_accum=2, max_tokens_per_batch=max(map(len, exs)), shuffle=False)
    (log_split,) = Pretrainer(split, cfg).fit(exs)
    assert calls == [len(exs[0]), len(exs[1])]  # two micro-batches, one step

    calls.clear()
    whole = tiny_model()
    cfg = PretrainConfig(optim=opt_cfg, grad_accum=1, max_tokens_per_batch=sum(map(len, exs)), shuffle=False)
    (log_whole,) = Pretrainer(whole, cfg).fit(exs)
    assert calls == [len(exs[0]) + len(exs[1])]

    # Independent reference: the mean loss over both examples, backward, one torch AdamW step at the base lr
    # (the cosine starts at factor 1 without warm-up).
    ref = tiny_model()
    ref.requires_grad_(True)
    batch = pack(exs)
    loss_sum, n = next_token_loss(ref, batch)
    (loss_sum / n).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    torch.optim.AdamW([p for p in ref.parameters() if p.grad is not None], lr=1e-2, betas=opt_cfg.betas, eps=1.0,
                      weight_decay=0.0).step()

    for log in (log_split, log_whole):
        assert log.step == 1 and log.targets == n and log.tokens == len(batch.input_ids) and log.lr == 1e-2
        assert log.loss == pytest.approx(loss_sum.item() / n, rel=1e-5)
        assert log.grad_norm == pytest.approx(float(norm), rel=1e-4)
    want = _params(ref)
    moved = 0
    for model in (split, whole):
        for name, p in _params(model).items():
            torch.testing.assert_close(p, want[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    before = _params(tiny_model())
    moved = sum(not torch.equal(before[k], v) for k, v in want.items())
    assert moved == sum(1 for k in want if not k.startswith(VISION_PREFIXES))  # every decoder tensor stepped


# -- (4) schedule, parameter groups, non-finite gradients ------------------------------------------------

def test_lr_factor_hand_computed():
    # 4 warm-up steps, then a cosine over 10 steps from 1 down to 0.1.
    f = lambda s: lr_factor(s, warmup_steps=4, total_steps=14, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # the cosine's midpoint
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert f(14) == pytest.approx(0.1) and f(20) == pytest.approx(0.1)  # the end, and clamped past it
    assert lr_factor(0, 0, 1, 0.0) == 1.0 and lr_factor(1, 0, 1, 0.0) == pytest.approx(0.0)


def test_fit_follows_the_schedule(tiny_model, processor):
    exs = [text_example(processor, t) for t in ("one two three", "four five six", "seven eight nine")]
    n = max(map(len, exs))
    assert all(2 * len(ex) > n for ex in exs)  # so each example is its own micro-batch
    cfg = PretrainConfig(optim=OptimConfig(lr=2e-3, warmup_steps=2, min_lr_ratio=0.2), epochs=2,
                         max_tokens_per_batch=n, shuffle=False, max_steps=5)
    seen = []
    logs = Pretrainer(tiny_model(), cfg).fit(exs, on_step=seen.append)
    assert seen == logs and [log.step for log in logs] == [1, 2, 3, 4, 5]  # 6 micro-batches, capped at 5
    assert [log.lr for log in logs] == pytest.approx([2e-3 * lr_factor(s, 2, 5, 0.2) for s in range(5)])
    assert [log.tokens for log in logs] == [len(exs[i % 3]) for i in range(5)]


def test_weight_decay_only_on_matrices(tiny_model):
    model = tiny_model()
    set_trainable(model, train_vision=False)
    opt, _ = build_optimizer(model, OptimConfig(weight_decay=0.3), total_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert len(opt.param_groups) == 2
    trainable = {n for n, p in model.named_parameters() if not n.startswith(VISION_PREFIXES)}
    assert decay | no_decay == trainable and not decay & no_decay  # frozen vision is not in the optimizer
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight"} <= decay
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight"} <= no_decay
    assert all(dict(model.named_parameters())[n].dim() < 2 for n in no_decay)


def test_non_finite_gradient_skips_the_update(tiny_model):
    model = tiny_model()
    model.requires_grad_(True)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=3), total_steps=10)
    before, lr = _params(model), opt.param_groups[0]["lr"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.model.norm.weight.grad[3] = float("nan")
    norm = clip_and_step(model, opt, sched, max_grad_norm=1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.param_groups[0]["lr"] == lr and all(p.grad is None for p in model.parameters())
    # A finite gradient afterwards does step, and returns the norm before clipping.
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    norm = clip_and_step(model, opt, sched, max_grad_norm=1.0)
    assert norm == pytest.approx(0.5 * math.sqrt(sum(p.numel() for p in model.parameters())), rel=1e-5)
    assert not torch.equal(model.model.norm.weight, before["model.norm.weight"])


# -- (5) activation checkpointing ------------------------------------------------------------------------

def test_activation_checkpointing_same_gradients(tiny_model, processor):
    batch = pack(_text_examples(processor))
    grads, calls = [], []
    for ckpt in (False, True):
        model = tiny_model()
        Pretrainer(model, PretrainConfig(activation_checkpointing=ckpt))
        count = [0]
        # A pre-hook: the recomputation stops as soon as the saved tensors are rebuilt, before the MLP returns.
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
        loss_sum, n = next_token_loss(model, batch)
        (loss_sum / n).backward()
        grads.append(_grads(model))
        calls.append(count[0])
    assert calls == [1, 2]  # with checkpointing the layer really is recomputed in the backward pass
    for name, g in grads[0].items():
        if g is None:
            assert grads[1][name] is None, name
        else:
            torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


# -- (6) frozen or trained vision ------------------------------------------------------------------------

@pytest.fixture
def image_examples(processor, make_image):
    return [text_example(processor, "a small picture of noise", [make_image()]),
            chat_example(processor, [{"role": "user", "content": [{"type": "image", "image": make_image(40, 60, 1)},
                                                                  {"type": "text", "text": "describe"}]},
                                     {"role": "assistant", "content": "noise"}])]


def test_frozen_vision_gets_no_gradient_and_does_not_change(tiny_model, image_examples):
    model = tiny_model()
    set_trainable(model, train_vision=False)
    loss_sum, n = next_token_loss(model, pack(image_examples))
    (loss_sum / n).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(VISION_PREFIXES)
        assert p.requires_grad is not frozen, name
        assert (p.grad is None) is frozen, name

    model = tiny_model()
    before = _params(model)
    Pretrainer(model, PretrainConfig(optim=OptimConfig(lr=1e-2), train_vision=False)).fit(image_examples)
    for name, p in _params(model).items():
        assert torch.equal(p, before[name]) is name.startswith(VISION_PREFIXES), name


def test_trained_vision_changes(tiny_model, image_examples):
    model = tiny_model()
    before = _params(model)
    Pretrainer(model, PretrainConfig(optim=OptimConfig(lr=1e-2))).fit(image_examples)
    after = _params(model)
    vision = [n for n in before if n.startswith(VISION_PREFIXES)]
    changed = [n for n in vision if not torch.equal(after[n], before[n])]
    assert "vit_large_projector.weight" in changed
    assert changed == vision  # every vision tensor takes part in the features, so every one moves


# -- (7) overfitting -------------------------------------------------------------------------------------

def test_overfits_two_examples(tiny_model, processor):
    exs = _text_examples(processor)[:2]
    cfg = PretrainConfig(optim=OptimConfig(lr=1e-2, warmup_steps=2), epochs=30, shuffle=True, seed=1)
    logs = Pretrainer(tiny_model(), cfg).fit(exs)
    assert len(logs) == 30
    assert logs[-1].loss < 0.5 * logs[0].loss
    assert all(math.isfinite(log.grad_norm) for log in logs)
    again = Pretrainer(tiny_model(), cfg).fit(exs)  # same seed, same data: the same run
    assert [log.loss for log in again] == [log.loss for log in logs]


# -- (8) configuration and input errors ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens_per_batch=0), "max_tokens_per_batch"), (dict(grad_accum=0), "grad_accum"),
    (dict(grad_accum=1.5), "grad_accum"), (dict(epochs=0), "epochs"), (dict(chunk_rows=0), "chunk_rows"),
    (dict(max_steps=0), "max_steps"),
])
def test_pretrain_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"PretrainConfig\.{field}"):
        PretrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=0.0), "lr"), (dict(eps=-1.0), "eps"), (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_optim_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"OptimConfig\.{field}|{field}"):
        OptimConfig(**kwargs)


def test_fit_rejects_no_examples_and_no_targets(tiny_model, processor):
    trainer = Pretrainer(tiny_model(), PretrainConfig())
    with pytest.raises(ValueError, match="no training examples"):
        trainer.fit([])
    one_token = text_example(processor, "a")
    assert len(one_token) == 1 and one_token.num_targets == 0
    with pytest.raises(ValueError, match="none of the 1 examples has a target token"):
        trainer.fit([one_token])


def test_micro_batch_without_targets_contributes_nothing(tiny_model, processor, make_image):
    """An image with an empty caption has no targets; as one micro-batch of an accumulated step it must change
    nothing: the step equals the one over the other micro-batch alone."""
    a = text_example(processor, "some caption text here")
    b = text_example(processor, "", [make_image()])
    assert a.num_targets > 0 and b.num_targets == 0
    opt_cfg = OptimConfig(lr=1e-2, eps=1.0, max_grad_norm=None)
    with_empty = tiny_model()
    cfg = PretrainConfig(optim=opt_cfg, grad_accum=2, max_tokens_per_batch=max(len(a), len(b)), shuffle=False)
    with pytest.warns(UserWarning, match="skipped 1 example"):
        (log,) = Pretrainer(with_empty, cfg).fit([a, b])
    alone = tiny_model()
    (ref,) = Pretrainer(alone, PretrainConfig(optim=opt_cfg, shuffle=False)).fit([a])
    assert log.targets == ref.targets == a.num_targets and log.loss == pytest.approx(ref.loss, rel=1e-6)
    want = _params(alone)
    for name, p in _params(with_empty).items():
        torch.testing.assert_close(p, want[name], rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_long_documents_train_as_windows(tiny_model, processor):
    from step3vl.train.data import split_long

    doc = text_example(processor, " ".join(f"word{i}" for i in range(60)))
    windows = split_long(doc, 16)
    assert [len(w) for w in windows[:-1]] == [16] * (len(windows) - 1) and 0 < len(windows[-1]) <= 16
    assert sum((w.input_ids for w in windows), []) == doc.input_ids
    assert sum((w.labels for w in windows), []) == doc.labels
    with pytest.raises(ValueError, match="max_tokens=16"):
        Pretrainer(tiny_model(), PretrainConfig(max_tokens_per_batch=16)).fit([doc])
    logs = Pretrainer(tiny_model(), PretrainConfig(max_tokens_per_batch=16, max_seq_len=16, shuffle=False)).fit([doc])
    assert sum(l.targets for l in logs) == sum(w.num_targets for w in windows)


def test_long_example_with_an_image_is_refused(processor, make_image):
    from step3vl.train.data import split_long

    ex = text_example(processor, "a caption", [make_image()])
    with pytest.raises(ValueError, match=r"example 3: \d+ tokens with images exceed max_seq_len=8"):
        split_long(ex, 8, "example 3")


def test_evaluate_is_the_mean_loss_over_held_out_targets(tiny_model, processor):
    from step3vl.train.data import pack
    from step3vl.train.logprobs import next_token_loss

    model = tiny_model()
    held = [text_example(processor, "held out sentence one"), text_example(processor, "and a second, longer one here")]
    with torch.no_grad():
        parts = [next_token_loss(model, pack([ex])) for ex in held]
    want = sum(float(s) for s, _ in parts) / sum(n for _, n in parts)
    trainer = Pretrainer(model, PretrainConfig(max_tokens_per_batch=16, eval_every=2, epochs=4, shuffle=False,
                                               optim=OptimConfig(lr=3e-3)))
    assert trainer.evaluate(held) == pytest.approx(want, rel=1e-6)
    logs = trainer.fit([text_example(processor, "held out sentence one")], eval_examples=held)
    assert [l.eval_loss is not None for l in logs] == [False, True, False, True]
    assert logs[-1].eval_loss < want  # trained on one of the held-out sentences


def test_lr_scales_give_a_prefix_its_own_rate(tiny_model):
    model = tiny_model()
    model.requires_grad_(True)
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, lr_scales={"vision_model.": 0.25, "vision_model.conv1": 0.5})
    opt, sched = build_optimizer(model, cfg, total_steps=10)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        want = 1.0 if not n.startswith("vision_model.") else 0.5 if n.startswith("vision_model.conv1") else 0.25
        assert rate[id(p)] == pytest.approx(1e-2 * want / 2), n  # warm-up step 0 of 2: half the rate
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 2)  # the base-rate groups come first
    for _ in range(5):
        sched.step()
    by_scale = {round(g["initial_lr"] / 1e-2, 3): g["lr"] / g["initial_lr"] for g in opt.param_groups}
    assert set(by_scale) == {1.0, 0.5, 0.25} and len(set(round(v, 9) for v in by_scale.values())) == 1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="lr_scales"):
        OptimConfig(lr_scales={"vision_model.": 0})
