// Parallel regions that are safe to embed (the threading rules of the whole CPU core):
//
// 1. An exception thrown inside an OpenMP region (an allocation failure, a bad argument found late)
//    must never escape the region: that ends the process through std::terminate. Every region body
//    runs its work through ParallelErrors::run, which captures the first exception; the caller
//    rethrows it after the region with ParallelErrors::rethrow.
// 2. Work is split by the team size actually obtained inside the region (team_size()), never by
//    num_threads() outside it: OMP_DYNAMIC, OMP_THREAD_LIMIT, nested settings (OMP_NUM_THREADS=2,1)
//    and a caller that is itself inside a parallel region all give fewer threads than asked.
// 3. Per-thread scratch is allocated inside the region, inside ParallelErrors::run.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

#include "common.h"

namespace d2r {

// Number of threads of the current team (1 outside a parallel region).
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

class ParallelErrors {
 public:
  // Runs f() unless an earlier call (on any thread) failed; captures what it throws.
  template <class F>
  void run(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  // On the calling thread, after the region: rethrows the first captured exception.
  void rethrow() {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr error_;
};

// for (i in [0, n)) body(i), dynamically scheduled in chunks; exceptions rethrown after the loop.
template <class F>
void parallel_for(int64_t n, int64_t chunk, F&& body) {
  (void)chunk;  // unused without OpenMP
  ParallelErrors errors;
#pragma omp parallel for schedule(dynamic, chunk)
  for (int64_t i = 0; i < n; ++i) errors.run([&] { body(i); });
  errors.rethrow();
}

// Runs body(t, T) once on every thread t of the team obtained (T threads, T >= 1): for work split
// into T contiguous ranges. Exceptions rethrown after the region.
template <class F>
void parallel_team(F&& body) {
  ParallelErrors errors;
#pragma omp parallel
  {
    const int T = team_size(), t = thread_id();
    errors.run([&] { body(t, T); });
  }
  errors.rethrow();
}

}  // namespace d2r
