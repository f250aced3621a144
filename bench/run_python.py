#!/usr/bin/env python3
"""Python benchmark: ckpt against torch.save/torch.load and safetensors, same run.

Files, each written by every contender from the same tensors:
  state_dict  an LLM-like bfloat16 state dict (--total-mb, default 1 GiB)
  training    a full training checkpoint: bf16 model, fp32 Adam moments and
              steps, param groups, scheduler, epoch, loss history, RNG state
              (safetensors cannot hold it: only its tensors, flattened)
  many        10,000 small tensors (for opening a file with many names)
Loads are timed with the page cache warm as "load + touch": every byte of
every returned tensor is read once (summed as 64-bit words), so lazy (mmap)
loaders pay for their page faults as copying ones pay for their copies.
Each figure is the best and the median of --repeat rounds after one untimed
round; ratios use the best. Saves drain writeback (sync) before each round.
The targets of issue 12 are printed with the measured ratios at the end.

    PYTHONPATH=build/python:python .venv-torch2/bin/python bench/run_python.py
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

try:
    import safetensors
    import safetensors.torch as st
except ImportError:
    st = None

import ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_cpu import fsync_path, warm  # noqa: E402

HAS_MMAP = "mmap" in torch.load.__code__.co_varnames
HAS_PREAD = st is not None and "backend" in st.load_file.__code__.co_varnames


def nbytes(t):
    return t.numel() * t.element_size()  # Debian's torch 1.13 has no Tensor.nbytes


def touch_tensor(t):
    """Reads every byte of t (64-bit words where the size allows)."""
    if t.device.type == "meta" or t.numel() == 0:
        return 0
    b = t.detach().reshape(-1).view(torch.uint8) if t.is_contiguous() else \
        t.detach().contiguous().reshape(-1).view(torch.uint8)
    if b.numel() % 8 == 0:
        return int(b.view(torch.int64).sum())
    return int(b.sum())


def touch(tree):
    return sum(touch_tensor(t) for t in ckpt.flatten(tree).values())


def state_dict(total_mb, dtype=torch.bfloat16, seed=0):
    """GPT-like layers (d=2048; d=256 below 64 MiB) until total_mb is reached."""
    g = torch.Generator().manual_seed(seed)
    d, vocab, size = (2048, 16384, 0) if total_mb >= 64 else (256, 1024, 0)
    sd = {"embed.weight": torch.randn(vocab, d, generator=g).to(dtype)}
    size += nbytes(sd["embed.weight"])
    i = 0
    while size < total_mb * 2**20:
        for name, shape in ((f"h.{i}.attn.qkv.weight", (3 * d, d)), (f"h.{i}.attn.qkv.bias", (3 * d,)),
                            (f"h.{i}.attn.proj.weight", (d, d)), (f"h.{i}.ln1.weight", (d,)),
                            (f"h.{i}.mlp.fc.weight", (4 * d, d)),
                            (f"h.{i}.mlp.proj.weight", (d, 4 * d)), (f"h.{i}.ln2.weight", (d,))):
            sd[name] = torch.randn(*shape, generator=g).to(dtype)
            size += nbytes(sd[name])
        i += 1
    return sd


def training_state(total_mb):
    """A bf16 model of total_mb / 5 with fp32 Adam moments (4/5)."""
    sd = state_dict(total_mb / 5, seed=1)
    params = list(sd.values())
    opt_state = {i: {"step": torch.tensor(1000.0),
                     "exp_avg": torch.randn(p.shape), "exp_avg_sq": torch.rand(p.shape)}
                 for i, p in enumerate(params)}
    return {"model": sd,
            "optimizer": {"state": opt_state,
                          "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                            "weight_decay": 0.1, "amsgrad": False,
                                            "params": list(range(len(params)))}]},
            "scheduler": {"last_epoch": 1000, "base_lrs": [3e-4]},
            "epoch": 12, "losses": [1.0 / (k + 1) for k in range(1000)],
            "rng": ckpt.rng.get_state()}


def many_tensors(n=10000):
    return {f"layers.{i // 10}.w{i % 10}": torch.full((16, 16), float(i)) for i in range(n)}


def timed(fn, repeat, before=None):
    """(best, median) seconds of fn() over `repeat` rounds after one untimed
    round; before() runs untimed ahead of each round."""
    if before:
        before()
    fn()
    times = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def raw_read_touched(path):
    """read() of the whole file into new memory, every byte then summed."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buf)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    return touch_tensor(t[: t.numel() // 8 * 8])


def load_rows(name, obj, workdir, repeat, device):
    """{contender: (best, median)} for loading `obj`'s file every way."""
    pth, ck, sft = (os.path.join(workdir, f"{name}.{e}") for e in ("pth", "ckpt", "safetensors"))
    torch.save(obj, pth)
    ckpt.save(obj, ck, sync=False)
    if st is not None:
        ckpt.save_safetensors(obj, sft)
    os.sync()
    for p in (pth, ck, sft):
        if os.path.exists(p):
            warm(p)
    flat = ckpt.flatten(obj)
    some = sorted(flat)[len(flat) // 2]  # a middle-sized one, as in earlier runs
    ml = None if device == "cpu" else device
    only = " (tensors only)" if name == "training" else ""
    rows = {}

    def run(label, fn):
        rows[label] = timed(lambda: touch(fn()), repeat)

    if device == "cpu":
        rows["read() of the .ckpt file"] = timed(lambda: raw_read_touched(ck), repeat)
    # weights_only=True (torch 2.6+'s default) where it reads the file; the
    # training state holds numpy's RNG state, which it refuses.
    wo = True
    try:
        torch.load(pth, weights_only=True)
    except Exception:  # pickle.UnpicklingError
        wo = False
        print(f"  ({name}: torch.load(weights_only=True) refuses this file; "
              "timing torch.load with weights_only=False)")
    run("torch.load", lambda: torch.load(pth, map_location=device, weights_only=wo))
    if HAS_MMAP and device == "cpu":
        run("torch.load(mmap=True)", lambda: torch.load(pth, mmap=True, weights_only=wo))
    if st is not None:
        run("safetensors load_file" + only, lambda: st.load_file(sft, device=device))
        if HAS_PREAD and device == "cpu":
            run("safetensors load_file(pread)" + only,
                lambda: st.load_file(sft, device=device, backend="pread"))
    run("ckpt.load", lambda: ckpt.load(ck, map_location=ml))
    if device == "cpu":
        run("ckpt.load(mmap=True)", lambda: ckpt.load(ck, mmap=True))

    def ck_one():
        with ckpt.open(ck) as f:
            return {"t": f[some] if device == "cpu" else f[some].to(device)}
    run("ckpt.open + one tensor", ck_one)
    if HAS_MMAP and device == "cpu":
        run("torch.load(mmap=True) + one tensor",
            lambda: {"t": ckpt.flatten(torch.load(pth, mmap=True, weights_only=wo))[some]})
    if st is not None:
        def st_one():
            with st.safe_open(sft, framework="pt", device=device) as f:
                return {"t": f.get_tensor(some)}
        run("safe_open + one tensor", st_one)
    if device == "cpu":
        # Time to the first tensor: the view only, its bytes not read.
        rows["ckpt.open + one tensor (view, untouched)"] = timed(ck_one, repeat * 4)
        if HAS_MMAP:
            rows["torch.load(mmap=True) + it (view, untouched)"] = timed(
                lambda: torch.load(pth, mmap=True, weights_only=wo), repeat * 4)
        if st is not None:
            rows["safe_open + get_tensor (view, untouched)"] = timed(st_one, repeat * 4)
    for p in (pth, ck, sft):
        if os.path.exists(p):
            os.unlink(p)
    return rows, some


def open_rows(workdir, repeat):
    """Opening a 10,000-tensor file: open alone, open + keys(), open + one."""
    obj = many_tensors()
    ck, sft = os.path.join(workdir, "many.ckpt"), os.path.join(workdir, "many.safetensors")
    ckpt.save(obj, ck, sync=False)
    if st is not None:
        st.save_file(obj, sft)
    name = "layers.500.w5"
    rows = {}

    def ck_open():
        with ckpt.open(ck):
            pass

    def ck_keys():
        with ckpt.open(ck) as f:
            return len(f.keys())

    def ck_one():
        with ckpt.open(ck) as f:
            return touch_tensor(f[name])
    rows["ckpt.open"] = timed(ck_open, repeat * 20)
    rows["ckpt.open + keys()"] = timed(ck_keys, repeat * 20)
    rows["ckpt.open + one tensor"] = timed(ck_one, repeat * 20)
    if st is not None:
        def st_open():
            with st.safe_open(sft, framework="pt"):
                pass

        def st_keys():
            with st.safe_open(sft, framework="pt") as f:
                return len(f.keys())

        def st_one():
            with st.safe_open(sft, framework="pt") as f:
                return touch_tensor(f.get_tensor(name))
        rows["safe_open"] = timed(st_open, repeat * 20)
        rows["safe_open + keys()"] = timed(st_keys, repeat * 20)
        rows["safe_open + one tensor"] = timed(st_one, repeat * 20)
    for p in (ck, sft):
        if os.path.exists(p):
            os.unlink(p)
    return rows


def save_rows(name, obj, workdir, repeat):
    """Seconds to write obj, each contender without and with fsync (ckpt.save
    with sync=True fsyncs the file and its directory and renames)."""
    out = os.path.join(workdir, "save.out")
    flat = {k: v.contiguous() for k, v in ckpt.flatten(obj).items()}

    def clean():
        if os.path.exists(out):
            os.unlink(out)
        os.sync()

    def synced(fn):
        def f():
            fn()
            fsync_path(out)
        return f
    rows = {
        "torch.save": timed(lambda: torch.save(obj, out), repeat, clean),
        "ckpt.save(sync=False)": timed(lambda: ckpt.save(obj, out, sync=False), repeat, clean),
        "torch.save + fsync": timed(synced(lambda: torch.save(obj, out)), repeat, clean),
        "ckpt.save (fsync, atomic rename)": timed(lambda: ckpt.save(obj, out), repeat, clean),
    }
    if st is not None:
        only = " (tensors only)" if name == "training" else ""
        rows["safetensors save_file" + only] = timed(lambda: st.save_file(flat, out), repeat, clean)
        rows["safetensors save_file + fsync" + only] = timed(
            synced(lambda: st.save_file(flat, out)), repeat, clean)
    clean()
    return rows


def ratio(rows, peer, ours):
    if peer in rows and ours in rows:
        return rows[peer][0] / rows[ours][0]
    return None


TARGETS = [
    # (file, section, peer, ours, target, what)
    ("state_dict", "load", "torch.load", "ckpt.load", 1.5, "ckpt.load (copies) vs torch.load"),
    ("state_dict", "load", "read() of the .ckpt file", "ckpt.load", 1.0,
     "ckpt.load (copies) vs raw read() of the file"),
    ("state_dict", "load", "safetensors load_file(pread)", "ckpt.load", 1.5,
     "ckpt.load (copies) vs safetensors load_file(backend='pread')"),
    ("state_dict", "load", "torch.load(mmap=True)", "ckpt.load(mmap=True)", 1.5,
     "ckpt.load(mmap=True) vs torch.load(mmap=True, weights_only=True)"),
    ("state_dict", "load", "safetensors load_file", "ckpt.load(mmap=True)", 1.2,
     "ckpt.load(mmap=True) vs safetensors load_file (mapped)"),
    ("state_dict", "load", "torch.load(mmap=True) + one tensor", "ckpt.open + one tensor", 20,
     "ckpt.open + one tensor vs torch.load(mmap=True) + it"),
    ("state_dict", "load", "safe_open + one tensor", "ckpt.open + one tensor", 1.5,
     "ckpt.open + one tensor vs safe_open + get_tensor"),
    ("state_dict", "load", "torch.load(mmap=True) + it (view, untouched)",
     "ckpt.open + one tensor (view, untouched)", 20,
     "same, time to the view (bytes not read) vs torch.load(mmap=True)"),
    ("state_dict", "load", "safe_open + get_tensor (view, untouched)",
     "ckpt.open + one tensor (view, untouched)", 1.5,
     "same, time to the view (bytes not read) vs safe_open + get_tensor"),
    ("many", "open", "safe_open", "ckpt.open", 5, "ckpt.open vs safe_open, 10,000 tensors"),
    ("many", "open", "safe_open + keys()", "ckpt.open + keys()", 5,
     "ckpt.open + keys() vs safe_open + keys(), 10,000 tensors"),
    ("state_dict", "save", "safetensors save_file", "ckpt.save(sync=False)", 1.2,
     "ckpt.save (checksums, no fsync) vs safetensors save_file"),
    ("state_dict", "save", "torch.save", "ckpt.save(sync=False)", 1.5,
     "ckpt.save (checksums, no fsync) vs torch.save"),
    ("state_dict", "save", "safetensors save_file + fsync", "ckpt.save (fsync, atomic rename)", 1.0,
     "ckpt.save (fsync, rename, dir fsync) vs save_file + fsync"),
    ("training", "load", "torch.load", "ckpt.load", 1.5, "training: ckpt.load vs torch.load"),
    ("training", "load", "torch.load(mmap=True)", "ckpt.load(mmap=True)", 1.5,
     "training: ckpt.load(mmap=True) vs torch.load(mmap=True)"),
    ("training", "save", "torch.save", "ckpt.save(sync=False)", 1.5,
     "training: ckpt.save vs torch.save, no fsync"),
]


def print_rows(title, rows, size=None):
    print(f"\n{title}")
    print(f"  {'':44s} {'best s':>9s} {'median s':>9s}" + (f" {'GB/s':>6s}" if size else ""))
    for k, (best, med) in rows.items():
        gbs = f" {size / best / 1e9:6.2f}" if size else ""
        print(f"  {k:44s} {best:9.4f} {med:9.4f}{gbs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/ckpt-bench-python")
    ap.add_argument("--total-mb", type=float, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="bench/results/python_torch2.json")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    versions = {"torch": torch.__version__, "ckpt": ckpt.__version__,
                "safetensors": safetensors.__version__ if st else None,
                "python": sys.version.split()[0], "cpus": os.cpu_count()}
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    if st is None:
        print("safetensors is not installed: its rows are missing", file=sys.stderr)
    if not HAS_MMAP:
        print("torch.load has no mmap=True in this torch: its rows are missing", file=sys.stderr)
    report = {"device": a.device, "versions": versions, "repeat": a.repeat, "files": {}}
    results = {}
    for name, make in (("state_dict", lambda: state_dict(a.total_mb)),
                       ("training", lambda: training_state(a.total_mb))):
        obj = make()
        total = sum(nbytes(t) for t in ckpt.flatten(obj).values())
        load, some = load_rows(name, obj, a.workdir, a.repeat, a.device)
        print_rows(f"{name}: {total / 2**20:.0f} MiB of tensors, {len(ckpt.flatten(obj))} tensors, "
                   f"load + touch every byte, {a.device}, best/median of {a.repeat}, warm cache "
                   f"(one tensor: '{some}')", load, total)
        save = save_rows(name, obj, a.workdir, a.repeat) if a.device == "cpu" else {}
        if save:
            print_rows(f"{name}: saving, writeback drained before each round", save, total)
        results[name] = {"load": load, "save": save}
        report["files"][name] = {"bytes": total, "load_seconds": load, "save_seconds": save}
        del obj
    if a.device == "cpu":
        results["many"] = {"open": open_rows(a.workdir, a.repeat)}
        print_rows(f"many: 10,000 tensors of 1 KiB, best/median of {a.repeat * 20}",
                   results["many"]["open"])
        report["files"]["many"] = {"open_seconds": results["many"]["open"]}
    print("\ntargets (ratio = peer's best time / ckpt's best time):")
    report["targets"] = []
    for file, section, peer, ours, target, what in TARGETS:
        r = ratio(results.get(file, {}).get(section, {}), peer, ours)
        met = "n/a" if r is None else ("yes" if r >= target else "NO")
        shown = "  -  " if r is None else f"{r:5.2f}"
        print(f"  {what:66s} {shown}x  target >= {target:g}x  {met}")
        report["targets"].append({"what": what, "ratio": r, "target": target, "met": met})
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
