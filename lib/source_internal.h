// Random access to a file's bytes: a whole-file mapping, pread(), or a
// caller's buffer, behind one interface.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "ckpt/status.h"

namespace ckpt::internal {

/// Bytes plus whatever keeps them alive.
struct Bytes {
  std::span<const std::byte> data;
  std::shared_ptr<const void> owner;
};

class ByteSource : public std::enable_shared_from_this<ByteSource> {
 public:
  virtual ~ByteSource() = default;
  const std::string& name() const { return name_; }
  uint64_t size() const { return size_; }
  /// An open descriptor of the file (pread backend), or -1.
  virtual int fd() const { return -1; }
  /// True when Read() returns views into a mapping or buffer (no copy).
  virtual bool zero_copy() const = 0;
  // Every read checks its range against size() here, once, for every
  // backend (as LevelDB's mmap Read and Arrow's ValidateReadRange do):
  // callers never check on their own, and a range past the end is an
  // error naming the file and offset, never a read out of bounds.

  /// Bytes [offset, offset+len). kCorrupt when the range does not lie
  /// within size(); kIoError on a failed or short read.
  Result<Bytes> Read(uint64_t offset, uint64_t len) const {
    CKPT_RETURN_IF_ERROR(CheckRange(offset, len));
    return DoRead(offset, len);
  }
  /// Bytes [offset, offset+len) that the caller may write: with a mapping,
  /// a private copy-on-write mapping of just those pages (writes change
  /// only this process's memory, never the file; commit charge only for
  /// the pages written); otherwise what Read() returns. Errors as Read().
  Result<Bytes> ReadWritable(uint64_t offset, uint64_t len) const {
    CKPT_RETURN_IF_ERROR(CheckRange(offset, len));
    return DoReadWritable(offset, len);
  }
  /// Fills `out` with bytes from `offset`, copying. Errors as Read().
  Status ReadInto(uint64_t offset, std::span<std::byte> out) const {
    CKPT_RETURN_IF_ERROR(CheckRange(offset, out.size()));
    return DoReadInto(offset, out);
  }
  /// Makes [offset, offset+len) resident and mapped now (mappings only;
  /// otherwise a no-op). Errors as Read().
  Status Populate(uint64_t offset, uint64_t len) const {
    CKPT_RETURN_IF_ERROR(CheckRange(offset, len));
    return DoPopulate(offset, len);
  }
  /// Unmaps the pages of [offset, offset+len) from this process (they stay
  /// in the page cache), so streaming a huge file keeps RSS bounded. A
  /// range past the end is cut at size().
  void Release(uint64_t offset, uint64_t len) const {
    if (offset >= size_) return;
    DoRelease(offset, std::min(len, size_ - offset));
  }

 protected:
  ByteSource(std::string name, uint64_t size)
      : name_(std::move(name)), size_(size) {}

 private:
  // What each backend does, called with ranges already checked.
  virtual Result<Bytes> DoRead(uint64_t offset, uint64_t len) const = 0;
  virtual Result<Bytes> DoReadWritable(uint64_t offset, uint64_t len) const {
    return DoRead(offset, len);
  }
  virtual Status DoReadInto(uint64_t offset,
                            std::span<std::byte> out) const = 0;
  virtual Status DoPopulate(uint64_t /*offset*/, uint64_t /*len*/) const {
    return Status::OK();
  }
  virtual void DoRelease(uint64_t /*offset*/, uint64_t /*len*/) const {}

  Status CheckRange(uint64_t offset, uint64_t len) const;

  std::string name_;
  uint64_t size_;
};

/// Opens `path` with the backend of `options`. kNotFound / kIoError naming
/// the path.
/// How OpenSource reads: through a read-only shared mapping (optionally
/// populated now), or with pread on a descriptor.
struct SourceOptions {
  bool pread = false;
  bool populate = false;
};

Result<std::shared_ptr<ByteSource>> OpenSource(const std::string& path,
                                               const SourceOptions& options);
/// Borrows a buffer.
std::shared_ptr<ByteSource> BufferSource(std::span<const std::byte> bytes,
                                         std::string name);

}  // namespace ckpt::internal
