"""The Python package against what torch users type and hostile files."""
import argparse
import collections
import errno
import io
import os
import pickle
import random
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


if __name__ == "__main__":
    unittest.main()
