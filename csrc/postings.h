// Compressed posting lists: the layout of the inverted file's postings in memory and in index files
// (format version 3). A word's list is a sequence of blocks of at most kBlock postings:
//
//   uint32  first slot (little endian), local to the segment
//   uint8   n - 1 (n postings in the block, 1..kBlock)
//   uint8   l: bits of the low part, 0..31
//   uint8   h: bytes of the high part
//   low     the low l bits of x_i, i = 1..n-1, packed LSB first: ceil((n - 1) l / 8) bytes
//   high    h bytes, a bit vector with bit (x_i >> l) + i - 1 set for i = 1..n-1
//   codes   n x code_bytes, in slot order
//
// where x_i = slot_i - first - i (non-decreasing: slots are strictly ascending). This is Elias-Fano
// coding of the block: about 2 + log2(mean gap) bits per posting, within a few tenths of a bit of the
// entropy of the slot gaps, so an ASMK* posting costs its 16 code bytes plus about one byte at the
// density of a 65,536-word codebook (1.5 % of the images per word), and far less in popular words.
// Every block starts with an absolute slot, so a reader skips blocks by slot range without decoding
// them (skip blocks). Decoding checks every header against the list's end and every slot against the
// one before and the segment's range: a corrupt list raises CorruptIndex, never reads outside the
// list. Page checksums (CRC-32, zlib's polynomial) of the byte stream guard the content (ivf.h).
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

constexpr int kBlock = 128;
constexpr int kBlockHeader = 7;

// zlib's CRC-32 (the same value as Python's zlib.crc32(data, crc)).
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);

inline int bits_for(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

// Bytes of the encoded list of n postings with these (strictly ascending) slots.
size_t encoded_bytes(const uint32_t* slots, int64_t n, int code_bytes);

// Encodes n postings (slots strictly ascending; codes n x code_bytes, contiguous) at out, which holds
// encoded_bytes(...) bytes. Returns the bytes written.
size_t encode_list(const uint32_t* slots, const uint8_t* codes, int64_t n, int code_bytes, uint8_t* out);

struct Block {
  uint32_t first = 0;
  int n = 0;
  int low_bits = 0;
  int high_bytes = 0;
  const uint8_t* low = nullptr;
  const uint8_t* high = nullptr;
  const uint8_t* codes = nullptr;
  const uint8_t* next = nullptr;  // the following block
};

// The block at p, checked to end at or before `end`.
inline Block read_block(const uint8_t* p, const uint8_t* end, int code_bytes) {
  Block b;
  if (end - p < kBlockHeader) throw CorruptIndex("corrupt index: truncated posting block header");
  std::memcpy(&b.first, p, 4);
  b.n = p[4] + 1;
  b.low_bits = p[5];
  b.high_bytes = p[6];
  if (b.low_bits > 31) throw CorruptIndex("corrupt index: posting block low-bit width " + std::to_string(b.low_bits));
  b.low = p + kBlockHeader;
  b.high = b.low + (static_cast<size_t>(b.n - 1) * b.low_bits + 7) / 8;
  b.codes = b.high + b.high_bytes;
  const size_t total = static_cast<size_t>(b.codes - p) + static_cast<size_t>(b.n) * code_bytes;
  if (static_cast<size_t>(end - p) < total) throw CorruptIndex("corrupt index: posting block overruns its list");
  b.next = p + total;
  return b;
}

// The block's slots (local) into out[0..n); returns the last one. Checks that they ascend strictly
// and that the high part holds exactly n - 1 entries (CorruptIndex otherwise).
inline uint64_t decode_slots(const Block& b, uint32_t* out) {
  out[0] = b.first;
  const int m = b.n - 1;
  if (m == 0) return b.first;
  // low parts
  uint32_t low[kBlock];
  if (b.low_bits == 0) {
    for (int i = 0; i < m; ++i) low[i] = 0;
  } else {
    const uint8_t* p = b.low;
    uint64_t buf = 0;
    int have = 0;
    const uint64_t mask = (uint64_t{1} << b.low_bits) - 1;
    for (int i = 0; i < m; ++i) {
      while (have < b.low_bits) {
        buf |= static_cast<uint64_t>(*p++) << have;
        have += 8;
      }
      low[i] = static_cast<uint32_t>(buf & mask);
      buf >>= b.low_bits;
      have -= b.low_bits;
    }
  }
  // high parts: the i-th set bit (from 0) at position pos gives high = pos - i
  int i = 0;
  uint64_t prev = b.first;
  const uint64_t base = static_cast<uint64_t>(b.first) + 1;
  for (int byte = 0; byte < b.high_bytes && i < m; byte += 8) {
    uint64_t w = 0;
    std::memcpy(&w, b.high + byte, static_cast<size_t>(std::min(8, b.high_bytes - byte)));
    while (w && i < m) {
      const uint64_t pos = static_cast<uint64_t>(byte) * 8 + static_cast<uint64_t>(__builtin_ctzll(w));
      const uint64_t x = ((pos - static_cast<uint64_t>(i)) << b.low_bits) | low[i];
      const uint64_t s = base + x + static_cast<uint64_t>(i);
      if (s <= prev) throw CorruptIndex("corrupt index: posting list not sorted by slot");
      out[i + 1] = static_cast<uint32_t>(s);
      prev = s;
      w &= w - 1;
      ++i;
    }
  }
  if (i != m) throw CorruptIndex("corrupt index: posting block has fewer slots than its header says");
  return prev;
}

}  // namespace d2r
