// Golden file: tests/data/golden_v1.ckpt was written once by format 1.0 and
// is never regenerated. The reader must keep accepting it, and today's
// writer must still produce it byte for byte from the same calls.
#include <catch2/catch.hpp>

#include "test_util.h"

using namespace ckpt;
using namespace ckpt::test;

namespace {

const std::string kGolden = std::string(CKPT_TEST_DATA_DIR) + "/golden_v1.ckpt";

// The calls that made the golden file. Changing this function is changing
// the format: don't, unless kFormatVersion changes and a new golden is added.
Status WriteGolden(const std::string& path) {
  std::vector<float> weight = {0.5f, -1.0f, 2.0f, 3.5f, -0.25f, 8.0f};
  std::vector<uint16_t> bias = {0x3f80, 0xbf80};  // bfloat16 1, -1
  WriteOptions o = Fast();
  o.producer = "ckpt golden";
  CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(path, o));
  CKPT_ASSIGN_OR_RETURN(StorageId ws, w.AddStorage(Bytes(weight)));
  CKPT_ASSIGN_OR_RETURN(
      NodeId wt,
      w.AddTensor(TensorSpec{DType::kFloat32, {2, 3}, {}, ws, 0, true, true}));
  CKPT_ASSIGN_OR_RETURN(
      NodeId wtt,
      w.AddTensor(TensorSpec{DType::kFloat32, {3, 2}, {1, 3}, ws, 0}));
  CKPT_ASSIGN_OR_RETURN(
      NodeId bt, w.AddTensor(DType::kBFloat16, {2}, Bytes(bias), "cuda:1"));
  NodeId mk[] = {w.AddString("fc.weight"), w.AddString("fc.weight_t"),
                 w.AddString("fc.bias")};
  NodeId mv[] = {wt, wtt, bt};
  CKPT_ASSIGN_OR_RETURN(NodeId model,
                        w.AddDict(mk, mv, "collections.OrderedDict"));
  NodeId hist[] = {w.AddFloat(2.5), w.AddFloat(1.25)};
  CKPT_ASSIGN_OR_RETURN(NodeId losses, w.AddList(hist));
  NodeId rk[] = {w.AddString("model"), w.AddString("epoch"),
                 w.AddString("losses"), w.AddInt(7), w.AddString("name")};
  NodeId rv[] = {model, w.AddInt(3), losses, w.AddNone(),
                 w.AddString("golden/run")};
  CKPT_ASSIGN_OR_RETURN(NodeId root, w.AddDict(rk, rv));
  CKPT_RETURN_IF_ERROR(w.SetRoot(root));
  CKPT_RETURN_IF_ERROR(w.SetMetadata("purpose", "golden file, format 1.0"));
  return w.Commit();
}

}  // namespace

TEST_CASE("golden v1 file: the reader accepts it and reads its contents") {
  auto ck = Checkpoint::Open(kGolden);
  INFO(ck.status().ToString());
  REQUIRE(ck.ok());
  CHECK(ck->format_major() == 1);
  CHECK(ck->producer() == "ckpt golden");
  CHECK(ck->Verify().ok());
  REQUIRE(ck->num_tensors() == 3);
  auto w = ck->Tensor("model/fc.weight");
  REQUIRE(w.ok());
  CHECK(w->info().is_parameter);
  CHECK(reinterpret_cast<const float*>(w->data().data())[5] == 8.0f);
  auto wt = ck->Tensor("model/fc.weight_t");
  REQUIRE(wt.ok());
  std::vector<float> t(6);
  REQUIRE(wt->CopyTo(std::as_writable_bytes(std::span(t))).ok());
  CHECK(t == std::vector<float>{0.5f, 3.5f, -1.0f, -0.25f, 2.0f, 8.0f});
  auto b = ck->FindTensor("model/fc.bias");
  REQUIRE(b.ok());
  CHECK(b->dtype == DType::kBFloat16);
  CHECK(ck->StorageInfoAt(b->storage)->device == "cuda:1");
  CHECK(ck->Get("epoch").value().as_int() == 3);
  CHECK(ck->Get("losses/1").value().as_float() == 1.25);
  CHECK(ck->Get("7").value().kind() == ValueKind::kNone);
  CHECK(ck->Get("name").value().as_string() == "golden/run");
  CHECK(ck->Metadata("purpose").value() == "golden file, format 1.0");
}

TEST_CASE("golden v1 file: today's writer reproduces it byte for byte") {
  if (const char* out = std::getenv("CKPT_WRITE_GOLDEN")) {
    REQUIRE(WriteGolden(out).ok());  // used once, to create the file
  }
  TempDir dir;
  REQUIRE(WriteGolden(dir.File("g.ckpt")).ok());
  auto golden = ReadAll(kGolden);
  REQUIRE(!golden.empty());
  CHECK(ReadAll(dir.File("g.ckpt")) == golden);
}
