#!/usr/bin/env bash
# Builds a tiny synthetic checkpoint with ckpt-bench and runs every cpu
# measurement once: CI checks the benchmark runs, never its timings.
set -eu
BENCH=$1
CKPT=$2
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
"$BENCH" synth "$T/s.ckpt" --tensors 30 --total-mb 2 --no-sync
"$BENCH" synth "$T/s2.ckpt" --tensors 30 --total-mb 2 --no-sync
cmp "$T/s.ckpt" "$T/s2.ckpt"   # deterministic
"$CKPT" verify "$T/s.ckpt"
"$CKPT" get "$T/s.ckpt" optimizer/lr
"$BENCH" cpu "$T/s.ckpt" --repeat 1 --json "$T/r.json" --tmpdir "$T"
grep -q '"name": "verify"' "$T/r.json"
if "$BENCH" synth "$T/x.ckpt" --tensors 2 --total-mb 1 2>/dev/null; then
  echo "synth accepted --tensors 2" >&2; exit 1
fi
rc=0
"$BENCH" gpu "$T/s.ckpt" --repeat 1 --json "$T/g.json" || rc=$?
if [ "$rc" = 77 ]; then
  echo "gpu benchmark: skipped (no usable GPU here)"
elif [ "$rc" = 0 ]; then
  grep -q '"name": "warm_full_load_staged"' "$T/g.json"
else
  echo "ckpt-bench gpu failed: $rc" >&2; exit 1
fi
echo "bench smoke: 1 passed, 0 failed"
