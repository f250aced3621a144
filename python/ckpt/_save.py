"""ckpt.save: a Python object tree with torch tensors -> one ckpt file."""
import argparse
import collections
import os
import shutil
import tempfile

import numpy as np
import torch

from . import _ckpt
from ._dtypes import NUMPY_TO_CODE, TORCH_TO_CODE
from ._load import _untyped

_PIECE = 64 << 20  # device -> host copies of CUDA storages go in 64 MiB pieces
_MAX_DEPTH = 900   # the format allows 1000 levels; stay clear of Python's own limit


def _segment(key):
    if isinstance(key, str):
        return key
    return repr(key)


def _where(path):
    return "/".join(_segment(k) for k in path) or "<root>"


def _hint(obj):
    if isinstance(obj, torch.nn.Module):
        return "save model.state_dict() instead, and load it into a new model"
    if isinstance(obj, torch.optim.Optimizer):
        return "save optimizer.state_dict() instead"
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return "save its state_dict() instead"
    if isinstance(obj, collections.defaultdict):
        return "convert it with dict(...)"
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return "convert it with tuple(...) or ._asdict()"
    if callable(obj):
        return "a file cannot hold code; save the data the code needs"
    return ("ckpt holds tensors, numpy arrays, numbers, str, bytes, None, "
            "dtypes, devices and dict/list/tuple/set of them")


class _Saver:
    def __init__(self, writer):
        self.w = writer
        self.storages = {}   # (device, data_ptr, nbytes) -> storage id
        self.keep = []       # storages stay alive so their addresses stay unique
        self.open = set()    # ids of containers on the current path (cycles)

    # -- storages -------------------------------------------------------------
    def storage(self, t):
        s = _untyped(t)
        dev = t.device
        device = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
        key = (device, s.data_ptr(), s.nbytes())
        sid = self.storages.get(key)
        if sid is not None:
            return sid
        nbytes = s.nbytes()
        flat = torch.empty(0, dtype=torch.uint8, device=dev).set_(s, 0, (nbytes,), (1,))
        if dev.type == "cpu":
            sid = self.w.add_storage(flat.numpy(), device)
        else:
            sid = self.w.begin_storage(nbytes, device)
            for off in range(0, nbytes, _PIECE):
                self.w.append(flat[off:off + _PIECE].cpu().numpy())
            self.w.end_storage()
        self.storages[key] = sid
        self.keep.append(s)
        return sid

    def tensor(self, t, path):
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{_where(path)}: cannot save a {type(t).__module__}."
                            f"{type(t).__qualname__} (a tensor subclass); save a plain "
                            "tensor, e.g. t.as_subclass(torch.Tensor)")
        if t.layout != torch.strided:
            raise TypeError(f"{_where(path)}: cannot save a {t.layout} tensor; "
                            "save t.to_dense() or its indices and values")
        if t.is_quantized:
            raise TypeError(f"{_where(path)}: cannot save a quantized tensor; "
                            "save t.int_repr(), t.q_scale() and t.q_zero_point()")
        if t.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{_where(path)}: cannot save a tensor on device "
                            f"'{t.device}'; move it to the CPU first")
        code = TORCH_TO_CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"{_where(path)}: dtype {t.dtype} has no ckpt equivalent")
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        sid = self.storage(t)
        return self.w.add_tensor(code, list(t.shape), list(t.stride()), sid,
                                 t.storage_offset(), t.requires_grad,
                                 isinstance(t, torch.nn.Parameter))

    def array(self, a, path):
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))  # the format is little-endian
        code = NUMPY_TO_CODE.get(a.dtype)
        if code is None:
            raise TypeError(f"{_where(path)}: cannot save a numpy array of dtype "
                            f"{a.dtype}; numeric dtypes only")
        if a.flags.f_contiguous and not a.flags.c_contiguous:
            flat = a.T  # the same memory, C-contiguous: column-major strides kept
        else:
            if not a.flags.c_contiguous:
                a = a.copy(order="C")  # a copy only when strided
            flat = a
        strides = [s // a.itemsize for s in a.strides]
        sid = self.w.add_storage(flat.reshape(-1).view(np.uint8), "cpu")
        node = self.w.add_tensor(code, list(a.shape), strides, sid, 0, False, False)
        self.w.set_type_name(node, "numpy.ndarray")
        return node

    # -- the tree -------------------------------------------------------------
    def node(self, obj, path):
        w = self.w
        t = type(obj)
        if obj is None:
            return w.add_none()
        if t is bool or t is np.bool_:
            return w.add_bool(bool(obj))
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, np.ndarray):
            if t is not np.ndarray:
                raise TypeError(f"{_where(path)}: cannot save a {t.__qualname__} "
                                "(an ndarray subclass); save np.asarray(x)")
            return self.array(obj, path)
        if isinstance(obj, (int, np.integer)):
            v = int(obj)
            if -(1 << 63) <= v < (1 << 63):
                return w.add_int(v)
            n = (v.bit_length() + 8) // 8
            return w.add_bigint(v.to_bytes(n, "little", signed=True))
        if isinstance(obj, (float, np.floating)):
            return w.add_float(float(obj))
        if isinstance(obj, (complex, np.complexfloating)):
            c = complex(obj)
            return w.add_complex(c.real, c.imag)
        if isinstance(obj, str):
            return w.add_string(str(obj))
        if isinstance(obj, (bytes, bytearray)):
            return w.add_bytes(bytes(obj))
        if isinstance(obj, torch.dtype):
            code = TORCH_TO_CODE.get(obj)
            if code is None:
                raise TypeError(f"{_where(path)}: dtype {obj} has no ckpt equivalent")
            return w.add_dtype(code)
        if isinstance(obj, torch.device):
            d = obj
            return w.add_device(f"cuda:{d.index or 0}" if d.type == "cuda" and d.index is None
                                else str(d))
        if t in (list, tuple, set, frozenset, dict, collections.OrderedDict,
                 argparse.Namespace):
            return self.container(obj, t, path)
        raise TypeError(f"{_where(path)}: cannot save an object of type "
                        f"{t.__module__}.{t.__qualname__}: {_hint(obj)}")

    def container(self, obj, t, path):
        if len(path) >= _MAX_DEPTH:
            raise ValueError(f"{_where(path)}: nested deeper than {_MAX_DEPTH} levels")
        if id(obj) in self.open:
            raise ValueError(f"{_where(path)}: the object contains itself (a cycle)")
        self.open.add(id(obj))
        try:
            w = self.w
            if t is argparse.Namespace:
                obj = vars(obj)
            if t in (dict, collections.OrderedDict, argparse.Namespace):
                keys, values = [], []
                for k, v in obj.items():
                    keys.append(self.key(k, path))
                    values.append(self.node(v, path + [k]))
                tag = {collections.OrderedDict: "collections.OrderedDict",
                       argparse.Namespace: "argparse.Namespace"}.get(t, "")
                return w.add_dict(keys, values, tag)
            items = [self.node(v, path + [i]) for i, v in enumerate(obj)]
            return {list: w.add_list, tuple: w.add_tuple, set: w.add_set,
                    frozenset: w.add_frozenset}[t](items)
        finally:
            self.open.discard(id(obj))

    def key(self, k, path):
        if isinstance(k, (torch.Tensor, np.ndarray, list, dict, set)):
            raise TypeError(f"{_where(path)}: a dict key cannot be a {type(k).__name__}")
        return self.node(k, path + [k])


def save(obj, path, metadata=None, *, sync=True):
    """Writes `obj` to `path` atomically (a temporary file, fsync, rename).

    `obj` is any nesting of dict (str, int, tuple... keys), list, tuple,
    set, torch tensors and Parameters (any dtype, device, strides, shared
    storages), numpy arrays, int, float, complex, str, bytes, bool, None,
    torch.dtype and torch.device. Tensors sharing a storage are stored
    once and share it again when loaded. Anything else raises TypeError
    naming where it is; nothing is written then. `metadata` is a dict of
    str -> str kept in the header. sync=False skips the fsyncs (faster,
    not crash-safe). `path` may also be a writable binary file object
    (io.BytesIO...): the file is built aside, then copied into it.
    """
    if hasattr(path, "write"):
        _save_stream(obj, path, metadata)
        return
    path = os.fspath(path)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must be a dict of str to str")
    w = _ckpt.Writer(path, sync=sync, producer=f"ckpt-python {_ckpt.version}")
    try:
        saver = _Saver(w)
        try:
            root = saver.node(obj, [])
        except RecursionError:
            raise ValueError("the object is nested too deeply to save (Python's recursion "
                             f"limit; the format allows {_MAX_DEPTH} levels)") from None
        w.set_root(root)
        for k, v in (metadata or {}).items():
            w.set_metadata(k, v)
        w.commit()
    except BaseException:
        w.abort()
        raise


def _save_stream(obj, f, metadata):
    with tempfile.TemporaryDirectory(prefix="ckpt-", dir=os.environ.get("CKPT_TMPDIR")) as d:
        tmp = os.path.join(d, "stream.ckpt")
        save(obj, tmp, metadata, sync=False)
        with open(tmp, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
