// Object-tree helpers shared by the reader and the writer: the path form of
// dict keys (docs/FORMAT.md 7.3), key equality (7.1, R14), the canonical
// order of set items (section 10) and big-integer formatting.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ckpt/format.h"

namespace ckpt::internal {

/// What KeySegmentOf, KeyClasses and CompareHashable need to know of one
/// node.
struct KeyNode {
  ValueKind kind = ValueKind::kNone;
  int64_t int_value = 0;
  double float_value = 0;
  double imag_value = 0;
  std::string_view str;
  std::span<const uint8_t> bytes;
  size_t num_items = 0;
};

/// Why a node's value breaks its kind's rule (FORMAT.md R14, R19): a bool
/// other than 0/1, a BigInt of 0 or more than kMaxBigIntBytes bytes, a
/// string that is not UTF-8, an unknown dtype code, a device outside the
/// grammar; nullopt when it keeps them. The one copy of these rules: the
/// reader's tree check and KeySegment's key check both call it.
std::optional<std::string> ValueProblem(const KeyNode& n);

/// The KeyNode view of a node's value (`num_items`: its item count).
KeyNode ViewOf(const NodeValue& v, size_t num_items);

/// How Float (and Complex) keys are written in paths. Format 1.0 used
/// C++'s std::to_chars (`1` for 1.0); 1.1 uses Python's repr() (`1.0`),
/// since keys come from Python dicts. A reader uses the form of the file's
/// minor version.
enum class FloatKeyForm { kCxxToChars1_0, kPythonRepr };
inline FloatKeyForm FloatKeyFormFor(uint16_t format_minor) {
  return format_minor == 0 ? FloatKeyForm::kCxxToChars1_0
                           : FloatKeyForm::kPythonRepr;
}

/// Path segment (unescaped) of the node `id` used as a dict key. `get`
/// describes a node; `item(id, i)` is the i-th element of a tuple node.
std::string KeySegmentOf(uint32_t id,
                         const std::function<KeyNode(uint32_t)>& get,
                         const std::function<uint32_t(uint32_t, size_t)>& item,
                         FloatKeyForm form = FloatKeyForm::kPythonRepr);

/// Negates a little-endian two's complement integer in place (x -> ~x + 1).
void NegateTwosComplement(std::span<uint8_t> le);

/// Decimal form of a little-endian two's complement integer.
std::string BigIntDecimal(std::span<const uint8_t> le);

/// Length of the shortest prefix of a little-endian two's complement
/// integer that has the same value (at least 1; 0 for an empty span).
size_t MinimalTwosComplementSize(std::span<const uint8_t> le);

/// A double as Python's repr() writes it (docs/FORMAT.md 7.3): shortest
/// round-trip digits, fixed form for decimal exponents -4..15, else
/// `d.ddde+XX`; "nan" (any sign), "inf", "-inf".
std::string FormatDouble(double v,
                         FloatKeyForm form = FloatKeyForm::kPythonRepr);

/// Equality classes of hashable values, with Python's equality (7.1):
/// two nodes get the same class exactly when Python would find the values
/// they load as equal (1 == 1.0 == True == 1+0j; -0.0 == 0.0; a NaN equals
/// nothing; frozensets compare as sets). Feed nodes children first.
class KeyClasses {
 public:
  static constexpr uint32_t kUnhashable = UINT32_MAX;
  /// The class of `n`. `items` are the classes of its elements (Tuple,
  /// FrozenSet; empty otherwise). kUnhashable for List, Dict, Set, Tensor
  /// and for a Tuple or FrozenSet holding one. A FrozenSet whose items are
  /// not pairwise distinct is a caller error (check them first).
  uint32_t Classify(const KeyNode& n, std::span<const uint32_t> items);

 private:
  uint32_t Intern(std::string canon);
  uint32_t Fresh() { return next_++; }
  std::unordered_map<std::string, uint32_t> classes_;
  uint32_t next_ = 0;
};

/// Indices (earlier, later) of the first pair of equal items among `n`
/// (the smallest `later` that repeats an earlier item), or nullopt.
/// `hash(i)` must agree with `equal(i, j)`. An open-addressing table of
/// indices: no allocation per item, so a million keys cost milliseconds.
std::optional<std::pair<size_t, size_t>> FirstRepeat(
    size_t n, const std::function<uint64_t(size_t)>& hash,
    const std::function<bool(size_t, size_t)>& equal);

/// Indices (earlier, later) of the first pair of equal classes, or nullopt.
/// An unhashable class is an error the caller checks first.
std::optional<std::pair<size_t, size_t>> FirstDuplicate(
    std::span<const uint32_t> classes);

/// The canonical order of hashable values (docs/FORMAT.md 10): by kind
/// code, then by value (numbers numerically, floats in IEEE-754 total
/// order, strings and bytes byte-wise, tuples and frozensets element-wise).
/// Values that compare equal here are identical in content. Returns <0, 0,
/// >0.
int CompareHashable(uint32_t a, uint32_t b,
                    const std::function<KeyNode(uint32_t)>& get,
                    const std::function<uint32_t(uint32_t, size_t)>& item);

}  // namespace ckpt::internal
