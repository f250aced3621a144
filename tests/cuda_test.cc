// The device loader against the CUDA-runtime test double: data lands
// intact, staging buffers are never refilled early, every strategy knob,
// errors, and release of everything.
#include "ckpt/cuda.h"

#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <numeric>

#include "cuda_double/cuda_double.h"
#include "test_util.h"

using namespace ckpt;
using namespace ckpt::test;

namespace {

// Tensors of several sizes, one saved on cuda:1, one a view.
std::map<std::string, std::vector<std::byte>> MakeFile(
    const std::string& path) {
  std::map<std::string, std::vector<std::byte>> data;
  auto w = Writer::Create(path, Fast());
  REQUIRE(w.ok());
  size_t sizes[] = {10000, 1, 4096 * 3 + 5, 0, 70000};
  for (size_t i = 0; i < 5; ++i) {
    std::string name = "t" + std::to_string(i);
    data[name] = Pattern(sizes[i], static_cast<unsigned>(i));
    REQUIRE(w->PutTensor(name, DType::kUInt8, {static_cast<int64_t>(sizes[i])},
                         data[name], i == 2 ? "cuda:1" : "cpu")
                .ok());
  }
  std::vector<float> m(40 * 8);
  std::iota(m.begin(), m.end(), 0.0f);
  REQUIRE(w->PutTensor("m", DType::kFloat32, {40, 8}, Bytes(m)).ok());
  data["m"] = std::vector<std::byte>(Bytes(m).begin(), Bytes(m).end());
  REQUIRE(w->Commit().ok());
  return data;
}

std::vector<std::byte> OnDevice(const DeviceTensor& t) {
  std::vector<std::byte> out(t.nbytes);
  if (t.nbytes) REQUIRE(cuda_double::ReadDevice(t.data, out.data(), t.nbytes));
  return out;
}

void RequireNoLeaks() {
  auto s = cuda_double::GetStats();
  CHECK(s.live_device_allocs == 0);
  CHECK(s.live_pinned == 0);
  CHECK(s.live_registrations == 0);
  CHECK(s.live_streams == 0);
  CHECK(s.live_events == 0);
  CHECK(s.guard_violations == 0);
}

}  // namespace

TEST_CASE(
    "cuda double: a refilled staging buffer is caught (the check that guards "
    "the loader)") {
  cuda_double::Reset({});
  void* dev = nullptr;
  void* host = nullptr;
  cudaStream_t st;
  REQUIRE(cudaMalloc(&dev, 4096) == cudaSuccess);
  REQUIRE(cudaHostAlloc(&host, 4096, 0) == cudaSuccess);
  REQUIRE(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess);
  cuda_double::Config slow;
  std::memset(host, 1, 4096);
  // Queue several copies so the last waits behind delays, then overwrite
  // its source before it runs: the premature reuse a ring must avoid.
  for (int i = 0; i < 20; ++i) {
    REQUIRE(cudaMemcpyAsync(dev, host, 4096, cudaMemcpyHostToDevice, st) ==
            cudaSuccess);
  }
  std::memset(host, 2, 4096);
  REQUIRE(cudaStreamSynchronize(st) == cudaSuccess);
  CHECK(cuda_double::GetStats().source_mutations > 0);
  // Pageable memory is copied synchronously and counted.
  std::vector<char> pageable(16, 3);
  REQUIRE(cudaMemcpyAsync(dev, pageable.data(), 16, cudaMemcpyHostToDevice,
                          st) == cudaSuccess);
  CHECK(cuda_double::GetStats().pageable_copies == 1);
  // Out of bounds is refused.
  CHECK(cudaMemcpyAsync(static_cast<char*>(dev) + 4000, host, 200,
                        cudaMemcpyHostToDevice, st) == cudaErrorInvalidValue);
  cudaStreamDestroy(st);
  cudaFreeHost(host);
  cudaFree(dev);
  RequireNoLeaks();
}

TEST_CASE(
    "staged load of a whole file: bytes intact, ring never reused early, all "
    "released") {
  TempDir dir;
  auto data = MakeFile(dir.File("m.ckpt"));
  auto ck = Checkpoint::Open(dir.File("m.ckpt"));
  REQUIRE(ck.ok());
  for (unsigned threads : {1u, 3u}) {
    cuda_double::Config cfg;
    cfg.devices = 2;
    cfg.seed = threads;
    cuda_double::Reset(cfg);
    DeviceLoadOptions o;
    o.threads = threads;
    o.staging_buffer_bytes =
        4096;  // many pieces per tensor: exercises the ring
    {
      auto load = LoadToDevice(*ck, {}, o);
      REQUIRE(load.ok());
      REQUIRE((*load)->Wait().ok());
      REQUIRE((*load)->size() == data.size());
      for (size_t i = 0; i < (*load)->size(); ++i) {
        const DeviceTensor& t = (*load)->tensor(i);
        INFO(t.info.path);
        CHECK((*load)->Ready(i));
        CHECK((*load)->WaitTensor(i).ok());
        CHECK(t.device == 0);  // everything to cuda:0 by default
        CHECK(reinterpret_cast<uintptr_t>(t.data) % 256 == 0);
        CHECK(OnDevice(t) == data[t.info.path]);
      }
      auto s = cuda_double::GetStats();
      CHECK(s.source_mutations == 0);
      CHECK(s.pageable_copies == 0);
      CHECK(s.bad_copies == 0);
      CHECK(s.async_copies >= 20);       // 70000/4096 alone is 18 pieces
      CHECK(s.live_device_allocs == 1);  // one arena
    }
    RequireNoLeaks();
  }
}

TEST_CASE("paths, row slices and device mapping") {
  TempDir dir;
  auto data = MakeFile(dir.File("m.ckpt"));
  auto ck = Checkpoint::Open(dir.File("m.ckpt"));
  REQUIRE(ck.ok());
  cuda_double::Config cfg;
  cfg.devices = 2;
  cuda_double::Reset(cfg);
  DeviceLoadOptions o;
  o.device_map = {{"cuda:1", "cuda:1"}};  // keep what was on cuda:1 there
  std::vector<TensorRequest> req = {
      {"t2", {}}, {"m", std::pair<int64_t, int64_t>{10, 13}}, {"t0", {}}};
  {
    auto load = LoadToDevice(*ck, req, o);
    REQUIRE(load.ok());
    REQUIRE((*load)->Wait().ok());
    REQUIRE((*load)->size() == 3);
    CHECK((*load)->tensor(0).device == 1);
    CHECK(OnDevice((*load)->tensor(0)) == data["t2"]);
    const DeviceTensor& rows = (*load)->tensor(1);
    CHECK(rows.device == 0);
    CHECK(rows.info.shape == std::vector<int64_t>{3, 8});
    auto got = OnDevice(rows);
    REQUIRE(got.size() == 3 * 8 * 4);
    CHECK(std::equal(got.begin(), got.end(), data["m"].begin() + 10 * 8 * 4));
    CHECK(cuda_double::GetStats().live_device_allocs ==
          2);  // an arena per device
    // An index past the end is an error, not an exception (it threw
    // std::out_of_range from .at()).
    CHECK((*load)->WaitTensor(3).code() == ErrorCode::kInvalidArgument);
    CHECK(!(*load)->Ready(99));
    CHECK((*load)->tensor(3).data == nullptr);
    CHECK((*load)->event(3) == nullptr);
  }
  RequireNoLeaks();
  // Bad requests fail before anything is allocated.
  std::vector<TensorRequest> missing = {{"nope", {}}};
  CHECK(LoadToDevice(*ck, missing, o).status().code() == ErrorCode::kNotFound);
  std::vector<TensorRequest> bad_rows = {
      {"m", std::pair<int64_t, int64_t>{5, 99}}};
  CHECK(LoadToDevice(*ck, bad_rows, o).status().code() ==
        ErrorCode::kInvalidArgument);
  DeviceLoadOptions cpu;
  cpu.device = "cpu";
  CHECK(LoadToDevice(*ck, {}, cpu).status().code() ==
        ErrorCode::kInvalidArgument);
  RequireNoLeaks();
}

TEST_CASE(
    "no driver, no device, bad index, out of memory: clear errors, nothing "
    "leaked") {
  TempDir dir;
  MakeFile(dir.File("m.ckpt"));
  auto ck = Checkpoint::Open(dir.File("m.ckpt"));
  REQUIRE(ck.ok());
  cuda_double::Config cfg;
  cfg.no_driver = true;
  cuda_double::Reset(cfg);
  auto r = LoadToDevice(*ck, {}, {});
  CHECK(r.status().code() == ErrorCode::kCuda);
  CHECK(r.status().ToString().find("driver") != std::string::npos);
  cfg = {};
  cfg.devices = 0;
  cuda_double::Reset(cfg);
  CHECK(LoadToDevice(*ck, {}, {}).status().code() == ErrorCode::kCuda);
  cfg = {};
  cuda_double::Reset(cfg);
  DeviceLoadOptions o;
  o.device = "cuda:3";
  r = LoadToDevice(*ck, {}, o);
  CHECK(r.status().code() == ErrorCode::kCuda);
  CHECK(r.status().ToString().find("cuda:3 does not exist: 1 CUDA device") !=
        std::string::npos);
  cfg.device_memory = 1000;
  cuda_double::Reset(cfg);
  r = LoadToDevice(*ck, {}, {});
  CHECK(r.status().code() == ErrorCode::kCuda);
  CHECK(r.status().ToString().find("out of memory") != std::string::npos);
  RequireNoLeaks();
  cfg = {};
  cfg.fail_host_alloc_at = 0;
  cuda_double::Reset(cfg);
  {
    auto load = LoadToDevice(*ck, {}, {});
    REQUIRE(load.ok());
    Status s = (*load)->Wait();
    CHECK(s.code() == ErrorCode::kCuda);
  }
  RequireNoLeaks();
}

TEST_CASE(
    "a failed copy: the error names a tensor, nothing half-written is reported "
    "done") {
  TempDir dir;
  auto data = MakeFile(dir.File("m.ckpt"));
  auto ck = Checkpoint::Open(dir.File("m.ckpt"));
  REQUIRE(ck.ok());
  for (int at : {0, 3, 10}) {
    cuda_double::Config cfg;
    cfg.fail_copy_at = at;
    cfg.seed = static_cast<uint64_t>(at) + 5;
    cuda_double::Reset(cfg);
    DeviceLoadOptions o;
    o.threads = 1;
    o.staging_buffer_bytes = 4096;
    {
      auto load = LoadToDevice(*ck, {}, o);
      REQUIRE(load.ok());
      Status s = (*load)->Wait();
      INFO("fail at copy " << at << ": " << s.ToString());
      CHECK(s.code() == ErrorCode::kCuda);
      CHECK(s.file() == dir.File("m.ckpt"));
      size_t ready = 0;
      for (size_t i = 0; i < (*load)->size(); ++i) {
        const DeviceTensor& t = (*load)->tensor(i);
        if ((*load)->Ready(i)) {
          ++ready;
          CHECK((*load)->WaitTensor(i).ok());
          CHECK(OnDevice(t) == data[t.info.path]);  // reported done => intact
        } else {
          CHECK((*load)->WaitTensor(i).code() == ErrorCode::kCuda);
        }
      }
      CHECK(ready < (*load)->size());
    }
    RequireNoLeaks();
  }
}

TEST_CASE("checksums verified chunk by chunk while loading") {
  TempDir dir;
  // Small checksum chunks so tensors span several, and a view that starts
  // mid-chunk (rows of m).
  std::vector<std::byte> big = Pattern(50000, 9);
  std::vector<std::byte> small = Pattern(300, 4);
  {
    WriteOptions o = Fast();
    o.chunk_size = 4096;
    auto w = Writer::Create(dir.File("v.ckpt"), o);
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("big", DType::kUInt8, {50000}, big).ok());
    REQUIRE(w->PutTensor("small", DType::kUInt8, {300}, small).ok());
    REQUIRE(w->PutTensor("rows", DType::kUInt8, {500, 100}, Pattern(50000, 5))
                .ok());
    REQUIRE(w->Commit().ok());
  }
  cuda_double::Reset({});
  DeviceLoadOptions o;
  o.verify_checksums = true;
  o.staging_buffer_bytes = 3000;  // pieces smaller than a chunk, unaligned
  {
    auto ck = Checkpoint::Open(dir.File("v.ckpt"));
    REQUIRE(ck.ok());
    std::vector<TensorRequest> req = {
        {"big", {}},
        {"small", {}},
        {"rows", std::pair<int64_t, int64_t>{123, 301}}};
    auto load = LoadToDevice(*ck, req, o);
    REQUIRE(load.ok());
    REQUIRE((*load)->Wait().ok());
    CHECK(OnDevice((*load)->tensor(0)) == big);
    CHECK(OnDevice((*load)->tensor(1)) == small);
    CHECK(cuda_double::GetStats().source_mutations == 0);
  }
  RequireNoLeaks();
  // Corrupt one byte of "big" in chunk 5: its load fails naming it.
  auto bytes = ReadAll(dir.File("v.ckpt"));
  auto ck0 = Checkpoint::OpenBuffer(bytes);
  REQUIRE(ck0.ok());
  uint64_t off = ck0->StorageInfoAt(ck0->FindTensor("big")->storage)->offset +
                 5 * 4096 + 17;
  bytes[off] ^= std::byte{0x40};
  WriteAll(dir.File("bad.ckpt"), bytes);
  cuda_double::Reset({});
  {
    auto ck = Checkpoint::Open(dir.File("bad.ckpt"));
    REQUIRE(ck.ok());
    std::vector<TensorRequest> req = {{"big", {}}};
    auto load = LoadToDevice(*ck, req, o);
    REQUIRE(load.ok());
    Status s = (*load)->Wait();
    INFO(s.ToString());
    CHECK(s.code() == ErrorCode::kChecksumMismatch);
    CHECK(s.tensor() == "big");
    CHECK(s.offset() == static_cast<int64_t>(off - 17));
    CHECK_FALSE((*load)->Ready(0));
    CHECK((*load)->WaitTensor(0).code() == ErrorCode::kChecksumMismatch);
    // Without verification the same file loads (the damage is not seen).
    DeviceLoadOptions plain = o;
    plain.verify_checksums = false;
    auto load2 = LoadToDevice(*ck, req, plain);
    REQUIRE(load2.ok());
    CHECK((*load2)->Wait().ok());
  }
  RequireNoLeaks();
}

TEST_CASE("direct (O_DIRECT) strategy and the Auto choice") {
  TempDir dir;
  auto data = MakeFile(dir.File("m.ckpt"));
  cuda_double::Reset({});
  {
    auto ck = Checkpoint::Open(dir.File("m.ckpt"));
    REQUIRE(ck.ok());
    DeviceLoadOptions o;
    o.strategy = LoadStrategy::kDirect;
    o.staging_buffer_bytes = 4096 + 100;  // unaligned pieces: aligned supersets
    o.threads = 2;
    std::vector<TensorRequest> req = {
        {"t4", {}},
        {"t0", {}},
        {"t3", {}},
        {"m", std::pair<int64_t, int64_t>{7, 29}}};
    auto load = LoadToDevice(*ck, req, o);
    REQUIRE(load.ok());
    REQUIRE((*load)->Wait().ok());
    CHECK((*load)->strategy().rfind("direct", 0) == 0);
    CHECK(OnDevice((*load)->tensor(0)) == data["t4"]);
    CHECK(OnDevice((*load)->tensor(1)) == data["t0"]);
    CHECK((*load)->tensor(2).nbytes == 0);
    auto rows = OnDevice((*load)->tensor(3));
    REQUIRE(rows.size() == 22 * 8 * 4);
    CHECK(std::equal(rows.begin(), rows.end(), data["m"].begin() + 7 * 8 * 4));
    auto s = cuda_double::GetStats();
    CHECK(s.source_mutations == 0);
    CHECK(s.pageable_copies == 0);
    // Auto on a file just written and read: warm, so staged.
    o.strategy = LoadStrategy::kAuto;
    for (size_t i = 0; i < ck->num_tensors(); ++i) {
      auto t = ck->TensorAt(i);
      std::vector<std::byte> sink(t->data().begin(), t->data().end());
    }
    auto warm = LoadToDevice(*ck, {}, o);
    REQUIRE(warm.ok());
    REQUIRE((*warm)->Wait().ok());
    CHECK((*warm)->strategy() == "staged");
  }
  // A file large enough that opening it (and the kernel's readahead around
  // the preamble and header) leaves its tensor out of the page cache once
  // its pages are dropped: Auto then reads it with O_DIRECT.
  std::vector<std::byte> big = Pattern(16 << 20, 3);
  {
    auto w = Writer::Create(dir.File("cold.ckpt"), Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("big", DType::kUInt8, {16 << 20}, big).ok());
    REQUIRE(w->Commit().ok());
  }
  int fd = ::open(dir.File("cold.ckpt").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  {
    auto ck = Checkpoint::Open(dir.File("cold.ckpt"));
    REQUIRE(ck.ok());
    auto cold = LoadToDevice(*ck, {}, DeviceLoadOptions{});
    REQUIRE(cold.ok());
    REQUIRE((*cold)->Wait().ok());
    CHECK((*cold)->strategy().rfind("direct", 0) == 0);
    CHECK(OnDevice((*cold)->tensor(0)) == big);
  }
  RequireNoLeaks();
}

TEST_CASE("loading into caller-provided device memory") {
  TempDir dir;
  auto data = MakeFile(dir.File("m.ckpt"));
  auto ck = Checkpoint::Open(dir.File("m.ckpt"));
  REQUIRE(ck.ok());
  cuda_double::Reset({});
  std::vector<TensorRequest> req = {{"t0", {}},
                                    {"m", std::pair<int64_t, int64_t>{1, 3}}};
  auto sizes = RequestBytes(*ck, req);
  REQUIRE(sizes.ok());
  CHECK(*sizes == std::vector<uint64_t>{10000, 2 * 8 * 4});
  std::vector<void*> mine(2);
  for (size_t i = 0; i < 2; ++i)
    REQUIRE(cudaMalloc(&mine[i], (*sizes)[i]) == cudaSuccess);
  DeviceLoadOptions o;
  o.destinations = mine;
  {
    auto load = LoadToDevice(*ck, req, o);
    REQUIRE(load.ok());
    REQUIRE((*load)->Wait().ok());
    CHECK((*load)->tensor(0).data == mine[0]);
    CHECK(OnDevice((*load)->tensor(0)) == data["t0"]);
    CHECK(cuda_double::GetStats().live_device_allocs == 2);  // no arena
  }
  // The memory is still the caller's after the load is gone.
  CHECK(cuda_double::GetStats().live_device_allocs == 2);
  std::vector<std::byte> back(10000);
  REQUIRE(cuda_double::ReadDevice(mine[0], back.data(), back.size()));
  CHECK(back == data["t0"]);
  // Too small a destination is caught (by the double's bounds check: the
  // real runtime would fault), and the count must match.
  o.destinations = {mine[1], mine[1]};
  {
    auto load = LoadToDevice(*ck, req, o);
    REQUIRE(load.ok());
    CHECK((*load)->Wait().code() == ErrorCode::kCuda);
  }
  o.destinations = {mine[0]};
  CHECK(LoadToDevice(*ck, req, o).status().code() ==
        ErrorCode::kInvalidArgument);
  for (void* p : mine) cudaFree(p);
  RequireNoLeaks();
}

TEST_CASE(
    "register strategy: copies straight from page-locked windows of the "
    "mapping") {
  TempDir dir;
  auto data = MakeFile(dir.File("m.ckpt"));
  cuda_double::Reset({});
  {
    auto ck = Checkpoint::Open(dir.File("m.ckpt"));
    REQUIRE(ck.ok());
    DeviceLoadOptions o;
    o.strategy = LoadStrategy::kRegister;
    o.threads = 2;
    o.staging_buffer_bytes = 4096;
    auto load = LoadToDevice(*ck, {}, o);
    REQUIRE(load.ok());
    REQUIRE((*load)->Wait().ok());
    CHECK((*load)->strategy() == "register");
    for (size_t i = 0; i < (*load)->size(); ++i) {
      const DeviceTensor& t = (*load)->tensor(i);
      CHECK(OnDevice(t) == data[t.info.path]);
    }
    auto s = cuda_double::GetStats();
    CHECK(s.pageable_copies == 0);  // every copy came from registered memory
    CHECK(s.source_mutations == 0);
    CHECK(s.live_registrations == 0);  // unpinned once the load finished
    // A budget of zero bytes: every piece goes through the staging ring.
    o.max_registered_bytes = 0;
    auto staged = LoadToDevice(*ck, {}, o);
    REQUIRE(staged.ok());
    REQUIRE((*staged)->Wait().ok());
    CHECK((*staged)->strategy().rfind("register (", 0) == 0);
    for (size_t i = 0; i < (*staged)->size(); ++i) {
      const DeviceTensor& t = (*staged)->tensor(i);
      CHECK(OnDevice(t) == data[t.info.path]);
    }
  }
  {
    ReadOptions ro;
    ro.backend = Backend::kPread;
    auto ck = Checkpoint::Open(dir.File("m.ckpt"), ro);
    REQUIRE(ck.ok());
    DeviceLoadOptions o;
    o.strategy = LoadStrategy::kRegister;
    CHECK(LoadToDevice(*ck, {}, o).status().code() ==
          ErrorCode::kInvalidArgument);
  }
  RequireNoLeaks();
}

#include "cuda/convert_ref.h"

TEST_CASE("conversion reference: exact round-trips and round to nearest even") {
  using namespace ckpt::convert;
  auto is_nan16 = [](uint16_t h) {
    return (h & 0x7C00) == 0x7C00 && (h & 0x3FF);
  };
  auto is_nan_bf = [](uint16_t b) {
    return (b & 0x7F80) == 0x7F80 && (b & 0x7F);
  };
  for (uint32_t h = 0; h < 65536; ++h) {
    auto x = static_cast<uint16_t>(h);
    if (!is_nan16(x))
      REQUIRE(F32ToF16(F16ToF32(x)) == x);
    else
      REQUIRE(is_nan16(F32ToF16(F16ToF32(x))));
    if (!is_nan_bf(x))
      REQUIRE(F32ToBF16(BF16ToF32(x)) == x);
    else
      REQUIRE(is_nan_bf(F32ToBF16(BF16ToF32(x))));
  }
  CHECK(F32ToF16(1.0f) == 0x3C00);
  CHECK(F32ToF16(65504.0f) == 0x7BFF);
  CHECK(F32ToF16(65520.0f) == 0x7C00);  // halfway to the next: rounds to inf
  CHECK(F32ToF16(-0.0f) == 0x8000);
  CHECK(F32ToF16(5.9604645e-8f) == 0x0001);  // smallest subnormal
  CHECK(F32ToF16(2.9802322e-8f) ==
        0x0000);  // exactly half of it: ties to even (0)
  CHECK(F32ToBF16(BitsToFloat(0x3F808000u)) == 0x3F80);  // tie -> even
  CHECK(F32ToBF16(BitsToFloat(0x3F818000u)) == 0x3F82);  // tie -> even
  CHECK(F32ToBF16(BitsToFloat(0x3F808001u)) == 0x3F81);  // above half
  // Against the compiler's own float -> _Float16 conversion on random bits.
  uint32_t x = 12345;
  for (int i = 0; i < 2000000; ++i) {
    x = x * 1664525u + 1013904223u;
    float f = BitsToFloat(x);
    if (f != f) continue;
    _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    INFO(std::hex << x);
    REQUIRE(F32ToF16(f) == want);
  }
}

TEST_CASE("device dtype conversion after the copy") {
  TempDir dir;
  std::vector<float> f32(30000);
  for (size_t i = 0; i < f32.size(); ++i)
    f32[i] = static_cast<float>(i) * 0.37f - 999.5f;
  std::vector<uint16_t> bf(7777);
  for (size_t i = 0; i < bf.size(); ++i)
    bf[i] = static_cast<uint16_t>(0x3F00 + i * 3);
  {
    auto w = Writer::Create(dir.File("c.ckpt"), Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("f32", DType::kFloat32, {30000}, Bytes(f32)).ok());
    REQUIRE(w->PutTensor("bf", DType::kBFloat16, {7777}, Bytes(bf)).ok());
    std::vector<int32_t> ints = {1, 2, 3};
    REQUIRE(w->PutTensor("ints", DType::kInt32, {3}, Bytes(ints)).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(dir.File("c.ckpt"));
  REQUIRE(ck.ok());
  for (auto strategy : {LoadStrategy::kStaged, LoadStrategy::kRegister}) {
    cuda_double::Reset({});
    DeviceLoadOptions o;
    o.strategy = strategy;
    o.staging_buffer_bytes = 4096;
    o.convert = {{DType::kFloat32, DType::kBFloat16},
                 {DType::kBFloat16, DType::kFloat16}};
    {
      auto load = LoadToDevice(*ck, {}, o);
      REQUIRE(load.ok());
      REQUIRE((*load)->Wait().ok());
      for (size_t i = 0; i < (*load)->size(); ++i) {
        const DeviceTensor& t = (*load)->tensor(i);
        auto got = OnDevice(t);
        if (t.info.path == "f32") {
          CHECK(t.info.dtype == DType::kBFloat16);
          REQUIRE(t.nbytes == 30000 * 2);
          std::vector<uint16_t> want(30000);
          for (size_t k = 0; k < want.size(); ++k)
            want[k] = ckpt::convert::F32ToBF16(f32[k]);
          CHECK(std::memcmp(got.data(), want.data(), t.nbytes) == 0);
        } else if (t.info.path == "bf") {
          CHECK(t.info.dtype == DType::kFloat16);
          std::vector<uint16_t> want(7777);
          for (size_t k = 0; k < want.size(); ++k) {
            want[k] = ckpt::convert::F32ToF16(ckpt::convert::BF16ToF32(bf[k]));
          }
          REQUIRE(t.nbytes == 7777 * 2);
          CHECK(std::memcmp(got.data(), want.data(), t.nbytes) == 0);
        } else {
          CHECK(t.info.dtype == DType::kInt32);  // not in the map: unchanged
        }
      }
      auto s = cuda_double::GetStats();
      CHECK(s.kernels >= 30000 * 4 / 4096);
      CHECK(s.source_mutations == 0);
      CHECK(s.bad_copies == 0);
    }
    RequireNoLeaks();
  }
  DeviceLoadOptions to_half;
  to_half.convert = {{DType::kFloat32, DType::kFloat16}};
  auto sizes =
      RequestBytes(*ck, std::vector<TensorRequest>{{"f32", {}}}, to_half);
  REQUIRE(sizes.ok());
  CHECK((*sizes)[0] == 60000);
  DeviceLoadOptions bad;
  bad.convert = {{DType::kInt32, DType::kFloat16}};
  CHECK(LoadToDevice(*ck, {}, bad).status().code() ==
        ErrorCode::kInvalidArgument);
}

TEST_CASE("converted row slices start at the right file offset") {
  // Rows begin at a storage offset counted in the file's (source) dtype:
  // converting float32 -> bfloat16 must not halve it.
  TempDir dir;
  std::vector<float> m(40 * 8);
  for (size_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(i) + 0.25f;
  {
    auto w = Writer::Create(dir.File("r.ckpt"), Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("m", DType::kFloat32, {40, 8}, Bytes(m)).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(dir.File("r.ckpt"));
  REQUIRE(ck.ok());
  std::vector<TensorRequest> req = {{"m", std::pair<int64_t, int64_t>{10, 13}}};
  for (auto strategy : {LoadStrategy::kStaged, LoadStrategy::kDirect,
                        LoadStrategy::kRegister}) {
    for (bool verify : {false, true}) {
      cuda_double::Reset({});
      DeviceLoadOptions o;
      o.strategy = strategy;
      o.verify_checksums = verify;
      o.convert = {{DType::kFloat32, DType::kBFloat16}};
      {
        auto load = LoadToDevice(*ck, req, o);
        REQUIRE(load.ok());
        REQUIRE((*load)->Wait().ok());
        const DeviceTensor& t = (*load)->tensor(0);
        REQUIRE(t.nbytes == 3 * 8 * 2);
        auto got = OnDevice(t);
        std::vector<uint16_t> want(3 * 8);
        for (size_t k = 0; k < want.size(); ++k)
          want[k] = ckpt::convert::F32ToBF16(m[80 + k]);
        CHECK(std::memcmp(got.data(), want.data(), t.nbytes) == 0);
      }
      RequireNoLeaks();
    }
  }
}

TEST_CASE("whole storages to the device, and into caller memory") {
  TempDir dir;
  MakeFile(
      dir.File("s.ckpt"));  // compared against the reader's own storage views
  auto ck = Checkpoint::Open(dir.File("s.ckpt"));
  REQUIRE(ck.ok());
  cuda_double::Reset({});
  std::vector<size_t> storages(ck->num_storages());
  std::iota(storages.begin(), storages.end(), size_t{0});
  DeviceLoadOptions o;
  o.staging_buffer_bytes = 4096;  // many ring turns
  o.device_map = {{"cuda:1", "cuda:0"}};
  {
    auto load = LoadStoragesToDevice(*ck, storages, o);
    REQUIRE(load.ok());
    REQUIRE((*load)->Wait().ok());
    REQUIRE((*load)->size() == storages.size());
    for (size_t i = 0; i < storages.size(); ++i) {
      const DeviceTensor& t = (*load)->tensor(i);
      CHECK(t.info.path == "<storage " + std::to_string(i) + ">");
      CHECK(t.info.dtype == DType::kUInt8);
      auto view = ck->Storage(i);
      REQUIRE(view.ok());
      REQUIRE(t.nbytes == view->data.size());
      auto got = OnDevice(t);
      CHECK(std::equal(got.begin(), got.end(), view->data.begin()));
    }
    CHECK(cuda_double::GetStats().source_mutations == 0);
  }
  RequireNoLeaks();
  // Caller-provided memory, one pointer per storage.
  std::vector<void*> mine(storages.size());
  for (size_t i = 0; i < mine.size(); ++i) {
    REQUIRE(cudaMalloc(&mine[i],
                       std::max<uint64_t>(1, ck->StorageInfoAt(i)->nbytes)) ==
            cudaSuccess);
  }
  o.destinations = mine;
  {
    auto load = LoadStoragesToDevice(*ck, storages, o);
    REQUIRE(load.ok());
    REQUIRE((*load)->Wait().ok());
    CHECK((*load)->tensor(0).data == mine[0]);
  }
  std::vector<std::byte> back(ck->StorageInfoAt(0)->nbytes);
  REQUIRE(cuda_double::ReadDevice(mine[0], back.data(), back.size()));
  CHECK(std::equal(back.begin(), back.end(), ck->Storage(0)->data.begin()));
  for (void* p : mine) REQUIRE(cudaFree(p) == cudaSuccess);
  // Errors: a bad storage index, and conversion (meaningless on bytes).
  std::vector<size_t> bad = {99};
  CHECK(LoadStoragesToDevice(*ck, bad, {}).status().code() ==
        ErrorCode::kInvalidArgument);
  DeviceLoadOptions conv;
  conv.convert = {{DType::kFloat32, DType::kBFloat16}};
  CHECK(LoadStoragesToDevice(*ck, storages, conv).status().code() ==
        ErrorCode::kInvalidArgument);
  RequireNoLeaks();
}

TEST_CASE(
    "a load holds its own handle on the file: the caller's Checkpoint may be "
    "moved or destroyed while it runs") {
  TempDir dir;
  std::vector<std::byte> big = Pattern(60000, 3);
  {
    WriteOptions wo = Fast();
    wo.chunk_size = 4096;  // checked chunk by chunk, through the Checkpoint
    auto w = Writer::Create(dir.File("own.ckpt"), wo);
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("big", DType::kUInt8, {60000}, big).ok());
    REQUIRE(w->Commit().ok());
  }
  DeviceLoadOptions o;
  o.verify_checksums = true;
  o.staging_buffer_bytes = 3000;  // many pieces, each after a queued copy
  std::vector<TensorRequest> req = {{"big", {}}};
  cuda_double::Config slow;
  slow.max_delay_us = 3000;  // the load outlasts the caller's handle
  for (bool destroy : {false, true}) {
    INFO((destroy ? "destroyed" : "moved from, the new owner destroyed"));
    cuda_double::Reset(slow);
    {
      std::unique_ptr<DeviceLoad> load;
      {
        auto ck = std::make_unique<Result<Checkpoint>>(
            Checkpoint::Open(dir.File("own.ckpt")));
        REQUIRE((*ck).ok());
        auto started = LoadToDevice(**ck, req, o);
        REQUIRE(started.ok());
        load = std::move(*started);
        // A moved-from Checkpoint is empty: a load still using it would
        // fault at its next chunk check; a destroyed one is freed memory.
        if (!destroy) Checkpoint gone = std::move(**ck);
        ck.reset();
      }
      CHECK_FALSE(load->Ready(0));  // still running: the handle went first
      REQUIRE(load->Wait().ok());
      CHECK(OnDevice(load->tensor(0)) == big);
      CHECK(cuda_double::GetStats().source_mutations == 0);
    }
    RequireNoLeaks();
  }
}

TEST_CASE(
    "a conversion scratch that cannot be allocated fails its tensor, naming "
    "it") {
  TempDir dir;
  std::vector<float> f32(5000, 1.5f);
  {
    auto w = Writer::Create(dir.File("s.ckpt"), Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("f32", DType::kFloat32, {5000}, Bytes(f32)).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(dir.File("s.ckpt"));
  REQUIRE(ck.ok());
  cuda_double::Config cfg;
  cfg.fail_malloc_at = 1;  // the arena is allocation 0, the scratch 1
  cuda_double::Reset(cfg);
  DeviceLoadOptions o;
  o.threads = 1;
  o.convert = {{DType::kFloat32, DType::kBFloat16}};
  {
    auto load = LoadToDevice(*ck, {}, o);
    REQUIRE(load.ok());
    Status s = (*load)->Wait();
    INFO(s.ToString());
    CHECK(s.code() == ErrorCode::kCuda);
    CHECK(s.tensor() == "f32");
    CHECK(s.ToString().find("conversion scratch") != std::string::npos);
    CHECK_FALSE((*load)->Ready(0));
  }
  RequireNoLeaks();
}

TEST_CASE("direct reads come from the file the Checkpoint has open") {
  // ckpt saves by rename: after a save over the same path, the path names
  // a new file. A load from a Checkpoint opened before must still read the
  // old one (it used to reopen the path), and so must a load whose path
  // has been deleted.
  TempDir dir;
  const std::string path = dir.File("r.ckpt");
  auto old_bytes = Pattern(70000, 1);
  auto new_bytes = Pattern(70000, 2);
  auto write = [&](const std::vector<std::byte>& b) {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("t", DType::kUInt8, {70000}, b).ok());
    REQUIRE(w->Commit().ok());
  };
  write(old_bytes);
  cuda_double::Reset({});
  {
    auto ck = Checkpoint::Open(path);
    REQUIRE(ck.ok());
    write(new_bytes);  // replaces the path by rename
    for (bool unlink_too : {false, true}) {
      if (unlink_too) REQUIRE(::unlink(path.c_str()) == 0);
      DeviceLoadOptions o;
      o.strategy = LoadStrategy::kDirect;
      o.staging_buffer_bytes = 4096;
      std::vector<TensorRequest> req = {{"t", {}}};
      auto load = LoadToDevice(*ck, req, o);
      INFO(load.status().ToString());
      REQUIRE(load.ok());
      Status s = (*load)->Wait();
      INFO(s.ToString());
      REQUIRE(s.ok());
      CHECK(OnDevice((*load)->tensor(0)) == old_bytes);
    }
  }
  RequireNoLeaks();
}
