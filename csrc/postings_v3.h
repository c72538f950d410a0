// The posting lists of index format 3 (d2r 0.x, commit 734ab0a), read only to convert such files to
// format 4 (postings.h) as they load. A word's list (empty: no bytes) is its number of postings N
// (LEB128 varint, postings.h read_count) followed by blocks of kBlock3 postings (the last one holds
// the rest):
//
//   uint32  first slot (little endian), local to the segment
//   uint8   k: Rice parameter, 0..31
//   uint16  u: bytes of the unary part (little endian)
//   low     v_i & (2^k - 1) for i = 1..n-1, k bits each, LSB first: ceil((n - 1) k / 8) bytes
//   unary   u bytes: for i = 1..n-1, v_i >> k zero bits then a one bit, LSB first
//   codes   n x code_bytes, in slot order
//
// where v_i = slot_i - slot_{i-1} - 1 (Golomb-Rice coded slot gaps). Decoding checks every header
// and count against the list's end: a corrupt list raises CorruptIndex, never reads outside the list.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "postings.h"

namespace d2r {
namespace v3 {

constexpr int kBlock3 = 256;
constexpr int kBlockHeader3 = 7;

struct Block {
  uint32_t first = 0;
  int n = 0;
  int k = 0;
  int unary_bytes = 0;
  const uint8_t* low = nullptr;
  const uint8_t* unary = nullptr;
  const uint8_t* codes = nullptr;
  const uint8_t* next = nullptr;  // the following block
};

// The block of n postings at p, checked to end at or before `end`.
inline Block read_block(const uint8_t* p, const uint8_t* end, int n, int code_bytes) {
  Block b;
  if (end - p < kBlockHeader3) throw CorruptIndex("corrupt index: truncated posting block header");
  std::memcpy(&b.first, p, 4);
  b.n = n;
  b.k = p[4];
  b.unary_bytes = p[5] | (p[6] << 8);
  if (b.k > 31) throw CorruptIndex("corrupt index: posting block Rice parameter " + std::to_string(b.k));
  b.low = p + kBlockHeader3;
  b.unary = b.low + (static_cast<size_t>(n - 1) * b.k + 7) / 8;
  b.codes = b.unary + b.unary_bytes;
  const size_t total = static_cast<size_t>(b.codes - p) + static_cast<size_t>(n) * code_bytes;
  if (static_cast<size_t>(end - p) < total) throw CorruptIndex("corrupt index: posting block overruns its list");
  b.next = p + total;
  return b;
}

// The block's slots (local) into out[0..n); returns the last one (computed in 64 bits, ascending by
// construction). CorruptIndex when the unary part does not hold exactly n - 1 codes.
inline uint64_t decode_slots(const Block& b, uint32_t* out) {
  out[0] = b.first;
  const int m = b.n - 1;
  if (m == 0) return b.first;
  const int k = b.k;
  const uint64_t mask = (uint64_t{1} << k) - 1;
  const size_t low_bytes = (static_cast<size_t>(m) * k + 7) / 8;
  // The i-th low part sits at bit i k of `low`. An 8-byte load from any of its bytes stays inside the
  // block when at least 8 bytes follow the low part (the unary part and the codes): then one
  // unaligned load per value; else byte by byte.
  const bool wide = b.next - (b.low + low_bytes) >= 8;
  auto low_at = [&](int i) -> uint64_t {
    const size_t bit = static_cast<size_t>(i) * k;
    if (wide) {
      uint64_t v;
      std::memcpy(&v, b.low + bit / 8, 8);
      return (v >> (bit % 8)) & mask;
    }
    uint64_t v = 0;
    for (int t = 0; t < k; ++t) v |= static_cast<uint64_t>((b.low[(bit + t) / 8] >> ((bit + t) % 8)) & 1) << t;
    return v;
  };
  // The unary codes: the i-th one bit (from 0) at position pos ends a run of pos - last - 1 zeros.
  int i = 0;
  uint64_t s = b.first;
  int64_t last = -1;
  for (int byte = 0; byte < b.unary_bytes && i < m; byte += 8) {
    uint64_t w = 0;
    std::memcpy(&w, b.unary + byte, static_cast<size_t>(std::min(8, b.unary_bytes - byte)));
    while (w && i < m) {
      const int64_t pos = static_cast<int64_t>(byte) * 8 + __builtin_ctzll(w);
      const uint64_t q = static_cast<uint64_t>(pos - last - 1);
      s += ((q << k) | (k ? low_at(i) : 0)) + 1;
      out[i + 1] = static_cast<uint32_t>(s);
      last = pos;
      w &= w - 1;
      ++i;
    }
  }
  if (i != m) throw CorruptIndex("corrupt index: posting block holds fewer slots than its list's count");
  return s;
}

}  // namespace v3
}  // namespace d2r
