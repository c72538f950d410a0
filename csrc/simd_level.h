// The per-level compilation of a dispatched source (simd.h explains the scheme). CMake compiles each
// dispatched source once per level with D2R_SIMD_LEVEL = 0 (scalar), 1 (avx2) or 2 (avx512); this
// header names the level's namespace (D2R_SIMD_NS) and opens / closes the region whose functions get
// the level's instructions (D2R_SIMD_BEGIN / D2R_SIMD_END, placed after every #include).
#pragma once

#ifndef D2R_SIMD_LEVEL
#error "a dispatched source is compiled with D2R_SIMD_LEVEL set (CMakeLists.txt, D2R_DISPATCH_SOURCES)"
#endif

#if D2R_SIMD_LEVEL == 0
#define D2R_SIMD_NS simd_scalar
#define D2R_SIMD_TABLE kKernelsScalar
#elif D2R_SIMD_LEVEL == 1
#define D2R_SIMD_NS simd_avx2
#define D2R_SIMD_TABLE kKernelsAvx2
#elif D2R_SIMD_LEVEL == 2
#define D2R_SIMD_NS simd_avx512
#define D2R_SIMD_TABLE kKernelsAvx512
#else
#error "D2R_SIMD_LEVEL must be 0, 1 or 2"
#endif

// The target strings are spelled out (a pragma's operand is not macro-expanded).
#if D2R_SIMD_LEVEL == 0 || !(defined(__x86_64__) || defined(__i386__))
#define D2R_SIMD_BEGIN
#define D2R_SIMD_END
#elif defined(__clang__)
// apply_to = function: every function defined in the region, lambdas' call operators included.
#if D2R_SIMD_LEVEL == 1
#define D2R_SIMD_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,bmi,bmi2,popcnt\"))), apply_to = function)")
#else
#define D2R_SIMD_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,bmi,bmi2,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq\"))), apply_to = function)")
#endif
#define D2R_SIMD_END _Pragma("clang attribute pop")
#else
#if D2R_SIMD_LEVEL == 1
#define D2R_SIMD_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,bmi,bmi2,popcnt\")")
#else
#define D2R_SIMD_BEGIN          \
  _Pragma("GCC push_options") \
  _Pragma("GCC target(\"avx2,fma,bmi,bmi2,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq\")")
#endif
#define D2R_SIMD_END _Pragma("GCC pop_options")
#endif
