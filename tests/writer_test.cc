// Atomicity and misuse: a failed or abandoned write leaves any existing
// target intact and no temporary behind; bad calls get clear errors.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "test_util.h"

using namespace ckpt;
using namespace ckpt::test;

namespace {

std::vector<std::byte> Old(const TempDir& dir) {
  std::vector<float> v = {9, 9};
  auto w = Writer::Create(dir.File("t.ckpt"), Fast());
  REQUIRE(w.ok());
  REQUIRE(w->PutTensor("old", DType::kFloat32, {2}, Bytes(v)).ok());
  REQUIRE(w->Commit().ok());
  return ReadAll(dir.File("t.ckpt"));
}

void RequireOnlyTarget(const TempDir& dir) {
  CHECK(dir.List() == std::vector<std::string>{"t.ckpt"});
}

}  // namespace

TEST_CASE(
    "a writer destroyed before Commit leaves the old file and no temporary") {
  TempDir dir;
  auto before = Old(dir);
  {
    auto w = Writer::Create(dir.File("t.ckpt"), Fast());
    REQUIRE(w.ok());
    std::vector<float> v(1000, 1.0f);
    REQUIRE(w->PutTensor("new", DType::kFloat32, {1000}, Bytes(v)).ok());
    // The bytes go to an unnamed O_TMPFILE inode: nothing to see, nothing
    // left if the process dies now (tests/hardening_test.cc kills one).
    CHECK(dir.List().size() == 1);
  }
  RequireOnlyTarget(dir);
  CHECK(ReadAll(dir.File("t.ckpt")) == before);
}

TEST_CASE("Abort and a failed Commit leave the old file and no temporary") {
  TempDir dir;
  auto before = Old(dir);
  {
    auto w = Writer::Create(dir.File("t.ckpt"), Fast());
    REQUIRE(w.ok());
    w->Abort();
    CHECK(w->Commit().code() == ErrorCode::kInvalidArgument);
  }
  RequireOnlyTarget(dir);
  {
    // A tensor never placed in the tree makes Commit fail.
    auto w = Writer::Create(dir.File("t.ckpt"), Fast());
    REQUIRE(w.ok());
    std::vector<float> v = {1};
    REQUIRE(w->AddTensor(DType::kFloat32, {1}, Bytes(v)).ok());
    Status s = w->Commit();
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(s.ToString().find("never placed") != std::string::npos);
    CHECK(w->Commit().code() == ErrorCode::kInvalidArgument);
  }
  RequireOnlyTarget(dir);
  CHECK(ReadAll(dir.File("t.ckpt")) == before);
}

TEST_CASE("a full disk fails the write cleanly, naming the file") {
  // RLIMIT_FSIZE makes write() fail with EFBIG past the limit: a full disk
  // as far as the writer can tell. A 4 MiB tensor past a 1 MiB limit, and
  // a 64 MiB one (written straight from the caller's memory while a
  // second thread hashes it) past 20 MiB.
  for (auto [limit, size] : {std::pair<int, int>{1 << 20, 4 << 20},
                             std::pair<int, int>{20 << 20, 64 << 20}}) {
    TempDir dir;
    auto before = Old(dir);
    struct sigaction ign {
    }, old_action{};
    ign.sa_handler = SIG_IGN;
    sigaction(SIGXFSZ, &ign, &old_action);
    rlimit old_limit;
    getrlimit(RLIMIT_FSIZE, &old_limit);
    rlimit small = old_limit;
    small.rlim_cur = static_cast<rlim_t>(limit);
    setrlimit(RLIMIT_FSIZE, &small);
    Status s, after;
    {
      auto w = Writer::Create(dir.File("t.ckpt"), Fast());
      REQUIRE(w.ok());
      std::vector<std::byte> big(static_cast<size_t>(size));
      s = w->PutTensor("big", DType::kUInt8, {size}, big);
      if (s.ok()) s = w->Commit();
      after = w->PutTensor("x", DType::kUInt8, {1}, std::span(big).first(1));
    }
    setrlimit(RLIMIT_FSIZE, &old_limit);
    sigaction(SIGXFSZ, &old_action, nullptr);
    INFO(s.ToString());
    CHECK(s.code() == ErrorCode::kIoError);
    CHECK(s.file() == dir.File("t.ckpt"));
    CHECK(s.ToString().find("write failed") != std::string::npos);
    CHECK(s.offset() == limit);                  // where the write stopped
    CHECK(after.code() == ErrorCode::kIoError);  // the writer stays aborted
    RequireOnlyTarget(dir);
    CHECK(ReadAll(dir.File("t.ckpt")) == before);
  }
}

TEST_CASE("Commit replaces the target atomically with normal permissions") {
  TempDir dir;
  Old(dir);
  auto w = Writer::Create(dir.File("t.ckpt"));  // with fsync
  REQUIRE(w.ok());
  REQUIRE(w->PutValue("x", w->AddInt(1)).ok());
  REQUIRE(w->Commit().ok());
  RequireOnlyTarget(dir);
  auto ck = Checkpoint::Open(dir.File("t.ckpt"));
  REQUIRE(ck.ok());
  CHECK(ck->num_tensors() == 0);
  struct stat st;
  REQUIRE(::stat(dir.File("t.ckpt").c_str(), &st) == 0);
  mode_t mask = ::umask(0);
  ::umask(mask);
  CHECK((st.st_mode & 0777) == (0666 & ~mask));
}

TEST_CASE("writer errors for impossible requests") {
  TempDir dir;
  CHECK(Writer::Create(dir.File("no/such/dir/x.ckpt")).status().code() ==
        ErrorCode::kIoError);
  CHECK(Writer::Create(dir.path()).status().code() ==
        ErrorCode::kInvalidArgument);
  WriteOptions bad;
  bad.chunk_size = 1000;
  CHECK(Writer::Create(dir.File("x.ckpt"), bad).status().code() ==
        ErrorCode::kInvalidArgument);

  auto w = Writer::Create(dir.File("x.ckpt"), Fast());
  REQUIRE(w.ok());
  std::vector<float> v = {1, 2, 3};
  CHECK(w->PutTensor("a", DType::kFloat32, {2}, Bytes(v)).code() ==
        ErrorCode::kInvalidArgument);  // 12 bytes for 2 elements
  CHECK(w->PutTensor("a", DType::kInvalid, {3}, Bytes(v)).code() ==
        ErrorCode::kInvalidArgument);
  CHECK(w->AddStorage(Bytes(v), "gpu 0").status().code() ==
        ErrorCode::kInvalidArgument);
  auto s = w->AddStorage(Bytes(v));
  REQUIRE(s.ok());
  CHECK(w->AddTensor(TensorSpec{DType::kFloat32, {4}, {}, *s, 0})
            .status()
            .code() == ErrorCode::kInvalidArgument);  // view past storage
  CHECK(w->AddTensor(TensorSpec{DType::kFloat32, {2}, {1}, *s, 2})
            .status()
            .code() == ErrorCode::kInvalidArgument);
  CHECK(w->AddTensor(TensorSpec{DType::kFloat32, {1}, {}, 7, 0})
            .status()
            .code() == ErrorCode::kInvalidArgument);  // no such storage
  // Streaming misuse.
  CHECK(w->Append(Bytes(v)).code() == ErrorCode::kInvalidArgument);
  auto s2 = w->BeginStorage(8);
  REQUIRE(s2.ok());
  CHECK(w->BeginStorage(8).status().code() == ErrorCode::kInvalidArgument);
  CHECK(w->Append(Bytes(v)).code() == ErrorCode::kInvalidArgument);  // 12 > 8
  CHECK(w->EndStorage().code() == ErrorCode::kInvalidArgument);  // 8 missing
  CHECK(w->Commit().code() == ErrorCode::kInvalidArgument);      // still open
  // Tree misuse.
  CHECK(w->AddList(std::vector<NodeId>{12345}).status().code() ==
        ErrorCode::kInvalidArgument);
  NodeId list_key[] = {w->AddList({}).value()};
  NodeId val[] = {w->AddInt(1)};
  CHECK(w->AddDict(list_key, val).status().code() ==
        ErrorCode::kInvalidArgument);
  CHECK(w->AddDevice("cuda:").status().code() == ErrorCode::kInvalidArgument);
  CHECK(w->AddBigInt({}).status().code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("a node placed twice, or colliding paths, fail Commit") {
  TempDir dir;
  {
    auto w = Writer::Create(dir.File("x.ckpt"), Fast());
    REQUIRE(w.ok());
    NodeId shared = w->AddInt(1);
    NodeId items[] = {shared, shared};
    REQUIRE(w->SetRoot(w->AddList(items).value()).ok());
    Status s = w->Commit();
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(s.ToString().find("more than once") != std::string::npos);
  }
  {
    auto w = Writer::Create(dir.File("x.ckpt"), Fast());
    REQUIRE(w.ok());
    std::vector<float> v = {1};
    NodeId keys[] = {w->AddInt(1), w->AddString("1")};
    NodeId vals[] = {w->AddTensor(DType::kFloat32, {1}, Bytes(v)).value(),
                     w->AddTensor(DType::kFloat32, {1}, Bytes(v)).value()};
    REQUIRE(w->SetRoot(w->AddDict(keys, vals).value()).ok());
    Status s = w->Commit();
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(s.ToString().find("two tensors have the path '1'") !=
          std::string::npos);
  }
  CHECK(TempDir().List().empty());
  CHECK(dir.List().empty());
}

TEST_CASE("writer memory stays bounded: it keeps no tensor bytes") {
  // A 256 MiB storage streamed in 1 MiB pieces from one reused buffer; the
  // process's peak RSS must grow by far less than the data.
  TempDir dir;
  rusage before{};
  getrusage(RUSAGE_SELF, &before);
  {
    auto w = Writer::Create(dir.File("big.ckpt"), Fast());
    REQUIRE(w.ok());
    const uint64_t total = 256ull << 20;
    auto s = w->BeginStorage(total);
    REQUIRE(s.ok());
    std::vector<std::byte> piece(1 << 20, std::byte{7});
    for (uint64_t done = 0; done < total; done += piece.size()) {
      REQUIRE(w->Append(piece).ok());
    }
    REQUIRE(w->EndStorage().ok());
    TensorSpec spec{DType::kUInt8, {static_cast<int64_t>(total)}, {}, *s, 0};
    REQUIRE(w->PutValue("x", w->AddTensor(spec).value()).ok());
    REQUIRE(w->Commit().ok());
  }
  rusage after{};
  getrusage(RUSAGE_SELF, &after);
  // ru_maxrss is in KiB; allow 64 MiB of growth (other tests ran before).
  CHECK(after.ru_maxrss - before.ru_maxrss < 64 * 1024);
  auto ck = Checkpoint::Open(dir.File("big.ckpt"));
  REQUIRE(ck.ok());
  CHECK(ck->Verify().ok());
}

TEST_CASE("AppendFromFile copies file to file and hashes the same bytes") {
  TempDir dir;
  std::vector<std::byte> src(3 * (1 << 20) + 123);
  for (size_t i = 0; i < src.size(); ++i)
    src[i] = static_cast<std::byte>(i * 131 + 7);
  WriteAll(dir.File("src.bin"), src);
  int fd = ::open(dir.File("src.bin").c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  int pipefd[2];
  REQUIRE(::pipe(pipefd) == 0);
  {
    auto w = Writer::Create(dir.File("t.ckpt"), Fast());
    REQUIRE(w.ok());
    // Two storages: one copied by the kernel in two pieces (one small, one
    // large), one through a descriptor the kernel cannot copy from (a
    // pipe), which must fall back to writing the bytes.
    auto s = w->BeginStorage(src.size());
    REQUIRE(s.ok());
    std::span<const std::byte> all(src);
    REQUIRE(w->AppendFromFile(fd, 0, all.first(1000)).ok());
    REQUIRE(w->AppendFromFile(fd, 1000, all.subspan(1000)).ok());
    REQUIRE(w->EndStorage().ok());
    auto s2 = w->BeginStorage(4096);
    REQUIRE(s2.ok());
    REQUIRE(w->AppendFromFile(pipefd[0], 0, all.first(4096)).ok());
    REQUIRE(w->EndStorage().ok());
    CHECK(w->AppendFromFile(-1, 0, all.first(1)).code() ==
          ErrorCode::kInvalidArgument);
    for (StorageId id : {*s, *s2}) {
      int64_t n = id == *s ? static_cast<int64_t>(src.size()) : 4096;
      REQUIRE(
          w->PutValue(
               "s" + std::to_string(id),
               w->AddTensor(TensorSpec{DType::kUInt8, {n}, {}, id, 0}).value())
              .ok());
    }
    REQUIRE(w->Commit().ok());
  }
  ::close(fd);
  ::close(pipefd[0]);
  ::close(pipefd[1]);
  auto ck = Checkpoint::Open(dir.File("t.ckpt"));
  REQUIRE(ck.ok());
  CHECK(ck->Verify().ok());
  auto a = ck->Tensor("s0");
  REQUIRE(a.ok());
  CHECK(std::equal(a->data().begin(), a->data().end(), src.begin(), src.end()));
  auto b = ck->Tensor("s1");
  REQUIRE(b.ok());
  CHECK(std::equal(b->data().begin(), b->data().end(), src.begin()));
}

TEST_CASE("SetTypeName tags tensors and dicts, nothing else") {
  TempDir dir;
  std::string path = dir.File("t.ckpt");
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    std::vector<std::byte> b(8);
    auto t = w->AddTensor(DType::kFloat32, {2}, b);
    REQUIRE(t.ok());
    REQUIRE(w->SetTypeName(*t, "numpy.ndarray").ok());
    NodeId i = w->AddInt(3);
    CHECK(w->SetTypeName(i, "x").code() == ErrorCode::kInvalidArgument);
    CHECK(w->SetTypeName(999, "x").code() == ErrorCode::kInvalidArgument);
    NodeId k[] = {w->AddString("a"), w->AddString("b")};
    NodeId v[] = {*t, i};
    auto d = w->AddDict(k, v);
    REQUIRE(d.ok());
    REQUIRE(w->SetTypeName(*d, "collections.OrderedDict").ok());
    REQUIRE(w->SetRoot(*d).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  CHECK(ck->root().type_name() == "collections.OrderedDict");
  CHECK(ck->Get("a")->type_name() == "numpy.ndarray");
  CHECK(ck->Get("b")->type_name().empty());
  CHECK(ck->Verify().ok());
}

namespace {

// A storage of `src` appended in pieces of the given sizes (the last piece
// takes the rest); returns the whole file.
std::vector<std::byte> WriteInPieces(const TempDir& dir,
                                     const std::vector<std::byte>& src,
                                     const std::vector<size_t>& pieces,
                                     WriteOptions o) {
  std::string path = dir.File("p" + std::to_string(pieces.size()) + "_" +
                              std::to_string(o.chunk_size) + "_" +
                              std::to_string(o.sync) + ".ckpt");
  auto w = Writer::Create(path, o);
  REQUIRE(w.ok());
  // A small storage first, so the large one starts at an offset the
  // buffered path left behind.
  std::vector<std::byte> small(100, std::byte{5});
  REQUIRE(w->PutTensor("a", DType::kUInt8, {100}, small).ok());
  auto s = w->BeginStorage(src.size());
  REQUIRE(s.ok());
  std::span<const std::byte> rest(src);
  for (size_t n : pieces) {
    n = std::min(n, rest.size());
    REQUIRE(w->Append(rest.first(n)).ok());
    rest = rest.subspan(n);
  }
  REQUIRE(w->Append(rest).ok());
  REQUIRE(w->EndStorage().ok());
  REQUIRE(w->PutValue(
               "b", w->AddTensor(TensorSpec{DType::kUInt8,
                                            {static_cast<int64_t>(src.size())},
                                            {},
                                            *s,
                                            0})
                        .value())
              .ok());
  REQUIRE(w->Commit().ok());
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  INFO(path);
  CHECK(ck->Verify().ok());
  auto b = ck->Tensor("b");
  REQUIRE(b.ok());
  CHECK(std::equal(b->data().begin(), b->data().end(), src.begin(), src.end()));
  return ReadAll(path);
}

}  // namespace

TEST_CASE("appends in odd pieces make the same file as one append") {
  TempDir dir;
  // 21 MiB + 77: pieces that end inside chunks, on chunk edges, past them.
  std::vector<std::byte> src((21u << 20) + 77);
  uint64_t x = 88172645463325252ull;
  for (auto& b : src) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    b = static_cast<std::byte>(x);
  }
  for (uint64_t chunk : {kDefaultChunkBytes, uint64_t{1} << 16}) {
    WriteOptions o = Fast();
    o.chunk_size = chunk;
    auto want = WriteInPieces(dir, src, {}, o);
    for (const std::vector<size_t>& pieces :
         {std::vector<size_t>{1000, 17u << 20},
          std::vector<size_t>{(3u << 20) + 5, 4u << 20, 1, 1u << 20}}) {
      for (bool sync : {false, true}) {  // sync: the writeback hints, too
        o.sync = sync;
        INFO("chunk " << chunk << " pieces " << pieces.size() << " sync "
                      << sync);
        CHECK(WriteInPieces(dir, src, pieces, o) == want);
      }
    }
  }
}
