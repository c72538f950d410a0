// Bindings of the CUDA path (cuda/gpu.h). The quantizer, aggregation and k-means take raw pointers
// with an on_device flag (the Python layer, d2r/cuda.py, resolves numpy, CuPy and PyTorch arrays and
// keeps them alive during the call). The inverted file takes the arrays themselves (numpy arrays, or
// objects exposing __cuda_array_interface__) and checks their dtypes, shapes, contiguity and sizes
// here; it is called with the GIL released (its own lock is then taken: no GIL is ever waited for while
// it is held), and its results come back as owned vectors wrapped without a copy. Results stay on the device as DeviceArray objects (exposing
// __cuda_array_interface__, so CuPy and PyTorch wrap them without a copy) or come back as numpy.
// Without a CUDA build only cuda_compiled() / cuda_device_count() exist. module.cpp calls init_cuda(m):
// the names are the module's own (d2r._native.GpuInvertedFile, ...), as d2r/cuda.py uses them.
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
#include "bindings.h"

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

// A std::vector moved into a numpy array (no copy; the array owns it).
template <class T>
py::array_t<T> owned_array(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto holder = std::make_unique<std::vector<T>>(std::move(v));
  T* data = holder->data();
  py::capsule owner(holder.get(), [](void* p) { delete static_cast<std::vector<T>*>(p); });
  holder.release();
  return py::array_t<T>(shape, data, owner);
}

// An argument array of the inverted file: a numpy array (C-contiguous) or an object exposing
// __cuda_array_interface__ (C-contiguous, no mask, device memory: checked by the index).
struct ArrayArg {
  const void* ptr = nullptr;
  bool on_device = false;
  std::vector<int64_t> shape;
  py::dtype dtype;
  py::object keep;
  int64_t size() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

ArrayArg array_arg(const py::handle& o, const std::string& name) {
  ArrayArg a;
  if (py::hasattr(o, "__cuda_array_interface__")) {
    py::dict cai = o.attr("__cuda_array_interface__");
    a.on_device = true;
    a.keep = py::reinterpret_borrow<py::object>(o);
    a.dtype = py::dtype(cai["typestr"].cast<std::string>());
    for (auto s : cai["shape"].cast<py::tuple>()) a.shape.push_back(s.cast<int64_t>());
    if (cai.contains("mask") && !cai["mask"].is_none()) throw py::type_error(name + ": masked CUDA arrays are not supported");
    if (cai.contains("strides") && !cai["strides"].is_none()) {
      auto st = cai["strides"].cast<py::tuple>();
      if (st.size() != a.shape.size()) throw py::value_error(name + ": malformed __cuda_array_interface__");
      int64_t expect = a.dtype.itemsize();
      for (size_t i = a.shape.size(); i-- > 0;) {
        if (a.shape[i] != 1 && st[i].cast<int64_t>() != expect && a.size() != 0)
          throw py::type_error(name + " must be a C-contiguous CUDA array");
        expect *= a.shape[i];
      }
    }
    a.ptr = reinterpret_cast<const void*>(cai["data"].cast<py::tuple>()[0].cast<uintptr_t>());
    for (int64_t s : a.shape)
      if (s < 0) throw py::value_error(name + ": negative dimension");
    if (a.ptr == nullptr && a.size() > 0) throw py::value_error(name + ": null device pointer");
    return a;
  }
  if (!py::isinstance<py::array>(o)) throw py::type_error(name + " must be a numpy array or a CUDA array");
  py::array arr = py::reinterpret_borrow<py::array>(o);
  if (!(arr.flags() & py::array::c_style)) throw py::type_error(name + " must be C-contiguous");
  a.keep = arr;
  a.ptr = arr.data();
  a.dtype = arr.dtype();
  for (py::ssize_t i = 0; i < arr.ndim(); ++i) a.shape.push_back(arr.shape(i));
  return a;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += std::to_string(s[i]) + (s.size() == 1 || i + 1 < s.size() ? "," : "");
  return r + ")";
}

// Codes of n_entries rows: uint8 (n_entries, code_bytes) (packed bits, or the raw bytes of float codes),
// or float32 (n_entries, dim) for a float index; flat_ok: a 1-D uint8 array of n_entries * code_bytes.
void check_codes_arg(const gpu::InvertedFile& f, const ArrayArg& a, int64_t n_entries, const std::string& name,
                     bool flat_ok) {
  const bool u8 = a.dtype.is(py::dtype::of<uint8_t>()), f32 = a.dtype.is(py::dtype::of<float>());
  const int64_t cb = f.code_bytes();
  if (!u8 && !(f32 && !f.binary()))
    throw py::type_error(name + " has dtype " + std::string(py::str(a.dtype)) + ", expected " +
                         (f.binary() ? "uint8 (packed bits)" : "float32 (or their raw bytes as uint8)"));
  const int64_t width = u8 ? cb : f.dim();
  const bool ok2 = a.shape.size() == 2 && a.shape[0] == n_entries && a.shape[1] == width;
  const bool ok1 = flat_ok && u8 && a.shape.size() == 1 && a.shape[0] == n_entries * cb;
  if (!ok2 && !ok1)
    throw py::value_error(name + " must have shape (" + std::to_string(n_entries) + ", " + std::to_string(width) +
                          "), got " + shape_str(a.shape));
}

py::array code_array(const gpu::InvertedFile& f, const py::handle& o, int64_t n_entries, const std::string& name,
                     bool flat_ok) {
  ArrayArg a = array_arg(o, name);
  if (a.on_device) throw py::type_error(name + " must be a host (numpy) array");
  check_codes_arg(f, a, n_entries, name, flat_ok);
  return py::reinterpret_borrow<py::array>(a.keep);
}

// A batch argument: offsets copied (so what is checked is what is used), words and codes checked.
struct BatchArg {
  std::vector<int64_t> offsets;
  ArrayArg words, codes;
  gpu::Batch batch;
};

BatchArg batch_arg(const gpu::InvertedFile& f, const py::handle& off_o, const py::handle& words_o,
                   const py::handle& codes_o, const std::string& prefix) {
  BatchArg b;
  auto off = require<int64_t>(off_o, prefix + "word_offsets");
  if (off.ndim() != 1 || off.size() < 1) throw py::value_error(prefix + "word_offsets must be 1-D and non-empty");
  b.offsets.assign(off.data(), off.data() + off.size());
  const int64_t n = static_cast<int64_t>(b.offsets.size()) - 1, e = b.offsets.back();
  if (b.offsets[0] != 0) throw py::value_error(prefix + "word_offsets must start at 0");
  if (e < 0) throw py::value_error(prefix + "word_offsets must be non-decreasing");
  b.words = array_arg(words_o, prefix + "words");
  if (!b.words.dtype.is(py::dtype::of<int32_t>()))
    throw py::type_error(prefix + "words have dtype " + std::string(py::str(b.words.dtype)) + ", expected int32");
  if (b.words.shape.size() != 1 || b.words.shape[0] != e)
    throw py::value_error(prefix + "words must be 1-D with word_offsets[-1] = " + std::to_string(e) + " entries, got " +
                          shape_str(b.words.shape));
  b.codes = array_arg(codes_o, prefix + "codes");
  check_codes_arg(f, b.codes, e, prefix + "codes", false);
  b.batch.n = n;
  b.batch.offsets = b.offsets.data();
  b.batch.n_entries = e;
  b.batch.words = static_cast<const int32_t*>(b.words.ptr);
  b.batch.codes = static_cast<const uint8_t*>(b.codes.ptr);
  b.batch.words_on_device = b.words.on_device;
  b.batch.codes_on_device = b.codes.on_device;
  return b;
}

py::array_t<int64_t> add_batches(gpu::InvertedFile& f, const std::vector<gpu::Batch>& bs, int64_t n,
                                 const py::handle& ids_o) {
  carray<int64_t> ids;
  const int64_t* ip = nullptr;
  if (!ids_o.is_none()) {
    ids = require<int64_t>(ids_o, "image_ids");
    if (ids.ndim() != 1 || ids.size() != n)
      throw py::value_error("one image id per image is required (" + std::to_string(n) + ")");
    ip = ids.data();
  }
  std::vector<int64_t> out;
  {
    py::gil_scoped_release r;
    out = f.add(bs, ip);
  }
  const py::ssize_t m = static_cast<py::ssize_t>(out.size());
  return owned_array(std::move(out), {m});
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

void init_cuda(py::module_& m) {
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
      .def(py::init<int64_t, int, bool>(), py::arg("n_words"), py::arg("dim"), py::arg("binary"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("n_words", &gpu::InvertedFile::n_words)
      .def_property_readonly("dim", &gpu::InvertedFile::dim)
      .def_property_readonly("binary", &gpu::InvertedFile::binary)
      .def_property_readonly("code_bytes", &gpu::InvertedFile::code_bytes)
      // The accessors lock the index: the GIL is released first (a long search may hold the lock).
      .def_property_readonly("n_images", [](const gpu::InvertedFile& f) { py::gil_scoped_release r; return f.n_images(); })
      .def_property_readonly("n_entries", [](const gpu::InvertedFile& f) { py::gil_scoped_release r; return f.n_entries(); })
      .def_property_readonly("next_id", [](const gpu::InvertedFile& f) { py::gil_scoped_release r; return f.next_id(); })
      .def_property_readonly("memory_bytes",
                             [](const gpu::InvertedFile& f) { py::gil_scoped_release r; return f.memory_bytes(); })
      .def_property_readonly("n_parts", [](const gpu::InvertedFile& f) { py::gil_scoped_release r; return f.n_parts(); })
      .def("contains", &gpu::InvertedFile::contains, py::arg("image_id"), py::call_guard<py::gil_scoped_release>())
      .def("image_ids",
           [](const gpu::InvertedFile& f) {
             std::vector<int64_t> v;
             {
               py::gil_scoped_release r;
               v = f.image_ids();
             }
             const py::ssize_t n = static_cast<py::ssize_t>(v.size());
             return owned_array(std::move(v), {n});
           })
      .def("word_counts",
           [](const gpu::InvertedFile& f) {
             std::vector<int32_t> v;
             {
               py::gil_scoped_release r;
               v = f.word_counts();
             }
             const py::ssize_t n = static_cast<py::ssize_t>(v.size());
             return owned_array(std::move(v), {n});
           })
      .def(
          "add",
          [](gpu::InvertedFile& f, const py::handle& off_o, const py::handle& words_o, const py::handle& codes_o,
             const py::handle& ids_o) {
            BatchArg b = batch_arg(f, off_o, words_o, codes_o, "");
            std::vector<gpu::Batch> bs{b.batch};
            return add_batches(f, bs, b.batch.n, ids_o);
          },
          py::arg("word_offsets"), py::arg("words"), py::arg("codes"), py::arg("image_ids") = py::none())
      .def(
          "add_batches",
          [](gpu::InvertedFile& f, const py::sequence& batches, const py::handle& ids_o) {
            std::vector<BatchArg> args;
            args.reserve(batches.size());
            std::vector<gpu::Batch> bs;
            int64_t n = 0;
            for (size_t i = 0; i < batches.size(); ++i) {
              py::object t = batches[i];
              if (!py::isinstance<py::tuple>(t) || py::len(t) != 3)
                throw py::type_error("add_batches takes (word_offsets, words, codes) tuples");
              py::tuple tt = t.cast<py::tuple>();
              args.push_back(batch_arg(f, tt[0], tt[1], tt[2], "batch " + std::to_string(i) + ": "));
              bs.push_back(args.back().batch);
              n += args.back().batch.n;
            }
            return add_batches(f, bs, n, ids_o);
          },
          py::arg("batches"), py::arg("image_ids") = py::none())
      .def(
          "remove",
          [](gpu::InvertedFile& f, const py::handle& ids_o) {
            auto ids = require<int64_t>(ids_o, "image_ids");
            if (ids.ndim() != 1) throw py::value_error("image_ids must be 1-D");
            std::string missing;
            int64_t removed = 0;
            {
              py::gil_scoped_release r;
              try {
                removed = f.remove(ids.size(), ids.data());
              } catch (const gpu::IdNotFound& e) {
                missing = e.what();
              }
            }
            if (!missing.empty()) throw py::key_error(missing);
            return removed;
          },
          py::arg("image_ids"))
      .def("merge", &gpu::InvertedFile::merge, py::call_guard<py::gil_scoped_release>())
      .def(
          "search",
          [](const gpu::InvertedFile& f, const py::handle& off_o, const py::handle& words_o, const py::handle& codes_o,
             int64_t k, float alpha, float tau, bool normalize) {
            BatchArg q = batch_arg(f, off_o, words_o, codes_o, "query ");
            ScoreParams p{alpha, tau, normalize};
            TopK t;
            {
              py::gil_scoped_release r;
              t = f.search(q.batch, k, p);
            }
            const py::ssize_t nq = static_cast<py::ssize_t>(t.n_queries), kk = static_cast<py::ssize_t>(t.k);
            return py::make_tuple(owned_array(std::move(t.scores), {nq, kk}), owned_array(std::move(t.ids), {nq, kk}));
          },
          py::arg("word_offsets"), py::arg("words"), py::arg("codes"), py::arg("k"), py::arg("alpha") = 3.0f,
          py::arg("tau") = 0.0f, py::arg("normalize") = true)
      .def(
          "score_all",
          [](const gpu::InvertedFile& f, const py::handle& off_o, const py::handle& words_o, const py::handle& codes_o,
             float alpha, float tau, bool normalize) {
            BatchArg q = batch_arg(f, off_o, words_o, codes_o, "query ");
            ScoreParams p{alpha, tau, normalize};
            AllScores a;
            {
              py::gil_scoped_release r;
              a = f.score_all(q.batch, p);
            }
            const py::ssize_t nq = static_cast<py::ssize_t>(q.batch.n), n = static_cast<py::ssize_t>(a.ids.size());
            return py::make_tuple(owned_array(std::move(a.scores), {nq, n}), owned_array(std::move(a.ids), {n}));
          },
          py::arg("word_offsets"), py::arg("words"), py::arg("codes"), py::arg("alpha") = 3.0f, py::arg("tau") = 0.0f,
          py::arg("normalize") = true)
      .def("export",
           [](const gpu::InvertedFile& f) {
             gpu::Content c;
             {
               py::gil_scoped_release r;
               c = f.export_content();
             }
             const py::ssize_t e = static_cast<py::ssize_t>(c.slots.size()), n = static_cast<py::ssize_t>(c.image_ids.size());
             const py::ssize_t w = static_cast<py::ssize_t>(c.offsets.size());
             py::dict d;
             d["offsets"] = owned_array(std::move(c.offsets), {w});
             d["slots"] = owned_array(std::move(c.slots), {e});
             d["codes"] = owned_array(std::move(c.codes), {e, static_cast<py::ssize_t>(f.code_bytes())});
             d["image_ids"] = owned_array(std::move(c.image_ids), {n});
             d["word_counts"] = owned_array(std::move(c.word_counts), {n});
             d["next_id"] = c.next_id;
             return d;
           })
      .def(
          "set_content",
          [](gpu::InvertedFile& f, const py::handle& off_o, const py::handle& slots_o, const py::handle& codes_o,
             const py::handle& ids_o, const py::handle& counts_o, int64_t next_id, const py::handle& /*owner*/) {
            // owner is ignored: the arrays are copied to the device.
            auto off = require<int64_t>(off_o, "offsets");
            auto slots = require<uint32_t>(slots_o, "slots");
            auto ids = require<int64_t>(ids_o, "image_ids");
            auto counts = require<int32_t>(counts_o, "word_counts");
            if (off.ndim() != 1 || off.size() != f.n_words() + 1)
              throw py::value_error("corrupt index: offsets must be 1-D with n_words + 1 entries");
            if (slots.ndim() != 1) throw py::value_error("corrupt index: slots must be 1-D");
            const int64_t e = slots.size();
            if (ids.ndim() != 1 || counts.ndim() != 1 || ids.size() != counts.size())
              throw py::value_error("corrupt index: image_ids and word_counts must be 1-D of one length");
            py::array codes = code_array(f, codes_o, e, "codes", true);
            const uint8_t* cp = static_cast<const uint8_t*>(codes.data());
            py::gil_scoped_release r;
            f.set_content(off.data(), slots.data(), cp, e, ids.size(), ids.data(), counts.data(), next_id);
          },
          py::arg("offsets"), py::arg("slots"), py::arg("codes"), py::arg("image_ids"), py::arg("word_counts"),
          py::arg("next_id"), py::arg("owner") = py::none())
      .def("_fail_after_allocations", &gpu::InvertedFile::fail_after_allocations, py::arg("n"),
           py::call_guard<py::gil_scoped_release>(),
           "Test hook: the n-th device allocation of the next operation raises CudaMemoryError.");

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
