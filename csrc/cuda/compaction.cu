// Batched message compaction in ONE launch of ONE CTA (up to 1024 threads) for all K rows:
//   1. search: one warp per row scans backwards for the last marker span, 32 positions x kUnroll per round
//      (ballot; the lowest hitting lane of the first hitting round is the last occurrence);
//   2. scan: block-wide exclusive prefix sum of the message lengths -> offsets [K+1];
//   3. pack: one warp per row copies its message into the ragged output.
// A single CTA makes the prefix sum a plain block scan (no inter-CTA look-back); K is bounded by kMaxRows.
#include "compaction.h"

namespace step3vl {

constexpr int kMaxRows = 4096;
constexpr int kUnroll = 4;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ int64_t warp_last_marker_start(const int32_t* row, int64_t length, const int32_t* marker, int32_t m,
                                          int lane) {
  const int64_t width = 32 * kUnroll;
  for (int64_t round = 0; search_position(length, m, round, width, 0) >= 0; ++round) {
    bool hit[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j)
      hit[j] = marker_at(row, length, search_position(length, m, round, width, 32 * j + lane), marker, m);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const unsigned ballot = __ballot_sync(kFullMask, hit[j]);
      if (ballot) return search_position(length, m, round, width, 32 * j + __ffs(ballot) - 1);
    }
  }
  return -1;
}

// Exclusive scan of the per-thread value across the block; returns this thread's exclusive prefix.
__device__ int32_t block_exclusive_scan(int32_t value, int32_t* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int32_t inclusive = value;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int32_t up = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int32_t total = lane < nwarps ? warp_totals[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int32_t up = __shfl_up_sync(kFullMask, total, d);
      if (lane >= d) total += up;
    }
    if (lane < nwarps) warp_totals[lane] = total;  // inclusive over warps
  }
  __syncthreads();
  return (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - value;
}

}  // namespace step3vl

// tokens [K, row_stride] int32; lengths [K]; marker [m]; outputs: out_tokens (capacity >= sum of lengths
// kept), offsets [K+1], closed [K] and truncated [K] as bytes (torch.bool). blockDim.x: multiple of 32.
extern "C" __global__ void __launch_bounds__(1024)
    compact_messages(const int32_t* __restrict__ tokens, int64_t row_stride, const int32_t* __restrict__ lengths,
                     int32_t num_rows, const int32_t* __restrict__ marker, int32_t marker_len, int32_t max_tokens,
                     int32_t keep_unclosed, int32_t* __restrict__ out_tokens, int32_t* __restrict__ offsets,
                     uint8_t* __restrict__ closed, uint8_t* __restrict__ truncated) {
  using namespace step3vl;
  __shared__ int32_t s_start[kMaxRows];
  __shared__ int32_t s_len[kMaxRows];
  __shared__ int32_t s_warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

  for (int k = warp; k < num_rows; k += nwarps) {
    const int32_t* row = tokens + (int64_t)k * row_stride;
    const int64_t length = lengths[k];
    const int64_t found = warp_last_marker_start(row, length, marker, marker_len, lane);
    const MessageSpan span = message_span(found, marker_len, length, max_tokens, keep_unclosed != 0);
    if (lane == 0) {
      s_start[k] = (int32_t)span.start;
      s_len[k] = (int32_t)span.len;
      closed[k] = span.closed;
      truncated[k] = span.truncated;
    }
  }
  __syncthreads();

  const Range64 seg = thread_segment(num_rows, threadIdx.x, blockDim.x);
  int32_t local = 0;
  for (int64_t k = seg.begin; k < seg.end; ++k) local += s_len[k];
  int32_t running = block_exclusive_scan(local, s_warp_totals);
  if (threadIdx.x == 0) offsets[0] = 0;
  for (int64_t k = seg.begin; k < seg.end; ++k) {
    const int32_t begin = running;
    running += s_len[k];
    offsets[k + 1] = running;
    s_start[k] -= begin;  // packing reads row[start + i] into out[begin + i]: keep only the difference
  }
  __syncthreads();

  for (int k = warp; k < num_rows; k += nwarps) {
    const int32_t* row = tokens + (int64_t)k * row_stride;
    const int32_t len = s_len[k];
    const int32_t shift = s_start[k];
    const int32_t begin = offsets[k + 1] - len;
    for (int32_t i = begin + lane; i < begin + len; i += 32) out_tokens[i] = row[i + shift];
  }
}
