// The reference contents of the global tensors the sharding tests save:
// every element's bytes are a function of the tensor's name and the
// element's global index, so any rank can compute any box of it and a
// loaded box is compared bit for bit with no file in between.
#pragma once

#include <ckpt/box.h>
#include <ckpt/format.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ckpt::test {

inline uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

inline uint64_t NameSeed(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

/// The bytes of `box` of the global tensor `name` (dense, row-major).
inline std::vector<std::byte> ReferenceBox(const std::string& name, DType dtype,
                                           const std::vector<int64_t>& shape,
                                           const Box& box) {
  const size_t elem = DTypeSize(dtype);
  std::vector<std::byte> out(static_cast<size_t>(box.numel()) * elem);
  if (out.empty()) return out;
  const uint64_t seed = NameSeed(name);
  std::vector<int64_t> g = box.offsets;
  size_t at = 0;
  for (;;) {
    uint64_t lin = 0;
    for (size_t d = 0; d < shape.size(); ++d) {
      lin = lin * static_cast<uint64_t>(shape[d]) + static_cast<uint64_t>(g[d]);
    }
    uint64_t v = Mix(seed ^ Mix(lin));
    if (dtype == DType::kBool) v &= 1;
    for (size_t b = 0; b < elem; ++b) {
      out[at++] = static_cast<std::byte>(v >> (8 * (b % 8)));
    }
    size_t d = box.ndim();
    for (;;) {
      if (d == 0) return out;
      --d;
      if (++g[d] < box.offsets[d] + box.sizes[d]) break;
      g[d] = box.offsets[d];
    }
  }
}

/// Rows [r*n/size ...] of `rows` split the torch.chunk way (ceil blocks, so
/// 6 rows on 4 ranks are 2, 2, 2, 0): block `r` of `parts` as {begin, len}.
inline std::pair<int64_t, int64_t> ChunkBlock(int64_t rows, int r, int parts) {
  const int64_t step = (rows + parts - 1) / parts;
  const int64_t begin = std::min<int64_t>(rows, step * r);
  const int64_t end = std::min<int64_t>(rows, begin + step);
  return {begin, end - begin};
}

}  // namespace ckpt::test
