// Device-side dtype conversion kernels (see convert_ref.h).
#include <cuda_runtime_api.h>

#include "convert_ref.h"

namespace {

__global__ void ConvertKernel(int code, const void* src, void* dst,
                              uint64_t n) {
  for (uint64_t i =
           blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    ckpt::convert::ConvertOne(code, src, dst, i);
  }
}

}  // namespace

extern "C" int ckpt_convert_launch(int code, const void* src, void* dst,
                                   uint64_t n, void* stream) {
  if (n == 0) return cudaSuccess;
  const unsigned threads = 256;
  uint64_t blocks = (n + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  ConvertKernel<<<static_cast<unsigned>(blocks), threads, 0,
                  static_cast<cudaStream_t>(stream)>>>(code, src, dst, n);
  return static_cast<int>(cudaGetLastError());
}
