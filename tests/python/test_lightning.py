"""ckpt.lightning under a real Lightning Trainer (PyPI's lightning, CPU):
ModelCheckpoint's top-k and last files are ckpt files, ckpt_path="last"
resumes from them, and a run killed with SIGKILL at random moments (inside
saves too) ends bit-identical to one that never stopped. Skipped, visibly,
where lightning is not installed (scripts/install_deps.sh installs it into
.venv-torch2)."""
import os
import subprocess
import sys
import unittest

import ckpt
from util import TempDirCase, assert_same, kill_until_done, python_env

try:
    import lightning  # noqa: F401
    HAVE = True
except ImportError:
    HAVE = False

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "lightning_train.py")
EPOCHS = 6


def run(directory, epochs, out, ranks=1):
    r = subprocess.run([sys.executable, SCRIPT, directory, str(epochs), out, str(ranks)],
                       env=python_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


@unittest.skipUnless(HAVE, "lightning is not installed (scripts/install_deps.sh puts it in "
                     ".venv-torch2)")
class LightningTest(TempDirCase):
    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.ref_dir = tempfile.mkdtemp(prefix="ckpt-lightning-ref-")
        cls.ref_out = os.path.join(cls.ref_dir, "end.ckpt")
        run(os.path.join(cls.ref_dir, "ck"), EPOCHS, cls.ref_out)

    @classmethod
    def tearDownClass(cls):
        import shutil
        shutil.rmtree(cls.ref_dir, ignore_errors=True)

    def test_model_checkpoint_files_are_ckpt_files(self):
        d = os.path.join(self.ref_dir, "ck")
        names = sorted(os.listdir(d))
        # save_top_k=2 removed the others through remove_checkpoint.
        self.assertEqual(len(names), 3, names)
        self.assertIn("last.ckpt", names)
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                self.assertNotEqual(f.read(4), b"PK\x03\x04", f"{n} is a torch.save zip")
            state = ckpt.load(os.path.join(d, n))
            self.assertIn("optimizer_states", state)
            self.assertIn("lr_schedulers", state)
            self.assertIn("rng", state["callbacks"]["RngState"])
            self.assertEqual(state["hyper_parameters"]["lr"], 1e-2)

    def test_load_from_checkpoint_builds_the_module_from_a_ckpt_file(self):
        # LightningModule.load_from_checkpoint calls torch.load, which
        # cannot read a ckpt file; ckpt.lightning.load_from_checkpoint can.
        import torch
        from ckpt.lightning import load_from_checkpoint
        sys.path.insert(0, HERE)
        from lightning_train import Noisy
        d, out = self.path("ck"), self.path("end.ckpt")
        run(d, 1, out)
        last = os.path.join(d, "last.ckpt")
        with self.assertRaises(Exception):
            Noisy.load_from_checkpoint(last)
        m = load_from_checkpoint(Noisy, last)
        self.assertIsInstance(m, Noisy)
        self.assertEqual(m.hparams.lr, 1e-2)
        want = ckpt.load(out)["model"]
        for k, v in m.state_dict().items():
            self.assertTrue(torch.equal(v, want[k]), k)
        self.assertEqual(load_from_checkpoint(Noisy, last, lr=0.5).hparams.lr, 0.5)

    def test_stop_and_resume_from_last_is_bit_identical(self):
        d, out = self.path("ck"), self.path("end.ckpt")
        run(d, 3, self.path("half.ckpt"))
        log = run(d, EPOCHS, out)
        self.assertIn("START", log)
        assert_same(self, ckpt.load(self.ref_out), ckpt.load(out))

    def test_ddp_ranks_each_resume_their_own_generators(self):
        # Two DDP ranks seeded apart draw different dropout masks; a resume
        # that gave rank 1 rank 0's generators would diverge from the run
        # that never stopped.
        ref = self.path("ref.ckpt")
        run(self.path("ref"), 4, ref, ranks=2)
        d, out = self.path("ck"), self.path("end.ckpt")
        run(d, 2, self.path("half.ckpt"), ranks=2)
        state = ckpt.load(os.path.join(d, "last.ckpt"))
        self.assertEqual(len(state["callbacks"]["RngState"]["rng_per_rank"]), 2)
        run(d, 4, out, ranks=2)
        assert_same(self, ckpt.load(ref), ckpt.load(out))

    def test_sigkill_at_random_moments_resumes_bit_identically(self):
        seed = int(os.environ.get("CKPT_KILL_SEED", "20261202"))
        d, out = self.path("killed"), self.path("killed.ckpt")
        os.makedirs(d)

        def after_kill():
            # Whatever the moment, last.ckpt (when there is one) loads whole.
            last = os.path.join(d, "last.ckpt")
            if os.path.exists(last):
                state = ckpt.load(last)
                self.assertIn("state_dict", state)
        kills, inside, log = kill_until_done(
            [sys.executable, SCRIPT, d, str(EPOCHS), out], d, seed, after_kill, max_kills=6)
        msg = f"seed {seed}:\n" + "\n".join(log)
        self.assertGreaterEqual(kills, 4, msg)
        self.assertGreaterEqual(inside, 1, "no kill landed inside a save\n" + msg)
        assert_same(self, ckpt.load(self.ref_out), ckpt.load(out))
        print(f"\n  {kills} kills ({inside} inside a save), {msg}", file=sys.stderr)

    def test_loads_a_torch_save_checkpoint_and_refuses_bad_options(self):
        import torch
        from ckpt.lightning import CkptCheckpointIO
        io = CkptCheckpointIO(sync=False)
        p = self.path("old.ckpt")
        torch.save({"state_dict": {"w": torch.arange(3.0)}, "epoch": 2}, p)
        got = io.load_checkpoint(p, weights_only=False)
        self.assertTrue(torch.equal(got["state_dict"]["w"], torch.arange(3.0)))
        with self.assertRaises(FileNotFoundError):
            io.load_checkpoint(self.path("missing.ckpt"))
        with self.assertRaises(TypeError):
            io.save_checkpoint({"a": 1}, self.path("x.ckpt"), storage_options={"bogus": 1})
        with self.assertRaises(TypeError) as cm:  # refused at save, by its path
            io.save_checkpoint({"a": object()}, self.path("y.ckpt"))
        self.assertIn("a: cannot save an object of type builtins.object", str(cm.exception))
        self.assertFalse(os.path.exists(self.path("y.ckpt")))
        io.save_checkpoint({"a": 1}, self.path("m.ckpt"), storage_options={"metadata": {"k": "v"}})
        io.remove_checkpoint(self.path("m.ckpt"))
        self.assertFalse(os.path.exists(self.path("m.ckpt")))
        io.remove_checkpoint(self.path("m.ckpt"))  # already gone: no error
        # A remote URL is refused, not written to a local "s3:" directory.
        here = os.getcwd()
        os.chdir(self.dir)
        try:
            for call in (lambda: io.save_checkpoint({"a": 1}, "s3://bucket/run/last.ckpt"),
                         lambda: io.load_checkpoint("gs://bucket/last.ckpt"),
                         lambda: io.remove_checkpoint("s3://bucket/run/last.ckpt")):
                with self.assertRaises(ckpt.InvalidArgumentError) as cm:
                    call()
                self.assertIn("writes local files only", str(cm.exception))
            self.assertEqual(os.listdir(self.dir), ["old.ckpt"])
        finally:
            os.chdir(here)
