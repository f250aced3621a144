"""ckpt.distributed: sharded checkpoints over torch.distributed.

Every rank of a process group saves its own pieces of the state dict in
parallel, one ordinary ckpt file each, plus a manifest indexing them; any
number of ranks loads them back, each reading only the bytes of the boxes
its tensors hold (resharding). Shaped like torch.distributed.checkpoint:

    import ckpt.distributed as cdist
    cdist.save(state_dict, checkpoint_id="run/step-200")
    cdist.load(state_dict, checkpoint_id="run/step-200")   # in place
    h = cdist.async_save(state_dict, checkpoint_id="run/step-300")
    ...                       # the state dict may change from here on
    h.result()                # CommitInfo, or the error on every rank

Values of the state dict:
  * a plain tensor (or numpy array) is replicated: every rank holds the
    whole tensor. It is saved once, its rows split across the ranks
    (ckpt::dist::ReplicaPart); every rank loads it whole.
  * Chunk(local, global_shape, offsets) is one box of a global tensor
    (FSDP, tensor parallelism); with replica_index/replica_count when
    several ranks hold the same box.
  * a DTensor (torch 2.x) with Shard/Replicate placements: its box comes
    from torch's compute_local_shape_and_global_offset, Replicate mesh
    dims make replicas.
  * RankLocal(obj): this rank's own state (RNG, data-loader position),
    saved in the rank's shard; loading it needs the same world size.
  * anything else ckpt.save stores (numbers, str, dtypes, containers...)
    goes in the globals tree, written once by the coordinator.

Collectives run on a dedicated gloo group (made once per process group)
and move bytes as uint8 tensors, sizes first: nothing is pickled. The
protocol (writing, validation, manifest, the one commit rename, planning
and reading byte runs) is the C++ library's (include/ckpt/dist.h,
docs/SHARDED.md); this module maps torch objects onto it.
docs/PYTHON.md "Sharded checkpoints" describes the API.
"""
import argparse
import collections
import dataclasses
import os
import threading

import numpy as np
import torch
import torch.distributed as dist

from . import _ckpt
from ._dtypes import CODE_TO_TORCH, CODES, NUMPY_TO_CODE, TORCH_TO_CODE
from ._errors import CkptError, InvalidArgumentError, NotFoundError
from ._load import _Loader
from ._save import _Saver, key_object

try:  # torch >= 2.4 (public); 2.0-2.3 had it under torch.distributed._tensor
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor._utils import (
        compute_local_shape_and_global_offset as _local_box)
except ImportError:  # torch 1.13: no DTensor
    try:
        from torch.distributed._tensor import DTensor as _DTensor
        from torch.distributed._tensor._utils import (
            compute_local_shape_and_global_offset as _local_box)
    except ImportError:
        _DTensor = _local_box = None

__all__ = ["save", "load", "async_save", "read_manifest", "Chunk", "RankLocal",
           "AsyncSave", "CommitInfo", "Manifest", "TensorMeta", "ChunkMeta",
           "consolidate", "shard", "read", "verify", "prepare", "HAS_DTENSOR"]

HAS_DTENSOR = _DTensor is not None

# The class tag of the globals tree's marker where a RankLocal value sat
# (its value is in the rank's "rank_local" tree, keyed by this path).
_RANK_LOCAL_TAG = "ckpt.dist.RankLocal"


# ---- values -----------------------------------------------------------------

class Chunk:
    """One box of a global tensor, as this rank holds it: `local` is the
    box's elements (any strides, any device), `global_shape` the whole
    tensor's shape and `offsets` where the box starts in it. A box held
    by several ranks (replicas) gives each of them replica_index
    0..replica_count-1 and the same box: its bytes are then written once,
    split across them. load() fills `local` in place."""

    __slots__ = ("local", "global_shape", "offsets", "replica_index", "replica_count")

    def __init__(self, local, global_shape, offsets, replica_index=None, replica_count=None):
        if not isinstance(local, torch.Tensor):
            raise TypeError(f"Chunk: local must be a torch.Tensor, not {type(local).__name__}")
        global_shape = tuple(int(d) for d in global_shape)
        offsets = tuple(int(o) for o in offsets)
        if len(global_shape) != local.dim() or len(offsets) != local.dim():
            raise InvalidArgumentError(
                f"Chunk: a {local.dim()}-d local tensor needs {local.dim()} dims of "
                f"global_shape and offsets, got {global_shape} and {offsets}")
        for d, (o, n, g) in enumerate(zip(offsets, local.shape, global_shape)):
            if o < 0 or g < 0 or o + n > g:
                raise InvalidArgumentError(
                    f"Chunk: dim {d}: the box [{o}, {o + n}) is outside the global "
                    f"shape {global_shape}")
        if (replica_index is None) != (replica_count is None):
            raise InvalidArgumentError("Chunk: give both replica_index and replica_count, or neither")
        replica_index = 0 if replica_index is None else int(replica_index)
        replica_count = 1 if replica_count is None else int(replica_count)
        if not 0 <= replica_index < replica_count:
            raise InvalidArgumentError(
                f"Chunk: replica_index {replica_index} of replica_count {replica_count}")
        self.local = local
        self.global_shape = global_shape
        self.offsets = offsets
        self.replica_index = replica_index
        self.replica_count = replica_count

    def __repr__(self):
        return (f"Chunk(local={tuple(self.local.shape)} {self.local.dtype}, global_shape="
                f"{self.global_shape}, offsets={self.offsets}, replica "
                f"{self.replica_index}/{self.replica_count})")


class RankLocal:
    """A value that belongs to this rank alone (its RNG state, its
    data-loader position): saved in the rank's own shard file under the
    value's path, and loaded back only at the same world size (else
    load() raises naming the keys and both sizes). load() replaces
    `.value` with what this rank saved."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return f"RankLocal({self.value!r})"


@dataclasses.dataclass(frozen=True)
class CommitInfo:
    """What a save committed (every rank gets the same)."""
    path: str
    total_bytes: int
    files: int
    tensors: int
    chunks: int


class ChunkMeta(collections.namedtuple("ChunkMeta", "offsets sizes file offset length")):
    """A saved box of a global tensor: in shard file `file` (an index into
    Manifest.files) at byte `offset`, `length` bytes, row-major. (A named
    tuple: a manifest may hold millions.)"""
    __slots__ = ()


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    path: str
    dtype: object  # torch.dtype, or the format's dtype name when torch has none
    shape: tuple
    chunks: tuple  # of ChunkMeta, tiling shape


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A sharded checkpoint's manifest (docs/SHARDED.md), validated."""
    version: tuple
    world_size: int
    globals_file: int
    files: tuple  # of dicts: name, size, header_xxh3, rank
    tensors: dict  # path -> TensorMeta, sorted by path
    metadata: dict
    producer: str


def _manifest(d):
    tensors = {}
    for path, code, shape, chunks in d["tensors"]:
        dtype = CODE_TO_TORCH.get(code) or CODES.get(code, (f"code {code}",))[0]
        tensors[path] = TensorMeta(path, dtype, tuple(shape),
                                   tuple(map(ChunkMeta._make, chunks)))
    return Manifest(tuple(d["version"]), d["world_size"], d["globals_file"],
                    tuple(d["files"]), tensors, dict(d["metadata"]), d["producer"])


def read_manifest(checkpoint_id):
    """The Manifest of the sharded checkpoint directory `checkpoint_id`
    (read and validated alone; no shard file is opened, no group needed)."""
    return _manifest(_ckpt.dist_read_manifest(os.fspath(checkpoint_id)))


# ---- collectives ------------------------------------------------------------

# (global ranks of the process group or None for the world, purpose) ->
# (the default group it was made under, the gloo group)
_GROUPS = {}
_GROUPS_LOCK = threading.Lock()


def _group_ranks(pg):
    """The global ranks of a group, by group rank."""
    if pg is None or pg is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(pg))


def _gloo_group(process_group, purpose):
    """The gloo group the protocol of `purpose` ("sync", "async") runs on
    for `process_group`'s ranks. The whole world (process_group None): a
    dedicated gloo group per purpose, made on first use. A gloo group
    given: itself for "sync" (its caller's thread is the one saving). Any
    other: a new gloo group of its ranks, made on first use or by
    prepare(). torch.distributed.new_group is collective over the default
    group, so that first use must happen on every process; prepare() lets
    the non-members take part without saving. (use_local_synchronization
    would let only the members take part, but advances torch's group
    counter on them alone, so the next ordinary new_group would get
    different names on different ranks.)"""
    _check_initialized()
    ranks = _ranks_key(process_group)
    if ranks is not None and purpose == "sync" and dist.get_backend(process_group) == "gloo":
        return process_group
    return _made_group(ranks, purpose)


def _ranks_key(process_group):
    """What _made_group keys a group's gloo groups by: None for the world,
    else its global ranks."""
    if process_group is None or process_group is dist.group.WORLD:
        return None
    return tuple(_group_ranks(process_group))


def _check_initialized():
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError(
            "ckpt.distributed needs torch.distributed initialized "
            "(torch.distributed.init_process_group)")


def _made_group(ranks, purpose):
    """The gloo group of `purpose` over the global ranks `ranks` (None: the
    world), made now if this default group has none yet. Keyed by ranks,
    not by group object, so that prepare() on a non-member (which holds no
    group object) makes the same groups in the same order as the members.
    The default group is part of the key: after destroy_process_group()
    and a new init_process_group() the old gloo groups are gone."""
    default = dist.distributed_c10d._get_default_group()
    key = (ranks, purpose)
    with _GROUPS_LOCK:
        entry = _GROUPS.get(key)
        if entry is None or entry[0] is not default:
            if ranks is None:
                group = dist.new_group(backend="gloo")
            else:
                group = dist.new_group(ranks=list(ranks), backend="gloo")
            entry = (default, group)
            _GROUPS[key] = entry
    return entry[1]


def prepare(process_group=None, *, ranks=None):
    """Makes the gloo groups ckpt.distributed uses for a process group now:
    `process_group` on its members, or `ranks` (its global ranks, in group
    order) anywhere. Collective over the default group, as
    torch.distributed.new_group is: call it on every process, members or
    not (a non-member holds no group object: it passes `ranks`).
    Afterwards only the members call save, load and async_save with the
    group. Without it, the first such call (for a non-gloo group; for
    async_save, any group but the world) must be made on every process."""
    _check_initialized()
    if ranks is None:
        if process_group is dist.GroupMember.NON_GROUP_MEMBER:
            raise InvalidArgumentError(
                "ckpt.distributed.prepare: this process is not a member of the group; "
                "pass the group's global ranks: prepare(ranks=[...])")
        ranks = _ranks_key(process_group)
    else:
        ranks = tuple(int(r) for r in ranks)
        if process_group is not None and tuple(_group_ranks(process_group)) != ranks:
            raise InvalidArgumentError(
                f"ckpt.distributed.prepare: ranks {list(ranks)} are not the group's "
                f"{_group_ranks(process_group)}")
    for purpose in ("sync", "async"):
        _made_group(ranks, purpose)


class _Comm:
    """A ckpt::dist::Comm (the binding's DistComm) over a gloo group:
    gather and broadcast of bytes as uint8 tensors, sizes first."""

    def __init__(self, process_group, purpose):
        self.group = _gloo_group(process_group, purpose)
        self.ranks = _group_ranks(process_group)
        me = dist.get_rank()
        if me not in self.ranks:
            raise InvalidArgumentError(f"rank {me} is not in the process group {self.ranks}")
        self.rank, self.size = self.ranks.index(me), len(self.ranks)
        self.c = _ckpt.DistComm(self.rank, self.size, self._gather, self._broadcast)

    @staticmethod
    def _tensor(data, n):
        t = torch.zeros(max(n, 1), dtype=torch.uint8)
        if data:
            t[:len(data)] = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        return t

    def _gather(self, root, mine):
        if self.size == 1:
            return [mine]
        size = torch.tensor([len(mine)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, size, group=self.group)
        sizes = [int(s.item()) for s in sizes]
        n = max(sizes)
        buf = self._tensor(mine, n)
        if self.rank == root:
            outs = [torch.empty(max(n, 1), dtype=torch.uint8) for _ in range(self.size)]
            dist.gather(buf, gather_list=outs, dst=self.ranks[root], group=self.group)
            return [o[:k].numpy() for o, k in zip(outs, sizes)]
        dist.gather(buf, dst=self.ranks[root], group=self.group)
        return []

    def _broadcast(self, root, data):
        if self.size == 1:
            return data
        mine = self.rank == root
        size = torch.tensor([len(data) if mine else 0], dtype=torch.int64)
        dist.broadcast(size, src=self.ranks[root], group=self.group)
        n = int(size.item())
        if n == 0:
            return b""
        buf = self._tensor(data, n) if mine else torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=self.ranks[root], group=self.group)
        return buf.numpy()


def _error(e):
    """A Python exception as a rank's local outcome for the binding."""
    if isinstance(e, CkptError):
        return type(e).__name__, str(e)
    return type(e).__name__, f"{type(e).__name__}: {e}"


# ---- the state dict's leaves --------------------------------------------------

_DICTS = (dict, collections.OrderedDict)


def _kind(v):
    if isinstance(v, RankLocal):
        return "local"
    if isinstance(v, Chunk):
        return "chunk"
    if _DTensor is not None and isinstance(v, _DTensor):
        return "dtensor"
    if isinstance(v, torch.Tensor):
        return "tensor"
    if type(v) is np.ndarray:
        return "array"
    return None


def _children(x):
    """(key, value, raw path segment) of a container's children, or None
    for a leaf."""
    t = type(x)
    if t in _DICTS or t is argparse.Namespace:
        d = vars(x) if t is argparse.Namespace else x
        return [(k, v, k if isinstance(k, str) else _ckpt.key_segment(k, key_object))
                for k, v in d.items()]
    if t in (list, tuple):
        return [(i, v, str(i)) for i, v in enumerate(x)]
    return None


def _leaves(state_dict):
    """(path, kind, value) of every tensor-like value and RankLocal in the
    state dict, in order; paths as the file names them (DESIGN.md)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, not {type(state_dict).__name__}")
    out, stack = [], [("", True, state_dict)]
    while stack:
        path, root, x = stack.pop()
        k = _kind(x)
        if k is not None:
            out.append((path, k, x))
            continue
        kids = _children(x)
        if kids is None:
            continue
        stack.extend(reversed([(_ckpt.child_path(path, root, seg), False, v)
                               for _, v, seg in kids]))
    return out


def _code(dtype, path):
    code = TORCH_TO_CODE.get(dtype) if isinstance(dtype, torch.dtype) else NUMPY_TO_CODE.get(dtype)
    if code is None:
        raise TypeError(f"{path}: dtype {dtype} has no ckpt equivalent")
    return code


@dataclasses.dataclass
class _Piece:
    """One box of one global tensor on this rank: what add_chunk gets, and
    the tensor load() fills."""
    path: str
    dtype: object       # torch.dtype
    global_shape: tuple
    offsets: tuple
    local: torch.Tensor  # the box's elements as the caller holds them
    replica_index: int
    replica_count: int


def _dtensor_piece(path, t):
    mesh, placements = t.device_mesh, tuple(t.placements)
    for p in placements:
        if not (p.is_replicate() or (p.is_shard() and type(p).__name__ == "Shard")):
            raise TypeError(f"{path}: cannot save a DTensor placed {p}: Shard(dim) and "
                            "Replicate() placements only (reduce Partial ones first)")
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not in the tensor's mesh
        return None
    local_shape, offsets = _local_box(t.shape, mesh, placements)
    local = t._local_tensor if hasattr(t, "_local_tensor") else t.to_local()
    if tuple(local.shape) != tuple(local_shape):
        raise InvalidArgumentError(
            f"{path}: the DTensor's local tensor is {tuple(local.shape)}, its placement "
            f"says {tuple(local_shape)} (padded shards are not supported)")
    index, count = 0, 1
    for d, p in enumerate(placements):
        if p.is_replicate():
            index, count = index * mesh.size(d) + coord[d], count * mesh.size(d)
    return _Piece(path, t.dtype, tuple(t.shape), tuple(offsets), local, index, count)


def _pieces(leaves, rank, size):
    """The _Piece of every tensor-like leaf this rank holds."""
    out = []
    for path, kind, v in leaves:
        if kind == "local":
            continue
        if kind == "chunk":
            t = v.local
            _code(t.dtype, path)
            out.append(_Piece(path, t.dtype, v.global_shape, v.offsets, t,
                              v.replica_index, v.replica_count))
        elif kind == "dtensor":
            p = _dtensor_piece(path, v)
            if p is not None:
                _code(p.dtype, path)
                out.append(p)
        else:
            t = torch.from_numpy(v) if kind == "array" else v
            if kind == "tensor" and type(t) not in (torch.Tensor, torch.nn.Parameter):
                raise TypeError(f"{path}: cannot save a {type(t).__qualname__} (a tensor "
                                "subclass); save a plain tensor, a Chunk or a DTensor")
            _code(t.dtype, path)
            out.append(_Piece(path, t.dtype, tuple(t.shape), (0,) * t.dim(), t, rank, size))
    return out


def _contiguous_cpu(t):
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError("only dense (strided, non-quantized) tensors can be saved")
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t.to("cpu").contiguous()


def _as_bytes(t):
    """A contiguous CPU tensor's bytes as a numpy uint8 array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


# ---- saving ---------------------------------------------------------------------

class _Placeholder:
    """Where a tensor-like value sits in a staged copy of the globals tree."""
    __slots__ = ()


class _LocalMarker:
    """Where a RankLocal value sits in a staged copy of the globals tree."""
    __slots__ = ()


_PLACEHOLDER, _LOCAL = _Placeholder(), _LocalMarker()


class _GlobalsSaver(_Saver):
    """ckpt.save's tree writer, with each tensor-like value replaced by the
    global tensor placeholder and each RankLocal by its marker."""

    def leaf(self, obj, where, seg):
        if obj is _LOCAL or isinstance(obj, RankLocal):
            return self.w.add_dict([], [], _RANK_LOCAL_TAG)
        if obj is _PLACEHOLDER or _kind(obj) is not None:
            return self.w.add_global_tensor()
        return super().leaf(obj, where, seg)


def _snapshot(x, stage):
    """A copy of the state dict's containers, tensor-like values replaced
    by _PLACEHOLDER and RankLocals by _LOCAL; leaves kept, except that
    `stage` copies tensors and arrays (for rank-local values). The state
    dict may then change while the copy is written."""
    k = _kind(x)
    if k == "local":
        return _LOCAL
    if k is not None:
        return _PLACEHOLDER if stage is None else stage(x)
    t = type(x)
    if t in _DICTS:
        return t((key, _snapshot(v, stage)) for key, v in x.items())
    if t is argparse.Namespace:
        return argparse.Namespace(**{key: _snapshot(v, stage) for key, v in vars(x).items()})
    if t in (list, tuple):
        return t(_snapshot(v, stage) for v in x)
    if t in (set, frozenset, bytearray):
        return t(x)
    return x


# Staging buffers of the last async_save, free once it finished, reused
# by the next (async saves run one at a time): pinned memory is slow to
# allocate and fresh pages fault on first write, so a training loop's
# saves copy into memory already mapped. (dtype, shape) -> [tensor].
_STAGING = {}
_STAGING_LOCK = threading.Lock()


def _staging_copy(t, devices, pool=None):
    """A copy of a tensor in host memory (pinned when CUDA is there) that
    nothing else references: the caller may change the original. From
    `pool` (a _STAGING) when it has a buffer of that dtype and shape. A
    CUDA tensor's copy is non-blocking: its device joins `devices`, which
    _wait_for_copies waits on before anything reads the copy."""
    pin = torch.cuda.is_available()
    out = None
    if pool is not None:
        free = pool.get((t.dtype, tuple(t.shape)))
        if free:
            out = free.pop()
    if out is None:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    non_blocking = pin and t.is_cuda
    with torch.no_grad():
        out.copy_(t.detach(), non_blocking=non_blocking)
    if non_blocking:
        devices.add(t.device)
    return out


def _wait_for_copies(devices):
    """Waits for the non-blocking device -> host copies _staging_copy
    issued, on every CUDA device they read from. (A bare
    torch.cuda.synchronize() waits for the current device only: tensors on
    cuda:1 with cuda:0 current, or one process driving several GPUs, would
    be written by the thread before their bytes landed, silently, with
    valid checksums over the wrong bytes.)"""
    for d in sorted(devices, key=lambda d: d.index):
        torch.cuda.synchronize(d)  # every stream of d, so every copy issued on it


def _release_staging(buffers):
    with _STAGING_LOCK:
        _STAGING.clear()  # what the last save did not need goes
        for b in buffers:
            _STAGING.setdefault((b.dtype, tuple(b.shape)), []).append(b)


def _stage_value(x, devices):
    """A rank-local value with its tensors and arrays copied (the CUDA
    devices copied from added to `devices`)."""
    k = _kind(x)
    if k == "tensor":
        return _staging_copy(x, devices) if type(x) is torch.Tensor else torch.nn.Parameter(
            _staging_copy(x, devices), requires_grad=x.requires_grad)
    if k == "array":
        return x.copy()
    if k is not None:
        raise TypeError("a RankLocal value cannot hold a Chunk, a DTensor or a RankLocal")
    if _children(x) is None:
        return x
    return _snapshot(x, lambda v: _stage_value(v, devices))


class _Staged:
    """What a rank writes, taken from the state dict: its pieces (bytes
    ready), the globals tree copy (coordinator) and its rank-local values."""

    def __init__(self, state_dict, comm, coordinator, copy):
        leaves = _leaves(state_dict)
        self.pieces = _pieces(leaves, comm.rank, comm.size)
        self.data = []
        devices = set()  # the CUDA devices of the non-blocking copies
        if copy:
            with _STAGING_LOCK:
                pool = {k: list(v) for k, v in _STAGING.items()}
        for p in self.pieces:
            self.data.append(_staging_copy(p.local, devices, pool) if copy
                             else _contiguous_cpu(p.local))
        self.globals = _snapshot(state_dict, None) if comm.rank == coordinator else None
        self.rank_local = {path: (_stage_value(v.value, devices) if copy else v.value)
                           for path, kind, v in leaves if kind == "local"}
        _wait_for_copies(devices)  # pieces and rank-local values, each on its own device


def _write_shard(staged, checkpoint_id, comm, sync):
    """Writes this rank's shard file at ShardPath and returns its (closed)
    writer, whose record of the shard the commit takes; raises on
    failure."""
    path = _ckpt.dist_shard_path(checkpoint_id, comm.rank, comm.size)
    w = _ckpt.Writer(path, sync=sync, producer=f"ckpt-python {_ckpt.version}")
    try:
        chunks = []
        for p, t in zip(staged.pieces, staged.data):
            node = w.add_chunk(p.path, _code(p.dtype, p.path), list(p.global_shape),
                               list(p.offsets), list(t.shape), _as_bytes(t),
                               p.replica_index, p.replica_count)
            if node is not None:
                chunks.append(node)
        globals_node = None
        if staged.globals is not None:
            globals_node = _GlobalsSaver(w).tree(staged.globals)
        local_node = None
        if staged.rank_local:
            local_node = _Saver(w).tree(staged.rank_local)
        w.set_shard_root(chunks, globals_node, local_node, comm.rank, comm.size)
        w.commit()
    except BaseException:
        w.abort()
        raise
    return w


def _check_metadata(metadata):
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must be a dict of str to str")
    return metadata


def _commit(comm, checkpoint_id, err, coordinator, overwrite, sync, metadata, cause=None,
            writer=None):
    try:
        info = _ckpt.dist_commit_save(comm.c, checkpoint_id, err, coordinator,
                                      overwrite, sync, metadata,
                                      writer if err is None else None)
    except CkptError as e:
        raise e from cause
    return CommitInfo(**info)


def save(state_dict, checkpoint_id, process_group=None, coordinator_rank=0, *,
         overwrite=False, sync=True, metadata=None):
    """Saves `state_dict` as the sharded checkpoint directory
    `checkpoint_id`, collectively: every rank of `process_group` (default:
    all) calls it with its own values. The directory appears complete
    (one rename, by the coordinator) or not at all; every rank returns the
    same CommitInfo or raises the same error, naming the first rank that
    failed and why. `overwrite` replaces an existing directory atomically;
    sync=False skips the fsyncs (tests); `metadata` is str -> str kept in
    the manifest."""
    checkpoint_id = os.fspath(checkpoint_id)
    comm = _Comm(process_group, "sync")
    err = cause = writer = None
    try:  # every rank must reach the commit, failed or not
        metadata = _check_metadata(metadata)
        writer = _write_shard(_Staged(state_dict, comm, coordinator_rank, copy=False),
                              checkpoint_id, comm, sync)
    except BaseException as e:  # KeyboardInterrupt too: the others must not wait forever
        err, cause, metadata = _error(e), e, {}
    try:
        return _commit(comm, checkpoint_id, err, coordinator_rank, overwrite, sync, metadata,
                       cause, writer)
    finally:
        if cause is not None and not isinstance(cause, Exception):
            raise cause  # an interrupt stays one, once every rank has the error


class AsyncSave:
    """A save in progress (async_save): staged already; written and
    committed by a background thread."""

    def __init__(self):
        self._thread = None
        self._info = None
        self._exc = None

    def staged(self):
        """True: the state dict's values were copied when async_save
        returned, so the caller may change them (the next optimizer step)."""
        return True

    def done(self):
        return self._thread is None or not self._thread.is_alive()

    def result(self, timeout=None):
        """The CommitInfo once committed, or the save's error (the same on
        every rank). TimeoutError if still running after `timeout` s."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the save is still running after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._info

    def _run(self, prev, staged, checkpoint_id, comm, coordinator, overwrite, sync, metadata,
             err, cause):
        try:
            if prev is not None:
                # Returns at once unless async_save's own join was
                # interrupted: the previous commit must end before this
                # one's collectives start on the same group.
                prev._thread.join()
            if comm.size > 1:
                # Writes start once every rank has staged: ranks sharing a
                # host would otherwise checksum and write while another
                # rank's caller still waits for its staging copy.
                dist.barrier(group=comm.group)
            writer = None
            if err is None:
                try:
                    writer = _write_shard(staged, checkpoint_id, comm, sync)
                except BaseException as e:  # every rank must reach the commit
                    err, cause = _error(e), e
            self._info = _commit(comm, checkpoint_id, err, coordinator, overwrite, sync,
                                 metadata, cause, writer)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._exc = e
        finally:
            if staged is not None:
                _release_staging(staged.data)


_INFLIGHT = None  # the last AsyncSave started by this process
_INFLIGHT_LOCK = threading.Lock()


def async_save(state_dict, checkpoint_id, process_group=None, coordinator_rank=0, *,
               overwrite=False, sync=True, metadata=None):
    """save() in the background: copies every tensor of `state_dict` (CPU
    ones too) into host staging memory (pinned when CUDA is available) and
    a copy of its structure, then returns an AsyncSave; a thread writes
    this rank's shard and commits on a gloo group of its own, so its
    collectives never interleave with the caller's. Once it returns, the
    state dict may change. A second async_save first waits for the one
    before. Errors (of any rank) are raised by result() on every rank.
    A KeyboardInterrupt (or another BaseException) while staging, or
    while waiting for the save before, is raised here once the thread has
    been started with it as this rank's error, as save() does: the other
    ranks' result() raise it, naming this rank, instead of waiting for
    this rank until the gloo timeout."""
    global _INFLIGHT  # noqa: PLW0603 - one save in flight per process
    checkpoint_id = os.fspath(checkpoint_id)
    with _INFLIGHT_LOCK:
        prev = _INFLIGHT
        comm = _Comm(process_group, "async")
        staged = err = cause = None
        try:
            if prev is not None:
                prev._thread.join()  # its error stays for its own result()
            metadata = _check_metadata(metadata)
            staged = _Staged(state_dict, comm, coordinator_rank, copy=True)
        except BaseException as e:  # KeyboardInterrupt too: the thread still takes part
            err, cause, metadata = _error(e), e, {}  # in the commit, or the others wait
        h = AsyncSave()
        h._thread = threading.Thread(
            target=h._run, name="ckpt.distributed.async_save",
            args=(prev, staged, checkpoint_id, comm, coordinator_rank, overwrite, sync,
                  metadata, err, cause))
        h._thread.start()
        _INFLIGHT = h
    if cause is not None and not isinstance(cause, Exception):
        # An interrupt stays one, once the thread carries it to the commit
        # (every other rank's result() raises it, naming this rank; the
        # next async_save here waits for that thread).
        raise cause
    return h


# ---- loading ----------------------------------------------------------------------

def _agree(comm, err, cause):
    try:
        _ckpt.dist_agree(comm.c, err, 0)
    except CkptError as e:
        if cause is not None and not isinstance(cause, Exception):
            raise cause from None  # an interrupt stays one, once every rank has the error
        raise e from cause


def load(state_dict, checkpoint_id, process_group=None, *, verify=True, threads=0,
         coordinator_rank=0):
    """Loads the sharded checkpoint `checkpoint_id` into `state_dict` in
    place, collectively. Each tensor-like value is filled with its box of
    the saved global tensor, whatever the sharding it was saved with
    (plain tensors whole, Chunk and DTensor their box): only the byte runs
    of those boxes are read. Other values are replaced by the saved ones;
    RankLocal values get this rank's `.value` (same world size only).
    Dtype and global shape must match the saved tensor's. Every rank
    raises the same error when one fails. `verify` checks the checksum
    blocks the reads touch. Returns a dict of the load's byte counts
    (bytes_needed, bytes_read...).

    On failure: an error found before any tensor byte is read (a missing
    key, a dtype or global-shape mismatch, rank-local state at another
    world size, a value missing from or unreadable in the globals tree or
    the rank's rank-local values), on any rank, leaves every rank's state
    dict untouched. An error while reading the tensors' bytes (I/O, a
    checksum mismatch), on any rank, leaves every rank's tensors
    undefined: contiguous CPU tensors (and numpy arrays) are read into in
    place, so some may hold the checkpoint's bytes, some their old ones,
    some a mix (the other tensors and all non-tensor and RankLocal values
    keep theirs). Load them again before using them."""
    checkpoint_id = os.fspath(checkpoint_id)
    comm = _Comm(process_group, "sync")
    ck = _ckpt.ShardedCheckpoint(checkpoint_id, comm.c, coordinator_rank)  # collective
    # Two agreements: the first after every check (dtypes, shapes, keys)
    # and the tree reads, so a state dict one rank got wrong leaves every
    # rank's untouched; the second after the reads (I/O, checksums), which
    # fill contiguous CPU tensors in place: a failure there leaves them
    # torn (documented), the rest (fill, assign) is set only after it.
    err = cause = stats = None
    try:
        summary, leaves = ck.summary(), _leaves(state_dict)
        wants, fill = _plan_pieces(ck, summary, leaves, comm)
        assign = _plan_trees(ck, summary, leaves, state_dict, comm)
    except BaseException as e:  # KeyboardInterrupt too: the others must not wait forever
        err, cause = _error(e), e
    _agree(comm, err, cause)
    try:
        stats = ck.load(wants, verify, threads)
    except BaseException as e:
        err, cause = _error(e), e
    _agree(comm, err, cause)
    with torch.no_grad():
        for dst, src in fill:
            dst.copy_(src)
    for container, key, value in assign:
        if type(container) is argparse.Namespace:
            setattr(container, key, value)
        elif isinstance(container, RankLocal):
            container.value = value
        else:
            container[key] = value
    return stats


def _plan_pieces(ck, summary, leaves, comm):
    """The wants (path, offsets, sizes, destination bytes) of the state
    dict's tensors, checked against the manifest, and the (tensor,
    buffer) pairs to copy once read (tensors not contiguous on the CPU)."""
    saved = summary["tensors"]
    wants, fill = [], []
    for p in _pieces(leaves, comm.rank, comm.size):
        meta = saved.get(p.path)
        if meta is None:
            raise NotFoundError(f"{ck.dir}: no tensor '{p.path}' in the checkpoint")
        code, shape = meta
        if TORCH_TO_CODE.get(p.dtype) != code:
            dtype = CODE_TO_TORCH.get(code) or CODES.get(code, (f"code {code}",))[0]
            raise InvalidArgumentError(
                f"{ck.dir}: tensor '{p.path}' was saved as {dtype}, the state dict "
                f"holds {p.dtype}")
        if tuple(shape) != tuple(p.global_shape):
            raise InvalidArgumentError(
                f"{ck.dir}: tensor '{p.path}' was saved with shape {tuple(shape)}, "
                f"the state dict's is {tuple(p.global_shape)}")
        t = p.local
        if t.device.type == "cpu" and t.is_contiguous() and t.layout == torch.strided \
                and not (t.is_conj() or t.is_neg()):
            buf = t.detach()
        else:
            buf = torch.empty(t.shape, dtype=t.dtype)
            fill.append((t, buf))
        wants.append((p.path, list(p.offsets), list(t.shape), _as_bytes(buf)))
    return wants, fill


def _plan_trees(ck, summary, leaves, state_dict, comm):
    """(container, key, value) of each non-tensor value of the state dict
    (from the globals tree) and each RankLocal (container the RankLocal,
    from this rank's shard), to set once every rank has checked."""
    assign = []
    locals_ = [(path, v) for path, kind, v in leaves if kind == "local"]
    if _is_dcp(ck.dir):
        # torch.distributed.checkpoint's own directory: its non-tensor
        # values are pickles, never run here; they stay as they are.
        if locals_:
            raise InvalidArgumentError(
                f"{ck.dir}: a torch.distributed.checkpoint directory holds no rank-local "
                f"state ({', '.join(repr(p) for p, _ in locals_)})")
        return assign
    if locals_:
        saved = summary["world_size"]
        if saved != comm.size:
            keys = ", ".join(repr(p) for p, _ in locals_)
            raise InvalidArgumentError(
                f"{ck.dir}: rank-local state ({keys}) was saved by {saved} ranks; it cannot "
                f"be loaded on {comm.size} (load it at world size {saved}, or drop the "
                "RankLocal values from the state dict)")
        index = next((i for i, r in enumerate(summary["file_ranks"]) if r == comm.rank), None)
        if index is None:
            raise NotFoundError(f"{ck.dir}: no shard file of rank {comm.rank}")
        reader = ck.open_shard(index)
        saved_local = _Loader(reader).load("rank_local") if _has(reader, "rank_local") else {}
        for path, rl in locals_:
            if path not in saved_local:
                raise NotFoundError(f"{ck.shard_file_path(index)}: no rank-local value "
                                    f"'{path}'")
            assign.append((rl, None, saved_local[path]))
    reader = ck.open_shard(summary["globals_file"])
    saved = _Loader(reader).load("globals") if _has(reader, "globals") else {}
    _merge(state_dict, saved, "", True, ck.shard_file_path(summary["globals_file"]), assign)
    return assign


def _is_dcp(path):
    """True for a torch.distributed.checkpoint directory (its .metadata,
    no ckpt manifest), which ShardedCheckpoint reads by byte ranges."""
    return (not os.path.exists(os.path.join(path, "MANIFEST.ckptm"))
            and os.path.exists(os.path.join(path, ".metadata")))


def _has(reader, path):
    try:
        reader.kind(path)
    except NotFoundError:
        return False
    return True


def _holds_tensors(x):
    if _kind(x) is not None:
        return True
    kids = _children(x)
    return kids is not None and any(_holds_tensors(v) for _, v, _ in kids)


def _merge(dst, src, path, root, file, assign):
    """Adds to `assign` the saved non-tensor values of `src` for the
    containers of `dst`; containers holding tensors are walked, not
    replaced."""
    for key, v, seg in _children(dst):
        if _kind(v) is not None:
            continue
        child = _ckpt.child_path(path, root, seg)
        if isinstance(src, (dict, argparse.Namespace)):
            s = vars(src) if isinstance(src, argparse.Namespace) else src
            found, saved = key in s, s.get(key)
        else:
            found = isinstance(src, (list, tuple)) and key < len(src)
            saved = src[key] if found else None
        if not found:
            raise NotFoundError(f"{file}: no value '{child}' in the checkpoint's globals tree")
        if _holds_tensors(v):
            if _children(saved) is None:
                raise InvalidArgumentError(
                    f"{file}: '{child}' is a {type(saved).__name__} in the checkpoint, a "
                    f"{type(v).__name__} holding tensors in the state dict")
            _merge(v, saved, child, False, file, assign)
        elif type(dst) is not tuple:  # a tuple's non-tensor items stay as they are
            assign.append((dst, key, saved))


# ---- whole files <-> sharded directories ---------------------------------------

def consolidate(checkpoint_id, out, *, sync=True):
    """Writes the sharded checkpoint as one ordinary ckpt file `out`
    (ckpt.load reads it): each global tensor whole where it sat in the
    state dict. One process, no group."""
    _ckpt.dist_consolidate(os.fspath(checkpoint_id), os.fspath(out), sync)


def shard(src, checkpoint_id, world_size, dim=0, *, overwrite=False, sync=True):
    """Writes the ckpt file `src` as a sharded checkpoint of `world_size`
    ranks, each tensor cut along `dim` (an int, or a dict of tensor path ->
    dim; -1 = replicated); tensors that cannot be cut go replicated. One
    process, no group."""
    dims, default = ({}, int(dim)) if isinstance(dim, int) else (dict(dim), 0)
    _ckpt.dist_shard_file(os.fspath(src), os.fspath(checkpoint_id), int(world_size),
                          dims, default, overwrite, sync)


def read(checkpoint_id, path, offsets=None, sizes=None, *, verify=True):
    """The box (offsets, sizes; default: all) of global tensor `path` as a
    new CPU tensor, read from only the byte runs it needs. One process, no
    group (ckpt::dist::ShardedCheckpoint::Read)."""
    ck = _ckpt.ShardedCheckpoint(os.fspath(checkpoint_id))
    meta = ck.summary()["tensors"].get(path)
    if meta is None:
        raise NotFoundError(f"{ck.dir}: no tensor '{path}' in the checkpoint")
    code, shape = meta
    dtype = CODE_TO_TORCH.get(code)
    if dtype is None:
        raise TypeError(f"{ck.dir}: tensor '{path}': dtype {CODES.get(code, (code,))[0]} "
                        f"has no torch equivalent in torch {torch.__version__}")
    offsets = [0] * len(shape) if offsets is None else [int(o) for o in offsets]
    if sizes is None:
        sizes = [n - o for n, o in zip(shape, offsets)]
    sizes = [int(n) for n in sizes]
    region = ck.read(path, offsets, sizes, verify)
    out = torch.empty(sizes, dtype=dtype)
    if len(region):
        src = np.frombuffer(memoryview(region), dtype=np.uint8)
        _as_bytes(out)[:] = src
    return out


def verify(checkpoint_id, threads=0):
    """Checks the manifest, every shard file against its pin and every
    checksum; raises the first problem. One process, no group."""
    _ckpt.ShardedCheckpoint(os.fspath(checkpoint_id)).verify(threads)

