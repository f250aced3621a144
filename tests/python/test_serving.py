"""ckpt.iter_weights: a serving engine's tensor-parallel weight stream.
For every rank of n in {1, 2, 4, 8}, the slices it yields put back
together equal each full tensor bit for bit, and the bytes it reads
(counted by the loader, and by the kernel in /proc/self/io rchar) are the
rank's share: exactly for row-major tensors, within 2% by rchar."""
import os
import sys
import unittest

import torch

import ckpt
from util import TempDirCase, tensor_bytes

# The one reader of /proc/self/io, shared with the serving benchmark.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "bench"))
from run_dist import rchar  # noqa: E402

# name -> (shape, dtype, dim split across ranks or None)
WEIGHTS = {
    "layers.0.attn.q_proj.weight": ((2048, 512), torch.float32, 0),     # rows
    "layers.0.attn.o_proj.weight": ((512, 2048), torch.float32, 1),     # columns
    "layers.0.mlp.experts": ((8, 256, 128), torch.bfloat16, 1),        # a middle dim
    "embed_tokens.weight": ((1024, 256), torch.bfloat16, 0),
    "layers.0.norm.weight": ((512,), torch.float32, None),             # whole on every rank
    "lm_head.scale": ((), torch.float32, None),                         # 0-d
}
RULE = {"*.q_proj.weight": 0, "*.o_proj.weight": 1, "*.experts": 1, "embed_tokens.*": 0}


class IterWeightsTest(TempDirCase):
    def setUp(self):
        super().setUp()
        g = torch.Generator().manual_seed(7)
        self.full = {n: torch.randn(shape, generator=g).to(dtype)
                     for n, (shape, dtype, _) in WEIGHTS.items()}
        self.file = self.path("model.ckpt")
        ckpt.save(self.full, self.file)

    def test_every_rank_of_every_tp_size_gets_exactly_its_slice(self):
        for n in (1, 2, 4, 8):
            parts = {name: [] for name in WEIGHTS}
            for rank in range(n):
                stats = {}
                before = rchar()
                order = []
                for name, t in ckpt.iter_weights(self.file, tp_rank=rank, tp_size=n,
                                                 shard_dim=RULE, stats=stats):
                    order.append(name)
                    parts[name].append(t)
                    self.assertTrue(t.is_contiguous())
                    self.assertIsNone(t._base, f"{name}: a view, not the caller's own tensor")
                kernel = rchar() - before
                self.assertEqual(stats["bytes_read"], stats["bytes_needed"], (n, rank, stats))
                # Narrow column runs come from the mapping, which rchar does
                # not see; everything else by pread, which it does.
                preads = stats["bytes_read"] - stats["bytes_mapped"]
                share = sum(
                    self.full[k].numel() * self.full[k].element_size() // (n if d is not None else 1)
                    for k, (_, _, d) in WEIGHTS.items())
                self.assertEqual(stats["bytes_needed"], share)
                self.assertLessEqual(abs(kernel - preads), 0.02 * share,
                                     f"tp {n} rank {rank}: rchar {kernel}, pread {preads}")
                rows = sum(self.full[k].numel() * self.full[k].element_size() //
                           (n if d is not None else 1)
                           for k, (_, _, d) in WEIGHTS.items() if d in (0, None))
                self.assertGreaterEqual(preads, rows)  # rows and whole tensors: pread
                # File order: the order ckpt.save laid the tensors out.
                self.assertEqual(order, list(WEIGHTS))
            for name, (_, _, d) in WEIGHTS.items():
                got = torch.cat(parts[name], d) if d is not None else parts[name][0]
                self.assertEqual(tensor_bytes(got), tensor_bytes(self.full[name]), (n, name))
                if d is None:
                    for p in parts[name]:
                        self.assertEqual(tensor_bytes(p), tensor_bytes(self.full[name]))

    def test_a_sharded_checkpoint_directory_streams_the_same_slices(self):
        # Saved by 3 ranks cut on dim 0 (near-even: rows % 3 != 0 for some),
        # read back by tp sizes that do not match: each rank reads only the
        # chunk bytes its boxes overlap.
        import subprocess
        import sys
        from util import python_env
        d = self.path("sharded")
        r = subprocess.run([sys.executable, "-m", "ckpt", "shard", self.file, d, "--ranks", "3"],
                           env=python_env(), capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        for n in (1, 2, 4):
            parts = {name: [] for name in WEIGHTS}
            for rank in range(n):
                stats = {}
                for name, t in ckpt.iter_weights(d, tp_rank=rank, tp_size=n, shard_dim=RULE,
                                                 stats=stats):
                    parts[name].append(t)
                    self.assertIsNone(t._base)
                share = sum(
                    self.full[k].numel() * self.full[k].element_size() // (n if dd is not None else 1)
                    for k, (_, _, dd) in WEIGHTS.items())
                self.assertEqual(stats["bytes_needed"], share)
                self.assertEqual(stats["bytes_read"], share, (n, rank, stats))
            for name, (_, _, dd) in WEIGHTS.items():
                got = torch.cat(parts[name], dd) if dd is not None else parts[name][0]
                self.assertEqual(tensor_bytes(got), tensor_bytes(self.full[name]), (n, name))

    def test_yielded_tensors_are_the_callers(self):
        first = dict(ckpt.iter_weights(self.file, tp_rank=1, tp_size=2, shard_dim=RULE))
        for t in first.values():
            t.zero_() if t.dim() else t.fill_(0)
        again = dict(ckpt.iter_weights(self.file, tp_rank=1, tp_size=2, shard_dim=RULE))
        w = again["layers.0.attn.o_proj.weight"]
        self.assertEqual(tensor_bytes(w), tensor_bytes(
            self.full["layers.0.attn.o_proj.weight"][:, 1024:]))

    def test_rule_as_a_callable_and_non_row_major_tensors(self):
        t = torch.randn(6, 8).t()  # saved with its strides: read whole, then sliced
        ckpt.save({"t": t, "v": torch.arange(12), "e": torch.empty(0, 4)},
                  self.path("odd.ckpt"))

        import numpy

        def rule(name, shape):  # numpy ints count as dims (operator.index)
            return {"t": numpy.int64(1), "v": 0}.get(name)
        for rank in range(2):
            got = dict(ckpt.iter_weights(self.path("odd.ckpt"), tp_rank=rank, tp_size=2,
                                         shard_dim=rule))
            self.assertTrue(torch.equal(got["t"], t[:, rank * 3:(rank + 1) * 3]))
            self.assertTrue(torch.equal(got["v"], torch.arange(12)[rank * 6:(rank + 1) * 6]))
            self.assertEqual(tuple(got["e"].shape), (0, 4))  # empty, unsplit

    def test_bad_requests_say_what_and_where(self):
        cases = [
            (dict(tp_rank=2, tp_size=2), ckpt.InvalidArgumentError, "tp_rank 2 of tp_size 2"),
            (dict(tp_rank=0, tp_size=3, shard_dim=RULE), ckpt.InvalidArgumentError,
             "does not divide by tp_size 3"),
            (dict(shard_dim={"*": 5}), ckpt.InvalidArgumentError, "has no dim 5"),
            (dict(shard_dim=[0]), TypeError, "shard_dim must be"),
            (dict(shard_dim={"*": 0.0}), ckpt.InvalidArgumentError, "has no dim 0.0"),
        ]
        for kwargs, exc, says in cases:
            with self.subTest(kwargs=kwargs):
                with self.assertRaises(exc) as cm:
                    list(ckpt.iter_weights(self.file, **kwargs))
                self.assertIn(says, str(cm.exception))
        with self.assertRaises(FileNotFoundError):
            list(ckpt.iter_weights(self.path("missing.ckpt")))
        with self.assertRaises(ckpt.UnsupportedError) as cm:
            list(ckpt.iter_weights(self.dir))
        self.assertIn("not a sharded checkpoint", str(cm.exception))
        torch.save({"w": torch.ones(2)}, self.path("old.pth"))
        with self.assertRaises(ckpt.FormatError) as cm:
            list(ckpt.iter_weights(self.path("old.pth")))
        self.assertIn("torch.save file", str(cm.exception))

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device here (scripts/gpu_check.sh "
                         "runs this where one is)")
    def test_slices_land_on_the_device(self):
        from ckpt import _ckpt
        self.assertTrue(_ckpt.has_gpu_loader, "a CUDA device, but ckpt was built without the "
                        "CUDA toolkit: slices would be staged on the host")
        for rank in range(2):
            for name, t in ckpt.iter_weights(self.file, device="cuda", tp_rank=rank,
                                             tp_size=2, shard_dim=RULE):
                self.assertEqual(t.device.type, "cuda")
                d = WEIGHTS[name][2]
                want = self.full[name] if d is None else self.full[name].chunk(2, d)[rank]
                self.assertEqual(tensor_bytes(t), tensor_bytes(want), name)
