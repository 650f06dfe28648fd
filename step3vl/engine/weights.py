"""The weight lifecycle behind `LLM`: the model's weights, the KV pool and the `EngineCore` built over both, and
how they change between requests (vLLM's update_weights / sleep / wake_up).

A trainer shares the device with the engine: after each optimizer step it hands over new weights
(`update`, from a dict or streamed tensor by tensor), and between rollouts it puts the engine to sleep to get the
device memory back (`sleep`: the KV pool freed; level 1 keeps the weights in host memory, level 2 discards them)
and wakes it for the next rollout (`wake_up`). Every change needs an idle engine and ends in a fresh EngineCore
(its prefix cache came from the old weights or the old pool), built by the owner's factory, or in none while
either the pool or the weights sleep; the seed source survives, so unseeded requests keep drawing fresh seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from step3vl.engine.core import EngineCore
from step3vl.engine.cpu_modules import should_use_native, use_native_decoder
from step3vl.engine.kv_cache import KVCache
from step3vl.loader import load_model


class EngineSleepingError(RuntimeError):
    """The engine was put to sleep (`LLM.sleep`); `LLM.wake_up()` brings it back."""


def _finite(t: torch.Tensor, limit: float) -> bool:
    """No NaN and every value within ±limit (what the engine's dtype holds): min and max in one pass propagate
    a NaN and show an inf (no [numel] bool temporary)."""
    lo, hi = torch.aminmax(t.detach())
    return bool((lo >= -limit) & (hi <= limit))


@dataclass
class SleepState:
    """What sleep put away: the KV pool's geometry (to allocate it again) and where the weights are."""
    num_blocks: int
    block_size: int
    level: int = 0  # 0 awake; else the deepest level slept since the last full wake-up
    kv_asleep: bool = False
    weights: str = "device"  # "device" | "host" (level 1 on a GPU: host_weights) | "discarded" (level 2)
    host_weights: dict | None = None
    rng: Any = None  # the engine's seed source, kept so unseeded requests keep drawing fresh seeds


# (model, KV pool, seed source or None for a new one) -> the engine over them
EngineFactory = Callable[[torch.nn.Module, KVCache, Any], EngineCore]


class WeightLifecycle:
    """Owns the model (`model`: the live one, or a storage-less skeleton while its weights sleep), the KV pool
    (`kv`), the engine over them (`core`, None while asleep) and the sleep state (`state`). On the CPU with
    cpu_kernels, every model it adopts gets the native decoder's packed layers (`native`)."""

    def __init__(self, model: torch.nn.Module, *, path: str | Path, dtype: torch.dtype, device: torch.device,
                 cpu_kernels: bool, num_blocks: int, block_size: int, build_engine: EngineFactory):
        self.path, self.dtype, self.device = Path(path), dtype, device
        self._build_engine = build_engine
        self.model = self._adopt(model, cpu_kernels)
        self.kv: KVCache | None = KVCache.allocate(self.model.cfg.text, num_blocks, block_size, dtype, device)
        self.state = SleepState(num_blocks, block_size)
        self.core: EngineCore | None = build_engine(self.model, self.kv, None)

    @property
    def engine(self) -> EngineCore:
        if self.core is None:
            raise EngineSleepingError(f"the engine is asleep (LLM.sleep(level={self.state.level})): call "
                                      f"wake_up() first")
        return self.core

    def busy(self) -> bool:
        return self.core is not None and self.core.has_unfinished()

    def is_sleeping(self) -> bool:
        return self.state.level > 0

    def _check_idle(self, what: str) -> None:
        if self.busy():
            raise RuntimeError(f"{what}: {len(self.engine.requests)} request(s) in flight; let them finish or "
                               f"abort them first")

    def _adopt(self, model: torch.nn.Module, cpu_kernels: bool) -> torch.nn.Module:
        """Swap in the native decoder's CPU layers where they apply (see LLM's cpu_kernels)."""
        self.native = cpu_kernels and should_use_native(model, self.dtype)
        if self.native:
            use_native_decoder(model)
        return model

    def _restart(self) -> None:
        """A fresh engine over the current weights, unless the KV pool is asleep (wake_up builds it then)."""
        rng = self.core._rng if self.core is not None else self.state.rng
        self.core = None if self.state.kv_asleep else self._build_engine(self.model, self.kv, rng)

    # -- update_weights -----------------------------------------------------------------------------------

    def update(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """`LLM.update_weights`: a dict is checked whole before anything changes; an iterator is streamed into
        the parameters where they can be copied in place (awake, not the native path)."""
        from step3vl.loader import check_state, model_from_state

        self._check_idle("update_weights")
        cfg = self.model.cfg
        weights_asleep = self.state.weights != "device"
        if isinstance(weights, Iterator) and not (self.native or weights_asleep):
            self._stream(weights)
        else:
            state = check_state(cfg, dict(weights), "update_weights")
            limit = torch.finfo(self.dtype).max
            bad = next((k for k, v in state.items() if v.numel() and not _finite(v, limit)), None)
            if bad is not None:  # a diverged trainer must not silently poison the sampler
                raise ValueError(f"update_weights: key {bad!r} holds NaN/inf or values beyond {self.dtype}'s range")
            if self.native or weights_asleep:  # packed layers (or no storage at all): rebuilt, then swapped in
                self.model = self._adopt(model_from_state(cfg, state, self.dtype, self.device, "update_weights"),
                                         self.native)
            else:
                params = dict(self.model.named_parameters())
                with torch.no_grad():
                    for name, value in state.items():
                        params[name].copy_(value)
        self.state.weights, self.state.host_weights = "device", None
        self._restart()

    def _stream(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Check and copy one tensor before reading the next: one tensor of extra memory, not a model."""
        from step3vl.loader import CheckpointError, canonical_key

        params = dict(self.model.named_parameters())
        skip = {"lm_head.weight"} if self.model.cfg.text.tie_word_embeddings else set()
        limit, seen = torch.finfo(self.dtype).max, set()
        with torch.no_grad():
            for key, value in weights:
                name = canonical_key(key)
                if name in skip:
                    continue
                try:
                    if name not in params:
                        raise CheckpointError(f"unexpected key {key!r}")
                    if tuple(value.shape) != tuple(params[name].shape) or not value.is_floating_point():
                        raise CheckpointError(f"key {key!r}: {value.dtype} {list(value.shape)}, the model expects a "
                                              f"float {list(params[name].shape)}")
                    if value.numel() and not _finite(value, limit):
                        raise ValueError(f"key {key!r} holds NaN/inf or values beyond {self.dtype}'s range")
                except (CheckpointError, ValueError) as e:
                    raise type(e)(f"update_weights: {e} (after {len(seen)} tensors were copied: give the engine a "
                                  f"complete set of weights again)") from None
                params[name].copy_(value)
                seen.add(name)
        missing = sorted(set(params) - skip - seen)
        if missing:
            raise CheckpointError(f"update_weights: {len(missing)} missing key(s), e.g. {missing[:5]} (the engine "
                                  f"holds a mix of old and new weights)")

    # -- sleep / wake_up ----------------------------------------------------------------------------------

    def sleep(self, level: int, offload: bool) -> int:
        """`LLM.sleep`; offload: level 1 moves the weights to host memory (they are elsewhere, e.g. on a GPU).
        Returns the device bytes freed."""
        if level not in (1, 2):
            raise ValueError(f"sleep(level={level!r}): level is 1 (offload the weights) or 2 (discard them)")
        self._check_idle("sleep")
        freed = 0
        if not self.state.kv_asleep:
            freed += self.kv.num_blocks * self.kv.bytes_per_block
            if self.core is not None:
                self.state.rng = self.core._rng
            self.core, self.kv, self.state.kv_asleep = None, None, True
        if self.state.weights == "device" and (level == 2 or offload):
            if level == 1:
                self.state.host_weights = {k: v.detach().to("cpu", copy=True)
                                           for k, v in self.model.state_dict().items()}
            freed += sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied ones once
            self.state.weights = "host" if level == 1 else "discarded"
            self.model = self._skeleton()
        self.state.level = max(self.state.level, level)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed memory back to other processes too
        return freed

    def wake_up(self, tags: list[str] | None = None) -> None:
        """`LLM.wake_up`: restore "weights" and/or "kv_cache"; the engine comes back once both are awake."""
        from step3vl.loader import model_from_state

        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        unknown = set(tags) - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"wake_up(tags={tags!r}): unknown tag(s) {sorted(unknown)}; use 'weights', 'kv_cache'")
        if "weights" in tags and self.state.weights != "device":
            if self.state.weights == "host":
                model = model_from_state(self.model.cfg, self.state.host_weights, self.dtype, self.device, "wake_up")
            else:  # discarded and never replaced through update_weights: the checkpoint's own
                model = load_model(self.path, dtype=self.dtype, device=self.device)
            self.model = self._adopt(model, self.native)
            self.state.weights, self.state.host_weights = "device", None
        if "kv_cache" in tags and self.state.kv_asleep:
            self.kv = KVCache.allocate(self.model.cfg.text, self.state.num_blocks, self.state.block_size,
                                       self.dtype, self.device)
            self.state.kv_asleep = False
        if not self.state.kv_asleep and self.state.weights == "device":
            self.state.level = 0
            if self.core is None:
                self._restart()

    def _skeleton(self) -> torch.nn.Module:
        """The model without storage: its config and structure stay readable while the weights sleep."""
        from step3vl.model import Step3VLForCausalLM

        with torch.device("meta"):
            return Step3VLForCausalLM(self.model.cfg)
