// Compressed posting lists: the layout of the inverted file's postings in memory and in index files
// (format version 3). A word's list is a sequence of blocks of at most kBlock postings:
//
//   uint32  first slot (little endian), local to the segment
//   uint8   n - 1 (n postings in the block, 1..kBlock)
//   uint8   width: bits per (gap - 1), 0..32
//   packed  the n - 1 values gap - 1 between consecutive slots, `width` bits each, LSB first,
//           ceil((n - 1) * width / 8) bytes
//   codes   n x code_bytes, in slot order
//
// Slots are strictly ascending within a list (gaps >= 1). An ASMK* posting costs its 16 code bytes
// plus about width / 8 bytes of slot and 6 / kBlock bytes of header; every block starts with an
// absolute slot, so a reader can skip blocks by slot range without decoding them (skip blocks).
// Decoding checks every header against the list's end and the segment's slot range: a corrupt list
// raises CorruptIndex, never reads outside the list. Page checksums (CRC-32, zlib's polynomial) of the
// byte stream guard the content itself (ivf.h).
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
constexpr int kBlockHeader = 6;

// zlib's CRC-32 (the same value as Python's zlib.crc32(data, crc)).
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);

inline int bits_for(uint32_t v) { return v ? 32 - __builtin_clz(v) : 0; }

inline size_t block_bytes(int64_t n, int width, int code_bytes) {
  return kBlockHeader + (static_cast<size_t>(n - 1) * width + 7) / 8 + static_cast<size_t>(n) * code_bytes;
}

// Bytes of the encoded list of n postings with these (strictly ascending) slots.
size_t encoded_bytes(const uint32_t* slots, int64_t n, int code_bytes);

// Encodes n postings (slots strictly ascending; codes n x code_bytes, contiguous) at out, which holds
// encoded_bytes(...) bytes. Returns the bytes written.
size_t encode_list(const uint32_t* slots, const uint8_t* codes, int64_t n, int code_bytes, uint8_t* out);

struct Block {
  uint32_t first = 0;
  int n = 0;
  int width = 0;
  const uint8_t* packed = nullptr;
  const uint8_t* codes = nullptr;
  const uint8_t* next = nullptr;  // the following block
};

// The block at p, checked to end at or before `end`.
inline Block read_block(const uint8_t* p, const uint8_t* end, int code_bytes) {
  Block b;
  if (end - p < kBlockHeader) throw CorruptIndex("corrupt index: truncated posting block header");
  std::memcpy(&b.first, p, 4);
  b.n = p[4] + 1;
  b.width = p[5];
  if (b.width > 32) throw CorruptIndex("corrupt index: posting block slot width " + std::to_string(b.width) + " > 32");
  b.packed = p + kBlockHeader;
  b.codes = b.packed + (static_cast<size_t>(b.n - 1) * b.width + 7) / 8;
  const size_t total = block_bytes(b.n, b.width, code_bytes);
  if (static_cast<size_t>(end - p) < total) throw CorruptIndex("corrupt index: posting block overruns its list");
  b.next = p + total;
  return b;
}

// The block's slots (local) into out[0..n); returns the last one (computed in 64 bits: a corrupt
// block cannot wrap around).
inline uint64_t decode_slots(const Block& b, uint32_t* out) {
  uint64_t s = b.first;
  out[0] = b.first;
  if (b.width == 0) {
    for (int i = 1; i < b.n; ++i) out[i] = static_cast<uint32_t>(++s);
    return s;
  }
  const uint8_t* p = b.packed;
  uint64_t buf = 0;
  int have = 0;
  const uint64_t mask = (uint64_t{1} << b.width) - 1;
  for (int i = 1; i < b.n; ++i) {
    while (have < b.width) {
      buf |= static_cast<uint64_t>(*p++) << have;
      have += 8;
    }
    s += (buf & mask) + 1;
    buf >>= b.width;
    have -= b.width;
    out[i] = static_cast<uint32_t>(s);
  }
  return s;
}

}  // namespace d2r
