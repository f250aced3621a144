#include <cctype>
#include <charconv>
#include <cmath>
#include <cstring>
#include <set>
#include <unordered_map>

#include "bytes_internal.h"
#include "pickle_internal.h"
#include "tree_internal.h"

namespace ckpt::internal {

std::optional<DType> StorageClassDType(const std::string& name) {
  static const std::map<std::string, DType> kClasses = {
      {"DoubleStorage", DType::kFloat64},
      {"FloatStorage", DType::kFloat32},
      {"HalfStorage", DType::kFloat16},
      {"BFloat16Storage", DType::kBFloat16},
      {"LongStorage", DType::kInt64},
      {"IntStorage", DType::kInt32},
      {"ShortStorage", DType::kInt16},
      {"CharStorage", DType::kInt8},
      {"ByteStorage", DType::kUInt8},
      {"BoolStorage", DType::kBool},
      {"ComplexFloatStorage", DType::kComplex64},
      {"ComplexDoubleStorage", DType::kComplex128},
      {"QInt8Storage", DType::kQInt8},
      {"QUInt8Storage", DType::kQUInt8},
      {"QInt32Storage", DType::kQInt32},
      {"QUInt4x2Storage", DType::kQUInt4x2},
      {"QUInt2x4Storage", DType::kQUInt2x4},
  };
  auto it = kClasses.find(name);
  if (it == kClasses.end()) return std::nullopt;
  return it->second;
}

PyObj::~PyObj() {
  std::vector<Obj> pending;
  auto take = [&pending](std::vector<Obj>& v) {
    for (auto& c : v) {
      // Only children this node owns alone die with it.
      if (c && c.use_count() == 1) pending.push_back(std::move(c));
    }
    v.clear();
  };
  take(items);
  take(keys);
  while (!pending.empty()) {
    Obj o = std::move(pending.back());
    pending.pop_back();
    take(o->items);
    take(o->keys);
  }  // each `o` is destroyed here with no children left
}

PickleHeap::~PickleHeap() {
  for (auto& c : containers_) {
    c->items.clear();
    c->keys.clear();
  }
}

namespace {

using K = PyObj::K;

// Module aliases: Python 2 names and numpy 2's private package.
std::string CanonicalModule(std::string m) {
  if (m == "__builtin__") return "builtins";
  if (m == "copy_reg") return "copyreg";
  if (m.rfind("numpy._core", 0) == 0) return "numpy.core" + m.substr(11);
  return m;
}

// Exact (module, name) pairs that REDUCE/NEWOBJ may apply.
const std::set<std::pair<std::string, std::string>>& Callables() {
  static const auto* s = new std::set<std::pair<std::string, std::string>>{
      {"torch._utils", "_rebuild_tensor"},
      {"torch._utils", "_rebuild_tensor_v2"},
      {"torch._utils", "_rebuild_tensor_v3"},
      {"torch._utils", "_rebuild_parameter"},
      {"torch._utils", "_rebuild_parameter_with_state"},
      {"torch._tensor", "_rebuild_from_type_v2"},
      {"torch", "Size"},
      {"torch", "device"},
      {"torch", "Tensor"},
      {"torch.nn.parameter", "Parameter"},
      {"collections", "OrderedDict"},
      {"_codecs", "encode"},
      {"builtins", "set"},
      {"builtins", "frozenset"},
      {"builtins", "complex"},
      {"builtins", "slice"},
      {"builtins", "bytes"},
      {"builtins", "bytearray"},
      {"numpy.core.multiarray", "_reconstruct"},
      {"numpy.core.multiarray", "scalar"},
      {"numpy.core.numeric", "_frombuffer"},
      {"numpy", "ndarray"},
      {"numpy", "dtype"},
      {"argparse", "Namespace"},
      {"copyreg", "_reconstructor"},  // protocols 0-1: plain objects
      {"builtins", "object"},         // only as _reconstructor's base
  };
  return *s;
}

// Globals refused with a reason more useful than "forbidden".
std::string RefusalReason(const std::string& m, const std::string& n) {
  if (m == "torch._utils") {
    if (n == "_rebuild_qtensor") return "quantized tensors are not supported";
    if (n == "_rebuild_sparse_tensor" || n == "_rebuild_sparse_csr_tensor") {
      return "sparse tensors are not supported";
    }
    if (n == "_rebuild_meta_tensor_no_storage") {
      return "meta tensors have no data to convert";
    }
    if (n == "_rebuild_wrapper_subclass")
      return "tensor subclasses without data are not supported";
    if (n == "_rebuild_nested_tensor")
      return "nested tensors are not supported";
    if (n == "_rebuild_device_tensor_from_numpy" ||
        n == "_rebuild_xla_tensor") {
      return "XLA/ORT device tensors are not supported";
    }
  }
  if (m == "torch.serialization" && n == "_get_layout") {
    return "sparse tensors are not supported";
  }
  if (m == "torch.storage" && n == "_load_from_bytes") {
    return "a torch.save file nested inside the pickle is not supported";
  }
  if (m.rfind("torch.nn.modules", 0) == 0 ||
      (m.rfind("torch.nn", 0) == 0 && n != "Parameter")) {
    return "a whole nn.Module is pickled here; save model.state_dict() instead";
  }
  if (m.rfind("__torch__", 0) == 0)
    return "TorchScript objects are not supported";
  if (m == "__main__") {
    return "custom class '__main__." + n +
           "' cannot be converted without running its code";
  }
  return "";
}

struct NpType {
  DType dtype;
  size_t size;
};

std::optional<NpType> NumpyType(const std::string& code) {
  static const std::map<std::string, NpType> kTypes = {
      {"f2", {DType::kFloat16, 2}},   {"f4", {DType::kFloat32, 4}},
      {"f8", {DType::kFloat64, 8}},   {"i1", {DType::kInt8, 1}},
      {"i2", {DType::kInt16, 2}},     {"i4", {DType::kInt32, 4}},
      {"i8", {DType::kInt64, 8}},     {"u1", {DType::kUInt8, 1}},
      {"u2", {DType::kUInt16, 2}},    {"u4", {DType::kUInt32, 4}},
      {"u8", {DType::kUInt64, 8}},    {"b1", {DType::kBool, 1}},
      {"c8", {DType::kComplex64, 8}}, {"c16", {DType::kComplex128, 16}},
  };
  auto it = kTypes.find(code);
  if (it == kTypes.end()) return std::nullopt;
  return it->second;
}

}  // namespace

void SwapElements(std::span<std::byte> data, DType dtype) {
  size_t w = DTypeSize(dtype);
  if (dtype == DType::kComplex32 || dtype == DType::kComplex64 ||
      dtype == DType::kComplex128) {
    w /= 2;
  }
  if (w <= 1) return;
  for (size_t i = 0; i + w <= data.size(); i += w) {
    std::reverse(data.begin() + static_cast<long>(i),
                 data.begin() + static_cast<long>(i + w));
  }
}

namespace {

Obj Make(K k) {
  auto o = std::make_shared<PyObj>();
  o->kind = k;
  return o;
}

// What is wrong with `b` as UTF-8 (strict, as Python decodes pickle text:
// no overlong forms, nothing above U+10FFFF), or "" when it is valid.
// `surrogates` are encoded U+D800..U+DFFF, which pickle accepts
// (surrogatepass) but UTF-8, and so a ckpt string, cannot hold.
std::string Utf8Problem(std::span<const std::byte> b, bool* surrogate) {
  *surrogate = false;
  const size_t n = b.size();
  auto at = [&](size_t i) { return static_cast<uint8_t>(b[i]); };
  for (size_t i = 0; i < n;) {
    uint8_t c = at(i);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = c >= 0xC2 && c <= 0xDF   ? 2
                 : c >= 0xE0 && c <= 0xEF ? 3
                 : c >= 0xF0 && c <= 0xF4 ? 4
                                          : 0;
    auto where = [&] {
      return " at byte " + std::to_string(i) + " of the string";
    };
    if (len == 0) return "invalid UTF-8 start byte" + where();
    if (n - i < len) return "invalid UTF-8: truncated sequence" + where();
    for (size_t k = 1; k < len; ++k) {
      if ((at(i + k) & 0xC0) != 0x80)
        return "invalid UTF-8 continuation byte" + where();
    }
    uint8_t c1 = at(i + 1);
    if ((c == 0xE0 && c1 < 0xA0) || (c == 0xF0 && c1 < 0x90)) {
      return "invalid UTF-8: overlong encoding" + where();
    }
    if (c == 0xF4 && c1 >= 0x90)
      return "invalid UTF-8: code point above U+10FFFF" + where();
    if (c == 0xED && c1 >= 0xA0) {
      *surrogate = true;
      return "lone surrogate (U+D800..U+DFFF)" + where() +
             ": Python's pickle lets it through, UTF-8 cannot hold it";
    }
    i += len;
  }
  return "";
}

// Latin-1 bytes as UTF-8 text (each byte one code point).
std::string Latin1ToUtf8(std::span<const std::byte> b) {
  std::string out;
  out.reserve(b.size());
  for (std::byte x : b) {
    auto c = static_cast<uint8_t>(x);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

// UTF-8 text of code points 0..255 back to those bytes (numpy and
// _codecs.encode take latin-1 text as bytes); nullopt for a code point above
// U+00FF.
std::optional<std::vector<uint8_t>> Utf8ToLatin1(const std::string& text) {
  std::vector<uint8_t> out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    auto c = static_cast<uint8_t>(text[i]);
    if (c < 0x80) {
      out.push_back(c);
      ++i;
    } else if ((c & 0xE0) == 0xC0 && i + 1 < text.size() && c <= 0xC3) {
      out.push_back(static_cast<uint8_t>(
          ((c & 0x1F) << 6) | (static_cast<uint8_t>(text[i + 1]) & 0x3F)));
      i += 2;
    } else {
      return std::nullopt;
    }
  }
  return out;
}

// The bytes a str stands for where numpy or _codecs.encode wants bytes: a
// Python 2 str's own bytes, or a text str's code points 0..255.
std::optional<std::vector<uint8_t>> StrBytes(const PyObj& o) {
  if (o.i == kPy2Str || o.i == kPy2Undecodable) return o.bytes;
  return Utf8ToLatin1(o.s);
}

// A name in module torch that reads as a dtype (float33, uint9, int128,
// float8_e3m4, bits32...): an unknown one is an unsupported dtype, not a
// forbidden callable.
bool LooksLikeDType(const std::string& n) {
  for (const char* p :
       {"float", "bfloat", "uint", "int", "complex", "bits", "qint", "quint"}) {
    size_t len = std::strlen(p);
    if (n.size() > len && n.compare(0, len, p) == 0 &&
        std::isdigit(static_cast<unsigned char>(n[len]))) {
      return n.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789_") ==
             std::string::npos;
    }
  }
  return false;
}

const char* KindName(K k) {
  switch (k) {
    case K::kNone:
      return "None";
    case K::kBool:
      return "bool";
    case K::kInt:
      return "int";
    case K::kBigInt:
      return "int";
    case K::kFloat:
      return "float";
    case K::kComplex:
      return "complex";
    case K::kStr:
      return "str";
    case K::kBytes:
      return "bytes";
    case K::kList:
      return "list";
    case K::kTuple:
      return "tuple";
    case K::kDict:
      return "dict";
    case K::kSet:
      return "set";
    case K::kFrozenSet:
      return "frozenset";
    case K::kGlobal:
      return "global";
    case K::kStorage:
      return "storage";
    case K::kTensor:
      return "tensor";
    case K::kDType:
      return "dtype";
    case K::kDevice:
      return "device";
    case K::kNpDType:
      return "numpy dtype";
    case K::kNpArray:
      return "numpy array";
  }
  return "?";
}

class Machine {
 public:
  Machine(std::span<const std::byte> data, const std::string& where,
          int64_t file_offset, const PersistentLoad& pl, PickleHeap* heap,
          const PickleLimits& limits)
      : d_(data),
        where_(where),
        file_offset_(file_offset),
        pl_(pl),
        heap_(heap),
        lim_(limits) {}

  Result<Obj> Run(size_t* consumed);

 private:
  // Errors name the stream and byte offset of the opcode being run.
  Status Fail(ErrorCode code, const std::string& msg) const {
    Status s(code, msg + " at " + where_ + "+" + std::to_string(op_at_));
    if (file_offset_ >= 0) {
      s = s.WithOffset(file_offset_ + static_cast<int64_t>(op_at_));
    }
    return s;
  }
  Status Bad(const std::string& msg) const {
    return Fail(ErrorCode::kCorrupt, msg);
  }
  Status Refuse(const std::string& msg) const {
    return Fail(ErrorCode::kInvalidArgument, msg);
  }

  Result<std::span<const std::byte>> Take(uint64_t n) {
    if (n > d_.size() - pos_) {
      return Bad("truncated pickle: needs " + std::to_string(n) +
                 " more bytes, " + std::to_string(d_.size() - pos_) + " left");
    }
    auto s = d_.subspan(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }
  Result<uint64_t> U(int n) {
    CKPT_ASSIGN_OR_RETURN(auto b, Take(static_cast<uint64_t>(n)));
    return LoadLE(b.data(), static_cast<size_t>(n));
  }
  Result<std::string> Line() {
    size_t start = pos_;
    while (pos_ < d_.size() && d_[pos_] != std::byte{'\n'}) ++pos_;
    if (pos_ >= d_.size())
      return Bad("truncated pickle: unterminated text line");
    std::string s(reinterpret_cast<const char*>(d_.data() + start),
                  pos_ - start);
    ++pos_;
    return s;
  }

  Status Push(Obj o) {
    if (stack_.size() >= lim_.max_stack) {
      return Refuse("pickle stack too deep (limit " +
                    std::to_string(lim_.max_stack) + " items)");
    }
    if (++objects_ > lim_.max_objects) {
      return Refuse("too many objects in pickle (limit " +
                    std::to_string(lim_.max_objects) + ")");
    }
    // A new object (nobody else holds it yet) is charged once; a memo
    // reuse costs only its stack slot.
    uint64_t cost = o->charged ? 0 : Cost(*o);
    o->charged = true;
    switch (o->kind) {  // anything that can hold a reference
      case K::kList:
      case K::kTuple:
      case K::kDict:
      case K::kSet:
      case K::kFrozenSet:
        if (cost) {
          heap_->Track(o);
          cost += 2 * sizeof(Obj);
        }
        break;
      default:
        break;
    }
    stack_.push_back(std::move(o));
    return Charge(cost);
  }

  // Memory of one object as allocated: the node and its control block,
  // heap-held strings and vectors, tensors and inline numpy data.
  static uint64_t Cost(const PyObj& o) {
    constexpr uint64_t kMalloc = 16;  // per-allocation overhead
    auto str = [](const std::string& x) -> uint64_t {
      return x.capacity() > 15 ? x.capacity() + 1 + kMalloc : 0;
    };
    uint64_t c = sizeof(PyObj) + 16 + kMalloc + str(o.s) + str(o.s2);
    if (o.bytes.capacity()) c += o.bytes.capacity() + kMalloc;
    if (o.items.capacity()) c += o.items.capacity() * sizeof(Obj) + kMalloc;
    if (o.keys.capacity()) c += o.keys.capacity() * sizeof(Obj) + kMalloc;
    if (o.tensor) {
      c += sizeof(PyTensor) + 16 + 3 * kMalloc +
           (o.tensor->shape.capacity() + o.tensor->strides.capacity()) *
               sizeof(int64_t);
      if (o.tensor->storage && o.tensor->storage->inline_data) {
        c += sizeof(PyStorage) + o.tensor->storage->inline_data->capacity() +
             4 * kMalloc;
      }
    }
    return c;
  }
  // Adds `n` bytes and checks the total, stack and memo included.
  Status Charge(uint64_t n) {
    memory_ += n;
    uint64_t total = memory_ + stack_.capacity() * sizeof(Obj) +
                     memo_.size() * 64 + marks_.capacity() * sizeof(size_t);
    if (total > lim_.max_memory) {
      return Refuse("pickle objects take more than " +
                    std::to_string(lim_.max_memory) +
                    " bytes of memory (limit max_pickle_memory)");
    }
    return Status::OK();
  }
  Result<Obj> Pop() {
    if (stack_.size() <= Floor()) return Bad("pickle stack underflow");
    Obj o = std::move(stack_.back());
    stack_.pop_back();
    return o;
  }
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  Result<std::vector<Obj>> PopMark() {
    if (marks_.empty()) return Bad("no MARK on the stack");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Obj> items(
        std::make_move_iterator(stack_.begin() + static_cast<long>(m)),
        std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  Result<Obj> Top() {
    if (stack_.size() <= Floor()) return Bad("pickle stack underflow");
    return stack_.back();
  }

  Status Memo(uint64_t idx) {
    if (memo_.size() >= lim_.max_memo && !memo_.count(idx)) {
      return Bad("memo grows past " + std::to_string(lim_.max_memo) +
                 " entries");
    }
    CKPT_ASSIGN_OR_RETURN(Obj top, Top());
    memo_[idx] = top;
    return Charge(0);
  }
  Status MemoGet(uint64_t idx) {
    auto it = memo_.find(idx);
    if (it == memo_.end())
      return Bad("memo index " + std::to_string(idx) + " was never set");
    return Push(it->second);
  }

  Result<Obj> IntFromLE(std::span<const std::byte> b) {
    if (b.empty()) {
      auto o = Make(K::kInt);
      return o;
    }
    if (b.size() > lim_.max_long_bytes) {
      return Refuse("integer of " + std::to_string(b.size()) +
                    " bytes (limit " + std::to_string(lim_.max_long_bytes) +
                    ")");
    }
    // Trim redundant sign bytes.
    size_t n = b.size();
    bool neg = (static_cast<uint8_t>(b[n - 1]) & 0x80) != 0;
    while (n > 1) {
      auto top = static_cast<uint8_t>(b[n - 1]);
      auto next = static_cast<uint8_t>(b[n - 2]);
      if ((top == 0x00 && !(next & 0x80)) || (top == 0xFF && (next & 0x80))) {
        --n;
      } else {
        break;
      }
    }
    if (n <= 8) {
      uint64_t v = neg ? ~uint64_t{0} : 0;
      for (size_t i = 0; i < n; ++i) {
        v &= ~(uint64_t{0xFF} << (8 * i));
        v |= static_cast<uint64_t>(static_cast<uint8_t>(b[i])) << (8 * i);
      }
      auto o = Make(K::kInt);
      o->i = static_cast<int64_t>(v);
      return o;
    }
    auto o = Make(K::kBigInt);
    for (size_t i = 0; i < n; ++i)
      o->bytes.push_back(static_cast<uint8_t>(b[i]));
    return o;
  }

  Result<Obj> IntFromText(std::string text) {
    if (!text.empty() && text.back() == 'L') text.pop_back();
    bool neg = !text.empty() && text[0] == '-';
    std::string digits =
        text.substr(neg || (!text.empty() && text[0] == '+') ? 1 : 0);
    if (digits.empty() || digits.size() > 160 ||
        digits.find_first_not_of("0123456789") != std::string::npos) {
      return Bad("bad integer literal '" + text + "'");
    }
    // Little-endian magnitude by repeated multiply-add.
    std::vector<uint8_t> mag(1, 0);
    for (char c : digits) {
      unsigned carry = static_cast<unsigned>(c - '0');
      for (auto& byte : mag) {
        unsigned v = byte * 10u + carry;
        byte = static_cast<uint8_t>(v);
        carry = v >> 8;
      }
      if (carry) mag.push_back(static_cast<uint8_t>(carry));
    }
    mag.push_back(0);  // room for the sign bit
    if (neg) NegateTwosComplement(mag);
    std::vector<std::byte> le(mag.size());
    std::memcpy(le.data(), mag.data(), mag.size());
    return IntFromLE(le);
  }

  // Text (BINUNICODE...): UTF-8, refused where Python's pickle refuses it
  // (UnicodeDecodeError) and for surrogates, which a ckpt string cannot hold.
  Result<Obj> Str(std::span<const std::byte> b) {
    bool surrogate = false;
    if (std::string why = Utf8Problem(b, &surrogate); !why.empty()) {
      return surrogate ? Refuse("string with a " + why)
                       : Bad("string is not text: " + why);
    }
    auto o = Make(K::kStr);
    o->s.assign(reinterpret_cast<const char*>(b.data()), b.size());
    return o;
  }
  // A Python 2 str (BINSTRING, SHORT_BINSTRING): decoded as torch.load's
  // `encoding` decodes it; its bytes are kept for numpy array data.
  Result<Obj> Py2Str(std::span<const std::byte> b) {
    auto o = Make(K::kStr);
    o->i = kPy2Str;
    o->bytes.resize(b.size());
    if (!b.empty()) std::memcpy(o->bytes.data(), b.data(), b.size());
    bool surrogate = false;
    if (lim_.py2_latin1) {
      o->s = Latin1ToUtf8(b);
    } else if (Utf8Problem(b, &surrogate).empty()) {
      o->s.assign(reinterpret_cast<const char*>(b.data()), b.size());
    } else {
      o->s = Latin1ToUtf8(b);  // for messages; refused if used as text
      o->i = kPy2Undecodable;
    }
    return o;
  }
  Result<Obj> BytesObj(std::span<const std::byte> b) {
    auto o = Make(K::kBytes);
    o->bytes.resize(b.size());
    if (!b.empty()) std::memcpy(o->bytes.data(), b.data(), b.size());
    return o;
  }

  Obj Singleton(K k, int64_t v) {
    Obj& slot = k == K::kNone ? none_ : v ? true_ : false_;
    if (!slot) {
      slot = Make(k);
      slot->i = v;
    }
    return slot;
  }

  Status Global(std::string module, std::string name);
  Result<Obj> Call(const Obj& fn, const Obj& args);
  Status Build(const Obj& target, const Obj& state);

  // Argument helpers.
  Result<int64_t> AsInt(const Obj& o, const char* what) {
    if (o->kind == K::kInt || o->kind == K::kBool) return o->i;
    return Refuse(std::string(what) + " must be an int, got " +
                  KindName(o->kind));
  }
  Result<std::vector<int64_t>> AsInts(const Obj& o, const char* what) {
    if (o->kind != K::kTuple && o->kind != K::kList) {
      return Refuse(std::string(what) + " must be a tuple of ints, got " +
                    KindName(o->kind));
    }
    if (o->items.size() > kMaxRank)
      return Refuse(std::string(what) + " has more than 64 dims");
    std::vector<int64_t> v;
    for (const auto& x : o->items) {
      CKPT_ASSIGN_OR_RETURN(int64_t i, AsInt(x, what));
      v.push_back(i);
    }
    return v;
  }
  Result<std::string> AsStr(const Obj& o, const char* what) {
    if (o->kind == K::kStr) return o->s;
    return Refuse(std::string(what) + " must be a str, got " +
                  KindName(o->kind));
  }
  bool IsGlobal(const Obj& o, const char* m, const char* n) const {
    return o->kind == K::kGlobal && o->s == m && o->s2 == n;
  }

  Result<Obj> RebuildTensor(const std::vector<Obj>& a, bool v3);
  Result<Obj> NumpyArray(const Obj& dtype, const std::vector<int64_t>& shape,
                         bool fortran, std::span<const uint8_t> data);
  Result<Obj> NumpyScalar(const Obj& dtype, std::span<const uint8_t> data);

  std::span<const std::byte> d_;
  std::string where_;
  int64_t file_offset_;
  const PersistentLoad& pl_;
  PickleHeap* heap_;
  PickleLimits lim_;
  size_t pos_ = 0;
  size_t op_at_ = 0;
  uint64_t objects_ = 0;
  uint64_t memory_ = 0;  // charged by Push/Charge
  int proto_ = 0;
  int call_depth_ = 0;
  std::vector<Obj> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Obj> memo_;
  Obj none_, true_, false_;
};

Status Machine::Global(std::string module, std::string name) {
  module = CanonicalModule(std::move(module));
  std::string label = "'" + module + " " + name + "'";
  if (std::string why = RefusalReason(module, name); !why.empty()) {
    return Refuse(why + " (global " + label + ")");
  }
  if ((module == "torch" || module == "torch.cuda") &&
      StorageClassDType(name)) {
    auto o = Make(K::kGlobal);
    o->s = "torch";
    o->s2 = name;
    return Push(o);
  }
  if (module == "torch.storage" &&
      (name == "UntypedStorage" || name == "_UntypedStorage")) {
    auto o = Make(K::kGlobal);
    o->s = "torch.storage";
    o->s2 = "UntypedStorage";
    return Push(o);
  }
  if (module == "torch") {
    if (auto d = DTypeFromName(name)) {
      auto o = Make(K::kDType);
      o->i = static_cast<int64_t>(*d);
      return Push(o);
    }
  }
  if (module == "torch" || module == "torch.cuda") {
    // Names that are dtypes or storage types of a newer torch: say so, not
    // "forbidden" (they are data types, not code).
    if (module == "torch" && LooksLikeDType(name)) {
      return Refuse("unsupported dtype " + name + " (torch." + name +
                    " is not a dtype this version of ckpt knows)");
    }
    if (name.size() > 7 && name.compare(name.size() - 7, 7, "Storage") == 0 &&
        name.find_first_not_of(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") ==
            std::string::npos) {
      return Refuse("unsupported storage type " + module + "." + name);
    }
  }
  if (!Callables().count({module, name})) {
    return Refuse("forbidden global " + label +
                  ": not on the allowlist of torch.save checkpoint types; "
                  "nothing was run");
  }
  auto o = Make(K::kGlobal);
  o->s = module;
  o->s2 = name;
  return Push(o);
}

Result<Obj> Machine::RebuildTensor(const std::vector<Obj>& a, bool v3) {
  if (a[0]->kind != K::kStorage) {
    return Refuse(std::string("tensor rebuild expects a storage, got ") +
                  KindName(a[0]->kind));
  }
  auto t = std::make_shared<PyTensor>();
  t->storage = a[0]->storage;
  CKPT_ASSIGN_OR_RETURN(t->offset, AsInt(a[1], "storage_offset"));
  CKPT_ASSIGN_OR_RETURN(t->shape, AsInts(a[2], "size"));
  CKPT_ASSIGN_OR_RETURN(t->strides, AsInts(a[3], "stride"));
  if (t->shape.size() != t->strides.size()) {
    return Refuse("size and stride have different lengths");
  }
  if (a.size() > 4) {
    if (a[4]->kind != K::kBool) return Refuse("requires_grad must be a bool");
    t->requires_grad = a[4]->i != 0;
  }
  if (a.size() > 5 && !(a[5]->kind == K::kDict && a[5]->items.empty()) &&
      a[5]->kind != K::kNone) {
    return Refuse("tensor with backward hooks cannot be converted");
  }
  if (v3) {
    if (a[6]->kind != K::kDType)
      return Refuse("_rebuild_tensor_v3 expects a dtype");
    t->dtype = static_cast<DType>(a[6]->i);
    if (!t->storage->untyped) {
      return Refuse("_rebuild_tensor_v3 on a typed storage");
    }
  } else {
    t->dtype = t->storage->dtype;
  }
  auto o = Make(K::kTensor);
  o->tensor = std::move(t);
  return o;
}

Result<Obj> Machine::NumpyArray(const Obj& dtype,
                                const std::vector<int64_t>& shape, bool fortran,
                                std::span<const uint8_t> data) {
  if (dtype->kind != K::kNpDType)
    return Refuse("numpy array without a numpy dtype");
  auto np = NumpyType(dtype->s);
  if (!np)
    return Refuse("numpy dtype '" + dtype->s +
                  "' cannot be converted (object, string or structured arrays "
                  "are not supported)");
  uint64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(s), &n)) {
      return Refuse("bad numpy shape");
    }
  }
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(n, np->size, &bytes) || bytes != data.size()) {
    return Refuse("numpy array data has " + std::to_string(data.size()) +
                  " bytes, its shape and dtype need " + std::to_string(bytes));
  }
  auto st = std::make_shared<PyStorage>();
  st->dtype = np->dtype;
  st->numel = n;
  st->inline_data = std::make_shared<std::vector<std::byte>>(data.size());
  if (!data.empty())
    std::memcpy(st->inline_data->data(), data.data(), data.size());
  if (dtype->s2 == ">") SwapElements(*st->inline_data, np->dtype);
  auto t = std::make_shared<PyTensor>();
  t->storage = st;
  t->dtype = np->dtype;
  t->numpy = true;
  t->shape = shape;
  t->strides.resize(shape.size());
  int64_t stride = 1;
  if (fortran) {
    for (size_t d = 0; d < shape.size(); ++d) {
      t->strides[d] = stride;
      stride *= std::max<int64_t>(shape[d], 1);
    }
  } else {
    for (size_t d = shape.size(); d-- > 0;) {
      t->strides[d] = stride;
      stride *= std::max<int64_t>(shape[d], 1);
    }
  }
  auto o = Make(K::kTensor);
  o->tensor = std::move(t);
  return o;
}

Result<Obj> Machine::NumpyScalar(const Obj& dtype,
                                 std::span<const uint8_t> data) {
  if (dtype->kind != K::kNpDType)
    return Refuse("numpy scalar without a numpy dtype");
  auto np = NumpyType(dtype->s);
  if (!np || data.size() != np->size)
    return Refuse("numpy scalar of dtype '" + dtype->s +
                  "' cannot be converted");
  std::vector<uint8_t> v(data.begin(), data.end());
  if (dtype->s2 == ">") {
    SwapElements(std::as_writable_bytes(std::span(v)), np->dtype);
  }
  auto rd = [&](auto x) {
    std::memcpy(&x, v.data(), sizeof x);
    return x;
  };
  Obj o;
  switch (np->dtype) {
    case DType::kFloat16: {
      uint16_t h = rd(uint16_t{});
      int e = (h >> 10) & 31, m = h & 1023;
      double val = e == 0    ? std::ldexp(m, -24)
                   : e == 31 ? (m ? NAN : INFINITY)
                             : std::ldexp(m + 1024, e - 25);
      o = Make(K::kFloat);
      o->f = (h & 0x8000) ? -val : val;
      break;
    }
    case DType::kFloat32:
      o = Make(K::kFloat);
      o->f = rd(float{});
      break;
    case DType::kFloat64:
      o = Make(K::kFloat);
      o->f = rd(double{});
      break;
    case DType::kComplex64: {
      o = Make(K::kComplex);
      float re, im;
      std::memcpy(&re, v.data(), 4);
      std::memcpy(&im, v.data() + 4, 4);
      o->f = re;
      o->im = im;
      break;
    }
    case DType::kComplex128:
      o = Make(K::kComplex);
      std::memcpy(&o->f, v.data(), 8);
      std::memcpy(&o->im, v.data() + 8, 8);
      break;
    case DType::kBool:
      o = Make(K::kBool);
      o->i = v[0] != 0;
      break;
    case DType::kUInt64: {
      std::vector<std::byte> le(9, std::byte{0});
      std::memcpy(le.data(), v.data(), 8);
      return IntFromLE(le);
    }
    default: {  // signed ints and smaller unsigned ints
      bool is_signed = np->dtype == DType::kInt8 ||
                       np->dtype == DType::kInt16 ||
                       np->dtype == DType::kInt32 || np->dtype == DType::kInt64;
      std::vector<std::byte> le(v.size() + 1, std::byte{0});
      std::memcpy(le.data(), v.data(), v.size());
      if (is_signed && (v.back() & 0x80)) le.back() = std::byte{0xFF};
      return IntFromLE(le);
    }
  }
  return o;
}

Result<Obj> Machine::Call(const Obj& fn, const Obj& args_obj) {
  // _rebuild_from_type_v2 calls the function it wraps; one level is all
  // torch writes, a deep chain is an attack on the stack.
  if (call_depth_ > 4) return Refuse("nested tensor rebuild calls");
  struct Depth {
    int& d;
    explicit Depth(int& x) : d(++x) {}
    ~Depth() { --d; }
  } depth_guard(call_depth_);
  if (fn->kind != K::kGlobal) {
    return Refuse(std::string("REDUCE on a ") + KindName(fn->kind) +
                  ", not a callable");
  }
  if (args_obj->kind != K::kTuple)
    return Bad("REDUCE arguments are not a tuple");
  const std::vector<Obj>& a = args_obj->items;
  const std::string& m = fn->s;
  const std::string& n = fn->s2;
  auto need = [&](size_t lo, size_t hi) -> Status {
    if (a.size() < lo || a.size() > hi) {
      return Refuse("'" + m + "." + n + "' called with " +
                    std::to_string(a.size()) + " arguments");
    }
    return Status::OK();
  };
  if (m == "torch._utils") {
    if (n == "_rebuild_tensor_v2") {
      CKPT_RETURN_IF_ERROR(need(6, 7));
      return RebuildTensor(a, false);
    }
    if (n == "_rebuild_tensor") {
      CKPT_RETURN_IF_ERROR(need(4, 4));
      return RebuildTensor(a, false);
    }
    if (n == "_rebuild_tensor_v3") {
      CKPT_RETURN_IF_ERROR(need(7, 8));
      return RebuildTensor(a, true);
    }
    if (n == "_rebuild_parameter" || n == "_rebuild_parameter_with_state") {
      CKPT_RETURN_IF_ERROR(n == "_rebuild_parameter" ? need(3, 3) : need(4, 4));
      if (a[0]->kind != K::kTensor)
        return Refuse("Parameter data is not a tensor");
      if (a[1]->kind != K::kBool) return Refuse("requires_grad must be a bool");
      auto t = std::make_shared<PyTensor>(*a[0]->tensor);
      t->is_parameter = true;
      t->requires_grad = a[1]->i != 0;
      auto o = Make(K::kTensor);
      o->tensor = std::move(t);
      return o;
    }
  }
  if (m == "torch._tensor" && n == "_rebuild_from_type_v2") {
    CKPT_RETURN_IF_ERROR(need(4, 4));
    bool param = IsGlobal(a[1], "torch.nn.parameter", "Parameter");
    if (!param && !IsGlobal(a[1], "torch", "Tensor")) {
      return Refuse("tensor subclass cannot be converted");
    }
    if (!(a[3]->kind == K::kNone ||
          (a[3]->kind == K::kDict && a[3]->items.empty()))) {
      return Refuse("tensor with extra Python attributes cannot be converted");
    }
    CKPT_ASSIGN_OR_RETURN(Obj r, Call(a[0], a[2]));
    if (r->kind != K::kTensor)
      return Refuse("_rebuild_from_type_v2 did not build a tensor");
    if (param) {
      auto t = std::make_shared<PyTensor>(*r->tensor);
      t->is_parameter = true;
      r = Make(K::kTensor);
      r->tensor = std::move(t);
    }
    return r;
  }
  if (m == "collections" && n == "OrderedDict") {
    CKPT_RETURN_IF_ERROR(need(0, 1));
    auto d = Make(K::kDict);
    d->s2 = "collections.OrderedDict";
    if (a.size() == 1) {
      if (a[0]->kind != K::kList && a[0]->kind != K::kTuple) {
        return Refuse("OrderedDict() of a " +
                      std::string(KindName(a[0]->kind)));
      }
      for (const auto& pair : a[0]->items) {
        // Python 3 writes (key, value) tuples, Python 2.7 [key, value] lists.
        if ((pair->kind != K::kTuple && pair->kind != K::kList) ||
            pair->items.size() != 2) {
          return Refuse("OrderedDict() items must be pairs");
        }
        d->keys.push_back(pair->items[0]);
        d->items.push_back(pair->items[1]);
      }
    }
    return d;
  }
  if (m == "torch" && n == "Size") {
    CKPT_RETURN_IF_ERROR(need(1, 1));
    CKPT_ASSIGN_OR_RETURN(auto dims, AsInts(a[0], "torch.Size"));
    auto t = Make(K::kTuple);
    t->items = a[0]->items;
    return t;
  }
  if (m == "torch" && n == "device") {
    CKPT_RETURN_IF_ERROR(need(1, 2));
    CKPT_ASSIGN_OR_RETURN(std::string dev, AsStr(a[0], "device type"));
    if (a.size() == 2 && a[1]->kind != K::kNone) {
      CKPT_ASSIGN_OR_RETURN(int64_t idx, AsInt(a[1], "device index"));
      dev += ":" + std::to_string(idx);
    }
    if (!IsValidDevice(dev)) return Refuse("invalid device '" + dev + "'");
    auto o = Make(K::kDevice);
    o->s = dev;
    return o;
  }
  if (m == "_codecs" && n == "encode") {
    CKPT_RETURN_IF_ERROR(need(1, 2));
    CKPT_RETURN_IF_ERROR(AsStr(a[0], "_codecs.encode text").status());
    if (a.size() == 2) {
      CKPT_ASSIGN_OR_RETURN(std::string enc, AsStr(a[1], "encoding"));
      if (enc != "latin1" && enc != "latin-1")
        return Refuse("_codecs.encode with encoding '" + enc + "'");
    }
    // The str holds code points 0..255; each is one byte.
    auto raw = StrBytes(*a[0]);
    if (!raw)
      return Refuse("_codecs.encode: character above U+00FF in latin-1 text");
    auto o = Make(K::kBytes);
    o->bytes = std::move(*raw);
    return o;
  }
  if (m == "builtins") {
    if (n == "set" || n == "frozenset") {
      CKPT_RETURN_IF_ERROR(need(0, 1));
      auto o = Make(n == "set" ? K::kSet : K::kFrozenSet);
      if (a.size() == 1) {
        if (a[0]->kind != K::kList && a[0]->kind != K::kTuple) {
          return Refuse(n + "() of a " + KindName(a[0]->kind));
        }
        o->items = a[0]->items;
      }
      return o;
    }
    if (n == "complex") {
      CKPT_RETURN_IF_ERROR(need(1, 2));
      auto num = [&](const Obj& x) -> Result<double> {
        if (x->kind == K::kFloat) return x->f;
        if (x->kind == K::kInt) return static_cast<double>(x->i);
        return Refuse("complex() of a " + std::string(KindName(x->kind)));
      };
      auto o = Make(K::kComplex);
      CKPT_ASSIGN_OR_RETURN(o->f, num(a[0]));
      if (a.size() == 2) {
        CKPT_ASSIGN_OR_RETURN(o->im, num(a[1]));
      }
      return o;
    }
    if (n == "slice") {
      CKPT_RETURN_IF_ERROR(need(1, 3));
      auto o = Make(K::kTuple);  // slice(a, b, c) kept as (a, b, c)
      o->items = a;
      return o;
    }
    if (n == "bytes" || n == "bytearray") {
      CKPT_RETURN_IF_ERROR(need(0, 2));
      if (a.empty()) return Make(K::kBytes);
      if (a[0]->kind == K::kBytes) return a[0];
      return Refuse(n + "() of a " + KindName(a[0]->kind));
    }
  }
  if (m == "copyreg" && n == "_reconstructor") {
    // copyreg._reconstructor(cls, object, None) is how protocols 0-1 make a
    // plain object; only the allowlisted dict-like classes are accepted.
    CKPT_RETURN_IF_ERROR(need(3, 3));
    if (!IsGlobal(a[1], "builtins", "object") || a[2]->kind != K::kNone) {
      return Refuse("copyreg._reconstructor with an unsupported base or state");
    }
    if (IsGlobal(a[0], "argparse", "Namespace") ||
        IsGlobal(a[0], "collections", "OrderedDict")) {
      auto d = Make(K::kDict);
      d->s2 = a[0]->s + "." + a[0]->s2;
      return d;
    }
    return Refuse("copyreg._reconstructor of a class that is not allowlisted");
  }
  if (m == "numpy.core.multiarray" && n == "_reconstruct") {
    CKPT_RETURN_IF_ERROR(need(3, 3));
    if (!IsGlobal(a[0], "numpy", "ndarray"))
      return Refuse("numpy _reconstruct of a non-ndarray class");
    return Make(K::kNpArray);
  }
  if (m == "numpy" && n == "dtype") {
    CKPT_RETURN_IF_ERROR(need(1, 3));
    CKPT_ASSIGN_OR_RETURN(std::string code, AsStr(a[0], "numpy dtype"));
    auto o = Make(K::kNpDType);
    o->s = code;
    o->s2 = "|";
    return o;
  }
  if (m == "numpy.core.multiarray" && n == "scalar") {
    CKPT_RETURN_IF_ERROR(need(2, 2));
    if (a[1]->kind != K::kBytes)
      return Refuse("numpy scalar data is not bytes");
    return NumpyScalar(a[0], a[1]->bytes);
  }
  if (m == "numpy.core.numeric" && n == "_frombuffer") {
    CKPT_RETURN_IF_ERROR(need(4, 4));
    if (a[0]->kind != K::kBytes)
      return Refuse("numpy _frombuffer data is not bytes");
    CKPT_ASSIGN_OR_RETURN(auto shape, AsInts(a[2], "numpy shape"));
    CKPT_ASSIGN_OR_RETURN(std::string order, AsStr(a[3], "numpy order"));
    return NumpyArray(a[1], shape, order == "F", a[0]->bytes);
  }
  return Refuse("'" + m + "." + n + "' cannot be called here");
}

Status Machine::Build(const Obj& target, const Obj& state) {
  switch (target->kind) {
    case K::kDict:
      if (target->s2 == "argparse.Namespace") {
        if (state->kind != K::kDict)
          return Refuse("Namespace state is not a dict");
        target->keys = state->keys;
        target->items = state->items;
        return Status::OK();
      }
      // OrderedDict attributes such as a state_dict's `_metadata` (module
      // version numbers) are not items; they are dropped.
      if (state->kind != K::kDict && state->kind != K::kNone &&
          state->kind != K::kTuple) {
        return Refuse("BUILD state of a dict is a " +
                      std::string(KindName(state->kind)));
      }
      return Status::OK();
    case K::kNpDType:
      if (state->kind != K::kTuple || state->items.size() < 2 ||
          state->items[1]->kind != K::kStr) {
        return Refuse("numpy dtype state is not understood");
      }
      target->s2 = state->items[1]->s;
      if (state->items.size() > 3 && state->items[3]->kind != K::kNone) {
        return Refuse("structured numpy dtypes are not supported");
      }
      return Status::OK();
    case K::kNpArray: {
      if (state->kind != K::kTuple || state->items.size() != 5) {
        return Refuse("numpy array state is not understood");
      }
      const auto& s = state->items;
      CKPT_ASSIGN_OR_RETURN(auto shape, AsInts(s[1], "numpy shape"));
      if (s[3]->kind != K::kBool)
        return Refuse("numpy fortran flag is not a bool");
      std::vector<uint8_t> data;
      if (s[4]->kind == K::kBytes) {
        data = s[4]->bytes;
      } else if (s[4]->kind == K::kStr) {
        // Python 2's str of raw bytes, or latin-1 text (numpy encodes it).
        auto raw = StrBytes(*s[4]);
        if (!raw) return Refuse("numpy array data is text above U+00FF");
        data = std::move(*raw);
      } else {
        return Refuse("numpy object arrays cannot be converted");
      }
      CKPT_ASSIGN_OR_RETURN(Obj arr,
                            NumpyArray(s[2], shape, s[3]->i != 0, data));
      target->kind = K::kTensor;
      target->tensor = arr->tensor;
      return Status::OK();
    }
    case K::kTensor:
      if (state->kind == K::kNone ||
          (state->kind == K::kDict && state->items.empty())) {
        return Status::OK();
      }
      return Refuse("tensor with extra Python attributes cannot be converted");
    default:
      return Refuse(std::string("BUILD on a ") + KindName(target->kind));
  }
}

Result<Obj> Machine::Run(size_t* consumed) {
  while (pos_ < d_.size()) {
    op_at_ = pos_;
    if (pos_ > lim_.max_bytes) {
      return Refuse("pickle longer than " + std::to_string(lim_.max_bytes) +
                    " bytes (the pickle limit, max_pickle_bytes)");
    }
    auto op = static_cast<uint8_t>(d_[pos_++]);
    switch (op) {
      case 0x80: {  // PROTO
        CKPT_ASSIGN_OR_RETURN(uint64_t v, U(1));
        if (op_at_ != 0) return Bad("PROTO not at the start");
        if (v > 5)
          return Refuse("pickle protocol " + std::to_string(v) +
                        " is newer than 5");
        proto_ = static_cast<int>(v);
        break;
      }
      case 0x95: {  // FRAME
        CKPT_ASSIGN_OR_RETURN(uint64_t n, U(8));
        if (n > d_.size() - pos_) return Bad("FRAME longer than the data left");
        break;
      }
      case '.': {  // STOP
        if (stack_.size() != 1 || !marks_.empty()) {
          return Bad("STOP with " + std::to_string(stack_.size()) +
                     " items on the stack");
        }
        *consumed = pos_;
        return stack_.back();
      }
      case '(':
        if (marks_.size() >= lim_.max_marks)
          return Bad("too many nested MARKs");
        marks_.push_back(stack_.size());
        break;
      case '0':
        CKPT_RETURN_IF_ERROR(Pop().status());
        break;
      case '1':
        CKPT_RETURN_IF_ERROR(PopMark().status());
        break;
      case '2': {
        CKPT_ASSIGN_OR_RETURN(Obj t, Top());
        CKPT_RETURN_IF_ERROR(Push(t));
        break;
      }
      case 'c': {  // GLOBAL
        CKPT_ASSIGN_OR_RETURN(std::string module, Line());
        CKPT_ASSIGN_OR_RETURN(std::string name, Line());
        CKPT_RETURN_IF_ERROR(Global(module, name));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        CKPT_ASSIGN_OR_RETURN(Obj name, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj module, Pop());
        if (name->kind != K::kStr || module->kind != K::kStr) {
          return Refuse("STACK_GLOBAL operands are not strings");
        }
        CKPT_RETURN_IF_ERROR(Global(module->s, name->s));
        break;
      }
      case 'q': {
        CKPT_ASSIGN_OR_RETURN(uint64_t i, U(1));
        CKPT_RETURN_IF_ERROR(Memo(i));
        break;
      }
      case 'r': {
        CKPT_ASSIGN_OR_RETURN(uint64_t i, U(4));
        CKPT_RETURN_IF_ERROR(Memo(i));
        break;
      }
      case 0x94:
        CKPT_RETURN_IF_ERROR(Memo(memo_.size()));
        break;
      case 'h': {
        CKPT_ASSIGN_OR_RETURN(uint64_t i, U(1));
        CKPT_RETURN_IF_ERROR(MemoGet(i));
        break;
      }
      case 'j': {
        CKPT_ASSIGN_OR_RETURN(uint64_t i, U(4));
        CKPT_RETURN_IF_ERROR(MemoGet(i));
        break;
      }
      case 'p': {  // PUT (text)
        CKPT_ASSIGN_OR_RETURN(std::string l, Line());
        CKPT_ASSIGN_OR_RETURN(Obj i, IntFromText(l));
        if (i->kind != K::kInt || i->i < 0) return Bad("bad PUT index");
        CKPT_RETURN_IF_ERROR(Memo(static_cast<uint64_t>(i->i)));
        break;
      }
      case 'g': {  // GET (text)
        CKPT_ASSIGN_OR_RETURN(std::string l, Line());
        CKPT_ASSIGN_OR_RETURN(Obj i, IntFromText(l));
        if (i->kind != K::kInt || i->i < 0) return Bad("bad GET index");
        CKPT_RETURN_IF_ERROR(MemoGet(static_cast<uint64_t>(i->i)));
        break;
      }
      case 't':
      case 'l': {  // TUPLE, LIST (from mark)
        CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
        auto o = Make(op == 't' ? K::kTuple : K::kList);
        o->items = std::move(items);
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 0x85:
      case 0x86:
      case 0x87: {  // TUPLE1..3
        size_t n = op - 0x84u;
        auto o = Make(K::kTuple);
        o->items.resize(n);
        for (size_t k = n; k-- > 0;) {
          CKPT_ASSIGN_OR_RETURN(o->items[k], Pop());
        }
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case ')':
        CKPT_RETURN_IF_ERROR(Push(Make(K::kTuple)));
        break;
      case ']':
        CKPT_RETURN_IF_ERROR(Push(Make(K::kList)));
        break;
      case '}':
        CKPT_RETURN_IF_ERROR(Push(Make(K::kDict)));
        break;
      case 0x8f:
        CKPT_RETURN_IF_ERROR(Push(Make(K::kSet)));
        break;
      case 'd': {  // DICT (from mark)
        CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
        if (items.size() % 2) return Bad("DICT with an odd number of items");
        auto o = Make(K::kDict);
        for (size_t k = 0; k < items.size(); k += 2) {
          o->keys.push_back(items[k]);
          o->items.push_back(items[k + 1]);
        }
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 'a': {  // APPEND
        CKPT_ASSIGN_OR_RETURN(Obj v, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj l, Top());
        if (l->kind != K::kList)
          return Refuse(std::string("APPEND to a ") + KindName(l->kind));
        l->items.push_back(std::move(v));
        CKPT_RETURN_IF_ERROR(Charge(2 * sizeof(Obj)));
        break;
      }
      case 'e':
      case 0x90: {  // APPENDS, ADDITEMS
        CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
        CKPT_ASSIGN_OR_RETURN(Obj l, Top());
        K want = op == 'e' ? K::kList : K::kSet;
        if (l->kind != want)
          return Refuse(std::string(op == 'e' ? "APPENDS" : "ADDITEMS") +
                        " to a " + KindName(l->kind));
        for (auto& it : items) l->items.push_back(std::move(it));
        CKPT_RETURN_IF_ERROR(Charge(2 * sizeof(Obj) * items.size()));
        break;
      }
      case 0x91: {  // FROZENSET
        CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
        auto o = Make(K::kFrozenSet);
        o->items = std::move(items);
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 's': {  // SETITEM
        CKPT_ASSIGN_OR_RETURN(Obj v, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj k, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj d, Top());
        if (d->kind != K::kDict)
          return Refuse(std::string("SETITEM on a ") + KindName(d->kind));
        d->keys.push_back(std::move(k));
        d->items.push_back(std::move(v));
        CKPT_RETURN_IF_ERROR(Charge(4 * sizeof(Obj)));
        break;
      }
      case 'u': {  // SETITEMS
        CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
        CKPT_ASSIGN_OR_RETURN(Obj d, Top());
        if (d->kind != K::kDict)
          return Refuse(std::string("SETITEMS on a ") + KindName(d->kind));
        if (items.size() % 2)
          return Bad("SETITEMS with an odd number of items");
        for (size_t k = 0; k < items.size(); k += 2) {
          d->keys.push_back(std::move(items[k]));
          d->items.push_back(std::move(items[k + 1]));
        }
        CKPT_RETURN_IF_ERROR(Charge(2 * sizeof(Obj) * items.size()));
        break;
      }
      case 'J': {
        CKPT_ASSIGN_OR_RETURN(uint64_t v, U(4));
        auto o = Make(K::kInt);
        o->i = static_cast<int32_t>(static_cast<uint32_t>(v));
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 'K':
      case 'M': {
        CKPT_ASSIGN_OR_RETURN(uint64_t v, U(op == 'K' ? 1 : 2));
        auto o = Make(K::kInt);
        o->i = static_cast<int64_t>(v);
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 0x8a:
      case 0x8b: {  // LONG1, LONG4
        CKPT_ASSIGN_OR_RETURN(uint64_t n, U(op == 0x8a ? 1 : 4));
        if (op == 0x8b && (n & 0x80000000u))
          return Bad("negative LONG4 length");
        if (n > lim_.max_long_bytes) {
          return Refuse("integer of " + std::to_string(n) + " bytes (limit " +
                        std::to_string(lim_.max_long_bytes) + ")");
        }
        CKPT_ASSIGN_OR_RETURN(auto b, Take(n));
        CKPT_ASSIGN_OR_RETURN(Obj o, IntFromLE(b));
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 'I':
      case 'L': {  // INT, LONG (text)
        CKPT_ASSIGN_OR_RETURN(std::string l, Line());
        if (op == 'I' && (l == "01" || l == "00")) {
          auto o = Make(K::kBool);
          o->i = l == "01";
          CKPT_RETURN_IF_ERROR(Push(o));
        } else {
          CKPT_ASSIGN_OR_RETURN(Obj o, IntFromText(l));
          CKPT_RETURN_IF_ERROR(Push(o));
        }
        break;
      }
      case 'G': {  // BINFLOAT, big-endian
        CKPT_ASSIGN_OR_RETURN(auto b, Take(8));
        uint64_t bits = 0;
        for (std::byte x : b) bits = (bits << 8) | static_cast<uint64_t>(x);
        auto o = Make(K::kFloat);
        std::memcpy(&o->f, &bits, 8);
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 'F': {  // FLOAT (text)
        CKPT_ASSIGN_OR_RETURN(std::string l, Line());
        auto o = Make(K::kFloat);
        char* end = nullptr;
        o->f = std::strtod(l.c_str(), &end);
        if (end == l.c_str() || *end != '\0') return Bad("bad float literal");
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 'X':
      case 0x8c:
      case 0x8d:
      case 'T':
      case 'U': {  // strings
        int w = op == 0x8c || op == 'U' ? 1 : op == 0x8d ? 8 : 4;
        CKPT_ASSIGN_OR_RETURN(uint64_t n, U(w));
        if (op == 'T' && (n & 0x80000000u))
          return Bad("negative BINSTRING length");
        CKPT_ASSIGN_OR_RETURN(auto b, Take(n));
        CKPT_ASSIGN_OR_RETURN(Obj o,
                              op == 'T' || op == 'U' ? Py2Str(b) : Str(b));
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      case 'B':
      case 'C':
      case 0x8e:
      case 0x96: {  // bytes, bytearray
        int w = op == 'C' ? 1 : op == 'B' ? 4 : 8;
        CKPT_ASSIGN_OR_RETURN(uint64_t n, U(w));
        CKPT_ASSIGN_OR_RETURN(auto b, Take(n));
        CKPT_ASSIGN_OR_RETURN(Obj o, BytesObj(b));
        CKPT_RETURN_IF_ERROR(Push(o));
        break;
      }
      // None, True and False are immutable here: one object each, so a
      // pickle of millions of them costs stack slots, not objects.
      case 'N':
        CKPT_RETURN_IF_ERROR(Push(Singleton(K::kNone, 0)));
        break;
      case 0x88:
      case 0x89:
        CKPT_RETURN_IF_ERROR(Push(Singleton(K::kBool, op == 0x88)));
        break;
      case 'R': {  // REDUCE
        CKPT_ASSIGN_OR_RETURN(Obj args, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj fn, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj r, Call(fn, args));
        CKPT_RETURN_IF_ERROR(Push(r));
        break;
      }
      case 0x81: {  // NEWOBJ
        CKPT_ASSIGN_OR_RETURN(Obj args, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj cls, Pop());
        if (IsGlobal(cls, "argparse", "Namespace")) {
          auto d = Make(K::kDict);
          d->s2 = "argparse.Namespace";
          CKPT_RETURN_IF_ERROR(Push(d));
        } else if (IsGlobal(cls, "collections", "OrderedDict")) {
          auto d = Make(K::kDict);
          d->s2 = "collections.OrderedDict";
          CKPT_RETURN_IF_ERROR(Push(d));
        } else {
          return Refuse(std::string("NEWOBJ of ") +
                        (cls->kind == K::kGlobal
                             ? "'" + cls->s + "." + cls->s2 + "'"
                             : std::string(KindName(cls->kind))));
        }
        break;
      }
      case 'b': {  // BUILD
        CKPT_ASSIGN_OR_RETURN(Obj state, Pop());
        CKPT_ASSIGN_OR_RETURN(Obj target, Top());
        CKPT_RETURN_IF_ERROR(Build(target, state));
        break;
      }
      case 'Q': {  // BINPERSID
        CKPT_ASSIGN_OR_RETURN(Obj pid, Pop());
        if (!pl_) return Refuse("persistent id outside a torch.save archive");
        auto r = pl_(pid);
        if (!r.ok()) {
          return Fail(r.status().code(), r.status().message());
        }
        CKPT_RETURN_IF_ERROR(Push(*r));
        break;
      }
      case 'P':
        return Refuse(
            "text persistent id (pickle protocol 0); torch cannot load these "
            "files either: re-save with torch.save's default protocol");
      case 'S':
      case 'V':
        return Refuse("text-mode (protocol 0) strings are not supported");
      case 'i':
      case 'o':
      case 0x92:
      case 0x82:
      case 0x83:
      case 0x84:
      case 0x97:
      case 0x98: {
        static const std::map<uint8_t, const char*> kNames = {
            {'i', "INST"},         {'o', "OBJ"},
            {0x92, "NEWOBJ_EX"},   {0x82, "EXT1"},
            {0x83, "EXT2"},        {0x84, "EXT4"},
            {0x97, "NEXT_BUFFER"}, {0x98, "READONLY_BUFFER"}};
        return Refuse(std::string("pickle opcode ") + kNames.at(op) +
                      " is not allowed in a checkpoint");
      }
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        return Bad(std::string("unknown pickle opcode ") + hex);
      }
    }
  }
  op_at_ = pos_;
  return Bad("truncated pickle: no STOP");
}

}  // namespace

Result<Obj> Unpickle(std::span<const std::byte> data, const std::string& where,
                     int64_t file_offset, const PersistentLoad& persistent_load,
                     size_t* consumed, PickleHeap* heap,
                     const PickleLimits& limits) {
  Machine m(data, where, file_offset, persistent_load, heap, limits);
  return m.Run(consumed);
}

}  // namespace ckpt::internal
