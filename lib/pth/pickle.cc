#include <algorithm>
#include <array>
#include <bit>
#include <cctype>
#include <cmath>
#include <cstring>
#include <string_view>
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

const PyExt PyObj::kEmpty;
const PyRare PyExt::kEmpty;

PyObj::~PyObj() {
  if (!ext_) return;
  std::vector<Obj> pending;
  auto take = [&pending](PyObj& o) {
    if (!o.ext_) return;
    std::vector<Obj>* keys = o.ext_->has_rare() ? &o.ext_->rw().keys : nullptr;
    for (auto* v : {&o.ext_->items, keys}) {
      if (!v) continue;
      for (auto& c : *v) {
        // Only children this node owns alone die with it.
        if (c && c.use_count() == 1) pending.push_back(std::move(c));
      }
      v->clear();
    }
  };
  take(*this);
  while (!pending.empty()) {
    Obj o = std::move(pending.back());
    pending.pop_back();
    take(*o);
  }  // each `o` is destroyed here with no children left
}

PickleHeap::~PickleHeap() {
  for (auto& c : containers_) {
    if (!c->has_ext()) continue;
    c->w().items.clear();
    if (c->x().has_rare()) c->w().rw().keys.clear();
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
  // A container's children live in its PyExt: made now, so that Push
  // charges it with the node.
  const auto tree = TreeKind(k);
  if (tree && IsContainer(*tree)) o->w();
  if (k == K::kDict) o->w().rw();  // its keys
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
  if (o.i == kPy2Str || o.i == kPy2Undecodable) return o.x().r().bytes;
  return Utf8ToLatin1(o.x().s);
}

// A Python object state that sets nothing: None or {}, or the
// (__dict__, slots) pair torch's _get_obj_state gives, each None or {}.
bool EmptyState(const Obj& state) {
  auto empty = [](const Obj& o) {
    return o->kind == K::kNone || (o->kind == K::kDict && o->x().items.empty());
  };
  if (state->kind == K::kTuple && state->x().items.size() == 2) {
    return empty(state->x().items[0]) && empty(state->x().items[1]);
  }
  return empty(state);
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

std::string KindName(K k) { return std::string(PyKindName(k)); }

class Machine;

// What REDUCE or NEWOBJ of an allowlisted global does with its arguments
// (already checked against the row's arity), and what BUILD does with the
// state of an object that row made.
struct GlobalRow;
using CallFn = Result<Obj> (Machine::*)(const GlobalRow& row,
                                        std::span<const Obj> args);
using BuildFn = Status (Machine::*)(PyObj& target, const Obj& state);

// One row of the allowlist: every global the reader knows, allowed or
// refused with its reason. GLOBAL/STACK_GLOBAL find the first matching row
// (is it allowed? which refusal text?), and REDUCE, NEWOBJ and BUILD
// dispatch to its handlers. A name no row matches is refused as
// "forbidden", naming what its module does allow.
struct GlobalRow {
  std::string_view module;  // exact; "torch.nn*": any module with that prefix
  std::string_view name;    // exact; "*": any name
  // Allowed rows: what each opcode applied to the global does. An allowed
  // row with no handler is a class only used as an argument
  // (numpy.ndarray to _reconstruct, torch.Tensor to _rebuild_from_type_v2).
  CallFn reduce = nullptr;
  uint8_t min_args = 0, max_args = 0;  // REDUCE's argument count
  CallFn newobj = nullptr;             // NEWOBJ (its arguments are unused)
  BuildFn build = nullptr;             // BUILD on what reduce/newobj made
  bool refused = false;
  // Refused rows: why ("" = the generic "forbidden" text). "%" stands for
  // "module.name".
  std::string_view reason = {};
};

bool RowMatches(const GlobalRow& r, std::string_view m, std::string_view n) {
  const bool module_ok =
      r.module.ends_with('*')
          ? m.starts_with(r.module.substr(0, r.module.size() - 1))
          : m == r.module;
  return module_ok && (r.name == "*" || n == r.name);
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
        lim_(limits),
        rows_(limits.profile == PickleProfile::kDcpMetadata ? DcpAllowlist()
                                                            : Allowlist()) {}

  Result<Obj> Run(size_t* consumed);

 private:
  using Op = Status (Machine::*)(uint8_t op);
  struct OpRow {
    uint8_t code;
    const char* name;
    Op fn;
  };
  static std::span<const GlobalRow> Allowlist();
  static std::span<const GlobalRow> DcpAllowlist();
  bool dcp() const { return lim_.profile == PickleProfile::kDcpMetadata; }
  static std::span<const OpRow> Opcodes();
  static const std::array<Op, 256>& OpTable();

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

  // ---- reading the opcode stream
  Result<std::span<const std::byte>> Take(uint64_t n) {
    if (!RangeWithin(pos_, n, d_.size())) {
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

  // ---- stack, marks, memo and the memory budget
  Status Push(Obj o);
  static uint64_t Cost(const PyObj& o);
  Status Charge(uint64_t n);
  Result<Obj> Pop() {
    if (stack_.size() <= Floor()) return Bad("pickle stack underflow");
    Obj o = std::move(stack_.back());
    stack_.pop_back();
    return o;
  }
  size_t Floor() const { return marks_.empty() ? 0 : marks_.back(); }
  Result<std::vector<Obj>> PopMark();
  Result<Obj> Top() {
    if (stack_.size() <= Floor()) return Bad("pickle stack underflow");
    return stack_.back();
  }
  Status Memo(uint64_t idx);
  Status MemoGet(uint64_t idx);

  // ---- scalar values
  Result<Obj> IntFromLE(std::span<const std::byte> b);
  Result<Obj> IntFromText(std::string text);
  Result<Obj> Str(std::span<const std::byte> b);
  Result<Obj> Py2Str(std::span<const std::byte> b);
  Result<Obj> BytesObj(std::span<const std::byte> b);
  Obj Singleton(K k, int64_t v) {
    Obj& slot = k == K::kNone ? none_ : v ? true_ : false_;
    if (!slot) {
      slot = Make(k);
      slot->i = v;
    }
    return slot;
  }

  // ---- opcode handlers, one per family (Opcodes() maps codes to them)
  Status OpProto(uint8_t op);
  Status OpFrame(uint8_t op);
  Status OpStop(uint8_t op);
  Status OpMark(uint8_t op);
  Status OpPop(uint8_t op);
  Status OpPopMark(uint8_t op);
  Status OpDup(uint8_t op);
  Status OpGlobal(uint8_t op);
  Status OpStackGlobal(uint8_t op);
  Status OpPut(uint8_t op);
  Status OpGet(uint8_t op);
  Status OpTextMemo(uint8_t op);
  Status OpSequence(uint8_t op);
  Status OpTupleN(uint8_t op);
  Status OpEmpty(uint8_t op);
  Status OpDict(uint8_t op);
  Status OpAppend(uint8_t op);
  Status OpAppends(uint8_t op);
  Status OpFrozenSet(uint8_t op);
  Status OpSetItem(uint8_t op);
  Status OpSetItems(uint8_t op);
  Status OpBinInt(uint8_t op);
  Status OpLong(uint8_t op);
  Status OpTextInt(uint8_t op);
  Status OpBinFloat(uint8_t op);
  Status OpTextFloat(uint8_t op);
  Status OpString(uint8_t op);
  Status OpBytes(uint8_t op);
  Status OpSingleton(uint8_t op);
  Status OpReduce(uint8_t op);
  Status OpNewObj(uint8_t op);
  Status OpBuild(uint8_t op);
  Status OpBinPersId(uint8_t op);
  Status OpTextPersId(uint8_t op);
  Status OpTextString(uint8_t op);
  Status OpForbidden(uint8_t op);
  Status OpUnknown(uint8_t op);

  // ---- globals and what they construct
  Status Global(std::string module, std::string name);
  Result<Obj> DataGlobal(const std::string& module, const std::string& name);
  const GlobalRow* RowOf(const PyObj& fn) const {
    return fn.kind == K::kGlobal && fn.row ? &rows_[fn.row - 1u] : nullptr;
  }
  Result<Obj> Apply(CallFn fn, const GlobalRow& row, std::span<const Obj> a);
  Result<Obj> Call(const Obj& fn, const Obj& args);
  Status Build(PyObj& target, const Obj& state);

  // REDUCE handlers (the rows of Allowlist()).
  Result<Obj> CallRebuildTensor(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallRebuildTensorV3(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallRebuildParameter(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallRebuildFromType(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallOrderedDict(const GlobalRow& r, std::span<const Obj> a);
  Result<Obj> CallSize(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallDevice(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallEncode(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallSet(const GlobalRow& r, std::span<const Obj> a);
  Result<Obj> CallComplex(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallSlice(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallBytes(const GlobalRow& r, std::span<const Obj> a);
  Result<Obj> CallReconstructor(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallNpReconstruct(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallNpDType(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallNpScalar(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallNpFromBuffer(const GlobalRow&, std::span<const Obj> a);
  // NEWOBJ handler: a dict tagged with the class (OrderedDict, Namespace).
  Result<Obj> NewTaggedDict(const GlobalRow& r, std::span<const Obj> a);
  // DCP metadata (DcpAllowlist()).
  Result<Obj> CallDcpEnum(const GlobalRow& r, std::span<const Obj> a);
  Result<Obj> CallGetattr(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallLayout(const GlobalRow&, std::span<const Obj> a);
  Result<Obj> CallPath(const GlobalRow&, std::span<const Obj> a);
  Status BuildDcpObject(PyObj& target, const Obj& state);
  // BUILD handlers.
  Status BuildNamespace(PyObj& target, const Obj& state);
  Status BuildDictAttrs(PyObj& target, const Obj& state);
  Status BuildNpDType(PyObj& target, const Obj& state);
  Status BuildNpArray(PyObj& target, const Obj& state);
  Status BuildTensor(PyObj& target, const Obj& state);

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
    if (o->x().items.size() > kMaxRank)
      return Refuse(std::string(what) + " has more than 64 dims");
    std::vector<int64_t> v;
    for (const auto& x : o->x().items) {
      CKPT_ASSIGN_OR_RETURN(int64_t i, AsInt(x, what));
      v.push_back(i);
    }
    return v;
  }
  Result<std::string> AsStr(const Obj& o, const char* what) {
    if (o->kind == K::kStr) return o->x().s;
    return Refuse(std::string(what) + " must be a str, got " +
                  KindName(o->kind));
  }
  bool IsGlobal(const Obj& o, const char* m, const char* n) const {
    return o->kind == K::kGlobal && o->x().s == m && o->x().r().s2 == n;
  }

  Result<Obj> RebuildTensor(std::span<const Obj> a, bool v3);
  Result<Obj> NumpyArray(const Obj& dtype, const std::vector<int64_t>& shape,
                         bool fortran, std::span<const uint8_t> data);
  Result<Obj> NumpyScalar(const Obj& dtype, std::span<const uint8_t> data);

  std::span<const std::byte> d_;
  std::string where_;
  int64_t file_offset_;
  const PersistentLoad& pl_;
  PickleHeap* heap_;
  PickleLimits lim_;
  std::span<const GlobalRow> rows_;  // Allowlist() or DcpAllowlist()
  size_t pos_ = 0;
  size_t op_at_ = 0;
  bool stopped_ = false;  // STOP ran: the top of the stack is the value
  uint64_t objects_ = 0;
  uint64_t memory_ = 0;  // charged by Push/Charge
  int proto_ = 0;
  int call_depth_ = 0;
  std::vector<Obj> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Obj> memo_;
  Obj none_, true_, false_, empty_tuple_;
};

// ---- the allowlist --------------------------------------------------------

std::span<const GlobalRow> Machine::Allowlist() {
  using M = Machine;
  static const GlobalRow kRows[] = {
      // torch's tensor and parameter rebuild functions.
      {"torch._utils", "_rebuild_tensor", &M::CallRebuildTensor, 4, 4},
      {"torch._utils", "_rebuild_tensor_v2", &M::CallRebuildTensor, 6, 7},
      {"torch._utils", "_rebuild_tensor_v3", &M::CallRebuildTensorV3, 7, 8},
      {"torch._utils", "_rebuild_parameter", &M::CallRebuildParameter, 3, 3},
      {"torch._utils", "_rebuild_parameter_with_state",
       &M::CallRebuildParameter, 4, 4},
      {"torch._tensor", "_rebuild_from_type_v2", &M::CallRebuildFromType, 4, 4},
      {"torch", "Size", &M::CallSize, 1, 1},
      {"torch", "device", &M::CallDevice, 1, 2},
      {"torch", "Tensor"},                  // _rebuild_from_type_v2's class
      {"torch.nn.parameter", "Parameter"},  // the same, for a Parameter
      // Containers and values.
      {"collections", "OrderedDict", &M::CallOrderedDict, 0, 1,
       &M::NewTaggedDict, &M::BuildDictAttrs},
      {"argparse", "Namespace", nullptr, 0, 0, &M::NewTaggedDict,
       &M::BuildNamespace},
      {"_codecs", "encode", &M::CallEncode, 1, 2},
      {"builtins", "set", &M::CallSet, 0, 1},
      {"builtins", "frozenset", &M::CallSet, 0, 1},
      {"builtins", "complex", &M::CallComplex, 1, 2},
      {"builtins", "slice", &M::CallSlice, 1, 3},
      {"builtins", "bytes", &M::CallBytes, 0, 2},
      {"builtins", "bytearray", &M::CallBytes, 0, 2},
      // Protocols 0-1 make plain objects as _reconstructor(cls, object,
      // None); object is only accepted as that base.
      {"copyreg", "_reconstructor", &M::CallReconstructor, 3, 3},
      {"builtins", "object"},
      // numpy arrays, dtypes and scalars.
      {"numpy.core.multiarray", "_reconstruct", &M::CallNpReconstruct, 3, 3,
       nullptr, &M::BuildNpArray},
      {"numpy", "ndarray"},  // _reconstruct's class
      {"numpy", "dtype", &M::CallNpDType, 1, 3, nullptr, &M::BuildNpDType},
      {"numpy.core.multiarray", "scalar", &M::CallNpScalar, 2, 2},
      {"numpy.core.numeric", "_frombuffer", &M::CallNpFromBuffer, 4, 4},
      // Known names refused with a reason more useful than "forbidden".
      {.module = "torch._utils",
       .name = "_rebuild_qtensor",
       .refused = true,
       .reason = "quantized tensors are not supported"},
      {.module = "torch._utils",
       .name = "_rebuild_sparse_tensor",
       .refused = true,
       .reason = "sparse tensors are not supported"},
      {.module = "torch._utils",
       .name = "_rebuild_sparse_csr_tensor",
       .refused = true,
       .reason = "sparse tensors are not supported"},
      {.module = "torch.serialization",
       .name = "_get_layout",
       .refused = true,
       .reason = "sparse tensors are not supported"},
      {.module = "torch._utils",
       .name = "_rebuild_meta_tensor_no_storage",
       .refused = true,
       .reason = "meta tensors have no data to convert"},
      {.module = "torch._utils",
       .name = "_rebuild_wrapper_subclass",
       .refused = true,
       .reason = "tensor subclasses without data are not supported"},
      {.module = "torch._utils",
       .name = "_rebuild_nested_tensor",
       .refused = true,
       .reason = "nested tensors are not supported"},
      {.module = "torch._utils",
       .name = "_rebuild_device_tensor_from_numpy",
       .refused = true,
       .reason = "XLA/ORT device tensors are not supported"},
      {.module = "torch._utils",
       .name = "_rebuild_xla_tensor",
       .refused = true,
       .reason = "XLA/ORT device tensors are not supported"},
      {.module = "torch.storage",
       .name = "_load_from_bytes",
       .refused = true,
       .reason = "a torch.save file nested inside the pickle is not supported"},
      {.module = "torch.nn.modules*",
       .name = "*",
       .refused = true,
       .reason = "a whole nn.Module is pickled here; save model.state_dict() "
                 "instead"},
      // A Parameter spelled under another torch.nn module is not a module:
      // plainly forbidden.
      {.module = "torch.nn*", .name = "Parameter", .refused = true},
      {.module = "torch.nn*",
       .name = "*",
       .refused = true,
       .reason = "a whole nn.Module is pickled here; save model.state_dict() "
                 "instead"},
      {.module = "__torch__*",
       .name = "*",
       .refused = true,
       .reason = "TorchScript objects are not supported"},
      {.module = "__main__",
       .name = "*",
       .refused = true,
       .reason = "custom class '%' cannot be converted without running its "
                 "code"},
  };
  return kRows;
}

// What torch.distributed.checkpoint pickles into `.metadata` (Metadata
// and what it holds, filesystem.py's _StorageInfo): each dataclass is a
// dict tagged "module.Class" with its fields. Nothing else of torch, no
// tensors or storages: only the dtypes DataGlobal gives.
std::span<const GlobalRow> Machine::DcpAllowlist() {
  using M = Machine;
  static const GlobalRow kRows[] = {
      {"torch.distributed.checkpoint.metadata", "Metadata", nullptr, 0, 0,
       &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed.checkpoint.metadata", "TensorStorageMetadata",
       nullptr, 0, 0, &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed.checkpoint.metadata", "BytesStorageMetadata", nullptr,
       0, 0, &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed.checkpoint.metadata", "ChunkStorageMetadata", nullptr,
       0, 0, &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed.checkpoint.metadata", "TensorProperties", nullptr, 0,
       0, &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed.checkpoint.metadata", "MetadataIndex", nullptr, 0, 0,
       &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed.checkpoint.metadata", "StorageMeta", nullptr, 0, 0,
       &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed.checkpoint.filesystem", "_StorageInfo", nullptr, 0, 0,
       &M::NewTaggedDict, &M::BuildDcpObject},
      // The memory-format enum TensorProperties pickles: by name through
      // getattr (Python >= 3.11), by value through the class (before).
      {"torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING",
       &M::CallDcpEnum, 1, 1},
      {"builtins", "getattr", &M::CallGetattr, 2, 2},
      // torch < 2.1 defined TensorProperties in the sharded-tensor module.
      {"torch.distributed._shard.sharded_tensor.metadata", "TensorProperties",
       nullptr, 0, 0, &M::NewTaggedDict, &M::BuildDcpObject},
      {"torch.distributed._shard.sharded_tensor.metadata",
       "MEM_FORMAT_ENCODING", &M::CallDcpEnum, 1, 1},
      {"torch", "Size", &M::CallSize, 1, 1},
      {"torch.serialization", "_get_layout", &M::CallLayout, 1, 1},
      // StorageMeta.checkpoint_id may be a path object.
      {"pathlib", "PosixPath", &M::CallPath, 0, 255},
      {"pathlib", "PurePosixPath", &M::CallPath, 0, 255},
      {"pathlib", "WindowsPath", &M::CallPath, 0, 255},
      {"pathlib", "PureWindowsPath", &M::CallPath, 0, 255},
      {"collections", "OrderedDict", &M::CallOrderedDict, 0, 1,
       &M::NewTaggedDict, &M::BuildDictAttrs},
  };
  return kRows;
}

const GlobalRow* FindRow(std::span<const GlobalRow> rows, std::string_view m,
                         std::string_view n) {
  for (const GlobalRow& r : rows) {
    if (RowMatches(r, m, n)) return &r;
  }
  return nullptr;
}

// "forbidden global ..." for a name no row allows, listing what its module
// does allow, so a near miss (a newer torch's _rebuild_tensor_v4) says
// what this reader knows.
std::string ForbiddenText(std::span<const GlobalRow> rows,
                          const std::string& module, const std::string& label,
                          const char* types) {
  std::string allowed;
  for (const GlobalRow& r : rows) {
    if (r.refused || r.module != module) continue;
    allowed += (allowed.empty() ? "" : ", ") + std::string(r.name);
  }
  std::string msg =
      "forbidden global " + label + ": not on the allowlist of " + types;
  if (!allowed.empty()) msg += " (" + module + " allows " + allowed + ")";
  return msg + "; nothing was run";
}

Status Machine::Global(std::string module, std::string name) {
  module = CanonicalModule(std::move(module));
  const std::string label = "'" + module + " " + name + "'";
  const std::span<const GlobalRow> rows = rows_;
  const char* types =
      dcp() ? "DCP metadata types" : "torch.save checkpoint types";
  const GlobalRow* row = FindRow(rows, module, name);
  if (row && row->refused) {
    if (row->reason.empty()) {
      return Refuse(ForbiddenText(rows, module, label, types));
    }
    std::string why(row->reason);
    if (auto at = why.find('%'); at != std::string::npos) {
      why.replace(at, 1, module + "." + name);
    }
    return Refuse(why + " (global " + label + ")");
  }
  if (!row) {
    CKPT_ASSIGN_OR_RETURN(Obj data, DataGlobal(module, name));
    if (!data) return Refuse(ForbiddenText(rows, module, label, types));
    return Push(std::move(data));
  }
  auto o = Make(K::kGlobal);
  o->w().s = module;
  o->w().rw().s2 = name;
  o->row = static_cast<uint16_t>(row - rows.data() + 1);
  return Push(o);
}

// Globals that name data, not code: torch's storage classes (persistent
// ids) and dtypes. nullptr when `name` is none of them.
Result<Obj> Machine::DataGlobal(const std::string& module,
                                const std::string& name) {
  // DCP metadata names dtypes (TensorProperties), never storages.
  if (dcp()) {
    if (module != "torch") return Obj();
    if (auto d = DTypeFromName(name)) {
      auto o = Make(K::kDType);
      o->i = static_cast<int64_t>(*d);
      return o;
    }
    if (LooksLikeDType(name)) {
      return Refuse("unsupported dtype " + name + " (torch." + name +
                    " is not a dtype this version of ckpt knows)");
    }
    return Obj();
  }
  if ((module == "torch" || module == "torch.cuda") &&
      StorageClassDType(name)) {
    auto o = Make(K::kGlobal);
    o->w().s = "torch";
    o->w().rw().s2 = name;
    return o;
  }
  if (module == "torch.storage" &&
      (name == "UntypedStorage" || name == "_UntypedStorage")) {
    auto o = Make(K::kGlobal);
    o->w().s = "torch.storage";
    o->w().rw().s2 = "UntypedStorage";
    return o;
  }
  if (module == "torch") {
    if (auto d = DTypeFromName(name)) {
      auto o = Make(K::kDType);
      o->i = static_cast<int64_t>(*d);
      return o;
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
  return Obj();
}

// ---- stack, memo and the memory budget ------------------------------------

Status Machine::Push(Obj o) {
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
uint64_t Machine::Cost(const PyObj& o) {
  constexpr uint64_t kMalloc = 16;  // per-allocation overhead
  auto str = [](const std::string& x) -> uint64_t {
    return x.capacity() > 15 ? x.capacity() + 1 + kMalloc : 0;
  };
  // The node with its shared_ptr control block, in one allocation.
  uint64_t c = sizeof(PyObj) + 16 + kMalloc;
  if (!o.has_ext()) return c;
  const PyExt& x = o.x();
  c += sizeof(PyExt) + kMalloc + str(x.s);
  if (x.items.capacity()) c += x.items.capacity() * sizeof(Obj) + kMalloc;
  if (!x.has_rare()) return c;
  const PyRare& r = x.r();
  c += sizeof(PyRare) + kMalloc + str(r.s2);
  if (r.bytes.capacity()) c += r.bytes.capacity() + kMalloc;
  if (r.keys.capacity()) c += r.keys.capacity() * sizeof(Obj) + kMalloc;
  if (r.tensor) {
    c += sizeof(PyTensor) + 16 + 3 * kMalloc +
         (r.tensor->shape.capacity() + r.tensor->strides.capacity()) *
             sizeof(int64_t);
    if (r.tensor->storage && r.tensor->storage->inline_data) {
      c += sizeof(PyStorage) + r.tensor->storage->inline_data->capacity() +
           4 * kMalloc;
    }
  }
  return c;
}

// Adds `n` bytes and checks the total, stack and memo included.
Status Machine::Charge(uint64_t n) {
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

Result<std::vector<Obj>> Machine::PopMark() {
  if (marks_.empty()) return Bad("no MARK on the stack");
  size_t m = marks_.back();
  marks_.pop_back();
  std::vector<Obj> items(
      std::make_move_iterator(stack_.begin() + static_cast<long>(m)),
      std::make_move_iterator(stack_.end()));
  stack_.resize(m);
  return items;
}

Status Machine::Memo(uint64_t idx) {
  if (memo_.size() >= lim_.max_memo && !memo_.count(idx)) {
    return Bad("memo grows past " + std::to_string(lim_.max_memo) + " entries");
  }
  CKPT_ASSIGN_OR_RETURN(Obj top, Top());
  memo_[idx] = top;
  return Charge(0);
}

Status Machine::MemoGet(uint64_t idx) {
  auto it = memo_.find(idx);
  if (it == memo_.end())
    return Bad("memo index " + std::to_string(idx) + " was never set");
  return Push(it->second);
}

// ---- scalar values ----------------------------------------------------------

Result<Obj> Machine::IntFromLE(std::span<const std::byte> b) {
  if (b.empty()) return Make(K::kInt);
  if (b.size() > lim_.max_long_bytes) {
    return Refuse("integer of " + std::to_string(b.size()) + " bytes (limit " +
                  std::to_string(lim_.max_long_bytes) + ")");
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
    uint64_t v = LoadLE(b.data(), n);
    if (neg && n < 8) v |= ~uint64_t{0} << (8 * n);  // sign-extend
    auto o = Make(K::kInt);
    o->i = static_cast<int64_t>(v);
    return o;
  }
  auto o = Make(K::kBigInt);
  for (size_t i = 0; i < n; ++i)
    o->w().rw().bytes.push_back(static_cast<uint8_t>(b[i]));
  return o;
}

Result<Obj> Machine::IntFromText(std::string text) {
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
  return IntFromLE(std::as_bytes(std::span(mag)));
}

// Text (BINUNICODE...): UTF-8, refused where Python's pickle refuses it
// (UnicodeDecodeError) and for surrogates, which a ckpt string cannot hold.
Result<Obj> Machine::Str(std::span<const std::byte> b) {
  bool surrogate = false;
  if (std::string why = Utf8Problem(b, &surrogate); !why.empty()) {
    return surrogate ? Refuse("string with a " + why)
                     : Bad("string is not text: " + why);
  }
  auto o = Make(K::kStr);
  o->w().s.assign(reinterpret_cast<const char*>(b.data()), b.size());
  return o;
}

// A Python 2 str (BINSTRING, SHORT_BINSTRING): decoded as torch.load's
// `encoding` decodes it; its bytes are kept for numpy array data.
Result<Obj> Machine::Py2Str(std::span<const std::byte> b) {
  auto o = Make(K::kStr);
  o->i = kPy2Str;
  o->w().rw().bytes.resize(b.size());
  if (!b.empty()) std::memcpy(o->w().rw().bytes.data(), b.data(), b.size());
  bool surrogate = false;
  if (lim_.py2_latin1) {
    o->w().s = Latin1ToUtf8(b);
  } else if (Utf8Problem(b, &surrogate).empty()) {
    o->w().s.assign(reinterpret_cast<const char*>(b.data()), b.size());
  } else {
    o->w().s = Latin1ToUtf8(b);  // for messages; refused if used as text
    o->i = kPy2Undecodable;
  }
  return o;
}

Result<Obj> Machine::BytesObj(std::span<const std::byte> b) {
  auto o = Make(K::kBytes);
  o->w().rw().bytes.resize(b.size());
  if (!b.empty()) std::memcpy(o->w().rw().bytes.data(), b.data(), b.size());
  return o;
}

// ---- REDUCE, NEWOBJ, BUILD --------------------------------------------------

// Runs a row's handler; what it makes remembers the row when BUILD has
// something to do for it.
Result<Obj> Machine::Apply(CallFn fn, const GlobalRow& row,
                           std::span<const Obj> a) {
  CKPT_ASSIGN_OR_RETURN(Obj r, (this->*fn)(row, a));
  if (row.build) {
    r->row = static_cast<uint16_t>(&row - rows_.data() + 1);
  }
  return r;
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
  const std::vector<Obj>& a = args_obj->x().items;
  const GlobalRow* row = RowOf(*fn);
  if (!row || !row->reduce) {
    return Refuse("'" + fn->x().s + "." + fn->x().r().s2 +
                  "' cannot be called here");
  }
  if (a.size() < row->min_args || a.size() > row->max_args) {
    return Refuse("'" + fn->x().s + "." + fn->x().r().s2 + "' called with " +
                  std::to_string(a.size()) + " arguments (it takes " +
                  std::to_string(row->min_args) +
                  (row->max_args == row->min_args
                       ? ""
                       : " to " + std::to_string(row->max_args)) +
                  ")");
  }
  return Apply(row->reduce, *row, a);
}

Status Machine::Build(PyObj& target, const Obj& state) {
  const GlobalRow* maker = target.row && target.kind != K::kGlobal
                               ? &rows_[target.row - 1u]
                               : nullptr;
  if (maker && maker->build) return (this->*maker->build)(target, state);
  switch (target.kind) {
    case K::kDict:
      return BuildDictAttrs(target, state);
    case K::kTensor:
      return BuildTensor(target, state);
    default:
      return Refuse(std::string("BUILD on a ") + KindName(target.kind));
  }
}

Result<Obj> Machine::NewTaggedDict(const GlobalRow& r, std::span<const Obj>) {
  auto d = Make(K::kDict);
  d->w().rw().s2 = std::string(r.module) + "." + std::string(r.name);
  return d;
}

// ---- DCP metadata -----------------------------------------------------------

namespace {
// _MEM_FORMAT_ENCODING's members, by value.
constexpr std::string_view kMemFormats[] = {
    "TORCH_CONTIGUOUS_FORMAT", "TORCH_CHANNELS_LAST", "TORCH_PRESERVE_FORMAT"};
// torch.serialization._get_layout's names (torch/serialization.py).
constexpr std::string_view kLayouts[] = {"torch.strided",    "torch.sparse_coo",
                                         "torch.sparse_csr", "torch.sparse_csc",
                                         "torch.sparse_bsr", "torch.sparse_bsc",
                                         "torch._mkldnn",    "torch.jagged"};
}  // namespace

Result<Obj> Machine::CallDcpEnum(const GlobalRow& r, std::span<const Obj> a) {
  CKPT_ASSIGN_OR_RETURN(int64_t v, AsInt(a[0], "enum value"));
  if (v < 0 || v >= static_cast<int64_t>(std::size(kMemFormats))) {
    return Refuse(std::string(r.name) + " has no member of value " +
                  std::to_string(v));
  }
  auto o = Make(K::kStr);
  o->w().s = std::string(kMemFormats[v]);
  return o;
}

Result<Obj> Machine::CallGetattr(const GlobalRow&, std::span<const Obj> a) {
  const GlobalRow* cls = RowOf(*a[0]);
  if (!cls || cls->reduce != &Machine::CallDcpEnum) {
    return Refuse("getattr on a " +
                  (a[0]->kind == K::kGlobal
                       ? "'" + a[0]->x().s + "." + a[0]->x().r().s2 + "'"
                       : KindName(a[0]->kind)) +
                  ": only members of DCP's enums are read");
  }
  CKPT_ASSIGN_OR_RETURN(std::string name, AsStr(a[1], "getattr name"));
  if (std::find(std::begin(kMemFormats), std::end(kMemFormats), name) ==
      std::end(kMemFormats)) {
    return Refuse(std::string(cls->name) + " has no member '" + name + "'");
  }
  auto o = Make(K::kStr);
  o->w().s = std::move(name);
  return o;
}

Result<Obj> Machine::CallLayout(const GlobalRow&, std::span<const Obj> a) {
  CKPT_ASSIGN_OR_RETURN(std::string name, AsStr(a[0], "layout"));
  if (std::find(std::begin(kLayouts), std::end(kLayouts), name) ==
      std::end(kLayouts)) {
    return Refuse("unknown layout '" + name + "'");
  }
  auto o = Make(K::kStr);
  o->w().s = std::move(name);
  return o;
}

// PurePath.__reduce__ gives its parts: ("/", "tmp", "x") is "/tmp/x".
Result<Obj> Machine::CallPath(const GlobalRow&, std::span<const Obj> a) {
  std::string out;
  for (const Obj& part : a) {
    CKPT_ASSIGN_OR_RETURN(std::string p, AsStr(part, "path part"));
    if (!out.empty() && out.back() != '/' && out.back() != '\\') out += '/';
    out += p;
  }
  auto o = Make(K::kStr);
  o->w().s = std::move(out);
  return o;
}

// A dataclass's BUILD: its __dict__ (a dict of fields), or for
// TensorProperties the tuple its __getstate__ returns.
Status Machine::BuildDcpObject(PyObj& target, const Obj& state) {
  const std::string cls = target.x().r().s2;
  if (state->kind == K::kDict) {
    auto& keys = target.w().rw().keys;
    auto& items = target.w().items;
    keys.insert(keys.end(), state->x().r().keys.begin(),
                state->x().r().keys.end());
    items.insert(items.end(), state->x().items.begin(), state->x().items.end());
    return Charge(2 * sizeof(Obj) * state->x().items.size());
  }
  if (state->kind == K::kTuple && cls.ends_with(".TensorProperties")) {
    static const char* const kFields[] = {"dtype",         "layout",
                                          "requires_grad", "memory_format",
                                          "pin_memory",    "strides"};
    const auto& v = state->x().items;
    if (v.size() != 5 && v.size() != 6) {
      return Refuse("TensorProperties state has " + std::to_string(v.size()) +
                    " fields (5 or 6 expected)");
    }
    for (size_t k = 0; k < v.size(); ++k) {
      auto key = Make(K::kStr);
      key->w().s = kFields[k];
      CKPT_RETURN_IF_ERROR(Charge(Cost(*key)));
      key->charged = true;
      target.w().rw().keys.push_back(std::move(key));
      target.w().items.push_back(v[k]);
    }
    return Charge(2 * sizeof(Obj) * v.size());
  }
  return Refuse("BUILD state of " + cls + " is a " + KindName(state->kind));
}

Status Machine::BuildNamespace(PyObj& target, const Obj& state) {
  if (state->kind != K::kDict) return Refuse("Namespace state is not a dict");
  target.w().rw().keys = state->x().r().keys;
  target.w().items = state->x().items;
  return Charge((target.x().r().keys.capacity() + target.x().items.capacity()) *
                sizeof(Obj));
}

// OrderedDict attributes such as a state_dict's `_metadata` (module version
// numbers) are not items; they are dropped.
Status Machine::BuildDictAttrs(PyObj&, const Obj& state) {
  if (state->kind != K::kDict && state->kind != K::kNone &&
      state->kind != K::kTuple) {
    return Refuse("BUILD state of a dict is a " +
                  std::string(KindName(state->kind)));
  }
  return Status::OK();
}

Status Machine::BuildNpDType(PyObj& target, const Obj& state) {
  if (state->kind != K::kTuple || state->x().items.size() < 2 ||
      state->x().items[1]->kind != K::kStr) {
    return Refuse("numpy dtype state is not understood");
  }
  target.w().rw().s2 = state->x().items[1]->x().s;
  if (state->x().items.size() > 3 && state->x().items[3]->kind != K::kNone) {
    return Refuse("structured numpy dtypes are not supported");
  }
  return Status::OK();
}

Status Machine::BuildNpArray(PyObj& target, const Obj& state) {
  if (state->kind != K::kTuple || state->x().items.size() != 5) {
    return Refuse("numpy array state is not understood");
  }
  const auto& s = state->x().items;
  CKPT_ASSIGN_OR_RETURN(auto shape, AsInts(s[1], "numpy shape"));
  if (s[3]->kind != K::kBool) return Refuse("numpy fortran flag is not a bool");
  std::vector<uint8_t> data;
  if (s[4]->kind == K::kBytes) {
    data = s[4]->x().r().bytes;
  } else if (s[4]->kind == K::kStr) {
    // Python 2's str of raw bytes, or latin-1 text (numpy encodes it).
    auto raw = StrBytes(*s[4]);
    if (!raw) return Refuse("numpy array data is text above U+00FF");
    data = std::move(*raw);
  } else {
    return Refuse("numpy object arrays cannot be converted");
  }
  CKPT_ASSIGN_OR_RETURN(Obj arr, NumpyArray(s[2], shape, s[3]->i != 0, data));
  target.kind = K::kTensor;
  target.w().rw().tensor = arr->x().r().tensor;
  target.row = 0;             // a tensor now: a second BUILD is a tensor's
  return Charge(Cost(*arr));  // the tensor and its copy of the data
}

Status Machine::BuildTensor(PyObj&, const Obj& state) {
  if (state->kind == K::kNone ||
      (state->kind == K::kDict && state->x().items.empty())) {
    return Status::OK();
  }
  return Refuse("tensor with extra Python attributes cannot be converted");
}

// ---- REDUCE handlers
// ----------------------------------------------------------

Result<Obj> Machine::RebuildTensor(std::span<const Obj> a, bool v3) {
  if (a[0]->kind != K::kStorage) {
    return Refuse(std::string("tensor rebuild expects a storage, got ") +
                  KindName(a[0]->kind));
  }
  auto t = std::make_shared<PyTensor>();
  t->storage = a[0]->x().r().storage;
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
  if (a.size() > 5 && !(a[5]->kind == K::kDict && a[5]->x().items.empty()) &&
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
  o->w().rw().tensor = std::move(t);
  return o;
}

Result<Obj> Machine::CallRebuildTensor(const GlobalRow&,
                                       std::span<const Obj> a) {
  return RebuildTensor(a, false);
}

Result<Obj> Machine::CallRebuildTensorV3(const GlobalRow&,
                                         std::span<const Obj> a) {
  return RebuildTensor(a, true);
}

Result<Obj> Machine::CallRebuildParameter(const GlobalRow&,
                                          std::span<const Obj> a) {
  if (a[0]->kind != K::kTensor) return Refuse("Parameter data is not a tensor");
  if (a[1]->kind != K::kBool) return Refuse("requires_grad must be a bool");
  // _rebuild_parameter_with_state's 4th argument: the Parameter's Python
  // attributes (torch 2.x pickles them: __dict__, or (__dict__, slots)).
  // The format has no place for them; dropping them would lose data
  // silently, so they are refused as a plain tensor's are (BuildTensor).
  if (a.size() > 3 && !EmptyState(a[3])) {
    return Refuse("Parameter with extra Python attributes cannot be converted");
  }
  auto t = std::make_shared<PyTensor>(*a[0]->x().r().tensor);
  t->is_parameter = true;
  t->requires_grad = a[1]->i != 0;
  auto o = Make(K::kTensor);
  o->w().rw().tensor = std::move(t);
  return o;
}

Result<Obj> Machine::CallRebuildFromType(const GlobalRow&,
                                         std::span<const Obj> a) {
  bool param = IsGlobal(a[1], "torch.nn.parameter", "Parameter");
  if (!param && !IsGlobal(a[1], "torch", "Tensor")) {
    return Refuse("tensor subclass cannot be converted");
  }
  if (!(a[3]->kind == K::kNone ||
        (a[3]->kind == K::kDict && a[3]->x().items.empty()))) {
    return Refuse("tensor with extra Python attributes cannot be converted");
  }
  CKPT_ASSIGN_OR_RETURN(Obj r, Call(a[0], a[2]));
  if (r->kind != K::kTensor)
    return Refuse("_rebuild_from_type_v2 did not build a tensor");
  if (param) {
    auto t = std::make_shared<PyTensor>(*r->x().r().tensor);
    t->is_parameter = true;
    r = Make(K::kTensor);
    r->w().rw().tensor = std::move(t);
  }
  return r;
}

Result<Obj> Machine::CallOrderedDict(const GlobalRow& r,
                                     std::span<const Obj> a) {
  CKPT_ASSIGN_OR_RETURN(Obj d, NewTaggedDict(r, {}));
  if (a.empty()) return d;
  if (a[0]->kind != K::kList && a[0]->kind != K::kTuple) {
    return Refuse("OrderedDict() of a " + std::string(KindName(a[0]->kind)));
  }
  for (const auto& pair : a[0]->x().items) {
    // Python 3 writes (key, value) tuples, Python 2.7 [key, value] lists.
    if ((pair->kind != K::kTuple && pair->kind != K::kList) ||
        pair->x().items.size() != 2) {
      return Refuse("OrderedDict() items must be pairs");
    }
    d->w().rw().keys.push_back(pair->x().items[0]);
    d->w().items.push_back(pair->x().items[1]);
  }
  return d;
}

Result<Obj> Machine::CallSize(const GlobalRow&, std::span<const Obj> a) {
  CKPT_RETURN_IF_ERROR(AsInts(a[0], "torch.Size").status());
  auto t = Make(K::kTuple);
  t->w().items = a[0]->x().items;
  return t;
}

Result<Obj> Machine::CallDevice(const GlobalRow&, std::span<const Obj> a) {
  CKPT_ASSIGN_OR_RETURN(std::string dev, AsStr(a[0], "device type"));
  if (a.size() == 2 && a[1]->kind != K::kNone) {
    CKPT_ASSIGN_OR_RETURN(int64_t idx, AsInt(a[1], "device index"));
    dev += ":" + std::to_string(idx);
  }
  if (!IsValidDevice(dev)) return Refuse("invalid device '" + dev + "'");
  auto o = Make(K::kDevice);
  o->w().s = dev;
  return o;
}

Result<Obj> Machine::CallEncode(const GlobalRow&, std::span<const Obj> a) {
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
  o->w().rw().bytes = std::move(*raw);
  return o;
}

Result<Obj> Machine::CallSet(const GlobalRow& r, std::span<const Obj> a) {
  auto o = Make(r.name == "set" ? K::kSet : K::kFrozenSet);
  if (a.size() == 1) {
    if (a[0]->kind != K::kList && a[0]->kind != K::kTuple) {
      return Refuse(std::string(r.name) + "() of a " + KindName(a[0]->kind));
    }
    o->w().items = a[0]->x().items;
  }
  return o;
}

Result<Obj> Machine::CallComplex(const GlobalRow&, std::span<const Obj> a) {
  auto num = [&](const Obj& x) -> Result<double> {
    if (x->kind == K::kFloat) return x->f;
    if (x->kind == K::kInt) return static_cast<double>(x->i);
    return Refuse("complex() of a " + std::string(KindName(x->kind)));
  };
  auto o = Make(K::kComplex);
  CKPT_ASSIGN_OR_RETURN(o->f, num(a[0]));
  if (a.size() == 2) {
    CKPT_ASSIGN_OR_RETURN(o->w().rw().im, num(a[1]));
  }
  return o;
}

Result<Obj> Machine::CallSlice(const GlobalRow&, std::span<const Obj> a) {
  auto o = Make(K::kTuple);  // slice(a, b, c) kept as (a, b, c)
  o->w().items.assign(a.begin(), a.end());
  return o;
}

Result<Obj> Machine::CallBytes(const GlobalRow& r, std::span<const Obj> a) {
  if (a.empty()) return Make(K::kBytes);
  if (a[0]->kind == K::kBytes) return a[0];
  return Refuse(std::string(r.name) + "() of a " + KindName(a[0]->kind));
}

// copyreg._reconstructor(cls, object, None) is how protocols 0-1 make a
// plain object: only classes NEWOBJ may make (the dict-like ones) qualify.
Result<Obj> Machine::CallReconstructor(const GlobalRow&,
                                       std::span<const Obj> a) {
  if (!IsGlobal(a[1], "builtins", "object") || a[2]->kind != K::kNone) {
    return Refuse("copyreg._reconstructor with an unsupported base or state");
  }
  const GlobalRow* cls = RowOf(*a[0]);
  if (!cls || !cls->newobj) {
    return Refuse("copyreg._reconstructor of a class that is not allowlisted");
  }
  return Apply(cls->newobj, *cls, {});
}

Result<Obj> Machine::CallNpReconstruct(const GlobalRow&,
                                       std::span<const Obj> a) {
  if (!IsGlobal(a[0], "numpy", "ndarray"))
    return Refuse("numpy _reconstruct of a non-ndarray class");
  return Make(K::kNpArray);
}

Result<Obj> Machine::CallNpDType(const GlobalRow&, std::span<const Obj> a) {
  CKPT_ASSIGN_OR_RETURN(std::string code, AsStr(a[0], "numpy dtype"));
  auto o = Make(K::kNpDType);
  o->w().s = code;
  o->w().rw().s2 = "|";
  return o;
}

Result<Obj> Machine::CallNpScalar(const GlobalRow&, std::span<const Obj> a) {
  if (a[1]->kind != K::kBytes) return Refuse("numpy scalar data is not bytes");
  return NumpyScalar(a[0], a[1]->x().r().bytes);
}

Result<Obj> Machine::CallNpFromBuffer(const GlobalRow&,
                                      std::span<const Obj> a) {
  if (a[0]->kind != K::kBytes)
    return Refuse("numpy _frombuffer data is not bytes");
  CKPT_ASSIGN_OR_RETURN(auto shape, AsInts(a[2], "numpy shape"));
  CKPT_ASSIGN_OR_RETURN(std::string order, AsStr(a[3], "numpy order"));
  return NumpyArray(a[1], shape, order == "F", a[0]->x().r().bytes);
}

Result<Obj> Machine::NumpyArray(const Obj& dtype,
                                const std::vector<int64_t>& shape, bool fortran,
                                std::span<const uint8_t> data) {
  if (dtype->kind != K::kNpDType)
    return Refuse("numpy array without a numpy dtype");
  auto np = NumpyType(dtype->x().s);
  if (!np)
    return Refuse("numpy dtype '" + dtype->x().s +
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
  if (dtype->x().r().s2 == ">") SwapElements(*st->inline_data, np->dtype);
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
  o->w().rw().tensor = std::move(t);
  return o;
}

Result<Obj> Machine::NumpyScalar(const Obj& dtype,
                                 std::span<const uint8_t> data) {
  if (dtype->kind != K::kNpDType)
    return Refuse("numpy scalar without a numpy dtype");
  auto np = NumpyType(dtype->x().s);
  if (!np || data.size() != np->size)
    return Refuse("numpy scalar of dtype '" + dtype->x().s +
                  "' cannot be converted");
  std::vector<std::byte> v(np->size);
  std::memcpy(v.data(), data.data(), v.size());
  if (dtype->x().r().s2 == ">") SwapElements(v, np->dtype);
  const std::byte* p = v.data();  // little-endian from here on
  Obj o;
  switch (np->dtype) {
    case DType::kFloat16: {
      auto h = LoadLE<uint16_t>(p);
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
      o->f = std::bit_cast<float>(LoadLE<uint32_t>(p));
      break;
    case DType::kFloat64:
      o = Make(K::kFloat);
      o->f = std::bit_cast<double>(LoadLE<uint64_t>(p));
      break;
    case DType::kComplex64:
      o = Make(K::kComplex);
      o->f = std::bit_cast<float>(LoadLE<uint32_t>(p));
      o->w().rw().im = std::bit_cast<float>(LoadLE<uint32_t>(p + 4));
      break;
    case DType::kComplex128:
      o = Make(K::kComplex);
      o->f = std::bit_cast<double>(LoadLE<uint64_t>(p));
      o->w().rw().im = std::bit_cast<double>(LoadLE<uint64_t>(p + 8));
      break;
    case DType::kBool:
      o = Make(K::kBool);
      o->i = v[0] != std::byte{0};
      break;
    default: {  // integers: one more byte carries the sign (none: unsigned)
      bool is_signed = np->dtype == DType::kInt8 ||
                       np->dtype == DType::kInt16 ||
                       np->dtype == DType::kInt32 || np->dtype == DType::kInt64;
      v.push_back(is_signed && (static_cast<uint8_t>(v.back()) & 0x80)
                      ? std::byte{0xFF}
                      : std::byte{0});
      return IntFromLE(v);
    }
  }
  return o;
}

// ---- opcodes
// ------------------------------------------------------------------

Status Machine::OpProto(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(uint64_t v, U(1));
  if (op_at_ != 0) return Bad("PROTO not at the start");
  if (v > 5)
    return Refuse("pickle protocol " + std::to_string(v) + " is newer than 5");
  proto_ = static_cast<int>(v);
  return Status::OK();
}

Status Machine::OpFrame(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(uint64_t n, U(8));
  if (!RangeWithin(pos_, n, d_.size()))
    return Bad("FRAME longer than the data left");
  return Status::OK();
}

Status Machine::OpStop(uint8_t) {
  if (stack_.size() != 1 || !marks_.empty()) {
    return Bad("STOP with " + std::to_string(stack_.size()) +
               " items on the stack");
  }
  stopped_ = true;
  return Status::OK();
}

Status Machine::OpMark(uint8_t) {
  if (marks_.size() >= lim_.max_marks) return Bad("too many nested MARKs");
  marks_.push_back(stack_.size());
  return Status::OK();
}

Status Machine::OpPop(uint8_t) { return Pop().status(); }

Status Machine::OpPopMark(uint8_t) { return PopMark().status(); }

Status Machine::OpDup(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj t, Top());
  return Push(std::move(t));
}

Status Machine::OpGlobal(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(std::string module, Line());
  CKPT_ASSIGN_OR_RETURN(std::string name, Line());
  return Global(std::move(module), std::move(name));
}

Status Machine::OpStackGlobal(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj name, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj module, Pop());
  if (name->kind != K::kStr || module->kind != K::kStr) {
    return Refuse("STACK_GLOBAL operands are not strings");
  }
  return Global(module->x().s, name->x().s);
}

// BINPUT, LONG_BINPUT, MEMOIZE.
Status Machine::OpPut(uint8_t op) {
  if (op == 0x94) return Memo(memo_.size());
  CKPT_ASSIGN_OR_RETURN(uint64_t i, U(op == 'q' ? 1 : 4));
  return Memo(i);
}

// BINGET, LONG_BINGET.
Status Machine::OpGet(uint8_t op) {
  CKPT_ASSIGN_OR_RETURN(uint64_t i, U(op == 'h' ? 1 : 4));
  return MemoGet(i);
}

// PUT, GET (protocol 0: the index as a text line).
Status Machine::OpTextMemo(uint8_t op) {
  CKPT_ASSIGN_OR_RETURN(std::string l, Line());
  CKPT_ASSIGN_OR_RETURN(Obj i, IntFromText(l));
  const bool put = op == 'p';
  if (i->kind != K::kInt || i->i < 0)
    return Bad(put ? "bad PUT index" : "bad GET index");
  return put ? Memo(static_cast<uint64_t>(i->i))
             : MemoGet(static_cast<uint64_t>(i->i));
}

// TUPLE, LIST: the items above the mark.
Status Machine::OpSequence(uint8_t op) {
  CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
  auto o = Make(op == 't' ? K::kTuple : K::kList);
  o->w().items = std::move(items);
  return Push(std::move(o));
}

// TUPLE1, TUPLE2, TUPLE3.
Status Machine::OpTupleN(uint8_t op) {
  size_t n = op - 0x84u;
  auto o = Make(K::kTuple);
  o->w().items.resize(n);
  for (size_t k = n; k-- > 0;) {
    CKPT_ASSIGN_OR_RETURN(o->w().items[k], Pop());
  }
  return Push(std::move(o));
}

// EMPTY_TUPLE, EMPTY_LIST, EMPTY_DICT, EMPTY_SET.
Status Machine::OpEmpty(uint8_t op) {
  // () is immutable and has no identity worth keeping (Python's is a
  // singleton too): one object, so a tensor's empty argument tuples cost a
  // stack slot each.
  if (op == ')') {
    if (!empty_tuple_) empty_tuple_ = Make(K::kTuple);
    return Push(empty_tuple_);
  }
  const K k = op == ')'   ? K::kTuple
              : op == ']' ? K::kList
              : op == '}' ? K::kDict
                          : K::kSet;
  return Push(Make(k));
}

// DICT: key, value pairs above the mark.
Status Machine::OpDict(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
  if (items.size() % 2) return Bad("DICT with an odd number of items");
  auto o = Make(K::kDict);
  for (size_t k = 0; k < items.size(); k += 2) {
    o->w().rw().keys.push_back(items[k]);
    o->w().items.push_back(items[k + 1]);
  }
  return Push(std::move(o));
}

Status Machine::OpAppend(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj v, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj l, Top());
  if (l->kind != K::kList)
    return Refuse(std::string("APPEND to a ") + KindName(l->kind));
  l->w().items.push_back(std::move(v));
  return Charge(2 * sizeof(Obj));
}

// APPENDS (to a list), ADDITEMS (to a set).
Status Machine::OpAppends(uint8_t op) {
  CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
  CKPT_ASSIGN_OR_RETURN(Obj l, Top());
  K want = op == 'e' ? K::kList : K::kSet;
  if (l->kind != want)
    return Refuse(std::string(op == 'e' ? "APPENDS" : "ADDITEMS") + " to a " +
                  KindName(l->kind));
  for (auto& it : items) l->w().items.push_back(std::move(it));
  return Charge(2 * sizeof(Obj) * items.size());
}

Status Machine::OpFrozenSet(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
  auto o = Make(K::kFrozenSet);
  o->w().items = std::move(items);
  return Push(std::move(o));
}

Status Machine::OpSetItem(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj v, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj k, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj d, Top());
  if (d->kind != K::kDict)
    return Refuse(std::string("SETITEM on a ") + KindName(d->kind));
  d->w().rw().keys.push_back(std::move(k));
  d->w().items.push_back(std::move(v));
  return Charge(4 * sizeof(Obj));
}

Status Machine::OpSetItems(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(auto items, PopMark());
  CKPT_ASSIGN_OR_RETURN(Obj d, Top());
  if (d->kind != K::kDict)
    return Refuse(std::string("SETITEMS on a ") + KindName(d->kind));
  if (items.size() % 2) return Bad("SETITEMS with an odd number of items");
  for (size_t k = 0; k < items.size(); k += 2) {
    d->w().rw().keys.push_back(std::move(items[k]));
    d->w().items.push_back(std::move(items[k + 1]));
  }
  return Charge(2 * sizeof(Obj) * items.size());
}

// BININT (signed 4 bytes), BININT1, BININT2 (unsigned).
Status Machine::OpBinInt(uint8_t op) {
  CKPT_ASSIGN_OR_RETURN(uint64_t v, U(op == 'J' ? 4 : op == 'K' ? 1 : 2));
  auto o = Make(K::kInt);
  o->i = op == 'J' ? static_cast<int32_t>(static_cast<uint32_t>(v))
                   : static_cast<int64_t>(v);
  return Push(std::move(o));
}

// LONG1, LONG4: a little-endian two's complement integer.
Status Machine::OpLong(uint8_t op) {
  CKPT_ASSIGN_OR_RETURN(uint64_t n, U(op == 0x8a ? 1 : 4));
  if (op == 0x8b && (n & 0x80000000u)) return Bad("negative LONG4 length");
  if (n > lim_.max_long_bytes) {
    return Refuse("integer of " + std::to_string(n) + " bytes (limit " +
                  std::to_string(lim_.max_long_bytes) + ")");
  }
  CKPT_ASSIGN_OR_RETURN(auto b, Take(n));
  CKPT_ASSIGN_OR_RETURN(Obj o, IntFromLE(b));
  return Push(std::move(o));
}

// INT, LONG (text); INT's "01" and "00" are protocol 0's True and False.
Status Machine::OpTextInt(uint8_t op) {
  CKPT_ASSIGN_OR_RETURN(std::string l, Line());
  if (op == 'I' && (l == "01" || l == "00")) {
    auto o = Make(K::kBool);
    o->i = l == "01";
    return Push(std::move(o));
  }
  CKPT_ASSIGN_OR_RETURN(Obj o, IntFromText(l));
  return Push(std::move(o));
}

// BINFLOAT: an IEEE double, big-endian.
Status Machine::OpBinFloat(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(auto b, Take(8));
  auto o = Make(K::kFloat);
  o->f = std::bit_cast<double>(__builtin_bswap64(LoadLE<uint64_t>(b.data())));
  return Push(std::move(o));
}

Status Machine::OpTextFloat(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(std::string l, Line());
  auto o = Make(K::kFloat);
  char* end = nullptr;
  o->f = std::strtod(l.c_str(), &end);
  if (end == l.c_str() || *end != '\0') return Bad("bad float literal");
  return Push(std::move(o));
}

// BINUNICODE, SHORT_BINUNICODE, BINUNICODE8 (text); BINSTRING,
// SHORT_BINSTRING (Python 2 str).
Status Machine::OpString(uint8_t op) {
  int w = op == 0x8c || op == 'U' ? 1 : op == 0x8d ? 8 : 4;
  CKPT_ASSIGN_OR_RETURN(uint64_t n, U(w));
  if (op == 'T' && (n & 0x80000000u)) return Bad("negative BINSTRING length");
  CKPT_ASSIGN_OR_RETURN(auto b, Take(n));
  CKPT_ASSIGN_OR_RETURN(Obj o, op == 'T' || op == 'U' ? Py2Str(b) : Str(b));
  return Push(std::move(o));
}

// BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8.
Status Machine::OpBytes(uint8_t op) {
  int w = op == 'C' ? 1 : op == 'B' ? 4 : 8;
  CKPT_ASSIGN_OR_RETURN(uint64_t n, U(w));
  CKPT_ASSIGN_OR_RETURN(auto b, Take(n));
  CKPT_ASSIGN_OR_RETURN(Obj o, BytesObj(b));
  return Push(std::move(o));
}

// None, True and False are immutable here: one object each, so a pickle of
// millions of them costs stack slots, not objects.
Status Machine::OpSingleton(uint8_t op) {
  return op == 'N' ? Push(Singleton(K::kNone, 0))
                   : Push(Singleton(K::kBool, op == 0x88));
}

Status Machine::OpReduce(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj args, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj fn, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj r, Call(fn, args));
  return Push(std::move(r));
}

Status Machine::OpNewObj(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj args, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj cls, Pop());
  const GlobalRow* row = RowOf(*cls);
  if (!row || !row->newobj) {
    return Refuse(std::string("NEWOBJ of ") +
                  (cls->kind == K::kGlobal
                       ? "'" + cls->x().s + "." + cls->x().r().s2 + "'"
                       : std::string(KindName(cls->kind))));
  }
  CKPT_ASSIGN_OR_RETURN(Obj o, Apply(row->newobj, *row, {}));
  return Push(std::move(o));
}

Status Machine::OpBuild(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj state, Pop());
  CKPT_ASSIGN_OR_RETURN(Obj target, Top());
  return Build(*target, state);
}

Status Machine::OpBinPersId(uint8_t) {
  CKPT_ASSIGN_OR_RETURN(Obj pid, Pop());
  if (!pl_) return Refuse("persistent id outside a torch.save archive");
  auto r = pl_(pid);
  if (!r.ok()) return Fail(r.status().code(), r.status().message());
  return Push(*r);
}

Status Machine::OpTextPersId(uint8_t) {
  return Refuse(
      "text persistent id (pickle protocol 0); torch cannot load these "
      "files either: re-save with torch.save's default protocol");
}

Status Machine::OpTextString(uint8_t) {
  return Refuse("text-mode (protocol 0) strings are not supported");
}

Status Machine::OpForbidden(uint8_t op) {
  const char* name = "?";
  for (const OpRow& r : Opcodes()) {
    if (r.code == op) name = r.name;
  }
  return Refuse(std::string("pickle opcode ") + name +
                " is not allowed in a checkpoint");
}

Status Machine::OpUnknown(uint8_t op) {
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02x", op);
  return Bad(std::string("unknown pickle opcode ") + hex);
}

std::span<const Machine::OpRow> Machine::Opcodes() {
  using M = Machine;
  static constexpr OpRow kRows[] = {
      {0x80, "PROTO", &M::OpProto},
      {0x95, "FRAME", &M::OpFrame},
      {'.', "STOP", &M::OpStop},
      {'(', "MARK", &M::OpMark},
      {'0', "POP", &M::OpPop},
      {'1', "POP_MARK", &M::OpPopMark},
      {'2', "DUP", &M::OpDup},
      {'c', "GLOBAL", &M::OpGlobal},
      {0x93, "STACK_GLOBAL", &M::OpStackGlobal},
      {'q', "BINPUT", &M::OpPut},
      {'r', "LONG_BINPUT", &M::OpPut},
      {0x94, "MEMOIZE", &M::OpPut},
      {'h', "BINGET", &M::OpGet},
      {'j', "LONG_BINGET", &M::OpGet},
      {'p', "PUT", &M::OpTextMemo},
      {'g', "GET", &M::OpTextMemo},
      {'t', "TUPLE", &M::OpSequence},
      {'l', "LIST", &M::OpSequence},
      {0x85, "TUPLE1", &M::OpTupleN},
      {0x86, "TUPLE2", &M::OpTupleN},
      {0x87, "TUPLE3", &M::OpTupleN},
      {')', "EMPTY_TUPLE", &M::OpEmpty},
      {']', "EMPTY_LIST", &M::OpEmpty},
      {'}', "EMPTY_DICT", &M::OpEmpty},
      {0x8f, "EMPTY_SET", &M::OpEmpty},
      {'d', "DICT", &M::OpDict},
      {'a', "APPEND", &M::OpAppend},
      {'e', "APPENDS", &M::OpAppends},
      {0x90, "ADDITEMS", &M::OpAppends},
      {0x91, "FROZENSET", &M::OpFrozenSet},
      {'s', "SETITEM", &M::OpSetItem},
      {'u', "SETITEMS", &M::OpSetItems},
      {'J', "BININT", &M::OpBinInt},
      {'K', "BININT1", &M::OpBinInt},
      {'M', "BININT2", &M::OpBinInt},
      {0x8a, "LONG1", &M::OpLong},
      {0x8b, "LONG4", &M::OpLong},
      {'I', "INT", &M::OpTextInt},
      {'L', "LONG", &M::OpTextInt},
      {'G', "BINFLOAT", &M::OpBinFloat},
      {'F', "FLOAT", &M::OpTextFloat},
      {'X', "BINUNICODE", &M::OpString},
      {0x8c, "SHORT_BINUNICODE", &M::OpString},
      {0x8d, "BINUNICODE8", &M::OpString},
      {'T', "BINSTRING", &M::OpString},
      {'U', "SHORT_BINSTRING", &M::OpString},
      {'B', "BINBYTES", &M::OpBytes},
      {'C', "SHORT_BINBYTES", &M::OpBytes},
      {0x8e, "BINBYTES8", &M::OpBytes},
      {0x96, "BYTEARRAY8", &M::OpBytes},
      {'N', "NONE", &M::OpSingleton},
      {0x88, "NEWTRUE", &M::OpSingleton},
      {0x89, "NEWFALSE", &M::OpSingleton},
      {'R', "REDUCE", &M::OpReduce},
      {0x81, "NEWOBJ", &M::OpNewObj},
      {'b', "BUILD", &M::OpBuild},
      {'Q', "BINPERSID", &M::OpBinPersId},
      {'P', "PERSID", &M::OpTextPersId},
      {'S', "STRING", &M::OpTextString},
      {'V', "UNICODE", &M::OpTextString},
      // Never in a checkpoint: they construct arbitrary classes or need
      // out-of-band state.
      {'i', "INST", &M::OpForbidden},
      {'o', "OBJ", &M::OpForbidden},
      {0x92, "NEWOBJ_EX", &M::OpForbidden},
      {0x82, "EXT1", &M::OpForbidden},
      {0x83, "EXT2", &M::OpForbidden},
      {0x84, "EXT4", &M::OpForbidden},
      {0x97, "NEXT_BUFFER", &M::OpForbidden},
      {0x98, "READONLY_BUFFER", &M::OpForbidden},
  };
  return kRows;
}

const std::array<Machine::Op, 256>& Machine::OpTable() {
  static const std::array<Op, 256> kTable = [] {
    std::array<Op, 256> t;
    t.fill(&Machine::OpUnknown);
    for (const OpRow& r : Opcodes()) t[r.code] = r.fn;
    return t;
  }();
  return kTable;
}

Result<Obj> Machine::Run(size_t* consumed) {
  const std::array<Op, 256>& ops = OpTable();
  while (pos_ < d_.size()) {
    op_at_ = pos_;
    if (pos_ > lim_.max_bytes) {
      return Refuse("pickle longer than " + std::to_string(lim_.max_bytes) +
                    " bytes (the pickle limit, max_pickle_bytes)");
    }
    auto op = static_cast<uint8_t>(d_[pos_++]);
    CKPT_RETURN_IF_ERROR((this->*ops[op])(op));
    if (stopped_) {
      *consumed = pos_;
      return stack_.back();
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
