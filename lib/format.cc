#include "ckpt/format.h"

#include <array>
#include <cctype>
#include <cstring>

#include "format_internal.h"

namespace ckpt {

std::string_view VersionString() { return "0.2.0"; }

namespace {

struct DTypeEntry {
  std::string_view name;
  size_t size;
  uint16_t since_minor = 0;  // the format minor that added the code
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
    {"uint1", 1, 1},
    {"uint2", 1, 1},
    {"uint3", 1, 1},
    {"uint4", 1, 1},
    {"uint5", 1, 1},
    {"uint6", 1, 1},
    {"uint7", 1, 1},
    {"int1", 1, 1},
    {"int2", 1, 1},
    {"int3", 1, 1},
    {"int4", 1, 1},
    {"int5", 1, 1},
    {"int6", 1, 1},
    {"int7", 1, 1},
}};

constexpr bool DTypeTableComplete() {
  for (size_t c = 1; c < kDTypes.size(); ++c) {
    if (kDTypes[c].name.empty() || kDTypes[c].size == 0 ||
        kDTypes[c].since_minor > kFormatMinor) {
      return false;
    }
  }
  return true;
}
static_assert(DTypeTableComplete(),
              "every dtype code 1..kMaxDTypeCode needs a row (name, size, "
              "minor <= kFormatMinor)");

}  // namespace

bool IsKnownDType(uint8_t code) { return code >= 1 && code <= kMaxDTypeCode; }

uint16_t DTypeSinceMinor(DType dtype) {
  auto code = static_cast<uint8_t>(dtype);
  return IsKnownDType(code) ? kDTypes[code].since_minor : 0;
}

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
  PathBuilder b;
  for (const auto& seg : raw_segments) b.Push(seg);
  return b.path();
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

bool IsValidDevice(std::string_view d) { return !internal::DeviceProblem(d); }

std::optional<uint64_t> AlignUp(uint64_t a, uint64_t align) {
  uint64_t mask = align - 1;
  if (a > UINT64_MAX - mask) return std::nullopt;
  return (a + mask) & ~mask;
}

namespace internal {

std::optional<size_t> Utf8Problem(std::string_view s) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    // ASCII eight bytes at a time: names and keys are mostly ASCII, and a
    // header of 10,000 tensors checks ~1 MB of them at every open.
    while (n - i >= 8) {
      uint64_t w;
      std::memcpy(&w, b + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    unsigned c = b[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // Lead byte: length and the range the second byte must lie in, which
    // excludes overlong forms (E0 80..9F, F0 80..8F), surrogates (ED A0..BF)
    // and code points past U+10FFFF (F4 90..BF, F5..FF).
    size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;  // 80..C1 (continuation or overlong lead), F5..FF
    }
    if (n - i < len) return i;
    if (b[i + 1] < lo || b[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if ((b[i + k] & 0xC0) != 0x80) return i;
    }
    i += len;
  }
  return std::nullopt;
}

std::optional<std::string> DeviceProblem(std::string_view d) {
  if (d.empty()) return std::string("empty device string");
  if (d.size() > 64) {
    return "device string of " + std::to_string(d.size()) +
           " characters (at most 64)";
  }
  auto is_head = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  };
  auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  const std::string quoted = "device '" + std::string(d) + "'";
  if (!is_head(d[0])) return quoted + " must start with a letter or '_'";
  size_t i = 1;
  while (i < d.size() && (is_head(d[i]) || is_digit(d[i]))) ++i;
  if (i == d.size()) return std::nullopt;
  if (d[i] != ':') {
    return quoted + ": type may hold only letters, digits and '_'";
  }
  std::string_view index = d.substr(i + 1);
  if (index.empty()) return quoted + ": no index after ':'";
  for (char c : index) {
    if (!is_digit(c)) return quoted + ": index is not a decimal number";
  }
  if (index.size() > 1 && index[0] == '0') {
    return quoted + ": index has a leading zero";
  }
  if (index.size() > 10 ||
      (index.size() == 10 && index > std::string_view("2147483647"))) {
    return quoted + ": index is above 2^31 - 1";
  }
  return std::nullopt;
}

}  // namespace internal
namespace internal {

std::optional<std::string> ViewProblem(uint8_t dtype_code,
                                       std::span<const int64_t> shape,
                                       std::span<const int64_t> strides,
                                       int64_t storage_offset,
                                       uint64_t storage_nbytes) {
  if (!IsKnownDType(dtype_code)) {
    return "unknown dtype code " + std::to_string(dtype_code);
  }
  const size_t rank = shape.size();
  if (rank > kMaxRank) return "rank " + std::to_string(rank) + " > 64";
  if (strides.size() != rank) {
    return "shape has " + std::to_string(rank) + " dims but strides " +
           std::to_string(strides.size());
  }
  if (storage_offset < 0) return std::string("negative storage offset");
  const uint64_t elsize = DTypeSize(static_cast<DType>(dtype_code));
  // The element count: 0 when any size is 0 (whatever the others are),
  // else the product of the sizes, which must fit 64 bits - the same
  // answer in any order of multiplication (FORMAT.md 8.2).
  uint64_t numel = 1;
  bool empty = false;
  for (size_t d = 0; d < rank; ++d) {
    if (shape[d] < 0) return "negative size in dim " + std::to_string(d);
    if (strides[d] < 0) return "negative stride in dim " + std::to_string(d);
    empty = empty || shape[d] == 0;
  }
  for (size_t d = 0; d < rank && !empty; ++d) {
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(shape[d]),
                               &numel)) {
      return std::string("element count overflows 64 bits");
    }
  }
  if (empty) numel = 0;
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(numel, elsize, &bytes) || bytes > INT64_MAX) {
    return std::string("byte size overflows 63 bits");
  }
  uint64_t last = static_cast<uint64_t>(storage_offset), need = 0;
  if (numel > 0) {
    for (size_t d = 0; d < rank; ++d) {
      uint64_t span = 0;
      if (__builtin_mul_overflow(static_cast<uint64_t>(shape[d] - 1),
                                 static_cast<uint64_t>(strides[d]), &span) ||
          __builtin_add_overflow(last, span, &last)) {
        return std::string("extent overflows 64 bits");
      }
    }
    if (__builtin_add_overflow(last, uint64_t{1}, &last)) {
      return std::string("extent overflows 64 bits");
    }
  }
  if (__builtin_mul_overflow(last, elsize, &need)) {
    return std::string("extent overflows 64 bits");
  }
  if (need > storage_nbytes) {
    return "view needs " + std::to_string(need) + " bytes of its storage, " +
           "which has " + std::to_string(storage_nbytes);
  }
  return std::nullopt;
}

}  // namespace internal

}  // namespace ckpt
