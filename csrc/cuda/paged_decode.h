// Index math of paged_decode.cu, shared with the host build.
// Cache layout: [num_blocks, block_size, num_kv_heads, head_dim]; slot = block * block_size + offset.
// GQA: q head h reads kv head h / (num_q_heads / num_kv_heads). A CTA takes one (sequence, kv head, chunk of at
// most MAX_G of that kv head's q heads, split of the context).
#pragma once
#include "hd.h"

namespace step3vl {

// Token t of a sequence lives in block row[table_column(t)] at slot slot_in_block(that block, t).
HD int64_t table_column(int64_t t, int32_t block_size) { return t / block_size; }
HD int64_t slot_in_block(int32_t block, int64_t t, int32_t block_size) {
  return (int64_t)block * block_size + t % block_size;
}
HD int64_t token_slot(const int32_t* row, int64_t t, int32_t block_size) {
  return slot_in_block(row[table_column(t, block_size)], t, block_size);
}

// Element offset of (slot, kv_head, 0) in a contiguous cache.
HD int64_t kv_offset(int64_t slot, int32_t kv_head, int32_t num_kv_heads, int32_t head_dim) {
  return (slot * num_kv_heads + kv_head) * head_dim;
}

// Tokens per split: the longest context divided by the splits, rounded up to whole blocks (>= 1 block).
HD int64_t tokens_per_split(int64_t max_context, int64_t num_splits, int32_t block_size) {
  const int64_t per = ceil_div64(max64(max_context, 1), max64(num_splits, 1));
  return ceil_div64(per, block_size) * block_size;
}

// Tokens [begin, end) of a sequence of `seq_len` tokens that split `split` attends to.
HD Range64 split_range(int64_t seq_len, int64_t split, int64_t per_split) {
  Range64 r;
  r.begin = min64(split * per_split, seq_len);
  r.end = min64(r.begin + per_split, seq_len);
  return r;
}

// First q head of chunk `chunk` of kv head `kv_head` (chunks of `chunk_size` q heads) and how many it holds.
HD int32_t chunk_first_q_head(int32_t kv_head, int32_t group, int32_t chunk, int32_t chunk_size) {
  return kv_head * group + chunk * chunk_size;
}
HD int32_t chunk_num_q_heads(int32_t group, int32_t chunk, int32_t chunk_size) {
  const int32_t left = group - chunk * chunk_size;
  return left < chunk_size ? left : chunk_size;
}

}  // namespace step3vl
