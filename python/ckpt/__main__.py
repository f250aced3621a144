"""python -m ckpt ...: the ckpt command line (inspect, cat, get, verify,
diff, import, load), the same code as the `ckpt` executable. Needs only
the compiled module: `import ckpt` imports no torch or numpy, so this runs
where they are not installed (tests/python/test_compat.py checks it).

Two commands need torch and the safetensors package, and so live here
only: `import DIR OUT.ckpt` of a Hugging Face save_pretrained directory,
and `export-hf IN.ckpt DIR [--max-shard-size 5GB]` (ckpt.hf)."""
import os
import sys

from . import _ckpt

_EXPORT_HELP = """usage: python -m ckpt export-hf IN.ckpt DIR [--max-shard-size SIZE]

Writes the tensors of IN.ckpt (a flat state dict) to DIR in Hugging Face's
save_pretrained layout: model.safetensors, or shards of at most SIZE
(default 5GB; 500MB, 2GiB, bytes) with model.safetensors.index.json, and
config.json when IN.ckpt came from `import DIR`. Each file is written
atomically. Exit 1 with the reason on stderr when it cannot.
"""
_IMPORT_DIR_HELP = """usage: python -m ckpt import DIR OUT.ckpt

DIR is a Hugging Face save_pretrained directory (model.safetensors or its
shards and index, or pytorch_model.bin or its shards and index, read
without running anything from them); OUT.ckpt gets its tensors and, in
its metadata, config.json. (A torch.save file IN.pth imports as with the
ckpt executable.)
"""


def _hf(argv):
    """Runs import DIR / export-hf; None when argv is neither."""
    if not argv or argv[0] not in ("import", "export-hf"):
        return None
    args = argv[1:]
    if argv[0] == "import" and not (len(args) == 2 and os.path.isdir(args[0])):
        return None
    help_text = _EXPORT_HELP if argv[0] == "export-hf" else _IMPORT_DIR_HELP
    if "-h" in args or "--help" in args:
        print(help_text, end="")
        return 0
    shard = "5GB"
    if "--max-shard-size" in args:
        i = args.index("--max-shard-size")
        if i + 1 >= len(args):
            print(help_text + "\nerror: --max-shard-size needs a SIZE", file=sys.stderr)
            return 2
        shard = args[i + 1]
        del args[i:i + 2]
    if len(args) != 2 or any(a.startswith("-") for a in args):
        print(help_text + "\nerror: need two paths", file=sys.stderr)
        return 2
    from . import CkptError, hf
    try:
        if argv[0] == "import":
            n = hf.import_pretrained(args[0], args[1])
            print(f"{args[0]} -> {args[1]}: {n} tensors (Hugging Face save_pretrained)")
        else:
            files = hf.export_pretrained(args[0], args[1], max_shard_size=shard)
            print(f"{args[0]} -> {args[1]}: {len(files)} files")
    except (CkptError, OSError, TypeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main():
    sys.stdout.flush()
    rc = _hf(sys.argv[1:])
    if rc is not None:
        return rc
    return _ckpt.cli_main(["ckpt"] + sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
