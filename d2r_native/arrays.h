// numpy arrays at the binding boundary, shared by every binding file of d2r_native/.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

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
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(name + " has dtype " + std::string(py::str(a.dtype())) + ", expected " +
                         std::string(py::str(py::dtype::of<T>())));
  return carray<T>::ensure(a);
}

}  // namespace d2r_native
