// The d2r_native module (d2r._native): exception translation, build_info and the thread settings here;
// the bindings themselves, one file per concept, are added by the init_<concept>() functions of
// bindings.h. They only bind: csrc/ (and cuda/) compute. Every long call releases the GIL. Errors in
// the core (d2r::InvalidArgument) become ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // scan_variants: std::vector<std::string>

#include <cerrno>
#include <exception>
#include <system_error>

#include "common.h"
#include "postings.h"
#include "simd.h"

#include "bindings.h"
#include "scan.h"

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  // The SIMD level (simd.h), chosen here, at import: a bad $D2R_SIMD raises ImportError with its message.
  // Every dispatched kernel and the posting scan's kernels (scan.h) follow it.
  const d2r::simd::Level simd_level = d2r::simd::active();
  // Bound in the order of the single file this was split from: pybind11 writes a function's signature
  // into its docstring when it is bound, naming a class by its Python name only if that class is bound
  // already (InvertedFile.writer's says "-> d2r::PostingWriter": PostingWriter is bound after it).
  init_ransac(m);
  init_cuda(m);  // registers its own translator (CudaError, CudaMemoryError)
  m.doc() = "d2r native core (csrc/ CPU kernels, cuda/ GPU kernels)";

  m.def("set_num_threads", &d2r::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &d2r::num_threads);
  // Test / benchmark hooks: the posting scan's kernels start at the SIMD level (build_info()["simd"]).
  m.def("scan_variants", &d2r::scan_variants,
        "The posting-scan kernels this CPU runs (csrc/scan.h): one per SIMD level in build_info()['simd_levels']");
  m.def("scan_variant", &d2r::scan_variant, "The posting-scan kernels in use (initially the SIMD level's)");
  m.def("set_scan_variant", &d2r::set_scan_variant, py::arg("name"),
        "Overrides the posting-scan kernels (for tests and benchmarks; every variant gives the same scores)");
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
