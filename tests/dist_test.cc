// Sharded checkpoints in one process: the manifest's rules (each refused
// by name), the commit (CommitWritten plays N ranks), planning and reads
// against the reference contents, pins, leftovers and overwrite.
// tests/mpi/ runs the same protocol across real MPI ranks.
#include "ckpt/dist.h"

#include <sys/stat.h>

#include <barrier>
#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "bytes_internal.h"
#include "checksum_internal.h"
#include "ckpt_manifest_generated.h"
#include "dist/manifest_internal.h"
#include "dist_reference.h"
#include "test_util.h"

using namespace ckpt;
using namespace ckpt::dist;
using ckpt::test::ChunkBlock;
using ckpt::test::ReferenceBox;
namespace fs = std::filesystem;

namespace {

struct Dir {
  std::string path;
  Dir() : path(ckpt::test::TempDir().path()) {}
  ~Dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};
// (TempDir's directory is made and removed by its constructor and
// destructor; Dir keeps only a fresh unique name and removes the tree.)

struct Spec {
  std::string path;
  DType dtype;
  std::vector<int64_t> shape;
};

// One rank's chunks of `spec` split on dim 0 across `world` ranks.
Chunk RowChunk(const Spec& s, int rank, int world,
               std::vector<std::vector<std::byte>>* keep) {
  Box box{std::vector<int64_t>(s.shape.size(), 0), s.shape};
  if (!s.shape.empty()) {
    auto [b, n] = ChunkBlock(s.shape[0], rank, world);
    box.offsets[0] = b;
    box.sizes[0] = n;
  }
  keep->push_back(ReferenceBox(s.path, s.dtype, s.shape, box));
  Chunk c{s.path, s.dtype, s.shape, box, keep->back()};
  if (s.shape.empty()) {  // a 0-d tensor: every rank holds it, replicated
    c.replica_index = static_cast<uint32_t>(rank);
    c.replica_count = static_cast<uint32_t>(world);
  }
  return c;
}

// Writes rank `rank`'s shard of a save of `specs` row-split over `world`.
void WriteShard(const std::string& dir, const std::vector<Spec>& specs,
                int rank, int world, bool globals = true) {
  auto shard = ShardPath(dir, rank, world);
  REQUIRE(shard.ok());
  auto w = Writer::Create(*shard, ckpt::test::Fast());
  REQUIRE(w.ok());
  std::vector<std::vector<std::byte>> keep;
  keep.reserve(specs.size());
  std::vector<NodeId> nodes;
  for (const auto& s : specs) {
    auto n = AddChunk(*w, RowChunk(s, rank, world, &keep));
    REQUIRE(n.ok());
    if (*n) nodes.push_back(**n);
  }
  std::optional<NodeId> g;
  if (globals && rank == 0) {
    std::vector<NodeId> keys, values;
    for (const auto& s : specs) {
      keys.push_back(w->AddString(s.path));
      values.push_back(*AddGlobalTensor(*w));
    }
    keys.push_back(w->AddString("epoch"));
    values.push_back(w->AddInt(7));
    g = *w->AddDict(keys, values);
  }
  REQUIRE(SetShardRoot(*w, nodes, g, std::nullopt, rank, world).ok());
  REQUIRE(w->Commit().ok());
}

SaveOptions FastSave() {
  SaveOptions o;
  o.write.sync = false;
  return o;
}

const std::vector<Spec> kSpecs = {
    {"b", DType::kBool, {7}},        {"e", DType::kFloat32, {0, 3}},
    {"h", DType::kBFloat16, {6, 6}}, {"i", DType::kInt64, {4, 6}},
    {"s", DType::kFloat32, {}},      {"w", DType::kFloat32, {6, 5}},
};

void CheckBox(const ShardedCheckpoint& ck, const Spec& s, const Box& box,
              bool verify = false) {
  std::vector<std::byte> out(static_cast<size_t>(box.numel()) *
                             DTypeSize(s.dtype));
  Want w{s.path, box, out};
  auto plan = ck.Plan(std::span(&w, 1));
  REQUIRE(plan.ok());
  LoadOptions lo;
  lo.verify = verify;
  auto stats = ck.Execute(*plan, lo);
  INFO(s.path << " " << dist::internal::BoxString(box));
  REQUIRE(stats.ok());
  CHECK(stats->bytes_needed == out.size());
  CHECK(stats->bytes_read == out.size());  // exactly the runs, verify off
  CHECK(out == ReferenceBox(s.path, s.dtype, s.shape, box));
}

Box RandomBox(std::mt19937& rng, const std::vector<int64_t>& shape) {
  Box b;
  for (int64_t n : shape) {
    std::uniform_int_distribution<int64_t> d(0, n);
    int64_t x = d(rng), y = d(rng);
    b.offsets.push_back(std::min(x, y));
    b.sizes.push_back(std::max(x, y) - std::min(x, y));
  }
  return b;
}

}  // namespace

TEST_CASE(
    "ReplicaPart splits dim 0 into near-even blocks and gives 0-d whole to one "
    "replica") {
  Box box{{2, 0}, {7, 3}};
  std::vector<int64_t> seen;
  for (uint32_t i = 0; i < 3; ++i) {
    auto p = ReplicaPart("w", box, i, 3);
    REQUIRE(p);
    CHECK(p->sizes[1] == 3);
    for (int64_t r = 0; r < p->sizes[0]; ++r) seen.push_back(p->offsets[0] + r);
  }
  CHECK(seen == std::vector<int64_t>{2, 3, 4, 5, 6, 7, 8});
  CHECK(ReplicaPart("w", box, 0, 3)->sizes[0] == 3);  // 7 = 3 + 2 + 2
  // Fewer rows than replicas: the last ones write nothing.
  Box two{{0}, {2}};
  CHECK(ReplicaPart("x", two, 1, 4));
  CHECK_FALSE(ReplicaPart("x", two, 2, 4));
  // 0-d: exactly one replica.
  int writers = 0;
  for (uint32_t i = 0; i < 5; ++i)
    writers += ReplicaPart("s", Box{}, i, 5) ? 1 : 0;
  CHECK(writers == 1);
  // Empty box: replica 0 declares it, the others write nothing.
  Box empty{{0, 0}, {0, 3}};
  CHECK(ReplicaPart("e", empty, 0, 2));
  CHECK_FALSE(ReplicaPart("e", empty, 1, 2));
  CHECK_FALSE(ReplicaPart("e", box, 3, 3));  // index out of range
}

TEST_CASE(
    "a save by N ranks loads any box bit for bit, reading only the runs "
    "needed") {
  for (int world : {1, 2, 3, 4}) {
    Dir d;
    const std::string dir = d.path + "/step-1";
    for (int r = 0; r < world; ++r) WriteShard(dir, kSpecs, r, world);
    auto info = CommitWritten(dir, world, FastSave());
    INFO("world " << world << ": " << info.status().ToString());
    REQUIRE(info.ok());
    CHECK(info->files == static_cast<uint32_t>(world));
    CHECK(info->tensors == kSpecs.size());
    CHECK_FALSE(fs::exists(d.path + "/.step-1.tmp"));
    auto ck = ShardedCheckpoint::Open(dir);
    REQUIRE(ck.ok());
    CHECK(ck->manifest().world_size == static_cast<uint32_t>(world));
    // Empty tensors are in the manifest with no chunks.
    REQUIRE(ck->manifest().Find("e"));
    CHECK(ck->manifest().Find("e")->chunks.empty());
    std::mt19937 rng(static_cast<unsigned>(world));
    for (const auto& s : kSpecs) {
      CheckBox(*ck, s, Box{std::vector<int64_t>(s.shape.size(), 0), s.shape});
      for (int k = 0; k < 20; ++k) CheckBox(*ck, s, RandomBox(rng, s.shape));
      CheckBox(*ck, s, RandomBox(rng, s.shape), /*verify=*/true);
    }
    REQUIRE(ck->Verify().ok());
  }
}

TEST_CASE("Save on SelfComm with replicated chunks and Read's zero-copy view") {
  Dir d;
  const std::string dir = d.path + "/one";
  SelfComm comm;
  std::vector<std::vector<std::byte>> keep;
  std::vector<Chunk> chunks;
  for (const auto& s : kSpecs) chunks.push_back(RowChunk(s, 0, 1, &keep));
  auto info = Save(comm, dir, chunks, FastSave());
  REQUIRE(info.ok());
  auto ck = ShardedCheckpoint::Open(dir);
  REQUIRE(ck.ok());
  // Rows of a row-major chunk are one run: a view into the mapping.
  auto v = ck->Read("w", Box{{1, 0}, {3, 5}});
  REQUIRE(v.ok());
  CHECK(std::vector<std::byte>(v->data.begin(), v->data.end()) ==
        ReferenceBox("w", DType::kFloat32, {6, 5}, Box{{1, 0}, {3, 5}}));
  auto shard = ck->OpenShard(0);
  REQUIRE(shard.ok());
  const auto* base = static_cast<const std::byte*>(nullptr);
  (void)base;
  // A column is many runs: a copy.
  auto col = ck->Read("w", Box{{0, 2}, {6, 1}});
  REQUIRE(col.ok());
  CHECK(std::vector<std::byte>(col->data.begin(), col->data.end()) ==
        ReferenceBox("w", DType::kFloat32, {6, 5}, Box{{0, 2}, {6, 1}}));
  // An existing directory is refused without overwrite, replaced with it.
  auto again = Save(comm, dir, chunks, FastSave());
  REQUIRE_FALSE(again.ok());
  CHECK_THAT(again.status().message(), Catch::Contains("exists"));
  SaveOptions over = FastSave();
  over.overwrite = true;
  REQUIRE(Save(comm, dir, chunks, over).ok());
  CHECK_FALSE(fs::exists(d.path + "/.one.tmp"));
  REQUIRE(ShardedCheckpoint::Open(dir).ok());
  // An empty directory made ahead is replaced, with or without overwrite;
  // a directory holding anything that is not a checkpoint never is.
  const std::string made = d.path + "/made-ahead";
  fs::create_directories(made);
  REQUIRE(Save(comm, made, chunks, FastSave()).ok());
  REQUIRE(ShardedCheckpoint::Open(made).ok());
  const std::string foreign = d.path + "/foreign";
  fs::create_directories(foreign);
  std::ofstream(foreign + "/notes.txt") << "mine";
  for (bool overwrite : {false, true}) {
    SaveOptions o = FastSave();
    o.overwrite = overwrite;
    auto r = Save(comm, foreign, chunks, o);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(),
               Catch::Contains(overwrite ? "not a sharded" : "exists"));
    CHECK(fs::exists(foreign + "/notes.txt"));
  }
}

TEST_CASE(
    "a commit refuses chunks that do not tile their tensor, naming them") {
  Dir d;
  const std::string dir = d.path + "/bad";
  const Spec w{"w", DType::kFloat32, {6, 5}};
  auto write = [&](int rank, int world, Box box, DType dtype = DType::kFloat32,
                   std::vector<int64_t> shape = {6, 5}) {
    auto shard = ShardPath(dir, rank, world);
    REQUIRE(shard.ok());
    auto wr = Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(wr.ok());
    auto bytes = ReferenceBox("w", dtype, shape, box);
    auto n = AddChunk(*wr, Chunk{"w", dtype, shape, box, bytes});
    REQUIRE(n.ok());
    std::vector<NodeId> nodes;
    if (*n) nodes.push_back(**n);
    REQUIRE(
        SetShardRoot(*wr, nodes, std::nullopt, std::nullopt, rank, world).ok());
    REQUIRE(wr->Commit().ok());
  };
  SECTION("overlap") {
    write(0, 2, Box{{0, 0}, {4, 5}});
    write(1, 2, Box{{3, 0}, {3, 5}});
    auto r = CommitWritten(dir, 2, FastSave());
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == ErrorCode::kInvalidArgument);
    CHECK_THAT(r.status().message(), Catch::Contains("chunks overlap"));
    CHECK_THAT(r.status().message(), Catch::Contains("rank 1"));
  }
  SECTION("hole") {
    write(0, 2, Box{{0, 0}, {2, 5}});
    write(1, 2, Box{{3, 0}, {3, 5}});
    auto r = CommitWritten(dir, 2, FastSave());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Catch::Contains("a hole"));
  }
  SECTION("dtype disagreement") {
    write(0, 2, Box{{0, 0}, {3, 5}});
    write(1, 2, Box{{3, 0}, {3, 5}}, DType::kInt32);
    auto r = CommitWritten(dir, 2, FastSave());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(),
               Catch::Contains("rank 0 saves it as float32 [6, 5]"));
    CHECK_THAT(r.status().message(), Catch::Contains("rank 1 as int32 [6, 5]"));
  }
  SECTION("shape disagreement") {
    write(0, 2, Box{{0, 0}, {3, 5}});
    write(1, 2, Box{{3, 0}, {4, 5}}, DType::kFloat32, {7, 5});
    auto r = CommitWritten(dir, 2, FastSave());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Catch::Contains("[7, 5]"));
  }
  SECTION("a rank that wrote nothing") {
    write(0, 3, Box{{0, 0}, {6, 5}});
    write(2, 3, Box{{0, 0}, {0, 5}});
    auto r = CommitWritten(dir, 3, FastSave());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Catch::StartsWith("rank 1 of 3 failed"));
  }
  // Nothing became visible, and the temporary directory is gone.
  CHECK_FALSE(fs::exists(dir));
  CHECK_FALSE(fs::exists(d.path + "/.bad.tmp"));
}

TEST_CASE(
    "the commit merges ranks holding different tensors, added in any order, "
    "into one manifest whatever the report's source") {
  // Pipeline-like: no two ranks hold the same set of tensors, each adds
  // its chunks out of path order, and rank order is not box order ("d":
  // rank 2 holds its first rows). The merge is then the k-way one (not in
  // step); records and read-back must give the very same manifest.
  const std::vector<Spec> all = {{"z", DType::kFloat32, {3, 2}},
                                 {"a", DType::kInt64, {2}},
                                 {"d", DType::kBFloat16, {4, 3}},
                                 {"m/x", DType::kBool, {5}},
                                 {"b", DType::kFloat32, {}}};
  auto whole = [](const Spec& s) {
    return Box{std::vector<int64_t>(s.shape.size(), 0), s.shape};
  };
  // rank -> (spec index, box)
  const std::vector<std::vector<std::pair<size_t, Box>>> held = {
      {{0, whole(all[0])}, {1, whole(all[1])}},
      {{3, whole(all[3])}, {2, Box{{2, 0}, {2, 3}}}, {4, whole(all[4])}},
      {{2, Box{{0, 0}, {2, 3}}}}};
  const int world = 3;
  Dir d;
  auto save = [&](const std::string& dir, bool with_records) {
    std::vector<ShardRecord> records(world);
    for (int r = 0; r < world; ++r) {
      auto shard = ShardPath(dir, r, world);
      REQUIRE(shard.ok());
      auto w = Writer::Create(*shard, ckpt::test::Fast());
      REQUIRE(w.ok());
      std::vector<std::vector<std::byte>> keep;
      keep.reserve(4);
      std::vector<NodeId> nodes;
      for (const auto& [i, box] : held[static_cast<size_t>(r)]) {
        const Spec& s = all[i];
        keep.push_back(ReferenceBox(s.path, s.dtype, s.shape, box));
        auto n =
            AddChunk(*w, Chunk{s.path, s.dtype, s.shape, box, keep.back()},
                     with_records ? &records[static_cast<size_t>(r)] : nullptr);
        REQUIRE(n.ok());
        nodes.push_back(**n);
      }
      ShardRecord* rec =
          with_records ? &records[static_cast<size_t>(r)] : nullptr;
      REQUIRE(SetShardRoot(*w, nodes, std::nullopt, std::nullopt, r, world, rec)
                  .ok());
      REQUIRE(w->Commit().ok());
      if (rec) REQUIRE(rec->Seal(*w).ok());
    }
    auto info = with_records ? CommitWritten(dir, world, FastSave(), records)
                             : CommitWritten(dir, world, FastSave());
    REQUIRE(info.ok());
    CHECK(info->tensors == all.size());
    CHECK(info->chunks == 6);
  };
  save(d.path + "/records", true);
  save(d.path + "/readback", false);
  CHECK(ckpt::test::ReadAll(d.path + "/records/MANIFEST.ckptm") ==
        ckpt::test::ReadAll(d.path + "/readback/MANIFEST.ckptm"));
  auto m = ReadManifest(d.path + "/records");
  REQUIRE(m.ok());
  std::vector<std::string> paths;
  for (const auto& t : m->tensors) paths.push_back(t.path);
  CHECK(paths == std::vector<std::string>{"a", "b", "d", "m/x", "z"});
  const GlobalTensorInfo* dt = m->Find("d");
  REQUIRE(dt);
  REQUIRE(dt->chunks.size() == 2);
  CHECK(dt->chunks[0].box == Box{{0, 0}, {2, 3}});  // box order
  CHECK(dt->chunks[0].file == 2);
  CHECK(dt->chunks[1].file == 1);
  CHECK(m->Find("b")->chunks.at(0).file == 1);
  auto ck = ShardedCheckpoint::Open(d.path + "/records");
  REQUIRE(ck.ok());
  for (const Spec& s : all) CheckBox(*ck, s, whole(s), /*verify=*/true);
  CheckBox(*ck, all[2], Box{{1, 1}, {2, 2}});  // across both chunks of "d"
}

TEST_CASE("a report whose columns do not add up is refused, naming the rank") {
  namespace fbm = ckpt::fbm;
  // A rank's report carried as a record (ckpt.dcp's path): built here
  // with columns that lie, each refused by Deserialize as kCorrupt.
  struct Case {
    const char* what;
    std::vector<uint8_t> path_bytes;
    std::vector<uint32_t> path_ends, dim_ends, chunk_ends;
    std::vector<uint8_t> dtypes;
    std::vector<int64_t> dims, offsets, sizes;
    size_t chunks;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"path past the bytes",
       {'a'},
       {2},
       {1},
       {1},
       {1},
       {4},
       {0},
       {4},
       1,
       "do not add up"},
      {"fewer dtypes",
       {'a'},
       {1},
       {1},
       {1},
       {},
       {4},
       {0},
       {4},
       1,
       "different lengths"},
      {"ends that decrease",
       {'a', 'b'},
       {1, 0},
       {1, 2},
       {1, 1},
       {1, 1},
       {4, 4},
       {0},
       {4},
       1,
       "do not add up"},
      {"chunk past the data",
       {'a'},
       {1},
       {1},
       {2},
       {1},
       {4},
       {0},
       {4},
       1,
       "do not add up"},
      {"too few coordinates",
       {'a'},
       {1},
       {2},
       {1},
       {1},
       {4, 4},
       {0},
       {4},
       1,
       "fewer box coordinates"},
      {"too many coordinates",
       {'a'},
       {1},
       {1},
       {1},
       {1},
       {4},
       {0, 0},
       {4, 4},
       1,
       "more box coordinates"},
      {"offsets and sizes differ",
       {'a'},
       {1},
       {1},
       {1},
       {1},
       {4},
       {0},
       {4, 4},
       1,
       "offsets but"},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    flatbuffers::FlatBufferBuilder b;
    std::vector<fbm::ByteRange> runs(c.chunks, fbm::ByteRange(0, 0, 16));
    auto cols = fbm::CreateTensorColumns(
        b, b.CreateVector(c.path_bytes), b.CreateVector(c.path_ends),
        b.CreateVector(c.dtypes), b.CreateVector(c.dim_ends),
        b.CreateVector(c.dims), b.CreateVector(c.chunk_ends),
        b.CreateVector(c.offsets), b.CreateVector(c.sizes),
        b.CreateVectorOfStructs(runs));
    fbm::RankReportBuilder rb(b);
    rb.add_rank(1);
    rb.add_world_size(2);
    rb.add_columns(cols);
    b.Finish(rb.Finish());
    std::span<const std::byte> bytes(
        reinterpret_cast<const std::byte*>(b.GetBufferPointer()), b.GetSize());
    auto r = ShardRecord::Deserialize(bytes, 1);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == ErrorCode::kCorrupt);
    CHECK_THAT(r.status().message(), Catch::Contains("rank 1's commit report"));
    CHECK_THAT(r.status().message(), Catch::Contains(c.says));
  }
  // An empty columns table is a report of no tensors (not a crash); a
  // report that says OK and has no columns at all is refused.
  for (bool with_columns : {true, false}) {
    INFO("columns " << with_columns);
    flatbuffers::FlatBufferBuilder b;
    auto cols = fbm::TensorColumnsBuilder(b).Finish();
    fbm::RankReportBuilder rb(b);
    rb.add_rank(1);
    rb.add_world_size(2);
    if (with_columns) rb.add_columns(cols);
    b.Finish(rb.Finish());
    auto r = ShardRecord::Deserialize(
        {reinterpret_cast<const std::byte*>(b.GetBufferPointer()), b.GetSize()},
        1);
    if (with_columns) {
      CHECK(r.ok());
    } else {
      REQUIRE_FALSE(r.ok());
      CHECK_THAT(r.status().message(), Catch::Contains("no tensor columns"));
    }
  }
  {
    // Path bytes with no ends at all.
    flatbuffers::FlatBufferBuilder b;
    const std::vector<uint8_t> p = {'a'};
    auto pb = b.CreateVector(p);
    fbm::TensorColumnsBuilder cb(b);
    cb.add_path_bytes(pb);
    auto cols = cb.Finish();
    fbm::RankReportBuilder rb(b);
    rb.add_rank(1);
    rb.add_columns(cols);
    b.Finish(rb.Finish());
    auto r = ShardRecord::Deserialize(
        {reinterpret_cast<const std::byte*>(b.GetBufferPointer()), b.GetSize()},
        1);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().message(), Catch::Contains("do not add up"));
  }
  // A report of another rank than the one it is taken for.
  flatbuffers::FlatBufferBuilder b;
  fbm::RankReportBuilder rb(b);
  rb.add_rank(0);
  b.Finish(rb.Finish());
  auto r = ShardRecord::Deserialize(
      {reinterpret_cast<const std::byte*>(b.GetBufferPointer()), b.GetSize()},
      1);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Catch::Contains("says rank 0"));
}

TEST_CASE("a record is sealed once: a second Seal is refused, the first kept") {
  Dir d;
  std::vector<std::vector<std::byte>> keep;
  auto shard = ShardPath(d.path + "/step", 0, 1);
  REQUIRE(shard.ok());
  auto w = Writer::Create(*shard, ckpt::test::Fast());
  REQUIRE(w.ok());
  ShardRecord record;
  auto n = AddChunk(*w, RowChunk(kSpecs[5], 0, 1, &keep), &record);
  REQUIRE(n.ok());
  REQUIRE(SetShardRoot(*w, std::vector<NodeId>{**n}, std::nullopt, std::nullopt,
                       0, 1, &record)
              .ok());
  REQUIRE(w->Commit().ok());
  REQUIRE(record.Seal(*w).ok());
  auto again = record.Seal(*w);
  REQUIRE_FALSE(again.ok());
  CHECK_THAT(again.message(), Catch::Contains("already sealed"));
  auto info = CommitWritten(d.path + "/step", 1, FastSave(),
                            std::span<const ShardRecord>(&record, 1));
  REQUIRE(info.ok());
  CHECK(info->chunks == 1);  // (an emptied record would commit none)
}

TEST_CASE("a record's report round-trips and commits like the shard it pins") {
  // Serialize -> Deserialize (ckpt.dcp carries records so) must lose
  // nothing: the commit from carried records writes the manifest that
  // the writers' own records give.
  Dir d;
  const int world = 2;
  auto save = [&](const std::string& dir, bool carried) {
    std::vector<ShardRecord> records(world);
    std::vector<std::vector<std::byte>> keep;
    keep.reserve(kSpecs.size() * world);
    for (int r = 0; r < world; ++r) {
      auto shard = ShardPath(dir, r, world);
      REQUIRE(shard.ok());
      auto w = Writer::Create(*shard, ckpt::test::Fast());
      REQUIRE(w.ok());
      std::vector<NodeId> nodes;
      for (const auto& s : kSpecs) {
        auto n = AddChunk(*w, RowChunk(s, r, world, &keep),
                          &records[static_cast<size_t>(r)]);
        REQUIRE(n.ok());
        if (*n) nodes.push_back(**n);
      }
      REQUIRE(SetShardRoot(*w, nodes, std::nullopt, std::nullopt, r, world,
                           &records[static_cast<size_t>(r)])
                  .ok());
      REQUIRE(w->Commit().ok());
      REQUIRE(records[static_cast<size_t>(r)].Seal(*w).ok());
    }
    if (carried) {
      for (int r = 0; r < world; ++r) {
        auto bytes = records[static_cast<size_t>(r)].Serialize();
        REQUIRE(bytes.ok());
        auto back = ShardRecord::Deserialize(*bytes, r);
        REQUIRE(back.ok());
        records[static_cast<size_t>(r)] = std::move(*back);
      }
    }
    REQUIRE(CommitWritten(dir, world, FastSave(), records).ok());
  };
  save(d.path + "/own", false);
  save(d.path + "/carried", true);
  CHECK(ckpt::test::ReadAll(d.path + "/own/MANIFEST.ckptm") ==
        ckpt::test::ReadAll(d.path + "/carried/MANIFEST.ckptm"));
  auto ck = ShardedCheckpoint::Open(d.path + "/carried");
  REQUIRE(ck.ok());
  for (const Spec& s : kSpecs) {
    CheckBox(*ck, s, Box{std::vector<int64_t>(s.shape.size(), 0), s.shape});
  }
}

TEST_CASE(
    "a shard read back whose chunk offsets disagree with its shape is "
    "refused") {
  // A shard file written by another program (no record): the commit reads
  // its chunk dicts back and must not take 1 or 3 offsets for a 2-d box.
  for (const std::vector<int64_t>& offsets :
       {std::vector<int64_t>{0}, std::vector<int64_t>{0, 0, 0}}) {
    INFO(offsets.size() << " offsets");
    Dir d;
    const std::string dir = d.path + "/step";
    auto shard = ShardPath(dir, 0, 1);
    REQUIRE(shard.ok());
    auto w = Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(w.ok());
    const std::vector<std::byte> bytes(2 * 3 * 4, std::byte{1});
    auto sid = w->AddStorage(bytes);
    REQUIRE(sid.ok());
    TensorSpec spec;
    spec.dtype = DType::kFloat32;
    spec.shape = {2, 3};
    spec.storage = *sid;
    auto data = w->AddTensor(spec);
    REQUIRE(data.ok());
    auto ints = [&](const std::vector<int64_t>& v) {
      std::vector<NodeId> items;
      for (int64_t x : v) items.push_back(w->AddInt(x));
      return *w->AddTuple(items);
    };
    const NodeId keys[] = {w->AddString("path"), w->AddString("shape"),
                           w->AddString("offsets"), w->AddString("data")};
    const NodeId values[] = {w->AddString("w"), ints({2, 3}), ints(offsets),
                             *data};
    auto chunk = w->AddDict(keys, values);
    REQUIRE(chunk.ok());
    REQUIRE(SetShardRoot(*w, std::vector<NodeId>{*chunk}, std::nullopt,
                         std::nullopt, 0, 1)
                .ok());
    REQUIRE(w->Commit().ok());
    auto r = CommitWritten(dir, 1, FastSave());
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(
        r.status().message(),
        Catch::Contains("chunk 0 of 'w' has " + std::to_string(offsets.size()) +
                        " offsets for a tensor of 2 dims"));
    CHECK_FALSE(fs::exists(dir));
  }
}

TEST_CASE("a commit sweeps leftovers of a crashed attempt") {
  Dir d;
  const std::string dir = d.path + "/step-2";
  // A crashed save on 3 ranks left shards and a writer's temporary.
  for (int r = 0; r < 3; ++r) WriteShard(dir, kSpecs, r, 3);
  ckpt::test::WriteAll(
      d.path + "/.step-2.tmp/.shard-00000-of-00002.ckpt.tmp-abc", {});
  // The retry runs on 2.
  for (int r = 0; r < 2; ++r) WriteShard(dir, kSpecs, r, 2);
  auto info = CommitWritten(dir, 2, FastSave());
  REQUIRE(info.ok());
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir))
    names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"MANIFEST.ckptm",
                                          "shard-00000-of-00002.ckpt",
                                          "shard-00001-of-00002.ckpt"});
}

TEST_CASE(
    "a flipped byte fails a load that reads it, names it, and spares a "
    "disjoint one") {
  Dir d;
  const std::string dir = d.path + "/flip";
  for (int r = 0; r < 2; ++r) WriteShard(dir, kSpecs, r, 2);
  REQUIRE(CommitWritten(dir, 2, FastSave()).ok());
  // Flip a byte of rank 1's chunk of "w" (rows 3..5).
  auto m = ReadManifest(dir);
  REQUIRE(m.ok());
  const ChunkInfo* c = nullptr;
  for (const auto& ch : m->Find("w")->chunks) {
    if (ch.file == 1) c = &ch;
  }
  REQUIRE(c);
  const std::string shard = dir + "/" + m->files[1].name;
  auto bytes = ckpt::test::ReadAll(shard);
  bytes[c->offset + 3] ^= std::byte{0x10};
  ckpt::test::WriteAll(shard, bytes);
  auto ck = ShardedCheckpoint::Open(dir);
  REQUIRE(ck.ok());
  const Spec w{"w", DType::kFloat32, {6, 5}};
  std::vector<std::byte> out(4 * 5 * 4);
  Want want{"w", Box{{2, 0}, {4, 5}}, out};
  auto plan = ck->Plan(std::span(&want, 1));
  REQUIRE(plan.ok());
  auto r = ck->Execute(*plan);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == ErrorCode::kChecksumMismatch);
  CHECK(r.status().file() == shard);
  CHECK(r.status().tensor() == "w");
  CHECK_THAT(r.status().message(), Catch::Contains("[2:6, 0:5]"));
  CheckBox(*ck, w, Box{{0, 0}, {3, 5}}, /*verify=*/true);  // rank 0's rows
  CHECK_FALSE(ck->Verify().ok());
}

TEST_CASE(
    "a shard replaced by another save's, or missing, is refused by its pin") {
  Dir d;
  for (const char* name : {"a", "b"}) {
    std::vector<Spec> specs = {
        {"w", DType::kFloat32, {name[0] == 'a' ? 6 : 8, 5}}};
    for (int r = 0; r < 2; ++r) WriteShard(d.path + "/" + name, specs, r, 2);
    REQUIRE(CommitWritten(d.path + "/" + name, 2, FastSave()).ok());
  }
  fs::copy_file(d.path + "/b/shard-00001-of-00002.ckpt",
                d.path + "/a/shard-00001-of-00002.ckpt",
                fs::copy_options::overwrite_existing);
  auto ck = ShardedCheckpoint::Open(d.path + "/a");
  REQUIRE(ck.ok());
  auto r = ck->Read("w", Box{{5, 0}, {1, 5}});
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(),
             Catch::Contains("not the one the manifest pins"));
  CHECK(ck->Read("w", Box{{0, 0}, {2, 5}}).ok());  // rank 0's file is fine
  fs::remove(d.path + "/a/shard-00001-of-00002.ckpt");
  auto ck2 = ShardedCheckpoint::Open(d.path + "/a");
  REQUIRE(ck2.ok());
  auto r2 = ck2->Read("w", Box{{5, 0}, {1, 5}});
  REQUIRE_FALSE(r2.ok());
  CHECK(r2.status().code() == ErrorCode::kNotFound);
  CHECK_THAT(r2.status().file(), Catch::Contains("shard-00001-of-00002.ckpt"));
}

TEST_CASE("Open of what is not a committed sharded checkpoint says so") {
  Dir d;
  fs::create_directories(d.path + "/plain");
  auto r = ShardedCheckpoint::Open(d.path + "/plain");
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == ErrorCode::kNotFound);
  CHECK_THAT(r.status().message(), Catch::Contains("never committed"));
  CHECK(ShardedCheckpoint::Open(d.path + "/missing").status().code() ==
        ErrorCode::kNotFound);
  CHECK_FALSE(IsShardedCheckpoint(d.path + "/plain"));
}

// ---- the manifest's rules, one hostile manifest each ----------------------

namespace {

Manifest GoodManifest() {
  Manifest m;
  m.world_size = 2;
  m.files = {{"shard-00000-of-00002.ckpt", 10000, 1, 0},
             {"shard-00001-of-00002.ckpt", 10000, 2, 1}};
  GlobalTensorInfo t;
  t.path = "w";
  t.dtype = DType::kFloat32;
  t.shape = {4, 3};
  t.chunks = {{Box{{0, 0}, {2, 3}}, 0, 4096, 24},
              {Box{{2, 0}, {2, 3}}, 1, 4096, 24}};
  m.tensors.push_back(t);
  GlobalTensorInfo s;
  s.path = "x";
  s.dtype = DType::kInt64;
  s.chunks = {{Box{}, 0, 8192, 8}};
  m.tensors.push_back(s);
  m.metadata = {{"step", "1"}};
  return m;
}

std::string Refusal(const Manifest& m) {
  auto bytes = dist::internal::SerializeManifest(m);
  auto r = dist::internal::DecodeManifest(bytes, "M");
  return r.ok() ? std::string("accepted") : r.status().ToString();
}

}  // namespace

TEST_CASE("a caller's manifest with a box of another rank is refused by name") {
  // CheckManifest of a Manifest (EncodeManifest, DCP's index) sees boxes
  // before they are put in columns: a 1-d box of a 0-d tensor must not
  // pass as the 0-d chunk it would become there.
  Manifest m = GoodManifest();
  GlobalTensorInfo s;
  s.path = "z";
  s.dtype = DType::kFloat32;
  s.chunks.push_back({Box{{0}, {1}}, 0, 9000, 4});
  m.tensors.push_back(s);
  auto r = dist::internal::EncodeManifest(m);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(),
             Catch::Contains("chunk 0: a box of 1 offsets and 1 sizes in a "
                             "tensor of 0 dims"));
  CHECK_THAT(r.status().message(), Catch::Contains("'z'"));
}

TEST_CASE("the good manifest round-trips") {
  Manifest m = GoodManifest();
  auto bytes = dist::internal::EncodeManifest(m);
  REQUIRE(bytes.ok());
  auto back = dist::internal::DecodeManifest(*bytes, "M");
  REQUIRE(back.ok());
  CHECK(back->tensors.size() == 2);
  CHECK(back->tensors[0].chunks[1].box == Box{{2, 0}, {2, 3}});
  CHECK(back->files[1].header_xxh3 == 2);
  CHECK(back->metadata == m.metadata);
}

TEST_CASE("every manifest rule is enforced by name") {
  struct Case {
    const char* what;
    std::function<void(Manifest&)> mutate;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"world 0",
       [](Manifest& m) {
         m.world_size = 0;
         m.files.clear();
       },
       "world size is 0"},
      {"files != world", [](Manifest& m) { m.world_size = 3; },
       "but 2 shard files"},
      {"path in name", [](Manifest& m) { m.files[1].name = "../x"; },
       "not a plain file name"},
      {"dot name", [](Manifest& m) { m.files[1].name = ".."; },
       "not a plain file name"},
      {"manifest name", [](Manifest& m) { m.files[1].name = "MANIFEST.ckptm"; },
       "named like the manifest"},
      {"same name", [](Manifest& m) { m.files[1].name = m.files[0].name; },
       "two shard files are named"},
      {"rank order", [](Manifest& m) { m.files[1].rank = 0; }, "rank order"},
      {"globals file", [](Manifest& m) { m.globals_file = 2; },
       "globals file 2 of 2"},
      {"unsorted", [](Manifest& m) { std::swap(m.tensors[0], m.tensors[1]); },
       "not sorted"},
      {"repeated", [](Manifest& m) { m.tensors[1].path = "w"; }, "not sorted"},
      {"dtype",
       [](Manifest& m) { m.tensors[0].dtype = static_cast<DType>(200); },
       "unknown dtype code 200"},
      {"negative dim",
       [](Manifest& m) {
         m.tensors[0].shape = {-4, 3};
       },
       "shape"},
      {"box outside",
       [](Manifest& m) { m.tensors[0].chunks[1].box.offsets[0] = 3; },
       "chunk 1"},
      {"empty chunk",
       [](Manifest& m) { m.tensors[0].chunks[1].box.sizes[0] = 0; },
       "is empty"},
      {"length", [](Manifest& m) { m.tensors[0].chunks[1].length = 25; },
       "has 25 bytes"},
      {"file index", [](Manifest& m) { m.tensors[0].chunks[1].file = 7; },
       "names file 7"},
      {"past file", [](Manifest& m) { m.tensors[0].chunks[1].offset = 9990; },
       "run past the file"},
      {"overlap",
       [](Manifest& m) {
         m.tensors[0].chunks[1].box = Box{{1, 0}, {2, 3}};
       },
       "chunks overlap"},
      {"hole", [](Manifest& m) { m.tensors[0].chunks.pop_back(); }, "a hole"},
      {"box rank",  // M10: a 1-d box among a 2-d tensor's chunks
       [](Manifest& m) {
         m.tensors[0].chunks[1].box = Box{{2}, {2}};
       },
       "chunks of a 2-d tensor but 3 offsets and 3 sizes"},
      {"bytes shared",
       [](Manifest& m) { m.tensors[1].chunks[0].offset = 4100; },
       "bytes of two chunks overlap"},
      {"metadata order",
       [](Manifest& m) {
         m.metadata = {{"b", "1"}, {"a", "2"}};
       },
       "metadata keys are not sorted"},
      {"metadata utf8",
       [](Manifest& m) {
         m.metadata = {{"a", "\xff"}};
       },
       "not valid UTF-8"},
      {"path utf8", [](Manifest& m) { m.tensors[0].path = "\xc3"; },
       "not valid UTF-8"},
  };
  for (const auto& c : cases) {
    Manifest m = GoodManifest();
    c.mutate(m);
    INFO(c.what);
    std::string r = Refusal(m);
    CHECK_THAT(r, Catch::Contains(c.says));
    CHECK_THAT(r, Catch::Contains("corrupt"));
  }
}

TEST_CASE(
    "manifest bytes: truncations, flips, versions and Verifier failures are "
    "refused") {
  auto good = *dist::internal::EncodeManifest(GoodManifest());
  // Every truncation.
  for (size_t n = 0; n < good.size(); ++n) {
    auto r = dist::internal::DecodeManifest(std::span(good).first(n), "M");
    REQUIRE_FALSE(r.ok());
  }
  // Every single-bit flip of every byte.
  for (size_t i = 0; i < good.size(); ++i) {
    auto bad = good;
    bad[i] ^= std::byte{0x04};
    auto r = dist::internal::DecodeManifest(bad, "M");
    INFO("byte " << i);
    REQUIRE_FALSE(r.ok());
  }
  // A newer major version is unsupported (with a valid checksum).
  {
    auto bad = good;
    bad[8] = std::byte{2};
    ckpt::internal::StoreLE(bad.data() + 40,
                            ckpt::internal::Xxh3({bad.data(), 40}), 8);
    auto r = dist::internal::DecodeManifest(bad, "M");
    CHECK(r.status().code() == ErrorCode::kUnsupportedVersion);
    CHECK_THAT(r.status().message(), Catch::Contains("manifest version 2.0"));
  }
  // Sealed garbage reaches the Verifier.
  std::vector<std::byte> junk(64, std::byte{0x41});
  auto r =
      dist::internal::DecodeManifest(dist::internal::SealManifest(junk), "M");
  CHECK_THAT(r.status().message(), Catch::Contains("FlatBuffers verification"));
  // A ckpt file is not a manifest.
  CHECK_THAT(dist::internal::DecodeManifest(std::span(good).subspan(1), "M")
                 .status()
                 .message(),
             Catch::Contains("bad magic"));
}

// ---- DCP directories (written by PyPI's torch: tests/dcp/make_dcp.py) -----

namespace {

// The box `b` of a dense row-major tensor `full` of `shape`.
std::vector<std::byte> Slice(const std::vector<std::byte>& full,
                             const std::vector<int64_t>& shape, const Box& b,
                             size_t elem) {
  std::vector<std::byte> out(static_cast<size_t>(b.numel()) * elem);
  Box whole{std::vector<int64_t>(shape.size(), 0), shape};
  auto p = CopyRuns(whole, b, elem);
  REQUIRE(p.ok());
  if (*p) {
    ForEachRun(**p, [&](uint64_t s, uint64_t d, uint64_t n) {
      std::memcpy(out.data() + d, full.data() + s, n);
    });
  }
  return out;
}

}  // namespace

TEST_CASE(
    "DCP directories load through ShardedCheckpoint by byte ranges, bit for "
    "bit") {
  const char* root = std::getenv("CKPT_DCP_FIXTURES");
  if (!root || !fs::exists(root)) {
    WARN(
        "CKPT_DCP_FIXTURES not set (scripts/test.sh makes them with PyPI "
        "torch): skipped");
    return;
  }
  int dirs = 0;
  for (const char* name :
       {"single", "single_st", "ranks2", "ranks2_st", "ranks4", "per_item",
        "proto2", "proto5", "enum_by_value"}) {
    const std::string dir = std::string(root) + "/" + name;
    if (!fs::exists(dir + "/ref.txt")) continue;
    INFO(dir);
    ++dirs;
    CHECK_FALSE(IsShardedCheckpoint(dir));
    auto ck = ShardedCheckpoint::Open(dir);
    REQUIRE(ck.ok());
    SelfComm comm;
    REQUIRE(ShardedCheckpoint::Open(comm, dir).ok());
    std::ifstream ref(dir + "/ref.txt");
    std::string line;
    std::mt19937 rng(3);
    int tensors = 0;
    while (std::getline(ref, line)) {
      std::vector<std::string> f;
      std::stringstream ss(line);
      for (std::string x; std::getline(ss, x, '\t');) f.push_back(x);
      REQUIRE(f.size() == 5);
      const GlobalTensorInfo* t = ck->manifest().Find(f[1]);
      INFO(f[1]);
      REQUIRE(t);
      CHECK(DTypeName(t->dtype) == f[2]);
      const auto full = ckpt::test::ReadAll(dir + "/" + f[4]);
      REQUIRE(full.size() == t->nbytes());
      const size_t elem = DTypeSize(t->dtype);
      for (int k = 0; k < 6; ++k) {
        Box b = k == 0 ? Box{std::vector<int64_t>(t->shape.size(), 0), t->shape}
                       : RandomBox(rng, t->shape);
        std::vector<std::byte> out(static_cast<size_t>(b.numel()) * elem);
        Want w{t->path, b, out};
        auto plan = ck->Plan(std::span(&w, 1));
        REQUIRE(plan.ok());
        auto st = ck->Execute(*plan);
        REQUIRE(st.ok());
        CHECK(st->bytes_read == st->bytes_needed);
        CHECK(out == Slice(full, t->shape, b, elem));
      }
      ++tensors;
    }
    CHECK(tensors > 0);
    CHECK(ck->Verify().ok());
    auto shard = ck->OpenShard(0);
    CHECK(shard.status().code() == ErrorCode::kInvalidArgument);
  }
  CHECK(dirs >= 5);
}

TEST_CASE(
    "a hostile DCP .metadata is refused by the sharded reader, naming the "
    "global") {
  const char* root = std::getenv("CKPT_DCP_FIXTURES");
  if (!root || !fs::exists(std::string(root) + "/hostile")) {
    WARN("CKPT_DCP_FIXTURES not set: skipped");
    return;
  }
  Dir d;
  const std::string dir = d.path + "/evil";
  fs::create_directories(dir);
  fs::copy_file(std::string(root) + "/hostile/os_system.metadata",
                dir + "/.metadata");
  auto r = ShardedCheckpoint::Open(dir);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Catch::Contains("system"));
  CHECK_THAT(r.status().message(), Catch::Contains("not on the allowlist"));
}

namespace {

// N ranks as threads of one process, for the protocol cases that
// CommitWritten (one process playing every rank) cannot play: ranks that
// disagree. Gather and Broadcast meet at a barrier, as a real group would.
struct ThreadHub {
  explicit ThreadHub(int n) : sync(n), slots(static_cast<size_t>(n)) {}
  std::barrier<> sync;
  std::vector<std::vector<std::byte>> slots;
};

class ThreadComm final : public Comm {
 public:
  ThreadComm(ThreadHub* hub, int rank) : hub_(hub), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(hub_->slots.size()); }
  Result<std::vector<std::vector<std::byte>>> Gather(
      int root, std::span<const std::byte> mine) override {
    hub_->slots[static_cast<size_t>(rank_)].assign(mine.begin(), mine.end());
    hub_->sync.arrive_and_wait();
    std::vector<std::vector<std::byte>> all;
    if (rank_ == root) all = hub_->slots;
    hub_->sync.arrive_and_wait();
    return all;
  }
  Result<std::vector<std::byte>> Broadcast(
      int root, std::span<const std::byte> bytes) override {
    if (rank_ == root) hub_->slots[0].assign(bytes.begin(), bytes.end());
    hub_->sync.arrive_and_wait();
    std::vector<std::byte> got = hub_->slots[0];
    hub_->sync.arrive_and_wait();
    return got;
  }

 private:
  ThreadHub* hub_;
  int rank_;
};

// Save of kSpecs row-sharded on `world` threads, rank r to dirs[r].
std::vector<Result<CommitInfo>> ThreadSave(
    const std::vector<std::string>& dirs) {
  const int world = static_cast<int>(dirs.size());
  ThreadHub hub(world);
  std::vector<Result<CommitInfo>> out(dirs.size(), IoError("not run"));
  std::vector<std::thread> ranks;
  for (int r = 0; r < world; ++r) {
    ranks.emplace_back([&, r] {
      ThreadComm comm(&hub, r);
      std::vector<std::vector<std::byte>> keep;
      std::vector<Chunk> chunks;
      for (const auto& s : kSpecs)
        chunks.push_back(RowChunk(s, r, world, &keep));
      out[static_cast<size_t>(r)] =
          Save(comm, dirs[static_cast<size_t>(r)], chunks, FastSave());
    });
  }
  for (auto& t : ranks) t.join();
  return out;
}

std::string g_moved_to;  // where the "described" hook moves rank 1's shard
void MoveRank1Shard(const char* phase, int rank) {
  if (std::string(phase) != "described" || rank != 1) return;
  for (const auto& e :
       fs::recursive_directory_iterator(fs::path(g_moved_to).parent_path())) {
    if (e.path().filename() == "shard-00001-of-00002.ckpt") {
      fs::rename(e.path(), g_moved_to);
      return;
    }
  }
}

}  // namespace

TEST_CASE("ranks that name different directories: every rank refuses") {
  Dir d;
  auto r = ThreadSave({d.path + "/step-1", d.path + "/step-2"});
  for (size_t i = 0; i < r.size(); ++i) {
    INFO("rank " << i);
    REQUIRE_FALSE(r[i].ok());
    CHECK_THAT(r[i].status().message(), Catch::Contains("rank 1 of 2 failed"));
    CHECK_THAT(r[i].status().message(), Catch::Contains("step-2"));
    CHECK_THAT(r[i].status().message(), Catch::Contains("the coordinator to"));
  }
  // Nothing visible, nothing left behind by either rank.
  CHECK(fs::is_empty(d.path));
  // The same ranks agreeing commit.
  auto ok = ThreadSave({d.path + "/step-1", d.path + "/step-1"});
  REQUIRE(ok[0].ok());
  REQUIRE(ok[1].ok());
  CHECK(ShardedCheckpoint::Open(d.path + "/step-1").ok());
}

TEST_CASE("a shard the coordinator cannot find is never committed") {
  // Rank 1 wrote its shard where the coordinator does not see it (a
  // node-local disk): the hook moves it away after rank 1 described it.
  Dir d;
  fs::create_directories(d.path);
  g_moved_to = d.path + "/elsewhere.ckpt";
  dist::internal::SetFaultHook(&MoveRank1Shard);
  auto r = ThreadSave({d.path + "/step", d.path + "/step"});
  dist::internal::SetFaultHook(nullptr);
  for (size_t i = 0; i < r.size(); ++i) {
    INFO("rank " << i);
    REQUIRE_FALSE(r[i].ok());
    CHECK_THAT(r[i].status().message(), Catch::Contains("rank 1 of 2 wrote"));
    CHECK_THAT(r[i].status().message(), Catch::Contains("does not find it"));
  }
  CHECK_FALSE(fs::exists(d.path + "/step"));
  CHECK_FALSE(fs::exists(d.path + "/.step.tmp"));
}

TEST_CASE(
    "a shard's record gives the commit the report reading the file back "
    "would, and a wrong one fails the save") {
  // Two chunks of one tensor on one rank, a zero-size one, a 0-d one: the
  // manifests committed from a record and from the file read back agree.
  Dir d;
  SelfComm comm;
  std::vector<std::vector<std::byte>> keep;
  std::vector<Chunk> chunks;
  for (const auto& s : kSpecs) chunks.push_back(RowChunk(s, 0, 1, &keep));
  // "w" again, as two row blocks instead of one.
  chunks.erase(std::remove_if(chunks.begin(), chunks.end(),
                              [](const Chunk& c) { return c.path == "w"; }),
               chunks.end());
  for (auto [b, n] : {std::pair<int64_t, int64_t>{0, 2}, {2, 4}}) {
    Box box{{b, 0}, {n, 5}};
    keep.push_back(ReferenceBox("w", DType::kFloat32, {6, 5}, box));
    chunks.push_back({"w", DType::kFloat32, {6, 5}, box, keep.back()});
  }
  auto write = [&](const std::string& dir, ShardRecord* record) -> Status {
    CKPT_ASSIGN_OR_RETURN(std::string shard, ShardPath(dir, 0, 1));
    CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(shard, ckpt::test::Fast()));
    std::vector<NodeId> nodes;
    for (const auto& c : chunks) {
      CKPT_ASSIGN_OR_RETURN(auto n, AddChunk(w, c, record));
      if (n) nodes.push_back(*n);
    }
    CKPT_RETURN_IF_ERROR(
        SetShardRoot(w, nodes, std::nullopt, std::nullopt, 0, 1, record));
    CKPT_RETURN_IF_ERROR(w.Commit());
    return record ? record->Seal(w) : Status::OK();
  };
  ShardRecord record;
  REQUIRE(write(d.path + "/rec", &record).ok());
  CHECK(record.sealed());
  REQUIRE(CommitSave(comm, d.path + "/rec", Status::OK(), FastSave(), &record)
              .ok());
  REQUIRE(write(d.path + "/back", nullptr).ok());
  REQUIRE(CommitSave(comm, d.path + "/back", Status::OK(), FastSave()).ok());
  auto a = ReadManifest(d.path + "/rec");
  auto b = ReadManifest(d.path + "/back");
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(a->files.size() == 1);
  CHECK(a->files[0].size == b->files[0].size);
  CHECK(a->files[0].header_xxh3 == b->files[0].header_xxh3);
  REQUIRE(a->tensors.size() == b->tensors.size());
  for (size_t i = 0; i < a->tensors.size(); ++i) {
    const auto& x = a->tensors[i];
    const auto& y = b->tensors[i];
    INFO(x.path);
    CHECK(x.path == y.path);
    CHECK(x.dtype == y.dtype);
    CHECK(x.shape == y.shape);
    REQUIRE(x.chunks.size() == y.chunks.size());
    for (size_t k = 0; k < x.chunks.size(); ++k) {
      CHECK(x.chunks[k].box.offsets == y.chunks[k].box.offsets);
      CHECK(x.chunks[k].box.sizes == y.chunks[k].box.sizes);
      CHECK(x.chunks[k].offset == y.chunks[k].offset);
      CHECK(x.chunks[k].length == y.chunks[k].length);
    }
  }
  auto ck = ShardedCheckpoint::Open(d.path + "/rec");
  REQUIRE(ck.ok());
  for (const auto& s : kSpecs) {
    CheckBox(*ck, s, Box{std::vector<int64_t>(s.shape.size(), 0), s.shape},
             true);
  }

  // Carried as bytes to a process that commits alone (ckpt.dcp's finish).
  {
    ShardRecord carried;
    REQUIRE(write(d.path + "/carried", &carried).ok());
    auto bytes = carried.Serialize();
    REQUIRE(bytes.ok());
    auto back = ShardRecord::Deserialize(*bytes, 0);
    REQUIRE(back.ok());
    CHECK(back->sealed());
    CHECK_FALSE(ShardRecord::Deserialize(*bytes, 1).ok());  // says rank 0
    std::vector<ShardRecord> recs;
    recs.push_back(std::move(*back));
    auto info = CommitWritten(d.path + "/carried", 1, FastSave(), recs);
    REQUIRE(info.ok());
    auto c = ReadManifest(d.path + "/carried");
    REQUIRE(c.ok());
    CHECK(c->files[0].header_xxh3 == a->files[0].header_xxh3);
    CHECK(c->tensors.size() == a->tensors.size());
    CHECK_FALSE(ShardRecord().Serialize().ok());  // unsealed
  }

  // A record of another save's shard: this rank's error, nothing visible.
  REQUIRE(write(d.path + "/other", nullptr).ok());
  auto wrong =
      CommitSave(comm, d.path + "/other", Status::OK(), FastSave(), &record);
  REQUIRE_FALSE(wrong.ok());
  CHECK_THAT(wrong.status().ToString(), Catch::Contains("another save"));
  CHECK_FALSE(fs::exists(d.path + "/other"));
  // A record serves one shard: rooting it again is refused.
  {
    auto shard = ShardPath(d.path + "/again", 0, 1);
    REQUIRE(shard.ok());
    auto w = Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(w.ok());
    auto again =
        SetShardRoot(*w, {}, std::nullopt, std::nullopt, 0, 1, &record);
    CHECK_THAT(again.ToString(), Catch::Contains("already holds a rooted"));
  }

  // An unsealed record, and one whose chunks SetShardRoot does not match.
  ShardRecord unsealed;
  {
    auto shard = ShardPath(d.path + "/unsealed", 0, 1);
    REQUIRE(shard.ok());
    auto w = Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(w.ok());
    auto n = AddChunk(*w, chunks[0], &unsealed);
    REQUIRE(n.ok());
    std::vector<NodeId> nodes = {**n};
    REQUIRE(SetShardRoot(*w, nodes, std::nullopt, std::nullopt, 0, 1, &unsealed)
                .ok());
    REQUIRE(w->Commit().ok());
  }
  auto r = CommitSave(comm, d.path + "/unsealed", Status::OK(), FastSave(),
                      &unsealed);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().ToString(), Catch::Contains("not sealed"));
  CHECK_FALSE(fs::exists(d.path + "/unsealed"));
  ShardRecord partial;
  {
    auto shard = ShardPath(d.path + "/partial", 0, 1);
    REQUIRE(shard.ok());
    auto w = Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(w.ok());
    REQUIRE(AddChunk(*w, chunks[0], &partial).ok());
    REQUIRE(AddChunk(*w, chunks[1], &partial).ok());
    auto bad = SetShardRoot(*w, {}, std::nullopt, std::nullopt, 0, 1, &partial);
    CHECK_THAT(bad.ToString(), Catch::Contains("the record holds 2"));
    // A chunk of a known path with another global shape.
    Chunk other = chunks[0];
    other.global_shape = {99};
    other.box = Box{{0}, {0}};
    other.data = {};
    auto dup = AddChunk(*w, other, &partial);
    REQUIRE_FALSE(dup.ok());
    CHECK_THAT(dup.status().ToString(),
               Catch::Contains("another dtype or global shape"));
  }
}
