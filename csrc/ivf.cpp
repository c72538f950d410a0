#include "ivf.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>

#include "binarize.h"
#include "common.h"
#include "fixed_point.h"
#include "reduce.h"
#include "selectivity.h"
#include "topk.h"

namespace d2r {

InvertedFile::InvertedFile(int64_t n_words, int dim, bool binary)
    : n_words_(n_words), dim_(dim), binary_(binary) {
  D2R_CHECK(n_words > 0, "the inverted file needs at least one visual word");
  D2R_CHECK(dim > 0, "descriptor dimension must be positive");
  code_bytes_ = binary ? packed_bytes(dim) : dim * static_cast<int>(sizeof(float));
  own_off_.assign(n_words + 1, 0);
  off_ = own_off_.data();
  dslot_.resize(n_words);
  dcode_.resize(n_words);
}

int64_t InvertedFile::n_images() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return static_cast<int64_t>(slot_ids_.size());
}

int64_t InvertedFile::n_entries() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return off_[n_words_] + delta_entries_;
}

size_t InvertedFile::memory_bytes() const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  size_t b = sizeof(int64_t) * (n_words_ + 1);
  b += static_cast<size_t>(off_[n_words_]) * (sizeof(uint32_t) + code_bytes_);
  b += static_cast<size_t>(delta_entries_) * (sizeof(uint32_t) + code_bytes_);
  b += dslot_.size() * 2 * sizeof(std::vector<uint32_t>);
  b += slot_ids_.size() * (sizeof(int64_t) + sizeof(int32_t));
  b += slot_of_id_.size() * (sizeof(int64_t) + sizeof(uint32_t) + 2 * sizeof(void*));
  return b;
}

bool InvertedFile::contains(int64_t id) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return slot_of_id_.count(id) != 0;
}

int64_t InvertedFile::result_k(int64_t k) const {
  const int64_t n = n_images();
  return (k < 0 || k > n) ? n : k;
}

void InvertedFile::check_codes(const CodesView& v) const {
  D2R_CHECK(v.n >= 0, "negative number of images");
  D2R_CHECK(v.offsets[0] == 0, "word offsets must start at 0");
  for (int64_t i = 0; i < v.n; ++i) {
    D2R_CHECK(v.offsets[i + 1] >= v.offsets[i], "word offsets must be non-decreasing");
    for (int64_t e = v.offsets[i]; e < v.offsets[i + 1]; ++e) {
      D2R_CHECK(v.words[e] >= 0 && v.words[e] < n_words_, "visual word id out of range [0, n_words)");
      D2R_CHECK(e == v.offsets[i] || v.words[e] > v.words[e - 1],
                "the words of an image must be strictly ascending (sorted, no duplicates)");
    }
  }
}

void InvertedFile::add(const CodesView& images, const int64_t* ids) {
  check_codes(images);
  std::unique_lock<std::shared_mutex> lock(mutex_);
  {
    std::unordered_map<int64_t, int64_t> seen;
    for (int64_t i = 0; i < images.n; ++i) {
      D2R_CHECK(ids[i] >= 0, "image ids must be non-negative");
      D2R_CHECK(slot_of_id_.count(ids[i]) == 0, "image id " + std::to_string(ids[i]) + " is already in the index");
      D2R_CHECK(seen.emplace(ids[i], i).second, "duplicate image id " + std::to_string(ids[i]) + " in one add");
    }
  }
  D2R_CHECK(static_cast<int64_t>(slot_ids_.size()) + images.n <= static_cast<int64_t>(UINT32_MAX),
            "too many images for one inverted file");
  const uint32_t first = static_cast<uint32_t>(slot_ids_.size());
  for (int64_t i = 0; i < images.n; ++i) {
    slot_of_id_.emplace(ids[i], first + static_cast<uint32_t>(i));
    slot_ids_.push_back(ids[i]);
    slot_nwords_.push_back(static_cast<int32_t>(images.offsets[i + 1] - images.offsets[i]));
  }
  // Bucket the new entries by word (counting sort), then append per word in parallel.
  const int64_t total = images.offsets[images.n];
  std::vector<int64_t> start(n_words_ + 1, 0);
  for (int64_t e = 0; e < total; ++e) start[images.words[e] + 1]++;
  for (int64_t w = 0; w < n_words_; ++w) start[w + 1] += start[w];
  std::vector<int64_t> order(total);  // entry index grouped by word, image order within a word
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < total; ++e) order[fill[images.words[e]]++] = e;
  }
  std::vector<uint32_t> slot_of_entry(total);
  for (int64_t i = 0; i < images.n; ++i)
    for (int64_t e = images.offsets[i]; e < images.offsets[i + 1]; ++e) slot_of_entry[e] = first + static_cast<uint32_t>(i);
  const int cb = code_bytes_;
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t w = 0; w < n_words_; ++w) {
    const int64_t b = start[w], e = start[w + 1];
    if (b == e) continue;
    auto& ds = dslot_[w];
    auto& dc = dcode_[w];
    ds.reserve(ds.size() + (e - b));
    dc.reserve(dc.size() + (e - b) * cb);
    for (int64_t j = b; j < e; ++j) {
      ds.push_back(slot_of_entry[order[j]]);
      const uint8_t* c = images.codes + order[j] * cb;
      dc.insert(dc.end(), c, c + cb);
    }
  }
  delta_entries_ += total;
  if (delta_entries_ >= off_[n_words_]) rebuild(nullptr);
}

void InvertedFile::rebuild(const std::vector<int64_t>* new_slot_of_old) {
  // Caller holds the unique lock. Combines main and delta (dropping slots mapped to -1).
  const int cb = code_bytes_;
  std::vector<int64_t> noff(n_words_ + 1, 0);
  auto keep = [&](uint32_t s) { return !new_slot_of_old || (*new_slot_of_old)[s] >= 0; };
#pragma omp parallel for schedule(dynamic, 1024)
  for (int64_t w = 0; w < n_words_; ++w) {
    int64_t c = 0;
    for (int64_t j = off_[w]; j < off_[w + 1]; ++j) c += keep(slot_[j]);
    for (uint32_t s : dslot_[w]) c += keep(s);
    noff[w + 1] = c;
  }
  for (int64_t w = 0; w < n_words_; ++w) noff[w + 1] += noff[w];
  std::vector<uint32_t> nslot(noff[n_words_]);
  std::vector<uint8_t> ncode(static_cast<size_t>(noff[n_words_]) * cb);
  auto map = [&](uint32_t s) { return new_slot_of_old ? static_cast<uint32_t>((*new_slot_of_old)[s]) : s; };
#pragma omp parallel for schedule(dynamic, 1024)
  for (int64_t w = 0; w < n_words_; ++w) {
    int64_t o = noff[w];
    for (int64_t j = off_[w]; j < off_[w + 1]; ++j) {
      if (!keep(slot_[j])) continue;
      nslot[o] = map(slot_[j]);
      std::memcpy(ncode.data() + o * cb, code_ + j * cb, cb);
      ++o;
    }
    const auto& ds = dslot_[w];
    for (size_t j = 0; j < ds.size(); ++j) {
      if (!keep(ds[j])) continue;
      nslot[o] = map(ds[j]);
      std::memcpy(ncode.data() + o * cb, dcode_[w].data() + j * cb, cb);
      ++o;
    }
    std::vector<uint32_t>().swap(dslot_[w]);
    std::vector<uint8_t>().swap(dcode_[w]);
  }
  own_off_.swap(noff);
  own_slot_.swap(nslot);
  own_code_.swap(ncode);
  off_ = own_off_.data();
  slot_ = own_slot_.data();
  code_ = own_code_.data();
  owner_.reset();
  delta_entries_ = 0;
}

void InvertedFile::merge() {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  if (delta_entries_ > 0) rebuild(nullptr);
}

int64_t InvertedFile::remove(int64_t n, const int64_t* ids) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  std::vector<int64_t> new_slot(slot_ids_.size(), 0);
  int64_t removed = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto it = slot_of_id_.find(ids[i]);
    D2R_CHECK(it != slot_of_id_.end(), "image id " + std::to_string(ids[i]) + " is not in the index");
    if (new_slot[it->second] >= 0) ++removed;
    new_slot[it->second] = -1;
  }
  if (removed == 0) return 0;
  int64_t next = 0;
  std::vector<int64_t> nids;
  std::vector<int32_t> nwords;
  nids.reserve(slot_ids_.size() - removed);
  nwords.reserve(slot_ids_.size() - removed);
  for (size_t s = 0; s < slot_ids_.size(); ++s) {
    if (new_slot[s] < 0) continue;
    new_slot[s] = next++;
    nids.push_back(slot_ids_[s]);
    nwords.push_back(slot_nwords_[s]);
  }
  rebuild(&new_slot);
  slot_ids_.swap(nids);
  slot_nwords_.swap(nwords);
  slot_of_id_.clear();
  for (size_t s = 0; s < slot_ids_.size(); ++s) slot_of_id_.emplace(slot_ids_[s], static_cast<uint32_t>(s));
  return removed;
}

void InvertedFile::set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes,
                               int64_t n_images, const int64_t* image_ids, const int32_t* word_counts,
                               std::shared_ptr<const void> owner) {
  D2R_CHECK(offsets[0] == 0, "corrupt index: posting offsets must start at 0");
  for (int64_t w = 0; w < n_words_; ++w)
    D2R_CHECK(offsets[w + 1] >= offsets[w], "corrupt index: posting offsets must be non-decreasing");
  std::vector<int64_t> counted(n_images, 0);
  for (int64_t w = 0; w < n_words_; ++w) {
    for (int64_t j = offsets[w]; j < offsets[w + 1]; ++j) {
      D2R_CHECK(slots[j] < static_cast<uint64_t>(n_images), "corrupt index: posting slot out of range");
      D2R_CHECK(j == offsets[w] || slots[j] > slots[j - 1], "corrupt index: posting list not sorted by slot");
      counted[slots[j]]++;
    }
  }
  std::unordered_map<int64_t, uint32_t> map;
  for (int64_t s = 0; s < n_images; ++s) {
    D2R_CHECK(counted[s] == word_counts[s], "corrupt index: word count of an image does not match its postings");
    D2R_CHECK(image_ids[s] >= 0 && map.emplace(image_ids[s], static_cast<uint32_t>(s)).second,
              "corrupt index: negative or duplicate image id");
  }
  std::unique_lock<std::shared_mutex> lock(mutex_);
  for (int64_t w = 0; w < n_words_; ++w) {
    std::vector<uint32_t>().swap(dslot_[w]);
    std::vector<uint8_t>().swap(dcode_[w]);
  }
  delta_entries_ = 0;
  own_off_.clear();
  own_slot_.clear();
  own_code_.clear();
  off_ = offsets;
  slot_ = slots;
  code_ = codes;
  owner_ = std::move(owner);
  slot_ids_.assign(image_ids, image_ids + n_images);
  slot_nwords_.assign(word_counts, word_counts + n_images);
  slot_of_id_.swap(map);
}

std::vector<int64_t> fixed_hamming_table(int dim, int code_bytes, float alpha, float tau) {
  const int bits = 8 * code_bytes;
  const int denom = hamming_denominator(dim, code_bytes);
  std::vector<int64_t> t(bits + 1);
  for (int h = 0; h <= bits; ++h) t[h] = score_to_fixed(selectivity(hamming_similarity(h, denom), alpha, tau));
  return t;
}

std::vector<int64_t> InvertedFile::hamming_table(const ScoreParams& p) const {
  return fixed_hamming_table(dim_, code_bytes_, p.alpha, p.tau);
}

namespace {

// First index j in [b, e) with slots[j] >= lo.
inline int64_t lower(const uint32_t* slots, int64_t b, int64_t e, int64_t lo) {
  if (lo == 0) return b;
  return std::lower_bound(slots + b, slots + e, static_cast<uint32_t>(lo)) - slots;
}

inline int hamming16(const uint8_t* a, const uint8_t* b) {
  uint64_t a0, a1, b0, b1;
  std::memcpy(&a0, a, 8);
  std::memcpy(&a1, a + 8, 8);
  std::memcpy(&b0, b, 8);
  std::memcpy(&b1, b + 8, 8);
  return __builtin_popcountll(a0 ^ b0) + __builtin_popcountll(a1 ^ b1);
}

inline float dot(const float* a, const uint8_t* braw, int dim) {
  float s = 0.0f;
  const float* b = reinterpret_cast<const float*>(braw);
  for (int t = 0; t < dim; ++t) s = fmaf_if_fused(a[t], b[t], s);  // as the GPU scoring rounds
  return s;
}

}  // namespace

void InvertedFile::score_query(const CodesView& q, int64_t qi, const ScoreParams& p, const int64_t* table,
                               int64_t slot_lo, int64_t slot_hi, float* scores) const {
  // scores covers slots [slot_lo, slot_hi). Contributions are summed in 64-bit fixed point
  // (fixed_point.h), exactly as the CUDA path sums them.
  const int64_t n_slots = slot_hi - slot_lo;
  const int64_t qb = q.offsets[qi], qe = q.offsets[qi + 1];
  const int64_t nq_words = qe - qb;
  if (nq_words == 0) {
    std::fill(scores, scores + n_slots, -1.0f);
    return;
  }
  thread_local std::vector<int64_t> acc_buf;
  acc_buf.assign(static_cast<size_t>(n_slots), 0);
  int64_t* acc = acc_buf.data();
  const int cb = code_bytes_;
  const int dim = dim_;
  const bool full = slot_lo == 0 && slot_hi == static_cast<int64_t>(slot_ids_.size());
  auto scan = [&](const uint32_t* slots, const uint8_t* codes, int64_t b, int64_t e, const uint8_t* qc) {
    if (!full) {
      b = lower(slots, b, e, slot_lo);
      e = lower(slots, b, e, slot_hi);
    }
    if (binary_) {
      if (cb == 16) {
        for (int64_t j = b; j < e; ++j) acc[slots[j] - slot_lo] += table[hamming16(qc, codes + j * 16)];
      } else {
        for (int64_t j = b; j < e; ++j) acc[slots[j] - slot_lo] += table[hamming(qc, codes + j * cb, cb)];
      }
    } else {
      float qv[1024];
      const float* qf = reinterpret_cast<const float*>(qc);
      if (dim <= 1024) {
        std::memcpy(qv, qc, sizeof(float) * dim);
        qf = qv;
      }
      for (int64_t j = b; j < e; ++j)
        acc[slots[j] - slot_lo] += score_to_fixed(selectivity(dot(qf, codes + j * cb, dim), p.alpha, p.tau));
    }
  };
  for (int64_t e = qb; e < qe; ++e) {
    const int32_t w = q.words[e];
    const uint8_t* qc = q.codes + e * cb;
    scan(slot_, code_, off_[w], off_[w + 1], qc);
    if (!dslot_[w].empty())
      scan(dslot_[w].data(), dcode_[w].data(), 0, static_cast<int64_t>(dslot_[w].size()), qc);
  }
  for (int64_t s = 0; s < n_slots; ++s) {
    const int32_t nw = slot_nwords_[slot_lo + s];
    if (nw == 0) {
      scores[s] = -1.0f;
      continue;
    }
    scores[s] = score_from_fixed(acc[s]);
    if (p.normalize) scores[s] *= gamma_pair(nq_words, nw);
  }
}

void InvertedFile::score_all(const CodesView& queries, const ScoreParams& p, float* out) const {
  check_codes(queries);
  std::shared_lock<std::shared_mutex> lock(mutex_);
  const int64_t n = static_cast<int64_t>(slot_ids_.size());
  const std::vector<int64_t> table = binary_ ? hamming_table(p) : std::vector<int64_t>();
  if (queries.n >= num_threads()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t qi = 0; qi < queries.n; ++qi) score_query(queries, qi, p, table.data(), 0, n, out + qi * n);
  } else {
    for (int64_t qi = 0; qi < queries.n; ++qi) {
#pragma omp parallel
      {
        const int64_t T = num_threads(), t = thread_id();
        const int64_t lo = n * t / T, hi = n * (t + 1) / T;
        score_query(queries, qi, p, table.data(), lo, hi, out + qi * n + lo);
      }
    }
  }
}

void InvertedFile::search(const CodesView& queries, int64_t k, const ScoreParams& p, float* out_scores,
                          int64_t* out_ids) const {
  check_codes(queries);
  std::shared_lock<std::shared_mutex> lock(mutex_);
  const int64_t n = static_cast<int64_t>(slot_ids_.size());
  const int64_t kk = (k < 0 || k > n) ? n : k;
  if (kk == 0) return;
  const std::vector<int64_t> table = binary_ ? hamming_table(p) : std::vector<int64_t>();
  const int T = num_threads();
  if (queries.n >= T) {
#pragma omp parallel
    {
      std::vector<float> scores(n);
#pragma omp for schedule(dynamic, 1)
      for (int64_t qi = 0; qi < queries.n; ++qi) {
        score_query(queries, qi, p, table.data(), 0, n, scores.data());
        topk(scores.data(), slot_ids_.data(), n, kk, out_scores + qi * kk, out_ids + qi * kk);
      }
    }
    return;
  }
  // Few queries: split each query's posting lists by slot range across the threads, then merge the
  // per-range top-k lists.
  std::vector<float> scores(n);
  std::vector<float> cand_s(static_cast<size_t>(T) * kk);
  std::vector<int64_t> cand_i(static_cast<size_t>(T) * kk);
  std::vector<int64_t> cand_n(T, 0);
  for (int64_t qi = 0; qi < queries.n; ++qi) {
#pragma omp parallel num_threads(T)
    {
      const int64_t nt = num_threads(), t = thread_id();
      const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
      score_query(queries, qi, p, table.data(), lo, hi, scores.data() + lo);
      const int64_t kt = std::min(kk, hi - lo);
      topk(scores.data() + lo, slot_ids_.data() + lo, hi - lo, kt, cand_s.data() + t * kk, cand_i.data() + t * kk);
      cand_n[t] = kt;
    }
    // Compact the candidates and select the final k.
    std::vector<float> cs;
    std::vector<int64_t> ci;
    for (int t = 0; t < T; ++t) {
      cs.insert(cs.end(), cand_s.begin() + t * kk, cand_s.begin() + t * kk + cand_n[t]);
      ci.insert(ci.end(), cand_i.begin() + t * kk, cand_i.begin() + t * kk + cand_n[t]);
      cand_n[t] = 0;
    }
    topk(cs.data(), ci.data(), static_cast<int64_t>(cs.size()), kk, out_scores + qi * kk, out_ids + qi * kk);
  }
}

void InvertedFile::search_pooled(const CodesView& queries, const int64_t* slot_group, int64_t n_groups,
                                 const int64_t* group_ids, bool mean, int64_t k, const ScoreParams& p,
                                 float* out_scores, int64_t* out_ids) const {
  check_codes(queries);
  std::shared_lock<std::shared_mutex> lock(mutex_);
  const int64_t n = static_cast<int64_t>(slot_ids_.size());
  D2R_CHECK(n_groups >= 0, "negative number of groups");
  std::vector<int64_t> count(n_groups, 0);
  for (int64_t s = 0; s < n; ++s) {
    D2R_CHECK(slot_group[s] >= 0 && slot_group[s] < n_groups, "region group out of range");
    count[slot_group[s]]++;
  }
  for (int64_t g = 0; g < n_groups; ++g) D2R_CHECK(count[g] > 0, "a group without regions");
  const int64_t kk = (k < 0 || k > n_groups) ? n_groups : k;
  if (kk == 0) return;
  const std::vector<int64_t> table = binary_ ? hamming_table(p) : std::vector<int64_t>();
  auto pool_and_rank = [&](const float* scores, std::vector<double>& acc, std::vector<float>& pooled, int64_t qi) {
    if (mean) {
      acc.assign(n_groups, 0.0);
      for (int64_t s = 0; s < n; ++s) acc[slot_group[s]] += scores[s];
      for (int64_t g = 0; g < n_groups; ++g) pooled[g] = static_cast<float>(acc[g] / static_cast<double>(count[g]));
    } else {
      std::fill(pooled.begin(), pooled.end(), -std::numeric_limits<float>::infinity());
      for (int64_t s = 0; s < n; ++s) pooled[slot_group[s]] = std::max(pooled[slot_group[s]], scores[s]);
    }
    topk(pooled.data(), group_ids, n_groups, kk, out_scores + qi * kk, out_ids + qi * kk);
  };
  if (queries.n >= num_threads()) {
#pragma omp parallel
    {
      std::vector<float> scores(n), pooled(n_groups);
      std::vector<double> acc;
#pragma omp for schedule(dynamic, 1)
      for (int64_t qi = 0; qi < queries.n; ++qi) {
        score_query(queries, qi, p, table.data(), 0, n, scores.data());
        pool_and_rank(scores.data(), acc, pooled, qi);
      }
    }
    return;
  }
  std::vector<float> scores(n), pooled(n_groups);
  std::vector<double> acc;
  for (int64_t qi = 0; qi < queries.n; ++qi) {
#pragma omp parallel
    {
      const int64_t T = num_threads(), t = thread_id();
      const int64_t lo = n * t / T, hi = n * (t + 1) / T;
      score_query(queries, qi, p, table.data(), lo, hi, scores.data() + lo);
    }
    pool_and_rank(scores.data(), acc, pooled, qi);
  }
}

}  // namespace d2r
