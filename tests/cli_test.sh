#!/usr/bin/env bash
# CLI contract tests (DESIGN.md "Command-line tools"): output, exit codes,
# errors on stderr. Usage: cli_test.sh CKPT EXAMPLE_WRITER MAKE_FIXTURE
set -u
CKPT=$1
WRITER=$2
FIXTURE=$3
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0
passes=0
ok() { passes=$((passes + 1)); }
bad() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }
expect_rc() {  # expect_rc WANT DESC CMD...
  local want=$1 desc=$2; shift 2
  "$@" >"$T/out" 2>"$T/err"; local rc=$?
  if [ "$rc" = "$want" ]; then ok; else bad "$desc: exit $rc, want $want; stderr: $(cat "$T/err")"; fi
}
PY=python3

"$WRITER" "$T/a.ckpt" >/dev/null || bad "example writer failed"

# --help everywhere, exit 0; usage errors exit 2 with text on stderr.
for c in inspect cat get verify diff import load; do
  expect_rc 0 "$c --help" "$CKPT" "$c" --help
  grep -q "usage: ckpt $c" "$T/out" && ok || bad "$c --help text"
done
expect_rc 0 "--help" "$CKPT" --help
expect_rc 2 "no command" "$CKPT"
expect_rc 2 "unknown command" "$CKPT" frobnicate
grep -q "unknown command" "$T/err" && ok || bad "unknown command message"
expect_rc 2 "inspect without file" "$CKPT" inspect
expect_rc 2 "cat bad rows" "$CKPT" cat "$T/a.ckpt" fc.weight --rows x
expect_rc 2 "get one arg" "$CKPT" get "$T/a.ckpt"

# inspect: human and --json with the contract keys.
expect_rc 0 "inspect" "$CKPT" inspect "$T/a.ckpt"
grep -q "fc.weight  float32 \[2, 3\]" "$T/out" && ok || bad "inspect lists the tensor"
grep -q "ckpt format .*producer" "$T/out" && ok || bad "inspect summary line"
grep -q "^values:" "$T/out" && grep -q "^  epoch = 7$" "$T/out" && ok || bad "inspect lists the values"
expect_rc 0 "inspect --json" "$CKPT" inspect --json "$T/a.ckpt"
$PY - "$T/out" <<'PYEOF' && ok || bad "inspect --json content"
import json, sys
d = json.load(open(sys.argv[1]))
t = d["tensors"][0]
assert set(["path","dtype","shape","strides","storage","offset","nbytes","device"]) <= set(t), t
assert t["path"] == "fc.weight" and t["dtype"] == "float32", t
assert t["shape"] == [2, 3] and t["strides"] == [3, 1] and t["nbytes"] == 24, t
assert t["device"] == "cpu" and t["storage"] == 0 and t["offset"] == 0, t
assert d["tree"]["epoch"] == 7, d["tree"]
PYEOF

# cat: raw little-endian bytes, whole and rows.
expect_rc 0 "cat" "$CKPT" cat "$T/a.ckpt" fc.weight
$PY -c "import struct,sys; v=struct.unpack('<6f', open(sys.argv[1],'rb').read()); assert v==(1,2,3,4,5,6), v" "$T/out" && ok || bad "cat bytes"
expect_rc 0 "cat --rows" "$CKPT" cat "$T/a.ckpt" fc.weight --rows 1:2
$PY -c "import struct,sys; v=struct.unpack('<3f', open(sys.argv[1],'rb').read()); assert v==(4,5,6), v" "$T/out" && ok || bad "cat --rows bytes"
expect_rc 1 "cat rows out of range" "$CKPT" cat "$T/a.ckpt" fc.weight --rows 0:3
grep -q "fc.weight" "$T/err" && ok || bad "rows error names the tensor"
expect_rc 1 "cat missing tensor" "$CKPT" cat "$T/a.ckpt" nope
grep -q "no tensor at path 'nope'" "$T/err" && ok || bad "missing tensor message"

# get: scalars as JSON.
expect_rc 0 "get" "$CKPT" get "$T/a.ckpt" epoch
[ "$(cat "$T/out")" = "7" ] && ok || bad "get epoch = $(cat "$T/out")"
expect_rc 1 "get missing" "$CKPT" get "$T/a.ckpt" nope

# verify: OK, then a flipped data byte names the tensor and offset.
expect_rc 0 "verify" "$CKPT" verify "$T/a.ckpt"
cp "$T/a.ckpt" "$T/bad.ckpt"
printf '\x55' | dd of="$T/bad.ckpt" bs=1 seek=4100 conv=notrunc status=none
expect_rc 1 "verify corrupted" "$CKPT" verify "$T/bad.ckpt"
grep -q "bad.ckpt:4096: checksum mismatch: tensor 'fc.weight'" "$T/err" && ok || bad "verify message: $(cat "$T/err")"
expect_rc 1 "verify missing file" "$CKPT" verify "$T/none.ckpt"
grep -q "none.ckpt: not found" "$T/err" && ok || bad "missing file message"
head -c 100 "$T/a.ckpt" > "$T/trunc.ckpt"
expect_rc 1 "verify truncated" "$CKPT" verify "$T/trunc.ckpt"

# diff: same -> 0, different -> 1 with the tensor named.
expect_rc 0 "diff same" "$CKPT" diff "$T/a.ckpt" "$T/a.ckpt"
expect_rc 1 "diff different" "$CKPT" diff "$T/a.ckpt" "$T/bad.ckpt"
grep -q "~ fc.weight: 1 of 6 elements differ" "$T/out" && ok || bad "diff output: $(cat "$T/out")"
expect_rc 3 "diff unreadable" "$CKPT" diff "$T/a.ckpt" "$T/none.ckpt"

# load: to host memory always works; to a GPU either works or says why not.
expect_rc 0 "load cpu" "$CKPT" load "$T/a.ckpt" --device cpu
grep -q "loaded 1 tensors" "$T/out" && ok || bad "load cpu output: $(cat "$T/out")"
expect_rc 0 "load cpu rows" "$CKPT" load "$T/a.ckpt" --device cpu --rows 1:2 --paths fc.weight
grep -q "loaded 1 tensors, 12 B to cpu" "$T/out" && ok || bad "load cpu --rows output: $(cat "$T/out")"
"$CKPT" load "$T/a.ckpt" --device cuda:0 >"$T/out" 2>"$T/err"; rc=$?
if [ "$rc" = 0 ]; then
  grep -q "loaded 1 tensors" "$T/out" && ok || bad "load cuda output"
else
  [ "$rc" = 1 ] && grep -q "CUDA\|without the CUDA toolkit" "$T/err" && ok || bad "load cuda without GPU: exit $rc: $(cat "$T/err")"
fi
expect_rc 1 "load --verify of a damaged file" "$CKPT" load "$T/bad.ckpt" --device cpu --verify
grep -q "checksum mismatch: tensor 'fc.weight'" "$T/err" && ok || bad "load --verify message: $(cat "$T/err")"
expect_rc 2 "load bad strategy" "$CKPT" load "$T/a.ckpt" --strategy nope
expect_rc 1 "load missing path" "$CKPT" load "$T/a.ckpt" --device cpu --paths nope

# A stride-0 view of 2^40 float32 elements (a 4 KiB file): cat streams it
# in bounded memory and its first MiB arrives at once; diff compares it
# without walking 4 TiB; a PATH starting with '-' works after '--'.
"$FIXTURE" expand "$T/x.ckpt" 2.5 && "$FIXTURE" expand "$T/y.ckpt" 3.5 || bad "fixture"
/usr/bin/time -f %M -o "$T/rss" timeout 20 "$CKPT" cat "$T/x.ckpt" e 2>"$T/err" | head -c 1048576 >"$T/out"
[ "$(wc -c <"$T/out")" = 1048576 ] && ok || bad "cat of a 2^40 view: $(wc -c <"$T/out") bytes: $(cat "$T/err")"
$PY -c "import struct,sys; b=open(sys.argv[1],'rb').read(); assert set(struct.unpack('<%df' % (len(b)//4), b))=={2.5}" "$T/out" && ok || bad "cat of a 2^40 view: values"
rss=$(tail -n 1 "$T/rss")
[ "$rss" -lt 65536 ] && ok || bad "cat of a 2^40 view: peak RSS $rss KiB (>= 64 MiB)"
expect_rc 0 "diff of equal 2^40 views" timeout 20 "$CKPT" diff "$T/x.ckpt" "$T/x.ckpt"
expect_rc 1 "diff of different 2^40 views" timeout 20 "$CKPT" diff "$T/x.ckpt" "$T/y.ckpt"
expect_rc 0 "cat -- -0" "$CKPT" cat "$T/x.ckpt" -- -0
[ "$(wc -c <"$T/out")" = 4 ] && ok || bad "cat -- -0 bytes"
expect_rc 2 "cat -0 without --" "$CKPT" cat "$T/x.ckpt" -0
grep -q "put '--' before" "$T/err" && ok || bad "cat -0 hint: $(cat "$T/err")"
expect_rc 0 "inspect -- FILE" "$CKPT" inspect -- "$T/x.ckpt"

# Progress lines (lib/cli/progress.h): on stderr, only on a terminal
# (or with --progress), erased before the result; stdout is unchanged.
PTH2CKPT=${4:-$(dirname "$CKPT")/pth2ckpt}
on_tty() {  # on_tty OUT ERR CMD...: CMD with stderr on a pseudo-terminal
  $PY - "$@" <<'PYEOF'
import os, pty, subprocess, sys
out, err, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
m, s = pty.openpty()
with open(out, "wb") as o:
    p = subprocess.Popen(cmd, stdout=o, stderr=s, stdin=subprocess.DEVNULL)
os.close(s)
buf = b""
while True:
    try:
        b = os.read(m, 65536)
    except OSError:  # EIO: the child closed the terminal
        break
    if not b:
        break
    buf += b
rc = p.wait()
open(err, "wb").write(buf)
sys.exit(rc)
PYEOF
}
expect_rc 0 "load cpu, piped" "$CKPT" load "$T/a.ckpt" --device cpu
[ ! -s "$T/err" ] && ok || bad "load piped: stderr not empty: $(cat "$T/err")"
on_tty "$T/out" "$T/err" "$CKPT" load "$T/a.ckpt" --device cpu && ok || bad "load on a tty: exit $?"
grep -q "100%" "$T/err" && grep -q "a.ckpt  24 B / 24 B" "$T/err" && ok || bad "load on a tty: no progress line: $(cat -v "$T/err")"
grep -q "^loaded 1 tensors, 24 B to cpu in " "$T/out" && ! grep -q $'\r' "$T/out" && ok || bad "load on a tty: stdout $(cat -v "$T/out")"
on_tty "$T/out" "$T/err" "$CKPT" load "$T/a.ckpt" --device cpu --no-progress && ok || bad "load --no-progress on a tty"
[ ! -s "$T/err" ] && ok || bad "load --no-progress on a tty: stderr $(cat -v "$T/err")"
expect_rc 0 "load --progress, piped" "$CKPT" load "$T/a.ckpt" --device cpu --progress
grep -q "100%" "$T/err" && ok || bad "load --progress piped: stderr $(cat -v "$T/err")"
if [ -x "$PTH2CKPT" ]; then
  # torch-free .pth files: the zip layout torch 2.x writes (v3 rebuild).
  mkdir -p "$T/pin/sub"
  $PY - "$T/pin" <<'PYEOF' || bad "pth fixtures"
import struct, sys, zipfile
def g(m, n): return b"c" + m.encode() + b"\n" + n.encode() + b"\n"
def s(x): b = x.encode(); return b"X" + struct.pack("<I", len(b)) + b
def i(n): return b"J" + struct.pack("<i", n)
def pth(path, n):
    raw = struct.pack("<%df" % n, *range(n))
    pid = b"(" + s("storage") + g("torch.storage", "UntypedStorage") + s("0") + s("cpu") + i(len(raw)) + b"t"
    pkl = (b"\x80\x02}(" + s("w") + g("torch._utils", "_rebuild_tensor_v3") + b"(" + pid + b"Q" + i(0) +
           b"(" + i(n) + b"t(" + i(1) + b"t\x89" + g("collections", "OrderedDict") + b")R" +
           g("torch", "float32") + b"tRu.")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", raw)
        z.writestr("archive/version", "3\n")
pth(sys.argv[1] + "/a.pth", 1024)
pth(sys.argv[1] + "/sub/b.pt", 300000)
# A name longer than the line's label: the [i/n] counter must stay whole.
pth(sys.argv[1] + "/sub/zz_a_very_long_file_name_for_the_progress_line.pt", 16)
open(sys.argv[1] + "/bad.pth", "wb").write(b"junk")
PYEOF
  expect_rc 1 "pth2ckpt DIR, piped" "$PTH2CKPT" --no-sync "$T/pin" "$T/pout1"
  [ ! -s "$T/err" ] && ok || bad "pth2ckpt DIR piped: stderr $(cat -v "$T/err")"
  cp "$T/out" "$T/dir_piped"
  grep -q "^\[3/4\] sub/b.pt ... ok: 1 tensors, 1 storages, 1.1 MiB (zip format)$" "$T/dir_piped" && ok || bad "pth2ckpt DIR: $(cat "$T/dir_piped")"
  on_tty "$T/out" "$T/err" "$PTH2CKPT" --no-sync "$T/pin" "$T/pout2"; rc=$?
  [ "$rc" = 1 ] && ok || bad "pth2ckpt DIR on a tty: exit $rc"
  cmp -s "$T/out" "$T/dir_piped" && ok || bad "pth2ckpt DIR on a tty: stdout differs: $(cat -v "$T/out")"
  grep -q "\[3/4\] sub/b.pt  1.1 MiB / 1.1 MiB  100%" "$T/err" && grep -q "\[1/4\] a.pth" "$T/err" && ok || bad "pth2ckpt DIR on a tty: progress $(cat -v "$T/err")"
  grep -q "\[4/4\] \.\.\.[a-z_]*line.pt  64 B / 64 B  100%" "$T/err" && ok || bad "pth2ckpt DIR on a tty: a long name's counter $(cat -v "$T/err")"
  on_tty "$T/out" "$T/err" "$PTH2CKPT" --no-sync --no-progress "$T/pin" "$T/pout3"
  [ ! -s "$T/err" ] && cmp -s "$T/out" "$T/dir_piped" && ok || bad "pth2ckpt DIR --no-progress on a tty: $(cat -v "$T/err")"
  on_tty "$T/out" "$T/err" "$PTH2CKPT" --no-sync "$T/pin/a.pth" "$T/one.ckpt" && ok || bad "pth2ckpt FILE on a tty"
  grep -q "a.pth  4.0 KiB / 4.0 KiB  100%" "$T/err" && ok || bad "pth2ckpt FILE on a tty: $(cat -v "$T/err")"
  expect_rc 0 "ckpt import --progress" "$CKPT" import --progress "$T/pin/a.pth" "$T/two.ckpt"
  grep -q "100%" "$T/err" && ok || bad "ckpt import --progress: $(cat -v "$T/err")"
  expect_rc 0 "ckpt import, piped" "$CKPT" import "$T/pin/a.pth" "$T/three.ckpt"
  [ ! -s "$T/err" ] && ok || bad "ckpt import piped: stderr $(cat -v "$T/err")"
else
  echo "SKIP: progress of pth2ckpt ($PTH2CKPT not built)"
fi

echo "cli: $passes passed, $fails failed"
[ "$fails" = 0 ]
