// The d2r_native module (d2r._native): exception translation, build_info and the thread settings here;
// the bindings themselves, one file per concept, are added by the init_<concept>() functions of
// bindings.h. They only bind: csrc/ (and cuda/) compute. Every long call releases the GIL. Errors in
// the core (d2r::InvalidArgument) become ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <exception>
#include <system_error>

#include "common.h"
#include "postings.h"

#include "bindings.h"
#include "scan.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  // Bound in the order of the single file this was split from: pybind11 writes a function's signature
  // into its docstring when it is bound, naming a class by its Python name only if that class is bound
  // already (InvertedFile.writer's says "-> d2r::PostingWriter": PostingWriter is bound after it).
  init_ransac(m);
  init_cuda(m);  // registers its own translator (CudaError, CudaMemoryError)
  m.doc() = "d2r native core (csrc/ CPU kernels, cuda/ GPU kernels)";

  m.def("set_num_threads", &d2r::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &d2r::num_threads);
  m.def("scan_variants", &d2r::scan_variants, "The posting-scan kernels this CPU runs (csrc/scan.h), scalar first");
  m.def("scan_variant", &d2r::scan_variant, "The posting-scan kernels in use");
  m.def("set_scan_variant", &d2r::set_scan_variant, py::arg("name"),
        "Selects the posting-scan kernels (for tests and benchmarks; every variant gives the same scores)");
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

  init_quantize(m);
  init_aggregate(m);

  // Translators run newest first: this one, for the CPU core and MappedFile, before the CUDA one.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const d2r::NotFound& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    } catch (const d2r::CorruptIndex& e) {
      py::object cls = py::module_::import("d2r.core.index_io").attr("IndexFileError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const std::system_error& e) {  // MappedFile: the OS said no
      if (e.code().value() == ENOMEM)
        PyErr_SetString(PyExc_MemoryError, e.what());
      else
        PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), e.what()).ptr());  // OSError(errno, msg)
    }
  });

  init_io(m);
  init_ivf(m);
}
