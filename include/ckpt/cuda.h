// Loading tensors from a ckpt file into GPU memory.
//
// Present when the library is built with the CUDA toolkit (target
// ckpt::cuda). The loader stages file bytes through a ring of pinned host
// buffers filled by worker threads and copies them with cudaMemcpyAsync,
// one non-blocking stream per worker, into one device allocation (the
// arena, each tensor 256-byte aligned). A staging buffer is refilled only
// after the event recorded behind its previous copy has completed.
//
//   auto load = ckpt::LoadToDevice(ck, {}, {});     // every tensor, cuda:0
//   ... (*load)->WaitTensor(0) ... use (*load)->tensor(0).data ...
//   CKPT_RETURN_IF_ERROR((*load)->Wait());
//
// No CUDA type appears here: streams and events are exposed as void*.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ckpt/reader.h"
#include "ckpt/status.h"

namespace ckpt {

enum class LoadStrategy {
  /// Staged when at least 90% of the requested bytes are in the page
  /// cache (mincore), else Direct.
  kAuto,
  /// Pinned ring filled by memcpy from the mapping: for warm files.
  kStaged,
  /// Pinned ring filled by O_DIRECT reads, bypassing the page cache: for
  /// cold files. Falls back to buffered pread where O_DIRECT is refused.
  kDirect,
  /// Page-locks 64 MiB windows of the file's mapping (cudaHostRegister,
  /// read-only) and copies straight from them: no staging copy. Windows
  /// stay registered until the load ends, at most `max_registered_bytes`;
  /// past that, or where registration is refused, pieces are staged. Needs
  /// the mmap backend. Not chosen by Auto yet (its break-even against the
  /// ring must be measured on a GPU).
  kRegister,
};

struct DeviceLoadOptions {
  /// Target for every tensor, "cuda:N". Overridden per saved device by
  /// `device_map` (e.g. {"cuda:1", "cuda:0"}).
  std::string device = "cuda:0";
  std::map<std::string, std::string> device_map;
  LoadStrategy strategy = LoadStrategy::kAuto;
  /// Worker threads (each with its own stream and buffers); 0 = up to 4.
  unsigned threads = 0;
  /// Size of one pinned staging buffer; each worker has two.
  uint64_t staging_buffer_bytes = 8ull << 20;
  /// Check the checksum of every chunk a tensor's bytes lie in, chunk by
  /// chunk just before staging it (no separate pass over the file). A
  /// mismatch fails that tensor with kChecksumMismatch and stops the load.
  bool verify_checksums = false;
  /// Convert on the device after the copy, by source dtype: bfloat16 <->
  /// float16, float32 -> bfloat16/float16, bfloat16/float16 -> float32
  /// (round to nearest even; the same bits as the host reference). PCIe
  /// carries the file's bytes; the kernel runs on the worker's stream.
  std::map<DType, DType> convert;
  /// kRegister: most bytes page-locked at once.
  uint64_t max_registered_bytes = 1ull << 30;
  /// Optional: one device pointer per request, in order, each on its
  /// request's target device with room for RequestBytes() of it. Then no
  /// arena is allocated and the memory stays the caller's.
  std::vector<void*> destinations;
};

/// One request: a tensor path, optionally only rows [begin, end) of dim 0.
struct TensorRequest {
  std::string path;
  std::optional<std::pair<int64_t, int64_t>> rows;
};

/// A tensor in device memory: the bytes from its first element through its
/// last (the view's extent), laid out as `info` says (strides in elements
/// relative to `data`).
struct DeviceTensor {
  TensorInfo info;
  void* data = nullptr;  ///< device pointer
  uint64_t nbytes = 0;   ///< bytes at `data`
  int device = 0;        ///< CUDA ordinal
};

/// An asynchronous load. Destroying it waits for the copies and frees the
/// device memory; move the pointers out only while it lives.
class DeviceLoad {
 public:
  virtual ~DeviceLoad() = default;
  /// Waits for every tensor; the first error (kCuda naming the tensor, file
  /// and byte offset), after all work stopped and every staging resource
  /// was released.
  virtual Status Wait() = 0;
  /// Waits for tensor i only; OK once its bytes are on the device.
  /// kInvalidArgument for i >= size().
  virtual Status WaitTensor(size_t i) = 0;
  /// True once tensor i's bytes are on the device (never for a failed one
  /// or for i >= size()).
  virtual bool Ready(size_t i) = 0;
  virtual size_t size() const = 0;
  /// Tensor i; an empty DeviceTensor (null data) for i >= size().
  virtual const DeviceTensor& tensor(size_t i) const = 0;
  /// The cudaEvent_t recorded after tensor i's last copy (for
  /// cudaStreamWaitEvent on a compute stream).
  virtual void* event(size_t i) const = 0;
  /// What ran: "staged", "direct", "direct (buffered: O_DIRECT refused)",
  /// "register", or "register (N pieces staged)".
  virtual std::string strategy() const = 0;
};

/// Starts loading `requests` (every tensor when empty) from `ck` to the
/// device(s) chosen by `options`, and returns at once. The load holds its
/// own handle on the open file (Checkpoint::Share()), so `ck` may be moved
/// or destroyed while the load runs; the file stays open (and mapped) until
/// the load is destroyed. Errors before any copy starts: kCuda (no driver,
/// no device, bad device index, out of memory), kNotFound (a path),
/// kInvalidArgument (bad rows or options).
Result<std::unique_ptr<DeviceLoad>> LoadToDevice(
    const Checkpoint& ck, std::span<const TensorRequest> requests,
    const DeviceLoadOptions& options = {});

/// Like LoadToDevice (and holding the file the same way), for whole
/// storages: item i is storage `storages[i]`
/// as 1-D uint8 bytes (DeviceTensor::info.path "<storage N>"). For callers
/// that rebuild their own views on the device, sharing each storage as the
/// file does (the Python binding). `options.destinations`, if given, holds
/// one pointer per storage with room for its nbytes. `options.convert` does
/// not apply (the bytes are untyped).
Result<std::unique_ptr<DeviceLoad>> LoadStoragesToDevice(
    const Checkpoint& ck, std::span<const size_t> storages,
    const DeviceLoadOptions& options = {});

/// Bytes each request occupies on the device (its view's extent), in order,
/// for callers that bring their own memory (DeviceLoadOptions::destinations).
/// With `options.convert`, the converted sizes.
Result<std::vector<uint64_t>> RequestBytes(
    const Checkpoint& ck, std::span<const TensorRequest> requests,
    const DeviceLoadOptions& options = {});

/// Number of CUDA devices, or kCuda saying why there are none.
Result<int> CudaDeviceCount();

}  // namespace ckpt
