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
#include "quantize.h"

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
  bind_ransac(m);
  bind_cuda(m);
  m.doc() = "d2r native core (csrc/ CPU kernels, cuda/ GPU kernels)";

  m.def("set_num_threads", &d2r::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &d2r::num_threads);
  m.def("build_info", []() {
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
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#else
    d["simd"] = "generic";
#endif
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
          py::arg("descriptors"), py::arg("m") = 1);

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
      .def("entry_ids", [](const InvertedFile& ivf) {
        auto s = ivf.snapshot();
        std::vector<int64_t> v = s->slots->ids;
        const auto n = static_cast<py::ssize_t>(v.size());
        return to_numpy(std::move(v), {n});
      })
      .def("word_counts", [](const InvertedFile& ivf) {
        auto s = ivf.snapshot();
        std::vector<int32_t> v = s->slots->nwords;
        const auto n = static_cast<py::ssize_t>(v.size());
        return to_numpy(std::move(v), {n});
      })
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
          [](InvertedFile& ivf) {
            // Views (no copies) of one merged snapshot, which their base keeps alive: later writers
            // publish new snapshots and never touch this one.
            auto snap = without_gil([&] { return ivf.merged_snapshot(); });
            const Segment& seg = *snap->segments[0];
            const SlotTable& t = *snap->slots;
            auto* holder = new std::shared_ptr<const Snapshot>(snap);
            py::capsule base(holder, [](void* p) { delete static_cast<std::shared_ptr<const Snapshot>*>(p); });
            const int64_t n = snap->n_slots(), e = seg.n_entries, cb = ivf.code_bytes();
            static const uint8_t none[8] = {};
            auto ptr = [&](const void* p) { return p ? p : static_cast<const void*>(none); };
            py::dict d;
            d["offsets"] = py::array_t<int64_t>({ivf.n_words() + 1}, static_cast<const int64_t*>(ptr(seg.off)), base);
            d["slots"] = py::array_t<uint32_t>({e}, static_cast<const uint32_t*>(ptr(seg.slot)), base);
            d["codes"] = py::array_t<uint8_t>({e, cb}, static_cast<const uint8_t*>(ptr(seg.code)), base);
            d["image_ids"] = py::array_t<int64_t>({n}, static_cast<const int64_t*>(ptr(t.ids.data())), base);
            d["word_counts"] = py::array_t<int32_t>({n}, static_cast<const int32_t*>(ptr(t.nwords.data())), base);
            d["next_id"] = snap->next_id;
            for (auto item : d)
              if (py::isinstance<py::array>(item.second))
                py::reinterpret_borrow<py::array>(item.second).attr("flags").attr("writeable") = false;
            return d;
          })
      .def(
          "set_content",
          [](InvertedFile& ivf, const py::handle& off_o, const py::handle& slots_o, const py::handle& codes_o,
             const py::handle& ids_o, const py::handle& counts_o, int64_t next_id, const py::handle& owner_o) {
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
            std::shared_ptr<const void> owner;
            if (!owner_o.is_none()) {
              auto file = owner_o.cast<std::shared_ptr<MappedFile>>();
              // Used in place only if every posting array lies inside the mapping; else copied.
              if (file->holds(off.data(), off.nbytes()) && file->holds(slots.data(), slots.nbytes()) &&
                  file->holds(codes.data(), codes.nbytes()))
                owner = file;
            }
            without_gil([&] {
              ivf.set_content(off.data(), slots.data(), codes.data(), ids.size(), ids.data(), counts.data(), next_id,
                              std::move(owner));
            });
          },
          py::arg("offsets"), py::arg("slots"), py::arg("codes"), py::arg("image_ids"), py::arg("word_counts"),
          py::arg("next_id"), py::arg("owner") = py::none());
}
