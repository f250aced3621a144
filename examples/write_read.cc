// Minimal use of the library: write a checkpoint, open it, read a tensor.
// Built and run in CI so README's example cannot drift from the API.
#include <ckpt/ckpt.h>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "example.ckpt";
  std::vector<float> w = {1, 2, 3, 4, 5, 6};

  auto writer = ckpt::Writer::Create(path);
  if (!writer.ok())
    return std::fprintf(stderr, "%s\n", writer.status().ToString().c_str()), 1;
  ckpt::Status s = writer->PutTensor("fc.weight", ckpt::DType::kFloat32, {2, 3},
                                     std::as_bytes(std::span(w)));
  if (s.ok()) s = writer->PutValue("epoch", writer->AddInt(7));
  if (s.ok()) s = writer->Commit();
  if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;

  auto ck = ckpt::Checkpoint::Open(path);
  if (!ck.ok())
    return std::fprintf(stderr, "%s\n", ck.status().ToString().c_str()), 1;
  auto t = ck->Tensor("fc.weight");
  auto epoch = ck->Get("epoch");
  if (!t.ok() || !epoch.ok()) return 1;
  const float* p = reinterpret_cast<const float*>(t->data().data());
  std::printf("fc.weight[1][2] = %g, epoch = %lld\n", p[5],
              static_cast<long long>(epoch->as_int()));
  return p[5] == 6.0f && epoch->as_int() == 7 ? 0 : 1;
}
