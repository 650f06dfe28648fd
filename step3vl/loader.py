"""Checkpoint directory → model. safetensors' parser (`safe_open`) reads and validates each file's header; the
tensors are then copied one at a time from a read-only mmap, straight into the target dtype and device on a module
built on the meta device, so peak RAM stays near the model's own size.

Both key spellings are accepted: the official flat names (`vision_model.*`, `vit_large_projector.*`,
`model.*`, `lm_head.*`) and the remote-code module tree (`model.vision_model.*`, `model.language_model.*`,
`model.vit_large_projector.*`).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from step3vl.config import Step3VLConfig
from step3vl.model.vlm import Step3VLForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_REMOTE_CODE_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.vision_model.", "vision_model."),
    ("model.vit_large_projector.", "vit_large_projector."),
)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and, where it applies, the key."""


def canonical_key(name: str) -> str:
    for remote, official in _REMOTE_CODE_PREFIXES:
        if name.startswith(remote):
            return official + name[len(remote):]
    return name


@dataclass(slots=True)
class TensorEntry:
    key: str
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def tensor_entries(path: Path) -> list[TensorEntry]:
    """The tensors of a safetensors file in file order. safetensors' own parser reads and validates the header
    (dtypes, shapes, and byte ranges that tile the data section exactly), so each tensor's bytes start where the
    previous one's end; a file it refuses raises CheckpointError naming the file and, where one is to blame, the
    key."""
    try:
        with safe_open(path, framework="pt") as f:
            slices = [(key, f.get_slice(key)) for key in f.offset_keys()]
    except SafetensorError as e:
        raise CheckpointError(_why_unreadable(path, e)) from None
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    entries, begin = [], 8 + header_len
    for key, sl in slices:
        dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: key {key!r} has unsupported dtype {dtype}")
        end = begin + math.prod(shape) * _DTYPES[dtype].itemsize
        entries.append(TensorEntry(key, dtype, shape, begin, end))
        begin = end
    return entries


def _why_unreadable(path: Path, error: Exception) -> str:
    """What is wrong with a file safetensors refused, as precisely as its header says: safetensors' own message
    names neither the file nor the tensor ("invalid shape, data type, or offset for tensor")."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: truncated file ({size} bytes, no safetensors header)"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"{path}: corrupt or truncated header (header says {n} bytes, file has {size})"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"{path}: corrupt safetensors header ({e})"
    if not isinstance(header, dict):
        return f"{path}: corrupt safetensors header (not an object)"
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            return f"{path}: key {key!r} has a malformed header entry ({e})"
        if dtype not in _DTYPES:
            return f"{path}: key {key!r} has unsupported dtype {dtype}"
        if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize or begin < 0:
            return f"{path}: key {key!r} byte range {begin}..{end} does not match {dtype}{shape}"
        if 8 + n + end > size:
            return f"{path}: truncated file: key {key!r} needs bytes up to {8 + n + end}, file has {size}"
    return f"{path}: not a readable safetensors file ({error})"


def checkpoint_files(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index file ({e})") from e
        files = [root / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: shard {f.name} is missing from {root}")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
    return files


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        module._buffers[leaf] = value


def _load_file(model: nn.Module, path: Path, expected: dict[str, torch.Tensor], seen: dict[str, Path],
               skip: set[str], dtype: torch.dtype, device: torch.device, requires_grad: bool) -> list[str]:
    unexpected = []
    entries = tensor_entries(path)
    # Read through our own read-only mmap rather than safe_open's tensors: pages copied from are dropped from the
    # resident set right away (MADV_DONTNEED), so peak RSS is the model + one tensor, not the model + the file.
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for e in entries:
            name = canonical_key(e.key)
            if name in skip:
                continue
            if name not in expected:
                unexpected.append(f"{path.name}: {e.key}")
                continue
            if name in seen:
                raise CheckpointError(f"{path}: key {e.key!r} duplicates one already loaded from {seen[name].name}")
            want = expected[name]
            if e.shape != tuple(want.shape):
                raise CheckpointError(f"{path}: key {e.key!r} has shape {list(e.shape)}, the model expects "
                                      f"{list(want.shape)}")
            if e.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{path}: key {e.key!r} has dtype {e.dtype}, expected a float tensor")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only mmap: we copy right away, nothing writes it
                src = torch.frombuffer(mm, dtype=_DTYPES[e.dtype], count=math.prod(e.shape), offset=e.begin)
            value = src.view(e.shape).to(device=device, dtype=dtype, copy=True)
            del src
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                # A damaged or diverged checkpoint would otherwise load and generate one token forever.
                bad = int((~torch.isfinite(value)).sum())
                raise CheckpointError(f"{path}: key {e.key!r} holds {bad} non-finite value(s) (NaN or inf)")
            _set_tensor(model, name, value, requires_grad)
            seen[name] = path
            page = mmap.PAGESIZE
            start = e.begin // page * page
            if e.end > start:
                mm.madvise(mmap.MADV_DONTNEED, start, e.end - start)
    return unexpected


def load_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               requires_grad: bool = False) -> Step3VLForCausalLM:
    """Load a checkpoint directory (config.json + safetensors, single file or sharded) into a model; also a
    training step checkpoint (`<out>-step<k>`, its weights in torch.distributed.checkpoint format)."""
    cfg = Step3VLConfig.from_pretrained(path)
    device = torch.device(device)
    if (Path(path) / STEP_DCP_DIR).is_dir() and not any(Path(path).glob("*.safetensors")):
        return model_from_state(cfg, _step_checkpoint_state(Path(path), cfg), dtype, device, str(path))
    with torch.device("meta"):
        model = Step3VLForCausalLM(cfg)
    expected = dict(model.named_parameters())
    skip = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    seen: dict[str, Path] = {}
    unexpected: list[str] = []
    for file in checkpoint_files(path):
        unexpected += _load_file(model, file, expected, seen, skip, dtype, device, requires_grad)
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        model.reset_buffers()
    return model.eval()


STEP_DCP_DIR = "dcp"  # where a training step checkpoint keeps its sharded state (step3vl/train/checkpoint.py)


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save or load, which is this project's normal one-process run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_checkpoint_state(path: Path, cfg: Step3VLConfig) -> dict[str, torch.Tensor]:
    """The model weights of a step checkpoint, read from its DCP shards (whatever world size wrote them) into
    full fp32 tensors; the optimizer state beside them is not read."""
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Step3VLForCausalLM(cfg).state_dict().items()}
    state = {k: torch.empty(shape, dtype=torch.float32) for k, shape in shapes.items()}
    try:
        with single_process_quiet():
            dcp.load({"model": state}, checkpoint_id=str(path / STEP_DCP_DIR), no_dist=True)
    except Exception as e:  # DCP names neither the directory nor a readable cause in every case
        raise CheckpointError(f"{path / STEP_DCP_DIR}: cannot read the step checkpoint's weights ({e})") from e
    return state


def check_state(cfg: Step3VLConfig, state: dict[str, torch.Tensor], where: str = "state") -> dict[str, torch.Tensor]:
    """Canonical names → tensors, checked against the model `cfg` describes (names, shapes, float dtypes)
    without building it; raises CheckpointError naming the key."""
    with torch.device("meta"):
        expected = dict(Step3VLForCausalLM(cfg).named_parameters())
    skip = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    out = {}
    for key, value in state.items():
        name = canonical_key(key)
        if name in skip:
            continue
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected key {key!r}")
        if name in out:
            raise CheckpointError(f"{where}: key {key!r} duplicates {name!r} (the same tensor under both spellings)")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: key {key!r} has shape {list(value.shape)}, the model expects "
                                  f"{list(expected[name].shape)}")
        if not value.is_floating_point():
            raise CheckpointError(f"{where}: key {key!r} has dtype {value.dtype}, expected a float tensor")
        out[name] = value
    missing = sorted(set(expected) - skip - set(out))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} missing key(s), e.g. {missing[:5]}")
    return out


def model_from_state(cfg: Step3VLConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16,
                     device: str | torch.device = "cpu", where: str = "state") -> Step3VLForCausalLM:
    """Build the model from in-memory tensors (official or remote-code names), copying each into `dtype` on
    `device`: e.g. a trainer's weights handed to an inference engine."""
    checked = check_state(cfg, state, where)
    device = torch.device(device)
    with torch.device("meta"):
        model = Step3VLForCausalLM(cfg)
    for name, value in checked.items():
        _set_tensor(model, name, value.detach().to(device=device, dtype=dtype, copy=True), False)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):
        model.reset_buffers()
    return model.eval()

