// pybind11 bindings of csrc/ransac.h (spatial verification for re-ranking); module.cpp calls
// init_ransac(m). Same conventions as module.cpp: no silent dtype conversion (TypeError), shape errors
// are ValueError, core errors (d2r::InvalidArgument) become ValueError, the GIL is released while
// the core computes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common.h"
#include "ransac.h"

#include "arrays.h"
#include "bindings.h"

namespace py = pybind11;

namespace {

using d2r_native::carray;
using d2r_native::require;

// A 2-D float32 array with `cols` columns (any number when cols < 0).
carray<float> require_rows(const py::handle& obj, const std::string& name, int64_t cols) {
  auto a = require<float>(obj, name);
  if (a.ndim() != 2) throw py::value_error(name + " must be 2-D, got " + std::to_string(a.ndim()) + "-D");
  if (cols >= 0 && a.shape(1) != cols)
    throw py::value_error(name + " must have " + std::to_string(cols) + " columns, got " +
                          std::to_string(a.shape(1)));
  return a;
}

// Arrays of one list argument, kept alive (and contiguous) while the GIL is released.
std::vector<carray<float>> require_list(const py::sequence& seq, const std::string& name, int64_t cols) {
  std::vector<carray<float>> out;
  out.reserve(seq.size());
  for (size_t i = 0; i < seq.size(); ++i)
    out.push_back(require_rows(seq[i], name + "[" + std::to_string(i) + "]", cols));
  return out;
}

int64_t common_dim(const std::vector<carray<float>>& a, const std::vector<carray<float>>& b) {
  int64_t dim = -1;
  for (const auto* list : {&a, &b})
    for (const auto& x : *list) {
      if (dim < 0) dim = x.shape(1);
      if (x.shape(1) != dim)
        throw py::value_error("all descriptor arrays must have the same dimension (" + std::to_string(dim) +
                              " vs " + std::to_string(x.shape(1)) + ")");
    }
  return dim;
}

std::vector<d2r::ImageFeatures> features(const std::vector<carray<float>>& desc, const std::vector<carray<float>>& xy,
                                         const char* what) {
  if (desc.size() != xy.size())
    throw py::value_error(std::string(what) + ": " + std::to_string(desc.size()) + " descriptor arrays but " +
                          std::to_string(xy.size()) + " location arrays");
  std::vector<d2r::ImageFeatures> out(desc.size());
  for (size_t i = 0; i < desc.size(); ++i) {
    if (xy[i].shape(0) != desc[i].shape(0))
      throw py::value_error(std::string(what) + " " + std::to_string(i) + ": " + std::to_string(desc[i].shape(0)) +
                            " descriptors but " + std::to_string(xy[i].shape(0)) + " locations");
    out[i].descriptors = desc[i].data();
    out[i].xy = xy[i].data();
    out[i].n = desc[i].shape(0);
  }
  return out;
}

d2r::RansacParams ransac_params(float threshold, int max_trials, uint64_t seed, double stop_probability) {
  d2r::RansacParams p;
  p.threshold = threshold;
  p.max_trials = max_trials;
  p.seed = seed;
  p.stop_probability = stop_probability;
  return p;
}

}  // namespace

void init_ransac(py::module_& m) {
  m.def(
      "match_descriptors",
      [](const py::handle& qo, const py::handle& dbo, double max_distance) {
        auto q = require_rows(qo, "query descriptors", -1);
        auto db = require_rows(dbo, "database descriptors", -1);
        if (q.shape(1) != db.shape(1))
          throw py::value_error("query and database descriptors have different dimensions (" +
                                std::to_string(q.shape(1)) + " vs " + std::to_string(db.shape(1)) + ")");
        if (q.shape(1) < 1) throw py::value_error("descriptor dimension must be >= 1");
        std::vector<int32_t> qi, di;
        std::vector<float> dist;
        {
          py::gil_scoped_release release;
          d2r::match_descriptors(q.data(), q.shape(0), db.data(), db.shape(0), static_cast<int>(q.shape(1)),
                                 max_distance, &qi, &di, &dist);
        }
        const auto n = static_cast<py::ssize_t>(qi.size());
        py::array_t<int64_t> qa(n), da(n);
        py::array_t<float> dd(n);
        for (py::ssize_t i = 0; i < n; ++i) {
          qa.mutable_data()[i] = qi[i];
          da.mutable_data()[i] = di[i];
          dd.mutable_data()[i] = dist[i];
        }
        return py::make_tuple(qa, da, dd);
      },
      py::arg("query_descriptors"), py::arg("database_descriptors"), py::arg("max_distance") = 0.9,
      "Nearest database descriptor of each query descriptor (squared L2, ties -> lower index), kept when its\n"
      "distance is < max_distance. Returns (query_idx int64, database_idx int64, distance float32), in\n"
      "increasing query index.");

  m.def(
      "affine_ransac",
      [](const py::handle& src_o, const py::handle& dst_o, float threshold, int max_trials, uint64_t seed,
         double stop_probability) {
        auto src = require_rows(src_o, "src_xy", 2);
        auto dst = require_rows(dst_o, "dst_xy", 2);
        if (src.shape(0) != dst.shape(0))
          throw py::value_error("src_xy and dst_xy must have the same number of points (" +
                                std::to_string(src.shape(0)) + " vs " + std::to_string(dst.shape(0)) + ")");
        const py::ssize_t n = src.shape(0);
        py::array_t<bool> mask(n);
        py::array_t<float> model({py::ssize_t{2}, py::ssize_t{3}});
        const d2r::RansacParams p = ransac_params(threshold, max_trials, seed, stop_probability);
        int inliers;
        {
          py::gil_scoped_release release;
          inliers = d2r::affine_ransac(src.data(), dst.data(), n, p, model.mutable_data(),
                                       reinterpret_cast<uint8_t*>(mask.mutable_data()));
        }
        py::object model_obj = py::none();
        if (inliers > 0) model_obj = model;
        return py::make_tuple(inliers, model_obj, mask);
      },
      py::arg("src_xy"), py::arg("dst_xy"), py::arg("threshold") = 10.0f, py::arg("max_trials") = 1000,
      py::arg("seed") = 0, py::arg("stop_probability") = 1.0,
      "Affine RANSAC (3-point samples) mapping src_xy onto dst_xy (both n x 2 float32, (x, y)).\n"
      "Returns (inliers, model 2x3 float32 or None, inlier mask bool[n]).");

  m.def(
      "verify_many",
      [](const py::sequence& qd_o, const py::sequence& qxy_o, const py::sequence& dd_o, const py::sequence& dxy_o,
         const py::handle& pairs_o, double max_distance, float threshold, int max_trials, uint64_t seed,
         double stop_probability, int min_matches) {
        auto qd = require_list(qd_o, "query_descriptors", -1);
        auto qxy = require_list(qxy_o, "query_xy", 2);
        auto dd = require_list(dd_o, "database_descriptors", -1);
        auto dxy = require_list(dxy_o, "database_xy", 2);
        const int64_t dim = common_dim(qd, dd);
        auto queries = features(qd, qxy, "query image");
        auto images = features(dd, dxy, "database image");
        auto pairs = require<int64_t>(pairs_o, "pairs");
        if (pairs.ndim() != 2 || pairs.shape(1) != 2) throw py::value_error("pairs must have shape (n_pairs, 2)");
        const py::ssize_t n_pairs = pairs.shape(0);
        if (n_pairs > 0 && dim < 1) throw py::value_error("descriptor dimension must be >= 1");
        d2r::VerifyParams p;
        p.max_distance = max_distance;
        p.min_matches = min_matches;
        p.ransac = ransac_params(threshold, max_trials, seed, stop_probability);
        py::array_t<int32_t> inliers(n_pairs), n_matches(n_pairs);
        {
          py::gil_scoped_release release;
          d2r::verify_many(queries.data(), static_cast<int64_t>(queries.size()), images.data(),
                           static_cast<int64_t>(images.size()), static_cast<int>(std::max<int64_t>(dim, 1)),
                           pairs.data(), n_pairs, p, inliers.mutable_data(), n_matches.mutable_data());
        }
        return py::make_tuple(inliers, n_matches);
      },
      py::arg("query_descriptors"), py::arg("query_xy"), py::arg("database_descriptors"), py::arg("database_xy"),
      py::arg("pairs"), py::arg("max_distance") = 0.9, py::arg("threshold") = 10.0f, py::arg("max_trials") = 1000,
      py::arg("seed") = 0, py::arg("stop_probability") = 1.0, py::arg("min_matches") = 4,
      "Putative matches + affine RANSAC for each (query image, database image) pair; images are lists of\n"
      "float32 arrays (descriptors n x D, locations n x 2 as (x, y)). Returns (inliers int32[P],\n"
      "n_matches int32[P]). Pairs run in parallel; results do not depend on the number of threads.");
}
