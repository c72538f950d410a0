// pybind11 bindings of csrc/quantize.h (the codebook quantizer); module.cpp calls init_quantize(m).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "quantize.h"

#include "arrays.h"
#include "bindings.h"

namespace py = pybind11;
using d2r::Quantizer;
using d2r_native::check_2d;
using d2r_native::require;
using d2r_native::without_gil;

void init_quantize(py::module_& m) {
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
}
