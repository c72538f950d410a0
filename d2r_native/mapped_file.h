// A read-only memory map of a whole file, owned natively: an index loaded with mmap=True keeps its
// posting lists in the map, and releasing it (munmap) needs neither the GIL nor Python. The map is
// registered with the SIGBUS guard (csrc/map_guard.h): if the file is truncated while mapped, reads
// beyond its new end see zeros instead of ending the process, and truncated() says so.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>

#include "map_guard.h"

namespace d2r_native {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // O_NONBLOCK: a FIFO never blocks
    if (fd < 0) throw std::system_error(errno, std::generic_category(), path);
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw std::system_error(err, std::generic_category(), path);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw std::invalid_argument(path + ": not a regular file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw std::system_error(err, std::generic_category(), path + ": mmap");
      }
      try {
        guard_ = d2r::map_guard_register(p, size_);
      } catch (...) {
        ::munmap(p, size_);
        ::close(fd);
        throw;
      }
      data_ = static_cast<const uint8_t*>(p);
      // An index is read where its searches need it: without this, the kernel's readahead (up to
      // read_ahead_kb, megabytes on some disks) would read far beyond each posting list on a cold
      // cache. The core asks for each list's pages as it first reads them (MADV_WILLNEED).
      ::madvise(p, size_, MADV_RANDOM);
    }
    ::close(fd);
  }
  ~MappedFile() {
    d2r::map_guard_unregister(guard_);
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_ ? data_ : &empty_; }
  // The map's truncation flag (set by the SIGBUS guard; nullptr for an empty file, which has no map).
  const std::atomic<uint8_t>* truncated_flag() const { return guard_ ? &guard_->truncated : nullptr; }
  bool truncated() const { return guard_ && guard_->truncated.load(std::memory_order_acquire); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Whether [p, p + n) lies inside the map.
  bool holds(const void* p, size_t n) const {
    const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(data());
    return n == 0 || (a >= b && a - b <= size_ && n <= size_ - (a - b));
  }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  d2r::MapGuardSlot* guard_ = nullptr;
  static constexpr uint8_t empty_ = 0;
};

}  // namespace d2r_native
