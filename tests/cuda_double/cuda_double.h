// Control surface of the CUDA-runtime test double (cudart_double.cc).
//
// The double defines the CUDA runtime functions lib/cuda uses, with the
// real signatures from cuda_runtime_api.h, so the loader links against it
// instead of cudart and runs on machines without a GPU: "device" memory is
// host memory with guard bytes, each stream has a worker thread executing
// its queue asynchronously (with random delays), events complete in stream
// order, and faults can be injected. Counters let tests check the shape of
// a pipeline, never its timing.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cuda_double {

struct Config {
  int devices = 1;         ///< 0: cudaGetDeviceCount says no device
  bool no_driver = false;  ///< cudaErrorInsufficientDriver everywhere
  uint64_t device_memory = 1ull << 30;  ///< per device; beyond: out of memory
  int fail_copy_at = -1;    ///< fail the Nth async copy (0-based) at execution
  int fail_malloc_at = -1;  ///< fail the Nth cudaMalloc
  int fail_host_alloc_at = -1;  ///< fail the Nth cudaHostAlloc
  unsigned max_delay_us = 200;  ///< random delay before each queued op
  uint64_t seed = 1;
};

struct Stats {
  uint64_t async_copies = 0;     ///< queued H2D/D2D copies executed
  uint64_t pageable_copies = 0;  ///< copies from unpinned host memory
  uint64_t bytes_h2d = 0;
  uint64_t d2d_copies = 0;  ///< device-to-device copies (1-D and 2-D) executed
  uint64_t bytes_d2d = 0;
  uint64_t source_mutations = 0;  ///< a copy's source changed before it ran
  uint64_t bad_copies = 0;        ///< out-of-bounds / wrong-device / wrong kind
  uint64_t peak_in_flight = 0;    ///< queued but not executed copies
  uint64_t guard_violations = 0;  ///< device buffer overruns seen at free
  uint64_t kernels = 0;           ///< conversion "kernels" run
  // Live resources (a leak check after teardown expects all zero).
  uint64_t live_device_allocs = 0;
  uint64_t live_pinned = 0;
  uint64_t live_registrations = 0;
  uint64_t live_streams = 0;
  uint64_t live_events = 0;
};

/// Resets all state (no live resources may remain) and applies `config`.
void Reset(const Config& config);
Stats GetStats();

/// True when `p` points into a live device allocation; copies `n` bytes of
/// it to `out` (tests read "device" memory through this).
bool ReadDevice(const void* p, void* out, size_t n);

}  // namespace cuda_double
