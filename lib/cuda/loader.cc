// The device loader: a staged pinned ring per worker, cudaMemcpyAsync on
// one non-blocking stream per worker, one device arena per target device.
// All CUDA error codes are turned into Status here and nowhere else.
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "ckpt/cuda.h"
#include "convert_ref.h"
#include "reader_internal.h"

namespace ckpt {
namespace {

constexpr uint64_t kTensorAlignment = 256;
// O_DIRECT needs offset, length and buffer aligned to the logical block
// size; 4096 is a multiple of every common one (512, 4096).
constexpr uint64_t kDirectAlign = 4096;

Status Cuda(cudaError_t e, const std::string& what) {
  return Status(ErrorCode::kCuda, what + ": " + cudaGetErrorString(e));
}

// The kernel code for a requested conversion, 0 for none.
Result<int> ConversionCode(DType from, const std::map<DType, DType>& convert) {
  auto it = convert.find(from);
  if (it == convert.end() || it->second == from) return 0;
  using namespace convert;
  const DType to = it->second;
  if (from == DType::kBFloat16 && to == DType::kFloat16) return int{kBF16ToF16};
  if (from == DType::kFloat16 && to == DType::kBFloat16) return int{kF16ToBF16};
  if (from == DType::kFloat32 && to == DType::kBFloat16) return int{kF32ToBF16};
  if (from == DType::kFloat32 && to == DType::kFloat16) return int{kF32ToF16};
  if (from == DType::kBFloat16 && to == DType::kFloat32) return int{kBF16ToF32};
  if (from == DType::kFloat16 && to == DType::kFloat32) return int{kF16ToF32};
  return InvalidArgument("no device conversion from " +
                         std::string(DTypeName(from)) + " to " +
                         std::string(DTypeName(to)));
}

Result<int> ParseDevice(const std::string& d, int count) {
  int index = 0;
  if (d == "cuda") {
    index = 0;
  } else if (d.rfind("cuda:", 0) == 0 && d.size() > 5 &&
             d.find_first_not_of("0123456789", 5) == std::string::npos &&
             d.size() < 15) {
    index = std::stoi(d.substr(5));
  } else {
    return InvalidArgument("device '" + d +
                           "' is not a CUDA device (cuda or cuda:N)");
  }
  if (index >= count) {
    return Status(ErrorCode::kCuda,
                  "device " + d + " does not exist: " + std::to_string(count) +
                      " CUDA device(s) present");
  }
  return index;
}

struct Item {
  DeviceTensor dt;
  TensorRef ref;  // host bytes (keeps the file open)
  uint64_t file_offset = 0;
  uint64_t storage_begin = 0;  // byte offset of the extent within its storage
  int convert = 0;             // conversion code (convert_ref.h), 0 for none
  uint64_t arena_offset = 0;
  cudaEvent_t done = nullptr;
  int stage = 0;  // 0 queued, 1 copies issued, 2 failed
};

class Loader final : public DeviceLoad {
 public:
  // The load keeps its own handle on the file (as every TensorRef does), so
  // the caller's Checkpoint may be moved or destroyed while it runs.
  Loader(const Checkpoint& ck, DeviceLoadOptions options)
      : ck_(ck.Share()), file_(ck.path()), options_(std::move(options)) {}

  ~Loader() override {
    (void)Wait();
    for (auto& it : items_) {
      if (it.done) cudaEventDestroy(it.done);
    }
    for (auto& [dev, ptr] : arenas_) {
      cudaSetDevice(dev);
      cudaFree(ptr);
    }
  }

  Status Prepare(std::vector<Item> items) {
    items_ = std::move(items);
    if (!options_.destinations.empty()) {
      if (options_.destinations.size() != items_.size()) {
        return InvalidArgument(std::to_string(options_.destinations.size()) +
                               " destinations for " +
                               std::to_string(items_.size()) + " tensors");
      }
      for (size_t i = 0; i < items_.size(); ++i) {
        if (!options_.destinations[i] && items_[i].dt.nbytes) {
          return InvalidArgument("null destination for tensor '" +
                                 items_[i].dt.info.path + "'");
        }
        items_[i].dt.data = options_.destinations[i];
      }
    }
    // One arena per target device.
    std::map<int, uint64_t> sizes;
    for (auto& it : items_) {
      uint64_t& total = sizes[it.dt.device];
      it.arena_offset = total;
      total += (it.dt.nbytes + kTensorAlignment - 1) / kTensorAlignment *
               kTensorAlignment;
    }
    if (!options_.destinations.empty()) sizes.clear();  // the caller's memory
    for (auto& [dev, bytes] : sizes) {
      cudaError_t e = cudaSetDevice(dev);
      if (e != cudaSuccess)
        return Cuda(e, "cudaSetDevice(" + std::to_string(dev) + ")");
      void* p = nullptr;
      e = cudaMalloc(&p, std::max<uint64_t>(bytes, 1));
      if (e != cudaSuccess) {
        return Cuda(e, "allocating " + std::to_string(bytes) +
                           " bytes on cuda:" + std::to_string(dev));
      }
      arenas_[dev] = p;
    }
    for (auto& it : items_) {
      if (options_.destinations.empty()) {
        it.dt.data =
            static_cast<char*>(arenas_[it.dt.device]) + it.arena_offset;
      }
      cudaSetDevice(it.dt.device);
      cudaError_t e =
          cudaEventCreateWithFlags(&it.done, cudaEventDisableTiming);
      if (e != cudaSuccess) return Cuda(e, "cudaEventCreateWithFlags");
    }
    return Status::OK();
  }

  void Start() {
    std::map<int, std::vector<size_t>> by_device;
    for (size_t i = 0; i < items_.size(); ++i)
      by_device[items_[i].dt.device].push_back(i);
    unsigned threads =
        options_.threads
            ? options_.threads
            : std::min(4u, std::max(1u, std::thread::hardware_concurrency()));
    // Threads of their own, not internal::ParallelFor jobs: LoadToDevice
    // returns at once and the workers run in the background for the whole
    // load (ParallelFor blocks its caller until every job is done), each
    // owns a stream and a pinned ring that it reuses for every item
    // (ParallelFor's jobs carry no per-thread state), and after a failure
    // the remaining items are marked failed for WaitTensor, not skipped.
    queues_.reserve(by_device.size());
    for (auto& [dev, list] : by_device) {
      queues_.push_back(std::make_unique<Queue>());
      Queue* q = queues_.back().get();
      q->device = dev;
      q->items = std::move(list);
      unsigned n =
          static_cast<unsigned>(std::min<size_t>(threads, q->items.size()));
      unsigned started = 0;
      try {
        for (; started < std::max(1u, n); ++started) {
          workers_.emplace_back([this, q] { Work(*q); });
        }
      } catch (const std::exception&) {
        // std::system_error (no more threads): fewer workers do the same
        // work; with none, this device's tensors fail instead of hanging.
      }
      if (started == 0) {
        Fail(ResourceExhausted("cannot start a loader thread for cuda:" +
                               std::to_string(dev))
                 .WithFile(file_));
        FailRest(*q);
      }
    }
  }

  Status Wait() override {
    std::lock_guard<std::mutex> lock(join_mu_);
    for (auto& w : workers_) {
      if (w.joinable()) w.join();
    }
    // Every stream has drained: the windows can be unpinned.
    std::lock_guard<std::mutex> r(reg_mu_);
    for (auto& [start, ok] : windows_) {
      if (ok) cudaHostUnregister(reinterpret_cast<void*>(start));
    }
    windows_.clear();
    std::lock_guard<std::mutex> g(mu_);
    return first_;
  }

  Status WaitTensor(size_t i) override {
    if (i >= items_.size()) return OutOfRange(i);
    Item& it = items_[i];
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return it.stage != 0; });
      if (it.stage == 2) return FailureOf(it);
    }
    cudaError_t e = cudaEventSynchronize(it.done);
    if (e != cudaSuccess) {
      return Cuda(e, "copy to cuda:" + std::to_string(it.dt.device))
          .WithFile(file_)
          .WithTensor(it.dt.info.path);
    }
    return Status::OK();
  }

  bool Ready(size_t i) override {
    if (i >= items_.size()) return false;
    Item& it = items_[i];
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (it.stage != 1) return false;
    }
    return cudaEventQuery(it.done) == cudaSuccess;
  }

  size_t size() const override { return items_.size(); }
  std::string strategy() const override {
    if (register_) {
      uint64_t staged = staged_pieces_.load();
      return staged ? "register (" + std::to_string(staged) + " pieces staged)"
                    : "register";
    }
    if (!direct_) return "staged";
    return buffered_fallback_ ? "direct (buffered: O_DIRECT refused)"
                              : "direct";
  }

  // kRegister: the mapping's address range, from any item's view.
  Status UseRegister() {
    if (ck_.backend() != Backend::kMmap) {
      return InvalidArgument(
          "the register strategy needs a checkpoint opened with the mmap "
          "backend");
    }
    register_ = true;
    for (const auto& it : items_) {
      if (it.ref.data().empty()) continue;
      map_base_ =
          reinterpret_cast<uintptr_t>(it.ref.data().data()) - it.file_offset;
      break;
    }
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    map_end_ = map_base_ + (ck_.file_size() + page - 1) / page * page;
    return Status::OK();
  }

  // Fraction of the requested bytes' pages that are in the page cache.
  double ResidentFraction() const {
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    uint64_t total = 0, resident = 0;
    std::vector<unsigned char> vec;
    for (const auto& it : items_) {
      auto d = it.ref.data();
      if (d.empty()) continue;
      auto a = reinterpret_cast<uintptr_t>(d.data()) / page * page;
      uint64_t len = reinterpret_cast<uintptr_t>(d.data()) + d.size() - a;
      vec.assign((len + page - 1) / page, 0);
      if (::mincore(reinterpret_cast<void*>(a), len, vec.data()) != 0)
        return 1.0;
      total += vec.size();
      for (unsigned char v : vec) resident += v & 1;
    }
    return total ? static_cast<double>(resident) / static_cast<double>(total)
                 : 1.0;
  }
  void UseDirect(bool direct) { direct_ = direct; }
  const DeviceTensor& tensor(size_t i) const override {
    static const DeviceTensor kNone{};
    return i < items_.size() ? items_[i].dt : kNone;
  }
  void* event(size_t i) const override {
    return i < items_.size() ? items_[i].done : nullptr;
  }

 private:
  struct Queue {
    int device = 0;
    std::vector<size_t> items;
    std::atomic<size_t> next{0};
  };

  Status OutOfRange(size_t i) const {
    return InvalidArgument("tensor " + std::to_string(i) + " of a load of " +
                           std::to_string(items_.size()))
        .WithFile(file_);
  }

  Status FailureOf(const Item& it) const {
    if (!first_.ok() && first_.tensor() == it.dt.info.path) return first_;
    return Status(ErrorCode::kCuda,
                  "not loaded: the load stopped at an earlier error (" +
                      first_.ToString() + ")")
        .WithFile(file_)
        .WithTensor(it.dt.info.path);
  }

  void Fail(Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (first_.ok()) first_ = std::move(s);
    stop_ = true;
  }

  void SetStage(Item& it, int stage) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      it.stage = stage;
    }
    cv_.notify_all();
  }

  // One worker's staging resources for the whole load: a stream, two pinned
  // buffers with an event each (a buffer is refilled only after the event
  // recorded behind its last copy completed), the descriptor direct reads
  // use, and the device scratch buffer that pieces to convert land in.
  struct Staging {
    cudaStream_t stream = nullptr;
    void* buf[2] = {nullptr, nullptr};
    cudaEvent_t ev[2] = {nullptr, nullptr};
    int fd = -1;
    void* scratch = nullptr;
    uint64_t piece = 0;  // bytes per buffer: the longest piece
    int j = 0;           // the buffer used last

    Staging() = default;
    Staging(const Staging&) = delete;
    Staging& operator=(const Staging&) = delete;
    ~Staging() { Release(); }
    // Waits for the stream, then frees everything; safe to call twice.
    void Release() {
      if (stream) cudaStreamSynchronize(stream);
      if (scratch) cudaFree(scratch);
      scratch = nullptr;
      if (fd >= 0) ::close(fd);
      fd = -1;
      for (int k = 0; k < 2; ++k) {
        if (ev[k]) cudaEventDestroy(ev[k]);
        if (buf[k]) cudaFreeHost(buf[k]);
        ev[k] = nullptr;
        buf[k] = nullptr;
      }
      if (stream) cudaStreamDestroy(stream);
      stream = nullptr;
    }
  };

  // A piece of an item: `n` bytes from offset `off` of its view; `pinned`
  // is where to copy from when the mapping is page-locked there (kRegister),
  // else null (staged through a ring buffer).
  struct Piece {
    uint64_t off = 0;
    uint64_t n = 0;
    const std::byte* pinned = nullptr;
  };

  // One worker (a thread that lives for the whole load, with its own
  // stream and ring): takes the queue's items one by one until none is
  // left, then drains its stream.
  void Work(Queue& q) {
    Staging st;
    Status setup = SetUpStaging(st, q.device);
    if (!setup.ok()) {
      Fail(setup.WithFile(file_));
      st.Release();
      FailRest(q);
      return;
    }
    while (Item* it = NextItem(q)) {
      Status problem = LoadItem(*it, st);
      if (!problem.ok()) {
        Fail(problem);
        SetStage(*it, 2);
        continue;
      }
      SetStage(*it, 1);
    }
    // Drain: a failed asynchronous copy shows up here at the latest.
    cudaError_t e = cudaStreamSynchronize(st.stream);
    if (e != cudaSuccess) {
      Fail(Cuda(e, "asynchronous copy to cuda:" + std::to_string(q.device) +
                       " failed")
               .WithFile(file_));
    }
  }

  Status SetUpStaging(Staging& st, int device) {
    st.piece = std::max<uint64_t>(options_.staging_buffer_bytes, 4096);
    // Direct reads fetch the aligned superset of a piece: room for one
    // block of slack at each end.
    const uint64_t alloc = direct_ ? st.piece + 2 * kDirectAlign : st.piece;
    if (direct_) {
      // The file the Checkpoint has open, never its path again: the path
      // may name a newer file by now (saves replace files by rename).
      auto fd = internal::CheckpointAccess::ReopenFile(ck_, O_DIRECT);
      if (!fd.ok()) {  // e.g. tmpfs: fall back to buffered reads
        buffered_fallback_ = true;
        fd = internal::CheckpointAccess::ReopenFile(ck_, 0);
      }
      if (!fd.ok()) return fd.status();
      st.fd = *fd;
    }
    cudaError_t e = cudaSetDevice(device);
    if (e == cudaSuccess)
      e = cudaStreamCreateWithFlags(&st.stream, cudaStreamNonBlocking);
    for (int k = 0; k < 2 && e == cudaSuccess; ++k) {
      e = cudaHostAlloc(&st.buf[k], alloc, cudaHostAllocDefault);
      if (e == cudaSuccess)
        e = cudaEventCreateWithFlags(&st.ev[k], cudaEventDisableTiming);
    }
    if (e != cudaSuccess)
      return Cuda(e, "setting up staging on cuda:" + std::to_string(device));
    return Status::OK();
  }

  // The queue's next item, or null when none is left. After a failure
  // anywhere in the load, the remaining items are marked failed instead.
  Item* NextItem(Queue& q) {
    for (;;) {
      size_t k = q.next.fetch_add(1);
      if (k >= q.items.size()) return nullptr;
      Item& it = items_[q.items[k]];
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!stop_) return &it;
        it.stage = 2;
      }
      cv_.notify_all();
    }
  }

  // Issues the copies of one item, piece by piece, and records its event.
  Status LoadItem(Item& it, Staging& st) {
    const uint64_t size = it.ref.data().size();
    for (uint64_t off = 0; off < size;) {
      CKPT_ASSIGN_OR_RETURN(Piece p, NextPiece(it, off, st.piece));
      CKPT_RETURN_IF_ERROR(CopyPiece(it, st, p));
      off += p.n;
    }
    cudaError_t e = cudaEventRecord(it.done, st.stream);
    if (e != cudaSuccess)
      return Cuda(e, "cudaEventRecord").WithTensor(it.dt.info.path);
    return Status::OK();
  }

  // The piece of `it` at `off`: at most `max` bytes, within one registered
  // window (kRegister) and, with verification, within one checksum chunk;
  // each chunk is checked just before its first piece is staged.
  Result<Piece> NextPiece(const Item& it, uint64_t off, uint64_t max) {
    std::span<const std::byte> bytes = it.ref.data();
    Piece p{off, std::min<uint64_t>(max, bytes.size() - off), nullptr};
    if (register_) {
      auto a = reinterpret_cast<uintptr_t>(bytes.data() + off);
      uint64_t window_end =
          map_base_ + ((a - map_base_) / kWindow + 1) * kWindow;
      p.n = std::min<uint64_t>(p.n, window_end - a);
      if (EnsureWindow(a)) {
        p.pinned = bytes.data() + off;
      } else {
        staged_pieces_++;
      }
    }
    if (options_.verify_checksums) {
      const uint64_t chunk = ck_.chunk_size();
      const uint64_t at = it.storage_begin + off;  // within the storage
      p.n = std::min<uint64_t>(p.n, (at / chunk + 1) * chunk - at);
      if (off == 0 || at % chunk == 0) {
        CKPT_RETURN_IF_ERROR(internal::CheckpointAccess::VerifyStorageRange(
            ck_, it.dt.info.storage, at, at + 1, it.dt.info.path));
      }
    }
    return p;
  }

  // Queues piece `p` of `it` on the worker's stream: the copy from the
  // page-locked mapping or from a refilled ring buffer, then the
  // conversion kernel if any. Converting tensors land in the scratch
  // buffer and the kernel writes the converted elements into place (the
  // next piece's copy into scratch is ordered after it on the stream).
  Status CopyPiece(Item& it, Staging& st, const Piece& p) {
    char* dst = static_cast<char*>(it.dt.data) + p.off;
    if (it.convert) {
      if (!st.scratch) {
        cudaError_t e = cudaMalloc(&st.scratch, st.piece);
        if (e != cudaSuccess) {
          return Cuda(e, "allocating conversion scratch")
              .WithFile(file_)
              .WithTensor(it.dt.info.path);
        }
      }
      dst = static_cast<char*>(st.scratch);
    }
    cudaError_t e = cudaSuccess;
    if (p.pinned) {  // page-locked mapping: no staging buffer involved
      e = cudaMemcpyAsync(dst, p.pinned, p.n, cudaMemcpyHostToDevice,
                          st.stream);
    } else {
      st.j ^= 1;
      e = cudaEventSynchronize(st.ev[st.j]);
      if (e == cudaSuccess) {
        CKPT_ASSIGN_OR_RETURN(const std::byte* src, FillBuffer(it, st, p));
        e = cudaMemcpyAsync(dst, src, p.n, cudaMemcpyHostToDevice, st.stream);
      }
    }
    if (e == cudaSuccess && it.convert) {
      const auto in = static_cast<uint64_t>(convert::SourceSize(it.convert));
      const auto out = static_cast<uint64_t>(convert::TargetSize(it.convert));
      e = static_cast<cudaError_t>(
          ckpt_convert_launch(it.convert, st.scratch,
                              static_cast<char*>(it.dt.data) + p.off / in * out,
                              p.n / in, st.stream));
    }
    // The staging buffer may be refilled once this event completes.
    if (e == cudaSuccess && !p.pinned)
      e = cudaEventRecord(st.ev[st.j], st.stream);
    if (e != cudaSuccess) {
      return Cuda(e, "copy to cuda:" + std::to_string(it.dt.device))
          .WithFile(file_)
          .WithTensor(it.dt.info.path)
          .WithOffset(static_cast<int64_t>(it.file_offset + p.off));
    }
    return Status::OK();
  }

  // Fills ring buffer st.j with piece `p` (from the mapping, or by a direct
  // read); returns where its bytes start in the buffer.
  Result<const std::byte*> FillBuffer(const Item& it, Staging& st,
                                      const Piece& p) {
    auto* buf = static_cast<std::byte*>(st.buf[st.j]);
    if (!direct_) {
      std::memcpy(buf, it.ref.data().data() + p.off, p.n);
      return static_cast<const std::byte*>(buf);
    }
    auto r = ReadDirect(st.fd, it.file_offset + p.off, p.n, buf);
    if (!r.ok()) return r.status().WithTensor(it.dt.info.path);
    return static_cast<const std::byte*>(buf + *r);
  }

  // Reads file bytes [offset, offset+n) into `buf` through `fd`, as the
  // block-aligned superset when `fd` is O_DIRECT; returns where the wanted
  // bytes start in `buf`. Switches `fd` to buffered reads if the kernel
  // refuses a direct read.
  Result<uint64_t> ReadDirect(int& fd, uint64_t offset, uint64_t n,
                              std::byte* buf) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      bool direct = (::fcntl(fd, F_GETFL) & O_DIRECT) != 0;
      uint64_t a0 = direct ? offset / kDirectAlign * kDirectAlign : offset;
      uint64_t want = offset + n - a0;
      uint64_t len =
          direct ? (want + kDirectAlign - 1) / kDirectAlign * kDirectAlign
                 : want;
      uint64_t got = 0;
      int err = 0;
      while (got < want) {
        ssize_t r =
            ::pread(fd, buf + got, len - got, static_cast<off_t>(a0 + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
          err = errno;
          break;
        }
        if (r == 0) break;  // end of file: fine once `want` is covered
        got += static_cast<uint64_t>(r);
      }
      if (got >= want) return offset - a0;
      if (err == EINVAL && direct) {
        auto plain = internal::CheckpointAccess::ReopenFile(ck_, 0);
        if (!plain.ok()) {
          err = plain.status().sys_errno();
        } else {
          ::close(fd);
          fd = *plain;
          buffered_fallback_ = true;
          continue;
        }
      }
      return IoError(err ? std::string("read failed: ") + std::strerror(err)
                         : std::string("file ended early"))
          .WithFile(file_)
          .WithOffset(static_cast<int64_t>(offset));
    }
    return IoError("read failed")
        .WithFile(file_)
        .WithOffset(static_cast<int64_t>(offset));
  }

  void FailRest(Queue& q) {
    for (;;) {
      size_t k = q.next.fetch_add(1);
      if (k >= q.items.size()) return;
      SetStage(items_[q.items[k]], 2);
    }
  }

  const Checkpoint ck_;
  std::string file_;
  DeviceLoadOptions options_;
  std::vector<Item> items_;
  std::map<int, void*> arenas_;
  std::vector<std::unique_ptr<Queue>> queues_;
  std::vector<std::thread> workers_;
  std::mutex join_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  Status first_;
  bool stop_ = false;
  bool direct_ = false;
  std::atomic<bool> buffered_fallback_{false};
  // kRegister state.
  static constexpr uint64_t kWindow = 64ull << 20;
  bool register_ = false;
  uintptr_t map_base_ = 0, map_end_ = 0;
  std::mutex reg_mu_;
  std::map<uintptr_t, bool> windows_;  // window start -> registered
  uint64_t registered_bytes_ = 0;
  std::atomic<uint64_t> staged_pieces_{0};

  // Registers (once) the window holding mapping address `a`; false where
  // it cannot be: over the byte budget, or refused by the runtime.
  bool EnsureWindow(uintptr_t a) {
    uintptr_t start = map_base_ + (a - map_base_) / kWindow * kWindow;
    std::lock_guard<std::mutex> lock(reg_mu_);
    auto it = windows_.find(start);
    if (it != windows_.end()) return it->second;
    uint64_t len = std::min<uint64_t>(kWindow, map_end_ - start);
    bool ok = false;
    if (registered_bytes_ + len <= options_.max_registered_bytes) {
      ok = cudaHostRegister(reinterpret_cast<void*>(start), len,
                            cudaHostRegisterReadOnly) == cudaSuccess;
      if (!ok) cudaGetLastError();  // a refusal is not an error of the load
      if (ok) registered_bytes_ += len;
    }
    windows_[start] = ok;
    return ok;
  }
};

}  // namespace

namespace {

// A request's view: rows narrow dim 0. With the mmap backend nothing is read.
Result<TensorRef> Resolve(const Checkpoint& ck, const TensorRequest& r) {
  return r.rows ? ck.TensorRows(r.path, r.rows->first, r.rows->second)
                : ck.Tensor(r.path);
}

// Bytes a view occupies on the device after conversion `code` (0: none).
uint64_t DeviceBytes(const TensorRef& ref, int code) {
  uint64_t n = ref.data().size();
  if (!code) return n;
  return n / static_cast<uint64_t>(convert::SourceSize(code)) *
         static_cast<uint64_t>(convert::TargetSize(code));
}

}  // namespace

Result<std::vector<uint64_t>> RequestBytes(
    const Checkpoint& ck, std::span<const TensorRequest> requests,
    const DeviceLoadOptions& options) {
  std::vector<uint64_t> out;
  out.reserve(requests.size());
  for (const auto& r : requests) {
    CKPT_ASSIGN_OR_RETURN(TensorRef ref, Resolve(ck, r));
    CKPT_ASSIGN_OR_RETURN(int code,
                          ConversionCode(ref.dtype(), options.convert));
    out.push_back(DeviceBytes(ref, code));
  }
  return out;
}

Result<int> CudaDeviceCount() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return Cuda(e, "no usable CUDA device");
  return count;
}

namespace {

// Starts a load of resolved views (tensors, rows or whole storages).
Result<std::unique_ptr<DeviceLoad>> Start(const Checkpoint& ck,
                                          std::vector<TensorRef> refs,
                                          const DeviceLoadOptions& options,
                                          int count) {
  std::vector<Item> items;
  items.reserve(refs.size());
  for (auto& ref : refs) {
    Item it;
    it.ref = std::move(ref);
    StorageInfo st = *ck.StorageInfoAt(it.ref.info().storage);
    auto mapped = options.device_map.find(st.device);
    const std::string& target =
        mapped != options.device_map.end() ? mapped->second : options.device;
    CKPT_ASSIGN_OR_RETURN(it.dt.device, ParseDevice(target, count));
    it.dt.info = it.ref.info();
    CKPT_ASSIGN_OR_RETURN(it.convert,
                          ConversionCode(it.dt.info.dtype, options.convert));
    it.dt.nbytes = DeviceBytes(it.ref, it.convert);
    if (it.convert) it.dt.info.dtype = options.convert.at(it.dt.info.dtype);
    const size_t elsize = DTypeSize(it.ref.info().dtype);  // the file's dtype
    uint64_t first = static_cast<uint64_t>(it.dt.info.storage_offset) * elsize;
    it.storage_begin = first;
    it.file_offset = st.offset + first;
    items.push_back(std::move(it));
  }
  auto loader = std::make_unique<Loader>(ck, options);
  CKPT_RETURN_IF_ERROR(loader->Prepare(std::move(items)));
  switch (options.strategy) {
    case LoadStrategy::kStaged:
      loader->UseDirect(false);
      break;
    case LoadStrategy::kDirect:
      loader->UseDirect(true);
      break;
    case LoadStrategy::kAuto:
      loader->UseDirect(loader->ResidentFraction() < 0.9);
      break;
    case LoadStrategy::kRegister:
      CKPT_RETURN_IF_ERROR(loader->UseRegister());
      break;
  }
  loader->Start();
  return std::unique_ptr<DeviceLoad>(std::move(loader));
}

}  // namespace

Result<std::unique_ptr<DeviceLoad>> LoadToDevice(
    const Checkpoint& ck, std::span<const TensorRequest> requests,
    const DeviceLoadOptions& options) {
  CKPT_ASSIGN_OR_RETURN(int count, CudaDeviceCount());
  std::vector<TensorRequest> all;
  if (requests.empty()) {
    for (size_t i = 0; i < ck.num_tensors(); ++i)
      all.push_back({ck.TensorInfoAt(i)->path, {}});
    requests = all;
  }
  std::vector<TensorRef> refs;
  refs.reserve(requests.size());
  for (const auto& r : requests) {
    CKPT_ASSIGN_OR_RETURN(TensorRef ref, Resolve(ck, r));
    refs.push_back(std::move(ref));
  }
  return Start(ck, std::move(refs), options, count);
}

Result<std::unique_ptr<DeviceLoad>> LoadStoragesToDevice(
    const Checkpoint& ck, std::span<const size_t> storages,
    const DeviceLoadOptions& options) {
  if (!options.convert.empty()) {
    return InvalidArgument(
        "dtype conversion does not apply to whole storages (untyped bytes)");
  }
  CKPT_ASSIGN_OR_RETURN(int count, CudaDeviceCount());
  std::vector<TensorRef> refs;
  refs.reserve(storages.size());
  for (size_t s : storages) {
    CKPT_ASSIGN_OR_RETURN(TensorRef ref,
                          internal::CheckpointAccess::StorageTensor(ck, s));
    refs.push_back(std::move(ref));
  }
  return Start(ck, std::move(refs), options, count);
}

}  // namespace ckpt
