#!/usr/bin/env python3
"""pth2ckpt against hostile, resource-hungry and odd-but-real .pth files
(issue 10, items 8-16, importer side).

Every fixture is made here, by the installed torch or byte by byte. Each
section names the item it covers. Reuses pth_test.py's checker and counters.

usage: hardening_test.py BUILD_DIR   (exit 77 = skipped: torch not importable)
"""
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib


def _launch(args, timeout):
    """fork + exec `args`; returns (rc, stdout, stderr, peak RSS MiB, s)
    from wait4() of that child alone."""
    t0 = time.monotonic()
    rfd_o, wfd_o = os.pipe()
    rfd_e, wfd_e = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.dup2(wfd_o, 1)
            os.dup2(wfd_e, 2)
            for fd in (rfd_o, wfd_o, rfd_e, wfd_e):
                os.close(fd)
            import signal
            signal.alarm(timeout)
            os.execv(args[0], args)
        finally:
            os._exit(127)
    os.close(wfd_o)
    os.close(wfd_e)
    with os.fdopen(rfd_o, errors="replace") as fo, os.fdopen(rfd_e, errors="replace") as fe:
        out, err = fo.read(), fe.read()
    _, status, ru = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), out, err, ru.ru_maxrss / 1024.0, time.monotonic() - t0


# A child's peak RSS counts what it inherited at fork: forked from this
# process once torch is imported, every child would start at ~120 MiB. So a
# small launcher is forked now, before any import, and runs the measured
# commands for us.
_to_launcher_r, _to_launcher_w = os.pipe()
_from_launcher_r, _from_launcher_w = os.pipe()
_launcher = os.fork()
if _launcher == 0:
    os.close(_to_launcher_w)
    os.close(_from_launcher_r)
    with os.fdopen(_to_launcher_r) as cmds, os.fdopen(_from_launcher_w, "w") as results:
        for line in cmds:
            req = json.loads(line)
            results.write(json.dumps(_launch(req["args"], req["timeout"])) + "\n")
            results.flush()
    os._exit(0)
os.close(_to_launcher_r)
os.close(_from_launcher_w)
_cmds = os.fdopen(_to_launcher_w, "w")
_results = os.fdopen(_from_launcher_r)


def rss_run(args, timeout=60):
    """Runs args; returns (rc, stdout, stderr, peak RSS MiB, wall seconds)."""
    _cmds.write(json.dumps({"args": args, "timeout": timeout}) + "\n")
    _cmds.flush()
    return tuple(json.loads(_results.readline()))


try:
    import numpy as np  # noqa: F401
    import torch
except ImportError as e:  # CTest reports exit 77 as skipped
    print(f"SKIP: torch/numpy not importable here ({e})")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # noqa: E402
import pth_test as P  # noqa: E402  (ok(), run(), Checker, the counters)

from fixtures import _g, _i, _ints, _s  # noqa: E402  (pickle byte builders)

ok, run = P.ok, P.run
CKPT, PTH2CKPT = P.CKPT, P.PTH2CKPT


def convert(src, dst, *extra):
    return run([PTH2CKPT, *extra, src, dst], timeout=120)


def dry(src, *extra):
    return run([PTH2CKPT, "--dry-run", *extra, src], timeout=120)


def refusal(r):
    """The reason of a refusal, without the 'pth2ckpt: refused: ' prefix."""
    return r.stderr.strip().replace("pth2ckpt: refused: ", "")


def info(path):
    return json.loads(subprocess.check_output([CKPT, "inspect", "--json", path]))


def cat(path, tpath):
    return subprocess.check_output([CKPT, "cat", path, tpath])


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


# ---- zip building blocks ------------------------------------------------------------

def raw_zip(path, entries, trailing=b""):
    """A zip written byte by byte. entries: (name, data, method, crc, size,
    comp) where `data` is the payload as stored (compressed for deflate);
    crc/size None = computed. No data descriptors, no zip64."""
    out = bytearray()
    central = bytearray()
    for name, data, method, crc, size, raw in entries:
        nb = name.encode()
        crc = zlib.crc32(raw) if crc is None else crc
        size = len(raw) if size is None else size
        off = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034b50, 20, 0, method, 0, 0, crc, len(data), size,
                           len(nb), 0) + nb + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014b50, 20, 20, 0, method, 0, 0, crc,
                               len(data), size, len(nb), 0, 0, 0, 0, 0, off) + nb
    cd_off = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054b50, 0, 0, len(entries), len(entries), len(central),
                       cd_off, 0)
    write(path, bytes(out) + trailing)


def stored(name, data, crc=None):
    return (name, data, 0, crc, None, data)


def zero_crcs(src, dst):
    """Re-writes a torch zip with every CRC-32 field zero, as torch 2.x's
    torch.save(..., _use_new_zipfile_serialization=True) with
    torch.serialization.set_crc32_options(False) does."""
    with zipfile.ZipFile(src) as z:
        entries = [stored(n, z.read(n), crc=0) for n in z.namelist()]
    raw_zip(dst, entries)


def archive_entries(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return {n: z.read(n) for n in z.namelist()}


# ---- item 8: directory mode and symlinks ----------------------------------------------

def test_directory_symlinks(tmp):
    root = os.path.join(tmp, "hf")
    blobs = os.path.join(root, "blobs")
    rev = os.path.join(root, "snapshots", "rev")
    os.makedirs(blobs)
    os.makedirs(os.path.join(rev, "sub"))
    torch.save({"w": torch.arange(4.0)}, os.path.join(blobs, "sha256a"))
    torch.save({"v": torch.ones(3)}, os.path.join(rev, "sub", "plain.pt"))
    # Two links to one blob (the Hugging Face cache layout), a link to a
    # directory outside, and a dangling link.
    os.symlink("../../blobs/sha256a", os.path.join(rev, "pytorch_model.bin"))
    os.symlink("../../blobs/sha256a", os.path.join(rev, "copy.bin"))
    os.symlink("../../../nowhere.pth", os.path.join(rev, "dangling.pth"))
    out = os.path.join(tmp, "hf_out")
    before = sorted(os.listdir(blobs)), sorted(os.listdir(root))
    r = run([PTH2CKPT, rev, out], timeout=120)
    for name in ("pytorch_model.ckpt", "copy.ckpt", "sub/plain.ckpt"):
        p = os.path.join(out, name)
        ok(os.path.isfile(p) and not os.path.islink(p), f"item 8: {name} not written under DIR_OUT: {r.stdout}")
    ok((sorted(os.listdir(blobs)), sorted(os.listdir(root))) == before,
       f"item 8: wrote outside DIR_OUT: {os.listdir(blobs)} {os.listdir(root)}")
    escaped = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp) for f in fs
               if f.endswith(".ckpt") and not dp.startswith(out)]
    ok(escaped == [], f"item 8: outputs outside DIR_OUT: {escaped}")
    if os.path.isfile(os.path.join(out, "copy.ckpt")):
        ok(cat(os.path.join(out, "copy.ckpt"), "w") == torch.arange(4.0).numpy().tobytes(),
           "item 8: link output has the wrong content")
    ok("dangling.pth:" in r.stdout and "dangling" in r.stdout.split("dangling.pth:")[-1].split("\n")[0],
       f"item 8: dangling link not named in the summary: {r.stdout}")
    ok(r.returncode == 1, f"item 8: exit {r.returncode} with a refused file")

    # An output path that would go through a symlink in DIR_OUT is refused
    # by name and nothing is written where the link points.
    src = os.path.join(tmp, "esc_in")
    os.makedirs(os.path.join(src, "evil"))
    torch.save({"a": torch.ones(1)}, os.path.join(src, "evil", "m.pth"))
    torch.save({"a": torch.ones(1)}, os.path.join(src, "link.pth"))
    torch.save({"a": torch.ones(1)}, os.path.join(src, "fine.pth"))
    victim = os.path.join(tmp, "victim_dir")
    os.makedirs(victim)
    dst = os.path.join(tmp, "esc_out")
    os.makedirs(dst)
    os.symlink(victim, os.path.join(dst, "evil"))
    os.symlink(os.path.join(victim, "target.ckpt"), os.path.join(dst, "link.ckpt"))
    r = run([PTH2CKPT, src, dst], timeout=120)
    ok(os.listdir(victim) == [], f"item 8: wrote through a symlink in DIR_OUT: {os.listdir(victim)}")
    ok("evil/m.pth:" in r.stdout and "symlink" in r.stdout.split("evil/m.pth:")[-1].split("\n")[0],
       f"item 8: escape through a directory link not refused by name: {r.stdout}")
    ok("link.pth:" in r.stdout and "symlink" in r.stdout.split("link.pth:")[-1].split("\n")[0],
       f"item 8: output that is a symlink not refused by name: {r.stdout}")
    ok(os.path.isfile(os.path.join(dst, "fine.ckpt")), "item 8: the good file was not converted")

    # Two inputs with one output name (a.pt, a.pth): the second is refused,
    # not silently overwritten.
    src = os.path.join(tmp, "clash_in")
    os.makedirs(src)
    torch.save({"x": torch.zeros(1)}, os.path.join(src, "a.pt"))
    torch.save({"y": torch.ones(1)}, os.path.join(src, "a.pth"))
    dst = os.path.join(tmp, "clash_out")
    r = run([PTH2CKPT, src, dst], timeout=120)
    ok(r.returncode == 1 and "a.pth:" in r.stdout and "a.pt" in r.stdout.split("a.pth:")[-1],
       f"item 8: output name clash not refused: {r.stdout}")
    ok(P.Checker(os.path.join(dst, "a.ckpt")).tensors.keys() == {"x"}, "item 8: clash overwrote a.ckpt")

    # --dry-run over a directory decides the same, writes nothing.
    r2 = run([PTH2CKPT, "--dry-run", rev], timeout=120)
    ok(r2.returncode == 1 and "would convert 3 of 4" in r2.stdout and "dangling.pth:" in r2.stdout,
       f"item 8/10: directory dry run: {r2.stdout}{r2.stderr}")

    # An output named like a directory other outputs need (d.pt -> d.ckpt,
    # d.ckpt/z.pt -> d.ckpt/z.ckpt): the dry run said "would convert" for
    # d.pt while the run refused it after creating the directory d.ckpt.
    src = os.path.join(tmp, "dirclash")
    os.makedirs(os.path.join(src, "d.ckpt"))
    torch.save({"z": torch.zeros(1)}, os.path.join(src, "d.ckpt", "z.pt"))
    torch.save({"d": torch.ones(1)}, os.path.join(src, "d.pt"))
    dst = os.path.join(tmp, "dirclash_out")
    dry = run([PTH2CKPT, "--dry-run", src, dst], timeout=120)
    real = run([PTH2CKPT, src, dst], timeout=120)
    for name, r in (("dry run", dry), ("conversion", real)):
        ok(r.returncode == 1 and "would convert 1 of 2" in r.stdout.replace("converted", "would convert")
           and "d.pt:" in r.stdout and "also a directory" in r.stdout,
           f"item 10: {name} of an output named like a needed directory: {r.stdout}{r.stderr}")
    ok(os.path.isfile(os.path.join(dst, "d.ckpt", "z.ckpt")), "item 10: d.ckpt/z.ckpt not written")


# ---- item 9: expansion, memory and time bounds -----------------------------------------

def laughs_pickle(levels, leaf):
    """A pickle whose object i is [i-1, i-1], through the memo: 2^levels leaves."""
    p = b"\x80\x02" + leaf + b"q\x00"  # POP, then the next level
    for i in range(1, levels + 1):
        p += b"0(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i])
    return p + b"."


def tensor_leaf(key="0", n=4):
    pid = b"(" + _s("storage") + _g("torch", "FloatStorage") + _s(key) + _s("cpu") + _i(n) + b"t"
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q" + _i(0) + _ints([n]) +
            _ints([1]) + b"\x89" + _g("collections", "OrderedDict") + b")RtR")


# Set by CTest for sanitizer builds (tests/CMakeLists.txt), whose memory
# and time say nothing about a release build's.
SANITIZED = os.environ.get("CKPT_SANITIZED") == "1"


def bounded(name, path, expect, rss_mib=256, secs=5.0):
    """Both conversion and dry run refuse `path` with `expect`, within the
    memory and time bounds."""
    for args in ([PTH2CKPT, path, path + ".ckpt"], [PTH2CKPT, "--dry-run", path]):
        rc, _, err, rss, wall = rss_run(args)
        mode = "dry run" if "--dry-run" in args else "convert"
        print(f"item 9 {name} ({mode}): peak RSS {rss:.0f} MiB, {wall:.2f} s")
        ok(rc == 1 and expect in err, f"item 9 {name} ({mode}): rc {rc}, stderr {err.strip()[:300]}")
        if SANITIZED:  # ASan's shadow memory and 2-5x slowdown: report only
            continue
        ok(rss < rss_mib, f"item 9 {name} ({mode}): peak RSS {rss:.0f} MiB >= {rss_mib}")
        ok(wall < secs, f"item 9 {name} ({mode}): took {wall:.1f} s >= {secs}")
    ok(not os.path.exists(path + ".ckpt"), f"item 9 {name}: left an output")


def test_bounds(tmp):
    d = os.path.join(tmp, "bounds")
    os.makedirs(d)
    # 2^60 list nodes from 60 memo reuses (909-byte style).
    p = os.path.join(d, "laughs_list.pth")
    fixtures.torch_like_zip(p, laughs_pickle(60, b"]"))
    bounded("list laughs", p, "expands to more than")
    # 2^60 references to one tensor.
    p = os.path.join(d, "laughs_tensor.pth")
    fixtures.torch_like_zip(p, laughs_pickle(60, tensor_leaf()), {"0": bytes(16)})
    bounded("tensor laughs", p, "expands to more than")
    # 2^20 references to one tensor: a tree well within the node limit, but
    # over the tensor-reference limit.
    p = os.path.join(d, "laughs_tensor_20.pth")
    fixtures.torch_like_zip(p, laughs_pickle(21, tensor_leaf()), {"0": bytes(16)})
    bounded("tensor refs", p, "tensor references")
    # One 4 MiB string reused 2^10 times: 4 GiB of header text.
    s = b"X" + struct.pack("<I", 4 << 20) + b"a" * (4 << 20)
    p = os.path.join(d, "laughs_str.pth")
    fixtures.torch_like_zip(p, laughs_pickle(10, s))
    bounded("string laughs", p, "expands to more than")
    # A 1 GiB data.pkl deflated to ~1 MiB: refused before inflating.
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\x00" * (1 << 24)
    crc = 0
    body = []
    for _ in range(64):
        body.append(comp.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    body.append(comp.flush())
    body = b"".join(body)
    p = os.path.join(d, "deflate_bomb.pth")
    raw_zip(p, [("archive/data.pkl", body, 8, crc, 1 << 30, b""), stored("archive/version", b"3\n")])
    ok(len(body) < 2 << 20, f"item 9: bomb is {len(body)} bytes")
    bounded("deflated 1 GiB pickle", p, "pickle limit")
    # 5 M stack pushes of new objects, and of one memoized object.
    p = os.path.join(d, "pushes.pth")
    fixtures.torch_like_zip(p, b"\x80\x02" + b"N" * 5_000_000 + b".")
    bounded("5M pushes", p, "limit")
    p = os.path.join(d, "pushes_memo.pth")
    fixtures.torch_like_zip(p, b"\x80\x02]q\x00" + b"h\x00" * 5_000_000 + b".")
    bounded("5M memo pushes", p, "limit")
    # 3 M floats in one list (27 MB): torch.load reads it, so does ckpt;
    # the importer's object budget grows with the input (80 bytes a byte),
    # so its memory stays a bounded multiple of the file, never GBs from KBs.
    p = os.path.join(d, "floats.pth")
    fixtures.torch_like_zip(p, b"\x80\x02" + b"G" + bytes(8) * 1 + b"0" + b"(" + b"G\0\0\0\0\0\0\0\0" * 3_000_000 + b"l.")
    rc, _, err, rss, wall = rss_run([PTH2CKPT, "--no-sync", p, p + ".ckpt"])
    size_mib = os.path.getsize(p) / 2**20
    print(f"item 9 3M floats in one list (convert): peak RSS {rss:.0f} MiB for {size_mib:.0f} MiB, {wall:.2f} s")
    ok(rc == 0, f"item 9: 3M floats refused: {err.strip()[:300]}")
    ok(SANITIZED or rss < 80 * size_mib, f"item 9: 3M floats took {rss:.0f} MiB (> 80x the file)")
    os.unlink(p)
    # The same in the legacy format (no zip record size to check first).
    p = os.path.join(d, "legacy_pushes.pth")
    magic = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)
    write(p, magic + pickle.dumps(1001, protocol=2) + pickle.dumps({}, protocol=2) +
          b"\x80\x02" + b"N" * 5_000_000 + b".")
    bounded("legacy 5M pushes", p, "limit")
    # A 2 KiB key walk: a tuple doubled 20 times by the memo (3 M nodes,
    # 21 objects) inside 800 nested frozensets. Checking every set item's
    # expanded key took 35 s before each object was checked once.
    put = lambda i: b"r" + struct.pack("<I", i)  # noqa: E731 - LONG_BINPUT
    get = lambda i: b"j" + struct.pack("<I", i)  # noqa: E731 - LONG_BINGET
    pk = b"\x80\x04J\x01\x00\x00\x00\x85" + put(0)
    for j in range(1, 21):
        pk += b"0" + get(j - 1) + get(j - 1) + b"\x86" + put(j)
    pk += b"0](" + b"(" * 800 + get(20) + b"\x91" * 800 + b"e."
    p = os.path.join(d, "frozensets.pth")
    fixtures.torch_like_zip(p, pk)
    ok(len(pk) < 4096, f"item 9: frozenset chain is {len(pk)} bytes")
    bounded("800 frozensets over a doubled tuple", p, "")
    # ~1 M distinct ~210-byte paths to one memo-reused tensor from a 230 KB
    # pickle: refused once the paths take 16x the input (32 MiB floor),
    # where it used to hold ~600 MB of paths before the 256 MiB limit.
    inner = b"}" + put(1) + b"(" + b"".join(_s(f"{i:04d}" + "k" * 196) + get(0) for i in range(1023)) + b"u"
    pk = (b"\x80\x02" + tensor_leaf() + put(0) + b"0" + inner + b"0}(" +
          b"".join(_s(f"{i:04d}" + "o" * 196) + get(1) for i in range(1023)) + b"u.")
    p = os.path.join(d, "many_paths.pth")
    fixtures.torch_like_zip(p, pk, {"0": bytes(16)})
    ok(os.path.getsize(p) < 1 << 20, f"item 9: many-paths file is {os.path.getsize(p)} bytes")
    bounded("1 M long paths to one tensor", p, "paths of the tree")
    # A legitimate many-object file still converts (limits are not too tight).
    p = os.path.join(d, "many.pth")
    obj = {"losses": [float(i) for i in range(300_000)], "names": [f"n{i}" for i in range(100_000)],
           "w": [torch.full((1,), float(i)) for i in range(20_000)]}
    torch.save(obj, p)
    rc, _, err, rss, wall = rss_run([PTH2CKPT, p, p + ".ckpt"])
    ok(rc == 0, f"item 9: a 400,000-value checkpoint was refused: {err}")
    # A state dict of 60,000 tensors and a list of 1.5 M ints: torch.load
    # reads them; a fixed 192 MiB object budget refused both.
    for name, obj in (("60k_tensors", {f"layer.{i}.weight": torch.zeros(2) for i in range(60_000)}),
                      ("1.5M_ints", {"idx": list(range(1_500_000))})):
        p = os.path.join(d, name + ".pth")
        torch.save(obj, p)
        rc, _, err, rss, wall = rss_run([PTH2CKPT, "--no-sync", p, p + ".ckpt"])
        ok(rc == 0, f"item 9: {name} refused: {err.strip()[:300]}")
        print(f"item 9 {name} (convert): peak RSS {rss:.0f} MiB, {wall:.2f} s")
        os.unlink(p)


# ---- item 10: --dry-run decides what a conversion does -------------------------------------

def dict_pickle(pairs):
    """{k: v} from (key bytes, value bytes) opcode pairs, SETITEM by SETITEM."""
    p = b"\x80\x02}"
    for k, v in pairs:
        p += k + v + b"s"
    return p + b"."


def test_dry_run(tmp, all_files):
    d = os.path.join(tmp, "dry")
    os.makedirs(d)
    t0 = tensor_leaf("0", 2)
    t1 = tensor_leaf("1", 2)
    rec = {"0": bytes(8), "1": bytes(8)}
    cases = {
        # keys "1" and 1 have one path form: the writer refuses two tensors there.
        "same_path.pth": (dict_pickle([(_s("1"), t0), (_i(1), t1)]), rec),
        # a list, a dict and a tensor as dict keys (pickle can write them).
        "list_key.pth": (dict_pickle([(b"]", _i(1))]), {}),
        "dict_key.pth": (dict_pickle([(b"}", _i(1))]), {}),
        "tensor_key.pth": (dict_pickle([(t0, _i(1))]), {"0": bytes(8)}),
        "tuple_list_key.pth": (dict_pickle([(b"(]t", _i(1))]), {}),
    }
    files = []
    for name, (pkl, records) in cases.items():
        p = os.path.join(d, name)
        fixtures.torch_like_zip(p, pkl, records)
        files.append(p)
    for p in files + all_files:
        dst = os.path.join(d, "out.ckpt")
        if os.path.exists(dst):
            os.remove(dst)
        c = convert(p, dst)
        r = dry(p)
        name = os.path.basename(p)
        ok(c.returncode == r.returncode,
           f"item 10: {name}: conversion exit {c.returncode} ({refusal(c)[:160]}), dry run {r.returncode} ({r.stdout.strip()[:120]})")
        if c.returncode and r.returncode:
            ok(refusal(c) == refusal(r), f"item 10: {name}: reasons differ:\n  {refusal(c)}\n  {refusal(r)}")
    for name in cases:
        c = convert(os.path.join(d, name), os.path.join(d, "x.ckpt"))
        ok(c.returncode == 1, f"item 10: {name} converted: {c.stdout}")
    # Keys Python finds equal (1, True, 1.0) are one key, as torch.load has
    # them: the first key in its place, the last value; a set keeps the
    # first of equal items. Both modes agree, and the writer is satisfied.
    one = b"G" + struct.pack(">d", 1.0)
    nan = b"G" + struct.pack(">d", float("nan"))
    pkl = dict_pickle([(_i(1), _s("a")), (_s("x"), _i(5)), (b"\x88", _s("b")), (one, _s("c")),
                       (nan + b"q\x09", _i(1)), (b"h\x09", _i(2)),
                       (_s("s"), b"(" + _i(1) + one + b"\x88" + _i(2) + b"\x91")])
    want = pickle.loads(pkl)
    ok(len(want) == 4 and want[1] == "c", f"dup keys fixture: {want}")
    p = os.path.join(d, "dup_keys.pth")
    fixtures.torch_like_zip(p, pkl)
    c = convert(p, p + ".ckpt")
    r = dry(p)
    if ok(c.returncode == 0 and r.returncode == 0, f"dup keys: {refusal(c)} / {refusal(r)}"):
        got = json.loads(subprocess.check_output([CKPT, "get", p + ".ckpt", ""]))
        ok(got.get("1") == "c" and got.get("x") == 5 and list(got)[:2] == ["1", "x"] and
           sorted(got["s"]) == [1, 2] and len(got) == 4, f"dup keys: {got}")


# ---- item 11: invalid UTF-8 -----------------------------------------------------------

def test_utf8(tmp):
    d = os.path.join(tmp, "utf8")
    os.makedirs(d)
    bad = {"invalid": b"\xff\xfe", "overlong": b"\xc0\xaf", "truncated": b"ab\xe2\x82",
           "beyond_max": b"\xf4\x90\x80\x80"}
    for name, raw in bad.items():
        for op, hdr in (("X", b"X" + struct.pack("<I", len(raw))), ("short", b"\x8c" + bytes([len(raw)])),
                        ("X8", b"\x8d" + struct.pack("<Q", len(raw)))):
            pkl = b"\x80\x04}" + _s("k") + hdr + raw + b"s."
            try:
                pickle.loads(pkl)
                python_refuses = False
            except UnicodeDecodeError:
                python_refuses = True
            ok(python_refuses, f"item 11: Python's pickle accepts {name}")
            p = os.path.join(d, f"{name}_{op}.pth")
            fixtures.torch_like_zip(p, pkl)
            r = convert(p, p + ".ckpt")
            ok(r.returncode == 1 and "invalid UTF-8" in r.stderr and "data.pkl+" in r.stderr,
               f"item 11: {name} via {op}: {r.returncode} {r.stderr.strip()}")
    # Lone surrogates: pickle decodes them (surrogatepass), but a ckpt
    # string is UTF-8, which cannot hold them.
    pkl = b"\x80\x04}" + _s("k") + b"X\x03\x00\x00\x00\xed\xa0\x80s."
    ok(pickle.loads(pkl) == {"k": "\ud800"}, "item 11: pickle's surrogatepass")
    p = os.path.join(d, "surrogate.pth")
    fixtures.torch_like_zip(p, pkl)
    r = convert(p, p + ".ckpt")
    ok(r.returncode == 1 and "surrogate" in r.stderr, f"item 11: surrogate: {r.stderr.strip()}")
    # Valid multi-byte text still converts, keys too.
    pkl = b"\x80\x04}" + _s("ключ") + _s("héllo ✓ 𝄞") + b"s."
    p = os.path.join(d, "good.pth")
    fixtures.torch_like_zip(p, pkl)
    r = convert(p, p + ".ckpt")
    ok(r.returncode == 0, f"item 11: valid UTF-8 refused: {r.stderr}")
    if r.returncode == 0:
        got = json.loads(subprocess.check_output([CKPT, "get", p + ".ckpt", ""]))
        ok(got == {"ключ": "héllo ✓ 𝄞"}, f"item 11: {got}")


# ---- item 12: Python 2 pickles ------------------------------------------------------------

def py2_str(b):
    """Python 2 str (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b


def py2_legacy(path, body):
    """A legacy torch.save file as torch 0.4 under Python 2 wrote it:
    protocol 2 with Python 2's names and str opcodes."""
    magic = b"\x80\x02\x8a\x0a" + (0x1950a86a20f9469cfc6c).to_bytes(10, "little") + b"."
    proto = b"\x80\x02M\xe9\x03."
    sys_info = (b"\x80\x02}q\x00(" + py2_str(b"protocol_version") + b"M\xe9\x03" +
                py2_str(b"little_endian") + b"\x88" + py2_str(b"type_sizes") + b"}q\x01(" +
                py2_str(b"short") + b"K\x02" + py2_str(b"int") + b"K\x04" + py2_str(b"long") +
                b"K\x08uu.")
    obj, keys, blobs = body
    tail = b""
    for k, raw, n in blobs:
        tail += struct.pack("<q", n) + raw
    keylist = b"\x80\x02]q\x00(" + b"".join(py2_str(k.encode()) for k, _, _ in blobs) + b"e."
    write(path, magic + proto + sys_info + obj + keylist + tail)


def py2_tensor(key, n):
    pid = (b"(" + py2_str(b"storage") + _g("torch", "FloatStorage") + py2_str(key.encode()) +
           py2_str(b"cpu") + _i(n) + b"Nt")
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + b"Q" + _i(0) + _ints([n]) +
            _ints([1]) + b"\x89" + _g("collections", "OrderedDict") + b")RtR")


def test_python2(tmp):
    d = os.path.join(tmp, "py2")
    os.makedirs(d)
    w = torch.arange(3.0)
    # OrderedDict as (OrderedDict, ([[k, v], ...],)) with its _metadata
    # attribute in BUILD, as Python 2.7's OrderedDict.__reduce__ writes it;
    # __builtin__.set, copy_reg._reconstructor (argparse.Namespace),
    # LONG1 longs, text LONG ('L' suffix), latin-1-only str.
    od = (_g("collections", "OrderedDict") + b"(](" +
          b"]" + b"(" + py2_str(b"fc.weight") + py2_tensor("140001", 3) + b"e" +
          b"]" + b"(" + py2_str(b"fc.bias") + py2_tensor("140002", 3) + b"e" +
          b"et" + b"R" + b"}" + py2_str(b"_metadata") + _g("collections", "OrderedDict") + b")R" + b"sb")
    ns = (_g("copy_reg", "_reconstructor") + b"(" + _g("argparse", "Namespace") +
          _g("__builtin__", "object") + b"NtR}" + py2_str(b"lr") + b"G?\xb9\x99\x99\x99\x99\x99\x9a" + b"sb")
    obj = (b"\x80\x02}q\x00(" + py2_str(b"state_dict") + od +
           py2_str(b"args") + ns +
           py2_str(b"tags") + _g("__builtin__", "set") + b"]" + py2_str(b"a") + b"a" + b"\x85R" +
           py2_str(b"steps") + b"\x8a\x09" + (2 ** 64).to_bytes(9, "little") +
           py2_str(b"text_long") + b"L12345678901234567890L\n" +
           py2_str(b"name") + py2_str("café".encode("latin-1")) +
           b"u.")
    p = os.path.join(d, "py2_state.pth")
    raw_w = w.numpy().tobytes()
    py2_legacy(p, (obj, None, [("140001", raw_w, 3), ("140002", raw_w, 3)]))
    # weights_only=False: argparse.Namespace is not on torch's allowlist.
    want = torch.load(p, encoding="latin1", weights_only=False)
    ok(list(want["state_dict"].keys()) == ["fc.weight", "fc.bias"] and want["name"] == "café",
       f"item 12: fixture is not what torch reads: {want}")
    # torch.load's default encoding is utf-8: the latin-1 str fails there,
    # and pth2ckpt says how to read it.
    r = convert(p, p + ".ckpt")
    ok(r.returncode == 1 and "--encoding latin1" in r.stderr, f"item 12: default encoding: {r.stderr.strip()}")
    r = convert(p, p + ".ckpt", "--encoding", "latin1")
    if ok(r.returncode == 0, f"item 12: Python 2 state dict refused: {r.stderr.strip()}"):
        got = json.loads(subprocess.check_output([CKPT, "get", p + ".ckpt", ""]))
        P.Checker(p + ".ckpt").value(want, got, "", root=True)
        ok(info(p + ".ckpt")["tree"]["state_dict"] is not None, "item 12: tree")
    # ckpt.load takes torch.load's encoding the same way.
    sys.path.insert(0, os.path.join(P.BUILD, "python"))
    try:
        import ckpt
    except ImportError as e:
        print(f"(ckpt.load of Python 2 files not checked: {e})")
    else:
        got = ckpt.load(p, encoding="latin1")
        ok(got["name"] == "café" and torch.equal(got["state_dict"]["fc.weight"], w),
           f"item 12: ckpt.load(encoding='latin1'): {got}")
        try:
            ckpt.load(p)
            ok(False, "item 12: ckpt.load of a latin-1 Python 2 str with the default encoding")
        except ckpt.CkptError as e:
            ok("latin1" in str(e) and p in str(e), f"item 12: ckpt.load default encoding: {e}")
    # The ASCII-only variant converts with the default encoding.
    obj2 = obj.replace(py2_str("café".encode("latin-1")), py2_str(b"cafe"))
    p2 = os.path.join(d, "py2_ascii.pth")
    py2_legacy(p2, (obj2, None, [("140001", raw_w, 3), ("140002", raw_w, 3)]))
    r = convert(p2, p2 + ".ckpt")
    ok(r.returncode == 0, f"item 12: ASCII Python 2 file refused: {r.stderr.strip()}")
    # A Python 2 numpy array: its data is a str of raw bytes (BINSTRING).
    a = np.arange(5, dtype=np.float32)
    nd = (_g("numpy.core.multiarray", "_reconstruct") + b"(" + _g("numpy", "ndarray") + b"K\x00\x85" +
          py2_str(b"b") + b"tR(K\x01K\x05\x85" + _g("numpy", "dtype") + b"(" + py2_str(b"f4") +
          b"K\x00K\x01tR(K\x03" + py2_str(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" +
          py2_str(a.tobytes()) + b"tb")
    obj3 = b"\x80\x02}q\x00(" + py2_str(b"arr") + nd + b"u."
    p3 = os.path.join(d, "py2_numpy.pth")
    py2_legacy(p3, (obj3, None, []))
    # weights_only=False: numpy arrays are not on torch's allowlist.
    ok(np.array_equal(torch.load(p3, encoding="latin1", weights_only=False)["arr"], a), "item 12: numpy fixture")
    for enc in ([], ["--encoding", "latin1"]):
        r = convert(p3, p3 + ".ckpt", *enc)
        if ok(r.returncode == 0, f"item 12: Python 2 numpy array {enc}: {r.stderr.strip()}"):
            ok(cat(p3 + ".ckpt", "arr") == a.tobytes(), "item 12: numpy bytes")
    # Forbidden names stay forbidden under their Python 2 spelling.
    evil = b"\x80\x02c__builtin__\neval\n" + py2_str(b"1") + b"\x85R."
    p4 = os.path.join(d, "py2_eval.pth")
    fixtures.torch_like_zip(p4, evil)
    r = convert(p4, p4 + ".ckpt")
    ok(r.returncode == 1 and "forbidden global 'builtins eval'" in r.stderr, f"item 12: {r.stderr.strip()}")


# ---- issue 11 item 3: one allowlist table -----------------------------------------------

def test_allowlist(tmp):
    """GLOBAL's verdicts, REDUCE's arity and NEWOBJ/BUILD's dispatch all
    come from the one allowlist table; refusals name what the table allows."""
    d = os.path.join(tmp, "allow")
    os.makedirs(d)
    cases = [
        # An unknown name in a module the table knows: forbidden, and the
        # message lists what that module allows (derived from the table).
        ("v9", _g("torch._utils", "_rebuild_tensor_v9") + b".",
         ["forbidden global 'torch._utils _rebuild_tensor_v9'",
          "torch._utils allows _rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3",
          "nothing was run"]),
        ("posix", _g("posix", "system") + b".",
         ["forbidden global 'posix system': not on the allowlist of torch.save "
          "checkpoint types; nothing was run"]),
        # Known names with their own reason.
        ("qtensor", _g("torch._utils", "_rebuild_qtensor") + b".",
         ["quantized tensors are not supported (global 'torch._utils _rebuild_qtensor')"]),
        ("layout", _g("torch.serialization", "_get_layout") + b".",
         ["sparse tensors are not supported"]),
        ("main", _g("__main__", "Net") + b".",
         ["custom class '__main__.Net' cannot be converted without running its code"]),
        ("module", _g("torch.nn.modules.linear", "Linear") + b".", ["save model.state_dict() instead"]),
        ("nn_func", _g("torch.nn.functional", "relu") + b".", ["save model.state_dict() instead"]),
        ("script", _g("__torch__.Net", "forward") + b".", ["TorchScript objects are not supported"]),
        # A Parameter under another torch.nn module is no module: plainly forbidden.
        ("nn_param", _g("torch.nn.utils", "Parameter") + b".", ["forbidden global 'torch.nn.utils Parameter'"]),
        # REDUCE: the row's arity, and classes that are not callable.
        ("arity", _g("torch", "Size") + b")R.",
         ["'torch.Size' called with 0 arguments (it takes 1)"]),
        ("arity_range", _g("torch._utils", "_rebuild_tensor_v2") + b")R.",
         ["'torch._utils._rebuild_tensor_v2' called with 0 arguments (it takes 6 to 7)"]),
        ("ndarray_call", _g("numpy", "ndarray") + b")R.", ["'numpy.ndarray' cannot be called here"]),
        ("dtype_call", _g("torch", "float32") + b")R.", ["REDUCE on a dtype, not a callable"]),
        # NEWOBJ only of the classes the table gives a NEWOBJ handler.
        ("newobj_set", b"\x80\x02" + _g("builtins", "set") + b")\x81.", ["NEWOBJ of 'builtins.set'"]),
        ("reconstruct_set", _g("copyreg", "_reconstructor") + b"(" + _g("builtins", "set") +
         _g("builtins", "object") + b"NtR.",
         ["copyreg._reconstructor of a class that is not allowlisted"]),
        # BUILD dispatches on what made the object.
        ("build_int", b"K\x01}b.", ["BUILD on a int"]),
        ("build_ns", b"\x80\x02" + _g("argparse", "Namespace") + b")\x81K\x01b.",
         ["Namespace state is not a dict"]),
        ("build_od", b"\x80\x02" + _g("collections", "OrderedDict") + b")RK\x01b.",
         ["BUILD state of a dict is a int"]),
    ]
    for name, pkl, expect in cases:
        p = os.path.join(d, f"{name}.pth")
        fixtures.torch_like_zip(p, pkl)
        r = convert(p, p + ".ckpt")
        ok(r.returncode == 1 and all(e in r.stderr for e in expect) and not os.path.exists(p + ".ckpt"),
           f"allowlist: {name}: {r.stderr.strip()}")
    ok("nn.Module" not in convert(os.path.join(d, "nn_param.pth"), os.path.join(d, "x.ckpt")).stderr,
       "allowlist: torch.nn.utils Parameter is not called a module")
    # Accepted: NEWOBJ of Namespace and OrderedDict with BUILD state, BUILD
    # on a plain dict (attributes dropped), copyreg._reconstructor of
    # OrderedDict.
    good = [
        ("ns", b"\x80\x02" + _g("argparse", "Namespace") + b")\x81}" + _s("lr") + _i(3) + b"sb.",
         "argparse.Namespace"),
        ("od_newobj", b"\x80\x02" + _g("collections", "OrderedDict") + b")\x81}b.",
         "collections.OrderedDict"),
        ("plain_build", b"\x80\x02}}b.", None),
        ("od_reconstruct", _g("copyreg", "_reconstructor") + b"(" + _g("collections", "OrderedDict") +
         _g("builtins", "object") + b"NtR.", "collections.OrderedDict"),
    ]
    for name, pkl, tag in good:
        p = os.path.join(d, f"{name}.pth")
        fixtures.torch_like_zip(p, pkl)
        r = convert(p, p + ".ckpt")
        if ok(r.returncode == 0, f"allowlist: {name} refused: {r.stderr.strip()}") and tag:
            # The class tag comes back through ckpt.load (ckpt inspect does
            # not show it).
            sys.path.insert(0, os.path.join(P.BUILD, "python"))
            try:
                import ckpt
            except ImportError as e:
                print(f"(allowlist: class tags not checked: {e})")
                continue
            got = type(ckpt.load(p + ".ckpt"))
            ok(f"{got.__module__}.{got.__qualname__}" == tag, f"allowlist: {name}: loads as {got}, not {tag}")


# ---- issue 11 item 2: errors name the path the file would have ------------------------

def test_key_paths(tmp):
    """A refusal under a tuple, float or frozenset key names the tensor path
    as the file spells it (FORMAT.md 7.3): the same path a conversion of the
    same tree with a tensor there writes. A frozenset's items are in
    canonical order and once each (Python holds frozenset((2, 1)) and
    frozenset(('a', 'a')) as {1, 2} and {'a'})."""
    d = os.path.join(tmp, "keypaths")
    os.makedirs(d)
    keys = {
        "tuple": b"(K\x01" + _s("a") + b"t",
        "float": b"G" + struct.pack(">d", 1.0),
        "tuple_float": b"(G" + struct.pack(">d", 1.5) + b"t",
        "bytes_in_tuple": b"C\x02\xab\x01\x85",
        "frozenset_order": b"(K\x02K\x01\x91",
        "frozenset_dup": b"(" + _s("a") + _s("a") + b"\x91",
        "frozenset_in_tuple": b"(K\x07(K\x03K\x02K\x03\x91t",
    }
    want = {"tuple": "(1,a)/x", "float": "1.0/x", "tuple_float": "(1.5,)/x",
            "bytes_in_tuple": "(0xab01,)/x", "frozenset_order": "(1,2)/x",
            "frozenset_dup": "(a,)/x", "frozenset_in_tuple": "(7,(2,3))/x"}
    for name, key in keys.items():
        good = os.path.join(d, f"{name}_good.pth")
        fixtures.torch_like_zip(good, b"\x80\x02}(" + key + b"}" + _s("x") + tensor_leaf("0", 4) + b"su.",
                                {"0": bytes(16)})
        r = convert(good, good + ".ckpt")
        if not ok(r.returncode == 0, f"key paths: {name}: {r.stderr.strip()}"):
            continue
        path = info(good + ".ckpt")["tensors"][0]["path"]
        ok(path == want[name], f"key paths: {name}: the file says {path!r}, expected {want[name]!r}")
        bad = os.path.join(d, f"{name}_bad.pth")
        fixtures.torch_like_zip(bad, b"\x80\x02}(" + key + b"}" + _s("x") + _g("torch", "Tensor") + b"su.")
        for r in (convert(bad, bad + ".ckpt"), dry(bad)):
            ok(r.returncode == 1 and f"tensor '{path}': a class or function object" in r.stderr,
               f"key paths: {name}: the error does not name {path!r}: {r.stderr.strip()}")


# ---- item 13: archives without CRC-32s ------------------------------------------------------

def test_no_crc(tmp):
    d = os.path.join(tmp, "crc")
    os.makedirs(d)
    obj = {"w": torch.randn(3, 3), "b": torch.arange(4)}
    src = os.path.join(d, "normal.pth")
    torch.save(obj, src)
    p = os.path.join(d, "no_crc.pth")
    zero_crcs(src, p)
    r = convert(p, p + ".ckpt")
    if ok(r.returncode == 0, f"item 13: all-zero CRCs refused: {r.stderr.strip()}"):
        md = info(p + ".ckpt")["metadata"]
        ok("not computed" in md.get("source_crc32", ""), f"item 13: metadata {md}")
        ok(cat(p + ".ckpt", "w") == obj["w"].numpy().tobytes(), "item 13: bytes")
        ok(run([CKPT, "verify", p + ".ckpt"]).returncode == 0, "item 13: verify")
    r = dry(p)
    ok(r.returncode == 0 and "CRC-32" in r.stdout and "not computed" in r.stdout, f"item 13: dry run: {r.stdout}")
    r = convert(src, src + ".ckpt")
    ok(info(src + ".ckpt")["metadata"].get("source_crc32") == "checked", "item 13: normal file metadata")
    # Only some CRCs zero: still a mismatch.
    with zipfile.ZipFile(src) as z:
        entries = [stored(n, z.read(n), crc=0 if n.endswith("/0") else None) for n in z.namelist()]
    p2 = os.path.join(d, "one_zero.pth")
    raw_zip(p2, entries)
    r = convert(p2, p2 + ".ckpt")
    ok(r.returncode == 1 and "CRC-32 mismatch" in r.stderr, f"item 13: partial zero CRCs: {r.stderr.strip()}")


# ---- items 14, 15: every dtype, both byte orders ---------------------------------------------

# Every dtype torch 2.x can save (c10/core/ScalarType.h), with its element
# size and its byte-swap unit.
TORCH2_DTYPES = {
    "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "float32": 4,
    "float64": 8, "complex32": 4, "complex64": 8, "complex128": 16, "bool": 1, "bfloat16": 2,
    "float8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2fnuz": 1, "float8_e4m3fnuz": 1,
    "uint16": 2, "uint32": 4, "uint64": 8, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bits16": 2,
    **{f"uint{i}": 1 for i in range(1, 8)}, **{f"int{i}": 1 for i in range(1, 8)},
}


def swap_unit(name):
    size = TORCH2_DTYPES[name]
    return size // 2 if name.startswith("complex") else size


def be_v3_archive(path, tensors):
    """fixtures.v3_archive plus a byteorder record of 'big', each element
    byte-swapped as a big-endian host writes it."""
    fixtures.v3_archive(path, tensors)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, (name, (dt, shape, raw)) in enumerate(tensors.items()):
            entries[f"archive/data/{k}"] = fixtures.swap_elements(raw, swap_unit(dt))
        entries["archive/byteorder"] = b"big"
        for n, v in entries.items():
            z.writestr(n, v)


def test_dtypes(tmp):
    d = os.path.join(tmp, "dtypes")
    os.makedirs(d)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, size in TORCH2_DTYPES.items():
        raw = rng.integers(0, 256, size * 6, dtype=np.uint8).tobytes()
        if name == "bool":
            raw = bytes(b & 1 for b in raw)
        tensors[name] = (name, [2, 3], raw)
    for order in ("little", "big"):
        p = os.path.join(d, f"all_{order}.pth")
        (fixtures.v3_archive if order == "little" else be_v3_archive)(p, tensors)
        r = convert(p, p + ".ckpt")
        if not ok(r.returncode == 0, f"item 15 ({order}): {r.stderr.strip()}"):
            continue
        ok(run([CKPT, "verify", p + ".ckpt"]).returncode == 0, f"item 15 ({order}): verify")
        c = P.Checker(p + ".ckpt")
        for name, (dt, shape, raw) in tensors.items():
            t = c.tensors.get(name, {})
            ok(t.get("dtype") == dt and t.get("shape") == shape, f"items 14/15 {order} {name}: {t}")
            ok(c.cat(name) == raw, f"items 14/15 {order} {name}: bytes (big-endian not swapped back?)")
    # Big-endian v3 (untyped storage) archive of the format-1.0 dtypes only:
    # swapped by the tensor's dtype, not the storage's (uint8).
    known = {k: v for k, v in tensors.items() if not (k.rstrip("1234567") in ("int", "uint") and len(k) <= 5)}
    p = os.path.join(d, "v3_big_1_0.pth")
    be_v3_archive(p, known)
    r = convert(p, p + ".ckpt")
    if ok(r.returncode == 0, f"item 14 v3 big-endian: {r.stderr.strip()}"):
        for name, (dt, shape, raw) in known.items():
            ok(cat(p + ".ckpt", name) == raw, f"item 14 v3 big-endian {name}: not swapped back")
    # Big-endian archives of every dtype torch 1.13 saves with typed storages.
    every = fixtures.make_cases()["dtypes"]
    p = os.path.join(d, "typed_big.pth")
    fixtures.big_endian_archive(p, every)
    r = convert(p, p + ".ckpt")
    if ok(r.returncode == 0, f"item 14 typed big-endian: {r.stderr.strip()}"):
        for name, t in every.items():
            want = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
            ok(cat(p + ".ckpt", name) == want, f"item 14 typed big-endian {name}")
    # One big-endian untyped storage viewed with two swap units is ambiguous.
    p = os.path.join(d, "mixed_big.pth")
    raw = bytes(range(8))
    one = os.path.join(d, "one.pth")
    fixtures.v3_archive(one, {"a": ("uint16", [4], raw)})
    with zipfile.ZipFile(one) as z:
        src = z.read("archive/data.pkl")
    # The same storage key under a second name, as uint32.
    extra = src[src.index(b"}(") + 2:src.rindex(b"u.")]
    extra2 = extra.replace(_s("a"), _s("b"), 1).replace(_g("torch", "uint16"), _g("torch", "uint32"))
    extra2 = extra2.replace(_ints([4]) + _ints([1]), _ints([2]) + _ints([1]))
    pkl = src[:src.rindex(b"u.")] + extra2 + b"u."
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", raw)
        z.writestr("archive/byteorder", "big")
    r = convert(p, p + ".ckpt")
    ok(r.returncode == 1 and "byte" in r.stderr and "uint32" in r.stderr, f"item 14 mixed widths: {r.stderr.strip()}")
    # Little-endian, the same two views are fine.
    with zipfile.ZipFile(p + ".le.pth", "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", raw)
    r = convert(p + ".le.pth", p + ".le.ckpt")
    ok(r.returncode == 0, f"item 14: little-endian mixed views: {r.stderr.strip()}")
    # An unknown dtype is named as one.
    for bad in ("float33", "uint9", "int128", "float8_e3m4"):
        p = os.path.join(d, f"{bad}.pth")
        fixtures.v3_archive(p, {"w": (bad, [2], b"\0\0")})
        r = convert(p, p + ".ckpt")
        ok(r.returncode == 1 and f"unsupported dtype {bad}" in r.stderr and "forbidden" not in r.stderr,
           f"item 15: {bad}: {r.stderr.strip()}")
    # torch.<dtype> as a plain value in the tree, for the new ones too.
    p = os.path.join(d, "dtype_values.pth")
    pkl = b"\x80\x02}(" + b"".join(_s(n) + _g("torch", n) for n in ("uint3", "int7", "float4_e2m1fn_x2")) + b"u."
    fixtures.torch_like_zip(p, pkl)
    r = convert(p, p + ".ckpt")
    if ok(r.returncode == 0, f"item 15 dtype values: {r.stderr.strip()}"):
        got = json.loads(subprocess.check_output([CKPT, "get", p + ".ckpt", ""]))
        ok(got == {"uint3": "uint3", "int7": "int7", "float4_e2m1fn_x2": "float4_e2m1fn_x2"}, f"item 15: {got}")


# ---- item 16: trailing bytes after a zip ------------------------------------------------------

def test_trailing(tmp):
    d = os.path.join(tmp, "trailing")
    os.makedirs(d)
    obj = {"w": torch.randn(4), "n": 3}
    base = os.path.join(d, "base.pth")
    torch.save(obj, base)
    data = open(base, "rb").read()
    for name, tail in (("zeros", bytes(100)), ("junk", b"garbage\n" * 50),
                       ("fake_eocd", b"PK\x05\x06" + bytes(30)), ("one", b"\n")):
        p = write(os.path.join(d, f"{name}.pth"), data + tail)
        try:
            t = torch.load(p, weights_only=True)
            torch_reads = torch.equal(t["w"], obj["w"])
        except Exception:  # noqa: BLE001  (miniz takes the last signature)
            torch_reads = False
        ok(torch_reads or name == "fake_eocd", f"item 16: {name}: torch does not read it")
        # pth2ckpt reads every one (a stray signature after the archive is
        # not taken for its end record: its directory does not end there).
        r = convert(p, p + ".ckpt")
        if ok(r.returncode == 0, f"item 16: {name}: {r.stderr.strip()}"):
            ok(cat(p + ".ckpt", "w") == obj["w"].numpy().tobytes(), f"item 16: {name}: bytes")
    # Truncated and garbage-only files are still refused.
    p = write(os.path.join(d, "cut.pth"), data[:-30] + b"junk")
    r = convert(p, p + ".ckpt")
    ok(r.returncode == 1, f"item 16: a cut archive with junk converted: {r.stdout}")


def main():
    tmp = tempfile.mkdtemp(prefix="pth-hard-")
    try:
        hostile_dir = os.path.join(tmp, "hostile")
        os.makedirs(hostile_dir)
        hostile = [f for f, _ in fixtures.hostile(hostile_dir, os.path.join(tmp, "PWNED"))]
        test_directory_symlinks(tmp)
        test_bounds(tmp)
        test_dry_run(tmp, hostile)
        test_utf8(tmp)
        test_python2(tmp)
        test_allowlist(tmp)
        test_key_paths(tmp)
        test_no_crc(tmp)
        test_dtypes(tmp)
        test_trailing(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{P.passed} passed, {P.failed} failed")
    return 0 if P.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
