#include "block_manager.h"

#include <algorithm>
#include <sstream>
#include <unordered_set>

namespace step3vl {

namespace {

// splitmix64 finaliser: a cheap bijective mixer with full avalanche.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

inline uint64_t mix_token(uint64_t h, Token t) {
  return mix64(h ^ (static_cast<uint64_t>(t) * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL));
}

template <typename... Args>
std::string cat(const Args &...args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX)
    throw std::invalid_argument(cat("BlockManager: num_blocks must be in [1, 2^31), got ", num_blocks));
  if (block_size <= 0 || block_size > (1 << 20))
    throw std::invalid_argument(cat("BlockManager: block_size must be in [1, 2^20], got ", block_size));
  blocks_.resize(num_blocks);
  block_tokens_.assign(num_blocks * block_size, 0);
  free_list_.reserve(num_blocks);
  // Reversed so that a fresh manager hands out blocks 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
}

// ---------------------------------------------------------------------------------------------
// Hashing and prefix matching

uint64_t BlockManager::block_hash(uint64_t parent, const Token *tokens) const {
  uint64_t h = mix64(parent ^ 0x5851f42d4c957f2dULL);
  for (int64_t i = 0; i < block_size_; ++i) h = mix_token(h, tokens[i]);
  return h;
}

bool BlockManager::block_matches(int32_t b, uint64_t parent, const Token *tokens) const {
  const Block &blk = blocks_[b];
  if (!blk.registered || blk.parent_hash != parent) return false;
  return std::equal(tokens, tokens + block_size_, block_tokens_.begin() + b * block_size_);
}

std::vector<int32_t> BlockManager::match_prefix(const std::vector<Token> &tokens, uint64_t salt,
                                                int64_t max_blocks,
                                                std::vector<uint64_t> *hashes) const {
  std::vector<int32_t> matched;
  uint64_t parent = salt;
  int64_t limit = std::min<int64_t>(max_blocks, static_cast<int64_t>(tokens.size()) / block_size_);
  for (int64_t i = 0; i < limit; ++i) {
    const Token *blk_tokens = tokens.data() + i * block_size_;
    uint64_t h = block_hash(parent, blk_tokens);
    auto it = cache_.find(h);
    if (it == cache_.end() || !block_matches(it->second, parent, blk_tokens)) break;
    matched.push_back(it->second);
    if (hashes) hashes->push_back(h);
    parent = h;
  }
  return matched;
}

uint64_t BlockManager::pin_key(const std::vector<Token> &tokens, uint64_t salt) {
  uint64_t h = mix64(salt ^ (static_cast<uint64_t>(tokens.size()) * 0xd6e8feb86659fd93ULL));
  for (Token t : tokens) h = mix_token(h, t);
  return h;
}

// ---------------------------------------------------------------------------------------------
// Block lists

void BlockManager::lru_push_back(int32_t b) {
  Block &blk = blocks_[b];
  blk.lru_prev = lru_tail_;
  blk.lru_next = -1;
  if (lru_tail_ >= 0) blocks_[lru_tail_].lru_next = b;
  else lru_head_ = b;
  lru_tail_ = b;
  ++lru_size_;
}

void BlockManager::lru_remove(int32_t b) {
  Block &blk = blocks_[b];
  if (blk.lru_prev >= 0) blocks_[blk.lru_prev].lru_next = blk.lru_next;
  else lru_head_ = blk.lru_next;
  if (blk.lru_next >= 0) blocks_[blk.lru_next].lru_prev = blk.lru_prev;
  else lru_tail_ = blk.lru_prev;
  blk.lru_prev = blk.lru_next = -1;
  --lru_size_;
}

void BlockManager::unregister(int32_t b) {
  Block &blk = blocks_[b];
  auto it = cache_.find(blk.hash);
  if (it != cache_.end() && it->second == b) cache_.erase(it);
  blk.registered = false;
}

int32_t BlockManager::take_block() {
  int32_t b;
  if (!free_list_.empty()) {
    b = free_list_.back();
    free_list_.pop_back();
  } else if (lru_head_ >= 0) {
    b = lru_head_;
    lru_remove(b);
    unregister(b);
  } else {
    throw std::logic_error("BlockManager: take_block on an exhausted pool (caller must check)");
  }
  blocks_[b].ref = 1;
  blocks_[b].state = State::Used;
  return b;
}

void BlockManager::incref(int32_t b) {
  Block &blk = blocks_[b];
  if (blk.ref == 0) {
    lru_remove(b);  // only cached blocks are reachable with ref 0
    blk.state = State::Used;
  }
  ++blk.ref;
}

void BlockManager::decref(int32_t b) {
  Block &blk = blocks_[b];
  if (--blk.ref > 0) return;
  if (blk.registered) {
    blk.state = State::Evictable;
    lru_push_back(b);
  } else {
    blk.state = State::Free;
    free_list_.push_back(b);
  }
}

// ---------------------------------------------------------------------------------------------
// Sequences

BlockManager::Sequence &BlockManager::seq(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw UnknownSequence(cat("unknown sequence id ", id));
  return it->second;
}

const BlockManager::Sequence &BlockManager::seq(SeqId id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw UnknownSequence(cat("unknown sequence id ", id));
  return it->second;
}

int64_t BlockManager::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks_)
    throw std::out_of_range(cat("block ", block, " out of range [0, ", num_blocks_, ")"));
  return blocks_[block].ref;
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens < 0) throw std::invalid_argument(cat("can_allocate: num_tokens must be >= 0, got ", num_tokens));
  return (num_tokens + block_size_ - 1) / block_size_ <= num_free();
}

int64_t BlockManager::allocate(SeqId seq_id, const std::vector<Token> &tokens, uint64_t salt) {
  if (seqs_.count(seq_id)) throw std::invalid_argument(cat("allocate: sequence id ", seq_id, " already exists"));
  if (tokens.empty()) throw std::invalid_argument(cat("allocate: sequence ", seq_id, " has an empty prompt"));
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t total = (n + block_size_ - 1) / block_size_;
  // At least one token is always computed, so the last prompt token's logits exist.
  std::vector<uint64_t> hashes;
  std::vector<int32_t> hit = match_prefix(tokens, salt, (n - 1) / block_size_, &hashes);
  int64_t revived = 0;  // hit blocks now on the evictable list: they stop counting as free
  for (int32_t b : hit) revived += blocks_[b].ref == 0;
  const int64_t fresh = total - static_cast<int64_t>(hit.size());
  const int64_t available = num_free() - revived;
  if (fresh > available)
    throw PoolExhausted(cat("KV pool exhausted: need ", fresh, " blocks, ", available, " free"));

  Sequence s;
  s.salt = salt;
  s.tokens = tokens;
  s.table.reserve(total);
  for (int32_t b : hit) {
    incref(b);
    s.table.push_back(b);
  }
  for (int64_t i = 0; i < fresh; ++i) s.table.push_back(take_block());
  s.hashes = std::move(hashes);
  seqs_.emplace(seq_id, std::move(s));
  const int64_t hit_tokens = static_cast<int64_t>(hit.size()) * block_size_;
  prefix_hit_tokens_ += hit_tokens;
  return hit_tokens;
}

void BlockManager::mark_computed(SeqId seq_id, int64_t num_tokens) {
  Sequence &s = seq(seq_id);
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  if (num_tokens < 0 || num_tokens > n)
    throw std::invalid_argument(cat("mark_computed: num_tokens ", num_tokens, " outside [0, ", n,
                                    "] for sequence ", seq_id));
  const int64_t full = num_tokens / block_size_;
  for (int64_t i = static_cast<int64_t>(s.hashes.size()); i < full; ++i) {
    const uint64_t parent = i == 0 ? s.salt : s.hashes[i - 1];
    const Token *blk_tokens = s.tokens.data() + i * block_size_;
    const uint64_t h = block_hash(parent, blk_tokens);
    s.hashes.push_back(h);
    const int32_t b = s.table[i];
    Block &blk = blocks_[b];
    // Shared with a fork relative that registered it already, or an identical block is cached
    // (then this copy stays private and is freed, not cached, when released).
    if (blk.registered || cache_.count(h)) continue;
    cache_.emplace(h, b);
    blk.registered = true;
    blk.hash = h;
    blk.parent_hash = parent;
    std::copy(blk_tokens, blk_tokens + block_size_, block_tokens_.begin() + b * block_size_);
  }
}

void BlockManager::fork(SeqId parent, SeqId child) {
  if (seqs_.count(child)) throw std::invalid_argument(cat("fork: sequence id ", child, " already exists"));
  Sequence copy = seq(parent);
  for (int32_t b : copy.table) incref(b);
  seqs_.emplace(child, std::move(copy));
}

std::tuple<int64_t, int64_t, int64_t> BlockManager::append_one(Sequence &s, Token token) {
  const int64_t offset = static_cast<int64_t>(s.tokens.size()) % block_size_;
  if (offset == 0) {
    const int32_t b = take_block();
    s.table.push_back(b);
    s.tokens.push_back(token);
    return {static_cast<int64_t>(b) * block_size_, -1, -1};
  }
  const int32_t last = s.table.back();
  s.tokens.push_back(token);
  if (blocks_[last].ref == 1) return {static_cast<int64_t>(last) * block_size_ + offset, -1, -1};
  // Copy-on-write: the partial block is shared with a fork relative.
  const int32_t b = take_block();
  decref(last);
  s.table.back() = b;
  return {static_cast<int64_t>(b) * block_size_ + offset, last, b};
}

int64_t BlockManager::blocks_needed_for_append(const std::vector<SeqId> &seq_ids) const {
  std::unordered_set<SeqId> seen;
  std::unordered_map<int32_t, int64_t> writers;  // shared partial block -> sequences writing into it
  int64_t need = 0;
  for (SeqId id : seq_ids) {
    if (!seen.insert(id).second) throw std::invalid_argument(cat("sequence id ", id, " appears twice in one step"));
    const Sequence &s = seq(id);
    if (static_cast<int64_t>(s.tokens.size()) % block_size_ == 0) ++need;
    else if (blocks_[s.table.back()].ref > 1) ++writers[s.table.back()];
  }
  // Writers take turns: each copies while others still share the block; the last one left owns it.
  for (auto [b, k] : writers) need += std::min<int64_t>(k, blocks_[b].ref - 1);
  return need;
}

std::tuple<int64_t, int64_t, int64_t> BlockManager::append_slot(SeqId seq_id, Token token) {
  Sequence &s = seq(seq_id);
  // A new block when the last is full, or a copy when the partial last block is shared.
  const bool full = static_cast<int64_t>(s.tokens.size()) % block_size_ == 0;
  const int64_t need = full || blocks_[s.table.back()].ref > 1 ? 1 : 0;
  if (need > num_free())
    throw PoolExhausted(cat("KV pool exhausted: need ", need, " blocks, ", num_free(), " free"));
  return append_one(s, token);
}

bool BlockManager::can_append(const std::vector<SeqId> &seq_ids) const {
  return blocks_needed_for_append(seq_ids) <= num_free();
}

AppendResult BlockManager::append_slots(const std::vector<SeqId> &seq_ids, const std::vector<Token> &tokens) {
  if (seq_ids.size() != tokens.size())
    throw std::invalid_argument(cat("append_slots: ", seq_ids.size(), " sequence ids but ", tokens.size(), " tokens"));
  const int64_t need = blocks_needed_for_append(seq_ids);
  if (need > num_free())
    throw PoolExhausted(cat("KV pool exhausted: need ", need, " blocks, ", num_free(), " free"));
  AppendResult r;
  r.slots.reserve(seq_ids.size());
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    auto [slot, src, dst] = append_one(seq(seq_ids[i]), tokens[i]);
    r.slots.push_back(slot);
    if (src >= 0) {
      r.copy_srcs.push_back(src);
      r.copy_dsts.push_back(dst);
    }
  }
  return r;
}

void BlockManager::free(SeqId seq_id) {
  Sequence &s = seq(seq_id);
  // Tail blocks first, so the LRU list evicts a chain from its end and keeps its useful prefix.
  for (auto it = s.table.rbegin(); it != s.table.rend(); ++it) decref(*it);
  seqs_.erase(seq_id);
}

void BlockManager::truncate(SeqId seq_id, int64_t num_tokens) {
  Sequence &s = seq(seq_id);
  const int64_t n = static_cast<int64_t>(s.tokens.size());
  const int64_t hashed = static_cast<int64_t>(s.hashes.size()) * block_size_;
  if (num_tokens < std::max<int64_t>(hashed, 1) || num_tokens > n)
    throw std::invalid_argument(cat("truncate: num_tokens ", num_tokens, " outside [", std::max<int64_t>(hashed, 1),
                                    ", ", n, "] for sequence ", seq_id, " (its registered blocks stay)"));
  const int64_t keep = (num_tokens + block_size_ - 1) / block_size_;
  while (static_cast<int64_t>(s.table.size()) > keep) {
    decref(s.table.back());
    s.table.pop_back();
  }
  s.tokens.resize(num_tokens);
}

std::vector<int64_t> BlockManager::block_table(SeqId seq_id) const {
  const Sequence &s = seq(seq_id);
  return std::vector<int64_t>(s.table.begin(), s.table.end());
}

int64_t BlockManager::num_tokens(SeqId seq_id) const { return static_cast<int64_t>(seq(seq_id).tokens.size()); }

std::vector<SeqId> BlockManager::seq_ids() const {
  std::vector<SeqId> ids;
  ids.reserve(seqs_.size());
  for (const auto &kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Pins and eviction

int64_t BlockManager::pin_prefix(const std::vector<Token> &tokens, uint64_t salt) {
  std::vector<int32_t> hit = match_prefix(tokens, salt, static_cast<int64_t>(tokens.size()) / block_size_, nullptr);
  for (int32_t b : hit) {
    incref(b);
    ++blocks_[b].pins;
  }
  const int64_t pinned = static_cast<int64_t>(hit.size()) * block_size_;
  // Keep the exact blocks, so unpin undoes this pin even if more of the prefix got cached since.
  pins_[pin_key(tokens, salt)].push_back(PinRecord{salt, tokens, std::move(hit)});
  return pinned;
}

void BlockManager::unpin_prefix(const std::vector<Token> &tokens, uint64_t salt) {
  auto it = pins_.find(pin_key(tokens, salt));
  if (it != pins_.end()) {
    auto &records = it->second;
    for (auto r = records.rbegin(); r != records.rend(); ++r) {
      if (r->salt != salt || r->tokens != tokens) continue;
      for (int32_t b : r->blocks) {
        --blocks_[b].pins;
        decref(b);
      }
      records.erase(std::next(r).base());
      if (records.empty()) pins_.erase(it);
      return;
    }
  }
  throw std::invalid_argument(cat("unpin_prefix: no pin for this prefix (", tokens.size(), " tokens, salt ", salt, ")"));
}

int64_t BlockManager::evict(int64_t num_blocks) {
  if (num_blocks < 0) throw std::invalid_argument(cat("evict: num_blocks must be >= 0, got ", num_blocks));
  int64_t n = 0;
  while (n < num_blocks && lru_head_ >= 0) {
    const int32_t b = lru_head_;
    lru_remove(b);
    unregister(b);
    blocks_[b].state = State::Free;
    free_list_.push_back(b);
    ++n;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// Consistency check (tests and debugging; O(pool + tokens))

void BlockManager::check_invariants() const {
  auto fail = [](const std::string &msg) { throw std::runtime_error("BlockManager invariant violated: " + msg); };
  const int64_t n = num_blocks_;
  std::vector<int64_t> refs(n, 0), pins(n, 0);

  for (const auto &[id, s] : seqs_) {
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    if (len == 0) fail(cat("sequence ", id, " has no tokens"));
    if (static_cast<int64_t>(s.table.size()) != (len + block_size_ - 1) / block_size_)
      fail(cat("sequence ", id, " has ", s.table.size(), " blocks for ", len, " tokens"));
    if (static_cast<int64_t>(s.hashes.size()) > len / block_size_)
      fail(cat("sequence ", id, " has ", s.hashes.size(), " hashes but ", len / block_size_, " full blocks"));
    std::unordered_set<int32_t> own;
    for (size_t i = 0; i < s.table.size(); ++i) {
      const int32_t b = s.table[i];
      if (b < 0 || b >= n) fail(cat("sequence ", id, " holds out-of-range block ", b));
      if (!own.insert(b).second) fail(cat("sequence ", id, " holds block ", b, " twice"));
      ++refs[b];
      if (i < s.hashes.size()) {
        const uint64_t parent = i == 0 ? s.salt : s.hashes[i - 1];
        if (s.hashes[i] != block_hash(parent, s.tokens.data() + i * block_size_))
          fail(cat("sequence ", id, " has a stale hash for block index ", i));
        if (blocks_[b].registered && blocks_[b].hash != s.hashes[i])
          fail(cat("sequence ", id, " block ", b, " is registered under another hash"));
      }
    }
  }
  for (const auto &[key, records] : pins_) {
    if (records.empty()) fail("empty pin record list");
    for (const PinRecord &r : records) {
      if (pin_key(r.tokens, r.salt) != key) fail("pin record filed under the wrong key");
      for (int32_t b : r.blocks) {
        ++refs[b];
        ++pins[b];
        if (!blocks_[b].registered) fail(cat("pinned block ", b, " is not in the prefix cache"));
      }
    }
  }

  int64_t n_free = 0, n_evictable = 0, n_registered = 0;
  for (int64_t b = 0; b < n; ++b) {
    const Block &blk = blocks_[b];
    if (blk.ref != refs[b]) fail(cat("block ", b, " has ref_count ", blk.ref, " but ", refs[b], " references"));
    if (blk.pins != pins[b]) fail(cat("block ", b, " has ", blk.pins, " pins but ", pins[b], " pin records"));
    n_registered += blk.registered;
    switch (blk.state) {
      case State::Used:
        if (blk.ref <= 0) fail(cat("block ", b, " is marked used with ref_count ", blk.ref));
        break;
      case State::Evictable:
        ++n_evictable;
        if (blk.ref != 0 || !blk.registered) fail(cat("evictable block ", b, " is referenced or not cached"));
        break;
      case State::Free:
        ++n_free;
        if (blk.ref != 0 || blk.registered) fail(cat("free block ", b, " is referenced or still cached"));
        break;
    }
    if (blk.registered) {
      auto it = cache_.find(blk.hash);
      if (it == cache_.end() || it->second != b) fail(cat("cached block ", b, " is missing from the hash map"));
      if (block_hash(blk.parent_hash, block_tokens_.data() + b * block_size_) != blk.hash)
        fail(cat("cached block ", b, " has tokens that do not match its hash"));
    }
  }
  if (static_cast<int64_t>(cache_.size()) != n_registered)
    fail(cat("hash map has ", cache_.size(), " entries for ", n_registered, " cached blocks"));

  std::vector<uint8_t> seen(n, 0);
  for (int32_t b : free_list_) {
    if (b < 0 || b >= n) fail(cat("free list holds out-of-range block ", b));
    if (seen[b]++) fail(cat("block ", b, " is twice in the free list"));
    if (blocks_[b].state != State::Free) fail(cat("block ", b, " is in the free list but not free"));
  }
  if (static_cast<int64_t>(free_list_.size()) != n_free)
    fail(cat("free list has ", free_list_.size(), " blocks, ", n_free, " are free"));

  int64_t count = 0;
  int32_t prev = -1;
  for (int32_t b = lru_head_; b >= 0; b = blocks_[b].lru_next) {
    if (++count > n) fail("LRU list has a cycle");
    if (seen[b]++) fail(cat("block ", b, " is in two lists"));
    if (blocks_[b].state != State::Evictable) fail(cat("block ", b, " is on the LRU list but not evictable"));
    if (blocks_[b].lru_prev != prev) fail(cat("LRU back link of block ", b, " is broken"));
    prev = b;
  }
  if (prev != lru_tail_) fail("LRU tail is wrong");
  if (count != lru_size_ || count != n_evictable)
    fail(cat("LRU list has ", count, " blocks, size says ", lru_size_, ", ", n_evictable, " are evictable"));
}

}  // namespace step3vl
