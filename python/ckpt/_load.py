"""ckpt.load and ckpt.open: ckpt files -> Python objects with torch tensors."""
import builtins
import contextlib
import functools
import os
import tempfile
import warnings

import numpy as np
import torch

from . import _ckpt, _progress
from ._dtypes import CODE_TO_NUMPY, CODE_TO_TORCH, torch_dtype as _torch_dtype
from ._errors import (CkptError, CudaError, FormatError, InvalidArgumentError,
                      UnsupportedError)

_THREADS = max(1, min(4, os.cpu_count() or 1))


if hasattr(torch.Tensor, "untyped_storage"):  # torch >= 2.0
    def _untyped(t):
        """The UntypedStorage under a tensor."""
        return t.untyped_storage()
else:  # torch 1.13: Tensor.storage() wraps _storage() in a slow TypedStorage
    def _untyped(t):
        """The UntypedStorage under a tensor."""
        return t._storage()


def view(storage, dtype, offset, shape, strides):
    """A tensor of `dtype` over an UntypedStorage (offset and strides in
    elements), on the storage's device."""
    return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, shape, strides)


def _from_region(region):
    """A uint8 CPU tensor over a Region's bytes, without a copy."""
    if len(region) == 0:
        return torch.empty(0, dtype=torch.uint8)
    if region.writable:  # no warning to silence: skip catch_warnings' ~5 us
        return torch.frombuffer(region, dtype=torch.uint8)
    with warnings.catch_warnings():
        # A read-only region (only copied from, never handed out) warns.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(region, dtype=torch.uint8)


def sniff(path):
    """'ckpt', 'pth', 'safetensors' or None, from a file's first bytes."""
    with builtins.open(path, "rb") as f:
        return sniff_bytes(f.read(9))


def sniff_bytes(head):
    """sniff() for the first bytes of a file."""
    if head.startswith(_ckpt.magic):  # include/ckpt/format.h kMagic
        return "ckpt"
    # safetensors before pickle: its 8-byte header length may begin with
    # 0x80 (a header of 0x80 + 256k bytes), a pickle's PROTO opcode.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in
                                           (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pth"
    return None


def torch_dtype(code, where=None):
    """The torch dtype of a format dtype code; UnsupportedError (naming
    `where`) when this torch has none."""
    try:
        return _torch_dtype(code)
    except (TypeError, KeyError) as e:
        raise UnsupportedError(f"{where}: {e}" if where else str(e)) from None


def _torch_device(d, where, what):
    """torch.device(d), with torch's refusal (RuntimeError) of a string from
    a file turned into a FormatError naming the file and what it is."""
    try:
        return torch.device(d)
    except (RuntimeError, ValueError, TypeError) as e:
        raise FormatError(f"{where}: {what} '{d}' is not a device torch can use ({e})") from None


def _device_str(d):
    try:
        return str(torch.device(d))
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidArgumentError(f"map_location: {e}") from None


@functools.lru_cache(maxsize=64)
def _check_device(device, saved, where):
    if device == saved:
        d = _torch_device(device, where, "the saved device")
    else:
        d = torch.device(device)  # map_location's, already checked
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise CudaError(
                f"{where}: tensors were saved on '{saved}', but CUDA is not available "
                "here (torch.cuda.is_available() is False); pass map_location='cpu' "
                "to load them on the CPU")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CudaError(
                f"{where}: tensors were saved on '{saved}', but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); pass map_location="
                "'cuda:0' or a dict such as {'" + saved + "': 'cuda:0'}")
    elif d.type not in ("cpu", "meta"):
        raise CudaError(f"{where}: cannot place tensors on device '{d}' (saved on "
                        f"'{saved}'); pass map_location='cpu'")
    return d


def resolve_target(map_location, saved):
    """The device string a storage saved on `saved` goes to, or None when a
    callable map_location must decide."""
    ml = map_location
    if ml is None:
        return saved
    if isinstance(ml, (str, torch.device)):
        return _device_str(ml)
    if isinstance(ml, dict):
        target = ml.get(saved, saved)
        return saved if target == saved else _device_str(target)
    if callable(ml):
        return None
    raise TypeError("map_location must be None, a str, a torch.device, a dict "
                    f"or a callable, not {type(ml).__name__}")


class _Loader:
    """Builds Python objects from one open file, placing each storage once."""

    def __init__(self, reader, map_location=None, mmap=False, threads=_THREADS,
                 gpu_loader=False, name=None):
        self.r = reader
        self.name = name or reader.path  # what errors call the file
        self.gpu_loader = gpu_loader
        self._storages = None  # [_ckpt.StorageRecord], read when first needed
        self._tensors = None   # [_ckpt.TensorRecord], read when first needed
        self.map_location = map_location
        self.mmap = mmap
        self.threads = threads
        self.host = {}    # sid -> (uint8 CPU tensor, owned: bytes belong to the process)
        self.placed = {}  # sid -> UntypedStorage on its target device

    @property
    def storages(self):
        if self._storages is None:
            self._storages = self.r.storages()
        return self._storages

    @property
    def tensors(self):
        if self._tensors is None:
            self._tensors = self.r.tensors()
        return self._tensors

    def tensor(self, idx):
        # One entry without building the whole table: ckpt.open stays O(header).
        return self._tensors[idx] if self._tensors is not None else self.r.tensor(idx)

    def storage(self, sid):
        return self._storages[sid] if self._storages is not None else self.r.storage(sid)

    def _target(self, saved):
        return resolve_target(self.map_location, saved)

    def _copy_to_host(self, sids):
        """Copies storages into new CPU memory: one batched, parallel pread."""
        sids = [s for s in sids if s not in self.host]
        if sids:
            bufs = [torch.empty(self.storage(s).nbytes, dtype=torch.uint8) for s in sids]
            self.r.read_storages(sids, [b.numpy() for b in bufs], self.threads)
            for s, b in zip(sids, bufs):
                self.host[s] = (b, True)

    def _host(self, sid, copy):
        if sid not in self.host:
            if copy:
                self._copy_to_host([sid])
            else:
                self.host[sid] = (_from_region(self.r.storage_region(sid)), self.mmap)
        return self.host[sid][0]

    def materialize(self, sids, progress=None):
        """Places storages `sids` (those not placed yet). With a progress
        reporter, in batches of at least _progress.BATCH bytes, each
        reported once placed, so that a copying load's bar moves."""
        sids = [s for s in dict.fromkeys(sids) if s not in self.placed]
        if progress is None:
            self._materialize(sids)
            return
        batch, size = [], 0
        for s in sids:
            batch.append(s)
            size += self.storage(s).nbytes
            if size >= _progress.BATCH:
                self._materialize(batch)
                progress.add(size)
                batch, size = [], 0
        if batch:
            self._materialize(batch)
            progress.add(size)

    def _materialize(self, sids):
        targets = {s: self._target(self.storage(s).device) for s in sids}
        if not self.mmap:
            self._copy_to_host([s for s in sids if targets[s] == "cpu"])
        where = self.name
        to_gpu = {}  # device -> storages for the C++ GPU loader
        for s in sids:
            target, saved = targets[s], self.storage(s).device
            if target is None:  # a callable map_location
                cpu = _untyped(self._host(s, copy=not self.mmap))
                out = self.map_location(cpu, saved)
                if out is None:
                    target = saved
                else:
                    self.placed[s] = out.untyped() if hasattr(out, "untyped") and \
                        not isinstance(out, torch.UntypedStorage) else out
                    continue
            # Errors name the storage's bytes: file, offset, storage.
            dev = _check_device(target, saved,
                                f"{where}:{self.storage(s).offset}: storage {s}")
            if dev.type == "meta":  # shapes only: nothing is read
                self.placed[s] = _untyped(torch.empty(self.storage(s).nbytes, dtype=torch.uint8,
                                                      device="meta"))
            elif dev.type == "cpu":
                self.placed[s] = _untyped(self._host(s, copy=not self.mmap))
            elif self.gpu_loader:
                index = dev.index if dev.index is not None else torch.cuda.current_device()
                to_gpu.setdefault(index, []).append(s)
            else:
                src = self._host(s, copy=False)
                self.placed[s] = _untyped(src.to(dev))
        for index, group in to_gpu.items():
            self._gpu_load(index, group)

    def _gpu_load(self, index, sids):
        """Whole storages into torch-allocated device memory by the C++ loader
        (pinned ring, several streams; docs/GPU.md)."""
        if not _ckpt.has_gpu_loader:
            raise CudaError("this build of ckpt has no GPU loader (built without the "
                            "CUDA toolkit); load without gpu_loader=True")
        dev = torch.device("cuda", index)
        bufs = [torch.empty(max(1, self.storage(s).nbytes), dtype=torch.uint8, device=dev)
                for s in sids]
        # Memory the caching allocator hands back may still be in use by
        # queued kernels on torch's stream; the loader writes from its own.
        torch.cuda.synchronize(dev)
        _ckpt.load_storages_to_device(self.r, sids, [b.data_ptr() for b in bufs], index)
        for s, b in zip(sids, bufs):
            self.placed[s] = _untyped(b)

    # -- the tree ---------------------------------------------------------------
    def on_tensor(self, idx, type_name):
        rec = self.tensor(idx)
        sid = rec.storage
        if type_name == "numpy.ndarray" and rec.dtype in CODE_TO_NUMPY:
            host = self._host(sid, copy=not self.mmap)
            owned = self.host[sid][1]
            buf = host.numpy()
            if not owned:
                buf = buf.copy()  # never hand out an array over read-only pages
            dt = CODE_TO_NUMPY[rec.dtype]
            return np.ndarray(rec.shape, dt, buffer=buf, offset=rec.storage_offset * dt.itemsize,
                              strides=[s * dt.itemsize for s in rec.strides])
        t = self.view(rec)
        if rec.is_parameter:
            return torch.nn.Parameter(t, requires_grad=rec.requires_grad)
        if rec.requires_grad:
            t.requires_grad_(True)
        return t

    def view(self, rec):
        """The CPU or device tensor a TensorRecord describes, its storage
        placed first if it is not yet."""
        if rec.storage not in self.placed:
            self.materialize([rec.storage])
        dtype = CODE_TO_TORCH.get(rec.dtype) or torch_dtype(
            rec.dtype, f"{self.name}:{self.storage(rec.storage).offset}: tensor '{rec.path}'")
        return view(self.placed[rec.storage], dtype, rec.storage_offset, rec.shape, rec.strides)

    def on_dtype(self, code, offset):
        return torch_dtype(code, f"{self.name}:{offset}: a dtype in the tree")

    def on_device(self, s, where, offset):
        return _torch_device(s, f"{self.name}:{offset}", f"tree path '{where}': device")

    def load(self, path="", progress=None, desc="ckpt.load"):
        """The (sub-)tree at `path`, its storages placed first. `progress`:
        a progress= argument (_progress.py), or a reporter that earlier
        work (a conversion) already moved, which this load continues."""
        path = path.strip("/")
        if self._storages is None:  # a (sub-)tree load needs the whole table
            self._storages = self.r.storages()
        if path:
            under = [t for t in self.tensors
                     if t.path == path or t.path.startswith(path + "/")]
        else:
            under = self.tensors
        sids = [t.storage for t in under]
        if progress is None or progress is False:
            self.materialize(sids)
            return self.r.tree(path, self.on_tensor, self.on_dtype, self.on_device)
        sids = [s for s in dict.fromkeys(sids) if s not in self.placed]
        total = sum(self.storage(s).nbytes for s in sids)
        if isinstance(progress, _progress.Reporter):
            rep = progress
            rep.expect(total)
        else:
            rep = _progress.reporter(progress, total, _progress.describe(desc, self.name))
        with rep.closing():
            self.materialize(sids, rep)
            return self.r.tree(path, self.on_tensor, self.on_dtype, self.on_device)


def _open_reader(path, mmap):
    path = os.fspath(path)
    try:
        return _ckpt.Reader(path, copy_on_write=mmap)
    except CkptError:
        # Sniffed only when the open failed (a sniff costs a third of a
        # small file's open), to say why in Python's terms:
        # FileNotFoundError / IsADirectoryError come from here, and a .pth
        # or .safetensors file is named as such.
        kind = sniff(path)
        if kind == "ckpt":
            raise
    what = {"pth": "a torch.save file (.pth)", "safetensors": "a safetensors file"}.get(
        kind, "not a ckpt file")
    raise FormatError(f"{path}: {what}; ckpt.load() converts .pth and .safetensors "
                      "files, or convert once with `python -m ckpt import`")


_PICKLE_LOAD_ARGS = {"errors", "fix_imports", "buffers"}


# torch.load's `encoding` (how Python 2 str values become text), as the
# importer spells it.
_ENCODINGS = {"utf-8": "utf-8", "utf8": "utf-8", "ascii": "utf-8",
              "latin1": "latin1", "latin-1": "latin1", "iso-8859-1": "latin1"}


def _pth_encoding(encoding):
    """The importer's name for torch.load's `encoding` (None: utf-8)."""
    if encoding is None:
        return "utf-8"
    try:
        return _ENCODINGS[encoding.lower()]
    except KeyError:
        raise InvalidArgumentError(
            f"encoding={encoding!r}: ckpt reads Python 2 str values as 'utf-8' "
            "(torch.load's default) or 'latin1'") from None


def _torch_load_compat(weights_only, encoding, pickle_load_args):
    """Checks the torch.load keywords that have no effect here."""
    for k in pickle_load_args:
        if k not in _PICKLE_LOAD_ARGS:
            raise TypeError(f"load() got an unexpected keyword argument '{k}'")
    if weights_only not in (None, True, False):
        raise TypeError("weights_only must be None, True or False")
    if encoding is not None and not isinstance(encoding, str):
        raise TypeError("encoding must be a str")


def load(path, map_location=None, pickle_module=None, *, weights_only=None, mmap=None,
         verify=False, gpu_loader=False, encoding=None, progress=False, **pickle_load_args):
    """Reads a whole file back as the object given to ckpt.save.

    map_location works as in torch.load: None keeps each tensor's saved
    device (an error if it does not exist here), a str or torch.device
    sends everything there ("meta": shapes and dtypes only, nothing read),
    a dict maps saved devices ("cuda:1") to new ones, and a
    callable(storage, location) returns the storage to use.
    mmap=True makes CPU tensors zero-copy views of the file, mapped
    private: writes change only this process's memory, never the file.
    verify=True checks every checksum first (a full pass over the file).
    gpu_loader=True moves storages bound for CUDA with ckpt's C++ GPU
    loader instead of torch's copies (experimental: tested on the CUDA
    runtime double, not yet measured on a GPU).

    torch.load's other arguments are accepted and have no effect: loading
    never unpickles, so pickle_module, weights_only (always as safe as
    weights_only=True) and the pickle arguments errors, fix_imports,
    buffers change nothing. encoding works as in torch.load for .pth files
    pickled by Python 2: 'utf-8' (the default) or 'latin1' decodes their
    str values.

    progress=True shows a progress bar on stderr (tqdm's if tqdm is
    installed, else a plain line): bytes of storage placed of the total,
    and GB/s. A callable progress(done_bytes, total_bytes) is called
    instead, first with 0, last with done == total, done never
    decreasing (docs/PYTHON.md "Progress"). A .pth file counts its bytes
    twice: once converted, once loaded. verify=True's checksum pass comes
    before and is not counted.

    .pth files (torch.save) are converted on the fly by the restricted
    importer, which never runs code from the file (a refusal is a
    ckpt.PickleRefusedError, also a pickle.UnpicklingError);
    .safetensors files are read with the safetensors package. `path` may
    also be a file object (io.BytesIO, an open file, a pipe): exactly one
    saved file is read from it, leaving it positioned after that file
    (a zip .pth: the rest of the stream), and its tensors are copies.
    """
    del pickle_module
    _torch_load_compat(weights_only, encoding, pickle_load_args)
    mmap = bool(mmap)
    if hasattr(path, "read"):
        return _load_stream(path, map_location, verify, encoding, progress)
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "pth":
        from .interop import _load_pth
        return _load_pth(path, map_location, mmap=mmap, encoding=_pth_encoding(encoding),
                         progress=progress)
    if kind == "safetensors":
        from .interop import _load_safetensors
        return _load_safetensors(path, map_location, progress)
    reader = _open_reader(path, mmap)
    if verify:
        reader.verify()
    return _Loader(reader, map_location, mmap, gpu_loader=gpu_loader).load(progress=progress)


def _load_stream(f, map_location, verify, encoding=None, progress=False):
    """load() of a file object (io.BytesIO, an open file...): one record
    read (_records.py), then loaded from memory; tensors are copies."""
    from ._records import read_record, stream_name
    name = stream_name(f)
    kind, data = read_record(f, name)
    if kind == "ckpt":
        reader = _ckpt.Reader(data, name)
        if verify:
            reader.verify()
        return _Loader(reader, map_location, mmap=False, name=name).load(progress=progress)
    if kind == "safetensors":
        from .interop import _place_safetensors, _safetensors, _safetensors_bytes
        rep = _progress.reporter(progress, _safetensors_bytes(data[:8], len(data)),
                                 _progress.describe("ckpt.load", name))
        if rep is None:
            return _place_safetensors(_safetensors().load(data), map_location)
        with rep.closing():
            return _place_safetensors(_safetensors().load(data), map_location)
    if kind == "pth":
        from .interop import _load_pth
        with tempfile.TemporaryDirectory(prefix="ckpt-", dir=os.environ.get("CKPT_TMPDIR")) as d:
            tmp = os.path.join(d, "stream.pth")
            with builtins.open(tmp, "wb") as out:
                out.write(data)
            return _load_pth(tmp, map_location, name=name, encoding=_pth_encoding(encoding),
                             progress=progress)
    raise FormatError(f"{name}: not a ckpt, .pth or .safetensors file")


@contextlib.contextmanager
def renamed_errors(names):
    """Errors naming a temporary file (a key of `names`, which may grow
    inside the block) name the user's file (its value) instead."""
    try:
        yield
    except CkptError as e:
        msg = str(e)
        for tmp, name in names.items():
            msg = msg.replace(tmp, name)
        if msg == str(e):
            raise
        new = type(e)(msg)
        if isinstance(e, OSError):
            new.errno = e.errno
        raise new.with_traceback(e.__traceback__) from None


class _Slice:
    """Rows of one tensor, read on indexing: f.get_slice(path)[a:b]."""

    def __init__(self, file, path):
        self._f = file
        self._path = path
        rec = file._record(path)
        self.shape = rec.shape
        self.dtype = CODE_TO_TORCH.get(rec.dtype) or torch_dtype(
            rec.dtype,
            f"{file.path}:{file._reader().storage(rec.storage).offset}: tensor '{path}'")

    def __getitem__(self, index):
        rest = ()
        if isinstance(index, tuple):
            index, rest = (index[0], index[1:]) if index else (slice(None), ())
        if not self.shape:
            raise IndexError(f"{self._path}: a 0-dim tensor has no rows")
        n = self.shape[0]
        if isinstance(index, int):
            i = index + n if index < 0 else index
            if not 0 <= i < n:
                raise IndexError(f"{self._path}: row {index} outside [0, {n})")
            t = self._f._rows(self._path, i, i + 1)[0]
        elif isinstance(index, slice):
            a, b, step = index.indices(n)
            if step < 0:
                raise IndexError("negative steps are not supported")
            t = self._f._rows(self._path, a, max(a, b))[::step]
        else:
            raise TypeError("index rows with an int or a slice")
        if not rest:
            return t
        # The row index is used up; the rest indexes the remaining dims.
        return t[rest] if isinstance(index, int) else t[(slice(None),) + rest]

    def get_shape(self):
        return list(self.shape)


class File:
    """A lazily opened ckpt file (ckpt.open). Opening reads only the header.

    Tensors from f[path], f.get(), f.get_slice() are zero-copy views of a
    private mapping of the file: nothing is read until touched, and writes
    to them change only this process's memory, never the file. They stay
    valid after close().
    """

    def __init__(self, path):
        self._path = os.fspath(path)
        self._r = _open_reader(self._path, mmap=True)
        self._cpu = _Loader(self._r, "cpu", mmap=True)

    # -- lifetime ---------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._r = None
        self._cpu = None

    def _reader(self):
        if self._r is None:
            raise ValueError(f"{self._path}: the file is closed")
        return self._r

    # -- tensors ----------------------------------------------------------------
    def _record(self, path):
        r = self._reader()
        return self._cpu.tensor(r.tensor_index(path))

    def keys(self):
        """Every tensor path, sorted (DESIGN.md path contract)."""
        return self._reader().paths()  # str only: no record per tensor

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return self._reader().num_tensors

    def __contains__(self, path):
        try:
            self._record(path)
            return True
        except KeyError:
            return False

    def __getitem__(self, path):
        idx = self._reader().tensor_index(path)
        return self._cpu.on_tensor(idx, "")

    def get_tensor(self, path):
        return self[path]

    def _rows(self, path, a, b):
        return self._cpu.view(self._reader().rows(path, a, b))

    def get_slice(self, path):
        return _Slice(self, path)

    # -- values and sub-trees ---------------------------------------------------
    def get(self, path=""):
        """The value at a tree path ("" = everything): numbers, strings,
        containers; tensors as zero-copy CPU views. The path is taken as
        written (DESIGN.md's path contract, as `ckpt get`): "x/" is the key
        "" under "x"."""
        r = self._reader()
        return r.tree(path, self._cpu.on_tensor, self._cpu.on_dtype, self._cpu.on_device)

    def load(self, prefix="", device=None, *, map_location=None, mmap=False,
             gpu_loader=False, progress=False):
        """The sub-tree at `prefix` with its tensors copied to `device`
        (or placed by map_location, as in ckpt.load). Slashes around the
        prefix are ignored ("model/" is "model"). progress= as in
        ckpt.load."""
        if device is not None and map_location is not None:
            raise ValueError("pass device or map_location, not both")
        ml = device if device is not None else map_location
        return _Loader(self._reader(), ml, mmap, gpu_loader=gpu_loader).load(prefix, progress)

    def kind(self, path=""):
        """The node kind at a path (taken as written, as get()): 'dict',
        'tensor', 'int'..."""
        return self._reader().kind(path)

    @property
    def metadata(self):
        return self._reader().metadata()

    @property
    def path(self):
        return self._path

    def verify(self):
        """Checks every checksum (all cores); raises ChecksumError naming the
        tensor and offset of the first damaged chunk."""
        self._reader().verify()


def open(path):  # noqa: A001 - the public name mirrors safetensors.safe_open
    """Opens a ckpt file lazily: ckpt.open(path) as f: f.keys(), f[path]..."""
    return File(path)


@contextlib.contextmanager
def _converted(path, sync=False, encoding="utf-8", progress=None):
    """A temporary ckpt file converted from a .pth, removed afterwards.
    `progress`: None or the importer's callable(done, total)."""
    with tempfile.TemporaryDirectory(prefix="ckpt-", dir=os.environ.get("CKPT_TMPDIR")) as d:
        out = os.path.join(d, "converted.ckpt")
        _ckpt.import_pth(path, out, sync, encoding, progress)
        yield out
