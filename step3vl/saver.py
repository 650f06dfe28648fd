"""Model → checkpoint directory in the official format (the inverse of loader.py): sharded safetensors with the
official flat key names and an index, plus the source checkpoint's config, generation config and tokenizer files,
so the result loads anywhere the original does (`load_model`, `LLM`, transformers-style readers).

Written into a temporary sibling directory, flushed, and swapped into place (durable.py): a crash at any moment
leaves the old checkpoint or the new one under the target name, never neither.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from step3vl.durable import fresh_tmp, replace_dir
from step3vl.loader import INDEX_FILE

# Not copied from the source: its weights, and pickled state (a trainer's) that describes another run.
_NOT_COPIED = (".safetensors", ".pt", ".bin", ".pth")


def write_shards(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """`state` split into `shards` files (by key order) plus the index."""
    names = list(state)
    per = max(1, math.ceil(len(names) / shards))
    count = max(1, math.ceil(len(names) / per))
    weight_map, total = {}, 0
    for i in range(count):
        part = names[i * per:(i + 1) * per]
        file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(out / file), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = file
            total += state[n].numel() * state[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def export_state(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `model` under their official names (a tied LM head is written once, as the
    embedding), detached, on the CPU, cast to `dtype` (None keeps each tensor's own). A model sharded with FSDP is
    gathered tensor by tensor, so every rank must call this; the full tensors are kept on rank 0 only (the
    others get an empty dict)."""
    tied = getattr(model.cfg.text, "tie_word_embeddings", False)
    state = {}
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if hasattr(t, "full_tensor"):  # a DTensor shard: all-gather it (a collective, on every rank)
            t = t.full_tensor()
        if not rank0:
            continue
        t = t.detach().cpu()
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def copy_checkpoint_files(source: str | Path, out: Path) -> None:
    """The source checkpoint's config, generation config and tokenizer files (not its weights) into `out`."""
    for f in Path(source).iterdir():
        if f.is_file() and not f.name.endswith(_NOT_COPIED) and f.name != INDEX_FILE:
            shutil.copy2(f, out / f.name)


def save_checkpoint(model: nn.Module, out: str | Path, source: str | Path, dtype: torch.dtype | None = torch.bfloat16,
                    shards: int = 1, extra: dict[str, object] | None = None) -> Path:
    """Write `model` as a checkpoint directory at `out`, taking config.json and the tokenizer files from
    `source` (the checkpoint it was loaded from). An existing `out` is replaced. `extra`: file name -> object,
    written with torch.save inside the same atomic rename (e.g. a trainer's optimizer state)."""
    out, source = Path(out), Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source}: no config.json to copy (source must be the checkpoint the model came from)")
    if out.resolve() == source.resolve():
        raise ValueError(f"{out}: refusing to overwrite the source checkpoint in place")
    state = export_state(model, dtype)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return out  # a sharded model: the gathers needed every rank, the writing is rank 0's
    tmp = fresh_tmp(out)
    copy_checkpoint_files(source, tmp)
    write_shards(state, tmp, shards)
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    replace_dir(tmp, out)
    return out
