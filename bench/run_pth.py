#!/usr/bin/env python3
"""Conversion benchmark: pth2ckpt against cp and against what users do today.

Makes a .pth with torch.save (the tensors of a `ckpt-bench synth` LLM-like
state dict), then times, best of N with the page cache warm and writeback
drained before each run: `cp` + fsync of the copy (the I/O limit),
`pth2ckpt` (fsync included), and `torch.load` + `safetensors.save_file` +
fsync. Also the peak RSS of pth2ckpt. Prints ratios, writes JSON.

Run from the project's venv:  .venv/bin/python bench/run_pth.py --build build
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_cpu import fsync_path, load_tensors, warm  # noqa: E402

try:
    from safetensors.torch import save_file
except ImportError:
    save_file = None


def timed(fn, repeat, cleanup):
    best = float("inf")
    for _ in range(repeat):
        cleanup()
        os.sync()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    cleanup()
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build")
    ap.add_argument("--workdir", default="/tmp/ckpt-bench-pth")
    ap.add_argument("--total-mb", type=float, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default="bench/results/pth.json")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    ck = os.path.join(a.workdir, "synth.ckpt")
    pth = os.path.join(a.workdir, "model.pth")
    out = os.path.join(a.workdir, "out")
    subprocess.check_call([os.path.join(a.build, "ckpt-bench"), "synth", ck, "--tensors", "200",
                           "--total-mb", str(a.total_mb), "--no-sync"])
    tensors = load_tensors(os.path.join(a.build, "ckpt"), ck)
    torch.save(tensors, pth)
    nbytes = os.path.getsize(pth)
    del tensors
    os.unlink(ck)
    os.sync()
    warm(pth)

    def rm():
        if os.path.exists(out):
            os.unlink(out)

    pth2ckpt = os.path.join(a.build, "pth2ckpt")
    res = {}
    res["pth2ckpt"] = timed(lambda: subprocess.check_call([pth2ckpt, pth, out], stdout=subprocess.DEVNULL),
                            a.repeat, rm)
    # Peak RSS of pth2ckpt alone: measured in a fresh child whose only child
    # is pth2ckpt (RUSAGE_CHILDREN is a maximum over all children so far).
    rm()
    peak_rss_kib = int(subprocess.check_output([
        sys.executable, "-c",
        "import resource, subprocess, sys; subprocess.check_call(sys.argv[1:], "
        "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)",
        pth2ckpt, "--no-sync", pth, out]))
    res["pth2ckpt_no_sync"] = timed(
        lambda: subprocess.check_call([pth2ckpt, "--no-sync", pth, out], stdout=subprocess.DEVNULL), a.repeat, rm)

    def cp_fsync():
        subprocess.check_call(["cp", pth, out])
        fsync_path(out)
    res["cp_fsync"] = timed(cp_fsync, a.repeat, rm)
    res["cp"] = timed(lambda: subprocess.check_call(["cp", pth, out]), a.repeat, rm)
    if save_file is not None:
        def torch_st():
            save_file(torch.load(pth), out)
            fsync_path(out)
        res["torch_load_safetensors_save"] = timed(torch_st, a.repeat, rm)

    gbps = {k: nbytes / v / 1e9 for k, v in res.items()}
    print(f"\npth conversion, {nbytes / 2**20:.0f} MiB .pth (200 bf16 tensors), warm cache, best of {a.repeat}")
    for k, v in res.items():
        print(f"  {k:<30} {v:8.3f} s  {gbps[k]:6.2f} GB/s")
    ratios = {
        "pth2ckpt / (cp + fsync) throughput": res["cp_fsync"] / res["pth2ckpt"],
        "pth2ckpt --no-sync / cp throughput": res["cp"] / res["pth2ckpt_no_sync"],
    }
    if "torch_load_safetensors_save" in res:
        ratios["pth2ckpt vs torch.load + save_file (speed-up)"] = (
            res["torch_load_safetensors_save"] / res["pth2ckpt"])
    for k, v in ratios.items():
        print(f"  {k:<46} {v:6.2f}")
    print(f"  pth2ckpt peak RSS: {peak_rss_kib / 1024:.1f} MiB")
    with open(a.json, "w") as f:
        json.dump({"bytes": nbytes, "seconds": res, "ratios": ratios,
                   "pth2ckpt_peak_rss_mib": peak_rss_kib / 1024, "repeat": a.repeat}, f, indent=1)
    os.unlink(pth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
