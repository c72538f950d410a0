// The CUDA path of d2r, as seen from host C++ (the bindings): no CUDA types here, so this header is
// included by code compiled without nvcc. Every operation mirrors a CPU kernel of csrc/ and gives the
// same answers: quantize.cu <-> csrc/quantize.cpp, aggregate.cu <-> csrc/aggregate.cpp, ivf.cu <->
// csrc/ivf.cpp + csrc/topk.cpp, kmeans.cu <-> faiss k-means (d2r.codebook).
//
// All work runs on the legacy default stream of the current device and is complete when a call
// returns (inputs produced by PyTorch or CuPy on their default streams are therefore ready).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ivf.h"  // ScoreParams, TopK, AllScores, CodesView, check_codes

namespace d2r {
namespace gpu {

// A CUDA failure, or no usable device.
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Device memory exhausted; the message names the allocation that did not fit.
struct DeviceOutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int device_count();  // 0 without a driver or a device; never throws
std::string device_name(int device);
std::string runtime_info();
void memory_info(size_t* free_bytes, size_t* total_bytes);

// Owned device memory (cudaMalloc). Move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, const char* what);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  void upload(const void* host, size_t bytes, size_t offset = 0);
  void download(void* host, size_t bytes, size_t offset = 0) const;

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};
using SharedBuffer = std::shared_ptr<Buffer>;

// Test hook: the n-th device allocation (Buffer) from now on in the calling thread throws
// DeviceOutOfMemory (n <= 0: none). Returns the previous setting.
int64_t fail_allocation_after(int64_t n);

// Copies between host and device memory (kind: "h2d", "d2h", "d2d").
void copy_h2d(void* dst, const void* src, size_t bytes);
void copy_d2h(void* dst, const void* src, size_t bytes);
void copy_d2d(void* dst, const void* src, size_t bytes);

// Nearest visual words on the GPU: TF32 tensor-core products fused with a per-thread top-(m + margin)
// selection (the distance matrix is never written), then an exact float64 re-check of the candidates
// with a proven error bound; rows whose bound cannot certify the result are recomputed exhaustively
// in float64. The result equals the CPU Quantizer's (ties by the lower word id).
class Quantizer {
 public:
  // centroids: n_words x dim float32, in host memory or (on_device) device memory.
  Quantizer(const float* centroids, bool on_device, int64_t n_words, int dim);
  ~Quantizer();
  Quantizer(const Quantizer&) = delete;
  Quantizer& operator=(const Quantizer&) = delete;

  int64_t n_words() const;
  int dim() const;
  const float* centroids() const;  // device, n_words x dim

  // x: n x dim float32 in device memory. Writes ids (n x m int32) and, if dists is not null, squared
  // distances (n x m float32), both device pointers. m <= kMaxM.
  void search(const float* x, int64_t n, int m, int32_t* ids, float* dists) const;
  // Rows recomputed exhaustively by the last search (the bound could not certify them).
  int64_t last_fallback_rows() const;

  static constexpr int kMaxM = 24;
  static constexpr int kMaxDim = 512;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Aggregation (csrc/aggregate.h semantics, ASMK / R-ASMK with float or binary codes) of descriptors
// already on the device. Layout arrays are host arrays (see d2r::RegionLayout).
struct DeviceAggregated {
  int64_t n_images = 0;
  int64_t n_entries = 0;
  int code_bytes = 0;
  bool binary = true;
  std::vector<int64_t> word_offsets;  // host, n_images + 1
  SharedBuffer words;                 // device int32, n_entries
  SharedBuffer codes;                 // device, n_entries x code_bytes (float32 codes or packed bits)
};

DeviceAggregated aggregate(const float* x, int64_t n_desc, const int32_t* assign, int m, const float* centroids,
                           int64_t n_words, int dim, const int64_t* image_regions, int64_t n_images,
                           const int64_t* region_members, const int64_t* members, bool binary);

// A batch of images (or queries) for the GPU inverted file: image i owns entries [offsets[i],
// offsets[i + 1]). The bindings fill it from arrays whose dtypes and sizes they checked; the inverted
// file checks the content (offsets from 0, non-decreasing, ending at n_entries; per image strictly
// ascending word ids in [0, n_words): d2r::check_codes on host words, the same rules on the device for
// device words).
struct Batch {
  int64_t n = 0;                     // images
  const int64_t* offsets = nullptr;  // host, n + 1
  int64_t n_entries = 0;             // rows of words and codes
  const int32_t* words = nullptr;    // n_entries, host or device memory (words_on_device)
  const uint8_t* codes = nullptr;    // n_entries x code_bytes, host or device memory (codes_on_device)
  bool words_on_device = false;
  bool codes_on_device = false;
};

// An id given to remove() that is not in the index (the bindings raise KeyError).
struct IdNotFound : std::out_of_range {
  using std::out_of_range::out_of_range;
};

// The content of a GPU inverted file in host memory, as one CSR part (the CPU index's export form).
struct Content {
  std::vector<int64_t> offsets;  // n_words + 1
  std::vector<uint32_t> slots;   // n_entries
  std::vector<uint8_t> codes;    // n_entries x code_bytes
  std::vector<int64_t> image_ids;
  std::vector<int32_t> word_counts;
  int64_t next_id = 0;
};

// Inverted file in device memory: a list of CSR parts (bulk-built by sorting on the GPU; an add
// appends a part, parts are merged when the newest is as large as the one before), per-slot word
// counts and id ranks. Scoring and top-k run on the device (see ivf.cu for the organisation).
//
// Concurrency and failures: every operation (the accessors included) runs under one mutex, and no
// Python runs while it is held (the bindings release the GIL before calling in). Every operation that
// changes the index (add, remove, set_content, merge, export's merge) builds what it needs first,
// beside the current content (device buffers, host tables, with a device synchronisation so kernel
// faults surface there), then commits with steps that cannot throw: on any error (invalid input, out of
// device memory, a CUDA error) the index is exactly as it was (strong exception guarantee).
class InvertedFile {
 public:
  InvertedFile(int64_t n_words, int dim, bool binary);
  ~InvertedFile();
  InvertedFile(const InvertedFile&) = delete;
  InvertedFile& operator=(const InvertedFile&) = delete;

  int64_t n_words() const;
  int dim() const;
  bool binary() const;
  int code_bytes() const;
  int64_t n_images() const;
  int64_t n_entries() const;
  int64_t next_id() const;  // 1 + the largest id ever added or set (at least 0): the next default id
  size_t memory_bytes() const;
  int n_parts() const;
  bool contains(int64_t id) const;
  std::vector<int64_t> image_ids() const;  // slot order (copies)
  std::vector<int32_t> word_counts() const;

  // Adds the images of all batches, atomically (all or nothing). ids: one per image over all batches
  // (non-negative, unique, new), or nullptr: consecutive ids from next_id(), allocated under the lock.
  // Returns the ids.
  std::vector<int64_t> add(const std::vector<Batch>& batches, const int64_t* ids);
  // Removes the images with these ids (IdNotFound, and no change, if one is absent). Returns the
  // number of distinct images removed.
  int64_t remove(int64_t n, const int64_t* ids);
  // Merges the parts into as few as the 2^32-entry part limit allows.
  void merge();

  // Top-k per query (k < 0 or k > n_images(): every image), n_queries x kk with kk = min(k, n_images()),
  // score descending, ties by id ascending; the result is sized from the state read under the lock.
  TopK search(const Batch& queries, int64_t k, const ScoreParams& p) const;
  // Dense scores n_queries x n_images (slot order) and the slot ids, from one locked state.
  AllScores score_all(const Batch& queries, const ScoreParams& p) const;

  // The content in host memory (for the CPU index and index files).
  Content export_content() const;
  // Replaces the content by host CSR arrays (e.g. a CPU index's export), validated as the CPU index
  // does: offsets from 0, non-decreasing, ending at n_entries; slots in [0, n_images) and strictly
  // ascending per word; word counts matching the postings; ids non-negative and unique; next_id
  // greater than every id.
  void set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_entries,
                   int64_t n_images, const int64_t* ids, const int32_t* word_counts, int64_t next_id);

  // Test hook (compiled in always): the n-th device allocation of this index's next operation fails
  // with DeviceOutOfMemory (n <= 0: off).
  void fail_after_allocations(int64_t n);

  static constexpr int64_t kMaxK = 1024;
  // Entries of one part: its sort keys and permutation are uint32.
  static constexpr int64_t kMaxPartEntries = int64_t{0xffffffff};

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Lloyd k-means on the GPU: random initialisation (k distinct points drawn with `seed`), assignment
// by the exact GPU quantizer, centroid update by ordered float64 segment sums (deterministic), empty
// clusters split from large ones as faiss does. x: n x dim on the device. Returns the objective (sum of
// squared distances) after each iteration; writes k x dim centroids to the host array.
std::vector<double> kmeans(const float* x, int64_t n, int dim, int64_t k, int niter, uint64_t seed,
                           float* centroids_out);

}  // namespace gpu
}  // namespace d2r
