#include "ivf.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "binarize.h"
#include "common.h"
#include "fixed_point.h"
#include "parallel.h"
#include "reduce.h"
#include "selectivity.h"
#include "topk.h"

namespace d2r {

namespace {

constexpr int64_t kMaxId = int64_t{1} << 62;  // ids stay far from int64 overflow (next_id = max + 1)
constexpr size_t kMaxSegments = 16;

std::string id_str(int64_t id) { return std::to_string(id); }

}  // namespace

void check_codes(const CodesView& v, int64_t n_words) {
  D2R_CHECK(v.n >= 0, "negative number of images");
  D2R_CHECK(v.offsets[0] == 0, "word offsets must start at 0");
  for (int64_t i = 0; i < v.n; ++i) {
    D2R_CHECK(v.offsets[i + 1] >= v.offsets[i], "word offsets must be non-decreasing");
    for (int64_t e = v.offsets[i]; e < v.offsets[i + 1]; ++e) {
      D2R_CHECK(v.words[e] >= 0 && v.words[e] < n_words, "visual word id out of range [0, n_words)");
      D2R_CHECK(e == v.offsets[i] || v.words[e] > v.words[e - 1],
                "the words of an image must be strictly ascending (sorted, no duplicates)");
    }
  }
}

size_t Segment::owned_bytes() const {
  return own_off.size() * sizeof(int64_t) + own_slot.size() * sizeof(uint32_t) + own_code.size();
}

size_t SlotTable::bytes() const {
  return ids.size() * sizeof(int64_t) + nwords.size() * sizeof(int32_t) + by_id.size() * sizeof(by_id[0]);
}

InvertedFile::InvertedFile(int64_t n_words, int dim, bool binary, bool multi_entry)
    : n_words_(n_words), dim_(dim), binary_(binary), multi_entry_(multi_entry) {
  D2R_CHECK(n_words > 0, "the inverted file needs at least one visual word");
  D2R_CHECK(dim > 0, "descriptor dimension must be positive");
  code_bytes_ = binary ? packed_bytes(dim) : dim * static_cast<int>(sizeof(float));
  auto empty = std::make_shared<Segment>();
  empty->own_off.assign(n_words + 1, 0);
  empty->off = empty->own_off.data();
  auto s = std::make_shared<Snapshot>();
  s->segments.push_back(std::move(empty));
  s->slots = std::make_shared<SlotTable>();
  snap_ = std::move(s);
}

std::shared_ptr<const Snapshot> InvertedFile::pin() const {
  std::lock_guard<std::mutex> lock(snap_mutex_);
  return snap_;
}

void InvertedFile::publish(std::shared_ptr<const Snapshot> s) {
  // The old snapshot is released after the pointer mutex (its owner's deleter runs no Python).
  std::lock_guard<std::mutex> lock(snap_mutex_);
  snap_.swap(s);
}

size_t InvertedFile::memory_bytes() const {
  auto s = pin();
  size_t b = s->slots->bytes();
  for (const auto& seg : s->segments) {
    b += seg->owned_bytes();
    if (seg->owner) b += static_cast<size_t>(seg->n_entries) * (sizeof(uint32_t) + code_bytes_);  // mapped
  }
  return b;
}

bool InvertedFile::contains(int64_t id) const {
  auto s = pin();
  const auto& by = s->slots->by_id;
  auto it = std::lower_bound(by.begin(), by.end(), std::make_pair(id, uint32_t{0}));
  return it != by.end() && it->first == id;
}

std::vector<int64_t> InvertedFile::image_ids() const {
  auto s = pin();
  const auto& ids = s->slots->ids;
  std::vector<int64_t> out;
  out.reserve(s->slots->n_images);
  for (size_t i = 0; i < ids.size(); ++i)
    if (i == 0 || ids[i] != ids[i - 1]) out.push_back(ids[i]);
  return out;
}

void InvertedFile::check_no_multi(const char* what) const {
  D2R_CHECK(!multi_entry_, std::string(what) + " is not available on a multi-entry (regional) inverted file: "
                                               "use pooled search");
}

// ---- building segments ---------------------------------------------------------------------------

std::shared_ptr<Segment> InvertedFile::build_segment(const CodesView& v, int64_t first_slot) const {
  auto seg = std::make_shared<Segment>();
  const int64_t total = v.offsets[v.n];
  seg->slot_begin = first_slot;
  seg->slot_end = first_slot + v.n;
  seg->n_entries = total;
  seg->own_off.assign(n_words_ + 1, 0);
  for (int64_t e = 0; e < total; ++e) seg->own_off[v.words[e] + 1]++;
  for (int64_t w = 0; w < n_words_; ++w) seg->own_off[w + 1] += seg->own_off[w];
  seg->own_slot.resize(total);
  seg->own_code.resize(static_cast<size_t>(total) * code_bytes_);
  std::vector<int64_t> fill(seg->own_off.begin(), seg->own_off.end() - 1);
  const size_t cb = code_bytes_;
  for (int64_t i = 0; i < v.n; ++i) {  // image order: every posting list stays sorted by slot
    for (int64_t e = v.offsets[i]; e < v.offsets[i + 1]; ++e) {
      const int64_t o = fill[v.words[e]]++;
      seg->own_slot[o] = static_cast<uint32_t>(first_slot + i);
      std::memcpy(seg->own_code.data() + o * cb, v.codes + e * cb, cb);
    }
  }
  seg->off = seg->own_off.data();
  seg->slot = seg->own_slot.data();
  seg->code = seg->own_code.data();
  return seg;
}

std::shared_ptr<Segment> InvertedFile::merge_segments(const std::vector<std::shared_ptr<const Segment>>& parts,
                                                      const std::vector<int64_t>* new_slot_of_old,
                                                      int64_t n_kept) const {
  // Concatenates the parts' posting lists word by word (parts cover ascending slot ranges, so lists
  // stay sorted); with new_slot_of_old, drops slots mapped to -1 and renumbers the others.
  auto keep = [&](uint32_t s) { return !new_slot_of_old || (*new_slot_of_old)[s] >= 0; };
  auto map = [&](uint32_t s) { return new_slot_of_old ? static_cast<uint32_t>((*new_slot_of_old)[s]) : s; };
  auto seg = std::make_shared<Segment>();
  seg->slot_begin = new_slot_of_old ? 0 : parts.front()->slot_begin;
  seg->slot_end = new_slot_of_old ? n_kept : parts.back()->slot_end;
  seg->own_off.assign(n_words_ + 1, 0);
  int64_t* noff = seg->own_off.data();
  parallel_for(n_words_, 1024, [&](int64_t w) {
    int64_t c = 0;
    for (const auto& p : parts) {
      if (!new_slot_of_old) {
        c += p->off[w + 1] - p->off[w];
      } else {
        for (int64_t j = p->off[w]; j < p->off[w + 1]; ++j) c += keep(p->slot[j]);
      }
    }
    noff[w + 1] = c;
  });
  for (int64_t w = 0; w < n_words_; ++w) noff[w + 1] += noff[w];
  seg->n_entries = noff[n_words_];
  seg->own_slot.resize(seg->n_entries);
  seg->own_code.resize(static_cast<size_t>(seg->n_entries) * code_bytes_);
  uint32_t* nslot = seg->own_slot.data();
  uint8_t* ncode = seg->own_code.data();
  const size_t cb = code_bytes_;
  parallel_for(n_words_, 1024, [&](int64_t w) {
    int64_t o = noff[w];
    for (const auto& p : parts) {
      for (int64_t j = p->off[w]; j < p->off[w + 1]; ++j) {
        if (!keep(p->slot[j])) continue;
        nslot[o] = map(p->slot[j]);
        std::memcpy(ncode + o * cb, p->code + j * cb, cb);
        ++o;
      }
    }
  });
  seg->off = seg->own_off.data();
  seg->slot = seg->own_slot.data();
  seg->code = seg->own_code.data();
  return seg;
}

void InvertedFile::compact_segments(std::vector<std::shared_ptr<const Segment>>& segs) const {
  // LSM-style: the newest segment merges with the one before while it is at least half its size, and
  // everything merges beyond kMaxSegments; so segments have geometric sizes and a posting is copied
  // O(log n) times.
  while (segs.size() >= 2) {
    const auto& last = segs[segs.size() - 1];
    const auto& prev = segs[segs.size() - 2];
    if (segs.size() <= kMaxSegments && last->n_entries * 2 < prev->n_entries) break;
    if (segs.size() > kMaxSegments) {
      segs = {merge_segments(segs, nullptr, 0)};
      break;
    }
    auto merged = merge_segments({prev, last}, nullptr, 0);
    segs.pop_back();
    segs.back() = std::move(merged);
  }
}

// ---- writers ------------------------------------------------------------------------------------

std::vector<int64_t> InvertedFile::add(const CodesView& images, const int64_t* ids, const int64_t* auto_index) {
  check_codes(images, n_words_);
  const int64_t n = images.n;
  D2R_CHECK(multi_entry_ || auto_index == nullptr, "auto_index is for multi-entry inverted files");
  if (auto_index) {
    for (int64_t e = 0; e < n; ++e) {
      const int64_t step = e == 0 ? auto_index[0] : auto_index[e] - auto_index[e - 1];
      D2R_CHECK(step == 0 || step == 1, "auto_index must start at 0 and grow by 0 or 1");
    }
  }
  std::lock_guard<std::mutex> writer(write_mutex_);
  const auto cur = pin();
  const SlotTable& old = *cur->slots;
  const int64_t first = cur->n_slots();
  D2R_CHECK(first + n <= static_cast<int64_t>(UINT32_MAX), "too many entries for one inverted file (2^32)");

  std::vector<int64_t> new_ids(n);
  if (ids) {
    std::copy(ids, ids + n, new_ids.begin());
  } else {
    for (int64_t e = 0; e < n; ++e) new_ids[e] = cur->next_id + (auto_index ? auto_index[e] : e);
  }
  // New (id, slot) pairs, sorted; checks: valid, not in the index, unique (multi-entry: one run each).
  std::vector<std::pair<int64_t, uint32_t>> add_pairs(n);
  for (int64_t e = 0; e < n; ++e) {
    D2R_CHECK(new_ids[e] >= 0 && new_ids[e] < kMaxId, "image ids must be in [0, 2^62), got " + id_str(new_ids[e]));
    add_pairs[e] = {new_ids[e], static_cast<uint32_t>(first + e)};
  }
  std::sort(add_pairs.begin(), add_pairs.end());
  for (int64_t e = 1; e < n; ++e) {
    if (add_pairs[e].first != add_pairs[e - 1].first) continue;
    D2R_CHECK(multi_entry_, "duplicate image id " + id_str(add_pairs[e].first) + " in one add");
    D2R_CHECK(add_pairs[e].second == add_pairs[e - 1].second + 1,
              "the entries of image " + id_str(add_pairs[e].first) + " must be consecutive");
  }
  for (int64_t e = 0; e < n; ++e) {
    if (e > 0 && add_pairs[e].first == add_pairs[e - 1].first) continue;
    auto it = std::lower_bound(old.by_id.begin(), old.by_id.end(), std::make_pair(add_pairs[e].first, uint32_t{0}));
    D2R_CHECK(it == old.by_id.end() || it->first != add_pairs[e].first,
              "image id " + id_str(add_pairs[e].first) + " is already in the index");
  }

  // Build the new snapshot beside the current one; nothing is published until it is complete.
  auto table = std::make_shared<SlotTable>();
  table->ids.reserve(first + n);
  table->ids = old.ids;
  table->ids.insert(table->ids.end(), new_ids.begin(), new_ids.end());
  table->nwords.reserve(first + n);
  table->nwords = old.nwords;
  for (int64_t i = 0; i < n; ++i) table->nwords.push_back(static_cast<int32_t>(images.offsets[i + 1] - images.offsets[i]));
  table->by_id.resize(old.by_id.size() + add_pairs.size());
  std::merge(old.by_id.begin(), old.by_id.end(), add_pairs.begin(), add_pairs.end(), table->by_id.begin());
  int64_t new_images = 0;
  for (int64_t e = 0; e < n; ++e) new_images += (e == 0 || new_ids[e] != new_ids[e - 1]);
  table->n_images = old.n_images + new_images;

  auto next = std::make_shared<Snapshot>();
  next->segments = cur->segments;
  next->segments.push_back(build_segment(images, first));
  compact_segments(next->segments);
  next->slots = std::move(table);
  next->n_entries = cur->n_entries + images.offsets[n];
  next->next_id = cur->next_id;
  if (n) next->next_id = std::max(next->next_id, add_pairs.back().first + 1);
  publish(std::move(next));
  return new_ids;
}

int64_t InvertedFile::remove(int64_t n, const int64_t* ids) {
  std::lock_guard<std::mutex> writer(write_mutex_);
  const auto cur = pin();
  const SlotTable& old = *cur->slots;
  const int64_t n_slots = cur->n_slots();
  std::vector<int64_t> new_slot(n_slots, 0);
  int64_t removed = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto it = std::lower_bound(old.by_id.begin(), old.by_id.end(), std::make_pair(ids[i], uint32_t{0}));
    if (it == old.by_id.end() || it->first != ids[i]) throw NotFound("image id " + id_str(ids[i]) + " is not in the index");
    if (new_slot[it->second] < 0) continue;  // listed twice
    ++removed;
    for (; it != old.by_id.end() && it->first == ids[i]; ++it) new_slot[it->second] = -1;
  }
  if (removed == 0) return 0;
  auto table = std::make_shared<SlotTable>();
  int64_t kept = 0;
  for (int64_t s = 0; s < n_slots; ++s) {
    if (new_slot[s] < 0) continue;
    new_slot[s] = kept++;
  }
  table->ids.reserve(kept);
  table->nwords.reserve(kept);
  for (int64_t s = 0; s < n_slots; ++s) {
    if (new_slot[s] < 0) continue;
    table->ids.push_back(old.ids[s]);
    table->nwords.push_back(old.nwords[s]);
  }
  table->by_id.reserve(kept);
  for (const auto& pr : old.by_id)
    if (new_slot[pr.second] >= 0) table->by_id.emplace_back(pr.first, static_cast<uint32_t>(new_slot[pr.second]));
  table->n_images = old.n_images - removed;
  auto next = std::make_shared<Snapshot>();
  next->segments = {merge_segments(cur->segments, &new_slot, kept)};
  next->n_entries = next->segments[0]->n_entries;
  next->slots = std::move(table);
  next->next_id = cur->next_id;
  publish(std::move(next));
  return removed;
}

std::shared_ptr<const Snapshot> InvertedFile::merged_snapshot() {
  // A reader: merges the pinned snapshot privately (never waits for a writer), and publishes the
  // merged form only if no writer is running and the snapshot is still the current one.
  auto s = pin();
  if (s->segments.size() == 1) return s;
  auto merged = std::make_shared<Snapshot>(*s);
  merged->segments = {merge_segments(s->segments, nullptr, 0)};
  std::unique_lock<std::mutex> writer(write_mutex_, std::try_to_lock);
  if (writer.owns_lock() && pin() == s) publish(merged);
  return merged;
}

void InvertedFile::set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_slots,
                               const int64_t* image_ids, const int32_t* word_counts, int64_t next_id,
                               std::shared_ptr<const void> owner) {
  D2R_CHECK(n_slots >= 0 && n_slots <= static_cast<int64_t>(UINT32_MAX), "corrupt index: number of entries");
  D2R_CHECK(offsets[0] == 0, "corrupt index: posting offsets must start at 0");
  for (int64_t w = 0; w < n_words_; ++w)
    D2R_CHECK(offsets[w + 1] >= offsets[w], "corrupt index: posting offsets must be non-decreasing");
  std::vector<int64_t> counted(n_slots, 0);
  for (int64_t w = 0; w < n_words_; ++w) {
    for (int64_t j = offsets[w]; j < offsets[w + 1]; ++j) {
      D2R_CHECK(slots[j] < static_cast<uint64_t>(n_slots), "corrupt index: posting slot out of range");
      D2R_CHECK(j == offsets[w] || slots[j] > slots[j - 1], "corrupt index: posting list not sorted by slot");
      counted[slots[j]]++;
    }
  }
  auto table = std::make_shared<SlotTable>();
  table->ids.assign(image_ids, image_ids + n_slots);
  table->nwords.assign(word_counts, word_counts + n_slots);
  table->by_id.resize(n_slots);
  int64_t max_id = -1;
  for (int64_t s = 0; s < n_slots; ++s) {
    D2R_CHECK(counted[s] == word_counts[s], "corrupt index: word count of an image does not match its postings");
    D2R_CHECK(image_ids[s] >= 0 && image_ids[s] < kMaxId, "corrupt index: image id out of range");
    table->by_id[s] = {image_ids[s], static_cast<uint32_t>(s)};
    max_id = std::max(max_id, image_ids[s]);
    table->n_images += (s == 0 || image_ids[s] != image_ids[s - 1]);
  }
  std::sort(table->by_id.begin(), table->by_id.end());
  for (int64_t e = 1; e < n_slots; ++e) {
    if (table->by_id[e].first != table->by_id[e - 1].first) continue;
    D2R_CHECK(multi_entry_ && table->by_id[e].second == table->by_id[e - 1].second + 1,
              "corrupt index: duplicate image id " + id_str(table->by_id[e].first));
  }
  D2R_CHECK(next_id > max_id && next_id <= kMaxId, "corrupt index: next_id must exceed every image id");
  auto seg = std::make_shared<Segment>();
  seg->slot_begin = 0;
  seg->slot_end = n_slots;
  seg->n_entries = offsets[n_words_];
  if (owner) {
    seg->off = offsets;
    seg->slot = slots;
    seg->code = codes;
    seg->owner = std::move(owner);
  } else {
    seg->own_off.assign(offsets, offsets + n_words_ + 1);
    seg->own_slot.assign(slots, slots + seg->n_entries);
    seg->own_code.assign(codes, codes + static_cast<size_t>(seg->n_entries) * code_bytes_);
    seg->off = seg->own_off.data();
    seg->slot = seg->own_slot.data();
    seg->code = seg->own_code.data();
  }
  auto next = std::make_shared<Snapshot>();
  next->segments = {std::move(seg)};
  next->n_entries = offsets[n_words_];
  next->slots = std::move(table);
  next->next_id = next_id;
  std::lock_guard<std::mutex> writer(write_mutex_);
  publish(std::move(next));
}

// ---- scoring ------------------------------------------------------------------------------------

std::vector<int64_t> fixed_hamming_table(int dim, int code_bytes, float alpha, float tau) {
  const int bits = 8 * code_bytes;
  const int denom = hamming_denominator(dim, code_bytes);
  std::vector<int64_t> t(bits + 1);
  for (int h = 0; h <= bits; ++h) t[h] = score_to_fixed(selectivity(hamming_similarity(h, denom), alpha, tau));
  return t;
}

std::vector<int64_t> InvertedFile::hamming_table(const ScoreParams& p) const {
  if (!binary_) return {};
  return fixed_hamming_table(dim_, code_bytes_, p.alpha, p.tau);
}

namespace {

// First index j in [b, e) with slots[j] >= lo.
inline int64_t lower(const uint32_t* slots, int64_t b, int64_t e, int64_t lo) {
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

// Results of n_queries queries over n candidates: k results each (k < 0 or k > n: n), zero-filled.
TopK empty_topk(int64_t n_queries, int64_t k, int64_t n) {
  TopK r;
  r.n_queries = n_queries;
  r.k = (k < 0 || k > n) ? n : k;
  r.scores.resize(static_cast<size_t>(n_queries) * r.k);
  r.ids.resize(static_cast<size_t>(n_queries) * r.k);
  return r;
}

// [lo, hi) of range t of T over n items.
inline int64_t range_lo(int64_t n, int t, int T) { return n * t / T; }

}  // namespace

void InvertedFile::score_slots(const Snapshot& s, const CodesView& q, int64_t qi, const ScoreParams& p,
                               const int64_t* table, int64_t slot_lo, int64_t slot_hi, std::vector<int64_t>& acc,
                               float* scores) const {
  // scores covers slots [slot_lo, slot_hi). Contributions are summed in 64-bit fixed point
  // (fixed_point.h), exactly as the CUDA path sums them.
  const int64_t n_slots = slot_hi - slot_lo;
  const int64_t qb = q.offsets[qi], qe = q.offsets[qi + 1];
  const int64_t nq_words = qe - qb;
  if (nq_words == 0) {
    std::fill(scores, scores + n_slots, -1.0f);
    return;
  }
  acc.assign(static_cast<size_t>(n_slots), 0);
  int64_t* a = acc.data();
  const int cb = code_bytes_;
  const int dim = dim_;
  // Float codes need not be unit vectors (Naive-R-ASMK): a sum of nq_words contributions stays exact
  // in fixed point while each |sigma| <= 2^31 / nq_words.
  const float limit = static_cast<float>(2147483648.0 / static_cast<double>(nq_words));
  for (const auto& segp : s.segments) {
    const Segment& seg = *segp;
    if (seg.slot_end <= slot_lo || seg.slot_begin >= slot_hi || seg.n_entries == 0) continue;
    const bool whole = seg.slot_begin >= slot_lo && seg.slot_end <= slot_hi;
    for (int64_t e = qb; e < qe; ++e) {
      const int32_t w = q.words[e];
      const uint8_t* qc = q.codes + e * cb;
      int64_t b = seg.off[w], end = seg.off[w + 1];
      if (b == end) continue;
      if (!whole) {
        b = lower(seg.slot, b, end, slot_lo);
        end = lower(seg.slot, b, end, slot_hi);
      }
      const uint32_t* sl = seg.slot;
      const uint8_t* codes = seg.code;
      if (binary_) {
        if (cb == 16) {
          for (int64_t j = b; j < end; ++j) a[sl[j] - slot_lo] += table[hamming16(qc, codes + j * 16)];
        } else {
          for (int64_t j = b; j < end; ++j) a[sl[j] - slot_lo] += table[hamming(qc, codes + j * cb, cb)];
        }
      } else {
        float qv[1024];
        const float* qf = reinterpret_cast<const float*>(qc);
        if (dim <= 1024) {
          std::memcpy(qv, qc, sizeof(float) * dim);
          qf = qv;
        }
        for (int64_t j = b; j < end; ++j) {
          const float c = selectivity(dot(qf, codes + j * cb, dim), p.alpha, p.tau);
          if (!(std::fabs(c) <= limit))
            throw InvalidArgument("score contribution out of the fixed-point range (codes far from unit length)");
          a[sl[j] - slot_lo] += score_to_fixed(c);
        }
      }
    }
  }
  const int32_t* nwords = s.slots->nwords.data();
  for (int64_t i = 0; i < n_slots; ++i) {
    const int32_t nw = nwords[slot_lo + i];
    if (nw == 0) {
      scores[i] = -1.0f;
      continue;
    }
    scores[i] = score_from_fixed(a[i]);
    if (p.normalize) scores[i] *= gamma_pair(nq_words, nw);
  }
}

void InvertedFile::score_all_into(const Snapshot& s, const CodesView& q, const ScoreParams& p, float* out) const {
  // out: q.n x n. Many queries: one query per thread; few: each query split by slot range.
  const int64_t n = s.n_slots();
  const std::vector<int64_t> table = hamming_table(p);
  if (q.n >= num_threads()) {
    ParallelErrors errors;
#pragma omp parallel
    {
      std::vector<int64_t> acc;
#pragma omp for schedule(dynamic, 1)
      for (int64_t qi = 0; qi < q.n; ++qi)
        errors.run([&] { score_slots(s, q, qi, p, table.data(), 0, n, acc, out + qi * n); });
    }
    errors.rethrow();
    return;
  }
  for (int64_t qi = 0; qi < q.n; ++qi) {
    parallel_team([&](int t, int T) {
      std::vector<int64_t> acc;
      const int64_t lo = range_lo(n, t, T), hi = range_lo(n, t + 1, T);
      score_slots(s, q, qi, p, table.data(), lo, hi, acc, out + qi * n + lo);
    });
  }
}

AllScores InvertedFile::score_all(const CodesView& queries, const ScoreParams& p) const {
  check_no_multi("score_all");
  check_codes(queries, n_words_);
  const auto snap = pin();
  AllScores r;
  r.ids = snap->slots->ids;
  r.scores.resize(static_cast<size_t>(queries.n) * r.ids.size());
  score_all_into(*snap, queries, p, r.scores.data());
  return r;
}

TopK InvertedFile::search(const CodesView& queries, int64_t k, const ScoreParams& p) const {
  check_no_multi("search");
  check_codes(queries, n_words_);
  const auto snap = pin();
  const Snapshot& s = *snap;
  const int64_t n = s.n_slots();
  const int64_t* ids = s.slots->ids.data();
  TopK r = empty_topk(queries.n, k, n);
  const int64_t kk = r.k;
  if (kk == 0 || queries.n == 0) return r;
  const std::vector<int64_t> table = hamming_table(p);
  const int T = num_threads();
  if (queries.n >= T) {
    ParallelErrors errors;
#pragma omp parallel
    {
      std::vector<int64_t> acc;
      std::vector<float> scores;
      errors.run([&] { scores.resize(n); });
#pragma omp for schedule(dynamic, 1)
      for (int64_t qi = 0; qi < queries.n; ++qi)
        errors.run([&] {
          score_slots(s, queries, qi, p, table.data(), 0, n, acc, scores.data());
          topk(scores.data(), ids, n, kk, r.scores.data() + qi * kk, r.ids.data() + qi * kk);
        });
    }
    errors.rethrow();
    return r;
  }
  // Few queries: split each query's slots by range across the team obtained, then merge the
  // per-range top-k lists.
  std::vector<float> scores(n);
  std::vector<std::vector<float>> cand_s(T);
  std::vector<std::vector<int64_t>> cand_i(T);
  std::vector<float> cs;
  std::vector<int64_t> ci;
  for (int64_t qi = 0; qi < queries.n; ++qi) {
    for (int t = 0; t < T; ++t) {
      cand_s[t].clear();
      cand_i[t].clear();
    }
    ParallelErrors errors;
#pragma omp parallel num_threads(T)
    {
      errors.run([&] {
        const int nt = team_size(), t = thread_id();
        D2R_CHECK(nt <= T, "OpenMP team larger than requested");
        const int64_t lo = range_lo(n, t, nt), hi = range_lo(n, t + 1, nt);
        std::vector<int64_t> acc;
        score_slots(s, queries, qi, p, table.data(), lo, hi, acc, scores.data() + lo);
        const int64_t kt = std::min(kk, hi - lo);
        cand_s[t].resize(kt);
        cand_i[t].resize(kt);
        topk(scores.data() + lo, ids + lo, hi - lo, kt, cand_s[t].data(), cand_i[t].data());
      });
    }
    errors.rethrow();
    cs.clear();
    ci.clear();
    for (int t = 0; t < T; ++t) {
      cs.insert(cs.end(), cand_s[t].begin(), cand_s[t].end());
      ci.insert(ci.end(), cand_i[t].begin(), cand_i[t].end());
    }
    topk(cs.data(), ci.data(), static_cast<int64_t>(cs.size()), kk, r.scores.data() + qi * kk, r.ids.data() + qi * kk);
  }
  return r;
}

TopK InvertedFile::search_pooled(const CodesView& queries, bool mean, int64_t k, const ScoreParams& p) const {
  D2R_CHECK(multi_entry_, "pooled search needs a multi-entry (regional) inverted file");
  check_codes(queries, n_words_);
  const auto snap = pin();
  const Snapshot& s = *snap;
  const int64_t n = s.n_slots();
  const std::vector<int64_t>& slot_ids = s.slots->ids;
  // An image's entries are consecutive slots: groups are the runs of equal ids.
  std::vector<int64_t> run_start, run_id;
  run_start.reserve(s.slots->n_images + 1);
  run_id.reserve(s.slots->n_images);
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || slot_ids[i] != slot_ids[i - 1]) {
      run_start.push_back(i);
      run_id.push_back(slot_ids[i]);
    }
  }
  run_start.push_back(n);
  const int64_t G = static_cast<int64_t>(run_id.size());
  TopK r = empty_topk(queries.n, k, G);
  const int64_t kk = r.k;
  if (kk == 0 || queries.n == 0) return r;
  // Queries in blocks (bounded memory): every entry's score, then pooled per image.
  const int64_t block = std::min<int64_t>(queries.n, 64);
  std::vector<float> scores(static_cast<size_t>(block) * n);
  for (int64_t q0 = 0; q0 < queries.n; q0 += block) {
    CodesView sub = queries;
    sub.n = std::min(block, queries.n - q0);
    sub.offsets = queries.offsets + q0;  // absolute entry offsets: words and codes stay as they are
    score_all_into(s, sub, p, scores.data());
    parallel_for(sub.n, 1, [&](int64_t bi) {
    const int64_t qi = q0 + bi;
    const float* sc = scores.data() + bi * n;
    std::vector<float> pooled(G);
    for (int64_t g = 0; g < G; ++g) {
      if (mean) {
        double acc = 0.0;
        for (int64_t i = run_start[g]; i < run_start[g + 1]; ++i) acc += sc[i];
        pooled[g] = static_cast<float>(acc / static_cast<double>(run_start[g + 1] - run_start[g]));
      } else {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = run_start[g]; i < run_start[g + 1]; ++i) m = std::max(m, sc[i]);
        pooled[g] = m;
      }
    }
    topk(pooled.data(), run_id.data(), G, kk, r.scores.data() + qi * kk, r.ids.data() + qi * kk);
    });
  }
  return r;
}

}  // namespace d2r
