// A file written under a temporary name and published by rename: the
// temp-file, fsync, rename, directory-fsync sequence of leveldb's
// SetCurrentFile. Until Commit() succeeds, the target is untouched; on
// destruction without commit the temporary is removed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "ckpt/status.h"

namespace ckpt::internal {

class AtomicFile {
 public:
  /// Creates "<dir>/.<name>.tmp-XXXXXX" with permissions `mode` & ~umask.
  static Result<AtomicFile> Create(const std::string& target, unsigned mode);

  AtomicFile(AtomicFile&& o) noexcept;
  AtomicFile& operator=(AtomicFile&& o) noexcept;
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  /// Appends at the current end. kIoError (e.g. "No space left on device")
  /// naming the target and offset.
  Status Write(std::span<const std::byte> bytes);
  /// Appends `len` bytes from offset `src_offset` of the file `src_fd`,
  /// copied by the kernel (copy_file_range) without passing through user
  /// memory. Returns false in `*copied` (and OK) when the kernel cannot do
  /// it for these files, having written nothing; kIoError on a real error.
  Status CopyFrom(int src_fd, uint64_t src_offset, uint64_t len, bool* copied);
  /// Writes at an absolute offset without moving the end.
  Status WriteAt(uint64_t offset, std::span<const std::byte> bytes);
  uint64_t size() const { return size_; }

  /// fsync (if `sync`), rename over the target, fsync the directory.
  Status Commit(bool sync);
  /// Closes and unlinks the temporary. Idempotent.
  void Abort();

  const std::string& target() const { return target_; }

 private:
  AtomicFile() = default;
  Status Error(const std::string& what, int err) const;
  std::string target_;
  std::string temp_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace ckpt::internal
