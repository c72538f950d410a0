// Device discovery, memory and copies for the CUDA path.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <utility>

#include "cuda_utils.cuh"

namespace d2r {
namespace gpu {

void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  cudaGetLastError();  // clear a sticky-free error so the context stays usable where it can
  std::string msg = std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  if (err == cudaErrorMemoryAllocation) throw DeviceOutOfMemory("out of GPU memory: " + msg);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
    throw DeviceError("no usable CUDA device: " + msg);
  (void)file;
  (void)line;
  throw DeviceError("CUDA error in " + msg);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void require_device() {
  if (device_count() == 0)
    throw DeviceError("no CUDA device is available (no GPU, or no NVIDIA driver on this machine)");
}

namespace {
__global__ void out_of_range_kernel(int64_t n, const int32_t* __restrict__ v, int64_t hi, int* __restrict__ bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n && (v[i] < 0 || v[i] >= hi)) atomicExch(bad, 1);
}
}  // namespace

bool any_out_of_range(const int32_t* v, int64_t n, int64_t hi) {
  if (n <= 0) return false;
  int flag = 0;
  Buffer bad = upload_array(&flag, 1, "range check");
  out_of_range_kernel<<<grid_for(n, 256), 256>>>(n, v, hi, bad.as<int>());
  D2R_CUDA_LAUNCH("out_of_range_kernel");
  bad.download(&flag, sizeof(flag));
  return flag != 0;
}

int sm_count() {
  static int n = [] {
    int dev = 0, v = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    return v > 0 ? v : 1;
  }();
  return n;
}

std::string device_name(int device) {
  require_device();
  cudaDeviceProp prop;
  D2R_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return prop.name;
}

std::string runtime_info() {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  if (cudaDriverGetVersion(&drv) != cudaSuccess) cudaGetLastError();
  char buf[128];
  std::snprintf(buf, sizeof(buf), "CUDA runtime %d.%d, driver %d.%d", rt / 1000, (rt % 1000) / 10, drv / 1000,
                (drv % 1000) / 10);
  return buf;
}

void memory_info(size_t* free_bytes, size_t* total_bytes) {
  require_device();
  D2R_CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo");
}

namespace {
// Allocations left before the injected failure (fail_allocation_after), per thread: an operation and
// its allocations run in the calling thread, so other threads' operations are not affected.
thread_local int64_t t_fail_countdown = 0;
}  // namespace

int64_t fail_allocation_after(int64_t n) {
  const int64_t old = t_fail_countdown;
  t_fail_countdown = n > 0 ? n : 0;
  return old;
}

Buffer::Buffer(size_t bytes, const char* what) : bytes_(bytes) {
  if (bytes == 0) return;
  require_device();
  if (t_fail_countdown > 0 && --t_fail_countdown == 0) {
    bytes_ = 0;
    throw DeviceOutOfMemory(std::string("out of GPU memory: ") + what + " (failure injected by the test hook)");
  }
  cudaError_t err = cudaMalloc(&ptr_, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    ptr_ = nullptr;
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    char buf[256];
    std::snprintf(buf, sizeof(buf), "out of GPU memory: %s needs %.1f MiB, %.1f MiB of %.1f MiB free", what,
                  bytes / 1048576.0, fr / 1048576.0, tot / 1048576.0);
    if (err == cudaErrorMemoryAllocation) throw DeviceOutOfMemory(buf);
    throw_cuda(err, what, __FILE__, __LINE__);
  }
}

Buffer::~Buffer() {
  if (ptr_) cudaFree(ptr_);
}

Buffer::Buffer(Buffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
  o.ptr_ = nullptr;
  o.bytes_ = 0;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void Buffer::upload(const void* host, size_t bytes, size_t offset) {
  if (bytes) copy_h2d(static_cast<char*>(ptr_) + offset, host, bytes);
}

void Buffer::download(void* host, size_t bytes, size_t offset) const {
  if (bytes) copy_d2h(host, static_cast<const char*>(ptr_) + offset, bytes);
}

void copy_h2d(void* dst, const void* src, size_t bytes) {
  if (bytes) D2R_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "copy to the GPU");
}
void copy_d2h(void* dst, const void* src, size_t bytes) {
  if (bytes) D2R_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "copy from the GPU");
}
void copy_d2d(void* dst, const void* src, size_t bytes) {
  if (bytes) D2R_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), "copy on the GPU");
}

}  // namespace gpu
}  // namespace d2r
