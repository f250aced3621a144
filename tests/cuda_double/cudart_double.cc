// A CUDA-runtime test double: see cuda_double.h.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "cuda_double.h"

namespace {

constexpr size_t kGuard =
    256;  // also keeps payloads 256-byte aligned, as cudaMalloc does
constexpr unsigned char kGuardByte = 0xCD;

struct DeviceAlloc {
  int device;
  size_t size;
  unsigned char* base;  // guard + payload + guard
};

struct HostRange {
  size_t size;
  bool allocated;  // cudaHostAlloc (true) or cudaHostRegister (false)
};

struct State {
  std::mutex mu;
  cuda_double::Config config;
  cuda_double::Stats stats;
  std::map<uintptr_t, DeviceAlloc> device;  // payload address -> alloc
  std::map<uintptr_t, HostRange> host;      // pinned ranges
  std::map<int, uint64_t> used;             // device -> bytes
  int copies = 0, mallocs = 0, host_allocs = 0;
  uint64_t in_flight = 0;
  std::mt19937_64 rng;
};

State& S() {
  static State* s = new State();
  return *s;
}

thread_local int t_device = 0;
thread_local cudaError_t t_last = cudaSuccess;

cudaError_t Ret(cudaError_t e) {
  if (e != cudaSuccess) t_last = e;
  return e;
}

uint64_t Fnv(const void* p, size_t n) {
  const auto* b = static_cast<const unsigned char*>(p);
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

// The live device allocation containing [p, p+n), or nullptr. Caller holds mu.
const DeviceAlloc* FindDevice(const void* p, size_t n) {
  auto& s = S();
  auto a = reinterpret_cast<uintptr_t>(p);
  auto it = s.device.upper_bound(a);
  if (it == s.device.begin()) return nullptr;
  --it;
  if (a < it->first || a - it->first > it->second.size ||
      n > it->second.size - (a - it->first)) {
    return nullptr;
  }
  return &it->second;
}

bool IsPinned(const void* p, size_t n) {
  auto& s = S();
  auto a = reinterpret_cast<uintptr_t>(p);
  auto it = s.host.upper_bound(a);
  if (it == s.host.begin()) return false;
  --it;
  return a >= it->first && a - it->first <= it->second.size &&
         n <= it->second.size - (a - it->first);
}

}  // namespace

struct CUevent_st {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t recorded = 0;            // generations recorded
  uint64_t completed = 0;           // generations completed
  cudaError_t error = cudaSuccess;  // a failure of work before the event
  int device = 0;
};

struct CUstream_st {
  int device = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  bool busy = false;
  bool stop = false;
  cudaError_t sticky = cudaSuccess;
  std::thread worker;

  void Run() {
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stop || !queue.empty(); });
        if (queue.empty()) return;
        op = std::move(queue.front());
        queue.pop_front();
        busy = true;
      }
      unsigned delay;
      {
        std::lock_guard<std::mutex> g(S().mu);
        delay = S().config.max_delay_us
                    ? static_cast<unsigned>(S().rng() %
                                            (S().config.max_delay_us + 1))
                    : 0;
      }
      if (delay) std::this_thread::sleep_for(std::chrono::microseconds(delay));
      op();
      {
        std::lock_guard<std::mutex> lock(mu);
        busy = false;
      }
      cv.notify_all();
    }
  }
  void Enqueue(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> lock(mu);
      queue.push_back(std::move(op));
    }
    cv.notify_all();
  }
  void Drain() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return queue.empty() && !busy; });
  }
};

namespace cuda_double {

void Reset(const Config& config) {
  auto& s = S();
  std::lock_guard<std::mutex> g(s.mu);
  s.config = config;
  s.stats = Stats{};
  for (auto& [p, a] : s.device) std::free(a.base);
  s.device.clear();
  for (auto& [p, h] : s.host) {
    if (h.allocated) std::free(reinterpret_cast<void*>(p));
  }
  s.host.clear();
  s.used.clear();
  s.copies = s.mallocs = s.host_allocs = 0;
  s.in_flight = 0;
  s.rng.seed(config.seed);
}

Stats GetStats() {
  std::lock_guard<std::mutex> g(S().mu);
  Stats st = S().stats;
  st.live_device_allocs = S().device.size();
  uint64_t pinned = 0, reg = 0;
  for (auto& [p, h] : S().host) (h.allocated ? pinned : reg)++;
  st.live_pinned = pinned;
  st.live_registrations = reg;
  return st;
}

bool ReadDevice(const void* p, void* out, size_t n) {
  std::lock_guard<std::mutex> g(S().mu);
  if (!FindDevice(p, n)) return false;
  std::memcpy(out, p, n);
  return true;
}

}  // namespace cuda_double

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  std::lock_guard<std::mutex> g(S().mu);
  if (S().config.no_driver) return Ret(cudaErrorInsufficientDriver);
  *count = S().config.devices;
  return S().config.devices == 0 ? Ret(cudaErrorNoDevice) : cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  std::lock_guard<std::mutex> g(S().mu);
  if (S().config.no_driver) return Ret(cudaErrorInsufficientDriver);
  if (device < 0 || device >= S().config.devices)
    return Ret(cudaErrorInvalidDevice);
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  cudaError_t e = t_last;
  t_last = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInsufficientDriver:
      return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorHostMemoryAlreadyRegistered:
      return "part or all of the requested memory range is already mapped";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    default:
      return "unknown error";
  }
}

cudaError_t cudaMalloc(void** p, size_t size) {
  auto& s = S();
  std::lock_guard<std::mutex> g(s.mu);
  if (s.config.no_driver) return Ret(cudaErrorInsufficientDriver);
  if (s.mallocs++ == s.config.fail_malloc_at ||
      s.used[t_device] + size > s.config.device_memory) {
    return Ret(cudaErrorMemoryAllocation);
  }
  auto* base = static_cast<unsigned char*>(
      std::aligned_alloc(kGuard, (size + 3 * kGuard - 1) / kGuard * kGuard));
  if (!base) return Ret(cudaErrorMemoryAllocation);
  std::memset(base, kGuardByte, kGuard);
  std::memset(base + kGuard, 0xAB, size);  // uninitialised device memory
  std::memset(base + kGuard + size, kGuardByte, kGuard);
  *p = base + kGuard;
  s.device[reinterpret_cast<uintptr_t>(*p)] = {t_device, size, base};
  s.used[t_device] += size;
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  auto& s = S();
  std::lock_guard<std::mutex> g(s.mu);
  auto it = s.device.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.device.end()) return Ret(cudaErrorInvalidValue);
  DeviceAlloc a = it->second;
  for (size_t i = 0; i < kGuard; ++i) {
    if (a.base[i] != kGuardByte || a.base[kGuard + a.size + i] != kGuardByte) {
      s.stats.guard_violations++;
      break;
    }
  }
  std::memset(a.base, 0xDD, a.size + 2 * kGuard);  // poison
  std::free(a.base);
  s.used[a.device] -= a.size;
  s.device.erase(it);
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** p, size_t size, unsigned int /*flags*/) {
  auto& s = S();
  std::lock_guard<std::mutex> g(s.mu);
  if (s.config.no_driver) return Ret(cudaErrorInsufficientDriver);
  if (s.host_allocs++ == s.config.fail_host_alloc_at)
    return Ret(cudaErrorMemoryAllocation);
  *p = std::aligned_alloc(4096, (size + 4095) / 4096 * 4096);
  if (!*p) return Ret(cudaErrorMemoryAllocation);
  s.host[reinterpret_cast<uintptr_t>(*p)] = {size, true};
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  auto& s = S();
  std::lock_guard<std::mutex> g(s.mu);
  auto it = s.host.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.host.end() || !it->second.allocated)
    return Ret(cudaErrorInvalidValue);
  std::free(p);
  s.host.erase(it);
  return cudaSuccess;
}

cudaError_t cudaHostRegister(void* p, size_t size, unsigned int /*flags*/) {
  auto& s = S();
  std::lock_guard<std::mutex> g(s.mu);
  auto a = reinterpret_cast<uintptr_t>(p);
  for (auto& [q, h] : s.host) {
    if (a < q + h.size && q < a + size)
      return Ret(cudaErrorHostMemoryAlreadyRegistered);
  }
  s.host[a] = {size, false};
  return cudaSuccess;
}

cudaError_t cudaHostUnregister(void* p) {
  auto& s = S();
  std::lock_guard<std::mutex> g(s.mu);
  auto it = s.host.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.host.end() || it->second.allocated)
    return Ret(cudaErrorInvalidValue);
  s.host.erase(it);
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream,
                                      unsigned int /*flags*/) {
  {
    std::lock_guard<std::mutex> g(S().mu);
    if (S().config.no_driver) return Ret(cudaErrorInsufficientDriver);
    S().stats.live_streams++;
  }
  auto* st = new CUstream_st();
  st->device = t_device;
  st->worker = std::thread([st] { st->Run(); });
  *stream = st;
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t st) {
  if (!st) return Ret(cudaErrorInvalidValue);
  st->Drain();
  {
    std::lock_guard<std::mutex> lock(st->mu);
    st->stop = true;
  }
  st->cv.notify_all();
  st->worker.join();
  delete st;
  std::lock_guard<std::mutex> g(S().mu);
  S().stats.live_streams--;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t st) {
  if (!st) return Ret(cudaErrorInvalidValue);
  st->Drain();
  std::lock_guard<std::mutex> lock(st->mu);
  cudaError_t e = st->sticky;
  return Ret(e);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int /*flags*/) {
  {
    std::lock_guard<std::mutex> g(S().mu);
    if (S().config.no_driver) return Ret(cudaErrorInsufficientDriver);
    S().stats.live_events++;
  }
  *e = new CUevent_st();
  (*e)->device = t_device;
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e) return Ret(cudaErrorInvalidValue);
  delete e;
  std::lock_guard<std::mutex> g(S().mu);
  S().stats.live_events--;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t st) {
  if (!e || !st) return Ret(cudaErrorInvalidValue);
  uint64_t gen;
  {
    std::lock_guard<std::mutex> lock(e->mu);
    gen = ++e->recorded;
  }
  st->Enqueue([e, gen, st] {
    cudaError_t sticky;
    {
      std::lock_guard<std::mutex> lock(st->mu);
      sticky = st->sticky;
    }
    {
      std::lock_guard<std::mutex> lock(e->mu);
      e->completed = std::max(e->completed, gen);
      e->error = sticky;
    }
    e->cv.notify_all();
  });
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (!e) return Ret(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(e->mu);
  if (e->completed < e->recorded) return cudaErrorNotReady;
  return Ret(e->error);
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return Ret(cudaErrorInvalidValue);
  std::unique_lock<std::mutex> lock(e->mu);
  uint64_t want = e->recorded;  // never recorded: complete at once
  e->cv.wait(lock, [&] { return e->completed >= want; });
  return Ret(e->error);
}

// Device to device: both ranges inside live allocations of the stream's
// device, `height` rows of `width` bytes at the pitches given.
cudaError_t DeviceToDevice(void* dst, size_t dpitch, const void* src,
                           size_t spitch, size_t width, size_t height,
                           cudaStream_t st) {
  if (!st || width > dpitch || width > spitch)
    return Ret(cudaErrorInvalidValue);
  if (width == 0 || height == 0) return cudaSuccess;
  auto& s = S();
  {
    std::lock_guard<std::mutex> g(s.mu);
    const DeviceAlloc* d = FindDevice(dst, dpitch * (height - 1) + width);
    const DeviceAlloc* r = FindDevice(src, spitch * (height - 1) + width);
    if (!d || !r || d->device != st->device || r->device != st->device) {
      s.stats.bad_copies++;
      return Ret(cudaErrorInvalidValue);
    }
  }
  st->Enqueue([=] {
    for (size_t i = 0; i < height; ++i) {
      std::memmove(static_cast<unsigned char*>(dst) + i * dpitch,
                   static_cast<const unsigned char*>(src) + i * spitch, width);
    }
    std::lock_guard<std::mutex> g(S().mu);
    S().stats.async_copies++;
    S().stats.d2d_copies++;
    S().stats.bytes_d2d += width * height;
  });
  return cudaSuccess;
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src,
                              size_t spitch, size_t width, size_t height,
                              enum cudaMemcpyKind kind, cudaStream_t st) {
  if (kind != cudaMemcpyDeviceToDevice) {
    S().stats.bad_copies++;  // the loader makes 2-D copies on the device only
    return Ret(cudaErrorInvalidValue);
  }
  return DeviceToDevice(dst, dpitch, src, spitch, width, height, st);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n,
                            enum cudaMemcpyKind kind, cudaStream_t st) {
  if (!st) return Ret(cudaErrorInvalidValue);
  if (kind == cudaMemcpyDeviceToDevice) {
    return DeviceToDevice(dst, n, src, n, n, 1, st);
  }
  auto& s = S();
  bool pinned;
  int index;
  {
    std::lock_guard<std::mutex> g(s.mu);
    const DeviceAlloc* d = FindDevice(dst, n);
    bool ok = kind == cudaMemcpyHostToDevice && d && d->device == st->device &&
              !FindDevice(src, n);
    if (!ok) {
      s.stats.bad_copies++;
      return Ret(cudaErrorInvalidValue);
    }
    pinned = IsPinned(src, n);
    index = s.copies++;
    if (!pinned) s.stats.pageable_copies++;
  }
  if (!pinned) {
    // The driver stages pageable memory synchronously, on this thread.
    st->Drain();
    std::memcpy(dst, src, n);
    std::lock_guard<std::mutex> g(s.mu);
    s.stats.bytes_h2d += n;
    return cudaSuccess;
  }
  uint64_t hash = Fnv(src, n);
  {
    std::lock_guard<std::mutex> g(s.mu);
    s.in_flight++;
    s.stats.peak_in_flight = std::max(s.stats.peak_in_flight, s.in_flight);
  }
  st->Enqueue([=] {
    auto& s2 = S();
    bool fail;
    {
      std::lock_guard<std::mutex> g(s2.mu);
      s2.in_flight--;
      fail = index == s2.config.fail_copy_at;
      if (Fnv(src, n) != hash) s2.stats.source_mutations++;
    }
    if (fail) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->sticky = cudaErrorLaunchFailure;
      return;
    }
    std::memcpy(dst, src, n);
    std::lock_guard<std::mutex> g(s2.mu);
    s2.stats.async_copies++;
    s2.stats.bytes_h2d += n;
  });
  return cudaSuccess;
}

}  // extern "C"

// The conversion "kernel" of the double: the same element functions as
// lib/cuda/convert.cu, run on the host in stream order.
#include "cuda/convert_ref.h"

extern "C" int ckpt_convert_launch(int code, const void* src, void* dst,
                                   uint64_t n, void* stream) {
  auto* st = static_cast<cudaStream_t>(stream);
  {
    std::lock_guard<std::mutex> g(S().mu);
    const DeviceAlloc* s = FindDevice(
        src, n * static_cast<size_t>(ckpt::convert::SourceSize(code)));
    const DeviceAlloc* d = FindDevice(
        dst, n * static_cast<size_t>(ckpt::convert::TargetSize(code)));
    if (!s || !d || s->device != st->device || d->device != st->device) {
      S().stats.bad_copies++;
      return cudaErrorInvalidValue;
    }
  }
  st->Enqueue([=] {
    for (uint64_t i = 0; i < n; ++i)
      ckpt::convert::ConvertOne(code, src, dst, i);
    std::lock_guard<std::mutex> g(S().mu);
    S().stats.kernels++;
  });
  return cudaSuccess;
}
