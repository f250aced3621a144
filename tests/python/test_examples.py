"""The Python examples (examples/python) run as a user would run them, on
small sizes, and say what they should."""
import os
import subprocess
import sys

from util import TempDirCase, python_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(name, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "python", name), *args],
                       env=python_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


class Examples(TempDirCase):
    def test_fast_inference(self):
        out = run("fast_inference.py", "--dir", self.dir, "--width", "256")
        self.assertIn("outputs identical: True", out)

    def test_gan_checkpoint(self):
        out = run("gan_checkpoint.py", "--dir", self.dir)
        self.assertIn("every value identical", out)

    def test_train_resume_matches_an_uninterrupted_run(self):
        whole = run("train_resume.py", "--dir", self.path("a"), "--epochs", "6")
        first = run("train_resume.py", "--dir", self.path("b"), "--epochs", "6", "--stop-after", "3")
        self.assertIn("simulated preemption", first)
        second = run("train_resume.py", "--dir", self.path("b"), "--epochs", "6")
        self.assertIn("at epoch 3", second)
        final = lambda out: out.strip().splitlines()[-1]
        self.assertEqual(final(whole), final(second))
        self.assertIn("final val_loss", final(second))

    def test_benchmark_driver_runs(self):
        # bench/run_python.py at its smallest, so the driver cannot rot.
        out = os.path.join(self.dir, "python.json")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run_python.py"),
                            "--total-mb", "8", "--repeat", "1", "--workdir", self.dir,
                            "--json", out], env=python_env(), capture_output=True, text=True,
                           timeout=600)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("ckpt.load vs", r.stdout)
        self.assertTrue(os.path.exists(out))
