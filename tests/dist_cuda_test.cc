// Sharded boxes into device memory (LoadBoxesToDevice) against the
// CUDA-runtime test double: row intersections land straight from the
// device loader, strided ones (column slices) through device scratch and
// cudaMemcpy2DAsync; every box compared bit for bit with the reference.
#include "ckpt/dist_cuda.h"

#include <cuda_runtime_api.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <random>

#include "cuda_double/cuda_double.h"
#include "dist_reference.h"
#include "test_util.h"

using namespace ckpt;
using namespace ckpt::dist;
using ckpt::test::ChunkBlock;
using ckpt::test::ReferenceBox;
namespace fs = std::filesystem;

namespace {

struct Spec {
  std::string path;
  DType dtype;
  std::vector<int64_t> shape;
};
const std::vector<Spec> kSpecs = {{"w", DType::kFloat32, {6, 5}},
                                  {"i", DType::kInt64, {4, 6}},
                                  {"g", DType::kBFloat16, {3, 4, 5}},
                                  {"s", DType::kFloat32, {}}};

// A save of kSpecs row-split over `world` ranks (0-d replicated).
std::string SaveRows(const std::string& root, int world) {
  const std::string dir = root + "/step";
  for (int r = 0; r < world; ++r) {
    auto shard = ShardPath(dir, r, world);
    REQUIRE(shard.ok());
    auto w = Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(w.ok());
    std::vector<std::vector<std::byte>> keep;
    keep.reserve(kSpecs.size());
    std::vector<NodeId> nodes;
    for (const auto& s : kSpecs) {
      Box box{std::vector<int64_t>(s.shape.size(), 0), s.shape};
      Chunk c{s.path, s.dtype, s.shape, box, {}};
      if (s.shape.empty()) {
        c.replica_index = static_cast<uint32_t>(r);
        c.replica_count = static_cast<uint32_t>(world);
      } else {
        auto [b, n] = ChunkBlock(s.shape[0], r, world);
        c.box.offsets[0] = b;
        c.box.sizes[0] = n;
      }
      keep.push_back(ReferenceBox(s.path, s.dtype, s.shape, c.box));
      c.data = keep.back();
      auto n = AddChunk(*w, c);
      REQUIRE(n.ok());
      if (*n) nodes.push_back(**n);
    }
    REQUIRE(SetShardRoot(*w, nodes, std::nullopt, std::nullopt, r, world).ok());
    REQUIRE(w->Commit().ok());
  }
  SaveOptions o;
  o.write.sync = false;
  REQUIRE(CommitWritten(dir, world, o).ok());
  return dir;
}

// Loads `box` of `s` to the device and compares it with the reference.
void CheckOnDevice(const ShardedCheckpoint& ck, const Spec& s, const Box& box) {
  const size_t bytes = static_cast<size_t>(box.numel()) * DTypeSize(s.dtype);
  void* dev = nullptr;
  REQUIRE(cudaMalloc(&dev, std::max<size_t>(bytes, 1)) == cudaSuccess);
  DeviceWant w{s.path, box, dev};
  DeviceLoadOptions o;
  o.verify_checksums = true;
  auto st = LoadBoxesToDevice(ck, std::span(&w, 1), o);
  INFO(s.path << " " << box.ndim());
  REQUIRE(st.ok());
  CHECK(st->bytes_needed == bytes);
  std::vector<std::byte> got(bytes);
  if (bytes) REQUIRE(cuda_double::ReadDevice(dev, got.data(), bytes));
  CHECK(got == ReferenceBox(s.path, s.dtype, s.shape, box));
  REQUIRE(cudaFree(dev) == cudaSuccess);
}

}  // namespace

TEST_CASE(
    "sharded boxes land in device memory bit for bit, rows directly, columns "
    "by 2-D copies") {
  cuda_double::Reset({});
  const std::string root = ckpt::test::TempDir().path();
  const std::string dir = SaveRows(root, 3);
  {
    auto ck = ShardedCheckpoint::Open(dir);
    REQUIRE(ck.ok());
    // Rows: no device-to-device copy at all.
    CheckOnDevice(*ck, kSpecs[0], Box{{1, 0}, {4, 5}});
    CHECK(cuda_double::GetStats().d2d_copies == 0);
    // A column slice: strided, through scratch and cudaMemcpy2DAsync.
    CheckOnDevice(*ck, kSpecs[0], Box{{0, 1}, {6, 2}});
    CHECK(cuda_double::GetStats().d2d_copies > 0);
    CheckOnDevice(*ck, kSpecs[3], Box{});  // 0-d
    std::mt19937 rng(7);
    for (const auto& s : kSpecs) {
      for (int k = 0; k < 10; ++k) {
        Box b;
        for (int64_t n : s.shape) {
          std::uniform_int_distribution<int64_t> d(0, n);
          int64_t x = d(rng), y = d(rng);
          b.offsets.push_back(std::min(x, y));
          b.sizes.push_back(std::max(x, y) - std::min(x, y));
        }
        CheckOnDevice(*ck, s, b);
      }
    }
    auto s = cuda_double::GetStats();
    CHECK(s.bad_copies == 0);
  }
  auto s = cuda_double::GetStats();
  CHECK(s.live_device_allocs == 0);
  CHECK(s.live_pinned == 0);
  CHECK(s.live_streams == 0);
  CHECK(s.guard_violations == 0);
  std::error_code ec;
  fs::remove_all(root, ec);
}

TEST_CASE(
    "a failed device copy of a sharded box is an error, and nothing leaks") {
  cuda_double::Config c;
  c.fail_copy_at = 0;
  cuda_double::Reset(c);
  const std::string root = ckpt::test::TempDir().path();
  const std::string dir = SaveRows(root, 2);
  {
    auto ck = ShardedCheckpoint::Open(dir);
    REQUIRE(ck.ok());
    void* dev = nullptr;
    REQUIRE(cudaMalloc(&dev, 6 * 5 * 4) == cudaSuccess);
    DeviceWant w{"w", Box{{0, 0}, {6, 5}}, dev};
    auto st = LoadBoxesToDevice(*ck, std::span(&w, 1));
    REQUIRE_FALSE(st.ok());
    CHECK(st.status().code() == ErrorCode::kCuda);
    REQUIRE(cudaFree(dev) == cudaSuccess);
    DeviceWant none{"nope", Box{}, nullptr};
    CHECK(LoadBoxesToDevice(*ck, std::span(&none, 1)).status().code() ==
          ErrorCode::kNotFound);
  }
  auto s = cuda_double::GetStats();
  CHECK(s.live_device_allocs == 0);
  CHECK(s.live_pinned == 0);
  CHECK(s.live_streams == 0);
  std::error_code ec;
  fs::remove_all(root, ec);
}

TEST_CASE(
    "a chunk stored at an offset into a larger storage loads to the device "
    "from its own bytes") {
  // Another writer may keep a chunk's bytes inside a larger storage (S3
  // allows it): the device path must find them by the tensor's own offset,
  // as the CPU path does, not assume the storage starts with them.
  cuda_double::Reset({});
  const std::string root = ckpt::test::TempDir().path();
  const std::string dir = root + "/offset";
  const Spec& s = kSpecs[0];  // w, float32 [6, 5]
  const Box whole{{0, 0}, {6, 5}};
  const std::vector<std::byte> ref =
      ReferenceBox(s.path, s.dtype, s.shape, whole);
  std::vector<std::byte> storage(7 * sizeof(float), std::byte{0x5a});  // junk
  storage.insert(storage.end(), ref.begin(), ref.end());
  {
    auto shard = ShardPath(dir, 0, 1);
    REQUIRE(shard.ok());
    auto w = Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(w.ok());
    auto sid = w->AddStorage(storage);
    REQUIRE(sid.ok());
    TensorSpec spec;
    spec.dtype = s.dtype;
    spec.shape = s.shape;
    spec.storage = *sid;
    spec.storage_offset = 7;
    auto data = w->AddTensor(spec);
    REQUIRE(data.ok());
    auto ints = [&](const std::vector<int64_t>& v) {
      std::vector<NodeId> items;
      for (int64_t x : v) items.push_back(w->AddInt(x));
      auto t = w->AddTuple(items);
      REQUIRE(t.ok());
      return *t;
    };
    const NodeId keys[] = {w->AddString("path"), w->AddString("shape"),
                           w->AddString("offsets"), w->AddString("data")};
    const NodeId values[] = {w->AddString(s.path), ints(s.shape), ints({0, 0}),
                             *data};
    auto chunk = w->AddDict(keys, values);
    REQUIRE(chunk.ok());
    const NodeId chunks[] = {*chunk};
    REQUIRE(SetShardRoot(*w, chunks, std::nullopt, std::nullopt, 0, 1).ok());
    REQUIRE(w->Commit().ok());
    SaveOptions o;
    o.write.sync = false;
    REQUIRE(CommitWritten(dir, 1, o).ok());
  }
  {
    auto ck = ShardedCheckpoint::Open(dir);
    REQUIRE(ck.ok());
    // The CPU path reads by absolute offsets.
    auto cpu = ck->Read(s.path, Box{{1, 0}, {4, 5}});
    REQUIRE(cpu.ok());
    CHECK(std::vector<std::byte>(cpu->data.begin(), cpu->data.end()) ==
          ReferenceBox(s.path, s.dtype, s.shape, Box{{1, 0}, {4, 5}}));
    CheckOnDevice(*ck, s, Box{{1, 0}, {4, 5}});  // rows, direct
    CheckOnDevice(*ck, s, Box{{0, 2}, {6, 3}});  // columns, 2-D copies
    CheckOnDevice(*ck, s, whole);
  }
  CHECK(cuda_double::GetStats().live_device_allocs == 0);
  std::error_code ec;
  fs::remove_all(root, ec);
}

TEST_CASE(
    "one ckpt file opened as a one-rank sharded checkpoint loads column "
    "slices to the device by 2-D copies, tied and offset tensors included") {
  // What ckpt.iter_weights does for a tensor-parallel rank on a GPU.
  cuda_double::Reset({});
  ckpt::test::TempDir tmp;
  const std::string file = tmp.File("model.ckpt");
  const Spec& s = kSpecs[0];  // w, float32 [6, 5]
  const Box whole{{0, 0}, {6, 5}};
  const std::vector<std::byte> ref =
      ReferenceBox(s.path, s.dtype, s.shape, whole);
  {
    auto w = Writer::Create(file, ckpt::test::Fast());
    REQUIRE(w.ok());
    REQUIRE(
        w->PutTensor("a.first", DType::kUInt8, {3}, ckpt::test::Pattern(3, 1))
            .ok());
    std::vector<std::byte> storage(2 * sizeof(float), std::byte{0x5a});
    storage.insert(storage.end(), ref.begin(), ref.end());
    auto sid = w->AddStorage(storage);
    REQUIRE(sid.ok());
    TensorSpec spec;
    spec.dtype = s.dtype;
    spec.shape = s.shape;
    spec.storage = *sid;
    spec.storage_offset = 2;
    for (const char* name : {"w", "w.tied"}) {  // two tensors, one storage
      auto t = w->AddTensor(spec);
      REQUIRE(t.ok());
      REQUIRE(w->PutValue(name, *t).ok());
    }
    spec.shape = {5, 6};
    spec.strides = {1, 5};  // a transpose saved as is: no chunk
    auto t = w->AddTensor(spec);
    REQUIRE(t.ok());
    REQUIRE(w->PutValue("w.t", *t).ok());
    REQUIRE(w->Commit().ok());
  }
  {
    auto ck = ShardedCheckpoint::OpenFile(file);
    REQUIRE(ck.ok());
    CHECK(ck->manifest().world_size == 1);
    CHECK(ck->manifest().Find("w.t") == nullptr);
    REQUIRE(ck->manifest().Find("w.tied") != nullptr);
    for (const char* name : {"w", "w.tied"}) {
      Spec named = s;
      named.path = name;
      const Box cols{{0, 1}, {6, 2}};
      const size_t bytes = 6 * 2 * sizeof(float);
      void* dev = nullptr;
      REQUIRE(cudaMalloc(&dev, bytes) == cudaSuccess);
      DeviceWant want{name, cols, dev};
      DeviceLoadOptions o;
      o.verify_checksums = true;
      auto st = LoadBoxesToDevice(*ck, std::span(&want, 1), o);
      REQUIRE(st.ok());
      std::vector<std::byte> got(bytes);
      REQUIRE(cuda_double::ReadDevice(dev, got.data(), bytes));
      CHECK(got == ReferenceBox(s.path, s.dtype, s.shape, cols));
      REQUIRE(cudaFree(dev) == cudaSuccess);
      // The host loader reads the same box from the same index.
      std::vector<std::byte> host(bytes);
      Want hw{name, cols, host};
      auto plan = ck->Plan(std::span(&hw, 1));
      REQUIRE(plan.ok());
      REQUIRE(ck->Execute(*plan).ok());
      CHECK(host == got);
    }
    CHECK(cuda_double::GetStats().d2d_copies > 0);
    CHECK(cuda_double::GetStats().bad_copies == 0);
  }
  auto st = cuda_double::GetStats();
  CHECK(st.live_device_allocs == 0);
  CHECK(st.live_pinned == 0);
  CHECK(st.live_streams == 0);
}

TEST_CASE(
    "a tensor that many smaller views begin inside still loads to the "
    "device") {
  // One storage holding "big" [80, 4] and 70 one-row views of it that
  // begin before the rows asked for: the holder of those rows is far
  // behind the nearest views (the first version looked 64 back only).
  cuda_double::Reset({});
  ckpt::test::TempDir tmp;
  const std::string file = tmp.File("views.ckpt");
  const std::vector<std::byte> bytes = ckpt::test::Pattern(80 * 4, 3);
  {
    auto w = Writer::Create(file, ckpt::test::Fast());
    REQUIRE(w.ok());
    auto sid = w->AddStorage(bytes);
    REQUIRE(sid.ok());
    TensorSpec spec;
    spec.dtype = DType::kUInt8;
    spec.shape = {80, 4};
    spec.storage = *sid;
    auto big = w->AddTensor(spec);
    REQUIRE(big.ok());
    REQUIRE(w->PutValue("big", *big).ok());
    for (int i = 0; i < 70; ++i) {
      spec.shape = {4};
      spec.storage_offset = 4 * i;
      auto v = w->AddTensor(spec);
      REQUIRE(v.ok());
      REQUIRE(w->PutValue("v" + std::to_string(i), *v).ok());
    }
    REQUIRE(w->Commit().ok());
  }
  auto ck = ShardedCheckpoint::OpenFile(file);
  REQUIRE(ck.ok());
  for (const Box& box : {Box{{72, 0}, {8, 4}}, Box{{72, 1}, {8, 2}}}) {
    INFO("columns from " << box.offsets[1]);
    const size_t n = static_cast<size_t>(box.numel());
    void* dev = nullptr;
    REQUIRE(cudaMalloc(&dev, n) == cudaSuccess);
    DeviceWant want{"big", box, dev};
    auto st = LoadBoxesToDevice(*ck, std::span(&want, 1), {});
    REQUIRE(st.ok());
    std::vector<std::byte> got(n), expect;
    REQUIRE(cuda_double::ReadDevice(dev, got.data(), n));
    for (int64_t r = box.offsets[0]; r < box.offsets[0] + box.sizes[0]; ++r) {
      for (int64_t c = box.offsets[1]; c < box.offsets[1] + box.sizes[1]; ++c) {
        expect.push_back(bytes[static_cast<size_t>(r * 4 + c)]);
      }
    }
    CHECK(got == expect);
    REQUIRE(cudaFree(dev) == cudaSuccess);
  }
  CHECK(cuda_double::GetStats().live_device_allocs == 0);
}
