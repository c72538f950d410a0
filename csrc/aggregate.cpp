#include "aggregate.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "binarize.h"
#include "common.h"
#include "parallel.h"
#include "simd.h"

namespace d2r {
namespace {

constexpr double kWordThreshold = 1e-6;  // a word is kept when ||v[k]|| > 1e-6
constexpr double kNormFloor = 1e-12;     // l2n(v) = v / sqrt(max(||v||^2, 1e-12))
constexpr size_t kPrefetch = 8;          // descriptors fetched ahead in residual_sums

// Residual sums per word of one region: words ascending, sums (n_words_in_region x dim, double).
struct WordSums {
  std::vector<int32_t> words;
  std::vector<double> sums;
  std::vector<uint64_t> keys;  // scratch
  size_t size() const { return words.size(); }
  const double* row(size_t i, int dim) const { return sums.data() + i * dim; }
};

void residual_sums(const AggInput& in, const RegionLayout& lay, int64_t region, WordSums& ws) {
  const int64_t b = lay.region_members[region], e = lay.region_members[region + 1];
  const int dim = in.dim, m = in.m;
  ws.keys.clear();
  ws.words.clear();
  ws.sums.clear();
  for (int64_t j = b; j < e; ++j) {
    const int64_t d = lay.members ? lay.members[j] : j;
    for (int a = 0; a < m; ++a) {
      const uint64_t w = static_cast<uint32_t>(in.assign[d * m + a]);
      ws.keys.push_back((w << 32) | static_cast<uint64_t>(j - b));
    }
  }
  std::sort(ws.keys.begin(), ws.keys.end());
  for (size_t i = 0; i < ws.keys.size();) {
    const int32_t w = static_cast<int32_t>(ws.keys[i] >> 32);
    const float* c = in.centroids + static_cast<int64_t>(w) * dim;
    ws.words.push_back(w);
    ws.sums.resize(ws.words.size() * dim, 0.0);
    double* v = ws.sums.data() + (ws.words.size() - 1) * dim;
    for (; i < ws.keys.size() && static_cast<int32_t>(ws.keys[i] >> 32) == w; ++i) {
      if (i + kPrefetch < ws.keys.size()) {
        // The descriptors are visited in word order (scattered): fetch ahead the row and centroid.
        const uint64_t key = ws.keys[i + kPrefetch];
        const int64_t jn = b + static_cast<int64_t>(key & 0xffffffffu);
        const char* xn = reinterpret_cast<const char*>(in.x + (lay.members ? lay.members[jn] : jn) * dim);
        const char* cn = reinterpret_cast<const char*>(in.centroids + static_cast<int64_t>(key >> 32) * dim);
        for (int o = 0; o < dim * 4; o += 64) {
          __builtin_prefetch(xn + o);
          __builtin_prefetch(cn + o);
        }
      }
      const int64_t j = b + static_cast<int64_t>(ws.keys[i] & 0xffffffffu);
      const float* xr = in.x + (lay.members ? lay.members[j] : j) * dim;
      for (int t = 0; t < dim; ++t) v[t] += static_cast<double>(xr[t]) - static_cast<double>(c[t]);
    }
  }
}

// sum_squares (reduce.h) at the active SIMD level: fused multiply-adds inline where the CPU has them.
double squared_norm(const double* v, int dim) { return simd::kernels().sum_squares(v, dim); }

double total_squared_norm(const WordSums& ws, int dim) {
  double s = 0.0;
  for (size_t i = 0; i < ws.size(); ++i) s += squared_norm(ws.row(i, dim), dim);
  return s;
}

// One image's words and codes: float codes, or (binary) packed sign bits only.
struct ImageCodes {
  bool binary = false;
  int dim = 0;
  std::vector<int32_t> words;
  std::vector<float> codes;   // float kernels
  std::vector<uint8_t> bits;  // binary kernels
  std::vector<float> scratch;

  void reset(bool bin, int d) {
    binary = bin;
    dim = d;
    words.clear();
    codes.clear();
    bits.clear();
    scratch.resize(d);
  }
  // Appends word w; returns where its dim float code values go (packed later when binary).
  float* emit(int32_t w) {
    words.push_back(w);
    if (binary) return scratch.data();
    codes.resize(codes.size() + dim);
    return codes.data() + codes.size() - dim;
  }
  void finish_word() {
    if (!binary) return;
    const int nb = packed_bytes(dim);
    bits.resize(bits.size() + nb);
    pack_signs(scratch.data(), dim, bits.data() + bits.size() - nb);
  }
  void emit_unit(int32_t w, const double* v, double ss) {
    const double inv = 1.0 / std::sqrt(std::max(ss, kNormFloor));  // l2n as v * (1 / norm)
    float* c = emit(w);
    for (int t = 0; t < dim; ++t) c[t] = static_cast<float>(v[t] * inv);
    finish_word();
  }
};

// Sum of weighted per-region vectors, per word, regions in ascending order.
struct WordAccumulator {
  std::vector<std::pair<int32_t, int64_t>> entries;  // (word, row in rows)
  std::vector<double> rows;
  void add(int32_t w, const double* v, double scale, int dim) {
    entries.emplace_back(w, static_cast<int64_t>(entries.size()));
    for (int t = 0; t < dim; ++t) rows.push_back(v[t] * scale);
  }
  // Calls f(word, summed vector) for each word ascending.
  template <class F>
  void reduce(int dim, std::vector<double>& acc, F f) {
    std::stable_sort(entries.begin(), entries.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    acc.assign(dim, 0.0);
    for (size_t i = 0; i < entries.size();) {
      const int32_t w = entries[i].first;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (; i < entries.size() && entries[i].first == w; ++i) {
        const double* r = rows.data() + entries[i].second * dim;
        for (int t = 0; t < dim; ++t) acc[t] += r[t];
      }
      f(w, acc.data());
    }
  }
};

void aggregate_image(const AggInput& in, const RegionLayout& lay, int64_t img, AggKind kind,
                     WordSums& ws, ImageCodes& out) {
  const int dim = in.dim;
  const int64_t r0 = lay.image_regions[img], r1 = lay.image_regions[img + 1];
  const int64_t n_regions = r1 - r0;
  if (n_regions == 0) return;
  if (kind == AggKind::kAsmk && n_regions == 1) {
    // ASMK: per-word l2n of the residual sum.
    residual_sums(in, lay, r0, ws);
    for (size_t i = 0; i < ws.size(); ++i) {
      const double ss = squared_norm(ws.row(i, dim), dim);
      if (std::sqrt(ss) > kWordThreshold) out.emit_unit(ws.words[i], ws.row(i, dim), ss);
    }
    return;
  }
  WordAccumulator accum;
  std::vector<double> acc;
  for (int64_t r = r0; r < r1; ++r) {
    residual_sums(in, lay, r, ws);
    if (kind == AggKind::kAsmk) {
      // R-ASMK: the region's whole VLAD is l2-normalised, then divided by R.
      const double scale = 1.0 / std::sqrt(std::max(total_squared_norm(ws, dim), kNormFloor)) /
                           static_cast<double>(n_regions);
      for (size_t i = 0; i < ws.size(); ++i) accum.add(ws.words[i], ws.row(i, dim), scale, dim);
    } else {
      // Naive-R-ASMK: the region's ASMK codes weighted by gamma_r = |W_r|^-1/2.
      std::vector<size_t> kept;
      std::vector<double> norms;
      for (size_t i = 0; i < ws.size(); ++i) {
        const double ss = squared_norm(ws.row(i, dim), dim);
        if (std::sqrt(ss) > kWordThreshold) {
          kept.push_back(i);
          norms.push_back(std::sqrt(std::max(ss, kNormFloor)));
        }
      }
      if (kept.empty()) continue;
      const double gamma = 1.0 / std::sqrt(static_cast<double>(kept.size()));
      for (size_t j = 0; j < kept.size(); ++j) {
        // gamma_r * l2n(v_r[k]), with the code rounded to float as a stored ASMK code would be.
        const double* v = ws.row(kept[j], dim);
        std::vector<double> unit(dim);
        for (int t = 0; t < dim; ++t) unit[t] = static_cast<double>(static_cast<float>(v[t] / norms[j]));
        accum.add(ws.words[kept[j]], unit.data(), gamma, dim);
      }
    }
  }
  if (kind == AggKind::kAsmk) {
    accum.reduce(dim, acc, [&](int32_t w, const double* u) {
      const double ss = squared_norm(u, dim);
      if (std::sqrt(ss) > kWordThreshold) out.emit_unit(w, u, ss);
    });
  } else {
    accum.reduce(dim, acc, [&](int32_t w, const double* u) {
      float* c = out.emit(w);
      for (int t = 0; t < dim; ++t) c[t] = static_cast<float>(u[t]);
      out.finish_word();
    });
  }
}

// ASMK of one single-region image with the work split across threads by word (used when a call
// holds fewer images than threads, e.g. one query): the same sums in the same order as residual_sums,
// so the result is identical to the serial path.
void aggregate_one_parallel(const AggInput& in, const RegionLayout& lay, int64_t img, ImageCodes& out) {
  const int dim = in.dim, m = in.m;
  const int64_t region = lay.image_regions[img];
  const int64_t b = lay.region_members[region], e = lay.region_members[region + 1];
  std::vector<uint64_t> keys;
  keys.reserve((e - b) * m);
  for (int64_t j = b; j < e; ++j) {
    const int64_t d = lay.members ? lay.members[j] : j;
    for (int a = 0; a < m; ++a)
      keys.push_back((static_cast<uint64_t>(static_cast<uint32_t>(in.assign[d * m + a])) << 32) |
                     static_cast<uint64_t>(j - b));
  }
  std::sort(keys.begin(), keys.end());
  std::vector<size_t> run_start;
  for (size_t i = 0; i < keys.size(); ++i)
    if (i == 0 || (keys[i] >> 32) != (keys[i - 1] >> 32)) run_start.push_back(i);
  const int64_t n_runs = static_cast<int64_t>(run_start.size());
  run_start.push_back(keys.size());
  std::vector<double> sums(static_cast<size_t>(n_runs) * dim, 0.0);
  std::vector<double> ss(n_runs, 0.0);
  parallel_for(n_runs, 8, [&](int64_t r) {
    const int32_t w = static_cast<int32_t>(keys[run_start[r]] >> 32);
    const float* c = in.centroids + static_cast<int64_t>(w) * dim;
    double* v = sums.data() + r * dim;
    for (size_t i = run_start[r]; i < run_start[r + 1]; ++i) {
      const int64_t j = b + static_cast<int64_t>(keys[i] & 0xffffffffu);
      const float* xr = in.x + (lay.members ? lay.members[j] : j) * dim;
      for (int t = 0; t < dim; ++t) v[t] += static_cast<double>(xr[t]) - static_cast<double>(c[t]);
    }
    ss[r] = squared_norm(v, dim);
  });
  for (int64_t r = 0; r < n_runs; ++r)
    if (std::sqrt(ss[r]) > kWordThreshold)
      out.emit_unit(static_cast<int32_t>(keys[run_start[r]] >> 32), sums.data() + r * dim, ss[r]);
}

void check_layout(const AggInput& in, const RegionLayout& lay) {
  D2R_CHECK(in.dim > 0, "descriptor dimension must be positive");
  D2R_CHECK(in.m >= 1, "multiple assignment m must be >= 1");
  D2R_CHECK(lay.n_images >= 0, "negative number of images");
  D2R_CHECK(lay.image_regions[0] == 0, "image region offsets must start at 0");
  for (int64_t i = 0; i < lay.n_images; ++i)
    D2R_CHECK(lay.image_regions[i + 1] >= lay.image_regions[i], "image region offsets must be non-decreasing");
  const int64_t n_regions = lay.image_regions[lay.n_images];
  D2R_CHECK(lay.region_members[0] == 0, "region offsets must start at 0");
  for (int64_t r = 0; r < n_regions; ++r) {
    D2R_CHECK(lay.region_members[r + 1] >= lay.region_members[r], "region offsets must be non-decreasing");
    D2R_CHECK(lay.region_members[r + 1] - lay.region_members[r] <= 0xffffffffLL, "region too large");
  }
  const int64_t n_members = lay.region_members[n_regions];
  if (lay.members) {
    for (int64_t j = 0; j < n_members; ++j)
      D2R_CHECK(lay.members[j] >= 0 && lay.members[j] < in.n_desc, "region member index out of range");
  } else {
    D2R_CHECK(n_members <= in.n_desc, "region offsets exceed the number of descriptors");
  }
  check_assignments(in);
}

}  // namespace

void check_assignments(const AggInput& in) {
  for (int64_t i = 0; i < in.n_desc * in.m; ++i)
    D2R_CHECK(in.assign[i] >= 0 && in.assign[i] < in.n_words, "word assignment out of range [0, n_words)");
}

void aggregate(const AggInput& in, const RegionLayout& lay, AggKind kind, bool binary, Aggregated* out) {
  check_layout(in, lay);
  D2R_CHECK(!(binary && kind == AggKind::kNaiveRegional), "Naive-R-ASMK has float codes only");
  const int dim = in.dim;
  const int n_bytes = packed_bytes(dim);
  const int64_t n_img = lay.n_images;
  std::vector<ImageCodes> per_image(n_img);
  // A choice of strategy only (both give the same result): with fewer images than threads (a
  // query), each image's words are split across the threads instead.
  if (n_img < num_threads()) {
    WordSums ws;
    for (int64_t i = 0; i < n_img; ++i) {
      per_image[i].reset(binary, dim);
      if (kind == AggKind::kAsmk && lay.image_regions[i + 1] - lay.image_regions[i] == 1)
        aggregate_one_parallel(in, lay, i, per_image[i]);
      else
        aggregate_image(in, lay, i, kind, ws, per_image[i]);
    }
  } else {
    ParallelErrors errors;
#pragma omp parallel
    {
      WordSums ws;  // per-thread scratch: empty here, grown inside errors.run
#pragma omp for schedule(dynamic, 16)
      for (int64_t i = 0; i < n_img; ++i) {
        errors.run([&] {
          per_image[i].reset(binary, dim);
          aggregate_image(in, lay, i, kind, ws, per_image[i]);
        });
      }
    }
    errors.rethrow();
  }
  out->word_offsets.assign(n_img + 1, 0);
  for (int64_t i = 0; i < n_img; ++i)
    out->word_offsets[i + 1] = out->word_offsets[i] + static_cast<int64_t>(per_image[i].words.size());
  const int64_t total = out->word_offsets[n_img];
  out->words.resize(total);
  out->codes.clear();
  out->bits.clear();
  if (binary) out->bits.resize(total * n_bytes);
  else out->codes.resize(total * dim);
  parallel_for(n_img, 64, [&](int64_t i) {
    ImageCodes& ic = per_image[i];
    const int64_t o = out->word_offsets[i];
    std::copy(ic.words.begin(), ic.words.end(), out->words.begin() + o);
    if (binary) std::copy(ic.bits.begin(), ic.bits.end(), out->bits.begin() + o * n_bytes);
    else std::copy(ic.codes.begin(), ic.codes.end(), out->codes.begin() + o * dim);
    ic = ImageCodes();  // free this image's buffers
  });
}

void vlad(const AggInput& in, const RegionLayout& lay, bool l2, float* out) {
  check_layout(in, lay);
  const int dim = in.dim;
  const int64_t len = in.n_words * dim;
  ParallelErrors errors;
#pragma omp parallel
  {
    // Per-thread scratch: empty here, grown inside errors.run.
    WordSums ws;
    std::vector<double> dense;
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < lay.n_images; ++i) {
      errors.run([&] {
        dense.assign(len, 0.0);
        const int64_t r0 = lay.image_regions[i], r1 = lay.image_regions[i + 1];
        const int64_t n_regions = r1 - r0;
        for (int64_t r = r0; r < r1; ++r) {
          residual_sums(in, lay, r, ws);
          const double scale =
              n_regions > 1 ? 1.0 / std::sqrt(std::max(total_squared_norm(ws, dim), kNormFloor)) / n_regions : 1.0;
          for (size_t k = 0; k < ws.size(); ++k) {
            double* dst = dense.data() + static_cast<int64_t>(ws.words[k]) * dim;
            const double* v = ws.row(k, dim);
            for (int t = 0; t < dim; ++t) dst[t] += v[t] * scale;
          }
        }
        double scale = 1.0;
        if (l2) {
          double ss = 0.0;
          for (double v : dense) ss += v * v;
          scale = 1.0 / std::sqrt(std::max(ss, kNormFloor));
        }
        float* o = out + i * len;
        for (int64_t t = 0; t < len; ++t) o[t] = static_cast<float>(dense[t] * scale);
      });
    }
  }
  errors.rethrow();
}

}  // namespace d2r
