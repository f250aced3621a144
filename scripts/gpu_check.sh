#!/usr/bin/env bash
# Everything this repository can check and measure on a machine with one
# NVIDIA GPU, in one command and one results file (issue 12 "GPU, when there
# is one"). Builds what it needs (Release, CUDA on, -j$(nproc)), then runs:
#   1. cuda_real_test      the device loader against the real runtime
#   2. the CUDA Python tests (every test in tests/python that mentions cuda)
#   3. ckpt-bench gpu      on a 1 GiB synthetic bf16 state dict
#   4. bench/run_gpu.py    ckpt-bench gpu beside safetensors / torch.load
# and writes gpu_check.txt (device, driver, CUDA, torch, every figure, each
# step's time and status) plus the benchmarks' JSON under $OUT if set, else
# bench/results/. Each step runs under `timeout`, within a total budget of
# 8 minutes (a 16-core host needs about half of it).
#
#   scripts/gpu_check.sh [--torch-wheels DIR] [--python PY] [--build DIR]
#                        [--out DIR] [--budget SECONDS] [--double]
#
#   --torch-wheels DIR  make a venv and install torch and numpy (and
#                       safetensors, pybind11 where DIR has them) from DIR,
#                       offline (`pip download torch numpy -d DIR` fills it)
#   --python PY         the Python that has torch (default: the build's, else
#                       .venv-torch2/bin/python, else python3)
#   --build DIR         build directory (default build-gpu; an existing one
#                       is reused as configured)
#   --double            no GPU needed: the same steps against the CUDA-runtime
#                       test double (tests/cuda_double); the Python GPU tests
#                       run their no-GPU paths and run_gpu.py says SKIP. For
#                       checking this script; its figures mean nothing.
#
# Exit: 0 all steps passed, 1 a step failed, 77 no GPU (without --double),
# 2 usage or a missing prerequisite.
set -uo pipefail
# Steps run as `timeout T bash -c step`: their functions and variables are
# exported (set -a here, export -f in run_step).
set -a
cd "$(dirname "$0")/.."
root=$PWD
start=$SECONDS

wheels="" py="" build="" out="${OUT:-}" budget=480 double=0
while [ $# -gt 0 ]; do
  case "$1" in
    --torch-wheels) wheels=$(cd "$2" && pwd) || exit 2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --double|--dry-run) double=1; shift ;;
    -h|--help) sed -n "2,/^set -uo/p" "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "gpu_check: $*"; }

# ---- 0. is there a GPU? -------------------------------------------------------------
if [ "$double" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null; then
    say "no NVIDIA GPU here (nvidia-smi not found); --double runs the same steps against the CUDA-runtime test double"
    exit 77
  fi
  # Whole output first: `nvidia-smi -L | grep -q` under pipefail fails with
  # SIGPIPE when a second line (a MIG instance, a second GPU) comes late.
  gpus=$(nvidia-smi -L 2>&1)
  if ! grep -q "^GPU " <<< "$gpus"; then
    say "no NVIDIA GPU here (nvidia-smi -L: $(head -n 1 <<< "$gpus")); --double runs the same steps against the CUDA-runtime test double"
    exit 77
  fi
fi

build=${build:-build-gpu}
out=${out:-bench/results}
mkdir -p "$out" "$build" || exit 2
out=$(cd "$out" && pwd)
build=$(cd "$build" && pwd)
tag=$([ "$double" = 1 ] && echo "_double" || echo "")
report="$out/gpu_check$tag.txt"
work=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
steps=()     # "name|status|seconds|detail" per step
failed=0

# Seconds a step may take: its own cap, within what is left of the budget
# (10 s kept for the report).
allow() {
  local left=$((budget - (SECONDS - start) - 10))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

# run_step NAME CAP LOG COMMAND...: runs under timeout, records the result.
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local t s0=$SECONDS rc
  t=$(allow "$cap")
  if [ "$t" -lt 5 ]; then
    steps+=("$name|not run|0|out of time budget (${budget} s)")
    echo "(not run: out of time budget)" > "$log"
    failed=1
    return 1
  fi
  say "$name (up to ${t} s)"
  export -f make_venv build_all cuda_py_tests bench_gpu run_gpu pyenv 2>/dev/null
  timeout --kill-after=10 "$t" bash -c '"$@"' "$name" "$@" > "$log" 2>&1
  rc=$?
  local dt=$((SECONDS - s0)) status=passed
  case $rc in
    0) ;;
    77) status=skipped ;;
    124|137) status="timed out after ${t} s"; failed=1 ;;
    *) status="failed (exit $rc)"; failed=1 ;;
  esac
  steps+=("$name|$status|$dt|$(tail -n 1 "$log" | cut -c1-120)")
  say "  $status in ${dt} s: $(tail -n 1 "$log" | cut -c1-150)"
  return $rc
}

# ---- 1. Python with torch ----------------------------------------------------------
if [ -n "$wheels" ]; then
  venv="$build/venv-torch"
  make_venv() {
    set -e
    python3 -m venv --clear "$venv"
    local pkgs="torch numpy"
    for p in safetensors pybind11; do
      ls "$wheels"/"$p"-*.whl >/dev/null 2>&1 && pkgs="$pkgs $p"
    done
    "$venv/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$wheels" $pkgs
  }
  if ! run_step "torch from $wheels" 180 "$work/venv.log" make_venv; then
    say "cannot install torch from $wheels: $(tail -n 1 "$work/venv.log")"
    exit 2
  fi
  py="$venv/bin/python"
elif [ -z "$py" ] && [ -f "$build/CMakeCache.txt" ]; then
  # The interpreter the build's module is for (CMakeLists.txt picks it).
  py=$(sed -n 's/^_\{0,1\}Python_EXECUTABLE:[A-Z]*=//p' "$build/CMakeCache.txt" | head -n 1)
fi
if [ -z "$py" ]; then
  if [ -x .venv-torch2/bin/python ]; then py=.venv-torch2/bin/python; else py=python3; fi
fi
case "$py" in
  /*) ;;
  */*) py="$root/$py" ;;  # not resolved: a venv's python is a symlink
  *) py=$(command -v "$py" || echo "$py") ;;
esac
torch_info=$("$py" -c 'import torch, sys
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, sees a GPU: {torch.cuda.is_available()}), Python {sys.version.split()[0]}")' 2>&1 | tail -n 1)
say "$py: $torch_info"
if ! "$py" -c 'import torch, numpy' 2>/dev/null; then
  say "$py has no torch and numpy ($torch_info): pass --python PY (a Python that has both) or --torch-wheels DIR"
  exit 2
fi

# ---- 2. build -------------------------------------------------------------------------
if [ "$double" = 1 ]; then
  targets="cuda_real_test_double ckpt_bench_double ckpt_tool ckpt_python"
else
  targets="cuda_real_test ckpt-bench ckpt_tool ckpt_python"
fi
build_all() {
  set -e
  if [ ! -f "$build/CMakeCache.txt" ]; then
    local extra=()
    local pb
    pb=$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())' 2>/dev/null) && extra+=("-Dpybind11_DIR=$pb")
    cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCKPT_BUILD_TESTS=ON -DCKPT_BUILD_BENCH=ON \
      -DCKPT_BUILD_PYTHON=ON -DCKPT_BUILD_TOOLS=ON -DCKPT_BUILD_EXAMPLES=OFF \
      -DPython_EXECUTABLE="$py" "${extra[@]}"
  else
    # Reused, but for this run's Python: the module must import there.
    cmake -S . -B "$build" -DPython_EXECUTABLE="$py"
  fi
  local targets_known want=$targets
  targets_known=$(cmake --build "$build" --target help)  # whole: grep -q would cut the pipe
  if ! grep -q cuda_real_test <<< "$targets_known"; then
    echo "no CUDA toolkit found (nvcc): the device loader is not built"
    return 2
  fi
  if ! grep -q "ckpt_python" <<< "$targets_known"; then
    # No pybind11 for this Python: the C++ checks still run.
    want=${want/ ckpt_python/}
    touch "$work/no_python_module"
  fi
  cmake --build "$build" -j"$(nproc)" --target $want
  echo "built $want"
}
run_step "build ($targets)" 300 "$work/build.log" build_all
built=$?

bin() {  # a built program's path (top level or tests/)
  for d in "$build" "$build/tests"; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done
  echo "$build/$1"
}
if [ "$double" = 1 ]; then
  real_test=$(bin cuda_real_test_double) bench=$(bin ckpt_bench_double) mb=32 repeat=1
else
  real_test=$(bin cuda_real_test) bench=$(bin ckpt-bench) mb=1024 repeat=3
fi
pyenv() { env PYTHONPATH="$build/python:$root/python" CKPT_BUILD_DIR="$build" "$@"; }

if [ "$built" = 0 ]; then
  # ---- 3. the loader against the runtime ----------------------------------------------
  run_step "cuda_real_test" 90 "$work/cuda_real_test.log" "$real_test"

  # ---- 4. CUDA Python tests ---------------------------------------------------------
  cuda_py_tests() {
    cd tests/python && pyenv "$py" - <<'PYEOF'
import glob, inspect, os, sys, unittest
# Every test method whose source mentions cuda (GPU paths, and the
# no-GPU errors they replace), from every suite in tests/python.
names = []
for f in sorted(glob.glob("test_*.py")):
    mod = __import__(os.path.splitext(f)[0])
    for cname, cls in vars(mod).items():
        if isinstance(cls, type) and issubclass(cls, unittest.TestCase):
            for m in sorted(vars(cls)):
                if m.startswith("test") and "cuda" in inspect.getsource(getattr(cls, m)).lower():
                    names.append(f"{mod.__name__}.{cname}.{m}")
print("CUDA tests:", " ".join(names))
suite = unittest.defaultTestLoader.loadTestsFromNames(names)
r = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
print(f"python cuda: {r.testsRun - len(r.skipped) - len(r.failures) - len(r.errors)} passed, "
      f"{len(r.skipped)} skipped, {len(r.failures) + len(r.errors)} failed")
sys.exit(0 if r.wasSuccessful() else 1)
PYEOF
  }
  no_module="the Python module was not built (CMake found no pybind11 for $py)"
  if [ -e "$work/no_python_module" ]; then
    steps+=("CUDA Python tests|skipped|0|$no_module")
  else
    run_step "CUDA Python tests" 120 "$work/python.log" cuda_py_tests
  fi

  # ---- 5. ckpt-bench gpu --------------------------------------------------------------
  bench_gpu() {
    set -e
    "$bench" synth "$work/bench.ckpt" --tensors 300 --total-mb "$mb" >/dev/null
    "$bench" gpu "$work/bench.ckpt" --repeat "$repeat" --json "$out/gpu_ckpt_bench$tag.json"
  }
  run_step "ckpt-bench gpu (${mb} MiB)" 120 "$work/bench.log" bench_gpu
  rm -f "$work/bench.ckpt"

  # ---- 6. bench/run_gpu.py ------------------------------------------------------------
  run_gpu() {
    local extra=()
    [ "$double" = 1 ] && extra=(--total-mb 32 --repeat 1)
    pyenv "$py" bench/run_gpu.py --build "$build" --workdir "$work/run_gpu" \
      --json "$out/gpu$tag.json" "${extra[@]}" > "$work/run_gpu.raw" 2>&1
    local rc=$?
    cat "$work/run_gpu.raw"
    # It prints SKIP and exits 0 when torch sees no GPU (a CPU-only torch).
    grep -q "^SKIP" "$work/run_gpu.raw" && return 77
    return $rc
  }
  if [ -e "$work/no_python_module" ]; then
    steps+=("bench/run_gpu.py|skipped|0|$no_module")
  else
    run_step "bench/run_gpu.py" 240 "$work/run_gpu.log" run_gpu
  fi
  rm -rf "$work/run_gpu"
else
  for n in cuda_real_test "CUDA Python tests" "ckpt-bench gpu" bench/run_gpu.py; do
    steps+=("$n|not run|0|the build failed")
  done
fi

# ---- the report ---------------------------------------------------------------------
{
  echo "# scripts/gpu_check.sh$([ "$double" = 1 ] && echo " --double") $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  if [ "$double" = 1 ]; then
    echo "device:  the CUDA-runtime test double (tests/cuda_double), not a GPU: figures are meaningless"
  else
    echo "device:  $(nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader 2>&1 | head -n 1) (name, memory, PCIe gen, width)"
    echo "driver:  $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -n 1)"
  fi
  echo "nvcc:    $( (nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>/dev/null) | grep -o 'release [0-9.]*' || echo 'not found')"
  echo "torch:   $torch_info ($py)"
  echo "host:    $(hostname), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "build:   ${build#"$root"/} ($(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build/CMakeCache.txt" 2>/dev/null))"
  echo "total:   $((SECONDS - start)) s of a ${budget} s budget"
  echo
  echo "| step | status | seconds | last line |"
  echo "|---|---|---|---|"
  for s in "${steps[@]}"; do
    IFS='|' read -r n st dt d <<< "$s"
    echo "| $n | $st | $dt | ${d//|//} |"
  done
  for f in cuda_real_test python bench run_gpu; do
    [ -f "$work/$f.log" ] || continue
    echo
    echo "## $f"
    echo '```'
    grep -v "Warning\|warnings.warn\|^  _C._set" "$work/$f.log" | tail -n 60
    echo '```'
  done
  if [ "$failed" = 1 ] && [ -f "$work/build.log" ]; then
    echo
    echo "## build (last lines)"
    echo '```'
    tail -n 30 "$work/build.log"
    echo '```'
  fi
} > "$report"
say "wrote $report ($((SECONDS - start)) s)"
[ "$failed" = 0 ] && say "all steps passed" || say "a step failed: see $report"
exit "$failed"
