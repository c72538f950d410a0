// Bindings of the CUDA path (cuda/gpu.h). Arrays cross as raw pointers with an on_device flag: the
// Python layer (d2r/cuda.py) resolves numpy, CuPy and PyTorch arrays (__cuda_array_interface__) and
// keeps them alive during the call. Results stay on the device as DeviceArray objects (exposing
// __cuda_array_interface__, so CuPy and PyTorch wrap them without a copy) or come back as numpy.
// Without a CUDA build only cuda_compiled() / cuda_device_count() exist.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#ifdef D2R_WITH_CUDA
#include "gpu.h"
#endif

#include "arrays.h"

namespace py = pybind11;

#ifdef D2R_WITH_CUDA
namespace {

using namespace d2r;
using d2r_native::carray;
using d2r_native::require;

struct DeviceArray {
  gpu::SharedBuffer buf;
  std::vector<int64_t> shape;
  std::string typestr;  // numpy typestr, e.g. "<f4"
};


// The device pointer to use for p: p itself, or a device copy of the host data held in *hold.
template <class T>
const T* device_ptr(uintptr_t p, bool dev, size_t count, gpu::Buffer* hold, const char* what) {
  if (dev || count == 0) return reinterpret_cast<const T*>(p);
  *hold = gpu::Buffer(count * sizeof(T), what);
  hold->upload(reinterpret_cast<const void*>(p), count * sizeof(T));
  return hold->as<T>();
}

py::dict cai(const DeviceArray& a) {
  py::dict d;
  py::tuple shape(a.shape.size());
  for (size_t i = 0; i < a.shape.size(); ++i) shape[i] = a.shape[i];
  d["shape"] = shape;
  d["typestr"] = a.typestr;
  d["data"] = py::make_tuple(reinterpret_cast<uintptr_t>(a.buf ? a.buf->data() : nullptr), false);
  d["version"] = 3;
  d["strides"] = py::none();
  return d;
}

py::array to_numpy(const DeviceArray& a) {
  py::array out(py::dtype(a.typestr), a.shape);
  const size_t bytes = static_cast<size_t>(out.nbytes());
  if (bytes) {
    void* dst = out.mutable_data();
    py::gil_scoped_release r;
    a.buf->download(dst, bytes);
  }
  return out;
}

}  // namespace
#endif

void bind_cuda(py::module_& m) {
#ifdef D2R_WITH_CUDA
  m.def("cuda_compiled", []() { return true; });
  m.def("cuda_device_count", &gpu::device_count);
  m.def("cuda_device_name", &gpu::device_name, py::arg("device") = 0);
  m.def("cuda_runtime_info", &gpu::runtime_info);
  m.def("cuda_memory_info", []() {
    size_t f = 0, t = 0;
    gpu::memory_info(&f, &t);
    return py::make_tuple(f, t);
  });
  m.def("cuda_alloc_test", [](size_t bytes) {  // the out-of-memory path, for the tests
    gpu::Buffer b(bytes, "test allocation");
    return b.bytes();
  });
  static py::exception<gpu::DeviceError> cuda_error(m, "CudaError", PyExc_RuntimeError);
  static py::exception<gpu::DeviceOutOfMemory> cuda_oom(m, "CudaMemoryError", PyExc_MemoryError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gpu::DeviceOutOfMemory& e) {
      py::set_error(cuda_oom, e.what());
    } catch (const gpu::DeviceError& e) {
      py::set_error(cuda_error, e.what());
    }
  });

  py::class_<DeviceArray>(m, "DeviceArray")
      .def_property_readonly("shape", [](const DeviceArray& a) {
        py::tuple t(a.shape.size());
        for (size_t i = 0; i < a.shape.size(); ++i) t[i] = a.shape[i];
        return t;
      })
      .def_property_readonly("dtype", [](const DeviceArray& a) { return py::dtype(a.typestr); })
      .def_property_readonly("__cuda_array_interface__", &cai)
      .def("numpy", &to_numpy)
      .def("__len__", [](const DeviceArray& a) { return a.shape.empty() ? 0 : a.shape[0]; })
      .def("__repr__", [](const DeviceArray& a) {
        std::string s = "DeviceArray(shape=(";
        for (size_t i = 0; i < a.shape.size(); ++i) s += std::to_string(a.shape[i]) + (a.shape.size() == 1 || i + 1 < a.shape.size() ? "," : "");
        return s + "), typestr='" + a.typestr + "')";
      });

  py::class_<gpu::Quantizer>(m, "GpuQuantizer")
      .def(py::init([](const py::handle& c) {
             auto a = require<float>(c, "centroids");
             if (a.ndim() != 2) throw py::value_error("centroids must be 2-D");
             py::gil_scoped_release r;
             return new gpu::Quantizer(a.data(), false, a.shape(0), static_cast<int>(a.shape(1)));
           }),
           py::arg("centroids"))
      .def_property_readonly("n_words", &gpu::Quantizer::n_words)
      .def_property_readonly("dim", &gpu::Quantizer::dim)
      .def_property_readonly("last_fallback_rows", &gpu::Quantizer::last_fallback_rows)
      .def(
          "search",
          [](const gpu::Quantizer& q, uintptr_t x, bool dev, int64_t n, int m) {
            auto ids = std::make_shared<gpu::Buffer>(sizeof(int32_t) * std::max<int64_t>(n * m, 1), "assignments");
            auto d = std::make_shared<gpu::Buffer>(sizeof(float) * std::max<int64_t>(n * m, 1), "distances");
            {
              py::gil_scoped_release r;
              gpu::Buffer hold;
              const float* xp = device_ptr<float>(x, dev, static_cast<size_t>(n) * q.dim(), &hold, "descriptors");
              q.search(xp, n, m, ids->as<int32_t>(), d->as<float>());
            }
            return py::make_tuple(DeviceArray{ids, {n, m}, "<i4"}, DeviceArray{d, {n, m}, "<f4"});
          },
          py::arg("x_ptr"), py::arg("on_device"), py::arg("n"), py::arg("m"));

  m.def(
      "gpu_aggregate",
      [](const gpu::Quantizer& q, uintptr_t x, bool xdev, int64_t n_desc, uintptr_t assign, bool adev, int m,
         const py::handle& ir_o, const py::handle& rm_o, const py::handle& mem_o, bool binary) {
        auto ir = require<int64_t>(ir_o, "image_regions");
        auto rm = require<int64_t>(rm_o, "region_members");
        carray<int64_t> mem;
        const int64_t* memp = nullptr;
        if (!mem_o.is_none()) {
          mem = require<int64_t>(mem_o, "members");
          memp = mem.data();
        }
        const int64_t n_images = ir.size() - 1;
        gpu::DeviceAggregated out;
        {
          py::gil_scoped_release r;
          gpu::Buffer hx, ha, own_assign;
          const float* xp = device_ptr<float>(x, xdev, static_cast<size_t>(n_desc) * q.dim(), &hx, "descriptors");
          const int32_t* ap;
          if (assign == 0) {
            own_assign = gpu::Buffer(sizeof(int32_t) * std::max<int64_t>(n_desc * m, 1), "assignments");
            q.search(xp, n_desc, m, own_assign.as<int32_t>(), nullptr);
            ap = own_assign.as<int32_t>();
          } else {
            ap = device_ptr<int32_t>(assign, adev, static_cast<size_t>(n_desc) * m, &ha, "assignments");
          }
          out = gpu::aggregate(xp, n_desc, ap, m, q.centroids(), q.n_words(), q.dim(), ir.data(), n_images, rm.data(),
                               memp, binary);
        }
        py::array_t<int64_t> offs(static_cast<py::ssize_t>(out.word_offsets.size()), out.word_offsets.data());
        DeviceArray words{out.words, {out.n_entries}, "<i4"};
        DeviceArray codes = binary ? DeviceArray{out.codes, {out.n_entries, out.code_bytes}, "|u1"}
                                   : DeviceArray{out.codes, {out.n_entries, out.code_bytes / 4}, "<f4"};
        return py::make_tuple(offs, words, codes);
      },
      py::arg("quantizer"), py::arg("x_ptr"), py::arg("x_on_device"), py::arg("n_desc"), py::arg("assign_ptr"),
      py::arg("assign_on_device"), py::arg("m"), py::arg("image_regions"), py::arg("region_members"),
      py::arg("members"), py::arg("binary"));

  py::class_<gpu::InvertedFile>(m, "GpuInvertedFile")
      .def(py::init<int64_t, int, bool>(), py::arg("n_words"), py::arg("dim"), py::arg("binary"))
      .def_property_readonly("n_words", &gpu::InvertedFile::n_words)
      .def_property_readonly("dim", &gpu::InvertedFile::dim)
      .def_property_readonly("binary", &gpu::InvertedFile::binary)
      .def_property_readonly("code_bytes", &gpu::InvertedFile::code_bytes)
      .def_property_readonly("n_images", &gpu::InvertedFile::n_images)
      .def_property_readonly("n_entries", &gpu::InvertedFile::n_entries)
      .def_property_readonly("memory_bytes", &gpu::InvertedFile::memory_bytes)
      .def_property_readonly("n_parts", &gpu::InvertedFile::n_parts)
      .def("contains", &gpu::InvertedFile::contains)
      .def_property_readonly("image_ids",
                             [](const gpu::InvertedFile& f) {
                               return py::array_t<int64_t>(static_cast<py::ssize_t>(f.slot_ids().size()),
                                                           f.slot_ids().data());
                             })
      .def(
          "add",
          [](gpu::InvertedFile& f, const py::handle& off_o, uintptr_t words, uintptr_t codes, bool dev,
             const py::handle& ids_o) {
            auto off = require<int64_t>(off_o, "word_offsets");
            auto ids = require<int64_t>(ids_o, "image_ids");
            if (off.ndim() != 1 || off.size() < 1) throw py::value_error("word_offsets must be 1-D, non-empty");
            if (ids.size() != off.size() - 1) throw py::value_error("one image id per image is required");
            py::gil_scoped_release r;
            f.add(ids.size(), off.data(), reinterpret_cast<const int32_t*>(words),
                  reinterpret_cast<const uint8_t*>(codes), dev, ids.data());
          },
          py::arg("word_offsets"), py::arg("words_ptr"), py::arg("codes_ptr"), py::arg("on_device"),
          py::arg("image_ids"))
      .def(
          "search",
          [](const gpu::InvertedFile& f, const py::handle& off_o, uintptr_t words, uintptr_t codes, bool dev,
             int64_t k, float alpha, float tau, bool normalize) {
            auto off = require<int64_t>(off_o, "word_offsets");
            if (off.ndim() != 1 || off.size() < 1) throw py::value_error("word_offsets must be 1-D, non-empty");
            const int64_t nq = off.size() - 1;
            py::array_t<float> scores({nq, k});
            py::array_t<int64_t> ids({nq, k});
            ScoreParams p{alpha, tau, normalize};
            float* sp = scores.mutable_data();
            int64_t* ip = ids.mutable_data();
            {
              py::gil_scoped_release r;
              f.search(nq, off.data(), reinterpret_cast<const int32_t*>(words), reinterpret_cast<const uint8_t*>(codes),
                       dev, k, p, sp, ip);
            }
            return py::make_tuple(scores, ids);
          },
          py::arg("word_offsets"), py::arg("words_ptr"), py::arg("codes_ptr"), py::arg("on_device"), py::arg("k"),
          py::arg("alpha") = 3.0f, py::arg("tau") = 0.0f, py::arg("normalize") = true)
      .def(
          "score_all",
          [](const gpu::InvertedFile& f, const py::handle& off_o, uintptr_t words, uintptr_t codes, bool dev,
             float alpha, float tau, bool normalize) {
            auto off = require<int64_t>(off_o, "word_offsets");
            if (off.ndim() != 1 || off.size() < 1) throw py::value_error("word_offsets must be 1-D, non-empty");
            const int64_t nq = off.size() - 1;
            py::array_t<float> scores({nq, f.n_images()});
            ScoreParams p{alpha, tau, normalize};
            float* sp = scores.mutable_data();
            {
              py::gil_scoped_release r;
              f.score_all(nq, off.data(), reinterpret_cast<const int32_t*>(words),
                          reinterpret_cast<const uint8_t*>(codes), dev, p, sp);
            }
            return scores;
          },
          py::arg("word_offsets"), py::arg("words_ptr"), py::arg("codes_ptr"), py::arg("on_device"),
          py::arg("alpha") = 3.0f, py::arg("tau") = 0.0f, py::arg("normalize") = true)
      .def("export",
           [](gpu::InvertedFile& f) {
             std::vector<int64_t> off;
             std::vector<uint32_t> slots;
             std::vector<uint8_t> codes;
             {
               py::gil_scoped_release r;
               f.export_csr(&off, &slots, &codes);
             }
             py::dict d;
             const int64_t e = static_cast<int64_t>(slots.size());
             d["offsets"] = py::array_t<int64_t>(static_cast<py::ssize_t>(off.size()), off.data());
             d["slots"] = py::array_t<uint32_t>(e, slots.data());
             d["codes"] = py::array_t<uint8_t>({e, static_cast<int64_t>(f.code_bytes())}, codes.data());
             d["image_ids"] = py::array_t<int64_t>(static_cast<py::ssize_t>(f.slot_ids().size()), f.slot_ids().data());
             d["word_counts"] = py::array_t<int32_t>(static_cast<py::ssize_t>(f.slot_word_counts().size()),
                                                     f.slot_word_counts().data());
             return d;
           })
      .def(
          "set_content",
          [](gpu::InvertedFile& f, const py::handle& off_o, const py::handle& slots_o, const py::handle& codes_o,
             const py::handle& ids_o, const py::handle& counts_o) {
            auto off = require<int64_t>(off_o, "offsets");
            auto slots = require<uint32_t>(slots_o, "slots");
            auto codes = require<uint8_t>(codes_o, "codes");
            auto ids = require<int64_t>(ids_o, "image_ids");
            auto counts = require<int32_t>(counts_o, "word_counts");
            if (off.size() != f.n_words() + 1) throw py::value_error("offsets size");
            const int64_t e = off.at(f.n_words());
            if (slots.size() != e || codes.size() != e * f.code_bytes()) throw py::value_error("posting arrays size");
            if (ids.size() != counts.size()) throw py::value_error("image arrays size");
            py::gil_scoped_release r;
            f.set_content(off.data(), slots.data(), codes.data(), ids.size(), ids.data(), counts.data());
          },
          py::arg("offsets"), py::arg("slots"), py::arg("codes"), py::arg("image_ids"), py::arg("word_counts"));

  m.def(
      "gpu_kmeans",
      [](uintptr_t x, bool dev, int64_t n, int dim, int64_t k, int niter, uint64_t seed) {
        py::array_t<float> c({k, static_cast<int64_t>(dim)});
        float* cp = c.mutable_data();
        std::vector<double> obj;
        {
          py::gil_scoped_release r;
          gpu::Buffer hold;
          const float* xp = device_ptr<float>(x, dev, static_cast<size_t>(n) * dim, &hold, "k-means points");
          obj = gpu::kmeans(xp, n, dim, k, niter, seed, cp);
        }
        return py::make_tuple(c, obj);
      },
      py::arg("x_ptr"), py::arg("on_device"), py::arg("n"), py::arg("dim"), py::arg("k"), py::arg("niter"),
      py::arg("seed"));
#else
  m.def("cuda_compiled", []() { return false; });
  m.def("cuda_device_count", []() { return 0; });
#endif
}
