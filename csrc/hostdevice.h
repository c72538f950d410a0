// Marks functions compiled for both the CPU core and the CUDA kernels.
#pragma once
#if defined(__CUDACC__)
#define D2R_HD __host__ __device__ __forceinline__
#else
#define D2R_HD inline
#endif
