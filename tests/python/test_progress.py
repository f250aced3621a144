"""progress= of ckpt.load, ckpt.save, the conversions and CheckpointManager:
a callable sees done values that start at 0, never decrease and end at
the total; progress=True draws tqdm's bar when tqdm is importable and a
plain carriage-return line when it is not."""
import contextlib
import io
import os
import sys
import unittest
from unittest import mock

import numpy as np
import torch

import ckpt
from util import TempDirCase, assert_same

try:
    import tqdm  # noqa: F401
    HAVE_TQDM = True
except ImportError:
    HAVE_TQDM = False

MiB = 1 << 20


class Calls:
    """A progress callable that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, done, total):
        self.calls.append((done, total))

    def check(self, tc, total=None):
        """The calls' contract; returns the total."""
        c = self.calls
        tc.assertGreaterEqual(len(c), 1, c)
        tc.assertEqual(c[0][0], 0, c)
        tot = c[-1][1]
        if tot:
            tc.assertGreaterEqual(len(c), 2, c)  # 0, ..., total
        if total is not None:
            tc.assertEqual(tot, total, c)
        tc.assertEqual(c[-1][0], tot, c)
        dones = [d for d, _ in c]
        tc.assertEqual(dones, sorted(dones), f"done decreased: {c}")
        tc.assertTrue(all(d <= t for d, t in c), c)
        tc.assertTrue(all(t == tot for _, t in c), f"the total changed: {c}")
        tc.assertEqual(len(set(c)), len(c), f"a call repeated: {c}")
        return tot


def state(n_big=3, big=24 * MiB):
    """Storages large enough to be reported in several batches (the load
    reads in batches of at least 64 MiB), shared ones and numpy arrays."""
    w = torch.arange(big // 4, dtype=torch.float32)
    s = {f"layer{i}": (w + i) for i in range(n_big)}
    s["view"] = s["layer0"][10:20]          # shares layer0's storage
    s["small"] = torch.ones(3, dtype=torch.float64)
    s["arr"] = np.arange(5, dtype=np.int32)
    s["meta"] = {"step": 3, "name": "x"}
    return s


def storage_bytes(n_big=3, big=24 * MiB):
    return n_big * big + 3 * 8 + 5 * 4


def hide_tqdm():
    """Makes `import tqdm` (and tqdm.auto) fail, as where it is not installed."""
    names = {k: None for k in list(sys.modules) if k == "tqdm" or k.startswith("tqdm.")}
    names.update({"tqdm": None, "tqdm.auto": None})
    return mock.patch.dict(sys.modules, names)


class CallableProgress(TempDirCase):
    def test_save_and_load(self):
        p = self.path("a.ckpt")
        s = state()
        cb = Calls()
        ckpt.save(s, p, progress=cb)
        cb.check(self, storage_bytes())
        self.assertGreaterEqual(len(cb.calls), 5, "per storage")
        # Many storages: the sink hears of them at most ~256 times.
        many = {f"t{i}": torch.ones(10) for i in range(3000)}
        cb = Calls()
        ckpt.save(many, self.path("many.ckpt"), progress=cb)
        cb.check(self, 3000 * 40)
        self.assertLessEqual(len(cb.calls), 258)
        self.assertGreaterEqual(len(cb.calls), 200)
        # A copying load: batches of >= 64 MiB, so the value moves before the end.
        cb = Calls()
        out = ckpt.load(p, progress=cb)
        cb.check(self, storage_bytes())
        self.assertTrue(any(0 < d < storage_bytes() for d, _ in cb.calls), cb.calls)
        assert_same(self, ckpt.load(p), out)
        for kw in ({"mmap": True}, {"map_location": "meta"}, {"map_location": "cpu"}):
            cb = Calls()
            ckpt.load(p, progress=cb, **kw)
            cb.check(self, storage_bytes())

    def test_empty_and_tensor_free(self):
        p = self.path("e.ckpt")
        for obj in ({"a": 1}, torch.empty(0)):
            cb = Calls()
            ckpt.save(obj, p, progress=cb)
            cb.check(self, 0)
            cb = Calls()
            ckpt.load(p, progress=cb)
            cb.check(self, 0)

    def test_file_load_and_streams(self):
        p = self.path("a.ckpt")
        ckpt.save(state(), p)
        cb = Calls()
        with ckpt.open(p) as f:
            sub = f.load("layer1", progress=cb)
        cb.check(self, 24 * MiB)
        self.assertEqual(sub.shape, (6 * MiB,))
        buf = io.BytesIO()
        cb = Calls()
        ckpt.save(state(1), buf, progress=cb)
        cb.check(self, storage_bytes(1))
        buf.seek(0)
        cb = Calls()
        ckpt.load(buf, progress=cb)
        cb.check(self, storage_bytes(1))

    def test_pth_load_counts_conversion_and_load(self):
        src = self.path("a.pth")
        s = {"w": torch.randn(20 * MiB // 4), "b": torch.ones(7), "v": None}
        s["w2"] = s["w"][1:]  # shared storage: converted once
        torch.save(s, src)
        nbytes = 20 * MiB + 7 * 4
        for mmap in (False, True):
            cb = Calls()
            out = ckpt.load(src, progress=cb, mmap=mmap)
            cb.check(self, 2 * nbytes)
            # The conversion moves the first half.
            self.assertTrue(any(nbytes // 2 < d <= nbytes for d, _ in cb.calls), cb.calls)
            assert_same(self, ckpt.load(src), out)

    def test_import_pth_and_convert(self):
        src = self.path("a.pth")
        torch.save({"w": torch.randn(100 * MiB // 4), "b": torch.arange(3)}, src)
        nbytes = 100 * MiB + 3 * 8
        cb = Calls()
        n = ckpt.import_pth(src, self.path("a.ckpt"), progress=cb)
        self.assertEqual(n, 2)
        cb.check(self, nbytes)
        # One 100 MiB storage: reported every 64 MiB within it.
        self.assertIn(64 * MiB, [d for d, _ in cb.calls])
        cb = Calls()
        ckpt.convert(src, self.path("b.ckpt"), progress=cb)
        cb.check(self, nbytes)
        assert_same(self, ckpt.load(self.path("a.ckpt")), ckpt.load(self.path("b.ckpt")))

    def test_convert_safetensors(self):
        try:
            import safetensors.torch as st
        except ImportError:
            self.skipTest("the safetensors package is not installed here")
        src = self.path("a.safetensors")
        st.save_file({"a": torch.ones(1000), "b": torch.zeros(3, dtype=torch.int64)}, src)
        cb = Calls()
        ckpt.convert(src, self.path("a.ckpt"), progress=cb)
        cb.check(self, 4000 + 24)
        cb = Calls()
        ckpt.load(src, progress=cb)
        cb.check(self, 4000 + 24)

    def test_manager(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=2)
        cb = Calls()
        m.save(state(1), step=1, progress=cb)
        cb.check(self, storage_bytes(1))
        cb = Calls()
        out = m.load_latest(progress=cb)
        cb.check(self, storage_bytes(1))
        assert_same(self, m.load_latest(), out)
        empty = ckpt.CheckpointManager(self.path("none"))
        cb = Calls()
        self.assertIsNone(empty.load_latest(progress=cb))
        self.assertEqual(cb.calls, [])

    def test_an_exception_from_the_callable_stops_the_work(self):
        class Stop(Exception):
            pass

        def stop_after_start(done, total):
            if done:
                raise Stop

        p = self.path("a.ckpt")
        with self.assertRaises(Stop):
            ckpt.save(state(), p, progress=stop_after_start)
        self.assertFalse(os.path.exists(p))
        self.assertNoTemporaries()
        ckpt.save(state(), p)
        with self.assertRaises(Stop):
            ckpt.load(p, progress=stop_after_start)
        # The importer stops inside C++ and the exception comes back out,
        # leaving no output.
        src = self.path("a.pth")
        torch.save({"w": torch.randn(100 * MiB // 4)}, src)
        out = self.path("i.ckpt")
        with self.assertRaises(Stop):
            ckpt.import_pth(src, out, progress=stop_after_start)
        self.assertFalse(os.path.exists(out))
        self.assertNoTemporaries()
        with self.assertRaises(Stop):
            ckpt.load(src, progress=stop_after_start)

    def test_done_equals_total_only_once_the_file_is_in_place(self):
        # A sink that logs "saved" at 100% must be right: (total, total)
        # comes after the commit, so raising there leaves the file.
        seen = []

        def at_total(done, total):
            if done == total and total:
                seen.append(os.path.exists(target))
                raise KeyboardInterrupt  # what a user's Ctrl-C at 100% is

        for name, run in (
                ("save", lambda t: ckpt.save(state(), t, progress=at_total)),
                ("import_pth", lambda t: ckpt.import_pth(src, t, progress=at_total))):
            src = self.path("b.pth")
            torch.save({"w": torch.randn(3 * MiB)}, src)
            target = self.path(f"{name}.ckpt")
            seen.clear()
            with self.assertRaises(KeyboardInterrupt):
                run(target)
            self.assertEqual(seen, [True], name)
            self.assertTrue(ckpt.open(target).keys(), name)
        # A save refused after its last storage (a value ckpt cannot hold)
        # never reports 100%.
        calls = Calls()
        with self.assertRaises(TypeError):
            ckpt.save({"a": torch.ones(1 << 20), "z": object()}, self.path("x.ckpt"),
                      progress=calls)
        self.assertTrue(all(d < t for d, t in calls.calls if t), calls.calls)

    def test_bad_argument(self):
        p = self.path("a.ckpt")
        for bad in ("yes", 1.5, object()):
            with self.assertRaises(TypeError):
                ckpt.save({"a": torch.ones(2)}, p, progress=bad)
        self.assertFalse(os.path.exists(p))
        ckpt.save({"a": torch.ones(2)}, p)
        with self.assertRaises(TypeError):
            ckpt.load(p, progress="yes")

    def test_off_by_default_writes_nothing(self):
        p = self.path("a.ckpt")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            ckpt.save(state(1), p)
            ckpt.load(p)
            ckpt.save(state(1), p, progress=False)
            ckpt.load(p, progress=None)
        self.assertEqual(err.getvalue(), "")


class Bars(TempDirCase):
    def run_with_bar(self, fn):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            fn()
        return err.getvalue()

    def test_plain_line_without_tqdm(self):
        p = self.path("a.ckpt")
        with hide_tqdm():
            with self.assertRaises(ImportError):
                import tqdm.auto  # noqa: F401
            out = self.run_with_bar(lambda: ckpt.save(state(), p, progress=True))
            self.assertIn("\rckpt.save a.ckpt: 0.00/0.08 GB", out)
            self.assertIn("100%", out)
            self.assertIn("GB/s", out)
            self.assertTrue(out.endswith("\n") and out.count("\n") == 1, repr(out))
            out = self.run_with_bar(lambda: ckpt.load(p, progress=True))
            self.assertIn("\rckpt.load a.ckpt: 0.08/0.08 GB 100%", out)
            self.assertTrue(out.endswith("\n"), repr(out))

    @unittest.skipUnless(HAVE_TQDM, "tqdm is not installed here (pip install tqdm)")
    def test_tqdm_bar(self):
        p = self.path("a.ckpt")
        out = self.run_with_bar(lambda: ckpt.save(state(), p, progress=True))
        self.assertIn("ckpt.save a.ckpt", out)
        self.assertIn("100%", out)
        self.assertRegex(out, r"[kMG]?B/s")
        out = self.run_with_bar(lambda: ckpt.load(p, progress=True))
        self.assertIn("ckpt.load a.ckpt", out)
        self.assertIn("75.5M/75.5M", out)  # bytes, decimal units

    def test_failed_work_closes_the_bar(self):
        p = self.path("a.ckpt")
        with hide_tqdm():
            out = self.run_with_bar(lambda: self.assertRaises(
                TypeError, ckpt.save, {"a": torch.ones(2), "f": len}, p, progress=True))
        self.assertTrue(out.endswith("\n"), repr(out))  # the line is ended, not left open
        self.assertFalse(os.path.exists(p))


if __name__ == "__main__":
    unittest.main()
