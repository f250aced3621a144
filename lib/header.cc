#include <bit>
#include <cstdint>
#include <cstring>
#include <future>
#include <string>
#include <system_error>
#include <vector>

#include "bytes_internal.h"
#include "checksum_internal.h"
#include "ckpt/format.h"
#include "header_internal.h"
#include "tree_internal.h"

namespace ckpt::internal {

// The public enums mirror the schema's; codes are part of the format.
static_assert(static_cast<uint8_t>(DType::kBFloat16) ==
              static_cast<uint8_t>(fb::DType::bfloat16));
static_assert(static_cast<uint8_t>(DType::kBits4x2) ==
              static_cast<uint8_t>(fb::DType::bits4x2));
static_assert(kMaxDTypeCode == static_cast<uint8_t>(fb::DType::MAX));
static_assert(kMaxValueKindCode == static_cast<uint8_t>(fb::ValueKind::MAX),
              "kValueKinds (format.h) and schema/ckpt.fbs disagree");
static_assert(static_cast<uint8_t>(ValueKind::kTensor) ==
              static_cast<uint8_t>(fb::ValueKind::Tensor));

namespace {

Status At(Status s, uint64_t offset) {
  return s.WithOffset(static_cast<int64_t>(offset));
}

bool AddOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_add_overflow(a, b, out);
}

}  // namespace

std::array<std::byte, 64> EncodePreamble(const Preamble& p) {
  std::array<std::byte, 64> b{};
  std::memcpy(b.data(), kMagic.data(), kMagic.size());
  StoreLE(&b[kOffMajor], p.major, 2);
  StoreLE(&b[kOffMajor + 2], p.minor, 2);
  StoreLE(&b[kOffFlags], p.flags, 4);
  StoreLE(&b[kOffDataOffset], p.data_offset, 8);
  StoreLE(&b[kOffDataSize], p.data_size, 8);
  StoreLE(&b[kOffHeaderOffset], p.header_offset, 8);
  StoreLE(&b[kOffHeaderSize], p.header_size, 8);
  StoreLE(&b[kOffHeaderHash], p.header_hash, 8);
  StoreLE(&b[kOffSelfHash], Xxh3({b.data(), kOffSelfHash}), 8);
  return b;
}

Result<Preamble> DecodePreamble(std::span<const std::byte> bytes,
                                uint64_t file_size) {
  // R1: the fixed preamble must be there.
  if (file_size < kPreambleBytes || bytes.size() < kPreambleBytes) {
    return At(
        Corrupt("file is " + std::to_string(file_size) +
                " bytes, shorter than the " + std::to_string(kPreambleBytes) +
                "-byte preamble (truncated, or not a ckpt file)"),
        0);
  }
  const std::byte* b = bytes.data();
  // R2: magic. Name the formats people most often pass by mistake.
  if (std::memcmp(b, kMagic.data(), kMagic.size()) != 0) {
    if (std::memcmp(b, "PK\x03\x04", 4) == 0) {
      return At(Corrupt("bad magic: this is a zip archive (a torch.save .pth "
                        "file?); convert it with pth2ckpt"),
                0);
    }
    // A safetensors header length may begin with 0x80, a pickle's PROTO:
    // the '{' after the 8-byte length decides first.
    if (static_cast<char>(b[8]) == '{') {
      return At(Corrupt("bad magic: this looks like a safetensors file"), 0);
    }
    if (static_cast<uint8_t>(b[0]) == 0x80 && static_cast<uint8_t>(b[1]) >= 2 &&
        static_cast<uint8_t>(b[1]) <= 5) {
      return At(Corrupt("bad magic: this looks like a pickle (legacy .pth?); "
                        "convert it with pth2ckpt"),
                0);
    }
    return At(Corrupt("bad magic: not a ckpt file"), 0);
  }
  Preamble p;
  p.major = static_cast<uint16_t>(LoadLE(b + kOffMajor, 2));
  p.minor = static_cast<uint16_t>(LoadLE(b + kOffMajor + 2, 2));
  // R3: major version. Checked before the checksum so a future layout gets
  // a version message, not a checksum one.
  if (p.major == 0 || p.major > kFormatMajor) {
    std::string v = std::to_string(p.major) + "." + std::to_string(p.minor);
    std::string msg;
    if (p.major == 0x0100 || p.major == 0) {
      msg = "format version field reads " + v +
            ", which looks byte-swapped or zeroed (big-endian writer or "
            "damaged file?)";
    } else {
      msg = "file has format version " + v + ", newer than this reader (" +
            std::to_string(kFormatMajor) + ".x); upgrade ckpt to read it";
    }
    return At(UnsupportedVersion(msg), kOffMajor);
  }
  // R4: preamble checksum, so every field below is what the writer wrote.
  uint64_t self = LoadLE(b + kOffSelfHash, 8);
  uint64_t computed = Xxh3({b, kOffSelfHash});
  if (self != computed) {
    return At(
        ChecksumMismatch("preamble checksum mismatch: stored " +
                         HashToHex(self) + ", computed " + HashToHex(computed)),
        kOffSelfHash);
  }
  // R5: flags. None are defined in version 1.
  p.flags = static_cast<uint32_t>(LoadLE(b + kOffFlags, 4));
  if (p.flags != 0) {
    return At(UnsupportedVersion("unknown preamble flags 0x" +
                                 HashToHex(p.flags).substr(8)),
              kOffFlags);
  }
  p.data_offset = LoadLE(b + kOffDataOffset, 8);
  p.data_size = LoadLE(b + kOffDataSize, 8);
  p.header_offset = LoadLE(b + kOffHeaderOffset, 8);
  p.header_size = LoadLE(b + kOffHeaderSize, 8);
  p.header_hash = LoadLE(b + kOffHeaderHash, 8);
  // R6: data section on a page boundary, after the preamble.
  if (p.data_offset < kPreambleBytes || p.data_offset % kPageBytes != 0) {
    return At(Corrupt("data offset " + std::to_string(p.data_offset) +
                      " is not a multiple of 4096 past the preamble"),
              kOffDataOffset);
  }
  // R7: sections in order, inside the file, header running to its end.
  uint64_t data_end = 0, header_end = 0;
  if (AddOverflows(p.data_offset, p.data_size, &data_end) ||
      data_end > p.header_offset) {
    return At(
        Corrupt("data section [" + std::to_string(p.data_offset) + ", +" +
                std::to_string(p.data_size) + ") runs past the header offset " +
                std::to_string(p.header_offset)),
        kOffDataSize);
  }
  if (p.header_offset % kHeaderAlignment != 0) {
    return At(Corrupt("header offset " + std::to_string(p.header_offset) +
                      " is not a multiple of 8"),
              kOffHeaderOffset);
  }
  if (AddOverflows(p.header_offset, p.header_size, &header_end) ||
      header_end != file_size) {
    return At(
        Corrupt("header [" + std::to_string(p.header_offset) + ", +" +
                std::to_string(p.header_size) +
                ") does not end at end of file (" + std::to_string(file_size) +
                " bytes): truncated or "
                "appended to"),
        kOffHeaderSize);
  }
  // R8: header size cap, checked before the header is read or allocated.
  if (p.header_size < 8 || p.header_size > kMaxHeaderBytes) {
    return At(Corrupt("header of " + std::to_string(p.header_size) +
                      " bytes is outside [8, " +
                      std::to_string(kMaxHeaderBytes) + "]"),
              kOffHeaderSize);
  }
  return p;
}

namespace {

// True when a vector of tables holds an element offset of 0.
template <typename T>
bool ZeroElement(const flatbuffers::Vector<flatbuffers::Offset<T>>* v) {
  if (!v) return false;
  const uint8_t* raw = v->Data();
  for (flatbuffers::uoffset_t i = 0; i < v->size(); ++i) {
    flatbuffers::uoffset_t off;
    std::memcpy(&off, raw + sizeof(off) * i, sizeof(off));
    if (off == 0) return true;
  }
  return false;
}

using flatbuffers::uoffset_t;

// R19: a string the format says is UTF-8 must be well-formed.
std::optional<std::string> Utf8Error(std::string_view what,
                                     std::string_view s) {
  if (auto bad = Utf8Problem(s)) {
    return std::string(what) + " is not valid UTF-8 (byte " +
           std::to_string(*bad) + " of " + std::to_string(s.size()) + ")";
  }
  return std::nullopt;
}

// R12: storages aligned, in order, inside the data section, one hash per
// chunk.
Status CheckStorages(const fb::Header& h, const Preamble& p) {
  const uint64_t chunk = h.chunk_size();
  const uint64_t data_end = p.data_offset + p.data_size;
  uint64_t prev_end = p.data_offset;
  const auto* storages = h.storages();
  if (!storages) return Status::OK();
  // Most storages repeat the previous one's device ("cpu"): checked once.
  std::string_view checked_device;
  bool any_checked = false;
  for (uoffset_t i = 0; i < storages->size(); ++i) {
    const fb::Storage* s = storages->Get(i);
    // Built on failure only: a 10,000-storage header opens in ~1 ms.
    auto who = [i] { return "storage " + std::to_string(i); };
    uint64_t off = s->offset(), n = s->nbytes(), end = 0;
    if (!s->device()) {
      return At(Corrupt(who() + ": missing device string"), p.header_offset);
    }
    std::string_view device = s->device()->string_view();
    if (!any_checked || device != checked_device) {
      if (auto problem = DeviceProblem(device)) {
        return At(Corrupt(who() + ": invalid device string: " + *problem),
                  p.header_offset);
      }
      checked_device = device;
      any_checked = true;
    }
    if (off % BlobAlignment(n) != 0) {
      return At(
          Corrupt(who() + ": offset " + std::to_string(off) +
                  " is not aligned to " + std::to_string(BlobAlignment(n))),
          off);
    }
    // Offsets never decrease; an empty blob occupies nothing, so the next
    // blob (or another empty one) may start at its offset.
    if (off < prev_end) {
      return At(Corrupt(who() + " at " + std::to_string(off) +
                        " overlaps the previous blob, which ends at " +
                        std::to_string(prev_end)),
                off);
    }
    if (AddOverflows(off, n, &end) || end > data_end) {
      return At(Corrupt(who() + ": blob [" + std::to_string(off) + ", +" +
                        std::to_string(n) + ") ends past the data section (" +
                        std::to_string(data_end) + ")"),
                off);
    }
    prev_end = n >= kLargeBlobBytes ? *AlignUp(end, kPageBytes) : end;
    if (prev_end > data_end) {
      return At(Corrupt(who() + ": page padding runs past the data section"),
                end);
    }
    uint64_t want = n / chunk + (n % chunk != 0);
    uint64_t have = s->chunk_hashes() ? s->chunk_hashes()->size() : 0;
    if (have != want) {
      return At(Corrupt(who() + ": has " + std::to_string(have) +
                        " chunk checksums, needs " + std::to_string(want)),
                p.header_offset);
    }
  }
  return Status::OK();
}

// The raw byte of a bool field: FlatBuffers' accessor folds 2..255 into
// true, and R13 wants to see them. The generated tables derive privately
// from flatbuffers::Table, at offset 0.
uint8_t RawBool(const fb::Tensor* t, flatbuffers::voffset_t field) {
  return reinterpret_cast<const flatbuffers::Table*>(t)->GetField<uint8_t>(
      field, 0);
}

// R13: tensors sorted and unique by path, with known dtype and an extent
// inside their storage.
Status CheckTensors(const fb::Header& h, const Preamble& p) {
  const auto* tensors = h.tensors();
  if (!tensors) return Status::OK();
  const uoffset_t nstorages = h.storages() ? h.storages()->size() : 0;
  std::string_view prev;
  for (uoffset_t i = 0; i < tensors->size(); ++i) {
    const fb::Tensor* t = tensors->Get(i);
    std::string_view path = t->path()->string_view();
    // R19 first: the path goes into every later message.
    if (auto bad = Utf8Error("tensor path", path)) {
      return At(Corrupt("tensor " + std::to_string(i) + ": " + *bad),
                p.header_offset);
    }
    auto fail = [&](std::string msg) {
      return At(Corrupt("tensor " + std::to_string(i) + ": " + std::move(msg)),
                p.header_offset)
          .WithTensor(std::string(path));
    };
    if (i > 0 && !(prev < path)) {
      return fail(prev == path ? "duplicate path"
                               : "tensors are not sorted by path");
    }
    prev = path;
    if (t->storage() >= nstorages) {
      return fail("storage index " + std::to_string(t->storage()) +
                  " out of range (" + std::to_string(nstorages) + " storages)");
    }
    for (auto [field, name] :
         {std::pair{fb::Tensor::VT_REQUIRES_GRAD, "requires_grad"},
          std::pair{fb::Tensor::VT_IS_PARAMETER, "is_parameter"}}) {
      if (uint8_t b = RawBool(t, field); b > 1) {
        return fail(std::string(name) + " byte is " + std::to_string(b) +
                    ", neither 0 nor 1");
      }
    }
    auto span_of = [](const flatbuffers::Vector<int64_t>* v) {
      return v ? std::span<const int64_t>(v->data(), v->size())
               : std::span<const int64_t>();
    };
    if (auto problem =
            ViewProblem(static_cast<uint8_t>(t->dtype()), span_of(t->shape()),
                        span_of(t->strides()), t->storage_offset(),
                        h.storages()->Get(t->storage())->nbytes())) {
      return fail(*problem + " (storage " + std::to_string(t->storage()) + ")");
    }
  }
  return Status::OK();
}

template <typename T>
bool Misaligned(const flatbuffers::Vector<T>* v) {
  // An empty vector has no elements to misalign (builders leave its data
  // pointer 4 mod 8).
  return v && v->size() > 0 &&
         reinterpret_cast<uintptr_t>(v->data()) % alignof(T) != 0;
}

Status CheckWideVectorsAligned(const fb::Header& h, const Preamble& p) {
  auto fail = [&](const std::string& what) {
    return At(Corrupt("header fails FlatBuffers verification: " + what +
                      " has 8-byte elements that are not 8-aligned"),
              p.header_offset);
  };
  if (const auto* storages = h.storages()) {
    for (uoffset_t i = 0; i < storages->size(); ++i) {
      if (Misaligned(storages->Get(i)->chunk_hashes())) {
        return fail("storage " + std::to_string(i) + "'s chunk_hashes");
      }
    }
  }
  if (const auto* tensors = h.tensors()) {
    for (uoffset_t i = 0; i < tensors->size(); ++i) {
      const fb::Tensor* t = tensors->Get(i);
      if (Misaligned(t->shape()) || Misaligned(t->strides())) {
        return fail("tensor " + std::to_string(i) + "'s shape or strides");
      }
    }
  }
  return Status::OK();
}

bool HasKeys(const fb::Node& n) { return n.keys() && n.keys()->size() > 0; }
bool HasItems(const fb::Node& n) { return n.items() && n.items()->size() > 0; }

// Equality classes (KeyClasses) of the nodes that are dict keys or set
// items, or inside one, computed when a parent first asks: most nodes of a
// tree are never keys, and classifying them all would make open several
// times slower. Children are checked (kinds known, in order, depth bounded)
// before any parent asks, so the recursion is bounded by the depth.
class LazyClasses {
 public:
  using Nodes = flatbuffers::Vector<flatbuffers::Offset<fb::Node>>;
  explicit LazyClasses(const Nodes* nodes)
      : nodes_(nodes), cls_(nodes->size(), kNotYet), why_(nodes->size()) {}

  uint32_t Of(uint32_t c) {
    if (cls_[c] != kNotYet) return cls_[c];
    const fb::Node* n = nodes_->Get(c);
    auto k = static_cast<ValueKind>(n->kind());
    uint32_t r = KeyClasses::kUnhashable;
    if (k == ValueKind::kTuple || k == ValueKind::kFrozenSet) {
      std::vector<uint32_t> items;
      bool ok = true;
      for (uoffset_t j = 0; n->items() && j < n->items()->size(); ++j) {
        uint32_t item = n->items()->Get(j);
        uint32_t ic = Of(item);
        if (ic == KeyClasses::kUnhashable) {
          why_[c] = why_[item];
          ok = false;
          break;
        }
        items.push_back(ic);
      }
      if (ok) r = classes_.Classify(DescribeNode(*n), items);
    } else if (IsKeyKind(k)) {
      r = classes_.Classify(DescribeNode(*n), {});
    } else {
      why_[c] = k;
    }
    cls_[c] = r;
    return r;
  }
  /// For an unhashable node: the List, Dict, Set or Tensor that makes it so.
  ValueKind why(uint32_t c) const { return why_[c]; }

  /// The first pair of equal nodes among `ids` (all hashable). Plain string
  /// or int keys, by far the most common, are compared directly.
  std::optional<std::pair<size_t, size_t>> FirstEqual(
      const flatbuffers::Vector<uint32_t>& ids) {
    bool all_str = true, all_int = true;
    for (uint32_t c : ids) {
      auto k = nodes_->Get(c)->kind();
      all_str = all_str && k == fb::ValueKind::String;
      all_int = all_int && k == fb::ValueKind::Int;
    }
    if (all_str) {
      auto str = [&](size_t j) {
        const auto* sv =
            nodes_->Get(ids.Get(static_cast<uoffset_t>(j)))->str_value();
        return sv ? sv->string_view() : std::string_view();
      };
      return FirstRepeat(
          ids.size(),
          [&](size_t j) { return std::hash<std::string_view>()(str(j)); },
          [&](size_t a, size_t b) { return str(a) == str(b); });
    }
    if (all_int) {
      auto val = [&](size_t j) {
        return nodes_->Get(ids.Get(static_cast<uoffset_t>(j)))->int_value();
      };
      return FirstRepeat(
          ids.size(), [&](size_t j) { return static_cast<uint64_t>(val(j)); },
          [&](size_t a, size_t b) { return val(a) == val(b); });
    }
    std::vector<uint32_t> classes;
    classes.reserve(ids.size());
    for (uint32_t c : ids) classes.push_back(Of(c));
    return FirstDuplicate(classes);
  }

 private:
  static constexpr uint32_t kNotYet = KeyClasses::kUnhashable - 1;
  const Nodes* nodes_;
  KeyClasses classes_;
  std::vector<uint32_t> cls_;
  std::vector<ValueKind> why_;
};

// R14, second part: fields a kind does not use are absent (or default).
std::optional<std::string> UnusedFieldProblem(const fb::Node& n, ValueKind k) {
  auto bits = [](double v) { return std::bit_cast<uint64_t>(v); };
  auto len = [](const auto* v) -> size_t { return v ? v->size() : 0; };
  // Each field with whether it holds anything, checked in schema order.
  const std::pair<NodeField, bool> set[] = {
      {kFieldInt, n.int_value() != 0},
      {kFieldFloat, bits(n.float_value()) != 0},
      {kFieldImag, bits(n.imag_value()) != 0},
      {kFieldStr, len(n.str_value()) > 0},
      {kFieldBytes, len(n.bytes_value()) > 0},
      {kFieldItems, len(n.items()) > 0},
      {kFieldKeys, len(n.keys()) > 0},
      {kFieldTypeName, len(n.type_name()) > 0},
  };
  for (const auto& [field, present] : set) {
    if (present && !KindUsesField(k, field)) {
      return "kind " + std::string(ValueKindName(k)) + " does not use " +
             std::string(NodeFieldName(field));
    }
  }
  return std::nullopt;
}

// R14: the object tree is a tree: kinds known, children before parents,
// every node but the root (the last) used exactly once, every tensor
// referenced exactly once, nesting bounded; dict keys and set items
// hashable (at every depth) and pairwise unequal (Python's ==); each
// kind's fields valid and the others empty. One method per rule, run node
// by node in file order (children first).
class TreeChecker {
 public:
  TreeChecker(const fb::Header& h, const Preamble& p)
      : h_(h),
        p_(p),
        nodes_(h.nodes()),
        n_(nodes_->size()),
        ntensors_(h.tensors() ? h.tensors()->size() : 0),
        used_(n_, 0),
        tensor_used_(ntensors_, 0),
        depth_(n_, 1),
        lazy_(nodes_) {}

  Status Run() {
    for (uoffset_t i = 0; i < n_; ++i) {
      const fb::Node& node = *nodes_->Get(i);
      CKPT_RETURN_IF_ERROR(CheckShape(i, node));
      CKPT_RETURN_IF_ERROR(LinkChildren(i, node));
      CKPT_RETURN_IF_ERROR(CheckKeys(i, node));
      CKPT_RETURN_IF_ERROR(CheckValue(i, node));
    }
    CKPT_RETURN_IF_ERROR(CheckAllUsed());
    // Field contents last, so a misplaced node is reported by its place.
    for (uoffset_t i = 0; i < n_; ++i) {
      const fb::Node& node = *nodes_->Get(i);
      if (auto problem =
              UnusedFieldProblem(node, static_cast<ValueKind>(node.kind()))) {
        return Fail(i, *problem);
      }
    }
    return Status::OK();
  }

 private:
  Status Fail(uoffset_t i, const std::string& msg) const {
    return At(Corrupt("tree node " + std::to_string(i) + ": " + msg),
              p_.header_offset);
  }

  // A known kind, with items and keys only where its row allows them.
  Status CheckShape(uoffset_t i, const fb::Node& node) const {
    auto kind = static_cast<uint8_t>(node.kind());
    if (!ValueKindFromCode(kind)) {
      return Fail(i, "unknown kind " + std::to_string(kind));
    }
    auto vk = static_cast<ValueKind>(kind);
    if (!KindUsesField(vk, kFieldItems) && HasItems(node)) {
      return Fail(i, "scalar with items");
    }
    if (!KindUsesField(vk, kFieldKeys) && HasKeys(node)) {
      return Fail(i, "keys on a node that is not a dict");
    }
    if (vk == ValueKind::kDict) {
      size_t nk = node.keys() ? node.keys()->size() : 0;
      size_t ni = node.items() ? node.items()->size() : 0;
      if (nk != ni) {
        return Fail(i, "dict with " + std::to_string(nk) + " keys and " +
                           std::to_string(ni) + " values");
      }
    }
    return Status::OK();
  }

  // Children precede their parent and have one parent; depth bounded.
  Status LinkChildren(uoffset_t i, const fb::Node& node) {
    auto visit = [&](uint32_t child) -> Status {
      if (child >= i) {
        return Fail(i, "child " + std::to_string(child) +
                           " does not precede its parent");
      }
      if (used_[child]) {
        return Fail(i,
                    "child " + std::to_string(child) + " already has a parent");
      }
      used_[child] = 1;
      depth_[i] = std::max(depth_[i], depth_[child] + 1);
      return Status::OK();
    };
    for (const auto* ids : {node.items(), node.keys()}) {
      if (!ids) continue;
      for (uint32_t c : *ids) CKPT_RETURN_IF_ERROR(visit(c));
    }
    if (depth_[i] > kMaxTreeDepth) {
      return Fail(i, "nesting deeper than " + std::to_string(kMaxTreeDepth));
    }
    return Status::OK();
  }

  // Dict keys, and the items of sets, must be hashable and distinct, as
  // in Python; a Tuple or FrozenSet is hashable when all it holds is.
  Status CheckKeys(uoffset_t i, const fb::Node& node) {
    const auto vk = static_cast<ValueKind>(node.kind());
    const bool dict = vk == ValueKind::kDict;
    const bool set = vk == ValueKind::kSet || vk == ValueKind::kFrozenSet;
    const auto* ids = dict ? node.keys() : set ? node.items() : nullptr;
    if (!ids) return Status::OK();
    const char* role = dict                    ? "a dict key"
                       : vk == ValueKind::kSet ? "a set item"
                                               : "a frozenset item";
    for (uint32_t c : *ids) {
      auto ck = static_cast<ValueKind>(nodes_->Get(c)->kind());
      const bool nested =
          ck == ValueKind::kTuple || ck == ValueKind::kFrozenSet;
      if (nested ? lazy_.Of(c) != KeyClasses::kUnhashable : IsKeyKind(ck)) {
        continue;
      }
      std::string what = "a " + std::string(ValueKindName(ck));
      if (nested) {
        what += " holding a " + std::string(ValueKindName(lazy_.why(c)));
      }
      return Fail(i, what + " cannot be " + role);
    }
    if (auto dup = lazy_.FirstEqual(*ids)) {
      return Fail(i, std::string(dict ? "dict keys" : "set items") + " " +
                         std::to_string(dup->first) + " and " +
                         std::to_string(dup->second) + " are equal");
    }
    return Status::OK();
  }

  // The value of each kind: bool 0/1, BigInt size, UTF-8, dtype code,
  // device grammar, tensor index used once; type_name UTF-8.
  Status CheckValue(uoffset_t i, const fb::Node& node_ref) {
    const fb::Node* node = &node_ref;
    const auto vk = static_cast<ValueKind>(node->kind());
    if (vk == ValueKind::kDevice && !node->str_value()) {
      return Fail(i, "device without a string");
    }
    if (auto why = ValueProblem(DescribeNode(*node))) return Fail(i, *why);
    if (vk == ValueKind::kTensor) {  // the one rule that needs the header
      int64_t t = node->int_value();
      if (t < 0 || static_cast<uint64_t>(t) >= ntensors_) {
        return Fail(i, "tensor index " + std::to_string(t) + " out of range");
      }
      if (tensor_used_[static_cast<size_t>(t)]) {
        return Fail(i, "tensor " + std::to_string(t) + " is referenced twice");
      }
      tensor_used_[static_cast<size_t>(t)] = 1;
    }
    if (node->type_name()) {
      if (auto bad = Utf8Error("type_name", node->type_name()->string_view())) {
        return Fail(i, *bad);
      }
    }
    return Status::OK();
  }

  Status CheckAllUsed() const {
    for (uoffset_t i = 0; i + 1 < n_; ++i) {
      if (!used_[i]) return Fail(i, "not reachable from the root");
    }
    for (uoffset_t t = 0; t < ntensors_; ++t) {
      if (!tensor_used_[t]) {
        return At(Corrupt("tensor is not in the object tree"), p_.header_offset)
            .WithTensor(h_.tensors()->Get(t)->path()->str());
      }
    }
    return Status::OK();
  }

  const fb::Header& h_;
  const Preamble& p_;
  const flatbuffers::Vector<flatbuffers::Offset<fb::Node>>* nodes_;
  const uoffset_t n_;
  const uoffset_t ntensors_;
  std::vector<uint8_t> used_;
  std::vector<uint8_t> tensor_used_;
  std::vector<uint32_t> depth_;
  // Equality class of each hashable node (KeyClasses::kUnhashable for the
  // others) and, for an unhashable one, the kind that makes it so.
  LazyClasses lazy_;
};

Status CheckNodes(const fb::Header& h, const Preamble& p) {
  if (!h.nodes() || h.nodes()->size() == 0) {
    return At(Corrupt("object tree has no root node"), p.header_offset);
  }
  return TreeChecker(h, p).Run();
}

// R15: metadata keys sorted (byte-wise) and unique; R19 for keys and values.
Status CheckMetadata(const fb::Header& h, const Preamble& p) {
  const auto* md = h.metadata();
  if (!md) return Status::OK();
  for (uoffset_t i = 0; i < md->size(); ++i) {
    const fb::KeyValue* kv = md->Get(i);
    auto bad = Utf8Error("metadata key " + std::to_string(i),
                         kv->key()->string_view());
    if (!bad && kv->value()) {
      bad = Utf8Error("metadata value of '" + kv->key()->str() + "'",
                      kv->value()->string_view());
    }
    if (bad) return At(Corrupt(*bad), p.header_offset);
    // string_view's compare is byte-wise on unsigned bytes (char_traits).
    if (i > 0 &&
        !(md->Get(i - 1)->key()->string_view() < kv->key()->string_view())) {
      return At(Corrupt("metadata keys are not sorted and unique at '" +
                        kv->key()->str() + "'"),
                p.header_offset);
    }
  }
  return Status::OK();
}

// Headers at least this large (some 2,500 tensors) are checked on two
// threads: the checksum beside the FlatBuffers Verifier, then the storage
// and tensor tables beside the tree. Below it a thread costs more than it
// saves.
constexpr size_t kParallelHeaderBytes = 256u << 10;

// Runs a() and b(), side by side when `parallel` (a on a new thread, b on
// this one, which keeps its warm heap for b's allocations; serially when
// no thread can start), and returns the first failure in the order a, b:
// the error a serial check would report. Serially b runs only if a passed.
// Not ParallelFor: its threads take indices in whatever order they start,
// and the tree check on a fresh thread's cold heap made a 10,000-tensor
// open 2.5 ms instead of 1.25 ms.
template <class A, class B>
Status FirstFailure(bool parallel, A a, B b) {
  std::future<Status> first;
  if (parallel) {
    try {
      first = std::async(std::launch::async, a);
    } catch (const std::system_error&) {
      // No thread: check serially.
    }
  }
  if (!first.valid()) {
    Status s = a();
    return s.ok() ? b() : s;
  }
  Status second = b();
  Status s = first.get();
  return s.ok() ? second : s;
}

// R10: FlatBuffers structure with explicit limits, and what the Verifier
// leaves out; R11: the checksum chunk size.
Status CheckStructure(std::span<const std::byte> header, const Preamble& p) {
  const auto* data = reinterpret_cast<const uint8_t*>(header.data());
  flatbuffers::Verifier::Options opts;
  opts.max_depth = 16;  // Header > vector > table > vector: the tree is flat
  opts.max_tables = static_cast<uoffset_t>(header.size() / 4 + 16);
  opts.check_alignment = true;
  flatbuffers::Verifier verifier(data, header.size(), opts);
  if (!fb::HeaderBufferHasIdentifier(data) ||
      !fb::VerifyHeaderBuffer(verifier)) {
    return At(Corrupt("header fails FlatBuffers verification (wrong "
                      "identifier, bad offsets or bad alignment)"),
              p.header_offset);
  }
  const fb::Header* h = fb::GetHeader(data);
  // R10, beyond the Verifier: it checks a vector's length prefix is 4-aligned
  // but not that 8-byte elements are 8-aligned, and reading an int64 span
  // that is not would be undefined behaviour. Builders always align them.
  CKPT_RETURN_IF_ERROR(CheckWideVectorsAligned(*h, p));
  // R10, beyond the Verifier: an element of a vector of tables is an
  // offset from itself, and the Verifier accepts 0, which makes the element
  // its own table with every field absent. No builder writes it.
  if (ZeroElement(h->storages()) || ZeroElement(h->tensors()) ||
      ZeroElement(h->nodes()) || ZeroElement(h->metadata())) {
    return At(Corrupt("a table vector holds a zero offset"), p.header_offset);
  }
  // R11: checksum chunk size.
  uint64_t chunk = h->chunk_size();
  if (chunk < kMinChunkBytes || chunk > kMaxChunkBytes ||
      (chunk & (chunk - 1)) != 0) {
    return At(Corrupt("checksum chunk size " + std::to_string(chunk) +
                      " is not a power of two in [4096, 2^30]"),
              p.header_offset);
  }
  return Status::OK();
}

}  // namespace

Result<const fb::Header*> ValidateHeader(std::span<const std::byte> header,
                                         const Preamble& p) {
  const bool parallel = header.size() >= kParallelHeaderBytes;
  // R9 (header checksum) first, then R10-R11. The Verifier is safe on any
  // bytes, so it may run while the checksum is computed.
  Status structure = FirstFailure(
      parallel,
      [&]() -> Status {
        uint64_t computed = Xxh3(header);
        if (computed == p.header_hash) return Status::OK();
        return At(ChecksumMismatch("header checksum mismatch: stored " +
                                   HashToHex(p.header_hash) + ", computed " +
                                   HashToHex(computed)),
                  p.header_offset);
      },
      [&] { return CheckStructure(header, p); });
  CKPT_RETURN_IF_ERROR(structure);
  const fb::Header* h =
      fb::GetHeader(reinterpret_cast<const uint8_t*>(header.data()));
  // R12-R13, then R14: each reads only verified fields and bounds-checks
  // its own indices, so the tree needs nothing the tables establish.
  Status contents = FirstFailure(
      parallel,
      [&]() -> Status {
        CKPT_RETURN_IF_ERROR(CheckStorages(*h, p));
        return CheckTensors(*h, p);
      },
      [&] { return CheckNodes(*h, p); });
  CKPT_RETURN_IF_ERROR(contents);
  CKPT_RETURN_IF_ERROR(CheckMetadata(*h, p));
  if (h->producer()) {
    if (auto bad = Utf8Error("producer", h->producer()->string_view())) {
      return At(Corrupt(*bad), p.header_offset);
    }
  }
  return h;
}

KeyNode DescribeNode(const fb::Node& n) {
  KeyNode k;
  k.kind = static_cast<ValueKind>(n.kind());
  k.int_value = n.int_value();
  k.float_value = n.float_value();
  k.imag_value = n.imag_value();
  if (n.str_value()) k.str = n.str_value()->string_view();
  if (n.bytes_value())
    k.bytes = {n.bytes_value()->data(), n.bytes_value()->size()};
  k.num_items = n.items() ? n.items()->size() : 0;
  return k;
}

}  // namespace ckpt::internal
