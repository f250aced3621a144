// XXH3-64 hashing. xxHash is included (XXH_INLINE_ALL) only in
// checksum_internal.cc, so none of its symbols leave the library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace ckpt::internal {

/// XXH3-64 with seed 0 of `bytes`.
uint64_t Xxh3(std::span<const std::byte> bytes);

/// Streaming XXH3-64 (seed 0): Update any number of times, then Digest.
class Xxh3Stream {
 public:
  Xxh3Stream();
  ~Xxh3Stream();
  Xxh3Stream(const Xxh3Stream&) = delete;
  Xxh3Stream& operator=(const Xxh3Stream&) = delete;
  void Reset();
  void Update(std::span<const std::byte> bytes);
  uint64_t Digest() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// 16 lower-case hex digits, the canonical (big-endian) form xxhsum prints.
std::string HashToHex(uint64_t hash);

}  // namespace ckpt::internal
