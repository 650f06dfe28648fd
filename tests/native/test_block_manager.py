"""The native KV block manager: hand-computed cases per method, and a stateful property test that
drives random operation sequences against a pure-Python model of the KV memory itself (what every
slot holds), so any wrong sharing, missed copy-on-write or bad prefix hit shows up as wrong KV."""

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from step3vl_native import BlockManager, PoolExhausted


def snapshot(bm: BlockManager) -> tuple:
    tables = {s: (bm.block_table(s), bm.num_tokens(s)) for s in bm.seq_ids()}
    refs = [bm.ref_count(b) for b in range(bm.num_blocks)]
    return bm.num_free(), bm.num_cached(), bm.num_used(), bm.prefix_hit_tokens, tables, refs


def computed_seq(bm: BlockManager, seq_id: int, tokens: list[int], salt: int = 0) -> int:
    """Allocate and pretend the prefill wrote the whole prompt's KV."""
    hit = bm.allocate(seq_id, tokens, salt)
    bm.mark_computed(seq_id, len(tokens))
    return hit


# --------------------------------------------------------------------------------------------------
# Construction, accounting, errors


def test_fresh_allocation_accounting():
    bm = BlockManager(8, 4)
    assert (bm.num_blocks, bm.block_size) == (8, 4)
    assert bm.allocate(1, list(range(10))) == 0
    assert bm.block_table(1) == [0, 1, 2]  # ceil(10 / 4) blocks, handed out in order
    assert bm.num_tokens(1) == 10 and bm.has_seq(1) and not bm.has_seq(2)
    assert (bm.num_used(), bm.num_free(), bm.num_cached()) == (3, 5, 0)
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    assert bm.can_allocate(20) and not bm.can_allocate(21)
    bm.free(1)
    assert (bm.num_used(), bm.num_free(), bm.num_cached()) == (0, 8, 0)  # nothing computed: nothing cached
    bm.check_invariants()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    bm = BlockManager(4, 2)
    bm.allocate(1, [1, 2, 3])
    with pytest.raises(ValueError, match="already exists"):
        bm.allocate(1, [1])
    with pytest.raises(ValueError, match="empty prompt"):
        bm.allocate(2, [])
    with pytest.raises(ValueError, match="already exists"):
        bm.fork(1, 1)
    with pytest.raises(ValueError, match="outside"):
        bm.mark_computed(1, 4)
    with pytest.raises(ValueError, match="twice"):
        bm.can_append([1, 1])
    with pytest.raises(ValueError, match="tokens"):
        bm.append_slots([1], [])
    with pytest.raises(ValueError, match="no pin"):
        bm.unpin_prefix([1, 2])
    with pytest.raises(ValueError):
        bm.evict(-1)
    with pytest.raises(IndexError):
        bm.ref_count(4)
    for call in (
        lambda: bm.free(7),
        lambda: bm.block_table(7),
        lambda: bm.num_tokens(7),
        lambda: bm.append_slot(7, 0),
        lambda: bm.append_slots([1, 7], [0, 0]),
        lambda: bm.fork(7, 8),
        lambda: bm.mark_computed(7, 1),
    ):
        with pytest.raises(KeyError, match="7"):
            call()
    assert bm.num_tokens(1) == 3 and not bm.has_seq(8)  # the failed batch did not append to seq 1
    bm.check_invariants()


# --------------------------------------------------------------------------------------------------
# Fork and copy-on-write


def test_fork_shares_every_block():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(6)))
    bm.fork(1, 2)
    assert bm.block_table(2) == bm.block_table(1) == [0, 1]
    assert bm.num_tokens(2) == 6
    assert [bm.ref_count(b) for b in (0, 1)] == [2, 2]
    assert bm.num_used() == 2
    bm.free(1)
    assert [bm.ref_count(b) for b in (0, 1)] == [1, 1]
    bm.check_invariants()


def test_truncate_drops_rejected_tokens_and_their_blocks():
    """Hand-computed: 6 computed tokens in blocks of 4, three drafts appended (a new block for the 9th token),
    one accepted: the 8-token sequence keeps two blocks and the third goes back to the pool."""
    bm = BlockManager(8, 4)
    computed_seq(bm, 1, list(range(6)))
    for t in (6, 7, 8):
        bm.append_slot(1, t)
    assert len(bm.block_table(1)) == 3 and bm.num_used() == 3
    bm.mark_computed(1, 7)
    bm.truncate(1, 7)
    assert bm.num_tokens(1) == 7 and len(bm.block_table(1)) == 2 and bm.num_used() == 2
    slot, _, _ = bm.append_slot(1, 99)  # the next token lands right after the accepted ones
    assert slot == bm.block_table(1)[1] * 4 + 3
    bm.mark_computed(1, 8)
    with pytest.raises(ValueError, match="registered blocks stay"):
        bm.truncate(1, 7)  # its second block is registered now
    with pytest.raises(ValueError, match="outside"):
        bm.truncate(1, 9)
    bm.check_invariants()


def test_copy_on_write_only_on_first_write_into_shared_partial_block():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(6)))  # blocks [0, 1], block 1 holds 2 tokens
    bm.fork(1, 2)
    # The child writes first: it gets block 2 at offset 2 and must copy the 2 filled slots of block 1.
    assert bm.append_slot(2, 100) == (2 * 4 + 2, 1, 2)
    assert bm.block_table(2) == [0, 2] and bm.block_table(1) == [0, 1]
    assert (bm.ref_count(0), bm.ref_count(1), bm.ref_count(2)) == (2, 1, 1)
    # The parent now owns block 1 alone: in place, no copy; neither does the child's next write copy.
    assert bm.append_slot(1, 200) == (1 * 4 + 2, -1, -1)
    assert bm.append_slot(2, 101) == (2 * 4 + 3, -1, -1)
    # Block 2 is full: the next token opens a fresh block, never a copy of the shared full block 0.
    assert bm.append_slot(2, 102) == (3 * 4 + 0, -1, -1)
    assert bm.block_table(2) == [0, 2, 3] and bm.ref_count(0) == 2
    assert bm.num_tokens(1) == 7 and bm.num_tokens(2) == 9
    bm.check_invariants()


def test_fork_at_block_boundary_never_copies():
    bm = BlockManager(8, 4)
    bm.allocate(1, list(range(8)))
    bm.fork(1, 2)
    assert bm.append_slot(2, 0) == (2 * 4, -1, -1)
    assert bm.append_slot(1, 0) == (3 * 4, -1, -1)
    assert bm.block_table(1) == [0, 1, 3] and bm.block_table(2) == [0, 1, 2]
    bm.check_invariants()


def test_batched_append_copies_for_all_but_the_last_writer():
    bm = BlockManager(8, 4)
    bm.allocate(1, [7, 7, 7, 7, 7, 7])  # blocks [0, 1]; block 1 half full
    for child in (2, 3, 4):
        bm.fork(1, child)
    assert bm.ref_count(1) == 4
    # Four writers share block 1: three must copy, the fourth then owns it. 6 free blocks.
    bm.allocate(9, list(range(13)))  # takes 4 blocks: 2 left
    assert bm.num_free() == 2 and not bm.can_append([1, 2, 3, 4])
    bm.free(9)
    assert bm.num_free() == 6 and bm.can_append([1, 2, 3, 4])
    before = snapshot(bm)
    slots, srcs, dsts = bm.append_slots([2, 3, 4, 1], [10, 11, 12, 13])
    # Seq 9 had blocks [2, 3, 4, 5]; freed tail first, the free list hands out 2, 3, 4 again.
    assert slots == [2 * 4 + 2, 3 * 4 + 2, 4 * 4 + 2, 1 * 4 + 2]
    assert srcs == [1, 1, 1] and dsts == [2, 3, 4]
    assert [bm.block_table(s) for s in (1, 2, 3, 4)] == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert bm.ref_count(1) == 1 and bm.ref_count(0) == 4
    assert bm.num_free() == before[0] - 3
    bm.check_invariants()


def test_exhausted_append_changes_nothing():
    bm = BlockManager(3, 2)
    bm.allocate(1, [1, 2, 3])  # 2 blocks, 1 free
    bm.fork(1, 2)
    bm.allocate(3, [5])  # last free block
    before = snapshot(bm)
    assert not bm.can_append([2])
    with pytest.raises(PoolExhausted, match=r"KV pool exhausted: need 1 blocks, 0 free"):
        bm.append_slot(2, 9)  # would copy-on-write block 1
    with pytest.raises(RuntimeError, match="need 1 blocks, 0 free"):
        bm.append_slots([3, 1, 2], [0, 0, 0])  # seq 3 fits in place; 1 and 2 share block 1: one copy
    assert snapshot(bm) == before
    bm.check_invariants()


# --------------------------------------------------------------------------------------------------
# Prefix cache


def test_prefix_hit_needs_the_whole_chain_and_computed_kv():
    bm = BlockManager(16, 4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert bm.allocate(1, a) == 0
    assert bm.allocate(2, a[:8] + [0]) == 0  # A's KV is not written yet: nothing to reuse
    bm.mark_computed(1, 5)  # only block 0 is complete within 5 tokens
    assert bm.allocate(3, a[:8] + [0]) == 4
    bm.mark_computed(1, 10)
    assert bm.allocate(4, a[:8] + [0, 0]) == 8
    assert bm.block_table(4)[:2] == bm.block_table(1)[:2] == [0, 1]
    assert bm.ref_count(0) == 3 and bm.ref_count(1) == 2  # seqs 1, 3, 4 hold block 0; 1 and 4 block 1
    # Same second block after a different first one: the chained hash differs, no reuse.
    assert bm.allocate(5, [9, 9, 9, 9] + a[4:8] + [0]) == 0
    assert 1 not in bm.block_table(5)
    assert bm.prefix_hit_tokens == 12
    bm.check_invariants()


def test_prefix_hit_leaves_at_least_one_token_to_compute():
    bm = BlockManager(16, 4)
    computed_seq(bm, 1, list(range(8)))
    assert bm.allocate(2, list(range(8))) == 4  # fully cached prompt: its last block is recomputed
    assert bm.allocate(3, list(range(9))) == 8
    assert bm.allocate(4, list(range(4))) == 0
    bm.check_invariants()


def test_salt_separates_identical_tokens():
    bm = BlockManager(32, 2)
    tokens = [5, 6, 7, 8, 9]
    computed_seq(bm, 1, tokens, salt=11)
    assert bm.allocate(2, tokens) == 0
    assert bm.allocate(3, tokens, salt=12) == 0
    assert bm.allocate(4, tokens, salt=11) == 4
    # Any Python int is a valid salt (folded to 64 bits), negative or wide.
    computed_seq(bm, 5, tokens, salt=-3)
    assert bm.allocate(6, tokens, salt=-3) == 4
    computed_seq(bm, 7, tokens, salt=2**100 + 7)
    assert bm.allocate(8, tokens, salt=2**100 + 7) == 4
    bm.check_invariants()


def test_freed_computed_blocks_stay_cached_and_revive():
    bm = BlockManager(6, 2)
    computed_seq(bm, 1, [1, 2, 3, 4, 5])  # blocks [0, 1, 2]; 0 and 1 full and cached
    bm.free(1)
    assert (bm.num_cached(), bm.num_free(), bm.num_used()) == (2, 6, 0)
    assert bm.allocate(2, [1, 2, 3, 4, 0]) == 4
    assert bm.block_table(2)[:2] == [0, 1]
    assert (bm.num_cached(), bm.num_free(), bm.num_used()) == (0, 3, 3)
    bm.check_invariants()


def test_identical_block_registered_twice_stays_private():
    bm = BlockManager(8, 2)
    bm.allocate(1, [1, 2, 3])
    bm.allocate(2, [1, 2, 3])  # both before either is computed: two copies of block [1, 2]
    assert bm.block_table(1)[0] != bm.block_table(2)[0]
    bm.mark_computed(1, 3)
    bm.mark_computed(2, 3)
    bm.free(2)
    assert bm.num_cached() == 0  # seq 2's duplicate went to the free list
    bm.free(1)
    assert bm.num_cached() == 1
    assert bm.allocate(3, [1, 2, 0]) == 2 and bm.block_table(3)[0] == 0
    bm.check_invariants()


def test_allocation_exhaustion_changes_nothing():
    bm = BlockManager(4, 2)
    computed_seq(bm, 1, [1, 2, 3, 4])
    bm.free(1)  # blocks 0 and 1 cached, all 4 free
    bm.allocate(2, [9, 9, 9])  # 2 fresh blocks from the free list
    before = snapshot(bm)
    assert bm.num_free() == 2 and bm.num_cached() == 2
    # Reusing the 2 cached blocks takes them off the free count: 1 fresh needed, 0 free.
    with pytest.raises(PoolExhausted, match=r"need 1 blocks, 0 free"):
        bm.allocate(3, [1, 2, 3, 4, 5])
    with pytest.raises(RuntimeError, match=r"need 3 blocks, 2 free"):
        bm.allocate(3, [7] * 5)
    assert snapshot(bm) == before and not bm.has_seq(3)
    assert bm.allocate(3, [1, 2, 3]) == 2  # 1 hit + 1 fresh fits
    bm.check_invariants()


# --------------------------------------------------------------------------------------------------
# LRU eviction and pins


def test_lru_eviction_order():
    bm = BlockManager(4, 2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    computed_seq(bm, 1, a)  # blocks [0, 1]
    computed_seq(bm, 2, b)  # blocks [2, 3]
    bm.free(1)  # LRU, oldest first: 1, 0 (a chain's tail goes first)
    bm.free(2)  # LRU: 1, 0, 3, 2
    assert (bm.num_cached(), bm.num_free()) == (4, 4)
    # Reusing a's blocks takes them off the list; the fresh third block evicts the oldest left: 3.
    assert bm.allocate(3, a + [0]) == 4
    assert bm.block_table(3) == [0, 1, 3]
    bm.free(3)  # block 3 is not cached any more: free list; LRU: 2, 1, 0
    assert bm.evict(1) == 1  # evicts block 2 (b's first block)
    assert (bm.num_cached(), bm.num_free()) == (2, 4)
    assert bm.allocate(4, b + [0]) == 0  # b is gone entirely
    # Seq 4 took the free blocks 2 and 3, then evicted the LRU head, block 1 (a's tail).
    assert bm.block_table(4) == [2, 3, 1]
    assert bm.pin_prefix(a) == 2  # only a's first block is still cached
    bm.unpin_prefix(a)
    assert bm.evict(10) == 1 and bm.num_cached() == 0
    bm.check_invariants()


def test_pinned_blocks_survive_eviction_and_pressure():
    bm = BlockManager(6, 2)
    prefix = [1, 2, 3, 4]
    computed_seq(bm, 1, prefix + [5])
    assert bm.pin_prefix(prefix + [5, 6]) == 4  # only what is cached gets pinned
    assert [bm.ref_count(b) for b in (0, 1)] == [2, 2]
    bm.free(1)
    # Pinned blocks are neither free nor evictable.
    assert (bm.num_used(), bm.num_free(), bm.num_cached()) == (2, 4, 0)
    assert bm.evict(10) == 0
    bm.allocate(2, [9] * 8)  # fills every unpinned block
    assert bm.num_free() == 0
    bm.free(2)
    assert bm.allocate(3, prefix + [0]) == 4  # the pinned prefix is still there
    bm.free(3)
    bm.unpin_prefix(prefix + [5, 6])
    assert (bm.num_used(), bm.num_free(), bm.num_cached()) == (0, 6, 2)
    assert bm.evict(10) == 2
    with pytest.raises(ValueError, match="no pin"):
        bm.unpin_prefix(prefix + [5, 6])
    bm.check_invariants()


def test_pins_nest_and_unpin_undoes_exactly_its_own_blocks():
    bm = BlockManager(8, 2)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    bm.allocate(1, tokens)
    bm.mark_computed(1, 2)
    assert bm.pin_prefix(tokens) == 2  # block 0 only
    bm.mark_computed(1, 7)
    assert bm.pin_prefix(tokens) == 6  # blocks 0, 1, 2
    assert [bm.ref_count(b) for b in range(4)] == [3, 2, 2, 1]
    bm.unpin_prefix(tokens)  # the latest pin: blocks 0, 1, 2
    assert [bm.ref_count(b) for b in range(4)] == [2, 1, 1, 1]
    bm.unpin_prefix(tokens)
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 1, 1]
    assert bm.pin_prefix([8, 8]) == 0  # nothing cached: a pin of nothing, still undoable
    bm.unpin_prefix([8, 8])
    bm.check_invariants()


# --------------------------------------------------------------------------------------------------
# Stateful property test against a model of the KV memory


@dataclass
class ModelSeq:
    salt: int
    tokens: list[int]
    computed: int  # leading tokens whose KV the "engine" wrote


@dataclass
class ModelPin:
    salt: int
    tokens: tuple[int, ...]
    pinned: int  # tokens pin_prefix reported


TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=10)
SALTS = st.sampled_from([0, 1])


class BlockManagerMachine(RuleBasedStateMachine):
    """The model is the KV memory: kv[slot] is the identity of the token whose KV is stored there,
    (salt, prompt+output up to and including it). Every live sequence's computed positions must read
    back their own identity through its block table, whatever was shared, copied, cached or evicted."""

    def __init__(self):
        super().__init__()
        self.seqs: dict[int, ModelSeq] = {}
        self.pins: list[ModelPin] = []
        self.kv: dict[int, tuple] = {}
        self.computed_prefixes: set[tuple] = set()  # (salt, full-block prefix) whose KV was ever written
        self.next_id = 0

    @initialize(num_blocks=st.integers(3, 12), block_size=st.sampled_from([1, 2, 3]))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size)
        self.bs = block_size

    # ---- helpers

    def slot(self, seq_id: int, pos: int) -> int:
        return self.bm.block_table(seq_id)[pos // self.bs] * self.bs + pos % self.bs

    @staticmethod
    def identity(s: ModelSeq, pos: int) -> tuple:
        return (s.salt, tuple(s.tokens[: pos + 1]))

    def write(self, seq_id: int, upto: int) -> None:
        """The engine computes positions [computed, upto) and marks them."""
        s = self.seqs[seq_id]
        table = self.bm.block_table(seq_id)
        for pos in range(s.computed, upto):
            assert self.bm.ref_count(table[pos // self.bs]) == 1, "KV written into a shared block"
            self.kv[self.slot(seq_id, pos)] = self.identity(s, pos)
        s.computed = upto
        self.bm.mark_computed(seq_id, upto)
        for k in range(1, upto // self.bs + 1):
            self.computed_prefixes.add((s.salt, tuple(s.tokens[: k * self.bs])))

    def cached_upper_bound(self, salt: int, tokens: list[int], max_blocks: int) -> int:
        k = 0
        while k < max_blocks and (salt, tuple(tokens[: (k + 1) * self.bs])) in self.computed_prefixes:
            k += 1
        return k * self.bs

    def pinned_lower_bound(self, salt: int, tokens: list[int], max_blocks: int) -> int:
        best = 0
        for p in self.pins:
            if p.salt != salt:
                continue
            k = 0
            while k < min(max_blocks, p.pinned // self.bs) and p.tokens[: (k + 1) * self.bs] == tuple(
                tokens[: (k + 1) * self.bs]
            ):
                k += 1
            best = max(best, k * self.bs)
        return best

    def computed_ids(self) -> list[int]:
        return [i for i, s in self.seqs.items() if s.computed == len(s.tokens)]

    # ---- rules

    @rule(tokens=TOKENS, salt=SALTS, chunk=st.integers(0, 10))
    def allocate(self, tokens, salt, chunk):
        sid, self.next_id = self.next_id, self.next_id + 1
        fits = self.bm.can_allocate(len(tokens))
        before = snapshot(self.bm)
        try:
            hit = self.bm.allocate(sid, tokens, salt)
        except PoolExhausted:
            assert not fits, "can_allocate said it fits"
            assert snapshot(self.bm) == before
            return
        max_blocks = (len(tokens) - 1) // self.bs
        assert hit % self.bs == 0 and 0 <= hit <= max_blocks * self.bs
        assert hit <= self.cached_upper_bound(salt, tokens, max_blocks), "hit on KV never computed"
        assert hit >= self.pinned_lower_bound(salt, tokens, max_blocks), "a pinned prefix was lost"
        assert self.bm.prefix_hit_tokens == before[3] + hit
        self.seqs[sid] = ModelSeq(salt, list(tokens), hit)
        self.check_kv(sid)  # the reused blocks hold exactly this prompt's prefix KV
        self.write(sid, min(len(tokens), hit + chunk))  # chunked prefill: maybe only part now

    @precondition(lambda self: any(s.computed < len(s.tokens) for s in self.seqs.values()))
    @rule(data=st.data())
    def finish_prefill(self, data):
        pending = [i for i, s in self.seqs.items() if s.computed < len(s.tokens)]
        sid = data.draw(st.sampled_from(sorted(pending)))
        self.write(sid, len(self.seqs[sid].tokens))

    @precondition(lambda self: self.computed_ids())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.computed_ids())))
        child, self.next_id = self.next_id, self.next_id + 1
        used = self.bm.num_used()
        self.bm.fork(parent, child)
        assert self.bm.block_table(child) == self.bm.block_table(parent)
        assert self.bm.num_used() == used
        p = self.seqs[parent]
        self.seqs[child] = ModelSeq(p.salt, list(p.tokens), p.computed)

    @precondition(lambda self: self.computed_ids())
    @rule(data=st.data())
    def append_batch(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.computed_ids())), min_size=1, unique=True))
        new_tokens = data.draw(st.lists(st.integers(0, 2), min_size=len(ids), max_size=len(ids)))
        fits = self.bm.can_append(ids)
        before = snapshot(self.bm)
        old_tables = {i: self.bm.block_table(i) for i in ids}
        try:
            if len(ids) == 1:
                slot, src, dst = self.bm.append_slot(ids[0], new_tokens[0])
                slots, copies = [slot], ([(src, dst)] if src >= 0 else [])
                assert (src < 0) == (dst < 0)
            else:
                slots, srcs, dsts = self.bm.append_slots(ids, new_tokens)
                copies = list(zip(srcs, dsts, strict=True))
        except PoolExhausted:
            assert not fits, "can_append said it fits"
            assert snapshot(self.bm) == before
            return
        assert fits
        expected_copies = []
        for i in ids:
            old, new = old_tables[i], self.bm.block_table(i)
            n = len(self.seqs[i].tokens)
            if n % self.bs == 0:
                assert new[:-1] == old and len(new) == len(old) + 1
            else:
                assert new[:-1] == old[:-1]
                if new[-1] != old[-1]:
                    expected_copies.append((old[-1], new[-1]))
        assert copies == expected_copies
        # The engine copies whole blocks first, then the forward pass writes the new tokens.
        for src, dst in copies:
            for off in range(self.bs):
                if src * self.bs + off in self.kv:
                    self.kv[dst * self.bs + off] = self.kv[src * self.bs + off]
        for i, token, slot in zip(ids, new_tokens, slots, strict=True):
            s = self.seqs[i]
            s.tokens.append(token)
            assert slot == self.slot(i, len(s.tokens) - 1)
            self.write(i, len(s.tokens))

    @precondition(lambda self: self.computed_ids())
    @rule(data=st.data())
    def speculate(self, data):
        """Speculative decoding: slots for draft tokens, the verify pass writes all of them, the accepted ones
        are registered and the rest truncated away."""
        sid = data.draw(st.sampled_from(sorted(self.computed_ids())))
        s = self.seqs[sid]
        n0 = len(s.tokens)
        for token in data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=4)):
            try:
                slot, src, dst = self.bm.append_slot(sid, token)
            except PoolExhausted:
                break
            for off in range(self.bs) if src >= 0 else ():
                if src * self.bs + off in self.kv:
                    self.kv[dst * self.bs + off] = self.kv[src * self.bs + off]
            s.tokens.append(token)
            assert slot == self.slot(sid, len(s.tokens) - 1)
            self.kv[slot] = self.identity(s, len(s.tokens) - 1)
        keep = n0 + data.draw(st.integers(0, len(s.tokens) - n0))
        del s.tokens[keep:]
        s.computed = keep
        self.bm.mark_computed(sid, keep)
        for k in range(1, keep // self.bs + 1):
            self.computed_prefixes.add((s.salt, tuple(s.tokens[: k * self.bs])))
        self.bm.truncate(sid, keep)
        assert self.bm.num_tokens(sid) == keep and len(self.bm.block_table(sid)) == -(-keep // self.bs)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        del self.seqs[sid]
        assert not self.bm.has_seq(sid)

    @rule(n=st.integers(0, 4))
    def evict(self, n):
        cached = self.bm.num_cached()
        free = self.bm.num_free()
        got = self.bm.evict(n)
        assert got == min(n, cached)
        assert self.bm.num_cached() == cached - got and self.bm.num_free() == free

    @rule(data=st.data(), salt=SALTS)
    def pin(self, data, salt):
        if self.seqs and data.draw(st.booleans()):
            s = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
            tokens, salt = s.tokens[: data.draw(st.integers(1, len(s.tokens)))], s.salt
        else:
            tokens = data.draw(TOKENS)
        pinned = self.bm.pin_prefix(tokens, salt)
        max_blocks = len(tokens) // self.bs
        assert pinned % self.bs == 0
        assert pinned <= self.cached_upper_bound(salt, tokens, max_blocks)
        assert pinned >= self.pinned_lower_bound(salt, tokens, max_blocks)
        self.pins.append(ModelPin(salt, tuple(tokens), pinned))

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        p = data.draw(st.sampled_from(self.pins))
        self.bm.unpin_prefix(list(p.tokens), p.salt)
        # unpin undoes the latest pin of the same tokens and salt
        latest = max(i for i, q in enumerate(self.pins) if (q.salt, q.tokens) == (p.salt, p.tokens))
        del self.pins[latest]

    # ---- invariants

    def check_kv(self, sid: int) -> None:
        s = self.seqs[sid]
        for pos in range(s.computed):
            assert self.kv.get(self.slot(sid, pos)) == self.identity(s, pos), f"seq {sid} reads wrong KV at {pos}"

    @invariant()
    def native_invariants(self):
        if hasattr(self, "bm"):
            self.bm.check_invariants()

    @invariant()
    def every_sequence_reads_its_own_kv(self):
        for sid in self.seqs:
            self.check_kv(sid)

    @invariant()
    def ref_counts_and_counters_match_the_model(self):
        if not hasattr(self, "bm"):
            return
        bm = self.bm
        owners: dict[int, list[tuple[int, int]]] = {}
        for sid, s in self.seqs.items():
            table = bm.block_table(sid)
            assert bm.num_tokens(sid) == len(s.tokens)
            assert len(table) == -(-len(s.tokens) // self.bs)
            for idx, b in enumerate(table):
                owners.setdefault(b, []).append((sid, idx))
        refs = [bm.ref_count(b) for b in range(bm.num_blocks)]
        extra = [refs[b] - len(owners.get(b, [])) for b in range(bm.num_blocks)]
        assert min(extra) >= 0
        assert sum(extra) == sum(p.pinned // self.bs for p in self.pins)  # the rest are pins
        assert bm.num_used() == sum(r > 0 for r in refs)
        assert bm.num_free() == bm.num_blocks - bm.num_used() >= bm.num_cached()
        assert sorted(bm.seq_ids()) == sorted(self.seqs)
        # A block is shared only by owners with the same salt and tokens up to its end, at the same index.
        for b, holders in owners.items():
            sid0, idx0 = holders[0]
            s0 = self.seqs[sid0]
            for sid, idx in holders[1:]:
                s = self.seqs[sid]
                end = (idx + 1) * self.bs
                assert idx == idx0 and s.salt == s0.salt, f"block {b} shared by unrelated sequences"
                assert s.tokens[:end] == s0.tokens[:end], f"block {b} shared by sequences that differ"

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for sid in list(self.seqs):
            self.bm.free(sid)
        for p in reversed(self.pins):
            self.bm.unpin_prefix(list(p.tokens), p.salt)
        self.bm.check_invariants()
        assert self.bm.num_free() == self.bm.num_blocks and self.bm.num_used() == 0
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))
        self.bm.evict(self.bm.num_blocks)
        assert self.bm.num_cached() == 0 and self.bm.num_free() == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
