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
//  * Postings are compressed (postings.h); removed images are tombstones in the slot table until
//    compact() or a save drops their postings.
//  * Writers (add, remove, compact, set_content, set_segments) are serialised by a writer mutex; each builds a new
//    snapshot beside the current one (sharing the unchanged segments) and publishes it with a pointer
//    swap. Everything that can fail (bad input, allocation) happens before the swap, so an operation
//    either completes or leaves the index exactly as it was (strong exception guarantee).
//  * No Python runs and the GIL is never taken here; memory from outside (a memory-mapped file) is
//    held through a native owner released without the GIL.
//  * A memory-mapped file truncated under the index (map_guard.h): the SIGBUS guard maps zero pages
//    past the new end and sets the mapping's flag, which every public reader and writer checks
//    before and after it runs (CorruptIndex "... was truncated while memory-mapped"), for good.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace d2r {

struct ScanKernels;
namespace simd {
struct Kernels;
}  // namespace simd

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

// Immutable postings of the slots [slot_begin, slot_end), compressed (postings.h): word w's list is
// data[word_off[w], word_off[w + 1]), its slots local (slot - slot_begin). The arrays live in own_* or
// in external memory kept alive by `owner` (a memory-mapped index file); then page_crc, when given,
// holds the CRC-32 of each page_bytes-long page of data, verified on first use (or by verify()).
struct Segment {
  int64_t slot_begin = 0, slot_end = 0, n_entries = 0;
  const uint64_t* word_off = nullptr;  // n_words + 1
  const uint8_t* data = nullptr;
  uint64_t data_bytes = 0;
  const uint32_t* page_crc = nullptr;
  int64_t page_bytes = 0, n_pages = 0;
  std::unique_ptr<std::atomic<uint8_t>[]> page_ok;  // per page: checksum verified
  std::vector<uint64_t> own_off;
  std::vector<uint8_t> own_data;
  std::shared_ptr<const void> owner;
  // A memory-mapped file's truncation flag (map_guard.h; nullptr otherwise) and its name: once set,
  // every reader raises CorruptIndex instead of answering.
  const std::atomic<uint8_t>* truncated = nullptr;
  std::string source;
  size_t owned_bytes() const;
  size_t mapped_bytes() const;
  // Verifies the unverified pages overlapping data[b, e) (no-op without checksums); CorruptIndex on a
  // mismatch. Thread-safe (two readers may verify one page twice; the result is the same).
  void verify_range(uint64_t b, uint64_t e) const;
};

// Per-slot data of a snapshot (shared between snapshots that differ only in their segments).
struct SlotTable {
  std::vector<int64_t> ids;                         // per slot
  std::vector<int32_t> nwords;                      // per slot
  std::vector<std::pair<int64_t, uint32_t>> by_id;  // (id, slot) of the live slots, sorted
  std::vector<uint8_t> dead;                        // per slot: removed (tombstone); empty when none
  int64_t n_images = 0;                             // distinct live ids
  int64_t n_dead = 0;                               // dead slots
  int64_t dead_entries = 0;                         // postings of dead slots still stored
  bool is_dead(int64_t s) const { return n_dead && dead[s]; }
  size_t bytes() const;
};

struct Snapshot {
  std::vector<std::shared_ptr<const Segment>> segments;  // ascending, contiguous slot ranges from 0
  std::shared_ptr<const SlotTable> slots;
  int64_t n_entries = 0;  // postings stored (those of dead slots included)
  int64_t next_id = 0;    // 1 + largest id ever held (where default ids start)
  int64_t n_slots() const { return static_cast<int64_t>(slots->ids.size()); }
};

// The live content of a snapshot in plain CSR form (slots renumbered densely): for the GPU inverted
// file and for tests.
struct CsrContent {
  std::vector<int64_t> offsets;  // n_words + 1
  std::vector<uint32_t> slots;
  std::vector<uint8_t> codes;
  std::vector<int64_t> ids;
  std::vector<int32_t> nwords;
  int64_t next_id = 0;
};

// One compressed segment given from outside (an index file): its slots are the next n_slots slots.
struct SegmentInput {
  int64_t n_slots = 0, n_entries = 0;
  const uint64_t* word_off = nullptr;
  const uint8_t* data = nullptr;
  uint64_t data_bytes = 0;
  const uint32_t* page_crc = nullptr;  // optional
  int64_t page_bytes = 0, n_pages = 0;
  std::shared_ptr<const void> owner;   // keeps the memory alive
  const std::atomic<uint8_t>* truncated = nullptr;  // a mapped file's truncation flag (map_guard.h)
  std::string source;                                // the file's name, for that error
  // The postings' layout: 4 (postings.h), or 3 (postings_v3.h: Golomb-Rice gaps of index files of
  // format 3), converted to 4 into memory owned by the segment as it is set (checksums verified
  // first, when given).
  int format = 4;
};

// The stored (word, code) pairs of some entries (InvertedFile::entry_codes): entry e belongs to
// image ids[image[e]], owns words[offsets[e], offsets[e + 1]) (ascending) and their codes.
struct EntryCodes {
  std::vector<int64_t> image;    // per entry: position of its image in the requested ids
  std::vector<int32_t> nwords;   // per entry: the number of words it stores (all of them)
  std::vector<int64_t> offsets;  // n_entries + 1
  std::vector<int32_t> words;
  std::vector<uint8_t> codes;    // code_bytes per (entry, word)
};

// Streams a snapshot's live postings as one compressed segment (slots renumbered densely, dead ones
// dropped), a chunk of bytes at a time, with the word table, page checksums and slot tables of what
// it wrote: how an index is saved without a second copy of its postings in memory.
class PostingWriter {
 public:
  PostingWriter(std::shared_ptr<const Snapshot> snap, int64_t n_words, int code_bytes, int64_t page_bytes);
  // The next chunk (whole words, at least min_bytes unless the end is reached); empty at the end.
  std::vector<uint8_t> next(uint64_t min_bytes);
  bool done() const { return word_ >= n_words_; }
  const std::vector<uint64_t>& word_off() const { return word_off_; }
  const std::vector<uint32_t>& page_crc() const { return page_crc_; }  // complete once done()
  std::vector<int64_t> ids;     // live slots' ids, in slot order
  std::vector<int32_t> nwords;  // live slots' word counts
  int64_t n_entries = 0, next_id = 0, page_bytes = 0;

 private:
  std::vector<uint8_t> next_unchecked(uint64_t min_bytes);
  void crc_bytes(const uint8_t* p, size_t n);
  std::shared_ptr<const Snapshot> snap_;
  int64_t n_words_, word_ = 0;
  int code_bytes_;
  std::vector<int64_t> new_slot_;
  std::vector<uint64_t> word_off_;
  std::vector<uint32_t> page_crc_;
  uint32_t cur_crc_ = 0;
  int64_t cur_fill_ = 0;
  uint64_t written_ = 0;
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
  int64_t n_entries() const;  // live postings
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
  // and nothing changes). Returns the number of images removed. The postings stay where they are,
  // marked dead (tombstones, skipped by every reader): O(slots), never a rewrite of the postings.
  // compact(), save and the merges of in-memory segments drop them.
  int64_t remove(int64_t n, const int64_t* ids);
  // Rewrites the postings without the dead ones and renumbers the slots (in memory: mapped segments
  // are read into memory; at scale, save the index instead, which drops them as it streams).
  // Returns the number of postings dropped.
  int64_t compact();

  TopK search(const CodesView& queries, int64_t k, const ScoreParams& p) const;  // k < 0: all
  AllScores score_all(const CodesView& queries, const ScoreParams& p) const;
  // Regional search (paper section 4.2), multi_entry only: an image's score is the max, or the mean,
  // of its entries' scores; top-k (k < 0: all) over the images.
  TopK search_pooled(const CodesView& queries, bool mean, int64_t k, const ScoreParams& p) const;

  std::shared_ptr<const Snapshot> snapshot() const { return pin(); }
  // The live content of the current snapshot, decoded to CSR.
  CsrContent export_csr() const;
  // The codes the images `ids` store (every entry of each, in the order of ids, an image's entries in
  // slot order), restricted to the ascending word ids `words` (nullptr: every word). For query
  // expansion: it decodes the posting lists of the requested words only (all of them when words is
  // nullptr: O(postings)). Every id must be indexed (NotFound) and appear once (InvalidArgument).
  EntryCodes entry_codes(int64_t n_ids, const int64_t* ids, int64_t n_req, const int32_t* words) const;
  // Verifies every page checksum of every segment now (the alternative to verification on first
  // use), then the structure of every list of every segment (every block decoded and checked as a
  // search checks it; each list's postings exactly its count; each segment's postings its
  // n_entries; each slot's postings its word count); returns the bytes verified by checksum.
  // A reader: runs beside searches and writers.
  uint64_t verify() const;
  int n_segments() const { return static_cast<int>(pin()->segments.size()); }
  int64_t dead_images() const { return pin()->slots->n_dead; }

  // Replaces the whole content by CSR arrays (index files of format 1 and 2, the GPU index),
  // validated and compressed (a copy).
  void set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_slots,
                   const int64_t* image_ids, const int32_t* word_counts, int64_t next_id);
  // Replaces the whole content by compressed segments used in place (kept alive by their owners), the
  // slots of part i following those of part i - 1; image_ids / word_counts cover every slot. Checks
  // the structure in O(words + slots) (the postings themselves are checked as they are decoded, and
  // by their page checksums).
  void set_segments(const std::vector<SegmentInput>& parts, const int64_t* image_ids, const int32_t* word_counts,
                    int64_t n_slots, int64_t next_id);

 private:
  // The public operations of the same names, without the check for a truncated memory-mapped file
  // that those run before and after them (map_guard.h).
  std::vector<int64_t> add_unchecked(const CodesView& images, const int64_t* ids, const int64_t* auto_index);
  int64_t remove_unchecked(int64_t n, const int64_t* ids);
  int64_t compact_unchecked();
  CsrContent export_unchecked() const;
  AllScores score_all_unchecked(const CodesView& queries, const ScoreParams& p) const;
  TopK search_unchecked(const CodesView& queries, int64_t k, const ScoreParams& p) const;
  TopK search_pooled_unchecked(const CodesView& queries, bool mean, int64_t k, const ScoreParams& p) const;
  // verify()'s structural pass over one segment (CorruptIndex on the first problem).
  void check_structure(const Segment& seg, const SlotTable& table) const;
  std::shared_ptr<const Snapshot> pin() const;
  void publish(std::shared_ptr<const Snapshot> s);
  std::shared_ptr<Segment> build_segment(const CodesView& v, int64_t first_slot) const;
  std::shared_ptr<Segment> encode_segment(int64_t slot_begin, int64_t slot_end, const int64_t* csr_off,
                                          const uint32_t* csr_slot, const uint8_t* csr_code) const;
  std::shared_ptr<Segment> merge_segments(const std::vector<std::shared_ptr<const Segment>>& parts,
                                          const SlotTable& table, const std::vector<int64_t>* new_slot_of_old,
                                          int64_t n_kept) const;
  std::shared_ptr<Segment> convert_v3(const SegmentInput& in, int64_t slot_begin) const;
  void compact_segments(std::vector<std::shared_ptr<const Segment>>& segs, const SlotTable& table) const;
  std::vector<int64_t> hamming_table(const ScoreParams& p) const;
  void score_slots(const Snapshot& s, const CodesView& q, int64_t qi0, int group, const ScoreParams& p,
                   const int64_t* table, int64_t slot_lo, int64_t slot_hi, std::vector<int64_t>& acc,
                   float* scores) const;
  void score_block(const uint8_t* qc, float lim, const ScoreParams& p, const int64_t* table, const uint8_t* codes,
                   const uint32_t* slots, int i0, int i1, uint32_t base, int64_t* acc, const ScanKernels& kern,
                   const simd::Kernels& simd_kern) const;
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
