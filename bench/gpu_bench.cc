// ckpt-bench gpu: host-to-device loading against the PCIe limit. Built only
// with the CUDA toolkit; without a usable GPU it says so and exits 77.
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "ckpt/ckpt.h"
#include "ckpt/cuda.h"

namespace {

using Clock = std::chrono::steady_clock;

double Best(int repeat, const std::function<void()>& before,
            const std::function<void()>& fn) {
  double best = 1e30;
  for (int i = 0; i < repeat; ++i) {
    before();
    auto t0 = Clock::now();
    fn();
    best = std::min(best,
                    std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

void DropCache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void Warm(const std::string& path) {
  std::vector<char> buf(16 << 20);
  int fd = ::open(path.c_str(), O_RDONLY);
  while (fd >= 0 && ::read(fd, buf.data(), buf.size()) > 0) {
  }
  if (fd >= 0) ::close(fd);
}

void Check(const ckpt::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "ckpt-bench gpu: %s\n", s.ToString().c_str());
    std::exit(1);
  }
}

struct Row {
  std::string name;
  double seconds;
  uint64_t bytes;
};

// One pinned cudaMemcpy of `n` bytes, best of `repeat`: the PCIe limit.
std::optional<Row> PinnedCopy(uint64_t n, int repeat) {
  void *host = nullptr, *dev = nullptr;
  if (cudaHostAlloc(&host, n, cudaHostAllocDefault) != cudaSuccess ||
      cudaMalloc(&dev, n) != cudaSuccess) {
    std::fprintf(stderr, "ckpt-bench gpu: cannot allocate %llu bytes\n",
                 (unsigned long long)n);
    return std::nullopt;
  }
  std::memset(host, 1, n);
  Row row{"pinned_cudaMemcpy",
          Best(
              repeat, [] {},
              [&] { cudaMemcpy(dev, host, n, cudaMemcpyHostToDevice); }),
          n};
  cudaFree(dev);
  cudaFreeHost(host);
  return row;
}

// Prints the table, and writes it as JSON when `json` names a file.
int Report(const std::vector<Row>& rows, const std::string& json,
           const std::string& file, const std::string& device) {
  std::printf("%-26s %12s %14s %10s\n", "measure", "seconds", "bytes", "GB/s");
  for (const auto& r : rows) {
    std::printf("%-26s %12.6f %14llu %10.2f\n", r.name.c_str(), r.seconds,
                (unsigned long long)r.bytes,
                r.bytes ? static_cast<double>(r.bytes) / r.seconds / 1e9 : 0.0);
  }
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (!f) return 1;
    std::fprintf(f, "{\"file\": \"%s\", \"device\": \"%s\", \"results\": [",
                 file.c_str(), device.c_str());
    for (size_t i = 0; i < rows.size(); ++i) {
      std::fprintf(f,
                   "%s{\"name\": \"%s\", \"seconds\": %.9f, \"bytes\": %llu}",
                   i ? ", " : "", rows[i].name.c_str(), rows[i].seconds,
                   (unsigned long long)rows[i].bytes);
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}

}  // namespace

int GpuBench(int argc, char** argv) {
  if (argc < 1) {
    std::fprintf(stderr,
                 "usage: ckpt-bench gpu FILE [--repeat R] [--json OUT] "
                 "[--device cuda:N]\n");
    return 2;
  }
  std::string file = argv[0], json, device = "cuda:0";
  int repeat = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--repeat")
      repeat = std::max(1, std::atoi(argv[i + 1]));
    else if (a == "--json")
      json = argv[i + 1];
    else if (a == "--device")
      device = argv[i + 1];
    else
      return 2;
  }
  auto count = ckpt::CudaDeviceCount();
  if (!count.ok()) {
    std::printf("SKIP: no usable CUDA device: %s\n",
                count.status().ToString().c_str());
    return 77;
  }
  auto ck = ckpt::Checkpoint::Open(file);
  Check(ck.status());
  uint64_t total = 0;
  size_t largest = 0, near32 = 0;
  auto dist32 = [](uint64_t n) {
    return n > (32u << 20) ? n - (32u << 20) : (32u << 20) - n;
  };
  for (size_t i = 0; i < ck->num_tensors(); ++i) {
    uint64_t n = ck->TensorInfoAt(i)->nbytes();
    total += n;
    if (n > ck->TensorInfoAt(largest)->nbytes()) largest = i;
    if (dist32(n) < dist32(ck->TensorInfoAt(near32)->nbytes())) near32 = i;
  }
  std::vector<Row> rows;
  // The PCIe limit: one pinned cudaMemcpy of the same number of bytes.
  auto pinned = PinnedCopy(std::min<uint64_t>(total, 1ull << 30), repeat);
  if (!pinned) return 1;
  rows.push_back(*pinned);
  auto load = [&](std::vector<ckpt::TensorRequest> req, ckpt::LoadStrategy s) {
    auto c = ckpt::Checkpoint::Open(file);
    Check(c.status());
    ckpt::DeviceLoadOptions o;
    o.device = device;
    o.strategy = s;
    auto l = ckpt::LoadToDevice(*c, req, o);
    Check(l.status());
    Check((*l)->Wait());
  };
  Warm(file);
  rows.push_back(
      {"warm_full_load_staged",
       Best(
           repeat, [] {}, [&] { load({}, ckpt::LoadStrategy::kStaged); }),
       total});
  rows.push_back({"cold_full_load_auto",
                  Best(
                      repeat, [&] { DropCache(file); },
                      [&] { load({}, ckpt::LoadStrategy::kAuto); }),
                  total});
  rows.push_back({"cold_raw_read",
                  Best(
                      repeat, [&] { DropCache(file); }, [&] { Warm(file); }),
                  ck->file_size()});
  Warm(file);
  std::string p32 = ck->TensorInfoAt(near32)->path;
  rows.push_back({"warm_one_tensor_~32MiB",
                  Best(
                      repeat, [] {},
                      [&] {
                        load({{p32, {}}}, ckpt::LoadStrategy::kStaged);
                      }),
                  ck->TensorInfoAt(near32)->nbytes()});
  auto big = *ck->TensorInfoAt(largest);
  int64_t r0 = big.shape.empty() ? 0 : big.shape[0] / 2;
  int64_t r1 = big.shape.empty() ? 0 : std::min<int64_t>(big.shape[0], r0 + 16);
  rows.push_back({"warm_row_slice_16_rows",
                  Best(
                      repeat, [] {},
                      [&] {
                        load({{big.path, std::pair<int64_t, int64_t>{r0, r1}}},
                             ckpt::LoadStrategy::kStaged);
                      }),
                  // The slice's bytes: (r1 - r0) rows of the row size.
                  big.shape.empty() || big.shape[0] == 0
                      ? 0
                      : big.nbytes() / static_cast<uint64_t>(big.shape[0]) *
                            static_cast<uint64_t>(r1 - r0)});
  return Report(rows, json, file, device);
}
