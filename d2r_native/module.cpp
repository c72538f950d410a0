// pybind11 bindings of the d2r core: this file only binds; csrc/ (and cuda/) compute.
// Every long call releases the GIL. Errors in the core (d2r::InvalidArgument) become ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <system_error>
#include <cerrno>

#include "aggregate.h"
#include "common.h"
#include "ivf.h"
#include "postings.h"
#include "quantize.h"
#include "simd.h"

#include "arrays.h"
#include "mapped_file.h"

namespace py = pybind11;
using namespace d2r;

using d2r_native::carray;
using d2r_native::MappedFile;
using d2r_native::require;
using d2r_native::to_numpy;
using d2r_native::without_gil;

namespace {

void check_2d(const py::array& a, const char* name) {
  if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be 2-D");
}

struct AggArrays {
  carray<float> x, centroids;
  carray<int32_t> assign;
  carray<int64_t> image_regions, region_members;
  py::object members_obj;
  carray<int64_t> members;
  AggInput in;
  RegionLayout lay;
};

void fill_agg(AggArrays& a, const py::handle& x, const py::handle& assign, const py::handle& centroids,
              const py::handle& image_regions, const py::handle& region_members, const py::handle& members) {
  a.x = require<float>(x, "descriptors");
  a.assign = require<int32_t>(assign, "assignments");
  a.centroids = require<float>(centroids, "centroids");
  a.image_regions = require<int64_t>(image_regions, "image_regions");
  a.region_members = require<int64_t>(region_members, "region_members");
  check_2d(a.x, "descriptors");
  check_2d(a.assign, "assignments");
  check_2d(a.centroids, "centroids");
  if (a.x.shape(1) != a.centroids.shape(1)) throw py::value_error("descriptor and codebook dimensions differ");
  if (a.assign.shape(0) != a.x.shape(0)) throw py::value_error("one row of assignments per descriptor is required");
  if (a.image_regions.ndim() != 1 || a.image_regions.size() < 1) throw py::value_error("image_regions must be 1-D, non-empty");
  if (a.region_members.ndim() != 1 || a.region_members.size() < 1) throw py::value_error("region_members must be 1-D, non-empty");
  const int64_t n_regions = a.region_members.size() - 1;
  if (a.image_regions.at(a.image_regions.size() - 1) != n_regions)
    throw py::value_error("image_regions must end at the number of regions");
  a.in.x = a.x.data();
  a.in.n_desc = a.x.shape(0);
  a.in.dim = static_cast<int>(a.x.shape(1));
  a.in.assign = a.assign.data();
  a.in.m = static_cast<int>(a.assign.shape(1));
  a.in.centroids = a.centroids.data();
  a.in.n_words = a.centroids.shape(0);
  a.lay.image_regions = a.image_regions.data();
  a.lay.n_images = a.image_regions.size() - 1;
  a.lay.region_members = a.region_members.data();
  a.lay.members = nullptr;
  if (!members.is_none()) {
    a.members = require<int64_t>(members, "members");
    if (a.members.ndim() != 1 || a.members.size() != a.region_members.at(n_regions))
      throw py::value_error("members must be 1-D with region_members[-1] entries");
    a.lay.members = a.members.data();
  }
}

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

py::tuple aggregated_to_python(Aggregated& out, bool binary, int dim) {
  // The vectors move into the arrays (no copy: a failed copy would surface as a RuntimeError).
  const auto n = static_cast<py::ssize_t>(out.words.size());
  const auto n_off = static_cast<py::ssize_t>(out.word_offsets.size());
  auto offs = to_numpy(std::move(out.word_offsets), {n_off});
  auto words = to_numpy(std::move(out.words), {n});
  if (binary) return py::make_tuple(offs, words, to_numpy(std::move(out.bits), {n, py::ssize_t{packed_bytes(dim)}}));
  return py::make_tuple(offs, words, to_numpy(std::move(out.codes), {n, py::ssize_t{dim}}));
}

}  // namespace

void bind_ransac(pybind11::module_& m);
void bind_cuda(pybind11::module_& m);

PYBIND11_MODULE(_native, m) {
  // The SIMD level (simd.h), chosen here, at import: a bad $D2R_SIMD raises ImportError with its message.
  const d2r::simd::Level simd_level = d2r::simd::active();
  bind_ransac(m);
  bind_cuda(m);
  m.doc() = "d2r native core (csrc/ CPU kernels, cuda/ GPU kernels)";

  m.def("set_num_threads", &d2r::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &d2r::num_threads);
  m.def("build_info", [simd_level]() {
    py::dict d;
    d["compiler"] = D2R_COMPILER;
    d["flags"] = D2R_FLAGS;
#ifdef _OPENMP
    d["openmp"] = _OPENMP;
#else
    d["openmp"] = py::none();
#endif
    d["max_threads"] = d2r::num_threads();
#ifdef D2R_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["simd"] = d2r::simd::level_name(simd_level);  // the level in use
    py::list levels;  // compiled in and supported by this CPU
    for (d2r::simd::Level l : d2r::simd::available()) levels.append(d2r::simd::level_name(l));
    d["simd_levels"] = levels;
    return d;
  });

  py::class_<Quantizer>(m, "Quantizer")
      .def(py::init([](const py::handle& c) {
             auto a = require<float>(c, "centroids");
             check_2d(a, "centroids");
             return std::make_unique<Quantizer>(a.data(), a.shape(0), static_cast<int>(a.shape(1)));
           }),
           py::arg("centroids"))
      .def_property_readonly("n_words", &Quantizer::n_words)
      .def_property_readonly("dim", &Quantizer::dim)
      .def(
          "search",
          [](const Quantizer& q, const py::handle& xo, int m) {
            auto x = require<float>(xo, "descriptors");
            check_2d(x, "descriptors");
            if (x.shape(1) != q.dim()) throw py::value_error("descriptor dimension differs from the codebook's");
            if (m < 1 || m > q.n_words()) throw py::value_error("m must be in [1, n_words]");
            const int64_t n = x.shape(0);
            py::array_t<int32_t> ids({n, static_cast<int64_t>(m)});
            py::array_t<float> dists({n, static_cast<int64_t>(m)});
            without_gil([&] { q.search(x.data(), n, m, ids.mutable_data(), dists.mutable_data()); });
            return py::make_tuple(ids, dists);
          },
          py::arg("descriptors"), py::arg("m") = 1)
      .def_property_readonly("pruning_enabled", &Quantizer::pruning_enabled)
      .def("stats",
           [](const Quantizer& q) {
             const Quantizer::Stats s = q.stats();
             py::dict d;
             d["rows"] = s.rows;
             d["pairs"] = s.pairs;
             d["screened"] = s.screened;
             d["screened2"] = s.screened2;
             d["full"] = s.full;
             d["fallback_rows"] = s.fallback_rows;
             d["plain_blocks"] = s.plain_blocks;
             d["pruned_blocks"] = s.pruned_blocks;
             d["screen_dims"] = s.screen_dims;
             d["screen_dims2"] = s.screen_dims2;
             d["dim"] = s.dim;
             d["prune_decision"] = q.prune_decision();  // -1 undecided, 0 full product, 1 pruning
             return d;
           })
      .def("reset_stats", &Quantizer::reset_stats)
      // "auto" (default): prune while it pays, judged on the first searches; "always" / "never"
      .def_property(
          "prune_policy",
          [](const Quantizer& q) {
            const char* names[] = {"auto", "always", "never"};
            return std::string(names[static_cast<int>(q.prune_policy())]);
          },
          [](Quantizer& q, const std::string& p) {
            if (p == "auto") q.set_prune_policy(d2r::PrunePolicy::kAuto);
            else if (p == "always") q.set_prune_policy(d2r::PrunePolicy::kAlways);
            else if (p == "never") q.set_prune_policy(d2r::PrunePolicy::kNever);
            else throw py::value_error("prune_policy must be 'auto', 'always' or 'never', got '" + p + "'");
          });

  m.def(
      "aggregate",
      [](const py::handle& x, const py::handle& assign, const py::handle& centroids, const py::handle& image_regions,
         const py::handle& region_members, const py::handle& members, int kind, bool binary) {
        AggArrays a;
        fill_agg(a, x, assign, centroids, image_regions, region_members, members);
        if (kind != 0 && kind != 1) throw py::value_error("unknown aggregation kind");
        Aggregated out;
        without_gil([&] { aggregate(a.in, a.lay, static_cast<AggKind>(kind), binary, &out); });
        return aggregated_to_python(out, binary, a.in.dim);
      },
      py::arg("descriptors"), py::arg("assignments"), py::arg("centroids"), py::arg("image_regions"),
      py::arg("region_members"), py::arg("members") = py::none(), py::arg("kind") = 0, py::arg("binary") = false);

  m.def(
      "vlad",
      [](const py::handle& x, const py::handle& assign, const py::handle& centroids, const py::handle& image_regions,
         const py::handle& region_members, const py::handle& members, bool l2) {
        AggArrays a;
        fill_agg(a, x, assign, centroids, image_regions, region_members, members);
        py::array_t<float> out({a.lay.n_images, a.in.n_words * a.in.dim});
        without_gil([&] { vlad(a.in, a.lay, l2, out.mutable_data()); });
        return out;
      },
      py::arg("descriptors"), py::arg("assignments"), py::arg("centroids"), py::arg("image_regions"),
      py::arg("region_members"), py::arg("members") = py::none(), py::arg("l2") = false);

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const d2r::NotFound& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    } catch (const d2r::CorruptIndex& e) {
      py::object cls = py::module_::import("d2r.index_io").attr("IndexFileError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const std::system_error& e) {  // MappedFile: the OS said no
      if (e.code().value() == ENOMEM)
        PyErr_SetString(PyExc_MemoryError, e.what());
      else
        PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), e.what()).ptr());  // OSError(errno, msg)
    }
  });

  py::class_<MappedFile, std::shared_ptr<MappedFile>>(m, "MappedFile", py::buffer_protocol(),
                                                        "A read-only memory map of a whole file, released without the GIL")
      .def(py::init([](const std::string& path) { return without_gil([&] { return std::make_shared<MappedFile>(path); }); }),
           py::arg("path"))
      .def("__len__", [](const MappedFile& f) { return f.size(); })
      .def_buffer([](MappedFile& f) {
        return py::buffer_info(const_cast<uint8_t*>(f.data()), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {py::ssize_t{1}}, /*readonly=*/true);
      });

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
            // page_bytes, owner MappedFile or None). Arrays inside a MappedFile are used in place
            // (kept alive by it); others are copied into memory owned natively.
            auto ids = require<int64_t>(ids_o, "image_ids");
            auto counts = require<int32_t>(counts_o, "word_counts");
            if (ids.ndim() != 1 || ids.size() != counts.size()) throw py::value_error("corrupt index: image arrays size");
            std::vector<SegmentInput> in;
            for (const auto& item : parts) {
              auto t = item.cast<py::tuple>();
              if (t.size() != 7) throw py::value_error("set_segments: each part is a 7-tuple");
              SegmentInput si;
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
