"""Shared helpers of the Python tests: strict deep comparison, temp dirs."""
import argparse
import math
import os
import shutil
import sys
import tempfile
import unittest

try:
    import numpy as np
    import torch
except ImportError:  # pragma: no cover - reported as a skip by run_all
    torch = None


def tensor_bytes(t):
    """The elements of t as bytes in row-major order, bit-exact (NaN, -0.0)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.complex32:
        t = t.view(torch.int32)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.element_size() == 1 and t.dtype not in (torch.uint8, torch.int8):
        # float8/float4 and other one-byte types numpy has no type for.
        t = t.view(torch.uint8)
    elif t.dtype in (getattr(torch, n, None) for n in ("uint16", "uint32", "uint64")):
        t = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t.numpy().tobytes()


def assert_same(tc, a, b, path="<root>"):
    """Fails unless b is a faithful copy of a: same types (exactly), keys in
    order, tensor dtype/shape/strides/offset/requires_grad/Parameter and bytes."""
    tc.assertIs(type(b), type(a), f"{path}: type {type(b)} != {type(a)}")
    if isinstance(a, torch.Tensor):
        tc.assertEqual(a.dtype, b.dtype, path)
        tc.assertEqual(a.shape, b.shape, path)
        tc.assertEqual(a.stride(), b.stride(), path)
        tc.assertEqual(a.storage_offset(), b.storage_offset(), path)
        tc.assertEqual(a.requires_grad, b.requires_grad, path)
        tc.assertEqual(tensor_bytes(a), tensor_bytes(b), f"{path}: values differ")
    elif isinstance(a, np.ndarray):
        tc.assertEqual(a.dtype, b.dtype, path)
        tc.assertEqual(a.shape, b.shape, path)
        tc.assertEqual(a.tobytes(), b.tobytes(), f"{path}: values differ")
    elif isinstance(a, argparse.Namespace):
        assert_same(tc, vars(a), vars(b), path)
    elif isinstance(a, dict):
        tc.assertEqual(list(a.keys()), list(b.keys()), f"{path}: keys")
        for k in a:
            assert_same(tc, a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        tc.assertEqual(len(a), len(b), f"{path}: length")
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(tc, x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        tc.assertTrue(math.isnan(b), path)
    elif isinstance(a, float):
        tc.assertEqual(math.copysign(1, a), math.copysign(1, b), f"{path}: sign")
        tc.assertEqual(a, b, path)
    else:
        tc.assertEqual(a, b, path)


class TempDirCase(unittest.TestCase):
    def setUp(self):
        if torch is None:
            self.skipTest("torch is not importable from this Python")
        self.dir = tempfile.mkdtemp(prefix="ckpt-pytest-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def assertNoTemporaries(self):
        left = [n for n in os.listdir(self.dir) if ".tmp-" in n]
        self.assertEqual(left, [], "temporary files left behind")


def build_dir():
    return os.environ.get("CKPT_BUILD_DIR", "")


def python_env():
    """The environment a child Python needs to import this build's ckpt."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def kill_until_done(argv, directory, seed, after_kill=None, max_kills=9, attempts=40):
    """Runs `argv` (a training script that resumes from `directory`) again
    and again, killing it with SIGKILL at random moments, until it runs to
    the end. The script prints "START [n]" once it has resumed (n: the
    first epoch it runs), "SAVE_BEGIN n" / "SAVE_END n" around each save.
    Kills rotate through three kinds: a few ms into a save, right after
    one, and at a random instant; `after_kill()` runs after each kill
    (check what the directory holds then). Returns (kills, kills that
    landed inside a save, log lines)."""
    import random
    import signal
    import subprocess
    import threading
    import time
    rnd = random.Random(seed)
    log, mid_save_hits, kills = [], 0, 0
    for attempt in range(attempts):
        mode = ["mid-save", "between", "random"][attempt % 3] if kills < max_kills else "none"
        ahead = rnd.randrange(2)  # kill in the first or second epoch after a start
        p = subprocess.Popen(argv, env=python_env(), stdout=subprocess.PIPE, text=True)
        delay = rnd.uniform(0, 0.15)
        start, target, timer = None, None, None
        saves = {}  # epoch -> "begun" / "ended", from the child's output

        def note(word, at):
            if word == "SAVE_BEGIN":
                saves[at] = "begun"
            elif word == "SAVE_END":
                saves[at] = "ended"
        for line in p.stdout:
            word, _, n = line.strip().partition(" ")
            at = int(n) if n.isdigit() else -1
            note(word, at)
            if word == "START":
                start, target = at, at + ahead
                if mode == "random":  # any instant of training or saving
                    timer = threading.Timer(delay, p.send_signal, (signal.SIGKILL,))
                    timer.start()
            elif (mode == "mid-save" and word == "SAVE_BEGIN" and at >= target) or \
                    (mode == "between" and word == "SAVE_END" and at >= target):
                if mode == "mid-save":
                    time.sleep(rnd.uniform(0, 0.005))
                p.send_signal(signal.SIGKILL)
                break
        rc = p.wait()
        if timer is not None:
            timer.cancel()
        for line in p.stdout:  # what it printed before it died
            word, _, n = line.strip().partition(" ")
            note(word, int(n) if n.isdigit() else -1)
        p.stdout.close()
        if rc == -signal.SIGKILL:
            kills += 1
            # Inside a save: it began one and never said it ended.
            inside = "begun" in saves.values()
            mid_save_hits += inside
            temps = [n for n in os.listdir(directory) if ".tmp-" in n]
            log.append(f"{mode} (start {start}, +{ahead}): killed"
                       f"{' inside a save' if inside else ''}, temporaries {temps}")
            if after_kill is not None:
                after_kill()
            continue
        log.append(f"{mode}: finished rc={rc}")
        if rc != 0:
            raise AssertionError("\n".join(log))
        return kills, mid_save_hits, log
    raise AssertionError("the run never finished:\n" + "\n".join(log))
