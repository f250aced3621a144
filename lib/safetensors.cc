// The safetensors header: dtype names and the checks safetensors itself
// makes (safetensors_internal.h). Shared by ckpt import of Hugging Face
// directories (lib/hf) and DCP's SAFETENSORS-format .distcp files
// (lib/pth/dcp.cc).
#include <algorithm>
#include <cstdint>
#include <set>

#include "bytes_internal.h"
#include "json_internal.h"
#include "safetensors_internal.h"
#include "source_internal.h"

namespace ckpt {
namespace internal {
namespace {

struct StDType {
  const char* name;
  DType dtype;
};
// safetensors' dtype names (safetensors/src/tensor.rs, Dtype). F4, F6_*
// and the packed ones have no ckpt type and are refused by name.
constexpr StDType kStDTypes[] = {
    {"BOOL", DType::kBool},
    {"U8", DType::kUInt8},
    {"I8", DType::kInt8},
    {"I16", DType::kInt16},
    {"U16", DType::kUInt16},
    {"I32", DType::kInt32},
    {"U32", DType::kUInt32},
    {"I64", DType::kInt64},
    {"U64", DType::kUInt64},
    {"F16", DType::kFloat16},
    {"BF16", DType::kBFloat16},
    {"F32", DType::kFloat32},
    {"F64", DType::kFloat64},
    {"C64", DType::kComplex64},
    {"F8_E4M3", DType::kFloat8E4M3FN},
    {"F8_E5M2", DType::kFloat8E5M2},
    {"F8_E8M0", DType::kFloat8E8M0FNU},
    {"F8_E4M3FNUZ", DType::kFloat8E4M3FNUZ},
    {"F8_E5M2FNUZ", DType::kFloat8E5M2FNUZ},
};

Status Bad(const std::string& what, uint64_t json_offset) {
  return Corrupt("safetensors header: " + what + " (JSON byte " +
                 std::to_string(json_offset) + ")");
}

}  // namespace

Result<std::string> ReadSafetensorsHeaderText(const ByteSource& src,
                                              uint64_t at) {
  const uint64_t size = src.size();
  if (at > size || size - at < 8) {
    return Corrupt("safetensors: " + std::to_string(at > size ? 0 : size - at) +
                   " bytes, shorter than the 8-byte header size")
        .WithOffset(static_cast<int64_t>(at));
  }
  std::byte n8[8];
  CKPT_RETURN_IF_ERROR(src.ReadInto(at, n8));
  const uint64_t n = LoadLE<uint64_t>(n8);
  if (n > kMaxSafetensorsHeader) {
    return Corrupt("safetensors: header of " + std::to_string(n) +
                   " bytes, over the limit of " +
                   std::to_string(kMaxSafetensorsHeader))
        .WithOffset(static_cast<int64_t>(at));
  }
  if (!RangeWithin(at + 8, n, size)) {
    return Corrupt("safetensors: header of " + std::to_string(n) +
                   " bytes runs past the end of the file (" +
                   std::to_string(size) + " bytes)")
        .WithOffset(static_cast<int64_t>(at + 8));
  }
  std::string text(static_cast<size_t>(n), '\0');
  CKPT_RETURN_IF_ERROR(src.ReadInto(
      at + 8, std::as_writable_bytes(std::span(text.data(), text.size()))));
  return text;
}

std::optional<DType> SafetensorsDTypeFromName(std::string_view name) {
  for (const auto& d : kStDTypes) {
    if (name == d.name) return d.dtype;
  }
  return std::nullopt;
}

std::optional<std::string_view> SafetensorsDTypeName(DType dtype) {
  for (const auto& d : kStDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return std::nullopt;
}

Result<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header,
                                                 uint64_t file_size) {
  if (header.empty() || header[0] != '{') {
    return Corrupt("safetensors header: does not start with '{'");
  }
  CKPT_ASSIGN_OR_RETURN(JsonValue doc, ParseJson(header));
  if (!doc.is_object()) return Bad("not a JSON object", 0);
  SafetensorsHeader h;
  h.data_start = 8 + header.size();
  if (file_size < h.data_start) {
    return Corrupt("safetensors header: runs past the end of the file");
  }
  const uint64_t data_size = file_size - h.data_start;
  for (auto& [name, v] : doc.members) {
    if (name == "__metadata__") {
      if (!v.is_object()) return Bad("__metadata__ is not an object", v.offset);
      for (auto& [k, mv] : v.members) {
        if (!mv.is_string()) {
          return Bad("__metadata__ '" + k + "' is not a string", mv.offset);
        }
        h.metadata.emplace_back(k, std::move(mv.text));
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!v.is_object()) return Bad(where + " is not an object", v.offset);
    const JsonValue* dt = v.Find("dtype");
    const JsonValue* shape = v.Find("shape");
    const JsonValue* offs = v.Find("data_offsets");
    if (!dt || !dt->is_string() || !shape || !shape->is_array() || !offs ||
        !offs->is_array()) {
      return Bad(where + " lacks a string dtype, a shape list or data_offsets",
                 v.offset);
    }
    SafetensorsEntry e;
    e.name = name;
    e.dtype = SafetensorsDTypeFromName(dt->text).value_or(DType::kInvalid);
    if (e.dtype == DType::kInvalid) {
      // Sub-byte floats: safetensors' shape counts elements, torch's
      // float4_e2m1fn_x2 (ckpt's) bytes of two; F6 torch has no type for.
      static const std::set<std::string> kSubByte = {"F4", "F6_E2M3",
                                                     "F6_E3M2"};
      if (kSubByte.count(dt->text)) {
        return InvalidArgument("safetensors: " + where + " has dtype " +
                               dt->text +
                               ", a sub-byte type ckpt does not import");
      }
      return Bad(where + " has unknown dtype \"" + dt->text + "\"", dt->offset);
    }
    // numel * element size, every product checked against 2^63.
    uint64_t bytes = DTypeSize(e.dtype);
    for (const JsonValue& d : shape->items) {
      auto n = d.AsUint64();
      if (!n || *n > static_cast<uint64_t>(INT64_MAX)) {
        return Bad(where + ": shape entries must be integers 0..2^63-1",
                   d.offset);
      }
      if (*n != 0 && bytes > static_cast<uint64_t>(INT64_MAX) / *n) {
        return Bad(where + ": shape's size overflows", d.offset);
      }
      bytes *= *n;
      e.shape.push_back(static_cast<int64_t>(*n));
    }
    if (e.shape.size() > kMaxRank) {
      return Bad(
          where + " has more than " + std::to_string(kMaxRank) + " dimensions",
          shape->offset);
    }
    std::optional<uint64_t> b, en;
    if (offs->items.size() == 2) {
      b = offs->items[0].AsUint64();
      en = offs->items[1].AsUint64();
    }
    if (!b || !en || *en < *b) {
      return Bad(where + ": data_offsets must be two integers [begin, end]",
                 offs->offset);
    }
    if (*en - *b != bytes) {
      return Bad(where + ": data_offsets [" + std::to_string(*b) + ", " +
                     std::to_string(*en) + ") hold " +
                     std::to_string(*en - *b) + " bytes, its shape " +
                     std::to_string(bytes),
                 offs->offset);
    }
    e.begin = *b;
    e.end = *en;
    h.tensors.push_back(std::move(e));
  }
  // Back to back from 0 to the end, as safetensors' validate() demands.
  std::stable_sort(
      h.tensors.begin(), h.tensors.end(), [](const auto& a, const auto& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
      });
  uint64_t at = 0;
  for (const auto& e : h.tensors) {
    if (e.begin != at) {
      return Corrupt("safetensors header: tensor '" + e.name +
                     "' starts at data byte " + std::to_string(e.begin) +
                     ", not " + std::to_string(at) +
                     " (ranges must be back to back)");
    }
    at = e.end;
  }
  if (at != data_size) {
    return Corrupt("safetensors header: the tensors' ranges end at data byte " +
                   std::to_string(at) + ", the file's data at " +
                   std::to_string(data_size));
  }
  return h;
}

}  // namespace internal

}  // namespace ckpt
