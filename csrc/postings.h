// Compressed posting lists: the layout of the inverted file's postings in memory and in index files
// (format version 4). A word's list (empty: no bytes) is its number of postings N (LEB128 varint)
// followed by blocks of kBlock = 128 postings (the last one holds the rest, n = min(128, left)):
//
//   uint32  first slot (little endian), local to the segment
//   uint8   b: bit width of the gaps, 0..32
//   gaps    16 * W bytes, W = ceil(ceil(n / 4) * b / 32): the values v_0 .. v_{n-1}, b bits each, in
//           a vertical 4-lane layout (simdcomp's): v_i belongs to lane i % 4 as its (i / 4)-th
//           value; each lane's values are packed LSB first into 32-bit little-endian words, and word
//           t of lane l sits at bytes 16 t + 4 l. Bits past the n values are zero.
//   codes   n x code_bytes, in slot order
//
// with v_i = slot_i - slot_{i-1} - 1 for i >= 1 (slots strictly ascending) and v_0 = 0 (written as
// zero, ignored when read: slot_0 is the header's first slot). One 16-byte load, one shift and one
// mask decode four consecutive gaps at once (SSE2; a scalar loop reads the same layout), then a
// prefix sum gives the slots. At the density of a 65,536-word codebook (1.5 % of the images per
// word, a mean gap of 65) the widest gap of a block needs 9 or 10 bits: 16 b + 5 bytes per 128
// postings, about 1.2 bytes per posting beside the 16 code bytes (format 3's Golomb-Rice code took
// 0.97 but decoded one bit run at a time).
//
// Every block starts with an absolute slot and its length follows from its header, so a reader
// skips blocks by slot range without decoding them. Readers check, per block: the header inside the
// list, b <= 32, the block inside the list, its first slot above the previous block's slots (and,
// for a skipped block, the next block's first slot at least n above its own; a reader that stops
// at a block straddling the end of its slot range checks the next block's first slot above that
// block's last, since the reader of the range above skips the block by that first slot), its last
// slot inside the segment; per list: the count's blocks end exactly at the list's end. A full
// verification (InvertedFile::verify) also checks the postings per slot against the image table. A corrupt list raises
// CorruptIndex and never reads outside the list; page checksums (CRC-32, zlib's polynomial) of the
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
constexpr int kBlockHeader = 5;
constexpr int kMaxGapBytes = 16 * 32;  // gap bytes of a full block of 32-bit gaps

// zlib's CRC-32 (the same value as Python's zlib.crc32(data, crc)).
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);

inline int bits_for(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

// 32-bit words per lane of n gaps of b bits.
inline int gap_words(int n, int b) { return (((n + 3) / 4) * b + 31) / 32; }
inline size_t gap_bytes(int n, int b) { return 16 * static_cast<size_t>(gap_words(n, b)); }

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
  int b = 0;
  const uint8_t* gaps = nullptr;
  const uint8_t* codes = nullptr;
  const uint8_t* next = nullptr;  // the following block
};

// The block of n postings at p, checked to end at or before `end`.
inline Block read_block(const uint8_t* p, const uint8_t* end, int n, int code_bytes) {
  Block blk;
  if (end - p < kBlockHeader) throw CorruptIndex("corrupt index: truncated posting block header");
  std::memcpy(&blk.first, p, 4);
  blk.n = n;
  blk.b = p[4];
  if (blk.b > 32) throw CorruptIndex("corrupt index: posting block gap width " + std::to_string(blk.b));
  blk.gaps = p + kBlockHeader;
  blk.codes = blk.gaps + gap_bytes(n, blk.b);
  const size_t total = static_cast<size_t>(blk.codes - p) + static_cast<size_t>(n) * code_bytes;
  if (static_cast<size_t>(end - p) < total) throw CorruptIndex("corrupt index: posting block overruns its list");
  blk.next = p + total;
  return blk;
}

// The block's slots into out[0..n) by the portable loop; returns the last one, computed in 64 bits
// (ascending by construction: the caller checks it against the segment).
inline uint64_t decode_slots_scalar(const Block& blk, uint32_t* out) {
  const int n = blk.n, b = blk.b;
  out[0] = blk.first;
  if (n == 1) return blk.first;
  uint64_t s = blk.first;
  if (b == 0) {
    for (int i = 1; i < n; ++i) out[i] = static_cast<uint32_t>(++s);
    return s;
  }
  const uint64_t mask = b == 32 ? 0xFFFFFFFFu : (uint64_t{1} << b) - 1;
  auto word = [&](int t, int lane) {
    uint32_t w;
    std::memcpy(&w, blk.gaps + 16 * t + 4 * lane, 4);
    return static_cast<uint64_t>(w);
  };
  for (int i = 1; i < n; ++i) {
    const int lane = i & 3;
    const int bit = (i >> 2) * b;
    const int t = bit >> 5, sh = bit & 31;
    uint64_t x = word(t, lane);
    if (sh + b > 32) x |= word(t + 1, lane) << 32;
    s += ((x >> sh) & mask) + 1;
    out[i] = static_cast<uint32_t>(s);
  }
  return s;
}

// Whether the 32-bit prefix sum of a block cannot wrap: first + (n - 1) 2^b < 2^32 (then a vector
// decoder may sum in 32 bits; otherwise the scalar decoder's 64-bit sum finds the overflow).
inline bool block_fits_u32(const Block& blk) {
  return static_cast<uint64_t>(blk.first) + (static_cast<uint64_t>(blk.n - 1) << blk.b) <= 0xFFFFFFFFull;
}

}  // namespace d2r
