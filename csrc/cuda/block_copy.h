// Index math of block_copy.cu, shared with the host build so the CPU tests run the same code.
#pragma once
#include "hd.h"

namespace step3vl {

// Byte offset of block `block` inside a cache whose blocks are `bytes_per_block` bytes apart.
HD int64_t block_byte_offset(int64_t block, int64_t bytes_per_block) { return block * bytes_per_block; }

// Widest access (16, 8, 4, 2 or 1 bytes) that keeps every copy aligned: `bits` is the OR of all base
// addresses and all bytes-per-block values, so its lowest set bit bounds the common alignment.
HD int copy_vec_width(uint64_t bits) {
  int width = 16;
  while (width > 1 && (bits & (uint64_t)(width - 1)) != 0) width >>= 1;
  return width;
}

// The vectors [begin, end) of one block that grid chunk `chunk` copies, `vecs_per_chunk` per chunk.
HD Range64 copy_chunk_range(int64_t nvec, int64_t chunk, int64_t vecs_per_chunk) {
  Range64 r;
  r.begin = min64(chunk * vecs_per_chunk, nvec);
  r.end = min64(r.begin + vecs_per_chunk, nvec);
  return r;
}

}  // namespace step3vl
