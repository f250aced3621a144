// libFuzzer target: arbitrary bytes through Checkpoint::OpenBuffer, then
// every accessor an application would call. Must never crash, hang or leak.
#include <ckpt/ckpt.h>

#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto ck = ckpt::Checkpoint::OpenBuffer(
      {reinterpret_cast<const std::byte*>(data), size}, "fuzz");
  if (!ck.ok()) return 0;
  for (size_t i = 0; i < ck->num_tensors(); ++i) {
    auto t = ck->TensorAt(i);
    if (!t.ok()) continue;
    if (t->info().nbytes() <= (1u << 20)) {
      std::vector<std::byte> out(static_cast<size_t>(t->info().nbytes()));
      (void)t->CopyTo(out);
    }
    if (!t->shape().empty() && t->shape()[0] > 0) {
      (void)ck->TensorRows(t->info().path, 0, 1);
    }
  }
  (void)ck->Verify(ckpt::VerifyOptions{1});
  ckpt::Value root = ck->root();
  for (size_t i = 0; i < root.size() && i < 64; ++i) {
    (void)root.item(i).KeySegment();
  }
  (void)ck->Get("model/fc.weight");
  return 0;
}
