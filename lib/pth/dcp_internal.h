// Reading a PyTorch Distributed Checkpoint (torch.distributed.checkpoint,
// "DCP") directory without running any of it: `.metadata` goes through the
// restricted pickle reader with DCP's allowlist (PickleProfile::
// kDcpMetadata), and each tensor chunk is located as a byte range of raw
// row-major elements inside the `__R_N.distcp` files, so a loader can read
// exactly the bytes it needs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/box.h"
#include "ckpt/format.h"
#include "ckpt/status.h"

namespace ckpt::internal {

/// One saved chunk of a tensor: the box it covers and where its elements
/// lie, dense and row-major (C order), in `file`.
struct DcpChunk {
  Box box;
  std::string file;                 // file name relative to the directory
  uint64_t offset = 0, length = 0;  // absolute offset in `file`; bytes
};

struct DcpTensor {
  std::string fqn;   // DCP's key ("model.layer.weight")
  std::string path;  // ckpt tensor path (PathBuilder) from planner_data's
                     // key tuple when present, else `fqn` as one key
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;    // global shape
  std::vector<DcpChunk> chunks;  // in .metadata's order; they tile `shape`
};

/// A non-tensor value (BytesStorageMetadata: a torch.save'd object):
/// located, not decoded.
struct DcpObject {
  std::string fqn, path, file;
  uint64_t offset = 0, length = 0;
};

struct DcpIndex {
  std::vector<DcpTensor> tensors;  // sorted by path
  std::vector<DcpObject> objects;  // sorted by path
  std::vector<std::string> files;  // every file referenced, sorted
  std::string version;             // Metadata.version ("" when absent)
};

/// True when `dir` holds a regular file `.metadata` (not a symlink).
bool IsDcpDirectory(const std::string& dir);

/// Reads `dir/.metadata` and locates every chunk and object. Refused
/// (kInvalidArgument, naming the global) when `.metadata` names anything
/// off DCP's allowlist; kCorrupt when it or an item is malformed or out of
/// its file's bounds; kInvalidArgument for items this reader cannot give
/// as raw bytes (compressed or transformed, non-contiguous, a dtype or
/// shape that disagrees with `.metadata`, SAFETENSORS-format files).
/// Errors name the file and, where one is known, the byte offset, and
/// the fqn concerned.
Result<DcpIndex> ReadDcpDirectory(const std::string& dir);

}  // namespace ckpt::internal
