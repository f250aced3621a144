#include <charconv>
#include <cmath>
#include <vector>

#include "tree_internal.h"

namespace ckpt::internal {

bool IsKeyKind(ValueKind kind) {
  switch (kind) {
    case ValueKind::kList:
    case ValueKind::kDict:
    case ValueKind::kSet:
    case ValueKind::kTensor:
      return false;
    default:
      return true;
  }
}

std::string FormatDouble(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

void NegateTwosComplement(std::span<uint8_t> le) {
  unsigned carry = 1;
  for (auto& b : le) {
    unsigned v = static_cast<uint8_t>(~b) + carry;
    b = static_cast<uint8_t>(v);
    carry = v >> 8;
  }
}

std::string BigIntDecimal(std::span<const uint8_t> le) {
  if (le.empty()) return "0";
  bool negative = (le.back() & 0x80) != 0;
  // Magnitude as little-endian bytes (two's complement negate if needed).
  std::vector<uint8_t> mag(le.begin(), le.end());
  if (negative) NegateTwosComplement(mag);
  // Repeated division by 10 of the big-endian view.
  std::string digits;
  size_t top = mag.size();
  while (top > 0 && mag[top - 1] == 0) --top;
  while (top > 0) {
    unsigned rem = 0;
    for (size_t i = top; i-- > 0;) {
      unsigned cur = (rem << 8) | mag[i];
      mag[i] = static_cast<uint8_t>(cur / 10);
      rem = cur % 10;
    }
    digits += static_cast<char>('0' + rem);
    while (top > 0 && mag[top - 1] == 0) --top;
  }
  if (digits.empty()) digits.push_back('0');
  if (negative) digits += '-';
  return std::string(digits.rbegin(), digits.rend());
}

std::string KeySegmentOf(
    uint32_t id, const std::function<KeyNode(uint32_t)>& get,
    const std::function<uint32_t(uint32_t, size_t)>& item) {
  KeyNode n = get(id);
  switch (n.kind) {
    case ValueKind::kNone: return "None";
    case ValueKind::kBool: return n.int_value ? "True" : "False";
    case ValueKind::kInt: return std::to_string(n.int_value);
    case ValueKind::kBigInt: return BigIntDecimal(n.bytes);
    case ValueKind::kFloat: return FormatDouble(n.float_value);
    case ValueKind::kComplex:
      return "complex(" + FormatDouble(n.float_value) + "," +
             FormatDouble(n.imag_value) + ")";
    case ValueKind::kString:
    case ValueKind::kDevice:
      return std::string(n.str);
    case ValueKind::kBytes: {
      static const char* hex = "0123456789abcdef";
      std::string out = "0x";
      for (uint8_t b : n.bytes) {
        out += hex[b >> 4];
        out += hex[b & 15];
      }
      return out;
    }
    case ValueKind::kDType:
      return std::string(DTypeName(static_cast<DType>(n.int_value)));
    case ValueKind::kTuple:
    case ValueKind::kFrozenSet: {
      std::string out = "(";
      for (size_t i = 0; i < n.num_items; ++i) {
        if (i) out += ",";
        out += KeySegmentOf(item(id, i), get, item);
      }
      if (n.num_items == 1) out += ",";
      return out + ")";
    }
    default:
      return "?";
  }
}

}  // namespace ckpt::internal
