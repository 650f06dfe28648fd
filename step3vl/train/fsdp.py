"""FSDP2 sharding of the model over the ranks of a run (torchtitan's layout): `fully_shard` on every vision
block, every decoder layer and the root, so each rank holds 1/N of every weight, gradient and AdamW moment and
all-gathers one block at a time.

What sharding asks of the training loops: every rank runs the same sharded modules in the same order (see
parallel.py, `lock_step`).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from step3vl.distributed import DistEnv
from step3vl.model.vlm import Step3VLForCausalLM


def shard_model(model: Step3VLForCausalLM, env: DistEnv, mixed_precision: bool | None = None,
                reshard_after_forward: bool = True) -> Step3VLForCausalLM:
    """Shard `model` (fp32 weights, on env.device) in place over env's ranks. mixed_precision: bf16 compute with
    fp32 master weights and fp32 gradient reduction; None turns it on on CUDA (on the CPU, bf16 matmuls are slow
    and the N = 1 vs N = 2 equality tests want fp32)."""
    if mixed_precision is None:
        mixed_precision = env.device.type == "cuda"
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    kw = {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    if getattr(model, "vision_model", None) is not None:
        for block in model.vision_model.transformer.resblocks:
            fully_shard(block, **kw)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    # The root (embeddings, LM head, downsamplers, projector) stays gathered from forward to backward: the losses
    # call the LM head after forward() returns, chunk by chunk, and again when recomputing in the backward pass.
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    # Images are encoded outside forward() (the engine and the losses call encode_images first), so FSDP must
    # treat that method as a forward too: it all-gathers the root's downsamplers and projector.
    register_fsdp_forward_method(model, "encode_images")
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every entry of the model's state dict, one at a time: a sharded tensor is
    all-gathered when reached and can be dropped before the next, so the extra memory is one tensor (every rank
    must iterate, in the same order: each gather is a collective)."""
    for name, t in model.state_dict().items():
        yield name, t.full_tensor() if isinstance(t, DTensor) else t

