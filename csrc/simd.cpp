// Runtime CPU dispatch: level detection, the D2R_SIMD override, the active table (simd.h).
#include "simd.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common.h"

namespace d2r {
namespace simd {

// One table per compiled level (simd_table.cpp, compiled once per level). CMake defines
// D2R_SIMD_X86 where the avx2 and avx512 levels are compiled in (x86-64).
extern const Kernels kKernelsScalar;
#if D2R_SIMD_X86
extern const Kernels kKernelsAvx2;
extern const Kernels kKernelsAvx512;
#endif

namespace {

const char* const kNames[kNumLevels] = {"scalar", "avx2", "avx512"};

const Kernels* table_of(Level level) {
  switch (level) {
    case Level::kScalar:
      return &kKernelsScalar;
#if D2R_SIMD_X86
    case Level::kAvx2:
      return &kKernelsAvx2;
    case Level::kAvx512:
      return &kKernelsAvx512;
#endif
    default:
      return nullptr;
  }
}

std::string available_names() {
  std::string s;
  for (Level l : available()) s += std::string(s.empty() ? "" : ", ") + level_name(l);
  return s;
}

struct Choice {
  Level level = Level::kScalar;
  std::string error;  // non-empty: D2R_SIMD could not be honoured
};

Choice choose() {
  Choice c;
  const std::vector<Level> avail = available();
  c.level = avail.back();
  const char* env = std::getenv("D2R_SIMD");
  if (env == nullptr || *env == '\0') return c;
  const std::string want(env);
  for (int i = 0; i < kNumLevels; ++i) {
    if (want != kNames[i]) continue;
    const Level l = static_cast<Level>(i);
    if (!compiled(l))
      c.error = "D2R_SIMD=" + want + ": this build of d2r has no " + want + " code (levels available here: " +
                available_names() + ")";
    else if (!cpu_supports(l))
      c.error = "D2R_SIMD=" + want + ": this CPU lacks the " + want + " instructions" +
                (l == Level::kAvx512 ? " (AVX-512 F, BW, DQ, VL and VPOPCNTDQ, with AVX2 and FMA)"
                                     : " (AVX2, FMA, BMI1, BMI2, POPCNT)") +
                "; levels available here: " + available_names();
    else
      c.level = l;
    return c;
  }
  c.error = "D2R_SIMD=" + want + " is not a SIMD level: use scalar, avx2 or avx512 (or leave it unset for the best "
            "available here: " + std::string(level_name(avail.back())) + ")";
  return c;
}

const Choice& choice() {
  static const Choice c = choose();  // thread-safe once
  return c;
}

}  // namespace

const char* level_name(Level level) {
  const int i = static_cast<int>(level);
  return (i >= 0 && i < kNumLevels) ? kNames[i] : "unknown";
}

bool compiled(Level level) { return table_of(level) != nullptr; }

bool cpu_supports(Level level) {
  switch (level) {
    case Level::kScalar:
      return true;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    case Level::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    case Level::kAvx512:
      return cpu_supports(Level::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
    default:
      return false;
  }
}

std::vector<Level> available() {
  std::vector<Level> out;
  for (int i = 0; i < kNumLevels; ++i) {
    const Level l = static_cast<Level>(i);
    if (compiled(l) && cpu_supports(l)) out.push_back(l);
  }
  return out;
}

Level active() {
  const Choice& c = choice();
  if (!c.error.empty()) throw InvalidArgument(c.error);
  return c.level;
}

const Kernels& kernels() {
  static const Kernels* const k = table_of(active());  // throws (and retries next time) on a bad D2R_SIMD
  return *k;
}

const Kernels& kernels_for(Level level) {
  if (!compiled(level) || !cpu_supports(level))
    throw InvalidArgument(std::string("SIMD level ") + level_name(level) + " is not available here (available: " +
                          available_names() + ")");
  return *table_of(level);
}

}  // namespace simd
}  // namespace d2r
