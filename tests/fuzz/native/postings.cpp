// libFuzzer target: the posting-list decoders (csrc/postings.h, format 4; csrc/postings_v3.h, format 3)
// and the scan kernels of every SIMD level compiled in and supported by this CPU (csrc/scan.h).
//
// Input: byte 0 flags (bit 0: a format-3 list; bits 1-3: code bytes, one of 1 2 4 8 16 16 32 64),
// bytes 1-4 the segment's slot count (uint32 LE), bytes 5-20 a 16-byte query code, then the list's
// bytes (count varint + blocks), which the target reads exactly as an index file's list is read.
//
// Checks (a failure aborts: libFuzzer reports a crash):
//  * no out-of-bounds read (ASan: libFuzzer's buffer is exactly the input), no UB (UBSan);
//  * a corrupt list raises CorruptIndex; anything else thrown is a bug;
//  * every level's decoder gives the scalar decoder's slots (or, for a block whose sum passes 2^32,
//    a last slot >= 2^32 as scan.h promises);
//  * a list that decodes re-encodes (postings.h encode_list) to a list that decodes to the same
//    slots and codes; a format-3 list converts to the same postings in format 4;
//  * with 16-byte codes, every level's bin16 kernel adds the table entries a plain popcount loop adds,
//    and every level's finish gives the scalar level's floats bit for bit.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

#include "postings.h"
#include "postings_v3.h"
#include "scan.h"
#include "simd.h"

using namespace d2r;

namespace {

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz postings: %s\n", what);
  std::abort();
}

const std::vector<const ScanKernels*>& levels() {
  static const std::vector<const ScanKernels*> all = [] {
    std::vector<const ScanKernels*> v;
    for (simd::Level l : simd::available()) v.push_back(&scan_kernels_for(l));
    return v;
  }();
  return all;
}

struct Decoded {
  std::vector<uint32_t> slots;
  std::vector<uint8_t> codes;
};

// Format 4: the list [p, end) decoded as for_blocks (ivf.cpp) does, every level's decoder compared.
Decoded decode_v4(const uint8_t* p, const uint8_t* end, uint64_t n_local, int cb) {
  Decoded d;
  int64_t left = 0;
  p = read_count(p, end, &left);
  int64_t prev = -1;
  uint32_t ref[kBlock + 16], out[kBlock + 16];
  while (left > 0) {
    const Block blk = read_block(p, end, static_cast<int>(left < kBlock ? left : kBlock), cb);
    left -= blk.n;
    if (static_cast<int64_t>(blk.first) <= prev) throw CorruptIndex("not sorted");
    const uint64_t last = decode_slots_scalar(blk, ref);
    for (const ScanKernels* k : levels()) {
      std::memset(out, 0xA5, sizeof out);
      const uint64_t l = k->decode(blk, out);
      if (last > 0xFFFFFFFFull) {
        if (l <= 0xFFFFFFFFull) fail("a vector decoder hid a slot sum past 2^32");
      } else if (l != last || std::memcmp(out, ref, sizeof(uint32_t) * blk.n) != 0) {
        fail("a SIMD level's decoder differs from the scalar decoder");
      }
    }
    if (last >= n_local) throw CorruptIndex("slot out of range");
    prev = static_cast<int64_t>(last);
    d.slots.insert(d.slots.end(), ref, ref + blk.n);
    d.codes.insert(d.codes.end(), blk.codes, blk.codes + static_cast<size_t>(blk.n) * cb);
    p = blk.next;
  }
  if (p != end) throw CorruptIndex("longer than its count");
  return d;
}

// Format 3: the list decoded as InvertedFile::convert_v3 does.
Decoded decode_v3(const uint8_t* p, const uint8_t* end, uint64_t n_local, int cb) {
  Decoded d;
  int64_t left = 0;
  p = read_count(p, end, &left);
  int64_t prev = -1;
  uint32_t buf[v3::kBlock3];
  while (left > 0) {
    const v3::Block blk = v3::read_block(p, end, static_cast<int>(left < v3::kBlock3 ? left : v3::kBlock3), cb);
    left -= blk.n;
    if (static_cast<int64_t>(blk.first) <= prev) throw CorruptIndex("not sorted");
    const uint64_t last = v3::decode_slots(blk, buf);
    if (last >= n_local) throw CorruptIndex("slot out of range");
    prev = static_cast<int64_t>(last);
    d.slots.insert(d.slots.end(), buf, buf + blk.n);
    d.codes.insert(d.codes.end(), blk.codes, blk.codes + static_cast<size_t>(blk.n) * cb);
    p = blk.next;
  }
  if (p != end) throw CorruptIndex("longer than its count");
  return d;
}

void check_decoded(const Decoded& d, uint64_t n_local) {
  for (size_t i = 0; i < d.slots.size(); ++i) {
    if (d.slots[i] >= n_local) fail("a decoded slot lies outside the segment");
    if (i && d.slots[i] <= d.slots[i - 1]) fail("decoded slots are not strictly ascending");
  }
}

// The scan kernels of every level on the decoded list (16-byte codes).
void check_scan(const Decoded& d, const uint8_t* q) {
  const int n = static_cast<int>(d.slots.size());
  const uint32_t base = d.slots.front();
  const uint64_t span = static_cast<uint64_t>(d.slots.back()) - base + 1;
  if (span > (1u << 16)) return;  // the accumulators of a huge sparse range: not worth the time
  int64_t table[129];
  for (int h = 0; h <= 128; ++h) table[h] = (int64_t{1} << 40) / (h + 1) - 3 * h;
  std::vector<int64_t> ref(span, 0), acc(span);
  for (int i = 0; i < n; ++i) {
    int h = 0;
    for (int j = 0; j < 16; ++j) h += __builtin_popcount(q[j] ^ d.codes[16 * static_cast<size_t>(i) + j]);
    ref[d.slots[i] - base] += table[h];
  }
  // The kernels work per block (at most kBlock postings, slots distinct): feed them block-sized runs.
  for (const ScanKernels* k : levels()) {
    std::fill(acc.begin(), acc.end(), 0);
    for (int b0 = 0; b0 < n; b0 += kBlock) {
      const int b1 = b0 + kBlock < n ? b0 + kBlock : n;
      // Two calls split at a point the input picks: starts and ends off the kernels' vector width.
      const int mid = q[1] % (b1 - b0 + 1);
      const uint8_t* c = d.codes.data() + 16 * static_cast<size_t>(b0);
      k->bin16(table, q, c, d.slots.data() + b0, 0, mid, base, acc.data());
      k->bin16(table, q, c, d.slots.data() + b0, mid, b1 - b0, base, acc.data());
    }
    if (acc != ref) fail("a SIMD level's bin16 differs from the popcount reference");
  }
  // finish: the accumulators as fixed-point sums of images with some word counts.
  const int64_t m = static_cast<int64_t>(span);
  std::vector<int32_t> nw(m);
  for (int64_t i = 0; i < m; ++i) nw[i] = static_cast<int32_t>((ref[i] >> 3) & 0x3FF);
  const int64_t nq = 1 + (q[0] & 0x7F);
  std::vector<float> f0(m), f1(m);
  for (bool normalize : {false, true}) {
    levels().front()->finish(ref.data(), nw.data(), m, nq, normalize, f0.data());
    for (const ScanKernels* k : levels()) {
      k->finish(ref.data(), nw.data(), m, nq, normalize, f1.data());
      if (std::memcmp(f0.data(), f1.data(), sizeof(float) * m) != 0) fail("a SIMD level's finish differs from scalar");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 21) return 0;
  static const int kCodeBytes[8] = {1, 2, 4, 8, 16, 16, 32, 64};
  const bool v3_list = data[0] & 1;
  const int cb = kCodeBytes[(data[0] >> 1) & 7];
  uint32_t n_local32;
  std::memcpy(&n_local32, data + 1, 4);
  const uint64_t n_local = n_local32;
  const uint8_t* q = data + 5;
  const uint8_t* p = data + 21;
  const uint8_t* end = data + size;
  if (p == end) return 0;  // an empty list has no bytes (the word table says so; nothing is decoded)
  Decoded d;
  try {
    d = v3_list ? decode_v3(p, end, n_local, cb) : decode_v4(p, end, n_local, cb);
  } catch (const CorruptIndex&) {
    return 0;
  }
  check_decoded(d, n_local);
  const int64_t n = static_cast<int64_t>(d.slots.size());
  if (static_cast<int64_t>(d.codes.size()) != n * cb) fail("codes do not match the slots");
  // Round trip through the encoder (the format-3 list: its conversion to format 4).
  std::vector<uint8_t> enc(encoded_bytes(d.slots.data(), n, cb));
  if (encode_list(d.slots.data(), d.codes.data(), n, cb, enc.data()) != enc.size()) fail("encoded size differs");
  Decoded again;
  try {
    again = decode_v4(enc.data(), enc.data() + enc.size(), n_local, cb);
  } catch (const CorruptIndex&) {
    fail("a re-encoded list does not decode");
  }
  if (again.slots != d.slots || again.codes != d.codes) fail("a re-encoded list decodes to other postings");
  if (cb == 16) check_scan(d, q);
  return 0;
}
