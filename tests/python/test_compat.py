"""The safetensors-shaped API (ckpt.safe_open, save_file, load_file,
save_model, load_model), ckpt.open of .pth and .safetensors files, and
`import ckpt` without torch: compared with the real safetensors package
where it is installed."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest
import warnings

import numpy as np
import torch

import ckpt
from ckpt import _ckpt
from util import TempDirCase, assert_same, python_env

try:
    import safetensors
    import safetensors.torch as st
except ImportError:  # the comparisons skip, saying why
    safetensors = st = None

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "data", "golden_v1.ckpt")
NEEDS_ST = unittest.skipIf(st is None, "the safetensors package is not installed here "
                                       "(pip install safetensors)")


def sample_tensors():
    """Tensors of every dtype this torch and safetensors share, with odd
    shapes (0-dim, empty, 3-d); names with '/', '~' and '.'."""
    g = torch.Generator().manual_seed(7)
    out = {
        "embed.weight": torch.randn(6, 4, 5, generator=g),
        "a/b": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "t~x": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "half": torch.randn(4, 2, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "f64": torch.randn(2, 3, generator=g).double(),
        "i32": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-9, 9, (3, 1), generator=g).to(torch.int16),
        "i8": torch.randint(-9, 9, (4,), generator=g).to(torch.int8),
        "u8": torch.randint(0, 200, (2, 2), generator=g).to(torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
    }
    for name in ("uint16", "uint32", "uint64"):
        dt = getattr(torch, name, None)
        if dt is not None and "U" + name[4:] in getattr(st, "_TYPES", {}):
            out[name] = torch.randint(0, 1000, (5,), generator=g).to(dt)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        dt = getattr(torch, name, None)
        if dt is not None:
            out[name] = torch.randn(4, 3, generator=g).to(dt)
    for name in ("float8_e8m0fnu", "float4_e2m1fn_x2"):  # bit patterns only
        dt = getattr(torch, name, None)
        if dt is not None:
            out[name] = torch.randint(0, 255, (3, 2), generator=g).to(torch.uint8).view(dt)
    return out


# Indexes of a (6, 4, 5) tensor: safetensors 0.8 indexes as torch does.
INDEXES = [0, -1, 5, 6, -7, slice(None), slice(1, None), slice(0, 6, 2), slice(None, None, 3),
           slice(None, None, -1), slice(5, 10), slice(-10, 2), slice(3, 1), slice(2, 2),
           (0, 1), (0, slice(1, 3)), (slice(None), 1), (slice(None), slice(None), 4),
           Ellipsis, (Ellipsis, 1), (1, Ellipsis), (0, 1, 2), (0, 1, 2, 3), (), [], [[]],
           [0], [0, 1], [5, 0], (slice(None), slice(None, None, 2)), None, (None, 0),
           (slice(1, 2), Ellipsis, slice(0, 1)), 1.0, "a", torch.tensor(1), torch.tensor([1, 3]),
           (slice(None), [0, 2]), torch.tensor([True, False, True, False, True, False])]
SCALAR_INDEXES = [(), Ellipsis, None, slice(None), 0, [], [[]]]
EMPTY_INDEXES = [slice(None), 0, (slice(None), 1), (Ellipsis, 2), [], slice(1, 5)]


def outcome(fn):
    """('ok', result) or ('raises', exception type)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: non-tuple sequence indexes
        try:
            return "ok", fn()
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return "raises", type(e)


class CompatCase(TempDirCase):
    def assertSameOutcome(self, mine, theirs, what):
        self.assertEqual(mine[0], theirs[0], f"{what}: {mine} vs {theirs}")
        if mine[0] == "ok":
            if isinstance(theirs[1], np.ndarray):
                self.assertEqual(mine[1].dtype, theirs[1].dtype, what)
                self.assertEqual(mine[1].shape, theirs[1].shape, what)
                self.assertEqual(mine[1].tobytes(), theirs[1].tobytes(), what)
            else:
                assert_same(self, theirs[1], mine[1], what)
        else:
            self.assertTrue(issubclass(mine[1], theirs[1]) or issubclass(theirs[1], mine[1]),
                            f"{what}: {mine[1]} vs {theirs[1]}")

    def files(self, tensors=None, metadata=None):
        """The same tensors as a .safetensors file (by safetensors), a ckpt
        file (by ckpt.save_file) and a .pth (by torch.save)."""
        tensors = sample_tensors() if tensors is None else tensors
        out = {"st": self.path("m.safetensors"), "ckpt": self.path("m.ckpt"),
               "pth": self.path("m.pth")}
        st.save_file(tensors, out["st"], metadata=metadata)
        ckpt.save_file(tensors, out["ckpt"], metadata=metadata)
        torch.save(tensors, out["pth"])
        return tensors, out


@NEEDS_ST
class SafeOpen(CompatCase):
    def test_keys_metadata_tensors_as_safetensors(self):
        tensors, paths = self.files(metadata={"format": "pt", "k": "v"})
        with safetensors.safe_open(paths["st"], framework="pt") as ref:
            for kind, p in paths.items():
                with ckpt.safe_open(p, framework="pt", device="cpu") as f:
                    self.assertEqual(f.keys(), ref.keys(), kind)
                    self.assertEqual(sorted(f.offset_keys()), ref.keys(), kind)
                    # A .pth's: what the importer records (its format, CRC-32s).
                    meta = ref.metadata() if kind != "pth" else ckpt.open(p).metadata
                    self.assertEqual(f.metadata(), meta, kind)
                    for name in ref.keys():
                        t = f.get_tensor(name)
                        self.assertIs(type(t), torch.Tensor)
                        assert_same(self, ref.get_tensor(name), t, f"{kind}:{name}")
                        s, rs = f.get_slice(name), ref.get_slice(name)
                        self.assertEqual(s.get_shape(), rs.get_shape(), f"{kind}:{name}")
                        self.assertEqual(s.get_dtype(), rs.get_dtype(), f"{kind}:{name}")
                    got = f.get_tensors()
                    self.assertEqual(sorted(got), ref.keys())
            # safetensors' file order, as safetensors reports it.
            with ckpt.safe_open(paths["st"]) as f:
                self.assertEqual(f.offset_keys(), ref.offset_keys())

    def test_offset_keys_follow_the_bytes(self):
        tensors, paths = self.files()
        r = _ckpt.Reader(paths["ckpt"], False)
        storages = r.storages()
        where = {t.path: storages[t.storage].offset for t in r.tensors()}
        with ckpt.safe_open(paths["ckpt"]) as f:
            order = f.offset_keys()
        offsets = [where[n.replace("~", "~0").replace("/", "~1")] for n in order]
        self.assertEqual(offsets, sorted(offsets))
        self.assertEqual(sorted(order), sorted(tensors))

    def test_no_metadata_is_none(self):
        _, paths = self.files(tensors={"x": torch.ones(2)})
        with safetensors.safe_open(paths["st"], framework="pt") as ref:
            self.assertIsNone(ref.metadata())
        for kind, p in paths.items():
            if kind != "pth":  # the importer records the .pth's format
                with ckpt.safe_open(p) as f:
                    self.assertIsNone(f.metadata())

    def test_empty_metadata_of_a_safetensors_file(self):
        # safetensors tells metadata={} from none; ckpt stores {} as none.
        p = self.path("e.safetensors")
        st.save_file({"x": torch.ones(1)}, p, metadata={})
        with safetensors.safe_open(p, framework="pt") as ref, ckpt.safe_open(p) as f:
            self.assertEqual(ref.metadata(), {})
            self.assertEqual(f.metadata(), ref.metadata())

    def test_slicing_as_safetensors(self):
        big = torch.arange(120, dtype=torch.float32).reshape(6, 4, 5)
        tensors = {"w": big, "s": torch.tensor(2.5), "e": torch.zeros(0, 3),
                   "h": torch.arange(24).reshape(6, 4).to(torch.bfloat16)}
        _, paths = self.files(tensors)
        cases = [("w", INDEXES), ("h", INDEXES), ("s", SCALAR_INDEXES), ("e", EMPTY_INDEXES)]
        with safetensors.safe_open(paths["st"], framework="pt") as ref:
            for kind, p in paths.items():
                with ckpt.safe_open(p) as f:
                    for name, indexes in cases:
                        for index in indexes:
                            self.assertSameOutcome(
                                outcome(lambda: f.get_slice(name)[index]),
                                outcome(lambda: ref.get_slice(name)[index]),
                                f"{kind}:{name}[{index!r}]")

    def test_numpy_framework(self):
        tensors = {"a": torch.randn(3, 2), "b": torch.arange(5)}
        _, paths = self.files(tensors)
        with safetensors.safe_open(paths["st"], framework="numpy") as ref:
            for p in paths.values():
                with ckpt.safe_open(p, framework="numpy") as f:
                    for name in ref.keys():
                        self.assertSameOutcome(outcome(lambda: f.get_tensor(name)),
                                               outcome(lambda: ref.get_tensor(name)), name)
                        self.assertSameOutcome(outcome(lambda: f.get_slice(name)[1:]),
                                               outcome(lambda: ref.get_slice(name)[1:]), name)

    def test_missing_names_and_closed_handles(self):
        _, paths = self.files(tensors={"x": torch.ones(2), "a/b": torch.zeros(1)})
        for kind, p in paths.items():
            f = ckpt.safe_open(p)
            for bad in ("nope", "a~1b", "x/"):
                with self.assertRaises(KeyError, msg=f"{kind} {bad!r}") as e:
                    f.get_tensor(bad)
                self.assertIsInstance(e.exception, ckpt.NotFoundError)
                self.assertIn(p, str(e.exception))
                with self.assertRaises(ckpt.NotFoundError):
                    f.get_slice(bad)
            # A name that is not a str: a TypeError, as in safetensors.
            with safetensors.safe_open(paths["st"], framework="pt") as ref:
                for bad in (3, None, b"x"):
                    for call in ("get_tensor", "get_slice"):
                        self.assertSameOutcome(outcome(lambda: getattr(f, call)(bad)),
                                               outcome(lambda: getattr(ref, call)(bad)),
                                               f"{kind} {call}({bad!r})")
                        self.assertRaises(TypeError, getattr(f, call), bad)
            with f:
                pass
            for call in (f.keys, f.metadata, f.offset_keys, lambda: f.get_tensor("x"),
                         lambda: f.get_slice("x")):
                with self.assertRaises(ValueError, msg=kind):
                    call()

    def test_nested_ckpt_files_use_tensor_paths(self):
        p = self.path("n.ckpt")
        tree = {"model": {"fc.weight": torch.ones(2, 2), "x/y": torch.zeros(1)},
                "step": 3, "top": torch.arange(3)}
        ckpt.save(tree, p)
        with ckpt.safe_open(p) as f:
            self.assertEqual(f.keys(), ["model/fc.weight", "model/x~1y", "top"])
            assert_same(self, tree["model"]["fc.weight"], f.get_tensor("model/fc.weight"))
            assert_same(self, tree["model"]["x/y"], f.get_tensor("model/x~1y"))
        self.assertEqual(sorted(ckpt.load_file(p)), ["model/fc.weight", "model/x~1y", "top"])

    def test_a_key_colliding_with_a_nested_path(self):
        # {"a/b": t1, "a": {"b": t2}}: paths a~1b and a/b. The key keeps its
        # escaped form, so every name is unique and reaches its tensor.
        p = self.path("c.ckpt")
        t1, t2 = torch.ones(2), torch.zeros(3)
        ckpt.save({"a/b": t1, "a": {"b": t2}, "c/d": torch.arange(2)}, p)
        with ckpt.safe_open(p) as f:
            self.assertEqual(f.keys(), ["a/b", "a~1b", "c/d"])
            self.assertEqual(sorted(f.offset_keys()), f.keys())
            assert_same(self, t2, f.get_tensor("a/b"))
            assert_same(self, t1, f.get_tensor("a~1b"))
            assert_same(self, t1, f.get_slice("a~1b")[:])
            got = f.get_tensors()
        self.assertEqual(sorted(got), ["a/b", "a~1b", "c/d"])
        assert_same(self, t2, got["a/b"])
        assert_same(self, t1, got["a~1b"])
        assert_same(self, torch.arange(2), got["c/d"])
        self.assertEqual(sorted(ckpt.load_file(p)), ["a/b", "a~1b", "c/d"])

    def test_parameters_come_back_as_plain_tensors(self):
        p = self.path("p.ckpt")
        w = torch.nn.Parameter(torch.randn(3))
        ckpt.save({"w": w}, p)
        with ckpt.safe_open(p) as f:
            t = f.get_tensor("w")
        self.assertIs(type(t), torch.Tensor)
        self.assertFalse(t.requires_grad)
        self.assertIs(type(ckpt.load_file(p)["w"]), torch.Tensor)

    def test_bad_arguments(self):
        _, paths = self.files(tensors={"x": torch.ones(2)})
        p = paths["ckpt"]
        with self.assertRaises(ckpt.InvalidArgumentError):
            ckpt.safe_open(p, framework="jax")
        with self.assertRaises(ckpt.InvalidArgumentError):
            ckpt.safe_open(p, device="bogus")
        with self.assertRaises(ckpt.InvalidArgumentError):
            ckpt.safe_open(p, backend="io_uring")
        with self.assertRaises(FileNotFoundError):
            ckpt.safe_open(self.path("nope.ckpt"))
        junk = self.path("junk.bin")
        with open(junk, "wb") as out:
            out.write(b"hello world, this is not a checkpoint")
        with self.assertRaises(ckpt.FormatError):
            ckpt.safe_open(junk)

    def test_devices_ckpt_cannot_place_on(self):
        _, paths = self.files(tensors={"x": torch.ones(2, 3)})
        for device in ("mps", "xla", "xpu"):
            for p in (paths["ckpt"], paths["st"]):
                with self.assertRaises(ckpt.UnsupportedError, msg=device) as e:
                    ckpt.safe_open(p, device=device)
                self.assertIn(f"'{device}'", str(e.exception))
                self.assertIn("device='cpu'", str(e.exception))
                with self.assertRaises(ckpt.UnsupportedError, msg=device):
                    ckpt.load_file(p, device=device)
        # torch takes "cpu:1" for the one CPU; safetensors refuses it, and
        # ckpt too (a typo for "cuda:1"?). "cpu:0" is torch's name of the CPU.
        self.assertEqual(torch.device("cpu:1").type, "cpu")
        self.assertEqual(outcome(lambda: safetensors.safe_open(paths["st"], framework="pt",
                                                               device="cpu:1"))[0], "raises")
        for device in ("cpu:1", torch.device("cpu", 2)):
            with self.assertRaisesRegex(ckpt.InvalidArgumentError, "one CPU device"):
                ckpt.safe_open(paths["ckpt"], device=device)
        with ckpt.safe_open(paths["ckpt"], device="cpu:0") as f:
            self.assertEqual(f.get_tensor("x").device.type, "cpu")

    def test_devices(self):
        _, paths = self.files(tensors={"x": torch.ones(2, 3)})
        with ckpt.safe_open(paths["ckpt"], device="meta") as f:
            t = f.get_tensor("x")
            self.assertEqual((t.device.type, t.shape), ("meta", (2, 3)))
        if torch.cuda.is_available():
            with ckpt.safe_open(paths["ckpt"], device=0) as f:
                self.assertEqual(f.get_tensor("x").device, torch.device("cuda", 0))
            self.assertEqual(ckpt.load_file(paths["st"], device="cuda")["x"].device.type, "cuda")
            return
        for device in ("cuda", "cuda:1", 0):
            for call in (lambda: ckpt.safe_open(paths["ckpt"], device=device),
                         lambda: ckpt.load_file(paths["st"], device=device)):
                with self.assertRaises(ckpt.CudaError) as e:
                    call()
                self.assertIn("CUDA is not available", str(e.exception))
                self.assertIn("device='cpu'", str(e.exception))


@NEEDS_ST
class SaveLoadFile(CompatCase):
    def test_load_file_as_safetensors(self):
        tensors, paths = self.files()
        ref = st.load_file(paths["st"])
        for kind, p in paths.items():
            for backend in ("mmap", "pread"):
                got = ckpt.load_file(p, device="cpu", backend=backend)
                self.assertEqual(sorted(got), sorted(ref), kind)
                for k in ref:
                    assert_same(self, ref[k], got[k], f"{kind}:{backend}:{k}")
        # A ckpt file written by save_file is an ordinary ckpt file.
        assert_same(self, tensors, ckpt.load(paths["ckpt"]))
        with ckpt.open(paths["ckpt"]) as f:
            assert_same(self, tensors["a/b"], f["a~1b"])

    def test_pread_gives_copies_mmap_views_of_a_private_mapping(self):
        _, paths = self.files(tensors={"x": torch.zeros(4)})
        for p in (paths["ckpt"], paths["pth"]):
            ckpt.load_file(p, backend="pread")["x"][0] = 1
            ckpt.load_file(p, backend="mmap")["x"][1] = 1  # stays in this process
            self.assertEqual(ckpt.load_file(p)["x"].tolist(), [0, 0, 0, 0])

    def test_backends_of_get_tensor_as_safetensors(self):
        # safetensors' "pread" gives every get_tensor its own copy; "mmap"
        # gives views of one mapping (a write shows in the next get).
        _, paths = self.files(tensors={"x": torch.zeros(6)})
        def writes_show(opener, p, backend):
            with opener(p, framework="pt", backend=backend) as f:
                f.get_tensor("x")[0] = 1
                f.get_slice("x")[1:3][0] = 1
                return f.get_tensor("x")[:2].tolist()
        for backend in ("mmap", "pread"):
            want = writes_show(safetensors.safe_open, paths["st"], backend)
            self.assertEqual(want, [1, 1] if backend == "mmap" else [0, 0])
            for kind, p in paths.items():
                self.assertEqual(writes_show(ckpt.safe_open, p, backend), want,
                                 f"{kind} {backend}")
                self.assertEqual(ckpt.load_file(p)["x"].tolist(), [0] * 6, kind)

    def test_save_file_refuses_what_safetensors_refuses(self):
        t = torch.ones(2)
        bad = [
            ("not a dict", ([t],), {}),
            ("non-tensor value", ({"a": 1},), {}),
            ("non-tensor value", ({"a": t, "b": np.ones(2)},), {}),
            ("non-str key", ({1: t},), {}),
            ("non-str key", ({("a",): t},), {}),
            ("metadata value", ({"a": t},), {"metadata": {"k": 1}}),
            ("metadata key", ({"a": t},), {"metadata": {1: "v"}}),
            ("metadata None value", ({"a": t},), {"metadata": {"k": None}}),
            ("metadata list", ({"a": t},), {"metadata": [("k", "v")]}),
            ("sparse", ({"a": torch.eye(2).to_sparse()},), {}),
        ]
        for what, args, kw in bad:
            theirs = outcome(lambda: st.save_file(*args, self.path("x.safetensors"), **kw))
            target = self.path("x.ckpt")
            mine = outcome(lambda: ckpt.save_file(*args, target, **kw))
            self.assertEqual(theirs[0], "raises", what)
            self.assertEqual(mine[0], "raises", what)
            self.assertTrue(issubclass(mine[1], theirs[1]), f"{what}: {mine[1]} vs {theirs[1]}")
            self.assertFalse(os.path.exists(target), what)
            self.assertNoTemporaries()

    def test_save_file_messages_name_the_problem(self):
        with self.assertRaisesRegex(ValueError, "'b' is a int, not a torch.Tensor"):
            ckpt.save_file({"a": torch.ones(1), "b": 3}, self.path("x.ckpt"))
        with self.assertRaisesRegex(TypeError, "key 1 is a int; tensor names are str"):
            ckpt.save_file({1: torch.ones(1)}, self.path("x.ckpt"))
        with self.assertRaisesRegex(TypeError, "metadata must be a dict of str to str"):
            ckpt.save_file({"a": torch.ones(1)}, self.path("x.ckpt"), metadata={"k": 2})

    def test_shared_and_strided_tensors_are_stored_as_they_are(self):
        # safetensors refuses both; ckpt stores sharing and strides natively.
        base = torch.arange(12.0).reshape(3, 4)
        tensors = {"base": base, "row": base[1], "t": base.t()}
        self.assertEqual(outcome(lambda: st.save_file(tensors, self.path("x.st")))[0], "raises")
        p = self.path("x.ckpt")
        ckpt.save_file(tensors, p)
        back = ckpt.load(p)
        assert_same(self, tensors, back)
        back["base"][1, 0] = -1
        self.assertEqual(back["row"][0].item(), -1)
        self.assertEqual(back["t"][0, 1].item(), -1)
        got = ckpt.load_file(p)
        self.assertEqual(got["t"].stride(), (1, 4))

    def test_metadata_roundtrip_and_empty_dict(self):
        p = self.path("m.ckpt")
        ckpt.save_file({}, p, metadata={"a": "1", "b": ""})
        with ckpt.safe_open(p) as f:
            self.assertEqual(f.keys(), [])
            self.assertEqual(f.metadata(), {"a": "1", "b": ""})
        self.assertEqual(ckpt.load_file(p), {})


class ViewingBuffer(torch.nn.Module):
    def __init__(self, at=2):
        super().__init__()
        self.register_buffer("full", torch.zeros(12))
        self.register_buffer("part", self.full[at:at + 3])


class TiedLM(torch.nn.Module):
    def __init__(self, tied=True, extra=False):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        if extra:
            self.extra = torch.nn.Linear(2, 2)
        self.register_buffer("steps", torch.tensor(5))


@NEEDS_ST
class Models(CompatCase):
    def both(self, model):
        paths = {"st": self.path("m.safetensors"), "ckpt": self.path("m.ckpt")}
        st.save_model(model, paths["st"])
        ckpt.save_model(model, paths["ckpt"])
        return paths

    def test_tied_model_roundtrip_as_safetensors(self):
        torch.manual_seed(0)
        model = TiedLM()
        paths = self.both(model)
        for kind, p in paths.items():
            fresh = TiedLM()
            result = ckpt.load_model(fresh, p)
            ref = st.load_model(TiedLM(), paths["st"])
            self.assertEqual(result, ref, kind)
            self.assertIsInstance(result[0], set)
            self.assertIsInstance(result[1], list)
            assert_same(self, model.state_dict(), fresh.state_dict(), kind)
            self.assertIs(fresh.head.weight, fresh.embed.weight)

    def test_tied_weights_are_stored_once_under_every_name(self):
        model = TiedLM()
        paths = self.both(model)
        with safetensors.safe_open(paths["st"], framework="pt") as f:
            self.assertEqual(len(f.keys()), len(model.state_dict()) - 1)  # one name dropped
        got = ckpt.load_file(paths["ckpt"])
        self.assertEqual(sorted(got), sorted(model.state_dict()))
        self.assertEqual(got["head.weight"].data_ptr(), got["embed.weight"].data_ptr())
        r = _ckpt.Reader(paths["ckpt"], False)
        self.assertEqual(len(r.storages()), len(model.state_dict()) - 1)

    def test_missing_and_unexpected_as_safetensors(self):
        # Every safetensors file: ckpt.load_model's result and strict error
        # are safetensors.load_model's. A ckpt.save_model file holds every
        # name (tied ones sharing memory): the result is plain key sets.
        torch.manual_seed(1)
        saved = {"extra": TiedLM(extra=True), "untied": TiedLM(tied=False), "tied": TiedLM()}
        models = {"extra": lambda: TiedLM(extra=True), "untied": lambda: TiedLM(tied=False),
                  "tied": TiedLM}
        for src_name, src in saved.items():
            paths = self.both(src)
            # A safetensors file holding a tied name apart (save_safetensors clones it).
            paths["clone"] = self.path("clone.safetensors")
            ckpt.save_safetensors(src.state_dict(), paths["clone"])
            for dst_name, make in models.items():
                for kind, p in paths.items():
                    what = f"{src_name} file ({kind}) into {dst_name} model"
                    mine = outcome(lambda: ckpt.load_model(make(), p, strict=False))
                    self.assertEqual(mine[0], "ok", what)
                    if kind == "ckpt" and src_name != "untied":
                        want_keys = set(make().state_dict())
                        have = set(src.state_dict())
                        self.assertEqual(mine[1], (want_keys - have, mine[1][1]), what)
                        self.assertEqual(sorted(mine[1][1]), sorted(have - want_keys), what)
                        continue
                    # Untied weights in a ckpt file: as a safetensors file of the
                    # same tensors (a tied model's second name is unexpected).
                    ref_p = paths["clone"] if kind == "ckpt" else p
                    ref = outcome(lambda: st.load_model(make(), ref_p, strict=False))
                    self.assertEqual((mine[1][0], sorted(mine[1][1])),
                                     (ref[1][0], sorted(ref[1][1])), what)
                    msgs = []
                    for fn in (lambda: st.load_model(make(), ref_p),
                               lambda: ckpt.load_model(make(), p)):
                        try:
                            fn()
                            msgs.append(None)
                        except RuntimeError as e:
                            msgs.append(str(e))
                    self.assertEqual(msgs[0], msgs[1], what)

    def test_buffer_viewing_another_buffer(self):
        # A buffer that is a view inside another (part = full[2:5]): the
        # file holds both names sharing memory as in the model, so neither
        # is missing or unexpected, and the values land in the model.
        W = ViewingBuffer
        src = W()
        src.full.copy_(torch.arange(12.0) * 3)
        paths = self.both(src)
        for kind, p in paths.items():
            fresh = W()
            self.assertEqual(ckpt.load_model(fresh, p), st.load_model(W(), paths["st"]), kind)
            assert_same(self, src.full, fresh.full, kind)
            self.assertEqual(fresh.part.tolist(), [6.0, 9.0, 12.0], kind)
            self.assertEqual(fresh.part.data_ptr() - fresh.full.data_ptr(), 8, kind)
        # The same names at another offset in the model: loading the file's
        # part would overwrite other values of full, so it is unexpected.
        fresh = W(at=3)
        self.assertEqual(ckpt.load_model(fresh, paths["ckpt"], strict=False), (set(), ["part"]))

    def test_disjoint_views_where_safetensors_refuses_the_model(self):
        # docs/PYTHON.md: where ckpt's load_model differs from safetensors'.
        class D(torch.nn.Module):
            def __init__(self):
                super().__init__()
                base = torch.arange(12.0)
                self.register_buffer("a", base[:6])
                self.register_buffer("b", base[6:])

        p = self.path("d.safetensors")
        ckpt.save_safetensors(D().state_dict(), p)
        self.assertEqual(outcome(lambda: st.load_model(D(), p))[0], "raises")
        self.assertEqual(outcome(lambda: st.save_model(D(), self.path("x.st")))[0], "raises")
        fresh = D()
        fresh.a.zero_()
        fresh.b.zero_()
        self.assertEqual(ckpt.load_model(fresh, p), (set(), []))
        self.assertEqual(fresh.b.tolist(), [6.0, 7.0, 8.0, 9.0, 10.0, 11.0])

    def test_force_contiguous(self):
        model = torch.nn.Linear(3, 2)
        model.register_buffer("tbuf", torch.arange(6.0).reshape(2, 3).t())
        p = self.path("m.ckpt")
        ckpt.save_model(model, p)
        self.assertTrue(ckpt.load_file(p)["tbuf"].is_contiguous())
        ckpt.save_model(model, p, force_contiguous=False)
        self.assertEqual(ckpt.load_file(p)["tbuf"].stride(), (1, 3))
        fresh = torch.nn.Linear(3, 2)
        fresh.register_buffer("tbuf", torch.zeros(3, 2))
        self.assertEqual(ckpt.load_model(fresh, p), (set(), []))
        assert_same(self, model.tbuf.contiguous(), fresh.tbuf.contiguous())

    def test_save_model_metadata(self):
        p = self.path("m.ckpt")
        ckpt.save_model(TiedLM(), p, metadata={"arch": "tied"})
        with ckpt.safe_open(p) as f:
            self.assertEqual(f.metadata(), {"arch": "tied"})


class ModelTies(CompatCase):
    """save_model/load_model cases safetensors cannot save, run without it."""

    def test_buffer_viewing_another_buffer_every_backend(self):
        src = ViewingBuffer()
        src.full.copy_(torch.arange(12.0) * 3)
        p = self.path("v.ckpt")
        ckpt.save_model(src, p)
        for backend in ("mmap", "pread"):
            fresh = ViewingBuffer()
            self.assertEqual(ckpt.load_model(fresh, p, backend=backend), (set(), []), backend)
            assert_same(self, src.full, fresh.full, backend)
            self.assertEqual(fresh.part.tolist(), [6.0, 9.0, 12.0], backend)
            self.assertEqual(ckpt.load_model(ViewingBuffer(at=3), p, strict=False,
                                             backend=backend), (set(), ["part"]), backend)

    def test_force_contiguous_keeps_ties(self):
        # One non-contiguous Parameter under two names: packed once, so the
        # file's two names share memory as the model's do. safetensors
        # cannot save this model at all (its _end_ptr views it as 1-d).
        class T(torch.nn.Module):
            def __init__(self, extra=False):
                super().__init__()
                self.a, self.b = torch.nn.Module(), torch.nn.Module()
                w = torch.nn.Parameter(torch.randn(4, 3).t())
                self.a.w = self.b.w = w
                if extra:  # another view of the same storage, contiguous
                    self.register_buffer("base", w.detach().t())

        for extra in (False, True):
            src = T(extra)
            p = self.path("t.ckpt")
            ckpt.save_model(src, p)
            got = ckpt.load_file(p)
            self.assertEqual(got["a.w"].data_ptr(), got["b.w"].data_ptr(), extra)
            fresh = T(extra)
            self.assertEqual(ckpt.load_model(fresh, p), (set(), []), extra)
            assert_same(self, src.a.w.detach(), fresh.a.w.detach(), extra)
            self.assertIs(fresh.a.w, fresh.b.w)
            if not extra:
                self.assertTrue(got["a.w"].is_contiguous())
            else:  # packing w would part it from base: ties win, strides kept
                self.assertEqual(got["a.w"].stride(), (1, 3))


class OpenAnyKind(CompatCase):
    """ckpt.open of ckpt, .pth and .safetensors files: one File API."""

    def kinds(self):
        tensors = {"w": torch.arange(24.0).reshape(6, 4), "a/b": torch.ones(3),
                   "i": torch.arange(5)}
        paths = {"ckpt": self.path("f.ckpt"), "pth": self.path("f.pth")}
        ckpt.save(tensors, paths["ckpt"], metadata={"k": "v"})
        torch.save(tensors, paths["pth"])
        if st is not None:
            paths["st"] = self.path("f.safetensors")
            st.save_file(tensors, paths["st"], metadata={"k": "v"})
        return tensors, paths

    def test_same_interface_for_every_kind(self):
        tensors, paths = self.kinds()
        for kind, p in paths.items():
            with ckpt.open(p) as f:
                self.assertIsInstance(f, ckpt.File)
                self.assertEqual(f.path, p)
                self.assertEqual(f.keys(), ["a~1b", "i", "w"], kind)
                self.assertEqual(list(f), ["a~1b", "i", "w"], kind)
                self.assertEqual(len(f), 3)
                self.assertIn("w", f)
                self.assertNotIn("nope", f)
                assert_same(self, tensors["w"], f["w"], kind)
                assert_same(self, tensors["a/b"], f.get_tensor("a~1b"), kind)
                assert_same(self, tensors["w"][2:5], f.get_slice("w")[2:5], kind)
                assert_same(self, tensors["w"][1, 2:], f.get_slice("w")[1, 2:], kind)
                self.assertEqual(f.get_slice("w").get_shape(), [6, 4])
                self.assertEqual(f.kind(""), "dict")
                self.assertEqual(f.kind("w"), "tensor")
                assert_same(self, tensors["i"], f.get("i"), kind)
                whole = f.load()
                self.assertEqual(sorted(whole), sorted(tensors), kind)
                for k in tensors:
                    assert_same(self, tensors[k], whole[k], f"{kind}:{k}")
                assert_same(self, tensors["w"], f.load("w"), kind)
                self.assertEqual(f.load(device="meta")["w"].device.type, "meta")
                self.assertEqual(f.metadata, {"k": "v"} if kind != "pth" else f.metadata)
                with self.assertRaises(ckpt.NotFoundError):
                    f["nope"]
                with self.assertRaises(ckpt.NotFoundError):
                    f.load("nope")
                if kind == "st":
                    with self.assertRaisesRegex(ckpt.UnsupportedError, "no checksums"):
                        f.verify()
                else:
                    f.verify()
                kept = f["w"]
            with self.assertRaises(ValueError, msg=kind):
                f.keys()
            del f
            assert_same(self, tensors["w"], kept, f"{kind}: a view after close()")
            # ckpt.load and File.load agree on every kind.
            loaded = ckpt.load(p)
            for k in tensors:
                assert_same(self, loaded[k], whole[k], f"{kind}:{k}")

    def test_pth_errors_name_the_users_file(self):
        _, paths = self.kinds()
        with ckpt.open(paths["pth"]) as f:
            for call in (lambda: f["nope"], lambda: f.get_slice("nope"),
                         lambda: f.get("nope"), lambda: f.kind("nope"),
                         lambda: f.load("nope")):
                with self.assertRaises(ckpt.NotFoundError) as e:
                    call()
                self.assertIn(paths["pth"], str(e.exception))
                self.assertNotIn("converted", str(e.exception))
            with self.assertRaises(IndexError):
                f.get_slice("w")[10]
        # A refused pickle names the .pth too.
        evil = self.path("evil.pth")
        with open(evil, "wb") as out:
            out.write(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
        with self.assertRaises(ckpt.PickleRefusedError) as e:
            ckpt.open(evil)
        self.assertIn(evil, str(e.exception))

    def test_pth_leaves_no_temporary_file(self):
        _, paths = self.kinds()
        tmp = tempfile.mkdtemp(prefix="ckpt-tmpdir-", dir=self.dir)
        old = os.environ.get("CKPT_TMPDIR")
        os.environ["CKPT_TMPDIR"] = tmp
        try:
            f = ckpt.open(paths["pth"])
            self.assertEqual(os.listdir(tmp), [])  # mapped, then unlinked
            self.assertEqual(f["w"].sum().item(), sum(range(24)))
            f.close()
        finally:
            if old is None:
                del os.environ["CKPT_TMPDIR"]
            else:
                os.environ["CKPT_TMPDIR"] = old

    @NEEDS_ST
    def test_bad_safetensors_is_a_format_error(self):
        p = self.path("bad.safetensors")
        with open(p, "wb") as out:
            out.write((1 << 40).to_bytes(8, "little") + b'{"x": 1}')
        with self.assertRaises(ckpt.FormatError) as e:
            ckpt.open(p)
        self.assertIn(p, str(e.exception))

    @NEEDS_ST
    def test_safetensors_package_missing(self):
        _, paths = self.kinds()
        code = textwrap.dedent('''
            import sys
            sys.modules["safetensors"] = None  # as if not installed
            import ckpt
            for call in (ckpt.open, ckpt.safe_open, ckpt.load_file):
                try:
                    call(sys.argv[1])
                except ImportError as e:
                    assert "needs the safetensors package" in str(e), e
                else:
                    raise AssertionError(call)
            with ckpt.safe_open(sys.argv[2]) as f:  # other kinds do not need it
                assert f.keys() == ["a/b", "i", "w"], f.keys()
            ''')
        r = subprocess.run([sys.executable, "-c", code, paths["st"], paths["ckpt"]],
                           env=python_env(), capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])

    def test_not_a_checkpoint(self):
        p = self.path("junk")
        with open(p, "wb") as out:
            out.write(b"just some text, no magic")
        with self.assertRaises(ckpt.FormatError):
            ckpt.open(p)
        with self.assertRaises(FileNotFoundError):
            ckpt.open(self.path("missing"))


CHILD_NO_TORCH = """
import importlib.util
import sys
import ckpt
assert "torch" not in sys.modules and "numpy" not in sys.modules, sorted(sys.modules)
names = dir(ckpt)
exported = ckpt.__all__
have_torch = all(importlib.util.find_spec(m) for m in ("torch", "numpy"))
lazy = ["open", "safe_open", "load_file", "save", "load", "CheckpointManager", "_save"]
for n in ["__version__", "FORMAT_VERSION", "FormatError", "CkptError"]:
    assert n in names, n
for n in ["FormatError", "CkptError", "CudaError"]:
    assert n in exported, n
for n in exported + lazy:
    # Without torch, dir() and __all__ hold only what loads: `from ckpt
    # import *`, inspect.getmembers and pydoc work there.
    assert (n in names) == (have_torch or n not in lazy), n
    assert n.startswith("_") or n == "open" or (n in exported) == (n in names), n
assert "torch" not in sys.modules and "numpy" not in sys.modules, sorted(sys.modules)
assert issubclass(ckpt.FormatError, ckpt.CkptError)
print(ckpt.__version__)
"""


class LazyImport(unittest.TestCase):
    def test_import_ckpt_imports_no_torch(self):
        code = CHILD_NO_TORCH + textwrap.dedent("""
            from ckpt import save, load
            import torch
            assert save is ckpt.save and load is ckpt.load and ckpt.open is ckpt._compat.open
            """)
        r = subprocess.run([sys.executable, "-c", code], env=python_env(),
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_first_use_under_a_lowered_recursion_limit(self):
        # torch's import nests deeper than 100 frames; `import ckpt` used
        # to import it, so a limit lowered afterwards must not break it.
        code = textwrap.dedent('''
            import sys, ckpt
            sys.setrecursionlimit(60)
            ckpt.load_file
            assert sys.getrecursionlimit() == 60
            ''')
        r = subprocess.run([sys.executable, "-c", code], env=python_env(),
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])

    def test_unknown_names_are_attribute_errors(self):
        with self.assertRaises(AttributeError):
            ckpt.no_such_name  # noqa: B018
        self.assertFalse(hasattr(ckpt, "no_such_name"))
        self.assertFalse(hasattr(ckpt, "__no_such_dunder__"))
        for n in ckpt.__all__:
            self.assertIn(n, dir(ckpt))

    def test_submodules_are_attributes_on_first_use(self):
        # An eager `from . import rng` made every module an attribute;
        # `ckpt._save.save` after a bare `import ckpt` keeps working.
        code = textwrap.dedent('''
            import sys, ckpt
            assert "_save" in dir(ckpt) and "interop" in dir(ckpt), dir(ckpt)
            assert "__main__" not in dir(ckpt)
            assert ckpt._save.save is ckpt.save
            assert ckpt.rng.get_state
            assert ckpt._dtypes.CODES
            ''')
        r = subprocess.run([sys.executable, "-c", code], env=python_env(),
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])

    def test_cli_in_a_venv_without_torch(self):
        d = tempfile.mkdtemp(prefix="ckpt-notorch-")
        try:
            # Only the package (a copy), so no site-packages with torch comes along.
            pkg = os.path.dirname(os.path.abspath(ckpt.__file__))
            shutil.copytree(pkg, os.path.join(d, "lib", "ckpt"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                            os.path.join(d, "venv")], check=True, timeout=120)
            py = os.path.join(d, "venv", "bin", "python")
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
            env["PYTHONPATH"] = os.path.join(d, "lib")
            probe = subprocess.run([py, "-c", "import torch"], env=env, capture_output=True,
                                   timeout=120)
            if probe.returncode == 0:
                self.skipTest("this interpreter's venvs see a torch")
            r = subprocess.run([py, "-m", "ckpt", "verify", GOLDEN], env=env,
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("OK", r.stdout.upper())
            code = CHILD_NO_TORCH + textwrap.dedent("""
                try:
                    ckpt.save
                except ImportError as e:
                    assert "needs torch and numpy" in str(e), e
                else:
                    raise AssertionError("ckpt.save without torch")
                import inspect
                members = dict(inspect.getmembers(ckpt))
                assert "FormatError" in members and "save" not in members, sorted(members)
                space = {}
                exec("from ckpt import *", space)
                assert "FormatError" in space and "save" not in space, sorted(space)
                # Python cannot make one exception both an ImportError and an
                # AttributeError (their layouts conflict): hasattr raises the
                # ImportError, documented in docs/PYTHON.md.
                try:
                    hasattr(ckpt, "load")
                except ImportError as e:
                    assert "needs torch and numpy" in str(e), e
                else:
                    raise AssertionError("hasattr(ckpt, 'load') without torch")
                """)
            r = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True,
                               timeout=120)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        finally:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
