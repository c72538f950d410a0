// CUDA helpers shared by the cuda/ kernels: error checks, small device utilities, CUB temp storage.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "gpu.h"

namespace d2r {
namespace gpu {

[[noreturn]] void throw_cuda(cudaError_t err, const char* what, const char* file, int line);

#define D2R_CUDA_CHECK(expr, what)                                                   \
  do {                                                                               \
    cudaError_t d2r_err_ = (expr);                                                   \
    if (d2r_err_ != cudaSuccess) ::d2r::gpu::throw_cuda(d2r_err_, what, __FILE__, __LINE__); \
  } while (0)

// After a kernel launch: launch errors (bad configuration) and, on the next synchronisation, faults.
#define D2R_CUDA_LAUNCH(what) D2R_CUDA_CHECK(cudaGetLastError(), what)

inline void sync(const char* what) { D2R_CUDA_CHECK(cudaDeviceSynchronize(), what); }

// Makes sure a device is present; raises DeviceError otherwise.
void require_device();

inline unsigned grid_for(int64_t n, int block, int64_t max_blocks = 0x7fffffff) {
  int64_t g = (n + block - 1) / block;
  if (g < 1) g = 1;
  if (g > max_blocks) g = max_blocks;
  return static_cast<unsigned>(g);
}

int sm_count();

// True when some v[i] (device memory, i < n) lies outside [0, hi): word ids checked on the device.
bool any_out_of_range(const int32_t* v, int64_t n, int64_t hi);

// Uploads a host array into a new buffer.
template <class T>
Buffer upload_array(const T* host, size_t n, const char* what) {
  Buffer b(n * sizeof(T) > 0 ? n * sizeof(T) : 1, what);
  if (n) b.upload(host, n * sizeof(T));
  return b;
}

template <class T>
std::vector<T> download_array(const T* dev, size_t n) {
  std::vector<T> v(n);
  if (n) copy_d2h(v.data(), dev, n * sizeof(T));
  return v;
}

// Number of bits needed to represent values in [0, n).
inline int bits_for(uint64_t n) {
  int b = 0;
  while (b < 64 && (uint64_t{1} << b) < n) ++b;
  return b < 1 ? 1 : b;
}

}  // namespace gpu
}  // namespace d2r
