"""Vision-encoder pre-training (step3vl/train/vision.py, run.pretrain_vision): the loss against a plain
PyTorch formula, learning a label the pixels determine, the decoder left untouched, exact resume, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from step3vl.loader import load_model
from step3vl.train.optim import OptimConfig
from step3vl.train.run import pretrain_vision, step_checkpoints
from step3vl.train.vision import VisionPretrainConfig, VisionPretrainer


def _batches(size: int, n: int = 8):
    """Step k: n pictures, each a flat colour of noise around red or blue; the label is which."""
    def batch(step: int):
        g = torch.Generator().manual_seed(1000 + step)
        y = torch.randint(0, 2, (n,), generator=g)
        base = torch.tensor([[1.5, -1.0, -1.0], [-1.0, -1.0, 1.5]])[y]  # normalised-space red / blue
        pixels = base[:, :, None, None] + 0.3 * torch.randn(n, 3, size, size, generator=g)
        return pixels, {"hue": y}
    return batch


def _cfg(steps: int, lr: float = 3e-3) -> VisionPretrainConfig:
    return VisionPretrainConfig(labels={"hue": 2}, steps=steps, optim=OptimConfig(lr=lr, weight_decay=0.0))


def _state(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_loss_is_cross_entropy_of_max_pooled_projected_tokens(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    trainer = VisionPretrainer(model, _cfg(1))
    pixels, labels = _batches(model.cfg.vision.image_size)(0)
    head = trainer.tower.heads["hue"]
    with torch.no_grad():  # the formula, written out from the model's own public pieces
        pooled = model.encode_views(pixels).amax(1)
        expected = F.cross_entropy(pooled @ head.weight.T + head.bias, labels["hue"]).item()
    log = trainer.fit(lambda step: (pixels, labels))[0]
    assert log.loss == pytest.approx(expected, rel=1e-5)
    assert set(log.accuracy) == {"hue"}


def test_learns_a_label_and_leaves_the_decoder_alone(tiny_ckpt, tmp_path):
    size = load_model(tiny_ckpt, dtype=torch.float32).cfg.vision.image_size
    logs = pretrain_vision(tiny_ckpt, _batches(size), tmp_path / "out", _cfg(40), progress=False,
                           save_dtype=torch.float32)
    assert sum(x.accuracy["hue"] for x in logs[:5]) / 5 < 0.9
    assert sum(x.accuracy["hue"] for x in logs[-5:]) / 5 == 1.0
    before, after = _state(tiny_ckpt), _state(tmp_path / "out")
    assert before.keys() == after.keys(), "the heads are not part of the checkpoint"
    for k in before:
        same = torch.equal(before[k].float(), after[k].float())
        if k.startswith(("vision_model.", "vit_large_projector.")):
            if k.endswith("weight") and before[k].dim() == 2:  # every matrix gets a gradient
                assert not same, f"{k} did not train"
        else:
            assert same, f"{k}: the decoder changed"


def test_interrupted_run_resumes_to_the_same_weights(tiny_ckpt, tmp_path):
    size = load_model(tiny_ckpt, dtype=torch.float32).cfg.vision.image_size
    kw = dict(progress=False, save_dtype=torch.float32, save_every=2)
    pretrain_vision(tiny_ckpt, _batches(size), tmp_path / "full", _cfg(6), log_path=tmp_path / "full.jsonl", **kw)
    out = tmp_path / "again"
    pretrain_vision(tiny_ckpt, _batches(size), out, _cfg(6), log_path=tmp_path / "again.jsonl", **kw)
    # the kill: after step 4 was saved and step 5 was logged, before step 6
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "again-step6")
    lines = (tmp_path / "again.jsonl").read_text().splitlines()
    (tmp_path / "again.jsonl").write_text("\n".join(lines[:5]) + "\n")
    resume = step_checkpoints(out)[-1]
    assert resume.name == "again-step4"
    pretrain_vision(tiny_ckpt, _batches(size), out, _cfg(6), log_path=tmp_path / "again.jsonl", resume=resume, **kw)
    full = [json.loads(x) for x in (tmp_path / "full.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [x["step"] for x in again] == list(range(1, 7))
    assert [x["loss"] for x in again] == pytest.approx([x["loss"] for x in full], rel=1e-5)
    a, b = _state(out), _state(tmp_path / "full")
    for k in b:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_errors_name_the_problem(tiny_ckpt):
    with pytest.raises(ValueError, match="at least one label"):
        VisionPretrainConfig(labels={}, steps=1)
    with pytest.raises(ValueError, match="steps = 0"):
        VisionPretrainConfig(labels={"a": 2}, steps=0)
    model = load_model(tiny_ckpt, dtype=torch.float32)
    trainer = VisionPretrainer(model, _cfg(1))
    pixels, _ = _batches(model.cfg.vision.image_size)(0)
    with pytest.raises(ValueError, match=r"labels \['shade'\] have no head"):
        trainer.fit(lambda step: (pixels, {"shade": torch.zeros(8, dtype=torch.long)}))


def test_refuses_to_run_under_torchrun(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        pretrain_vision(tiny_ckpt, _batches(8), tmp_path / "out", _cfg(1), progress=False)
    assert not (tmp_path / "out").exists()
