#include "json.h"

#include <charconv>
#include <cmath>
#include <cstdio>

namespace ckpt::tool {

void AppendJsonDouble(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
  } else if (std::isinf(v)) {
    out += v > 0 ? "Infinity" : "-Infinity";
  } else {
    // Shortest form that round-trips ("0.1", not "0.10000000000000001");
    // keep a float looking like a float ("1.0", not "1").
    char buf[32];
    auto r = std::to_chars(buf, buf + sizeof buf, v);
    std::string s(buf, r.ptr);
    if (s.find_first_of(".eE") == std::string::npos) s += ".0";
    out += s;
  }
}

namespace {

void AppendShape(std::string& out, const std::vector<int64_t>& v) {
  out += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(v[i]);
  }
  out += ']';
}

}  // namespace

void AppendValueJson(std::string& out, const Value& v) {
  AppendValueJson(out, v, "", true, {});
}

void AppendValueJson(std::string& out, const Value& v, const std::string& path,
                     bool at_root, const ValueJsonHook& hook) {
  if (hook && hook(out, v, path)) return;
  switch (v.kind()) {
    case ValueKind::kNone:
      out += "null";
      return;
    case ValueKind::kBool:
      out += v.as_bool() ? "true" : "false";
      return;
    case ValueKind::kInt:
    case ValueKind::kBigInt:
      out += v.BigIntToDecimal();
      return;
    case ValueKind::kFloat:
      AppendJsonDouble(out, v.as_float());
      return;
    case ValueKind::kComplex:
      out += "{\"$complex\": [";
      AppendJsonDouble(out, v.as_complex().real());
      out += ", ";
      AppendJsonDouble(out, v.as_complex().imag());
      out += "]}";
      return;
    case ValueKind::kString:
    case ValueKind::kDevice:
      AppendJsonString(out, v.as_string());
      return;
    case ValueKind::kDType:
      AppendJsonString(out, DTypeName(v.as_dtype()));
      return;
    case ValueKind::kBytes: {
      static const char* hex = "0123456789abcdef";
      out += "{\"$bytes\": \"";
      for (uint8_t b : v.as_bytes()) {
        out += hex[b >> 4];
        out += hex[b & 15];
      }
      out += "\"}";
      return;
    }
    case ValueKind::kTensor: {
      auto info = v.tensor_info();
      out += "{\"$tensor\": ";
      if (!info.ok()) {
        out += "null}";
        return;
      }
      AppendJsonString(out, info->path);
      out += ", \"dtype\": ";
      AppendJsonString(out, DTypeName(info->dtype));
      out += ", \"shape\": ";
      AppendShape(out, info->shape);
      out += '}';
      return;
    }
    case ValueKind::kDict:
      out += '{';
      for (size_t i = 0; i < v.size(); ++i) {
        if (i) out += ", ";
        const std::string seg = v.key(i).KeySegment();
        AppendJsonString(out, seg);
        out += ": ";
        AppendValueJson(out, v.item(i),
                        hook ? PathBuilder::Child(path, at_root, seg) : "",
                        false, hook);
      }
      out += '}';
      return;
    case ValueKind::kList:
    case ValueKind::kTuple:
    case ValueKind::kSet:
    case ValueKind::kFrozenSet:
      out += '[';
      for (size_t i = 0; i < v.size(); ++i) {
        if (i) out += ", ";
        AppendValueJson(
            out, v.item(i),
            hook ? PathBuilder::Child(path, at_root, std::to_string(i)) : "",
            false, hook);
      }
      out += ']';
      return;
  }
  out += "null";
}

}  // namespace ckpt::tool
