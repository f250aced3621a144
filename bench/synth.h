// Deterministic synthetic LLM-like checkpoints for benchmarks and tests.
#pragma once

#include <ckpt/ckpt.h>

#include <cstdint>
#include <string>

namespace ckpt::bench {

struct SynthOptions {
  int tensors = 100;  ///< exact tensor count, RNG state included (>= 4)
  uint64_t total_bytes = 64ull << 20;
  DType dtype = DType::kBFloat16;
  uint64_t seed = 1;
  bool sync = true;
};

/// Writes {"model": {embed, layers.i.{attn q/k/v/o, mlp up/gate/down,
/// norms}, norm, lm_head}, "optimizer": {"step": ..., "lr": ...}, "epoch",
/// "loss_history": [...], "rng_state": uint8 tensor} to `path`. Same options,
/// same bytes.
Status WriteSynthetic(const std::string& path, const SynthOptions& options);

}  // namespace ckpt::bench
