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

// The Rice parameter of a block (slots s[0..n)) and its unary bytes: the cheapest k around log2 of
// the mean v_i = s_i - s_{i-1} - 1 (cost (n - 1)(k + 1) + sum(v_i >> k) bits).
struct RiceParams {
  int k = 0;
  int unary_bytes = 0;
};

inline RiceParams rice_params(const uint32_t* s, int64_t n) {
  RiceParams best;
  const int64_t m = n - 1;
  if (m <= 0) return best;
  const uint64_t sum = static_cast<uint64_t>(s[m]) - s[0] - static_cast<uint64_t>(m);
  const int k0 = std::max(0, bits_for(sum / static_cast<uint64_t>(m)) - 1);
  uint64_t best_bits = ~uint64_t{0};
  for (int k = std::max(0, k0 - 1); k <= std::min(31, k0 + 1); ++k) {
    uint64_t unary = static_cast<uint64_t>(m);
    for (int64_t i = 1; i <= m; ++i) unary += (static_cast<uint64_t>(s[i] - s[i - 1] - 1)) >> k;
    const uint64_t bits = static_cast<uint64_t>(m) * k + unary;
    if (bits < best_bits && (unary + 7) / 8 <= 0xFFFF) {
      best_bits = bits;
      best.k = k;
      best.unary_bytes = static_cast<int>((unary + 7) / 8);
    }
  }
  return best;
}

inline size_t block_bytes(int64_t n, const RiceParams& p, int code_bytes) {
  return kBlockHeader + (static_cast<size_t>(n - 1) * p.k + 7) / 8 + static_cast<size_t>(p.unary_bytes) +
         static_cast<size_t>(n) * code_bytes;
}

inline size_t varint_bytes(uint64_t v) {
  size_t b = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++b;
  }
  return b;
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
  if (n == 0) return 0;
  size_t total = varint_bytes(static_cast<uint64_t>(n));
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min<int64_t>(kBlock, n - b);
    total += block_bytes(m, rice_params(slots + b, m), code_bytes);
  }
  return total;
}

size_t encode_list(const uint32_t* slots, const uint8_t* codes, int64_t n, int code_bytes, uint8_t* out) {
  uint8_t* o = out;
  if (n == 0) return 0;
  for (uint64_t v = static_cast<uint64_t>(n);; v >>= 7) {
    *o++ = static_cast<uint8_t>((v & 0x7F) | (v >= 0x80 ? 0x80 : 0));
    if (v < 0x80) break;
  }
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t n_b = std::min<int64_t>(kBlock, n - b);
    const uint32_t* s = slots + b;
    const RiceParams rp = rice_params(s, n_b);
    const int k = rp.k;
    std::memcpy(o, &s[0], 4);
    o[4] = static_cast<uint8_t>(k);
    o[5] = static_cast<uint8_t>(rp.unary_bytes & 0xFF);
    o[6] = static_cast<uint8_t>(rp.unary_bytes >> 8);
    o += kBlockHeader;
    const size_t low_bytes = (static_cast<size_t>(n_b - 1) * k + 7) / 8;
    std::memset(o, 0, low_bytes + static_cast<size_t>(rp.unary_bytes));
    uint64_t buf = 0;
    int have = 0;
    uint8_t* q = o;
    uint8_t* unary = o + low_bytes;
    uint64_t pos = 0;
    for (int64_t i = 1; i < n_b; ++i) {
      const uint64_t v = static_cast<uint64_t>(s[i] - s[i - 1] - 1);
      if (k > 0) {
        buf |= (v & ((uint64_t{1} << k) - 1)) << have;
        have += k;
        while (have >= 8) {
          *q++ = static_cast<uint8_t>(buf);
          buf >>= 8;
          have -= 8;
        }
      }
      pos += v >> k;  // that many zeros, then a one
      unary[pos / 8] |= static_cast<uint8_t>(1u << (pos % 8));
      ++pos;
    }
    if (have > 0) *q++ = static_cast<uint8_t>(buf);
    o += low_bytes + static_cast<size_t>(rp.unary_bytes);
    const size_t cbytes = static_cast<size_t>(n_b) * code_bytes;
    std::memcpy(o, codes + static_cast<size_t>(b) * code_bytes, cbytes);
    o += cbytes;
  }
  return static_cast<size_t>(o - out);
}

}  // namespace d2r
