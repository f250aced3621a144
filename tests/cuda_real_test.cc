// The device loader against the real CUDA runtime. Without a usable GPU it
// prints the reason and exits 77, which CTest reports as skipped; on a GPU
// host it loads a file (whole, a path subset, a row range) and compares the
// bytes copied back with the file's.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "ckpt/ckpt.h"
#include "ckpt/cuda.h"
#include "convert_ref.h"

namespace {

int failures = 0;
void Check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

}  // namespace

int main() {
  auto count = ckpt::CudaDeviceCount();
  if (!count.ok()) {
    std::printf("SKIP: no usable CUDA device: %s\n",
                count.status().ToString().c_str());
    return 77;
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string path =
      std::string(tmp ? tmp : "/tmp") + "/ckpt_cuda_real_test.ckpt";
  std::vector<float> a(3 << 20);
  std::iota(a.begin(), a.end(), 0.0f);
  std::vector<int16_t> b(1000, 7);
  {
    auto w = ckpt::Writer::Create(path);
    if (!w.ok() ||
        !w->PutTensor("a", ckpt::DType::kFloat32, {3 << 10, 1 << 10},
                      std::as_bytes(std::span(a)))
             .ok() ||
        !w->PutTensor("b", ckpt::DType::kInt16, {1000},
                      std::as_bytes(std::span(b)))
             .ok() ||
        !w->Commit().ok()) {
      std::fprintf(stderr, "FAIL: cannot write %s\n", path.c_str());
      return 1;
    }
  }
  auto ck = ckpt::Checkpoint::Open(path);
  Check(ck.ok(), "open");
  if (!ck.ok()) return 1;
  std::vector<ckpt::TensorRequest> req = {
      {"a", {}}, {"b", {}}, {"a", std::pair<int64_t, int64_t>{5, 9}}};
  ckpt::DeviceLoadOptions o;
  o.staging_buffer_bytes = 1 << 20;
  auto load = ckpt::LoadToDevice(*ck, req, o);
  Check(load.ok(), "LoadToDevice: " + load.status().ToString());
  if (!load.ok()) return 1;
  ckpt::Status s = (*load)->Wait();
  Check(s.ok(), "Wait: " + s.ToString());
  for (size_t i = 0; i < (*load)->size(); ++i) {
    const auto& t = (*load)->tensor(i);
    std::vector<std::byte> host(t.nbytes);
    cudaError_t e =
        cudaMemcpy(host.data(), t.data, t.nbytes, cudaMemcpyDeviceToHost);
    Check(e == cudaSuccess,
          std::string("cudaMemcpy back: ") + cudaGetErrorString(e));
    auto want = req[i].rows ? ck->TensorRows(req[i].path, req[i].rows->first,
                                             req[i].rows->second)
                            : ck->Tensor(req[i].path);
    Check(want.ok() && std::equal(host.begin(), host.end(),
                                  want->data().begin(), want->data().end()),
          "bytes of request " + std::to_string(i));
  }
  // Device conversion kernels give the host reference's bits.
  {
    ckpt::DeviceLoadOptions c;
    c.convert = {{ckpt::DType::kFloat32, ckpt::DType::kBFloat16}};
    std::vector<ckpt::TensorRequest> one = {{"a", {}}};
    auto conv = ckpt::LoadToDevice(*ck, one, c);
    Check(conv.ok() && (*conv)->Wait().ok(), "conversion load");
    if (conv.ok()) {
      const auto& t = (*conv)->tensor(0);
      std::vector<uint16_t> got(t.nbytes / 2);
      cudaMemcpy(got.data(), t.data, t.nbytes, cudaMemcpyDeviceToHost);
      bool same = got.size() == a.size();
      for (size_t i = 0; same && i < got.size(); ++i) {
        same = got[i] == ckpt::convert::F32ToBF16(a[i]);
      }
      Check(same, "float32 -> bfloat16 kernel differs from the host reference");
    }
  }
  std::remove(path.c_str());
  std::printf("cuda real: %d failed\n", failures);
  return failures ? 1 : 0;
}
