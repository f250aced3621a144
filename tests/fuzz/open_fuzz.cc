// libFuzzer target: arbitrary bytes through Checkpoint::OpenBuffer, then
// every accessor an application or the Python binding calls: the whole
// object tree walked the way the binding builds Python objects (kinds,
// scalars, keys and their path forms, big ints, tensor references), every
// tensor path looked up, every tensor streamed and windowed, and Verify.
// Must never crash, hang or leak.
#include <ckpt/ckpt.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// What python/src/module.cc's Builder reads of each node, iteratively.
void WalkTree(const ckpt::Checkpoint& ck) {
  std::vector<ckpt::Value> stack = {ck.root()};
  size_t budget = 1 << 16;
  while (!stack.empty() && budget-- > 0) {
    ckpt::Value v = stack.back();
    stack.pop_back();
    (void)v.as_bool();
    (void)v.as_int();
    (void)v.as_float();
    (void)v.as_complex();
    (void)v.as_string();
    (void)v.as_bytes();
    (void)v.as_dtype();
    (void)v.type_name();
    switch (v.kind()) {
      case ckpt::ValueKind::kBigInt:
        (void)v.BigIntToDecimal();
        break;
      case ckpt::ValueKind::kTensor:
        (void)v.tensor_index();
        (void)v.tensor_info();
        break;
      case ckpt::ValueKind::kDict:
        for (size_t i = 0; i < v.size(); ++i) {
          (void)v.key(i).KeySegment();
          stack.push_back(v.key(i));
        }
        [[fallthrough]];
      default:
        for (size_t i = 0; i < v.size(); ++i) stack.push_back(v.item(i));
    }
  }
}

}  // namespace

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
    // Any view, however large (stride 0), streams its first pieces.
    int pieces = 0;
    (void)ck->StreamTensor(
        *t,
        [&](std::span<const std::byte>) {
          return ++pieces < 3 ? ckpt::Status::OK()
                              : ckpt::InvalidArgument("enough");
        },
        4096);
    std::vector<std::byte> window(16);
    (void)t->CopyTo(window, t->info().nbytes() / 2);
    if (!t->shape().empty() && t->shape()[0] > 0) {
      (void)ck->TensorRows(t->info().path, 0, 1);
    }
    (void)ck->Get(t->info().path);
    (void)ck->FindTensor(t->info().path);
  }
  for (size_t i = 0; i < ck->num_storages(); ++i) {
    (void)ck->Storage(i);
    std::vector<std::byte> head(
        std::min<uint64_t>(64, ck->StorageInfoAt(i)->nbytes));
    (void)ck->ReadStorage(i, 0, head);
  }
  (void)ck->metadata();
  WalkTree(*ck);
  (void)ck->Verify(ckpt::VerifyOptions{1});
  (void)ck->Get("model/fc.weight");
  return 0;
}
