#!/usr/bin/env bash
# Sharded checkpoints under a real mpirun (Open MPI), on one machine:
#   run.sh DIST_MPI_TEST [MPIRUN]
# 1. the reshard matrix: save on N in {1,2,3,4}, load on M in {1,2,3,4},
#    every box compared bit for bit (dist_mpi_test does the comparing);
# 2. faults: a rank killed mid-write, a rank whose writes fail, the
#    coordinator killed before and after the rename; the previous step
#    still loads, the next save sweeps what the crash left;
# 3. random external kill -9s of a running save: every visible step loads.
# Exits 0 when all hold; prints what failed otherwise.
set -u
bin=$1
mpirun=${2:-mpirun}
[ -n "$mpirun" ] || mpirun=mpirun
kills=${CKPT_MPI_KILLS:-50}
# As root, Open MPI refuses to start without these; --oversubscribe lets 4
# ranks share 2 cores; shared memory only (no network probing).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
run() { "$mpirun" --oversubscribe --bind-to none -np "$@"; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ckpt-mpi-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAILED: $*"; exit 1; }

echo "== reshard matrix"
for n in 1 2 3 4; do
  run "$n" "$bin" save "$tmp/n$n/step-200" > "$tmp/log" 2>&1 || { cat "$tmp/log"; fail "save on $n"; }
  for m in 1 2 3 4; do
    run "$m" "$bin" load "$tmp/n$n/step-200" "$n" > "$tmp/log" 2>&1 ||
      { cat "$tmp/log"; fail "save on $n, load on $m"; }
  done
  echo "saved on $n: loads on 1, 2, 3, 4 ranks bit for bit"
done

echo "== faults"
f=$tmp/faults
run 4 "$bin" save "$f/step-200" > "$tmp/log" 2>&1 || { cat "$tmp/log"; fail "first save"; }
# A rank killed mid-write: the job dies, nothing becomes visible.
if run 4 "$bin" fault "$f/step-300" kill_mid_write > "$tmp/log" 2>&1; then
  fail "kill_mid_write: mpirun succeeded"
fi
[ -e "$f/step-300" ] && fail "kill_mid_write: step-300 is visible"
run 2 "$bin" load "$f/step-200" 4 > "$tmp/log" 2>&1 || { cat "$tmp/log"; fail "previous step after a crash"; }
# The next save sweeps the crash's leftovers and commits.
run 4 "$bin" save "$f/step-300" > "$tmp/log" 2>&1 || { cat "$tmp/log"; fail "save after a crash"; }
[ "$(ls "$f/step-300" | wc -l)" = 5 ] || fail "leftovers in step-300: $(ls -a "$f/step-300")"
[ -e "$f/.step-300.tmp" ] && fail "temporary directory left after a commit"
echo "kill mid-write: nothing visible, previous step loads, next save sweeps"
# A rank's writes fail (EFBIG): every rank reports rank 1, nothing visible.
run 3 "$bin" fault "$f/step-400" efbig > "$tmp/log" 2>&1 || { cat "$tmp/log"; fail "efbig"; }
grep -m1 "every rank says" "$tmp/log"
[ -e "$f/.step-400.tmp" ] && fail "efbig: temporary directory left"
# The coordinator dies before the rename: nothing visible.
if run 2 "$bin" fault "$f/step-500" kill_before_rename > "$tmp/log" 2>&1; then
  fail "kill_before_rename: mpirun succeeded"
fi
[ -e "$f/step-500" ] && fail "kill_before_rename: step-500 is visible"
# ... after the rename: the step is complete.
if run 2 "$bin" fault "$f/step-600" kill_after_rename > "$tmp/log" 2>&1; then
  fail "kill_after_rename: mpirun succeeded"
fi
run 3 "$bin" load "$f/step-600" 2 > "$tmp/log" 2>&1 || { cat "$tmp/log"; fail "step committed before the kill"; }
echo "coordinator killed before the rename: invisible; after: complete"

echo "== $kills random kill -9s of a running save"
k=$tmp/kills
run 2 "$bin" save "$k/step-0" > /dev/null 2>&1 || fail "first save"
for i in $(seq 1 "$kills"); do
  run 2 "$bin" save "$k/step-$i" > /dev/null 2>&1 &
  launcher=$!
  sleep "0.$(printf '%03d' $((RANDOM % 400)))"
  # One of the ranks (or, if none is up yet or all are done, mpirun).
  victims=$(pgrep -P "$launcher" 2>/dev/null; pgrep -f "dist_mpi_test save $k/step-$i\$" 2>/dev/null)
  victim=$(echo "$victims" | shuf -n 1)
  kill -9 "${victim:-$launcher}" 2>/dev/null
  # A killed save must end (mpirun takes the job down): one still running
  # after 120 s is a hang, named with where its processes wait.
  for _ in $(seq 1 1200); do kill -0 "$launcher" 2>/dev/null || break; sleep 0.1; done
  ranks="^[^ ]*dist_mpi_test save $k/step-$i\$"  # the ranks, not mpirun
  if kill -0 "$launcher" 2>/dev/null && ! pgrep -f "$ranks" > /dev/null; then
    # Every rank is gone and only mpirun is left, stuck in Open MPI's own
    # PMIx finalize (seen once in ~200 kills: pmix_rte_finalize waiting on
    # a mutex). Not this protocol's hang: end it and go on.
    echo "kill $i: mpirun hung in its own finalize after its ranks ended; killed"
    pkill -9 -P "$launcher" 2>/dev/null; kill -9 "$launcher" 2>/dev/null
    # (Reaped before going on: until then kill -0 finds the zombie, which
    # the check below took for a save still running.)
    wait "$launcher" 2>/dev/null
    continue
  fi
  if kill -0 "$launcher" 2>/dev/null; then
    echo "kill $i (pid ${victim:-$launcher}): the save still runs after 120 s"
    for p in $(pgrep -P "$launcher") $(pgrep -f "dist_mpi_test save $k/step-$i\$"); do
      echo "-- $(ps -o pid=,stat=,cmd= -p "$p") wchan $(cat "/proc/$p/wchan" 2>/dev/null)"
      command -v gdb > /dev/null && gdb -batch -p "$p" -ex "thread apply all bt 8" 2>/dev/null | grep "^#"
    done
    pkill -9 -f "dist_mpi_test save $k/" ; kill -9 "$launcher"
    fail "a save killed by kill -9 hung"
  fi
  wait "$launcher" 2>/dev/null
done
# Ranks whose mpirun was the one killed must end too (Open MPI busy-polls:
# an orphan left spinning would starve every later test on 2 cores).
left="^[^ ]*dist_mpi_test save $k/"
for _ in $(seq 1 100); do pgrep -f "$left" > /dev/null || break; sleep 0.1; done
if pgrep -f "$left" > /dev/null; then
  ps -o pid=,ppid=,stat=,etime=,cmd= -p "$(pgrep -d, -f "$left")"
  pkill -9 -f "$left"
  fail "ranks outlived their save's mpirun by 10 s"
fi
visible=0
for d in "$k"/step-*; do
  n=${d##*-}
  run 1 "$bin" load "$d" 2 > "$tmp/log" 2>&1 || { cat "$tmp/log"; fail "visible $d does not load"; }
  visible=$((visible + 1))
done
echo "$visible visible steps after $kills kills: every one loads bit for bit"
echo "dist_mpi: all passed"
