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
# Exactly the tensors asked for, for any count.
for n in 4 5 12 13 30 101; do
  "$BENCH" synth "$T/n.ckpt" --tensors $n --total-mb 1 --no-sync
  "$CKPT" inspect "$T/n.ckpt" | grep -q "^  $n tensors " || { echo "synth --tensors $n: wrong count" >&2; exit 1; }
done
# Bad arguments say what is wrong.
"$BENCH" synth "$T/n.ckpt" --tensors x --total-mb 1 2>"$T/err" && exit 1
grep -q -- "--tensors takes a whole number" "$T/err" || { echo "no message for --tensors x" >&2; exit 1; }
"$BENCH" synth "$T/n.ckpt" --tensors 10 --bogus 2>"$T/err" && exit 1
grep -q "unknown option '--bogus'" "$T/err" || { echo "no message for --bogus" >&2; exit 1; }
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
