#!/usr/bin/env python3
"""A serving engine's tensor-parallel weight load, against safetensors, in
one run: for tp sizes 1, 2, 4, 8, every rank in turn (one process, page
cache warm, best of --repeat) loads its slices of a synthetic model
(rows of the q/k/v/gate/up weights, columns of the o/down weights, the
rest whole, as vLLM's parallel layers shard them) into tensors it owns:

  ckpt      ckpt.iter_weights(path, tp_rank, tp_size, shard_dim=RULE)
  st        safetensors.safe_open + get_slice(name)[rows or columns],
            the way vLLM's loader slices (a view of the mapping, then a
            copy the caller owns)

Prints per tp size the slowest rank's time, both loaders' ratio, and the
bytes each rank reads over its share (ckpt: its own count, and
/proc/self/io rchar against the part it reads by pread: column runs under
64 KiB are copied from the mapping, which rchar does not see, nor
safetensors' reads, all through its mapping). bench/RESULTS.md records the figures.

  .venv-torch2/bin/python bench/run_serving.py [--total-mb 256] [--repeat 5]
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

import ckpt
from run_dist import rchar  # (bench/ is the script's directory)

RULE = {"*.q_proj.weight": 0, "*.k_proj.weight": 0, "*.v_proj.weight": 0,
        "*.gate_proj.weight": 0, "*.up_proj.weight": 0,
        "*.o_proj.weight": 1, "*.down_proj.weight": 1}


def model(total_mb):
    hidden = 1024
    per_layer = (4 * hidden * hidden + 3 * hidden * 2 * hidden) * 2 + hidden * 2  # bf16
    layers = max(1, total_mb * 2**20 // per_layer)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{n}_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        sd[p + "mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
        sd[p + "input_layernorm.weight"] = torch.randn(hidden, generator=g)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def dim_of(name):
    import fnmatch
    for pattern, d in RULE.items():
        if fnmatch.fnmatchcase(name, pattern):
            return d
    return None


def st_load(path, rank, n):
    from safetensors import safe_open
    out = []
    with safe_open(path, "pt") as f:
        for name in f.keys():
            s = f.get_slice(name)
            d = dim_of(name)
            if d is None:
                t = s[:]
            else:
                size = s.get_shape()[d] // n
                t = s[rank * size:(rank + 1) * size] if d == 0 else \
                    s[:, rank * size:(rank + 1) * size]
            out.append((name, t.clone()))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total-mb", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    from safetensors.torch import save_file
    out = tempfile.mkdtemp(prefix="ckpt-bench-serving-")
    try:
        sd = model(args.total_mb)
        ck, st = os.path.join(out, "m.ckpt"), os.path.join(out, "m.safetensors")
        ckpt.save(sd, ck)
        save_file(sd, st)
        total = sum(t.numel() * t.element_size() for t in sd.values())
        print(f"torch {torch.__version__}; {os.cpu_count()} cores; {len(sd)} tensors, "
              f"{total / 2**20:.0f} MiB bf16; best of {args.repeat}, page cache warm")
        for n in (1, 2, 4, 8):
            worst = {"ckpt": 0.0, "st": 0.0}
            ratios = []
            for rank in range(n):
                best = {"ckpt": 1e30, "st": 1e30}
                for _ in range(args.repeat):
                    stats = {}
                    r0 = rchar()
                    t0 = time.perf_counter()
                    got = list(ckpt.iter_weights(ck, tp_rank=rank, tp_size=n, shard_dim=RULE,
                                                 stats=stats))
                    best["ckpt"] = min(best["ckpt"], time.perf_counter() - t0)
                    kernel = rchar() - r0
                    del got
                    t0 = time.perf_counter()
                    got = st_load(st, rank, n)
                    best["st"] = min(best["st"], time.perf_counter() - t0)
                    del got
                preads = stats["bytes_read"] - stats["bytes_mapped"]
                ratios.append((stats["bytes_read"] / stats["bytes_needed"],
                               kernel / preads if preads else 1.0,
                               stats["bytes_mapped"] / stats["bytes_needed"]))
                for k in worst:
                    worst[k] = max(worst[k], best[k])
            lib = max(r[0] for r in ratios)
            ker = max(abs(r[1] - 1) for r in ratios)
            mapped = max(r[2] for r in ratios)
            print(f"  tp {n}: slowest rank ckpt {worst['ckpt'] * 1e3:7.1f} ms, safetensors "
                  f"{worst['st'] * 1e3:7.1f} ms ({worst['st'] / worst['ckpt']:.2f}x); ckpt "
                  f"read/share {lib:.4f} (loader; {mapped:.2f} of it narrow column runs copied "
                  f"from the mapping), rchar within {ker * 100:.2f}% of the pread bytes")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
