"""ckpt.open for every kind of file, and the safetensors-shaped API
(safe_open, save_file, load_file, save_model, load_model) for people
moving from `safetensors.torch`.

ckpt.open sniffs the file's first bytes, as ckpt.load does:
- a ckpt file opens as ever (ckpt.File, O(header));
- a .pth is converted once by the restricted importer (which never runs
  code from the file) into a temporary ckpt file, which is mapped and
  unlinked at once: the handle works as for a ckpt file, and every error
  names the .pth;
- a .safetensors file is opened lazily with the safetensors package's own
  safe_open (its validated header parser, a mapping of the file): nothing
  is converted or read beyond the header, whatever the size.
All three present ckpt.File's interface; the tensor paths of a
safetensors file are its tensor names as `ckpt.convert` would store them
(a dict key per name: "/" in a name is escaped as "~1", FORMAT.md 7.2).

safe_open, load_file... read all three kinds too. Their names are the
file's tensor paths, with a path of one segment (what a dict of tensors,
as save_file writes it, has) unescaped back to its dict key, so
save_file({"a/b": t}) reads back as "a/b".
"""
import contextlib
import os

import torch

from ._dtypes import CODES, TORCH_TO_CODE
from ._errors import (CudaError, FormatError, InvalidArgumentError, NotFoundError,
                      UnsupportedError)
from ._load import File, _converted, _Loader, _open_reader, renamed_errors, sniff

# ckpt dtype name -> safetensors' dtype code (safetensors' Dtype, 0.8).
# A dtype safetensors has no code for (complex128, complex32, quantized)
# is reported by its ckpt name.
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64", "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0", "float4_e2m1fn_x2": "F4",
}
_FROM_ST = {code: name for name, code in _ST_DTYPES.items()}
_PACKED_X2 = "float4_e2m1fn_x2"  # two values a byte: safetensors' shape counts values


def _escape(name):
    """A dict key's tensor-path segment (FORMAT.md 7.2, RFC 6901)."""
    return name.replace("~", "~0").replace("/", "~1")


def _unescape(segment):
    return segment.replace("~1", "/").replace("~0", "~")


def _names(paths):
    """The safe_open names of tensor paths, in their order: a one-segment
    path is a key of the root dict, given back as the key; a nested path
    stays as written. A key whose unescaped form is also a nested path of
    the file ({"a/b": t1, "a": {"b": t2}}: paths a~1b and a/b) keeps its
    escaped form ("a~1b"), so names stay unique and "a/b" is the nested one."""
    out, every = [], None
    for p in paths:
        if "/" in p or "~" not in p:
            out.append(p)
            continue
        name = _unescape(p)
        if "/" in name:
            if every is None:
                every = set(paths)
            if name in every:
                name = p
        out.append(name)
    return out


# -- ckpt.open ----------------------------------------------------------------------


def open(path):  # noqa: A001 - the public name mirrors safetensors.safe_open
    """Opens a ckpt, .pth or .safetensors file lazily (sniffed by content,
    not by name): ckpt.open(path) as f: f.keys(), f[path], f.get_slice()...
    A .pth is converted once into a temporary ckpt file (mapped, then
    unlinked); a .safetensors file is read through its own mapping."""
    path = os.fspath(path)
    try:
        return File(path)  # a ckpt file: opened without a sniff first
    except FormatError:
        kind = sniff(path)
        if kind == "pth":
            return PthFile(path)
        if kind == "safetensors":
            return SafetensorsFile(path)
        raise  # not a ckpt file, or a damaged one


def _renaming(method):
    """A File method whose errors name the .pth, not its temporary copy."""
    def wrapper(self, *args, **kwargs):
        with self._errors():
            return method(self, *args, **kwargs)
    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class PthFile(File):
    """ckpt.open of a torch.save file: converted by the restricted importer
    into a temporary ckpt file, which is mapped and removed at once (the
    mapping holds its blocks until the handle and its views are gone).
    verify() re-checks the converted copy; the archive's own CRC-32s, where
    it has them, were checked while converting."""

    def __init__(self, path, encoding="utf-8"):  # pylint: disable=super-init-not-called
        self._path = os.fspath(path)
        self._tmp = None
        names = {self._path: self._path}
        with renamed_errors(names), _converted(self._path, encoding=encoding) as tmp:
            names[tmp] = self._path
            self._tmp = tmp
            self._r = _open_reader(tmp, mmap=True)
        self._cpu = _Loader(self._r, "cpu", mmap=True, name=self._path)

    def _errors(self):
        return renamed_errors({self._tmp: self._path})

    keys = _renaming(File.keys)
    _record = _renaming(File._record)
    __getitem__ = _renaming(File.__getitem__)
    _rows = _renaming(File._rows)
    get = _renaming(File.get)
    load = _renaming(File.load)
    kind = _renaming(File.kind)
    verify = _renaming(File.verify)


class _StRecord:
    """What _Slice needs of a tensor record, for a safetensors tensor."""

    def __init__(self, t):
        self.shape = list(t.shape)
        self.dtype = TORCH_TO_CODE[t.dtype]


class SafetensorsFile(File):
    """ckpt.open of a .safetensors file, through the safetensors package's
    safe_open (its header checks, its mapping of the file). Tensors are
    zero-copy CPU views of that mapping. Tensor paths are the names as a
    dict key's path segment ("/" -> "~1"); the tree is one dict of them.
    A safetensors file has no checksums: verify() raises UnsupportedError."""

    def __init__(self, path):  # pylint: disable=super-init-not-called
        from .interop import _safetensors
        self._path = os.fspath(path)
        _safetensors()  # ImportError naming the package when it is missing
        from safetensors import safe_open as st_open
        try:
            self._st = st_open(self._path, framework="pt", device="cpu")
        except OSError:
            raise
        except Exception as e:  # safetensors' SafetensorError: a bad header
            raise FormatError(f"{self._path}: not a valid safetensors file ({e})") from None
        self._r = self._st
        self._by_path = {_escape(n): n for n in self._st.keys()}

    def close(self):
        self._r = None
        self._st = None

    def _errors(self):
        return contextlib.nullcontext()

    def _st_name(self, path):
        self._reader()
        try:
            return self._by_path[path]
        except (KeyError, TypeError):
            raise NotFoundError(f"{self._path}: not found: no tensor at path '{path}'") from None

    def _tensor(self, path):
        return self._st.get_tensor(self._st_name(path))

    def _record(self, path):
        return _StRecord(self._tensor(path))

    def keys(self):
        """Every tensor path, sorted."""
        self._reader()
        return sorted(self._by_path)

    def __len__(self):
        self._reader()
        return len(self._by_path)

    def __contains__(self, path):
        self._reader()
        return path in self._by_path

    def __getitem__(self, path):
        return self._tensor(path)

    def _rows(self, path, a, b):
        return self._tensor(path)[a:b]

    def _all(self):
        """{path: tensor view} in file (offset) order."""
        self._reader()
        return {_escape(n): self._st.get_tensor(n) for n in self._st.offset_keys()}

    def get(self, path=""):
        """The whole file as one dict ("") or one tensor, as views."""
        if path == "":
            return {self._by_path[p]: t for p, t in self._all().items()}
        return self._tensor(path)

    def load(self, prefix="", device=None, *, map_location=None, mmap=False,
             gpu_loader=False):
        """The tensor at `prefix`, or every tensor ("") as {name: tensor},
        copied (mmap=False) and placed as ckpt.load places them."""
        from .interop import _place_safetensors
        if device is not None and map_location is not None:
            raise ValueError("pass device or map_location, not both")
        if gpu_loader:
            raise UnsupportedError(f"{self._path}: gpu_loader=True reads ckpt files; "
                                   "convert this safetensors file first (ckpt.convert)")
        ml = device if device is not None else map_location
        prefix = prefix.strip("/")
        tree = self.get(prefix)
        one = not isinstance(tree, dict)
        if one:
            tree = {"": tree}
        if not mmap:
            tree = {k: t.clone() for k, t in tree.items()}
        tree = _place_safetensors(tree, ml)
        return tree[""] if one else tree

    def kind(self, path=""):
        """'dict' at the root, 'tensor' at a tensor path."""
        if path == "":
            self._reader()
            return "dict"
        self._st_name(path)
        return "tensor"

    @property
    def metadata(self):
        return dict(self._reader().metadata() or {})

    def verify(self):
        self._reader()
        raise UnsupportedError(f"{self._path}: a safetensors file has no checksums to "
                               "verify; convert it (ckpt.convert or `python -m ckpt import`) "
                               "to get them")

    def _info(self, path):
        name = self._st_name(path)
        s = self._st.get_slice(name)
        code = s.get_dtype()
        shape = list(s.get_shape())
        dtype = _FROM_ST.get(code, code)
        if dtype == _PACKED_X2 and shape:
            shape[-1] //= 2
        return shape, dtype

    def _offset_paths(self):
        self._reader()
        return [_escape(n) for n in self._st.offset_keys()]

    def _tensors(self, device, mmap):
        out = self._all()
        if not mmap:
            out = {k: t.clone() for k, t in out.items()}
        return {k: _to(t, device) for k, t in out.items()}


def _info(f, path):
    """(torch shape, ckpt dtype name) of a tensor path, read from the header."""
    if isinstance(f, SafetensorsFile):
        return f._info(path)
    rec = f._record(path)
    return list(rec.shape), CODES[rec.dtype][0]


def _offset_paths(f):
    """Tensor paths in the order of their bytes in the file."""
    if isinstance(f, SafetensorsFile):
        return f._offset_paths()
    with _errors(f):
        f._reader()  # ValueError when closed
        storages = f._cpu.storages
        tensors = f._cpu.tensors
        return [t.path for t in sorted(
            tensors, key=lambda t: (storages[t.storage].offset
                                    + t.storage_offset * CODES[t.dtype][1], t.path))]


def _errors(f):
    return f._errors() if hasattr(f, "_errors") else contextlib.nullcontext()


def _tensors(f, device, mmap):
    """{tensor path: tensor} of every tensor, on `device` (a torch.device),
    in file order; CPU tensors are views of the mapping when mmap."""
    if isinstance(f, SafetensorsFile):
        return f._tensors(device, mmap)
    with _errors(f):
        r = f._reader()
        loader = _Loader(r, str(device), mmap, name=f.path)
        recs = loader.tensors
        loader.materialize([t.storage for t in recs])
        return {t.path: loader.view(t) for t in recs}


def _to(t, device):
    return t if device.type == "cpu" else t.to(device)


# -- the safetensors-shaped API ------------------------------------------------------


_FRAMEWORKS = {"pt": "pt", "torch": "pt", "pytorch": "pt", "np": "numpy", "numpy": "numpy"}
_BACKENDS = ("mmap", "pread")


def _device(device, where):
    """safetensors' device argument (str, int = a CUDA index, or a
    torch.device) as a torch.device this machine has."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InvalidArgumentError(
            f"device={device!r}: pass 'cpu', 'cuda', 'cuda:N' or a CUDA index")
    if isinstance(device, int):
        if device < 0:
            raise InvalidArgumentError(f"device={device}: a CUDA index is >= 0")
        device = f"cuda:{device}"
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidArgumentError(f"device={device!r} is not a device torch knows ({e})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise CudaError(f"{where}: device '{d}' asks for CUDA, but CUDA is not available "
                            "here (torch.cuda.is_available() is False); pass device='cpu' "
                            "to load on the CPU")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CudaError(f"{where}: device '{d}' asks for CUDA device {d.index}, but this "
                            f"machine has {torch.cuda.device_count()} CUDA device(s); pass "
                            "device='cuda:0'")
    elif d.type == "cpu":
        if d.index not in (None, 0):  # torch takes "cpu:1" for the CPU; safetensors refuses it
            raise InvalidArgumentError(f"{where}: device '{d}': there is one CPU device; "
                                       "pass device='cpu' (or 'cuda:N' for a GPU)")
    elif d.type != "meta":
        raise UnsupportedError(f"{where}: ckpt cannot place tensors on device '{d}' (it "
                               "places them on 'cpu', 'meta' or CUDA devices); pass "
                               f"device='cpu' and move them with .to('{d}')")
    return d


class safe_open:  # noqa: N801 - safetensors' name, for a drop-in import
    """safetensors.safe_open for ckpt, .pth and .safetensors files:

        with ckpt.safe_open("model.ckpt", framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
            rows = f.get_slice("embed.weight")[:, :128]

    framework "pt" gives torch tensors, "numpy" (or "np") numpy arrays;
    another ("tf", "jax"...) is an InvalidArgumentError at open (safetensors
    fails at the first get_tensor). A missing name is a ckpt.NotFoundError
    (a KeyError; safetensors raises its SafetensorError), a name that is
    not a str a TypeError.
    device is "cpu", "cuda", "cuda:N", a CUDA index (int) or "meta";
    CUDA missing is a ckpt.CudaError when opening, another device type
    ("mps", "xpu"...) a ckpt.UnsupportedError, "cpu:1" an
    InvalidArgumentError. With backend="mmap" (the default) CPU tensors
    are zero-copy views of a private mapping of the file, as safetensors'
    are of its mapping; with "pread" each get_tensor, get_slice[...] and
    get_tensors gives copies of its own, as safetensors' pread does.
    """

    def __init__(self, filename, framework="pt", device="cpu", *, backend="mmap"):
        filename = os.fspath(filename)
        if framework not in _FRAMEWORKS:
            raise InvalidArgumentError(
                f"framework={framework!r}: ckpt.safe_open gives 'pt' (torch) tensors or "
                "'numpy' arrays")
        if backend not in _BACKENDS:
            raise InvalidArgumentError(f"backend={backend!r}: 'mmap' or 'pread'")
        self._framework = _FRAMEWORKS[framework]
        self._device = _device(device, filename)
        if self._framework == "numpy" and self._device.type != "cpu":
            raise InvalidArgumentError(f"framework='numpy' holds CPU arrays, not device "
                                       f"'{self._device}'")
        self._mmap = backend == "mmap"
        self._f = open(filename)

    # -- lifetime ---------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def _file(self):
        self._f._reader()  # ValueError when closed
        return self._f

    # -- names --------------------------------------------------------------------------
    def _path(self, name):
        """The tensor path of a name: its escaped form when that is a
        tensor (a key of the root dict), else the name as a path."""
        f = self._file()
        if not isinstance(name, str):  # safetensors' TypeError too
            raise TypeError(f"tensor names are str, not {type(name).__name__} ({name!r})")
        if "/" in name and name in f:  # a nested path: its only spelling (_names)
            return name
        p = _escape(name)
        if p in f:
            return p
        if "~1" in name and name in f and _unescape(name) in f:
            return name  # a key that keeps its escaped form (_names)
        return self._missing(name)

    def _missing(self, name):
        raise NotFoundError(f"{self._f.path}: not found: no tensor named {name!r}")

    def keys(self):
        """The tensor names, sorted."""
        f = self._file()
        if isinstance(f, SafetensorsFile):
            return sorted(_names(f.keys()))
        with _errors(f):
            paths = f._reader().paths()  # str only, no records: fast on 10k tensors
        return sorted(_names(paths))

    def offset_keys(self):
        """The tensor names in the order of their bytes in the file."""
        return _names(_offset_paths(self._file()))

    def metadata(self):
        """The file's metadata (str -> str), or None when it has none. A
        .safetensors file's as safetensors gives it ({} when saved with
        metadata={}); a ckpt file stores {} as none."""
        f = self._file()
        if isinstance(f, SafetensorsFile):
            m = f._st.metadata()
            return None if m is None else dict(m)
        m = f.metadata
        return dict(m) if m else None

    # -- tensors ------------------------------------------------------------------------
    def _out(self, t):
        """A CPU view of the mapping, as the caller asked for it: a copy of
        its own with backend="pread" (as safetensors' pread reads give),
        a numpy array, or moved to the device."""
        if self._framework == "numpy" or self._device.type == "cpu":
            if not self._mmap:
                t = t.clone()
            return t.numpy() if self._framework == "numpy" else t
        return _to(t, self._device)

    def _view(self, name):
        """The CPU tensor of a name: a plain tensor (never a Parameter, as
        in safetensors), a view of the mapping."""
        f = self._file()
        p = self._path(name)
        if isinstance(f, SafetensorsFile):
            return f[p]
        with _errors(f):
            return f._cpu.view(f._record(p))

    def get_tensor(self, name):
        """The whole tensor `name` on the device (a view of the mapping on the CPU)."""
        return self._out(self._view(name))

    def get_slice(self, name):
        """A lazy handle on tensor `name`: get_shape(), get_dtype(), and
        [index] with torch's indexing (ints, slices with positive steps,
        ..., None, tuples; only the bytes indexed are read)."""
        f = self._file()
        p = self._path(name)
        with _errors(f):
            shape, dtype = _info(f, p)
        return _SafeSlice(self, name, shape, dtype)

    def get_tensors(self):
        """Every tensor as {name: tensor}, in file order (load_file's result)."""
        f = self._file()
        tensors = _tensors(f, torch.device("cpu") if self._framework == "numpy"
                           else self._device, self._mmap)
        out = dict(zip(_names(list(tensors)), tensors.values()))
        if self._framework == "numpy":
            out = {k: t.numpy() for k, t in out.items()}
        return out


class _SafeSlice:
    """safetensors' PySafeSlice: shape and dtype from the header; indexing
    reads only what it selects (a view of the mapping, then placed)."""

    def __init__(self, owner, name, shape, dtype):
        self._owner = owner
        self._name = name
        self._shape = shape
        self._dtype = dtype

    def get_shape(self):
        """The shape, as safetensors counts it (float4_e2m1fn_x2: values, two a byte)."""
        shape = list(self._shape)
        if self._dtype == _PACKED_X2 and shape:
            shape[-1] *= 2
        return shape

    def get_dtype(self):
        """safetensors' dtype code ("F32", "BF16", "F8_E4M3"...); ckpt's
        dtype name for one safetensors has no code for ("complex128")."""
        return _ST_DTYPES.get(self._dtype, self._dtype)

    def __getitem__(self, index):
        return self._owner._out(self._owner._view(self._name)[index])


def _check_tensors(tensors):
    """safetensors.save_file's refusals, with ckpt's messages."""
    if not isinstance(tensors, dict):
        raise InvalidArgumentError(
            f"save_file takes a dict of str -> torch.Tensor, not {type(tensors).__name__}")
    for k, v in tensors.items():
        if not isinstance(k, str):
            raise TypeError(f"save_file: key {k!r} is a {type(k).__name__}; tensor names "
                            "are str (ckpt.save stores other keys)")
        if not isinstance(v, torch.Tensor):
            raise InvalidArgumentError(
                f"save_file: '{k}' is a {type(v).__name__}, not a torch.Tensor "
                "(ckpt.save stores any value)")
        if v.layout != torch.strided:
            raise InvalidArgumentError(
                f"save_file: '{k}' is a sparse tensor ({v.layout}); save t.to_dense()")


def _check_metadata(metadata):
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str to str, not {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must be a dict of str to str: {k!r}: {v!r} is "
                            f"{type(k).__name__} -> {type(v).__name__}")


def save_file(tensors, filename, metadata=None, *, sync=True):
    """safetensors.torch.save_file, writing a ckpt file (atomic, checksummed;
    sync=False skips the fsyncs). Refuses what safetensors refuses - not a
    dict, a non-str name, a value that is not a tensor, a sparse tensor,
    metadata that is not str -> str - but stores shared and non-contiguous
    tensors as they are (ckpt keeps storage sharing and strides), which
    safetensors refuses: code written for safetensors never passes them.
    ckpt.load(filename) gives the dict back."""
    from ._save import _save_file
    _check_tensors(tensors)
    _check_metadata(metadata)
    # Holds SIGINT from the commit until this frame is gone (ckpt.save's rule).
    _deferred = _save_file(dict(tensors), os.fspath(filename), metadata, sync)  # noqa: F841


def load_file(filename, device="cpu", *, backend="mmap"):
    """safetensors.torch.load_file for ckpt, .pth and .safetensors files:
    {name: tensor} on `device`. backend="mmap" (the default) gives CPU
    tensors that are views of a private mapping, as safetensors does;
    "pread" gives copies (one parallel batched read)."""
    with safe_open(filename, framework="pt", device=device, backend=backend) as f:
        return f.get_tensors()


def _storage_key(t):
    return (t.device, t.untyped_storage().data_ptr() if hasattr(t, "untyped_storage")
            else t.storage().data_ptr())


def _storage_nbytes(t):
    if hasattr(t, "untyped_storage"):
        return t.untyped_storage().nbytes()
    return t.storage().size() * t.element_size()


def _end(t):
    return t.data_ptr() + t.numel() * t.element_size()


def _tied_names(state_dict, preferred=()):
    """{kept name: [names tied to it]} for tensors of a state dict that
    share memory, as safetensors' _remove_duplicate_names chooses them: of
    the names covering their whole storage, the first sorted one (a name
    in `preferred` first). Overlapping tensors are tied; disjoint views of
    one storage are not."""
    groups = {}
    for k, v in state_dict.items():
        if v.device.type == "meta" or _storage_nbytes(v) == 0:
            continue
        key = _storage_key(v)
        if key[1] == 0:
            continue
        groups.setdefault(key + (_storage_nbytes(v),), set()).add(k)
    tied = []
    for names in sorted(groups.values(), key=sorted):
        if len(names) < 2:
            continue
        areas = sorted((state_dict[n].data_ptr(), _end(state_dict[n]), n) for n in names)
        current, stop = {areas[0][2]}, areas[0][1]
        for start, end, n in areas[1:]:
            if start >= stop:
                tied.append(current)
                current = {n}
            else:
                current.add(n)
            stop = end
        tied.append(current)
    out = {}
    preferred = set(preferred)
    for names in tied:
        if len(names) < 2:
            continue
        complete = {n for n in names if _complete(state_dict[n])}
        if not complete:
            raise RuntimeError(
                f"load_model: the model's tensors {sorted(names)} share memory but none "
                "covers its whole storage, so none can stand for the others (as "
                "safetensors refuses them)")
        keep = sorted(complete & preferred)[0] if complete & preferred else sorted(complete)[0]
        out[keep] = [n for n in sorted(names) if n != keep]
    return out


def _complete(t):
    base = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
    return t.data_ptr() == base.data_ptr() and t.numel() * t.element_size() == \
        _storage_nbytes(t)


def save_model(model, filename, metadata=None, force_contiguous=True, *, sync=True):
    """safetensors.torch.save_model: model.state_dict() to a ckpt file.

    Tied weights (one tensor under several names, e.g. an embedding shared
    with the output layer) are kept under every name and stored once: ckpt
    stores shared storage natively, so, unlike safetensors, no name is
    dropped and no metadata entry records one; ckpt.load and load_file give
    the whole state dict back, tied tensors sharing memory again.
    force_contiguous=True (safetensors 0.8's default) packs non-contiguous
    tensors first, one copy per tensor however many names it has; a tensor
    that other names view differently (w and w.t()) keeps its strides, so
    the tie survives. With False strides are stored as they are."""
    state_dict = model.state_dict()
    if force_contiguous:
        state_dict = _packed(state_dict)
    save_file(state_dict, filename, metadata=metadata, sync=sync)


def _view_key(t):
    return (t.dtype, t.storage_offset(), tuple(t.shape), t.stride())


def _packed(state_dict):
    """force_contiguous: each non-contiguous tensor as one contiguous copy,
    shared by every name of that tensor (a tie stays a tie). A tensor whose
    storage other names view differently (w and w.t()) is kept as it is:
    packing it would part it from them, and ckpt stores strides."""
    def storage(t):
        key = _storage_key(t)
        return key if key[1] != 0 else ("alone", id(t))  # meta, empty: no sharing

    views = {}
    for v in state_dict.values():
        views.setdefault(storage(v), set()).add(_view_key(v))
    copies = {}
    out = {}
    for k, v in state_dict.items():
        where = storage(v)
        if v.is_contiguous() or len(views[where]) > 1:
            out[k] = v
            continue
        key = (where, _view_key(v))
        if key not in copies:
            copies[key] = v.contiguous()
        out[k] = copies[key]
    return out


def _same_view(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _placed_alike(file_sd, model_sd, keep, name):
    """Whether the file's tensor `name` views the file's `keep` as the
    model's `name` views the model's `keep`: one storage, and either the
    same tensor in both (a tie; its strides may differ from the model's
    after force_contiguous) or the same byte offset between them with the
    same shapes and strides (a buffer viewing part of another).
    load_state_dict then copies into the model's view what it already
    copied with `keep`, so the model ends up holding the file's values."""
    a, b = file_sd[name], file_sd[keep]
    ma, mb = model_sd[name], model_sd[keep]
    if a.device != b.device or _storage_key(a) != _storage_key(b):
        return False
    if _same_view(a, b) and _same_view(ma, mb):
        return True
    return (a.data_ptr() - b.data_ptr() == ma.data_ptr() - mb.data_ptr()
            and a.element_size() == ma.element_size() == b.element_size()
            == mb.element_size() and a.shape == ma.shape and a.stride() == ma.stride()
            and b.stride() == mb.stride())


def load_model(model, filename, strict=True, device="cpu", *, backend="mmap"):
    """safetensors.torch.load_model: loads a file (ckpt, .pth or
    .safetensors) into `model`; returns (missing, unexpected) as safetensors
    does: missing, a set of the model's names the file did not fill;
    unexpected, a list of the file's names the model did not take. A tied
    name the file lacks (safetensors' save_model drops all but one) is not
    missing; a tied name the file holds as a separate tensor is unexpected,
    as in safetensors; one it holds sharing memory with the kept name at
    the place the model's does (as ckpt.save_model writes it: a tied
    weight, a buffer viewing part of another) is neither. strict=True raises RuntimeError
    (torch's message form) when either is non-empty."""
    state_dict = load_file(filename, device=device, backend=backend)
    model_sd = model.state_dict()
    tied = _tied_names(model_sd, preferred=state_dict.keys())
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = set(missing)
    for keep, names in tied.items():
        for n in names:
            if n in missing:
                missing.remove(n)
            elif not (n in state_dict and keep in state_dict
                      and _placed_alike(state_dict, model_sd, keep, n)):
                unexpected.append(n)
    if strict and (missing or unexpected):
        error = f"Error(s) in loading state_dict for {model.__class__.__name__}:"
        if missing:
            error += "\n    Missing key(s) in state_dict: " + ", ".join(
                f'"{k}"' for k in sorted(missing))
        if unexpected:
            error += "\n    Unexpected key(s) in state_dict: " + ", ".join(
                f'"{k}"' for k in sorted(unexpected))
        raise RuntimeError(error)
    return missing, unexpected


__all__ = ["open", "safe_open", "save_file", "load_file", "save_model", "load_model",
           "PthFile", "SafetensorsFile"]
