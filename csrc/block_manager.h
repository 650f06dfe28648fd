// Paged KV-cache bookkeeping: ref-counted blocks, a prefix cache keyed by the chained hash of full
// blocks, LRU eviction of unreferenced cached blocks, fork with copy-on-write, pinned prefixes.
// The KV tensors live in torch; this class only hands out block ids. No torch, CUDA or pybind
// headers here, so it can be unit-tested and reused from plain C++.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace step3vl {

using Token = int64_t;
using SeqId = int64_t;

// Not enough free blocks for the request; the manager is left unchanged.
struct PoolExhausted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A sequence id the manager does not know (bound to Python's KeyError).
struct UnknownSequence : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Result of a batched decode step: one slot per sequence, and the block copies (copy-on-write)
// the engine must perform before writing, as parallel lists holding only the real copies.
struct AppendResult {
  std::vector<int64_t> slots;
  std::vector<int64_t> copy_srcs;
  std::vector<int64_t> copy_dsts;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free() const { return static_cast<int64_t>(free_list_.size()) + lru_size_; }
  int64_t num_cached() const { return lru_size_; }
  int64_t num_used() const { return num_blocks_ - num_free(); }
  int64_t ref_count(int64_t block) const;
  int64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }

  bool can_allocate(int64_t num_tokens) const;
  int64_t allocate(SeqId seq_id, const std::vector<Token> &tokens, uint64_t salt = 0);
  void mark_computed(SeqId seq_id, int64_t num_tokens);
  void fork(SeqId parent, SeqId child);
  std::tuple<int64_t, int64_t, int64_t> append_slot(SeqId seq_id, Token token);
  AppendResult append_slots(const std::vector<SeqId> &seq_ids, const std::vector<Token> &tokens);
  bool can_append(const std::vector<SeqId> &seq_ids) const;
  void free(SeqId seq_id);
  // Drop the tokens past num_tokens (speculative tokens the model rejected) and the blocks they alone
  // occupied. Only tokens beyond the sequence's registered (hashed) blocks can go.
  void truncate(SeqId seq_id, int64_t num_tokens);

  std::vector<int64_t> block_table(SeqId seq_id) const;
  int64_t num_tokens(SeqId seq_id) const;
  bool has_seq(SeqId seq_id) const { return seqs_.count(seq_id) != 0; }
  std::vector<SeqId> seq_ids() const;

  int64_t pin_prefix(const std::vector<Token> &tokens, uint64_t salt = 0);
  void unpin_prefix(const std::vector<Token> &tokens, uint64_t salt = 0);
  int64_t evict(int64_t num_blocks);

  void check_invariants() const;

 private:
  enum class State : uint8_t { Free, Evictable, Used };

  struct Block {
    int32_t ref = 0;        // sequence references + pins
    int32_t pins = 0;       // pin references (subset of ref)
    State state = State::Free;
    bool registered = false;  // holds a prefix-cache entry
    uint64_t hash = 0;        // chained hash, valid when registered
    uint64_t parent_hash = 0; // hash of the previous block (or the salt), valid when registered
    int32_t lru_prev = -1, lru_next = -1;
  };

  struct Sequence {
    uint64_t salt = 0;
    std::vector<Token> tokens;
    std::vector<int32_t> table;
    std::vector<uint64_t> hashes;  // chained hashes of the leading full blocks computed so far
  };

  struct PinRecord {
    uint64_t salt;
    std::vector<Token> tokens;
    std::vector<int32_t> blocks;
  };

  uint64_t block_hash(uint64_t parent, const Token *tokens) const;
  // Longest chain of registered blocks matching tokens' first max_blocks full blocks.
  std::vector<int32_t> match_prefix(const std::vector<Token> &tokens, uint64_t salt,
                                    int64_t max_blocks, std::vector<uint64_t> *hashes) const;
  bool block_matches(int32_t b, uint64_t parent, const Token *tokens) const;
  int32_t take_block();  // pops a free block, else evicts the LRU cached one; ref becomes 1
  void incref(int32_t b);
  void decref(int32_t b);
  void unregister(int32_t b);
  void lru_push_back(int32_t b);
  void lru_remove(int32_t b);
  Sequence &seq(SeqId id);
  const Sequence &seq(SeqId id) const;
  int64_t blocks_needed_for_append(const std::vector<SeqId> &seq_ids) const;
  std::tuple<int64_t, int64_t, int64_t> append_one(Sequence &s, Token token);
  static uint64_t pin_key(const std::vector<Token> &tokens, uint64_t salt);

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<Block> blocks_;
  std::vector<Token> block_tokens_;  // num_blocks * block_size: contents of registered blocks
  std::vector<int32_t> free_list_;   // stack; the next block handed out is at the back
  int32_t lru_head_ = -1, lru_tail_ = -1;  // head = least recently used
  int64_t lru_size_ = 0;
  std::unordered_map<uint64_t, int32_t> cache_;  // chained hash -> registered block
  std::unordered_map<SeqId, Sequence> seqs_;
  std::unordered_map<uint64_t, std::vector<PinRecord>> pins_;
  int64_t prefix_hit_tokens_ = 0;
};

}  // namespace step3vl
