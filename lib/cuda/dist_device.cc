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

// Where a shard's storages lie and which tensor views each (a chunk's data
// tensor has a storage of its own, SHARDED.md 3).
struct ShardMap {
  Checkpoint ck;
  std::vector<uint64_t> starts, sizes;
  std::vector<std::string> tensor_of;  // per storage
  std::vector<TensorInfo> info_of;
};

Result<ShardMap> MapShard(const ShardedCheckpoint& ck, size_t file) {
  CKPT_ASSIGN_OR_RETURN(Checkpoint c, ck.OpenShard(file));
  ShardMap m{std::move(c), {}, {}, {}, {}};
  const size_t n = m.ck.num_storages();
  m.tensor_of.resize(n);
  m.info_of.resize(n);
  for (size_t s = 0; s < n; ++s) {
    CKPT_ASSIGN_OR_RETURN(StorageInfo si, m.ck.StorageInfoAt(s));
    m.starts.push_back(si.offset);
    m.sizes.push_back(si.nbytes);
  }
  // The tensor a storage's rows are loaded through: one that views the
  // whole storage from its first byte, row-major, with non-empty rows (the
  // row arithmetic below assumes exactly that). A storage with none is not
  // a chunk's and loads nothing (the error names the offset).
  for (size_t t = 0; t < m.ck.num_tensors(); ++t) {
    CKPT_ASSIGN_OR_RETURN(TensorInfo ti, m.ck.TensorInfoAt(t));
    if (ti.storage >= n || !m.tensor_of[ti.storage].empty()) continue;
    const bool whole = ti.storage_offset == 0 && ti.is_contiguous() &&
                       ti.nbytes() == m.sizes[ti.storage] && ti.nbytes() > 0;
    if (whole) {
      m.tensor_of[ti.storage] = ti.path;
      m.info_of[ti.storage] = ti;
    }
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

uint64_t SourceEnd(const RunPattern& p) {
  uint64_t end = p.src + p.length;
  for (size_t d = 0; d < p.counts.size(); ++d) {
    if (p.counts[d] > 0) end += (p.counts[d] - 1) * p.src_strides[d];
  }
  return end;
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
      auto up =
          std::upper_bound(sm.starts.begin(), sm.starts.end(), c.runs.src);
      const size_t s = static_cast<size_t>(up - sm.starts.begin()) - 1;
      if (up == sm.starts.begin() || sm.tensor_of[s].empty() ||
          SourceEnd(c.runs) > sm.starts[s] + sm.sizes[s]) {
        return Corrupt("chunk bytes at offset " + std::to_string(c.runs.src) +
                       " are not one chunk tensor's storage")
            .WithFile(ck.ShardFilePath(c.file));
      }
      const TensorInfo& ti = sm.info_of[s];
      const uint64_t base = sm.starts[s];
      // Rows of the chunk tensor (a 0-d or 1-D chunk: its elements).
      const uint64_t row =
          ti.shape.empty() || ti.shape[0] == 0
              ? ti.nbytes()
              : ti.nbytes() / static_cast<uint64_t>(ti.shape[0]);
      const uint64_t b = c.runs.src - base, e = SourceEnd(c.runs) - base;
      const uint64_t r0 = b / row, r1 = (e + row - 1) / row;
      TensorRequest req{sm.tensor_of[s], std::nullopt};
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
