#!/usr/bin/env bash
# One command from a fresh machine to a working ckpt: install dependencies,
# build, then write a small real checkpoint, inspect it, verify it and load
# values and tensors from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"

demo=build/demo
mkdir -p "$demo"
echo "== write: a synthetic 64 MiB LLM-like training checkpoint"
build/ckpt-bench synth "$demo/model.ckpt" --tensors 40 --total-mb 64
echo "== inspect"
build/ckpt inspect "$demo/model.ckpt" | head -n 12
echo "   ..."
echo "== verify"
build/ckpt verify "$demo/model.ckpt"
echo "== load: a value, and rows 0:4 of a tensor as raw bfloat16"
printf 'optimizer/lr = '; build/ckpt get "$demo/model.ckpt" optimizer/lr
build/ckpt cat "$demo/model.ckpt" model/norm.weight --rows 0:4 | od -A d -t x2 | head -n 2
echo "== the C++ example (examples/write_read.cc)"
build/example_write_read "$demo/example.ckpt"
echo "setup done: tools are in build/ (ckpt, ckpt-bench); run scripts/test.sh for the tests"
