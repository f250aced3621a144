// libFuzzer target: arbitrary bytes as a sharded checkpoint's manifest
// (DecodeManifest, then what a loader does with an accepted one: index
// every tensor's chunks and plan a box against them) and as the protocol
// messages a coordinator decodes from other ranks (reports, statuses,
// outcomes). Must never crash, hang or leak.
#include <cstdint>
#include <span>
#include <vector>

#include "ckpt/box.h"
#include "dist/manifest_internal.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data),
                                   size);
  using namespace ckpt;
  using namespace ckpt::dist;
  auto m = dist::internal::DecodeManifest(bytes, "fuzz");
  if (m.ok()) {
    for (const auto& t : m->tensors) {
      std::vector<Box> boxes;
      for (const auto& c : t.chunks) boxes.push_back(c.box);
      auto index = BoxIndex::Build(boxes);
      if (!index.ok()) continue;
      // The middle half of every dim.
      Box want;
      for (int64_t n : t.shape) {
        want.offsets.push_back(n / 4);
        want.sizes.push_back(n / 2);
      }
      for (size_t i : index->Overlapping(want)) {
        (void)CopyRuns(t.chunks[i].box, want, DTypeSize(t.dtype));
      }
    }
    // A manifest that decodes encodes back to something that decodes.
    auto again = dist::internal::EncodeManifest(*m);
    if (!again.ok() || !dist::internal::DecodeManifest(*again, "re").ok()) {
      __builtin_trap();
    }
  }
  (void)dist::internal::DecodeReport({bytes.begin(), bytes.end()}, 0);
  (void)dist::internal::DecodeStatus(bytes);
  (void)dist::internal::DecodeOutcome(bytes, "fuzz");
  return 0;
}
