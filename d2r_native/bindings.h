// The binding files of d2r_native/, one per concept (the pybind11 FAQ's layout: each adds its names to
// the module in an init_<concept>() that module.cpp calls). Bindings only bind: csrc/ and cuda/ compute.
// Global functions, like the binding files' lambdas before the split: inside namespace d2r_native, a name
// of arrays.h (e.g. to_numpy) would hide a file's own helper of that name.
#pragma once

#include <pybind11/pybind11.h>

void init_ransac(pybind11::module_& m);     // ransac_bindings.cpp: match_descriptors, affine_ransac, verify_many
void init_cuda(pybind11::module_& m);       // cuda_bindings.cpp: cuda_*, Gpu*, gpu_*, DeviceArray, Cuda*Error
void init_quantize(pybind11::module_& m);   // quantize_bindings.cpp: Quantizer
void init_aggregate(pybind11::module_& m);  // aggregate_bindings.cpp: aggregate, vlad
void init_io(pybind11::module_& m);         // io_bindings.cpp: MappedFile
void init_ivf(pybind11::module_& m);        // ivf_bindings.cpp: InvertedFile, PostingWriter
