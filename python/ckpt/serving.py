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

On a CUDA device (with the C++ GPU loader built in) the slices go through
ckpt's device loader: the file is opened as a one-rank sharded checkpoint
and each tensor's box loaded by LoadBoxesToDevice - row runs through the
pinned staging ring straight into the tensor, column slices with one
cudaMemcpy2DAsync per strided pattern. A sharded checkpoint directory
works the same way, on the CPU too: each rank reads only the chunks its
boxes overlap.
"""
import fnmatch
import operator
import os

import torch

from . import _ckpt
from ._dtypes import CODES, torch_dtype
from ._errors import InvalidArgumentError, UnsupportedError
from ._load import _from_region, _open_reader

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


#: Runs shorter than this are copied from the file's mapping instead of
#: read one pread each (the sharded loader's rule, lib/dist/load.cc): a
#: column slice of narrow rows would otherwise cost a syscall per row.
_MIN_PREAD = 64 << 10
#: Reads are issued for this many bytes of tensors at once (one
#: ReadStorages call, its threads spread over them), then yielded.
_BATCH = 64 << 20
#: The same for the GPU loader, which sets up its staging per call.
_GPU_BATCH = 1 << 30


def iter_weights(path, device="cpu", tp_rank=0, tp_size=1, shard_dim=None, *, threads=4,
                 stats=None):
    """Yields (name, tensor) for every tensor of the ckpt file (or sharded
    checkpoint directory) `path`, in the order of their bytes in the file,
    each already this rank's slice and on `device`. (On a CUDA device,
    tensors stored as views in another layout come after the others. No
    checksums are checked: `ckpt verify` does.)

    shard_dim says, per tensor, the dim to split across the tp_size ranks
    (rank tp_rank gets the tp_rank-th of tp_size equal parts) or None to
    give every rank the whole tensor: a callable(name, shape), or a dict of
    fnmatch patterns to dims (the first match wins; no match: whole). A
    split dim must divide by tp_size (as vLLM's parallel layers require).

    Each tensor is the caller's, never a view of the file: CPU memory, or
    memory on `device` - CUDA tensors filled by ckpt's GPU loader (built
    without it, and for other devices, pinned host memory then a copy).
    From a file to the CPU, whole tensors and row slices are read by pread
    of their one byte range; a slice on a later dim by pread of each row's
    run, or, for runs under 64 KiB, copied run by run from the file's
    mapping (touching only the pages the runs lie in). A `stats` dict, when given, gets added to it
    bytes_needed (the slices' bytes), bytes_read (all bytes the loader
    read: pread and mapping copies) and bytes_mapped (those it copied from
    the mapping, which /proc/self/io's rchar does not count). Tensors that
    are not row-major in the file are read whole, then sliced.
    """
    if not (isinstance(tp_size, int) and tp_size >= 1 and isinstance(tp_rank, int)
            and 0 <= tp_rank < tp_size):
        raise InvalidArgumentError(f"tp_rank {tp_rank!r} of tp_size {tp_size!r}: need "
                                   "0 <= tp_rank < tp_size")
    rule = _rule(shard_dim)
    device = torch.device(device)
    pin = device.type == "cuda"
    path = os.fspath(path)
    counts = {"bytes_needed": 0, "bytes_read": 0, "bytes_mapped": 0}
    try:
        if os.path.isdir(path):
            if not _ckpt.is_sharded_checkpoint(path):
                raise UnsupportedError(f"{path} is a directory but not a sharded checkpoint "
                                       "(no MANIFEST.ckptm): iter_weights reads a ckpt file "
                                       "or a sharded checkpoint directory")
            yield from _boxes(_ckpt.ShardedCheckpoint(path), None, device, rule, tp_rank,
                              tp_size, threads, counts, path)
            return
        r = _open_reader(path, mmap=True)
        storages = r.storages()
        tensors = sorted(r.tensors(), key=lambda t: (
            storages[t.storage].offset + t.storage_offset * CODES[t.dtype][1], t.path))
        if device.type == "cuda" and _ckpt.has_gpu_loader:
            # Row-major tensors by the device loader, the rest (views in
            # another layout, not in the one-rank index) as on the CPU.
            sc = _ckpt.ShardedCheckpoint.open_file(path)
            indexed = {t[0] for t in sc.manifest()["tensors"]}
            yield from _boxes(sc, [t for t in tensors if t.path in indexed], device, rule,
                              tp_rank, tp_size, threads, counts, path)
            tensors = [t for t in tensors if t.path not in indexed]
        batch, size = [], 0
        for t in tensors:
            batch.append(_plan(r, t, storages, rule, tp_rank, tp_size, pin, path))
            size += batch[-1][1].numel() * batch[-1][1].element_size()
            if size >= _BATCH:
                yield from _run(r, batch, device, pin, threads, counts)
                batch, size = [], 0
        yield from _run(r, batch, device, pin, threads, counts)
    finally:
        if stats is not None:
            for k, v in counts.items():
                stats[k] = stats.get(k, 0) + v


def _split(path, name, shape, rule, tp_rank, tp_size):
    """(dim or None, lo, hi): this rank's part of `shape` as the rule says."""
    dim = rule(name, tuple(shape))
    if dim is None:
        return None, 0, (shape[0] if shape else 1)
    if not isinstance(dim, bool):
        try:  # an int, or anything that is one (numpy.int64, a 0-d tensor)
            dim = operator.index(dim)
        except TypeError:
            pass
    if type(dim) is not int or not -len(shape) <= dim < len(shape):
        raise InvalidArgumentError(f"{path}: tensor '{name}' of shape "
                                   f"{tuple(shape)} has no dim {dim!r}")
    split = dim % len(shape)
    if shape[split] % tp_size:
        raise InvalidArgumentError(
            f"{path}: tensor '{name}' has {shape[split]} along dim {split}, which "
            f"does not divide by tp_size {tp_size}")
    part = shape[split] // tp_size
    return split, tp_rank * part, (tp_rank + 1) * part


def _boxes(sc, tensors, device, rule, tp_rank, tp_size, threads, counts, path):
    """The slices of a sharded checkpoint's (or a one-rank file index's)
    tensors as boxes, loaded a batch at a time: into CPU tensors by the
    host loader, or into device tensors by LoadBoxesToDevice. `tensors`
    (reader tensors, in file order) picks and orders them; None: all of
    the manifest's, by where their first chunk lies."""
    m = sc.manifest()
    info = {name: (code, shape, chunks) for name, code, shape, chunks in m["tensors"]}
    if tensors is None:
        names = sorted(info, key=lambda n: (min(((c[2], c[3]) for c in info[n][2]),
                                                default=(0, 0)), n))
    else:
        names = [t.path for t in tensors]
    # Other devices (or CUDA without the C++ GPU loader): host tensors
    # (pinned for CUDA), then one copy each.
    gpu = device.type == "cuda" and _ckpt.has_gpu_loader
    staged = device.type != "cpu" and not gpu
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if gpu else 0)
    # One loader (pinned staging ring, streams) per batch: bigger batches
    # on the GPU, whose outputs the caller keeps anyway.
    limit = _GPU_BATCH if gpu else _BATCH
    batch, size = [], 0

    def flush():
        wants = [w for _, _, w in batch if w is not None]
        if wants and gpu:
            # The outputs come from torch's caching allocator: memory a
            # tensor of an earlier batch held may still be read by work
            # queued on torch's streams (the caller's copy_ of it). The
            # loader writes from its own streams, so that work must end
            # first. (The loader also sets the calling thread's device.)
            torch.cuda.synchronize(index)
            with torch.cuda.device(index):
                got = sc.load_to_device(wants, index, False, threads)
            counts["bytes_read"] += got["bytes_read"]
        elif wants:
            got = sc.load(wants, False, threads)
            counts["bytes_read"] += got["bytes_read"]
        for name, out, _ in batch:
            counts["bytes_needed"] += out.numel() * out.element_size()
            yield name, (out.to(device, non_blocking=True) if staged else out)
    for name in names:
        code, shape, _ = info[name]
        shape = list(shape)
        split, lo, hi = _split(path, name, shape, rule, tp_rank, tp_size)
        offsets, sizes = [0] * len(shape), list(shape)
        if split is not None:
            offsets[split], sizes[split] = lo, hi - lo
        out = (torch.empty(sizes, dtype=torch_dtype(code), device=device) if gpu else
               torch.empty(sizes, dtype=torch_dtype(code),
                           pin_memory=staged and device.type == "cuda"))
        want = None
        if out.numel():
            buf = out.data_ptr() if gpu else out.reshape(-1).view(torch.uint8).numpy()
            want = (name, offsets, sizes, buf)
        batch.append((name, out, want))
        size += out.numel() * out.element_size()
        if size >= limit:
            yield from flush()
            batch, size = [], 0
    yield from flush()


def _plan(r, t, storages, rule, tp_rank, tp_size, pin, path):
    """(name, out tensor, pread ranges [(storage, begin, length)], a
    function copying what is not read by pread, bytes it copies)."""
    shape = list(t.shape)
    split, lo, hi = _split(path, t.path, shape, rule, tp_rank, tp_size)
    dtype = torch_dtype(t.dtype)
    elem = CODES[t.dtype][1]
    out_shape = list(shape)
    if split is not None:
        out_shape[split] = hi - lo
    out = torch.empty(out_shape, dtype=dtype, pin_memory=pin)
    if _row_major(shape) != list(t.strides):
        # Not row-major (a transposed view saved as is): read the storage
        # whole, then take the slice.
        def copy_whole():
            whole = _whole(r, t, storages)
            out.copy_(whole.narrow(split, lo, hi - lo) if split is not None else whole)
        n = storages[t.storage].nbytes
        return t.path, out, [], copy_whole, n
    runs = _ranges(shape, elem, split or 0, lo, hi)
    base = t.storage_offset * elem
    if runs and (len(runs) == 1 or runs[0][1] >= _MIN_PREAD):
        return t.path, out, [(t.storage, base + a, n) for a, n in runs], None, 0

    def copy_mapped():
        view = _from_region(r.storage_region(t.storage))
        full = view[base:base + _numel(shape) * elem].view(dtype).view(shape)
        out.copy_(full.narrow(split, lo, hi - lo) if split is not None else full)
    return t.path, out, [], copy_mapped, out.numel() * elem


def _run(r, batch, device, pin, threads, counts):
    """Reads a batch of planned tensors, then yields them."""
    sids, begins, bufs = [], [], []
    for _, out, ranges, _, _ in batch:
        flat = out.reshape(-1).view(torch.uint8) if out.numel() else None
        at = 0
        for sid, begin, n in ranges:
            sids.append(sid)
            begins.append(begin)
            bufs.append(flat[at:at + n].numpy())
            at += n
    if bufs:
        counts["bytes_read"] += r.read_ranges(sids, begins, bufs, threads)
    for name, out, _, copy, copied in batch:
        if copy is not None:
            copy()
            counts["bytes_read"] += copied
            counts["bytes_mapped"] += copied
        counts["bytes_needed"] += out.numel() * out.element_size()
        yield name, (out.to(device, non_blocking=pin) if device.type != "cpu" else out)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _row_major(shape):
    strides, n = [], 1
    for s in reversed(shape):
        strides.append(n)
        n *= max(s, 1)
    return list(reversed(strides))


def _whole(r, t, storages):
    """A non-row-major tensor read whole: its storage's bytes, viewed."""
    buf = torch.empty(storages[t.storage].nbytes, dtype=torch.uint8)
    r.read_storages([t.storage], [buf.numpy()], 1)
    dtype = torch_dtype(t.dtype)
    return buf.view(dtype).as_strided(list(t.shape), list(t.strides), t.storage_offset)
