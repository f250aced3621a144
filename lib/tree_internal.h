// Object-tree helpers shared by the reader and the writer: the path form of
// dict keys (docs/FORMAT.md 7.3) and big-integer formatting.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "ckpt/reader.h"

namespace ckpt::internal {

/// What KeySegmentOf needs to know of one node.
struct KeyNode {
  ValueKind kind = ValueKind::kNone;
  int64_t int_value = 0;
  double float_value = 0;
  double imag_value = 0;
  std::string_view str;
  std::span<const uint8_t> bytes;
  size_t num_items = 0;
};

/// True for the kinds a dict key may have: scalars and tuples.
bool IsKeyKind(ValueKind kind);

/// Path segment (unescaped) of the node `id` used as a dict key. `get`
/// describes a node; `item(id, i)` is the i-th element of a tuple node.
std::string KeySegmentOf(uint32_t id,
                         const std::function<KeyNode(uint32_t)>& get,
                         const std::function<uint32_t(uint32_t, size_t)>& item);

/// Negates a little-endian two's complement integer in place (x -> ~x + 1).
void NegateTwosComplement(std::span<uint8_t> le);

/// Decimal form of a little-endian two's complement integer.
std::string BigIntDecimal(std::span<const uint8_t> le);

/// Shortest decimal that round-trips (std::to_chars); "nan", "inf", "-inf".
std::string FormatDouble(double v);

}  // namespace ckpt::internal
