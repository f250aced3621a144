// Write, reopen, compare: every dtype, odd shapes, views, shared storages,
// every tree node kind, determinism, and both backends.
#include <catch2/catch.hpp>
#include <cmath>
#include <numeric>

#include "test_util.h"

using namespace ckpt;
using namespace ckpt::test;

namespace {

std::vector<std::byte> Contiguous(const TensorRef& t) {
  std::vector<std::byte> out(static_cast<size_t>(t.info().nbytes()));
  REQUIRE(t.CopyTo(out).ok());
  return out;
}

}  // namespace

TEST_CASE("round trip of every dtype, both backends") {
  TempDir dir;
  std::string path = dir.File("all.ckpt");
  std::vector<std::vector<std::byte>> data;
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    for (uint8_t c = 1; c <= kMaxDTypeCode; ++c) {
      auto d = static_cast<DType>(c);
      data.push_back(Pattern(DTypeSize(d) * 15, c));
      REQUIRE(
          w->PutTensor(std::string(DTypeName(d)), d, {3, 5}, data.back()).ok());
    }
    REQUIRE(w->Commit().ok());
  }
  for (Backend backend : {Backend::kMmap, Backend::kPread}) {
    ReadOptions ro;
    ro.backend = backend;
    ro.verify_checksums = true;
    auto ck = Checkpoint::Open(path, ro);
    REQUIRE(ck.ok());
    REQUIRE(ck->num_tensors() == kMaxDTypeCode);
    for (uint8_t c = 1; c <= kMaxDTypeCode; ++c) {
      auto d = static_cast<DType>(c);
      auto t = ck->Tensor(DTypeName(d));
      REQUIRE(t.ok());
      CHECK(t->dtype() == d);
      CHECK(t->shape() == std::vector<int64_t>{3, 5});
      CHECK(t->strides() == std::vector<int64_t>{5, 1});
      REQUIRE(t->data().size() == data[c - 1].size());
      CHECK(
          std::equal(t->data().begin(), t->data().end(), data[c - 1].begin()));
      // Zero-copy with mmap: every blob is aligned in the file.
      CHECK(reinterpret_cast<uintptr_t>(t->data().data()) % kMinAlignment == 0);
    }
    CHECK(ck->Verify().ok());
  }
}

TEST_CASE("0-dim, zero-element and huge-dimension tensors") {
  TempDir dir;
  std::string path = dir.File("shapes.ckpt");
  double scalar = 3.25;
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("scalar", DType::kFloat64, {},
                         std::as_bytes(std::span(&scalar, 1)))
                .ok());
    REQUIRE(w->PutTensor("empty", DType::kFloat32, {0, 4}, {}).ok());
    // A 2^40-element expanded view of one element (stride 0), as torch's
    // expand() makes: huge shape, 2 bytes of storage.
    uint16_t one = 0x3c00;
    auto s = w->AddStorage(std::as_bytes(std::span(&one, 1)));
    REQUIRE(s.ok());
    TensorSpec spec;
    spec.dtype = DType::kFloat16;
    spec.shape = {int64_t{1} << 20, int64_t{1} << 20};
    spec.strides = {0, 0};
    spec.storage = *s;
    auto t = w->AddTensor(spec);
    REQUIRE(t.ok());
    REQUIRE(w->PutValue("huge", *t).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  auto s = ck->Tensor("scalar");
  REQUIRE(s.ok());
  CHECK(s->shape().empty());
  CHECK(s->numel() == 1);
  CHECK(*reinterpret_cast<const double*>(s->data().data()) == 3.25);
  auto e = ck->Tensor("empty");
  REQUIRE(e.ok());
  CHECK(e->numel() == 0);
  CHECK(e->data().empty());
  CHECK(Contiguous(*e).empty());
  auto h = ck->Tensor("huge");
  REQUIRE(h.ok());
  CHECK(h->numel() == int64_t{1} << 40);
  CHECK(h->data().size() == 2);
  auto rows = ck->TensorRows("huge", 5, 7);
  REQUIRE(rows.ok());
  CHECK(rows->shape() == std::vector<int64_t>{2, int64_t{1} << 20});
  CHECK(ck->Verify().ok());
}

TEST_CASE("strided views and shared storages are stored once and kept") {
  TempDir dir;
  std::string path = dir.File("views.ckpt");
  std::vector<float> base(24);
  std::iota(base.begin(), base.end(), 0.0f);
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    auto s = w->AddStorage(Bytes(base), "cuda:1");
    REQUIRE(s.ok());
    TensorSpec full{DType::kFloat32, {4, 6}, {}, *s, 0, true, true};
    TensorSpec transposed{DType::kFloat32, {6, 4}, {1, 6}, *s, 0};
    TensorSpec slice{
        DType::kFloat32, {2, 3}, {3, 1}, *s, 2};  // base[2:8].view(2,3)
    TensorSpec tied{DType::kFloat32, {4, 6}, {}, *s, 0};
    std::vector<NodeId> keys, vals;
    for (auto [name, spec] : {std::pair{"full", full},
                              {"t", transposed},
                              {"slice", slice},
                              {"tied", tied}}) {
      keys.push_back(w->AddString(name));
      auto n = w->AddTensor(spec);
      REQUIRE(n.ok());
      vals.push_back(*n);
    }
    auto root = w->AddDict(keys, vals);
    REQUIRE(root.ok());
    REQUIRE(w->SetRoot(*root).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  CHECK(ck->num_storages() == 1);
  CHECK(ck->StorageInfoAt(0)->nbytes == 24 * 4);
  CHECK(ck->StorageInfoAt(0)->device == "cuda:1");
  auto full = ck->FindTensor("full");
  REQUIRE(full.ok());
  CHECK(full->requires_grad);
  CHECK(full->is_parameter);
  auto tied = ck->FindTensor("tied");
  REQUIRE(tied.ok());
  CHECK(tied->storage == full->storage);

  auto t = ck->Tensor("t");
  REQUIRE(t.ok());
  CHECK_FALSE(t->is_contiguous());
  auto tc = Contiguous(*t);
  const float* f = reinterpret_cast<const float*>(tc.data());
  for (size_t i = 0; i < 6; ++i) {
    for (size_t j = 0; j < 4; ++j) CHECK(f[i * 4 + j] == base[j * 6 + i]);
  }
  auto sl = ck->Tensor("slice");
  REQUIRE(sl.ok());
  auto sc = Contiguous(*sl);
  const float* g = reinterpret_cast<const float*>(sc.data());
  for (int i = 0; i < 6; ++i) CHECK(g[i] == float(2 + i));
  // Rows of a transposed view: rows 2..4 of t are columns 2..4 of base.
  auto r = ck->TensorRows("t", 2, 4);
  REQUIRE(r.ok());
  auto rc = Contiguous(*r);
  const float* h = reinterpret_cast<const float*>(rc.data());
  for (size_t i = 0; i < 2; ++i) {
    for (size_t j = 0; j < 4; ++j) CHECK(h[i * 4 + j] == base[j * 6 + 2 + i]);
  }
  CHECK(ck->Verify().ok());
}

TEST_CASE("row slices are views of exactly the rows' bytes") {
  TempDir dir;
  std::string path = dir.File("rows.ckpt");
  std::vector<int32_t> v(100 * 7);
  std::iota(v.begin(), v.end(), 0);
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("m", DType::kInt32, {100, 7}, Bytes(v)).ok());
    REQUIRE(w->Commit().ok());
  }
  for (Backend b : {Backend::kMmap, Backend::kPread}) {
    ReadOptions ro;
    ro.backend = b;
    auto ck = Checkpoint::Open(path, ro);
    REQUIRE(ck.ok());
    auto r = ck->TensorRows("m", 10, 13);
    REQUIRE(r.ok());
    CHECK(r->shape() == std::vector<int64_t>{3, 7});
    REQUIRE(r->data().size() == 3 * 7 * 4);
    CHECK(reinterpret_cast<const int32_t*>(r->data().data())[0] == 70);
    CHECK(ck->TensorRows("m", 0, 0).ok());
    CHECK(ck->TensorRows("m", 100, 100).ok());
    CHECK(ck->TensorRows("m", 5, 101).status().code() ==
          ErrorCode::kInvalidArgument);
    CHECK(ck->TensorRows("m", -1, 3).status().code() ==
          ErrorCode::kInvalidArgument);
    CHECK(ck->TensorRows("m", 4, 3).status().code() ==
          ErrorCode::kInvalidArgument);
    CHECK(ck->TensorRows("nope", 0, 1).status().code() == ErrorCode::kNotFound);
  }
}

TEST_CASE("every object-tree kind round-trips, with int and tuple keys") {
  TempDir dir;
  std::string path = dir.File("tree.ckpt");
  std::vector<float> w1 = {1, 2}, w2 = {3};
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    // {"epoch": 3, "loss": 0.25, "name": "run/1", "flag": True, "none": None,
    //  "big": 2**70, "neg": -(2**70), "c": 1+2j, "raw": b"\x00\xff",
    //  "dt": torch.bfloat16, "dev": cuda:1, "list": [1, [2]], "tup": (1,),
    //  "set": {7}, "fs": frozenset(), "opt": {"state": {0: {"exp_avg": T}}},
    //  (1, "a"): "tuple key", 5: "int key", "w": T}
    std::vector<NodeId> k, v;
    auto put = [&](NodeId key, NodeId val) {
      k.push_back(key);
      v.push_back(val);
    };
    put(w->AddString("epoch"), w->AddInt(3));
    put(w->AddString("loss"), w->AddFloat(0.25));
    put(w->AddString("negzero"), w->AddFloat(-0.0));
    put(w->AddString("cneg"), w->AddComplex(-0.0, -0.0));
    put(w->AddString("name"), w->AddString("run/1"));
    put(w->AddString("flag"), w->AddBool(true));
    put(w->AddString("none"), w->AddNone());
    std::vector<uint8_t> big = {0, 0, 0, 0, 0, 0, 0, 0, 0x40};  // 2^70
    std::vector<uint8_t> neg = {0, 0, 0, 0, 0, 0, 0, 0, 0xC0};  // -2^70
    put(w->AddString("big"), w->AddBigInt(big).value());
    put(w->AddString("neg"), w->AddBigInt(neg).value());
    put(w->AddString("c"), w->AddComplex(1, 2));
    std::vector<uint8_t> raw = {0, 255};
    put(w->AddString("raw"), w->AddBytes(raw));
    put(w->AddString("dt"), w->AddDType(DType::kBFloat16).value());
    put(w->AddString("dev"), w->AddDevice("cuda:1").value());
    NodeId inner[] = {w->AddInt(2)};
    NodeId list_items[] = {w->AddInt(1), w->AddList(inner).value()};
    put(w->AddString("list"), w->AddList(list_items).value());
    NodeId tup[] = {w->AddInt(1)};
    put(w->AddString("tup"), w->AddTuple(tup).value());
    NodeId set_items[] = {w->AddInt(7)};
    put(w->AddString("set"), w->AddSet(set_items).value());
    put(w->AddString("fs"), w->AddFrozenSet({}).value());
    NodeId ea_k[] = {w->AddString("exp_avg")};
    NodeId ea_v[] = {w->AddTensor(DType::kFloat32, {2}, Bytes(w1)).value()};
    NodeId s0_k[] = {w->AddInt(0)};
    NodeId s0_v[] = {w->AddDict(ea_k, ea_v).value()};
    NodeId st_k[] = {w->AddString("state")};
    NodeId st_v[] = {w->AddDict(s0_k, s0_v).value()};
    put(w->AddString("opt"),
        w->AddDict(st_k, st_v, "collections.OrderedDict").value());
    NodeId tk[] = {w->AddInt(1), w->AddString("a")};
    put(w->AddTuple(tk).value(), w->AddString("tuple key"));
    put(w->AddInt(5), w->AddString("int key"));
    put(w->AddString("w"),
        w->AddTensor(DType::kFloat32, {1}, Bytes(w2)).value());
    auto root = w->AddDict(k, v);
    REQUIRE(root.ok());
    REQUIRE(w->SetRoot(*root).ok());
    REQUIRE(w->SetMetadata("format", "pt").ok());
    REQUIRE(w->SetMetadata("author", "me").ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  auto get = [&](const char* p) {
    auto r = ck->Get(p);
    INFO(p << ": " << r.status().ToString());
    REQUIRE(r.ok());
    return *r;
  };
  CHECK(get("epoch").as_int() == 3);
  CHECK(get("loss").as_float() == 0.25);
  CHECK(std::signbit(get("negzero").as_float()));
  CHECK(std::signbit(get("cneg").as_complex().real()));
  CHECK(std::signbit(get("cneg").as_complex().imag()));
  CHECK(get("name").as_string() == "run/1");
  CHECK(get("flag").as_bool());
  CHECK(get("none").kind() == ValueKind::kNone);
  CHECK(get("big").BigIntToDecimal() == "1180591620717411303424");
  CHECK(get("neg").BigIntToDecimal() == "-1180591620717411303424");
  CHECK(get("c").as_complex() == std::complex<double>(1, 2));
  CHECK(get("raw").as_bytes().size() == 2);
  CHECK(get("raw").as_bytes()[1] == 255);
  CHECK(get("dt").as_dtype() == DType::kBFloat16);
  CHECK(get("dev").as_string() == "cuda:1");
  CHECK(get("dev").kind() == ValueKind::kDevice);
  CHECK(get("list/1/0").as_int() == 2);
  CHECK(get("tup").kind() == ValueKind::kTuple);
  CHECK(get("set/0").as_int() == 7);
  CHECK(get("fs").size() == 0);
  CHECK(get("opt").type_name() == "collections.OrderedDict");
  CHECK(get("(1,a)").as_string() == "tuple key");
  CHECK(get("5").as_string() == "int key");
  CHECK(get("").kind() == ValueKind::kDict);
  // Tensor paths follow the tree (DESIGN.md contract).
  auto t = ck->Tensor("opt/state/0/exp_avg");
  REQUIRE(t.ok());
  CHECK(reinterpret_cast<const float*>(t->data().data())[1] == 2.0f);
  auto node = get("opt/state/0/exp_avg");
  CHECK(node.kind() == ValueKind::kTensor);
  CHECK(node.tensor_info().value().path == "opt/state/0/exp_avg");
  CHECK(ck->Tensor("w").ok());
  // Dict order is kept.
  Value root = ck->root();
  REQUIRE(root.size() == 21);
  CHECK(root.key(0).as_string() == "epoch");
  CHECK(root.key(19).as_int() == 5);
  // Errors name the missing piece.
  auto missing = ck->Get("opt/nope");
  CHECK(missing.status().code() == ErrorCode::kNotFound);
  CHECK(missing.status().ToString().find("nope") != std::string::npos);
  CHECK(ck->Get("list/2").status().code() == ErrorCode::kNotFound);
  CHECK(ck->Get("list/01").status().code() == ErrorCode::kNotFound);
  CHECK(ck->Get("epoch/x").status().code() == ErrorCode::kNotFound);
  CHECK(ck->metadata() == std::vector<std::pair<std::string, std::string>>{
                              {"author", "me"}, {"format", "pt"}});
  CHECK(ck->Metadata("format").value() == "pt");
  CHECK(ck->Verify().ok());
}

TEST_CASE("deep and wide trees") {
  TempDir dir;
  std::string path = dir.File("deep.ckpt");
  const int kDepth = static_cast<int>(kMaxTreeDepth) - 1;
  const int kWide = 100000;
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    NodeId cur = w->AddInt(42);
    for (int i = 0; i < kDepth - 1; ++i) {
      NodeId one[] = {cur};
      cur = w->AddList(one).value();
    }
    std::vector<NodeId> wide;
    for (int i = 0; i < kWide; ++i) wide.push_back(w->AddInt(i));
    REQUIRE(w->PutValue("deep", cur).ok());
    REQUIRE(w->PutValue("wide", w->AddList(wide).value()).ok());
    REQUIRE(w->Commit().ok());
  }
  auto ck = Checkpoint::Open(path);
  REQUIRE(ck.ok());
  std::string p = "deep";
  for (int i = 0; i < kDepth - 1; ++i) p += "/0";
  CHECK(ck->Get(p).value().as_int() == 42);
  CHECK(ck->Get("wide/99999").value().as_int() == 99999);
  CHECK(ck->Verify().ok());

  // One level deeper than allowed is refused by the writer.
  auto w = Writer::Create(dir.File("too-deep.ckpt"), Fast());
  REQUIRE(w.ok());
  NodeId cur = w->AddInt(1);
  for (uint32_t i = 0; i < kMaxTreeDepth; ++i) {
    NodeId one[] = {cur};
    cur = w->AddList(one).value();
  }
  REQUIRE(w->SetRoot(cur).ok());
  CHECK(w->Commit().code() == ErrorCode::kInvalidArgument);
}

TEST_CASE("output is deterministic: same input, same bytes") {
  TempDir dir;
  auto write = [&](const std::string& path) {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    auto data = Pattern(3 << 20, 7);  // a large (page-aligned) blob
    REQUIRE(w->PutTensor("big", DType::kUInt8, {3, 1 << 20}, data).ok());
    REQUIRE(w->PutTensor("small", DType::kUInt8, {10}, Pattern(10, 1)).ok());
    REQUIRE(w->PutValue("step", w->AddInt(10)).ok());
    REQUIRE(w->SetMetadata("k", "v").ok());
    REQUIRE(w->Commit().ok());
  };
  write(dir.File("a.ckpt"));
  write(dir.File("b.ckpt"));
  CHECK(ReadAll(dir.File("a.ckpt")) == ReadAll(dir.File("b.ckpt")));
  auto ck = Checkpoint::Open(dir.File("a.ckpt"));
  REQUIRE(ck.ok());
  CHECK(ck->StorageInfoAt(0)->offset % kPageBytes == 0);
  CHECK(ck->StorageInfoAt(1)->offset % kPageBytes == 0);  // after page padding
  CHECK(ck->Verify().ok());
}

TEST_CASE("streamed storages hash per chunk across Append boundaries") {
  TempDir dir;
  std::string path = dir.File("stream.ckpt");
  auto data = Pattern(5 * 4096 + 123, 3);
  {
    WriteOptions o = Fast();
    o.chunk_size = 4096;
    auto w = Writer::Create(path, o);
    REQUIRE(w.ok());
    auto s = w->BeginStorage(data.size());
    REQUIRE(s.ok());
    // Pieces that straddle chunk boundaries.
    size_t pos = 0;
    for (size_t piece : {1u, 4095u, 5000u, 7u, 100u}) {
      REQUIRE(w->Append(std::span(data).subspan(pos, piece)).ok());
      pos += piece;
    }
    REQUIRE(w->Append(std::span(data).subspan(pos)).ok());
    REQUIRE(w->EndStorage().ok());
    TensorSpec spec{
        DType::kUInt8, {static_cast<int64_t>(data.size())}, {}, *s, 0};
    REQUIRE(w->PutValue("x", w->AddTensor(spec).value()).ok());
    REQUIRE(w->Commit().ok());
  }
  ReadOptions ro;
  ro.verify_checksums = true;
  auto ck = Checkpoint::Open(path, ro);
  REQUIRE(ck.ok());
  CHECK(ck->chunk_size() == 4096);
  auto t = ck->Tensor("x");
  REQUIRE(t.ok());
  CHECK(std::equal(t->data().begin(), t->data().end(), data.begin()));
  CHECK(ck->Verify().ok());
}

TEST_CASE("handles keep the file alive after the Checkpoint is gone") {
  TempDir dir;
  std::string path = dir.File("life.ckpt");
  std::vector<int64_t> v = {11, 22, 33};
  {
    auto w = Writer::Create(path, Fast());
    REQUIRE(w.ok());
    REQUIRE(w->PutTensor("v", DType::kInt64, {3}, Bytes(v)).ok());
    REQUIRE(w->PutValue("s", w->AddString("hello")).ok());
    REQUIRE(w->Commit().ok());
  }
  TensorRef t;
  Value s;
  {
    auto ck = Checkpoint::Open(path);
    REQUIRE(ck.ok());
    t = ck->Tensor("v").value();
    s = ck->Get("s").value();
  }
  ::unlink(path.c_str());
  CHECK(reinterpret_cast<const int64_t*>(t.data().data())[2] == 33);
  CHECK(s.as_string() == "hello");
}
