// LoadBoxesToDevice: sharded boxes to GPU memory through the device
// loader, with 2-D device copies for strided intersections.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ckpt/dist_cuda.h"

namespace ckpt::dist {
namespace {

Status CudaError(const char* what, cudaError_t e) {
  return Status(ErrorCode::kCuda,
                std::string(what) + " failed: " + cudaGetErrorString(e));
}

// The shard's row-major tensors, by where their bytes begin in the file: a
// chunk's bytes are loaded as rows of the tensor whose bytes hold them
// (ckpt's writer gives each chunk a storage of its own, SHARDED.md 3; a
// tensor at an offset into a larger storage is found just the same).
struct ShardMap {
  struct Span {
    uint64_t begin = 0, end = 0;  // absolute byte range in the file
    uint64_t row = 0;             // bytes per row (a 0-d/1-D: all / elem)
    TensorInfo info;
  };
  Checkpoint ck;
  std::vector<Span> spans;  // sorted by begin
  // For each i, the span reaching furthest among spans[0..i].
  std::vector<size_t> furthest;

  // The tensor holding [b, e), or null: the latest beginning at or before
  // b that reaches e among the few nearest (a chunk's own tensor), else
  // the one reaching furthest of all that begin at or before b (a view
  // into a storage that many smaller views begin inside).
  const Span* Holding(uint64_t b, uint64_t e) const {
    auto it =
        std::upper_bound(spans.begin(), spans.end(), b,
                         [](uint64_t x, const Span& s) { return x < s.begin; });
    if (it == spans.begin()) return nullptr;
    for (auto k = it; k != spans.begin() && it - k < 8;) {
      --k;
      if (k->end >= e) return &*k;
    }
    const Span& far =
        spans[furthest[static_cast<size_t>(it - spans.begin()) - 1]];
    return far.end >= e ? &far : nullptr;
  }
};

Result<ShardMap> MapShard(const ShardedCheckpoint& ck, size_t file) {
  CKPT_ASSIGN_OR_RETURN(Checkpoint c, ck.OpenShard(file));
  ShardMap m{std::move(c), {}, {}};
  for (size_t t = 0; t < m.ck.num_tensors(); ++t) {
    CKPT_ASSIGN_OR_RETURN(TensorInfo ti, m.ck.TensorInfoAt(t));
    const uint64_t n = ti.nbytes();
    if (!ti.is_contiguous() || n == 0) continue;
    CKPT_ASSIGN_OR_RETURN(StorageInfo si, m.ck.StorageInfoAt(ti.storage));
    const uint64_t begin =
        si.offset +
        static_cast<uint64_t>(ti.storage_offset) * DTypeSize(ti.dtype);
    const uint64_t row =
        ti.shape.empty() ? n : n / static_cast<uint64_t>(ti.shape[0]);
    m.spans.push_back({begin, begin + n, row, std::move(ti)});
  }
  std::stable_sort(m.spans.begin(), m.spans.end(),
                   [](const ShardMap::Span& a, const ShardMap::Span& b) {
                     return a.begin < b.begin;
                   });
  m.furthest.resize(m.spans.size());
  for (size_t i = 0; i < m.spans.size(); ++i) {
    const bool further =
        i == 0 || m.spans[i].end > m.spans[m.furthest[i - 1]].end;
    m.furthest[i] = further ? i : m.furthest[i - 1];
  }
  return m;
}

// A strided copy from device scratch to the destination, done after the
// loads: the pattern's src offsets are relative to `scratch`.
struct DeviceCopy {
  std::shared_ptr<void> scratch;
  RunPattern runs;
  std::byte* dst = nullptr;
};

Status RunDeviceCopy(const DeviceCopy& c, cudaStream_t stream) {
  const RunPattern& p = c.runs;
  const auto* src = static_cast<const std::byte*>(c.scratch.get());
  const size_t k = p.counts.size();
  if (k == 0) {
    cudaError_t e = cudaMemcpyAsync(c.dst + p.dst, src + p.src, p.length,
                                    cudaMemcpyDeviceToDevice, stream);
    return e == cudaSuccess ? Status::OK() : CudaError("cudaMemcpyAsync", e);
  }
  // The innermost strided dim is one 2-D copy; loop over the outer ones.
  std::vector<uint64_t> j(k - 1, 0);
  for (;;) {
    uint64_t s = p.src, d = p.dst;
    for (size_t i = 0; i + 1 < k; ++i) {
      s += j[i] * p.src_strides[i];
      d += j[i] * p.dst_strides[i];
    }
    cudaError_t e = cudaMemcpy2DAsync(
        c.dst + d, p.dst_strides[k - 1], src + s, p.src_strides[k - 1],
        p.length, p.counts[k - 1], cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return CudaError("cudaMemcpy2DAsync", e);
    size_t i = k - 1;
    for (;;) {
      if (i == 0) return Status::OK();
      --i;
      if (++j[i] < p.counts[i]) break;
      j[i] = 0;
    }
  }
}

}  // namespace

Result<LoadStats> LoadBoxesToDevice(const ShardedCheckpoint& ck,
                                    std::span<const DeviceWant> wants,
                                    const DeviceLoadOptions& options) {
  LoadStats stats;
  const Manifest& m = ck.manifest();
  int device = 0;
  if (options.device.rfind("cuda:", 0) == 0) {
    device = std::atoi(options.device.c_str() + 5);
  } else if (options.device != "cuda") {
    return InvalidArgument("device must be cuda or cuda:N, not '" +
                           options.device + "'");
  }
  struct FileLoad {
    std::vector<TensorRequest> requests;
    std::vector<void*> destinations;
  };
  std::map<uint32_t, FileLoad> loads;
  std::map<uint32_t, ShardMap> shards;
  std::vector<DeviceCopy> device_copies;
  for (const DeviceWant& w : wants) {
    const GlobalTensorInfo* t = m.Find(w.path);
    CKPT_ASSIGN_OR_RETURN(auto copies, ck.PlanBox(w.path, w.box));
    stats.bytes_needed +=
        static_cast<uint64_t>(w.box.numel()) * DTypeSize(t->dtype);
    if (!copies.empty() && !w.data) {
      return InvalidArgument("no device pointer for box of '" + w.path + "'")
          .WithTensor(w.path);
    }
    auto* dst = static_cast<std::byte*>(w.data);
    for (const auto& c : copies) {
      auto it = shards.find(c.file);
      if (it == shards.end()) {
        CKPT_ASSIGN_OR_RETURN(ShardMap sm, MapShard(ck, c.file));
        it = shards.emplace(c.file, std::move(sm)).first;
        ++stats.files_opened;
      }
      const ShardMap& sm = it->second;
      const ShardMap::Span* span = sm.Holding(c.runs.src, c.runs.src_end());
      if (!span) {
        return Corrupt("chunk bytes at offset " + std::to_string(c.runs.src) +
                       " are not the bytes of one row-major tensor")
            .WithFile(ck.ShardFilePath(c.file));
      }
      const TensorInfo& ti = span->info;
      const uint64_t row = span->row;
      const uint64_t b = c.runs.src - span->begin,
                     e = c.runs.src_end() - span->begin;
      const uint64_t r0 = b / row, r1 = (e + row - 1) / row;
      TensorRequest req{ti.path, std::nullopt};
      if (!ti.shape.empty()) {
        req.rows =
            std::make_pair(static_cast<int64_t>(r0), static_cast<int64_t>(r1));
      }
      FileLoad& fl = loads[c.file];
      const bool direct =
          c.runs.counts.empty() && b % row == 0 && c.runs.length % row == 0;
      stats.runs += c.runs.runs();
      stats.bytes_read += (r1 - r0) * row;
      if (direct) {
        fl.requests.push_back(req);
        fl.destinations.push_back(dst + c.runs.dst);
        continue;
      }
      void* scratch = nullptr;
      if (cudaError_t err = cudaSetDevice(device); err != cudaSuccess) {
        return CudaError("cudaSetDevice", err);
      }
      if (cudaError_t err = cudaMalloc(&scratch, (r1 - r0) * row);
          err != cudaSuccess) {
        return CudaError("cudaMalloc (scratch)", err);
      }
      DeviceCopy dc;
      dc.scratch = std::shared_ptr<void>(scratch, [](void* p) { cudaFree(p); });
      dc.runs = c.runs;
      dc.runs.src = b - r0 * row;
      dc.dst = dst;
      fl.requests.push_back(req);
      fl.destinations.push_back(scratch);
      device_copies.push_back(std::move(dc));
    }
  }
  for (auto& [file, fl] : loads) {
    DeviceLoadOptions o = options;
    o.destinations = fl.destinations;
    o.convert.clear();
    CKPT_ASSIGN_OR_RETURN(auto load,
                          LoadToDevice(shards.at(file).ck, fl.requests, o));
    CKPT_RETURN_IF_ERROR(load->Wait());
  }
  if (!device_copies.empty()) {
    cudaStream_t stream = nullptr;
    if (cudaError_t e =
            cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
        e != cudaSuccess) {
      return CudaError("cudaStreamCreateWithFlags", e);
    }
    Status st;
    for (const auto& dc : device_copies) {
      st = RunDeviceCopy(dc, stream);
      if (!st.ok()) break;
    }
    cudaError_t e = cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
    CKPT_RETURN_IF_ERROR(st);
    if (e != cudaSuccess) return CudaError("cudaStreamSynchronize", e);
  }
  return stats;
}

}  // namespace ckpt::dist
