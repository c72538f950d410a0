#include "ivf.h"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "binarize.h"
#include "common.h"
#include "fixed_point.h"
#include "kernels.h"
#include "parallel.h"
#include "postings.h"
#include "postings_v3.h"
#include "reduce.h"
#include "scan.h"
#include "selectivity.h"
#include "topk.h"

// D2R_CHECK for what an index file says: CorruptIndex (d2r.IndexFileError in Python).
#define D2R_CHECK_FILE(cond, msg)         \
  do {                                    \
    if (!(cond)) throw CorruptIndex(msg); \
  } while (0)

namespace d2r {

namespace {

constexpr int64_t kMaxId = int64_t{1} << 62;  // ids stay far from int64 overflow (next_id = max + 1)
constexpr size_t kMaxSegments = 16;
constexpr int64_t kQueryGroup = 8;          // queries scored together by one thread (sharing list scans)
constexpr int64_t kGroupBytes = 4 << 20;     // at most this much accumulator per thread for a group
constexpr int64_t kTileSlots = 1 << 16;      // slots scored per tile (the accumulators' working set)

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

namespace {

// Asks the kernel to read [p, p + n) of a memory-mapped file now, in one request (the maps are
// MADV_RANDOM: no readahead beyond what is asked). A no-op where madvise is not available.
void prefetch_mapped(const uint8_t* p, uint64_t n) {
#if defined(__unix__) || defined(__APPLE__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  ::madvise(reinterpret_cast<void*>(a), end - a, MADV_WILLNEED);  // advisory: errors are harmless
#else
  (void)p;
  (void)n;
#endif
}

}  // namespace

namespace {

// CorruptIndex if a segment's memory-mapped file was found truncated (map_guard.h): its reads past
// the file's new end saw zeros, so nothing read from it can be trusted. Sticky: the flag stays set.
void check_intact(const Snapshot& s) {
  for (const auto& seg : s.segments)
    if (seg->truncated && seg->truncated->load(std::memory_order_acquire))
      throw CorruptIndex("index file " + (seg->source.empty() ? std::string("(memory-mapped)") : seg->source) +
                         " was truncated while memory-mapped (by another process?): load it again");
}

// f() on snapshot s, checked before and after: a truncation found while f read (which f may have
// seen as a corrupt structure: zeros) raises the truncation error instead of f's result or error.
template <class F>
auto with_intact(const Snapshot& s, F&& f) -> decltype(f()) {
  check_intact(s);
  try {
    auto r = f();
    check_intact(s);
    return r;
  } catch (...) {
    check_intact(s);
    throw;
  }
}

}  // namespace

size_t Segment::owned_bytes() const {
  return own_off.size() * sizeof(uint64_t) + own_data.size() + (page_ok ? static_cast<size_t>(n_pages) : 0);
}

size_t Segment::mapped_bytes() const {
  return owner ? data_bytes + static_cast<size_t>(n_pages) * sizeof(uint32_t) : 0;
}

void Segment::verify_range(uint64_t b, uint64_t e) const {
  if (!page_crc || b >= e) return;
  const int64_t p0 = static_cast<int64_t>(b / page_bytes), p1 = static_cast<int64_t>((e - 1) / page_bytes);
  if (!page_ok[p0].load(std::memory_order_acquire) || !page_ok[p1].load(std::memory_order_acquire))
    prefetch_mapped(data + static_cast<uint64_t>(p0) * page_bytes,
                    std::min<uint64_t>(data_bytes, static_cast<uint64_t>(p1 + 1) * page_bytes) -
                        static_cast<uint64_t>(p0) * page_bytes);
  for (int64_t pg = p0; pg <= p1; ++pg) {
    if (page_ok[pg].load(std::memory_order_acquire)) continue;
    const uint64_t lo = static_cast<uint64_t>(pg) * page_bytes;
    const uint64_t n = std::min<uint64_t>(page_bytes, data_bytes - lo);
    if (crc32(data + lo, n) != page_crc[pg])
      throw CorruptIndex("corrupt index file: checksum mismatch in postings page " + std::to_string(pg) + " (bytes " +
                         std::to_string(lo) + "-" + std::to_string(lo + n) + " of the posting lists)");
    page_ok[pg].store(1, std::memory_order_release);
  }
}

size_t SlotTable::bytes() const {
  return ids.size() * sizeof(int64_t) + nwords.size() * sizeof(int32_t) + by_id.size() * sizeof(by_id[0]) +
         dead.size();
}

namespace {

// Per-thread scratch of the word-parallel loops.
struct Scratch {
  std::vector<uint32_t> slots;
  std::vector<uint8_t> codes;
  uint32_t block[kBlock + 16];
};

// for (w in [0, n_words)) f(w, scratch), word-parallel; exceptions rethrown after the loop.
template <class F>
void for_words(int64_t n_words, F&& f) {
  ParallelErrors errors;
#pragma omp parallel
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 256)
    for (int64_t w = 0; w < n_words; ++w) errors.run([&] { f(w, sc); });
  }
  errors.rethrow();
}

// Decodes the blocks of word w's list in seg, checking each against the list and the segment:
// f(block, local slots) per block.
template <class F>
void for_blocks(const Segment& seg, int64_t w, int cb, uint32_t* buf, F&& f) {
  const auto decode = scan_kernels().decode;
  const uint64_t b = seg.word_off[w], e = seg.word_off[w + 1];
  if (b == e) return;
  seg.verify_range(b, e);
  const uint8_t* end = seg.data + e;
  int64_t left = 0;
  const uint8_t* p = read_count(seg.data + b, end, &left);
  const uint64_t n_local = static_cast<uint64_t>(seg.slot_end - seg.slot_begin);
  int64_t prev = -1;
  while (left > 0) {
    const Block blk = read_block(p, end, static_cast<int>(std::min<int64_t>(left, kBlock)), cb);
    left -= blk.n;
    if (static_cast<int64_t>(blk.first) <= prev) throw CorruptIndex("corrupt index: posting list not sorted by slot");
    const uint64_t last = decode(blk, buf);
    if (last >= n_local) throw CorruptIndex("corrupt index: posting slot out of range");
    prev = static_cast<int64_t>(last);
    f(blk, buf);
    p = blk.next;
  }
  if (p != end) throw CorruptIndex("corrupt index: posting list longer than its count");
}

// Gathers word w's live postings of `parts` into sc (slots mapped by map(abs) and made local to
// out_begin), in slot order.
template <class Keep, class Map>
void gather_word(const std::vector<std::shared_ptr<const Segment>>& parts, int64_t w, int cb, Keep keep, Map map,
                 int64_t out_begin, Scratch& sc) {
  sc.slots.clear();
  sc.codes.clear();
  for (const auto& part : parts) {
    for_blocks(*part, w, cb, sc.block, [&](const Block& blk, const uint32_t* sl) {
      for (int i = 0; i < blk.n; ++i) {
        const int64_t abs = part->slot_begin + sl[i];
        if (!keep(abs)) continue;
        sc.slots.push_back(static_cast<uint32_t>(map(abs) - out_begin));
        sc.codes.insert(sc.codes.end(), blk.codes + static_cast<size_t>(i) * cb,
                        blk.codes + static_cast<size_t>(i + 1) * cb);
      }
    });
  }
}

}  // namespace

InvertedFile::InvertedFile(int64_t n_words, int dim, bool binary, bool multi_entry)
    : n_words_(n_words), dim_(dim), binary_(binary), multi_entry_(multi_entry) {
  D2R_CHECK(n_words > 0, "the inverted file needs at least one visual word");
  D2R_CHECK(dim > 0, "descriptor dimension must be positive");
  code_bytes_ = binary ? packed_bytes(dim) : dim * static_cast<int>(sizeof(float));
  auto empty = std::make_shared<Segment>();
  empty->own_off.assign(n_words + 1, 0);
  empty->word_off = empty->own_off.data();
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

int64_t InvertedFile::n_entries() const {
  auto s = pin();
  return s->n_entries - s->slots->dead_entries;
}

size_t InvertedFile::memory_bytes() const {
  auto s = pin();
  size_t b = s->slots->bytes();
  for (const auto& seg : s->segments) b += seg->owned_bytes() + seg->mapped_bytes();
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
  const SlotTable& t = *s->slots;
  std::vector<int64_t> out;
  out.reserve(t.n_images);
  for (size_t i = 0; i < t.ids.size(); ++i)
    if (!t.is_dead(i) && (i == 0 || t.ids[i] != t.ids[i - 1] || t.is_dead(i - 1))) out.push_back(t.ids[i]);
  return out;
}

void InvertedFile::check_no_multi(const char* what) const {
  D2R_CHECK(!multi_entry_, std::string(what) + " is not available on a multi-entry (regional) inverted file: "
                                               "use pooled search");
}

// ---- building segments ---------------------------------------------------------------------------

std::shared_ptr<Segment> InvertedFile::encode_segment(int64_t slot_begin, int64_t slot_end, const int64_t* csr_off,
                                                      const uint32_t* csr_slot, const uint8_t* csr_code) const {
  // Two word-parallel passes: the encoded size of every list, then the lists at their offsets.
  auto seg = std::make_shared<Segment>();
  seg->slot_begin = slot_begin;
  seg->slot_end = slot_end;
  seg->n_entries = csr_off[n_words_];
  seg->own_off.assign(n_words_ + 1, 0);
  uint64_t* off = seg->own_off.data();
  const int cb = code_bytes_;
  auto local = [&](int64_t w, Scratch& sc) {
    sc.slots.assign(csr_slot + csr_off[w], csr_slot + csr_off[w + 1]);
    for (auto& v : sc.slots) v -= static_cast<uint32_t>(slot_begin);
  };
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    local(w, sc);
    off[w + 1] = encoded_bytes(sc.slots.data(), static_cast<int64_t>(sc.slots.size()), cb);
  });
  for (int64_t w = 0; w < n_words_; ++w) off[w + 1] += off[w];
  seg->own_data.resize(off[n_words_]);
  uint8_t* data = seg->own_data.data();
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    local(w, sc);
    encode_list(sc.slots.data(), csr_code + static_cast<size_t>(csr_off[w]) * cb,
                static_cast<int64_t>(sc.slots.size()), cb, data + off[w]);
  });
  seg->word_off = off;
  seg->data = data;
  seg->data_bytes = off[n_words_];
  return seg;
}

std::shared_ptr<Segment> InvertedFile::build_segment(const CodesView& v, int64_t first_slot) const {
  const int64_t total = v.offsets[v.n];
  std::vector<int64_t> off(n_words_ + 1, 0);
  for (int64_t e = 0; e < total; ++e) off[v.words[e] + 1]++;
  for (int64_t w = 0; w < n_words_; ++w) off[w + 1] += off[w];
  std::vector<uint32_t> slot(total);
  std::vector<uint8_t> code(static_cast<size_t>(total) * code_bytes_);
  std::vector<int64_t> fill(off.begin(), off.end() - 1);
  const size_t cb = code_bytes_;
  for (int64_t i = 0; i < v.n; ++i) {  // image order: every posting list stays sorted by slot
    for (int64_t e = v.offsets[i]; e < v.offsets[i + 1]; ++e) {
      const int64_t o = fill[v.words[e]]++;
      slot[o] = static_cast<uint32_t>(first_slot + i);
      std::memcpy(code.data() + o * cb, v.codes + e * cb, cb);
    }
  }
  return encode_segment(first_slot, first_slot + v.n, off.data(), slot.data(), code.data());
}

std::shared_ptr<Segment> InvertedFile::merge_segments(const std::vector<std::shared_ptr<const Segment>>& parts,
                                                      const SlotTable& table,
                                                      const std::vector<int64_t>* new_slot_of_old,
                                                      int64_t n_kept) const {
  // Concatenates the parts' live postings word by word (parts cover ascending slot ranges, so lists
  // stay sorted); with new_slot_of_old, renumbers the slots (dead ones map to -1).
  auto keep = [&](int64_t s) { return !table.is_dead(s); };
  auto map = [&](int64_t s) { return new_slot_of_old ? (*new_slot_of_old)[s] : s; };
  auto seg = std::make_shared<Segment>();
  seg->slot_begin = new_slot_of_old ? 0 : parts.front()->slot_begin;
  seg->slot_end = new_slot_of_old ? n_kept : parts.back()->slot_end;
  seg->own_off.assign(n_words_ + 1, 0);
  uint64_t* off = seg->own_off.data();
  std::vector<int64_t> counts(n_words_, 0);
  const int cb = code_bytes_;
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    gather_word(parts, w, cb, keep, map, seg->slot_begin, sc);
    counts[w] = static_cast<int64_t>(sc.slots.size());
    off[w + 1] = encoded_bytes(sc.slots.data(), counts[w], cb);
  });
  for (int64_t w = 0; w < n_words_; ++w) {
    off[w + 1] += off[w];
    seg->n_entries += counts[w];
  }
  seg->own_data.resize(off[n_words_]);
  uint8_t* data = seg->own_data.data();
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    gather_word(parts, w, cb, keep, map, seg->slot_begin, sc);
    encode_list(sc.slots.data(), sc.codes.data(), static_cast<int64_t>(sc.slots.size()), cb, data + off[w]);
  });
  seg->word_off = off;
  seg->data = data;
  seg->data_bytes = off[n_words_];
  return seg;
}

void InvertedFile::compact_segments(std::vector<std::shared_ptr<const Segment>>& segs, const SlotTable& table) const {
  // LSM-style over the in-memory segments after the last mapped one (a mapped index file is never
  // pulled into memory by an add): the newest segment merges with the one before while it is at
  // least half its size, and they all merge beyond kMaxSegments; so segments have geometric sizes
  // and a posting is copied O(log n) times. Merges drop the postings of dead slots.
  size_t first = 0;
  for (size_t i = 0; i < segs.size(); ++i)
    if (segs[i]->owner) first = i + 1;
  while (segs.size() - first >= 2) {
    const auto& last = segs[segs.size() - 1];
    const auto& prev = segs[segs.size() - 2];
    const size_t n = segs.size() - first;
    if (n <= kMaxSegments && last->n_entries * 2 < prev->n_entries) break;
    if (n > kMaxSegments) {
      std::vector<std::shared_ptr<const Segment>> tail(segs.begin() + first, segs.end());
      auto merged = merge_segments(tail, table, nullptr, 0);
      segs.resize(first);
      segs.push_back(std::move(merged));
      break;
    }
    auto merged = merge_segments({prev, last}, table, nullptr, 0);
    segs.pop_back();
    segs.back() = std::move(merged);
  }
}

// ---- the public readers and writers: checked for a truncated memory-mapped file (map_guard.h) ----

std::vector<int64_t> InvertedFile::add(const CodesView& images, const int64_t* ids, const int64_t* auto_index) {
  const auto s = pin();
  return with_intact(*s, [&] { return add_unchecked(images, ids, auto_index); });
}
int64_t InvertedFile::remove(int64_t n, const int64_t* ids) {
  const auto s = pin();
  return with_intact(*s, [&] { return remove_unchecked(n, ids); });
}
int64_t InvertedFile::compact() {
  const auto s = pin();
  return with_intact(*s, [&] { return compact_unchecked(); });
}
CsrContent InvertedFile::export_csr() const {
  const auto s = pin();
  return with_intact(*s, [&] { return export_unchecked(); });
}
AllScores InvertedFile::score_all(const CodesView& queries, const ScoreParams& p) const {
  const auto s = pin();
  return with_intact(*s, [&] { return score_all_unchecked(queries, p); });
}
TopK InvertedFile::search(const CodesView& queries, int64_t k, const ScoreParams& p) const {
  const auto s = pin();
  return with_intact(*s, [&] { return search_unchecked(queries, k, p); });
}
TopK InvertedFile::search_pooled(const CodesView& queries, bool mean, int64_t k, const ScoreParams& p) const {
  const auto s = pin();
  return with_intact(*s, [&] { return search_pooled_unchecked(queries, mean, k, p); });
}

// ---- writers ------------------------------------------------------------------------------------

std::vector<int64_t> InvertedFile::add_unchecked(const CodesView& images, const int64_t* ids, const int64_t* auto_index) {
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
  if (old.n_dead) {
    table->dead = old.dead;
    table->dead.resize(first + n, 0);
  }
  table->n_dead = old.n_dead;
  table->dead_entries = old.dead_entries;
  table->by_id.resize(old.by_id.size() + add_pairs.size());
  std::merge(old.by_id.begin(), old.by_id.end(), add_pairs.begin(), add_pairs.end(), table->by_id.begin());
  int64_t new_images = 0;
  for (int64_t e = 0; e < n; ++e) new_images += (e == 0 || new_ids[e] != new_ids[e - 1]);
  table->n_images = old.n_images + new_images;

  auto next = std::make_shared<Snapshot>();
  next->segments = cur->segments;
  next->segments.push_back(build_segment(images, first));
  compact_segments(next->segments, *table);
  int64_t stored = 0;
  for (const auto& seg : next->segments) stored += seg->n_entries;
  next->n_entries = stored;
  table->dead_entries -= (cur->n_entries + images.offsets[n]) - stored;  // postings the merges dropped
  next->slots = std::move(table);
  next->next_id = cur->next_id;
  if (n) next->next_id = std::max(next->next_id, add_pairs.back().first + 1);
  publish(std::move(next));
  return new_ids;
}

int64_t InvertedFile::remove_unchecked(int64_t n, const int64_t* ids) {
  std::lock_guard<std::mutex> writer(write_mutex_);
  const auto cur = pin();
  const SlotTable& old = *cur->slots;
  const int64_t n_slots = cur->n_slots();
  std::vector<uint8_t> dead = old.dead;
  dead.resize(n_slots, 0);
  int64_t removed = 0, removed_slots = 0, removed_entries = 0;
  for (int64_t i = 0; i < n; ++i) {
    auto it = std::lower_bound(old.by_id.begin(), old.by_id.end(), std::make_pair(ids[i], uint32_t{0}));
    if (it == old.by_id.end() || it->first != ids[i]) throw NotFound("image id " + id_str(ids[i]) + " is not in the index");
    if (dead[it->second]) continue;  // listed twice
    ++removed;
    for (; it != old.by_id.end() && it->first == ids[i]; ++it) {
      dead[it->second] = 1;
      ++removed_slots;
      removed_entries += old.nwords[it->second];
    }
  }
  if (removed == 0) return 0;
  auto table = std::make_shared<SlotTable>();
  table->ids = old.ids;
  table->nwords = old.nwords;
  table->by_id.reserve(old.by_id.size() - removed_slots);
  for (const auto& pr : old.by_id)
    if (!dead[pr.second]) table->by_id.push_back(pr);
  table->dead = std::move(dead);
  table->n_dead = old.n_dead + removed_slots;
  table->dead_entries = old.dead_entries + removed_entries;
  table->n_images = old.n_images - removed;
  auto next = std::make_shared<Snapshot>(*cur);
  next->slots = std::move(table);
  publish(std::move(next));
  return removed;
}

int64_t InvertedFile::compact_unchecked() {
  std::lock_guard<std::mutex> writer(write_mutex_);
  const auto cur = pin();
  const SlotTable& old = *cur->slots;
  if (old.n_dead == 0 && cur->segments.size() == 1 && !cur->segments[0]->owner) return 0;
  const int64_t n_slots = cur->n_slots();
  std::vector<int64_t> new_slot(n_slots, -1);
  int64_t kept = 0;
  for (int64_t s = 0; s < n_slots; ++s)
    if (!old.is_dead(s)) new_slot[s] = kept++;
  auto table = std::make_shared<SlotTable>();
  table->ids.reserve(kept);
  table->nwords.reserve(kept);
  for (int64_t s = 0; s < n_slots; ++s) {
    if (new_slot[s] < 0) continue;
    table->ids.push_back(old.ids[s]);
    table->nwords.push_back(old.nwords[s]);
  }
  table->by_id.reserve(old.by_id.size());
  for (const auto& pr : old.by_id) table->by_id.emplace_back(pr.first, static_cast<uint32_t>(new_slot[pr.second]));
  table->n_images = old.n_images;
  auto next = std::make_shared<Snapshot>();
  next->segments = {merge_segments(cur->segments, old, &new_slot, kept)};
  next->n_entries = next->segments[0]->n_entries;
  next->slots = std::move(table);
  next->next_id = cur->next_id;
  const int64_t dropped = cur->n_entries - next->n_entries;
  publish(std::move(next));
  return dropped;
}

uint64_t InvertedFile::verify() const {
  auto s = pin();
  return with_intact(*s, [&] {
    uint64_t bytes = 0;
    for (const auto& seg : s->segments) {
      if (!seg->page_crc) continue;
      seg->verify_range(0, seg->data_bytes);
      bytes += seg->data_bytes;
    }
    for (const auto& seg : s->segments) check_structure(*seg, *s->slots);
    return bytes;
  });
}

void InvertedFile::check_structure(const Segment& seg, const SlotTable& table) const {
  // Every list decoded and checked (for_blocks); the postings per slot counted per thread, then
  // summed: each list exactly its count (for_blocks), the segment its n_entries, each slot its
  // word count (the image table's, which normalises the scores).
  const int64_t n_local = seg.slot_end - seg.slot_begin;
  const int cb = code_bytes_;
  std::vector<int64_t> per_slot(static_cast<size_t>(n_local), 0);
  std::mutex merge;
  ParallelErrors errors;
#pragma omp parallel
  {
    std::vector<int64_t> mine;
    Scratch sc;
    errors.run([&] { mine.assign(static_cast<size_t>(n_local), 0); });
#pragma omp for schedule(dynamic, 256)
    for (int64_t w = 0; w < n_words_; ++w)
      errors.run([&] {
        for_blocks(seg, w, cb, sc.block, [&](const Block& blk, const uint32_t* sl) {
          for (int i = 0; i < blk.n; ++i) ++mine[sl[i]];
        });
      });
    errors.run([&] {
      std::lock_guard<std::mutex> lock(merge);
      for (int64_t i = 0; i < n_local; ++i) per_slot[i] += mine[i];
    });
  }
  errors.rethrow();
  int64_t total = 0;
  for (int64_t i = 0; i < n_local; ++i) {
    total += per_slot[i];
    // (A removed image's postings may be gone already, dropped by a merge of in-memory segments.)
    if (per_slot[i] != table.nwords[seg.slot_begin + i] && !table.is_dead(seg.slot_begin + i))
      throw CorruptIndex("corrupt index: image " + id_str(table.ids[seg.slot_begin + i]) + " has " +
                         std::to_string(table.nwords[seg.slot_begin + i]) + " words in the image table but " +
                         std::to_string(per_slot[i]) + " postings");
  }
  if (total != seg.n_entries)
    throw CorruptIndex("corrupt index: the posting lists hold " + std::to_string(total) + " postings, the header says " +
                       std::to_string(seg.n_entries));
}

CsrContent InvertedFile::export_unchecked() const {
  auto s = pin();
  const SlotTable& t = *s->slots;
  CsrContent c;
  const int64_t n_slots = s->n_slots();
  std::vector<int64_t> new_slot(n_slots, -1);
  int64_t kept = 0;
  for (int64_t i = 0; i < n_slots; ++i) {
    if (t.is_dead(i)) continue;
    new_slot[i] = kept++;
    c.ids.push_back(t.ids[i]);
    c.nwords.push_back(t.nwords[i]);
  }
  c.next_id = s->next_id;
  c.offsets.assign(n_words_ + 1, 0);
  std::vector<int64_t> counts(n_words_);
  const int cb = code_bytes_;
  auto keep = [&](int64_t x) { return !t.is_dead(x); };
  auto map = [&](int64_t x) { return new_slot[x]; };
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    int64_t k = 0;
    for (const auto& seg : s->segments)
      for_blocks(*seg, w, cb, sc.block, [&](const Block& blk, const uint32_t* sl) {
        for (int i = 0; i < blk.n; ++i) k += keep(seg->slot_begin + sl[i]);
      });
    counts[w] = k;
  });
  for (int64_t w = 0; w < n_words_; ++w) c.offsets[w + 1] = c.offsets[w] + counts[w];
  c.slots.resize(c.offsets[n_words_]);
  c.codes.resize(static_cast<size_t>(c.offsets[n_words_]) * cb);
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    gather_word(s->segments, w, cb, keep, map, 0, sc);
    std::copy(sc.slots.begin(), sc.slots.end(), c.slots.begin() + c.offsets[w]);
    std::copy(sc.codes.begin(), sc.codes.end(), c.codes.begin() + c.offsets[w] * cb);
  });
  return c;
}

namespace {

// The slot table of n_slots slots with these ids and word counts, validated (O(n log n)).
std::shared_ptr<SlotTable> make_table(const int64_t* image_ids, const int32_t* word_counts, int64_t n_slots,
                                      bool multi_entry, int64_t next_id) {
  D2R_CHECK_FILE(n_slots >= 0 && n_slots <= static_cast<int64_t>(UINT32_MAX), "corrupt index: number of entries");
  auto table = std::make_shared<SlotTable>();
  table->ids.assign(image_ids, image_ids + n_slots);
  table->nwords.assign(word_counts, word_counts + n_slots);
  table->by_id.resize(n_slots);
  int64_t max_id = -1;
  for (int64_t s = 0; s < n_slots; ++s) {
    D2R_CHECK_FILE(word_counts[s] >= 0, "corrupt index: negative word count");
    D2R_CHECK_FILE(image_ids[s] >= 0 && image_ids[s] < kMaxId, "corrupt index: image id out of range");
    table->by_id[s] = {image_ids[s], static_cast<uint32_t>(s)};
    max_id = std::max(max_id, image_ids[s]);
    table->n_images += (s == 0 || image_ids[s] != image_ids[s - 1]);
  }
  std::sort(table->by_id.begin(), table->by_id.end());
  for (int64_t e = 1; e < n_slots; ++e) {
    if (table->by_id[e].first != table->by_id[e - 1].first) continue;
    D2R_CHECK_FILE(multi_entry && table->by_id[e].second == table->by_id[e - 1].second + 1,
              "corrupt index: duplicate image id " + id_str(table->by_id[e].first));
  }
  D2R_CHECK_FILE(next_id > max_id && next_id <= kMaxId, "corrupt index: next_id must exceed every image id");
  return table;
}

}  // namespace

void InvertedFile::set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_slots,
                               const int64_t* image_ids, const int32_t* word_counts, int64_t next_id) {
  D2R_CHECK_FILE(n_slots >= 0 && n_slots <= static_cast<int64_t>(UINT32_MAX), "corrupt index: number of entries");
  D2R_CHECK_FILE(offsets[0] == 0, "corrupt index: posting offsets must start at 0");
  for (int64_t w = 0; w < n_words_; ++w)
    D2R_CHECK_FILE(offsets[w + 1] >= offsets[w], "corrupt index: posting offsets must be non-decreasing");
  std::vector<int64_t> counted(n_slots, 0);
  for (int64_t w = 0; w < n_words_; ++w) {
    for (int64_t j = offsets[w]; j < offsets[w + 1]; ++j) {
      D2R_CHECK_FILE(slots[j] < static_cast<uint64_t>(n_slots), "corrupt index: posting slot out of range");
      D2R_CHECK_FILE(j == offsets[w] || slots[j] > slots[j - 1], "corrupt index: posting list not sorted by slot");
      counted[slots[j]]++;
    }
  }
  for (int64_t s = 0; s < n_slots; ++s)
    D2R_CHECK_FILE(counted[s] == word_counts[s], "corrupt index: word count of an image does not match its postings");
  auto table = make_table(image_ids, word_counts, n_slots, multi_entry_, next_id);
  auto next = std::make_shared<Snapshot>();
  next->segments = {encode_segment(0, n_slots, offsets, slots, codes)};
  next->n_entries = offsets[n_words_];
  next->slots = std::move(table);
  next->next_id = next_id;
  std::lock_guard<std::mutex> writer(write_mutex_);
  publish(std::move(next));
}

void InvertedFile::set_segments(const std::vector<SegmentInput>& parts, const int64_t* image_ids,
                                const int32_t* word_counts, int64_t n_slots, int64_t next_id) {
  D2R_CHECK(!parts.empty(), "set_segments needs at least one segment");
  auto table = make_table(image_ids, word_counts, n_slots, multi_entry_, next_id);
  auto next = std::make_shared<Snapshot>();
  int64_t slot = 0, entries = 0;
  for (const auto& in : parts) {
    D2R_CHECK_FILE(in.n_slots >= 0 && in.n_entries >= 0, "corrupt index: negative segment size");
    D2R_CHECK_FILE(in.word_off[0] == 0 && in.word_off[n_words_] == in.data_bytes,
              "corrupt index: the word table does not span the posting lists");
    D2R_CHECK(in.format == 3 || in.format == 4, "unknown posting layout " + std::to_string(in.format));
    // A non-empty list holds at least one posting: its count, a block header and a code (found by
    // fuzzing: a segment of n_entries = 0 with non-empty lists loaded, and searches, which skip a
    // segment without entries, ignored what the export and verify() read).
    const uint64_t min_list = 1 + static_cast<uint64_t>(in.format == 3 ? v3::kBlockHeader3 : kBlockHeader) +
                              static_cast<uint64_t>(code_bytes_);
    int64_t non_empty = 0;
    for (int64_t w = 0; w < n_words_; ++w) {
      D2R_CHECK_FILE(in.word_off[w + 1] >= in.word_off[w], "corrupt index: word table not non-decreasing");
      const uint64_t len = in.word_off[w + 1] - in.word_off[w];
      D2R_CHECK_FILE(len == 0 || len >= min_list, "corrupt index: a posting list shorter than one posting");
      non_empty += len != 0;
    }
    D2R_CHECK_FILE(non_empty <= in.n_entries, "corrupt index: more non-empty posting lists than postings");
    // A posting costs at most a block header, 16 gap bytes (format 3: 5) and its code; a list at
    // most 5 bytes more (its count).
    const uint64_t per = in.format == 3 ? v3::kBlockHeader3 + 5 : kBlockHeader + 16;
    D2R_CHECK_FILE(in.data_bytes <= static_cast<uint64_t>(in.n_entries) * (per + code_bytes_) +
                                   static_cast<uint64_t>(n_words_) * 5 &&
                  in.data_bytes >= static_cast<uint64_t>(in.n_entries) * code_bytes_,
              "corrupt index: posting bytes do not match the number of postings");
    {
      // Every non-empty list holds at least one posting, and its count byte, a block header and a
      // code: at most data_bytes / that many lists, at least that many postings (O(words): the word
      // table is read here anyway; a list's own bytes are checked as it is decoded).
      int64_t lists = 0;
      for (int64_t w = 0; w < n_words_; ++w) lists += in.word_off[w + 1] != in.word_off[w];
      const uint64_t header = in.format == 3 ? v3::kBlockHeader3 : kBlockHeader;
      D2R_CHECK_FILE(in.n_entries >= lists && static_cast<uint64_t>(lists) * (1 + header) +
                                                static_cast<uint64_t>(in.n_entries) * code_bytes_ <=
                                            in.data_bytes,
                "corrupt index: " + std::to_string(lists) + " non-empty posting lists of " +
                    std::to_string(in.data_bytes) + " bytes cannot hold " + std::to_string(in.n_entries) + " postings");
    }
    if (in.page_crc) {
      D2R_CHECK_FILE(in.page_bytes > 0 && in.n_pages == static_cast<int64_t>((in.data_bytes + in.page_bytes - 1) / in.page_bytes),
                "corrupt index: page checksum table does not match the posting lists");
    }
    if (in.format == 3) {
      next->segments.push_back(convert_v3(in, slot));
      slot += in.n_slots;
      entries += in.n_entries;
      continue;
    }
    auto seg = std::make_shared<Segment>();
    seg->slot_begin = slot;
    seg->slot_end = slot + in.n_slots;
    seg->n_entries = in.n_entries;
    seg->word_off = in.word_off;
    seg->data = in.data;
    seg->data_bytes = in.data_bytes;
    if (in.page_crc) {
      seg->page_crc = in.page_crc;
      seg->page_bytes = in.page_bytes;
      seg->n_pages = in.n_pages;
      seg->page_ok.reset(new std::atomic<uint8_t>[in.n_pages]);
      for (int64_t p = 0; p < in.n_pages; ++p) seg->page_ok[p].store(0, std::memory_order_relaxed);
    }
    seg->owner = in.owner;
    seg->truncated = in.truncated;
    seg->source = in.source;
    slot += in.n_slots;
    entries += in.n_entries;
    next->segments.push_back(std::move(seg));
  }
  D2R_CHECK_FILE(slot == n_slots, "corrupt index: the segments' slots do not match the image table");
  int64_t words = 0;
  for (int64_t s = 0; s < n_slots; ++s) words += word_counts[s];
  D2R_CHECK_FILE(words == entries, "corrupt index: the word counts do not add up to the postings");
  next->n_entries = entries;
  next->slots = std::move(table);
  next->next_id = next_id;
  for (const auto& in : parts)  // truncated while it was being read (format 3 is read whole)
    if (in.truncated && in.truncated->load(std::memory_order_acquire))
      throw CorruptIndex("index file " + in.source + " was truncated while memory-mapped (by another process?)");
  std::lock_guard<std::mutex> writer(write_mutex_);
  publish(std::move(next));
}

std::shared_ptr<Segment> InvertedFile::convert_v3(const SegmentInput& in, int64_t slot_begin) const {
  // Checksums first (the whole stream: it is read whole), then per word: the format-3 list decoded
  // (every block checked as for_blocks checks format 4) and encoded again; two word-parallel passes
  // (sizes, then the lists at their offsets), so memory holds the output only.
  Segment src;
  src.slot_begin = slot_begin;
  src.slot_end = slot_begin + in.n_slots;
  src.word_off = in.word_off;
  src.data = in.data;
  src.data_bytes = in.data_bytes;
  if (in.page_crc) {
    src.page_crc = in.page_crc;
    src.page_bytes = in.page_bytes;
    src.n_pages = in.n_pages;
    src.page_ok.reset(new std::atomic<uint8_t>[in.n_pages]);
    for (int64_t p = 0; p < in.n_pages; ++p) src.page_ok[p].store(0, std::memory_order_relaxed);
    src.verify_range(0, in.data_bytes);
  }
  const int cb = code_bytes_;
  const uint64_t n_local = static_cast<uint64_t>(in.n_slots);
  auto decode_list = [&](int64_t w, Scratch& sc) {
    sc.slots.clear();
    sc.codes.clear();
    const uint64_t b = in.word_off[w], e = in.word_off[w + 1];
    if (b == e) return;
    const uint8_t* end = in.data + e;
    int64_t left = 0;
    const uint8_t* p = read_count(in.data + b, end, &left);
    int64_t prev = -1;
    uint32_t buf[v3::kBlock3];
    while (left > 0) {
      const v3::Block blk = v3::read_block(p, end, static_cast<int>(std::min<int64_t>(left, v3::kBlock3)), cb);
      left -= blk.n;
      if (static_cast<int64_t>(blk.first) <= prev) throw CorruptIndex("corrupt index: posting list not sorted by slot");
      const uint64_t last = v3::decode_slots(blk, buf);
      if (last >= n_local) throw CorruptIndex("corrupt index: posting slot out of range");
      prev = static_cast<int64_t>(last);
      sc.slots.insert(sc.slots.end(), buf, buf + blk.n);
      sc.codes.insert(sc.codes.end(), blk.codes, blk.codes + static_cast<size_t>(blk.n) * cb);
      p = blk.next;
    }
    if (p != end) throw CorruptIndex("corrupt index: posting list longer than its count");
  };
  auto seg = std::make_shared<Segment>();
  seg->slot_begin = slot_begin;
  seg->slot_end = slot_begin + in.n_slots;
  seg->own_off.assign(n_words_ + 1, 0);
  uint64_t* off = seg->own_off.data();
  std::vector<int64_t> counts(n_words_, 0);
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    decode_list(w, sc);
    counts[w] = static_cast<int64_t>(sc.slots.size());
    off[w + 1] = encoded_bytes(sc.slots.data(), counts[w], cb);
  });
  for (int64_t w = 0; w < n_words_; ++w) {
    off[w + 1] += off[w];
    seg->n_entries += counts[w];
  }
  if (seg->n_entries != in.n_entries) throw CorruptIndex("corrupt index: the posting lists do not hold n_entries postings");
  seg->own_data.resize(off[n_words_]);
  uint8_t* data = seg->own_data.data();
  for_words(n_words_, [&](int64_t w, Scratch& sc) {
    decode_list(w, sc);
    encode_list(sc.slots.data(), sc.codes.data(), static_cast<int64_t>(sc.slots.size()), cb, data + off[w]);
  });
  seg->word_off = off;
  seg->data = data;
  seg->data_bytes = off[n_words_];
  return seg;
}

// ---- streaming writer ---------------------------------------------------------------------------

PostingWriter::PostingWriter(std::shared_ptr<const Snapshot> snap, int64_t n_words, int code_bytes, int64_t page_bytes)
    : page_bytes(page_bytes), snap_(std::move(snap)), n_words_(n_words), code_bytes_(code_bytes) {
  D2R_CHECK(page_bytes > 0, "page_bytes must be positive");
  check_intact(*snap_);
  const SlotTable& t = *snap_->slots;
  const int64_t n = snap_->n_slots();
  new_slot_.assign(n, -1);
  int64_t kept = 0;
  for (int64_t s = 0; s < n; ++s) {
    if (t.is_dead(s)) continue;
    new_slot_[s] = kept++;
    ids.push_back(t.ids[s]);
    nwords.push_back(t.nwords[s]);
  }
  next_id = snap_->next_id;
  word_off_.assign(1, 0);
}

void PostingWriter::crc_bytes(const uint8_t* p, size_t n) {
  while (n > 0) {
    const size_t take = std::min<size_t>(n, static_cast<size_t>(page_bytes - cur_fill_));
    cur_crc_ = crc32(p, take, cur_crc_);
    cur_fill_ += static_cast<int64_t>(take);
    p += take;
    n -= take;
    if (cur_fill_ == page_bytes) {
      page_crc_.push_back(cur_crc_);
      cur_crc_ = 0;
      cur_fill_ = 0;
    }
  }
}

std::vector<uint8_t> PostingWriter::next(uint64_t min_bytes) {
  return with_intact(*snap_, [&] { return next_unchecked(min_bytes); });
}

std::vector<uint8_t> PostingWriter::next_unchecked(uint64_t min_bytes) {
  std::vector<uint8_t> out;
  Scratch sc;
  const SlotTable& t = *snap_->slots;
  auto keep = [&](int64_t s) { return !t.is_dead(s); };
  auto map = [&](int64_t s) { return new_slot_[s]; };
  while (word_ < n_words_ && out.size() < min_bytes) {
    gather_word(snap_->segments, word_, code_bytes_, keep, map, 0, sc);
    const int64_t n = static_cast<int64_t>(sc.slots.size());
    const size_t at = out.size();
    out.resize(at + encoded_bytes(sc.slots.data(), n, code_bytes_));
    encode_list(sc.slots.data(), sc.codes.data(), n, code_bytes_, out.data() + at);
    n_entries += n;
    written_ += out.size() - at;
    word_off_.push_back(written_);
    ++word_;
  }
  crc_bytes(out.data(), out.size());
  if (word_ >= n_words_ && cur_fill_ > 0) {
    page_crc_.push_back(cur_crc_);
    cur_crc_ = 0;
    cur_fill_ = 0;
  }
  return out;
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

namespace {

// A reader's position in one (segment, word) list, kept across slot tiles.
struct Cursor {
  const uint8_t* ptr = nullptr;
  const uint8_t* end = nullptr;
  int64_t left = -1;  // postings not yet consumed; -1: not opened
  int64_t prev = -1;  // the last slot consumed
};

// Asks for the start of word w's list in seg (or the cursor's next block) ahead of its scan.
inline void prefetch_list(const Segment& seg, int32_t w, const Cursor& c) {
  const uint8_t* at = c.left < 0 ? seg.data + seg.word_off[w] : c.ptr;
  if (c.left != 0 && at) {
    __builtin_prefetch(at);
    __builtin_prefetch(at + 64);
  }
}

// Advances c over word w's list in seg through the blocks holding local slots of [lo, hi):
// f(block, slots, i0, i1) for each, its postings [i0, i1) being those inside [lo, hi). Checks every
// block it reads (header and size inside the list, first slot inside the segment and above the
// previous block's slots, for a block skipped below lo the next block's first slot at least n above
// its own, for a decoded block its last slot inside the segment) and, at the list's end, that the
// count's blocks end exactly there. A block that straddles hi stays for the next tile.
template <class F>
inline void scan_list_tile(const Segment& seg, int32_t w, Cursor& c, int64_t lo, int64_t hi, int cb,
                           const ScanKernels& kern, uint32_t* buf, F&& f) {
  const uint64_t n_local = static_cast<uint64_t>(seg.slot_end - seg.slot_begin);
  if (c.left < 0) {
    const uint64_t wb = seg.word_off[w], we = seg.word_off[w + 1];
    if (wb == we) {
      c.left = 0;
      return;
    }
    seg.verify_range(wb, we);
    c.end = seg.data + we;
    c.ptr = read_count(seg.data + wb, c.end, &c.left);
  }
  while (c.left > 0) {
    const Block blk = read_block(c.ptr, c.end, static_cast<int>(std::min<int64_t>(c.left, kBlock)), cb);
    if (static_cast<int64_t>(blk.first) <= c.prev) throw CorruptIndex("corrupt index: posting list not sorted by slot");
    if (blk.first >= n_local) throw CorruptIndex("corrupt index: posting slot out of range");
    if (static_cast<int64_t>(blk.first) >= hi) break;  // for a later tile
    if (c.left > blk.n) {  // the next block's header
      __builtin_prefetch(blk.next);
      __builtin_prefetch(blk.next + 64);
    }
    // Blocks entirely below the range (a range starting inside a segment): the next block's first
    // slot says so without decoding.
    if (static_cast<int64_t>(blk.first) < lo && c.left > blk.n && blk.next + 4 <= c.end) {
      uint32_t next_first;
      std::memcpy(&next_first, blk.next, 4);
      if (static_cast<int64_t>(next_first) <= lo) {
        // The skipped block's n slots lie in [first, next_first).
        if (static_cast<uint64_t>(next_first) < static_cast<uint64_t>(blk.first) + static_cast<uint64_t>(blk.n))
          throw CorruptIndex("corrupt index: posting list not sorted by slot");
        c.prev = static_cast<int64_t>(next_first) - 1;
        c.ptr = blk.next;
        c.left -= blk.n;
        continue;
      }
    }
    const uint64_t last = kern.decode(blk, buf);
    if (last >= n_local) throw CorruptIndex("corrupt index: posting slot out of range");
    const int n = blk.n;
    int i0 = 0, i1 = n;
    while (i0 < n && static_cast<int64_t>(buf[i0]) < lo) ++i0;
    while (i1 > i0 && static_cast<int64_t>(buf[i1 - 1]) >= hi) --i1;
    f(blk, static_cast<const uint32_t*>(buf), i0, i1);
    if (static_cast<int64_t>(last) >= hi) {
      // Straddles into the next tile: read again there. The next block's first slot must lie above
      // this block's last: checked here, for the reader of the range above hi (another thread, or
      // this one's next tile) skips this block by that first slot without decoding it.
      if (c.left > blk.n && blk.next + 4 <= c.end) {
        uint32_t next_first;
        std::memcpy(&next_first, blk.next, 4);
        if (static_cast<uint64_t>(next_first) <= last) throw CorruptIndex("corrupt index: posting list not sorted by slot");
      }
      break;
    }
    c.prev = static_cast<int64_t>(last);
    c.ptr = blk.next;
    c.left -= blk.n;
    if (c.left == 0 && c.ptr != c.end) throw CorruptIndex("corrupt index: posting list longer than its count");
  }
}

}  // namespace

void InvertedFile::score_block(const uint8_t* qc, float lim, const ScoreParams& p, const int64_t* table,
                               const uint8_t* codes, const uint32_t* slots, int i0, int i1, uint32_t base,
                               int64_t* acc, const ScanKernels& kern, const simd::Kernels& simd_kern) const {
  // acc[slot - base] for the local slots [i0, i1) of a block: the index is taken modulo 2^32 (base
  // above the slot when a segment starts inside the accumulator's range). 16-byte binary codes (the
  // default): the scan's kernels (scan.h); other widths and float codes: the dispatched kernels of
  // ivf_kernels.cpp (simd.h). Both follow the SIMD level; every level gives the same integers.
  if (binary_ && code_bytes_ == 16) {
    kern.bin16(table, qc, codes, slots, i0, i1, base, acc);
    return;
  }
  const ScoreBlock sb{qc, codes, slots, i0, i1, base, code_bytes_, dim_, acc};
  if (binary_)
    simd_kern.score_block_binary(sb, table);
  else
    simd_kern.score_block_float(sb, p.alpha, p.tau, lim);
}

namespace {

// Float codes need not be unit vectors (Naive-R-ASMK): a sum of nq_words contributions stays exact
// in fixed point while each |sigma| <= 2^31 / nq_words.
inline float contribution_limit(int64_t nq_words) {
  return static_cast<float>(2147483648.0 / static_cast<double>(std::max<int64_t>(1, nq_words)));
}

}  // namespace

void InvertedFile::score_slots(const Snapshot& s, const CodesView& q, int64_t qi0, int group, const ScoreParams& p,
                               const int64_t* table, int64_t slot_lo, int64_t slot_hi, std::vector<int64_t>& acc,
                               float* scores) const {
  // Queries qi0 .. qi0 + group - 1 over slots [slot_lo, slot_hi): scores is group rows of
  // slot_hi - slot_lo. The queries' entries are merged by word, so a list shared by several queries
  // of the group is read and decoded once (a batch shares the scan of popular words). Contributions
  // are summed in 64-bit fixed point (fixed_point.h), exactly as the CUDA path sums them.
  const int64_t n_slots = slot_hi - slot_lo;
  const int cb = code_bytes_;
  // (word, query in group, entry) of every query entry, by word.
  struct Entry {
    int32_t word;
    int32_t j;
    int64_t e;
  };
  std::vector<Entry> entries;
  entries.reserve(static_cast<size_t>(q.offsets[qi0 + group] - q.offsets[qi0]));
  std::vector<float> limit(group);
  for (int j = 0; j < group; ++j) {
    const int64_t qb = q.offsets[qi0 + j], qe = q.offsets[qi0 + j + 1];
    limit[j] = contribution_limit(qe - qb);
    for (int64_t e = qb; e < qe; ++e) entries.push_back({q.words[e], j, e});
  }
  if (group > 1)
    std::stable_sort(entries.begin(), entries.end(), [](const Entry& x, const Entry& y) { return x.word < y.word; });
  std::vector<size_t> runs;  // run r: entries [runs[r], runs[r + 1]) share a word
  for (size_t r = 0; r < entries.size(); ++r)
    if (r == 0 || entries[r].word != entries[r - 1].word) runs.push_back(r);
  const size_t n_runs = runs.size();
  runs.push_back(entries.size());
  // The slots are scored in tiles of kTileSlots, so that the accumulators (8 bytes per slot and
  // query of the group) stay in cache while the lists are scattered into them; each (segment, word)
  // keeps a cursor on its list, so a list is read once across the tiles (a block that straddles two
  // tiles is decoded twice).
  std::vector<Cursor> cursors(s.segments.size() * n_runs);
  const int64_t tile = std::min<int64_t>(std::max<int64_t>(n_slots, 1), kTileSlots);
  acc.resize(static_cast<size_t>(tile) * group);
  uint32_t buf[kBlock + 16];
  const ScanKernels& kern = scan_kernels();
  const simd::Kernels& simd_kern = simd::kernels();
  const int32_t* nwords = s.slots->nwords.data();
  for (int64_t t_lo = slot_lo; t_lo < slot_hi; t_lo += tile) {
    const int64_t t_hi = std::min(slot_hi, t_lo + tile), tn = t_hi - t_lo;
    std::fill(acc.begin(), acc.begin() + tn * group, 0);
    for (size_t si = 0; si < s.segments.size(); ++si) {
      const Segment& seg = *s.segments[si];
      if (seg.slot_end <= t_lo || seg.slot_begin >= t_hi || seg.n_entries == 0) continue;
      const int64_t lo = t_lo - seg.slot_begin, hi = t_hi - seg.slot_begin;  // the tile in local slots
      for (size_t ri = 0; ri < n_runs; ++ri) {
        // The word table 8 lists ahead and the start of the list after next, asked for now: a
        // list's first bytes (its count and first block header) are read before anything could
        // have streamed them in.
        if (ri + 8 < n_runs) __builtin_prefetch(&seg.word_off[entries[runs[ri + 8]].word]);
        if (ri + 2 < n_runs) prefetch_list(seg, entries[runs[ri + 2]].word, cursors[si * n_runs + ri + 2]);
        scan_list_tile(seg, entries[runs[ri]].word, cursors[si * n_runs + ri], lo, hi, cb, kern, buf,
                       [&](const Block& blk, const uint32_t* sl, int i0, int i1) {
                         for (size_t r = runs[ri]; r < runs[ri + 1]; ++r)
                           score_block(q.codes + entries[r].e * cb, limit[entries[r].j], p, table, blk.codes, sl,
                                       i0, i1, static_cast<uint32_t>(lo),
                                       acc.data() + static_cast<int64_t>(entries[r].j) * tn, kern, simd_kern);
                       });
      }
    }
    for (int j = 0; j < group; ++j) {
      const int64_t nq_words = q.offsets[qi0 + j + 1] - q.offsets[qi0 + j];
      float* out = scores + static_cast<int64_t>(j) * n_slots + (t_lo - slot_lo);
      const int64_t* a = acc.data() + static_cast<int64_t>(j) * tn;
      if (nq_words == 0)
        std::fill(out, out + tn, -1.0f);
      else
        kern.finish(a, nwords + t_lo, tn, nq_words, p.normalize, out);
    }
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
        errors.run([&] { score_slots(s, q, qi, 1, p, table.data(), 0, n, acc, out + qi * n); });
    }
    errors.rethrow();
    return;
  }
  for (int64_t qi = 0; qi < q.n; ++qi) {
    parallel_team([&](int t, int T) {
      std::vector<int64_t> acc;
      const int64_t lo = range_lo(n, t, T), hi = range_lo(n, t + 1, T);
      score_slots(s, q, qi, 1, p, table.data(), lo, hi, acc, out + qi * n + lo);
    });
  }
}

AllScores InvertedFile::score_all_unchecked(const CodesView& queries, const ScoreParams& p) const {
  check_no_multi("score_all");
  check_codes(queries, n_words_);
  const auto snap = pin();
  const SlotTable& t = *snap->slots;
  const int64_t n = snap->n_slots();
  AllScores r;
  r.scores.resize(static_cast<size_t>(queries.n) * n);
  score_all_into(*snap, queries, p, r.scores.data());
  if (!t.n_dead) {
    r.ids = t.ids;
    return r;
  }
  // Leave the removed images out: compact every row to the live slots.
  for (int64_t i = 0; i < n; ++i)
    if (!t.dead[i]) r.ids.push_back(t.ids[i]);
  const int64_t live = static_cast<int64_t>(r.ids.size());
  for (int64_t qi = 0; qi < queries.n; ++qi) {
    const float* src = r.scores.data() + qi * n;
    float* dst = r.scores.data() + qi * live;
    int64_t o = 0;
    for (int64_t i = 0; i < n; ++i)
      if (!t.dead[i]) dst[o++] = src[i];
  }
  r.scores.resize(static_cast<size_t>(queries.n) * live);
  return r;
}

TopK InvertedFile::search_unchecked(const CodesView& queries, int64_t k, const ScoreParams& p) const {
  check_no_multi("search");
  check_codes(queries, n_words_);
  const auto snap = pin();
  const Snapshot& s = *snap;
  const int64_t n = s.n_slots();
  const int64_t* ids = s.slots->ids.data();
  const uint8_t* dead = s.slots->n_dead ? s.slots->dead.data() : nullptr;
  TopK r = empty_topk(queries.n, k, n - s.slots->n_dead);
  const int64_t kk = r.k;
  if (kk == 0 || queries.n == 0) return r;
  const std::vector<int64_t> table = hamming_table(p);
  const int T = num_threads();
  if (queries.n >= T) {
    // Many queries: groups of up to kQueryGroup queries per thread, each group sharing the reading
    // and decoding of the lists its queries have in common (memory: one accumulator of 8 bytes per
    // image per query of the group, per thread).
    // Groups only while their accumulators stay cache-sized (kGroupBytes per thread): beyond, the
    // scattered adds into several large accumulators cost more than the shared decoding saves.
    int64_t G = std::max<int64_t>(
        1, std::min<int64_t>({kQueryGroup, queries.n / T,
                              kGroupBytes / std::max<int64_t>(1, std::min(n, kTileSlots) * 8)}));
    // And only where the queries of a group share lists: with a large codebook (65,536 words, about
    // 1,000 words per image) consecutive queries share a few percent of their words, and a group's
    // larger accumulators cost more than the shared decoding saves (measured: 7.7 ms of CPU per
    // query grouped by 8 against 6.2 ms one by one, 100k images). The groups' sharing: entries per
    // distinct word over the first groups; under 1.5, one query at a time. (Scores do not depend
    // on the grouping: integer sums.)
    if (G > 1) {
      int64_t entries = 0, distinct = 0;
      std::vector<int32_t> w;
      for (int64_t q0 = 0; q0 + G <= queries.n && q0 < 8 * G; q0 += G) {
        w.assign(queries.words + queries.offsets[q0], queries.words + queries.offsets[q0 + G]);
        std::sort(w.begin(), w.end());
        entries += static_cast<int64_t>(w.size());
        distinct += std::unique(w.begin(), w.end()) - w.begin();
      }
      if (2 * entries < 3 * distinct) G = 1;
    }
    const int64_t n_groups = (queries.n + G - 1) / G;
    ParallelErrors errors;
#pragma omp parallel
    {
      std::vector<int64_t> acc;
      std::vector<float> scores;
      errors.run([&] { scores.resize(static_cast<size_t>(n) * G); });
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < n_groups; ++g)
        errors.run([&] {
          const int64_t q0 = g * G;
          const int group = static_cast<int>(std::min(G, queries.n - q0));
          score_slots(s, queries, q0, group, p, table.data(), 0, n, acc, scores.data());
          for (int j = 0; j < group; ++j)
            topk(scores.data() + static_cast<int64_t>(j) * n, ids, n, kk, r.scores.data() + (q0 + j) * kk,
                 r.ids.data() + (q0 + j) * kk, dead);
        });
    }
    errors.rethrow();
    return r;
  }
  // Few queries: split each query's slots by range across the team obtained, then merge the
  // per-range top-k lists. (Splitting the query's lists instead, each thread over every slot with
  // a sum of the threads' accumulators after each slot tile, measured the same best case on 2
  // shared cores and far worse medians: its barriers wait for a descheduled partner.)
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
        score_slots(s, queries, qi, 1, p, table.data(), lo, hi, acc, scores.data() + lo);
        const int64_t kt = std::min(kk, hi - lo);
        cand_s[t].resize(kt);
        cand_i[t].resize(kt);
        const int64_t got = topk(scores.data() + lo, ids + lo, hi - lo, kt, cand_s[t].data(), cand_i[t].data(),
                                 dead ? dead + lo : nullptr);
        cand_s[t].resize(got);
        cand_i[t].resize(got);
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

TopK InvertedFile::search_pooled_unchecked(const CodesView& queries, bool mean, int64_t k, const ScoreParams& p) const {
  D2R_CHECK(multi_entry_, "pooled search needs a multi-entry (regional) inverted file");
  check_codes(queries, n_words_);
  const auto snap = pin();
  const Snapshot& s = *snap;
  const int64_t n = s.n_slots();
  const std::vector<int64_t>& slot_ids = s.slots->ids;
  // An image's entries are consecutive slots: groups are the runs of equal ids among live slots
  // (an image's entries are removed together).
  const SlotTable& t = *s.slots;
  std::vector<int64_t> run_start, run_end, run_id;
  run_start.reserve(t.n_images);
  run_end.reserve(t.n_images);
  run_id.reserve(t.n_images);
  for (int64_t i = 0; i < n; ++i) {
    if (t.is_dead(i)) continue;
    if (run_id.empty() || run_end.back() != i || slot_ids[i] != run_id.back()) {
      run_start.push_back(i);
      run_end.push_back(i);
      run_id.push_back(slot_ids[i]);
    }
    run_end.back() = i + 1;
  }
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
        for (int64_t i = run_start[g]; i < run_end[g]; ++i) acc += sc[i];
        pooled[g] = static_cast<float>(acc / static_cast<double>(run_end[g] - run_start[g]));
      } else {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = run_start[g]; i < run_end[g]; ++i) m = std::max(m, sc[i]);
        pooled[g] = m;
      }
    }
    topk(pooled.data(), run_id.data(), G, kk, r.scores.data() + qi * kk, r.ids.data() + qi * kk);
    });
  }
  return r;
}

EntryCodes InvertedFile::entry_codes(int64_t n_ids, const int64_t* ids, int64_t n_req, const int32_t* words) const {
  D2R_CHECK(n_ids >= 0 && n_req >= 0, "entry_codes: negative size");
  for (int64_t i = 0; words && i < n_req; ++i) {
    D2R_CHECK(words[i] >= 0 && words[i] < n_words_, "entry_codes: word id out of range");
    D2R_CHECK(i == 0 || words[i] > words[i - 1], "entry_codes: word ids must be strictly ascending");
  }
  auto s = pin();
  const SlotTable& t = *s->slots;
  // (slot, entry) of the requested images' live slots, sorted by slot; entries numbered in the order of ids.
  std::vector<std::pair<uint32_t, int64_t>> wanted;
  EntryCodes out;
  {
    std::vector<int64_t> sorted_ids(ids, ids + n_ids);
    std::sort(sorted_ids.begin(), sorted_ids.end());
    D2R_CHECK(std::adjacent_find(sorted_ids.begin(), sorted_ids.end()) == sorted_ids.end(),
              "entry_codes: an image id is given twice");
  }
  for (int64_t i = 0; i < n_ids; ++i) {
    auto it = std::lower_bound(t.by_id.begin(), t.by_id.end(), std::make_pair(ids[i], uint32_t{0}));
    if (it == t.by_id.end() || it->first != ids[i]) throw NotFound("image id " + id_str(ids[i]) + " is not in the index");
    for (; it != t.by_id.end() && it->first == ids[i]; ++it) {
      wanted.emplace_back(it->second, static_cast<int64_t>(out.image.size()));
      out.image.push_back(i);
      out.nwords.push_back(t.nwords[it->second]);
    }
  }
  std::sort(wanted.begin(), wanted.end());
  const int64_t n_entries = static_cast<int64_t>(out.image.size());
  const int64_t n_w = words ? n_req : n_words_;
  const int cb = code_bytes_;
  // Per requested word: the (entry, code) pairs found in its posting list.
  std::vector<std::vector<int64_t>> hit_entry(static_cast<size_t>(n_w));
  std::vector<std::vector<uint8_t>> hit_code(static_cast<size_t>(n_w));
  if (n_entries > 0) {
    const uint32_t lo = wanted.front().first, hi = wanted.back().first;
    for_words(n_w, [&](int64_t wi, Scratch& sc) {
      const int64_t w = words ? words[wi] : wi;
      for (const auto& seg : s->segments) {
        if (seg->slot_end <= static_cast<int64_t>(lo) || seg->slot_begin > static_cast<int64_t>(hi)) continue;
        for_blocks(*seg, w, cb, sc.block, [&](const Block& blk, const uint32_t* sl) {
          for (int i = 0; i < blk.n; ++i) {
            const int64_t abs = seg->slot_begin + sl[i];
            if (abs < lo || abs > hi) continue;
            auto it = std::lower_bound(wanted.begin(), wanted.end(), std::make_pair(static_cast<uint32_t>(abs), int64_t{0}));
            if (it == wanted.end() || it->first != abs) continue;
            hit_entry[wi].push_back(it->second);
            hit_code[wi].insert(hit_code[wi].end(), blk.codes + static_cast<size_t>(i) * cb,
                                blk.codes + static_cast<size_t>(i + 1) * cb);
          }
        });
      }
    });
  }
  out.offsets.assign(static_cast<size_t>(n_entries) + 1, 0);
  for (const auto& h : hit_entry)
    for (int64_t e : h) ++out.offsets[e + 1];
  for (int64_t e = 0; e < n_entries; ++e) out.offsets[e + 1] += out.offsets[e];
  const int64_t total = out.offsets[n_entries];
  out.words.resize(total);
  out.codes.resize(static_cast<size_t>(total) * cb);
  std::vector<int64_t> fill(out.offsets.begin(), out.offsets.end() - 1);
  for (int64_t wi = 0; wi < n_w; ++wi) {  // ascending words: each entry's words come out ascending
    const int32_t w = static_cast<int32_t>(words ? words[wi] : wi);
    for (size_t j = 0; j < hit_entry[wi].size(); ++j) {
      const int64_t pos = fill[hit_entry[wi][j]]++;
      out.words[pos] = w;
      std::copy(hit_code[wi].begin() + static_cast<std::ptrdiff_t>(j * cb),
                hit_code[wi].begin() + static_cast<std::ptrdiff_t>((j + 1) * cb), out.codes.begin() + pos * cb);
    }
  }
  return out;
}

}  // namespace d2r
