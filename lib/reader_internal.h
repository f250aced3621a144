// What the library's own loaders (lib/cuda) need of an open Checkpoint
// beyond its public API. Not installed; the binding and tools do not use it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "ckpt/reader.h"

namespace ckpt::internal {

struct CheckpointAccess {
  /// Storage `index` as a 1-D uint8 tensor over all its bytes, named
  /// "<storage N>" (for loaders that move whole storages, so that tensors
  /// viewing one storage share it again), with TensorInfo::index SIZE_MAX.
  /// kInvalidArgument for a bad index.
  static Result<TensorRef> StorageTensor(const Checkpoint& ck, size_t index);

  /// Checks the checksum of every chunk of storage `storage` that overlaps
  /// bytes [begin, end) of it (a loader calls this just before it copies
  /// those bytes). kChecksumMismatch naming the tensor path `tensor`, the
  /// chunk and its byte offset; kInvalidArgument for a bad range.
  static Status VerifyStorageRange(const Checkpoint& ck, size_t storage,
                                   uint64_t begin, uint64_t end,
                                   const std::string& tensor = "");

  /// A new descriptor of the very file `ck` has open (not of whatever its
  /// path names now: ckpt's writers replace files by rename), opened
  /// through /proc/self/fd with `flags` (e.g. O_DIRECT), or a dup() of it
  /// when /proc is not there and `flags` asks nothing special. The caller
  /// closes it. kIoError when the file was opened from a buffer; when the
  /// kernel refuses, ErrnoError's code (kNotFound for ENOENT, else
  /// kIoError) with errno in sys_errno().
  static Result<int> ReopenFile(const Checkpoint& ck, int flags);
};

}  // namespace ckpt::internal
