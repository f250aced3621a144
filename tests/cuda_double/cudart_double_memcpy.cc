// The synchronous cudaMemcpy for the CUDA-runtime test double. The loader
// never calls it (it queues cudaMemcpyAsync on its own streams); the
// programs scripts/gpu_check.sh --double runs against the double do:
// tests/cuda_real_test.cc copies results back with it and `ckpt-bench gpu`
// times a pinned host-to-device copy with it. Ranges are checked through the
// double's control surface, so a copy outside a live device allocation is an
// error here too, never a write into unrelated memory.
#include <cuda_runtime_api.h>

#include <cstring>
#include <vector>

#include "cuda_double.h"

extern "C" cudaError_t cudaMemcpy(void* dst, const void* src, size_t n,
                                  enum cudaMemcpyKind kind) {
  if (n == 0) return cudaSuccess;
  switch (kind) {
    case cudaMemcpyDeviceToHost:
      return cuda_double::ReadDevice(src, dst, n) ? cudaSuccess
                                                  : cudaErrorInvalidValue;
    case cudaMemcpyHostToDevice: {
      // "Device" memory is host memory: ReadDevice only proves that
      // [dst, dst + n) lies in one live allocation before it is written.
      std::vector<unsigned char> probe(n);
      if (!cuda_double::ReadDevice(dst, probe.data(), n)) {
        return cudaErrorInvalidValue;
      }
      std::memcpy(dst, src, n);
      return cudaSuccess;
    }
    default:
      return cudaErrorNotSupported;
  }
}
