// A file written where nobody sees it and published by rename: the
// temp-file, fsync, rename, directory-fsync sequence of leveldb's
// SetCurrentFile. Until Commit() succeeds, the target is untouched; on
// destruction without commit the temporary is removed.
//
// On Linux the bytes go to an unnamed O_TMPFILE inode in the target's
// directory, linked in only at commit, so a writer killed by SIGKILL leaves
// nothing behind. Where the file system lacks O_TMPFILE the temporary is a
// named ".<target>.tmp-XXXXXX" held under an exclusive flock() while it is
// written; Create() removes temporaries of the same target whose writer is
// gone (their lock is free), never a live writer's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "ckpt/status.h"

namespace ckpt::internal {

class AtomicFile {
 public:
  /// Starts a file that Commit() publishes as `target`. A target that is
  /// a symlink is written through: the link stays and the file it points
  /// to is replaced. Permissions: an existing target's are kept; a new
  /// file gets `mode` less the umask (applied by the kernel). Target names
  /// up to NAME_MAX work (the temporary's name is shortened to fit).
  /// `allow_tmpfile` = false forces the named temporary (tests).
  static Result<AtomicFile> Create(const std::string& target, unsigned mode,
                                   bool allow_tmpfile = true);

  AtomicFile(AtomicFile&& o) noexcept;
  AtomicFile& operator=(AtomicFile&& o) noexcept;
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  /// Appends at the current end. kIoError (e.g. "No space left on device")
  /// naming the target and offset.
  Status Write(std::span<const std::byte> bytes);
  /// Asks the kernel to start writing `len` bytes at `offset` back to the
  /// disk now (sync_file_range), so that the fsync at Commit waits for
  /// less. Advisory: a failure here is reported by that fsync.
  void StartWriteback(uint64_t offset, uint64_t len) const;
  /// Appends `len` bytes from offset `src_offset` of the file `src_fd`,
  /// copied by the kernel (copy_file_range) without passing through user
  /// memory. Returns false in `*copied` (and OK) when the kernel cannot do
  /// it for these files, having written nothing; kIoError on a real error.
  Status CopyFrom(int src_fd, uint64_t src_offset, uint64_t len, bool* copied);
  /// Writes at an absolute offset without moving the end. Safe to call
  /// from several threads at once for disjoint ranges.
  Status WriteAt(uint64_t offset, std::span<const std::byte> bytes);
  uint64_t size() const { return size_; }

  /// fsync (if `sync`), link/rename over the target, fsync the directory.
  Status Commit(bool sync);
  /// Closes and unlinks the temporary. Idempotent.
  void Abort();

  const std::string& target() const { return target_; }
  /// True when the bytes go to an unnamed O_TMPFILE inode.
  bool unnamed() const { return unnamed_; }

  /// The prefix of every temporary name of `target` (its base name cut to
  /// fit NAME_MAX): ".<base>.tmp-".
  static std::string TempPrefix(const std::string& base);

 private:
  AtomicFile() = default;
  Status Error(const std::string& what, int err) const;  // at size_
  Status Error(const std::string& what, int err, uint64_t offset) const;
  Status OpenNamed(const std::string& dir, const std::string& prefix,
                   unsigned mode);
  Status Publish();
  std::string target_;  // the path given
  std::string final_;   // where the bytes land: target_, symlinks resolved
  std::string temp_;    // the named temporary, or "" while unnamed
  int fd_ = -1;
  bool unnamed_ = false;
  uint64_t size_ = 0;
};

}  // namespace ckpt::internal
