"""ckpt.save / ckpt.load / ckpt.open: fidelity, errors, atomicity."""
import argparse
import builtins
import collections
import os
import subprocess
import sys
import unittest

import numpy as np
import torch

import ckpt
from ckpt import _ckpt
from util import TempDirCase, assert_same, python_env


def every_dtype():
    g = torch.Generator().manual_seed(1)
    out = {}
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        out[str(dt)] = torch.randn(3, 5, generator=g).to(dt)
    out["complex64"] = torch.randn(4, dtype=torch.complex64, generator=g)
    out["complex128"] = torch.randn(4, dtype=torch.complex128, generator=g)
    out["complex32"] = torch.randn(4, dtype=torch.complex64, generator=g).to(torch.complex32)
    for dt in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        out[str(dt)] = torch.randint(-100 if dt != torch.uint8 else 0, 100, (7,), dtype=dt, generator=g)
    out["bool"] = torch.rand(9, generator=g) > 0.5
    for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
        dt = getattr(torch, name, None)
        if dt is not None:
            # torch 2.x has no CPU arange for uint16/32/64: make, then cast.
            out[name] = torch.arange(6).to(dt)
    return out


class RoundTrip(TempDirCase):
    def roundtrip(self, obj, **load_kw):
        p = self.path("x.ckpt")
        ckpt.save(obj, p)
        back = ckpt.load(p, **load_kw)
        assert_same(self, obj, back)
        return back

    def test_every_dtype(self):
        self.roundtrip(every_dtype())
        self.roundtrip(every_dtype(), mmap=True)

    def test_layouts_views_and_sharing(self):
        base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
        obj = {
            "base": base,
            "t": base.t(),                       # transposed view
            "cols": base[:, 2:7:2],              # strided, offset
            "row": base[3],                      # offset into the storage
            "as_int": base.view(torch.int32),    # same bytes, other dtype
            "expanded": torch.ones(1, 4).expand(3, 4),  # stride 0
            "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 3),
            "neg": torch.tensor([1.0, -0.0, float("nan"), float("inf")]),
        }
        back = self.roundtrip(obj)
        # Shared storages are shared again: one write shows through all views.
        self.assertEqual(back["t"].storage().data_ptr(), back["base"].storage().data_ptr())
        back["base"][3, 4] = 1000
        self.assertEqual(back["t"][4, 3].item(), 1000)
        self.assertEqual(back["row"][4].item(), 1000)
        # Stored once: the file holds one copy of the 240-byte storage.
        with ckpt.open(self.path("x.ckpt")) as f:
            self.assertEqual(len(f._cpu.storages), 5)

    def test_parameters_and_requires_grad(self):
        lin = torch.nn.Linear(3, 2)
        lin.bias.requires_grad_(False)
        x = torch.randn(2, requires_grad=True)
        back = self.roundtrip({"w": lin.weight, "b": lin.bias, "x": x, "sd": lin.state_dict()})
        self.assertIsInstance(back["w"], torch.nn.Parameter)
        self.assertTrue(back["w"].requires_grad)
        self.assertFalse(back["b"].requires_grad)
        self.assertTrue(back["x"].requires_grad and back["x"].is_leaf)
        self.assertIs(type(back["sd"]), collections.OrderedDict)

    def test_python_values(self):
        obj = {
            "none": None, "t": True, "f": False, "int": -5, "big": 2**200, "nbig": -(2**64),
            "i64max": 2**63 - 1, "i64min": -(2**63), "float": 0.1, "negzero": -0.0,
            "nan": float("nan"), "inf": -float("inf"), "complex": 1.5 - 2j, "str": "héllo ✓",
            "bytes": b"\x00\xff", "list": [1, [2, [3]]], "tuple": (1, ("a",)), "empty": {},
            "set": {1, 2, 3}, "frozenset": frozenset({"a"}), "dtype": torch.bfloat16,
            "device": torch.device("cuda", 1), "cpu": torch.device("cpu"),
            7: "int key", -1: "negative key", (1, "a"): "tuple key", 2.5: "float key",
            None: "none key", True: "bool key", torch.float16: "dtype key", b"k": "bytes key",
            "od": collections.OrderedDict([("b", 1), ("a", 2)]),
            "ns": argparse.Namespace(lr=0.1, name="run"),
        }
        back = self.roundtrip(obj)
        self.assertEqual(back["set"], {1, 2, 3})
        self.assertIs(type(back["ns"]), argparse.Namespace)

    def test_numpy_arrays_and_scalars(self):
        arrays = {str(d): np.arange(12).astype(d).reshape(3, 4) for d in
                  ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
                   "uint64", "float16", "float32", "float64", "complex64", "complex128")}
        arrays["fortran"] = np.asfortranarray(np.arange(12.0).reshape(3, 4))
        arrays["strided"] = np.arange(20)[::3]
        arrays["zero_d"] = np.array(3.5)
        back = self.roundtrip(arrays)
        self.assertTrue(back["fortran"].flags.f_contiguous)
        big = np.arange(5, dtype=">i4")
        p = self.path("be.ckpt")
        ckpt.save({"be": big, "np_scalar": np.float32(1.5), "np_int": np.int64(7)}, p)
        out = ckpt.load(p)
        np.testing.assert_array_equal(out["be"], big)
        self.assertEqual(out["be"].dtype, np.dtype("<i4"))
        self.assertEqual((out["np_scalar"], out["np_int"]), (1.5, 7))

    def test_mmap_views_are_private(self):
        p = self.path("m.ckpt")
        w = torch.arange(1000, dtype=torch.float32)
        ckpt.save({"w": w}, p)
        a = ckpt.load(p, mmap=True)["w"]
        a[0] = -1  # writable, changes only this process's pages
        self.assertEqual(ckpt.load(p)["w"][0].item(), 0)
        with ckpt.open(p) as f:
            f.verify()
            v = f["w"]
        v[1] = -1  # still valid after close
        self.assertEqual(ckpt.load(p, mmap=True)["w"][1].item(), 1)

    def test_copies_are_independent(self):
        p = self.path("c.ckpt")
        ckpt.save({"w": torch.zeros(4)}, p)
        a = ckpt.load(p)["w"]
        a += 1
        self.assertEqual(ckpt.load(p)["w"].sum().item(), 0)

    def test_large_multi_piece_storage(self):
        # Over the 8 MiB piece size of the parallel copy.
        w = torch.randn(5_000_000)
        self.roundtrip({"w": w, "v": w[1:]})

    def test_top_level_tensor_and_list(self):
        self.roundtrip(torch.arange(3))
        self.roundtrip([torch.ones(2), 3])


class Streams(TempDirCase):
    def test_bytesio_and_open_files(self):
        import io
        obj = {"w": torch.randn(3, 4), "n": np.arange(3), "e": 2, "t": (1, "a")}
        buf = io.BytesIO()
        ckpt.save(obj, buf, metadata={"k": "v"})
        self.assertNoTemporaries()
        buf.seek(0)
        back = ckpt.load(buf)
        assert_same(self, obj, back)
        back["w"][0, 0] = 100  # a copy: the bytes are not touched
        buf.seek(0)
        self.assertNotEqual(ckpt.load(buf)["w"][0, 0].item(), 100)
        with open(self.path("f.ckpt"), "wb") as f:
            ckpt.save(obj, f)
        with open(self.path("f.ckpt"), "rb") as f:
            assert_same(self, obj, ckpt.load(f, map_location="cpu", verify=True))
        # .pth bytes in a stream go through the restricted importer too.
        pbuf = io.BytesIO()
        torch.save(obj, pbuf)
        pbuf.seek(0)
        assert_same(self, obj, ckpt.load(pbuf))
        with self.assertRaises(ckpt.FormatError):
            ckpt.load(io.BytesIO(b"not a checkpoint at all"))
        bad = bytearray(buf.getvalue())
        bad[-30] ^= 1
        with self.assertRaises(ckpt.CkptError):
            ckpt.load(io.BytesIO(bytes(bad)))


class MapLocation(TempDirCase):
    def setUp(self):
        super().setUp()
        # A file whose storage was saved on cuda:1 (written with the
        # low-level writer: no GPU is needed to make it).
        self.p = self.path("gpu.ckpt")
        w = _ckpt.Writer(self.p, sync=False)
        data = np.arange(6, dtype=np.float32)
        s1 = w.add_storage(data.view(np.uint8), "cuda:1")
        s0 = w.add_storage(data.view(np.uint8), "cpu")
        t1 = w.add_tensor(12, [6], [1], s1, 0, False, False)
        t0 = w.add_tensor(12, [2, 3], [3, 1], s0, 0, False, False)
        k = [w.add_string("gpu"), w.add_string("cpu")]
        w.set_root(w.add_dict(k, [t1, t0], ""))
        w.commit()

    @unittest.skipIf(torch.cuda.is_available(), "needs a machine without CUDA")
    def test_missing_device_is_a_clear_error(self):
        with self.assertRaises(ckpt.CudaError) as e:
            ckpt.load(self.p)
        self.assertIn("cuda:1", str(e.exception))
        self.assertIn("map_location='cpu'", str(e.exception))
        self.assertIsInstance(e.exception, RuntimeError)

    def test_remaps(self):
        for ml in ("cpu", torch.device("cpu"), {"cuda:1": "cpu"}, lambda s, loc: s,
                   lambda s, loc: None if loc == "cpu" else s):
            out = ckpt.load(self.p, map_location=ml)
            self.assertEqual(out["gpu"].device.type, "cpu")
            self.assertEqual(out["gpu"].tolist(), [0, 1, 2, 3, 4, 5])
            self.assertEqual(out["cpu"].shape, (2, 3))
        with self.assertRaises(TypeError):
            ckpt.load(self.p, map_location=3)

    def test_callable_sees_saved_location(self):
        seen = []
        ckpt.load(self.p, map_location=lambda s, loc: seen.append(loc) or s)
        self.assertEqual(sorted(seen), ["cpu", "cuda:1"])

    @unittest.skipIf(torch.cuda.is_available() or not _ckpt.has_gpu_loader,
                     "needs a build with the GPU loader on a machine without a GPU")
    def test_gpu_loader_without_a_gpu_is_a_clear_error(self):
        r = _ckpt.Reader(self.p)
        with self.assertRaises(ckpt.CudaError) as e:
            _ckpt.load_storages_to_device(r, [0], [0], 0)
        self.assertIn("CUDA", str(e.exception))
        # The flag only matters for CUDA targets.
        out = ckpt.load(self.p, map_location="cpu", gpu_loader=True)
        self.assertEqual(out["gpu"].tolist(), list(range(6)))

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device: the GPU path is "
                         "tested by the C++ loader tests on the runtime double")
    def test_to_cuda(self):
        out = ckpt.load(self.p, map_location="cuda:0")
        self.assertEqual(out["gpu"].device, torch.device("cuda:0"))
        via = ckpt.load(self.p, map_location={"cuda:1": "cuda:0", "cpu": "cuda:0"},
                        gpu_loader=True)
        for k in ("gpu", "cpu"):
            self.assertEqual(via[k].device, torch.device("cuda:0"))
            self.assertTrue(torch.equal(via[k].cpu(), out[k].cpu()))
        ckpt.save({"g": out["gpu"]}, self.path("g.ckpt"))
        self.assertEqual(ckpt.load(self.path("g.ckpt"), map_location="cpu")["g"].tolist(),
                         list(range(6)))


class Refusals(TempDirCase):
    def refuse(self, obj, *needles, exc=TypeError):
        p = self.path("r.ckpt")
        with self.assertRaises(exc) as e:
            ckpt.save(obj, p)
        for n in needles:
            self.assertIn(n, str(e.exception))
        self.assertFalse(os.path.exists(p), "a refused save left a file")
        self.assertNoTemporaries()
        return e.exception

    def test_unsupported_objects_name_path_and_type(self):
        self.refuse({"model": torch.nn.Linear(2, 2)}, "model", "Linear", "state_dict()")
        self.refuse({"a": [1, lambda x: x]}, "a/1", "function", "code")

        class Custom:
            pass
        self.refuse({"x": {"y": Custom()}}, "x/y", "Custom")
        Point = collections.namedtuple("Point", "x y")
        self.refuse({"p": Point(1, 2)}, "p", "Point", "_asdict")
        self.refuse({"d": collections.defaultdict(list)}, "d", "defaultdict", "dict(")
        self.refuse({"s": torch.eye(2).to_sparse()}, "s", "sparse", "to_dense")
        opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        self.refuse({"opt": opt}, "opt", "optimizer.state_dict()")
        self.refuse({"k": {object(): 1}}, "object")

    def test_cycles_and_bad_metadata(self):
        a = []
        a.append(a)
        self.refuse({"a": a}, "cycle", exc=ValueError)
        with self.assertRaises(TypeError):
            ckpt.save({}, self.path("m.ckpt"), metadata={"k": 1})
        deep = []
        for _ in range(5000):
            deep = [deep]
        self.refuse(deep, "nested too deeply", exc=ValueError)
        ok = [1]
        for _ in range(200):
            ok = {"x": ok}
        p = self.path("deep.ckpt")
        ckpt.save(ok, p)
        self.assertEqual(ckpt.load(p), ok)

    def test_failed_save_keeps_the_old_file(self):
        p = self.path("keep.ckpt")
        ckpt.save({"v": 1}, p)
        with self.assertRaises(TypeError):
            ckpt.save({"v": 2, "bad": object()}, p)
        self.assertEqual(ckpt.load(p), {"v": 1})
        self.assertNoTemporaries()

    def test_colliding_paths(self):
        # Keys 1 and "1" would give two tensors the path "1".
        with self.assertRaises(ckpt.InvalidArgumentError):
            ckpt.save({1: torch.ones(1), "1": torch.ones(1)}, self.path("c.ckpt"))
        self.assertNoTemporaries()

    def test_full_disk_keeps_the_old_file(self):
        # A file-size limit stands in for a full disk: the write fails with
        # EFBIG part-way through the tensor bytes.
        p = self.path("big.ckpt")
        ckpt.save({"v": 1}, p)
        code = (
            "import resource, signal, sys, torch, ckpt\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "try:\n"
            "    ckpt.save({'w': torch.ones(1 << 20)}, sys.argv[1])\n"
            "except ckpt.CkptIOError as e:\n"
            "    print('refused:', e)\n"
            "    sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, p], env=python_env(),
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 3, r.stdout + r.stderr)
        self.assertIn("big.ckpt", r.stdout)
        self.assertEqual(ckpt.load(p), {"v": 1})
        self.assertNoTemporaries()

    def test_missing_directory(self):
        with self.assertRaises(ckpt.CkptIOError) as e:
            ckpt.save({}, self.path("no/such/dir/x.ckpt"))
        self.assertIsInstance(e.exception, OSError)


class BadFiles(TempDirCase):
    def setUp(self):
        super().setUp()
        self.p = self.path("good.ckpt")
        ckpt.save({"w": torch.arange(100000, dtype=torch.float32), "e": 1}, self.p)
        with open(self.p, "rb") as f:
            self.data = f.read()

    def write(self, data):
        p = self.path("bad.ckpt")
        with open(p, "wb") as f:
            f.write(data)
        return p

    def test_missing_and_wrong_files(self):
        with self.assertRaises(FileNotFoundError):
            ckpt.load(self.path("nope.ckpt"))
        with self.assertRaises(IsADirectoryError):
            ckpt.load(self.dir)
        with self.assertRaises(ckpt.FormatError):
            ckpt.load(self.write(b"hello world, not a checkpoint"))
        with self.assertRaises(ckpt.FormatError):
            ckpt.open(self.write(b""))

    def test_truncated_at_every_region(self):
        for n in (9, 64, len(self.data) // 2, len(self.data) - 1):
            with self.assertRaises(ckpt.CkptError, msg=f"truncated to {n}"):
                ckpt.load(self.write(self.data[:n]))

    def test_flipped_data_byte(self):
        bad = bytearray(self.data)
        bad[4096 + 1000] ^= 0xFF  # inside the tensor's bytes
        p = self.write(bytes(bad))
        with self.assertRaises(ckpt.ChecksumError) as e:
            ckpt.load(p, verify=True)
        self.assertIn("w", str(e.exception))
        with ckpt.open(p) as f, self.assertRaises(ckpt.ChecksumError):
            f.verify()

    def test_flipped_header_byte(self):
        bad = bytearray(self.data)
        bad[-20] ^= 0x01
        with self.assertRaises(ckpt.CkptError):
            ckpt.load(self.write(bytes(bad)))


class OpenFile(TempDirCase):
    def setUp(self):
        super().setUp()
        self.p = self.path("o.ckpt")
        self.emb = torch.randn(100, 8)
        self.state = {"model_state": {"emb.weight": self.emb, "fc.bias": torch.ones(3)},
                      "optimizer_state": {"state": {0: {"step": torch.tensor(3.0)}}},
                      "epoch": 4, "name": "run"}
        ckpt.save(self.state, self.p, metadata={"author": "test"})

    def test_lazy_access(self):
        with ckpt.open(self.p) as f:
            self.assertEqual(f.keys(), ["model_state/emb.weight", "model_state/fc.bias",
                                        "optimizer_state/state/0/step"])
            self.assertEqual(len(f), 3)
            self.assertIn("model_state/fc.bias", f)
            self.assertNotIn("model_state/nope", f)
            self.assertTrue(torch.equal(f["model_state/emb.weight"], self.emb))
            self.assertEqual(f.metadata, {"author": "test"})
            self.assertEqual(f.get("epoch"), 4)
            self.assertEqual(f.get("name"), "run")
            self.assertEqual(f.kind("model_state"), "dict")
            assert_same(self, self.state, f.get())
            sub = f.load("model_state/")
            assert_same(self, self.state["model_state"], sub)
            assert_same(self, self.state["optimizer_state"], f.load("optimizer_state", device="cpu"))
            with self.assertRaises(KeyError) as e:
                f["model_state/nope"]
            self.assertIsInstance(e.exception, ckpt.NotFoundError)
            with self.assertRaises(KeyError):
                f.get("nope/deeper")

    def test_slices(self):
        with ckpt.open(self.p) as f:
            s = f.get_slice("model_state/emb.weight")
            self.assertEqual(s.shape, (100, 8))
            self.assertEqual(s.dtype, torch.float32)
            self.assertTrue(torch.equal(s[10:20], self.emb[10:20]))
            self.assertTrue(torch.equal(s[-5:], self.emb[-5:]))
            self.assertTrue(torch.equal(s[7], self.emb[7]))
            self.assertTrue(torch.equal(s[-1], self.emb[-1]))
            self.assertTrue(torch.equal(s[0:50:7], self.emb[0:50:7]))
            self.assertTrue(torch.equal(s[3:9, 2:4], self.emb[3:9, 2:4]))
            self.assertTrue(torch.equal(s[5, 1:3], self.emb[5, 1:3]))
            self.assertEqual(s[60:40].shape, (0, 8))
            with self.assertRaises(IndexError):
                s[100]
            with self.assertRaises(IndexError):
                f.get_slice("optimizer_state/state/0/step")[0]

    def test_closed(self):
        f = ckpt.open(self.p)
        t = f["model_state/emb.weight"]
        f.close()
        with self.assertRaises(ValueError):
            f.keys()
        self.assertTrue(torch.equal(t, self.emb))  # views outlive the handle


class Records(TempDirCase):
    """The binding's tables: named, read-only records (issue 11 item 9)."""

    def test_tensor_and_storage_records_are_named(self):
        p = self.path("r.ckpt")
        base = torch.arange(12.0)
        w = torch.nn.Parameter(torch.zeros(2, 3), requires_grad=False)
        ckpt.save({"a": base[2:].reshape(2, 5), "b": base, "w": w,
                   "g": torch.ones(4, dtype=torch.float16).requires_grad_()}, p)
        r = _ckpt.Reader(p)
        recs = r.tensors()
        self.assertEqual([t.path for t in recs], ["a", "b", "g", "w"])
        a = recs[0]
        self.assertIsInstance(a, _ckpt.TensorRecord)
        self.assertEqual((a.shape, a.strides, a.storage_offset), ((2, 5), (5, 1), 2))
        self.assertEqual(a.storage, recs[1].storage)
        self.assertEqual(a.dtype, ckpt._dtypes.TORCH_TO_CODE[torch.float32])
        self.assertEqual((a.requires_grad, a.is_parameter), (False, False))
        self.assertEqual((recs[2].requires_grad, recs[2].is_parameter), (True, False))
        self.assertEqual((recs[3].requires_grad, recs[3].is_parameter), (False, True))
        self.assertEqual(r.tensor(r.tensor_index("w")), recs[3])
        with self.assertRaises(AttributeError):
            a.shape = (10,)
        with self.assertRaises(IndexError):
            r.tensor(len(recs))
        rows = r.rows("a", 1, 2)
        self.assertIsInstance(rows, _ckpt.TensorRecord)
        self.assertEqual((rows.path, rows.shape, rows.storage_offset), ("a", (1, 5), 7))
        storages = r.storages()
        self.assertEqual(len(storages), 3)
        s = storages[a.storage]
        self.assertIsInstance(s, _ckpt.StorageRecord)
        self.assertEqual((s.nbytes, s.device), (48, "cpu"))
        self.assertEqual(r.storage(a.storage), s)
        self.assertEqual(s.offset % 64, 0)
        with self.assertRaises(IndexError):
            r.storage(3)
        with open(p, "rb") as fh:
            self.assertEqual(fh.read(8), _ckpt.magic)
        self.assertEqual(_ckpt.magic, b"\x89CKPT\r\n\x1a")


class ReadStorages(TempDirCase):
    """Reader.read_storages: the batched pread copy ckpt.load uses."""

    def test_copies_match_the_mapping_and_bad_buffers_are_refused(self):
        p = self.path("s.ckpt")
        big = torch.arange((9 << 20) // 4, dtype=torch.int32)  # > one 8 MiB piece
        ckpt.save({"big": big, "small": torch.arange(5.0), "empty": torch.ones(0)}, p)
        r = _ckpt.Reader(p)
        sids = list(range(len(r.storages())))
        for threads in (1, 3):
            bufs = [np.zeros(r.storage(s).nbytes, np.uint8) for s in sids]
            r.read_storages(sids, bufs, threads)
            for s, b in zip(sids, bufs):
                self.assertEqual(b.tobytes(), bytes(memoryview(r.storage_region(s))))
        with self.assertRaises(ValueError):
            r.read_storages([0], [])
        with self.assertRaises(ValueError):
            r.read_storages([0], [np.zeros(r.storage(0).nbytes + 1, np.uint8)])
        with self.assertRaises(ValueError):
            r.read_storages([len(sids)], [np.zeros(1, np.uint8)])
        n = r.storage(0).nbytes
        with self.assertRaises(ValueError):  # not contiguous
            r.read_storages([0], [np.zeros(2 * n, np.uint8)[::2]])
        with self.assertRaises((ValueError, BufferError, TypeError)):  # read-only
            r.read_storages([0], [bytes(n)])


class TreePathsInErrors(TempDirCase):
    def test_a_tree_error_names_the_path_as_written(self):
        # The binding joined segments itself: "a/b" was not escaped, and
        # the child of a key "" lost its '/', so the path named no node.
        p = self.path("d.ckpt")
        w = _ckpt.Writer(p, sync=False)
        code = {name: c for c, name, _, _ in _ckpt.value_kinds()}
        dev = w.add_items(code["list"], [w.add_device("xyz")])
        inner = w.add_dict([w.add_string("")], [dev], "")
        w.set_root(w.add_dict([w.add_string("a/b")], [inner], ""))
        w.commit()
        with self.assertRaises(ckpt.FormatError) as cm:
            ckpt.load(p)
        self.assertIn("tree path 'a~1b//0'", str(cm.exception))
        with ckpt.open(p) as f:
            self.assertEqual(f.kind("a~1b//0"), "device")
            with self.assertRaises(ckpt.FormatError) as cm:
                f.get("a~1b/")
            self.assertIn("tree path 'a~1b//0'", str(cm.exception))


    def test_a_refused_save_names_the_path_the_file_would_have(self):
        # _save.py joined str/repr segments itself: "a/b/(1, 'a')/1".
        with self.assertRaises(TypeError) as cm:
            ckpt.save({"a/b": {(1, "a"): [0, lambda: 0]}}, self.path("x.ckpt"))
        self.assertIn("a~1b/(1,a)/1:", str(cm.exception))
        with self.assertRaises(TypeError) as cm:  # a key no file holds: its repr
            ckpt.save({"k": {(1, torch.ones(1)): 1}}, self.path("x.ckpt"))
        self.assertIn("k/(1, tensor([1.])):", str(cm.exception))


class Kinds(TempDirCase):
    """The node-kind table comes from format.h (issue 11 item 1)."""

    def test_value_kinds_are_the_names_the_reader_reports(self):
        kinds = _ckpt.value_kinds()
        self.assertEqual([k[0] for k in kinds], list(range(len(kinds))))
        by_name = {name: (container, hashable) for _, name, container, hashable in kinds}
        p = self.path("k.ckpt")
        values = {"none": None, "bool": True, "int": 3, "bigint": 2 ** 70, "float": 0.5,
                  "complex": 1j, "string": "s", "bytes": b"b", "list": [1], "tuple": (1,),
                  "dict": {"a": 1}, "set": {1}, "frozenset": frozenset({1}),
                  "tensor": torch.ones(1), "dtype": torch.int8,
                  "device": torch.device("cpu")}
        self.assertEqual(sorted(values), sorted(by_name))
        ckpt.save(values, p)
        with ckpt.open(p) as f:
            for name in values:
                self.assertEqual(f.kind(name), name)
        self.assertEqual({n for n, (c, _) in by_name.items() if c},
                         {"list", "tuple", "dict", "set", "frozenset"})
        self.assertEqual({n for n, (_, h) in by_name.items() if not h},
                         {"list", "dict", "set", "tensor"})

    def test_add_items_takes_only_item_containers(self):
        code = {name: c for c, name, _, _ in _ckpt.value_kinds()}
        w = _ckpt.Writer(self.path("i.ckpt"), sync=False)
        one = w.add_int(1)
        for name in ("dict", "int", "tensor"):
            with self.assertRaises(ValueError):
                w.add_items(code[name], [one])
        for bad in (-1, 16, 1 << 20):
            with self.assertRaises(ValueError):
                w.add_items(bad, [one])
        w.set_root(w.add_items(code["tuple"], [one, w.add_items(code["list"], [])]))
        w.commit()
        self.assertEqual(ckpt.load(self.path("i.ckpt")), (1, []))


class Flatten(TempDirCase):
    """ckpt.flatten names tensors as the file does (FORMAT.md 7.2, 7.3)."""

    def test_paths_are_the_files(self):
        # flatten joined str(key) on its own: (1, 'a') became "(1, 'a')"
        # where the file says "(1,a)", and a child of the key "" lost its
        # leading '/'.
        g = torch.Generator().manual_seed(3)

        def t():
            return torch.randn(2, generator=g)

        keys = [(1, "a"), 1.5, True, frozenset({3, 1, 2}), frozenset({"b", 1}), None,
                b"\x00\xff", -3, 2 ** 70, -(2 ** 64), complex(1, -2), 1e20, float("nan"),
                -2.5, ((1, 2.5), "x", None), (7,), "a/b~c", torch.float16,
                torch.device("cuda"), torch.device("cpu"), np.int64(9), np.float32(0.25),
                np.bool_(False)]
        tree = {"m": {k: t() for k in keys}, "": {"x": t(), "": [t()]},
                "l": [t(), (t(), {"k": t()})], "s": {"under": {(): t()}}}
        p = self.path("f.ckpt")
        ckpt.save(tree, p)
        flat = ckpt.flatten(tree)
        with ckpt.open(p) as f:
            self.assertEqual(sorted(flat), f.keys())
            # keys() comes from Reader.paths(): the records' paths, in order.
            self.assertEqual(f.keys(), [r.path for r in f._reader().tensors()])
            for k, v in flat.items():
                self.assertTrue(torch.equal(f[k], v), k)
        self.assertIn("m/(1,a)", flat)
        self.assertIn("m/(1,2,3)", flat)
        self.assertIn("/x", flat)
        self.assertIn("m/a~1b~0c", flat)
        self.assertEqual(len(flat), len(keys) + 6)
        self.assertEqual(sorted(ckpt.flatten(tree["m"], prefix="p")),
                         sorted("p/" + k[2:] for k in flat if k.startswith("m/")))
        self.assertEqual(ckpt.flatten(tree["l"][0]), {"": tree["l"][0]})

    def test_keys_a_file_cannot_hold_are_refused(self):
        for key in (torch.ones(1), (1, torch.ones(1)), frozenset({(1, 2), object()}),
                    2 ** 40000, "x\udc00"):
            with self.assertRaises((TypeError, ValueError)):
                ckpt.flatten({key: torch.ones(1)})


class PackageNamespace(unittest.TestCase):
    def test_star_import_keeps_the_builtin_open(self):
        # `open` was in __all__: `from ckpt import *` replaced open().
        ns = {}
        exec("from ckpt import *", ns)  # noqa: S102 - the statement under test
        self.assertNotIn("open", ns)
        self.assertIs(eval("open", ns), builtins.open)  # noqa: S307
        for name in ckpt.__all__:
            self.assertIs(ns[name], getattr(ckpt, name))
        self.assertIn("save", ns)
        self.assertIs(ckpt.open, ckpt._compat.open)
        self.assertTrue(callable(ckpt.open))


class Interop(TempDirCase):
    def test_pth_converted_on_the_fly(self):
        p = self.path("m.pth")
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": 1,
                 "np": np.arange(6, dtype=np.int16).reshape(2, 3), "np_f": np.asfortranarray(
                     np.ones((2, 3))), "rng": ckpt.rng.get_state()}
        torch.save(state, p)
        # The reference load trusts this test's own file (numpy inside):
        # torch >= 2.6 defaults to weights_only=True, which refuses numpy.
        assert_same(self, torch.load(p, weights_only=False), ckpt.load(p))
        assert_same(self, torch.load(p, weights_only=False), ckpt.load(p, mmap=True))
        self.assertNoTemporaries()
        out = self.path("m.ckpt")
        # 4 weights, 4 x (2 moments + step), 2 arrays, 2 RNG states
        self.assertEqual(ckpt.import_pth(p, out), 20)
        assert_same(self, torch.load(p, weights_only=False), ckpt.load(out))

    def test_hostile_pth_never_runs(self):
        marker = self.path("pwned")
        p = self.path("evil.pth")

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        torch.save({"x": Evil()}, p)
        with self.assertRaises(ckpt.CkptError) as e:
            ckpt.load(p)
        self.assertIn("system", str(e.exception))
        self.assertFalse(os.path.exists(marker))

    def test_safetensors(self):
        try:
            import safetensors.torch as st
        except ImportError:
            self.skipTest("safetensors is not installed in this Python")
        sd = {"model": {"a": torch.randn(3, 4), "b": torch.arange(5)}, "head": [torch.ones(2)]}
        sd["model"]["tied"] = sd["model"]["a"]
        out = self.path("m.safetensors")
        ckpt.save_safetensors(sd, out, metadata={"k": "v"})
        flat = st.load_file(out)
        self.assertEqual(sorted(flat), ["head/0", "model/a", "model/b", "model/tied"])
        self.assertTrue(torch.equal(flat["model/tied"], sd["model"]["a"]))
        back = ckpt.load(out)
        self.assertTrue(torch.equal(back["model/b"], sd["model"]["b"]))
        conv = self.path("m.ckpt")
        self.assertEqual(ckpt.convert(out, conv), 4)
        with ckpt.open(conv) as f:
            self.assertEqual(f.metadata, {"k": "v"})
            self.assertTrue(torch.equal(f["model~1a"], sd["model"]["a"]))


class Cli(TempDirCase):
    def test_python_dash_m(self):
        p = self.path("c.ckpt")
        ckpt.save({"epoch": 9, "w": torch.ones(2, 2)}, p)
        run = lambda *a: subprocess.run([sys.executable, "-m", "ckpt", *a], env=python_env(),
                                        capture_output=True, text=True)
        r = run("get", p, "epoch")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "9"))
        r = run("inspect", p)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("w", r.stdout)
        self.assertEqual(run("verify", p).returncode, 0)
        self.assertEqual(run("frobnicate").returncode, 2)
        self.assertEqual(run("get", self.path("none.ckpt"), "x").returncode, 1)


class Rng(TempDirCase):
    def test_restores_every_generator(self):
        import random
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)
        p = self.path("rng.ckpt")
        ckpt.save({"rng": ckpt.rng.get_state()}, p)
        want = (random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.randn())
        random.seed(99); np.random.seed(99); torch.manual_seed(99)
        ckpt.rng.set_state(ckpt.load(p)["rng"])
        got = (random.random(), np.random.rand(), torch.rand(3).tolist(), np.random.randn())
        self.assertEqual(want, got)


if __name__ == "__main__":
    unittest.main()
