#!/usr/bin/env python3
"""GPU benchmark driver: ckpt-bench gpu beside its peers on the same tensors.

Writes a synthetic LLM-like state dict with `ckpt-bench synth`, exports the
same tensors to .safetensors and .pth, then runs `ckpt-bench gpu` (pinned
cudaMemcpy = the PCIe limit; warm and cold full loads; one ~32 MiB tensor;
a row slice) and the peers: safetensors `load_file(device="cuda:0")` and
`torch.load(map_location="cuda:0")` (with mmap=True where torch has it).
Prints ratios and writes JSON. Exits 0 with a SKIP line when there is no GPU.

  .venv/bin/python bench/run_gpu.py --build build
"""
import argparse
import inspect
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_cpu import load_tensors, warm  # noqa: E402


def best(repeat, fn):
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--workdir", default="/tmp/ckpt-bench-gpu")
    ap.add_argument("--total-mb", type=float, default=2600)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default="bench/results/gpu.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device here; run this on a GPU host")
        return 0
    os.makedirs(a.workdir, exist_ok=True)
    ck = os.path.join(a.workdir, "model.ckpt")
    subprocess.check_call([os.path.join(a.build, "ckpt-bench"), "synth", ck, "--tensors", "300",
                           "--total-mb", str(a.total_mb)])
    out = os.path.join(a.workdir, "ckpt_gpu.json")
    r = subprocess.run([os.path.join(a.build, "ckpt-bench"), "gpu", ck, "--repeat", str(a.repeat),
                        "--json", out])
    if r.returncode == 77:
        print("SKIP: ckpt-bench gpu found no usable device")
        return 0
    r.check_returncode()
    ckr = {x["name"]: x for x in json.load(open(out))["results"]}
    tensors = load_tensors(os.path.join(a.build, "ckpt"), ck)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    peers = {}
    st = os.path.join(a.workdir, "model.safetensors")
    pth = os.path.join(a.workdir, "model.pth")
    try:
        from safetensors.torch import load_file, save_file
        save_file(tensors, st)
        warm(st)
        peers["safetensors_load_file_cuda"] = best(a.repeat, lambda: load_file(st, device="cuda:0"))
    except ImportError:
        pass
    torch.save(tensors, pth)
    warm(pth)
    kw = {"mmap": True} if "mmap" in inspect.signature(torch.load).parameters else {}
    peers["torch_load_cuda" + ("_mmap" if kw else "")] = best(
        a.repeat, lambda: torch.load(pth, map_location="cuda:0", **kw))
    warm_load = ckr["warm_full_load_staged"]["seconds"]
    print(f"\nGPU load, {nbytes / 2**30:.2f} GiB bf16 state dict on {torch.cuda.get_device_name(0)}")
    for k, v in ckr.items():
        gb = v["bytes"] / v["seconds"] / 1e9 if v["bytes"] else 0
        print(f"  ckpt-bench {k:<26} {v['seconds'] * 1e3:9.2f} ms {gb:7.2f} GB/s")
    for k, v in peers.items():
        print(f"  peer       {k:<26} {v * 1e3:9.2f} ms {nbytes / v / 1e9:7.2f} GB/s")
    pcie = ckr["pinned_cudaMemcpy"]
    ratios = {
        "warm load / pinned cudaMemcpy bandwidth": (nbytes / warm_load) / (pcie["bytes"] / pcie["seconds"]),
        "cold load / cold raw read throughput": (nbytes / ckr["cold_full_load_auto"]["seconds"]) /
                                                (ckr["cold_raw_read"]["bytes"] / ckr["cold_raw_read"]["seconds"]),
        "one ~32 MiB tensor, warm (ms)": ckr["warm_one_tensor_~32MiB"]["seconds"] * 1e3,
    }
    for k, v in peers.items():
        ratios[f"{k} / ckpt warm load (speed-up)"] = v / warm_load
    for k, v in ratios.items():
        print(f"  {k:<46} {v:8.2f}")
    with open(a.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "bytes": nbytes, "ckpt": ckr,
                   "peers": peers, "ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
