"""What torch 2.x adds, end to end (issue 12 item 2): the uint16/32/64,
float8 and float4 dtypes through ckpt.save/load/open, .pth import and
safetensors; torch.load(weights_only=True) as the reference; files with
add_safe_globals-style custom types (refused by name, nothing run); the
storage_alignment and compute_crc32 save options; torch.compile state dicts
(`_orig_mod.` prefixes); meta-device models filled with assign=True.

Under torch 1.13 every test here is skipped with the reason printed.
"""
import collections
import dataclasses
import enum
import os
import unittest

import torch

import ckpt
from util import TempDirCase, assert_same, tensor_bytes

TORCH2 = int(torch.__version__.split(".")[0]) >= 2
NEW_DTYPES = ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
              "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2"]
# Each is tested where this torch has it (uint16/32/64 came in 2.3,
# float8_e8m0fnu and float4_e2m1fn_x2 in 2.7); the rest are named as skipped.
PRESENT = [n for n in NEW_DTYPES if isinstance(getattr(torch, n, None), torch.dtype)]
MISSING = [n for n in NEW_DTYPES if n not in PRESENT]
try:
    import torch.utils.serialization.config as ser_config  # torch >= 2.5
except ImportError:
    ser_config = None
try:
    import safetensors.torch as st
except ImportError:
    st = None

needs_dtypes = unittest.skipUnless(
    PRESENT, f"torch {torch.__version__} has none of {', '.join(NEW_DTYPES)} (torch 2.x only)")
needs_torch2 = unittest.skipUnless(TORCH2, f"torch {torch.__version__}: a torch 2.x feature")


def new_dtype_tensors():
    """Each new dtype as a (2, 3) tensor of varied bit patterns (NaNs, the
    top bit of uint64) and a strided view of it."""
    g = torch.Generator().manual_seed(2)
    out = {}
    for name in PRESENT:
        dt = getattr(torch, name)
        size = torch.empty(0, dtype=dt).element_size()
        raw = torch.randint(0, 256, (6 * size,), dtype=torch.uint8, generator=g)
        raw[:size] = 255  # all ones: NaN for the floats, the maximum for uints
        # No CPU kernels make most of these: reinterpret bytes instead.
        t = raw.view(dt).view(2, 3)
        out[name] = t
        out[name + "_col"] = t[:, 1]  # a strided view sharing t's storage
    return out


def same_bits(tc, a, b, what):
    tc.assertEqual(a.dtype, b.dtype, what)
    tc.assertEqual(a.shape, b.shape, what)
    tc.assertEqual(tensor_bytes(a), tensor_bytes(b), f"{what}: bytes differ")


@needs_dtypes
class NewDtypes(TempDirCase):
    def setUp(self):
        super().setUp()
        if MISSING:
            print(f"  (torch {torch.__version__} lacks {', '.join(MISSING)}: not tested)")

    def test_save_load_open(self):
        obj = {"model": new_dtype_tensors(), "step": 7}
        p = self.path("x.ckpt")
        ckpt.save(obj, p)
        assert_same(self, obj, ckpt.load(p))
        assert_same(self, obj, ckpt.load(p, mmap=True))
        with ckpt.open(p) as f:
            for name, t in obj["model"].items():
                same_bits(self, t, f[f"model/{name}"], name)
            for name in PRESENT:
                want = obj["model"][name]
                same_bits(self, want[1:], f.get_slice(f"model/{name}")[1:], f"{name} rows")
                self.assertEqual(f.get_slice(f"model/{name}").dtype, want.dtype)
            assert_same(self, obj["model"], f.load("model"))

    def test_pth_import(self):
        obj = new_dtype_tensors()
        for legacy in (False, True):
            with self.subTest(legacy=legacy):
                p = self.path(f"x{int(legacy)}.pth")
                torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
                try:
                    ref = torch.load(p, weights_only=True)  # the reference reader
                    assert_same(self, obj, ref)
                except AttributeError:
                    # torch 2.x writes these dtypes to a legacy-format file
                    # as UntypedStorage, which its own legacy reader cannot
                    # read back (weights_only or not): 'UntypedStorage' has
                    # no attribute 'dtype'. The saved object is the reference.
                    self.assertTrue(legacy, "torch.load failed on a zip file")
                    ref = obj
                assert_same(self, ref, ckpt.load(p))
                assert_same(self, ref, ckpt.load(p, mmap=True))
                out = self.path(f"x{int(legacy)}.ckpt")
                self.assertEqual(ckpt.import_pth(p, out), len(obj))
                assert_same(self, ref, ckpt.load(out))
                if not legacy:  # torch.load(mmap=True) reads zip files only
                    assert_same(self, ref, torch.load(p, mmap=True, weights_only=True))

    @unittest.skipIf(st is None, "safetensors is not installed")
    def test_safetensors(self):
        obj = {k: v for k, v in new_dtype_tensors().items() if not k.endswith("_col")}
        supported = {}
        for name, t in obj.items():
            try:
                st.save_file({name: t}, self.path("probe.safetensors"))
                supported[name] = t
            except (ValueError, TypeError, KeyError) as e:
                print(f"  (safetensors {st.__name__} cannot store {name}: {e})")
        self.assertIn("float8_e4m3fn", supported, "safetensors >= 0.4 stores float8")
        # ckpt -> safetensors: safetensors reads back the same bits.
        p = self.path("from_ckpt.safetensors")
        ckpt.save_safetensors(supported, p)
        back = st.load_file(p)
        for name, t in supported.items():
            same_bits(self, t, back[name], f"save_safetensors {name}")
        # safetensors -> ckpt: convert and load.
        src = self.path("src.safetensors")
        st.save_file(supported, src, metadata={"format": "pt"})
        dst = self.path("conv.ckpt")
        self.assertEqual(ckpt.convert(src, dst), len(supported))
        got = ckpt.load(dst)
        direct = ckpt.load(src)
        for name, t in supported.items():
            same_bits(self, t, got[name], f"convert {name}")
            same_bits(self, t, direct[name], f"ckpt.load(.safetensors) {name}")



# Not a torch 2.x feature: runs under every torch (outside @needs_dtypes).
class Sniffing(TempDirCase):
    @unittest.skipIf(st is None, "safetensors is not installed")
    def test_sniff_safetensors_header_length_0x80(self):
        # A safetensors header of 0x80 + 256k bytes starts the file with
        # 0x80, a pickle's PROTO opcode: sniff_bytes takes it for a legacy
        # .pth, and convert/load hand it to the .pth importer, which refuses.
        obj = {"w": torch.ones(2)}
        src = self.path("odd.safetensors")
        for n in range(400):
            st.save_file(obj, src, metadata={"pad": "x" * n})
            if open(src, "rb").read(1) == b"\x80":
                break
        self.assertEqual(open(src, "rb").read(1), b"\x80")
        assert_same(self, obj, ckpt.load(src))
        ckpt.convert(src, self.path("odd.ckpt"))
        assert_same(self, obj, ckpt.load(self.path("odd.ckpt")))


# ---- add_safe_globals-style custom types ---------------------------------------------------

RAN = []  # what custom code has run: must stay empty for ckpt


@dataclasses.dataclass
class TrainConfig:
    lr: float
    layers: int

    def __setstate__(self, state):  # torch.load calls this for allowed classes
        RAN.append("TrainConfig.__setstate__")
        self.__dict__.update(state)


class Color(enum.Enum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


class TaggedTensor(torch.Tensor):
    pass


@needs_torch2
class SafeGlobals(TempDirCase):
    """Files that torch.load(weights_only=True) reads only after
    torch.serialization.add_safe_globals([...]): the importer must refuse
    them by name (or import them), never run their code."""

    def setUp(self):
        super().setUp()
        if not hasattr(torch.serialization, "add_safe_globals"):
            self.skipTest(f"torch {torch.__version__} has no add_safe_globals (2.4+)")
        del RAN[:]

    def check_refused(self, obj, name, safe):
        p = self.path(f"{name}.pth")
        torch.save(obj, p)
        with self.assertRaises(Exception):  # torch's default refuses it too
            torch.load(p, weights_only=True)
        if safe is not None:  # ... and reads it once the type is allowed
            with torch.serialization.safe_globals(safe):
                torch.load(p, weights_only=True)
        del RAN[:]
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(p)
        for load in (lambda: ckpt.load(p), lambda: ckpt.load(p, mmap=True),
                     lambda: ckpt.import_pth(p, self.path(f"{name}.ckpt"))):
            with self.assertRaises(ckpt.PickleRefusedError) as cm:
                load()
            msg = str(cm.exception)
            self.assertIn("forbidden global", msg)
            self.assertIn("nothing was run", msg)
            # The name ckpt gives is one torch names as unsafe too.
            self.assertTrue(any(f"'{u.rsplit('.', 1)[0]} {u.rsplit('.', 1)[1]}'" in msg for u in unsafe),
                            f"{msg} names none of {unsafe}")
        self.assertEqual(RAN, [], "the importer ran code from the file")
        self.assertFalse(os.path.exists(self.path(f"{name}.ckpt")))
        self.assertNoTemporaries()
        return msg

    def test_dataclass(self):
        obj = {"w": torch.ones(2), "cfg": TrainConfig(0.1, 3)}
        p = self.path("probe.pth")
        torch.save(obj, p)
        with torch.serialization.safe_globals([TrainConfig]):
            back = torch.load(p, weights_only=True)
        self.assertEqual(back["cfg"], obj["cfg"])
        self.assertEqual(RAN, ["TrainConfig.__setstate__"], "torch.load runs the class's code")
        msg = self.check_refused(obj, "dataclass", [TrainConfig])
        self.assertIn(f"'{__name__} TrainConfig'", msg)

    def test_namedtuple(self):
        msg = self.check_refused({"p": Point(1, 2)}, "namedtuple", [Point])
        self.assertIn(f"'{__name__} Point'", msg)

    def test_tensor_subclass(self):
        msg = self.check_refused({"w": torch.ones(2).as_subclass(TaggedTensor)}, "subclass",
                                 [TaggedTensor])
        self.assertIn(f"'{__name__} TaggedTensor'", msg)

    def test_enum(self):
        # Python pickles an Enum member as getattr(Color, "RED"): refused at
        # getattr, the first global in the pickle; torch refuses it even
        # with Color allowed.
        msg = self.check_refused({"c": Color.RED}, "enum", None)
        self.assertIn("'builtins getattr'", msg)

    def test_counter(self):
        # torch's default weights_only allowlist has collections.Counter;
        # ckpt's has only OrderedDict (the file format has no Counter kind),
        # so it refuses it by name rather than load it as a plain dict.
        p = self.path("counter.pth")
        obj = {"vocab": collections.Counter(a=2, b=1)}
        torch.save(obj, p)
        self.assertEqual(torch.load(p, weights_only=True), obj)
        with self.assertRaises(ckpt.PickleRefusedError) as cm:
            ckpt.load(p)
        self.assertIn("'collections Counter'", str(cm.exception))


@needs_torch2
class TensorAttributes(TempDirCase):
    """torch 2.x pickles a Parameter's Python attributes
    (_rebuild_parameter_with_state; torch 1.13 drops them at save): the
    importer refuses them as it refuses a plain tensor's, never drops them
    silently."""

    def test_parameter_with_attributes_is_refused(self):
        p = torch.nn.Parameter(torch.ones(2))
        p.tensor_model_parallel = True  # as Megatron tags its parameters
        f = self.path("param_attr.pth")
        torch.save({"p": p}, f)
        back = torch.load(f, weights_only=True)["p"]
        self.assertTrue(back.tensor_model_parallel)  # torch keeps it
        for load in (lambda: ckpt.load(f), lambda: ckpt.import_pth(f, self.path("x.ckpt"))):
            with self.assertRaises(ckpt.PickleRefusedError) as cm:
                load()
            self.assertIn("extra Python attributes", str(cm.exception))
        self.assertFalse(os.path.exists(self.path("x.ckpt")))
        self.assertNoTemporaries()
        # Without attributes it is a Parameter as before.
        torch.save({"p": torch.nn.Parameter(torch.ones(2))}, f)
        self.assertIsInstance(ckpt.load(f)["p"], torch.nn.Parameter)

    def test_tensor_with_attributes_is_refused(self):
        t = torch.ones(3)
        t.note = "x"
        f = self.path("tensor_attr.pth")
        torch.save({"t": t}, f)
        self.assertEqual(torch.load(f, weights_only=True)["t"].note, "x")
        with self.assertRaises(ckpt.PickleRefusedError) as cm:
            ckpt.load(f)
        self.assertIn("extra Python attributes", str(cm.exception))


# ---- torch.save's serialization options -------------------------------------------------------

@unittest.skipIf(ser_config is None, f"torch {torch.__version__} has no "
                 "torch.utils.serialization.config (2.5+)")
class SaveOptions(TempDirCase):
    def state(self):
        g = torch.Generator().manual_seed(3)
        return {"w": torch.randn(5, 7, generator=g), "b": torch.arange(3, dtype=torch.int16),
                "h": torch.randn(9, generator=g).half(), "view": torch.arange(10.0)[3:7]}

    def saved_with(self, name, **opts):
        old = {k: getattr(ser_config.save, k) for k in opts}
        try:
            for k, v in opts.items():
                setattr(ser_config.save, k, v)
            p = self.path(name)
            torch.save(self.state(), p)
        finally:
            for k, v in old.items():
                setattr(ser_config.save, k, v)
        return p

    def test_storage_alignment_and_crc(self):
        for name, opts in (("align1", {"storage_alignment": 1}),
                           ("align8", {"storage_alignment": 8}),
                           ("align4096", {"storage_alignment": 4096}),
                           ("nocrc", {"compute_crc32": False}),
                           ("nocrc_align4096", {"compute_crc32": False, "storage_alignment": 4096})):
            with self.subTest(name):
                p = self.saved_with(name + ".pth", **opts)
                ref = torch.load(p, weights_only=True)
                assert_same(self, self.state(), ref)
                assert_same(self, ref, ckpt.load(p))
                assert_same(self, ref, ckpt.load(p, mmap=True))
                out = self.path(name + ".ckpt")
                ckpt.import_pth(p, out)
                assert_same(self, ref, ckpt.load(out))
                with ckpt.open(out) as f:
                    want = "not computed" if not opts.get("compute_crc32", True) else "checked"
                    self.assertIn(want, f.metadata.get("source_crc32", ""), f.metadata)

    def test_skip_data_file_is_refused(self):
        # torch.serialization.skip_data() (2.5+) writes the pickle but not the
        # tensor bytes (their records hold whatever was on disk, CRC-32 0):
        # torch.load gives uninitialized tensors, ckpt must not convert that
        # into a checkpoint that passes verify.
        if not hasattr(torch.serialization, "skip_data"):
            self.skipTest(f"torch {torch.__version__} has no serialization.skip_data")
        p = self.path("skip.pth")
        with torch.serialization.skip_data():
            torch.save({"w": torch.ones(4)}, p)
        self.assertEqual(torch.load(p, weights_only=True)["w"].shape, (4,))
        out = self.path("skip.ckpt")
        for load in (lambda: ckpt.load(p), lambda: ckpt.import_pth(p, out)):
            with self.assertRaises(ckpt.CkptError) as cm:
                load()
            self.assertIn("CRC-32", str(cm.exception))
        self.assertFalse(os.path.exists(out))


# ---- torch.compile and meta-device models -------------------------------------------------

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def trained_net():
    torch.manual_seed(4)
    m = Net()
    m.train()
    m(torch.randn(16, 6))  # running stats and num_batches_tracked move
    return m.eval()


@needs_torch2
class Compiled(TempDirCase):
    def test_orig_mod_prefix(self):
        m = trained_net()
        # backend="eager": dynamo traces the model for real, but without
        # inductor's C++ compile (about 20 s for a first call on this CPU).
        cm = torch.compile(m, backend="eager")
        x = torch.randn(4, 6)
        with torch.no_grad():
            want = m(x)
            self.assertTrue(torch.equal(cm(x), want))
        sd = cm.state_dict()
        self.assertTrue(all(k.startswith("_orig_mod.") for k in sd), list(sd))
        p = self.path("compiled.ckpt")
        ckpt.save(sd, p)
        back = ckpt.load(p)
        assert_same(self, sd, back)
        with ckpt.open(p) as f:
            self.assertEqual(sorted(f.keys()), sorted(sd))
        # Into a compiled model as saved ...
        cm2 = torch.compile(Net().eval(), backend="eager")
        cm2.load_state_dict(back)
        with torch.no_grad():
            self.assertTrue(torch.equal(cm2(x), want))
        # ... and into the plain model after stripping the prefix, as users do.
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(back, "_orig_mod.")
        self.assertEqual(list(back), list(m.state_dict()))
        plain = Net().eval()
        plain.load_state_dict(back, strict=True)
        with torch.no_grad():
            self.assertTrue(torch.equal(plain(x), want))


@needs_torch2
class MetaDevice(TempDirCase):
    def setUp(self):
        super().setUp()
        import inspect
        if "assign" not in inspect.signature(torch.nn.Module.load_state_dict).parameters:
            self.skipTest(f"torch {torch.__version__}: load_state_dict has no assign= (2.1+)")

    def check_filled(self, model, src, want, x):
        self.assertFalse(any(t.is_meta for t in model.state_dict().values()), "meta tensors left")
        for name, p in model.named_parameters():
            self.assertIsInstance(p, torch.nn.Parameter, name)
            self.assertTrue(p.requires_grad, name)
        for k, t in src.state_dict().items():
            assert_same(self, t.detach(), model.state_dict()[k].detach(), k)
        with torch.no_grad():
            self.assertTrue(torch.equal(model(x), want))

    def test_assign_from_load_and_open(self):
        m = trained_net()
        x = torch.randn(4, 6)
        with torch.no_grad():
            want = m(x)
        p = self.path("net.ckpt")
        ckpt.save(m.state_dict(), p)
        for how in ("load", "load_mmap", "open"):
            with self.subTest(how):
                with torch.device("meta"):
                    meta = Net()
                self.assertTrue(meta.fc1.weight.is_meta)
                if how == "open":
                    with ckpt.open(p) as f:
                        sd = {k: f[k] for k in f.keys()}
                else:
                    sd = ckpt.load(p, mmap=how == "load_mmap")
                meta.load_state_dict(sd, assign=True)
                meta.eval()
                self.check_filled(meta, m, want, x)
                if how == "open":
                    # The views stay valid after close, and training writes
                    # to them without touching the file.
                    before = open(p, "rb").read()
                    with torch.no_grad():
                        meta.fc1.weight.add_(1)
                    self.assertEqual(open(p, "rb").read(), before)


if __name__ == "__main__":
    unittest.main()
