"""EngineCore: token ids in, token ids out. Owns the block manager, KV pool, scheduler, runner and sampler.

One `step()` = schedule → copy-on-write block copies → one forward → sample → stop checks. A request with
n samples is prefilled once as sample 0; when its prompt is done the other n-1 samples are forked from it
(sharing every prompt block by ref count) and all n draw their first token from the same logits. Requests
whose prompt (and images) equal one still being prefilled wait and are forked from it the same way.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable

from step3vl.engine.config import CoreConfig
from step3vl.engine.image_inputs import cache_token_ids, image_layout
from step3vl.engine.kv_cache import KVCache
from step3vl.engine.model_runner import ModelRunner, sample_rows_for
from step3vl.engine.sampler import NO_TOKEN, SampledToken, Sampler
from step3vl.engine.scheduler import PrefillWork, Scheduler, ScheduledStep
from step3vl.engine.sequence import Request, Sequence, SeqStatus
from step3vl.engine.sampling_params import SamplingParams
from step3vl.engine.speculative import NgramProposer
from step3vl.engine.token_constraints import bad_words_token_ids


@dataclass(slots=True)
class EngineCounters:
    prefill_tokens: int = 0  # tokens computed while (re)building a sequence's context
    decode_tokens: int = 0
    steps: int = 0
    peak_blocks_used: int = 0
    forks: int = 0
    deduplicated_prompts: int = 0
    draft_tokens: int = 0  # speculative tokens run through the model
    accepted_tokens: int = 0  # of those, the ones kept


@dataclass(eq=False)
class EngineCore:
    model: object
    kv: KVCache
    block_manager: object
    config: CoreConfig  # resolved from the EngineConfig (EngineConfig.resolve); its parts go to scheduler and runner
    detokenizer_factory: object = None  # (skip_special_tokens) -> stream decoder with .step(ids) -> str
    structured: object = None  # StructuredOutputBackend, for requests with structured_outputs
    encode: Callable[[str], list[int]] | None = None  # the tokenizer, for SamplingParams.bad_words
    requests: dict[str, Request] = field(default_factory=dict)
    counters: EngineCounters = field(default_factory=EngineCounters)

    def __post_init__(self) -> None:
        cfg = self.config
        self.max_model_len, self.eos_token_ids, self.speculative = cfg.max_model_len, cfg.eos_token_ids, cfg.speculative
        self.block_size = self.kv.block_size
        self.scheduler = Scheduler(self.block_manager, self.block_size, cfg.scheduler)
        self.runner = ModelRunner(self.model, self.kv, cfg.runner)
        self.sampler = Sampler(self.model.device, self.eos_token_ids, self.structured)
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._rng = random.Random(cfg.seed)
        self._private_salts = itertools.count(1)  # prompt-cache salts no other request shares
        self._prefilling: dict[tuple, Request] = {}  # prompt key -> request whose sample 0 is prefilling
        self.proposer = NgramProposer(self.speculative, self.max_model_len) if self.speculative else None

    # -- requests -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    images: list | None = None, salt: int = 0, prompt: str | None = None,
                    image_hashes: list[int] | None = None, priority: int = 0) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_priority(priority)
        params.__post_init__()  # fields set after construction: derive stop strings and validate again
        prompt_token_ids = self._truncate(request_id, prompt_token_ids, params, images)
        self._check_fits(request_id, prompt_token_ids, params)
        grammar = self._grammar(params)
        if params.prompt_logprobs is not None:  # every prompt position must be computed: no cached blocks
            salt = (1 << 62) | next(self._private_salts)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, prompt, list(prompt_token_ids), params, seed, next(self._arrivals), priority,
                      images=list(images or []), salt=salt, arrival_time=time.perf_counter(), grammar=grammar)
        if req.images:
            req.image_layout = image_layout(self.model, req.prompt_token_ids, req.images, image_hashes)
            req.cache_prompt_ids = cache_token_ids(req.prompt_token_ids, req.image_layout)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt_token_ids)
        if params.bad_words:
            if self.encode is None:
                raise ValueError("SamplingParams.bad_words: this engine has no tokenizer to tokenize them with")
            req.bad_words_ids = bad_words_token_ids(params.bad_words, self.encode)
        self.requests[request_id] = req
        leader = self._prefilling.get(req.prompt_key)
        # Only a leader at least as urgent: a request must not wait behind a lower-priority prefill.
        if leader is not None and not leader.aborted and leader.priority <= req.priority:
            req.leader = leader  # identical prompt in flight: fork from it instead of prefilling again
            leader.followers.append(req)
            self.counters.deduplicated_prompts += 1
            return req
        self._prefilling[req.prompt_key] = req
        seq = Sequence(next(self._seq_ids), req, 0, list(prompt_token_ids), detokenizer=self._detok(params))
        req.sequences.append(seq)
        self.scheduler.add(seq)
        return req

    def _truncate(self, request_id: str, ids: list[int], params: SamplingParams, images: list | None) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: the most that leave room for one
        generated token). A cut into an image's tokens is refused: it would orphan the image's features."""
        k = params.truncate_prompt_tokens
        if k is None:
            return ids
        k = self.max_model_len - 1 if k == -1 else k
        cut = max(0, len(ids) - k)
        if cut and images:
            first = next((i for i, t in enumerate(ids) if t == self.model.cfg.image_token_id), len(ids))
            if cut >= first:  # the token before the first <im_patch> opens the image (<patch_start>/<im_start>)
                raise ValueError(f"request {request_id!r}: truncate_prompt_tokens={params.truncate_prompt_tokens} "
                                 f"would cut into the image tokens (keeping {k} of {len(ids)} tokens; the first "
                                 f"image starts at token {max(0, first - 1)})")
        return ids[cut:]

    def check_priority(self, priority: int) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and self.config.scheduler.policy != "priority":
            raise ValueError(f"priority {priority} needs scheduling_policy='priority' (this engine schedules "
                             f"'{self.config.scheduler.policy}')")

    def prefix_cache_ids(self, prompt_token_ids: list[int], images: list,
                         image_hashes: list[int] | None = None) -> list[int]:
        """A prompt's ids as the prefix cache hashes them (image rows carry their image's digest)."""
        if not images:
            return prompt_token_ids
        return cache_token_ids(prompt_token_ids, image_layout(self.model, prompt_token_ids, images, image_hashes))

    def _check_fits(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        vocab = self.model.cfg.text.vocab_size
        limit = min(vocab, self.config.max_logprobs)
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > limit:
                raise ValueError(f"SamplingParams.{name} = {getattr(params, name)}: more than max_logprobs "
                                 f"({limit}; LLM(max_logprobs=...) raises it)")
        for name in ("logit_bias", "allowed_token_ids"):
            bad = next((t for t in getattr(params, name) or () if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"SamplingParams.{name}: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(ids)} tokens does not fit max_model_len "
                             f"{self.max_model_len} (with room for one generated token)")
        pool_tokens = self.kv.num_blocks * self.block_size
        if len(ids) + 1 > pool_tokens:
            raise ValueError(f"request {request_id!r}: prompt of {len(ids)} tokens exceeds the whole KV pool "
                             f"({pool_tokens} tokens); raise kv_cache_memory")

    def _grammar(self, params: SamplingParams):
        if params.structured_outputs is None:
            return None
        if self.structured is None:
            raise ValueError("SamplingParams.structured_outputs: this engine has no tokenizer to compile grammars with")
        return self.structured.compile(params.structured_outputs)

    def _detok(self, params: SamplingParams):
        return self.detokenizer_factory(params.skip_special_tokens) if self.detokenizer_factory else None

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.aborted = True
        for seq in req.sequences:
            if not seq.finished:
                self._finish(seq, "abort")
        if req.leader is not None:
            req.leader.followers.remove(req)
        self._abort_unforked(req)
        return req

    def _abort_unforked(self, req: Request) -> None:
        """Samples never forked still get an (empty, aborted) output each, so outputs always number n."""
        self._release_leadership(req)
        have = {s.index for s in req.sequences}
        for i in range(req.params.n):
            if i not in have:
                seq = Sequence(next(self._seq_ids), req, i, list(req.prompt_token_ids),
                               status=SeqStatus.FINISHED, finish_reason="abort")
                req.sequences.append(seq)
        req.forked = True

    def _release_leadership(self, req: Request) -> None:
        if self._prefilling.get(req.prompt_key) is req:
            del self._prefilling[req.prompt_key]
        for f in req.followers:  # they prefill on their own after all
            f.leader = None
            seq = Sequence(next(self._seq_ids), f, 0, list(f.prompt_token_ids), detokenizer=self._detok(f.params))
            f.sequences.append(seq)
            self.scheduler.add(seq)
        req.followers = []

    def has_unfinished(self) -> bool:
        return any(not r.finished for r in self.requests.values())

    # -- one step -----------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one engine step; returns the requests whose outputs changed."""
        if self.proposer is not None:
            self.proposer.propose([s for s in self.scheduler.running if s.is_decode])
        step = self.scheduler.schedule()
        changed: dict[str, Request] = {}
        for seq in step.stuck:
            self._finish(seq, "length")
            changed[seq.request.request_id] = seq.request
        for seq in step.unfittable:
            self._finish(seq, "abort", "KV pool too small for this prompt while prefixes are pinned")
            self._abort_unforked(seq.request)
            changed[seq.request.request_id] = seq.request
        if step.empty:
            return list(changed.values())
        self.kv.copy_blocks(step.copy_src, step.copy_dst)
        started = time.perf_counter()
        for w in step.prefills:
            if w.seq.request.scheduled_time is None:
                w.seq.request.scheduled_time = started
        rows, seqs = sample_rows_for(step)
        logits = self.runner.run(step, rows)
        self._account(step)
        to_sample, logit_rows = self._expand_forks(seqs)
        verifying = {id(w.seq): w for w in step.prefills if w.draft}
        sampled = self.sampler(logits[logit_rows] if len(logit_rows) != len(seqs) else logits, to_sample,
                               _positions_ahead(to_sample, verifying) if verifying else None)
        now = time.perf_counter()
        drawn: dict[int, list[SampledToken]] = {}
        for seq, tok in zip(to_sample, sampled):
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
            if id(seq) in verifying:
                drawn.setdefault(id(seq), []).append(tok)
            else:
                self._append(seq, tok)
            changed[seq.request.request_id] = seq.request
        for key, tokens in drawn.items():
            self._verify(verifying[key], tokens)
        return list(changed.values())

    def _verify(self, work: PrefillWork, drawn: list[SampledToken]) -> None:
        """A speculative chunk: keep the drafts up to the first one that differs from the token drawn at its
        position, then that drawn token. The KV of the sample's last token and of the kept drafts stays; the
        rejected drafts' slots go back to the pool."""
        seq, accepted = work.seq, 0
        for i, tok in enumerate(drawn):
            self._append(seq, tok)
            if seq.finished or i == len(work.draft) or tok.token != work.draft[i]:
                break
            accepted += 1
        seq.draft = []
        self.counters.draft_tokens += len(work.draft)
        self.counters.accepted_tokens += accepted
        if seq.finished:
            return
        seq.num_computed = seq.num_registered = work.start + 1 + accepted
        self.block_manager.mark_computed(seq.seq_id, seq.num_computed)
        self.block_manager.truncate(seq.seq_id, seq.num_computed)
        del seq.block_table[-(-seq.num_computed // self.block_size):]

    def _account(self, step: ScheduledStep) -> None:
        self.counters.steps += 1
        self.counters.decode_tokens += len(step.decodes) + sum(w.length for w in step.prefills if w.draft)
        self.counters.prefill_tokens += sum(w.length for w in step.prefills if not w.draft)
        for seq in step.decodes:
            seq.num_computed += 1
            if seq.num_computed % self.block_size == 0:
                self.block_manager.mark_computed(seq.seq_id, seq.num_computed)
        for w in step.prefills:
            if w.draft:
                continue  # speculative chunks are accounted when verified
            w.seq.num_computed += w.length
            self.block_manager.mark_computed(w.seq.seq_id, w.seq.num_computed)
        self.counters.peak_blocks_used = max(self.counters.peak_blocks_used, self.block_manager.num_used())

    def _expand_forks(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """Sample 0 of a request just finished its prompt: fork its siblings (and identical-prompt
        followers' samples) from it; they all sample from its logits row."""
        out, rows = [], []
        for row, seq in enumerate(seqs):
            out.append(seq)
            rows.append(row)
            req = seq.request
            if req.forked:
                continue
            for child_req in [req] + req.followers:
                start = 1 if child_req is req else 0
                for i in range(start, child_req.params.n):
                    child = self._fork(seq, child_req, i)
                    out.append(child)
                    rows.append(row)
                child_req.forked = True
                child_req.num_cached_tokens = max(child_req.num_cached_tokens, req.num_cached_tokens)
                child_req.leader = None
            req.followers = []
            if self._prefilling.get(req.prompt_key) is req:
                del self._prefilling[req.prompt_key]
        return out, rows

    def _fork(self, parent: Sequence, req: Request, index: int) -> Sequence:
        child = Sequence(next(self._seq_ids), req, index, list(parent.token_ids), detokenizer=self._detok(req.params),
                         num_computed=parent.num_computed, num_registered=parent.num_registered,
                         block_table=list(parent.block_table))
        self.block_manager.fork(parent.seq_id, child.seq_id)
        req.sequences.append(child)
        self.scheduler.add_running(child)
        self.counters.forks += 1
        return child

    # -- outputs and stops --------------------------------------------------------------------------

    def _append(self, seq: Sequence, tok: SampledToken) -> None:
        p = seq.request.params
        if tok.token == NO_TOKEN:  # the request's own rules left nothing to sample: end this sample, not the engine
            self._finish(seq, "abort", seq.rule_state.pop("error", None) or "no token is allowed by the request's "
                                       "rules (structured outputs, allowed_token_ids, min_tokens)")
            return
        seq.token_ids.append(tok.token)
        if tok.logprob is not None:
            seq.cumulative_logprob += tok.logprob
            seq.logprobs.append(tok.top_logprobs)
        text_before = len(seq.text)
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.step(tok.token)
        n_out = seq.num_tokens - seq.num_prompt_tokens
        if n_out < p.min_tokens:  # only the length limits end a sample this short
            if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
                self._finish(seq, "length")
        elif not p.ignore_eos and tok.token in self.eos_token_ids:
            self._finish(seq, "stop", cut_text_at=None if p.include_stop_str_in_output else text_before)
        elif tok.token in p.stop_token_ids:
            self._finish(seq, "stop", tok.token, cut_text_at=None if p.include_stop_str_in_output else text_before)
        elif p.stop_strings and self._stop_string(seq, text_before):
            pass
        elif p.max_tokens is not None and n_out >= p.max_tokens:
            self._finish(seq, "length")
        elif seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _stop_string(self, seq: Sequence, text_before: int) -> bool:
        p = seq.request.params
        longest = max(len(s) for s in p.stop_strings)
        window_start = max(0, text_before - longest + 1)  # a match must end in the new text
        best = None
        for s in p.stop_strings:
            i = seq.text.find(s, window_start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        seq.text = seq.text[:i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
        self._finish(seq, "stop", s)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None,
                cut_text_at: int | None = None) -> None:
        if seq.detokenizer is not None and reason != "abort" and not isinstance(stop_reason, str):
            seq.text += seq.detokenizer.flush()  # a trailing incomplete character, as decode() would give
        if cut_text_at is not None:  # a stop token's own text is not part of the output (vLLM)
            seq.text = seq.text[:cut_text_at]
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.free(seq)
        seq.status = SeqStatus.FINISHED


def _positions_ahead(seqs: list[Sequence], verifying: dict[int, PrefillWork]) -> list[int]:
    """Per row: how many output steps past its sample's current one it draws for (0, 1, ... along a speculative
    chunk's rows; 0 for every other row)."""
    seen: dict[int, int] = {}
    out = []
    for seq in seqs:
        k = seen.get(id(seq), 0) if id(seq) in verifying else 0
        seen[id(seq)] = k + 1
        out.append(k)
    return out
