#include "synth.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace ckpt::bench {
namespace {

struct Spec {
  std::string name;
  double share;  // relative size of a matrix; 0 for a norm vector
};

void Fill(std::vector<std::byte>& buf, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  auto* p = reinterpret_cast<uint64_t*>(buf.data());
  size_t words = buf.size() / 8;
  for (size_t i = 0; i < words; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    // Keep bf16/fp16 values finite: clear each 16-bit lane's top exponent bit.
    p[i] = x & 0xBFFFBFFFBFFFBFFFull;
  }
  for (size_t i = words * 8; i < buf.size(); ++i) buf[i] = std::byte{0x11};
}

}  // namespace

Status WriteSynthetic(const std::string& path, const SynthOptions& o) {
  const size_t el = DTypeSize(o.dtype);
  if (el == 0) return InvalidArgument("synth: unknown dtype");
  // Exactly o.tensors tensors: per layer 7 matrices + 2 norms; embed,
  // final norm, lm_head; biases to fill; the RNG state.
  if (o.tensors < 4) return InvalidArgument("synth: need at least 4 tensors");
  const int model_tensors = o.tensors - 1;
  int layers = (model_tensors - 3) / 9;
  std::vector<Spec> specs;
  specs.push_back({"embed_tokens.weight", 4.0});
  for (int l = 0; l < layers; ++l) {
    std::string p = "layers." + std::to_string(l) + ".";
    for (auto m : {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                   "self_attn.v_proj.weight", "self_attn.o_proj.weight"}) {
      specs.push_back({p + m, 1.0});
    }
    for (auto m : {"mlp.gate_proj.weight", "mlp.up_proj.weight",
                   "mlp.down_proj.weight"}) {
      specs.push_back({p + m, 2.75});
    }
    specs.push_back({p + "input_layernorm.weight", 0});
    specs.push_back({p + "post_attention_layernorm.weight", 0});
  }
  specs.push_back({"norm.weight", 0});
  specs.push_back({"lm_head.weight", 4.0});
  // Extra small tensors (biases) to reach the requested count.
  for (int i = 0; static_cast<int>(specs.size()) < model_tensors; ++i) {
    specs.push_back({"extra." + std::to_string(i) + ".bias", 0});
  }
  double total_share = 0;
  for (auto& s : specs) total_share += s.share;
  uint64_t elems = o.total_bytes / el;
  // Hidden size: rows of each matrix are whole multiples of it.
  int64_t hidden = static_cast<int64_t>(
      std::sqrt(static_cast<double>(elems) / (total_share + 1)));
  hidden = std::clamp<int64_t>(hidden / 64 * 64, 64, 8192);

  WriteOptions wo;
  wo.sync = o.sync;
  wo.producer = "ckpt-bench synth";
  CKPT_ASSIGN_OR_RETURN(Writer w, Writer::Create(path, wo));
  std::vector<NodeId> mk, mv;
  std::vector<std::byte> buf;
  uint64_t seed = o.seed;
  for (const auto& s : specs) {
    int64_t rows = 1;
    if (s.share > 0) {
      double want = static_cast<double>(elems) * s.share / total_share;
      rows = std::max<int64_t>(
          1, static_cast<int64_t>(want / static_cast<double>(hidden)));
    }
    std::vector<int64_t> shape = s.share > 0
                                     ? std::vector<int64_t>{rows, hidden}
                                     : std::vector<int64_t>{hidden};
    int64_t numel = s.share > 0 ? rows * hidden : hidden;
    buf.resize(static_cast<size_t>(numel) * el);
    Fill(buf, seed++);
    CKPT_ASSIGN_OR_RETURN(NodeId t, w.AddTensor(o.dtype, shape, buf));
    mk.push_back(w.AddString(s.name));
    mv.push_back(t);
  }
  CKPT_ASSIGN_OR_RETURN(NodeId model,
                        w.AddDict(mk, mv, "collections.OrderedDict"));
  std::vector<NodeId> hist;
  for (int i = 0; i < 10; ++i) hist.push_back(w.AddFloat(3.0 / (1 + i)));
  CKPT_ASSIGN_OR_RETURN(NodeId losses, w.AddList(hist));
  NodeId ok[] = {w.AddString("step"), w.AddString("lr"), w.AddString("betas")};
  NodeId betas[] = {w.AddFloat(0.9), w.AddFloat(0.999)};
  NodeId ov[] = {w.AddInt(1000), w.AddFloat(3e-4), w.AddTuple(betas).value()};
  CKPT_ASSIGN_OR_RETURN(NodeId opt, w.AddDict(ok, ov));
  std::vector<std::byte> rng(5056);
  Fill(rng, 99);
  CKPT_ASSIGN_OR_RETURN(NodeId rng_t, w.AddTensor(DType::kUInt8, {5056}, rng));
  NodeId rk[] = {w.AddString("model"), w.AddString("optimizer"),
                 w.AddString("epoch"), w.AddString("loss_history"),
                 w.AddString("rng_state")};
  NodeId rv[] = {model, opt, w.AddInt(3), losses, rng_t};
  CKPT_ASSIGN_OR_RETURN(NodeId root, w.AddDict(rk, rv));
  CKPT_RETURN_IF_ERROR(w.SetRoot(root));
  CKPT_RETURN_IF_ERROR(w.SetMetadata("synthetic", "true"));
  return w.Commit();
}

}  // namespace ckpt::bench
