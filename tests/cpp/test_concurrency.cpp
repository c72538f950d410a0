// Concurrency tests of the inverted file (no Python): readers (search, score_all, search_pooled,
// n_images, contains, image_ids) run on std::threads while one thread adds batches and one removes
// them. Every intermediate result must be well formed and must be the answer of one consistent
// state of the index: a batch is always all present or all absent (atomic writers), a batch whose
// add returned before the read began is visible, a batch whose add began after the read ended is
// not (linearizable), and every score equals the score of the same (query, image) computed alone
// (scores do not depend on the rest of the index: no idf, sums in fixed point). At the end the index
// must answer exactly as one built fresh with the final content. Plus single-threaded unit checks of
// default ids and of failed writers leaving the index unchanged.
//
// Built with -DD2R_BUILD_TESTS=ON (target d2r_cpp_concurrency); CI runs it under ThreadSanitizer
// (D2R_TSAN=ON, D2R_OPENMP=OFF) and under ASan/UBSan. Prints "N passed, M failed"; exit 1 on failure.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "ivf.h"

using namespace d2r;

// ---- thread-safe expectations ----------------------------------------------------------------

static std::atomic<long> g_pass{0}, g_fail{0};
static std::mutex g_print;

static void fail(const std::string& what, const char* file, int line) {
  const long n = ++g_fail;
  if (n <= 30) {
    std::lock_guard<std::mutex> lock(g_print);
    std::printf("FAILED %s:%d: %s\n", file, line, what.c_str());
    std::fflush(stdout);
  }
}
#define EXPECT(cond)                                 \
  do {                                               \
    if (cond) {                                      \
      ++g_pass;                                      \
    } else {                                         \
      fail(#cond, __FILE__, __LINE__);               \
    }                                                \
  } while (0)
#define EXPECT_MSG(cond, msg)                        \
  do {                                               \
    if (cond) {                                      \
      ++g_pass;                                      \
    } else {                                         \
      fail(std::string(#cond) + ": " + (msg), __FILE__, __LINE__); \
    }                                                \
  } while (0)

// Runs body, counting anything it throws as a failure (a thread must not end the process).
static void guarded(const char* name, const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& e) {
    fail(std::string(name) + " threw: " + e.what(), __FILE__, __LINE__);
  } catch (...) {
    fail(std::string(name) + " threw a non-std exception", __FILE__, __LINE__);
  }
}

// ---- data ------------------------------------------------------------------------------------

// A batch of entries in CodesView form, with one id per entry.
struct Batch {
  std::vector<int64_t> off{0};
  std::vector<int32_t> words;
  std::vector<uint8_t> codes;
  std::vector<int64_t> ids;  // one per entry
  int64_t n() const { return static_cast<int64_t>(off.size()) - 1; }
  CodesView view() const { return CodesView{n(), off.data(), words.data(), codes.data()}; }
  void append(const Batch& b, int64_t i, int code_bytes, int64_t id) {
    for (int64_t e = b.off[i]; e < b.off[i + 1]; ++e) {
      words.push_back(b.words[e]);
      codes.insert(codes.end(), b.codes.begin() + e * code_bytes, b.codes.begin() + (e + 1) * code_bytes);
    }
    off.push_back(static_cast<int64_t>(words.size()));
    ids.push_back(id);
  }
};

struct Gen {
  std::mt19937_64 rng;
  int64_t n_words;
  int dim;
  bool binary;
  int code_bytes;
  Gen(uint64_t seed, int64_t C, int D, bool bin)
      : rng(seed), n_words(C), dim(D), binary(bin), code_bytes(bin ? packed_bytes(D) : D * 4) {}

  // One entry with about `density` of the words (may be empty when empty_ok).
  void entry(Batch& b, double density, bool empty_ok) {
    std::bernoulli_distribution pick(density);
    std::normal_distribution<float> g;
    const size_t before = b.words.size();
    for (int32_t w = 0; w < n_words; ++w) {
      if (!pick(rng)) continue;
      b.words.push_back(w);
      if (binary) {
        for (int t = 0; t < code_bytes; ++t) b.codes.push_back(static_cast<uint8_t>(rng()));
      } else {
        std::vector<float> v(dim);
        double ss = 0;
        for (auto& x : v) {
          x = g(rng);
          ss += double(x) * x;
        }
        for (auto& x : v) x = static_cast<float>(x / std::sqrt(ss));
        const uint8_t* p = reinterpret_cast<const uint8_t*>(v.data());
        b.codes.insert(b.codes.end(), p, p + code_bytes);
      }
    }
    if (b.words.size() == before && !empty_ok) entry(b, density, empty_ok);
    else b.off.push_back(static_cast<int64_t>(b.words.size()));
  }

  // A query close to entry i of b: the same words, some of the code perturbed.
  void query_like(Batch& q, const Batch& b, int64_t i) {
    std::uniform_int_distribution<int> byte(0, code_bytes - 1);
    for (int64_t e = b.off[i]; e < b.off[i + 1]; ++e) {
      q.words.push_back(b.words[e]);
      std::vector<uint8_t> c(b.codes.begin() + e * code_bytes, b.codes.begin() + (e + 1) * code_bytes);
      if (binary) {
        for (int t = 0; t < 3; ++t) c[byte(rng)] ^= static_cast<uint8_t>(1u << (rng() % 8));
      } else {
        float* f = reinterpret_cast<float*>(c.data());
        f[rng() % dim] *= 0.5f;
      }
      q.codes.insert(q.codes.end(), c.begin(), c.end());
    }
    q.off.push_back(static_cast<int64_t>(q.words.size()));
  }
};

static bool ranked(const float* s, const int64_t* id, int64_t k) {
  for (int64_t j = 1; j < k; ++j)
    if (!(s[j - 1] > s[j] || (s[j - 1] == s[j] && id[j - 1] < id[j]))) return false;
  return true;
}

static bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// ---- linearizability bookkeeping -------------------------------------------------------------
//
// Image batches are numbered in the order the single adder adds them; batch b is a removal target
// when target_of[b] >= 0, removed by the single remover in target order. A reader snapshots the
// counters before and after its call; then batch b
//   must be present if it was added before the call began and its removal had not begun when the
//     call ended;
//   must be absent if its add had not begun when the call ended, or its removal had ended before
//     the call began;
//   is otherwise present or absent, but never in part.

struct Counters {
  std::atomic<int> adds_started{0}, adds_done{0}, removes_started{0}, removes_done{0};
  struct View {
    int as, ad, rs, rd;
  };
  View read() const { return View{adds_started.load(), adds_done.load(), removes_started.load(), removes_done.load()}; }
  bool writing(int n_batches, int n_targets) const { return adds_done.load() < n_batches || removes_done.load() < n_targets; }
};

struct History {
  std::vector<std::vector<int64_t>> batch_images;  // image ids of each batch
  std::vector<int> target_of;                       // -1 or the removal index
  std::unordered_map<int64_t, int> batch_of;        // image id -> batch

  bool must_present(int b, const Counters::View& before, const Counters::View& after) const {
    return b < before.ad && !(target_of[b] >= 0 && target_of[b] < after.rs);
  }
  bool must_absent(int b, const Counters::View& before, const Counters::View& after) const {
    return b >= after.as || (target_of[b] >= 0 && target_of[b] < before.rd);
  }
  // Checks a full set of image ids (the content at one instant). Returns an empty string if fine.
  std::string check_set(const std::vector<int64_t>& ids, const Counters::View& before,
                        const Counters::View& after) const {
    std::vector<int> seen(batch_images.size(), 0);
    std::set<int64_t> uniq;
    for (int64_t id : ids) {
      auto it = batch_of.find(id);
      if (it == batch_of.end()) return "id " + std::to_string(id) + " was never added";
      if (!uniq.insert(id).second) return "id " + std::to_string(id) + " twice";
      seen[it->second]++;
    }
    for (size_t b = 0; b < batch_images.size(); ++b) {
      const int want = static_cast<int>(batch_images[b].size());
      if (seen[b] != 0 && seen[b] != want)
        return "batch " + std::to_string(b) + " partly present (" + std::to_string(seen[b]) + " of " +
               std::to_string(want) + ")";
      if (seen[b] == 0 && must_present(static_cast<int>(b), before, after))
        return "batch " + std::to_string(b) + " missing";
      if (seen[b] != 0 && must_absent(static_cast<int>(b), before, after))
        return "batch " + std::to_string(b) + " present";
    }
    return "";
  }
  // Bounds on the number of images.
  std::pair<int64_t, int64_t> size_bounds(const Counters::View& before, const Counters::View& after) const {
    int64_t lo = 0, hi = 0;
    for (size_t b = 0; b < batch_images.size(); ++b) {
      const int64_t n = static_cast<int64_t>(batch_images[b].size());
      if (must_present(static_cast<int>(b), before, after)) lo += n;
      if (!must_absent(static_cast<int>(b), before, after)) hi += n;
    }
    return {lo, hi};
  }
};

// ---- stress test of a plain inverted file ------------------------------------------------------

struct StressConfig {
  bool binary;
  int dim;
  int64_t n_words;
  int preload;        // batches added before the threads start
  int n_batches;      // total batches (the adder adds preload..n_batches-1)
  int batch;          // images per batch
  int reader_ops;     // operations per reader thread (more while the writers run, at most 20x)
  int n_readers;
};

struct OpCounts {
  std::atomic<long> search1{0}, search_many{0}, search_all{0}, score_all{0}, accessors{0}, adds{0},
      removes{0}, failed_adds{0}, failed_removes{0}, pooled{0}, during_writes{0};
};

static void stress_plain(const StressConfig& cfg, uint64_t seed, OpCounts& ops) {
  Gen gen(seed, cfg.n_words, cfg.dim, cfg.binary);
  const int cb = gen.code_bytes;
  History h;
  std::vector<Batch> batches(cfg.n_batches);
  int n_targets = 0;
  for (int b = 0; b < cfg.n_batches; ++b) {
    Batch& B = batches[b];
    for (int i = 0; i < cfg.batch; ++i) {
      const int64_t id = 1000 + int64_t(b) * 97 + i * 13;  // explicit, sparse ids
      if (i == 1 && b > 0) {
        B.append(batches[b - 1], 0, cb, id);  // same content as an earlier image: tied scores
      } else {
        gen.entry(B, 0.25, i == 2 && b % 4 == 3);  // now and then an image without words
        B.ids.push_back(id);
      }
      h.batch_of[id] = b;
    }
    h.batch_images.push_back(B.ids);
    // removal targets: every third batch from the second on (batch 0 stays: >= 5 images always)
    h.target_of.push_back(b % 3 == 1 ? n_targets++ : -1);
  }
  std::vector<int> targets(n_targets);
  for (int b = 0; b < cfg.n_batches; ++b)
    if (h.target_of[b] >= 0) targets[h.target_of[b]] = b;

  Batch queries;
  for (int q = 0; q < 6; ++q) gen.query_like(queries, batches[(q * 5) % cfg.n_batches], q % cfg.batch);
  Batch one_query;
  one_query.append(queries, 0, cb, 0);
  const int64_t nq = queries.n();
  const ScoreParams p;

  // Reference scores: every image ever added, each scored on its own index content (the score of a
  // (query, image) pair does not depend on the other images).
  std::vector<std::unordered_map<int64_t, float>> ref(nq);
  {
    InvertedFile all(cfg.n_words, cfg.dim, cfg.binary);
    for (auto& B : batches) all.add(B.view(), B.ids.data());
    AllScores a = all.score_all(queries.view(), p);
    EXPECT(a.ids.size() == h.batch_of.size() && a.scores.size() == a.ids.size() * nq);
    for (int64_t q = 0; q < nq; ++q)
      for (size_t j = 0; j < a.ids.size(); ++j) ref[q][a.ids[j]] = a.scores[q * a.ids.size() + j];
  }
  auto ref_of = [&](int64_t q, int64_t id) {
    auto it = ref[q].find(id);
    return it == ref[q].end() ? std::nanf("") : it->second;
  };

  InvertedFile ivf(cfg.n_words, cfg.dim, cfg.binary);
  Counters c;
  for (int b = 0; b < cfg.preload; ++b) ivf.add(batches[b].view(), batches[b].ids.data());
  c.adds_started = c.adds_done = cfg.preload;
  // The batches that are never removed and are present from the start: a top-k must rank them.
  std::vector<int64_t> sure;
  for (int b = 0; b < cfg.preload; ++b)
    if (h.target_of[b] < 0) sure.insert(sure.end(), batches[b].ids.begin(), batches[b].ids.end());

  // Checks a TopK against the reference and the history.
  auto check_topk = [&](const TopK& r, const Batch& qs, int64_t k, const Counters::View& before,
                        const Counters::View& after, const char* what) {
    const int64_t n = qs.n();
    const bool shape = r.n_queries == n && r.k >= 0 && static_cast<int64_t>(r.scores.size()) == n * r.k &&
                       r.ids.size() == r.scores.size();
    EXPECT_MSG(shape, what);
    if (!shape) return;
    EXPECT_MSG(all_finite(r.scores), what);
    auto bounds = h.size_bounds(before, after);
    if (k < 0) {
      EXPECT_MSG(r.k >= bounds.first && r.k <= bounds.second, what);
    } else {
      EXPECT_MSG(r.k == k, what);  // batch 0 (never removed) holds >= k images
    }
    std::set<int64_t> first_row;
    for (int64_t q = 0; q < n; ++q) {
      const float* s = r.scores.data() + q * r.k;
      const int64_t* id = r.ids.data() + q * r.k;
      EXPECT_MSG(ranked(s, id, r.k), what);
      std::vector<int64_t> row(id, id + r.k);
      // the query of row q in `queries` order: one_query is queries[0]
      const int64_t qref = (&qs == &one_query) ? 0 : q;
      bool scores_ok = true;
      for (int64_t j = 0; j < r.k; ++j) scores_ok = scores_ok && s[j] == ref_of(qref, id[j]);
      EXPECT_MSG(scores_ok, std::string(what) + ": a score differs from the image's score computed alone");
      if (k < 0) {
        const std::string bad = h.check_set(row, before, after);
        EXPECT_MSG(bad.empty(), std::string(what) + ": " + bad);
        std::set<int64_t> rs(row.begin(), row.end());
        if (q == 0) first_row = rs;
        else EXPECT_MSG(rs == first_row, std::string(what) + ": rows rank different image sets");
      } else {
        std::set<int64_t> rs(row.begin(), row.end());
        bool ever = rs.size() == row.size();
        for (int64_t x : row) ever = ever && h.batch_of.count(x);
        EXPECT_MSG(ever, std::string(what) + ": ids not unique or never added");
        // every surely-present image scoring above the k-th score must be in the top k
        if (r.k > 0) {
          bool complete = true;
          for (int64_t x : sure)
            if (ref_of(qref, x) > s[r.k - 1] && !rs.count(x)) complete = false;
          EXPECT_MSG(complete, std::string(what) + ": a better image is missing from the top k");
        }
      }
    }
  };

  auto reader = [&](int t) {
    std::mt19937 rng(static_cast<unsigned>(seed * 31 + t));
    std::vector<int64_t> all_ids;
    for (auto& kv : h.batch_of) all_ids.push_back(kv.first);
    std::sort(all_ids.begin(), all_ids.end());
    for (int i = 0; (i < cfg.reader_ops || c.writing(cfg.n_batches, n_targets)) && i < 20 * cfg.reader_ops; ++i) {
      const int op = (i + t) % 6;
      const Counters::View before = c.read();
      if (c.writing(cfg.n_batches, n_targets)) ++ops.during_writes;
      if (op == 0) {
        TopK r = ivf.search(one_query.view(), 5, p);
        check_topk(r, one_query, 5, before, c.read(), "search(1 query, k=5)");
        ++ops.search1;
      } else if (op == 1) {
        TopK r = ivf.search(queries.view(), 5, p);
        check_topk(r, queries, 5, before, c.read(), "search(6 queries, k=5)");
        ++ops.search_many;
      } else if (op == 2) {
        TopK r = ivf.search(queries.view(), -1, p);
        check_topk(r, queries, -1, before, c.read(), "search(6 queries, k=-1)");
        ++ops.search_all;
      } else if (op == 3) {
        TopK r = ivf.search(one_query.view(), -1, p);
        check_topk(r, one_query, -1, before, c.read(), "search(1 query, k=-1)");
        ++ops.search_all;
      } else if (op == 4) {
        AllScores a = ivf.score_all(queries.view(), p);
        const Counters::View after = c.read();
        const bool shape = a.scores.size() == a.ids.size() * static_cast<size_t>(nq);
        EXPECT_MSG(shape, "score_all shape");
        if (shape) {
          EXPECT(all_finite(a.scores));
          const std::string bad = h.check_set(a.ids, before, after);
          EXPECT_MSG(bad.empty(), "score_all: " + bad);
          bool ok = true;
          for (int64_t q = 0; q < nq; ++q)
            for (size_t j = 0; j < a.ids.size(); ++j) ok = ok && a.scores[q * a.ids.size() + j] == ref_of(q, a.ids[j]);
          EXPECT_MSG(ok, "score_all: a score differs from the image's score computed alone");
        }
        ++ops.score_all;
      } else {
        const int64_t n = ivf.n_images();
        Counters::View after = c.read();
        auto bounds = h.size_bounds(before, after);
        EXPECT_MSG(n >= bounds.first && n <= bounds.second,
                   "n_images " + std::to_string(n) + " outside [" + std::to_string(bounds.first) + ", " +
                       std::to_string(bounds.second) + "]");
        const Counters::View b2 = c.read();
        const int64_t id = all_ids[rng() % all_ids.size()];
        const bool has = ivf.contains(id);
        after = c.read();
        const int bb = h.batch_of.at(id);
        if (h.must_present(bb, b2, after)) EXPECT_MSG(has, "contains(" + std::to_string(id) + ") false");
        if (h.must_absent(bb, b2, after)) EXPECT_MSG(!has, "contains(" + std::to_string(id) + ") true");
        const Counters::View b3 = c.read();
        const std::vector<int64_t> ids = ivf.image_ids();
        const std::string bad = h.check_set(ids, b3, c.read());
        EXPECT_MSG(bad.empty(), "image_ids: " + bad);
        ++ops.accessors;
      }
    }
  };

  auto adder = [&]() {
    for (int b = cfg.preload; b < cfg.n_batches; ++b) {
      if (b % 5 == 0) {
        // A batch with one id already present (batch 0 is never removed): must throw and add nothing.
        Batch bad;
        for (int i = 0; i < 3; ++i) bad.append(batches[b], i, cb, 900000 + int64_t(b) * 10 + i);
        bad.ids[2] = batches[0].ids[0];
        bool threw = false;
        try {
          ivf.add(bad.view(), bad.ids.data());
        } catch (const InvalidArgument&) {
          threw = true;
        }
        EXPECT(threw && !ivf.contains(bad.ids[0]) && !ivf.contains(bad.ids[1]));
        ++ops.failed_adds;
      }
      c.adds_started = b + 1;
      const std::vector<int64_t> got = ivf.add(batches[b].view(), batches[b].ids.data());
      c.adds_done = b + 1;
      EXPECT(got == batches[b].ids);
      ++ops.adds;
      std::this_thread::yield();
    }
  };

  auto remover = [&]() {
    for (int t = 0; t < n_targets; ++t) {
      const int b = targets[t];
      while (c.adds_done.load() <= b) std::this_thread::yield();  // bounded: the adder finishes
      if (t % 3 == 2) {
        // A kept id (batch 0) with an id removed earlier: NotFound, and the kept id stays.
        const int64_t pair[2] = {batches[0].ids[1], batches[targets[t - 1]].ids[0]};
        bool threw = false;
        try {
          ivf.remove(2, pair);
        } catch (const NotFound&) {
          threw = true;
        }
        EXPECT(threw && ivf.contains(pair[0]));
        ++ops.failed_removes;
      }
      c.removes_started = t + 1;
      const int64_t n = ivf.remove(batches[b].n(), batches[b].ids.data());
      c.removes_done = t + 1;
      EXPECT(n == batches[b].n());
      ++ops.removes;
      std::this_thread::yield();
    }
  };

  std::vector<std::thread> th;
  for (int t = 0; t < cfg.n_readers; ++t) th.emplace_back([&, t] { guarded("reader", [&] { reader(t); }); });
  th.emplace_back([&] { guarded("adder", adder); });
  th.emplace_back([&] { guarded("remover", remover); });
  for (auto& x : th) x.join();

  // The final content against a fresh build (the same batches, added in the same order at once).
  Batch fin;
  for (int b = 0; b < cfg.n_batches; ++b)
    if (h.target_of[b] < 0)
      for (int64_t i = 0; i < batches[b].n(); ++i) fin.append(batches[b], i, cb, batches[b].ids[i]);
  InvertedFile fresh(cfg.n_words, cfg.dim, cfg.binary);
  fresh.add(fin.view(), fin.ids.data());
  EXPECT(ivf.n_images() == fresh.n_images() && ivf.n_images() == fin.n());
  EXPECT(ivf.n_entries() == fresh.n_entries());
  EXPECT(ivf.image_ids() == fresh.image_ids() && ivf.image_ids() == fin.ids);
  for (int64_t k : {int64_t(-1), int64_t(5), int64_t(1)}) {
    for (const Batch* qs : {&queries, &one_query}) {
      TopK a = ivf.search(qs->view(), k, p), b = fresh.search(qs->view(), k, p);
      EXPECT(a.n_queries == b.n_queries && a.k == b.k && a.ids == b.ids && a.scores == b.scores);
    }
  }
  AllScores a = ivf.score_all(queries.view(), p), b = fresh.score_all(queries.view(), p);
  EXPECT(a.ids == b.ids && a.scores == b.scores);
  for (int64_t id : fin.ids) EXPECT(ivf.contains(id));
  for (int t : targets)
    for (int64_t id : batches[t].ids) EXPECT(!ivf.contains(id));
}

// ---- stress test of a multi-entry (regional) inverted file -------------------------------------

static void stress_multi(uint64_t seed, int reader_ops, int n_readers, int scale, OpCounts& ops) {
  const int64_t C = 48;
  const int D = 128;
  Gen gen(seed, C, D, true);
  const int cb = gen.code_bytes;
  const int n_batches = 24 * scale + 12, per_batch = 4, preload = 3;
  History h;
  std::vector<Batch> batches(n_batches);  // entries; ids = image id per entry (consecutive regions)
  int n_targets = 0;
  for (int b = 0; b < n_batches; ++b) {
    std::vector<int64_t> imgs;
    for (int i = 0; i < per_batch; ++i) {
      const int64_t id = 50000 + int64_t(b) * 31 + i * 5;
      const int regions = 1 + static_cast<int>((b + i) % 3);
      for (int r = 0; r < regions; ++r) {
        gen.entry(batches[b], 0.3, r == 1 && i == 3);
        batches[b].ids.push_back(id);
      }
      imgs.push_back(id);
      h.batch_of[id] = b;
    }
    h.batch_images.push_back(imgs);
    h.target_of.push_back(b % 3 == 2 ? n_targets++ : -1);
  }
  std::vector<int> targets(n_targets);
  for (int b = 0; b < n_batches; ++b)
    if (h.target_of[b] >= 0) targets[h.target_of[b]] = b;
  Batch queries;
  for (int q = 0; q < 4; ++q) gen.query_like(queries, batches[q * 5], q);
  const int64_t nq = queries.n();
  const ScoreParams p;

  // Reference: each entry scored alone (a plain index keyed by entry number), pooled per image.
  std::vector<std::map<int64_t, float>> ref_max(nq), ref_mean(nq);
  {
    InvertedFile entries(C, D, true);
    Batch all;
    std::vector<int64_t> owner;
    for (auto& B : batches)
      for (int64_t e = 0; e < B.n(); ++e) {
        all.append(B, e, cb, static_cast<int64_t>(owner.size()));
        owner.push_back(B.ids[e]);
      }
    entries.add(all.view(), all.ids.data());
    AllScores a = entries.score_all(queries.view(), p);
    const size_t n = a.ids.size();
    for (int64_t q = 0; q < nq; ++q) {
      std::map<int64_t, double> sum;
      std::map<int64_t, int> cnt;
      for (size_t j = 0; j < n; ++j) {
        const int64_t img = owner[a.ids[j]];
        const float s = a.scores[q * n + j];
        auto it = ref_max[q].find(img);
        if (it == ref_max[q].end()) ref_max[q][img] = s;
        else it->second = std::max(it->second, s);
        sum[img] += s;
        cnt[img]++;
      }
      for (auto& kv : sum) ref_mean[q][kv.first] = static_cast<float>(kv.second / cnt[kv.first]);
    }
  }

  InvertedFile ivf(C, D, true, /*multi_entry=*/true);
  Counters c;
  for (int b = 0; b < preload; ++b) ivf.add(batches[b].view(), batches[b].ids.data());
  c.adds_started = c.adds_done = preload;

  auto reader = [&](int t) {
    for (int i = 0; (i < reader_ops || c.writing(n_batches, n_targets)) && i < 20 * reader_ops; ++i) {
      if (c.writing(n_batches, n_targets)) ++ops.during_writes;
      const bool mean = (i + t) % 2 == 1;
      const int64_t k = ((i + t) / 2) % 2 == 0 ? -1 : 3;
      const Counters::View before = c.read();
      TopK r = ivf.search_pooled(queries.view(), mean, k, p);
      const Counters::View after = c.read();
      ++ops.pooled;
      const bool shape = r.n_queries == nq && static_cast<int64_t>(r.scores.size()) == nq * r.k &&
                         r.ids.size() == r.scores.size();
      EXPECT_MSG(shape, "search_pooled shape");
      if (!shape) continue;
      EXPECT(all_finite(r.scores));
      auto bounds = h.size_bounds(before, after);
      if (k < 0) EXPECT_MSG(r.k >= bounds.first && r.k <= bounds.second, "search_pooled k=-1 size");
      else EXPECT(r.k == k);
      std::set<int64_t> first_row;
      for (int64_t q = 0; q < nq; ++q) {
        const float* s = r.scores.data() + q * r.k;
        const int64_t* id = r.ids.data() + q * r.k;
        EXPECT_MSG(ranked(s, id, r.k), "search_pooled ranking order");
        std::vector<int64_t> row(id, id + r.k);
        bool ok = true;
        for (int64_t j = 0; j < r.k; ++j) {
          auto& ref = mean ? ref_mean[q] : ref_max[q];
          auto it = ref.find(id[j]);
          if (it == ref.end()) {
            ok = false;
          } else if (mean) {
            ok = ok && std::fabs(s[j] - it->second) <= 1e-6f * (1.0f + std::fabs(it->second));
          } else {
            ok = ok && s[j] == it->second;
          }
        }
        EXPECT_MSG(ok, std::string("search_pooled ") + (mean ? "mean" : "max") + ": a pooled score differs");
        if (k < 0) {
          const std::string bad = h.check_set(row, before, after);
          EXPECT_MSG(bad.empty(), "search_pooled: " + bad);
          std::set<int64_t> rs(row.begin(), row.end());
          if (q == 0) first_row = rs;
          else EXPECT(rs == first_row);
        }
      }
      if (i % 4 == 0) {
        const Counters::View b2 = c.read();
        const std::vector<int64_t> ids = ivf.image_ids();
        const int64_t n = ivf.n_images();
        const Counters::View a2 = c.read();
        const std::string bad = h.check_set(ids, b2, a2);
        EXPECT_MSG(bad.empty(), "multi-entry image_ids: " + bad);
        auto bd = h.size_bounds(b2, a2);
        EXPECT(n >= bd.first && n <= bd.second);
        ++ops.accessors;
      }
    }
  };
  auto adder = [&]() {
    for (int b = preload; b < n_batches; ++b) {
      c.adds_started = b + 1;
      ivf.add(batches[b].view(), batches[b].ids.data());
      c.adds_done = b + 1;
      ++ops.adds;
      std::this_thread::yield();
    }
  };
  auto remover = [&]() {
    for (int t = 0; t < n_targets; ++t) {
      const int b = targets[t];
      while (c.adds_done.load() <= b) std::this_thread::yield();
      c.removes_started = t + 1;
      const int64_t n = ivf.remove(per_batch, h.batch_images[b].data());
      c.removes_done = t + 1;
      EXPECT(n == per_batch);
      ++ops.removes;
      std::this_thread::yield();
    }
  };
  std::vector<std::thread> th;
  for (int t = 0; t < n_readers; ++t) th.emplace_back([&, t] { guarded("pooled reader", [&] { reader(t); }); });
  th.emplace_back([&] { guarded("multi adder", adder); });
  th.emplace_back([&] { guarded("multi remover", remover); });
  for (auto& x : th) x.join();

  Batch fin;
  std::vector<int64_t> fin_images;
  for (int b = 0; b < n_batches; ++b)
    if (h.target_of[b] < 0) {
      for (int64_t e = 0; e < batches[b].n(); ++e) fin.append(batches[b], e, cb, batches[b].ids[e]);
      fin_images.insert(fin_images.end(), h.batch_images[b].begin(), h.batch_images[b].end());
    }
  InvertedFile fresh(C, D, true, true);
  fresh.add(fin.view(), fin.ids.data());
  EXPECT(ivf.n_images() == fresh.n_images() && ivf.n_images() == static_cast<int64_t>(fin_images.size()));
  EXPECT(ivf.n_entries() == fresh.n_entries());
  EXPECT(ivf.image_ids() == fin_images && fresh.image_ids() == fin_images);
  for (bool mean : {false, true})
    for (int64_t k : {int64_t(-1), int64_t(3)}) {
      TopK a = ivf.search_pooled(queries.view(), mean, k, p), b = fresh.search_pooled(queries.view(), mean, k, p);
      EXPECT(a.k == b.k && a.ids == b.ids && a.scores == b.scores);
    }
}

// ---- single-threaded unit checks ---------------------------------------------------------------

static void test_default_ids() {
  Gen gen(11, 20, 64, true);
  Batch b;
  for (int i = 0; i < 8; ++i) gen.entry(b, 0.3, false);
  auto sub = [&](int64_t from, int64_t to) {
    Batch s;
    for (int64_t i = from; i < to; ++i) s.append(b, i, gen.code_bytes, 0);
    return s;
  };
  InvertedFile ivf(20, 64, true);
  EXPECT(ivf.next_id() == 0 && ivf.n_images() == 0);
  Batch s0 = sub(0, 3);
  EXPECT((ivf.add(s0.view(), nullptr) == std::vector<int64_t>{0, 1, 2}));
  EXPECT(ivf.next_id() == 3 && ivf.n_images() == 3);
  Batch s1 = sub(3, 5);
  const int64_t explicit_ids[] = {10, 4};
  EXPECT((ivf.add(s1.view(), explicit_ids) == std::vector<int64_t>{10, 4}));
  EXPECT(ivf.next_id() == 11);
  Batch s2 = sub(5, 7);
  const int64_t before = ivf.next_id();
  EXPECT((ivf.add(s2.view(), nullptr) == std::vector<int64_t>{before, before + 1}));
  EXPECT(ivf.next_id() == before + 2);
  EXPECT((ivf.image_ids() == std::vector<int64_t>{0, 1, 2, 10, 4, 11, 12}));
  // removing the largest id does not hand it out again
  const int64_t largest = 12;
  EXPECT(ivf.remove(1, &largest) == 1);
  EXPECT(ivf.next_id() == 13 && !ivf.contains(12));
  Batch s3 = sub(7, 8);
  EXPECT((ivf.add(s3.view(), nullptr) == std::vector<int64_t>{13}));
  // an empty batch adds nothing
  Batch none;
  EXPECT(ivf.add(none.view(), nullptr).empty() && ivf.n_images() == 7);
}

static void test_failed_writers_leave_index_unchanged() {
  Gen gen(12, 30, 128, true);
  Batch b;
  for (int i = 0; i < 12; ++i) {
    gen.entry(b, 0.3, i == 4);
    b.ids.push_back(100 + 3 * i);
  }
  Batch q;
  gen.query_like(q, b, 0);
  gen.query_like(q, b, 5);
  InvertedFile ivf(30, 128, true);
  ivf.add(b.view(), b.ids.data());
  const ScoreParams p;
  const TopK r0 = ivf.search(q.view(), -1, p);
  const AllScores a0 = ivf.score_all(q.view(), p);
  const int64_t n0 = ivf.n_images(), e0 = ivf.n_entries(), next0 = ivf.next_id();
  auto unchanged = [&]() {
    const TopK r = ivf.search(q.view(), -1, p);
    const AllScores a = ivf.score_all(q.view(), p);
    return r.ids == r0.ids && r.scores == r0.scores && a.ids == a0.ids && a.scores == a0.scores &&
           ivf.n_images() == n0 && ivf.n_entries() == e0 && ivf.next_id() == next0 && ivf.image_ids() == b.ids;
  };
  EXPECT(r0.k == 12 && r0.n_queries == 2 && ranked(r0.scores.data(), r0.ids.data(), 12));
  // remove of a missing id: NotFound (a std::out_of_range), nothing removed, also for the present ones
  const int64_t missing[] = {103, 7, 106};
  bool threw = false;
  try {
    ivf.remove(3, missing);
  } catch (const NotFound& e) {
    threw = true;
    const std::out_of_range& base = e;
    (void)base;
  }
  EXPECT(threw);
  EXPECT(unchanged());
  // add with an id already present, with a duplicate inside the call, with a negative id, with bad
  // word ids: InvalidArgument, nothing added
  Batch more;
  for (int i = 0; i < 3; ++i) gen.entry(more, 0.3, false);
  const int64_t bad_ids[][3] = {{500, 501, 103}, {500, 501, 500}, {500, -1, 502}};
  for (const auto& bi : bad_ids) {
    threw = false;
    try {
      ivf.add(more.view(), bi);
    } catch (const InvalidArgument&) {
      threw = true;
    }
    EXPECT(threw && unchanged() && !ivf.contains(500));
  }
  Batch badw = more;
  badw.words[0] = 30;  // out of range
  const int64_t ok_ids[] = {600, 601, 602};
  threw = false;
  try {
    ivf.add(badw.view(), ok_ids);
  } catch (const InvalidArgument&) {
    threw = true;
  }
  EXPECT(threw && unchanged() && !ivf.contains(600));
  // plain search / score_all on a multi-entry file are refused; search_pooled on a plain one too
  InvertedFile multi(30, 128, true, true);
  threw = false;
  try {
    multi.search(q.view(), 5, p);
  } catch (const std::exception&) {
    threw = true;
  }
  EXPECT(threw);
  threw = false;
  try {
    ivf.search_pooled(q.view(), false, 5, p);
  } catch (const std::exception&) {
    threw = true;
  }
  EXPECT(threw && unchanged());
  // an empty index answers with empty results
  InvertedFile empty(30, 128, true);
  const TopK e = empty.search(q.view(), 5, p);
  EXPECT(e.n_queries == 2 && e.k == 0 && e.scores.empty() && e.ids.empty());
  const AllScores ea = empty.score_all(q.view(), p);
  EXPECT(ea.ids.empty() && ea.scores.empty());
  // remove everything, then the index is empty and searchable; removing again throws
  EXPECT(ivf.remove(static_cast<int64_t>(b.ids.size()), b.ids.data()) == 12);
  EXPECT(ivf.n_images() == 0 && ivf.n_entries() == 0 && ivf.search(q.view(), -1, p).k == 0);
  threw = false;
  try {
    ivf.remove(1, b.ids.data());
  } catch (const NotFound&) {
    threw = true;
  }
  EXPECT(threw && ivf.n_images() == 0);
  // the same id twice in one remove: refused with nothing removed, or the image removed once
  InvertedFile two(30, 128, true);
  two.add(b.view(), b.ids.data());
  const int64_t twice[] = {103, 103};
  try {
    const int64_t n = two.remove(2, twice);
    EXPECT_MSG(n == 1 && !two.contains(103) && two.n_images() == 11,
               "remove({103, 103}) returned " + std::to_string(n));
  } catch (const std::exception&) {
    EXPECT(two.contains(103) && two.n_images() == 12);
  }
}

static void test_concurrent_default_ids() {
  // Two threads adding with default ids never receive the same id.
  Gen gen(13, 16, 64, true);
  Batch b;
  for (int i = 0; i < 4; ++i) gen.entry(b, 0.4, false);
  InvertedFile ivf(16, 64, true);
  std::vector<int64_t> got[2];
  std::vector<std::thread> th;
  for (int t = 0; t < 2; ++t)
    th.emplace_back([&, t] {
      guarded("default-id adder", [&] {
        for (int i = 0; i < 40; ++i) {
          auto ids = ivf.add(b.view(), nullptr);
          got[t].insert(got[t].end(), ids.begin(), ids.end());
        }
      });
    });
  for (auto& x : th) x.join();
  std::set<int64_t> all(got[0].begin(), got[0].end());
  all.insert(got[1].begin(), got[1].end());
  EXPECT(all.size() == 320 && ivf.n_images() == 320 && *all.begin() == 0 && *all.rbegin() == 319);
}

int main(int argc, char** argv) {
  const auto t0 = std::chrono::steady_clock::now();
  // scale > 1: a longer run (e.g. `d2r_cpp_concurrency 4` when hunting a race)
  const int scale = argc > 1 ? std::max(1, std::atoi(argv[1])) : 1;
  test_default_ids();
  test_failed_writers_leave_index_unchanged();
  test_concurrent_default_ids();
  OpCounts ops;
  stress_plain(StressConfig{true, 128, 64, 4, 40 * scale + 40, 8, 120 * scale, 4}, 1, ops);  // ASMK*: binary codes
  stress_plain(StressConfig{false, 24, 40, 3, 24 * scale + 12, 6, 60 * scale, 4}, 2, ops);  // ASMK: float codes
  stress_multi(3, 80 * scale, 4, scale, ops);                                                // regional, pooled
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "operations: search(1 query, k=5) %ld, search(6 queries, k=5) %ld, search(k=-1) %ld, score_all %ld, "
      "search_pooled %ld, accessor rounds %ld (%ld reads while the writers ran), adds %ld (+%ld refused), "
      "removes %ld (+%ld refused); %.2f s\n",
      ops.search1.load(), ops.search_many.load(), ops.search_all.load(), ops.score_all.load(), ops.pooled.load(),
      ops.accessors.load(), ops.during_writes.load(), ops.adds.load(), ops.failed_adds.load(), ops.removes.load(),
      ops.failed_removes.load(),
      secs);
  std::printf("%ld passed, %ld failed\n", g_pass.load(), g_fail.load());
  return g_fail == 0 ? 0 : 1;
}
