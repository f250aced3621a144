"""Runs one test module verbosely; exit 77 (skipped) when torch is missing,
so CTest shows the reason instead of a failure."""
import sys
import unittest

try:
    import torch  # noqa: F401
    import numpy  # noqa: F401
except ImportError as e:
    print(f"SKIPPED: {e} (run scripts/install_deps.sh for Debian's torch and .venv)")
    sys.exit(77)

suite = unittest.defaultTestLoader.loadTestsFromName(sys.argv[1])
result = unittest.TextTestRunner(verbosity=2).run(suite)
sys.exit(0 if result.wasSuccessful() else 1)
