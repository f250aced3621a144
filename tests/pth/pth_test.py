#!/usr/bin/env python3
"""End-to-end tests of pth2ckpt against torch.load.

Makes fixtures with the installed torch (tests/pth/fixtures.py), converts
each with pth2ckpt, and compares every tensor (bytes, dtype, shape, strides,
storage sharing, requires_grad, Parameter) and every value with what
torch.load returns, reading the ckpt file through the `ckpt` tool only.
Then checks that hostile files are refused with the expected reason, leave
no output and no temporary, and run nothing.

usage: pth_test.py BUILD_DIR   (exit 77 = skipped: torch not importable)
"""
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
except ImportError as e:  # CTest reports exit 77 as skipped
    print(f"SKIP: torch/numpy not importable here ({e}); run with Debian's /usr/bin/python3")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # noqa: E402

BUILD = sys.argv[1]
CKPT = os.path.join(BUILD, "ckpt")
PTH2CKPT = os.path.join(BUILD, "pth2ckpt")
passed, failed = 0, 0


def ok(cond, msg):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", msg)
    return cond


def key_form(k):
    """docs/FORMAT.md 7.3: the path form of a dict key."""
    if isinstance(k, bool):
        return "True" if k else "False"
    if isinstance(k, str):
        return k
    if isinstance(k, int):
        return str(k)
    if k is None:
        return "None"
    if isinstance(k, tuple):
        inner = ",".join(key_form(x) for x in k)
        return "(" + inner + ("," if len(k) == 1 else "") + ")"
    raise TypeError(k)


def esc(seg):
    return seg.replace("~", "~0").replace("/", "~1")


NP_KINDS = {"f": "float", "i": "int", "u": "uint", "c": "complex"}


def np_dtype_name(dt):
    if dt.kind == "b":
        return "bool"
    return f"{NP_KINDS[dt.kind]}{dt.itemsize * 8}"


def raw_bytes(t):
    """A tensor's elements as bytes, row-major, for every dtype (numpy has
    no bfloat16, float8 or float4; torch 2.x's uint16/32/64 .numpy() is not
    in torch 1.13)."""
    c = t.detach().contiguous().reshape(-1)
    if not c.numel():
        return b""
    if c.dtype == torch.bfloat16:
        c = c.view(torch.int16)
    elif str(c.dtype).replace("torch.", "") in fixtures.TORCH2_DTYPES:
        c = c.view(torch.uint8)
    return c.numpy().tobytes()


# Where torch.load(weights_only=True), the reference reader, cannot read a
# fixture, and why: weights_only=False is used for these only. A file not
# named here must be read with weights_only=True.
def weights_only_gap(case, mode):
    if mode == "zip_p1":
        return "protocol 1's INT/BININT opcodes are not in torch's weights-only unpickler"
    if mode.endswith(("_p4", "_p5")):
        return "protocol 4+ FRAME opcodes are not in torch's weights-only unpickler"
    if case in ("numpy", "training"):  # training holds np_rng, a numpy array
        return "numpy arrays are not on torch's weights_only allowlist"
    if case == "values":
        return "argparse.Namespace, slice, frozenset and bytes() are not on the allowlist"
    if case in ("gan", "training") and int(torch.__version__.split(".")[0]) < 2:
        return "torch 1.13's weights-only unpickler has no BINFLOAT (optimizer floats)"
    if case == "dtypes2" and mode.startswith("legacy"):
        return "torch 2.x cannot read back its legacy-format files of these dtypes"
    return None


REFERENCE = {"weights_only": 0, "fallback": 0}


def reference(f, case, cases):
    """What torch.load gives for fixture f: weights_only=True wherever it
    reads the file, else weights_only=False (or the saved object itself,
    where torch cannot read its own file), for the reasons above."""
    mode = os.path.basename(f).split(".")[-2]
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
        REFERENCE["weights_only"] += 1
        return obj
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
        why = weights_only_gap(case, mode) if case else None
        ok(why is not None, f"{os.path.basename(f)}: torch.load(weights_only=True) refused it: "
           f"{str(e).strip().splitlines()[0][:200]}")
        REFERENCE["fallback"] += 1
    try:
        return torch.load(f, map_location="cpu", weights_only=False)  # our own fixtures
    except AttributeError:  # 'UntypedStorage' has no attribute 'dtype'
        ok(case == "dtypes2", f"{os.path.basename(f)}: torch.load cannot read it")
        return cases[case]


class Checker:
    def __init__(self, path):
        self.path = path
        self.info = json.loads(subprocess.check_output([CKPT, "inspect", "--json", path]))
        self.tensors = {t["path"]: t for t in self.info["tensors"]}
        self.seen_storage = {}  # torch storage ptr -> ckpt storage id
        self.where = os.path.basename(path)

    def cat(self, tpath):
        return subprocess.check_output([CKPT, "cat", self.path, tpath])

    def tensor(self, t, j, path):
        if not ok(isinstance(j, dict) and j.get("$tensor") == path,
                  f"{self.where}:{path}: expected a tensor, got {str(j)[:80]}"):
            return
        info = self.tensors[path]
        want_dtype = str(t.dtype).replace("torch.", "")
        ok(info["dtype"] == want_dtype, f"{self.where}:{path}: dtype {info['dtype']} != {want_dtype}")
        ok(info["shape"] == list(t.shape), f"{self.where}:{path}: shape")
        ok(info["strides"] == list(t.stride()), f"{self.where}:{path}: strides {info['strides']} != {list(t.stride())}")
        ok(info["offset"] == t.storage_offset(), f"{self.where}:{path}: storage offset")
        ok(info["requires_grad"] == t.requires_grad, f"{self.where}:{path}: requires_grad")
        ok(info["is_parameter"] == isinstance(t, torch.nn.Parameter), f"{self.where}:{path}: Parameter")
        want = raw_bytes(t)
        ok(self.cat(path) == want, f"{self.where}:{path}: bytes differ")
        # Storage sharing: same torch storage <-> same ckpt storage id.
        ptr = t.storage().data_ptr() if t.storage().size() else ("empty", path)
        sid = info["storage"]
        if ptr in self.seen_storage:
            ok(self.seen_storage[ptr] == sid, f"{self.where}:{path}: shared storage not shared")
        else:
            ok(sid not in self.seen_storage.values(), f"{self.where}:{path}: storage wrongly shared")
            self.seen_storage[ptr] = sid

    def numpy(self, a, j, path):
        if not ok(isinstance(j, dict) and j.get("$tensor") == path, f"{self.where}:{path}: numpy not a tensor"):
            return
        info = self.tensors[path]
        ok(info["dtype"] == np_dtype_name(a.dtype), f"{self.where}:{path}: numpy dtype {info['dtype']}")
        ok(info["shape"] == list(a.shape), f"{self.where}:{path}: numpy shape")
        want = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
        ok(self.cat(path) == want, f"{self.where}:{path}: numpy bytes differ")

    def value(self, v, j, path, root=False):
        def child(seg):
            return esc(seg) if root else path + "/" + esc(seg)
        if isinstance(v, torch.Tensor):
            return self.tensor(v, j, path)
        if isinstance(v, np.ndarray):
            return self.numpy(v, j, path)
        if isinstance(v, (np.floating, np.integer, np.bool_)):
            v = v.item()
        if isinstance(v, bool) or v is None:
            return ok(j is v, f"{self.where}:{path}: {j!r} != {v!r}")
        if isinstance(v, int):
            return ok(type(j) is int and j == v, f"{self.where}:{path}: {j!r} != {v!r}")
        if isinstance(v, float):
            same = (math.isnan(v) and isinstance(j, float) and math.isnan(j)) or (
                j == v and math.copysign(1, j) == math.copysign(1, v))
            return ok(isinstance(j, float) and same, f"{self.where}:{path}: {j!r} != {v!r}")
        if isinstance(v, complex):
            return ok(j == {"$complex": [v.real, v.imag]}, f"{self.where}:{path}: complex")
        if isinstance(v, str):
            return ok(j == v, f"{self.where}:{path}: {j!r} != {v!r}")
        if isinstance(v, (bytes, bytearray)):
            return ok(j == {"$bytes": bytes(v).hex()}, f"{self.where}:{path}: bytes")
        if isinstance(v, torch.dtype):
            return ok(j == str(v).replace("torch.", ""), f"{self.where}:{path}: dtype value")
        if isinstance(v, torch.device):
            want = v.type + (f":{v.index}" if v.index is not None else "")
            return ok(j == want, f"{self.where}:{path}: device {j} != {want}")
        if isinstance(v, slice):
            v = (v.start, v.stop, v.step)
        if hasattr(v, "__dict__") and type(v).__name__ == "Namespace":
            v = vars(v)
        if isinstance(v, dict):
            if not ok(isinstance(j, dict) and list(j) == [key_form(k) for k in v],
                      f"{self.where}:{path}: dict keys {list(j)[:5] if isinstance(j, dict) else j}"):
                return
            for k, x in v.items():
                self.value(x, j[key_form(k)], child(key_form(k)))
            return
        if isinstance(v, (set, frozenset)):
            return ok(isinstance(j, list) and sorted(map(repr, j)) == sorted(map(repr, v)),
                      f"{self.where}:{path}: set")
        if isinstance(v, (list, tuple)):
            if not ok(isinstance(j, list) and len(j) == len(v), f"{self.where}:{path}: sequence length"):
                return
            for i, (x, y) in enumerate(zip(v, j)):
                self.value(x, y, child(str(i)))
            return
        ok(False, f"{self.where}:{path}: unhandled type {type(v)}")


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def main():
    tmp = tempfile.mkdtemp(prefix="pth-test-")
    src = os.path.join(tmp, "in")
    out = os.path.join(tmp, "out")
    os.makedirs(src)
    os.makedirs(out)
    files = fixtures.write_all(src)
    cases = fixtures.make_cases()
    missing = [n for n in fixtures.TORCH2_DTYPES if n not in cases.get("dtypes2", {})]
    if missing:
        print(f"SKIP (torch {torch.__version__}): no fixtures of {', '.join(missing)} "
              "(torch 2.x dtypes this torch lacks)")
    if not any(".nocrc." in f for f, _ in files):
        print(f"SKIP (torch {torch.__version__}): the storage_alignment and compute_crc32 "
              "fixtures need torch >= 2.5")
    for f, case in files:
        dst = os.path.join(out, os.path.basename(f) + ".ckpt")
        r = run([PTH2CKPT, f, dst])
        if not ok(r.returncode == 0, f"{os.path.basename(f)}: pth2ckpt failed: {r.stderr.strip()}"):
            continue
        ok(run([CKPT, "verify", dst]).returncode == 0, f"{dst}: ckpt verify")
        obj = reference(f, case, cases)
        Checker(dst).value(obj, json.loads(subprocess.check_output([CKPT, "get", dst, ""])), "", root=True)
        if case == "views" and "cuda1" in f:
            devs = {s["device"] for s in Checker(dst).info["storages"]}
            ok(devs == {"cuda:1"}, f"{f}: saved devices {devs}")
    print(f"reference: torch.load(weights_only=True) for {REFERENCE['weights_only']} files, "
          f"weights_only=False for {REFERENCE['fallback']}")
    ok(REFERENCE["weights_only"] >= 15, "too few fixtures read with weights_only=True")
    # Dtypes torch 1.13 cannot save, as newer torch writes them
    # (UntypedStorage + _rebuild_tensor_v3).
    v3 = {"f8a": ("float8_e4m3fn", [2, 2], bytes(range(4))),
          "f8b": ("float8_e5m2", [3], bytes([1, 2, 3])),
          "u16": ("uint16", [2], struct.pack("<2H", 1, 65535)),
          "u32": ("uint32", [1], struct.pack("<I", 4000000000)),
          "u64": ("uint64", [1], struct.pack("<Q", 2 ** 64 - 1)),
          "c32": ("complex32", [1], b"\x00\x3c\x00\xc0")}
    special = os.path.join(tmp, "special")
    os.makedirs(special)
    f = os.path.join(special, "v3_dtypes.pth")
    fixtures.v3_archive(f, v3)
    dst = f + ".ckpt"
    r = run([PTH2CKPT, f, dst])
    if ok(r.returncode == 0, f"v3 dtypes: {r.stderr}"):
        c = Checker(dst)
        for name, (dt, shape, raw) in v3.items():
            t = c.tensors.get(name, {})
            ok(t.get("dtype") == dt and t.get("shape") == shape, f"v3 {name}: {t}")
            ok(c.cat(name) == raw, f"v3 {name}: bytes")
    # A big-endian archive (byteorder record), 1-byte and complex dtypes too.
    be = {"f": torch.randn(3), "c": torch.randn(2, dtype=torch.complex64), "i": torch.arange(-2, 2, dtype=torch.int16),
          "u": torch.arange(5, dtype=torch.uint8), "d": torch.randn(2, dtype=torch.float64),
          "h": torch.randn(2).to(torch.bfloat16)}
    f = os.path.join(special, "big_endian.pth")
    fixtures.big_endian_archive(f, be)
    dst = f + ".ckpt"
    r = run([PTH2CKPT, f, dst])
    if ok(r.returncode == 0, f"big-endian: {r.stderr}"):
        c = Checker(dst)
        for name, t in be.items():
            want = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
            ok(c.cat(name) == want, f"big-endian {name}: bytes not swapped back")
    # Determinism: the same input converts to the same bytes.
    f0 = files[0][0]
    a, b = os.path.join(tmp, "a.ckpt"), os.path.join(tmp, "b.ckpt")
    run([PTH2CKPT, f0, a])
    run([PTH2CKPT, f0, b])
    ok(open(a, "rb").read() == open(b, "rb").read(), "conversion is not deterministic")
    # Dry run, ckpt import, directory mode.
    r = run([PTH2CKPT, "--dry-run", f0])
    ok(r.returncode == 0 and "would convert" in r.stdout, f"--dry-run: {r.stdout}{r.stderr}")
    r = run([CKPT, "import", f0, os.path.join(tmp, "imp.ckpt")])
    ok(r.returncode == 0 and os.path.exists(os.path.join(tmp, "imp.ckpt")), f"ckpt import: {r.stderr}")
    r = run([PTH2CKPT, src, os.path.join(tmp, "tree")])
    ok(r.returncode == 0 and f"converted {len(files)} of {len(files)}" in r.stdout,
       f"directory mode: {r.stdout[-300:]}{r.stderr}")
    ok(run([PTH2CKPT]).returncode == 2, "no arguments should be a usage error")
    ok(run([PTH2CKPT, "--help"]).returncode == 0, "--help")

    # Hostile inputs: refused, with the reason, nothing left, nothing run.
    bad = os.path.join(tmp, "bad")
    os.makedirs(bad)
    marker = os.path.join(tmp, "PWNED")
    cases = fixtures.hostile(bad, marker)
    victim = os.path.join(tmp, "victim")
    os.makedirs(victim)
    for f, expect in cases:
        dst = os.path.join(victim, "out.ckpt")
        r = run([PTH2CKPT, f, dst], timeout=60)
        name = os.path.basename(f)
        ok(r.returncode == 1, f"{name}: exit {r.returncode}, want 1 ({r.stderr.strip()})")
        ok(expect in r.stderr, f"{name}: stderr lacks '{expect}': {r.stderr.strip()}")
        ok(r.stderr.count("\n") == 1, f"{name}: want one line on stderr: {r.stderr!r}")
        ok(os.listdir(victim) == [], f"{name}: left {os.listdir(victim)}")
        r2 = run([PTH2CKPT, "--dry-run", f], timeout=60)
        ok(r2.returncode == 1, f"{name}: --dry-run accepted it")
    # Truncation at every length of a small archive (zip and legacy):
    # always refused, never a crash, never an output. (400 lengths a file,
    # a process each; 100 in sanitized builds, where each process starts
    # slowly and libFuzzer's pth_fuzz covers truncations in-process.)
    points = 100 if os.environ.get("CKPT_SANITIZED") == "1" else 400
    for f in (os.path.join(src, "state_dict.zip_p2.pth"), os.path.join(src, "state_dict.legacy.pth")):
        data = open(f, "rb").read()
        cut = os.path.join(tmp, "cut.pth")
        step = max(1, len(data) // points)
        for n in list(range(0, len(data), step)) + [len(data) - 1]:
            with open(cut, "wb") as g:
                g.write(data[:n])
            dst = os.path.join(victim, "out.ckpt")
            r = run([PTH2CKPT, cut, dst], timeout=60)
            ok(r.returncode == 1 and not os.path.exists(dst) and r.stderr.startswith("pth2ckpt: refused"),
               f"{os.path.basename(f)} cut at {n}: exit {r.returncode} {r.stderr.strip()}")
    # An existing output survives a refused conversion untouched.
    keep = os.path.join(victim, "keep.ckpt")
    run([PTH2CKPT, f0, keep])
    before = open(keep, "rb").read()
    run([PTH2CKPT, cases[0][0], keep])
    ok(open(keep, "rb").read() == before, "a refused conversion changed an existing output")
    ok(not os.path.exists(marker), "hostile pickle ran code")
    r = run([PTH2CKPT, bad, os.path.join(tmp, "badtree")])
    ok(r.returncode == 1 and f"refused {len(cases)}:" in r.stdout, f"directory summary: {r.stdout[-400:]}")

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"pth: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
