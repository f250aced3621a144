// JSON output for the ckpt tool: string escaping and the object tree.
#pragma once

#include <ckpt/reader.h>

#include <string>
#include <string_view>

namespace ckpt::tool {

/// Appends `s` as a JSON string literal (UTF-8 passed through, control
/// characters escaped; invalid UTF-8 bytes become U+FFFD).
void AppendJsonString(std::string& out, std::string_view s);

/// Appends a double as JSON; NaN and infinities are written as NaN,
/// Infinity, -Infinity, as Python's json module does.
void AppendJsonDouble(std::string& out, double v);

/// Appends a node of the object tree (docs/CLI.md, "JSON forms"): scalars as
/// JSON scalars, lists/tuples/sets as arrays, dicts as objects keyed by
/// their path form, tensors as {"$tensor": path, "dtype", "shape"}, bytes as
/// {"$bytes": hex}, complex as {"$complex": [re, im]}, big ints as bare
/// integers.
void AppendValueJson(std::string& out, const Value& v);

}  // namespace ckpt::tool
