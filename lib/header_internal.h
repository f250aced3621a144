// Preamble encoding and the validation rules of docs/FORMAT.md section 8:
// one function per group of rules, each failure a Status naming the rule's
// byte offset.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "ckpt/status.h"
#include "ckpt_generated.h"
#include "format_internal.h"
#include "tree_internal.h"

namespace ckpt::internal {

struct Preamble {
  uint16_t major = 0;
  uint16_t minor = 0;
  uint32_t flags = 0;
  uint64_t data_offset = 0;
  uint64_t data_size = 0;
  uint64_t header_offset = 0;
  uint64_t header_size = 0;
  uint64_t header_hash = 0;
};

/// Field offsets inside the preamble (docs/FORMAT.md section 3).
inline constexpr uint64_t kOffMajor = 8;
inline constexpr uint64_t kOffFlags = 12;
inline constexpr uint64_t kOffDataOffset = 16;
inline constexpr uint64_t kOffDataSize = 24;
inline constexpr uint64_t kOffHeaderOffset = 32;
inline constexpr uint64_t kOffHeaderSize = 40;
inline constexpr uint64_t kOffHeaderHash = 48;
inline constexpr uint64_t kOffSelfHash = 56;

/// The 64 preamble bytes, self-checksum included.
std::array<std::byte, 64> EncodePreamble(const Preamble& p);

/// Rules R1-R8: size, magic, version, preamble checksum, flags, section
/// ranges, header size cap. `bytes` holds at least min(64, file_size) bytes of
/// the file.
Result<Preamble> DecodePreamble(std::span<const std::byte> bytes,
                                uint64_t file_size);

/// Rules R9-R15 and R19 on the header bytes: checksum, FlatBuffers
/// Verifier, and the semantic rules that need no data bytes. `header` must be
/// 8-byte aligned. On success returns the root table (pointing into `header`).
Result<const fb::Header*> ValidateHeader(std::span<const std::byte> header,
                                         const Preamble& p);

/// The fields of a verified header's node, as the key grammar
/// (tree_internal.h) reads them: the one fb::Node -> KeyNode mapping.
KeyNode DescribeNode(const fb::Node& n);

}  // namespace ckpt::internal
