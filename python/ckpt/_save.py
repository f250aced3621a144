"""ckpt.save: a Python object tree with torch tensors -> one ckpt file."""
import argparse
import collections
import itertools
import os
import reprlib
import shutil
import tempfile

import numpy as np
import torch

from . import _ckpt, _progress
from ._dtypes import NUMPY_TO_CODE, TORCH_TO_CODE
from ._errors import InvalidArgumentError
from ._kinds import CODE as KIND_CODE
from ._kinds import CONTAINER_TYPES, HASHABLE_CONTAINERS, UNHASHABLE_CONTAINERS
from ._load import _untyped

_PIECE = 64 << 20  # device -> host copies of CUDA storages go in 64 MiB pieces
_MAX_DEPTH = _ckpt.max_tree_depth  # FORMAT.md R14: nesting depth, root = 1
# Saved as a Dict node with this class tag (FORMAT.md 7.1 type_name).
_DICT_TAGS = {collections.OrderedDict: "collections.OrderedDict",
              argparse.Namespace: "argparse.Namespace", dict: ""}
_CONTAINER_TYPES = frozenset(CONTAINER_TYPES) | frozenset(_DICT_TAGS)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _segment(key):
    """A path segment for a message: a key's path form (as the file would
    name it), a bounded repr for what no file can hold."""
    if not isinstance(key, str):
        try:
            key = _ckpt.key_segment(key, key_object)
        except (TypeError, ValueError):
            return _REPR.repr(key)  # bounded: a key may be a tuple nested 999 deep
    if len(key) > 80:
        key = key[:60] + "..."
    # A lone surrogate (the error may be about it) is shown escaped.
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _where(path):
    """The path of a node being saved (raw segments), for messages."""
    if len(path) > 24:  # a deep path: its ends say where
        path = path[:10] + [f"...({len(path) - 20} more)..."] + path[-10:]
    out = ""
    for i, seg in enumerate(path):
        out = _ckpt.child_path(out, i == 0, _segment(seg))
    return out or "<root>"


def key_object(key):
    """(kind code, payload) for a dict key the binding does not know (it
    knows no torch or numpy), as ckpt.save stores it; None: not a key. The
    on_object of _ckpt.key_segment."""
    if isinstance(key, torch.dtype):
        code = TORCH_TO_CODE.get(key)
        return None if code is None else (KIND_CODE["dtype"], code)
    if isinstance(key, torch.device):
        return KIND_CODE["device"], device_string(key)
    for types, kind, as_python in _NUMPY_KEYS:
        if isinstance(key, types):
            return KIND_CODE[kind], as_python(key)
    return None


_NUMPY_KEYS = ((np.bool_, "bool", bool), (np.integer, "int", int),
               (np.floating, "float", float), (np.complexfloating, "complex", complex))


def device_string(d):
    """A torch.device as the file writes it: CUDA always with its index."""
    return f"cuda:{d.index or 0}" if d.type == "cuda" else str(d)


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
    def __init__(self, writer, progress=None):
        self.w = writer
        self.progress = progress  # a _progress.Reporter, or None
        self.storages = {}   # (device, data_ptr, nbytes) -> storage id
        self.keep = []       # storages stay alive so their addresses stay unique
        self.open = set()    # ids of containers on the current path (cycles)

    # -- storages -------------------------------------------------------------
    def storage(self, t):
        s = _untyped(t)
        dev = t.device
        device = device_string(dev)
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
        if self.progress is not None:
            self.progress.add(nbytes)
        self.storages[key] = sid
        self.keep.append(s)
        return sid

    def tensor(self, t, where):
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where()}: cannot save a {type(t).__module__}."
                            f"{type(t).__qualname__} (a tensor subclass); save a plain "
                            "tensor, e.g. t.as_subclass(torch.Tensor)")
        if t.layout != torch.strided:
            raise TypeError(f"{where()}: cannot save a {t.layout} tensor; "
                            "save t.to_dense() or its indices and values")
        if t.is_quantized:
            raise TypeError(f"{where()}: cannot save a quantized tensor; "
                            "save t.int_repr(), t.q_scale() and t.q_zero_point()")
        if t.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{where()}: cannot save a tensor on device "
                            f"'{t.device}'; move it to the CPU first")
        code = TORCH_TO_CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"{where()}: dtype {t.dtype} has no ckpt equivalent")
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        sid = self.storage(t)
        return self.w.add_tensor(code, list(t.shape), list(t.stride()), sid,
                                 t.storage_offset(), t.requires_grad,
                                 isinstance(t, torch.nn.Parameter))

    def array(self, a, where):
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))  # the format is little-endian
        code = NUMPY_TO_CODE.get(a.dtype)
        if code is None:
            raise TypeError(f"{where()}: cannot save a numpy array of dtype "
                            f"{a.dtype}; numeric dtypes only")
        if a.flags.f_contiguous and not a.flags.c_contiguous:
            flat = a.T  # the same memory, C-contiguous: column-major strides kept
        else:
            if not a.flags.c_contiguous:
                a = a.copy(order="C")  # a copy only when strided
            flat = a
        strides = [s // a.itemsize for s in a.strides]
        sid = self.w.add_storage(flat.reshape(-1).view(np.uint8), "cpu")
        if self.progress is not None:
            self.progress.add(a.nbytes)
        node = self.w.add_tensor(code, list(a.shape), strides, sid, 0, False, False)
        self.w.set_type_name(node, "numpy.ndarray")
        return node

    # -- the tree -------------------------------------------------------------
    def leaf(self, obj, where, seg):
        """The node of anything but a container."""
        w = self.w
        t = type(obj)
        if obj is None:
            return w.add_none()
        if t is bool or t is np.bool_:
            return w.add_bool(bool(obj))
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, lambda: where(seg))
        if isinstance(obj, np.ndarray):
            if t is not np.ndarray:
                raise TypeError(f"{where(seg)}: cannot save a {t.__qualname__} "
                                "(an ndarray subclass); save np.asarray(x)")
            return self.array(obj, lambda: where(seg))
        if isinstance(obj, (int, np.integer)):
            v = int(obj)
            if -(1 << 63) <= v < (1 << 63):
                return w.add_int(v)
            # Minimal two's complement: the magnitude's bits plus a sign bit
            # (-(2**k) needs only k + 1 bits, as ~v = 2**k - 1 shows).
            n = ((v if v >= 0 else ~v).bit_length() + 8) // 8
            if n > _ckpt.max_bigint_bytes:
                raise InvalidArgumentError(
                    f"{where(seg)}: an int of {n} bytes; the format holds ints of "
                    f"at most {_ckpt.max_bigint_bytes} bytes (-(2**32767) to 2**32767 - 1)")
            return w.add_bigint(v.to_bytes(n, "little", signed=True))
        if isinstance(obj, (float, np.floating)):
            return w.add_float(float(obj))
        if isinstance(obj, (complex, np.complexfloating)):
            c = complex(obj)
            return w.add_complex(c.real, c.imag)
        if isinstance(obj, str):
            obj = str(obj)
            if not obj.isascii():
                try:
                    obj.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(
                        f"{where(seg)}: a str holding a lone surrogate ({e.object[e.start]!r} "
                        f"at {e.start}) cannot be saved: ckpt strings are UTF-8 "
                        "(docs/FORMAT.md R19)") from None
            return w.add_string(obj)
        if isinstance(obj, (bytes, bytearray)):
            return w.add_bytes(bytes(obj))
        if isinstance(obj, torch.dtype):
            code = TORCH_TO_CODE.get(obj)
            if code is None:
                raise TypeError(f"{where(seg)}: dtype {obj} has no ckpt equivalent")
            return w.add_dtype(code)
        if isinstance(obj, torch.device):
            return w.add_device(device_string(obj))
        raise TypeError(f"{where(seg)}: cannot save an object of type "
                        f"{t.__module__}.{t.__qualname__}: {_hint(obj)}")

    def tree(self, root):
        """The node id of `root`, built bottom-up without recursion: an
        explicit stack of open containers, so any depth the format allows
        (1000, root = 1) saves under Python's default recursion limit."""
        # A frame: [container, its type, iterator of (child, segment),
        #           child ids, its own segment]
        stack = []
        leaf, containers = self.leaf, _CONTAINER_TYPES

        def where(seg=_NO_SEGMENT):
            path = [f[4] for f in stack[1:]]
            if seg is not _NO_SEGMENT:
                path.append(seg)
            return _where(path)

        if type(root) not in containers:
            return leaf(root, where, _NO_SEGMENT)
        self.push(stack, root, _NO_SEGMENT, where)
        while True:
            f = stack[-1]
            ids = f[3]
            deep = len(stack) >= _MAX_DEPTH  # children would be at depth len(stack) + 1
            for child, seg in f[2]:
                if deep:
                    raise InvalidArgumentError(
                        f"{where(seg)}: nested too deeply: the format allows {_MAX_DEPTH} "
                        "levels, root = 1 (docs/FORMAT.md R14)")
                if type(child) in containers:
                    self.push(stack, child, seg, where)
                    break
                ids.append(leaf(child, where, seg))
            else:  # every child done: close the container
                node = self.close(f)
                self.open.discard(id(f[0]))
                stack.pop()
                if not stack:
                    return node
                stack[-1][3].append(node)

    def push(self, stack, obj, seg, where):
        if id(obj) in self.open:
            raise ValueError(f"{where(seg)}: the object contains itself (a cycle)")
        self.open.add(id(obj))
        t = type(obj)
        if t in _DICT_TAGS:
            children = _dict_children(vars(obj) if t is argparse.Namespace else obj, where)
        elif t in (set, frozenset) and any(_holds_array(x) for x in obj):
            raise TypeError(f"{where(seg)}: a set cannot hold a tensor or array: a set has "
                            "no order, so its tensors would have no stable path "
                            "(docs/FORMAT.md 7.4); store them in a list or a dict")
        else:
            children = zip(obj, itertools.count())
        stack.append([obj, t, children, [], seg])

    def close(self, f):
        obj, t, _, ids, _ = f
        w = self.w
        if t in _DICT_TAGS:
            return w.add_dict(ids[0::2], ids[1::2], _DICT_TAGS[t])
        return w.add_items(CONTAINER_TYPES[t], ids)


def _holds_array(x):
    """True when x is, or a tuple/frozenset inside x holds, a tensor or a
    numpy array (which keys and set items may not)."""
    todo = [x]
    while todo:
        y = todo.pop()
        if isinstance(y, (torch.Tensor, np.ndarray)):
            return True
        if type(y) in HASHABLE_CONTAINERS:
            todo.extend(y)
    return False


def _dict_children(d, where):
    """A dict's keys and values, alternating, as (child, path segment)."""
    for k, v in d.items():
        if isinstance(k, (torch.Tensor, np.ndarray) + UNHASHABLE_CONTAINERS):
            raise TypeError(f"{where(k)}: a dict key cannot be a {type(k).__name__}")
        if _holds_array(k):
            raise TypeError(f"{where(k)}: a dict key cannot hold a tensor or array")
        yield k, k
        yield v, k


_NO_SEGMENT = object()


def _storage_bytes(root):
    """The bytes a save of `root` writes for its tensors and arrays (the
    progress total): each tensor storage once, as _Saver.storage stores
    it; every array. Never raises: what save() refuses, it counts or
    skips (save() then fails anyway). Each container is walked once, so
    an array under a container that appears twice counts once (the bar
    then reaches 100% a little early). ~0.6 us a tensor."""
    total = 0
    seen_storage, seen = set(), set()
    tensor_types, strided = (torch.Tensor, torch.nn.Parameter), torch.strided
    todo = [root]
    while todo:
        x = todo.pop()
        t = type(x)
        if t in tensor_types:
            if x.layout is not strided:
                continue
            try:
                st = _untyped(x)
            except (RuntimeError, NotImplementedError):
                continue
            key = (st.data_ptr(), st.nbytes(), st.device)
            if key not in seen_storage:
                seen_storage.add(key)
                total += key[1]
        elif t is np.ndarray:
            total += x.nbytes
        elif t in _CONTAINER_TYPES and id(x) not in seen:
            seen.add(id(x))
            if t is argparse.Namespace:
                x = vars(x)
            if isinstance(x, dict):
                todo.extend(x.values())
            elif t not in (set, frozenset):  # a set cannot hold arrays
                todo.extend(x)
    return total


def save(obj, path, metadata=None, *, sync=True, progress=False, pickle_module=None,
         pickle_protocol=None, _use_new_zipfile_serialization=None,
         _disable_byteorder_record=None):
    """Writes `obj` to `path` atomically (a temporary file, fsync, rename).

    `obj` is any nesting of dict (str, int, tuple... keys), list, tuple,
    set, torch tensors and Parameters (any dtype, device, strides, shared
    storages), numpy arrays, int, float, complex, str, bytes, bool, None,
    torch.dtype and torch.device, up to the format's 1000 levels. Tensors
    sharing a storage are stored once and share it again when loaded.
    Anything else raises TypeError naming where it is; nothing is written
    then. `metadata` is a dict of str -> str kept in the header.
    sync=False skips the fsyncs (faster, not crash-safe). `path` may also
    be a writable binary file object (io.BytesIO...): the file is built
    aside, then copied into it.

    progress=True shows a progress bar on stderr (tqdm's if installed,
    else a plain line) of the storage bytes written, with GB/s; a
    callable progress(done_bytes, total_bytes) is called instead (as
    storages are written, first with 0, last with done == total once the
    file is committed). docs/PYTHON.md "Progress".

    A Ctrl-C (SIGINT) that comes while the file is being committed is held
    back and delivered once save() has returned: a KeyboardInterrupt out of
    save() means nothing was written (the old file is intact).

    torch.save's pickle_module, pickle_protocol,
    _use_new_zipfile_serialization and _disable_byteorder_record are
    accepted and have no effect (nothing is pickled).
    """
    del pickle_module, pickle_protocol, _use_new_zipfile_serialization, _disable_byteorder_record
    if hasattr(path, "write"):
        _save_stream(obj, path, metadata, progress)
        return
    # Holds SIGINT from the commit until this frame is gone (see _save_file).
    _deferred = _save_file(obj, path, metadata, sync, progress)  # noqa: F841


def _save_file(obj, path, metadata, sync, progress=False, desc=None):
    """Saves to a path; returns the SigintDeferral taken for the commit,
    which holds SIGINT back until the caller drops it (normally as its
    frame is freed on return), so an interrupt cannot land between a
    successful commit and the caller's return."""
    path = os.fspath(path)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must be a dict of str to str")
    _progress.check(progress)
    w = _ckpt.Writer(path, sync=sync, producer=f"ckpt-python {_ckpt.version}")
    deferred = rep = None
    try:
        if progress is not None and progress is not False:
            rep = _progress.reporter(progress, _storage_bytes(obj),
                                     desc or _progress.describe("ckpt.save", path))
        saver = _Saver(w, rep)
        w.set_root(saver.tree(obj))
        for k, v in (metadata or {}).items():
            w.set_metadata(k, v)
        deferred = _ckpt.SigintDeferral()
        w.commit()
    except BaseException:
        w.abort()
        if rep is not None:
            rep.abandon()
        if deferred is not None:
            deferred.release()  # nothing was written: the interrupt may come now
        raise
    if rep is not None:
        # The file is in place. Should the sink raise now, SIGINT is let
        # go first: the traceback would keep this frame, and `deferred`
        # with it, alive.
        try:
            rep.close()
        except BaseException:
            deferred.release()
            raise
    return deferred


def _save_stream(obj, f, metadata, progress=False):
    with tempfile.TemporaryDirectory(prefix="ckpt-", dir=os.environ.get("CKPT_TMPDIR")) as d:
        tmp = os.path.join(d, "stream.ckpt")
        save(obj, tmp, metadata, sync=False, progress=progress)
        with open(tmp, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
