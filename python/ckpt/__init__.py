"""ckpt: fast, safe checkpoints for PyTorch.

    import ckpt
    ckpt.save({"model": model.state_dict(), "epoch": 3}, "run.ckpt")
    state = ckpt.load("run.ckpt", map_location="cpu")
    with ckpt.open("run.ckpt") as f:          # reads only the header
        w = f["model/fc.weight"]               # zero-copy view
        rows = f.get_slice("model/emb.weight")[1000:2000]

docs/PYTHON.md describes the whole API.
"""
from . import _ckpt
from ._errors import (ChecksumError, CkptError, CkptIOError, CudaError, FormatError,
                      InvalidArgumentError, NotFoundError, PickleRefusedError,
                      ResourceExhaustedError, UnsupportedError)
from ._load import File, load, open  # noqa: A004,F401 - ckpt.open mirrors safe_open (not in __all__)
from ._save import save
from . import rng
from .interop import convert, flatten, import_pth, save_safetensors
from .manager import CheckpointInfo, CheckpointManager

__version__ = _ckpt.version
FORMAT_VERSION = _ckpt.format_version

# `open` stays out of __all__: `from ckpt import *` must not shadow the
# builtin open(); use it as ckpt.open.
__all__ = [
    "save", "load", "File", "rng", "CheckpointManager", "CheckpointInfo",
    "convert", "import_pth", "save_safetensors", "flatten",
    "CkptError", "FormatError", "ChecksumError", "UnsupportedError", "NotFoundError",
    "InvalidArgumentError", "PickleRefusedError", "CkptIOError", "CudaError",
    "ResourceExhaustedError",
]
