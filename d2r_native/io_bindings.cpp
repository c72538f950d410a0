// pybind11 bindings of file access (d2r_native/mapped_file.h): MappedFile, the read-only memory map an
// index loaded with mmap=True keeps its posting lists in (InvertedFile.set_segments uses arrays inside
// it in place). module.cpp calls init_io(m); its OS errors are translated in module.cpp.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "arrays.h"
#include "bindings.h"
#include "mapped_file.h"

namespace py = pybind11;
using d2r_native::MappedFile;
using d2r_native::without_gil;

void init_io(py::module_& m) {
  py::class_<MappedFile, std::shared_ptr<MappedFile>>(m, "MappedFile", py::buffer_protocol(),
                                                        "A read-only memory map of a whole file, released without the GIL")
      .def(py::init([](const std::string& path) { return without_gil([&] { return std::make_shared<MappedFile>(path); }); }),
           py::arg("path"))
      .def("__len__", [](const MappedFile& f) { return f.size(); })
      .def_property_readonly("truncated", &MappedFile::truncated,
                             "Whether the file was found truncated while mapped (reads past its end see zeros)")
      .def_buffer([](MappedFile& f) {
        return py::buffer_info(const_cast<uint8_t*>(f.data()), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {py::ssize_t{1}}, /*readonly=*/true);
      });
}
