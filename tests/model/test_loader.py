"""Loader: checkpoint directory → model. Round trips, both key spellings, shard layouts, and every error path
(each message must name the file and, where one applies, the key)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch
from safetensors.torch import load_file, save_file

from step3vl.config import Step3VLConfig
from step3vl.loader import CheckpointError, canonical_key, load_model
from step3vl.model import DenseAttention, Step3VLForCausalLM

INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"

Rewrite = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def _shards(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(f) for f in sorted(path.glob("*.safetensors"))}


def _rewrite(src: Path, dst: Path, fn: Rewrite) -> Path:
    """Copy a checkpoint, passing every tensor through `fn` (which may rename, drop or add tensors)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    weight_map = {}
    for file, tensors in _shards(src).items():
        out = {new: t for name, tensor in tensors.items() for new, t in fn(name, tensor)}
        save_file(out, str(dst / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in out})
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _copy(src: Path, dst: Path) -> Path:
    return _rewrite(src, dst, lambda n, t: [(n, t)])


def _which_shard(path: Path, key: str) -> str:
    return json.loads((path / INDEX).read_text())["weight_map"][key]


@torch.inference_mode()
def _outputs(model: Step3VLForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Text logits for a small packed batch, and projector output for one 504 crop."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (13,), generator=g)
    positions = torch.cat([torch.arange(5), torch.arange(8)])
    logits = model.compute_logits(model(ids, positions, DenseAttention([5, 8])))
    vision = model.encode_views(torch.randn(1, 3, 504, 504, generator=g))
    return logits.float(), vision.float()


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """Outputs of the tiny checkpoint built without the loader: plain module + load_state_dict."""
    cfg = Step3VLConfig.from_pretrained(tiny_ckpt)
    model = Step3VLForCausalLM(cfg).float().eval()
    state = {k: v for shard in _shards(tiny_ckpt).values() for k, v in shard.items()}
    model.load_state_dict(state, strict=True)
    return _outputs(model)


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_dtype_device_and_no_meta(tiny_ckpt, dtype):
    model = load_model(tiny_ckpt, dtype=dtype, device="cpu")
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert tensors
    for name, t in tensors:
        assert not t.is_meta, name
        assert t.device == torch.device("cpu"), name
    for name, p in model.named_parameters():
        assert p.dtype == dtype and not p.requires_grad, name
    on_disk = {k: v for shard in _shards(tiny_ckpt).values() for k, v in shard.items()}
    assert set(dict(model.named_parameters())) == set(on_disk)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, on_disk[name].to(dtype), atol=0, rtol=0)
    assert not model.training
    expect = torch.tensor([1e6 ** (-i / 8) for i in range(8)])  # rotate-half inv_freq for head_dim 16
    torch.testing.assert_close(model.model.inv_freq, expect)


def test_requires_grad_option(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.float32, requires_grad=True)
    assert all(p.requires_grad for p in model.parameters())


def test_loaded_outputs_match_plain_state_dict_model(tiny_ckpt, reference):
    _assert_same(_outputs(load_model(tiny_ckpt, dtype=torch.float32)), reference)


def test_save_load_round_trip_is_identical(tiny_ckpt, tmp_path):
    """fp32 model → single-file model.safetensors (official names) → load → bit-identical outputs."""
    first = load_model(tiny_ckpt, dtype=torch.float32)
    out = tmp_path / "single"
    shutil.copytree(tiny_ckpt, out, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(out / "model.safetensors"))
    second = load_model(out, dtype=torch.float32)
    _assert_same(_outputs(second), _outputs(first))
    for (n1, p1), (n2, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)


def test_shard_layouts_load_the_same(tiny_ckpt, tmp_path, reference):
    """One shard per tensor with an index, and unindexed *.safetensors files, both load the same weights."""
    many = tmp_path / "many"
    shutil.copytree(tiny_ckpt, many, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    state = {k: v for shard in _shards(tiny_ckpt).values() for k, v in shard.items()}
    weight_map = {}
    for i, (k, v) in enumerate(state.items()):
        name = f"model-{i + 1:05d}-of-{len(state):05d}.safetensors"
        save_file({k: v}, str(many / name))
        weight_map[k] = name
    (many / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(_outputs(load_model(many, dtype=torch.float32)), reference)
    (many / INDEX).unlink()
    _assert_same(_outputs(load_model(many, dtype=torch.float32)), reference)


def test_remote_code_key_spelling(tiny_ckpt, tmp_path, reference):
    def remote(name, t):
        for official, tree in (("model.", "model.language_model."), ("vision_model.", "model.vision_model."),
                               ("vit_large_projector.", "model.vit_large_projector.")):
            if name.startswith(official):
                return [(tree + name[len(official):], t)]
        return [(name, t)]

    path = _rewrite(tiny_ckpt, tmp_path / "remote", remote)
    keys = json.loads((path / INDEX).read_text())["weight_map"]
    assert "model.language_model.layers.0.mlp.up_proj.weight" in keys
    assert "model.vision_model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "model.vit_large_projector.weight" in keys and "lm_head.weight" in keys
    assert not any(k.startswith(("model.layers.", "vision_model.", "vit_large_projector.")) for k in keys)
    _assert_same(_outputs(load_model(path, dtype=torch.float32)), reference)


def test_canonical_key():
    assert canonical_key("model.language_model.norm.weight") == "model.norm.weight"
    assert canonical_key("model.vision_model.conv1.weight") == "vision_model.conv1.weight"
    assert canonical_key("model.vit_large_projector.weight") == "vit_large_projector.weight"
    for official in ("model.norm.weight", "vision_model.conv1.weight", "lm_head.weight"):
        assert canonical_key(official) == official


def test_weights_do_not_alias_the_files(tiny_ckpt, tmp_path):
    """Loaded tensors are copies, not views of the mmap: zeroing the files afterwards changes nothing."""
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    model = load_model(path, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for f in path.glob("*.safetensors"):
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.seek(size // 2)
            fh.write(b"\0" * (size - size // 2))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Error paths


def test_missing_key(tiny_ckpt, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    path = _rewrite(tiny_ckpt, tmp_path / "ckpt", lambda n, t: [] if n == key else [(n, t)])
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_unexpected_key(tiny_ckpt, tmp_path):
    extra = "model.layers.0.self_attn.extra_proj.weight"
    anchor = "model.layers.0.self_attn.q_proj.weight"
    path = _rewrite(tiny_ckpt, tmp_path / "ckpt",
                    lambda n, t: [(n, t), (extra, t.clone())] if n == anchor else [(n, t)])
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_model(path)
    assert _which_shard(path, anchor) in str(e.value) and extra in str(e.value)


def test_shape_mismatch(tiny_ckpt, tmp_path):
    key = "model.layers.0.self_attn.k_proj.weight"  # [32, 64]
    path = _rewrite(tiny_ckpt, tmp_path / "ckpt", lambda n, t: [(n, t[:16] if n == key else t)])
    with pytest.raises(CheckpointError, match=r"shape \[16, 64\], the model expects \[32, 64\]") as e:
        load_model(path)
    assert _which_shard(path, key) in str(e.value) and key in str(e.value)


def test_integer_dtype(tiny_ckpt, tmp_path):
    key = "vision_model.ln_pre.bias"
    path = _rewrite(tiny_ckpt, tmp_path / "ckpt",
                    lambda n, t: [(n, t.to(torch.int32) if n == key else t)])
    with pytest.raises(CheckpointError, match="I32") as e:
        load_model(path)
    assert _which_shard(path, key) in str(e.value) and key in str(e.value)


def test_duplicate_key_across_spellings(tiny_ckpt, tmp_path):
    key = "model.norm.weight"
    path = _rewrite(tiny_ckpt, tmp_path / "ckpt",
                    lambda n, t: [(n, t), ("model.language_model.norm.weight", t.clone())] if n == key else [(n, t)])
    with pytest.raises(CheckpointError, match="duplicates") as e:
        load_model(path)
    assert "norm.weight" in str(e.value)


def test_truncated_file(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    shard = path / SHARD2
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
    last = max(header, key=lambda k: header[k]["data_offsets"][1])  # the tensor whose bytes end the file
    with open(shard, "r+b") as f:
        f.truncate(8 + n + header[last]["data_offsets"][1] - 10)
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_model(path)
    assert str(shard) in str(e.value) and last in str(e.value)
    with open(shard, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="truncated file") as e:
        load_model(path)
    assert str(shard) in str(e.value)


def test_corrupt_header(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    shard = path / SHARD1
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{{garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as e:
        load_model(path)
    assert str(shard) in str(e.value)
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))  # header length far beyond the file
    with pytest.raises(CheckpointError, match="corrupt or truncated header") as e:
        load_model(path)
    assert str(shard) in str(e.value)


def test_corrupt_tensor_entry(tiny_ckpt, tmp_path):
    """A header whose byte range does not match its dtype and shape names the key."""
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    shard = path / SHARD1
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [d + 1 for d in header[key]["shape"]]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n  # the edited header must fit the original length (shapes grew by a digit at most)
    shard.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match="does not match") as e:
        load_model(path)
    assert str(shard) in str(e.value) and key in str(e.value)


def test_missing_shard(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    (path / SHARD2).unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(path)
    assert SHARD2 in str(e.value) and INDEX in str(e.value)


def test_bad_index(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    (path / INDEX).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="invalid index") as e:
        load_model(path)
    assert INDEX in str(e.value)


def test_no_config_json(tiny_ckpt, tmp_path):
    path = _copy(tiny_ckpt, tmp_path / "ckpt")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_no_weights_and_not_a_directory(tiny_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(tiny_ckpt / "config.json", path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors") as e:
        load_model(path)
    assert str(path) in str(e.value)
    with pytest.raises((CheckpointError, FileNotFoundError), match="not_there"):
        load_model(tmp_path / "not_there")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_to_cuda(tiny_ckpt, reference):
    model = load_model(tiny_ckpt, dtype=torch.float32, device="cuda")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.is_cuda, name
    logits, vision = _outputs(model)
    torch.testing.assert_close(logits.cpu(), reference[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vision.cpu(), reference[1], atol=1e-4, rtol=1e-4)


def test_a_checkpoint_with_nan_or_inf_is_refused_naming_file_and_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from step3vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "ck", "tiny", shards=1)
    shard = next(ck.glob("*.safetensors"))
    state = load_file(shard)
    key = "model.layers.1.mlp.down_proj.weight"
    for bad in (float("nan"), float("inf")):
        broken = dict(state)
        broken[key] = broken[key].clone()
        broken[key][0, 3] = bad
        save_file(broken, shard, metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=rf"{shard.name}: key '{key}' holds 1 non-finite value"):
            load_model(ck, dtype=torch.float32)
    save_file(state, shard, metadata={"format": "pt"})
    load_model(ck)  # the intact file loads
