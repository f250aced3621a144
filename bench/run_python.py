#!/usr/bin/env python3
"""Python benchmark: ckpt.load / ckpt.open against torch.load and safetensors.

Two files, each written by every peer from the same tensors, in the same run:
  state_dict  an LLM-like float32 state dict (--total-mb, default 1 GiB)
  training    a training checkpoint: model + Adam moments + step, epoch,
              loss history and RNG state (safetensors cannot hold it: only
              its tensors are written there, flattened)
Each load is timed best of --repeat with the page cache warm, as
"load + touch": every page of every tensor read once after loading, so lazy
(mmap) loaders pay for their reads as eager ones do. Prints ratios, writes
JSON. CPU only here; on a GPU host --device cuda adds loads to the GPU.

Run from the project's venv:  .venv/bin/python bench/run_python.py
"""
import argparse
import json
import os
import sys
import time

import torch

try:
    import safetensors.torch as st
except ImportError:
    st = None

import ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_cpu import fsync_path, warm  # noqa: E402


def touch(tree):
    """Reads every byte of every tensor (as inference reads every weight)."""
    total = 0.0
    for t in ckpt.flatten(tree).values():
        if t.numel():
            total += float(t.sum())
    return total


def state_dict(total_mb, seed=0):
    """GPT-like layers of float32 weights until total_mb is reached."""
    g = torch.Generator().manual_seed(seed)
    d = 1024
    sd, i, size = {}, 0, 0
    sd["embed.weight"] = torch.randn(8192, d, generator=g)
    size += sd["embed.weight"].numel() * 4
    while size < total_mb * 2**20:
        for name, shape in ((f"h.{i}.attn.qkv.weight", (3 * d, d)), (f"h.{i}.attn.qkv.bias", (3 * d,)),
                            (f"h.{i}.attn.proj.weight", (d, d)), (f"h.{i}.ln1.weight", (d,)),
                            (f"h.{i}.ln1.bias", (d,)), (f"h.{i}.mlp.fc.weight", (4 * d, d)),
                            (f"h.{i}.mlp.proj.weight", (d, 4 * d)), (f"h.{i}.ln2.weight", (d,))):
            sd[name] = torch.randn(*shape, generator=g)
            size += sd[name].numel() * 4
        i += 1
    return sd


def training_state(model_mb):
    sd = state_dict(model_mb, seed=1)
    params = list(sd.values())
    opt_state = {i: {"step": torch.tensor(1000.0), "exp_avg": torch.randn_like(p),
                     "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(params)}
    return {"model": sd,
            "optimizer": {"state": opt_state,
                          "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                            "weight_decay": 0.1, "amsgrad": False,
                                            "params": list(range(len(params)))}]},
            "scheduler": {"last_epoch": 1000, "base_lrs": [3e-4]},
            "epoch": 12, "losses": [1.0 / (k + 1) for k in range(1000)],
            "rng": ckpt.rng.get_state()}


def best_of(fn, repeat):
    """(load seconds, load + read-every-byte seconds), each the best of
    `repeat` runs after one untimed warm-up run."""
    touch(fn())
    load = total = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        touch(out)
        t2 = time.perf_counter()
        load, total = min(load, t1 - t0), min(total, t2 - t0)
        del out
    return load, total


def bench_save(obj, workdir, repeat):
    """Seconds to write obj, best of `repeat`, each peer without and with
    fsync (ckpt.save fsyncs the file and its directory when sync=True)."""
    out = os.path.join(workdir, "save.out")
    flat = {k: v.contiguous() for k, v in ckpt.flatten(obj).items()} if st else None

    def timed(fn, sync):
        best = float("inf")
        for _ in range(repeat):
            if os.path.exists(out):
                os.unlink(out)
            os.sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                fsync_path(out)
            best = min(best, time.perf_counter() - t0)
        os.unlink(out)
        return best
    rows = {
        "torch.save": timed(lambda: torch.save(obj, out), False),
        "ckpt.save(sync=False)": timed(lambda: ckpt.save(obj, out, sync=False), False),
        "torch.save + fsync": timed(lambda: torch.save(obj, out), True),
        "ckpt.save (fsync, atomic rename)": timed(lambda: ckpt.save(obj, out), False),
    }
    if st is not None:
        rows["safetensors save_file (tensors only)"] = timed(lambda: st.save_file(flat, out), False)
    return rows


def bench_file(name, obj, workdir, repeat, device):
    pth = os.path.join(workdir, f"{name}.pth")
    ck = os.path.join(workdir, f"{name}.ckpt")
    sft = os.path.join(workdir, f"{name}.safetensors")
    flat_only = name != "state_dict"
    torch.save(obj, pth)
    ckpt.save(obj, ck, sync=False)
    if st is not None:
        ckpt.save_safetensors(obj, sft)
    nbytes = os.path.getsize(ck)
    os.sync()  # no writeback of the new files during the timings
    for p in (pth, ck, sft):
        if os.path.exists(p):
            warm(p)
    some = sorted(ckpt.flatten(obj))[len(ckpt.flatten(obj)) // 2]
    ml = None if device == "cpu" else device
    rows = {}
    rows["torch.load"] = best_of(lambda: torch.load(pth, map_location=device, weights_only=False), repeat)
    only = " (tensors only)" if flat_only else ""
    if st is not None:
        # safetensors 0.8 serves CPU tensors from a mapping (zero-copy) by
        # default, or copies them with backend="pread".
        rows["safetensors load_file" + only] = best_of(
            lambda: st.load_file(sft, device=device), repeat)
        if device == "cpu" and "backend" in st.load_file.__code__.co_varnames:
            rows["safetensors load_file(pread)" + only] = best_of(
                lambda: st.load_file(sft, device=device, backend="pread"), repeat)
    rows["ckpt.load"] = best_of(lambda: ckpt.load(ck, map_location=ml), repeat)
    if device == "cpu":
        rows["ckpt.load(mmap=True)"] = best_of(lambda: ckpt.load(ck, mmap=True), repeat)

    def one():
        with ckpt.open(ck) as f:
            return {"t": f[some] if device == "cpu" else f[some].to(device)}
    rows["ckpt.open + one tensor"] = best_of(one, repeat)
    if st is not None:
        def st_one():
            with st.safe_open(sft, framework="pt", device=device) as f:
                return {"t": f.get_tensor(some)}
        rows["safe_open + one tensor"] = best_of(st_one, repeat)
    for p in (pth, ck, sft):
        if os.path.exists(p):
            os.unlink(p)
    return nbytes, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ckpt-bench-python")
    ap.add_argument("--total-mb", type=float, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="bench/results/python.json")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if st is None:
        print("safetensors is not installed: its rows are missing", file=sys.stderr)
    print("torch", torch.__version__, "| torch.load(mmap=True):",
          "yes" if "mmap" in torch.load.__code__.co_varnames else "not in this torch")
    report = {"device": a.device, "torch": torch.__version__, "repeat": a.repeat, "files": {}}
    for name, make in (("state_dict", lambda: state_dict(a.total_mb)),
                       ("training", lambda: training_state(a.total_mb / 3))):
        obj = make()
        nbytes, rows = bench_file(name, obj, a.workdir, a.repeat, a.device)
        base = rows["torch.load"][1]
        print(f"\n{name}: {nbytes / 2**20:.0f} MiB, {a.device}, best of {a.repeat}, warm cache")
        print(f"  {'':38s} {'load s':>8s} {'+read all s':>11s} {'GB/s':>6s} {'vs torch.load':>13s}")
        for k, (ld, tot) in rows.items():
            print(f"  {k:38s} {ld:8.4f} {tot:11.4f} {nbytes / tot / 1e9:6.2f} {base / tot:12.1f}x")
        c = rows["ckpt.load"][1]
        for k, v in rows.items():
            if k.startswith("safetensors load_file"):
                print(f"  ckpt.load vs {k}: {v[1] / c:.2f}x (load + read all)")
        if "ckpt.load(mmap=True)" in rows:
            print(f"  ckpt.load(mmap=True) vs torch.load: {base / rows['ckpt.load(mmap=True)'][1]:.2f}x")
        saves = bench_save(obj, a.workdir, min(a.repeat, 3))
        print(f"  saving, best of {min(a.repeat, 3)}:")
        for k, v in saves.items():
            print(f"  {k:38s} {v:8.4f} s {nbytes / v / 1e9:6.2f} GB/s")
        print(f"  ckpt.save vs torch.save: {saves['torch.save'] / saves['ckpt.save(sync=False)']:.2f}x "
              f"without fsync, {saves['torch.save + fsync'] / saves['ckpt.save (fsync, atomic rename)']:.2f}x "
              "with")
        report["files"][name] = {"bytes": nbytes, "seconds": rows, "save_seconds": saves}
        del obj
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
