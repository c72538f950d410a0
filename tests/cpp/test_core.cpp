// C++ unit tests of the d2r core (no Python). Built with -DD2R_BUILD_TESTS=ON and run by CI under
// AddressSanitizer + UBSan. Prints "N passed, M failed".
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "aggregate.h"
#include "binarize.h"
#include "common.h"
#include "fixed_point.h"
#include "reduce.h"
#include "ivf.h"
#include "parallel.h"
#include "postings.h"
#include "scan.h"
#include "quantize.h"
#include "ransac.h"
#include "selectivity.h"
#include "simd.h"
#include "kernels.h"
#include "map_guard.h"
#include "topk.h"

#if defined(__linux__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

using namespace d2r;

static int g_pass = 0, g_fail = 0;
#define EXPECT(cond)                                                     \
  do {                                                                   \
    if (cond) {                                                          \
      ++g_pass;                                                          \
    } else {                                                             \
      ++g_fail;                                                          \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
    }                                                                    \
  } while (0)
#define EXPECT_NEAR(a, b, tol) EXPECT(std::fabs((a) - (b)) <= (tol))

static const float kCodebook[] = {.5f, .5f, 0, 0, 1, 0, -.5f, -.5f, 0, 1};
static const float kFeatures[] = {1, 0, -1, 0, 1, 2, 0, 2};

static void test_quantize_golden() {
  Quantizer q(kCodebook, 5, 2);
  std::vector<int32_t> ids(4 * 3);
  std::vector<float> d(4 * 3);
  q.search(kFeatures, 4, 3, ids.data(), d.data());
  EXPECT(ids[0] == 2 && ids[1] == 0 && ids[2] == 1);  // [1,0]: dist 0, .5, 1
  EXPECT_NEAR(d[0], 0.0f, 1e-7);
  EXPECT(ids[3] == 3 && ids[4] == 1);                 // [-1,0]: word 3 (.5) then word 1 (1)
  EXPECT(ids[6] == 4);                                // [1,2] -> word 4
}

// A Gaussian codebook (C x D) and descriptors (n x D) drawn from `seed`, and the descriptors' m
// nearest words by the quantizer.
struct Quantized {
  std::vector<float> cb, x;
  std::vector<int32_t> ids;
  std::vector<float> dist;
};

static Quantized random_quantized(unsigned seed, int C, int D, int n, int m) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g;
  Quantized r{std::vector<float>(C * D), std::vector<float>(n * D), std::vector<int32_t>(n * m),
              std::vector<float>(n * m)};
  for (auto& v : r.cb) v = g(rng);
  for (auto& v : r.x) v = g(rng);
  Quantizer(r.cb.data(), C, D).search(r.x.data(), n, m, r.ids.data(), r.dist.data());
  return r;
}

static void test_quantize_random() {
  const int C = 300, D = 37, n = 101, m = 4;
  const Quantized r = random_quantized(1, C, D, n, m);
  const std::vector<float>&cb = r.cb, &x = r.x;
  const std::vector<int32_t>& ids = r.ids;
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    std::vector<std::pair<double, int>> all;
    for (int c = 0; c < C; ++c) {
      double s = 0;
      for (int t = 0; t < D; ++t) {
        double diff = double(x[i * D + t]) - cb[c * D + t];
        s += diff * diff;
      }
      all.push_back({s, c});
    }
    std::sort(all.begin(), all.end());
    for (int j = 0; j < m; ++j) bad += all[j].second != ids[i * m + j];
  }
  EXPECT(bad == 0);
}

static void test_aggregate_golden() {
  std::vector<int32_t> assign(4);
  Quantizer q(kCodebook, 5, 2);
  std::vector<float> dist(4);
  q.search(kFeatures, 4, 1, assign.data(), dist.data());
  AggInput in;
  in.x = kFeatures;
  in.n_desc = 4;
  in.assign = assign.data();
  in.m = 1;
  in.centroids = kCodebook;
  in.n_words = 5;
  in.dim = 2;
  // ASMK of the first three features
  int64_t img[] = {0, 1}, reg[] = {0, 3};
  RegionLayout lay{img, 1, reg, nullptr};
  Aggregated out;
  aggregate(in, lay, AggKind::kAsmk, false, &out);
  EXPECT(out.words.size() == 2 && out.words[0] == 3 && out.words[1] == 4);
  EXPECT_NEAR(out.codes[0], -0.707107f, 1e-5);
  EXPECT_NEAR(out.codes[3], 0.707107f, 1e-5);
  aggregate(in, lay, AggKind::kAsmk, true, &out);
  EXPECT(out.bits.size() == 2 && out.bits[0] == 64 && out.bits[1] == 192);
  // R-ASMK, regions [3, 1]
  int64_t reg2[] = {0, 3, 4}, img2[] = {0, 2};
  RegionLayout lay2{img2, 1, reg2, nullptr};
  aggregate(in, lay2, AggKind::kAsmk, false, &out);
  EXPECT(out.words.size() == 2);
  EXPECT_NEAR(out.codes[2], 0.361261f, 1e-5);
  EXPECT_NEAR(out.codes[3], 0.932465f, 1e-5);
  aggregate(in, lay2, AggKind::kNaiveRegional, false, &out);
  EXPECT_NEAR(out.codes[0], -0.5f, 1e-5);
  EXPECT_NEAR(out.codes[3], 1.5f, 1e-5);
  // R-VLAD, regions [0, 3, 0, 1] (members given explicitly), no l2
  int64_t reg4[] = {0, 0, 3, 3, 4}, img4[] = {0, 4}, mem[] = {0, 1, 2, 3};
  RegionLayout lay4{img4, 1, reg4, mem};
  std::vector<float> v(10);
  vlad(in, lay4, false, v.data());
  EXPECT_NEAR(v[6], -0.079057f, 1e-5);
  EXPECT_NEAR(v[9], 0.408114f, 1e-5);
  // out-of-range assignment is rejected
  std::vector<int32_t> badassign = {0, 1, 7, 2};
  in.assign = badassign.data();
  bool threw = false;
  try {
    aggregate(in, lay, AggKind::kAsmk, false, &out);
  } catch (const InvalidArgument&) {
    threw = true;
  }
  EXPECT(threw);
}

static void test_similarity_golden() {
  // ASMK* case of METHOD.md: D = 2, one byte per word, with gamma: 0.258199
  InvertedFile ivf(5, 2, true);
  int64_t yoff[] = {0, 3};
  int32_t yw[] = {1, 2, 4};
  uint8_t yc[] = {1, 2, 3};
  int64_t yid = 7;
  ivf.add(CodesView{1, yoff, yw, yc}, &yid);
  int64_t xoff[] = {0, 5};
  int32_t xw[] = {0, 1, 2, 3, 4};
  uint8_t xc[] = {0, 0, 3, 3, 3};
  TopK r = ivf.search(CodesView{1, xoff, xw, xc}, 1, ScoreParams{3.0f, 0.0f, true});
  EXPECT(r.n_queries == 1 && r.k == 1);
  EXPECT_NEAR(r.scores[0], 0.258199f, 1e-5);
  EXPECT(r.ids[0] == 7);
  // ASMK float case: 0.478554 without gamma
  InvertedFile f(5, 2, false);
  float ycodes[] = {0, 1, 1, 0, 0.707107f, 0.707107f};
  f.add(CodesView{1, yoff, yw, reinterpret_cast<uint8_t*>(ycodes)}, &yid);
  float xcodes[] = {0, 0, -0.707107f, -0.707107f, 0.5f, 0.866025f, 0.816497f, 0.577350f, 1, 0};
  r = f.search(CodesView{1, xoff, xw, reinterpret_cast<uint8_t*>(xcodes)}, 1, ScoreParams{3.0f, 0.0f, false});
  EXPECT_NEAR(r.scores[0], 0.478554f, 1e-5);
  r = f.search(CodesView{1, xoff, xw, reinterpret_cast<uint8_t*>(xcodes)}, 1, ScoreParams{3.0f, 0.0f, true});
  EXPECT_NEAR(r.scores[0], 0.123562f, 1e-5);
}

static void test_ivf_add_remove() {
  std::mt19937 rng(3);
  const int C = 50, nb = 16, n_img = 40;
  auto make = [&](int64_t n, std::vector<int64_t>& off, std::vector<int32_t>& words, std::vector<uint8_t>& codes) {
    off.assign(1, 0);
    words.clear();
    codes.clear();
    for (int64_t i = 0; i < n; ++i) {
      int cnt = 0;
      for (int w = 0; w < C; ++w)
        if (rng() % 3 == 0) {
          words.push_back(w);
          for (int b = 0; b < nb; ++b) codes.push_back(static_cast<uint8_t>(rng()));
          ++cnt;
        }
      off.push_back(off.back() + cnt);
    }
  };
  std::vector<int64_t> off, qoff;
  std::vector<int32_t> words, qw;
  std::vector<uint8_t> codes, qc;
  make(n_img, off, words, codes);
  make(3, qoff, qw, qc);
  std::vector<int64_t> ids(n_img);
  for (int i = 0; i < n_img; ++i) ids[i] = 1000 + i;
  // incremental: add in 4 batches, remove the even ids; fresh: add only the odd ones
  InvertedFile inc(C, 128, true), fresh(C, 128, true);
  for (int b = 0; b < 4; ++b) {
    const int s = b * 10;
    std::vector<int64_t> o(off.begin() + s, off.begin() + s + 11);
    for (auto& v : o) v -= off[s];
    inc.add(CodesView{10, o.data(), words.data() + off[s], codes.data() + off[s] * nb}, ids.data() + s);
  }
  std::vector<int64_t> even;
  for (int i = 0; i < n_img; i += 2) even.push_back(ids[i]);
  EXPECT(inc.remove(static_cast<int64_t>(even.size()), even.data()) == 20);
  std::vector<int64_t> fo(1, 0), fid;
  std::vector<int32_t> fw;
  std::vector<uint8_t> fc;
  for (int i = 1; i < n_img; i += 2) {
    fw.insert(fw.end(), words.begin() + off[i], words.begin() + off[i + 1]);
    fc.insert(fc.end(), codes.begin() + off[i] * nb, codes.begin() + off[i + 1] * nb);
    fo.push_back(fo.back() + off[i + 1] - off[i]);
    fid.push_back(ids[i]);
  }
  fresh.add(CodesView{20, fo.data(), fw.data(), fc.data()}, fid.data());
  EXPECT(inc.n_images() == 20 && fresh.n_images() == 20);
  EXPECT(inc.n_entries() == fresh.n_entries());
  ScoreParams p;
  TopK r1 = inc.search(CodesView{3, qoff.data(), qw.data(), qc.data()}, -1, p);
  TopK r2 = fresh.search(CodesView{3, qoff.data(), qw.data(), qc.data()}, -1, p);
  EXPECT(r1.k == 20 && r1.scores == r2.scores && r1.ids == r2.ids);
  // removing an absent id throws and changes nothing
  bool threw = false;
  try {
    inc.remove(1, even.data());
  } catch (const NotFound&) {
    threw = true;
  }
  EXPECT(threw && inc.n_images() == 20);
  // adding a duplicate id throws
  threw = false;
  try {
    inc.add(CodesView{1, fo.data(), fw.data(), fc.data()}, fid.data());
  } catch (const InvalidArgument&) {
    threw = true;
  }
  EXPECT(threw);
}

static void test_topk_ties() {
  const float scores[] = {0.5f, 0.9f, 0.5f, -1.0f, 0.9f};
  const int64_t ids[] = {10, 4, 2, 1, 3};
  float os[5];
  int64_t oi[5];
  topk(scores, ids, 5, 3, os, oi);
  EXPECT(oi[0] == 3 && oi[1] == 4 && oi[2] == 2);
  topk(scores, ids, 5, -1, os, oi);
  EXPECT(oi[3] == 10 && oi[4] == 1);
}

static void test_shared_helpers() {
  EXPECT(selectivity(0.5f, 3.0f, 0.0f) == 0.125f);
  EXPECT(selectivity(-0.5f, 3.0f, -0.6f) == -0.125f);
  EXPECT(selectivity(0.0f, 3.0f, 0.0f) == 0.0f);
  EXPECT(hamming_denominator(2, 1) == 2 && hamming_denominator(128, 16) == 128);
  const float code[] = {1, -1, 0, 2, 3, -4, 5, 6, 7, 0.1f};
  uint8_t out[2];
  pack_signs(code, 10, out);
  EXPECT(out[0] == 0x9B && out[1] == 0xC0);
  const uint8_t a[] = {0xFF, 0, 1, 2, 3, 4, 5, 6, 7, 8};
  const uint8_t b[] = {0, 0, 1, 2, 3, 4, 5, 6, 7, 9};
  EXPECT(hamming(a, b, 10) == 9);
}

// Logic the CUDA kernels share with the CPU path (fixed_point.h, reduce.h).
static void test_fixed_point_and_keys() {
  EXPECT(score_to_fixed(1.0f) == (int64_t{1} << 32));
  EXPECT(score_to_fixed(-0.125f) == -(int64_t{1} << 29));
  EXPECT(score_from_fixed(score_to_fixed(0.3f)) == 0.3f);
  // order independence: the same contributions in any order give the same sum
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> c(1000);
  for (float& v : c) v = u(rng) * u(rng) * u(rng);
  int64_t a = 0, b = 0;
  for (float v : c) a += score_to_fixed(v);
  std::shuffle(c.begin(), c.end(), rng);
  for (float v : c) b += score_to_fixed(v);
  EXPECT(a == b);
  // order keys: strictly monotone, and invertible
  const float vals[] = {-3.5f, -1.0f, -1e-30f, 0.0f, 1e-30f, 0.25f, 1.0f, 7.0f};
  for (int i = 0; i + 1 < 8; ++i) EXPECT(score_order_key(vals[i]) < score_order_key(vals[i + 1]));
  for (float v : vals) EXPECT(score_from_order_key(score_order_key(v)) == v);
  // fixed Hamming table: sigma(1 - 2h/D) in fixed point
  const std::vector<int64_t> t = fixed_hamming_table(128, 16, 3.0f, 0.0f);
  EXPECT(t.size() == 129 && t[0] == (int64_t{1} << 32) && t[64] == 0 && t[128] == 0);
  EXPECT(t[32] == score_to_fixed(0.125f));
  // fixed-order sum of squares over 8 lanes
  double v[11];
  for (int i = 0; i < 11; ++i) v[i] = 0.5 * (i + 1);
  double ref = 0;
  for (int i = 0; i < 11; ++i) ref += v[i] * v[i];
  EXPECT_NEAR(sum_squares(v, 11), ref, 1e-12);
}

static void test_ransac_known_affine() {
  // 60 points mapped by a known affine map, 20 of them replaced by outliers.
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.0f, 500.0f);
  const int n = 60;
  std::vector<float> src(2 * n), dst(2 * n);
  for (int i = 0; i < n; ++i) {
    const float x = u(rng), y = u(rng);
    src[2 * i] = x;
    src[2 * i + 1] = y;
    dst[2 * i] = 0.9f * x - 0.2f * y + 30.0f;
    dst[2 * i + 1] = 0.1f * x + 1.1f * y - 12.0f;
    if (i % 3 == 0) {
      dst[2 * i] = u(rng);
      dst[2 * i + 1] = u(rng);
    }
  }
  float model[6];
  std::vector<uint8_t> mask(n);
  RansacParams p;
  const int inl = affine_ransac(src.data(), dst.data(), n, p, model, mask.data());
  EXPECT(inl >= 40 && inl <= 42);
  EXPECT_NEAR(model[0], 0.9f, 1e-3);
  EXPECT_NEAR(model[2], 30.0f, 0.1f);
  EXPECT_NEAR(model[5], -12.0f, 0.1f);
  int counted = 0;
  for (uint8_t m : mask) counted += m;
  EXPECT(counted == inl);
  // same seed, same answer; fewer than 3 points: no model, no crash
  EXPECT(affine_ransac(src.data(), dst.data(), n, p, nullptr, nullptr) == inl);
  EXPECT(affine_ransac(src.data(), dst.data(), 2, p, model, mask.data()) == 0);
}

static void test_pooled_search_and_many_images() {
  // 3 images of 2 region entries each; max pooling equals the best region, mean the average.
  InvertedFile ivf(4, 16, true, /*multi_entry=*/true);
  const int nb = 2;
  std::vector<int64_t> off = {0, 1, 2, 3, 4, 5, 6};
  std::vector<int32_t> words = {0, 1, 0, 2, 3, 1};
  std::vector<uint8_t> codes = {0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0};
  std::vector<int64_t> entry_ids = {10, 10, 11, 11, 12, 12};  // 3 images of 2 entries each
  ivf.add(CodesView{6, off.data(), words.data(), codes.data()}, entry_ids.data());
  EXPECT(ivf.n_images() == 3 && ivf.n_entries() == 6);
  int64_t qoff[] = {0, 2};
  int32_t qw[] = {0, 1};
  uint8_t qc[] = {0, 0, 0, 0};
  ScoreParams p{3.0f, 0.0f, false};
  TopK pr = ivf.search_pooled(CodesView{1, qoff, qw, qc}, false, -1, p);
  const float* s = pr.scores.data();
  const int64_t* id = pr.ids.data();
  // image 10: regions score 1 (word 0, identical) and 0 (word 1, all bits differ: u = -1 -> 0) -> max 1
  // image 11: word 0 identical -> 1, word 2 not in query -> 0; image 12: word 1 identical -> 1, word 3 -> 0
  EXPECT(s[0] == 1.0f && s[1] == 1.0f && s[2] == 1.0f);
  EXPECT(id[0] == 10 && id[1] == 11 && id[2] == 12);
  pr = ivf.search_pooled(CodesView{1, qoff, qw, qc}, true, 2, p);
  EXPECT(pr.k == 2 && pr.scores[0] == 0.5f && pr.ids[0] == 10 && pr.ids[1] == 11);
  (void)nb;
  // Many images aggregated in one call equal one call per image (the parallel-over-images path
  // against the word-parallel single-image path).
  std::mt19937 rng(9);
  std::normal_distribution<float> g;
  const int C = 40, D = 16, n_img = 7, per = 30;
  std::vector<float> cb(C * D), x(n_img * per * D);
  for (auto& v : cb) v = g(rng);
  for (auto& v : x) v = g(rng);
  Quantizer q(cb.data(), C, D);
  std::vector<int32_t> a(n_img * per * 2);
  std::vector<float> dd(n_img * per * 2);
  q.search(x.data(), n_img * per, 2, a.data(), dd.data());
  AggInput in;
  in.x = x.data();
  in.n_desc = n_img * per;
  in.assign = a.data();
  in.m = 2;
  in.centroids = cb.data();
  in.n_words = C;
  in.dim = D;
  std::vector<int64_t> ir(n_img + 1), ro(n_img + 1);
  for (int i = 0; i <= n_img; ++i) ir[i] = i, ro[i] = i * per;
  Aggregated all;
  aggregate(in, RegionLayout{ir.data(), n_img, ro.data(), nullptr}, AggKind::kAsmk, false, &all);
  bool same = true;
  for (int i = 0; i < n_img; ++i) {
    int64_t ir1[] = {0, 1}, ro1[] = {0, per};
    AggInput one = in;
    one.x = x.data() + i * per * D;
    one.n_desc = per;
    one.assign = a.data() + i * per * 2;
    Aggregated o;
    aggregate(one, RegionLayout{ir1, 1, ro1, nullptr}, AggKind::kAsmk, false, &o);
    const int64_t b = all.word_offsets[i], e = all.word_offsets[i + 1];
    same = same && static_cast<int64_t>(o.words.size()) == e - b;
    for (int64_t k = 0; same && k < e - b; ++k) {
      same = o.words[k] == all.words[b + k];
      for (int t = 0; t < D; ++t) same = same && o.codes[k * D + t] == all.codes[(b + k) * D + t];
    }
  }
  EXPECT(same);
  // Naive-R-ASMK and R-ASMK over overlapping memberships run clean (values checked in Python).
  std::vector<int64_t> mem = {0, 1, 2, 3, 2, 3, 4, 5, 6};
  int64_t img1[] = {0, 3}, reg3[] = {0, 4, 7, 9};
  Aggregated r;
  aggregate(in, RegionLayout{img1, 1, reg3, mem.data()}, AggKind::kAsmk, true, &r);
  EXPECT(!r.words.empty() && r.bits.size() == r.words.size() * 2);
  aggregate(in, RegionLayout{img1, 1, reg3, mem.data()}, AggKind::kNaiveRegional, false, &r);
  EXPECT(!r.words.empty() && r.codes.size() == r.words.size() * D);
}

// parallel.h: an exception thrown in a region body reaches the caller (it must never end the
// process), the remaining iterations are skipped, and parallel_team's T is the team that ran.
static void test_parallel_errors() {
  const int64_t n = 4096;
  std::atomic<int64_t> started{0}, executed{0};
  bool caught = false;
  try {
    parallel_for(n, 1, [&](int64_t) {
      if (started.fetch_add(1) == 0) throw std::runtime_error("body failed");  // the first body run
      // 200 us per body: running all n - 1 others takes about 0.4 s on 2 threads, and reaching n / 4
      // would need the failing thread to be held up for about 0.1 s.
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      executed.fetch_add(1);
    });
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "body failed";
  }
  EXPECT(caught);
  EXPECT(executed.load() < n / 4);  // stopped early (all n - 1 others run when nothing stops them)
  // No exception: every index exactly once.
  std::vector<int> hits(1000, 0);
  parallel_for(1000, 7, [&](int64_t i) { ++hits[i]; });
  EXPECT(std::count(hits.begin(), hits.end(), 1) == 1000);
  // parallel_team: body(t, T) once per thread t of the team obtained, T the same for all.
  auto check_team = [](int* team_out) {
    std::vector<std::atomic<int>> ran(256);
    std::atomic<int> seen_T{-1}, bad{0};
    parallel_team([&](int t, int T) {
      if (T < 1 || T > 256 || t < 0 || t >= T) {
        bad.fetch_add(1);
        return;
      }
      int expected = -1;
      if (!seen_T.compare_exchange_strong(expected, T) && expected != T) bad.fetch_add(1);
      ran[t].fetch_add(1);
    });
    const int T = seen_T.load();
    int once = 0;
    for (int t = 0; t < T; ++t) once += ran[t].load() == 1;
    *team_out = T;
    return bad.load() == 0 && T >= 1 && once == T;
  };
  int T_top = 0;
  EXPECT(check_team(&T_top));
  // Called from inside a region (a nested team: usually 1 thread, not num_threads()).
  std::vector<int> nested_ok(2, 1), nested_T(2, 0);
#pragma omp parallel num_threads(2)
  {
    const int t = thread_id();
    if (t < 2) nested_ok[t] = check_team(&nested_T[t]);
  }
  EXPECT(nested_ok[0] && nested_ok[1]);
  // A rethrown exception from parallel_team; the failing thread's T is what it was given.
  bool team_caught = false;
  try {
    parallel_team([&](int t, int) {
      if (t == 0) throw std::length_error("team failed");
    });
  } catch (const std::length_error&) {
    team_caught = true;
  }
  EXPECT(team_caught);
}

// The core's regions: a failure inside one is rethrown on the caller; results computed from inside
// an enclosing parallel region (a smaller team than num_threads()) equal the top-level ones.
static void test_core_regions_errors_and_teams() {
  // vlad: a codebook of 2^55 words of dim 64 asks for a dense vector of 2^61 doubles, beyond
  // vector::max_size: std::length_error inside the region (it ended the process through
  // std::terminate before ParallelErrors). Only words 0..1 are read, so 2 centroids suffice.
  {
    const int D = 64;
    std::vector<float> x(4 * D, 1.0f), cb(2 * D, 0.0f);
    std::vector<int32_t> assign = {0, 1, 0, 1};
    AggInput in;
    in.x = x.data();
    in.n_desc = 4;
    in.assign = assign.data();
    in.m = 1;
    in.centroids = cb.data();
    in.n_words = int64_t(1) << 55;
    in.dim = D;
    int64_t img[] = {0, 1, 2}, reg[] = {0, 2, 4};
    float out[1];
    bool caught = false;
    try {
      vlad(in, RegionLayout{img, 2, reg, nullptr}, true, out);
    } catch (const std::length_error&) {
      caught = true;
    }
    EXPECT(caught);
  }
  const int C = 200, D = 24, n = 700, m = 2;
  const Quantized r = random_quantized(11, C, D, n, m);
  const std::vector<float>&cb = r.cb, &x = r.x, &dist = r.dist;
  const std::vector<int32_t>& ids = r.ids;
  Quantizer q(cb.data(), C, D);
  // 70 images of 10 descriptors (images split over the threads), and one image of all n (its
  // words split over the threads).
  std::vector<int64_t> img(n / 10 + 1), reg(n / 10 + 1);
  for (size_t i = 0; i < img.size(); ++i) {
    img[i] = static_cast<int64_t>(i);
    reg[i] = 10 * static_cast<int64_t>(i);
  }
  int64_t img1[] = {0, 1}, reg1[] = {0, n};
  AggInput in;
  in.x = x.data();
  in.n_desc = n;
  in.assign = ids.data();
  in.m = m;
  in.centroids = cb.data();
  in.n_words = C;
  in.dim = D;
  const RegionLayout lay{img.data(), static_cast<int64_t>(img.size()) - 1, reg.data(), nullptr};
  const RegionLayout lay1{img1, 1, reg1, nullptr};
  Aggregated agg, agg1;
  aggregate(in, lay, AggKind::kAsmk, false, &agg);
  aggregate(in, lay1, AggKind::kAsmk, true, &agg1);
  std::vector<int32_t> nn(300);
  std::vector<double> sq(300);
  nearest_neighbors(x.data(), 300, x.data() + 300 * D, 400, D, nn.data(), sq.data(), true);
  std::vector<int> same(2, 0), ran(2, 0);
  ParallelErrors errors;
#pragma omp parallel num_threads(2)
  {
    const int t = thread_id();
    errors.run([&] {
      if (t < 2) ran[t] = 1;
      std::vector<int32_t> ids2(n * m);
      std::vector<float> dist2(n * m);
      q.search(x.data(), n, m, ids2.data(), dist2.data());
      Aggregated agg2, agg3;
      aggregate(in, lay, AggKind::kAsmk, false, &agg2);
      aggregate(in, lay1, AggKind::kAsmk, true, &agg3);
      std::vector<int32_t> nn2(300);
      std::vector<double> sq2(300);
      nearest_neighbors(x.data(), 300, x.data() + 300 * D, 400, D, nn2.data(), sq2.data(), true);
      if (t < 2)
        same[t] = ids2 == ids && dist2 == dist && agg2.word_offsets == agg.word_offsets &&
                  agg2.words == agg.words && agg2.codes == agg.codes && agg3.words == agg1.words &&
                  agg3.bits == agg1.bits && nn2 == nn && sq2 == sq;
    });
  }
  errors.rethrow();
  EXPECT(ran[0] == 1 && same[0] == 1);
  EXPECT(same[1] == ran[1]);  // thread 1, when one was granted
}

// Format-4 posting blocks: every gap width 0..32, partial blocks, each scan variant's decoder equal
// to the scalar one; the 32-bit-overflow case falls back to 64 bits; the Hamming kernels agree.
// A block of consecutive slots has gap width 0 and no gap bytes: the encoder must not touch the bytes
// after its header (found by tests/fuzz/native/postings.cpp: with short codes, a 2-posting list of
// 1-byte codes was read and written 2 bytes past its end; ASan reports it, and in an index's shared
// posting buffer two words encoded in parallel raced on those bytes).
static void test_encode_width_zero_stays_inside() {
  for (int cb : {1, 2, 3, 16}) {
    for (int n : {2, 3, 4, 5, 129}) {
      std::vector<uint32_t> slots(n);
      for (int i = 0; i < n; ++i) slots[i] = 7 + i;
      std::vector<uint8_t> codes(static_cast<size_t>(n) * cb, 0x5A);
      // Exactly the list's size, on the heap: ASan (the CI's D2R_SANITIZE run) sees any byte past it.
      const size_t bytes = encoded_bytes(slots.data(), n, cb);
      std::unique_ptr<uint8_t[]> buf(new uint8_t[bytes]);
      EXPECT(encode_list(slots.data(), codes.data(), n, cb, buf.get()) == bytes);
      EXPECT(buf[1 + 4] == 0);  // the first block's width
      int64_t left = 0;
      const uint8_t* p = read_count(buf.get(), buf.get() + bytes, &left);
      EXPECT(left == n);
      const Block blk = read_block(p, buf.get() + bytes, n < kBlock ? n : kBlock, cb);
      uint32_t out[kBlock + 16];
      EXPECT(decode_slots_scalar(blk, out) == static_cast<uint64_t>(7 + blk.n - 1));
      EXPECT(blk.codes[0] == 0x5A);
    }
  }
}

static void test_postings_codec_and_scan_variants() {
  std::mt19937_64 rng(7);
  const int cb = 16;
  for (int width = 0; width <= 32; ++width) {
    for (int n : {1, 2, 3, 4, 5, 7, 8, 127, 128, 129, 200, 256, 300}) {
      std::vector<uint32_t> slots(n);
      uint64_t s = rng() % 5;
      bool fits = true;
      for (int i = 0; i < n; ++i) {
        if (i) {
          const uint64_t lim = width == 0 ? 0 : (width == 32 ? 0xFFFFFFFFull : (uint64_t{1} << width) - 1);
          const uint64_t v = (i % 7 == 3) ? lim : (width ? rng() % (lim + 1) : 0);
          s += v + 1;
        }
        if (s > 0xFFFFFFFFull) {
          fits = false;
          break;
        }
        slots[i] = static_cast<uint32_t>(s);
      }
      if (!fits) continue;  // a list that does not fit 32-bit slots
      std::vector<uint8_t> codes(static_cast<size_t>(n) * cb);
      for (auto& c : codes) c = static_cast<uint8_t>(rng());
      std::vector<uint8_t> buf(encoded_bytes(slots.data(), n, cb));
      EXPECT(encode_list(slots.data(), codes.data(), n, cb, buf.data()) == buf.size());
      for (const std::string& v : scan_variants()) {
        set_scan_variant(v);
        const ScanKernels& k = scan_kernels();
        int64_t left = 0;
        const uint8_t* end = buf.data() + buf.size();
        const uint8_t* p = read_count(buf.data(), end, &left);
        EXPECT(left == n);
        int at = 0;
        bool same = true;
        uint32_t out[kBlock + 16];
        while (left > 0) {
          const Block blk = read_block(p, end, static_cast<int>(std::min<int64_t>(left, kBlock)), cb);
          const uint64_t last = k.decode(blk, out);
          same = same && last == slots[at + blk.n - 1];
          for (int i = 0; i < blk.n; ++i) same = same && out[i] == slots[at + i];
          same = same && std::equal(blk.codes, blk.codes + blk.n * cb, codes.begin() + static_cast<size_t>(at) * cb);
          at += blk.n;
          left -= blk.n;
          p = blk.next;
        }
        EXPECT(same && p == end && at == n);
      }
    }
  }
  // A block whose gaps sum past 2^32: every decoder returns the true (64-bit) last slot.
  {
    std::vector<uint8_t> blk_bytes(kBlockHeader + gap_bytes(5, 32) + 5 * cb, 0xFF);
    uint32_t first = 0xFFFFFF00u;
    std::memcpy(blk_bytes.data(), &first, 4);
    blk_bytes[4] = 32;
    for (const std::string& v : scan_variants()) {
      set_scan_variant(v);
      uint32_t out[kBlock + 16];
      const Block blk = read_block(blk_bytes.data(), blk_bytes.data() + blk_bytes.size(), 5, cb);
      EXPECT(scan_kernels().decode(blk, out) == uint64_t{0xFFFFFF00u} + 4 * (uint64_t{0xFFFFFFFFu} + 1));
    }
    blk_bytes[4] = 33;
    bool threw = false;
    try {
      read_block(blk_bytes.data(), blk_bytes.data() + blk_bytes.size(), 5, cb);
    } catch (const CorruptIndex&) {
      threw = true;
    }
    EXPECT(threw);
  }
  // Hamming kernels: every variant adds the same table entries.
  {
    const int n = 203;
    std::vector<uint8_t> codes(static_cast<size_t>(n) * 16);
    for (auto& c : codes) c = static_cast<uint8_t>(rng());
    uint8_t q[16];
    for (auto& c : q) c = static_cast<uint8_t>(rng());
    std::vector<uint32_t> slots(n);
    for (int i = 0; i < n; ++i) slots[i] = static_cast<uint32_t>(1000 + 3 * i);
    std::vector<int64_t> table(129);
    for (int h = 0; h <= 128; ++h) table[h] = (int64_t{1} << 40) / (h + 1) + h;
    std::vector<int64_t> ref;
    for (const std::string& v : scan_variants()) {
      set_scan_variant(v);
      std::vector<int64_t> acc(2000, 5);
      scan_kernels().bin16(table.data(), q, codes.data(), slots.data(), 3, n - 2, 900, acc.data());
      if (ref.empty()) ref = acc;
      EXPECT(acc == ref);
    }
    EXPECT(ref[1000 - 900] == 5 && ref[1000 + 3 * 3 - 900] != 5);
  }
  set_scan_variant(simd::level_name(simd::active()));  // back to the SIMD level's (scan.h)
}

// Every SIMD level available here gives bit-identical results (simd.h): the quantiser (plain and
// pruned), the aggregation's squared norm, the scoring kernels and spatial verification. CI also runs
// this whole binary once per level (D2R_SIMD).
static void test_simd_levels() {
  const std::vector<simd::Level> levels = simd::available();
  std::printf("simd: active %s; available:", simd::level_name(simd::active()));
  for (simd::Level l : levels) std::printf(" %s", simd::level_name(l));
  std::printf("\n");
  EXPECT(!levels.empty() && levels.front() == simd::Level::kScalar);
  EXPECT(std::find(levels.begin(), levels.end(), simd::active()) != levels.end());
  EXPECT(&simd::kernels() == &simd::kernels_for(simd::active()));
  for (simd::Level l : levels) EXPECT(simd::kernels_for(l).level == l);
  // The posting scan's kernels follow the same level (scan.h): one variant per available level.
  EXPECT(scan_variant() == simd::level_name(simd::active()));
  EXPECT(scan_variants().size() == levels.size());
  for (simd::Level l : levels) EXPECT(std::string(scan_kernels_for(l).name) == simd::level_name(l));

  std::mt19937 rng(11);
  std::normal_distribution<float> g;
  // A clustered codebook big enough for the pruning structure, and a small Gaussian one.
  const int D = 48, C = static_cast<int>(Quantizer::kMinPruneWords), n = 300, m = 3, centres = 64;
  std::vector<float> ctr(centres * D), cb(static_cast<size_t>(C) * D), x(static_cast<size_t>(n) * D);
  for (auto& v : ctr) v = g(rng);
  for (int w = 0; w < C; ++w)
    for (int t = 0; t < D; ++t) cb[w * D + t] = ctr[(w % centres) * D + t] + 0.1f * g(rng);
  for (int i = 0; i < n; ++i)
    for (int t = 0; t < D; ++t) x[i * D + t] = ctr[(i * 7 % centres) * D + t] + 0.1f * g(rng);
  std::vector<float> small(300 * 37), xs(101 * 37);
  for (auto& v : small) v = g(rng);
  for (auto& v : xs) v = g(rng);
  std::vector<double> dv(131);
  for (auto& v : dv) v = g(rng);
  // Spatial verification inputs: descriptors and points related by an affine map plus outliers.
  const int nq = 200, ndb = 150, dd = 40;
  std::vector<float> q(nq * dd), db(ndb * dd), src(2 * 120), dst(2 * 120);
  for (auto& v : q) v = g(rng);
  for (auto& v : db) v = g(rng);
  for (int i = 0; i < 120; ++i) {
    src[2 * i] = 100 * g(rng);
    src[2 * i + 1] = 100 * g(rng);
    dst[2 * i] = i % 3 ? 1.1f * src[2 * i] - 0.2f * src[2 * i + 1] + 5 + 0.3f * g(rng) : 100 * g(rng);
    dst[2 * i + 1] = i % 3 ? 0.1f * src[2 * i] + 0.9f * src[2 * i + 1] - 7 + 0.3f * g(rng) : 100 * g(rng);
  }
  // Posting blocks for the scoring kernels: 64 binary codes (16 bytes) and 64 float codes (dim 8).
  std::vector<uint8_t> bcodes(64 * 16), bquery(16), fcodes(64 * 8 * 4), fquery(8 * 4);
  for (auto& v : bcodes) v = static_cast<uint8_t>(rng());
  for (auto& v : bquery) v = static_cast<uint8_t>(rng());
  for (int i = 0; i < 64 * 8; ++i) {
    const float f = 0.35f * g(rng);
    std::memcpy(fcodes.data() + 4 * i, &f, 4);
  }
  for (int i = 0; i < 8; ++i) {
    const float f = 0.35f * g(rng);
    std::memcpy(fquery.data() + 4 * i, &f, 4);
  }
  std::vector<uint32_t> slots(64);
  for (int i = 0; i < 64; ++i) slots[i] = static_cast<uint32_t>(3 * i + (i % 5));
  const std::vector<int64_t> table = fixed_hamming_table(128, 16, 3.0f, 0.0f);

  struct Out {
    std::vector<int32_t> ids, ids_small, nn;
    std::vector<float> dist, dist_small, model;
    std::vector<double> nn_d;
    std::vector<uint8_t> mask;
    std::vector<int64_t> acc_b, acc_b12, acc_scan, acc_f;
    double ss = 0;
    int inliers = 0;
    bool pruned = false;
  };
  std::vector<Out> outs;
  for (simd::Level l : levels) {
    const simd::Kernels& k = simd::kernels_for(l);
    Out o;
    Quantizer qz(cb.data(), C, D, l);
    o.pruned = qz.pruning_enabled();
    o.ids.resize(n * m);
    o.dist.resize(n * m);
    qz.search(x.data(), n, m, o.ids.data(), o.dist.data());
    Quantizer qs(small.data(), 300, 37, l);
    o.ids_small.resize(101 * 2);
    o.dist_small.resize(101 * 2);
    qs.search(xs.data(), 101, 2, o.ids_small.data(), o.dist_small.data());
    o.ss = k.sum_squares(dv.data(), static_cast<int>(dv.size()));
    o.nn.resize(nq);
    o.nn_d.resize(nq);
    k.nearest_neighbors(q.data(), nq, db.data(), ndb, dd, o.nn.data(), o.nn_d.data(), true);
    RansacParams rp;
    rp.threshold = 2.0f;
    rp.seed = 5;
    o.model.resize(6);
    o.mask.resize(120);
    o.inliers = k.affine_ransac(src.data(), dst.data(), 120, rp, o.model.data(), o.mask.data());
    o.acc_b.assign(200, 0);
    o.acc_b12.assign(200, 0);
    o.acc_scan.assign(200, 0);
    o.acc_f.assign(200, 0);
    k.score_block_binary(ScoreBlock{bquery.data(), bcodes.data(), slots.data(), 3, 61, 0, 16, 128, o.acc_b.data()},
                         table.data());
    // 12-byte codes (the generic width) with a base: acc[slot - 5].
    k.score_block_binary(ScoreBlock{bquery.data(), bcodes.data(), slots.data() + 2, 0, 60, 5, 12, 96, o.acc_b12.data()},
                         table.data());
    scan_kernels_for(l).bin16(table.data(), bquery.data(), bcodes.data(), slots.data(), 3, 61, 0, o.acc_scan.data());
    k.score_block_float(ScoreBlock{fquery.data(), fcodes.data(), slots.data(), 0, 64, 0, 32, 8, o.acc_f.data()}, 3.0f,
                        -1.0f, 1e6f);
    outs.push_back(std::move(o));
  }
  EXPECT(outs[0].pruned);
  EXPECT(outs[0].acc_scan == outs[0].acc_b);  // the generic binary kernel agrees with the scan's bin16
  EXPECT(outs[0].inliers >= 60);
  for (size_t i = 1; i < outs.size(); ++i) {
    const Out &a = outs[0], &b = outs[i];
    EXPECT(a.ids == b.ids);
    EXPECT(std::memcmp(a.dist.data(), b.dist.data(), sizeof(float) * a.dist.size()) == 0);
    EXPECT(a.ids_small == b.ids_small);
    EXPECT(std::memcmp(a.dist_small.data(), b.dist_small.data(), sizeof(float) * a.dist_small.size()) == 0);
    EXPECT(std::memcmp(&a.ss, &b.ss, sizeof(double)) == 0);
    EXPECT(a.acc_b == b.acc_b && a.acc_f == b.acc_f && a.acc_b12 == b.acc_b12 && a.acc_scan == b.acc_scan);
    // Spatial verification keeps the FMA contraction (simd.h): bit-identical between the FMA levels
    // (avx2, avx512); the scalar level agrees on this data's matches and inliers (no near-ties).
    EXPECT(a.nn == b.nn);
    EXPECT(a.inliers == b.inliers && a.mask == b.mask);
    if (i >= 2) {
      const Out& f = outs[1];
      EXPECT(std::memcmp(f.nn_d.data(), b.nn_d.data(), sizeof(double) * f.nn_d.size()) == 0);
      EXPECT(std::memcmp(f.model.data(), b.model.data(), sizeof(float) * 6) == 0);
    }
  }
  // A level that is not available is refused by name.
  bool threw = false;
  try {
    if (levels.size() < static_cast<size_t>(simd::kNumLevels))
      simd::kernels_for(static_cast<simd::Level>(levels.size()));
    else
      simd::kernels_for(static_cast<simd::Level>(7));
  } catch (const InvalidArgument& e) {
    threw = std::string(e.what()).find("not available") != std::string::npos;
  }
  EXPECT(threw);
}

// The SIGBUS guard (map_guard.h): a registered MAP_SHARED map of a file truncated under it reads
// zeros past the new end and is flagged; the pages still in the file read as before; a SIGBUS in an
// unregistered map still ends the process (chained to the previous handler: the default, or ASan's).
static void test_map_guard() {
#if defined(__linux__)
  const long page = sysconf(_SC_PAGESIZE);
  char name[] = "/tmp/d2r_map_guard_XXXXXX";
  const int fd = mkstemp(name);
  EXPECT(fd >= 0);
  if (fd < 0) return;
  unlink(name);
  std::vector<uint8_t> content(static_cast<size_t>(4 * page));
  for (size_t i = 0; i < content.size(); ++i) content[i] = static_cast<uint8_t>(1 + i % 251);
  EXPECT(write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
  auto map = [&] {
    void* p = mmap(nullptr, content.size(), PROT_READ, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? nullptr : static_cast<const volatile uint8_t*>(p);
  };
  const volatile uint8_t* p = map();
  EXPECT(p != nullptr);
  if (!p) return;
  MapGuardSlot* slot = map_guard_register(const_cast<const uint8_t*>(p), content.size());
  EXPECT(map_guard_active());
  EXPECT(p[2 * page + 5] == content[2 * page + 5]);
  EXPECT(slot->truncated.load() == 0);
  EXPECT(ftruncate(fd, page) == 0);  // pages 1..3 now lie past the file's end
  EXPECT(p[2 * page + 5] == 0);      // SIGBUS, handled: a zero page
  EXPECT(slot->truncated.load() == 1);
  EXPECT(p[3 * page + 7] == 0);
  EXPECT(p[page - 1] == content[page - 1]);  // still in the file
  map_guard_unregister(slot);
  munmap(const_cast<uint8_t*>(p), content.size());
  // An unregistered map: the fault is not ours, and the process (a child here) ends.
  const volatile uint8_t* q = map();
  EXPECT(q != nullptr);
  std::fflush(stdout);
  const pid_t child = fork();
  if (child == 0) {
    // (Under ASan the previous handler is ASan's, which reports the BUS and aborts: expected, so
    // its report goes to /dev/null rather than into the test log.)
    const int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) dup2(devnull, 2);
    const int v = q[3 * page];  // past the end: SIGBUS, chained to the previous handler
    _exit(v == 0 ? 0 : 3);
  }
  int status = 0;
  EXPECT(waitpid(child, &status, 0) == child);
  EXPECT(!(WIFEXITED(status) && WEXITSTATUS(status) == 0));
  munmap(const_cast<uint8_t*>(q), content.size());
  close(fd);
#endif
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--simd-levels") {  // for .ci/run: the levels to run at
    for (simd::Level l : simd::available()) std::printf("%s\n", simd::level_name(l));
    return 0;
  }
  test_quantize_golden();
  test_quantize_random();
  test_aggregate_golden();
  test_similarity_golden();
  test_ivf_add_remove();
  test_topk_ties();
  test_shared_helpers();
  test_fixed_point_and_keys();
  test_ransac_known_affine();
  test_pooled_search_and_many_images();
  test_parallel_errors();
  test_core_regions_errors_and_teams();
  test_encode_width_zero_stays_inside();
  test_postings_codec_and_scan_variants();
  test_simd_levels();
  test_map_guard();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
