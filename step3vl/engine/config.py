"""`EngineConfig`: every engine setting declared once (vLLM's EngineArgs idea): its type, default, help text and
validation. `LLM(**kwargs)` and `LLM(config=...)` build one; the CLI's engine flags (every subcommand that loads
a checkpoint, the server's included) are generated from its fields (`add_cli_args`) and read back
(`from_cli_args`); `llm.config` prints what an engine runs with.

Names and meanings follow vLLM where vLLM has the setting (dtype, max_model_len, block_size, max_num_seqs,
max_num_batched_tokens, seed, max_logprobs, gpu_memory_utilization, speculative_config, scheduling_policy,
tensor_parallel_size); the rest are this engine's own (kv_cache_memory, cpu_kernels, cascade_attention,
encoder_cache_memory, max_image_pixels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field, fields
from typing import Any

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
POLICIES = ("fcfs", "priority")


def _help(text: str, **kw: Any) -> dict:
    return {"help": text, **kw}


@dataclass
class EngineConfig:
    model: str = field(default="", metadata=_help("checkpoint directory (config.json, safetensors, tokenizer)",
                                                  cli=False))
    dtype: str = field(default="auto", metadata=_help("weights and activations: auto (bf16 on CUDA, fp32 on the CPU, "
                                                      "where the native decoder streams bf16 weights), float32, "
                                                      "bfloat16 or float16", choices=DTYPES))
    device: str | None = field(default=None, metadata=_help("cuda or cpu (default: cuda when available)"))
    kv_cache_memory: str | None = field(default=None, metadata=_help(
        "the KV pool's size, bytes or e.g. 2GiB (default: gpu_memory_utilization of free GPU memory; 1GiB on the "
        "CPU)"))
    gpu_memory_utilization: float = field(default=0.6, metadata=_help(
        "fraction of the GPU's free memory the KV pool takes when kv_cache_memory is not given (vLLM's name)"))
    block_size: int = field(default=16, metadata=_help("tokens per KV block (a power of two)"))
    max_model_len: int | None = field(default=None, metadata=_help(
        "prompt + output limit per request (default: what the model and the pool allow)"))
    max_num_batched_tokens: int | None = field(default=None, metadata=_help(
        "token budget per engine step; longer prompts are prefilled in chunks (default: max(2048, block_size))"))
    max_num_seqs: int = field(default=256, metadata=_help("sequences per engine step"))
    seed: int = field(default=0, metadata=_help("the sampling seed of requests that give none"))
    enable_prefix_caching: bool = field(default=True, metadata=_help(
        "reuse the KV blocks of prompt prefixes seen before, across requests (vLLM's flag); off, each request "
        "computes its own prompt (its n samples still share one prefill)", cli_bool=True))
    use_kernels: bool | None = field(default=None, metadata=_help(
        "the Triton/CUDA kernels (default: on CUDA)", cli_bool=True))
    cascade_attention: bool | None = field(default=None, metadata=_help(
        "read a prefix shared by many sequences once per decode step (default: on the CPU; off on CUDA until the "
        "kernel wins there, see bench/RESULTS.md)", cli_bool=True))
    cpu_kernels: bool = field(default=True, metadata=_help(
        "on the CPU, the native decoder (packed linears, C++ paged attention); off: the plain PyTorch path",
        cli_bool=True))
    max_logprobs: int = field(default=20, metadata=_help("the most alternatives per token a request may ask for"))
    generation_config: str = field(default="auto", metadata=_help(
        "default sampling parameters for requests that leave them unset (temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens): 'auto' reads the model's generation_config.json, 'vllm' uses none "
        "(the OpenAI defaults), or a folder holding a generation_config.json (vLLM's flag)"))
    encoder_cache_memory: str = field(default="256MiB", metadata=_help(
        "image features kept by image digest, so a recurring image (PaCoRe rounds, chat turns) is encoded once"))
    speculative_config: dict | None = field(default=None, metadata=_help(
        'n-gram speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' (outputs are '
        "token for token those without it) (default: off, plain decoding)", parse=json.loads))
    scheduling_policy: str = field(default="fcfs", metadata=_help(
        "fcfs: arrival order; priority: each request's `priority` (lower first) orders admission, decode order and "
        "preemption", choices=POLICIES))
    max_image_pixels: int = field(default=64_000_000, metadata=_help(
        "the largest pixel buffer one image may need (decoded, padded, crop canvas), checked from its header "
        "before any pixel is decoded; 0: no limit"))
    tensor_parallel_size: int = field(default=1, metadata=_help(
        "GPUs per engine (vLLM's name); only 1: STEP3-VL-10B fits one 80 GB GPU in bf16, and the engine scales "
        "out as data-parallel replicas (torchrun)"))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and not _is_torch_dtype(self.dtype):
            raise ValueError(f"EngineConfig.dtype {self.dtype!r}: choose auto, float32, float16 or bfloat16")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size {self.block_size}: must be a power of two")
        if self.max_num_seqs < 1:
            raise ValueError(f"EngineConfig.max_num_seqs {self.max_num_seqs}: must be >= 1")
        if self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs {self.max_logprobs}: must be >= 0")
        for name in ("max_model_len", "max_num_batched_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} {getattr(self, name)}: must be >= 1 or unset")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"EngineConfig.gpu_memory_utilization {self.gpu_memory_utilization}: must be in (0, 1]")
        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"EngineConfig.scheduling_policy {self.scheduling_policy!r}: choose fcfs or priority")
        if self.max_image_pixels < 0:
            raise ValueError(f"EngineConfig.max_image_pixels {self.max_image_pixels}: must be >= 0 (0: no limit)")
        if self.tensor_parallel_size != 1:
            raise ValueError(f"EngineConfig.tensor_parallel_size {self.tensor_parallel_size}: this engine runs on "
                             f"one GPU (STEP3-VL-10B fits one 80 GB GPU in bf16); scale out with data-parallel "
                             f"replicas instead (torchrun --nproc-per-node N ... pacore --input ...)")

    def __str__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"EngineConfig({shown})"

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def resolve(self, *, device: Any, max_model_len: int, eos_token_ids: set[int]) -> "CoreConfig":
        """EngineCore's settings for this config on `device`, with the model's context limit and end-of-sequence
        ids: every default that depends on the device or the model is decided here, once."""
        from step3vl.engine.speculative import SpeculativeConfig

        return CoreConfig(
            max_model_len=max_model_len, eos_token_ids=frozenset(eos_token_ids), seed=self.seed,
            max_logprobs=self.max_logprobs, speculative=SpeculativeConfig.of(self.speculative_config),
            scheduler=SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens or max(2048, self.block_size),
                                      max_num_seqs=self.max_num_seqs, policy=self.scheduling_policy),
            runner=RunnerConfig(
                use_kernels=use_kernels(self.use_kernels, device),
                # On CUDA the last measured cascade kernel (eager, 3 launches) lost to plain paged decode
                # (bench/RESULTS.md); the CPU path always reads a shared prefix once per group.
                cascade_attention=(device.type != "cuda" if self.cascade_attention is None
                                   else self.cascade_attention),
                cpu_kernels=self.cpu_kernels,
                encoder_cache_bytes=parse_bytes(self.encoder_cache_memory, "encoder_cache_memory")))

    # -- command line ------------------------------------------------------------------------------

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One flag per field (`--max-model-len` for max_model_len), in an "engine" group, with each field's help
        and default; booleans as --x / --no-x."""
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            if not f.metadata.get("cli", True) or f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            meta = f.metadata
            text = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {f.default})"
            kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": text.replace("%", "%%")}
            if meta.get("cli_bool"):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = meta.get("parse") or _cli_type(f.type)
                if "choices" in meta:
                    kw["choices"] = meta["choices"]
            group.add_argument(flag, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> "EngineConfig":
        """The config of the parsed engine flags (`add_cli_args`), with `overrides` on top."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **overrides})


# -- what the engine's parts own, resolved (EngineConfig.resolve) ----------------------------------------


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's part: how much one engine step may take, and in which order requests are admitted."""
    max_num_batched_tokens: int
    max_num_seqs: int
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduling_policy {self.policy!r}: choose 'fcfs' or 'priority'")


@dataclass(frozen=True)
class RunnerConfig:
    """The model runner's part: which attention and decoder paths run, and the image-feature cache's budget."""
    use_kernels: bool = False
    cascade_attention: bool = True
    cpu_kernels: bool = True
    encoder_cache_bytes: int = 256 << 20


@dataclass(frozen=True)
class CoreConfig:
    """EngineCore's settings, derived from an EngineConfig for one model on one device."""
    max_model_len: int
    eos_token_ids: frozenset[int]
    scheduler: SchedulerConfig
    runner: RunnerConfig = RunnerConfig()
    seed: int = 0
    max_logprobs: int = 20  # the most alternatives per token a request may ask for (vLLM's default)
    speculative: Any = None  # SpeculativeConfig (engine/speculative.py), or None


_SIZE_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


def parse_bytes(value: int | str, name: str = "kv_cache_memory") -> int:
    if isinstance(value, int):
        return value
    s = value.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):] or "b"
    if unit not in _SIZE_UNITS or not num:
        raise ValueError(f"{name} {value!r}: use bytes or a size like '2GiB' / '512MiB'")
    return int(float(num) * _SIZE_UNITS[unit])


def use_kernels(asked: bool | None, device: Any) -> bool:
    """The Triton/CUDA kernels: by default on CUDA where Triton is installed (the `cuda` extra); without it the
    PyTorch attention path runs, with a warning. Asked for explicitly without Triton: an error naming the fix."""
    from step3vl_kernels import triton_available

    if asked is None:
        if device.type == "cuda" and not triton_available():
            logger.warning("Triton is not installed: the engine runs its PyTorch attention path on %s "
                           "(pip install 'step3vl[cuda]' for the kernels)", device)
            return False
        return device.type == "cuda"
    if asked and not triton_available():
        raise ValueError("use_kernels=True needs Triton, which is not installed: pip install 'step3vl[cuda]'")
    return asked


def _cli_type(annotation: str) -> Any:
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


def _is_torch_dtype(value: Any) -> bool:
    return type(value).__name__ == "dtype" and type(value).__module__ == "torch"
