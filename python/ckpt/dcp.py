"""ckpt as a storage plug-in of torch.distributed.checkpoint (DCP).

    import torch.distributed.checkpoint as dcp
    import ckpt.dcp
    dcp.save(state_dict, storage_writer=ckpt.dcp.Writer("ckpt/step-100"))
    dcp.load(state_dict, storage_reader=ckpt.dcp.Reader("ckpt/step-100"))

DCP's planners (the default one, FSDP2's and DTensor state dicts,
torch.distributed.checkpoint.state_dict's helpers) decide what each rank
writes and reads; these classes decide how. What they write is a ckpt
sharded checkpoint (docs/SHARDED.md): a shard file per rank holding that
rank's chunks, and a manifest, committed by one rename with every fsync
durability needs, so a crash mid-save leaves the previous checkpoint, never
half of a new one. DCP's metadata is stored typed, as JSON in the manifest
(docs/INTEGRATIONS.md): opening a checkpoint unpickles nothing. A load reads
the byte runs of exactly the boxes its ReadItems name (DCP's FileSystemReader
reads each stored item whole and narrows it), and the directory also loads
with ckpt.distributed.load, consolidates with `ckpt consolidate`, and
inspects with `ckpt inspect`.

Non-tensor values (an epoch, a learning rate, param_groups) reach the
writer as torch.save bytes, and DCP's DefaultLoadPlanner unpickles what the
reader hands back with torch.load(weights_only=False): storing those bytes
would let a hostile checkpoint run code at load. ckpt.dcp stores them typed
instead: at save, ckpt's restricted importer (which never runs code) turns
each into plain values, in the rank-local tree of the shard file of the
rank that wrote it, and a value holding an object of another class is
refused then, by its key; at load, the reader hands the planner a pickle it
makes itself from those plain values. No byte of the file is unpickled.

A failed dcp.save (one rank's error) leaves the hidden `.NAME.tmp`
directory beside the target, as DCP calls no storage hook on failure; the
next save to the same name sweeps it. The target is never touched.

Needs torch 2.4 or later (DCP's StorageMeta and checkpoint ids).
"""
import dataclasses
import io
import json
import os
import uuid

import torch

try:
    import torch.distributed.checkpoint as _dcp
    from torch.distributed.checkpoint import metadata as _md
    from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
    from torch.futures import Future
    _md.StorageMeta  # noqa: B018 - torch 2.4+
except Exception as e:  # noqa: BLE001 - torch 1.13's DCP fails with ValueError on 3.11
    raise ImportError(f"ckpt.dcp needs torch 2.4 or later's torch.distributed.checkpoint "
                      f"(this is torch {torch.__version__}: {e})") from None

from . import _ckpt
from ._errors import FormatError, InvalidArgumentError, NotFoundError, PickleRefusedError
from ._load import _Loader
from ._load import load as _ckpt_load
from ._save import _Saver
from .distributed import _as_bytes, _code, _contiguous_cpu, _manifest

__all__ = ["Writer", "Reader", "METADATA_KEY"]

#: The manifest metadata key holding DCP's metadata, as JSON.
METADATA_KEY = "torch.dcp.metadata"
_FORMAT = "ckpt.dcp/1"
#: Where a shard file's rank-local tree holds the rank's non-tensor items,
#: typed: {fqn: value}.
_VALUES_KEY = "torch.dcp.values"
#: DCP's format version, as FileSystemWriter records it.
_DCP_VERSION = "1.0.0"
#: Host memory a read stages at once for tensors it cannot read in place.
_STAGE_BYTES = 256 << 20


# ---- DCP's metadata <-> JSON (no pickle either way) -------------------------

def _encode(x, where):
    """Planner and storage data (Any, by DCP's contract) as tagged JSON:
    what the default planners put there (dicts, tuples of str and int,
    torch.Size) round-trips; anything else is refused, by name."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Size):
        return {"size": [int(v) for v in x]}
    if isinstance(x, tuple):
        return {"tuple": [_encode(v, where) for v in x]}
    if isinstance(x, list):
        return {"list": [_encode(v, where) for v in x]}
    if isinstance(x, dict):
        return {"dict": [[_encode(k, where), _encode(v, where)] for k, v in x.items()]}
    raise TypeError(f"{where}: a {type(x).__qualname__} cannot be stored without pickle "
                    "(ckpt.dcp keeps None, bool, int, float, str, tuples, lists, dicts "
                    "and torch.Size)")


def _decode(x, where):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict) and len(x) == 1:
        (tag, v), = x.items()
        if tag == "size" and isinstance(v, list) and all(type(i) is int for i in v):
            return torch.Size(v)
        if tag == "tuple" and isinstance(v, list):
            return tuple(_decode(i, where) for i in v)
        if tag == "list" and isinstance(v, list):
            return [_decode(i, where) for i in v]
        if tag == "dict" and isinstance(v, list) and all(
                isinstance(p, list) and len(p) == 2 for p in v):
            return {_decode(k, where): _decode(i, where) for k, i in v}
    raise FormatError(f"{where}: not a value ckpt.dcp writes: {json.dumps(x)[:200]}")


def _torch_attr(name, kind, where):
    """torch.<name> when it is a `kind` (dtype, layout, memory_format)."""
    if not isinstance(name, str) or not name.startswith("torch."):
        raise FormatError(f"{where}: {name!r} is not a torch {kind.__name__}")
    v = getattr(torch, name[len("torch."):], None)
    if not isinstance(v, kind):
        raise FormatError(f"{where}: {name!r} is not a torch {kind.__name__}")
    return v


def _metadata_json(metadata, byte_files):
    tensors, byte_items = {}, {}
    for fqn, m in metadata.state_dict_metadata.items():
        if isinstance(m, _md.TensorStorageMetadata):
            p = m.properties
            tensors[fqn] = {
                "dtype": str(p.dtype), "layout": str(p.layout),
                "requires_grad": bool(p.requires_grad),
                "memory_format": str(p.memory_format), "pin_memory": bool(p.pin_memory),
                "strides": None if getattr(p, "strides", None) is None
                else [int(s) for s in p.strides],
            }
        elif isinstance(m, _md.BytesStorageMetadata):
            if fqn not in byte_files:
                raise InvalidArgumentError(f"DCP metadata names bytes '{fqn}' that no rank wrote")
            byte_items[fqn] = byte_files[fqn]
        else:
            raise TypeError(f"{fqn}: DCP storage metadata {type(m).__qualname__} is not "
                            "supported by ckpt.dcp")
    sm = metadata.storage_meta
    doc = {
        "format": _FORMAT,
        "version": metadata.version if hasattr(metadata, "version") else None,
        "tensors": tensors,
        "bytes": byte_items,
        "planner_data": _encode(metadata.planner_data, "the planner's data"),
        "storage_meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id, "load_id": sm.load_id, "modules": list(sm.modules)},
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def _field(table, key, kinds, default, where):
    """table[key] when it is one of `kinds` (None allowed where default is
    None), else FormatError naming it."""
    v = table.get(key, default)
    if v is None and default is None:
        return None
    if type(v) not in kinds:
        raise FormatError(f"{where}: '{key}' is {json.dumps(v)[:80]}, not "
                          f"{' or '.join(k.__name__ for k in kinds)}")
    return v


def _metadata_from(manifest, where):
    """DCP's Metadata from a manifest: the tensors (dtype, global shape,
    chunks) from its tensor table, the rest from METADATA_KEY; a sharded
    checkpoint that ckpt.distributed saved (no METADATA_KEY) gives its
    tensors with default properties. Returns (Metadata, {value fqn: file}).
    Anything in METADATA_KEY that ckpt.dcp does not write is a FormatError
    naming `where`."""
    raw = manifest.metadata.get(METADATA_KEY)
    if raw is None:
        doc = {"format": _FORMAT, "tensors": {}, "bytes": {},
               # What DCP's default planner would record for flat keys.
               "planner_data": _encode({p: (p,) for p in manifest.tensors}, where)}
    else:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"{where}: {METADATA_KEY} is not JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise FormatError(f"{where}: {METADATA_KEY} is not {_FORMAT} metadata")
    props = _field(doc, "tensors", (dict,), {}, where)
    byte_files = _field(doc, "bytes", (dict,), {}, where)
    sdm = {}
    for path, t in manifest.tensors.items():
        dtype = t.dtype
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgumentError(f"{where}: tensor '{path}' is {dtype}, which this "
                                       f"torch ({torch.__version__}) has no type for")
        here = f"{where}: tensor '{path}'"
        p = _field(props, path, (dict,), {}, here)
        if p and _torch_attr(p.get("dtype"), torch.dtype, here) != dtype:
            raise FormatError(f"{here}: DCP's metadata says {p.get('dtype')}, the manifest "
                              f"{dtype}")
        tp = _md.TensorProperties(
            dtype=dtype,
            layout=_torch_attr(p.get("layout", "torch.strided"), torch.layout, here),
            requires_grad=_field(p, "requires_grad", (bool,), False, here),
            memory_format=_torch_attr(p.get("memory_format", "torch.contiguous_format"),
                                      torch.memory_format, here),
            pin_memory=_field(p, "pin_memory", (bool,), False, here))
        strides = _field(p, "strides", (list,), None, here)
        if strides is not None:
            if not all(type(x) is int for x in strides):
                raise FormatError(f"{here}: strides {json.dumps(strides)[:80]} are not ints")
            if hasattr(tp, "strides"):
                tp.strides = tuple(strides)
        chunks = [_md.ChunkStorageMetadata(offsets=torch.Size(c.offsets),
                                           sizes=torch.Size(c.sizes)) for c in t.chunks]
        if not chunks and 0 in t.shape:  # an empty tensor: DCP lists one empty chunk
            chunks = [_md.ChunkStorageMetadata(offsets=torch.Size([0] * len(t.shape)),
                                               sizes=torch.Size(t.shape))]
        sdm[path] = _md.TensorStorageMetadata(properties=tp, size=torch.Size(t.shape),
                                              chunks=chunks)
    missing = sorted(set(props) - set(sdm))
    if missing:
        raise FormatError(f"{where}: DCP's metadata names tensors the manifest does not "
                          f"hold: {', '.join(missing[:5])}")
    files = len(manifest.files)
    for fqn, f in byte_files.items():
        if fqn in sdm:
            raise FormatError(f"{where}: '{fqn}' is both a tensor and bytes")
        if type(f) is not int or not 0 <= f < files:
            raise FormatError(f"{where}: bytes '{fqn}' name file {json.dumps(f)[:40]} of "
                              f"{files}")
        sdm[fqn] = _md.BytesStorageMetadata()
    sm = _field(doc, "storage_meta", (dict,), None, where)
    storage_meta = None
    if sm is not None:
        here = f"{where}: storage_meta"
        modules = _field(sm, "modules", (list,), [], here)
        if not all(type(m) is str for m in modules):
            raise FormatError(f"{here}: 'modules' are not strings")
        storage_meta = _md.StorageMeta(
            checkpoint_id=_field(sm, "checkpoint_id", (str,), None, here),
            save_id=_field(sm, "save_id", (str,), None, here),
            load_id=_field(sm, "load_id", (str,), None, here), modules=modules)
    try:
        planner_data = _decode(doc.get("planner_data"), where)
    except (TypeError, RecursionError) as e:  # an unhashable key, nesting too deep
        raise FormatError(f"{where}: the planner's data does not decode ({e})") from None
    md = _md.Metadata(state_dict_metadata=sdm, planner_data=planner_data,
                      storage_meta=storage_meta)
    version = _field(doc, "version", (str,), None, where)
    if version is not None and hasattr(md, "version"):
        md.version = version
    return md, byte_files


def _typed(b, fqn):
    """The value a torch.save stream holds, read by ckpt's restricted
    importer (plain values only; nothing in the stream runs)."""
    try:
        return _ckpt_load(io.BytesIO(b))
    except PickleRefusedError as e:
        raise InvalidArgumentError(
            f"{fqn}: ckpt.dcp stores non-tensor values as plain data, and this one holds "
            f"what a load would have to run code for ({e}); give the state dict plain "
            "values (numbers, str, lists, dicts, tensors)") from None
    except FormatError as e:
        raise InvalidArgumentError(f"{fqn}: the planner's bytes are not a torch.save "
                                   f"stream ({e})") from None


def _check_id(checkpoint_id):
    try:
        return os.fspath(checkpoint_id)
    except TypeError:
        raise TypeError(f"checkpoint_id must be a path, not {type(checkpoint_id).__qualname__}") \
            from None


def _done(value):
    f = Future()
    f.set_result(value)
    return f


# ---- writing ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ShardOf:
    """What prepare_global_plan tells each rank: its shard of how many."""
    rank: int
    world_size: int


@dataclasses.dataclass(frozen=True)
class _Written:
    """A write result's storage_data: the rank that wrote the item, and
    (on the rank's first result only) its shard's record, which the
    coordinator's commit takes instead of reading the shard back."""
    rank: int
    record: bytes = None


class Writer(_dcp.StorageWriter):
    """A DCP StorageWriter that writes a ckpt sharded checkpoint directory.

    `path` (or dcp.save's checkpoint_id) is the directory. `overwrite`
    (default True, like FileSystemWriter) replaces an existing ckpt sharded
    checkpoint there by one atomic exchange once the new one is complete;
    anything else at that path is refused. `sync=False` skips the fsyncs
    (tests, scratch runs: a crash may then lose the checkpoint)."""

    def __init__(self, path=None, *, overwrite=True, sync=True):
        super().__init__()
        self.path = None if path is None else _check_id(path)
        self.overwrite, self.sync = bool(overwrite), bool(sync)
        self.save_id = None
        self.is_coordinator = False
        self._byte_files = {}
        self.reset(path)

    # DCP calls these in this order: reset, set_up_storage_writer,
    # prepare_local_plan, (coordinator) prepare_global_plan, write_data,
    # (coordinator) finish.
    def reset(self, checkpoint_id=None):
        if checkpoint_id is not None:
            self.path = _check_id(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    @property
    def checkpoint_id(self):
        return self.path

    def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
        if kwargs.get("use_collectives", True) is False:
            raise InvalidArgumentError(
                "ckpt.dcp.Writer commits one directory for all ranks: it needs DCP's "
                "collectives (use_collectives=True)")
        if self.path is None:
            raise InvalidArgumentError("ckpt.dcp.Writer: no checkpoint directory (pass "
                                       "path, or dcp.save's checkpoint_id)")
        self.is_coordinator = bool(is_coordinator)

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        # Before any rank writes (an error here reaches every rank): what is
        # at the target must be replaceable.
        if os.path.lexists(self.path):
            empty = os.path.isdir(self.path) and not os.path.islink(self.path) \
                and not os.listdir(self.path)
            if not empty and not self.overwrite:
                raise InvalidArgumentError(f"{self.path} exists (pass overwrite=True to "
                                           "replace it)")
            if not empty and not _ckpt.is_sharded_checkpoint(self.path):
                raise InvalidArgumentError(
                    f"{self.path} exists and is not a ckpt sharded checkpoint; refusing to "
                    "replace it (an empty directory would do)")
        n = len(plans)
        return [dataclasses.replace(p, storage_data=_ShardOf(r, n)) for r, p in enumerate(plans)]

    def write_data(self, plan, planner):
        shard = plan.storage_data
        if not isinstance(shard, _ShardOf):
            raise InvalidArgumentError("ckpt.dcp.Writer: the plan was not prepared by its "
                                       "prepare_global_plan")
        path = _ckpt.dist_shard_path(self.path, shard.rank, shard.world_size)
        w = _ckpt.Writer(path, sync=self.sync, producer=f"ckpt-python {_ckpt.version} (dcp)")
        results, chunks, byte_items = [], [], {}
        try:
            for item in plan.items:
                data = planner.resolve_data(item)
                fqn = item.index.fqn
                if item.type == WriteItemType.BYTE_IO:
                    b = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                    byte_items[fqn] = _typed(b, fqn)
                    size = len(b)
                else:
                    t = _contiguous_cpu(data)
                    td = item.tensor_data
                    offsets, sizes = list(td.chunk.offsets), list(td.chunk.sizes)
                    if list(t.shape) != sizes:
                        raise InvalidArgumentError(
                            f"{fqn}: the planner resolved a tensor of shape {tuple(t.shape)} "
                            f"for a chunk of {tuple(sizes)}")
                    node = w.add_chunk(fqn, _code(t.dtype, fqn), list(td.size), offsets, sizes,
                                       _as_bytes(t))
                    if node is not None:
                        chunks.append(node)
                    size = t.numel() * t.element_size()
                results.append(_dcp.storage.WriteResult(
                    index=item.index, size_in_bytes=size, storage_data=_Written(shard.rank)))
            local = _Saver(w).tree({_VALUES_KEY: byte_items}) if byte_items else None
            w.set_shard_root(chunks, None, local, shard.rank, shard.world_size)
            w.commit()
        except BaseException:
            w.abort()
            raise
        record = w.record_bytes()
        if results and record is not None:
            results[0] = dataclasses.replace(
                results[0], storage_data=_Written(shard.rank, record))
        return _done(results)

    def finish(self, metadata, results):
        """The commit (coordinator only, after every rank's write_data):
        checks the ranks' shard files, writes the manifest with DCP's
        metadata in it, and renames the directory into place."""
        world = len(results)
        byte_files, records = {}, [None] * world
        for rank_results in results:
            for wr in rank_results:
                sd = wr.storage_data
                if not isinstance(sd, _Written) or not 0 <= sd.rank < world:
                    raise InvalidArgumentError("ckpt.dcp.Writer.finish: a write result that "
                                               "its write_data did not make")
                if sd.record is not None:
                    records[sd.rank] = sd.record
                if isinstance(metadata.state_dict_metadata.get(wr.index.fqn),
                              _md.BytesStorageMetadata):
                    byte_files[wr.index.fqn] = sd.rank
        # The ranks' records stand for reading every shard back here (all
        # or none: a rank that wrote no item has none).
        have = all(r is not None for r in records)
        metadata.version = _DCP_VERSION  # (DCP's planner leaves both to the storage)
        metadata.storage_meta = self.storage_meta()
        doc = _metadata_json(metadata, byte_files)
        _ckpt.dist_commit_written(self.path, world, 0, self.overwrite, self.sync,
                                  {METADATA_KEY: doc}, records if have else None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        try:
            p = os.fspath(checkpoint_id)
        except TypeError:
            return False
        return not os.path.isfile(p)

    def storage_meta(self):
        return _md.StorageMeta(checkpoint_id=self.path, save_id=self.save_id)


# ---- reading ---------------------------------------------------------------

class Reader(_dcp.StorageReader):
    """A DCP StorageReader of ckpt sharded checkpoint directories (those
    Writer made, and those ckpt.distributed.save made: their tensors).

    Each rank reads the byte runs of the boxes its load plan names, sorted
    and coalesced by file offset; `verify` (default True) checks the
    checksum blocks those runs touch. `stats` holds the byte counts of the
    last read_data (bytes_needed, bytes_read...)."""

    def __init__(self, path=None, *, verify=True, threads=0):
        super().__init__()
        self.path = None if path is None else _check_id(path)
        self.verify, self.threads = bool(verify), int(threads)
        self.load_id = None
        self.stats = {}
        self._ck = self._manifest = self._byte_files = None
        self.reset(path)

    def reset(self, checkpoint_id=None):
        if checkpoint_id is not None:
            self.path = _check_id(checkpoint_id)
        self.load_id = uuid.uuid4().hex
        self._ck = self._manifest = self._byte_files = None
        self.stats = {}

    @property
    def checkpoint_id(self):
        return self.path

    def _open(self):
        if self._ck is None:
            if self.path is None:
                raise InvalidArgumentError("ckpt.dcp.Reader: no checkpoint directory (pass "
                                           "path, or dcp.load's checkpoint_id)")
            if not _ckpt.is_sharded_checkpoint(self.path):
                if os.path.exists(os.path.join(self.path, ".metadata")):
                    raise InvalidArgumentError(
                        f"{self.path} is a torch.distributed.checkpoint directory of "
                        "FileSystemWriter: load it with DCP's FileSystemReader, or with "
                        "ckpt.distributed.load (which never unpickles its .metadata)")
                raise NotFoundError(f"{self.path}: not a ckpt sharded checkpoint (no manifest)")
            self._ck = _ckpt.ShardedCheckpoint(self.path)
            self._manifest = _manifest(self._ck.manifest())
        return self._ck

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:
            # DCP's fallback to per-rank metadata: there is none, only the manifest.
            raise NotFoundError(f"{self.path}: a ckpt checkpoint has one manifest, no "
                                "per-rank metadata")
        ck = self._open()
        self._ck = None  # a Reader used again reads the checkpoint there now
        self._open()
        md, self._byte_files = _metadata_from(self._manifest,
                                              os.path.join(self.path, "MANIFEST.ckptm"))
        return md

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
        self._open()
        if self._byte_files is None:
            self.read_metadata()

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        ck = self._open()
        if self._byte_files is None:
            self.read_metadata()
        stats = {}
        tensors = [r for r in plan.items if r.type != LoadItemType.BYTE_IO]
        byte_reads = [r for r in plan.items if r.type == LoadItemType.BYTE_IO]
        # Tensors in groups of at most _STAGE_BYTES of staging: a destination
        # that is a contiguous CPU tensor of the stored dtype is read into in
        # place; any other (a strided view, another device) through a buffer.
        group, staged = [], 0
        for r in tensors:
            group.append(r)
            staged += _numel(r.lengths) * 8
            if staged >= _STAGE_BYTES:
                self._read_tensors(ck, group, planner, stats)
                group, staged = [], 0
        if group:
            self._read_tensors(ck, group, planner, stats)
        if byte_reads:
            self._read_bytes(ck, byte_reads, planner)
        self.stats = stats
        return _done(None)

    def _read_tensors(self, ck, reads, planner, stats):
        wants, todo = [], []
        for r in reads:
            fqn = r.storage_index.fqn
            base = r.storage_index.offset
            if base is None:
                raise InvalidArgumentError(f"{fqn}: a tensor read without its chunk's offsets")
            offsets = [int(b) + int(o) for b, o in zip(base, r.storage_offsets)]
            sizes = [int(n) for n in r.lengths]
            dst = planner.resolve_tensor(r).detach()
            if tuple(dst.shape) != tuple(sizes):
                raise InvalidArgumentError(
                    f"{fqn}: the planner resolved a tensor of shape {tuple(dst.shape)} for a "
                    f"read of {tuple(sizes)}")
            dtype = self._dtype(fqn)
            if dst.device.type == "cpu" and dst.dtype == dtype and dst.is_contiguous() \
                    and dst.layout == torch.strided and not (dst.is_conj() or dst.is_neg()):
                buf = dst
            else:
                buf = torch.empty(sizes, dtype=dtype)
            wants.append((fqn, offsets, sizes, _as_bytes(buf)))
            todo.append((r, dst, buf))
        got = ck.load(wants, self.verify, self.threads)
        for k, v in got.items():
            if isinstance(v, (int, float)):
                stats[k] = stats.get(k, 0) + v
        for r, dst, buf in todo:
            if buf is not dst:
                dst.copy_(buf)
            planner.commit_tensor(r, dst)

    def _dtype(self, fqn):
        t = self._manifest.tensors.get(fqn)
        if t is None:
            raise NotFoundError(f"{self.path}: no tensor '{fqn}' in the checkpoint")
        return t.dtype

    def _read_bytes(self, ck, reads, planner):
        by_file = {}
        for r in reads:
            fqn = r.storage_index.fqn
            f = self._byte_files.get(fqn)
            if f is None:
                raise NotFoundError(f"{self.path}: no value '{fqn}' in the checkpoint")
            by_file.setdefault(f, []).append(r)
        missing = object()
        for f, rs in sorted(by_file.items()):
            reader = ck.open_shard(f)
            where = ck.shard_file_path(f)
            try:
                saved = _Loader(reader).load(f"rank_local/{_VALUES_KEY}")
            except NotFoundError:
                saved = None
            if not isinstance(saved, dict):
                raise FormatError(f"{where}: the manifest says it holds DCP values; it holds "
                                  "none")
            for r in rs:
                value = saved.get(r.storage_index.fqn, missing)
                if value is missing:
                    raise FormatError(f"{where}: no value '{r.storage_index.fqn}' in its "
                                      "rank-local tree")
                # The planner unpickles what it gets: a pickle made here, of
                # the plain values just read, never bytes from the file.
                buf = io.BytesIO()
                torch.save(value, buf)
                buf.seek(0)
                planner.load_bytes(r, buf)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id):
        try:
            return _ckpt.is_sharded_checkpoint(os.fspath(checkpoint_id))
        except TypeError:
            return False


def _numel(sizes):
    n = 1
    for s in sizes:
        n *= int(s)
    return n
