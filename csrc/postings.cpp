#include "postings.h"

#include <algorithm>
#include <array>

namespace d2r {

namespace {

// Slicing-by-8 tables of the reflected polynomial 0xEDB88320 (zlib's CRC-32).
struct CrcTables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}

// Elias-Fano parameters of a block of m + 1 slots: x_i = s_i - s_0 - i for i = 1..m, U = x_m,
// low bits l = floor(log2(U / m)) (0 when U < m), high part (U >> l) + m bits.
struct EfParams {
  int low_bits = 0;
  int high_bytes = 0;
};

inline EfParams ef_params(const uint32_t* s, int64_t n) {
  EfParams p;
  const int64_t m = n - 1;
  if (m <= 0) return p;
  const uint64_t u = static_cast<uint64_t>(s[m]) - s[0] - static_cast<uint64_t>(m);
  p.low_bits = u >= static_cast<uint64_t>(m) ? bits_for(u / static_cast<uint64_t>(m)) - 1 : 0;
  p.high_bytes = static_cast<int>(((u >> p.low_bits) + static_cast<uint64_t>(m) + 7) / 8);
  return p;
}

inline size_t block_bytes(int64_t n, const EfParams& p, int code_bytes) {
  return kBlockHeader + (static_cast<size_t>(n - 1) * p.low_bits + 7) / 8 + static_cast<size_t>(p.high_bytes) +
         static_cast<size_t>(n) * code_bytes;
}

}  // namespace

uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc) {
  const auto& t = crc_tables().t;
  uint32_t c = ~crc;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;  // little endian, as the tables assume (x86-64, aarch64)
    c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][hi & 0xFF] ^
        t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return ~c;
}

size_t encoded_bytes(const uint32_t* slots, int64_t n, int code_bytes) {
  size_t total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min<int64_t>(kBlock, n - b);
    total += block_bytes(m, ef_params(slots + b, m), code_bytes);
  }
  return total;
}

size_t encode_list(const uint32_t* slots, const uint8_t* codes, int64_t n, int code_bytes, uint8_t* out) {
  uint8_t* o = out;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t n_b = std::min<int64_t>(kBlock, n - b);
    const uint32_t* s = slots + b;
    const EfParams ef = ef_params(s, n_b);
    const int l = ef.low_bits;
    std::memcpy(o, &s[0], 4);
    o[4] = static_cast<uint8_t>(n_b - 1);
    o[5] = static_cast<uint8_t>(l);
    o[6] = static_cast<uint8_t>(ef.high_bytes);
    o += kBlockHeader;
    const size_t low_bytes = (static_cast<size_t>(n_b - 1) * l + 7) / 8;
    std::memset(o, 0, low_bytes + static_cast<size_t>(ef.high_bytes));
    uint64_t buf = 0;
    int have = 0;
    uint8_t* q = o;
    uint8_t* high = o + low_bytes;
    for (int64_t i = 1; i < n_b; ++i) {
      const uint64_t x = static_cast<uint64_t>(s[i]) - s[0] - static_cast<uint64_t>(i);
      if (l > 0) {
        buf |= (x & ((uint64_t{1} << l) - 1)) << have;
        have += l;
        while (have >= 8) {
          *q++ = static_cast<uint8_t>(buf);
          buf >>= 8;
          have -= 8;
        }
      }
      const uint64_t pos = (x >> l) + static_cast<uint64_t>(i - 1);
      high[pos / 8] |= static_cast<uint8_t>(1u << (pos % 8));
    }
    if (have > 0) *q++ = static_cast<uint8_t>(buf);
    o += low_bytes + static_cast<size_t>(ef.high_bytes);
    const size_t cbytes = static_cast<size_t>(n_b) * code_bytes;
    std::memcpy(o, codes + static_cast<size_t>(b) * code_bytes, cbytes);
    o += cbytes;
  }
  return static_cast<size_t>(o - out);
}

}  // namespace d2r
