#!/usr/bin/env bash
# The whole test suite: a warnings-as-errors build and its tests, the same
# tests under AddressSanitizer + UBSan, and a short libFuzzer run of
# Checkpoint::OpenBuffer when clang is available.
#   scripts/test.sh            everything
#   scripts/test.sh --quick    the first build's tests only
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
quick=0
[ "${1:-}" = "--quick" ] && quick=1
# Each stage's heading says when it started (bash's SECONDS), so that a
# run shows where CI's budget of well under 30 minutes goes.
stage() { echo "== $* (at $((SECONDS / 60))m$((SECONDS % 60))s)"; }

stage "format (.clang-format)"
scripts/check_format.sh

stage "build (warnings are errors) and test"
cmake -S . -B build-test -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCKPT_WERROR=ON >/dev/null
cmake --build build-test -j"$jobs"
# DCP checkpoints written by PyPI's torch, for the DCP reader's tests.
if [ -x .venv-torch2/bin/python ]; then
  rm -rf build-test/dcp-fixtures
  .venv-torch2/bin/python tests/dcp/make_dcp.py build-test/dcp-fixtures | tail -n 1
fi
(cd build-test && ctest --output-on-failure -j"$jobs")
[ "$quick" = 1 ] && exit 0

stage "the Python suites and the .pth tests again, under PyPI's torch 2.x"
t2=.venv-torch2/bin/python
if [ -x "$t2" ]; then
  "$t2" -c 'import torch; print("torch", torch.__version__)'
  root=$PWD
  suites="test_api test_hardening test_training test_examples test_bigfile test_torch2
          test_compat test_progress test_distributed test_manager test_dcp_plugin
          test_lightning test_serving test_hf test_integrations_doc"
  for s in $suites; do
    (cd tests/python && PYTHONPATH="$root/build-test/python:$root/python" \
      "$root/$t2" run.py "$s" > "$root/build-test/torch2_$s.log" 2>&1) ||
      { tail -n 40 "build-test/torch2_$s.log"; echo "torch2 $s: FAILED"; exit 1; }
    tail -n 1 "build-test/torch2_$s.log"
  done
  "$t2" tests/pth/pth_test.py build-test | tail -n 1
  "$t2" tests/pth/hardening_test.py build-test | tail -n 1
  echo "torch2: $(($(wc -w <<< "$suites") + 2)) passed, 0 failed"
else
  echo "torch2: skipped (no .venv-torch2: scripts/install_deps.sh makes it)"
fi

stage "scripts/gpu_check.sh --double: the GPU check's steps against the CUDA-runtime double"
if [ -x build-test/tests/cuda_real_test_double ]; then
  gout=$(mktemp -d)
  scripts/gpu_check.sh --double --build build-test --out "$gout" > "$gout/log" ||
    { cat "$gout/log" "$gout/gpu_check_double.txt"; exit 1; }
  tail -n 2 "$gout/log"
  rm -rf "$gout"
  echo "gpu_check: 1 passed, 0 failed"
else
  echo "gpu_check: skipped (no CUDA toolkit: the loader is not built)"
fi

stage "pip: pip install -e . and a wheel from this tree (scikit-build-core)"
# One build tree (build-pip/, pyproject's build-dir) serves both, built
# without build isolation by a venv holding exactly the build-system
# requirements: an isolated build gets a new temporary environment each time,
# which makes scikit-build-core clear the CMake cache and rebuild everything
# (~1.5 min here); this way a rerun rebuilds only what changed.
if [ -x "$t2" ]; then
  t0=$SECONDS
  root=$PWD
  dev=build-pip/venv
  # A fresh venv that sees .venv-torch2's packages (torch 2.x, numpy) through
  # a .pth file: --system-site-packages would give the base interpreter's
  # (Debian's torch 1.13), and installing into .venv-torch2 itself would
  # put an editable ckpt in front of every other test's PYTHONPATH.
  "$t2" -m venv --clear "$dev"
  "$t2" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$(echo "$dev"/lib/python3*/site-packages)/_torch2_base.pth"
  "$dev/bin/python" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
    > build-pip/build-requires.txt
  "$dev/bin/pip" install -q --disable-pip-version-check -r build-pip/build-requires.txt
  pipq="-q --disable-pip-version-check --no-build-isolation"
  "$dev/bin/pip" install $pipq -e .
  # Outside the tree, with no PYTHONPATH: the .py files come from python/ckpt
  # (edits show at once), the compiled module from the venv.
  (cd /tmp && env -u PYTHONPATH "$root/$dev/bin/python" - "$root" <<'PYEOF'
import os, sys, tempfile
import ckpt, torch
root = sys.argv[1]
assert os.path.dirname(ckpt.__file__) == os.path.join(root, "python", "ckpt"), ckpt.__file__
assert ckpt._ckpt.__file__.startswith(sys.prefix), ckpt._ckpt.__file__
d = tempfile.mkdtemp()
p = os.path.join(d, "t.ckpt")
w = torch.arange(12, dtype=torch.bfloat16).view(3, 4)
ckpt.save({"w": w, "step": 3}, p)
back = ckpt.load(p)
assert torch.equal(back["w"], w) and back["step"] == 3, back
print(p)
PYEOF
  ) > build-pip/editable.out
  f=$(tail -n 1 build-pip/editable.out)
  (cd /tmp && env -u PYTHONPATH "$root/$dev/bin/python" -m ckpt verify "$f")
  env -u PYTHONPATH "$dev/bin/ckpt" verify "$f" >/dev/null
  rm -rf "$(dirname "$f")"
  echo "pip -e: 1 passed, 0 failed ($((SECONDS - t0)) s)"

  t0=$SECONDS
  wh=$(mktemp -d)
  "$dev/bin/pip" wheel $pipq --no-deps . -w "$wh/dist"
  "$t2" -m venv "$wh/venv"
  "$wh/venv/bin/pip" install -q --disable-pip-version-check "$wh"/dist/ckpt-*.whl
  # Statically linked: no -dev library (zlib, cudart) is needed to run it.
  if ldd "$wh/venv/bin/ckpt" "$wh"/venv/lib/python*/site-packages/ckpt/_ckpt*.so |
      grep -E "libz|libcudart"; then
    echo "pip: the wheel links a shared zlib or cudart"; exit 1
  fi
  "$wh/venv/bin/ckpt" verify tests/data/golden_v1.ckpt
  # That venv has no torch: `python -m ckpt verify` needs none (lazy imports).
  "$wh/venv/bin/python" -c 'import importlib.util as u; assert u.find_spec("torch") is None' ||
    { echo "pip: the wheel's venv has torch"; exit 1; }
  "$wh/venv/bin/python" -m ckpt verify tests/data/golden_v1.ckpt
  rm -rf "$wh"
  echo "pip wheel: 1 passed, 0 failed ($((SECONDS - t0)) s)"
else
  echo "pip: skipped (no .venv-torch2)"
fi

stage "install, then build a consumer with find_package(ckpt)"
prefix=$(mktemp -d)
cmake --install build-test --prefix "$prefix" >/dev/null
cmake -S tests/install -B build-consumer -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build-consumer -j"$jobs"
build-consumer/consumer "$prefix/consumer.ckpt"
# Where the toolkit was found, the loader through ckpt::cuda (77: no GPU).
if [ -x build-consumer/consumer_cuda ]; then
  rc=0
  build-consumer/consumer_cuda "$prefix/consumer_cuda.ckpt" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 77 ] || { echo "consumer_cuda failed ($rc)" >&2; exit 1; }
fi
# Where MPI was found, the sharded example through ckpt::mpi, on 2 ranks.
if [ -x build-consumer/consumer_mpi ]; then
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader \
    OMPI_MCA_btl_vader_single_copy_mechanism=none \
    mpirun --oversubscribe --bind-to none -np 2 build-consumer/consumer_mpi "$prefix/sharded"
fi
rm -rf "$prefix"
echo "install: 1 passed, 0 failed"

stage "ASan + UBSan build and test"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCKPT_SANITIZE=ON \
  -DCKPT_WERROR=ON -DCKPT_BUILD_BENCH=OFF -DCKPT_BUILD_PYTHON=OFF >/dev/null
cmake --build build-asan -j"$jobs"
# The DCP reader's tests read the fixtures the first build's step wrote.
if [ -d build-test/dcp-fixtures ]; then
  rm -rf build-asan/dcp-fixtures
  ln -s ../build-test/dcp-fixtures build-asan/dcp-fixtures
fi
# allocator_may_return_null: tests check that an allocation too large for
# the machine is reported as an error (new(nothrow) returning null), which
# ASan would otherwise turn into an abort.
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 ctest --output-on-failure -j"$jobs")

stage "ThreadSanitizer: the threaded code (verify, writer, GPU loader on the test double)"
cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCKPT_TSAN=ON \
  -DCKPT_BUILD_BENCH=OFF -DCKPT_BUILD_EXAMPLES=OFF -DCKPT_BUILD_PYTHON=OFF >/dev/null
targets=ckpt_tests
# The loader's tests exist where the CUDA toolkit was found.
if cmake --build build-tsan --target help | grep "cuda_tests" >/dev/null; then
  targets="ckpt_tests cuda_tests"
fi
cmake --build build-tsan -j"$jobs" --target $targets
for t in $targets; do
  TSAN_OPTIONS=halt_on_error=1:allocator_may_return_null=1 "build-tsan/tests/$t" | tail -n 2
done
echo "tsan: 1 passed, 0 failed"

if command -v clang++ >/dev/null; then
  stage "libFuzzer: Checkpoint::OpenBuffer (+ every accessor the binding uses) and CheckPth 40 s each, manifests and reports 30 s, DCP .metadata and safetensors headers 20 s each"
  CXX=clang++ cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCKPT_FUZZ=ON \
    -DCKPT_BUILD_TESTS=OFF -DCKPT_BUILD_BENCH=OFF -DCKPT_BUILD_TOOLS=OFF \
    -DCKPT_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build build-fuzz -j"$jobs" --target open_fuzz pth_fuzz manifest_fuzz dcp_fuzz \
    safetensors_fuzz
  corpus=$(mktemp -d)
  trap 'rm -rf "$corpus"' EXIT
  mkdir -p "$corpus/ckpt" "$corpus/pth" "$corpus/manifest"
  cp tests/data/*.ckpt "$corpus/ckpt/"
  # A stride-0 view of 2^40 elements: walks must stream, never allocate it.
  build-test/tests/make_fixture expand "$corpus/ckpt/expand.ckpt" 1.5
  # Seeds for the .pth fuzzer: small files written by the installed torch.
  py=.venv/bin/python
  [ -x "$py" ] || py=python3
  "$py" - "$corpus/pth" <<'PYEOF' || echo "(no torch: pth fuzzer starts without seeds)"
import os, sys, torch
sys.path.insert(0, "tests/pth")
import fixtures
out = sys.argv[1]
for i, (name, obj) in enumerate(fixtures.make_cases().items()):
    if name not in ("many", "many_tensors"):
        torch.save(obj, os.path.join(out, f"{i}.pth"))
        torch.save(obj, os.path.join(out, f"{i}.legacy.pth"), _use_new_zipfile_serialization=False)
PYEOF
  for t in open_fuzz:ckpt pth_fuzz:pth; do
    build-fuzz/${t%%:*} -max_total_time=40 -max_len=65536 -rss_limit_mb=2048 \
      -print_final_stats=0 "$corpus/${t##*:}" 2>&1 | tail -n 1
  done
  # Seeds for the manifest fuzzer: manifests of a file sharded 1 to 3 ways.
  for n in 1 3; do
    build-test/ckpt shard tests/data/golden_v1.ckpt "$corpus/s$n" --ranks "$n" >/dev/null &&
      cp "$corpus/s$n/MANIFEST.ckptm" "$corpus/manifest/$n.ckptm" ||
      echo "(ckpt shard failed: manifest fuzzer starts without seeds)"
  done
  build-fuzz/manifest_fuzz -max_total_time=30 -max_len=65536 -rss_limit_mb=2048 \
    -print_final_stats=0 "$corpus/manifest" 2>&1 | tail -n 1
  # Seeds for the DCP fuzzer: .metadata files torch wrote (fixtures above).
  mkdir -p "$corpus/dcp"
  python3 tests/dcp/fuzz_seeds.py build-test/dcp-fixtures "$corpus/dcp" ||
    echo "(no DCP fixtures: the DCP fuzzer starts without seeds)"
  build-fuzz/dcp_fuzz -max_total_time=20 -max_len=65536 -rss_limit_mb=2048 \
    -print_final_stats=0 "$corpus/dcp" 2>&1 | tail -n 1
  # Seeds for the safetensors fuzzer: small valid files (a shape, two
  # dtypes, metadata, an empty tensor).
  mkdir -p "$corpus/st"
  python3 - "$corpus/st" <<'PYEOF'
import json, struct, sys
for i, h in enumerate([
        {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}},
        {"__metadata__": {"format": "pt"},
         "w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
         "e": {"dtype": "I64", "shape": [0, 5], "data_offsets": [8, 8]}}]):
    text = json.dumps(h).encode()
    end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
    open(f"{sys.argv[1]}/{i}.safetensors", "wb").write(
        struct.pack("<Q", len(text)) + text + bytes(range(end)))
PYEOF
  build-fuzz/safetensors_fuzz -max_total_time=20 -max_len=65536 -rss_limit_mb=2048 \
    -print_final_stats=0 "$corpus/st" 2>&1 | tail -n 1
  echo "fuzz: 5 passed, 0 failed"
else
  echo "fuzz: skipped (clang++ not found)"
fi
