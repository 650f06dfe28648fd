// Block copy for copy-on-write and pool compaction: cache[dst[i]] = cache[src[i]] for every (src, dst) pair
// and every cache tensor (all layers' K and V) in one launch.
// Grid: x = pair, y = cache, z = chunk of the block's bytes. Each cache is described by its base address and
// bytes per block (device arrays), so layers may differ in shape or dtype. The access width W is chosen on the
// host (copy_vec_width over all bases and block sizes); one entry point per W keeps names stable.
#include "block_copy.h"

namespace step3vl {

struct alignas(16) Vec16 { uint32_t x, y, z, w; };
struct alignas(8) Vec8 { uint32_t x, y; };

template <typename V>
__device__ void block_copy_impl(const uint64_t* __restrict__ bases, const int64_t* __restrict__ bytes_per_block,
                                const int64_t* __restrict__ src, const int64_t* __restrict__ dst,
                                int64_t vecs_per_chunk) {
  const int64_t pair = blockIdx.x;
  const int cache = blockIdx.y;
  const int64_t bpb = bytes_per_block[cache];
  const int64_t nvec = bpb / (int64_t)sizeof(V);
  const Range64 r = copy_chunk_range(nvec, blockIdx.z, vecs_per_chunk);
  char* base = reinterpret_cast<char*>(bases[cache]);
  const V* from = reinterpret_cast<const V*>(base + block_byte_offset(src[pair], bpb));
  V* to = reinterpret_cast<V*>(base + block_byte_offset(dst[pair], bpb));
  for (int64_t v = r.begin + threadIdx.x; v < r.end; v += blockDim.x) to[v] = from[v];
}

}  // namespace step3vl

#define STEP3VL_BLOCK_COPY(NAME, V)                                                                        \
  extern "C" __global__ void NAME(const uint64_t* bases, const int64_t* bytes_per_block, const int64_t* src, \
                                  const int64_t* dst, int64_t vecs_per_chunk) {                            \
    step3vl::block_copy_impl<V>(bases, bytes_per_block, src, dst, vecs_per_chunk);                         \
  }

STEP3VL_BLOCK_COPY(block_copy_w16, step3vl::Vec16)
STEP3VL_BLOCK_COPY(block_copy_w8, step3vl::Vec8)
STEP3VL_BLOCK_COPY(block_copy_w4, uint32_t)
STEP3VL_BLOCK_COPY(block_copy_w2, unsigned short)
STEP3VL_BLOCK_COPY(block_copy_w1, uint8_t)
