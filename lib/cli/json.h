// JSON output for the ckpt tool: string escaping and the object tree.
#pragma once

#include <ckpt/reader.h>

#include <functional>
#include <string>
#include <string_view>

#include "json_internal.h"

namespace ckpt::tool {

/// (The one JSON string writer, shared with the library's HF export.)
using ::ckpt::internal::AppendJsonString;

/// Appends a double as JSON; NaN and infinities are written as NaN,
/// Infinity, -Infinity, as Python's json module does.
void AppendJsonDouble(std::string& out, double v);

/// Appends a node of the object tree (docs/CLI.md, "JSON forms"): scalars as
/// JSON scalars, lists/tuples/sets as arrays, dicts as objects keyed by
/// their path form, tensors as {"$tensor": path, "dtype", "shape"}, bytes as
/// {"$bytes": hex}, complex as {"$complex": [re, im]}, big ints as bare
/// integers.
void AppendValueJson(std::string& out, const Value& v);

/// Writes node `v`, at tree path `path`, its own way and returns true, or
/// returns false to leave it to AppendValueJson: how a caller shows some
/// nodes differently (a sharded checkpoint's placeholders as the tensors
/// they stand for).
using ValueJsonHook = std::function<bool(std::string& out, const Value& v,
                                         const std::string& path)>;

/// AppendValueJson of `v` at `path` (`at_root`: `v` is the tree's root,
/// whose children's paths have no leading '/'), asking `hook` first at
/// every node.
void AppendValueJson(std::string& out, const Value& v, const std::string& path,
                     bool at_root, const ValueJsonHook& hook);

}  // namespace ckpt::tool
