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

/// Escapes one path segment (RFC 6901): '~' -> "~0", '/' -> "~1".
std::string EscapePathSegment(std::string_view segment);
/// Joins escaped segments with '/'.
std::string JoinPath(const std::vector<std::string>& raw_segments);
/// Splits a path into unescaped segments; the empty path has no segments.
/// kInvalidArgument for a '~' not followed by '0' or '1'.
Result<std::vector<std::string>> SplitPath(std::string_view path);

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
