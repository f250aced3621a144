#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <vector>

#include "format_internal.h"
#include "tree_internal.h"

namespace ckpt::internal {

namespace {

// Python's float_repr_style 'short' (Python/pystrtod.c, format code 'r'):
// the digits are the shortest that round-trip, which std::to_chars's
// scientific form also gives (both pick the candidate nearest the exact
// value); what differs from plain to_chars is the layout, done here.
std::string PythonRepr(double v) {
  char buf[64];
  auto r =
      std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string_view s(buf, static_cast<size_t>(r.ptr - buf));
  std::string out;
  if (s.front() == '-') {
    out += '-';
    s.remove_prefix(1);
  }
  const size_t e = s.find('e');
  std::string digits(1, s[0]);
  if (e > 2) digits.append(s.substr(2, e - 2));  // "d.ddd": skip the point
  std::string_view es = s.substr(e + 1);
  const bool eneg = es.front() == '-';
  int exp = 0;
  std::from_chars(es.data() + 1, es.data() + es.size(), exp);
  if (eneg) exp = -exp;
  const int ndigits = static_cast<int>(digits.size());
  if (exp < -4 || exp >= 16) {
    out += digits[0];
    if (ndigits > 1) {
      out += '.';
      out.append(digits, 1);
    }
    out += eneg ? "e-" : "e+";
    const int a = exp < 0 ? -exp : exp;
    if (a < 10) out += '0';
    out += std::to_string(a);
  } else if (exp >= 0) {
    const int int_digits = exp + 1;
    if (ndigits <= int_digits) {
      out += digits;
      out.append(static_cast<size_t>(int_digits - ndigits), '0');
      out += ".0";
    } else {
      out.append(digits, 0, static_cast<size_t>(int_digits));
      out += '.';
      out.append(digits, static_cast<size_t>(int_digits));
    }
  } else {
    out += "0.";
    out.append(static_cast<size_t>(-exp - 1), '0');
    out += digits;
  }
  return out;
}

}  // namespace

std::string FormatDouble(double v, FloatKeyForm form) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (form == FloatKeyForm::kPythonRepr) return PythonRepr(v);
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

size_t MinimalTwosComplementSize(std::span<const uint8_t> le) {
  size_t n = le.size();
  // A top byte that only repeats the sign of the byte below it is redundant.
  while (n > 1) {
    uint8_t top = le[n - 1], below = le[n - 2];
    if ((top == 0x00 && (below & 0x80) == 0) ||
        (top == 0xff && (below & 0x80) != 0)) {
      --n;
    } else {
      break;
    }
  }
  return n;
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

KeyNode ViewOf(const NodeValue& v, size_t num_items) {
  KeyNode n;
  n.kind = v.kind;
  n.int_value = v.int_value;
  n.float_value = v.float_value;
  n.imag_value = v.imag_value;
  n.str = v.text;
  n.bytes = v.bytes;
  n.num_items = num_items;
  return n;
}

std::string KeySegmentOf(uint32_t id,
                         const std::function<KeyNode(uint32_t)>& get,
                         const std::function<uint32_t(uint32_t, size_t)>& item,
                         FloatKeyForm form) {
  KeyNode n = get(id);
  switch (n.kind) {
    case ValueKind::kNone:
      return "None";
    case ValueKind::kBool:
      return n.int_value ? "True" : "False";
    case ValueKind::kInt:
      return std::to_string(n.int_value);
    case ValueKind::kBigInt:
      return BigIntDecimal(n.bytes);
    case ValueKind::kFloat:
      return FormatDouble(n.float_value, form);
    case ValueKind::kComplex:
      return "complex(" + FormatDouble(n.float_value, form) + "," +
             FormatDouble(n.imag_value, form) + ")";
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
        out += KeySegmentOf(item(id, i), get, item, form);
      }
      if (n.num_items == 1) out += ",";
      return out + ")";
    }
    // Not hashable: never a key (a reader or writer refused it first).
    // Listed, not defaulted, so that a new kind is a -Wswitch warning here.
    case ValueKind::kList:
    case ValueKind::kDict:
    case ValueKind::kSet:
    case ValueKind::kTensor:
      return "?";
  }
  return "?";  // a code past the table
}

// ---- key equality
// -------------------------------------------------------------

namespace {

void AppendU64(std::string& s, uint64_t v) {
  char b[8];
  std::memcpy(b, &v, 8);
  s.append(b, 8);
}

// "I" + the minimal two's complement bytes: one spelling per integer, so
// Bool, Int, BigInt and integral floats of one value share a class.
std::string IntCanon(std::span<const uint8_t> le) {
  std::string s = "I";
  size_t n = MinimalTwosComplementSize(le);
  s.append(reinterpret_cast<const char*>(le.data()), n);
  return s;
}

std::string IntCanon(int64_t v) {
  uint8_t b[8];
  for (int i = 0; i < 8; ++i) {
    b[i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
  }
  return IntCanon(std::span<const uint8_t>(b, 8));
}

// An integral, finite double as an exact little-endian two's complement
// integer (|v| may be up to 2^1024).
std::string IntegralDoubleCanon(double v) {
  if (std::fabs(v) < 9223372036854775808.0) {
    return IntCanon(static_cast<int64_t>(v));
  }
  int e = 0;
  double m = std::frexp(std::fabs(v), &e);  // |v| = m * 2^e, m in [0.5, 1)
  auto mant = static_cast<uint64_t>(std::ldexp(m, 53));  // exact: 53 bits
  const int shift = e - 53;                              // >= 11 here
  std::vector<uint8_t> mag(static_cast<size_t>(e / 8 + 2), 0);
  for (int bit = 0; bit < 53; ++bit) {
    if ((mant >> bit) & 1) {
      int pos = bit + shift;
      mag[static_cast<size_t>(pos / 8)] |=
          static_cast<uint8_t>(1u << (pos % 8));
    }
  }
  if (v < 0) NegateTwosComplement(mag);
  return IntCanon(mag);
}

uint64_t Bits(double v) { return std::bit_cast<uint64_t>(v); }

}  // namespace

uint32_t KeyClasses::Intern(std::string canon) {
  auto [it, inserted] = classes_.try_emplace(std::move(canon), next_);
  if (inserted) ++next_;
  return it->second;
}

uint32_t KeyClasses::Classify(const KeyNode& n,
                              std::span<const uint32_t> items) {
  auto real = [&](double v) -> uint32_t {
    if (std::isnan(v)) return Fresh();  // a NaN equals nothing, not itself
    if (std::isfinite(v) && v == std::trunc(v)) {
      return Intern(IntegralDoubleCanon(v));  // -0.0 == 0 == False
    }
    std::string s = "F";
    AppendU64(s, Bits(v));
    return Intern(std::move(s));
  };
  switch (n.kind) {
    case ValueKind::kNone:
      return Intern("N");
    case ValueKind::kBool:
    case ValueKind::kInt:
      return Intern(IntCanon(n.int_value));
    case ValueKind::kBigInt:
      if (n.bytes.empty()) return Fresh();
      return Intern(IntCanon(n.bytes));
    case ValueKind::kFloat:
      return real(n.float_value);
    case ValueKind::kComplex: {
      double re = n.float_value, im = n.imag_value;
      if (std::isnan(re) || std::isnan(im)) return Fresh();
      if (im == 0) return real(re);  // 1+0j == 1
      std::string s = "C";
      AppendU64(s, Bits(re == 0 ? 0.0 : re));  // -0.0 == 0.0
      AppendU64(s, Bits(im));
      return Intern(std::move(s));
    }
    case ValueKind::kString:
      return Intern("S" + std::string(n.str));
    case ValueKind::kBytes:
      return Intern("B" +
                    std::string(reinterpret_cast<const char*>(n.bytes.data()),
                                n.bytes.size()));
    case ValueKind::kDType: {
      std::string s = "D";
      AppendU64(s, static_cast<uint64_t>(n.int_value));
      return Intern(std::move(s));
    }
    case ValueKind::kDevice:
      return Intern("V" + std::string(n.str));
    case ValueKind::kTuple:
    case ValueKind::kFrozenSet: {
      std::vector<uint32_t> ids(items.begin(), items.end());
      for (uint32_t c : ids) {
        if (c == kUnhashable) return kUnhashable;
      }
      // A frozenset equals another with the same items in any order.
      if (n.kind == ValueKind::kFrozenSet) std::sort(ids.begin(), ids.end());
      std::string s = n.kind == ValueKind::kTuple ? "T" : "Z";
      s.reserve(1 + 4 * ids.size());
      for (uint32_t c : ids) {
        char b[4];
        std::memcpy(b, &c, 4);
        s.append(b, 4);
      }
      return Intern(std::move(s));
    }
    case ValueKind::kList:
    case ValueKind::kDict:
    case ValueKind::kSet:
    case ValueKind::kTensor:
      return kUnhashable;
  }
  return kUnhashable;  // a code past the table
}

std::optional<std::pair<size_t, size_t>> FirstRepeat(
    size_t n, const std::function<uint64_t(size_t)>& hash,
    const std::function<bool(size_t, size_t)>& equal) {
  if (n < 2) return std::nullopt;
  size_t cap = 4;
  while (cap < 2 * n) cap <<= 1;  // load factor <= 1/2
  // Each slot: 32 bits of the hash above the item's index (n < 2^32: items
  // of a header vector), so a probe compares items only when those agree.
  constexpr uint64_t kEmpty = UINT64_MAX;
  std::vector<uint64_t> table(cap, kEmpty);
  for (size_t i = 0; i < n; ++i) {
    // Mix the hash (the table size is a power of two).
    const uint64_t h = hash(i) * 0x9E3779B97F4A7C15ull;
    const uint64_t tag = h & 0xFFFFFFFF00000000ull;
    size_t slot = static_cast<size_t>(h >> 32) & (cap - 1);
    while (table[slot] != kEmpty) {
      const auto other = static_cast<size_t>(table[slot] & 0xFFFFFFFFu);
      if ((table[slot] & 0xFFFFFFFF00000000ull) == tag && equal(other, i)) {
        return std::pair{other, i};
      }
      slot = (slot + 1) & (cap - 1);
    }
    table[slot] = tag | i;
  }
  return std::nullopt;
}

std::optional<std::pair<size_t, size_t>> FirstDuplicate(
    std::span<const uint32_t> classes) {
  return FirstRepeat(
      classes.size(), [&](size_t i) { return uint64_t{classes[i]}; },
      [&](size_t a, size_t b) { return classes[a] == classes[b]; });
}

// ---- canonical order
// -------------------------------------------------------------

namespace {

// IEEE-754 totalOrder as an unsigned key: -NaN < -inf < ... < -0 < +0 < ...
// < +inf < +NaN.
uint64_t TotalOrderKey(double v) {
  uint64_t b = Bits(v);
  return (b >> 63) ? ~b : b | (uint64_t{1} << 63);
}

template <typename T>
int Cmp(const T& a, const T& b) {
  return a < b ? -1 : (b < a ? 1 : 0);
}

int CompareBytes(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  size_t n = std::min(a.size(), b.size());
  int c = n ? std::memcmp(a.data(), b.data(), n) : 0;
  if (c != 0) return c < 0 ? -1 : 1;
  return Cmp(a.size(), b.size());
}

int CompareBigInt(std::span<const uint8_t> a, std::span<const uint8_t> b) {
  a = a.first(MinimalTwosComplementSize(a));
  b = b.first(MinimalTwosComplementSize(b));
  bool na = !a.empty() && (a.back() & 0x80),
       nb = !b.empty() && (b.back() & 0x80);
  if (na != nb) return na ? -1 : 1;
  if (a.size() != b.size()) {
    int longer = a.size() > b.size() ? 1 : -1;
    return na ? -longer : longer;
  }
  // Same sign and width: the bit patterns order as unsigned numbers.
  for (size_t i = a.size(); i-- > 0;) {
    if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
  }
  return 0;
}

}  // namespace

int CompareHashable(uint32_t a, uint32_t b,
                    const std::function<KeyNode(uint32_t)>& get,
                    const std::function<uint32_t(uint32_t, size_t)>& item) {
  const KeyNode x = get(a), y = get(b);
  if (x.kind != y.kind) {
    return Cmp(static_cast<uint8_t>(x.kind), static_cast<uint8_t>(y.kind));
  }
  switch (x.kind) {
    case ValueKind::kBool:
    case ValueKind::kInt:
    case ValueKind::kDType:
      return Cmp(x.int_value, y.int_value);
    case ValueKind::kBigInt:
      return CompareBigInt(x.bytes, y.bytes);
    case ValueKind::kFloat:
      return Cmp(TotalOrderKey(x.float_value), TotalOrderKey(y.float_value));
    case ValueKind::kComplex:
      if (int c =
              Cmp(TotalOrderKey(x.float_value), TotalOrderKey(y.float_value))) {
        return c;
      }
      return Cmp(TotalOrderKey(x.imag_value), TotalOrderKey(y.imag_value));
    case ValueKind::kString:
    case ValueKind::kDevice:
      return CompareBytes(
          {reinterpret_cast<const uint8_t*>(x.str.data()), x.str.size()},
          {reinterpret_cast<const uint8_t*>(y.str.data()), y.str.size()});
    case ValueKind::kBytes:
      return CompareBytes(x.bytes, y.bytes);
    case ValueKind::kTuple:
    case ValueKind::kFrozenSet: {
      size_t n = std::min(x.num_items, y.num_items);
      for (size_t i = 0; i < n; ++i) {
        if (int c = CompareHashable(item(a, i), item(b, i), get, item))
          return c;
      }
      return Cmp(x.num_items, y.num_items);
    }
    case ValueKind::kNone:  // one value
      return 0;
    case ValueKind::kList:  // unhashable kinds are never compared
    case ValueKind::kDict:
    case ValueKind::kSet:
    case ValueKind::kTensor:
      return 0;
  }
  return 0;
}

std::optional<std::string> ValueProblem(const KeyNode& n) {
  switch (n.kind) {
    case ValueKind::kBool:
      if (n.int_value != 0 && n.int_value != 1) {
        return "bool value is neither 0 nor 1";
      }
      break;
    case ValueKind::kBigInt:
      if (n.bytes.empty() || n.bytes.size() > kMaxBigIntBytes) {
        return "big int of " + std::to_string(n.bytes.size()) + " bytes (1.." +
               std::to_string(kMaxBigIntBytes) + " allowed)";
      }
      break;
    case ValueKind::kString:
      if (auto bad = Utf8Problem(n.str)) {
        return "string is not valid UTF-8 (byte " + std::to_string(*bad) +
               " of " + std::to_string(n.str.size()) + ")";
      }
      break;
    case ValueKind::kDType:
      if (n.int_value < 1 || n.int_value > kMaxDTypeCode ||
          !IsKnownDType(static_cast<uint8_t>(n.int_value))) {
        return "unknown dtype code " + std::to_string(n.int_value);
      }
      break;
    case ValueKind::kDevice:
      if (auto why = DeviceProblem(n.str)) {
        return "invalid device string: " + *why;
      }
      break;
    // No rule of their own (a Tensor's index is the header's to check).
    case ValueKind::kNone:
    case ValueKind::kInt:
    case ValueKind::kFloat:
    case ValueKind::kComplex:
    case ValueKind::kBytes:
    case ValueKind::kList:
    case ValueKind::kTuple:
    case ValueKind::kDict:
    case ValueKind::kSet:
    case ValueKind::kFrozenSet:
    case ValueKind::kTensor:
      break;
  }
  return std::nullopt;
}

// ---- the public key segment ------------------------------------------------

namespace {

// A PathKey tree laid out as numbered nodes, children first, for the
// id-based key grammar above.
struct FlatKey {
  std::vector<const PathKey*> node;
  std::vector<std::vector<uint32_t>> items;
};

Status KeyProblem(const std::string& what) {
  return InvalidArgument("dict key: " + what);
}

// Checks one node of a key for what a file could not hold.
Status CheckKeyNode(const PathKey& k) {
  if (!IsKeyKind(k.kind)) {
    return KeyProblem("a " + std::string(ValueKindName(k.kind)) +
                      " cannot be a dict key");
  }
  if (auto why = ValueProblem(ViewOf(k, k.items.size()))) {
    return KeyProblem(*why);
  }
  if (!KindUsesField(k.kind, kFieldItems) && !k.items.empty()) {
    return KeyProblem("a " + std::string(ValueKindName(k.kind)) +
                      " has no items");
  }
  return Status::OK();
}

Result<FlatKey> Flatten(const PathKey& key) {
  FlatKey f;
  // Iterative post-order: a hostile caller may nest a key 10^6 deep.
  struct Frame {
    const PathKey* key;
    size_t next = 0;
    std::vector<uint32_t> kids;
  };
  std::vector<Frame> stack;
  stack.push_back({&key, 0, {}});
  while (!stack.empty()) {
    Frame& top = stack.back();
    if (top.next == 0) {
      if (stack.size() > kMaxTreeDepth) {
        return KeyProblem("nested deeper than " +
                          std::to_string(kMaxTreeDepth));
      }
      CKPT_RETURN_IF_ERROR(CheckKeyNode(*top.key));
    }
    if (top.next < top.key->items.size()) {
      const PathKey* child = &top.key->items[top.next++];
      stack.push_back({child, 0, {}});
      continue;
    }
    Frame done = std::move(stack.back());
    stack.pop_back();
    const auto id = static_cast<uint32_t>(f.node.size());
    f.node.push_back(done.key);
    f.items.push_back(std::move(done.kids));
    if (!stack.empty()) stack.back().kids.push_back(id);
  }
  return f;
}

}  // namespace

}  // namespace ckpt::internal

namespace ckpt {

Result<std::string> KeySegment(const PathKey& key) {
  using internal::KeyNode;
  CKPT_ASSIGN_OR_RETURN(internal::FlatKey f, internal::Flatten(key));
  auto get = [&](uint32_t id) {
    return internal::ViewOf(*f.node[id], f.items[id].size());
  };
  auto item = [&](uint32_t id, size_t i) { return f.items[id][i]; };
  // A FrozenSet's items in the canonical order the writer stores them in
  // (FORMAT.md 10), so equal sets have one form. Children come first, so
  // the items of an inner set are already sorted when it is compared.
  for (uint32_t id = 0; id < f.node.size(); ++id) {
    if (f.node[id]->kind != ValueKind::kFrozenSet) continue;
    std::stable_sort(f.items[id].begin(), f.items[id].end(),
                     [&](uint32_t a, uint32_t b) {
                       return internal::CompareHashable(a, b, get, item) < 0;
                     });
  }
  return internal::KeySegmentOf(static_cast<uint32_t>(f.node.size() - 1), get,
                                item, internal::FloatKeyForm::kPythonRepr);
}

}  // namespace ckpt
