// Index math of compaction.cu (batched message compaction), shared with the host build.
// A row's message is the text after the LAST occurrence of the marker span (`</think>`) within its first
// `length` tokens, cut to its first `max_tokens` tokens. Without a marker the row is unclosed: its message is
// empty, or the whole (bounded) row when keep_unclosed.
#pragma once
#include "hd.h"

namespace step3vl {

struct MessageSpan {
  int64_t start;   // first token of the message in its row
  int64_t len;     // tokens kept
  bool closed;     // the marker was found
  bool truncated;  // the message was longer than max_tokens
};

// True when row[p .. p+m) equals marker[0 .. m) and the span lies within the first `length` tokens.
HD bool marker_at(const int32_t* row, int64_t length, int64_t p, const int32_t* marker, int32_t m) {
  if (p < 0 || p + m > length) return false;
  for (int32_t j = 0; j < m; ++j)
    if (row[p + j] != marker[j]) return false;
  return true;
}

// Position that lane slot `slot` examines in search round `round` when each round covers `width` positions,
// scanning backwards from the last possible start (length - m). Slot 0 of round 0 is the last start.
HD int64_t search_position(int64_t length, int32_t m, int64_t round, int64_t width, int64_t slot) {
  return length - m - round * width - slot;
}

// Start of the last marker occurrence in row[0 .. length), or -1. (Serial form; the kernel runs the same
// rounds with a warp, one position per lane, and takes the lowest hitting slot of the first hitting round.)
HD int64_t last_marker_start(const int32_t* row, int64_t length, const int32_t* marker, int32_t m) {
  for (int64_t p = search_position(length, m, 0, 1, 0); p >= 0; --p)
    if (marker_at(row, length, p, marker, m)) return p;
  return -1;
}

HD MessageSpan message_span(int64_t marker_start, int32_t m, int64_t length, int64_t max_tokens,
                            bool keep_unclosed) {
  MessageSpan s;
  s.closed = marker_start >= 0;
  s.start = s.closed ? marker_start + m : (keep_unclosed ? 0 : length);
  const int64_t raw = length - s.start;
  s.len = min64(raw, max_tokens);
  s.truncated = raw > max_tokens;
  return s;
}

// Contiguous share [begin, end) of `n` items for thread `t` of `threads` (the block scan's per-thread segment).
HD Range64 thread_segment(int64_t n, int64_t t, int64_t threads) {
  const int64_t per = ceil_div64(n, threads);
  Range64 r;
  r.begin = min64(t * per, n);
  r.end = min64(r.begin + per, n);
  return r;
}

}  // namespace step3vl
