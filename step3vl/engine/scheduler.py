"""Which tokens run this step: every decoding sequence, then prefill chunks, under a token budget.

Blocks are taken from the native BlockManager. When the pool runs out, the newest sequence is preempted
(its blocks freed; it recomputes its prompt + output later, mostly from the prefix cache) — never a crash.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from step3vl.engine.config import SchedulerConfig
from step3vl.engine.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class PrefillWork:
    seq: Sequence
    start: int
    length: int
    # Speculative verification: the chunk is the sample's last token and these draft tokens (not yet in
    # seq.token_ids); every position's logits are sampled.
    draft: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ScheduledStep:
    decodes: list[Sequence] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    prefills: list[PrefillWork] = field(default_factory=list)
    copy_src: list[int] = field(default_factory=list)
    copy_dst: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    stuck: list[Sequence] = field(default_factory=list)  # cannot grow even alone in the pool
    unfittable: list[Sequence] = field(default_factory=list)  # cannot be admitted into an idle pool

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(p.length for p in self.prefills)


def _order(seq: Sequence) -> tuple[int, int, int]:
    """Admission and decode order; the last in it is preempted first. Priority is 0 for every request under
    'fcfs', so there it is arrival order."""
    return (seq.request.priority, seq.request.arrival, seq.index)


class Scheduler:
    def __init__(self, block_manager, block_size: int, config: SchedulerConfig):
        self.bm = block_manager
        self.block_size = block_size
        self.config = config
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.waiting: list[Sequence] = []  # sorted by (arrival, index): first come, first served
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample: shares its parent's blocks already."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.block_table = []

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._schedule_decodes(step)
        budget = self.max_num_batched_tokens - step.num_tokens
        # Prompt (or recompute) tokens that already have slots; a decode's token got its slot above.
        decoding = {id(s) for s in step.decodes} | {id(w.seq) for w in step.prefills}
        prefilling = (s for s in self.running if s.num_computed < s.num_registered and id(s) not in decoding)
        for seq in sorted(prefilling, key=_order):
            if budget <= 0:
                break
            n = min(seq.num_uncomputed, budget)
            step.prefills.append(PrefillWork(seq, seq.num_computed, n))
            budget -= n
        self._admit(step, budget)
        return step

    def _schedule_decodes(self, step: ScheduledStep) -> None:
        # Oldest first, within both limits; forks can push the running set past them, the rest wait a step.
        limit = min(self.max_num_seqs, self.max_num_batched_tokens)
        queue = sorted((s for s in self.running if s.is_decode), key=_order)[:limit]
        draft_budget = self.max_num_batched_tokens - len(queue)
        copies: list[tuple[Sequence, int, int]] = []
        i = 0
        while i < len(queue):
            seq = queue[i]
            try:
                slot, src, dst = self.bm.append_slot(seq.seq_id, seq.token_ids[-1])
            except RuntimeError:
                victim = max(self.running, key=_order)
                if victim is seq and len(self.running) == 1:
                    step.stuck.append(seq)  # the pool cannot hold this one sequence: the engine ends it
                    queue.pop(i)
                    continue
                self._preempt(victim, step)
                if victim in queue:
                    j = queue.index(victim)
                    queue.pop(j)
                    if j < i:
                        k = step.decodes.index(victim)
                        step.decodes.pop(k)
                        step.decode_slots.pop(k)
                        i -= 1
                continue
            self._record_append(seq, slot)
            if src >= 0:
                copies.append((seq, src, dst))
            if seq.draft:
                seq.draft = self._append_draft(seq, copies, draft_budget)
                draft_budget -= len(seq.draft)
            step.decodes.append(seq)
            step.decode_slots.append(slot)
            i += 1
        # Samples with draft tokens run as a chunk (their last token + the drafts), verified after the forward.
        for k in reversed(range(len(step.decodes))):
            seq = step.decodes[k]
            if seq.draft:
                step.decodes.pop(k)
                step.decode_slots.pop(k)
                step.prefills.insert(0, PrefillWork(seq, seq.num_computed, 1 + len(seq.draft), seq.draft))
        # A sequence preempted later in the loop gave its copy target back to the pool, where another
        # sequence may already own it: its copy must not run.
        for seq, src, dst in copies:
            if seq not in step.preempted:
                step.copy_src.append(src)
                step.copy_dst.append(dst)

    def _append_draft(self, seq: Sequence, copies: list, budget: int) -> list[int]:
        """Slots for as many of the sample's draft tokens as the pool and the step's token budget allow (drafts
        never preempt anyone)."""
        taken = []
        for token in seq.draft[:max(budget, 0)]:
            try:
                slot, src, dst = self.bm.append_slot(seq.seq_id, token)
            except RuntimeError:
                break
            self._record_append(seq, slot)
            if src >= 0:
                copies.append((seq, src, dst))
            taken.append(token)
        return taken

    def _record_append(self, seq: Sequence, slot: int) -> None:
        pos = seq.num_registered
        block = slot // self.block_size
        if pos % self.block_size == 0:
            seq.block_table.append(block)
        else:
            seq.block_table[-1] = block  # the same block, or its copy-on-write replacement
        seq.num_registered += 1

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed = seq.num_registered = 0
        seq.block_table = []
        seq.draft = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        step.preempted.append(seq)
        self.add(seq)

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        watermark = max(1, self.bm.num_blocks // 100)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            need = -(-seq.num_tokens // self.block_size)
            if self.running and self.bm.num_free() - need < watermark:
                break  # keep room for the running sequences to grow
            try:
                cached = self.bm.allocate(seq.seq_id, seq.cache_token_ids, seq.request.salt)
            except RuntimeError:
                if not self.running and not step.decodes and not step.prefills:
                    # Nothing will ever free a block for it (pinned prefixes hold the rest): end it, no deadlock.
                    self.waiting.pop(0)
                    step.unfittable.append(seq)
                    continue
                break
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            seq.num_computed, seq.num_registered = cached, seq.num_tokens
            seq.block_table = list(self.bm.block_table(seq.seq_id))
            if seq.index == 0 and not seq.output_ids:
                seq.request.num_cached_tokens = cached
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            step.prefills.append(PrefillWork(seq, seq.num_computed, n))
            budget -= n
