"""ckpt: fast, safe checkpoints for PyTorch.

    import ckpt
    ckpt.save({"model": model.state_dict(), "epoch": 3}, "run.ckpt")
    state = ckpt.load("run.ckpt", map_location="cpu")
    with ckpt.open("run.ckpt") as f:          # reads only the header
        w = f["model/fc.weight"]               # zero-copy view
        rows = f.get_slice("model/emb.weight")[1000:2000]

docs/PYTHON.md describes the whole API.

`import ckpt` imports neither torch nor numpy: the names that need them
(save, load, open, ...) import their module on first use (PEP 562), so
`python -m ckpt verify FILE` and the errors work where torch is not
installed (the wheel is torch-free). There, dir(ckpt) and `from ckpt
import *` hold only what loads, and using a name that needs torch raises
an ImportError saying so - hasattr(ckpt, "save") too, since Python cannot
make one exception both an ImportError and an AttributeError.
"""
import importlib
import sys

from . import _ckpt
from ._errors import (ChecksumError, CkptError, CkptIOError, CudaError, FormatError,
                      InvalidArgumentError, NotFoundError, PickleRefusedError,
                      ResourceExhaustedError, UnsupportedError)

__version__ = _ckpt.version
FORMAT_VERSION = _ckpt.format_version

# name -> (module, attribute; None: the module itself), imported on first use.
_LAZY = {
    "save": ("._save", "save"),
    "load": ("._load", "load"),
    "File": ("._load", "File"),
    "open": ("._compat", "open"),
    "safe_open": ("._compat", "safe_open"),
    "save_file": ("._compat", "save_file"),
    "load_file": ("._compat", "load_file"),
    "save_model": ("._compat", "save_model"),
    "load_model": ("._compat", "load_model"),
    "rng": (".rng", None),
    "convert": (".interop", "convert"),
    "flatten": (".interop", "flatten"),
    "import_pth": (".interop", "import_pth"),
    "save_safetensors": (".interop", "save_safetensors"),
    "interop": (".interop", None),
    "manager": (".manager", None),
    "CheckpointInfo": (".manager", "CheckpointInfo"),
    "CheckpointManager": (".manager", "CheckpointManager"),
    "distributed": (".distributed", None),
    "iter_weights": (".serving", "iter_weights"),
    "hf": (".hf", None),
}


def _submodules():
    """The package's modules (ckpt._load, ckpt.rng...), which `ckpt.NAME`
    imports as an eager `from . import` used to make them attributes."""
    import pkgutil
    return {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("__")}


_DEPS_FOUND = None


def _deps_found():
    """Whether torch and numpy can be imported (found, not imported)."""
    global _DEPS_FOUND  # noqa: PLW0603 - a cache
    if _DEPS_FOUND is None:
        from importlib.util import find_spec
        _DEPS_FOUND = all(find_spec(m) is not None for m in ("torch", "numpy"))
    return _DEPS_FOUND


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
    elif not name.startswith("__") and name in _submodules():
        module, attr = "." + name, None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # torch's import nests deeply: a recursion limit lowered after
    # `import ckpt` (which used to import torch) must not break it.
    limit = sys.getrecursionlimit()
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    try:
        sys.setrecursionlimit(max(limit, depth + 1000))
        m = importlib.import_module(module, __name__)
    except ImportError as e:
        if e.name in ("torch", "numpy"):
            raise ImportError(
                f"ckpt.{name} needs torch and numpy ({e.name} is missing: pip install "
                "torch); without them ckpt offers its command line (`python -m ckpt`, "
                "`ckpt`) and its exceptions", name=e.name) from e
        raise
    finally:
        sys.setrecursionlimit(limit)
    value = m if attr is None else getattr(m, attr)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__():
    """The names ckpt has, without importing torch. Without torch, only
    those that load there (the exceptions, the version...), so
    inspect.getmembers(ckpt) and pydoc work."""
    names = set(globals())
    if _deps_found():
        names |= set(_LAZY) | _submodules()
    return sorted(names)


# `open` stays out of __all__: `from ckpt import *` must not shadow the
# builtin open(); use it as ckpt.open.
__all__ = [
    "save", "load", "File", "rng", "CheckpointManager", "CheckpointInfo",
    "convert", "import_pth", "save_safetensors", "flatten", "iter_weights",
    "safe_open", "save_file", "load_file", "save_model", "load_model",
    "CkptError", "FormatError", "ChecksumError", "UnsupportedError", "NotFoundError",
    "InvalidArgumentError", "PickleRefusedError", "CkptIOError", "CudaError",
    "ResourceExhaustedError",
]
if not _deps_found():  # without torch, `from ckpt import *` exports what loads there
    __all__[:] = [n for n in __all__ if n not in _LAZY]
