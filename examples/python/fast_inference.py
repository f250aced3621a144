"""Fast inference start: save a model's weights once, then start serving
from them without copying the file into memory.

    python examples/python/fast_inference.py [--dir DIR] [--width N]

ckpt.load(path, mmap=True) maps the file and returns tensors that are views
of it: a process starts in milliseconds, pages come in as they are used,
and several processes serving the same file share one copy in the page
cache. ckpt.open reads just the tensors one process needs (e.g. one shard).
"""
import argparse
import os
import tempfile
import time

import torch

import ckpt


def make_model(width):
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.GELU(),
                               torch.nn.Linear(width, 10))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--width", type=int, default=1024)
    a = ap.parse_args()
    d = a.dir or tempfile.mkdtemp(prefix="ckpt-example-")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.ckpt")

    # --- training side: save the weights (atomic: a crash never leaves half a file)
    torch.manual_seed(0)
    trained = make_model(a.width).eval()
    ckpt.save(trained.state_dict(), path, metadata={"arch": f"mlp-{a.width}"})

    # --- serving side: map the file, load the weights into a fresh model
    t0 = time.perf_counter()
    state = ckpt.load(path, mmap=True)          # zero-copy views of the file
    model = make_model(a.width).eval()
    model.load_state_dict(state)
    t1 = time.perf_counter()
    x = torch.randn(8, 64)
    with torch.no_grad():
        same = torch.equal(model(x), trained(x))
    print(f"loaded {len(state)} tensors ({os.path.getsize(path) / 2**20:.1f} MiB) "
          f"and built the model in {(t1 - t0) * 1e3:.1f} ms; outputs identical: {same}")

    # --- one process needs one layer: read only that
    with ckpt.open(path) as f:
        print("tensors:", ", ".join(f.keys()), "| metadata:", f.metadata)
        w = f["2.weight"]                        # nothing else is read
        rows = f.get_slice("2.weight")[:4]       # or just some rows of it
        assert torch.equal(rows, w[:4])
        print(f"2.weight {tuple(w.shape)} {w.dtype}; rows 0..3 read on their own")
    if not same:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
