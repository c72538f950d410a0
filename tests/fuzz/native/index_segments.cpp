// libFuzzer target: an index file's inverted file as the loader hands it to the core
// (InvertedFile::set_segments: the word table, the posting byte stream of format 4 or 3, the page
// checksums, the image ids and word counts), then every read path over it: verify, export, score_all
// or pooled search at every SIMD level, search, remove and compact.
//
// The file's container (prefix, JSON header, section table, section checksums) is parsed in Python
// (python/d2r/core/index_io.py) and fuzzed by tests/fuzz/py/index_load.py; this target fuzzes what
// the sections hold, which the core checks. Built twice (CMakeLists.txt, D2R_FUZZ=ON):
//   fuzz_index_segments         page checksums as the input gives them (a mutation of the postings
//                               almost always fails them: the checksum layer);
//   fuzz_index_segments_fixcrc  page checksums recomputed from the mutated postings, so that every
//                               input reaches the structural checks below the checksums.
//
// Input (little endian): u8 flags (bit 0 binary codes, bit 1 multi-entry, bit 2 format 3, bit 3 with
// page checksums, bits 4-5 the dimension: binary 128 64 24 256, float 1 2 4 8), u8 n_words - 1
// (mod 64), u16 n_slots (mod 2049), i64 next_id, u32 page_bytes, u32 n_entries, u64 word_off[n_words
// + 1], i64 image_ids[n_slots], i32 word_counts[n_slots], u32 n_pages (mod 4097), u32
// page_crc[n_pages], then the postings (the rest). tests/fuzz/native/make_seeds.py writes this
// layout from index files d2r saved.
//
// Checks (a failure aborts):
//  * no memory error or UB; only d2r's InvalidArgument / CorruptIndex / NotFound are thrown;
//  * every read path agrees on whether the postings are corrupt: export_csr (which decodes every list
//    fully) fails exactly when score_all over every word fails (a search that returns where the
//    export finds a corrupt list would be a silently wrong answer);
//  * every SIMD level gives the same scores bit for bit;
//  * the index equals the one rebuilt from its exported postings by the encoder (set_content):
//    same scores, same top k, also after removing an image and after compacting.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "common.h"
#include "ivf.h"
#include "postings.h"
#include "scan.h"

using namespace d2r;

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz index_segments: %s\n", what.c_str());
  std::abort();
}

struct Reader {
  const uint8_t* p;
  const uint8_t* end;
  template <class T>
  bool get(T* out, size_t n = 1) {
    const size_t bytes = sizeof(T) * n;
    if (static_cast<size_t>(end - p) < bytes) return false;
    if (bytes) std::memcpy(out, p, bytes);
    p += bytes;
    return true;
  }
};

// What one read path gave: ok, or the error's message (and, with `corrupt`, whether it was
// CorruptIndex: the file's structure or checksums, rather than an argument or a score out of range).
template <class F>
bool attempt(F&& f, std::string* error, bool* corrupt = nullptr) {
  if (corrupt) *corrupt = false;
  try {
    f();
    return true;
  } catch (const NotFound& e) {
    *error = e.what();
  } catch (const CorruptIndex& e) {
    *error = e.what();
    if (corrupt) *corrupt = true;
  } catch (const InvalidArgument& e) {
    *error = e.what();
  }
  return false;
}

struct Query {
  std::vector<int64_t> offsets;
  std::vector<int32_t> words;
  std::vector<uint8_t> codes;
  CodesView view() const { return {1, offsets.data(), words.data(), codes.data()}; }
};

// One query holding every word, with codes that vary by word.
Query all_words(int64_t n_words, int code_bytes, bool binary) {
  Query q;
  q.offsets = {0, n_words};
  for (int32_t w = 0; w < n_words; ++w) q.words.push_back(w);
  q.codes.resize(static_cast<size_t>(n_words) * code_bytes);
  for (int64_t w = 0; w < n_words; ++w) {
    uint8_t* c = q.codes.data() + w * code_bytes;
    if (binary) {
      for (int j = 0; j < code_bytes; ++j) c[j] = static_cast<uint8_t>(w * 37 + j * 11 + (j >> 2) * 5);
    } else {
      for (int j = 0; j < code_bytes / 4; ++j) {
        const float v = 0.25f * static_cast<float>((w + 3 * j) % 7 - 3);
        std::memcpy(c + 4 * j, &v, 4);
      }
    }
  }
  return q;
}

struct Result {
  bool ok = false;
  bool corrupt = false;  // failed with CorruptIndex
  std::string error;
  std::vector<float> scores;
  std::vector<int64_t> ids;
};

Result score(const InvertedFile& f, const Query& q) {
  Result r;
  const ScoreParams p{3.0f, 0.0f, true};
  r.ok = attempt(
      [&] {
        if (f.multi_entry()) {
          TopK t = f.search_pooled(q.view(), false, -1, p);
          r.scores = std::move(t.scores);
          r.ids = std::move(t.ids);
        } else {
          AllScores a = f.score_all(q.view(), p);
          r.scores = std::move(a.scores);
          r.ids = std::move(a.ids);
        }
      },
      &r.error, &r.corrupt);
  return r;
}

bool same(const Result& a, const Result& b) {
  return a.ok == b.ok && a.corrupt == b.corrupt && a.ids == b.ids && a.scores.size() == b.scores.size() &&
         (a.scores.empty() || std::memcmp(a.scores.data(), b.scores.data(), sizeof(float) * a.scores.size()) == 0);
}

Result top3(const InvertedFile& f, const Query& q) {
  Result r;
  const ScoreParams p{3.0f, 0.0f, false};
  r.ok = attempt(
      [&] {
        TopK t = f.multi_entry() ? f.search_pooled(q.view(), true, 3, p) : f.search(q.view(), 3, p);
        r.scores = std::move(t.scores);
        r.ids = std::move(t.ids);
      },
      &r.error, &r.corrupt);
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in{data, data + size};
  uint8_t flags = 0, nw_byte = 0;
  uint16_t slots16 = 0;
  int64_t next_id = 0;
  uint32_t page_bytes = 0, n_entries = 0, n_pages = 0;
  if (!in.get(&flags) || !in.get(&nw_byte) || !in.get(&slots16) || !in.get(&next_id) || !in.get(&page_bytes) ||
      !in.get(&n_entries))
    return 0;
  const bool binary = flags & 1, multi = flags & 2, v3 = flags & 4, with_crc = flags & 8;
  static const int kBinDims[4] = {128, 64, 24, 256}, kFloatDims[4] = {1, 2, 4, 8};
  const int dim = binary ? kBinDims[(flags >> 4) & 3] : kFloatDims[(flags >> 4) & 3];
  const int64_t n_words = 1 + nw_byte % 64;
  const int64_t n_slots = slots16 % 2049;
  std::vector<uint64_t> word_off(n_words + 1);
  std::vector<int64_t> ids(n_slots);
  std::vector<int32_t> counts(n_slots);
  if (!in.get(word_off.data(), word_off.size()) || !in.get(ids.data(), ids.size()) ||
      !in.get(counts.data(), counts.size()) || !in.get(&n_pages))
    return 0;
  std::vector<uint32_t> page_crc(n_pages % 4097);
  if (!in.get(page_crc.data(), page_crc.size())) return 0;
  // The postings in a buffer of exactly their size (ASan sees any read past them).
  std::vector<uint8_t> postings(in.p, in.end);
#ifdef D2R_FUZZ_FIX_CRC
  // The checksum layer taken out of the way: pages of 1 to 4096 bytes, checksums of the postings.
  page_bytes = 1 + page_bytes % 4096;
  page_crc.clear();
  for (size_t o = 0; o < postings.size(); o += page_bytes) {
    const size_t n = std::min<size_t>(page_bytes, postings.size() - o);
    page_crc.push_back(crc32(postings.data() + o, n));
  }
#endif

  InvertedFile f(n_words, dim, binary, multi);
  SegmentInput seg;
  seg.n_slots = n_slots;
  seg.n_entries = n_entries;
  seg.word_off = word_off.data();
  seg.data = postings.data();
  seg.data_bytes = postings.size();
  if (with_crc) {
    seg.page_crc = page_crc.data();
    seg.page_bytes = page_bytes;
    seg.n_pages = static_cast<int64_t>(page_crc.size());
  }
  seg.format = v3 ? 3 : 4;
  std::string error;
  if (!attempt([&] { f.set_segments({seg}, ids.data(), counts.data(), n_slots, next_id); }, &error)) return 0;

  // verify(): the page checksums, every list's structure and each image's word count.
  std::string verify_error;
  const bool verified = attempt([&] { f.verify(); }, &verify_error);
  CsrContent csr;
  std::string export_error;
  const bool exported = attempt([&] { csr = f.export_csr(); }, &export_error);
  if (verified && !exported) fail("verify() passes but the export fails: " + export_error);

  // Scores at every SIMD level: identical, and failing exactly when the export fails.
  const Query q = all_words(n_words, f.code_bytes(), binary);
  const std::string active = scan_variant();
  Result first;
  bool have_first = false;
  for (const std::string& v : scan_variants()) {
    set_scan_variant(v);
    Result r = score(f, q);
    if (!have_first) {
      first = r;
      have_first = true;
    } else if (!same(first, r)) {
      fail("SIMD level " + v + " scores differently (or fails differently) from " + scan_variants().front());
    }
  }
  set_scan_variant(active);
  // Scoring reads every list whole: it finds a corrupt list exactly when the export does (it may
  // also refuse codes whose score leaves the fixed-point range: InvalidArgument, not CorruptIndex).
  if (exported ? first.corrupt : first.ok)
    fail(std::string("the export ") + (exported ? "succeeds" : "fails (" + export_error + ")") + " but scoring " +
         (first.ok ? "succeeds" : "fails (" + first.error + ")"));
  // Without verify(), a file whose word counts do not match its postings is not detected (documented:
  // the check needs every list); the comparison below needs them right.
  if (!exported || !verified) return 0;

  // The reference: the exported postings re-encoded by the encoder.
  InvertedFile g(n_words, dim, binary, multi);
  const int64_t n_live = static_cast<int64_t>(csr.ids.size());
  if (!attempt(
          [&] {
            g.set_content(csr.offsets.data(), csr.slots.data(), csr.codes.data(), n_live, csr.ids.data(),
                          csr.nwords.data(), csr.next_id);
          },
          &error))
    fail("the exported postings do not load into a fresh index: " + error);
  if (!same(first, score(g, q))) fail("the loaded index scores differently from its re-encoded export");
  if (!same(top3(f, q), top3(g, q))) fail("the loaded index's top 3 differs from its re-encoded export's");
  if (n_live == 0) return 0;
  const int64_t victim = csr.ids[n_live / 2];
  int64_t removed_f = 0, removed_g = 0;
  if (!attempt([&] { removed_f = f.remove(1, &victim); }, &error)) fail("remove failed: " + error);
  removed_g = g.remove(1, &victim);
  if (removed_f != removed_g) fail("remove removed a different number of images");
  if (!same(score(f, q), score(g, q))) fail("after a remove, the loaded index scores differently");
  int64_t dropped_f = 0;
  if (!attempt([&] { dropped_f = f.compact(); }, &error)) fail("compact failed: " + error);
  if (dropped_f != g.compact()) fail("compact dropped a different number of postings");
  if (!same(score(f, q), score(g, q))) fail("after compact, the loaded index scores differently");
  return 0;
}
