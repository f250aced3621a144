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
  /// viewing one storage share it again). kInvalidArgument for a bad index.
  static Result<TensorRef> StorageTensor(const Checkpoint& ck, size_t index);

  /// Checks the checksum of every chunk of storage `storage` that overlaps
  /// bytes [begin, end) of it (a loader calls this just before it copies
  /// those bytes). kChecksumMismatch naming the tensor path `tensor`, the
  /// chunk and its byte offset; kInvalidArgument for a bad range.
  static Status VerifyStorageRange(const Checkpoint& ck, size_t storage,
                                   uint64_t begin, uint64_t end,
                                   const std::string& tensor = "");
};

}  // namespace ckpt::internal
