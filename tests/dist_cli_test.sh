#!/usr/bin/env bash
# CLI tests of sharded checkpoints (docs/CLI.md): ckpt shard -> consolidate
# gives every tensor back byte for byte (compared with ckpt cat), inspect
# DIR --json's fields, verify DIR's exit codes on damage, usage errors.
# Usage: dist_cli_test.sh CKPT DIST_FIXTURE
set -u
CKPT=$1
FIX=$2
export CKPT
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

"$FIX" mixed "$T/in.ckpt" || { echo "FAIL: fixture"; exit 1; }
"$FIX" numpy "$T/np.ckpt" || { echo "FAIL: fixture"; exit 1; }

# Tensor paths of a file, one a line.
paths() {
  "$CKPT" inspect --json "$1" | $PY -c 'import json,sys; [print(t["path"]) for t in json.load(sys.stdin)["tensors"]]'
}
# Every tensor of A is in B with the same row-major bytes (ckpt cat), and
# B has no other tensor.
same_tensors() {  # same_tensors A B DESC
  local p n=0
  [ "$(paths "$1")" = "$(paths "$2")" ] || { bad "$3: tensor lists differ"; return; }
  while IFS= read -r p; do
    "$CKPT" cat "$1" -- "$p" >"$T/a.bin" 2>"$T/err" || { bad "$3: cat A $p"; return; }
    "$CKPT" cat "$2" -- "$p" >"$T/b.bin" 2>"$T/err" || { bad "$3: cat B $p"; return; }
    cmp -s "$T/a.bin" "$T/b.bin" || { bad "$3: bytes of '$p' differ"; return; }
    n=$((n + 1))
  done < <(paths "$1")
  [ "$n" -gt 5 ] && ok || bad "$3: only $n tensors compared"
}

# --help and usage errors (exit 2, text on stderr).
for c in consolidate shard inspect verify; do
  expect_rc 0 "$c --help" "$CKPT" "$c" --help
  grep -q "usage: ckpt $c" "$T/out" && ok || bad "$c --help text"
done
grep -q "DIR" "$T/out" && ok || bad "verify --help mentions DIR"
"$CKPT" --help | grep -q "consolidate DIR OUT.ckpt" && ok || bad "main help lists consolidate"
expect_rc 2 "shard without --ranks" "$CKPT" shard "$T/in.ckpt" "$T/x"
expect_rc 2 "shard --ranks 0" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks 0
expect_rc 2 "shard --ranks x" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks x
expect_rc 2 "shard --dim x" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks 2 --dim x
expect_rc 2 "shard --dim -2" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks 2 --dim -2
expect_rc 2 "shard --dim =1" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks 2 --dim =1
expect_rc 2 "shard --dim w=q" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks 2 --dim 'w=q'
expect_rc 2 "shard --dim D twice" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks 2 --dim 0 --dim 1
expect_rc 2 "shard one argument" "$CKPT" shard "$T/in.ckpt" --ranks 2
expect_rc 2 "shard unknown option" "$CKPT" shard "$T/in.ckpt" "$T/x" --ranks 2 --frob
grep -q "unknown option '--frob'" "$T/err" && ok || bad "shard names the unknown option"
expect_rc 2 "consolidate one argument" "$CKPT" consolidate "$T/x"
expect_rc 2 "consolidate unknown option" "$CKPT" consolidate --frob "$T/x" "$T/y"
[ ! -e "$T/x" ] && ok || bad "usage errors wrote nothing"

# Round trips on 1..4 ranks, dim 0.
for n in 1 2 3 4; do
  d="$T/s$n"
  expect_rc 0 "shard --ranks $n" "$CKPT" shard "$T/in.ckpt" "$d" --ranks "$n"
  grep -q "on $n ranks" "$T/out" && ok || bad "shard $n summary: $(cat "$T/out")"
  expect_rc 0 "inspect --json DIR ($n)" "$CKPT" inspect --json "$d"
  $PY - "$T/out" "$n" <<'PYEOF' && ok || bad "inspect --json DIR fields ($n)"
import json, sys
d = json.load(open(sys.argv[1])); n = int(sys.argv[2])
assert d["kind"] == "sharded" and d["world_size"] == n, d
assert len(d["files"]) == n, d["files"]
for i, f in enumerate(d["files"]):
    assert f["rank"] == i and f["size"] > 0, f
    assert f["name"] == "shard-%05d-of-%05d.ckpt" % (i, n), f
    assert len(f["header_xxh3"]) == 16, f
t = {x["path"]: x for x in d["tensors"]}
w = t["model/w"]
assert w["dtype"] == "float32" and w["shape"] == [6, 4] and w["nbytes"] == 96, w
assert len(w["chunks_per_rank"]) == n and sum(w["chunks_per_rank"]) == w["chunks"], w
assert w["chunks"] == min(n, 6) == len(w["boxes"]), w
rows = sorted((b["offsets"][0], b["sizes"][0]) for b in w["boxes"])
assert sum(s for _, s in rows) == 6 and rows[0][0] == 0, rows
for b in w["boxes"]:
    assert b["length"] == b["sizes"][0] * 16 and d["files"][b["file"]]["rank"] == b["rank"], b
assert t["scale"]["shape"] == [] and t["scale"]["chunks"] == 1, t["scale"]
assert t["empty"]["shape"] == [0, 3] and t["empty"]["nbytes"] == 0, t["empty"]
assert "a~1b" in t and t["a~1b"]["dtype"] == "uint8", sorted(t)
tot = d["totals"]
assert tot["tensors"] == len(d["tensors"]) == 11 and tot["files"] == n, tot
assert tot["chunks"] == sum(x["chunks"] for x in d["tensors"]), tot
assert tot["tensor_bytes"] == sum(x["nbytes"] for x in d["tensors"]), tot
assert tot["file_bytes"] > sum(f["size"] for f in d["files"]), tot
PYEOF
  expect_rc 0 "verify DIR ($n)" "$CKPT" verify "$d"
  grep -q "OK" "$T/out" && ok || bad "verify DIR prints OK"
  expect_rc 0 "consolidate ($n)" "$CKPT" consolidate "$d" "$T/c$n.ckpt"
  expect_rc 0 "verify consolidated ($n)" "$CKPT" verify "$T/c$n.ckpt"
  same_tensors "$T/in.ckpt" "$T/c$n.ckpt" "round trip on $n ranks"
  [ "$("$CKPT" get "$T/c$n.ckpt" epoch)" = 7 ] && ok || bad "values come back ($n)"
  [ "$("$CKPT" get "$T/c$n.ckpt" layers/1/k)" = 3 ] && ok || bad "nested values come back ($n)"
done

# cat and get read a sharded DIR directly, as they read a file.
same_tensors "$T/in.ckpt" "$T/s3" "cat DIR on 3 ranks"
expect_rc 0 "cat DIR --rows" "$CKPT" cat "$T/s4" model/w --rows 1:5
"$CKPT" cat "$T/in.ckpt" model/w --rows 1:5 | cmp -s - "$T/out" && ok || bad "cat DIR --rows bytes"
expect_rc 0 "cat DIR --rows :0" "$CKPT" cat "$T/s4" model/w --rows 3:3
[ ! -s "$T/out" ] && ok || bad "cat DIR empty rows"
expect_rc 1 "cat DIR rows out of range" "$CKPT" cat "$T/s4" model/w --rows 0:7
grep -q "model/w" "$T/err" && ok || bad "cat DIR rows error names the tensor"
expect_rc 1 "cat DIR --rows on 0-d" "$CKPT" cat "$T/s4" scale --rows 0:1
expect_rc 2 "cat DIR bad --rows" "$CKPT" cat "$T/s4" model/w --rows x
expect_rc 1 "cat DIR missing tensor" "$CKPT" cat "$T/s4" nope
grep -q "'nope'" "$T/err" && ok || bad "cat DIR names the missing tensor"
[ "$("$CKPT" get "$T/s4" epoch)" = 7 ] && ok || bad "get DIR value"
[ "$("$CKPT" get "$T/s4" opt/betas)" = "[0.9, 0.99]" ] && ok || bad "get DIR nested: $("$CKPT" get "$T/s4" opt/betas)"
[ "$("$CKPT" get "$T/s4" model/w)" = "$("$CKPT" get "$T/in.ckpt" model/w)" ] && ok || bad "get DIR shows a global tensor as a file does: $("$CKPT" get "$T/s4" model/w)"
[ "$("$CKPT" get "$T/s4" layers)" = "$("$CKPT" get "$T/in.ckpt" layers)" ] && ok || bad "get DIR container with a tensor: $("$CKPT" get "$T/s4" layers)"
expect_rc 1 "get DIR missing path" "$CKPT" get "$T/s4" nope/x
"$CKPT" inspect --json "$T/s4" | $PY -c '
import json, sys
d = json.load(sys.stdin); t = d["tree"]
assert t["epoch"] == 7 and t["model"]["w"] == {"$tensor": "model/w", "dtype": "float32", "shape": [6, 4]}, t
assert t["a/b"]["$tensor"] == "a~1b", t' && ok || bad "inspect --json DIR tree"

# diff compares a DIR as its consolidation (a temporary in $TMPDIR).
mkdir "$T/tmpd"
expect_rc 0 "diff FILE DIR" env TMPDIR="$T/tmpd" "$CKPT" diff "$T/in.ckpt" "$T/s3"
expect_rc 0 "diff DIR DIR (other ranks)" env TMPDIR="$T/tmpd" "$CKPT" diff "$T/s4" "$T/s1"
expect_rc 1 "diff DIR FILE that differ" env TMPDIR="$T/tmpd" "$CKPT" diff "$T/s4" "$T/np.ckpt"
grep -q "^- model/w: tensor only in A$" "$T/out" && ok || bad "diff DIR lists the differences: $(cat "$T/out")"
expect_rc 3 "diff a missing DIR" env TMPDIR="$T/tmpd" "$CKPT" diff "$T/s4" "$T/nope"
[ -z "$(ls -A "$T/tmpd")" ] && ok || bad "diff left a temporary: $(ls -A "$T/tmpd")"

# inspect DIR, human form.
expect_rc 0 "inspect DIR" "$CKPT" inspect "$T/s4"
grep -q "sharded ckpt (manifest .*), 4 ranks, 4 files" "$T/out" && ok || bad "inspect DIR summary: $(head -1 "$T/out")"
grep -q "^  model/w  float32 \[6, 4\]  96 B  chunks per rank \[1, 1, 1, 1\]$" "$T/out" && ok || bad "inspect DIR tensor line: $(grep model/w "$T/out")"
grep -q "^  shard-00000-of-00004.ckpt  rank 0 " "$T/out" && ok || bad "inspect DIR file line"
grep -q "^  note = fixture$" "$T/out" && ok || bad "inspect DIR metadata (the input's)"
grep -q "^values:" "$T/out" && grep -q "^  epoch = 7$" "$T/out" && grep -q "^  layers/1/k = 3$" "$T/out" && ok || bad "inspect DIR lists the values"
grep -q "^  model/w = " "$T/out" && bad "inspect DIR lists a placeholder as a value" || ok

# --dim GLOB=D and replication.
expect_rc 0 "shard --dim GLOB=D" "$CKPT" shard "$T/in.ckpt" "$T/tp" --ranks 2 --dim 'model/*=1' --dim -1
grep -q "(3 cut, 8 replicated)" "$T/out" && ok || bad "shard counts cut and replicated: $(cat "$T/out")"
"$CKPT" inspect --json "$T/tp" >"$T/tp.json"
$PY - "$T/tp.json" <<'PYEOF' && ok || bad "--dim GLOB=D cuts dim 1, -1 replicates"
import json, sys
t = {x["path"]: x for x in json.load(open(sys.argv[1]))["tensors"]}
w = t["model/w"]
assert sorted((b["offsets"][1], b["sizes"][1]) for b in w["boxes"]) == [(0, 2), (2, 2)], w
assert all(b["sizes"][0] == 6 for b in w["boxes"]), w
# model/b is 1-D: no dim 1, replicated: split across both ranks, written once.
b = t["model/b"]
assert sum(x["sizes"][0] for x in b["boxes"]) == 4 and b["chunks"] == 2, b
ids = t["ids"]
assert ids["chunks"] == 2 and sorted(x["rank"] for x in ids["boxes"]) == [0, 1], ids
PYEOF
expect_rc 0 "consolidate tp" "$CKPT" consolidate "$T/tp" "$T/tp.ckpt"
same_tensors "$T/in.ckpt" "$T/tp.ckpt" "round trip dim 1 / replicated"

# Reshard: a sharded IN, another rank count.
expect_rc 0 "shard DIR -> DIR" "$CKPT" shard "$T/s2" "$T/s3b" --ranks 3 --dim 1
ls -a "$T" | grep -q "^\.ckpt-shard-" && bad "reshard left its temporary" || ok
expect_rc 0 "consolidate resharded" "$CKPT" consolidate "$T/s3b" "$T/c3b.ckpt"
same_tensors "$T/in.ckpt" "$T/c3b.ckpt" "reshard 2 -> 3"

# Existing DIR: refused, or replaced with --overwrite.
expect_rc 1 "shard over an existing DIR" "$CKPT" shard "$T/in.ckpt" "$T/s2" --ranks 3
grep -q "exists" "$T/err" && ok || bad "existing DIR message: $(cat "$T/err")"
expect_rc 0 "shard --overwrite" "$CKPT" shard "$T/in.ckpt" "$T/s2" --ranks 3 --overwrite
[ "$("$CKPT" inspect --json "$T/s2" | $PY -c 'import json,sys; print(json.load(sys.stdin)["world_size"])')" = 3 ] && ok || bad "--overwrite replaced DIR"

# Refusals name the file and tensor, and leave nothing.
expect_rc 1 "shard a numpy array" "$CKPT" shard "$T/np.ckpt" "$T/np" --ranks 2
grep -q "'arr'" "$T/err" && ok || bad "numpy refusal names the tensor: $(cat "$T/err")"
[ -z "$(ls -A "$T" | grep -e '^np$' -e '^\.np\.tmp$')" ] && ok || bad "a refused shard left files"
expect_rc 1 "consolidate a file" "$CKPT" consolidate "$T/in.ckpt" "$T/y.ckpt"
grep -q "in.ckpt" "$T/err" && ok || bad "consolidate a file: message names it"
mkdir "$T/plain"
expect_rc 1 "inspect a directory without manifest" "$CKPT" inspect "$T/plain"
grep -q "MANIFEST.ckptm" "$T/err" && ok || bad "no-manifest message: $(cat "$T/err")"
expect_rc 1 "verify a directory without manifest" "$CKPT" verify "$T/plain"
expect_rc 2 "verify DIR --pread" "$CKPT" verify --pread "$T/s4"
expect_rc 1 "consolidate a missing DIR" "$CKPT" consolidate "$T/nope" "$T/y.ckpt"
[ ! -e "$T/y.ckpt" ] && ok || bad "failed consolidations wrote OUT"

# verify DIR: a flipped data byte, a missing shard, a swapped shard.
cp -r "$T/s4" "$T/flip"
$PY - "$T/flip" <<'PYEOF' || bad "flip helper"
import json, os, subprocess, sys
d = sys.argv[1]
m = json.loads(subprocess.check_output([os.environ["CKPT"], "inspect", "--json", d]))
w = [t for t in m["tensors"] if t["path"] == "model/w"][0]
b = [x for x in w["boxes"] if x["rank"] == 2][0]
p = os.path.join(d, m["files"][b["file"]]["name"])
with open(p, "r+b") as f:
    f.seek(b["offset"] + 5); c = f.read(1); f.seek(b["offset"] + 5); f.write(bytes([c[0] ^ 1]))
PYEOF
expect_rc 1 "verify a flipped byte" "$CKPT" verify "$T/flip"
grep -q "shard-00002-of-00004.ckpt" "$T/err" && ok || bad "flip: names the shard: $(cat "$T/err")"
expect_rc 1 "consolidate a flipped byte" "$CKPT" consolidate "$T/flip" "$T/flip.ckpt"
grep -q "model/w" "$T/err" && ok || bad "flip: consolidate names the tensor: $(cat "$T/err")"
[ ! -e "$T/flip.ckpt" ] && ok || bad "flip: no OUT"
expect_rc 0 "verify --threads 1 of a sound DIR" "$CKPT" verify --threads 1 "$T/s4"

cp -r "$T/s4" "$T/miss"
rm "$T/miss/shard-00001-of-00004.ckpt"
expect_rc 1 "verify a missing shard" "$CKPT" verify "$T/miss"
grep -q "shard-00001-of-00004.ckpt" "$T/err" && ok || bad "missing: names the shard: $(cat "$T/err")"

cp -r "$T/s4" "$T/noglob"
rm "$T/noglob/shard-00000-of-00004.ckpt"  # the one holding the saved tree
expect_rc 1 "inspect DIR without its globals shard" "$CKPT" inspect "$T/noglob"
grep -q "sharded ckpt" "$T/out" && grep -q "shard-00000-of-00004.ckpt" "$T/err" && ok || bad "inspect DIR shows the manifest and names the missing shard"

cp -r "$T/s4" "$T/swap"
cp "$T/swap/shard-00000-of-00004.ckpt" "$T/swap/shard-00003-of-00004.ckpt"
expect_rc 1 "verify a swapped shard" "$CKPT" verify "$T/swap"
grep -q "shard-00003-of-00004.ckpt" "$T/err" && ok || bad "swap: names the shard: $(cat "$T/err")"
# A shard of another save at the same place (same name, another pin).
cp -r "$T/s4" "$T/other"
"$CKPT" shard "$T/in.ckpt" "$T/s4x" --ranks 4 --dim 1 >/dev/null
cp "$T/s4x/shard-00001-of-00004.ckpt" "$T/other/shard-00001-of-00004.ckpt"
expect_rc 1 "verify another save's shard" "$CKPT" verify "$T/other"

# A tensor larger than cat's 16 MiB box, cut on its last dim: rows are
# read in boxes of dim 1 from both shards.
"$FIX" big "$T/big.ckpt"
expect_rc 0 "shard big" "$CKPT" shard "$T/big.ckpt" "$T/bigd" --ranks 2 --dim 2
cmp -s <("$CKPT" cat "$T/big.ckpt" big) <("$CKPT" cat "$T/bigd" big) && ok || bad "cat DIR of a large tensor"
cmp -s <("$CKPT" cat "$T/big.ckpt" big --rows 1:2) <("$CKPT" cat "$T/bigd" big --rows 1:2) && ok || bad "cat DIR --rows of a large tensor"
rm -rf "$T/big.ckpt" "$T/bigd"

# Rank-local state has no place in one file: consolidate drops it and
# says so on stderr.
"$FIX" ranklocal "$T/rl" || bad "ranklocal fixture"
expect_rc 0 "consolidate with rank-local state" "$CKPT" consolidate "$T/rl" "$T/rl.ckpt"
grep -q "note: the rank-local state of 2 rank(s) (0, 1) is not in" "$T/err" && ok || bad "rank-local note: $(cat "$T/err")"
[ "$("$CKPT" get "$T/rl.ckpt" '')" = '{"w": {"$tensor": "w", "dtype": "float32", "shape": [4, 2]}, "epoch": 3}' ] && ok || bad "rank-local: the saved tree alone: $("$CKPT" get "$T/rl.ckpt" '')"
"$CKPT" cat "$T/rl.ckpt" w | $PY -c "import struct,sys; v=struct.unpack('<8f', sys.stdin.buffer.read()); assert v==tuple(range(8)), v" && ok || bad "rank-local: tensor bytes"
expect_rc 0 "consolidate without rank-local state" "$CKPT" consolidate "$T/s2" "$T/c2b.ckpt"
[ ! -s "$T/err" ] && ok || bad "no note without rank-local state: $(cat "$T/err")"

# DCP directories (tests/dcp/make_dcp.py, written by PyPI's torch; run by
# scripts/test.sh into $CKPT_DCP_FIXTURES): inspect, verify and
# consolidate read them; every tensor comes out as torch saved it.
if [ -n "${CKPT_DCP_FIXTURES:-}" ] && [ -f "$CKPT_DCP_FIXTURES/single/ref.txt" ]; then
  for k in single ranks2 ranks4 single_st ranks2_st per_item; do
    d="$CKPT_DCP_FIXTURES/$k"
    [ -f "$d/ref.txt" ] || continue
    expect_rc 0 "inspect DCP $k" "$CKPT" inspect --json "$d"
    $PY - "$T/out" "$d/ref.txt" <<'PYEOF' && ok || bad "inspect --json DCP $k"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["kind"] == "dcp" and d["tree"] is None, d["kind"]
ref = [l.rstrip("\n").split("\t") for l in open(sys.argv[2])]
t = {x["path"]: x for x in d["tensors"]}
for fqn, path, dtype, shape, _ in ref:
    assert t[path]["dtype"] == dtype, (path, t[path])
    assert t[path]["shape"] == [int(x) for x in shape.split(",") if x], (path, t[path])
PYEOF
    expect_rc 0 "verify DCP $k" "$CKPT" verify "$d"
    grep -q "DCP stores no checksums" "$T/out" && ok || bad "verify DCP says what it checked"
    expect_rc 0 "consolidate DCP $k" "$CKPT" consolidate "$d" "$T/dcp-$k.ckpt"
    n=0
    # (cut, not read: IFS tabs would merge the empty shape field of a 0-d
    # tensor with its neighbours)
    while IFS= read -r line; do
      path=$(printf '%s\n' "$line" | cut -f2)
      bin=$(printf '%s\n' "$line" | cut -f5)
      "$CKPT" cat "$T/dcp-$k.ckpt" -- "$path" | cmp -s - "$d/$bin" || bad "DCP $k: '$path' differs from torch's bytes"
      "$CKPT" cat "$d" -- "$path" | cmp -s - "$d/$bin" || bad "DCP $k: cat DIR '$path' differs from torch's bytes"
      n=$((n + 1))
    done <"$d/ref.txt"
    [ "$n" -gt 0 ] && ok || bad "DCP $k: no tensors compared"
  done
else
  echo "dist_cli: no DCP fixtures (CKPT_DCP_FIXTURES unset or empty): DCP cases skipped"
fi

# Files keep working as before.
expect_rc 0 "verify FILE" "$CKPT" verify "$T/in.ckpt"
expect_rc 0 "inspect FILE" "$CKPT" inspect "$T/in.ckpt"

echo "dist_cli: $passes passed, $fails failed"
[ "$fails" = 0 ]
