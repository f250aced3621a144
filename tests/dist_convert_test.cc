// Consolidate and ShardFile (lib/dist/convert.cc): a file sharded N ways
// and consolidated again holds the same tensors bit for bit and the same
// tree; what a sharded checkpoint cannot hold is refused before anything
// is written.
#include <ckpt/ckpt.h>
#include <ckpt/dist.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "catch_util.h"
#include "dist_fixture.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
using ckpt::Checkpoint;
using ckpt::DType;
using ckpt::ErrorCode;
using ckpt::Status;
using ckpt::TensorInfo;
using ckpt::ValueKind;
using ckpt::dist::Consolidate;
using ckpt::dist::ShardedCheckpoint;
using ckpt::dist::ShardFile;

// A directory removed with everything under it (sharded checkpoints are
// directories of directories).
struct Scratch {
  ckpt::test::TempDir t;
  ~Scratch() {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(t.path(), ec))
      fs::remove_all(e.path(), ec);
  }
  std::string File(const std::string& n) const { return t.File(n); }
};

ckpt::dist::SaveOptions FastSave() {
  ckpt::dist::SaveOptions o;
  o.write.sync = false;
  return o;
}

std::vector<std::byte> RowMajor(const Checkpoint& ck, const std::string& p) {
  auto t = ck.Tensor(p);
  REQUIRE(t.ok());
  std::vector<std::byte> out(static_cast<size_t>(t->info().nbytes()));
  REQUIRE(t->CopyTo(out).ok());
  return out;
}

// Every tensor of `a` is in `b` with its dtype, shape and row-major bytes,
// and `b` has no others.
void RequireSameTensors(const Checkpoint& a, const Checkpoint& b) {
  REQUIRE(a.num_tensors() == b.num_tensors());
  for (size_t i = 0; i < a.num_tensors(); ++i) {
    TensorInfo ta = *a.TensorInfoAt(i), tb = *b.TensorInfoAt(i);
    INFO(ta.path);
    REQUIRE(ta.path == tb.path);
    CHECK(ta.dtype == tb.dtype);
    CHECK(ta.shape == tb.shape);
    CHECK(tb.is_contiguous());
    CHECK(RowMajor(a, ta.path) == RowMajor(b, tb.path));
  }
}

// The mixed fixture's non-tensor values, as a consolidation must give back.
void RequireMixedTree(const Checkpoint& ck) {
  CHECK(ck.Get("epoch")->as_int() == 7);
  CHECK(ck.Get("name")->as_string() == "run-1");
  CHECK(ck.Get("lr")->as_float() == 0.5);
  CHECK(ck.Get("opt")->type_name() == "collections.OrderedDict");
  CHECK(ck.Get("opt/betas")->kind() == ValueKind::kTuple);
  CHECK(ck.Get("opt/betas/1")->as_float() == 0.99);
  CHECK(ck.Get("tags")->kind() == ValueKind::kSet);
  CHECK(ck.Get("tags")->size() == 2);
  CHECK(ck.Get("layers/1/k")->as_int() == 3);
  CHECK(ck.Get("layers/0")->kind() == ValueKind::kTensor);
  CHECK(ck.Get("a~1b")->kind() == ValueKind::kTensor);
  CHECK(ck.Metadata("note").ok());
  CHECK(*ck.Metadata("note") == "fixture");
}

std::vector<std::pair<int64_t, int64_t>> Dim0Boxes(
    const ckpt::dist::Manifest& m, const std::string& path) {
  const auto* t = m.Find(path);
  REQUIRE(t != nullptr);
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const auto& c : t->chunks)
    out.emplace_back(c.box.offsets[0], c.box.sizes[0]);
  std::sort(out.begin(), out.end());
  return out;
}

bool NoTemporaries(const std::string& dir) {
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().find(".tmp") != std::string::npos)
      return false;
  }
  return true;
}

}  // namespace

TEST_CASE("ShardFile then Consolidate gives the file back, N = 1..4, dim 0",
          "[dist][convert]") {
  Scratch s;
  const std::string in_path = s.File("in.ckpt");
  REQUIRE(ckpt::test::WriteDistFixture(in_path, "mixed").ok());
  auto in = Checkpoint::Open(in_path);
  REQUIRE(in.ok());
  for (int n = 1; n <= 4; ++n) {
    INFO("ranks " << n);
    const std::string dir = s.File("sharded-" + std::to_string(n));
    Status st = ShardFile(
        *in, dir, n, [](const TensorInfo&) { return 0; }, FastSave());
    INFO(st.ToString());
    REQUIRE(st.ok());
    auto ck = ShardedCheckpoint::Open(dir);
    REQUIRE(ck.ok());
    const auto& m = ck->manifest();
    CHECK(m.world_size == static_cast<uint32_t>(n));
    CHECK(m.files.size() == static_cast<size_t>(n));
    CHECK(m.tensors.size() == in->num_tensors());
    CHECK(ck->Verify().ok());
    if (n == 4) {
      // 6 rows on 4 ranks: 2, 2, 1, 1; 3 rows: one rank holds none.
      using P = std::pair<int64_t, int64_t>;
      CHECK(Dim0Boxes(m, "model/w") ==
            std::vector<P>{{0, 2}, {2, 2}, {4, 1}, {5, 1}});
      CHECK(Dim0Boxes(m, "mask") == std::vector<P>{{0, 1}, {1, 1}, {2, 1}});
      CHECK(Dim0Boxes(m, "ids") ==
            std::vector<P>{{0, 2}, {2, 2}, {4, 2}, {6, 1}});
    }
    // Any box of a global tensor loads as the file's bytes.
    auto wt = ck->Read("model/wt", ckpt::Box{{1, 2}, {2, 3}});
    REQUIRE(wt.ok());
    auto whole = RowMajor(*in, "model/wt");
    for (int r = 0; r < 2; ++r) {
      CHECK(std::memcmp(wt->data.data() + r * 12,
                        whole.data() + ((1 + r) * 6 + 2) * 4, 12) == 0);
    }

    const std::string out = s.File("out-" + std::to_string(n) + ".ckpt");
    st = Consolidate(dir, out, ckpt::test::Fast());
    INFO(st.ToString());
    REQUIRE(st.ok());
    auto back = Checkpoint::Open(out);
    REQUIRE(back.ok());
    RequireSameTensors(*in, *back);
    RequireMixedTree(*back);
    CHECK(back->Verify().ok());
  }
}

TEST_CASE("ShardFile cuts along the dim asked for, replicates -1 and 0-d",
          "[dist][convert]") {
  Scratch s;
  const std::string in_path = s.File("in.ckpt");
  REQUIRE(ckpt::test::WriteDistFixture(in_path, "mixed").ok());
  auto in = Checkpoint::Open(in_path);
  REQUIRE(in.ok());
  // dim 1 for matrices, replicated otherwise; a dim the tensor lacks
  // (1 of a vector) replicates too.
  auto dim_of = [](const TensorInfo& t) { return t.path == "ids" ? -1 : 1; };
  const std::string dir = s.File("tp");
  REQUIRE(ShardFile(*in, dir, 3, dim_of, FastSave()).ok());
  auto ck = ShardedCheckpoint::Open(dir);
  REQUIRE(ck.ok());
  const auto& m = ck->manifest();
  // model/w [6,4] on dim 1 over 3 ranks: columns 2, 1, 1, all rows each.
  const auto* w = m.Find("model/w");
  REQUIRE(w != nullptr);
  REQUIRE(w->chunks.size() == 3);
  std::vector<int64_t> cols;
  for (const auto& c : w->chunks) {
    CHECK(c.box.sizes[0] == 6);
    cols.push_back(c.box.sizes[1]);
  }
  std::sort(cols.begin(), cols.end());
  CHECK(cols == std::vector<int64_t>{1, 1, 2});
  // Replicated [7] split across the 3 ranks by ReplicaPart: written once.
  const auto* ids = m.Find("ids");
  REQUIRE(ids != nullptr);
  CHECK(ids->chunks.size() == 3);
  // 0-d: one chunk, on one rank.
  REQUIRE(m.Find("scale") != nullptr);
  CHECK(m.Find("scale")->chunks.size() == 1);
  // The empty tensor is declared, with no bytes.
  REQUIRE(m.Find("empty") != nullptr);
  CHECK(m.Find("empty")->shape == std::vector<int64_t>{0, 3});

  const std::string out = s.File("out.ckpt");
  REQUIRE(Consolidate(dir, out, ckpt::test::Fast()).ok());
  auto back = Checkpoint::Open(out);
  REQUIRE(back.ok());
  RequireSameTensors(*in, *back);
  RequireMixedTree(*back);

  // The globals tree may sit in another rank's file.
  auto so = FastSave();
  so.coordinator = 2;
  const std::string dir2 = s.File("coord2");
  REQUIRE(ShardFile(*in, dir2, 3, dim_of, so).ok());
  REQUIRE(Consolidate(dir2, s.File("out2.ckpt"), ckpt::test::Fast()).ok());
  auto back2 = Checkpoint::Open(s.File("out2.ckpt"));
  REQUIRE(back2.ok());
  RequireSameTensors(*in, *back2);
  RequireMixedTree(*back2);
}

TEST_CASE("ShardFile refuses what a sharded checkpoint cannot hold",
          "[dist][convert]") {
  Scratch s;
  auto zero = [](const TensorInfo&) { return 0; };
  SECTION("a numpy array") {
    REQUIRE(ckpt::test::WriteDistFixture(s.File("np.ckpt"), "numpy").ok());
    auto in = Checkpoint::Open(s.File("np.ckpt"));
    REQUIRE(in.ok());
    ckpt::test::RequireError(ShardFile(*in, s.File("d"), 2, zero, FastSave()),
                             ErrorCode::kInvalidArgument, "'arr'");
  }
  SECTION("a dict tagged as a placeholder") {
    REQUIRE(ckpt::test::WriteDistFixture(s.File("tag.ckpt"), "tagged").ok());
    auto in = Checkpoint::Open(s.File("tag.ckpt"));
    REQUIRE(in.ok());
    ckpt::test::RequireError(ShardFile(*in, s.File("d"), 2, zero, FastSave()),
                             ErrorCode::kInvalidArgument,
                             "ckpt.dist.GlobalTensor");
  }
  SECTION("bad arguments") {
    REQUIRE(ckpt::test::WriteDistFixture(s.File("in.ckpt"), "mixed").ok());
    auto in = Checkpoint::Open(s.File("in.ckpt"));
    REQUIRE(in.ok());
    ckpt::test::RequireError(ShardFile(*in, s.File("d"), 0, zero, FastSave()),
                             ErrorCode::kInvalidArgument, "world size");
    ckpt::test::RequireError(
        ShardFile(
            *in, s.File("d"), 2,
            [](const TensorInfo& t) { return t.path == "ids" ? -2 : 0; },
            FastSave()),
        ErrorCode::kInvalidArgument, "'ids'");
    auto so = FastSave();
    so.coordinator = 2;
    ckpt::test::RequireError(ShardFile(*in, s.File("d"), 2, zero, so),
                             ErrorCode::kInvalidArgument, "coordinator");
    REQUIRE(ShardFile(*in, s.File("d"), 2, zero, FastSave()).ok());
    ckpt::test::RequireError(ShardFile(*in, s.File("d"), 2, zero, FastSave()),
                             ErrorCode::kInvalidArgument, "exists");
    so = FastSave();
    so.overwrite = true;
    CHECK(ShardFile(*in, s.File("d"), 3, zero, so).ok());
    CHECK(ShardedCheckpoint::Open(s.File("d"))->manifest().world_size == 3);
  }
  // Nothing of a refused sharding is left behind.
  const bool leftover =
      fs::exists(s.File("d")) && !ckpt::dist::IsShardedCheckpoint(s.File("d"));
  CHECK_FALSE(leftover);
  CHECK(NoTemporaries(s.t.path()));
}

TEST_CASE(
    "Consolidate without a globals tree nests dicts by path and drops "
    "rank-local state",
    "[dist][convert]") {
  Scratch s;
  const std::string dir = s.File("ck");
  std::vector<float> x = {1, 2};
  std::vector<int32_t> y = {3, 4, 5};
  std::vector<uint8_t> top = {9};
  for (int r = 0; r < 2; ++r) {
    auto shard = ckpt::dist::ShardPath(dir, r, 2);
    REQUIRE(shard.ok());
    auto w = ckpt::Writer::Create(*shard, ckpt::test::Fast());
    REQUIRE(w.ok());
    std::vector<ckpt::NodeId> chunks;
    auto add = [&](ckpt::dist::Chunk c) {
      auto n = ckpt::dist::AddChunk(*w, c);
      REQUIRE(n.ok());
      if (*n) chunks.push_back(**n);
    };
    // Rank 0 holds a/x and top, rank 1 a/y.
    if (r == 0) {
      add({"a/x",
           DType::kFloat32,
           {2},
           {{0}, {2}},
           std::as_bytes(std::span(x))});
      add({"top",
           DType::kUInt8,
           {1},
           {{0}, {1}},
           std::as_bytes(std::span(top))});
    } else {
      add({"a/y", DType::kInt32, {3}, {{0}, {3}}, std::as_bytes(std::span(y))});
    }
    auto local = w->AddInt(100 + r);
    REQUIRE(
        ckpt::dist::SetShardRoot(*w, chunks, std::nullopt, local, r, 2).ok());
    REQUIRE(w->Commit().ok());
  }
  auto so = FastSave();
  so.metadata = {{"step", "200"}};
  auto info = ckpt::dist::CommitWritten(dir, 2, so);
  INFO(info.status().ToString());
  REQUIRE(info.ok());
  const std::string out = s.File("out.ckpt");
  REQUIRE(Consolidate(dir, out, ckpt::test::Fast()).ok());
  auto back = Checkpoint::Open(out);
  REQUIRE(back.ok());
  CHECK(back->root().kind() == ValueKind::kDict);
  CHECK(back->root().size() == 2);
  CHECK(back->Get("a")->size() == 2);
  CHECK(RowMajor(*back, "a/x") ==
        std::vector<std::byte>(ckpt::test::Bytes(x).begin(),
                               ckpt::test::Bytes(x).end()));
  CHECK(RowMajor(*back, "a/y") ==
        std::vector<std::byte>(ckpt::test::Bytes(y).begin(),
                               ckpt::test::Bytes(y).end()));
  CHECK(RowMajor(*back, "top").size() == 1);
  CHECK_FALSE(back->Get("rank_local").ok());
  CHECK(*back->Metadata("step") == "200");
}

TEST_CASE("Consolidate of a damaged shard fails naming it and writes nothing",
          "[dist][convert]") {
  Scratch s;
  REQUIRE(ckpt::test::WriteDistFixture(s.File("in.ckpt"), "mixed").ok());
  auto in = Checkpoint::Open(s.File("in.ckpt"));
  REQUIRE(in.ok());
  const std::string dir = s.File("d");
  REQUIRE(ShardFile(
              *in, dir, 2, [](const TensorInfo&) { return 0; }, FastSave())
              .ok());
  uint64_t at = 0;
  std::string file;
  {
    auto ck = ShardedCheckpoint::Open(dir);
    REQUIRE(ck.ok());
    const auto* w = ck->manifest().Find("model/w");
    REQUIRE(w != nullptr);
    const auto& c = w->chunks.back();
    at = c.offset + 3;
    file = ck->ShardFilePath(c.file);
  }
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(at));
    char b = 0;
    f.read(&b, 1);
    b = static_cast<char>(b ^ 0x40);
    f.seekp(static_cast<std::streamoff>(at));
    f.write(&b, 1);
  }
  const std::string out = s.File("out.ckpt");
  Status st = Consolidate(dir, out, ckpt::test::Fast());
  INFO(st.ToString());
  REQUIRE_FALSE(st.ok());
  CHECK(st.ToString().find(fs::path(file).filename().string()) !=
        std::string::npos);
  CHECK(st.ToString().find("model/w") != std::string::npos);
  CHECK_FALSE(fs::exists(out));
  CHECK(NoTemporaries(s.t.path()));
  CHECK_FALSE(ShardedCheckpoint::Open(dir)->Verify().ok());
}

TEST_CASE("Consolidate streams a tensor larger than its block in boxes",
          "[dist][convert]") {
  // u8 [2, 3, 24 Mi]: one index of dim 0 is 72 MiB, more than a 64 MiB
  // block, so the boxes are [1, 2, 24 Mi] and [1, 1, 24 Mi] (dim 1 in
  // blocks, carried into dim 0); cut on dim 2 it needs both ranks per box.
  Scratch s;
  REQUIRE(ckpt::test::WriteDistFixture(s.File("big.ckpt"), "big").ok());
  auto in = Checkpoint::Open(s.File("big.ckpt"));
  REQUIRE(in.ok());
  const std::string dir = s.File("d");
  REQUIRE(ShardFile(
              *in, dir, 2, [](const TensorInfo&) { return 2; }, FastSave())
              .ok());
  const std::string out = s.File("out.ckpt");
  REQUIRE(Consolidate(dir, out, ckpt::test::Fast()).ok());
  auto back = Checkpoint::Open(out);
  REQUIRE(back.ok());
  auto a = in->Tensor("big"), b = back->Tensor("big");
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(a->data().size() == b->data().size());
  CHECK(std::memcmp(a->data().data(), b->data().data(), a->data().size()) == 0);
  CHECK(RowMajor(*in, "small") == RowMajor(*back, "small"));
}

TEST_CASE("A sharding that fails midway leaves nothing behind",
          "[dist][convert]") {
  // The file-size limit makes a shard's write fail (EFBIG) once the first
  // MiB is written: in a child process, so the limit stays there.
  Scratch s;
  REQUIRE(ckpt::test::WriteDistFixture(s.File("big.ckpt"), "big").ok());
  const std::string dir = s.File("d");
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = {1u << 20, 1u << 20};
    ::setrlimit(RLIMIT_FSIZE, &lim);
    auto in = Checkpoint::Open(s.File("big.ckpt"));
    if (!in.ok()) ::_exit(10);
    Status st = ShardFile(
        *in, dir, 2, [](const TensorInfo&) { return 0; }, FastSave());
    if (st.ok()) ::_exit(11);
    if (st.code() != ErrorCode::kIoError) ::_exit(12);
    if (st.ToString().find("shard 0 of 2") == std::string::npos) ::_exit(13);
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK_FALSE(fs::exists(dir));
  CHECK(NoTemporaries(s.t.path()));
}
