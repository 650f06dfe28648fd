"""`LLM`: the embeddable, in-process API (vLLM's names). Text, token ids, images and chat messages in;
`RequestOutput`s out. No subprocesses, no ports, no global state: two LLMs can live in one process."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from step3vl.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from step3vl.engine.core import EngineCore, EngineCounters
from step3vl.engine.cpu_modules import should_use_native, use_native_decoder
from step3vl.engine.image_inputs import image_hash
from step3vl.engine.kv_cache import KVCache, block_bytes
from step3vl.engine.outputs import CompletionOutput, RequestOutput
from step3vl.engine.sampling_params import SamplingParams
from step3vl.engine.sequence import Request
from step3vl.engine.speculative import SpeculativeConfig
from step3vl.engine.structured_outputs import StructuredOutputBackend
from step3vl.loader import load_model
from step3vl.processor import Step3VLProcessor


class EngineSleepingError(RuntimeError):
    """The engine was put to sleep (`LLM.sleep`); `LLM.wake_up()` brings it back."""


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
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


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # On the CPU, fp32 runs the native decoder (bf16-exact weights still stream as bf16): the faster path.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def _finite(t: torch.Tensor, limit: float) -> bool:
    """No NaN and every value within ±limit (what the engine's dtype holds): min and max in one pass propagate
    a NaN and show an inf (no [numel] bool temporary)."""
    lo, hi = torch.aminmax(t.detach())
    return bool((lo >= -limit) & (hi <= limit))


def _prompt_list(prompts: Any) -> list:
    """One prompt (a string, a dict, a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _cache_salt(cache_salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(cache_salt.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def _visible_text(seq) -> str:
    """While running, hold back a tail that could still become a stop string (vLLM does the same), so
    streamed text only ever grows."""
    stops = seq.request.params.stop_strings
    hold = max(map(len, stops)) - 1 if stops and seq.finish_reason is None else 0
    return seq.text[:len(seq.text) - hold] if hold else seq.text


@dataclass
class _SleepState:
    """What LLM.sleep put away: the KV pool's geometry (to allocate it again) and where the weights are."""
    num_blocks: int
    block_size: int
    level: int = 0  # 0 awake; else the deepest level slept since the last full wake-up
    kv_asleep: bool = False
    weights: str = "device"  # "device" | "host" (level 1 on a GPU: host_weights) | "discarded" (level 2)
    host_weights: dict | None = None
    empty_stats: dict = field(default_factory=dict)  # kv_stats() while asleep: the awake keys, all 0
    rng: Any = None  # the engine's seed source, kept so unseeded requests keep drawing fresh seeds


@dataclass(slots=True)
class PreparedPrompt:
    """A prompt tokenized and its images preprocessed (`LLM.prepare`): what the engine takes. Preparing touches
    no engine state, so a server can prepare on worker threads while the engine thread keeps stepping."""
    prompt: str | None
    token_ids: list[int]
    images: list = field(default_factory=list)
    salt: int = 0  # prefix-cache salt: cache_salt
    image_hashes: list[int] = field(default_factory=list)  # per image, its pixels' digest (the prefix cache's key)


class LLM:
    """An in-process engine over one checkpoint directory (vLLM's names).

    dtype: "auto" (bf16 on CUDA, fp32 on the CPU), "float32", "bfloat16", "float16" or a torch.dtype.
    device: "cuda" when available, else "cpu". kv_cache_memory: bytes or "4GiB"-style (default: 60% of free GPU
    memory, 1 GiB on the CPU). block_size: tokens per KV block (a power of two). max_model_len: prompt + output
    limit (default: what the model and the pool allow). max_num_batched_tokens: per-step token budget (chunked
    prefill). max_num_seqs: sequences per step. seed: the default for requests without one.
    use_kernels: Triton/CUDA kernels (default on CUDA). cascade_attention: the shared-prefix cascade decode kernel on
    CUDA (default off until measured there). cpu_kernels: on the CPU, the native decoder (packed linears, C++
    paged attention, in fp32 one native call per decode step); False keeps the plain PyTorch path. max_logprobs:
    the most alternatives per token (logprobs, prompt_logprobs) a request may ask for. encoder_cache_memory: image
    features kept by image digest, so an image that recurs (PaCoRe rounds, chat turns, a shared picture) is encoded
    once while cached. speculative_config: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2} (vLLM's) drafts tokens by prompt lookup and verifies them in one pass; outputs are
    token for token those without it (engine/speculative.py). scheduling_policy: "fcfs" (arrival order) or
    "priority" (each request's `priority`, lower first, then arrival: admission, decode order within the batch
    limits, and preemption of the last in that order when the pool runs out).
    """

    def __init__(self, model: str | Path, dtype: str | torch.dtype = "auto", device: str | None = None,
                 kv_cache_memory: int | str | None = None, block_size: int = 16, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int = 256, seed: int = 0,
                 use_kernels: bool | None = None, cascade_attention: bool | None = None, cpu_kernels: bool = True,
                 max_logprobs: int = 20, encoder_cache_memory: int | str = "256MiB",
                 speculative_config: SpeculativeConfig | dict | None = None, scheduling_policy: str = "fcfs"):
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size}: must be a power of two")
        self.dtype = _resolve_dtype(dtype, dev)
        self.device = dev
        self.model_path = Path(model)
        self.processor = Step3VLProcessor.from_pretrained(model)
        self.model = self._prepare(load_model(model, dtype=self.dtype, device=dev), cpu_kernels)
        cfg = self.model.cfg.text
        per_block = block_bytes(cfg, block_size, self.dtype)
        budget = parse_bytes(kv_cache_memory) if kv_cache_memory is not None else self._default_kv_bytes(dev)
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory {budget} bytes holds {num_blocks} blocks of {per_block} bytes; "
                             f"need at least 2")
        kv = KVCache.allocate(cfg, num_blocks, block_size, self.dtype, dev)
        limit = min(cfg.max_position_embeddings, num_blocks * block_size)
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        eos = set(self.processor.tokenizer.eos_token_ids) | set(cfg.eos_token_id)
        tok = self.processor.tokenizer
        self._engine_args = dict(
            kv=kv, max_model_len=min(max_model_len or limit, cfg.max_position_embeddings), eos_token_ids=eos,
            detokenizer_factory=lambda skip: tok.stream_decoder(skip),
            max_num_batched_tokens=max_num_batched_tokens or max(2048, block_size),
            max_num_seqs=max_num_seqs, use_kernels=dev.type == "cuda" if use_kernels is None else use_kernels,
            # On CUDA the last measured cascade kernel (eager, 3 launches) lost to plain paged decode
            # (bench/RESULTS.md); the CPU path always reads a shared prefix once per group.
            cascade_attention=dev.type != "cuda" if cascade_attention is None else cascade_attention,
            cpu_kernels=cpu_kernels,
            structured=StructuredOutputBackend(tok, cfg.vocab_size, eos),
            max_logprobs=max_logprobs,
            encoder_cache_bytes=parse_bytes(encoder_cache_memory, "encoder_cache_memory"),
            speculative=SpeculativeConfig.of(speculative_config),
            scheduling_policy=scheduling_policy,
            encode=tok.encode,
            seed=seed)
        self._sleep = _SleepState(num_blocks, block_size)
        self._core: EngineCore | None = self._new_engine()
        self._ids = itertools.count()
        self._stats_base = (0, 0)  # (prefix_hit_tokens, preemptions) at the last reset_stats()

    @property
    def engine(self) -> EngineCore:
        if self._core is None:
            raise EngineSleepingError(f"the engine is asleep (LLM.sleep(level={self._sleep.level})): call "
                                      f"wake_up() first")
        return self._core

    @engine.setter
    def engine(self, core: EngineCore) -> None:
        self._core = core

    def _prepare(self, model, cpu_kernels: bool):
        self._native = cpu_kernels and should_use_native(model, self.dtype)
        if self._native:
            use_native_decoder(model)
        return model

    def _new_engine(self, rng=None) -> EngineCore:
        from step3vl_native import BlockManager

        kv = self._engine_args["kv"]
        core = EngineCore(model=self.model, block_manager=BlockManager(kv.num_blocks, kv.block_size),
                          **self._engine_args)
        if rng is not None:
            core._rng = rng  # requests without a seed keep drawing fresh seeds across weight updates
        return core

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
        from step3vl.loader import check_state, model_from_state

        if self.has_unfinished_requests():
            raise RuntimeError(f"update_weights: {len(self.engine.requests)} request(s) in flight; let them finish "
                               f"or abort them first")
        cfg = self.model.cfg
        weights_asleep = self._sleep.weights != "device"
        if isinstance(weights, Iterator) and not (self._native or weights_asleep):
            self._stream_weights(weights)
            return
        state = check_state(cfg, dict(weights), "update_weights")
        limit = torch.finfo(self.dtype).max
        bad = next((k for k, v in state.items() if v.numel() and not _finite(v, limit)), None)
        if bad is not None:  # a diverged trainer must not silently poison the sampler
            raise ValueError(f"update_weights: key {bad!r} holds NaN/inf or values beyond {self.dtype}'s range")
        if self._native or weights_asleep:
            self.model = self._prepare(model_from_state(cfg, state, self.dtype, self.device, "update_weights"),
                                       self._native)
        else:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    params[name].copy_(value)
        self._sleep.weights, self._sleep.host_weights = "device", None
        self._restart_engine()

    def _stream_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
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
        self._sleep.weights, self._sleep.host_weights = "device", None
        self._restart_engine()

    def _restart_engine(self) -> None:
        """A fresh engine over the current weights, unless the KV pool is asleep (wake_up builds it then)."""
        rng = self._core._rng if self._core is not None else self._sleep.rng
        self._core = None if self._sleep.kv_asleep else self._new_engine(rng=rng)
        self._stats_base = (0, 0)

    @staticmethod
    def _default_kv_bytes(dev: torch.device) -> int:
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free * 0.6)
        return 1 << 30

    def get_tokenizer(self):
        return self.processor.tokenizer

    # -- prompts ------------------------------------------------------------------------------------

    def _process(self, prompt: Any) -> tuple[str | None, list[int], list]:
        """A prompt: str, list of token ids, or {"prompt" | "prompt_token_ids": ..., "images": [...],
        "cache_salt": str} (vLLM's name: requests with different salts never share cached blocks)."""
        if isinstance(prompt, str):
            p = self.processor.process(prompt, [])
            return prompt, p.input_ids, []
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt), []
        if isinstance(prompt, dict):
            images = prompt.get("images") or ([prompt["image"]] if "image" in prompt else [])
            if "prompt_token_ids" in prompt:
                if images:
                    raise ValueError("images with prompt_token_ids: pass the prompt text so the image tokens "
                                     "can be laid out")
                return None, list(prompt["prompt_token_ids"]), []
            if "prompt" in prompt:
                p = self.processor.process(prompt["prompt"], list(images))
                return prompt["prompt"], p.input_ids, p.images
        raise ValueError(f"unsupported prompt of type {type(prompt).__name__}: use a string, a list of token ids "
                         f"or a dict with 'prompt' or 'prompt_token_ids' (and optional 'images')")

    def _check_ids(self, ids: list[int]) -> None:
        vocab = self.model.cfg.text.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")

    # -- step API -----------------------------------------------------------------------------------

    def prepare(self, prompt: Any) -> PreparedPrompt:
        """Tokenize a prompt and preprocess its images (thread-safe: reads only the processor and model config).
        Raises ValueError naming the problem: bad prompt type, image, placeholder count or token id."""
        if isinstance(prompt, PreparedPrompt):
            return prompt
        text, ids, images = self._process(prompt)
        self._check_ids(ids)
        salt = 0
        if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
            salt = _cache_salt(str(prompt["cache_salt"]))
        return PreparedPrompt(text, ids, images, salt, [image_hash(im) for im in images])

    def prepare_params(self, params: SamplingParams) -> SamplingParams:
        """Compile the params' structured-output grammar into the engine's cache (thread-safe), so adding the
        request later costs the engine thread nothing. Raises ValueError naming the field for a bad spec."""
        if params.structured_outputs is not None:
            self._engine_args["structured"].compile(params.structured_outputs)
        return params

    @property
    def max_model_len(self) -> int:
        return self._engine_args["max_model_len"]

    def add_request(self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0) -> str:
        params = params or SamplingParams()
        self.engine.check_priority(priority)  # before the prompt's images are loaded
        p = self.prepare(prompt)
        rid = request_id if request_id is not None else str(next(self._ids))
        self.engine.add_request(rid, p.token_ids, params, images=p.images, salt=p.salt, prompt=p.prompt,
                                image_hashes=p.image_hashes, priority=priority)
        return rid

    def step(self) -> list[RequestOutput]:
        """One engine step; the outputs of the requests that changed (finished ones are then forgotten)."""
        outs = [self._output(r) for r in self.engine.step()]
        for o in outs:
            if o.finished:
                self.engine.requests.pop(o.request_id, None)
        return outs

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.engine.abort(request_id)
        if req is None:
            return None
        self.engine.requests.pop(request_id, None)
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return self._core is not None and self._core.has_unfinished()

    def _output(self, req: Request) -> RequestOutput:
        comps = [CompletionOutput(
            index=s.index, text=_visible_text(s), token_ids=s.output_ids,
            cumulative_logprob=s.cumulative_logprob if req.params.logprobs is not None else None,
            logprobs=list(s.logprobs) if req.params.logprobs is not None else None,
            finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in sorted(req.sequences, key=lambda s: s.index)]
        ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps, req.finished,
                             num_cached_tokens=req.num_cached_tokens, metrics={"time_to_first_token": ttft},
                             prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None)

    # -- batch API ----------------------------------------------------------------------------------

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """priority: one per prompt (scheduling_policy='priority'; lower first)."""
        prompts = _prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
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
        search = self.new_beam_search([self.prepare(p) for p in _prompt_list(prompts)], params)
        while not search.finished:
            search.advance(self.generate(search.requests(), search.step_params, use_tqdm=use_tqdm))
        return search.results(self.get_tokenizer())

    def new_beam_search(self, prepared: list[PreparedPrompt], params: BeamSearchParams) -> BeamSearch:
        """The beams of prepared prompts under this engine's EOS ids and limits, for a driver to step."""
        return BeamSearch(prepared, params, self._engine_args["eos_token_ids"], self._engine_args["max_logprobs"],
                          self.max_model_len)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            text, images = self.processor.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "images": images})
        return self.generate(prompts, sampling_params, use_tqdm)

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
                        done[req.request_id] = self._output(req)
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
        if self._core is None:
            return {**self._sleep.empty_stats, "block_size": self._sleep.block_size, "sleep_level": self._sleep.level}
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
        if level not in (1, 2):
            raise ValueError(f"sleep(level={level!r}): level is 1 (offload the weights) or 2 (discard them)")
        if self.has_unfinished_requests():
            raise RuntimeError(f"sleep: {len(self.engine.requests)} request(s) in flight; let them finish or abort "
                               f"them first")
        freed = 0
        if not self._sleep.kv_asleep:
            kv = self._engine_args["kv"]
            freed += kv.num_blocks * kv.bytes_per_block
            if self._core is not None:
                self._sleep.empty_stats = {k: 0 for k in self.kv_stats()}
                self._sleep.rng = self._core._rng
            self._core, self._engine_args["kv"], self._sleep.kv_asleep = None, None, True
        if self._sleep.weights == "device" and (level == 2 or self._offloads_weights()):
            if level == 1:
                self._sleep.host_weights = {k: v.detach().to("cpu", copy=True)
                                            for k, v in self.model.state_dict().items()}
            freed += sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied ones once
            self._sleep.weights = "host" if level == 1 else "discarded"
            self.model = self._skeleton()
        self._sleep.level = max(self._sleep.level, level)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed memory back to other processes too
        return freed

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (both by default; vLLM's tags). The KV pool comes back empty."""
        from step3vl.loader import model_from_state

        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        unknown = set(tags) - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"wake_up(tags={tags!r}): unknown tag(s) {sorted(unknown)}; use 'weights', 'kv_cache'")
        if "weights" in tags and self._sleep.weights != "device":
            if self._sleep.weights == "host":
                model = model_from_state(self.model.cfg, self._sleep.host_weights, self.dtype, self.device, "wake_up")
            else:  # discarded and never replaced through update_weights: the checkpoint's own
                model = load_model(self.model_path, dtype=self.dtype, device=self.device)
            self.model = self._prepare(model, self._native)
            self._sleep.weights, self._sleep.host_weights = "device", None
        if "kv_cache" in tags and self._sleep.kv_asleep:
            cfg = self.model.cfg.text
            self._engine_args["kv"] = KVCache.allocate(cfg, self._sleep.num_blocks, self._sleep.block_size,
                                                       self.dtype, self.device)
            self._sleep.kv_asleep = False
        if not self._sleep.kv_asleep and self._sleep.weights == "device":
            self._sleep.level = 0
            if self._core is None:
                self._restart_engine()

    def _offloads_weights(self) -> bool:
        """Level 1 moves the weights to host memory only where they are not there already."""
        return self.device.type != "cpu"

    def is_sleeping(self) -> bool:
        return self._sleep.level > 0

    def _skeleton(self):
        """The model without storage: its config and structure stay readable while the weights sleep."""
        from step3vl.model import Step3VLForCausalLM

        with torch.device("meta"):
            return Step3VLForCausalLM(self.model.cfg)
