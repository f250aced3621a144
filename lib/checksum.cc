#include <cstdio>

#include "checksum_internal.h"
#include "ckpt/format.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace ckpt {

uint64_t Checksum(std::span<const std::byte> bytes) {
  return internal::Xxh3(bytes);
}

}  // namespace ckpt

namespace ckpt::internal {

uint64_t Xxh3(std::span<const std::byte> bytes) {
  return XXH3_64bits(bytes.data(), bytes.size());
}

struct Xxh3Stream::State {
  XXH3_state_t s;
};

Xxh3Stream::Xxh3Stream() : state_(std::make_unique<State>()) { Reset(); }
Xxh3Stream::~Xxh3Stream() = default;

void Xxh3Stream::Reset() { XXH3_64bits_reset(&state_->s); }

void Xxh3Stream::Update(std::span<const std::byte> bytes) {
  XXH3_64bits_update(&state_->s, bytes.data(), bytes.size());
}

uint64_t Xxh3Stream::Digest() const { return XXH3_64bits_digest(&state_->s); }

std::string HashToHex(uint64_t hash) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx",
                static_cast<unsigned long long>(hash));
  return buf;
}

}  // namespace ckpt::internal
