// The one little-endian codec and the one checked-range test of the
// library. Every fixed-width integer read from or written to a file (the
// preamble, zip records, pickle opcodes, legacy .pth counts) goes through
// LoadLE/StoreLE, and every "does [offset, offset + len) lie inside N
// bytes" question through RangeWithin, so that no caller spells its own
// overflow-prone `offset + len <= size`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>

namespace ckpt::internal {

/// The unsigned little-endian integer in the `n` bytes (0..8) at `p`.
inline uint64_t LoadLE(const std::byte* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) {
    v |= static_cast<uint64_t>(p[i]) << (8 * i);
  }
  return v;
}

/// The little-endian T (an integer type) at `p`.
template <typename T>
T LoadLE(const std::byte* p) {
  static_assert(std::is_integral_v<T> && sizeof(T) <= 8);
  return static_cast<T>(LoadLE(p, sizeof(T)));
}

/// Writes the low `n` bytes (0..8) of `v` to `p`, little-endian.
inline void StoreLE(std::byte* p, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
  }
}

/// True when [offset, offset + len) lies within [0, size), without overflow.
constexpr bool RangeWithin(uint64_t offset, uint64_t len, uint64_t size) {
  return offset <= size && len <= size - offset;
}

/// The bytes [offset, offset + len) of `bytes`, or an empty span when they
/// do not lie within it (check RangeWithin first when empty is legal).
inline std::span<const std::byte> SubSpan(std::span<const std::byte> bytes,
                                          uint64_t offset, uint64_t len) {
  if (!RangeWithin(offset, len, bytes.size())) return {};
  return bytes.subspan(static_cast<size_t>(offset), static_cast<size_t>(len));
}

}  // namespace ckpt::internal
