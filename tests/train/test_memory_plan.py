"""The memory plan of sharded training: the fake-process-group dry run against the closed form on the real 10B config
(meta device, no memory), the activation estimate against what autograd really saves on the tiny model, and the
`plan-memory` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from step3vl.cli import main as cli_main
from step3vl.loader import load_model
from step3vl.train import memory_plan as mp
from step3vl.train.data import pack, text_example
from step3vl.train.logprobs import next_token_loss
from step3vl.train.pretrain import enable_activation_checkpointing


@pytest.fixture(scope="module")
def official():
    return mp.official_config()


# -- the sharded state ------------------------------------------------------------------------------------------

def test_official_config_has_10b_parameters(official):
    total = mp.analytic_shards(official, 1).total_numel
    assert abs(total - 10.17e9) < 0.05e9
    decoder_layers = sum(math.prod(s) for s in mp.fsdp_units(official)[-1]) * official.text.num_hidden_layers
    assert abs(decoder_layers - 6.95e9) < 0.01e9  # Qwen3-8B without its embeddings and lm_head


@pytest.mark.parametrize("world_size", [8, 64])
def test_fake_pg_shards_match_the_formula(official, world_size):
    measured = mp.measure_sharded(official, world_size)
    assert not dist.is_initialized()  # torn down: the next world size can run in this process
    assert measured == mp.analytic_shards(official, world_size)
    # Every rank's share is 1/W of the model plus at most one padded row per tensor.
    shapes = [s for unit in mp.fsdp_units(official) for s in unit]
    padding = world_size * measured.shard_numel - measured.total_numel
    assert 0 <= padding <= sum((world_size - 1) * math.prod(s[1:]) for s in shapes)
    if world_size == 8:
        assert padding == 0  # every dim 0 of STEP3-VL-10B divides by 8
    assert measured.param_bytes == measured.grad_bytes == measured.optimizer_bytes // 2 == 4 * measured.shard_numel


def test_plan_of_the_10b_model(official):
    p8, p64 = mp.analytic_plan(official, 8, 4096), mp.analytic_plan(official, 64, 4096)
    assert p8.sharded_bytes == 16 * mp.analytic_shards(official, 1).total_numel // 8
    assert p64.sharded_bytes < p8.sharded_bytes and p64.peak_bytes(True) < p8.peak_bytes(True)
    # Checkpointing keeps one [T, hidden] bf16 input per decoder layer, and rebuilds one layer in the backward.
    t = official.text
    assert p8.checkpointed.decoder_layers == t.num_hidden_layers * 2 * t.hidden_size * 4096
    assert p8.checkpointed.recompute == p8.full.decoder_layers // t.num_hidden_layers
    assert p8.checkpointed.peak < p8.full.peak / 2
    assert p8.fits(True)
    with pytest.raises(ValueError, match="image"):
        mp.analytic_plan(official, 8, 100, images=1)


# -- activations against autograd --------------------------------------------------------------------------------

def saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd saves during the forward of the loss, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}  # holding the tensors: a freed storage's address could be reused

    def on_save(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(on_save, lambda t: t):
        next_token_loss(model, batch)
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def _batches(processor, make_image):
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    # Two sequences of unequal length: the packed case the estimate is written for.
    text_only = pack([text_example(processor, text), text_example(processor, text[:200])])
    with_image = pack([text_example(processor, text[:300], [make_image()])])
    return {"text": (text_only, 0), "image": (with_image, 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_saved_tensors(tiny_ckpt, processor, make_image, dtype):
    model = load_model(tiny_ckpt, dtype=dtype, requires_grad=True)
    for name, (batch, images) in _batches(processor, make_image).items():
        tokens = batch.input_ids.numel()
        est = mp.estimate_activations(model.cfg, tokens, images, dtype.itemsize, checkpointing=False)
        ratio = saved_bytes(model, batch) / est.saved
        assert 0.85 < ratio < 1.15, (name, dtype, ratio)


def test_checkpointing_drops_what_the_estimate_says(tiny_ckpt, processor, make_image):
    batch, _ = _batches(processor, make_image)["text"]
    tokens = batch.input_ids.numel()
    model = load_model(tiny_ckpt, dtype=torch.float32, requires_grad=True)
    full = saved_bytes(model, batch)
    enable_activation_checkpointing(model)
    # The checkpointed layers' inputs are saved by checkpoint itself, outside its own hooks: the count sees them.
    ckpt = saved_bytes(model, batch)
    est_full = mp.estimate_activations(model.cfg, tokens, 0, 4, checkpointing=False)
    est_ckpt = mp.estimate_activations(model.cfg, tokens, 0, 4, checkpointing=True)
    assert 0.85 < ckpt / est_ckpt.saved < 1.15
    assert 0.85 < (full / ckpt) / (est_full.saved / est_ckpt.saved) < 1.15
    assert est_ckpt.recompute == est_full.decoder_layers // model.cfg.text.num_hidden_layers


# -- the command ------------------------------------------------------------------------------------------------

def test_plan_memory_command_prints_the_table(capsys):
    assert cli_main(["plan-memory", "--world-sizes", "8", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "fits 80 GB?" in out and "10.17B parameters" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:2] == ["8", "4096"])
    assert row[-3:] == ["yes", "/", "yes"]
    assert not dist.is_initialized()


def test_plan_memory_json(capsys):
    assert mp.main(["--world-sizes", "16", "--tokens", "4096,8192", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["world_size"], r["tokens"]) for r in rows] == [(16, 4096), (16, 8192)]
    assert rows[0]["param_bytes"] * 16 >= rows[0]["shards"]["total_numel"] * 4
