// The safetensors header, read and checked (what lib/hf/hf.cc imports,
// lib/pth/dcp.cc's SAFETENSORS .distcp reader names dtypes by, and
// tests/fuzz/safetensors_fuzz.cc throws bytes at).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckpt/format.h"
#include "ckpt/status.h"

namespace ckpt::internal {

class ByteSource;

/// The largest header a safetensors file may declare (safetensors' own
/// limit); also the bound on the JSON files beside one.
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

/// The JSON text of the safetensors header at byte `at` of `src`: its
/// 8-byte little-endian length first, held to kMaxSafetensorsHeader and
/// to the end of the file. kCorrupt saying which, with the byte offset
/// (the caller names the file).
Result<std::string> ReadSafetensorsHeaderText(const ByteSource& src,
                                              uint64_t at);

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  ///< relative to SafetensorsHeader::data_start
};

struct SafetensorsHeader {
  uint64_t data_start = 0;  ///< 8 + the header's length
  /// In data order (by begin); back to back from 0 to the end of the file.
  std::vector<SafetensorsEntry> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;
};

/// Checks `header` (the bytes after the 8-byte size) of a file of
/// `file_size` bytes as safetensors does: a JSON object of tensors
/// {"dtype", "shape", "data_offsets"} and an optional "__metadata__" of
/// strings; each dtype known, each shape's bytes equal to its range, the
/// ranges back to back from 0 to the end of the file. kCorrupt naming the
/// tensor (and the JSON byte offset) otherwise; kInvalidArgument for a
/// dtype ckpt has no type for (F4, F6...).
Result<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header,
                                                 uint64_t file_size);

/// The ckpt dtype of a safetensors name ("F32"...), or nullopt.
std::optional<DType> SafetensorsDTypeFromName(std::string_view name);

/// The safetensors name of `dtype` ("F32", "BF16"...), or nullopt when
/// safetensors has none (complex32, quantized, the FNUZ float8s...).
std::optional<std::string_view> SafetensorsDTypeName(DType dtype);

}  // namespace ckpt::internal
