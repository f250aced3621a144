// The library's one JSON reader and string writer. The reader is strict
// and bounded, for the headers of files that come from elsewhere
// (safetensors headers, save_pretrained indexes): RFC 8259 only, so that
// what it accepts is what serde_json (safetensors' parser) and Python's
// json module accept alike.
//
// Why not a library: the one JSON parser among the project's dependencies
// (flatbuffers::Parser::ParseFlexBuffer) is lenient where a reader of
// hostile headers must not be: an integer past 2^63 silently becomes 0,
// trailing bytes are ignored, unquoted keys and trailing commas pass.
// This reader refuses each of those, caps nesting depth, validates UTF-8
// and rejects duplicate object keys (docs/DEPENDENCIES.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ckpt/status.h"

namespace ckpt::internal {

struct JsonMember;

struct JsonValue {
  enum class Kind : uint8_t { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  /// kString: the decoded UTF-8 text; kNumber: the number as written.
  std::string text;
  std::vector<JsonValue> items;     ///< kArray
  std::vector<JsonMember> members;  ///< kObject, in the order written
  /// Byte offset of the value in the parsed text (for error messages).
  uint64_t offset = 0;

  bool is_object() const { return kind == Kind::kObject; }
  bool is_array() const { return kind == Kind::kArray; }
  bool is_string() const { return kind == Kind::kString; }
  /// The member named `key` of an object, or nullptr.
  const JsonValue* Find(std::string_view key) const;
  /// A number written as a non-negative integer (no sign, fraction or
  /// exponent) that fits 64 bits; nullopt otherwise.
  std::optional<uint64_t> AsUint64() const;
};

struct JsonMember {
  std::string key;
  JsonValue value;
};

/// Parses `text` as one JSON value with surrounding whitespace. kCorrupt
/// naming what is wrong and its byte offset (relative to `text`): bad
/// syntax, invalid UTF-8 or a lone surrogate, a duplicate key, nesting
/// deeper than `max_depth`, more than `max_values` values in all (each
/// takes ~100 bytes parsed: the default bounds memory near 400 MiB, some
/// 400k tensors of a safetensors header), or anything after the value.
Result<JsonValue> ParseJson(std::string_view text, int max_depth = 64,
                            uint64_t max_values = uint64_t{4} << 20);

/// Appends `s` as a JSON string literal (UTF-8 passed through, control
/// characters escaped; invalid UTF-8 bytes become U+FFFD).
void AppendJsonString(std::string& out, std::string_view s);

}  // namespace ckpt::internal
