// Loading boxes of a sharded checkpoint's tensors into GPU memory (target
// ckpt::cuda, which links ckpt::dist). Row runs of each saved chunk go
// through the device loader's pinned ring (LoadToDevice) straight into the
// destination; strided intersections (a column slice of a row-sharded
// tensor) load the chunk rows they span into device scratch memory and
// land in place with one cudaMemcpy2DAsync per strided row pattern.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "ckpt/box.h"
#include "ckpt/cuda.h"
#include "ckpt/dist.h"

namespace ckpt::dist {

/// A box of a global tensor wanted in device memory at `data`: room for
/// box.numel() * element size bytes, filled dense and row-major, on the
/// device DeviceLoadOptions::device names.
struct DeviceWant {
  std::string path;
  Box box;
  void* data = nullptr;
};

/// Loads every want and returns when all bytes are in place. LoadStats'
/// bytes_read counts the bytes staged from files: equal to bytes_needed
/// for row-wise intersections, whole spanned chunk rows for strided ones.
/// `options.destinations` and `options.convert` do not apply. Errors:
/// Plan's, the device loader's (kCuda naming the file and offset), and a
/// checksum mismatch with `options.verify_checksums`.
Result<LoadStats> LoadBoxesToDevice(const ShardedCheckpoint& ck,
                                    std::span<const DeviceWant> wants,
                                    const DeviceLoadOptions& options = {});

}  // namespace ckpt::dist
