"""Resumable trainer checkpoints on torch.distributed.checkpoint (DCP), the format torchtitan uses: each rank
writes its own shards of the weights and AdamW moments, and a run resumes at any world size (DCP reshards on
load, a one-process run included).

A step checkpoint `<out>-step<k>/` holds
- `dcp/`: the model and optimizer state (fp32, sharded as they were trained);
- `trainer_state.pt`: the small rest (kind, steps done, lr schedule, prompt sampler), written by rank 0 with
  torch.save, last: its presence marks the checkpoint complete;
- config.json and the tokenizer files of the run's starting checkpoint, so the directory names what it is.
The directory appears by one atomic swap with a finished `.tmp` sibling (step3vl/durable.py); a crash mid-save
leaves the previous checkpoint as it was. `load_model` and `LLM(model=...)` read a step checkpoint's weights directly; the final
weights are exported in the official safetensors format (`step3vl.saver.save_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from step3vl.distributed import DistEnv
from step3vl.durable import fresh_tmp, replace_dir
from step3vl.loader import STEP_DCP_DIR as DCP_DIR, single_process_quiet
from step3vl.saver import copy_checkpoint_files

STATE_FILE = "trainer_state.pt"


def save_train_state(path: str | Path, source: str | Path, model: nn.Module, opt: torch.optim.Optimizer,
                     state: dict, env: DistEnv) -> Path:
    """Every rank calls this (DCP's save is a collective). `state`: the picklable rest (plain types only)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if env.is_main:
        fresh_tmp(path)
        copy_checkpoint_files(source, tmp)
    env.barrier()
    model_state, optim_state = get_state_dict(model, opt)
    with single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_DIR),
                 no_dist=not env.is_distributed)
    env.barrier()
    if env.is_main:
        torch.save({**state, "world_size": env.world_size}, tmp / STATE_FILE)
        replace_dir(tmp, path)
    env.barrier()
    return path


def load_train_state(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a step checkpoint's weights and optimizer moments into `model` and `opt` (built as for the run that
    saved it, at any world size); its trainer state is `read_train_state`'s, which callers check first."""
    path = Path(path)
    if not (path / DCP_DIR).is_dir():
        raise FileNotFoundError(f"{path}: no {DCP_DIR}/ (a step checkpoint of an older step3vl, which kept the "
                                f"optimizer in {STATE_FILE}: it cannot be resumed; start the stage again)")
    model_state, optim_state = get_state_dict(model, opt)
    where, single = str(path / DCP_DIR), not torch.distributed.is_initialized()
    with single_process_quiet():
        dcp.load({"model": model_state}, checkpoint_id=where, no_dist=single)
        # AdamW creates a parameter's moments at its first gradient: one that never had one (a vision tower that
        # only saw text) has none saved, and keeps the zero moments it starts with here (the same update follows).
        dcp.load({"optim": optim_state}, checkpoint_id=where, no_dist=single,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)


def read_train_state(path: str | Path) -> dict:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {STATE_FILE} (resume from a <out>-step<k> checkpoint of --save-every)")
    return torch.load(f, map_location="cpu", weights_only=True)
