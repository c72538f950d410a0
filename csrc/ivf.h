// Inverted file over visual words: per word a posting list of (image slot, code), scored with the
// thresholded polynomial selectivity (METHOD.md section 4).
//
// Concurrency model (what may run concurrently, what is atomic):
//  * The content is an immutable Snapshot: CSR segments of postings (each covers a contiguous range
//    of slots; slots are dense and in insertion order, so every posting list is sorted by slot) plus
//    the per-slot image ids and word counts. A snapshot is never modified once published.
//  * Readers (search, score_all, search_pooled, export, the accessors) pin the current snapshot (a
//    shared_ptr copy under a mutex held for that copy only) and compute on it without any lock, so
//    they run concurrently with each other and with a writer, and never see half an update.
//  * Writers (add, remove, set_content, merge) are serialised by a writer mutex; each builds a new
//    snapshot beside the current one (sharing the unchanged segments) and publishes it with a pointer
//    swap. Everything that can fail (bad input, allocation) happens before the swap, so an operation
//    either completes or leaves the index exactly as it was (strong exception guarantee).
//  * No Python runs and the GIL is never taken here; memory from outside (a memory-mapped file) is
//    held through a native owner released without the GIL.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace d2r {

struct ScoreParams {
  float alpha = 3.0f;
  float tau = 0.0f;
  bool normalize = true;  // gamma normalisation: divide by sqrt(|W_q| * |W_x|)
};

// A batch of aggregated images (or queries): image i owns entries [offsets[i], offsets[i+1]).
struct CodesView {
  int64_t n = 0;
  const int64_t* offsets = nullptr;
  const int32_t* words = nullptr;
  const uint8_t* codes = nullptr;  // code_bytes per entry
};

// Validates a batch: offsets from 0, non-decreasing; per image strictly ascending word ids in
// [0, n_words). Shared by the CPU and the GPU inverted files. Throws InvalidArgument.
void check_codes(const CodesView& v, int64_t n_words);

// Top-k results, n_queries x k row-major (score descending, ties by id ascending).
struct TopK {
  int64_t n_queries = 0, k = 0;
  std::vector<float> scores;
  std::vector<int64_t> ids;
};

// Every image's score for each query: scores is n_queries x ids.size(), in slot order.
struct AllScores {
  std::vector<float> scores;
  std::vector<int64_t> ids;
};

// sigma(similarity(h)) in fixed point for every Hamming distance h in [0, 8 * code_bytes] (shared with
// the CUDA scoring).
std::vector<int64_t> fixed_hamming_table(int dim, int code_bytes, float alpha, float tau);

// Immutable postings of the slots [slot_begin, slot_end) in CSR form over the words. The arrays
// live in own_* or in external memory kept alive by `owner`.
struct Segment {
  int64_t slot_begin = 0, slot_end = 0, n_entries = 0;
  const int64_t* off = nullptr;  // n_words + 1
  const uint32_t* slot = nullptr;
  const uint8_t* code = nullptr;
  std::vector<int64_t> own_off;
  std::vector<uint32_t> own_slot;
  std::vector<uint8_t> own_code;
  std::shared_ptr<const void> owner;
  size_t owned_bytes() const;
};

// Per-slot data of a snapshot (shared between snapshots that differ only in their segments).
struct SlotTable {
  std::vector<int64_t> ids;                         // per slot
  std::vector<int32_t> nwords;                      // per slot
  std::vector<std::pair<int64_t, uint32_t>> by_id;  // (id, slot), sorted
  int64_t n_images = 0;                             // distinct ids
  size_t bytes() const;
};

struct Snapshot {
  std::vector<std::shared_ptr<const Segment>> segments;  // ascending, contiguous slot ranges from 0
  std::shared_ptr<const SlotTable> slots;
  int64_t n_entries = 0;  // postings
  int64_t next_id = 0;    // 1 + largest id ever held (where default ids start)
  int64_t n_slots() const { return static_cast<int64_t>(slots->ids.size()); }
};

class InvertedFile {
 public:
  // multi_entry: an image may own several consecutive entries (regions) under one id, for pooled
  // regional search; plain search and score_all are then refused.
  InvertedFile(int64_t n_words, int dim, bool binary, bool multi_entry = false);

  int64_t n_words() const { return n_words_; }
  int dim() const { return dim_; }
  bool binary() const { return binary_; }
  bool multi_entry() const { return multi_entry_; }
  int code_bytes() const { return code_bytes_; }
  int64_t n_images() const { return pin()->slots->n_images; }
  int64_t n_entries() const { return pin()->n_entries; }
  int64_t next_id() const { return pin()->next_id; }
  size_t memory_bytes() const;
  bool contains(int64_t id) const;
  std::vector<int64_t> image_ids() const;  // distinct ids in insertion order

  // Adds the entries of `images`. ids: one per entry, new to the index (in multi_entry mode equal
  // ids must be consecutive: one image's regions); nullptr allocates: entry e gets next_id() + e, or
  // next_id() + auto_index[e] with auto_index (multi_entry: non-decreasing from 0, steps of 0 or 1).
  // Returns the ids of the entries. Atomic.
  std::vector<int64_t> add(const CodesView& images, const int64_t* ids, const int64_t* auto_index = nullptr);
  // Removes the images with these ids (all their entries); every id must be present (else NotFound
  // and nothing changes). Returns the number of images removed.
  int64_t remove(int64_t n, const int64_t* ids);

  TopK search(const CodesView& queries, int64_t k, const ScoreParams& p) const;  // k < 0: all
  AllScores score_all(const CodesView& queries, const ScoreParams& p) const;
  // Regional search (paper section 4.2), multi_entry only: an image's score is the max, or the mean,
  // of its entries' scores; top-k (k < 0: all) over the images.
  TopK search_pooled(const CodesView& queries, bool mean, int64_t k, const ScoreParams& p) const;

  // The current content as one segment (merged aside if needed, without waiting for a writer).
  std::shared_ptr<const Snapshot> merged_snapshot();
  std::shared_ptr<const Snapshot> snapshot() const { return pin(); }

  // Replaces the whole content by CSR arrays, validated. With an owner the arrays are used in place
  // (kept alive by it, e.g. a memory map); without one they are copied.
  void set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_slots,
                   const int64_t* image_ids, const int32_t* word_counts, int64_t next_id,
                   std::shared_ptr<const void> owner);

 private:
  std::shared_ptr<const Snapshot> pin() const;
  void publish(std::shared_ptr<const Snapshot> s);
  std::shared_ptr<Segment> build_segment(const CodesView& v, int64_t first_slot) const;
  std::shared_ptr<Segment> merge_segments(const std::vector<std::shared_ptr<const Segment>>& parts,
                                          const std::vector<int64_t>* new_slot_of_old, int64_t n_kept) const;
  void compact_segments(std::vector<std::shared_ptr<const Segment>>& segs) const;
  std::vector<int64_t> hamming_table(const ScoreParams& p) const;
  void score_slots(const Snapshot& s, const CodesView& q, int64_t qi, const ScoreParams& p, const int64_t* table,
                   int64_t slot_lo, int64_t slot_hi, std::vector<int64_t>& acc, float* scores) const;
  void score_all_into(const Snapshot& s, const CodesView& q, const ScoreParams& p, float* out) const;
  void check_no_multi(const char* what) const;

  int64_t n_words_;
  int dim_;
  bool binary_;
  bool multi_entry_;
  int code_bytes_;

  mutable std::mutex snap_mutex_;  // guards snap_ (held only to copy or swap the pointer)
  std::mutex write_mutex_;         // serialises writers
  std::shared_ptr<const Snapshot> snap_;
};

}  // namespace d2r
