"""dtype codes of the format (docs/FORMAT.md) <-> torch and numpy dtypes."""
import numpy as np
import torch

from . import _ckpt

# code -> (name, element size)
CODES = {code: (name, size) for code, name, size in _ckpt.dtypes()}
BY_NAME = {name: code for code, (name, _) in CODES.items()}

TORCH_TO_CODE = {}
CODE_TO_TORCH = {}
for _code, (_name, _size) in CODES.items():
    _t = getattr(torch, _name, None)
    if isinstance(_t, torch.dtype):
        TORCH_TO_CODE[_t] = _code
        CODE_TO_TORCH[_code] = _t

_NUMPY = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
          "uint64", "float16", "float32", "float64", "complex64", "complex128"]
NUMPY_TO_CODE = {np.dtype(n if n != "bool" else np.bool_): BY_NAME[n] for n in _NUMPY}
CODE_TO_NUMPY = {c: d for d, c in NUMPY_TO_CODE.items()}


def torch_dtype(code):
    t = CODE_TO_TORCH.get(code)
    if t is None:
        name = CODES.get(code, ("code %d" % code,))[0]
        raise TypeError(f"dtype {name} has no torch equivalent in torch {torch.__version__}")
    return t

