// Lookup, backends, buffers and open errors.
#include <catch2/catch.hpp>

#include "source_internal.h"
#include "test_util.h"

using namespace ckpt;
using namespace ckpt::test;

TEST_CASE("lookup by path among 10,000 tensors, including odd paths") {
  TempDir dir;
  std::string path = dir.File("many.ckpt");
  std::vector<std::string> names;
  for (int i = 0; i < 10000; ++i)
    names.push_back("layer." + std::to_string(i) + ".w");
  names.push_back(std::string("nul\0inside", 10));
  names.push_back(
      "\xf4\x8f\xbf\xbf high code points");  // U+10FFFF (paths are UTF-8, R19)
  names.push_back("");  // empty key: path "" (like a top-level tensor)
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    for (size_t i = 0; i < names.size(); ++i) {
      int32_t v = static_cast<int32_t>(i);
      REQUIRE(w->PutTensor(names[i], DType::kInt32, {},
                           std::as_bytes(std::span(&v, 1)))
                  .ok());
    }
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  REQUIRE(ck->num_tensors() == names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    auto t = ck->Tensor(names[i]);
    INFO(i);
    REQUIRE(t.ok());
    CHECK(*reinterpret_cast<const int32_t*>(t->data().data()) ==
          static_cast<int32_t>(i));
    auto info = ck->FindTensor(names[i]);
    REQUIRE(info.ok());
    CHECK(t->info().index == info->index);
    CHECK(ck->TensorInfoAt(info->index)->path == names[i]);
    CHECK(ck->TensorAt(info->index)->info().path == names[i]);
  }
  CHECK(ck->Tensor("layer.10000.w").status().code() == ErrorCode::kNotFound);
  CHECK(ck->FindTensor("layer.10000.w").status().code() ==
        ErrorCode::kNotFound);
  // Positions past the table are errors, not reads out of bounds.
  CHECK(ck->TensorInfoAt(ck->num_tensors()).status().code() ==
        ErrorCode::kInvalidArgument);
  CHECK(ck->TensorAt(ck->num_tensors()).status().code() ==
        ErrorCode::kInvalidArgument);
  CHECK(ck->StorageInfoAt(ck->num_storages()).status().code() ==
        ErrorCode::kInvalidArgument);
  CHECK(ck->StorageInfoAt(SIZE_MAX).status().ToString().find(
            "does not exist") != std::string::npos);
  CHECK(ck->Tensor(std::string("nul", 3)).status().code() ==
        ErrorCode::kNotFound);
  for (size_t i = 1; i < ck->num_tensors(); ++i) {
    CHECK(ck->TensorInfoAt(i - 1)->path < ck->TensorInfoAt(i)->path);
  }
  // TensorPaths lists the same names in the same order, without records.
  std::vector<std::string_view> paths = ck->TensorPaths();
  REQUIRE(paths.size() == ck->num_tensors());
  for (size_t i = 0; i < paths.size(); ++i) {
    CHECK(paths[i] == ck->TensorInfoAt(i)->path);
  }
  CHECK(ck->Verify().ok());
}

TEST_CASE("a top-level tensor has the empty path") {
  TempDir dir;
  std::string path = dir.File("top.ckpt");
  std::vector<uint8_t> v = {1, 2, 3};
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    auto t = w->AddTensor(DType::kUInt8, {3}, Bytes(v));
    REQUIRE(t.ok());
    REQUIRE(w->SetRoot(*t).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  REQUIRE(ck->num_tensors() == 1);
  CHECK(ck->TensorInfoAt(0)->path.empty());
  CHECK(ck->Tensor("").ok());
  CHECK(ck->root().kind() == ValueKind::kTensor);
  CHECK(ck->Verify().ok());
}

TEST_CASE("OpenBuffer works on unaligned memory") {
  TempDir dir;
  std::string path = dir.File("b.ckpt");
  std::vector<double> v = {1.5, 2.5};
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("v", DType::kFloat64, {2}, Bytes(v)).ok());
    REQUIRE(w->Commit().ok());
  }
  auto bytes = ReadAll(path);
  std::vector<std::byte> shifted(bytes.size() + 1);
  std::copy(bytes.begin(), bytes.end(), shifted.begin() + 1);
  auto ck = Checkpoint::OpenBuffer(std::span(shifted).subspan(1));
  REQUIRE(ck.ok());
  auto t = ck->Tensor("v");
  REQUIRE(t.ok());
  std::vector<double> out(2);
  REQUIRE(t->CopyTo(std::as_writable_bytes(std::span(out))).ok());
  CHECK(out == v);
  CHECK(ck->Verify().ok());
}

TEST_CASE("open errors name the file") {
  TempDir dir;
  auto missing = Checkpoint::Open(dir.File("missing.ckpt"));
  CHECK(missing.status().code() == ErrorCode::kNotFound);
  CHECK(missing.status().ToString().find("missing.ckpt") != std::string::npos);
  CHECK(Checkpoint::Open(dir.path()).status().code() == ErrorCode::kIoError);
  std::string text(100, 'x');
  WriteAll(dir.File("junk"), std::as_bytes(std::span(text)));
  auto junk = Checkpoint::Open(dir.File("junk"));
  CHECK(junk.status().code() == ErrorCode::kCorrupt);
  CHECK(junk.status().ToString().find("junk:0: corrupt: bad magic") !=
        std::string::npos);
}

TEST_CASE("populate and pread backends read the same bytes as mmap") {
  TempDir dir;
  std::string path = dir.File("p.ckpt");
  std::vector<uint16_t> v(3000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint16_t>(i * 7);
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("v", DType::kBFloat16, {3000}, Bytes(v)).ok());
    REQUIRE(w->Commit().ok());
  }
  std::vector<std::vector<std::byte>> seen;
  for (auto [backend, populate] : {std::pair{Backend::kMmap, false},
                                   {Backend::kMmap, true},
                                   {Backend::kPread, false}}) {
    ReadOptions ro;
    ro.backend = backend;
    ro.populate = populate;
    auto ck = Checkpoint::Open(path, ro);
    REQUIRE(ck.ok());
    CHECK(ck->Prefetch().ok());
    CHECK(ck->Prefetch(1).ok());
    auto t = ck->Tensor("v");
    REQUIRE(t.ok());
    seen.emplace_back(t->data().begin(), t->data().end());
    CHECK(ck->Verify(VerifyOptions{1}).ok());
  }
  CHECK(seen[0] == seen[1]);
  CHECK(seen[0] == seen[2]);
}

TEST_CASE("storage bytes: views, pread copies, and private writable mappings") {
  TempDir dir;
  std::string path = dir.File("s.ckpt");
  auto big = Pattern(1 << 20, 3);  // over the size where copies use pread
  auto small = Pattern(100, 4);
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(
        w->PutTensor("big", DType::kUInt8, {int64_t(big.size())}, big).ok());
    REQUIRE(w->PutTensor("small", DType::kUInt8, {100}, small).ok());
    REQUIRE(w->Commit().ok());
  }
  for (auto [backend, cow] : {std::pair{Backend::kMmap, false},
                              {Backend::kMmap, true},
                              {Backend::kPread, false}}) {
    ReadOptions ro;
    ro.backend = backend;
    ro.copy_on_write = cow;
    auto ck = Checkpoint::Open(path, ro);
    REQUIRE(ck.ok());
    REQUIRE(ck->num_storages() == 2);
    for (size_t i = 0; i < 2; ++i) {
      const auto& want =
          ck->StorageInfoAt(i)->nbytes == big.size() ? big : small;
      auto view = ck->Storage(i);
      REQUIRE(view.ok());
      CHECK(std::equal(view->data.begin(), view->data.end(), want.begin(),
                       want.end()));
      std::vector<std::byte> out(want.size() - 10);
      REQUIRE(ck->ReadStorage(i, 10, out).ok());
      CHECK(std::equal(out.begin(), out.end(), want.begin() + 10));
      // Past the end, by one byte.
      std::vector<std::byte> over(want.size());
      auto bad = ck->ReadStorage(i, 1, over);
      CHECK(bad.code() == ErrorCode::kInvalidArgument);
    }
    CHECK(ck->Storage(2).status().code() == ErrorCode::kInvalidArgument);
    CHECK(ck->ReadStorage(2, 0, {}).code() == ErrorCode::kInvalidArgument);
    if (cow) {
      // A private mapping takes writes; the file and other openers never see
      // them.
      auto view = ck->Storage(0);
      REQUIRE(view.ok());
      auto* p = const_cast<std::byte*>(view->data.data());
      std::byte before = p[0];
      p[0] = ~before;
      auto again = Checkpoint::Open(path);
      REQUIRE(again.ok());
      CHECK(again->Storage(0)->data[0] == before);
      CHECK(again->Verify().ok());
      CHECK(ck->Storage(0)->data[0] == ~before);
    }
  }
}

TEST_CASE("ReadStorages copies many ranges in parallel pieces, or nothing") {
  TempDir dir;
  std::string path = dir.File("r.ckpt");
  // 20 MiB: three 8 MiB pieces, so one storage spreads over the threads.
  auto big = Pattern(20 << 20, 5);
  auto small = Pattern(1000, 6);
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(
        w->PutTensor("big", DType::kUInt8, {int64_t(big.size())}, big).ok());
    REQUIRE(w->PutTensor("small", DType::kUInt8, {1000}, small).ok());
    REQUIRE(w->Commit().ok());
  }
  for (Backend backend : {Backend::kMmap, Backend::kPread}) {
    ReadOptions ro;
    ro.backend = backend;
    auto ck = Checkpoint::Open(path, ro);
    REQUIRE(ck.ok());
    size_t ib = ck->StorageInfoAt(0)->nbytes == big.size() ? 0 : 1;
    std::vector<std::byte> a(big.size() - 7), b(small.size()), c(0);
    Checkpoint::StorageRead reads[] = {
        {ib, 7, a}, {1 - ib, 0, b}, {ib, big.size(), c}};
    for (unsigned threads : {1u, 3u, 0u}) {
      std::fill(a.begin(), a.end(), std::byte{0});
      REQUIRE(ck->ReadStorages(reads, threads).ok());
      CHECK(std::equal(a.begin(), a.end(), big.begin() + 7));
      CHECK(std::equal(b.begin(), b.end(), small.begin()));
    }
    // One bad range (a byte past the end) and nothing is copied.
    std::vector<std::byte> over(small.size());
    std::fill(a.begin(), a.end(), std::byte{0});
    Checkpoint::StorageRead bad[] = {{ib, 7, a}, {1 - ib, 1, over}};
    Status s = ck->ReadStorages(bad);
    CHECK(s.code() == ErrorCode::kInvalidArgument);
    CHECK(s.ToString().find("read 1") != std::string::npos);
    CHECK(std::all_of(a.begin(), a.end(),
                      [](std::byte x) { return x == std::byte{0}; }));
    Checkpoint::StorageRead missing[] = {{7, 0, {}}};
    CHECK(ck->ReadStorages(missing).code() == ErrorCode::kInvalidArgument);
    CHECK(ck->ReadStorages({}).ok());
  }
}

TEST_CASE("every ByteSource read checks its range itself, for every backend") {
  TempDir dir;
  std::string path = dir.File("b.bin");
  auto bytes = Pattern(5000, 9);
  {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f);
    REQUIRE(fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size());
    fclose(f);
  }
  std::vector<std::shared_ptr<internal::ByteSource>> sources;
  sources.push_back(internal::BufferSource(bytes, "buf"));
  for (bool pread : {false, true}) {
    auto s = internal::OpenSource(path, {.pread = pread});
    REQUIRE(s.ok());
    sources.push_back(*s);
  }
  for (const auto& src : sources) {
    INFO(src->name());
    auto whole = src->Read(0, 5000);
    REQUIRE(whole.ok());
    CHECK(whole->data.size() == 5000);
    CHECK(src->Read(5000, 0).ok());
    std::vector<std::byte> out(10);
    // One byte past the end, a start past the end, and an offset + len
    // that overflows 64 bits: errors naming the file, never a read.
    for (auto [off, len] : {std::pair<uint64_t, uint64_t>{4991, 10},
                            {5001, 0},
                            {UINT64_MAX - 4, 10}}) {
      auto r = src->Read(off, len);
      CHECK(r.status().code() == ErrorCode::kCorrupt);
      CHECK(r.status().ToString().find("past the end") != std::string::npos);
      CHECK(src->ReadWritable(off, len).status().code() == ErrorCode::kCorrupt);
      CHECK(src->Populate(off, len).code() == ErrorCode::kCorrupt);
    }
    CHECK(src->ReadInto(4991, out).code() == ErrorCode::kCorrupt);
    REQUIRE(src->ReadInto(4990, out).ok());
    CHECK(std::equal(out.begin(), out.end(), bytes.begin() + 4990));
    src->Release(4000, UINT64_MAX);  // cut at the end, no fault
    src->Release(UINT64_MAX, 1);
  }
}
