// Crafting hostile files: take a valid file, change its header through the
// FlatBuffers object API or its preamble fields, and re-seal the checksums
// so that the rule under test, not a checksum, is what rejects it.
#pragma once

#include <cstring>
#include <functional>

#include "checksum_internal.h"
#include "ckpt_generated.h"
#include "header_internal.h"
#include "test_util.h"

namespace ckpt::test {

inline uint64_t GetU64(const std::vector<std::byte>& f, size_t off) {
  uint64_t v;
  std::memcpy(&v, f.data() + off, 8);
  return v;
}
inline void PutU64(std::vector<std::byte>& f, size_t off, uint64_t v) {
  std::memcpy(f.data() + off, &v, 8);
}

/// Recomputes the preamble's self checksum.
inline void SealPreamble(std::vector<std::byte>& f) {
  PutU64(f, internal::kOffSelfHash,
         internal::Xxh3({f.data(), internal::kOffSelfHash}));
}

/// Recomputes the header checksum (after bytes of the header were patched
/// in place) and the preamble's.
inline void ResealHeader(std::vector<std::byte>& f) {
  uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  PutU64(f, internal::kOffHeaderHash,
         internal::Xxh3({f.data() + hoff, f.size() - hoff}));
  SealPreamble(f);
}

/// Replaces the header by `mutate(header)` and re-seals both checksums.
/// The header of `f` as the object API's tree.
inline fb::HeaderT UnpackHeader(const std::vector<std::byte>& f) {
  uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  fb::HeaderT obj;
  fb::GetHeader(reinterpret_cast<const uint8_t*>(f.data() + hoff))
      ->UnPackTo(&obj);
  return obj;
}

/// Replaces the header of `f` by the finished buffer in `fbb` and re-seals
/// both checksums.
inline std::vector<std::byte> ReplaceHeader(
    std::vector<std::byte> f, const flatbuffers::FlatBufferBuilder& fbb) {
  uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  f.resize(hoff);
  auto* p = reinterpret_cast<const std::byte*>(fbb.GetBufferPointer());
  f.insert(f.end(), p, p + fbb.GetSize());
  PutU64(f, internal::kOffHeaderSize, fbb.GetSize());
  PutU64(f, internal::kOffHeaderHash,
         internal::Xxh3({p, static_cast<size_t>(fbb.GetSize())}));
  SealPreamble(f);
  return f;
}

inline std::vector<std::byte> MutateHeader(
    std::vector<std::byte> f, const std::function<void(fb::HeaderT&)>& mutate) {
  fb::HeaderT obj = UnpackHeader(f);
  mutate(obj);
  flatbuffers::FlatBufferBuilder fbb;
  fb::FinishHeaderBuffer(fbb, fb::Header::Pack(fbb, &obj));
  return ReplaceHeader(std::move(f), fbb);
}

/// A small valid file: tensors "a" (float32 [4]) and "b" (int64 [2, 3])
/// in one dict, plus an int value "n".
inline std::vector<std::byte> SmallFile(const std::string& path) {
  std::vector<float> a = {1, 2, 3, 4};
  std::vector<int64_t> b = {1, 2, 3, 4, 5, 6};
  auto w = Writer::Create(path, Fast());
  if (!w.ok()) return {};
  if (!w->PutTensor("a", DType::kFloat32, {4}, Bytes(a)).ok()) return {};
  if (!w->PutTensor("b", DType::kInt64, {2, 3}, Bytes(b)).ok()) return {};
  if (!w->PutValue("n", w->AddInt(5)).ok()) return {};
  if (!w->Commit().ok()) return {};
  return ReadAll(path);
}

inline Status OpenBytes(const std::vector<std::byte>& f) {
  return Checkpoint::OpenBuffer(f, "crafted").status();
}

}  // namespace ckpt::test
