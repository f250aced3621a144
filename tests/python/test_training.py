"""Whole training states: a run killed with SIGKILL at random moments
resumes bit-identically, a GAN checkpoint round-trips, and
CheckpointManager keeps, prunes and recovers as documented."""
import os
import subprocess
import sys
import unittest

import torch

import ckpt
from util import TempDirCase, assert_same, kill_until_done, python_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "resumable_train.py")
EPOCHS = 12


def run_to_end(directory, out):
    r = subprocess.run([sys.executable, SCRIPT, directory, str(EPOCHS), out], env=python_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


class KillAndResume(TempDirCase):
    def test_sigkill_at_random_moments_resumes_bit_identically(self):
        ref_out = self.path("reference.ckpt")
        run_to_end(self.path("reference"), ref_out)

        seed = int(os.environ.get("CKPT_KILL_SEED", "20261123"))
        directory, out = self.path("killed"), self.path("killed.ckpt")
        os.makedirs(directory)

        def after_kill():
            # Whatever the moment, latest() is a complete checkpoint. (The
            # writer's unnamed O_TMPFILE inode leaves no temporary to see.)
            latest = ckpt.CheckpointManager(directory, keep_last=2).latest()
            if latest is not None:
                state = ckpt.load(latest.path)
                self.assertEqual(state["epoch"], latest.step)
                self.assertEqual(len(state["losses"]), latest.step + 1)
        kills, mid_save_hits, log = kill_until_done(
            [sys.executable, SCRIPT, directory, str(EPOCHS), out], directory, seed, after_kill)

        msg = f"seed {seed}:\n" + "\n".join(log)
        self.assertGreaterEqual(kills, 5, msg)
        self.assertGreaterEqual(mid_save_hits, 1, "no kill landed inside a save\n" + msg)
        self.assertEqual([n for n in os.listdir(directory) if ".tmp-" in n], [],
                         "temporaries outlived the run\n" + msg)
        ref, got = ckpt.load(ref_out), ckpt.load(out)
        assert_same(self, ref, got)  # parameters and loss history, bit for bit
        print(f"\n  {kills} kills ({mid_save_hits} inside a save), {msg}", file=sys.stderr)


def gan():
    torch.manual_seed(3)
    G = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 16), torch.nn.Tanh())
    D = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1))
    optG = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optD = torch.optim.SGD(D.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    return G, D, optG, optD


def gan_step(G, D, optG, optD, real):
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    z = torch.randn(len(real), 8)
    fake = G(z)
    d_loss = bce(D(real), torch.ones(len(real), 1)) + bce(D(fake.detach()), torch.zeros(len(real), 1))
    optD.zero_grad()
    d_loss.backward()
    optD.step()
    g_loss = bce(D(fake), torch.ones(len(real), 1))
    optG.zero_grad()
    g_loss.backward()
    optG.step()
    return d_loss.item(), g_loss.item()


class Gan(TempDirCase):
    def test_gan_checkpoint_round_trips_and_continues_identically(self):
        torch.set_num_threads(1)
        G, D, optG, optD = gan()
        real = torch.randn(64, 16)
        history = [gan_step(G, D, optG, optD, real) for _ in range(3)]
        state = {"generator": G.state_dict(), "discriminator": D.state_dict(),
                 "opt_g": optG.state_dict(), "opt_d": optD.state_dict(), "epoch": 3,
                 "history": history, "fixed_noise": torch.randn(16, 8),
                 "config": {"betas": (0.5, 0.999), "nz": 8, "loss": "bce"},
                 "rng": ckpt.rng.get_state()}
        p = self.path("gan.ckpt")
        ckpt.save(state, p)
        back = ckpt.load(p)
        assert_same(self, state, back)  # every tensor and value, types included
        self.assertIsInstance(back["opt_g"]["state"][0]["step"], torch.Tensor)
        self.assertEqual(list(back["opt_g"]["state"]), list(range(6)))  # int keys, 6 params

        # Restored models continue exactly as the originals do.
        G2, D2, optG2, optD2 = gan()
        G2.load_state_dict(back["generator"]); D2.load_state_dict(back["discriminator"])
        optG2.load_state_dict(back["opt_g"]); optD2.load_state_dict(back["opt_d"])
        ckpt.rng.set_state(state["rng"])
        a = gan_step(G, D, optG, optD, real)
        ckpt.rng.set_state(state["rng"])
        b = gan_step(G2, D2, optG2, optD2, real)
        self.assertEqual(a, b)
        for x, y in zip(list(G.parameters()) + list(D.parameters()),
                        list(G2.parameters()) + list(D2.parameters())):
            self.assertTrue(torch.equal(x, y))


class Manager(TempDirCase):
    def test_keep_last_and_best(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=2, keep_best=1, metric="val_loss")
        losses = [0.9, 0.5, 0.7, 0.8, 0.95]
        for step, v in enumerate(losses):
            info = m.save({"step": step, "w": torch.full((2,), float(step))}, step,
                          metrics={"val_loss": v})
            self.assertEqual(info.step, step)
        self.assertEqual([i.step for i in m.list()], [1, 3, 4])  # best (1) + last two
        self.assertEqual(m.latest().step, 4)
        self.assertEqual(m.best().step, 1)
        self.assertEqual(m.best().metrics, {"val_loss": 0.5})
        self.assertEqual(m.load_latest()["step"], 4)
        mx = ckpt.CheckpointManager(self.path("run"), keep_last=None, metric="val_loss", mode="max")
        self.assertEqual(mx.best().step, 4)

    def test_empty_and_bad_arguments(self):
        m = ckpt.CheckpointManager(self.path("empty"))
        self.assertIsNone(m.latest())
        self.assertIsNone(m.load_latest())
        self.assertEqual(m.list(), [])
        for kw in ({"keep_last": 0}, {"keep_best": 1}, {"mode": "avg"}):
            with self.assertRaises(ValueError):
                ckpt.CheckpointManager(self.path("x"), **kw)
        with self.assertRaises(TypeError):
            m.save({}, 1, metrics={"a": "high"})

    def test_damaged_files_are_skipped_and_temporaries_cleaned(self):
        d = self.path("run")
        m = ckpt.CheckpointManager(d, keep_last=5)
        m.save({"v": 1}, 1)
        m.save({"v": 2}, 2)
        # A later file that is not a complete checkpoint (e.g. copied in
        # half-way): never offered for resuming.
        with open(os.path.join(d, "step-0000000003.ckpt"), "wb") as f:
            f.write(b"\x89CKPT\r\n\x1a" + b"\0" * 10)
        with open(os.path.join(d, ".step-0000000004.ckpt.tmp-abc123"), "wb") as f:
            f.write(b"partial")
        m = ckpt.CheckpointManager(d, keep_last=5)
        self.assertFalse(any(".tmp-" in n for n in os.listdir(d)))
        self.assertEqual(m.latest().step, 2)
        self.assertEqual(m.load_latest(), {"v": 2})

    def test_failed_save_keeps_previous(self):
        m = ckpt.CheckpointManager(self.path("run"), keep_last=1)
        m.save({"v": 1}, 1)
        with self.assertRaises(TypeError):
            m.save({"v": object()}, 2)
        self.assertEqual([i.step for i in m.list()], [1])
        self.assertEqual(m.load_latest(), {"v": 1})


if __name__ == "__main__":
    unittest.main()
