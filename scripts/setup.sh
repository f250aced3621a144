#!/usr/bin/env bash
# One command from a fresh machine to a working ckpt: install dependencies,
# build, then convert a checkpoint made by torch.save, inspect it, verify it
# and load values and tensors from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
# `import ckpt` in .venv: a path file points it at this build's package.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/build/python" > "$site/ckpt-build.pth"

demo=build/demo
mkdir -p "$demo"
echo "== torch.save a small training checkpoint (model, optimizer, epoch, loss, RNG)"
.venv/bin/python - "$demo/train.pth" <<'PYEOF'
import sys, torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model(torch.randn(16, 8)).sum().backward()
opt.step()
torch.save({"epoch": 3, "model_state": model.state_dict(), "optimizer_state": opt.state_dict(),
            "loss": 0.42, "rng_state": torch.get_rng_state()}, sys.argv[1])
PYEOF
echo "== convert it (nothing in the file is executed)"
build/pth2ckpt "$demo/train.pth" "$demo/train.ckpt"
echo "== inspect"
build/ckpt inspect "$demo/train.ckpt"
echo "== verify"
build/ckpt verify "$demo/train.ckpt"
echo "== load: values, and row 0 of a weight as float32"
printf 'epoch = '; build/ckpt get "$demo/train.ckpt" epoch
printf 'lr    = '; build/ckpt get "$demo/train.ckpt" optimizer_state/param_groups/0/lr
build/ckpt cat "$demo/train.ckpt" model_state/0.weight --rows 0:1 | od -A n -t f4 | head -n 2
echo "== the C++ example (examples/write_read.cc)"
build/example_write_read "$demo/example.ckpt"
echo "== Python: ckpt.load of the .pth (converted, never unpickled), ckpt.save, ckpt.open"
.venv/bin/python - "$demo" <<'PYEOF'
import os, sys, torch, ckpt
d = sys.argv[1]
state = ckpt.load(os.path.join(d, "train.pth"))
assert all(torch.equal(a, b) for a, b in zip(state["model_state"].values(),
                                             torch.load(os.path.join(d, "train.pth"))["model_state"].values()))
ckpt.save(state, os.path.join(d, "train-py.ckpt"), metadata={"from": "train.pth"})
with ckpt.open(os.path.join(d, "train-py.ckpt")) as f:
    print("epoch", f.get("epoch"), "| tensors:", len(f), "| metadata:", f.metadata)
    print("model_state/0.weight rows 0:2 =", f.get_slice("model_state/0.weight")[0:2])
PYEOF
.venv/bin/python -m ckpt verify "$demo/train-py.ckpt"
echo "setup done: tools are in build/ (ckpt, pth2ckpt, ckpt-bench), 'import ckpt' works in .venv;"
echo "run scripts/test.sh for the tests"
