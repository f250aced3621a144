// Writes small files the shell tests need and no ckpt tool makes:
//   make_fixture expand OUT VALUE   {"e": float32 VALUE expanded to 2^40
//                                    elements (stride 0), "-0": float32 [1]
//                                    (a path that looks like an option)}
//   make_fixture sparse OUT GIB...   float32 tensors t0, t1... of GIB GiB
//                                    each over holes (no data written)
#include <ckpt/ckpt.h>

#include <cstdio>
#include <string>
#include <vector>

#include "sparse_fixture.h"

int main(int argc, char** argv) {
  if (argc >= 4 && std::string(argv[1]) == "sparse") {
    std::vector<uint64_t> sizes;
    for (int i = 3; i < argc; ++i) sizes.push_back(std::stoull(argv[i]) << 30);
    ckpt::Status s = ckpt::test::WriteSparse(argv[2], sizes);
    if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
    return 0;
  }
  if (argc != 4 || std::string(argv[1]) != "expand") {
    std::fprintf(stderr,
                 "usage: make_fixture expand OUT VALUE | sparse OUT GIB...\n");
    return 2;
  }
  auto w = ckpt::Writer::Create(argv[2]);
  if (!w.ok())
    return std::fprintf(stderr, "%s\n", w.status().ToString().c_str()), 1;
  std::vector<float> one = {std::stof(argv[3])};
  auto sid = w->AddStorage(std::as_bytes(std::span(one)), "cpu");
  ckpt::Status s = sid.status();
  if (s.ok()) {
    ckpt::TensorSpec spec;
    spec.dtype = ckpt::DType::kFloat32;
    spec.shape = {int64_t{1} << 40};
    spec.strides = {0};
    spec.storage = *sid;
    auto t = w->AddTensor(spec);
    s = t.status();
    if (s.ok()) s = w->PutValue("e", *t);
  }
  if (s.ok())
    s = w->PutTensor("-0", ckpt::DType::kFloat32, {1},
                     std::as_bytes(std::span(one)));
  if (s.ok()) s = w->Commit();
  if (!s.ok()) return std::fprintf(stderr, "%s\n", s.ToString().c_str()), 1;
  return 0;
}
