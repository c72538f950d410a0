// pybind11 bindings of csrc/aggregate.h (ASMK / ASMK* / R-ASMK aggregation, VLAD); module.cpp calls
// init_aggregate(m). The arrays are checked here; the core aggregates with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "aggregate.h"
#include "common.h"

#include "arrays.h"
#include "bindings.h"

namespace py = pybind11;
using namespace d2r;

using d2r_native::carray;
using d2r_native::check_2d;
using d2r_native::require;
using d2r_native::to_numpy;
using d2r_native::without_gil;

namespace {

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

void init_aggregate(py::module_& m) {
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
}
