"""python -m ckpt ...: the ckpt command line (inspect, cat, get, verify,
diff, import, export-hf, load, ...), the same code as the `ckpt`
executable. Needs only the compiled module: `import ckpt` imports no torch
or numpy, so this runs where they are not installed
(tests/python/test_compat.py checks it)."""
import sys

from . import _ckpt


def main():
    sys.stdout.flush()
    return _ckpt.cli_main(["ckpt"] + sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
