// Compressed posting lists: the layout of the inverted file's postings in memory and in index files
// (format version 3). A word's list (empty: no bytes) is its number of postings N (LEB128 varint)
// followed by blocks of kBlock postings (the last one holds the rest):
//
//   uint32  first slot (little endian), local to the segment
//   uint8   k: Rice parameter, 0..31
//   uint16  u: bytes of the unary part (little endian)
//   low     v_i & (2^k - 1) for i = 1..n-1, k bits each, LSB first: ceil((n - 1) k / 8) bytes
//   unary   u bytes: for i = 1..n-1, v_i >> k zero bits then a one bit, LSB first
//   codes   n x code_bytes, in slot order
//
// where v_i = slot_i - slot_{i-1} - 1 (slots are strictly ascending). This is Golomb-Rice coding of
// the slot gaps with k chosen per block (the cheapest of the values around log2 of the mean gap):
// about log2(mean gap) + 1.6 bits per posting, within a few tenths of a bit of the entropy of
// geometric gaps, plus 7 header bytes per 256 postings. At the density of a 65,536-word codebook
// (1.5 % of the images per word, a mean gap of 65) an ASMK* posting costs its 16 code bytes plus
// about 0.97 bytes, and far less in popular words. Every block starts with an absolute slot and its
// length follows from its header, so a reader skips blocks by slot range without decoding them.
// Decoding checks every header and count against the list's end and every slot against the
// segment's range: a corrupt list raises CorruptIndex, never reads outside the list. Page checksums
// (CRC-32, zlib's polynomial) of the byte stream guard the content itself (ivf.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "common.h"

namespace d2r {

// A structurally invalid or checksum-failing index (the bindings raise d2r.IndexFileError).
struct CorruptIndex : InvalidArgument {
  using InvalidArgument::InvalidArgument;
};

constexpr int kBlock = 256;
constexpr int kBlockHeader = 7;

// zlib's CRC-32 (the same value as Python's zlib.crc32(data, crc)).
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);

inline int bits_for(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

// Bytes of the encoded list of n postings with these (strictly ascending) slots.
size_t encoded_bytes(const uint32_t* slots, int64_t n, int code_bytes);

// Encodes n postings (slots strictly ascending; codes n x code_bytes, contiguous) at out, which holds
// encoded_bytes(...) bytes. Returns the bytes written.
size_t encode_list(const uint32_t* slots, const uint8_t* codes, int64_t n, int code_bytes, uint8_t* out);

// The posting count at the start of a non-empty list [p, end); returns where the first block starts.
inline const uint8_t* read_count(const uint8_t* p, const uint8_t* end, int64_t* n) {
  uint64_t v = 0;
  for (int shift = 0; shift < 35; shift += 7) {
    if (p >= end) break;
    const uint8_t byte = *p++;
    v |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if (!(byte & 0x80)) {
      if (v == 0 || v > (uint64_t{1} << 32)) break;
      *n = static_cast<int64_t>(v);
      return p;
    }
  }
  throw CorruptIndex("corrupt index: invalid posting count at the start of a list");
}

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
  if (end - p < kBlockHeader) throw CorruptIndex("corrupt index: truncated posting block header");
  std::memcpy(&b.first, p, 4);
  b.n = n;
  b.k = p[4];
  b.unary_bytes = p[5] | (p[6] << 8);
  if (b.k > 31) throw CorruptIndex("corrupt index: posting block Rice parameter " + std::to_string(b.k));
  b.low = p + kBlockHeader;
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

}  // namespace d2r
