#include <algorithm>
#include <cstdio>
#include <unordered_set>

#include "format_internal.h"
#include "json_internal.h"

namespace ckpt::internal {
namespace {

class JsonParser {
 public:
  JsonParser(std::string_view s, int max_depth, uint64_t max_values)
      : s_(s), max_depth_(max_depth), max_values_(max_values) {}

  Result<JsonValue> Document() {
    JsonValue v;
    CKPT_RETURN_IF_ERROR(Value(v, 0));
    SkipSpace();
    if (i_ != s_.size()) return Error("unexpected bytes after the value");
    return v;
  }

 private:
  Status Error(const std::string& what) const {
    return Corrupt("JSON: " + what + " at byte " + std::to_string(i_));
  }
  void SkipSpace() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' ||
                              s_[i_] == '\n' || s_[i_] == '\r')) {
      ++i_;
    }
  }
  bool Literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) return false;
    i_ += word.size();
    return true;
  }

  Status Value(JsonValue& v, int depth) {
    // Each value costs ~100 bytes parsed: a bound on values is a bound on
    // memory, whatever the text (a 100 MB array of 0s is 50 M values).
    if (++values_ > max_values_) {
      return Error("more than " + std::to_string(max_values_) + " values");
    }
    SkipSpace();
    if (i_ >= s_.size()) return Error("unexpected end of text");
    v.offset = i_;
    const char c = s_[i_];
    if (c == '{' || c == '[') {
      if (depth >= max_depth_) {
        return Error("nesting deeper than " + std::to_string(max_depth_));
      }
      return c == '{' ? Object(v, depth + 1) : Array(v, depth + 1);
    }
    if (c == '"') {
      v.kind = JsonValue::Kind::kString;
      return String(v.text);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return Number(v);
    if (Literal("true")) {
      v.kind = JsonValue::Kind::kBool;
      v.boolean = true;
      return Status::OK();
    }
    if (Literal("false")) {
      v.kind = JsonValue::Kind::kBool;
      return Status::OK();
    }
    if (Literal("null")) return Status::OK();
    return Error("expected a value");
  }

  Status Object(JsonValue& v, int depth) {
    v.kind = JsonValue::Kind::kObject;
    ++i_;  // '{'
    SkipSpace();
    if (i_ < s_.size() && s_[i_] == '}') return ++i_, Status::OK();
    std::unordered_set<std::string_view> seen;
    for (;;) {
      SkipSpace();
      if (i_ >= s_.size() || s_[i_] != '"') return Error("expected a key");
      std::string key;
      CKPT_RETURN_IF_ERROR(String(key));
      SkipSpace();
      if (i_ >= s_.size() || s_[i_] != ':') return Error("expected ':'");
      ++i_;
      JsonValue member;
      CKPT_RETURN_IF_ERROR(Value(member, depth));
      v.members.push_back({std::move(key), std::move(member)});
      SkipSpace();
      if (i_ < s_.size() && s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (i_ < s_.size() && s_[i_] == '}') {
        ++i_;
        break;
      }
      return Error("expected ',' or '}'");
    }
    // Duplicates: the keys are stable now that the vector is complete.
    for (const auto& [k, m] : v.members) {
      if (!seen.insert(k).second) {
        return Corrupt("JSON: duplicate key \"" + k + "\" at byte " +
                       std::to_string(m.offset));
      }
    }
    return Status::OK();
  }

  Status Array(JsonValue& v, int depth) {
    v.kind = JsonValue::Kind::kArray;
    ++i_;  // '['
    SkipSpace();
    if (i_ < s_.size() && s_[i_] == ']') return ++i_, Status::OK();
    for (;;) {
      JsonValue item;
      CKPT_RETURN_IF_ERROR(Value(item, depth));
      v.items.push_back(std::move(item));
      SkipSpace();
      if (i_ < s_.size() && s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (i_ < s_.size() && s_[i_] == ']') return ++i_, Status::OK();
      return Error("expected ',' or ']'");
    }
  }

  bool Digits() {
    const size_t start = i_;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
    return i_ > start;
  }

  Status Number(JsonValue& v) {
    v.kind = JsonValue::Kind::kNumber;
    const size_t start = i_;
    if (s_[i_] == '-') ++i_;
    if (i_ < s_.size() && s_[i_] == '0') {
      ++i_;
    } else if (!Digits()) {
      return Error("bad number");
    }
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      if (!Digits()) return Error("bad number");
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (!Digits()) return Error("bad number");
    }
    v.text.assign(s_.substr(start, i_ - start));
    return Status::OK();
  }

  static int Hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  bool Hex4(uint32_t* out) {
    if (s_.size() - i_ < 4) return false;
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      int h = Hex(s_[i_ + static_cast<size_t>(k)]);
      if (h < 0) return false;
      v = v * 16 + static_cast<uint32_t>(h);
    }
    i_ += 4;
    *out = v;
    return true;
  }
  static void AppendUtf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  Status String(std::string& out) {
    ++i_;  // opening quote
    const size_t start = i_;
    for (;;) {
      // A run of plain characters at once.
      const size_t run = i_;
      while (i_ < s_.size() && s_[i_] != '"' && s_[i_] != '\\' &&
             static_cast<unsigned char>(s_[i_]) >= 0x20) {
        ++i_;
      }
      out.append(s_.substr(run, i_ - run));
      if (i_ >= s_.size()) return Error("unterminated string");
      const char c = s_[i_];
      if (c == '"') {
        ++i_;
        break;
      }
      if (c != '\\') return Error("control character in a string");
      ++i_;
      if (i_ >= s_.size()) return Error("unterminated string");
      const char e = s_[i_++];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          uint32_t cp = 0;
          if (!Hex4(&cp)) return Error("bad \\u escape");
          if (cp >= 0xDC00 && cp <= 0xDFFF) return Error("lone low surrogate");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            uint32_t lo = 0;
            if (s_.substr(i_, 2) != "\\u") return Error("lone high surrogate");
            i_ += 2;
            if (!Hex4(&lo) || lo < 0xDC00 || lo > 0xDFFF) {
              return Error("lone high surrogate");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          AppendUtf8(out, cp);
          break;
        }
        default:
          --i_;
          return Error("bad escape");
      }
    }
    if (auto bad = Utf8Problem(s_.substr(start, i_ - 1 - start))) {
      return Corrupt("JSON: invalid UTF-8 at byte " +
                     std::to_string(start + *bad));
    }
    return Status::OK();
  }

  std::string_view s_;
  int max_depth_;
  uint64_t max_values_;
  uint64_t values_ = 0;
  size_t i_ = 0;
};

}  // namespace

const JsonValue* JsonValue::Find(std::string_view key) const {
  for (const auto& [k, v] : members) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::optional<uint64_t> JsonValue::AsUint64() const {
  if (kind != Kind::kNumber || text.empty() || text.size() > 20) {
    return std::nullopt;
  }
  uint64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return std::nullopt;
    v = v * 10 + d;
  }
  return v;
}

Result<JsonValue> ParseJson(std::string_view text, int max_depth,
                            uint64_t max_values) {
  return JsonParser(text, max_depth, max_values).Document();
}

namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 if invalid.
size_t Utf8Len(std::string_view s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80         ? 1
             : (c >> 5) == 6  ? 2
             : (c >> 4) == 14 ? 3
             : (c >> 3) == 30 ? 4
                              : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  }
  return n;
}

}  // namespace

void AppendJsonString(std::string& out, std::string_view s) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
      ++i;
    } else if (c < 0x20) {
      char buf[8];
      switch (c) {
        case '\n':
          out += "\\n";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\r':
          out += "\\r";
          break;
        default:
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
      }
      ++i;
    } else {
      size_t n = Utf8Len(s, i);
      if (n == 0) {
        out += "\\ufffd";
        ++i;
      } else {
        out.append(s.substr(i, n));
        i += n;
      }
    }
  }
  out += '"';
}

}  // namespace ckpt::internal
