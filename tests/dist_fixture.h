// Files the sharding tests start from (tests/dist_convert_test.cc and, via
// tools/dist_fixture.cc, tests/dist_cli_test.sh): a state dict of the
// shapes and layouts sharding must handle.
#pragma once

#include <ckpt/ckpt.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace ckpt::test {

/// Writes the fixture `kind` to `path` (no fsync):
///   "mixed"  {"model": {"w": f32 [6,4], "wt": f32 [4,6] (w's storage,
///            transposed: a strided view sharing a storage), "b": f32 [4],
///            "emb": bf16 [5,3], "row": f32 [4] (row 1 of w: a view at an
///            offset)}, "ids": i64 [7], "mask": bool [3,2], "scale": f64 0-d,
///            "empty": f32 [0,3], "a/b": u8 [3] (a key needing escaping),
///            "layers": [f32 [2,2], {"k": 3}], "epoch": 7, "name": "run-1",
///            "lr": 0.5, "opt": OrderedDict {"betas": (0.9, 0.99)},
///            "tags": {1, 2}} with metadata note=fixture
///   "numpy"  {"arr": f32 [2] tagged numpy.ndarray}
///   "tagged" {"x": f32 [2], "p": {} tagged ckpt.dist.GlobalTensor}
///   "big"    {"big": u8 [2,3,24 Mi] (a pattern), "small": i32 [5]}
inline Status WriteDistFixture(const std::string& path,
                               const std::string& kind) {
  WriteOptions wo;
  wo.sync = false;
  CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(path, wo));
  auto s_ = [&](std::string_view k) { return w.AddString(k); };
  auto f32 = [&](std::vector<int64_t> shape, float base) -> Result<NodeId> {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (size_t i = 0; i < v.size(); ++i) v[i] = base + static_cast<float>(i);
    return w.AddTensor(DType::kFloat32, shape, std::as_bytes(std::span(v)));
  };
  std::vector<NodeId> keys, values;
  if (kind == "mixed") {
    // w and its two views share one storage.
    std::vector<float> wv(24);
    for (size_t i = 0; i < wv.size(); ++i)
      wv[i] = 0.25f * static_cast<float>(i);
    CKPT_ASSIGN_OR_RETURN(StorageId ws,
                          w.AddStorage(std::as_bytes(std::span(wv))));
    TensorSpec spec;
    spec.dtype = DType::kFloat32;
    spec.storage = ws;
    spec.shape = {6, 4};
    CKPT_ASSIGN_OR_RETURN(NodeId tw, w.AddTensor(spec));
    spec.shape = {4, 6};
    spec.strides = {1, 4};
    CKPT_ASSIGN_OR_RETURN(NodeId twt, w.AddTensor(spec));
    spec.shape = {4};
    spec.strides = {1};
    spec.storage_offset = 4;
    CKPT_ASSIGN_OR_RETURN(NodeId trow, w.AddTensor(spec));
    CKPT_ASSIGN_OR_RETURN(NodeId tb, f32({4}, 100));
    std::vector<uint16_t> bf(15);
    for (size_t i = 0; i < bf.size(); ++i)
      bf[i] = static_cast<uint16_t>(0x3f80 + i);
    CKPT_ASSIGN_OR_RETURN(
        NodeId temb,
        w.AddTensor(DType::kBFloat16, {5, 3}, std::as_bytes(std::span(bf))));
    std::vector<NodeId> mk = {s_("w"), s_("wt"), s_("b"), s_("emb"), s_("row")};
    std::vector<NodeId> mv = {tw, twt, tb, temb, trow};
    CKPT_ASSIGN_OR_RETURN(NodeId model, w.AddDict(mk, mv));
    std::vector<int64_t> ids = {-3, 1, 4, 1, 5, 9, 1ll << 40};
    CKPT_ASSIGN_OR_RETURN(
        NodeId tids,
        w.AddTensor(DType::kInt64, {7}, std::as_bytes(std::span(ids))));
    std::vector<uint8_t> mask = {1, 0, 0, 1, 1, 1};
    CKPT_ASSIGN_OR_RETURN(
        NodeId tmask,
        w.AddTensor(DType::kBool, {3, 2}, std::as_bytes(std::span(mask))));
    std::vector<double> scale = {2.5};
    CKPT_ASSIGN_OR_RETURN(
        NodeId tscale,
        w.AddTensor(DType::kFloat64, {}, std::as_bytes(std::span(scale))));
    CKPT_ASSIGN_OR_RETURN(
        NodeId tempty,
        w.AddTensor(DType::kFloat32, {0, 3}, std::span<const std::byte>()));
    std::vector<uint8_t> ab = {7, 8, 9};
    CKPT_ASSIGN_OR_RETURN(
        NodeId tab,
        w.AddTensor(DType::kUInt8, {3}, std::as_bytes(std::span(ab))));
    CKPT_ASSIGN_OR_RETURN(NodeId tl0, f32({2, 2}, -1));
    std::vector<NodeId> kk = {s_("k")}, kv = {w.AddInt(3)};
    CKPT_ASSIGN_OR_RETURN(NodeId kd, w.AddDict(kk, kv));
    std::vector<NodeId> layer_items = {tl0, kd};
    CKPT_ASSIGN_OR_RETURN(NodeId layers, w.AddList(layer_items));
    std::vector<NodeId> betas_items = {w.AddFloat(0.9), w.AddFloat(0.99)};
    CKPT_ASSIGN_OR_RETURN(NodeId betas, w.AddTuple(betas_items));
    std::vector<NodeId> ok = {s_("betas")}, ov = {betas};
    CKPT_ASSIGN_OR_RETURN(NodeId opt,
                          w.AddDict(ok, ov, "collections.OrderedDict"));
    std::vector<NodeId> set_items = {w.AddInt(2), w.AddInt(1)};
    CKPT_ASSIGN_OR_RETURN(NodeId tags, w.AddSet(set_items));
    keys = {s_("model"), s_("ids"), s_("mask"),   s_("scale"),
            s_("empty"), s_("a/b"), s_("layers"), s_("epoch"),
            s_("name"),  s_("lr"),  s_("opt"),    s_("tags")};
    values = {model,  tids,        tmask,       tscale,          tempty, tab,
              layers, w.AddInt(7), s_("run-1"), w.AddFloat(0.5), opt,    tags};
    CKPT_RETURN_IF_ERROR(w.SetMetadata("note", "fixture"));
  } else if (kind == "numpy") {
    CKPT_ASSIGN_OR_RETURN(NodeId t, f32({2}, 0));
    CKPT_RETURN_IF_ERROR(w.SetTypeName(t, "numpy.ndarray"));
    keys = {s_("arr")};
    values = {t};
  } else if (kind == "tagged") {
    CKPT_ASSIGN_OR_RETURN(NodeId t, f32({2}, 0));
    CKPT_ASSIGN_OR_RETURN(NodeId p,
                          w.AddDict({}, {}, "ckpt.dist.GlobalTensor"));
    keys = {s_("x"), s_("p")};
    values = {t, p};
  } else if (kind == "big") {
    const int64_t inner = int64_t{24} << 20;
    const uint64_t n = static_cast<uint64_t>(2 * 3 * inner);
    CKPT_ASSIGN_OR_RETURN(StorageId sid, w.BeginStorage(n));
    std::vector<uint8_t> piece(1 << 20);
    for (uint64_t off = 0; off < n; off += piece.size()) {
      for (size_t i = 0; i < piece.size(); ++i)
        piece[i] = static_cast<uint8_t>(((off + i) * 2654435761u) >> 13);
      CKPT_RETURN_IF_ERROR(w.Append(std::as_bytes(std::span(piece))));
    }
    CKPT_RETURN_IF_ERROR(w.EndStorage());
    TensorSpec spec;
    spec.dtype = DType::kUInt8;
    spec.shape = {2, 3, inner};
    spec.storage = sid;
    CKPT_ASSIGN_OR_RETURN(NodeId big, w.AddTensor(spec));
    std::vector<int32_t> small = {1, 2, 3, 4, 5};
    CKPT_ASSIGN_OR_RETURN(
        NodeId ts,
        w.AddTensor(DType::kInt32, {5}, std::as_bytes(std::span(small))));
    keys = {s_("big"), s_("small")};
    values = {big, ts};
  } else {
    return InvalidArgument("unknown fixture '" + kind + "'");
  }
  CKPT_ASSIGN_OR_RETURN(NodeId root, w.AddDict(keys, values));
  CKPT_RETURN_IF_ERROR(w.SetRoot(root));
  return w.Commit();
}

}  // namespace ckpt::test
