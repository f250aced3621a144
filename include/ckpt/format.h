// Format constants, the dtype table and tensor-path escaping. No I/O.
//
// File layout (format version 1; docs/FORMAT.md is normative):
//
//   offset 0            preamble, kPreambleBytes, little-endian:
//                         0  magic        8  "\x89CKPT\r\n\x1a"
//                         8  major        2  u16
//                        10  minor        2  u16
//                        12  flags        4  u32, must be 0
//                        16  data_offset  8  u64, multiple of 4096
//                        24  data_size    8  u64
//                        32  header_off   8  u64, multiple of 8
//                        40  header_size  8  u64
//                        48  header_xxh3  8  XXH3-64 of the header bytes
//                        56  self_xxh3    8  XXH3-64 of bytes [0, 56)
//   [64, data_offset)   zero
//   data section        tensor storages ("blobs"), aligned, zero padding
//   header_offset       FlatBuffers header (schema/ckpt.fbs), to end of file
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ckpt/status.h"

static_assert(std::endian::native == std::endian::little,
              "ckpt reads and writes little-endian data in place; a "
              "big-endian host would need byte swapping, not implemented");

namespace ckpt {

/// Library version (not the format version).
inline constexpr int kVersionMajor = 0;
inline constexpr int kVersionMinor = 2;
inline constexpr int kVersionPatch = 0;
/// Runtime version string, "0.2.0"; compare with the macros above to detect
/// a header/library mismatch.
std::string_view VersionString();

/// Magic bytes, valid since format 1.0. Chosen as PNG's was: the high-bit
/// first byte catches 7-bit transfers, CR LF catches newline translation,
/// 0x1A stops `type` on DOS, and "CKPT" names the format in a hex dump.
inline constexpr std::array<unsigned char, 8> kMagic = {0x89, 'C',  'K',  'P',
                                                        'T',  '\r', '\n', 0x1A};
/// Format version written by this library; a reader accepts any minor of
/// its major and refuses a newer major. Valid since 1.0.
inline constexpr uint16_t kFormatMajor = 1;
/// Newest minor version this library writes (1 since format 1.1). The
/// writer stamps each file with the lowest minor its contents need
/// (docs/FORMAT.md 9), so a file without 1.1 features is still 1.0.
inline constexpr uint16_t kFormatMinor = 1;
/// Size of the fixed preamble: magic(8) + versions(2+2) + flags(4) + four
/// offsets/sizes(4*8) + two hashes(2*8).
inline constexpr size_t kPreambleBytes = 8 + 2 + 2 + 4 + 4 * 8 + 2 * 8;
static_assert(kPreambleBytes == 64);
/// The data section starts on a page boundary so blobs can be mapped and
/// read with O_DIRECT as they are.
inline constexpr uint64_t kPageBytes = 4096;
/// Every blob starts on a multiple of this (cache line, AVX-512 loads).
inline constexpr uint64_t kMinAlignment = 64;
/// Blobs of at least this size start on a page and are padded to a page.
inline constexpr uint64_t kLargeBlobBytes = 1u << 20;
/// The header follows the data section at a multiple of this, so the
/// FlatBuffers verifier's alignment checks hold on a page-aligned mapping.
inline constexpr uint64_t kHeaderAlignment = 8;
/// Largest header a reader accepts (R8). 10,000 tensors take ~1 MiB.
inline constexpr uint64_t kMaxHeaderBytes = 1ull << 30;
/// Default checksum chunk; a slice or a parallel verify hashes only the
/// chunks it touches. Allowed range: [kMinChunkBytes, kMaxChunkBytes].
inline constexpr uint64_t kDefaultChunkBytes = 4u << 20;
inline constexpr uint64_t kMinChunkBytes = 4096;
inline constexpr uint64_t kMaxChunkBytes = 1ull << 30;
/// Largest tensor rank accepted.
inline constexpr size_t kMaxRank = 64;
/// Deepest object-tree nesting accepted (root has depth 1).
inline constexpr uint32_t kMaxTreeDepth = 1000;
/// Most bytes of a BigInt node's two's complement (|v| < 2^32767).
inline constexpr size_t kMaxBigIntBytes = 4096;

/// Element types; codes equal schema/ckpt.fbs's `DType` and never change.
enum class DType : uint8_t {
  kInvalid = 0,
  kBool = 1,
  kUInt8 = 2,
  kInt8 = 3,
  kInt16 = 4,
  kInt32 = 5,
  kInt64 = 6,
  kUInt16 = 7,
  kUInt32 = 8,
  kUInt64 = 9,
  kFloat16 = 10,
  kBFloat16 = 11,
  kFloat32 = 12,
  kFloat64 = 13,
  kComplex32 = 14,
  kComplex64 = 15,
  kComplex128 = 16,
  kFloat8E4M3FN = 17,
  kFloat8E5M2 = 18,
  kFloat8E4M3FNUZ = 19,
  kFloat8E5M2FNUZ = 20,
  kFloat8E8M0FNU = 21,
  kFloat4E2M1FNx2 = 22,
  kQInt8 = 23,
  kQUInt8 = 24,
  kQInt32 = 25,
  kQUInt4x2 = 26,
  kQUInt2x4 = 27,
  kBits8 = 28,
  kBits16 = 29,
  kBits1x8 = 30,
  kBits2x4 = 31,
  kBits4x2 = 32,
  // Since format 1.1: torch's sub-byte integer "shell" dtypes (torch >= 2.3),
  // one value per byte as torch stores them.
  kUInt1 = 33,
  kUInt2 = 34,
  kUInt3 = 35,
  kUInt4 = 36,
  kUInt5 = 37,
  kUInt6 = 38,
  kUInt7 = 39,
  kInt1 = 40,
  kInt2 = 41,
  kInt3 = 42,
  kInt4 = 43,
  kInt5 = 44,
  kInt6 = 45,
  kInt7 = 46,
};
inline constexpr uint8_t kMaxDTypeCode = 46;

/// Size in bytes of one element, or 0 for kInvalid / unknown codes.
size_t DTypeSize(DType dtype);
/// torch's name without "torch.": "float32", "bfloat16", "bool"...; "" if
/// unknown.
std::string_view DTypeName(DType dtype);
/// Inverse of DTypeName; nullopt for an unknown name.
std::optional<DType> DTypeFromName(std::string_view name);
/// True for codes 1..kMaxDTypeCode.
bool IsKnownDType(uint8_t code);
/// The format minor version (of kFormatMajor) that added `dtype`: a file
/// holding it says at least this minor (0 for unknown codes).
uint16_t DTypeSinceMinor(DType dtype);

// ---- Node kinds of the object tree (docs/FORMAT.md section 7) ----------
//
// One row per kind: adding a kind is this table, schema/ckpt.fbs's
// ValueKind enum (lib/header.cc static_asserts that they agree) and
// FORMAT.md. The reader's checks (R14: fields, keys, containers), the
// writer's builders, `ckpt`'s JSON, the Python binding and the .pth
// importer all read their facts from here.

/// Kind of a node in the object tree (schema/ckpt.fbs ValueKind).
enum class ValueKind : uint8_t {
  kNone = 0,
  kBool = 1,
  kInt = 2,
  kBigInt = 3,
  kFloat = 4,
  kComplex = 5,
  kString = 6,
  kBytes = 7,
  kList = 8,
  kTuple = 9,
  kDict = 10,
  kSet = 11,
  kFrozenSet = 12,
  kTensor = 13,
  kDType = 14,
  kDevice = 15,
};
inline constexpr uint8_t kMaxValueKindCode = 15;

/// The fields of schema/ckpt.fbs's Node, as bits: which ones a kind uses.
/// Every field a kind does not use must be absent or hold its default
/// (FORMAT.md R14).
enum NodeField : uint8_t {
  kFieldInt = 1 << 0,       ///< int_value
  kFieldFloat = 1 << 1,     ///< float_value
  kFieldImag = 1 << 2,      ///< imag_value
  kFieldStr = 1 << 3,       ///< str_value
  kFieldBytes = 1 << 4,     ///< bytes_value
  kFieldItems = 1 << 5,     ///< items
  kFieldKeys = 1 << 6,      ///< keys (parallel to items)
  kFieldTypeName = 1 << 7,  ///< type_name (a class tag)
};

/// The schema's name of `field` ("int_value", ..., "type_name").
constexpr std::string_view NodeFieldName(NodeField field) {
  switch (field) {
    case kFieldInt:
      return "int_value";
    case kFieldFloat:
      return "float_value";
    case kFieldImag:
      return "imag_value";
    case kFieldStr:
      return "str_value";
    case kFieldBytes:
      return "bytes_value";
    case kFieldItems:
      return "items";
    case kFieldKeys:
      return "keys";
    case kFieldTypeName:
      return "type_name";
  }
  return "?";
}

/// What a kind is, in one row.
struct ValueKindTraits {
  ValueKind kind;
  /// Lower-case name: `ckpt ls`, `File.kind()`, error messages.
  std::string_view name;
  /// Holds child nodes in `items` (List, Tuple, Dict, Set, FrozenSet).
  bool container;
  /// May be a dict key or a set item (R14). Tuple and FrozenSet only when
  /// every item they hold may be one too.
  bool hashable;
  /// NodeField bits this kind uses.
  uint8_t fields;
  /// The format minor version that added the kind: a file holding it says
  /// at least this minor.
  uint16_t since_minor = 0;
};

inline constexpr std::array<ValueKindTraits, kMaxValueKindCode + 1>
    kValueKinds = {{
        {ValueKind::kNone, "none", false, true, 0},
        {ValueKind::kBool, "bool", false, true, kFieldInt},
        {ValueKind::kInt, "int", false, true, kFieldInt},
        {ValueKind::kBigInt, "bigint", false, true, kFieldBytes},
        {ValueKind::kFloat, "float", false, true, kFieldFloat},
        {ValueKind::kComplex, "complex", false, true, kFieldFloat | kFieldImag},
        {ValueKind::kString, "string", false, true, kFieldStr},
        {ValueKind::kBytes, "bytes", false, true, kFieldBytes},
        {ValueKind::kList, "list", true, false, kFieldItems},
        {ValueKind::kTuple, "tuple", true, true, kFieldItems},
        {ValueKind::kDict, "dict", true, false,
         kFieldItems | kFieldKeys | kFieldTypeName},
        {ValueKind::kSet, "set", true, false, kFieldItems},
        {ValueKind::kFrozenSet, "frozenset", true, true, kFieldItems},
        {ValueKind::kTensor, "tensor", false, false,
         kFieldInt | kFieldTypeName},
        {ValueKind::kDType, "dtype", false, true, kFieldInt},
        {ValueKind::kDevice, "device", false, true, kFieldStr},
    }};

constexpr bool ValueKindRowsInOrder() {
  for (size_t i = 0; i < kValueKinds.size(); ++i) {
    if (static_cast<size_t>(kValueKinds[i].kind) != i) return false;
  }
  return true;
}
static_assert(ValueKindRowsInOrder(), "kValueKinds row i must be kind i");
constexpr bool ValueKindMinorsKnown() {
  for (const auto& row : kValueKinds) {
    if (row.since_minor > kFormatMinor) return false;
  }
  return true;
}
static_assert(ValueKindMinorsKnown(), "a kind's minor exceeds kFormatMinor");

/// The kind with code `code`, or nullopt past kMaxValueKindCode.
constexpr std::optional<ValueKind> ValueKindFromCode(uint8_t code) {
  if (code > kMaxValueKindCode) return std::nullopt;
  return static_cast<ValueKind>(code);
}
/// The row of `kind` (which must be a known kind).
constexpr const ValueKindTraits& TraitsOf(ValueKind kind) {
  return kValueKinds[static_cast<size_t>(kind)];
}
/// "none", "bool", ..., "device"; "unknown" for a code past the table.
constexpr std::string_view ValueKindName(ValueKind kind) {
  return static_cast<uint8_t>(kind) <= kMaxValueKindCode
             ? TraitsOf(kind).name
             : std::string_view("unknown");
}
/// List, Tuple, Dict, Set, FrozenSet.
constexpr bool IsContainer(ValueKind kind) {
  return static_cast<uint8_t>(kind) <= kMaxValueKindCode &&
         TraitsOf(kind).container;
}
/// A kind that may be a dict key or set item by itself (Tuple and
/// FrozenSet: only when all their items may be; see R14).
constexpr bool IsKeyKind(ValueKind kind) {
  return static_cast<uint8_t>(kind) <= kMaxValueKindCode &&
         TraitsOf(kind).hashable;
}
/// True when `kind` uses `field` (a NodeField bit).
constexpr bool KindUsesField(ValueKind kind, NodeField field) {
  return static_cast<uint8_t>(kind) <= kMaxValueKindCode &&
         (TraitsOf(kind).fields & field) != 0;
}

/// Escapes one path segment (RFC 6901): '~' -> "~0", '/' -> "~1".
std::string EscapePathSegment(std::string_view segment);
/// Joins raw segments into a path (PathBuilder's rules).
std::string JoinPath(const std::vector<std::string>& raw_segments);
/// Splits a path into unescaped segments; the empty path has no segments.
/// kInvalidArgument for a '~' not followed by '0' or '1'.
Result<std::vector<std::string>> SplitPath(std::string_view path);

/// Builds tensor paths (docs/FORMAT.md 7.2) one segment at a time: a
/// node's path is its segments from the root, each escaped
/// (EscapePathSegment) and joined with '/', so the root's children have no
/// leading '/' and the root's path is empty. The one place in ckpt where
/// paths are joined: the writer, the reader's checks and lookups, the .pth
/// importer, the CLI and the Python package (through the binding) use it.
class PathBuilder {
 public:
  /// Enters the child `segment` (raw, unescaped) of the current node.
  void Push(std::string_view segment) {
    marks_.push_back(path_.size());
    path_ = Child(path_, marks_.size() == 1, segment);
  }
  /// Leaves the current node for its parent; no-op at the root.
  void Pop() {
    if (marks_.empty()) return;
    path_.resize(marks_.back());
    marks_.pop_back();
  }
  /// The current node's path ("" at the root).
  const std::string& path() const { return path_; }
  /// Segments between the root and the current node.
  size_t depth() const { return marks_.size(); }

  /// The path of child `segment` (raw) of the node at `parent`; for walks
  /// that keep one path per stack frame. `parent_is_root`: `parent` is the
  /// root (whose children's paths have no leading '/'; a child of a node
  /// whose path is "" because its key was "" does).
  static std::string Child(std::string_view parent, bool parent_is_root,
                           std::string_view segment) {
    std::string out;
    if (!parent_is_root) {
      out.reserve(parent.size() + 1 + segment.size());
      out.append(parent);
      out += '/';
    }
    out += EscapePathSegment(segment);
    return out;
  }

 private:
  std::string path_;
  std::vector<size_t> marks_;
};

/// What a node of the object tree holds besides its children: the
/// schema's Node fields that carry a value (docs/FORMAT.md 7.1; which ones
/// a kind uses is its kValueKinds row). The writer keeps one per node;
/// a PathKey is one with items.
struct NodeValue {
  ValueKind kind = ValueKind::kNone;
  int64_t int_value = 0;   ///< Bool (0/1), Int, DType code, Tensor index
  double float_value = 0;  ///< Float; real part of Complex
  double imag_value = 0;   ///< imaginary part of Complex
  std::string text;        ///< String (UTF-8), Device
  /// Bytes; BigInt as little-endian two's complement (1..kMaxBigIntBytes).
  std::vector<uint8_t> bytes;
};

/// A dict key, described for KeySegment: a value of a hashable kind, with
/// its items for Tuple and FrozenSet keys.
struct PathKey : NodeValue {
  std::vector<PathKey> items;  ///< Tuple, FrozenSet
};

/// The path form of a dict key (docs/FORMAT.md 7.3), unescaped: what the
/// key's entry is named in tensor paths, as the writer names it (floats as
/// Python's repr(); a FrozenSet's items in canonical order). Pass it to
/// PathBuilder::Push. kInvalidArgument for a key a file cannot hold: a kind
/// that is not hashable (List, Dict, Set, Tensor, also inside a Tuple or
/// FrozenSet), invalid UTF-8, an unknown dtype code, a bad device string, a
/// BigInt of 0 or more than 4096 bytes, nesting deeper than kMaxTreeDepth.
Result<std::string> KeySegment(const PathKey& key);

/// The format's checksum (XXH3-64, seed 0) of `bytes`: what the preamble,
/// header and chunk hashes hold (docs/FORMAT.md section 2). For tools that
/// check or craft files by hand.
uint64_t Checksum(std::span<const std::byte> bytes);

/// True for "cpu", "cuda:0", "mps", "meta", "xla:3", "privateuse1": the
/// device grammar of docs/FORMAT.md, [A-Za-z_][A-Za-z0-9_]*(:INDEX)?,
/// INDEX a decimal in [0, 2^31 - 1] without leading zeros, at most 64
/// characters.
bool IsValidDevice(std::string_view device);

/// a rounded up to a multiple of the power of two `align`; nullopt on
/// overflow.
std::optional<uint64_t> AlignUp(uint64_t a, uint64_t align);

/// Required alignment of a blob of `nbytes` (kMinAlignment or kPageBytes).
inline uint64_t BlobAlignment(uint64_t nbytes) {
  return nbytes >= kLargeBlobBytes ? kPageBytes : kMinAlignment;
}

}  // namespace ckpt
