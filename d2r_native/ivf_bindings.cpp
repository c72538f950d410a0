// pybind11 bindings of csrc/ivf.h (the inverted file: add, remove, search, scoring, export and
// loading, and the PostingWriter that streams its postings to a file); module.cpp calls init_ivf(m).
// Every long call releases the GIL; NotFound (KeyError) and CorruptIndex (IndexFileError) are
// translated in module.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "ivf.h"
#include "postings.h"

#include "arrays.h"
#include "bindings.h"
#include "mapped_file.h"

namespace py = pybind11;
using namespace d2r;

using d2r_native::carray;
using d2r_native::MappedFile;
using d2r_native::require;
using d2r_native::to_numpy;
using d2r_native::without_gil;

namespace {

struct CodesArrays {
  carray<int64_t> offsets;
  carray<int32_t> words;
  carray<uint8_t> codes;
  CodesView view;
};

// A per-slot array of the current snapshot, live slots only.
template <class T>
py::array_t<T> live_slots(const InvertedFile& ivf, std::vector<T> SlotTable::*field) {
  auto s = ivf.snapshot();
  const SlotTable& t = *s->slots;
  std::vector<T> v;
  v.reserve(t.ids.size() - t.n_dead);
  for (size_t i = 0; i < t.ids.size(); ++i)
    if (!t.is_dead(static_cast<int64_t>(i))) v.push_back((t.*field)[i]);
  const auto n = static_cast<py::ssize_t>(v.size());
  return to_numpy(std::move(v), {n});
}

void fill_codes(CodesArrays& c, const InvertedFile& ivf, const py::handle& offsets, const py::handle& words,
                const py::handle& codes) {
  c.offsets = require<int64_t>(offsets, "word_offsets");
  c.words = require<int32_t>(words, "words");
  c.codes = require<uint8_t>(codes, "codes");
  if (c.offsets.ndim() != 1 || c.offsets.size() < 1) throw py::value_error("word_offsets must be 1-D, non-empty");
  if (c.words.ndim() != 1) throw py::value_error("words must be 1-D");
  const int64_t n = c.offsets.size() - 1;
  const int64_t total = c.offsets.at(n);
  if (total != c.words.size()) throw py::value_error("word_offsets[-1] must equal the number of words");
  if (c.codes.size() != total * ivf.code_bytes())
    throw py::value_error("codes must hold " + std::to_string(ivf.code_bytes()) + " bytes per word");
  c.view.n = n;
  c.view.offsets = c.offsets.data();
  c.view.words = c.words.data();
  c.view.codes = c.codes.data();
}

py::tuple topk_to_python(TopK&& r) {
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(r.n_queries), static_cast<py::ssize_t>(r.k)};
  return py::make_tuple(to_numpy(std::move(r.scores), shape), to_numpy(std::move(r.ids), shape));
}

}  // namespace

void init_ivf(py::module_& m) {
  py::class_<InvertedFile>(m, "InvertedFile",
                           "Inverted file (csrc/ivf.h). Thread-safe: readers run concurrently with each other and "
                           "with one writer at a time; every operation is atomic.")
      .def(py::init<int64_t, int, bool, bool>(), py::arg("n_words"), py::arg("dim"), py::arg("binary"),
           py::arg("multi_entry") = false)
      .def_property_readonly("n_words", &InvertedFile::n_words)
      .def_property_readonly("dim", &InvertedFile::dim)
      .def_property_readonly("binary", &InvertedFile::binary)
      .def_property_readonly("multi_entry", &InvertedFile::multi_entry)
      .def_property_readonly("code_bytes", &InvertedFile::code_bytes)
      .def_property_readonly("n_images", &InvertedFile::n_images)
      .def_property_readonly("n_entries", &InvertedFile::n_entries)
      .def_property_readonly("next_id", &InvertedFile::next_id)
      .def_property_readonly("memory_bytes", &InvertedFile::memory_bytes)
      .def("contains", &InvertedFile::contains, py::arg("image_id"))
      .def("image_ids", [](const InvertedFile& ivf) {
        auto v = ivf.image_ids();
        const auto n = static_cast<py::ssize_t>(v.size());
        return to_numpy(std::move(v), {n});
      })
      .def("entry_ids", [](const InvertedFile& ivf) { return live_slots(ivf, &SlotTable::ids); },
           "The id of every live entry (slot order)")
      .def("word_counts", [](const InvertedFile& ivf) { return live_slots(ivf, &SlotTable::nwords); },
           "The word count of every live entry (slot order)")
      .def(
          "add",
          [](InvertedFile& ivf, const py::handle& offsets, const py::handle& words, const py::handle& codes,
             const py::handle& ids_obj, const py::handle& auto_obj) {
            CodesArrays c;
            fill_codes(c, ivf, offsets, words, codes);
            carray<int64_t> ids, autoi;
            if (!ids_obj.is_none()) {
              ids = require<int64_t>(ids_obj, "image_ids");
              if (ids.ndim() != 1 || ids.size() != c.view.n) throw py::value_error("one image id per entry is required");
            }
            if (!auto_obj.is_none()) {
              autoi = require<int64_t>(auto_obj, "auto_index");
              if (autoi.ndim() != 1 || autoi.size() != c.view.n) throw py::value_error("one auto_index per entry is required");
            }
            auto out = without_gil([&] {
              return ivf.add(c.view, ids_obj.is_none() ? nullptr : ids.data(), auto_obj.is_none() ? nullptr : autoi.data());
            });
            const auto n = static_cast<py::ssize_t>(out.size());
            return to_numpy(std::move(out), {n});
          },
          py::arg("word_offsets"), py::arg("words"), py::arg("codes"), py::arg("image_ids") = py::none(),
          py::arg("auto_index") = py::none())
      .def(
          "remove",
          [](InvertedFile& ivf, const py::handle& ids_obj) {
            auto ids = require<int64_t>(ids_obj, "image_ids");
            if (ids.ndim() != 1) throw py::value_error("image_ids must be 1-D");
            return without_gil([&] { return ivf.remove(ids.size(), ids.data()); });
          },
          py::arg("image_ids"))
      .def(
          "search",
          [](const InvertedFile& ivf, const py::handle& offsets, const py::handle& words, const py::handle& codes,
             int64_t k, float alpha, float tau, bool normalize) {
            CodesArrays c;
            fill_codes(c, ivf, offsets, words, codes);
            const ScoreParams p{alpha, tau, normalize};
            TopK r = without_gil([&] { return ivf.search(c.view, k, p); });
            return topk_to_python(std::move(r));
          },
          py::arg("word_offsets"), py::arg("words"), py::arg("codes"), py::arg("k"), py::arg("alpha") = 3.0f,
          py::arg("tau") = 0.0f, py::arg("normalize") = true)
      .def(
          "score_all",
          [](const InvertedFile& ivf, const py::handle& offsets, const py::handle& words, const py::handle& codes,
             float alpha, float tau, bool normalize) {
            CodesArrays c;
            fill_codes(c, ivf, offsets, words, codes);
            const ScoreParams p{alpha, tau, normalize};
            AllScores r = without_gil([&] { return ivf.score_all(c.view, p); });
            const auto n = static_cast<py::ssize_t>(r.ids.size());
            return py::make_tuple(to_numpy(std::move(r.scores), {static_cast<py::ssize_t>(c.view.n), n}),
                                  to_numpy(std::move(r.ids), {n}));
          },
          py::arg("word_offsets"), py::arg("words"), py::arg("codes"), py::arg("alpha") = 3.0f,
          py::arg("tau") = 0.0f, py::arg("normalize") = true)
      .def(
          "search_pooled",
          [](const InvertedFile& ivf, const py::handle& offsets, const py::handle& words, const py::handle& codes,
             bool mean, int64_t k, float alpha, float tau, bool normalize) {
            CodesArrays c;
            fill_codes(c, ivf, offsets, words, codes);
            const ScoreParams p{alpha, tau, normalize};
            TopK r = without_gil([&] { return ivf.search_pooled(c.view, mean, k, p); });
            return topk_to_python(std::move(r));
          },
          py::arg("word_offsets"), py::arg("words"), py::arg("codes"), py::arg("mean"), py::arg("k"),
          py::arg("alpha") = 3.0f, py::arg("tau") = 0.0f, py::arg("normalize") = true)
      .def(
          "export",
          [](const InvertedFile& ivf) {
            // The live content decoded to CSR (a copy: the postings are stored compressed).
            CsrContent c = without_gil([&] { return ivf.export_csr(); });
            const auto e = static_cast<py::ssize_t>(c.slots.size()), n = static_cast<py::ssize_t>(c.ids.size());
            py::dict d;
            d["offsets"] = to_numpy(std::move(c.offsets), {static_cast<py::ssize_t>(ivf.n_words() + 1)});
            d["slots"] = to_numpy(std::move(c.slots), {e});
            d["codes"] = to_numpy(std::move(c.codes), {e, static_cast<py::ssize_t>(ivf.code_bytes())});
            d["image_ids"] = to_numpy(std::move(c.ids), {n});
            d["word_counts"] = to_numpy(std::move(c.nwords), {n});
            d["next_id"] = c.next_id;
            return d;
          })
      .def(
          "entry_codes",
          [](const InvertedFile& ivf, const py::handle& ids_obj, const py::handle& words_obj) {
            // The stored codes of the given images' entries, for the given ascending words (None: all).
            auto ids = require<int64_t>(ids_obj, "image_ids");
            if (ids.ndim() != 1) throw py::value_error("image_ids must be 1-D");
            carray<int32_t> words;
            const bool all = words_obj.is_none();
            if (!all) {
              words = require<int32_t>(words_obj, "words");
              if (words.ndim() != 1) throw py::value_error("words must be 1-D");
            }
            EntryCodes c = without_gil([&] {
              return ivf.entry_codes(ids.size(), ids.data(), all ? 0 : words.size(), all ? nullptr : words.data());
            });
            const auto n = static_cast<py::ssize_t>(c.image.size()), e = static_cast<py::ssize_t>(c.words.size());
            py::dict d;
            d["image"] = to_numpy(std::move(c.image), {n});
            d["word_counts"] = to_numpy(std::move(c.nwords), {n});
            d["offsets"] = to_numpy(std::move(c.offsets), {n + 1});
            d["words"] = to_numpy(std::move(c.words), {e});
            d["codes"] = to_numpy(std::move(c.codes), {e, static_cast<py::ssize_t>(ivf.code_bytes())});
            return d;
          },
          py::arg("image_ids"), py::arg("words") = py::none())
      .def(
          "set_content",
          [](InvertedFile& ivf, const py::handle& off_o, const py::handle& slots_o, const py::handle& codes_o,
             const py::handle& ids_o, const py::handle& counts_o, int64_t next_id) {
            auto off = require<int64_t>(off_o, "offsets");
            auto slots = require<uint32_t>(slots_o, "slots");
            auto codes = require<uint8_t>(codes_o, "codes");
            auto ids = require<int64_t>(ids_o, "image_ids");
            auto counts = require<int32_t>(counts_o, "word_counts");
            if (off.ndim() != 1 || off.size() != ivf.n_words() + 1) throw py::value_error("corrupt index: offsets size");
            const int64_t e = off.at(ivf.n_words());
            if (e < 0 || slots.size() != e || codes.size() != e * ivf.code_bytes())
              throw py::value_error("corrupt index: posting arrays size");
            if (ids.ndim() != 1 || ids.size() != counts.size()) throw py::value_error("corrupt index: image arrays size");
            without_gil([&] {
              ivf.set_content(off.data(), slots.data(), codes.data(), ids.size(), ids.data(), counts.data(), next_id);
            });
          },
          py::arg("offsets"), py::arg("slots"), py::arg("codes"), py::arg("image_ids"), py::arg("word_counts"),
          py::arg("next_id"))
      .def(
          "set_segments",
          [](InvertedFile& ivf, const py::list& parts, const py::handle& ids_o, const py::handle& counts_o,
             int64_t next_id) {
            // parts: (n_slots, n_entries, word_offsets uint64, postings uint8, page_crc uint32 or None,
            // page_bytes, owner MappedFile or None[, layout: 4 (default) or 3, the index format
            // that wrote the postings; 3 is converted to 4 into memory]). Arrays inside a MappedFile are used in place
            // (kept alive by it); others are copied into memory owned natively.
            auto ids = require<int64_t>(ids_o, "image_ids");
            auto counts = require<int32_t>(counts_o, "word_counts");
            if (ids.ndim() != 1 || ids.size() != counts.size()) throw py::value_error("corrupt index: image arrays size");
            std::vector<SegmentInput> in;
            for (const auto& item : parts) {
              auto t = item.cast<py::tuple>();
              if (t.size() != 7 && t.size() != 8) throw py::value_error("set_segments: each part is a 7- or 8-tuple");
              SegmentInput si;
              if (t.size() == 8) si.format = t[7].cast<int>();
              si.n_slots = t[0].cast<int64_t>();
              si.n_entries = t[1].cast<int64_t>();
              auto off = require<uint64_t>(t[2], "word_offsets");
              auto data = require<uint8_t>(t[3], "postings");
              if (off.ndim() != 1 || off.size() != ivf.n_words() + 1)
                throw py::value_error("corrupt index: the word table has " + std::to_string(off.size()) + " entries, expected " +
                                      std::to_string(ivf.n_words() + 1));
              carray<uint32_t> crc;
              if (!t[4].is_none()) crc = require<uint32_t>(t[4], "page_crc");
              si.page_bytes = t[5].cast<int64_t>();
              std::shared_ptr<MappedFile> file;
              if (!t[6].is_none()) file = t[6].cast<std::shared_ptr<MappedFile>>();
              const bool in_place = file && file->holds(off.data(), off.nbytes()) && file->holds(data.data(), data.nbytes()) &&
                                    (t[4].is_none() || file->holds(crc.data(), crc.nbytes()));
              if (in_place) {
                si.word_off = off.data();
                si.data = data.data();
                si.page_crc = t[4].is_none() ? nullptr : crc.data();
                si.owner = file;
                si.truncated = file->truncated_flag();
                si.source = file->path();
              } else {
                // Copies, owned by one holder (released without the GIL).
                struct Copy {
                  std::vector<uint64_t> off;
                  std::vector<uint8_t> data;
                  std::vector<uint32_t> crc;
                };
                auto c = std::make_shared<Copy>();
                c->off.assign(off.data(), off.data() + off.size());
                c->data.assign(data.data(), data.data() + data.size());
                if (!t[4].is_none()) c->crc.assign(crc.data(), crc.data() + crc.size());
                si.word_off = c->off.data();
                si.data = c->data.empty() ? reinterpret_cast<const uint8_t*>(c->off.data()) : c->data.data();
                si.page_crc = t[4].is_none() ? nullptr : c->crc.data();
                si.owner = c;
              }
              si.data_bytes = static_cast<uint64_t>(data.size());
              si.n_pages = t[4].is_none() ? 0 : crc.size();
              in.push_back(std::move(si));
            }
            without_gil([&] { ivf.set_segments(in, ids.data(), counts.data(), ids.size(), next_id); });
          },
          py::arg("parts"), py::arg("image_ids"), py::arg("word_counts"), py::arg("next_id"))
      .def("verify", [](const InvertedFile& ivf) { return without_gil([&] { return ivf.verify(); }); },
           "Verifies every page checksum now; returns the bytes verified (IndexFileError on a mismatch)")
      .def("compact", [](InvertedFile& ivf) { return without_gil([&] { return ivf.compact(); }); })
      .def_property_readonly("n_segments", &InvertedFile::n_segments)
      .def_property_readonly("dead_images", &InvertedFile::dead_images)
      .def("writer", [](const InvertedFile& ivf, int64_t page_bytes) {
            return std::make_unique<PostingWriter>(ivf.snapshot(), ivf.n_words(), ivf.code_bytes(), page_bytes);
          }, py::arg("page_bytes") = int64_t{1} << 20,
          "A PostingWriter over the current snapshot (the live postings as one compressed segment)");

  py::class_<PostingWriter>(m, "PostingWriter", "Streams a snapshot's postings compressed (csrc/ivf.h). One thread at a time.")
      .def("next", [](PostingWriter& w, uint64_t min_bytes) {
            auto v = without_gil([&] { return w.next(min_bytes); });
            const auto n = static_cast<py::ssize_t>(v.size());
            return to_numpy(std::move(v), {n});
          }, py::arg("min_bytes") = uint64_t{64} << 20)
      .def_property_readonly("done", &PostingWriter::done)
      .def_readonly("n_entries", &PostingWriter::n_entries)
      .def_readonly("next_id", &PostingWriter::next_id)
      .def_readonly("page_bytes", &PostingWriter::page_bytes)
      .def("word_offsets", [](const PostingWriter& w) { auto v = w.word_off(); const auto n = static_cast<py::ssize_t>(v.size()); return to_numpy(std::move(v), {n}); })
      .def("page_crc", [](const PostingWriter& w) { auto v = w.page_crc(); const auto n = static_cast<py::ssize_t>(v.size()); return to_numpy(std::move(v), {n}); })
      .def("image_ids", [](const PostingWriter& w) { auto v = w.ids; const auto n = static_cast<py::ssize_t>(v.size()); return to_numpy(std::move(v), {n}); })
      .def("word_counts", [](const PostingWriter& w) { auto v = w.nwords; const auto n = static_cast<py::ssize_t>(v.size()); return to_numpy(std::move(v), {n}); });
}
