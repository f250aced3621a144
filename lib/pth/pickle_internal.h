// A restricted pickle reader for torch.save files. It never imports or
// calls anything: GLOBAL names are looked up in an allowlist of exact
// (module, name) pairs, and REDUCE/NEWOBJ/BUILD only apply the handful of
// torch, numpy and builtin constructors a checkpoint needs, each with its
// arguments checked. The result is a graph of PyObj values.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/format.h"
#include "ckpt/status.h"

namespace ckpt::internal {

struct PyObj;
using Obj = std::shared_ptr<PyObj>;

/// A storage named by a persistent id: its bytes live in the archive under
/// `key` (or, for numpy arrays, in `inline_data`).
struct PyStorage {
  std::string key;
  DType dtype = DType::kUInt8;   // element type of `numel`
  uint64_t numel = 0;            // elements of `dtype`
  std::string location = "cpu";  // saved device
  bool untyped = false;          // torch.storage.UntypedStorage (numel = bytes)
  std::shared_ptr<std::vector<std::byte>> inline_data;  // numpy payloads
};

struct PyTensor {
  std::shared_ptr<PyStorage> storage;
  DType dtype = DType::kInvalid;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  int64_t offset = 0;  // elements
  bool requires_grad = false;
  bool is_parameter = false;
  bool numpy = false;  // a numpy array: tagged "numpy.ndarray" in the file
};

/// What a PyObj is: a node kind of the tree (the same codes as ValueKind,
/// format.h's kValueKinds table) or one of the importer's own states past
/// them, which are never written as themselves.
enum class PyKind : uint8_t {
  kNone = static_cast<uint8_t>(ValueKind::kNone),
  kBool = static_cast<uint8_t>(ValueKind::kBool),
  kInt = static_cast<uint8_t>(ValueKind::kInt),
  kBigInt = static_cast<uint8_t>(ValueKind::kBigInt),
  kFloat = static_cast<uint8_t>(ValueKind::kFloat),
  kComplex = static_cast<uint8_t>(ValueKind::kComplex),
  kStr = static_cast<uint8_t>(ValueKind::kString),
  kBytes = static_cast<uint8_t>(ValueKind::kBytes),
  kList = static_cast<uint8_t>(ValueKind::kList),
  kTuple = static_cast<uint8_t>(ValueKind::kTuple),
  kDict = static_cast<uint8_t>(ValueKind::kDict),  // s2: its class tag
  kSet = static_cast<uint8_t>(ValueKind::kSet),
  kFrozenSet = static_cast<uint8_t>(ValueKind::kFrozenSet),
  kTensor = static_cast<uint8_t>(ValueKind::kTensor),
  kDType = static_cast<uint8_t>(ValueKind::kDType),    // i = code
  kDevice = static_cast<uint8_t>(ValueKind::kDevice),  // s
  // Importer-only states.
  kGlobal = kMaxValueKindCode + 1,  // an allowlisted callable or class:
                                    // s = module, s2 = name
  kStorage,  // a storage by itself (written as a 1-D tensor over it)
  kNpDType,  // numpy dtype under construction: s = code, s2 = byte order
  kNpArray,  // numpy ndarray under construction
};

/// The node kind `k` is written as: itself for a tree kind, a tensor for
/// a bare storage, nullopt for the importer-only states.
constexpr std::optional<ValueKind> TreeKind(PyKind k) {
  if (k == PyKind::kStorage) return ValueKind::kTensor;
  return ValueKindFromCode(static_cast<uint8_t>(k));
}

/// A kind's name in messages: kValueKinds' name for a tree kind.
constexpr std::string_view PyKindName(PyKind k) {
  switch (k) {
    case PyKind::kGlobal:
      return "global";
    case PyKind::kStorage:
      return "storage";
    case PyKind::kNpDType:
      return "numpy dtype";
    case PyKind::kNpArray:
      return "numpy array";
    default:
      return ValueKindName(static_cast<ValueKind>(k));
  }
}

/// What few objects have: a class tag, bytes, a dict's keys, tensors.
struct PyRare {
  double im = 0;               // Complex: imaginary part
  std::string s2;              // a Dict's class tag; kGlobal: name; ...
  std::vector<uint8_t> bytes;  // Bytes, BigInt (LE two's complement)
  std::vector<Obj> keys;       // Dict keys
  std::shared_ptr<PyStorage> storage;
  std::shared_ptr<PyTensor> tensor;
};

/// What only some objects have: text and children (the rest, rarer, in
/// PyRare). Held apart so that a number (most objects of a big pickle) is
/// one small allocation: a list of 3 M floats took ~330 bytes per float
/// with all of these inline.
struct PyExt {
  std::string s;
  std::vector<Obj> items;  // List/Tuple/Set elements, Dict values

  const PyRare& r() const { return rare_ ? *rare_ : kEmpty; }
  PyRare& rw() {
    if (!rare_) rare_ = std::make_unique<PyRare>();
    return *rare_;
  }
  bool has_rare() const { return rare_ != nullptr; }

 private:
  static const PyRare kEmpty;
  std::unique_ptr<PyRare> rare_;
};

struct PyObj {
  using K = PyKind;
  K kind = K::kNone;
  /// 1 + the allowlist row that made this object, for BUILD to dispatch
  /// on (a tagged dict, a numpy dtype or array under construction) and for
  /// a kGlobal; 0 for anything else.
  uint16_t row = 0;
  bool charged = false;  // counted in the pickle's memory budget
  int64_t i = 0;
  double f = 0;

  /// The rest, read-only: empty fields when the object has none.
  const PyExt& x() const { return ext_ ? *ext_ : kEmpty; }
  /// The rest, to write: allocated on first use.
  PyExt& w() {
    if (!ext_) ext_ = std::make_unique<PyExt>();
    return *ext_;
  }
  bool has_ext() const { return ext_ != nullptr; }

  PyObj() = default;
  PyObj(const PyObj&) = delete;
  PyObj& operator=(const PyObj&) = delete;
  /// Frees nested containers iteratively: a hostile pickle can nest lists a
  /// million deep, which a recursive destructor would overflow the stack on.
  ~PyObj();

 private:
  static const PyExt kEmpty;
  std::unique_ptr<PyExt> ext_;
};

/// Which allowlist GLOBAL names are looked up in. A pickle read under one
/// profile cannot use another's names: a .pth naming DCP's classes is
/// refused as before, and a DCP `.metadata` cannot rebuild tensors.
enum class PickleProfile : uint8_t {
  /// torch.save's data.pkl (Machine::Allowlist()).
  kTorchSave,
  /// torch.distributed.checkpoint's `.metadata` (Machine::DcpAllowlist()):
  /// its dataclasses become dicts tagged "module.Class" holding their
  /// fields; torch.Size a tuple; dtypes; enum members, layouts and paths
  /// strings. No persistent ids, storages or tensors.
  kDcpMetadata,
};

struct PickleLimits {
  size_t max_memo = 1u << 22;
  size_t max_stack = 1u << 22;
  size_t max_marks = 1u << 16;
  uint64_t max_objects = 1ull << 26;
  size_t max_long_bytes = 64;
  /// Bytes of pickle opcodes run (the legacy format has no record size to
  /// check up front).
  uint64_t max_bytes = UINT64_MAX;
  /// Memory the objects, stack and memo take, counted as allocated.
  uint64_t max_memory = UINT64_MAX;
  /// Python 2 str (BINSTRING) as latin-1 (torch.load(encoding='latin1'))
  /// instead of UTF-8 (torch.load's default).
  bool py2_latin1 = false;
  /// The allowlist to use (not a limit, but one more way to narrow what a
  /// pickle may name).
  PickleProfile profile = PickleProfile::kTorchSave;
};

/// PyObj::i of a kStr made from a Python 2 str (BINSTRING): its raw bytes
/// are kept in `bytes` (numpy array data); kPy2Undecodable when it is not
/// text under the chosen encoding, refused wherever it is used as text.
inline constexpr int64_t kPy2Str = 1;
inline constexpr int64_t kPy2Undecodable = 2;

/// Owns every container an Unpickle call makes, so that cycles (a list
/// appended to itself) are broken and freed when the heap goes, instead of
/// leaking through shared_ptr cycles.
class PickleHeap {
 public:
  PickleHeap() = default;
  PickleHeap(const PickleHeap&) = delete;
  PickleHeap& operator=(const PickleHeap&) = delete;
  ~PickleHeap();
  void Track(const Obj& container) { containers_.push_back(container); }

 private:
  std::vector<Obj> containers_;
};

/// Resolves a persistent id (the tuple given to BINPERSID) to a storage.
using PersistentLoad = std::function<Result<Obj>(const Obj& pid)>;

/// Runs one pickle from `data` (up to and including STOP) and returns its
/// value; `*consumed` receives its length. `where` names the stream in
/// errors ("data.pkl"), with byte offsets relative to it.
/// `file_offset` is where `data` starts in the input file (for the offsets
/// in errors), or -1 when it was inflated.
/// Every container made is tracked in `heap`, which must outlive the result.
Result<Obj> Unpickle(std::span<const std::byte> data, const std::string& where,
                     int64_t file_offset, const PersistentLoad& persistent_load,
                     size_t* consumed, PickleHeap* heap,
                     const PickleLimits& limits = {});

/// Swaps each element's bytes in place (complex: real and imaginary parts
/// separately; 1-byte types untouched), for big-endian payloads.
void SwapElements(std::span<std::byte> data, DType dtype);

/// dtype of a torch storage class name ("FloatStorage" -> float32).
std::optional<DType> StorageClassDType(const std::string& name);

}  // namespace ckpt::internal
