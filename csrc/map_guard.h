// Truncated memory-mapped files: a typed error instead of SIGBUS.
//
// Reading a page of a MAP_SHARED file mapping that lies beyond the file's end raises SIGBUS (the file
// was truncated by another process after it was mapped); by default that ends the process. A mapped
// index registers its mapping here (map_guard_register). The process-wide SIGBUS handler (installed
// at the first registration, SA_SIGINFO, chaining to the handler that was there before) looks the
// faulting address up in the registry: inside a registered mapping, it maps anonymous zero pages
// over the rest of that mapping (mmap MAP_FIXED | MAP_ANONYMOUS | MAP_PRIVATE), sets the mapping's
// `truncated` flag and returns, so the faulting read resumes and reads zeros. Any other SIGBUS goes
// to the previous handler (or the default action: the process ends, as without d2r).
//
// Every reader of the postings checks the flag after it has read (and when a corrupt list stops it:
// zeros are not a valid structure), and raises CorruptIndex "index file ... was truncated while
// memory-mapped" instead of an answer; the flag is sticky, so every later call on an index holding
// that mapping raises it too, until the index is loaded again.
//
// The handler takes no lock, allocates nothing and touches no Python (a reader runs without the
// GIL): the registry is a fixed array of atomics, and mmap is a plain system call. No longjmp: the
// faulting instruction is simply retried on the new pages. Under AddressSanitizer, ASan's own SIGBUS
// handler (handle_sigbus=1, its default) is the previous one: ours is installed over it (ASan allows
// user handlers by default, allow_user_segv_handler=1) and chains to it for foreign faults.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace d2r {

// A registered mapping's state (address-stable for the process's lifetime).
struct MapGuardSlot {
  std::atomic<uintptr_t> base{0};  // 0: free
  std::atomic<size_t> length{0};
  std::atomic<uint8_t> truncated{0};
  std::atomic<uint8_t> in_use{0};
};

constexpr int kMapGuardSlots = 4096;

// Registers [base, base + length) (page-aligned base, as mmap returns it) and installs the SIGBUS
// handler if it is not the current one. Returns the slot (its `truncated` flag is the mapping's
// state); InvalidArgument when kMapGuardSlots mappings are registered already.
MapGuardSlot* map_guard_register(const void* base, size_t length);
// Unregisters a slot (before its munmap).
void map_guard_unregister(MapGuardSlot* slot);
// Whether the handler is installed and guarding (false where SIGBUS handling is not available).
bool map_guard_active();

}  // namespace d2r
