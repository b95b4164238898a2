// Work partition for decode attention, shared by the CPU and CUDA kernels (and mirrored by
// pykernels.plan_decode in Python, which tests compare against).
//
// The work of one call is a list of segments, one per (sequence b, kv-head h) in order
// s = b * Hkv + h. Segment s has ntiles(s) = ceil(seqlen[b] / tile) KV tiles; cum[s] is the
// exclusive prefix sum (cum[0] = 0, cum[nseg] = total).
//
// lean (stream-K): worker w of W owns the global tile range [begin(w), begin(w+1)) with
//   begin(w) = floor(total * w / W), so ranges differ by at most one tile and may cross
//   segment (head and sequence) boundaries. A worker writes a partial state for a segment it
//   covers only in part; partial slots are numbered 2*w (the piece that starts at the worker's
//   first tile) and 2*w + 1 (the piece that starts at a segment start inside the range).
// split (flash-decoding): segment s is cut into min(S, ntiles(s)) chunks of tiles, chunk c
//   covering [floor(n*c/S'), floor(n*(c+1)/S')).
#pragma once
#include "common.h"

namespace pykernels {

PK_HOST_DEVICE PK_INLINE pk_i64 lean_begin(pk_i64 total, pk_i64 w, pk_i64 W) { return (total * w) / W; }

// The worker whose range contains global tile g (0 <= g < total): the largest w with
// begin(w) <= g. Empty ranges (total < W) are skipped because begin is non-decreasing.
PK_HOST_DEVICE PK_INLINE pk_i64 lean_owner(pk_i64 total, pk_i64 g, pk_i64 W) {
  pk_i64 lo = 0, hi = W - 1;
  while (lo < hi) {
    pk_i64 mid = (lo + hi + 1) / 2;
    if (lean_begin(total, mid, W) <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Segment containing global tile g: the largest s with cum[s] <= g (cum has nseg + 1 entries).
PK_HOST_DEVICE PK_INLINE pk_i64 lean_segment(const pk_i64* cum, pk_i64 nseg, pk_i64 g) {
  pk_i64 lo = 0, hi = nseg - 1;
  while (lo < hi) {
    pk_i64 mid = (lo + hi + 1) / 2;
    if (cum[mid] <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Partial slot written by worker w for the segment starting at tile seg_begin.
PK_HOST_DEVICE PK_INLINE pk_i64 lean_partial_slot(pk_i64 w, pk_i64 worker_begin, pk_i64 seg_begin) {
  return 2 * w + (worker_begin < seg_begin ? 1 : 0);
}

// Chunk c of a segment of n tiles cut into S chunks (S <= n).
PK_HOST_DEVICE PK_INLINE pk_i64 split_chunk_begin(pk_i64 n, pk_i64 c, pk_i64 S) { return (n * c) / S; }

}  // namespace pykernels
