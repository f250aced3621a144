"""docs/INTEGRATIONS.md's code blocks run as written: each block after a
`<!-- run: python -->` or `<!-- run: torchrun N -->` line is a whole
program, run in a fresh directory (under torchrun with N processes on the
loopback), against the PyPI packages scripts/install_deps.sh installs.
A block whose framework is not importable here is skipped, by name."""
import os
import re
import subprocess
import sys
import tempfile
import unittest

from util import python_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "INTEGRATIONS.md")
BLOCK = re.compile(r"<!-- run: (python|torchrun (\d+)) -->\n```python\n(.*?)```", re.S)
# torch 2.x's gloo threads may abort the interpreter's exit (docs/PYTHON.md);
# the test adds the documented workaround after the block, nothing else.
EXIT = "\nimport os as _os, sys as _sys\n_sys.stdout.flush()\n_os._exit(0)\n"


def blocks():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in BLOCK.finditer(text):
        section = text[:m.start()].rsplit("\n## ", 1)[-1].splitlines()[0]
        out.append((section, int(m.group(2)) if m.group(2) else 0, m.group(3)))
    return out


def missing(code):
    for module in ("lightning", "transformers", "accelerate", "torch.distributed.fsdp"):
        if re.search(rf"^(import|from) {re.escape(module)}\b", code, re.M):
            try:
                __import__(module)
            except Exception:  # noqa: BLE001 - 1.13's fsdp fails with ValueError
                return module
            if module == "torch.distributed.fsdp":
                from torch.distributed import fsdp
                if not hasattr(fsdp, "fully_shard"):
                    return "torch.distributed.fsdp.fully_shard (torch 2.4+)"
    return None


class IntegrationsDoc(unittest.TestCase):
    def test_the_doc_has_a_block_per_framework(self):
        self.assertEqual([b[0] for b in blocks()],
                         ["torch.distributed.checkpoint", "Lightning",
                          "Hugging Face transformers and accelerate",
                          "A serving engine's weight loader"])

    def test_every_block_runs(self):
        for section, procs, code in blocks():
            with self.subTest(section):
                need = missing(code)
                if need:
                    self.skipTest(f"{section}: {need} is not importable here")
                with tempfile.TemporaryDirectory(prefix="ckpt-doc-") as d:
                    script = os.path.join(d, "example.py")
                    with open(script, "w") as f:
                        f.write(code + (EXIT if procs else ""))
                    cmd = [sys.executable, script]
                    if procs:
                        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={procs}", script]
                    r = subprocess.run(cmd, cwd=d, env=python_env(), capture_output=True,
                                       text=True, timeout=600)
                    self.assertEqual(r.returncode, 0, f"{section}:\n{r.stdout[-3000:]}\n"
                                                      f"{r.stderr[-5000:]}")
