"""The process's place in a multi-process run: rank, world size, its device, and the few collectives the
training loops and the data-parallel PaCoRe runs need.

One process without torchrun is world size 1 and never touches torch.distributed, so every code path that
takes a `DistEnv` behaves exactly as a single-process run. Under `torchrun --nproc-per-node N` the process
group is created from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL when the
ranks run on CUDA devices, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# How long a collective waits for a rank that stopped answering before the run fails (a dead rank must end the
# run with an error, not hang it forever).
DEFAULT_TIMEOUT_S = float(os.environ.get("STEP3VL_DIST_TIMEOUT_S", "600"))


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.is_distributed else None

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every world_size-th one from its rank (balanced within one item)."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_sum(self, value: float) -> float:
        """The sum of a float over the ranks (fp64, so a loss summed over ranks is exact to fp32 precision)."""
        if not self.is_distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t)

    def all_max(self, value: int) -> int:
        if not self.is_distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects; small ones: rewards, ids, records)."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _default_device(local_rank: int, device: str | None) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def launched_world_size() -> int:
    """The number of ranks torchrun launched this process among (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None, timeout_s: float | None = None) -> DistEnv:
    """This process's DistEnv; under torchrun (WORLD_SIZE > 1) the default process group is created if it does
    not exist yet. device: "cpu" or "cuda" (each rank then takes cuda:LOCAL_RANK); None picks CUDA when present."""
    world = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _default_device(local, device)
    if world == 1 and not dist.is_initialized():
        return DistEnv(0, 1, 0, dev)
    if dev.type == "cuda":
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank}: LOCAL_RANK {local} has no GPU (this node has {torch.cuda.device_count()}); "
                               f"use --nproc-per-node <= the GPUs per node")
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # Imported before the group exists: torch.distributed.fsdp binds `dist.group.WORLD` into default arguments
        # when it is imported, and imported after init_process_group those references outlive
        # destroy_process_group, so gloo's worker threads were still running at interpreter exit and aborted
        # the process now and then (std::terminate while freeing a finished collective's tensors).
        import torch.distributed.fsdp  # noqa: F401

        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        dist.init_process_group(backend, timeout=timeout, **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
