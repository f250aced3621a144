// Every rule of docs/FORMAT.md section 8 rejects what it should, with a
// clear error naming what and where. Never a crash: run under ASan/UBSan.
#include <catch2/catch.hpp>

#include "catch_util.h"
#include "craft.h"

using namespace ckpt;
using namespace ckpt::test;

TEST_CASE("the crafting helper round-trips a valid file unchanged in meaning") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  REQUIRE(!f.empty());
  CHECK(OpenBytes(f).ok());
  CHECK(OpenBytes(MutateHeader(f, [](fb::HeaderT&) {})).ok());
}

TEST_CASE("R1: a file shorter than the preamble is rejected") {
  std::vector<std::byte> f(10);
  RequireError(OpenBytes(f), ErrorCode::kCorrupt, "shorter than the 64-byte");
  TempDir dir;
  WriteAll(dir.File("empty"), {});
  RequireError(Checkpoint::Open(dir.File("empty")).status(),
               ErrorCode::kCorrupt, "empty:0: corrupt: file is 0 bytes");
}

TEST_CASE("R2: bad magic is rejected, naming likely formats") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  auto g = f;
  g[1] = std::byte{'X'};
  RequireError(OpenBytes(g), ErrorCode::kCorrupt,
               "crafted:0: corrupt: bad magic");
  std::memcpy(g.data(), "PK\x03\x04", 4);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt, "pth2ckpt");
  // A pickle (legacy .pth) starts 0x80 <protocol 2..5>; a safetensors file
  // starts with its header length, whose first byte may be 0x80 too.
  std::memcpy(g.data(), "\x80\x02\x8a\x0al\xfc\x9c", 7);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt, "looks like a pickle");
  std::memcpy(g.data(), "\x80\x00\x04\x00\x00\x00\x00\x00{", 9);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt, "safetensors");
}

TEST_CASE("R3: a newer major version is refused naming both versions") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  f[8] = std::byte{2};
  SealPreamble(f);
  RequireError(OpenBytes(f), ErrorCode::kUnsupportedVersion,
               "format version 2.0, newer than this reader (1.x)");
  f[8] = std::byte{0};
  f[9] = std::byte{1};
  SealPreamble(f);
  RequireError(OpenBytes(f), ErrorCode::kUnsupportedVersion, "byte-swapped");
  // A newer minor version of the same major is read.
  auto g = SmallFile(dir.File("t.ckpt"));
  g[10] = std::byte{7};
  SealPreamble(g);
  auto ck = Checkpoint::OpenBuffer(g);
  REQUIRE(ck.ok());
  CHECK(ck->format_minor() == 7);
}

TEST_CASE("R4: a preamble checksum mismatch is rejected") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  f[20] ^= std::byte{1};  // data_offset, not re-sealed
  RequireError(OpenBytes(f), ErrorCode::kChecksumMismatch,
               "crafted:56: checksum mismatch: preamble checksum");
}

TEST_CASE("R5: unknown flags are refused") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  f[12] = std::byte{1};
  SealPreamble(f);
  RequireError(OpenBytes(f), ErrorCode::kUnsupportedVersion, "flags");
}

TEST_CASE("R6-R7: section offsets and sizes are checked") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  auto g = f;
  PutU64(g, internal::kOffDataOffset, 100);
  SealPreamble(g);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt, "crafted:16:");
  g = f;
  PutU64(g, internal::kOffDataSize, UINT64_MAX - 10);  // overflow
  SealPreamble(g);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt,
               "runs past the header offset");
  g = f;
  PutU64(g, internal::kOffHeaderOffset,
         GetU64(f, internal::kOffHeaderOffset) + 4);
  SealPreamble(g);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt, "not a multiple of 8");
  g = f;
  PutU64(g, internal::kOffHeaderSize, UINT64_MAX);
  SealPreamble(g);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt,
               "does not end at end of file");
  g = f;
  g.push_back(std::byte{0});  // trailing garbage
  RequireError(OpenBytes(g), ErrorCode::kCorrupt, "appended to");
}

TEST_CASE("truncation at every length is an error, never a crash") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  for (size_t n = 0; n < f.size(); ++n) {
    std::vector<std::byte> g(f.begin(), f.begin() + static_cast<long>(n));
    Status s = OpenBytes(g);
    INFO("length " << n);
    REQUIRE_FALSE(s.ok());
  }
  // And from a real file, through both backends.
  std::vector<std::byte> half(f.begin(),
                              f.begin() + static_cast<long>(f.size() / 2));
  WriteAll(dir.File("half.ckpt"), half);
  for (Backend b : {Backend::kMmap, Backend::kPread}) {
    ReadOptions ro;
    ro.backend = b;
    RequireError(Checkpoint::Open(dir.File("half.ckpt"), ro).status(),
                 ErrorCode::kCorrupt, "half.ckpt:40: corrupt:");
  }
}

TEST_CASE("R9: any flipped header bit is caught by the header checksum") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  for (size_t i = hoff; i < f.size(); ++i) {
    auto g = f;
    g[i] ^= std::byte{0x10};
    Status s = OpenBytes(g);
    INFO("byte " << i);
    REQUIRE(s.code() == ErrorCode::kChecksumMismatch);
    REQUIRE(s.offset() == static_cast<int64_t>(hoff));
  }
}

TEST_CASE("R10: a header that is not a valid FlatBuffer is rejected") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  // Flip bits and re-seal the checksum, so only the Verifier stands guard.
  for (size_t i = hoff; i < f.size(); ++i) {
    for (uint8_t bit : {uint8_t{0x01}, uint8_t{0x80}}) {
      auto g = f;
      g[i] ^= std::byte{bit};
      PutU64(g, internal::kOffHeaderHash,
             internal::Xxh3({g.data() + hoff, g.size() - hoff}));
      SealPreamble(g);
      auto ck = Checkpoint::OpenBuffer(g, "crafted");
      if (!ck.ok()) continue;  // rejected: fine
      // Accepted (the bit was in a value): then every access must be safe.
      for (size_t t = 0; t < ck->num_tensors(); ++t) {
        auto ref = ck->TensorAt(t);
        if (ref.ok()) {
          std::vector<std::byte> out(static_cast<size_t>(ref->info().nbytes()));
          CHECK(ref->CopyTo(out).ok());
        }
      }
      (void)ck->Verify();
      (void)ck->Get("n");
    }
  }
  auto g = f;
  std::memcpy(g.data() + hoff + 4, "XXXX", 4);  // file identifier
  PutU64(g, internal::kOffHeaderHash,
         internal::Xxh3({g.data() + hoff, g.size() - hoff}));
  SealPreamble(g);
  RequireError(OpenBytes(g), ErrorCode::kCorrupt, "FlatBuffers verification");
}

TEST_CASE("R11: a bad checksum chunk size is rejected") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  for (uint64_t c :
       {uint64_t{0}, uint64_t{1000}, uint64_t{4097}, uint64_t{1} << 31}) {
    RequireError(
        OpenBytes(MutateHeader(f, [&](fb::HeaderT& h) { h.chunk_size = c; })),
        ErrorCode::kCorrupt, "chunk size");
  }
}

TEST_CASE("R12: blobs past the end, overlapping or misaligned are rejected") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  RequireError(
      OpenBytes(MutateHeader(
          f, [](fb::HeaderT& h) { h.storages[1]->offset = 1ull << 40; })),
      ErrorCode::kCorrupt, "ends past the data section");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        h.storages[1]->offset =
                                            h.storages[0]->offset;
                                      })),
               ErrorCode::kCorrupt, "overlaps the previous blob");
  RequireError(OpenBytes(MutateHeader(
                   f, [](fb::HeaderT& h) { h.storages[1]->offset += 8; })),
               ErrorCode::kCorrupt, "is not aligned to 64");
  RequireError(
      OpenBytes(MutateHeader(
          f, [](fb::HeaderT& h) { h.storages[0]->nbytes = UINT64_MAX - 100; })),
      ErrorCode::kCorrupt, "storage 0");
  RequireError(
      OpenBytes(MutateHeader(
          f, [](fb::HeaderT& h) { h.storages[0]->chunk_hashes.push_back(0); })),
      ErrorCode::kCorrupt, "chunk checksums");
  RequireError(
      OpenBytes(MutateHeader(
          f, [](fb::HeaderT& h) { h.storages[0]->device = "cuda 0"; })),
      ErrorCode::kCorrupt, "device");
  // Offsets in errors are byte positions in the file.
  Status s = OpenBytes(MutateHeader(f, [](fb::HeaderT& h) {
    h.storages[1]->offset = h.storages[0]->offset;
  }));
  CHECK(s.offset() == 4096);
}

TEST_CASE("R13: tensor extents past their storage and shape overflow") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  auto tensor = [](fb::HeaderT& h, const char* p) -> fb::TensorT& {
    for (auto& t : h.tensors) {
      if (t->path == p) return *t;
    }
    throw std::runtime_error("no tensor");
  };
  RequireError(OpenBytes(MutateHeader(
                   f, [&](fb::HeaderT& h) { tensor(h, "a").shape = {5}; })),
               ErrorCode::kCorrupt,
               "tensor 'a': tensor 0: view needs 20 bytes");
  RequireError(
      OpenBytes(MutateHeader(
          f, [&](fb::HeaderT& h) { tensor(h, "a").storage_offset = 1; })),
      ErrorCode::kCorrupt, "view needs");
  RequireError(OpenBytes(MutateHeader(
                   f,
                   [&](fb::HeaderT& h) {
                     tensor(h, "b").shape = {int64_t{1} << 62, 1 << 8};
                     tensor(h, "b").strides = {0, 0};
                   })),
               ErrorCode::kCorrupt, "overflows");
  RequireError(
      OpenBytes(MutateHeader(f,
                             [&](fb::HeaderT& h) {
                               tensor(h, "b").strides = {int64_t{1} << 62, 1};
                             })),
      ErrorCode::kCorrupt, "overflows");
  RequireError(OpenBytes(MutateHeader(f,
                                      [&](fb::HeaderT& h) {
                                        tensor(h, "b").shape = {-1, 3};
                                      })),
               ErrorCode::kCorrupt, "negative size");
  RequireError(OpenBytes(MutateHeader(
                   f, [&](fb::HeaderT& h) { tensor(h, "b").strides = {3}; })),
               ErrorCode::kCorrupt, "strides");
  RequireError(OpenBytes(MutateHeader(f,
                                      [&](fb::HeaderT& h) {
                                        tensor(h, "b").dtype =
                                            static_cast<fb::DType>(200);
                                      })),
               ErrorCode::kCorrupt, "unknown dtype");
  RequireError(OpenBytes(MutateHeader(
                   f, [&](fb::HeaderT& h) { tensor(h, "b").storage = 9; })),
               ErrorCode::kCorrupt, "storage index 9");
  RequireError(OpenBytes(MutateHeader(
                   f, [&](fb::HeaderT& h) { tensor(h, "b").path = "a"; })),
               ErrorCode::kCorrupt, "duplicate path");
  RequireError(
      OpenBytes(MutateHeader(
          f, [&](fb::HeaderT& h) { std::swap(h.tensors[0], h.tensors[1]); })),
      ErrorCode::kCorrupt, "not sorted");
}

TEST_CASE("R14: the object tree must be a tree over every tensor") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  // Nodes (post-order): "a"-key, tensor a, "b"-key, tensor b, "n"-key, 5, root.
  RequireError(
      OpenBytes(MutateHeader(f, [](fb::HeaderT& h) { h.nodes.clear(); })),
      ErrorCode::kCorrupt, "no root");
  RequireError(
      OpenBytes(MutateHeader(f,
                             [](fb::HeaderT& h) {
                               h.nodes.back()->items[0] =
                                   static_cast<uint32_t>(h.nodes.size() - 1);
                             })),
      ErrorCode::kCorrupt, "does not precede its parent");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        h.nodes.back()->items[2] =
                                            h.nodes.back()->items[1];
                                      })),
               ErrorCode::kCorrupt, "already has a parent");
  RequireError(OpenBytes(MutateHeader(
                   f, [](fb::HeaderT& h) { h.nodes.back()->keys.pop_back(); })),
               ErrorCode::kCorrupt, "keys and");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        h.nodes.back()->kind =
                                            static_cast<fb::ValueKind>(99);
                                      })),
               ErrorCode::kCorrupt, "unknown kind");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        // Make tensor b's node point at tensor
                                        // a: a twice, b never.
                                        for (auto& n : h.nodes) {
                                          if (n->kind == fb::ValueKind::Tensor)
                                            n->int_value = 0;
                                        }
                                      })),
               ErrorCode::kCorrupt, "referenced twice");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        auto extra =
                                            std::make_unique<fb::NodeT>();
                                        h.nodes.insert(h.nodes.begin(),
                                                       std::move(extra));
                                        for (auto& n : h.nodes) {
                                          for (auto& i : n->items) ++i;
                                          for (auto& k : n->keys) ++k;
                                        }
                                      })),
               ErrorCode::kCorrupt, "not reachable");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        for (auto& n : h.nodes) {
                                          if (n->kind == fb::ValueKind::Int)
                                            n->kind = fb::ValueKind::Bool;
                                        }
                                      })),
               ErrorCode::kCorrupt, "neither 0 nor 1");
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        // Key node 0 ("a") becomes a list: not
                                        // hashable.
                                        h.nodes[0]->kind = fb::ValueKind::List;
                                      })),
               ErrorCode::kCorrupt, "cannot be a dict key");
}

TEST_CASE("R15: metadata keys must be sorted and unique") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  RequireError(OpenBytes(MutateHeader(f,
                                      [](fb::HeaderT& h) {
                                        for (auto k : {"b", "a"}) {
                                          auto kv =
                                              std::make_unique<fb::KeyValueT>();
                                          kv->key = k;
                                          h.metadata.push_back(std::move(kv));
                                        }
                                      })),
               ErrorCode::kCorrupt, "metadata keys");
}

TEST_CASE("R16: verify finds a tensor path that disagrees with the tree") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  auto g = MutateHeader(f, [](fb::HeaderT& h) { h.tensors[0]->path = "0a"; });
  auto ck = Checkpoint::OpenBuffer(g, "crafted");
  REQUIRE(ck.ok());  // cheap open does not walk paths
  RequireError(ck->Verify(), ErrorCode::kCorrupt, "tensor '0a'");
}

TEST_CASE("R17: verify names the tensor whose data byte was corrupted") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  auto ck0 = Checkpoint::OpenBuffer(f, "x");
  REQUIRE(ck0.ok());
  uint64_t b_off = ck0->StorageInfoAt(ck0->FindTensor("b")->storage)->offset;
  auto g = f;
  g[b_off + 9] ^= std::byte{4};
  WriteAll(dir.File("bad.ckpt"), g);
  for (Backend be : {Backend::kMmap, Backend::kPread}) {
    ReadOptions ro;
    ro.backend = be;
    auto ck = Checkpoint::Open(dir.File("bad.ckpt"), ro);
    REQUIRE(ck.ok());  // open does not hash data
    Status s = ck->Verify();
    RequireError(s, ErrorCode::kChecksumMismatch, "tensor 'b'");
    CHECK(s.offset() == static_cast<int64_t>(b_off));
    CHECK(s.file() == dir.File("bad.ckpt"));
    // With verify_checksums, reading the tensor fails; its neighbour reads.
    ro.verify_checksums = true;
    auto ck2 = Checkpoint::Open(dir.File("bad.ckpt"), ro);
    REQUIRE(ck2.ok());
    RequireError(ck2->Tensor("b").status(), ErrorCode::kChecksumMismatch,
                 "tensor 'b'");
    CHECK(ck2->Tensor("a").ok());
  }
}

TEST_CASE("R18: verify requires zero padding") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  auto g = f;
  g[100] = std::byte{1};  // between preamble and data section
  auto ck = Checkpoint::OpenBuffer(g, "crafted");
  REQUIRE(ck.ok());
  Status s = ck->Verify();
  RequireError(s, ErrorCode::kCorrupt, "padding");
  CHECK(s.offset() == 100);
}

TEST_CASE("R8: a header size over the cap is refused before it is read") {
  TempDir dir;
  auto f = SmallFile(dir.File("s.ckpt"));
  // Claim a 2 GiB header ending at the (fake) end of a 2 GiB+ file: the
  // pread backend would have to allocate it; R8 refuses first.
  auto g = f;
  uint64_t big = (1ull << 31);
  PutU64(g, internal::kOffHeaderSize, big);
  PutU64(g, internal::kOffHeaderOffset, 4096);
  PutU64(g, internal::kOffDataSize, 0);
  SealPreamble(g);
  Status s = internal::DecodePreamble(g, 4096 + big).status();
  RequireError(s, ErrorCode::kCorrupt, "outside [8, 1073741824]");
  CHECK(s.offset() == internal::kOffHeaderSize);
}

// Headers of a few thousand tensors are checked on two threads (the
// checksum beside the Verifier, the tables beside the tree): the error must
// still be the one a serial check reports first, in rule order.
TEST_CASE("a large header reports the first failing rule, as a small one") {
  TempDir dir;
  const std::string path = dir.File("big.ckpt");
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    std::vector<float> v = {1, 2};
    for (int i = 0; i < 4000; ++i) {
      char name[32];
      std::snprintf(name, sizeof name, "layer.%04d.weight", i);
      REQUIRE(w->PutTensor(name, DType::kFloat32, {2}, Bytes(v)).ok());
    }
    REQUIRE(w->Commit().ok());
  }
  auto f = ReadAll(path);
  {
    auto ck = Checkpoint::Open(path);
    REQUIRE(ck.ok());
    REQUIRE(ck->layout().header_size >= (256u << 10));
  }
  const uint64_t hoff = GetU64(f, internal::kOffHeaderOffset);
  // R9 before R10: a flip anywhere is a checksum error, even where it also
  // breaks the FlatBuffer.
  for (uint64_t at : {hoff, hoff + 4, hoff + (f.size() - hoff) / 2,
                      static_cast<uint64_t>(f.size() - 1)}) {
    auto g = f;
    g[at] ^= std::byte{0xFF};
    INFO("byte " << at);
    CHECK(OpenBytes(g).code() == ErrorCode::kChecksumMismatch);
  }
  auto bad_storage = [](fb::HeaderT& h) { h.storages[10]->offset += 1; };
  auto bad_tensor = [](fb::HeaderT& h) { h.tensors[20]->shape = {5}; };
  auto bad_tree = [](fb::HeaderT& h) {
    h.nodes[30]->kind = static_cast<fb::ValueKind>(200);
  };
  RequireError(OpenBytes(MutateHeader(f, bad_tree)), ErrorCode::kCorrupt,
               "unknown kind 200");
  RequireError(OpenBytes(MutateHeader(f,
                                      [&](fb::HeaderT& h) {
                                        bad_tree(h);
                                        bad_tensor(h);
                                      })),
               ErrorCode::kCorrupt, "tensor 20: view needs");
  RequireError(OpenBytes(MutateHeader(f,
                                      [&](fb::HeaderT& h) {
                                        bad_tree(h);
                                        bad_tensor(h);
                                        bad_storage(h);
                                      })),
               ErrorCode::kCorrupt, "storage 10");
}
