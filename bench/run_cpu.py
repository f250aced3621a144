#!/usr/bin/env python3
"""CPU benchmark driver: ckpt against its peers on the same tensors, one run.

Writes synthetic LLM-like checkpoints with `ckpt-bench synth`, exports the
same tensors to .safetensors and .pth, runs `ckpt-bench cpu` and the peers
(raw read(), safetensors safe_open/load_file/save_file, torch.load/save),
prints a table of ratios, and writes JSON (and a PNG chart when matplotlib
is installed). Page cache warm throughout (each file is read before timing).

Run from the project's venv:  .venv/bin/python bench/run_cpu.py --build build
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

try:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
except ImportError:  # peers are optional; the table says what is missing
    safe_open = None

NP_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16,
             "bfloat16": np.int16, "int64": np.int64, "int32": np.int32,
             "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def best(repeat, fn):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load_tensors(ckpt_bin, path):
    """The ckpt file's tensors as torch tensors, read through `ckpt inspect --json`."""
    info = json.loads(subprocess.check_output([ckpt_bin, "inspect", "--json", path]))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for t in info["tensors"]:
        st = info["storages"][t["storage"]]
        npdt = np.dtype(NP_DTYPES[t["dtype"]])
        start = st["offset"] + t["offset"] * npdt.itemsize
        arr = np.array(mm[start:start + t["nbytes"]]).view(npdt).reshape(t["shape"])
        tensor = torch.from_numpy(arr)
        if t["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        out[t["path"]] = tensor
    return out


def touch(t):
    """Reads every byte of a tensor (as int64 words where possible), the
    same work ckpt-bench's Touch does, so lazy (mmap-backed) peers pay for
    their bytes too."""
    b = t.reshape(-1).view(torch.uint8)
    n8 = b.numel() // 8 * 8
    s = int(b[:n8].view(torch.int64).sum()) if n8 else 0
    return s + int(b[n8:].sum())


def touch_all(d):
    for t in d.values():
        touch(t)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def run_ckpt_bench(bench_bin, path, repeat, workdir):
    out = os.path.join(workdir, os.path.basename(path) + ".json")
    subprocess.check_call([bench_bin, "cpu", path, "--repeat", str(repeat),
                           "--json", out, "--tmpdir", workdir], stdout=subprocess.DEVNULL)
    with open(out) as f:
        return {r["name"]: r for r in json.load(f)["results"]}


def peers(base, tensors, repeat, big_name, workdir):
    """Times of the peers on `tensors`, saved as base.safetensors / base.pth."""
    res = {}
    st_path, pth_path = base + ".safetensors", base + ".pth"
    total = sum(t.numel() * t.element_size() for t in tensors.values())

    os.sync()

    def torch_save():
        torch.save(tensors, pth_path)
        fsync_path(pth_path)
    res["torch_save_fsync"] = best(repeat, torch_save)
    warm(pth_path)
    res["torch_load"] = best(repeat, lambda: touch_all(torch.load(pth_path)))
    if safe_open is not None:
        def st_save():
            save_file(tensors, st_path)
            fsync_path(st_path)
        res["safetensors_save_fsync"] = best(repeat, st_save)
        warm(st_path)

        def st_open():
            with safe_open(st_path, framework="pt") as f:
                f.keys()
        res["safetensors_open"] = best(repeat * 4, st_open)

        def st_one():
            with safe_open(st_path, framework="pt") as f:
                touch(f.get_tensor(big_name))
        res["safetensors_open_one_tensor"] = best(repeat, st_one)

        def st_one_view():
            with safe_open(st_path, framework="pt") as f:
                f.get_tensor(big_name)
        res["safetensors_open_one_tensor_view"] = best(repeat * 4, st_one_view)

        def st_slice():
            with safe_open(st_path, framework="pt") as f:
                s = f.get_slice(big_name)
                rows = s.get_shape()[0]
                touch(s[rows // 2: min(rows, rows // 2 + 16)])
        res["safetensors_open_row_slice"] = best(repeat, st_slice)
        res["safetensors_load_file"] = best(repeat, lambda: touch_all(load_file(st_path)))
    for p in (st_path, pth_path):
        if os.path.exists(p):
            os.unlink(p)
    return res, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default="build", help="CMake build directory")
    ap.add_argument("--workdir", default="/tmp/ckpt-bench", help="scratch directory")
    ap.add_argument("--total-mb", type=float, default=1024, help="size of the big file")
    ap.add_argument("--many-mb", type=float, default=64, help="size of the 10/10,000-tensor files")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default="bench/results/cpu.json")
    ap.add_argument("--png", default="bench/results/cpu.png")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    bench_bin = os.path.join(a.build, "ckpt-bench")
    ckpt_bin = os.path.join(a.build, "ckpt")

    files = {"big": (200, a.total_mb), "many": (10000, a.many_mb), "few": (10, a.many_mb)}
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "torch": torch.__version__},
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip(),
               "page_cache": "warm", "repeat": a.repeat, "files": {}}
    for name, (count, mb) in files.items():
        path = os.path.join(a.workdir, name + ".ckpt")
        subprocess.check_call([bench_bin, "synth", path, "--tensors", str(count),
                               "--total-mb", str(mb), "--no-sync"])
        os.sync()  # no background writeback of the new file during timings
        warm(path)
        ck = run_ckpt_bench(bench_bin, path, a.repeat, a.workdir)
        tensors = load_tensors(ckpt_bin, path)
        big_name = max(tensors, key=lambda k: tensors[k].numel())
        peer, total = peers(os.path.join(a.workdir, name), tensors, a.repeat, big_name, a.workdir)
        del tensors
        results["files"][name] = {"tensors": count, "bytes": total,
                                  "ckpt": {k: v["seconds"] for k, v in ck.items()},
                                  "ckpt_bytes": {k: v["bytes"] for k, v in ck.items()},
                                  "peers": peer}
        os.unlink(path)

    big = results["files"]["big"]
    c, p, nb = big["ckpt"], big["peers"], big["bytes"]
    many, few = results["files"]["many"], results["files"]["few"]

    def ratio(x, y):
        return (x / y) if (x and y) else float("nan")

    def gbps(sec):
        return nb / sec / 1e9 if sec else float("nan")

    load = min(c["load_view"], c["load_view_2threads"])
    rows = [
        # (target, measured, goal, pass?)
        ("open 10,000 tensors (ms)", many["ckpt"]["open"] * 1e3, "< 5", many["ckpt"]["open"] < 5e-3),
        ("open 10,000 / open 10 tensors", ratio(many["ckpt"]["open"], few["ckpt"]["open"]), "<= 2",
         many["ckpt"]["open"] <= 2 * few["ckpt"]["open"]),
        ("safe_open / ckpt open, 10,000 tensors",
         ratio(many["peers"].get("safetensors_open"), many["ckpt"]["open"]), ">= 5", None),
        ("torch.load / ckpt open+one tensor", ratio(p["torch_load"], c["open_one_tensor"]), ">= 100", None),
        ("safetensors open+get / ckpt open+one tensor",
         ratio(p.get("safetensors_open_one_tensor"), c["open_one_tensor"]), ">= 3", None),
        ("  same, time to first tensor (views, untouched)",
         ratio(p.get("safetensors_open_one_tensor_view"), c["open_one_tensor_view"]), ">= 3", None),
        ("full load: ckpt / raw read() (reused buffer)", ratio(c["raw_read"], load), ">= 1.0", None),
        ("full load: ckpt / raw read() into new memory", ratio(c["raw_read_alloc"], load), ">= 1.0", None),
        ("full load: ckpt / torch.load", ratio(p["torch_load"], load), ">= 2", None),
        ("full load: ckpt / safetensors load_file", ratio(p.get("safetensors_load_file"), load), ">= 1.5", None),
        ("save: ckpt / write()+fsync", ratio(c["raw_write_fsync"], c["save_fsync"]), ">= 0.8", None),
        ("save: ckpt / torch.save+fsync", ratio(p["torch_save_fsync"], c["save_fsync"]), ">= 1.5", None),
        ("save: ckpt / safetensors save_file+fsync",
         ratio(p.get("safetensors_save_fsync"), c["save_fsync"]), "", None),
        ("verify / single-thread XXH3", ratio(c["xxh3_1thread"], c["verify"]), ">= 1.6", None),
        ("row slice: safetensors / ckpt", ratio(p.get("safetensors_open_row_slice"), c["open_row_slice"]), "", None),
    ]
    print(f"\nckpt CPU benchmark, warm page cache, best of {a.repeat}; big file "
          f"{nb / 2**20:.0f} MiB, {files['big'][0]} tensors; commit {results['commit']}")
    print(f"{'ratio (higher is better for ckpt unless noted)':<48} {'measured':>10} {'target':>8}  ok")
    summary = []
    for name, val, goal, ok in rows:
        if ok is None and goal.startswith(">="):
            ok = val >= float(goal[2:])
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<48} {val:>10.2f} {goal:>8}  {mark}")
        summary.append({"name": name, "value": val, "target": goal, "met": ok})
    print("\nthroughput (GB/s) on the big file:")
    for k in ("raw_read", "raw_read_alloc", "load_view", "load_view_2threads", "load_copy",
              "verify_1thread", "verify", "xxh3_1thread", "save_fsync", "raw_write_fsync"):
        print(f"  ckpt-bench {k:<22} {gbps(c[k]):8.2f}")
    for k in ("torch_load", "safetensors_load_file", "torch_save_fsync", "safetensors_save_fsync"):
        if k in p:
            print(f"  peer       {k:<22} {gbps(p[k]):8.2f}")
    print(f"  open: ckpt {c['open']*1e3:.3f} ms (10k tensors: {many['ckpt']['open']*1e3:.3f} ms)"
          + (f", safe_open {p['safetensors_open']*1e3:.3f} ms (10k: "
             f"{many['peers']['safetensors_open']*1e3:.3f} ms)" if 'safetensors_open' in p else ""))
    results["summary"] = summary
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {a.json}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return 0
    labels, vals, colors = [], [], []
    for k, lab in (("raw_read", "raw read()"), ("load_view_2threads", "ckpt load (view)"),
                   ("load_copy", "ckpt load (copy)"), ("verify", "ckpt verify"),
                   ("save_fsync", "ckpt save+fsync"), ("raw_write_fsync", "write()+fsync")):
        labels.append(lab); vals.append(gbps(c[k])); colors.append("tab:blue")
    for k, lab in (("torch_load", "torch.load"), ("safetensors_load_file", "safetensors load_file"),
                   ("torch_save_fsync", "torch.save+fsync"),
                   ("safetensors_save_fsync", "safetensors save_file+fsync")):
        if k in p:
            labels.append(lab); vals.append(gbps(p[k])); colors.append("tab:orange")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
    ax.set_xlabel("GB/s (warm page cache, higher is better)")
    ax.set_title(f"ckpt vs peers, {nb / 2**30:.1f} GiB bf16 state dict, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(a.png, dpi=100)
    print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
