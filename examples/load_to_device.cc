// Minimal use of the device loader (link ckpt::cuda): write a checkpoint,
// load every tensor to cuda:0, copy one back and check it. Built and run
// in CI; without a usable GPU it says why and exits 77 (skipped).
#include <ckpt/ckpt.h>
#include <ckpt/cuda.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <memory>
#include <vector>

namespace {

int Fail(const ckpt::Status& s) {
  std::fprintf(stderr, "%s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "example_device.ckpt";
  std::vector<float> w = {1, 2, 3, 4, 5, 6};
  auto writer = ckpt::Writer::Create(path);
  if (!writer.ok()) return Fail(writer.status());
  ckpt::Status s = writer->PutTensor("fc.weight", ckpt::DType::kFloat32, {2, 3},
                                     std::as_bytes(std::span(w)));
  if (s.ok()) s = writer->Commit();
  if (!s.ok()) return Fail(s);

  if (auto n = ckpt::CudaDeviceCount(); !n.ok() || *n == 0) {
    std::printf("skipped: %s\n",
                n.ok() ? "no CUDA device" : n.status().ToString().c_str());
    return 77;
  }
  std::unique_ptr<ckpt::DeviceLoad> load;
  {
    auto ck = ckpt::Checkpoint::Open(path);
    if (!ck.ok()) return Fail(ck.status());
    auto started = ckpt::LoadToDevice(*ck, {}, {});  // every tensor, cuda:0
    if (!started.ok()) return Fail(started.status());
    load = std::move(*started);
  }  // The load holds its own handle on the file: `ck` may go first.
  s = load->Wait();
  if (!s.ok()) return Fail(s);

  const ckpt::DeviceTensor& t = load->tensor(0);
  std::vector<float> back(w.size());
  if (cudaMemcpy(back.data(), t.data, t.nbytes, cudaMemcpyDeviceToHost) !=
      cudaSuccess) {
    return std::fprintf(stderr, "cudaMemcpy failed\n"), 1;
  }
  std::printf("%s on cuda:%d, [1][2] = %g\n", t.info.path.c_str(), t.device,
              back[5]);
  return back == w ? 0 : 1;
}
