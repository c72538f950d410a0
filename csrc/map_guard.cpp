#include "map_guard.h"

#include <string>

#include "common.h"

#if defined(__unix__) || defined(__APPLE__)
#define D2R_MAP_GUARD 1
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <mutex>
#endif

namespace d2r {

namespace {

MapGuardSlot g_slots[kMapGuardSlots];
std::atomic<int> g_high{0};  // slots [0, g_high) may be in use

#ifdef D2R_MAP_GUARD

std::atomic<uintptr_t> g_page{4096};
std::mutex g_install_mutex;  // registration and installation (never taken by the handler)

// The handlers found installed when ours was installed: entries are written once, before the index
// that publishes them, so the handler reads a complete one without a lock.
constexpr int kMaxPrevious = 16;
struct sigaction g_previous[kMaxPrevious];
std::atomic<int> g_previous_at{-1};
int g_n_previous = 0;
std::atomic<int> g_chaining{0};
std::atomic<bool> g_active{false};

void on_sigbus(int sig, siginfo_t* info, void* ctx);

bool is_ours(const struct sigaction& a) {
  return (a.sa_flags & SA_SIGINFO) && a.sa_sigaction == &on_sigbus;
}

// A SIGBUS that is not ours: the previous handler's, or the default action.
void chain(int sig, siginfo_t* info, void* ctx) {
  const int at = g_previous_at.load(std::memory_order_acquire);
  // Re-entered while chaining (a previous handler that raises the signal again, as Python's
  // faulthandler does once it has restored the handler it found, which may be ours): the default.
  const bool nested = g_chaining.fetch_add(1, std::memory_order_acq_rel) > 0;
  const struct sigaction* prev = at >= 0 ? &g_previous[at] : nullptr;
  const bool is_function =
      prev && !is_ours(*prev) &&
      ((prev->sa_flags & SA_SIGINFO) ? prev->sa_sigaction != nullptr
                                     : (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN));
  if (nested || !is_function) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, nullptr);
    // A fault is raised again by the faulting instruction when this returns; a signal sent by
    // kill / raise is sent again (delivered with the default action once this handler returns).
    if (info == nullptr || info->si_code <= 0) raise(sig);
    g_chaining.fetch_sub(1, std::memory_order_acq_rel);
    return;
  }
  if (prev->sa_flags & SA_SIGINFO)
    prev->sa_sigaction(sig, info, ctx);
  else
    prev->sa_handler(sig);
  g_chaining.fetch_sub(1, std::memory_order_acq_rel);
}

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  const int saved_errno = errno;
  if (info != nullptr && info->si_code > 0) {  // a fault (si_addr meaningful), not kill / raise
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    const int high = g_high.load(std::memory_order_acquire);
    for (int i = 0; i < high; ++i) {
      MapGuardSlot& s = g_slots[i];
      const uintptr_t base = s.base.load(std::memory_order_acquire);
      if (base == 0) continue;
      const size_t len = s.length.load(std::memory_order_acquire);
      if (addr < base || addr - base >= len) continue;
      // Zero pages from the faulting page to the end of the mapping (the file ends before it, so
      // every later page would fault too); then the read resumes.
      const uintptr_t page = g_page.load(std::memory_order_relaxed);
      const uintptr_t from = addr & ~(page - 1);
      const uintptr_t end = (base + len + page - 1) & ~(page - 1);
      void* p = ::mmap(reinterpret_cast<void*>(from), end - from, PROT_READ, MAP_FIXED | MAP_ANONYMOUS | MAP_PRIVATE,
                       -1, 0);
      if (p != MAP_FAILED) {
        s.truncated.store(1, std::memory_order_release);
        errno = saved_errno;
        return;
      }
      break;  // could not map: as without d2r
    }
  }
  errno = saved_errno;
  chain(sig, info, ctx);
}

// Installs on_sigbus unless it is the current SIGBUS handler (called under g_install_mutex).
void install() {
  struct sigaction cur {};
  if (sigaction(SIGBUS, nullptr, &cur) != 0) return;
  if (is_ours(cur)) {
    g_active.store(true, std::memory_order_release);
    return;
  }
  if (g_n_previous == kMaxPrevious) return;  // replaced over and over: leave the handler chain alone
  g_previous[g_n_previous] = cur;
  g_previous_at.store(g_n_previous, std::memory_order_release);
  ++g_n_previous;
  struct sigaction act {};
  act.sa_sigaction = &on_sigbus;
  act.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&act.sa_mask);
  if (sigaction(SIGBUS, &act, nullptr) == 0) g_active.store(true, std::memory_order_release);
}

#endif  // D2R_MAP_GUARD

}  // namespace

MapGuardSlot* map_guard_register(const void* base, size_t length) {
#ifdef D2R_MAP_GUARD
  std::lock_guard<std::mutex> lock(g_install_mutex);
  g_page.store(static_cast<uintptr_t>(sysconf(_SC_PAGESIZE)), std::memory_order_relaxed);
  install();
#endif
  for (int i = 0; i < kMapGuardSlots; ++i) {
    MapGuardSlot& s = g_slots[i];
    uint8_t expected = 0;
    if (!s.in_use.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) continue;
    s.truncated.store(0, std::memory_order_relaxed);
    s.length.store(length, std::memory_order_relaxed);
    s.base.store(reinterpret_cast<uintptr_t>(base), std::memory_order_release);
    int high = g_high.load(std::memory_order_relaxed);
    while (high < i + 1 && !g_high.compare_exchange_weak(high, i + 1, std::memory_order_acq_rel)) {
    }
    return &s;
  }
  throw InvalidArgument("too many memory-mapped index files open at once (" + std::to_string(kMapGuardSlots) + ")");
}

void map_guard_unregister(MapGuardSlot* slot) {
  if (slot == nullptr) return;
  slot->base.store(0, std::memory_order_release);
  slot->length.store(0, std::memory_order_relaxed);
  slot->in_use.store(0, std::memory_order_release);
}

bool map_guard_active() {
#ifdef D2R_MAP_GUARD
  return g_active.load(std::memory_order_acquire);
#else
  return false;
#endif
}

}  // namespace d2r
