// Hugging Face's save_pretrained layout, to and from ckpt files, without
// Python: the safetensors files are read and written here (the format of
// github.com/huggingface/safetensors: an 8-byte little-endian header size,
// a JSON header, the tensors' bytes back to back), and legacy
// pytorch_model*.bin pickles go through the restricted importer (pth.h),
// so nothing in a directory runs.
//
// A save_pretrained directory holds, in the order transformers looks for
// them, model.safetensors; or shards named by model.safetensors.index.json;
// or pytorch_model.bin; or shards named by pytorch_model.bin.index.json;
// beside config.json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/pth.h"
#include "ckpt/status.h"

namespace ckpt {

/// The metadata key that holds config.json's text in an imported file.
inline constexpr const char* kHfConfigKey = "hf.config";

struct HfImportReport {
  std::string layout;              ///< "safetensors" or "bin"
  std::vector<std::string> files;  ///< the weight files read, in order
  size_t tensors = 0;
  uint64_t tensor_bytes = 0;
};

/// Writes the tensors of the save_pretrained directory `dir` as the ckpt
/// file `out` (atomically: on error nothing is left at `out`): one flat
/// dict of name -> tensor, config.json's text in the metadata under
/// kHfConfigKey and every safetensors file's __metadata__ entry beside it.
/// Every file is checked as safetensors checks it (header size, UTF-8
/// JSON, dtype names, shapes against byte ranges, ranges back to back
/// covering the data) and against the index (each tensor in the file the
/// weight_map names, no tensor twice, no name missing). Errors:
/// kNotFound (no weights in `dir`, a shard the index names is missing),
/// kCorrupt naming the file, tensor and byte offset, kInvalidArgument for
/// a dtype ckpt cannot hold; `options` apply to .bin shards and to the
/// output (options.write), and options.progress is called per tensor.
Result<HfImportReport> ImportHfDir(const std::string& dir,
                                   const std::string& out,
                                   const ImportOptions& options = {});

struct HfExportOptions {
  /// Largest shard in tensor bytes (one tensor larger than this alone).
  uint64_t max_shard_bytes = 5'000'000'000;
  /// fsync each file and the directory (crash safety).
  bool sync = true;
  /// Check every checksum of the tensors as they are read (safetensors
  /// keeps none: a damaged byte exported would be for good).
  bool verify = true;
};

/// Writes the tensors of the ckpt file `in` (a flat state dict, as
/// ImportHfDir makes) to the directory `dir` (created if missing) as
/// safetensors: model.safetensors, or model-0000i-of-0000N.safetensors
/// shards in name order and model.safetensors.index.json; config.json
/// from the kHfConfigKey metadata, the file's other string metadata as
/// every safetensors file's __metadata__ ("format": "pt" added when
/// absent, as transformers expects). Every file is written whole in a
/// temporary directory inside `dir` (".ckpt-export-*", under flock; one
/// left by a killed export is removed by the next) before any is renamed
/// into place, shards before the index; the weight files of an earlier
/// export that the new set lacks (model.safetensors, model-NNNNN-of-
/// NNNNN.safetensors, the index) are removed, an old model.safetensors
/// before a new index appears, so transformers never reads stale weights.
/// Checksums are checked as tensors are read (options.verify). Returns the
/// paths written. kInvalidArgument for a nested tree (a tensor path with
/// '/'), a tensor named __metadata__ or a dtype safetensors has no name
/// for, naming the tensor; kChecksumMismatch for a damaged chunk;
/// non-tensor values are left out (their count is in `dropped`).
Result<std::vector<std::string>> ExportHf(const std::string& in,
                                          const std::string& dir,
                                          const HfExportOptions& options = {},
                                          size_t* dropped = nullptr);

/// Parses a byte count: "5GB", "500MiB", "2.5GB", "1000" (bytes).
/// kInvalidArgument otherwise or when not positive.
Result<uint64_t> ParseByteSize(const std::string& text);

}  // namespace ckpt
