#include "ckpt/format.h"

#include <array>
#include <cctype>

namespace ckpt {

std::string_view VersionString() { return "0.1.0"; }

namespace {

struct DTypeEntry {
  std::string_view name;
  size_t size;
};

// Indexed by code. Sizes: one storage element; float4_e2m1fn_x2 and the
// packed quantized/bits types hold several values in one byte, as in torch.
constexpr std::array<DTypeEntry, kMaxDTypeCode + 1> kDTypes = {{
    {"", 0},
    {"bool", 1},
    {"uint8", 1},
    {"int8", 1},
    {"int16", 2},
    {"int32", 4},
    {"int64", 8},
    {"uint16", 2},
    {"uint32", 4},
    {"uint64", 8},
    {"float16", 2},
    {"bfloat16", 2},
    {"float32", 4},
    {"float64", 8},
    {"complex32", 4},
    {"complex64", 8},
    {"complex128", 16},
    {"float8_e4m3fn", 1},
    {"float8_e5m2", 1},
    {"float8_e4m3fnuz", 1},
    {"float8_e5m2fnuz", 1},
    {"float8_e8m0fnu", 1},
    {"float4_e2m1fn_x2", 1},
    {"qint8", 1},
    {"quint8", 1},
    {"qint32", 4},
    {"quint4x2", 1},
    {"quint2x4", 1},
    {"bits8", 1},
    {"bits16", 2},
    {"bits1x8", 1},
    {"bits2x4", 1},
    {"bits4x2", 1},
    // 1.1: uint1..uint7, int1..int7, one value per byte.
    {"uint1", 1},
    {"uint2", 1},
    {"uint3", 1},
    {"uint4", 1},
    {"uint5", 1},
    {"uint6", 1},
    {"uint7", 1},
    {"int1", 1},
    {"int2", 1},
    {"int3", 1},
    {"int4", 1},
    {"int5", 1},
    {"int6", 1},
    {"int7", 1},
}};

}  // namespace

bool IsKnownDType(uint8_t code) { return code >= 1 && code <= kMaxDTypeCode; }

size_t DTypeSize(DType dtype) {
  auto code = static_cast<uint8_t>(dtype);
  return IsKnownDType(code) ? kDTypes[code].size : 0;
}

std::string_view DTypeName(DType dtype) {
  auto code = static_cast<uint8_t>(dtype);
  return IsKnownDType(code) ? kDTypes[code].name : std::string_view();
}

std::optional<DType> DTypeFromName(std::string_view name) {
  for (uint8_t c = 1; c <= kMaxDTypeCode; ++c) {
    if (kDTypes[c].name == name) return static_cast<DType>(c);
  }
  return std::nullopt;
}

std::string EscapePathSegment(std::string_view segment) {
  std::string out;
  out.reserve(segment.size());
  for (char c : segment) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

std::string JoinPath(const std::vector<std::string>& raw_segments) {
  std::string out;
  for (size_t i = 0; i < raw_segments.size(); ++i) {
    if (i) out += '/';
    out += EscapePathSegment(raw_segments[i]);
  }
  return out;
}

Result<std::vector<std::string>> SplitPath(std::string_view path) {
  std::vector<std::string> out;
  if (path.empty()) return out;
  std::string cur;
  for (size_t i = 0; i < path.size(); ++i) {
    char c = path[i];
    if (c == '/') {
      out.push_back(std::move(cur));
      cur.clear();
    } else if (c == '~') {
      if (i + 1 < path.size() && (path[i + 1] == '0' || path[i + 1] == '1')) {
        cur += path[i + 1] == '0' ? '~' : '/';
        ++i;
      } else {
        return InvalidArgument("path '" + std::string(path) +
                               "': '~' at position " + std::to_string(i) +
                               " must be followed by 0 or 1");
      }
    } else {
      cur += c;
    }
  }
  out.push_back(std::move(cur));
  return out;
}

bool IsValidDevice(std::string_view d) {
  if (d.empty() || d.size() > 64) return false;
  auto is_head = [](char c) {
    return std::isalpha(static_cast<unsigned char>(c)) || c == '_';
  };
  auto is_body = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
  };
  if (!is_head(d[0])) return false;
  size_t i = 1;
  while (i < d.size() && is_body(d[i])) ++i;
  if (i == d.size()) return true;
  if (d[i] != ':' || i + 1 == d.size()) return false;
  for (++i; i < d.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(d[i]))) return false;
  }
  return true;
}

std::optional<uint64_t> AlignUp(uint64_t a, uint64_t align) {
  uint64_t mask = align - 1;
  if (a > UINT64_MAX - mask) return std::nullopt;
  return (a + mask) & ~mask;
}

}  // namespace ckpt
