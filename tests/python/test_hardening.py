"""The Python package against what torch users type and hostile files."""
import argparse
import collections
import errno
import fcntl
import io
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import unittest

import numpy as np
import torch

import ckpt
from ckpt import _ckpt
from util import TempDirCase, assert_same, python_env

CKPT_DIR = os.path.dirname(os.path.abspath(ckpt.__file__))


def run_child(code, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          env=python_env(), capture_output=True, text=True, timeout=timeout)


def _rehash(data, header):
    ho, hs = struct.unpack_from("<QQ", data, 32)
    data[ho:ho + hs] = header
    struct.pack_into("<Q", data, 48, _ckpt.xxh3_64(bytes(header)))
    struct.pack_into("<Q", data, 56, _ckpt.xxh3_64(bytes(data[:56])))


def patch_header(path, old, new, count=None):
    """Replaces the bytes `old` by `new` (same length) in the header of the
    ckpt file at `path` and refreshes both checksums: a well-formed file
    with hostile content that ckpt's writer would never produce."""
    assert len(old) == len(new)
    data = bytearray(open(path, "rb").read())
    ho, hs = struct.unpack_from("<QQ", data, 32)
    header = bytes(data[ho:ho + hs])
    n = header.count(old)
    assert n >= 1 and (count is None or n == count), (old, n)
    _rehash(data, header.replace(old, new))
    with open(path, "wb") as f:
        f.write(data)


def patch_node_kind(path, old, new):
    """Changes the kind of the one tree node of kind `old` to `new` (codes
    of schema/ckpt.fbs ValueKind), walking the FlatBuffers header by hand:
    uoffset to the root table, vtables of u16 field offsets."""
    data = bytearray(open(path, "rb").read())
    ho, hs = struct.unpack_from("<QQ", data, 32)
    h = bytearray(data[ho:ho + hs])
    u32 = lambda at: struct.unpack_from("<I", h, at)[0]  # noqa: E731

    def field(table, i):
        vt = table - struct.unpack_from("<i", h, table)[0]
        if 4 + 2 * i >= struct.unpack_from("<H", h, vt)[0]:
            return 0
        return struct.unpack_from("<H", h, vt + 4 + 2 * i)[0]

    root = u32(0)
    at = root + field(root, 3)  # Header.nodes
    vec = at + u32(at)
    hits = []
    for j in range(u32(vec)):
        elem = vec + 4 + 4 * j
        node = elem + u32(elem)
        off = field(node, 0)  # Node.kind
        if off and h[node + off] == old:
            hits.append(node + off)
    assert len(hits) == 1, hits
    h[hits[0]] = new
    _rehash(data, h)
    with open(path, "wb") as f:
        f.write(data)


LIST, TUPLE, FROZENSET = 8, 9, 12


# ---- 4: CheckpointManager prunes by save order --------------------------------

class ManagerRecency(TempDirCase):
    def steps(self, m):
        return sorted(i.step for i in m.list())

    def test_rollback_keeps_the_new_save(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=3)
        for s in range(1, 11):
            m.save({"s": s}, s)
        self.assertEqual(self.steps(m), [8, 9, 10])
        # Resume from step 5 (say 8-10 diverged): the next saves are 6, 7.
        info = m.save({"s": 6}, 6)
        self.assertTrue(os.path.exists(info.path), "save() returned a deleted path")
        self.assertEqual(ckpt.load(info.path), {"s": 6})
        self.assertEqual(self.steps(m), [6, 9, 10])
        self.assertEqual(m.latest().step, 6)  # the newest save, not the highest step
        info = m.save({"s": 7}, 7)
        self.assertTrue(os.path.exists(info.path))
        self.assertEqual(self.steps(m), [6, 7, 10])
        # A new manager (a restarted process) sees the same order.
        m2 = ckpt.CheckpointManager(self.path("run"), keep_last=3)
        self.assertEqual(m2.latest().step, 7)
        self.assertEqual(m2.load_latest(), {"s": 7})
        m2.save({"s": 8}, 8)
        self.assertEqual(self.steps(m2), [6, 7, 8])

    def test_keep_last_one_never_deletes_the_newest(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=1)
        m.save({"s": 10}, 10)
        info = m.save({"s": 3}, 3)
        self.assertEqual(self.steps(m), [3])
        self.assertTrue(os.path.exists(info.path))

    def test_equal_step_overwrites_and_counts_as_newest(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=2)
        m.save({"v": 1}, 1)
        m.save({"v": 2}, 2)
        m.save({"v": 3}, 1)  # step 1 again: replaces the file, now the newest
        self.assertEqual(self.steps(m), [1, 2])
        self.assertEqual(m.latest().step, 1)
        self.assertEqual(m.load_latest(), {"v": 3})
        m.save({"v": 4}, 3)  # prunes the oldest save: step 2
        self.assertEqual(self.steps(m), [1, 3])

    def test_out_of_order_steps(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=2)
        for s in (5, 1, 9, 3):
            info = m.save({"s": s}, s)
            self.assertTrue(os.path.exists(info.path))
        self.assertEqual(self.steps(m), [3, 9])
        self.assertEqual(m.latest().step, 3)

    def test_keep_best_ties_go_to_the_newest_save(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=1, keep_best=1,
                                   metric="loss")
        m.save({}, 7, metrics={"loss": 0.5})
        m.save({}, 2, metrics={"loss": 0.5})
        m.save({}, 4, metrics={"loss": 0.9})
        # Newest save: 4. Best: 0.5, tie between 7 and 2; 2 was saved later.
        self.assertEqual(self.steps(m), [2, 4])
        self.assertEqual(m.best().step, 2)

    def test_start_sweeps_only_temporaries_nobody_holds(self):
        # The manager removed every .step-N.ckpt.tmp-* at start, a live
        # writer's too (another process saving into the directory).
        d = self.path("run")
        os.makedirs(d)
        live, dead = (os.path.join(d, f".step-{n:010d}.ckpt.tmp-ckpt{n}AAAAA") for n in (1, 2))
        for p in (live, dead):
            with open(p, "wb") as f:
                f.write(b"x" * 100)
        fd = os.open(live, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as ckpt's writer holds it while writing
            ckpt.CheckpointManager(d)
            self.assertTrue(os.path.exists(live), "a live writer's temporary was removed")
            self.assertFalse(os.path.exists(dead), "a dead writer's temporary was kept")
        finally:
            os.close(fd)
        ckpt.CheckpointManager(d)
        self.assertFalse(os.path.exists(live))


# ---- 6: SIGINT during a save ------------------------------------------------

SIGINT_CHILD = r"""
import os, signal, sys, traceback
import torch, ckpt
path, seconds, ckpt_dir = sys.argv[1], float(sys.argv[2]), sys.argv[3]
armed = False
def handler(sig, frame):
    if armed:
        raise KeyboardInterrupt
signal.signal(signal.SIGINT, handler)
blob = torch.arange(1 << 18, dtype=torch.float32)
ckpt.save({"n": 0, "blob": blob}, path)
done = 0
inside = outside = returned = 0
bad = []
print("ready", flush=True)
import time
end = time.monotonic() + seconds
attempt = 0
while time.monotonic() < end:
    attempt += 1
    try:
        armed = True
        ckpt.save({"n": attempt, "blob": blob}, path)
        armed = False
        done = attempt
        returned += 1
    except KeyboardInterrupt as e:
        armed = False
        files = [f.f_code.co_filename for f, _ in traceback.walk_tb(e.__traceback__)]
        from_ckpt = any(os.path.dirname(os.path.abspath(f)) == ckpt_dir for f in files)
        got = ckpt.load(path)
        n = got["n"]
        if not torch.equal(got["blob"], blob):
            bad.append(f"attempt {attempt}: blob damaged")
        if from_ckpt:
            inside += 1
            if n != done:
                bad.append(f"attempt {attempt}: KeyboardInterrupt raised inside ckpt "
                           f"but the file was committed (holds {n}, last returned {done})")
        else:
            outside += 1
            if n not in (done, attempt):
                bad.append(f"attempt {attempt}: file holds {n}")
            done = n
    if len(os.listdir(os.path.dirname(path))) != 1:
        bad.append(f"attempt {attempt}: left {sorted(os.listdir(os.path.dirname(path)))}")
armed = False
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent may still be sending
print(f"attempts={attempt} returned={returned} inside={inside} outside={outside}")
for b in bad[:10]:
    print("BAD", b)
sys.exit(1 if bad else 0)
"""


class Sigint(TempDirCase):
    def test_interrupted_saves_commit_whole_or_not_at_all(self):
        os.makedirs(self.path("d"))
        p = self.path("d/x.ckpt")
        child = subprocess.Popen(
            [sys.executable, "-c", SIGINT_CHILD, p, "6", CKPT_DIR], env=python_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self.assertEqual(child.stdout.readline().strip(), "ready")
            rnd = random.Random(6)
            sent = 0
            while child.poll() is None:
                time.sleep(rnd.uniform(0.0005, 0.02))
                try:
                    child.send_signal(signal.SIGINT)
                    sent += 1
                except ProcessLookupError:
                    break
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        self.assertEqual(child.returncode, 0, out + err)
        self.assertIn("inside=", out)
        self.assertNotIn("Exception ignored", err)  # no interrupt lost in a destructor
        self.assertGreater(sent, 100)
        self.assertEqual(ckpt.load(p)["blob"].numel(), 1 << 18)

    def test_save_returns_and_the_interrupt_follows(self):
        # An interrupt that arrives during the commit is delivered after save()
        # returns; SIGINT's handler is the caller's again afterwards.
        code = r"""
            import signal, sys, ckpt
            from ckpt import _ckpt
            seen = []
            signal.signal(signal.SIGINT, lambda s, f: seen.append("handler"))
            before = signal.getsignal(signal.SIGINT)
            real = _ckpt.Writer.commit
            def commit(self):
                signal.raise_signal(signal.SIGINT)  # arrives while committing
                seen.append("commit")
                real(self)
            _ckpt.Writer.commit = commit
            ckpt.save({"a": 1}, sys.argv[1])
            seen.append("returned")
            for _ in range(3):
                pass
            print(" ".join(seen), signal.getsignal(signal.SIGINT) is before)
        """
        r = run_child(code, self.path("s.ckpt"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split(), ["commit", "returned", "handler", "True"])
        self.assertEqual(ckpt.load(self.path("s.ckpt")), {"a": 1})


# ---- 16: a stream holds several records ---------------------------------------

class StreamPosition(TempDirCase):
    def records(self, save):
        buf = io.BytesIO()
        objs = [{"a": torch.arange(5), "i": 1}, [torch.ones(2, 3), "x"], {"z": 3.5}]
        for o in objs:
            save(o, buf)
        end = buf.tell()
        buf.write(b"TRAILER")
        buf.seek(0)
        for o in objs:
            assert_same(self, o, ckpt.load(buf))
        self.assertEqual(buf.tell(), end)
        self.assertEqual(buf.read(), b"TRAILER")

    def test_ckpt_records(self):
        self.records(ckpt.save)

    def test_legacy_pth_records(self):
        self.records(lambda o, f: torch.save(o, f, _use_new_zipfile_serialization=False))

    def test_unseekable_stream(self):
        buf = io.BytesIO()
        ckpt.save({"a": torch.arange(3)}, buf)
        torch.save([torch.zeros(2)], buf, _use_new_zipfile_serialization=False)
        ckpt.save({"b": 2}, buf)
        r, w = os.pipe()
        data = buf.getvalue()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the writer side of the pipe
            os.close(r)
            os.write(w, data)
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            self.assertFalse(f.seekable())
            self.assertTrue(torch.equal(ckpt.load(f)["a"], torch.arange(3)))
            self.assertTrue(torch.equal(ckpt.load(f)[0], torch.zeros(2)))
            self.assertEqual(ckpt.load(f), {"b": 2})
            self.assertEqual(f.read(), b"")
        os.waitpid(pid, 0)

    def test_truncated_record(self):
        buf = io.BytesIO()
        ckpt.save({"a": torch.arange(3)}, buf)
        with self.assertRaises(ckpt.FormatError) as e:
            ckpt.load(io.BytesIO(buf.getvalue()[:-10]))
        self.assertIn("truncated", str(e.exception))


# ---- 17: torch's keywords ------------------------------------------------------

class TorchKeywords(TempDirCase):
    def test_save_keywords(self):
        p = self.path("k.ckpt")
        obj = {"w": torch.ones(2)}
        ckpt.save(obj, p, pickle_module=pickle, pickle_protocol=4,
                  _use_new_zipfile_serialization=True, _disable_byteorder_record=False)
        assert_same(self, obj, ckpt.load(p))

    def test_load_keywords(self):
        p = self.path("k.ckpt")
        obj = {"w": torch.ones(2), "s": "é"}
        ckpt.save(obj, p)
        for kw in ({"weights_only": True}, {"weights_only": False}, {"pickle_module": pickle},
                   {"encoding": "latin1"}, {"mmap": None}, {"mmap": True},
                   {"encoding": "bytes", "weights_only": True, "mmap": False}):
            assert_same(self, obj, ckpt.load(p, "cpu", **kw))
        assert_same(self, obj, ckpt.load(p, None, pickle))  # torch.load's order
        pth = self.path("k.pth")
        torch.save(obj, pth)
        assert_same(self, obj, ckpt.load(pth, "cpu", weights_only=True, encoding="utf-8"))
        with self.assertRaises(TypeError):
            ckpt.load(p, no_such_keyword=1)

    def test_map_location_meta(self):
        p = self.path("m.ckpt")
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        obj = {"w": base, "t": base.t(), "h": torch.ones(2, dtype=torch.float16),
               "n": 3, "p": torch.nn.Parameter(torch.zeros(2))}
        ckpt.save(obj, p)
        for back in (ckpt.load(p, map_location="meta"),
                     ckpt.load(p, map_location=torch.device("meta")),
                     ckpt.load(p, map_location={"cpu": "meta"})):
            self.assertEqual(back["w"].device.type, "meta")
            self.assertEqual(back["t"].shape, (4, 3))
            self.assertEqual(back["t"].stride(), (1, 4))
            self.assertEqual(back["h"].dtype, torch.float16)
            self.assertIsInstance(back["p"], torch.nn.Parameter)
            self.assertEqual(back["n"], 3)
        with ckpt.open(p) as f:
            self.assertEqual(f.load("w", device="meta").device.type, "meta")
        pth = self.path("m.pth")
        torch.save({"w": base}, pth)
        self.assertEqual(ckpt.load(pth, map_location="meta")["w"].device.type, "meta")

    def test_hostile_pth_is_an_unpickling_error(self):
        p = self.path("evil.pth")

        class Evil:
            def __reduce__(self):
                return (os.system, ("true",))
        torch.save({"x": Evil()}, p)
        def from_stream():
            with open(p, "rb") as f:
                return ckpt.load(f)
        for load in (lambda: ckpt.load(p), from_stream,
                     lambda: ckpt.import_pth(p, self.path("o.ckpt"))):
            with self.assertRaises(pickle.UnpicklingError) as e:
                load()
            self.assertIsInstance(e.exception, ckpt.CkptError)
            self.assertIn("system", str(e.exception))
        self.assertFalse(os.path.exists(self.path("o.ckpt")))


# ---- 18: errors name the user's file -------------------------------------------

class ErrorNames(TempDirCase):
    @unittest.skipIf(torch.cuda.is_available(), "needs a machine without CUDA")
    def test_cuda_pth_names_the_pth(self):
        # A .pth whose tensor was saved on cuda:0, made without a GPU: the
        # persistent id's location string is what torch records.
        p = self.path("gpu_saved.pth")
        buf = io.BytesIO()
        torch.save({"w": torch.ones(3)}, buf)
        import zipfile
        with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z, \
                zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as out:
            for info in z.infolist():
                data = z.read(info)
                if info.filename.endswith("data.pkl"):
                    data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                out.writestr(info, data)
        with self.assertRaises(ckpt.CudaError) as e:
            ckpt.load(p)
        msg = str(e.exception)
        self.assertIn(p, msg)
        self.assertNotIn("converted.ckpt", msg)
        with open(p, "rb") as f:
            with self.assertRaises(ckpt.CudaError) as e:
                ckpt.load(f)
        self.assertIn(p, str(e.exception))
        self.assertNotIn("stream.pth", str(e.exception))
        self.assertNotIn("converted", str(e.exception))

    def test_streams_are_named(self):
        p = self.path("evil.pth")

        class Evil:
            def __reduce__(self):
                return (os.system, ("true",))
        torch.save({"x": Evil()}, p)
        with self.assertRaises(ckpt.CkptError) as e:
            ckpt.load(io.BytesIO(open(p, "rb").read()))
        self.assertNotIn("stream.pth", str(e.exception))
        self.assertIn("<stream>", str(e.exception))
        bad = io.BytesIO()
        ckpt.save({"a": 1}, bad)
        data = bytearray(bad.getvalue())
        data[60] ^= 1  # the preamble's checksum
        with open(self.path("named.ckpt"), "wb") as f:
            f.write(data)
        with open(self.path("named.ckpt"), "rb") as f, self.assertRaises(ckpt.CkptError) as e:
            ckpt.load(f)
        self.assertIn("named.ckpt", str(e.exception))


# ---- 19: hostile but well-formed files -----------------------------------------

class HostileFiles(TempDirCase):
    def assert_refused(self, p, load=None, offset=True):
        load = load or (lambda: ckpt.load(p))
        try:
            load()
        except ckpt.CkptError as e:
            # File and byte offset (item 19): "name.ckpt:OFFSET: ..."; for
            # a storage's saved device or a tensor's dtype, the offset of
            # the storage's bytes.
            name = re.escape(os.path.basename(p))
            self.assertRegex(str(e), name + (r":\d+: " if offset else ""))
            return e
        except BaseException as e:  # the defect: any other exception type
            self.fail(f"{type(e).__name__} instead of a ckpt error: {e}")
        self.fail("a hostile file loaded")

    def test_set_holding_a_list(self):
        p = self.path("set.ckpt")
        ckpt.save({"s": {(1, 2)}}, p)
        patch_node_kind(p, TUPLE, LIST)  # {[1, 2]}
        self.assert_refused(p)
        self.assert_refused(p, lambda: ckpt.open(p).get("s"))
        self.assert_refused(p, lambda: ckpt.open(p).get())

    def test_keys_and_frozensets_holding_unhashables(self):
        p = self.path("key.ckpt")
        ckpt.save({(1, frozenset([2])): 3}, p)
        patch_node_kind(p, FROZENSET, LIST)  # {(1, [2]): 3}
        self.assert_refused(p)
        self.assert_refused(p, lambda: ckpt.open(p).get())
        p = self.path("fz.ckpt")
        ckpt.save([frozenset([(1,)])], p)
        patch_node_kind(p, TUPLE, LIST)  # [frozenset({[1]})]
        self.assert_refused(p)

    def test_invalid_utf8(self):
        for where, obj, meta, access in (
                ("string", {"s": "MARKER"}, None, lambda f: f.get()),
                ("key", {"MARKER": 1}, None, lambda f: f.get()),
                ("tensor path", {"MARKER": torch.ones(1)}, None, lambda f: f.keys()),
                ("metadata", {"a": 1}, {"k": "MARKER"}, lambda f: f.metadata),
                ("metadata key", {"a": 1}, {"MARKER": "v"}, lambda f: f.metadata)):
            with self.subTest(where):
                p = self.path("u.ckpt")
                ckpt.save(obj, p, metadata=meta)
                patch_header(p, b"MARKER", b"\xff\xfeRKER")
                e = self.assert_refused(p)
                self.assertNotIsInstance(e, UnicodeError)
                self.assert_refused(p, lambda: access(ckpt.open(p)))

    def test_device_strings_torch_rejects(self):
        for bad in (b"xyz", b"cuda:99999999999999999999"):
            with self.subTest(bad=bad):
                p = self.path("d.ckpt")
                w = _ckpt.Writer(p, sync=False)
                marker = "abcdefghijklmnopqrstuvwxyz"[:len(bad)]  # a valid device name
                w.set_root(w.add_dict([w.add_string("d")], [w.add_device(marker)], ""))
                w.commit()
                patch_header(p, marker.encode(), bad, count=1)
                self.assert_refused(p)
                self.assert_refused(p, lambda: ckpt.open(p).get("d"))
        # A storage saved on a device torch cannot parse: refused unless a
        # map_location says where it goes (as torch.load does).
        p = self.path("s.ckpt")
        ckpt.save({"w": torch.ones(2)}, p)
        patch_header(p, b"cpu", b"xyz", count=1)
        e = self.assert_refused(p)
        self.assertIn("storage 0", str(e))
        self.assert_refused(p, lambda: ckpt.load(p, map_location={"cuda:0": "cpu"}))
        self.assertTrue(torch.equal(ckpt.load(p, map_location="cpu")["w"], torch.ones(2)))

    def test_dtype_this_torch_lacks(self):
        lacking = [code for code, name, _ in _ckpt.dtypes()
                   if not isinstance(getattr(torch, name, None), torch.dtype)]
        if not lacking:
            self.skipTest(f"torch {torch.__version__} has every dtype of the format")
        code = lacking[0]
        p = self.path("dt.ckpt")
        w = _ckpt.Writer(p, sync=False)
        sid = w.add_storage(np.zeros(8, np.uint8), "cpu")
        t = w.add_tensor(code, [1], [1], sid, 0, False, False)
        w.set_root(w.add_dict([w.add_string("t"), w.add_string("d")],
                              [t, w.add_dtype(code)], ""))
        w.commit()
        for load in (lambda: ckpt.load(p), lambda: ckpt.open(p)["t"],
                     lambda: ckpt.open(p).get("d"), lambda: ckpt.open(p).get_slice("t")):
            e = self.assert_refused(p, load)
            self.assertIsInstance(e, ckpt.UnsupportedError)
            self.assertIn("no torch equivalent", str(e))

    def test_ckpt_io_error_has_errno(self):
        # A file-size limit: the writer's write fails with EFBIG.
        code = r"""
            import errno, resource, signal, sys, torch, ckpt
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
            try:
                ckpt.save({"w": torch.ones(1 << 20)}, sys.argv[1])
            except ckpt.CkptIOError as e:
                print(errno.errorcode.get(e.errno), "|", e)
        """
        r = run_child(code, self.path("big.ckpt"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith("EFBIG |"), r.stdout)
        self.assertIn("big.ckpt", r.stdout)
        with self.assertRaises(ckpt.CkptIOError) as e:
            ckpt.save({}, "/proc/no/such/dir/x.ckpt")
        self.assertEqual(e.exception.errno, errno.ENOENT)


# ---- 20: depth 1000 and big ints -----------------------------------------------

def nested(depth, kind):
    """An object of exactly `depth` levels (root = 1, FORMAT.md R14)."""
    if kind == "key":  # a dict whose key is a tuple of depth - 1 levels
        return {nested(depth - 1, "tuple"): 1}
    x = {"list": [], "dict": {}, "tuple": (), "ordered": collections.OrderedDict()}[kind]
    for _ in range(depth - 1):
        x = {"list": lambda v: [v], "dict": lambda v: {"k": v}, "tuple": lambda v: (v,),
             "ordered": lambda v: collections.OrderedDict(k=v)}[kind](x)
    return x


def tokens(x):
    """A flat, order-preserving description of a tree, built without
    recursion (== on 1000-deep trees would hit the recursion limit)."""
    out, stack, best = [], [(x, 1)], 0
    while stack:
        v, d = stack.pop()
        best = max(best, d)
        if isinstance(v, dict):
            out.append((type(v).__name__, len(v)))
            for k, c in reversed(list(v.items())):
                stack.append((c, d + 1))
                stack.append((k, d + 1))
        elif isinstance(v, (list, tuple)):
            out.append((type(v).__name__, len(v)))
            stack.extend((c, d + 1) for c in reversed(v))
        elif isinstance(v, torch.Tensor):
            out.append(("tensor", v.tolist()))
        else:
            out.append((type(v).__name__, v))
    return out, best


class FuzzBindingReaders(TempDirCase):
    """Mutated files through the binding's reader entry points (ckpt.load of
    a path, of a stream, with mmap; ckpt.open with keys, get, tensors,
    slices, metadata, verify). Header mutations are re-sealed so the rules
    behind the checksum are what gets exercised. Anything but a ckpt error
    (a crash, SystemError, TypeError, UnicodeDecodeError...) fails."""

    def test_mutated_files_raise_only_ckpt_errors(self):
        base = self.path("base.ckpt")
        ckpt.save({"model": collections.OrderedDict(w=torch.arange(12.0).reshape(3, 4),
                                                    b=torch.ones(3, dtype=torch.bfloat16)),
                   "opt": {"state": {0: {"m": torch.zeros(3)}}, "lr": 0.1, "betas": (0.9, 0.99)},
                   "k": {1.5: "x", (1, "a"): None, frozenset({2}): b"\xff"},
                   "n": 2 ** 70, "s": {1, 2}, "d": torch.float16, "dev": torch.device("cpu"),
                   "e": {}, "v": torch.arange(6)[::2]}, base, metadata={"m": "v"})
        with open(base, "rb") as f:
            good = bytearray(f.read())
        ho, hs = struct.unpack_from("<QQ", good, 32)
        rng = random.Random(1234)
        path = self.path("m.ckpt")
        unexpected = []
        for i in range(int(os.environ.get("CKPT_FUZZ_ITERATIONS", "600"))):
            data = bytearray(good)
            header = bytearray(data[ho:ho + hs])
            for _ in range(rng.choice((1, 1, 2, 4, 8))):
                j = rng.randrange(len(header))
                header[j] = rng.choice((0, 1, 0xFF, 0x80, rng.randrange(256), header[j] ^ 1))
            _rehash(data, bytes(header))
            if i % 10 == 0:
                data = data[:rng.randrange(len(data))]
            with open(path, "wb") as f:
                f.write(data)
            for how in ("load", "mmap", "stream", "open"):
                try:
                    if how == "load":
                        ckpt.load(path)
                    elif how == "mmap":
                        ckpt.load(path, mmap=True)
                    elif how == "stream":
                        ckpt.load(io.BytesIO(bytes(data)))
                    else:
                        with ckpt.open(path) as f:
                            for k in f.keys():
                                f[k]
                                if f[k].dim():
                                    f.get_slice(k)[0:1]
                            f.get("")
                            f.metadata
                            f.verify()
                except ckpt.CkptError:
                    pass
                except Exception as e:  # noqa: BLE001 - the point of the test
                    unexpected.append(f"mutation {i} via {how}: {type(e).__name__}: {e}")
        self.assertEqual(unexpected[:5], [])


class Surrogates(TempDirCase):
    def test_lone_surrogates_are_refused_naming_the_path(self):
        # They reached pybind11 as a bare "incompatible function arguments".
        p = self.path("u.ckpt")
        for obj, where in (({"a": {"\ud800": 1}}, "a"), ({"b": ["ok", "x\udcff"]}, "b/1")):
            with self.assertRaises(ValueError) as cm:
                ckpt.save(obj, p)
            self.assertIn(where, str(cm.exception))
            self.assertIn("surrogate", str(cm.exception))
            self.assertFalse(os.path.exists(p))
        ckpt.save({"é": "日本"}, p)
        self.assertEqual(ckpt.load(p), {"é": "日本"})


class LegacyStreamBounds(TempDirCase):
    def test_a_huge_legacy_pickle_in_a_stream_is_refused_quickly(self):
        # The stream reader walked 12 M pushes for 10 s and ~900 MB before
        # the importer's limits could run.
        magic = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)
        data = (magic + pickle.dumps(1001, protocol=2) + pickle.dumps({}, protocol=2) +
                b"\x80\x02" + b"]" * 6_000_000 + b".")
        t0 = time.monotonic()
        with self.assertRaises(ckpt.PickleRefusedError) as cm:
            ckpt.load(io.BytesIO(data))
        self.assertLess(time.monotonic() - t0, 30)
        self.assertIn("load it from a path", str(cm.exception))


class PathsAsWritten(TempDirCase):
    def test_get_and_kind_take_the_path_as_the_cli_does(self):
        # get()/kind() stripped slashes, so the key "" at the end of a path
        # was unreachable from Python while `ckpt get F x/` reached it.
        p = self.path("p.ckpt")
        ckpt.save({"x": {"": 5, "a": [1, 2]}}, p)
        with ckpt.open(p) as f:
            self.assertEqual(f.get("x/"), 5)
            self.assertEqual(f.get("x"), {"": 5, "a": [1, 2]})
            self.assertEqual(f.get("x/a/1"), 2)
            self.assertEqual(f.kind("x/"), "int")
            self.assertEqual(f.kind(""), "dict")
            with self.assertRaises(ckpt.NotFoundError):
                f.get("/x")  # the key "" at the root, which this file lacks


class SetsAndKeysOfTensors(TempDirCase):
    def test_refused_naming_the_path(self):
        # Format 1.1 forbids tensors in sets and keys (no stable path); the
        # writer refused them without naming where.
        p = self.path("s.ckpt")
        for obj, where in (({"opt": {"s": {torch.ones(1)}}}, "opt/s"),
                           ({"a": [frozenset({(1, torch.ones(1))})]}, "a/0"),
                           ({"k": {(1, torch.ones(1)): 2}}, "k")):
            with self.assertRaises(TypeError) as cm:
                ckpt.save(obj, p)
            self.assertIn(where, str(cm.exception))
            self.assertFalse(os.path.exists(p))
            self.assertNoTemporaries()
        ckpt.save({"s": {1, "a", (2, 3)}}, p)  # hashable items save
        self.assertEqual(ckpt.load(p)["s"], {1, "a", (2, 3)})


class DepthAndBigInts(TempDirCase):
    def test_depth_1000_round_trips_and_1001_is_refused(self):
        self.assertEqual(sys.getrecursionlimit(), 1000)  # the default
        p = self.path("deep.ckpt")
        for kind in ("list", "dict", "tuple", "ordered", "key"):
            with self.subTest(kind):
                obj = nested(1000, kind)
                want, depth = tokens(obj)
                self.assertEqual(depth, 1000)
                ckpt.save(obj, p)
                self.assertEqual(tokens(ckpt.load(p, verify=True)), (want, 1000))
                with ckpt.open(p) as f:
                    self.assertEqual(tokens(f.get()), (want, 1000))
                with self.assertRaises(ValueError) as e:
                    ckpt.save(nested(1001, kind), self.path("too.ckpt"))
                self.assertIsInstance(e.exception, ckpt.CkptError)
                self.assertIn("1000", str(e.exception))
                self.assertIn("nested too deeply", str(e.exception))
                self.assertFalse(os.path.exists(self.path("too.ckpt")))
                self.assertNoTemporaries()
        # A tensor at depth 1000 (999 lists around it).
        obj = [torch.arange(3)]
        for _ in range(998):
            obj = [obj]
        ckpt.save(obj, p)
        self.assertEqual(tokens(ckpt.load(p, verify=True)), tokens(obj))
        self.assertEqual(tokens(obj)[1], 1000)

    def test_deep_save_does_not_need_a_raised_recursion_limit(self):
        r = run_child(r"""
            import sys, ckpt
            sys.setrecursionlimit(120)
            y = []
            for _ in range(999):
                y = [y]
            ckpt.save(y, sys.argv[1])
            z = ckpt.load(sys.argv[1])
            n = 0
            while z:
                z = z[0]
                n += 1
            print(n)
        """, self.path("d.ckpt"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "999")

    def test_big_int_extremes(self):
        p = self.path("big.ckpt")
        values = [-(2 ** 32767), 2 ** 32767 - 1, -(2 ** 63) - 1, 2 ** 63, -(2 ** 63),
                  2 ** 63 - 1, -(2 ** 64), 2 ** 64 - 1, -(2 ** 8191), 2 ** 8191 - 1, -129, -128]
        ckpt.save(values, p)
        self.assertEqual(ckpt.load(p, verify=True), values)
        ckpt.save({-(2 ** 32767): "k"}, p)
        self.assertEqual(ckpt.load(p), {-(2 ** 32767): "k"})
        for v in (2 ** 32767, -(2 ** 32767) - 1):
            with self.assertRaises(ValueError):
                ckpt.save([v], self.path("no.ckpt"))
            self.assertFalse(os.path.exists(self.path("no.ckpt")))


# ---- 1: empty containers at every depth (round trip + verify) -------------------

EMPTIES = {
    "dict": dict, "ordered": collections.OrderedDict, "list": list, "tuple": tuple,
    "set": set, "frozenset": frozenset, "namespace": argparse.Namespace,
    "tensor": lambda: torch.empty(0), "tensor0x3": lambda: torch.empty(0, 3),
}

EMPTY_CHILD = r"""
import argparse, collections, sys, torch, ckpt
sys.path.insert(0, sys.argv[2])
from test_hardening import EMPTIES, wrap_in
p = sys.argv[1]
bad = []
for name, make in EMPTIES.items():
    for depth in range(1, 6):
        obj = wrap_in(make(), depth)
        ckpt.save(obj, p)
        back = ckpt.load(p, verify=True)
        with ckpt.open(p) as f:
            f.verify()
            f.get()
        if repr(back) != repr(obj):
            bad.append(f"{name} at depth {depth}: {back!r} != {obj!r}")
        print(name, depth, "ok", flush=True)
opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
sd = opt.state_dict()
ckpt.save(sd, p)
back = ckpt.load(p, verify=True)
ckpt.open(p).verify()
if back != sd:
    bad.append(f"optimizer: {back!r} != {sd!r}")
print("optimizer ok", flush=True)
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


def wrap_in(x, depth):
    """`x` at `depth` (root = 1), alternately in dicts and lists."""
    for i in range(depth - 1):
        x = {"k": x} if i % 2 == 0 else [x]
    return x


class EmptyContainers(TempDirCase):
    def test_round_trip_and_verify(self):
        # A child process: a segfault must fail this test, not kill the suite.
        r = run_child(EMPTY_CHILD, self.path("e.ckpt"), os.path.dirname(os.path.abspath(__file__)))
        last = (r.stdout.strip().splitlines() or ["nothing"])[-1]
        self.assertEqual(r.returncode, 0,
                         f"exit {r.returncode} after '{last}'\n"
                         f"{r.stdout[-2000:]}{r.stderr[-2000:]}")
        self.assertIn("optimizer ok", r.stdout)


if __name__ == "__main__":
    unittest.main()
