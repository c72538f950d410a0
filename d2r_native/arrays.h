// numpy arrays at the binding boundary, shared by every binding file of d2r_native/.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif

namespace d2r_native {

template <class T>
using carray = pybind11::array_t<T, pybind11::array::c_style | pybind11::array::forcecast>;

// obj as a C-contiguous array of T. Refuses silent dtype conversions (the Python layer converts
// explicitly): a non-array or another dtype raises TypeError naming `name`.
template <class T>
carray<T> require(const pybind11::handle& obj, const std::string& name) {
  namespace py = pybind11;
  if (!py::isinstance<py::array>(obj)) throw py::type_error(name + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  // Equivalence, not identity: an unpickled array has its own (equal) dtype object.
  if (!py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<T>().ptr()))
    throw py::type_error(name + " has dtype " + std::string(py::str(a.dtype())) + ", expected " +
                         std::string(py::str(py::dtype::of<T>())));
  return carray<T>::ensure(a);
}

// ValueError unless a is 2-D ("<name> must be 2-D").
inline void check_2d(const pybind11::array& a, const char* name) {
  if (a.ndim() != 2) throw pybind11::value_error(std::string(name) + " must be 2-D");
}

// Runs f() with the GIL released and returns its result. The GIL is re-taken in ordinary control
// flow, not in a destructor: at interpreter exit Python ends a thread that wants the GIL back by
// unwinding it (pthread_exit), which must not pass through a noexcept destructor (std::terminate).
// Never call with a native lock held.
template <class F>
auto without_gil(F&& f) -> decltype(f()) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    if constexpr (std::is_void_v<decltype(f())>) {
      f();
      PyEval_RestoreThread(state);
    } else {
      auto r = f();
      PyEval_RestoreThread(state);
      return r;
    }
  }
#if defined(__GLIBCXX__)
  catch (abi::__forced_unwind&) {
    throw;  // the thread is being ended while re-taking the GIL: let it go
  }
#endif
  catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
}

// A numpy array that takes ownership of v (no copy): shape's product must equal v.size().
template <class T>
pybind11::array_t<T> to_numpy(std::vector<T>&& v, const std::vector<pybind11::ssize_t>& shape) {
  namespace py = pybind11;
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule base(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  static T empty{};
  return py::array_t<T>(shape, owned->empty() ? &empty : owned->data(), base);
}

}  // namespace d2r_native
