"""`LLM`: the embeddable, in-process API (vLLM's names). Text, token ids, images and chat messages in;
`RequestOutput`s out. No subprocesses, no ports, no global state: two LLMs can live in one process.

`LLM` is a front over `EngineCore` (engine/core.py): it resolves the configuration, loads the model, sizes the KV
pool and builds the engine, then delegates. Prompt preparation lives in engine/prompts.py (`PromptPreparer`),
the weight lifecycle (update_weights, sleep, wake_up) in engine/weights.py (`WeightLifecycle`, which owns the
model, the pool and the engine over them), beam search in engine/beam_search.py."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from step3vl.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, run_beam_search
from step3vl.engine.config import EngineConfig, parse_bytes
from step3vl.engine.core import EngineCore, EngineCounters
from step3vl.engine.generation_config import sampling_defaults
from step3vl.engine.kv_cache import KVCache, block_bytes
from step3vl.engine.outputs import RequestOutput, request_output
from step3vl.engine.prompts import PreparedPrompt, PromptPreparer, prompt_list  # PreparedPrompt's home was here
from step3vl.engine.sampling_params import SamplingParams
from step3vl.engine.structured_outputs import StructuredOutputBackend
from step3vl.engine.weights import EngineSleepingError, WeightLifecycle  # noqa: F401 (its home was here)
from step3vl.loader import load_model
from step3vl.processor import Step3VLProcessor

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # On the CPU, fp32 runs the native decoder (bf16-exact weights still stream as bf16): the faster path.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


class LLM:
    """An in-process engine over one checkpoint directory (vLLM's names).

    `LLM(model, **settings)` or `LLM(config=EngineConfig(...))`: every setting, its default and meaning is declared
    once, in engine/config.py (`EngineConfig`); `llm.config` is the resolved config this engine runs with.
    """

    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None, **settings: Any):
        if config is None:
            config = EngineConfig(model=str(model) if model is not None else "", **settings)
        elif settings or (model is not None and str(model) != config.model):
            config = config.replace(**settings, **({"model": str(model)} if model is not None else {}))
        if not config.model:
            raise ValueError("LLM: no model (give a checkpoint directory)")
        self.config = config
        t0 = time.perf_counter()
        logger.debug("LLM: %s", config)
        dev = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        block_size = config.block_size
        self.dtype = _resolve_dtype(config.dtype, dev)
        self.device = dev
        self.model_path = Path(config.model)
        self.processor = Step3VLProcessor.from_pretrained(config.model, max_image_pixels=config.max_image_pixels)
        # what requests that leave a sampling field unset get (generation_config.py)
        self.sampling_defaults = sampling_defaults(config.generation_config, config.model)
        if self.sampling_defaults:
            logger.info("default sampling parameters from generation_config=%r: %s (--generation-config vllm "
                        "turns them off)", config.generation_config, self.sampling_defaults)
        loaded = load_model(config.model, dtype=self.dtype, device=dev)
        cfg = loaded.cfg.text
        per_block = block_bytes(cfg, block_size, self.dtype)
        budget = (parse_bytes(config.kv_cache_memory) if config.kv_cache_memory is not None
                  else self._default_kv_bytes(dev, config.gpu_memory_utilization))
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory {budget} bytes holds {num_blocks} blocks of {per_block} bytes; "
                             f"need at least 2")
        limit = min(cfg.max_position_embeddings, num_blocks * block_size)
        max_model_len = config.max_model_len
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        eos = set(self.processor.tokenizer.eos_token_ids) | set(cfg.eos_token_id)
        tok = self.processor.tokenizer
        # EngineCore's settings, every device- and model-dependent default decided once (EngineConfig.resolve)
        self.core_config = config.resolve(device=dev, eos_token_ids=eos,
                                          max_model_len=min(max_model_len or limit, cfg.max_position_embeddings))
        self._structured = StructuredOutputBackend(tok, cfg.vocab_size, eos)
        self._prompts = PromptPreparer(self.processor, cfg.vocab_size, share_prefixes=config.enable_prefix_caching)
        # Swaps in the CPU layers, allocates the pool and builds the engine (_new_engine).
        self._lifecycle = WeightLifecycle(loaded, path=self.model_path, dtype=self.dtype, device=dev,
                                        cpu_kernels=config.cpu_kernels, num_blocks=num_blocks, block_size=block_size,
                                        build_engine=self._new_engine)
        self._ids = itertools.count()
        self._asleep_stats = dict.fromkeys(self.kv_stats(), 0)  # kv_stats() while asleep: the awake keys, all 0
        logger.info("LLM: %s, %s on %s, native CPU kernels %s; KV pool %d blocks of %d tokens (%.1f MiB), "
                    "max_model_len %d; ready in %.1fs", self.model_path, str(self.dtype).removeprefix("torch."), dev,
                    "on" if self._lifecycle.native else "off", num_blocks, block_size,
                    num_blocks * per_block / 2**20, self.max_model_len, time.perf_counter() - t0)

    def _new_engine(self, model: torch.nn.Module, kv: KVCache, rng: Any = None) -> EngineCore:
        """The engine over these weights and this pool; its stats count from zero."""
        from step3vl_kernels.native import block_manager

        tok = self.processor.tokenizer
        core = EngineCore(model=model, kv=kv, block_manager=block_manager(kv.num_blocks, kv.block_size),
                          config=self.core_config, detokenizer_factory=tok.stream_decoder,
                          structured=self._structured, encode=tok.encode)
        if rng is not None:
            core._rng = rng  # requests without a seed keep drawing fresh seeds across weight updates
        self._stats_base = (0, 0)  # (prefix_hit_tokens, preemptions) at the last reset_stats()
        return core

    @staticmethod
    def _default_kv_bytes(dev: torch.device, gpu_memory_utilization: float = 0.6) -> int:
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free * gpu_memory_utilization)
        return 1 << 30

    @property
    def engine(self) -> EngineCore:
        """The EngineCore; raises EngineSleepingError while asleep."""
        return self._lifecycle.engine

    @engine.setter
    def engine(self, core: EngineCore) -> None:
        self._lifecycle.core = core

    @property
    def model(self) -> torch.nn.Module:
        """The model (while its weights sleep, a storage-less skeleton: config and structure stay readable)."""
        return self._lifecycle.model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        self._lifecycle.model = model

    @property
    def _sleep(self):  # the sleep state (where the weights are, the level), read by tests and tools
        return self._lifecycle.state

    @property
    def max_model_len(self) -> int:
        return self.core_config.max_model_len

    def get_tokenizer(self):
        return self.processor.tokenizer

    # -- weights --------------------------------------------------------------------------------------

    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights (e.g. a trainer's, after an optimizer step); vLLM's load_weights.

        `weights`: every checkpoint tensor by its official (or remote-code) name, e.g. `model.state_dict()` of a
        Step3VLForCausalLM; copied into the engine's dtype and device. Needs an idle engine (no request in flight).
        The prefix cache and pinned prefixes are dropped (their KV came from the old weights; pin again after the
        update); the KV pool itself is kept. Checked before anything changes: a wrong name, shape or dtype raises
        and leaves the engine as it was. The weights are copied in place (no second copy of the model), except on
        the native CPU path, whose packed layers are rebuilt beside the old ones and swapped in when complete.

        An iterator (not a dict) is consumed one tensor at a time where the weights are copied in place: each is
        checked and copied before the next is read, so a trainer gathering its sharded weights tensor by tensor
        needs one tensor of extra memory, not a model. A bad tensor then raises after the ones before it were
        copied: the engine is left with a mix, and must be given a complete set again.
        """
        self._lifecycle.update(weights)

    # -- step API -----------------------------------------------------------------------------------

    def prepare(self, prompt: Any) -> PreparedPrompt:
        """Tokenize a prompt and preprocess its images (thread-safe: reads only the processor and model config).
        Raises ValueError naming the problem: bad prompt type, image, placeholder count or token id."""
        return self._prompts.prepare(prompt)

    def prepare_params(self, params: SamplingParams) -> SamplingParams:
        """Compile the params' structured-output grammar into the engine's cache (thread-safe), so adding the
        request later costs the engine thread nothing. Raises ValueError naming the field for a bad spec."""
        if params.structured_outputs is not None:
            self._structured.compile(params.structured_outputs)
        return params

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling parameters a prompt given none runs with (vLLM's name): the generation config's values
        over SamplingParams' defaults."""
        return SamplingParams(**self.sampling_defaults)

    def add_request(self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0) -> str:
        params = params or self.get_default_sampling_params()
        self.engine.check_priority(priority)  # before the prompt's images are loaded
        p = self.prepare(prompt)
        rid = request_id if request_id is not None else str(next(self._ids))
        self.engine.add_request(rid, p.token_ids, params, images=p.images, salt=p.salt, prompt=p.prompt,
                                image_hashes=p.image_hashes, priority=priority)
        return rid

    def step(self) -> list[RequestOutput]:
        """One engine step; the outputs of the requests that changed (finished ones are then forgotten)."""
        outs = [request_output(r) for r in self.engine.step()]
        for o in outs:
            if o.finished:
                self.engine.requests.pop(o.request_id, None)
        return outs

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.engine.abort(request_id)
        if req is None:
            return None
        self.engine.requests.pop(request_id, None)
        return request_output(req)

    def has_unfinished_requests(self) -> bool:
        return self._lifecycle.busy()

    # -- batch API ----------------------------------------------------------------------------------

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """priority: one per prompt (scheduling_policy='priority'; lower first)."""
        prompts = prompt_list(prompts)
        params = (sampling_params if isinstance(sampling_params, list)
                  else [sampling_params or self.get_default_sampling_params()] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"{len(priority)} priorities for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for p, sp, pr in zip(prompts, params, priority):
                ids.append(self.add_request(p, sp, request_id=f"gen-{next(self._ids)}", priority=pr))
        except Exception:
            for rid in ids:  # all or nothing: no orphan requests left in the engine
                self.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: Any, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search (engine/beam_search.py): per prompt, the beam_width best sequences, best first."""
        return run_beam_search(self, prompts, params, use_tqdm)

    def new_beam_search(self, prepared: list[PreparedPrompt], params: BeamSearchParams) -> BeamSearch:
        """The beams of prepared prompts under this engine's EOS ids and limits, for a driver to step."""
        return BeamSearch(prepared, params, self.core_config.eos_token_ids, self.core_config.max_logprobs,
                          self.max_model_len)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        return self.generate(self._prompts.chat(messages, add_generation_prompt), sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        wanted, done = set(request_ids), {}
        bar = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm)
        while len(done) < len(wanted):
            changed = self.engine.step()
            if not changed and not self.engine.scheduler.has_work():
                raise RuntimeError("engine stalled with unfinished requests (this is a bug)")
            for req in changed:  # outputs only for finished requests: no per-step copies of long outputs
                if req.finished:
                    self.engine.requests.pop(req.request_id, None)
                    if req.request_id in wanted:
                        done[req.request_id] = request_output(req)
                        bar.update(1)
        bar.close()
        return [done[r] for r in request_ids]

    # -- cache control and stats --------------------------------------------------------------------

    def pin_prefix(self, prompt: Any) -> int:
        """Keep a prompt's cached full blocks resident across calls; returns the tokens pinned."""
        return self.engine.block_manager.pin_prefix(*self._prefix_key(prompt))

    def unpin_prefix(self, prompt: Any) -> None:
        self.engine.block_manager.unpin_prefix(*self._prefix_key(prompt))

    def _prefix_key(self, prompt: Any) -> tuple[list[int], int]:
        p = self.prepare(prompt)
        return self.engine.prefix_cache_ids(p.token_ids, p.images, p.image_hashes), p.salt

    def reset_prefix_cache(self) -> int:
        """Drop every cached prompt block that no running request uses (pinned prefixes stay); vLLM's name.
        Returns the blocks dropped. For benchmarks that must start cold, or after a tokenizer/template change."""
        bm = self.engine.block_manager
        return bm.evict(bm.num_cached())

    def reset_stats(self) -> None:
        """Start kv_stats()' counters (peaks, totals) afresh, e.g. after a warm-up request."""
        self.engine.counters = EngineCounters()
        self._stats_base = (self.engine.block_manager.prefix_hit_tokens, self.engine.scheduler.num_preemptions)
        self.engine.runner.images.reset_counters()

    def kv_stats(self) -> dict:
        """The pool and the counters since the last reset_stats(); while asleep, an empty pool (sleep_level > 0)."""
        if self._lifecycle.core is None:
            return {**self._asleep_stats, "block_size": self._sleep.block_size, "sleep_level": self._sleep.level}
        bm, c = self.engine.block_manager, self.engine.counters
        per_block = self.engine.kv.bytes_per_block
        used = bm.num_used()
        return {
            "blocks_total": bm.num_blocks, "blocks_used": used, "blocks_cached": bm.num_cached(),
            "blocks_free": bm.num_free(), "block_size": bm.block_size, "bytes_per_block": per_block,
            "bytes_in_use": used * per_block, "peak_blocks_used": c.peak_blocks_used,
            "peak_bytes_in_use": c.peak_blocks_used * per_block, "prefix_hit_tokens": bm.prefix_hit_tokens - self._stats_base[0],
            "prefill_tokens_computed": c.prefill_tokens, "decode_tokens_computed": c.decode_tokens,
            "preemptions": self.engine.scheduler.num_preemptions - self._stats_base[1], "forks": c.forks,
            "deduplicated_prompts": c.deduplicated_prompts,
            "images_encoded": self.engine.runner.images.images_encoded,
            "encoder_calls": self.engine.runner.images.encoder_calls,
            "encoder_cache_hits": self.engine.runner.images.cache_hits,
            "spec_draft_tokens": c.draft_tokens, "spec_accepted_tokens": c.accepted_tokens, "sleep_level": 0,
        }

    # -- sleep mode (vLLM's): give the device back to a trainer between rollouts -------------------------

    def sleep(self, level: int = 1) -> int:
        """Free the KV pool (with the prefix cache, pinned prefixes and the image-feature cache); level 1 keeps
        the weights (copied to host memory and freed on a GPU; on the CPU they already are in host memory), level 2
        discards them. Needs an idle engine. Returns the device bytes freed. While asleep, requests raise
        EngineSleepingError; wake_up() restores what slept. After level 2 the weights come from update_weights()
        (which works while asleep) or, if none came, are reloaded from the checkpoint on wake_up()."""
        return self._lifecycle.sleep(level, offload=self._offloads_weights())

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (both by default; vLLM's tags). The KV pool comes back empty."""
        self._lifecycle.wake_up(tags)

    def _offloads_weights(self) -> bool:
        """Level 1 moves the weights to host memory only where they are not there already."""
        return self.device.type != "cpu"

    def is_sleeping(self) -> bool:
        return self._lifecycle.is_sleeping()
