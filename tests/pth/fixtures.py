"""Fixtures for the pth2ckpt tests, made at test time by the installed torch.

make_cases() returns {name: object}; write_all(dir) saves each object in
every way torch.save can (zip with pickle protocols 2, 4 and 5, and the
legacy format) and adds re-zipped variants. hostile(dir) writes hand-made
archives that must be refused.
"""
import argparse
import collections
import io
import os
import pickle
import random
import struct
import zipfile

import numpy as np
import torch
import torch.package  # noqa: F401  (torch.package archives for refusal tests)


def make_cases():
    torch.manual_seed(0)
    cases = {}

    # A model's state_dict (OrderedDict with _metadata) and a full training
    # checkpoint: model, optimizer, scheduler, epoch, loss, RNG.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.ReLU(), torch.nn.Linear(3, 2))
    cases["state_dict"] = model.state_dict()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    cases["training"] = {
        "epoch": 2, "model_state": model.state_dict(),
        "optimizer_state": opt.state_dict(), "scheduler_state": sched.state_dict(),
        "loss": 0.123456789012345, "losses": [1.5, 0.75, float("nan"), float("inf")],
        "rng_state": torch.get_rng_state(), "np_rng": np.random.RandomState(1).get_state()[1][:8],
    }
    # GAN: two models and two optimizers in one file.
    g, d = torch.nn.Linear(5, 5), torch.nn.Linear(5, 1)
    og, od = torch.optim.SGD(g.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(d.parameters())
    for o, m in ((og, g), (od, d)):
        m(torch.randn(2, 5)).sum().backward()
        o.step()
    cases["gan"] = {"G": g.state_dict(), "D": d.state_dict(),
                    "optG": og.state_dict(), "optD": od.state_dict(), "step": 100}

    # Every dtype torch 1.13 can save.
    dtypes = [torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.int8,
              torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
              torch.complex64, torch.complex128]
    every = {}
    for dt in dtypes:
        if dt == torch.bool:
            t = torch.tensor([[True, False, True], [False, False, True]])
        elif dt.is_complex:
            t = torch.randn(2, 3, dtype=dt)
        elif dt.is_floating_point:
            t = torch.randn(2, 3).to(dt)
        else:
            t = torch.arange(-3, 3).view(2, 3).to(dt) if dt != torch.uint8 else torch.arange(6, dtype=dt).view(2, 3)
        every[str(dt).replace("torch.", "")] = t
    cases["dtypes"] = every
    # What torch 2.x adds: unsigned ints, float8 and float4 (torch 1.13 has
    # none of them; made from bytes: CPU kernels for most are missing).
    # Those this torch has (uint16/32/64: 2.3+; float8_e8m0fnu, float4: 2.7+).
    present = [n for n in TORCH2_DTYPES if isinstance(getattr(torch, n, None), torch.dtype)]
    if present:
        g = torch.Generator().manual_seed(5)
        every2 = {}
        for n in present:
            dt = getattr(torch, n)
            size = torch.empty(0, dtype=dt).element_size()
            raw = torch.randint(0, 256, (6 * size,), dtype=torch.uint8, generator=g)
            raw[:size] = 255  # NaN for the floats, the maximum for the uints
            every2[n] = raw.view(dt).view(2, 3)
            every2[n + "_t"] = every2[n].t()  # a view sharing its storage
        cases["dtypes2"] = every2

    # Shapes and views.
    base = torch.arange(24.0)
    tied = torch.nn.Parameter(torch.randn(3, 3))
    cases["views"] = {
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "slice_view": base[2:8].view(2, 3), "transposed": base.view(4, 6).t(),
        "expanded": torch.tensor([1.0, 2.0]).view(2, 1).expand(2, 5),
        "base": base, "tied_a": tied, "tied_b": tied,
        "strided": base.view(4, 6)[:, ::2],
        "param": torch.nn.Parameter(torch.ones(2)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "grad_tensor": torch.ones(3, requires_grad=True),
    }

    # Values and containers.
    ns = argparse.Namespace(lr=0.1, name="run", layers=[1, 2])
    cases["values"] = {
        "none": None, "t": True, "f": False, "int": -7, "big": 2 ** 100, "neg_big": -(2 ** 70),
        "float": 0.1, "neg_zero": -0.0, "complex": 1 + 2j, "str": "héllo / ~world",
        "bytes": b"\x00\xffabc", "empty_bytes": b"", "set": {3}, "frozen": frozenset(),
        "tuple": (1, "a", None), "nested": [[1, [2, [3]]], {"k": (4,)}],
        5: "int key", (1, 2): "tuple key", -1: [], "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1), "cpu": torch.device("cpu"),
        "size": torch.Size([2, 3]), "args": ns, "slice": slice(1, 5, 2),
    }
    cases["numpy"] = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "bigendian": np.arange(4, dtype=">i4"),
        "scalar_f": np.float64(2.5), "scalar_i": np.int64(-3), "b": np.array([True, False]),
        "u8": np.arange(3, dtype=np.uint8), "c": np.array([1 + 1j], dtype=np.complex64),
    }
    cases["many"] = {f"k{i}": i for i in range(1500)}  # SETITEMS batches, LONG_BINPUT
    cases["many_tensors"] = [torch.full((2,), float(i)) for i in range(300)]  # > 256 memo
    cases["top_list"] = [torch.ones(2), {"a": torch.zeros(1)}]
    cases["top_tensor"] = torch.arange(5, dtype=torch.int32)
    return cases


# The dtypes torch 2.x can save that torch 1.13 cannot (make_cases' "dtypes2").
TORCH2_DTYPES = ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"]

# (suffix, torch.save keyword arguments)
MODES = [("zip_p2", {}), ("zip_p1", {"pickle_protocol": 1}), ("zip_p4", {"pickle_protocol": 4}), ("zip_p5", {"pickle_protocol": 5}),
         ("legacy", {"_use_new_zipfile_serialization": False}),
         ("legacy_p4", {"_use_new_zipfile_serialization": False, "pickle_protocol": 4})]


# torch >= 2.5's save options (torch.utils.serialization.config.save):
# (suffix, {option: value}); for the cases in CONFIG_CASES.
CONFIG_MODES = [("align1", {"storage_alignment": 1}), ("align4096", {"storage_alignment": 4096}),
                ("nocrc", {"compute_crc32": False}),
                ("nocrc_align8", {"compute_crc32": False, "storage_alignment": 8})]
CONFIG_CASES = ("state_dict", "training", "dtypes", "dtypes2", "views", "top_tensor")


def save_with_config(obj, path, options):
    """torch.save with torch.utils.serialization.config.save options set,
    restored afterwards. False when this torch has no such config."""
    try:
        import torch.utils.serialization.config as cfg
    except ImportError:
        return False
    old = {k: getattr(cfg.save, k) for k in options}
    try:
        for k, v in options.items():
            setattr(cfg.save, k, v)
        torch.save(obj, path)
    finally:
        for k, v in old.items():
            setattr(cfg.save, k, v)
    return True


def rezip(src, dst, method, reverse):
    """Re-zips a torch archive as other tools do: another order, deflate or
    no alignment padding."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", method) as zout:
        infos = zin.infolist()
        for info in (reversed(infos) if reverse else infos):
            zout.writestr(info.filename, zin.read(info.filename))


def on_cuda1(obj, path):
    """Saves as if the storages lived on cuda:1 (no GPU needed)."""
    import torch.serialization as ser
    old = ser.location_tag
    ser.location_tag = lambda storage: "cuda:1"
    try:
        torch.save(obj, path)
    finally:
        ser.location_tag = old


def write_all(out):
    """Writes every case in every mode; returns [(file, case name)]."""
    files = []
    for name, obj in make_cases().items():
        for mode, kw in MODES:
            p = os.path.join(out, f"{name}.{mode}.pth")
            torch.save(obj, p, **kw)
            files.append((p, name))
        for mode, options in CONFIG_MODES if name in CONFIG_CASES else ():
            p = os.path.join(out, f"{name}.{mode}.pth")
            if save_with_config(obj, p, options):
                files.append((p, name))
    src = os.path.join(out, "training.zip_p2.pth")
    for suffix, method, rev in (("deflate", zipfile.ZIP_DEFLATED, True),
                                ("stored_unaligned", zipfile.ZIP_STORED, False)):
        p = os.path.join(out, f"training.{suffix}.pth")
        rezip(src, p, method, rev)
        files.append((p, "training"))
    p = os.path.join(out, "views.cuda1.pth")
    on_cuda1(make_cases()["views"], p)
    files.append((p, "views"))
    # Folder names torch derives from the file name, and archive/ from BytesIO.
    buf = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buf)
    p = os.path.join(out, "bytesio.archive.pth")
    with open(p, "wb") as f:
        f.write(buf.getvalue())
    files.append((p, None))
    p = os.path.join(out, "model.v1.pt")
    torch.save({"x": torch.ones(2)}, p)
    files.append((p, None))
    return files


# ---- hostile inputs ----------------------------------------------------------------

class Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def torch_like_zip(path, pkl, records=None, prefix="archive"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        for k, v in (records or {}).items():
            z.writestr(f"{prefix}/data/{k}", v)
        z.writestr(f"{prefix}/version", "3\n")


def hostile(out, marker):
    """Writes files that must be refused; returns [(file, expected text)]."""
    cases = []

    def add(name, data, expect):
        p = os.path.join(out, name)
        with open(p, "wb") as f:
            f.write(data)
        cases.append((p, expect))

    def addzip(name, pkl, expect, records=None):
        p = os.path.join(out, name)
        torch_like_zip(p, pkl, records)
        cases.append((p, expect))

    sh = f"touch {marker}"
    addzip("os_system_p2.pth", pickle.dumps(Evil(os.system, (sh,)), protocol=2),
           "forbidden global 'posix system'")
    addzip("os_system_p4.pth", pickle.dumps(Evil(os.system, (sh,)), protocol=4),
           "forbidden global 'posix system'")
    addzip("nested_eval.pth", pickle.dumps({"model": {"w": [1, Evil(eval, ("1+1",))]}}, protocol=2),
           "forbidden global 'builtins eval'")
    addzip("getattr.pth", pickle.dumps(Evil(getattr, ("text", "upper")), protocol=2),
           "forbidden global 'builtins getattr'")
    # STACK_GLOBAL with a non-string operand.
    addzip("stack_global_int.pth", b"\x80\x04K\x01K\x02\x93.", "STACK_GLOBAL operands are not strings")
    # Opcodes never allowed.
    addzip("inst.pth", b"\x80\x02(ios\nsystem\nX\x02\x00\x00\x00lsb.", "INST")
    # Hostile lengths and memo.
    addzip("huge_unicode.pth", b"\x80\x04\x8d" + struct.pack("<Q", 2 ** 63) + b"abc",
           "truncated pickle")
    addzip("huge_long.pth", b"\x80\x02\x8b" + struct.pack("<i", 2 ** 30) + b"\x00" * 8,
           "bytes (limit 64)")
    addzip("unset_memo.pth", b"\x80\x02h\x07.", "memo index 7 was never set")
    addzip("deep_marks.pth", b"\x80\x02" + b"(" * 100000 + b".", "too many nested MARKs")
    lst = []
    lst.append(lst)
    addzip("self_list.pth", pickle.dumps(lst, protocol=2), "contains itself")
    addzip("no_stop.pth", b"\x80\x02]q\x00", "no STOP")
    # Lists nested 300,000 deep (each new list put in the previous, the
    # stack popped, one memo slot reused): must be refused without a
    # recursive walk or destructor overflowing the stack.
    deep = b"\x80\x02]q\x00" + b"h\x00]q\x00a0" * 300000 + b"."
    addzip("deep_lists.pth", deep, "nested deeper than 1000")
    # Tensor checks: a storage shorter than its tensor needs, a record that
    # is shorter than its storage, a missing record.
    good = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, good)
    with zipfile.ZipFile(io.BytesIO(good.getvalue())) as z:
        pkl = z.read("archive/data.pkl")
        data = z.read("archive/data/0")
    addzip("record_short.pth", pkl, "truncated", {"0": data[:-4]})
    addzip("record_missing.pth", pkl, "has no record")
    view = io.BytesIO()
    torch.save({"w": torch.arange(6.0)[2:]}, view)
    with zipfile.ZipFile(io.BytesIO(view.getvalue())) as z:
        vpkl = z.read("archive/data.pkl")
    # Same pickle, but its storage claims 2 elements: the view overruns it.
    addzip("view_past_storage.pth", vpkl.replace(b"K\x06t", b"K\x02t"), "view needs",
           {"0": data[:8]})
    # CRC mismatch in a stored record.
    bad = bytearray(good.getvalue())
    i = bytes(bad).find(data)
    bad[i + 5] ^= 0xFF
    add("crc.pth", bytes(bad), "CRC-32 mismatch")
    add("truncated.pth", good.getvalue()[: len(good.getvalue()) // 2], "zip")
    # Whole model, TorchScript, torch.package-like, random zip, tar, noise.
    m = torch.nn.Linear(2, 2)
    buf = io.BytesIO()
    torch.save(m, buf)
    add("whole_module.pth", buf.getvalue(), "state_dict")
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(m), buf)
    add("torchscript.pth", buf.getvalue(), "TorchScript")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    add("random.zip.pth", zbuf.getvalue(), "not a torch.save checkpoint")
    tar = bytearray(1024)
    tar[257:262] = b"ustar"
    add("old.tar.pth", bytes(tar), "tar checkpoint")
    noise = random.Random(0).randbytes(2048).replace(b"PK", b"pk").replace(b"\x80", b"\x81")
    add("noise.pth", noise,
        "not a torch.save file")
    add("empty.pth", b"", "not a torch.save file")
    p0 = io.BytesIO()
    torch.save({"w": torch.ones(2)}, p0, pickle_protocol=0)
    add("protocol0.pth", p0.getvalue(), "protocol 0")
    # A torch.package archive.
    pk = os.path.join(out, "package.pth")
    with torch.package.PackageExporter(pk) as exp:
        exp.save_pickle("res", "obj.pkl", {"a": 1})
    cases.append((pk, "torch.package"))
    # Unknown byteorder, and a dtype name torch does not have.
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin:
        prefix = zin.namelist()[0].split("/")[0]
        entries = {n: zin.read(n) for n in zin.namelist()}
    p = os.path.join(out, "byteorder_odd.pth")
    # torch >= 1.13.1 writes a byteorder record itself: replace it, so the
    # archive has one (an odd one), not two.
    entries[f"{prefix}/byteorder"] = b"middle"
    with zipfile.ZipFile(p, "w") as z:
        for n, v in entries.items():
            z.writestr(n, v)
    cases.append((p, "unknown byteorder"))
    p = os.path.join(out, "bad_dtype.pth")
    v3_archive(p, {"w": ("float33", [2], b"\0\0")})
    cases.append((p, "unsupported dtype float33"))
    return cases


# ---- hand-made archives for what torch 1.13 cannot write --------------------------

def _g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(x):
    b = x.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n):
    return b"J" + struct.pack("<i", n)


def _ints(v):
    return b"(" + b"".join(_i(x) for x in v) + b"t"


def v3_archive(path, tensors):
    """A zip like newer torch writes for dtypes without a storage class:
    UntypedStorage persistent ids and _rebuild_tensor_v3 with a dtype
    argument. `tensors`: {name: (dtype name, shape, raw bytes)}."""
    pkl = b"\x80\x02}("
    records = {}
    for k, (name, (dtype, shape, raw)) in enumerate(tensors.items()):
        key = str(k)
        records[key] = raw
        strides, acc = [], 1
        for d in reversed(shape):
            strides.insert(0, acc)
            acc *= d
        pid = b"(" + _s("storage") + _g("torch.storage", "UntypedStorage") + _s(key) + _s("cpu") + _i(len(raw)) + b"t"
        pkl += (_s(name) + _g("torch._utils", "_rebuild_tensor_v3") + b"(" + pid + b"Q" + _i(0) +
                _ints(shape) + _ints(strides) + b"\x89" + _g("collections", "OrderedDict") + b")R" +
                _g("torch", dtype) + b"tR")
    pkl += b"u."
    torch_like_zip(path, pkl, records)


def swap_elements(raw, width):
    return b"".join(raw[i:i + width][::-1] for i in range(0, len(raw), width))


def big_endian_archive(path, tensors):
    """Re-writes torch.save(tensors) with a `byteorder` record of `big` and
    every element byte-swapped, as a big-endian host would have saved it."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin:
        names = zin.namelist()
        prefix = names[0].split("/")[0]
        pkl = zin.read(f"{prefix}/data.pkl")
        keys = {}
        # Storage keys in first-seen order follow the dict order here.
        for k, t in enumerate(tensors.values()):
            width = t.element_size() // (2 if t.is_complex() else 1)
            keys[str(k)] = swap_elements(zin.read(f"{prefix}/data/{k}"), width)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "big")
        for k, v in keys.items():
            z.writestr(f"{prefix}/data/{k}", v)
        z.writestr(f"{prefix}/version", "3\n")
