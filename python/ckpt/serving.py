"""Weights for a serving engine's loader: each tensor-parallel rank reads
only its slice of each tensor.

    for name, tensor in ckpt.iter_weights("model.ckpt", device="cuda:0",
                                          tp_rank=r, tp_size=n,
                                          shard_dim={"*.q_proj.weight": 0,
                                                     "*.o_proj.weight": 1}):
        params[name].copy_(tensor)          # or: model.load_weights(...)

The (name, tensor) stream is what vLLM's `load_weights(weights)` and
SGLang's loaders consume (docs/INTEGRATIONS.md). A row slice (dim 0) of a
row-major tensor is one byte range; a slice on a later dim is one range per
row of the dims before it, so a column slice reads only its columns' bytes
(and, when each row's run spans pages, only their pages). Every range is
read with pread into memory the caller owns: no view of a mapping outlives
the call, and nothing else of the file is touched.
"""
import fnmatch
import os

import torch

from ._dtypes import CODES, torch_dtype
from ._errors import InvalidArgumentError, UnsupportedError
from ._load import _open_reader

__all__ = ["iter_weights"]


def _rule(shard_dim):
    """shard_dim as a function (name, shape) -> dim or None."""
    if shard_dim is None:
        return lambda name, shape: None
    if callable(shard_dim):
        return shard_dim
    if isinstance(shard_dim, dict):
        items = list(shard_dim.items())

        def by_pattern(name, shape):
            for pattern, dim in items:  # the first pattern that matches
                if fnmatch.fnmatchcase(name, pattern):
                    return dim
            return None
        return by_pattern
    raise TypeError("shard_dim must be None, a callable(name, shape) -> dim or None, or a "
                    "dict of name patterns (fnmatch) to dims")


def _ranges(shape, elem, dim, lo, hi):
    """(first byte, length) of each run of the slice [lo, hi) on `dim` of a
    row-major tensor, relative to the tensor's first byte."""
    if not shape:
        return [(0, elem)]
    outer = 1
    for s in shape[:dim]:
        outer *= s
    inner = elem  # bytes of one index of `dim`
    for s in shape[dim + 1:]:
        inner *= s
    row = shape[dim] * inner  # bytes of one index of the dims before `dim`
    run = (hi - lo) * inner
    if run == 0 or outer == 0:
        return []
    if run == row:
        return [(0, row * outer)]
    if outer == 1:
        return [(lo * inner, run)]
    return [(o * row + lo * inner, run) for o in range(outer)]


def iter_weights(path, device="cpu", tp_rank=0, tp_size=1, shard_dim=None, *, threads=4,
                 stats=None):
    """Yields (name, tensor) for every tensor of the ckpt file `path`, in
    the order of their bytes in the file, each already this rank's slice
    and on `device`.

    shard_dim says, per tensor, the dim to split across the tp_size ranks
    (rank tp_rank gets the tp_rank-th of tp_size equal parts) or None to
    give every rank the whole tensor: a callable(name, shape), or a dict of
    fnmatch patterns to dims (the first match wins; no match: whole). A
    split dim must divide by tp_size (as vLLM's parallel layers require).

    Each tensor is the caller's: CPU memory filled by pread (pinned when
    `device` is a CUDA device, then copied there), never a view of the
    file. A `stats` dict, when given, gets bytes_needed (the slices' bytes)
    and bytes_read (what the reads asked the kernel for) added to it.
    Tensors that are not row-major in the file are read whole and sliced.
    """
    if not (isinstance(tp_size, int) and tp_size >= 1 and isinstance(tp_rank, int)
            and 0 <= tp_rank < tp_size):
        raise InvalidArgumentError(f"tp_rank {tp_rank!r} of tp_size {tp_size!r}: need "
                                   "0 <= tp_rank < tp_size")
    rule = _rule(shard_dim)
    device = torch.device(device)
    pin = device.type == "cuda"
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UnsupportedError(f"{path} is a directory: iter_weights reads one ckpt file "
                               "(`ckpt consolidate` makes one of a sharded checkpoint)")
    r = _open_reader(path, mmap=False)
    storages = r.storages()
    tensors = sorted(r.tensors(), key=lambda t: (
        storages[t.storage].offset + t.storage_offset * CODES[t.dtype][1], t.path))
    if stats is not None:
        stats.setdefault("bytes_needed", 0)
        stats.setdefault("bytes_read", 0)
    for t in tensors:
        shape = list(t.shape)
        dim = rule(t.path, tuple(shape))
        dtype = torch_dtype(t.dtype)
        elem = CODES[t.dtype][1]
        # No split: the whole of dim 0 (a 0-d tensor: its one element).
        split, lo, hi = dim, 0, (shape[0] if shape else 1)
        if dim is not None:
            if type(dim) is not int or not -len(shape) <= dim < len(shape):
                raise InvalidArgumentError(f"{path}: tensor '{t.path}' of shape "
                                           f"{tuple(shape)} has no dim {dim!r}")
            split = dim % len(shape)
            if shape[split] % tp_size:
                raise InvalidArgumentError(
                    f"{path}: tensor '{t.path}' has {shape[split]} along dim {split}, which "
                    f"does not divide by tp_size {tp_size}")
            part = shape[split] // tp_size
            lo, hi = tp_rank * part, (tp_rank + 1) * part
        out_shape = list(shape)
        if split is not None:
            out_shape[split] = hi - lo
        row_major = _row_major(shape) == list(t.strides)
        if row_major:
            out = torch.empty(out_shape, dtype=dtype, pin_memory=pin)
            runs = _ranges(shape, elem, split or 0, lo, hi)
            base = t.storage_offset * elem
            flat = out.reshape(-1).view(torch.uint8) if out.numel() else None
            bufs, begins, at = [], [], 0
            for first, n in runs:
                bufs.append(flat[at:at + n].numpy())
                begins.append(base + first)
                at += n
            got = r.read_ranges([t.storage] * len(bufs), begins, bufs, threads) if bufs else 0
        else:
            # Not row-major (a transposed view saved as is): the whole
            # storage span of the tensor, then the slice.
            whole = _whole(r, t, storages, threads)
            got = whole.numel() * elem
            out = whole.narrow(split, lo, hi - lo).contiguous() if split is not None else whole
            if pin:
                out = out.pin_memory()
        if stats is not None:
            stats["bytes_needed"] += out.numel() * elem
            stats["bytes_read"] += got
        if device.type != "cpu":
            out = out.to(device, non_blocking=pin)
        yield t.path, out


def _row_major(shape):
    strides, n = [], 1
    for s in reversed(shape):
        strides.append(n)
        n *= max(s, 1)
    return list(reversed(strides))


def _whole(r, t, storages, threads):
    """A non-row-major tensor read whole: its storage bytes, then viewed."""
    nbytes = storages[t.storage].nbytes
    buf = torch.empty(nbytes, dtype=torch.uint8)
    r.read_storages([t.storage], [buf.numpy()], threads)
    dtype = torch_dtype(t.dtype)
    return buf.view(dtype).as_strided(list(t.shape), list(t.strides), t.storage_offset).clone()
