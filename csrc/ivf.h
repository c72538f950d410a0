// Inverted file over visual words: per word a posting list of (image slot, code), scored with the
// thresholded polynomial selectivity (METHOD.md section 4).
//
// Layout: a compact CSR "main" part (offsets per word, slots, codes), which may live in external
// memory (a memory-mapped file), plus a per-word "delta" part that receives incremental adds and is
// merged into the main part when it grows as large. Slots are dense and in insertion order, so every
// posting list is sorted by slot; removal compacts the lists and renumbers the slots in order.
#pragma once

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <unordered_map>
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

// sigma(similarity(h)) in fixed point for every Hamming distance h in [0, 8 * code_bytes] (shared with
// the CUDA scoring).
std::vector<int64_t> fixed_hamming_table(int dim, int code_bytes, float alpha, float tau);

class InvertedFile {
 public:
  InvertedFile(int64_t n_words, int dim, bool binary);

  int64_t n_words() const { return n_words_; }
  int dim() const { return dim_; }
  bool binary() const { return binary_; }
  int code_bytes() const { return code_bytes_; }
  int64_t n_images() const;
  int64_t n_entries() const;
  size_t memory_bytes() const;

  // Adds images with the given (unique, new) ids.
  void add(const CodesView& images, const int64_t* ids);
  // Removes the images with these ids; every id must be present. Returns the number removed.
  int64_t remove(int64_t n, const int64_t* ids);
  bool contains(int64_t id) const;

  // Scores of every indexed image for each query, in slot order: out is n_queries x n_images().
  void score_all(const CodesView& queries, const ScoreParams& p, float* out) const;
  // Top-k per query (k < 0: full ranking): out arrays are n_queries x kk, kk = result_k(k).
  void search(const CodesView& queries, int64_t k, const ScoreParams& p, float* out_scores,
              int64_t* out_ids) const;
  int64_t result_k(int64_t k) const;

  // Regional search (paper section 4.2): slot s belongs to group slot_group[s] in [0, n_groups) (an
  // image made of several region entries); a group's score is the max, or the mean, of its slots'
  // scores; top-k (k < 0: all) over the groups, reported with group_ids. Outputs n_queries x kk with
  // kk = min(k, n_groups).
  void search_pooled(const CodesView& queries, const int64_t* slot_group, int64_t n_groups,
                     const int64_t* group_ids, bool mean, int64_t k, const ScoreParams& p,
                     float* out_scores, int64_t* out_ids) const;

  // Merges the delta part into the main CSR part (done before export).
  void merge();
  // Main CSR arrays and per-slot data (valid after merge(); delta must be empty).
  const int64_t* main_offsets() const { return off_; }
  const uint32_t* main_slots() const { return slot_; }
  const uint8_t* main_codes() const { return code_; }
  const int64_t* slot_ids() const { return slot_ids_.data(); }
  const int32_t* slot_word_counts() const { return slot_nwords_.data(); }

  // Replaces the whole content by external CSR arrays (kept alive by `owner`, e.g. a memory map).
  void set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_images,
                   const int64_t* image_ids, const int32_t* word_counts, std::shared_ptr<const void> owner);

 private:
  void check_codes(const CodesView& v) const;
  void rebuild(const std::vector<int64_t>* new_slot_of_old);
  void score_query(const CodesView& q, int64_t qi, const ScoreParams& p, const int64_t* table,
                   int64_t slot_lo, int64_t slot_hi, float* scores) const;
  std::vector<int64_t> hamming_table(const ScoreParams& p) const;

  int64_t n_words_;
  int dim_;
  bool binary_;
  int code_bytes_;

  // main CSR part (pointers into own_* or into external memory)
  const int64_t* off_ = nullptr;
  const uint32_t* slot_ = nullptr;
  const uint8_t* code_ = nullptr;
  std::vector<int64_t> own_off_;
  std::vector<uint32_t> own_slot_;
  std::vector<uint8_t> own_code_;
  std::shared_ptr<const void> owner_;

  // delta part
  std::vector<std::vector<uint32_t>> dslot_;
  std::vector<std::vector<uint8_t>> dcode_;
  int64_t delta_entries_ = 0;

  // per slot
  std::vector<int64_t> slot_ids_;
  std::vector<int32_t> slot_nwords_;
  std::unordered_map<int64_t, uint32_t> slot_of_id_;

  mutable std::shared_mutex mutex_;
};

}  // namespace d2r
