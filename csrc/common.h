// Shared basics of the d2r CPU core: errors, threads, small helpers. No Python here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace d2r {

// Invalid argument: the bindings turn it into a Python ValueError.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// An id that is not in the index: the bindings turn it into a Python KeyError.
struct NotFound : std::out_of_range {
  using std::out_of_range::out_of_range;
};

#define D2R_CHECK(cond, msg)                                        \
  do {                                                              \
    if (!(cond)) throw ::d2r::InvalidArgument(std::string(msg));    \
  } while (0)

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void set_num_threads(int n) {
#ifdef _OPENMP
  if (n > 0) omp_set_num_threads(n);
#else
  (void)n;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Number of bytes of a packed binary code of dimension `dim` (numpy.packbits layout).
inline int packed_bytes(int dim) { return (dim + 7) / 8; }

}  // namespace d2r
