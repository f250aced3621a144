"""Moving to and from other formats: .pth (torch.save) and .safetensors."""
import argparse
import os

import torch

from . import _ckpt, _progress
from ._load import (_converted, _Loader, _open_reader, _untyped, renamed_errors,
                    resolve_target, view)
from ._save import key_object


class _TwoPass:
    """One progress report over a conversion and what follows it: the
    importer's (done, total) calls move the first part; the Reporter is
    made at its first call, expecting as many bytes again for the second
    (a load of the converted file; `second=False`: none)."""

    def __init__(self, progress, desc, second=True):
        self.progress, self.desc, self.second = progress, desc, second
        self.rep = None

    def __call__(self, done, total):
        if self.rep is None:
            self.rep = _progress.reporter(self.progress, total * (2 if self.second else 1),
                                          self.desc)
        self.rep.at(done)

    def reporter(self):
        """The Reporter for the second part (made now if the importer never
        called: a file without storages)."""
        if self.rep is None:
            self.rep = _progress.reporter(self.progress, 0, self.desc)
        return self.rep

    def abandon(self):
        if self.rep is not None:
            self.rep.abandon()


def _load_pth(path, map_location, mmap=False, name=None, encoding="utf-8", progress=False):
    # The restricted importer (lib/pth) reads the pickle without running it;
    # anything outside its allowlist is refused with the name it found.
    # Errors name the user's file (`name`), never the temporary ones.
    name = name or path
    names = {path: name}
    two = None
    if progress is not None and progress is not False:
        _progress.check(progress)
        two = _TwoPass(progress, _progress.describe("ckpt.load", name))
    try:
        with renamed_errors(names), _converted(path, encoding=encoding, progress=two) as tmp:
            names[tmp] = name
            reader = _open_reader(tmp, mmap)  # the mapping outlives the file's name
            loader = _Loader(reader, map_location, mmap, name=name)
            return loader.load(progress=two.reporter() if two else None)
    except BaseException:
        if two is not None:
            two.abandon()
        raise


def import_pth(src, dst, *, sync=True, progress=False):
    """Converts a torch.save file to a ckpt file (like `pth2ckpt SRC DST`).
    Returns the number of tensors. progress= as in ckpt.load: True for a
    bar, or a callable(done_bytes, total_bytes) (bytes of storage
    converted)."""
    return _import_pth(src, dst, sync, progress, "ckpt.import_pth")


def _import_pth(src, dst, sync, progress, what):
    two = None
    if progress is not None and progress is not False:
        _progress.check(progress)
        two = _TwoPass(progress, _progress.describe(what, src), second=False)
    try:
        n = _ckpt.import_pth(os.fspath(src), os.fspath(dst), sync, "utf-8", two)
    except BaseException:
        if two is not None:
            two.abandon()
        raise
    if two is not None:
        two.reporter().close()
    return n


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("reading or writing .safetensors needs the safetensors "
                          "package (pip install safetensors)") from e
    return st


def _safetensors_bytes(head, size):
    """The bytes after a safetensors header (its tensors), from the file's
    first 8 bytes (the header's length) and its size."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    return max(0, size - 8 - n)


def _load_safetensors(path, map_location, progress=False):
    if progress is None or progress is False:
        return _place_safetensors(_safetensors().load_file(path, device="cpu"), map_location)
    # safetensors reads the file in one call: the bar moves at its end.
    with open(path, "rb") as f:
        total = _safetensors_bytes(f.read(8), os.fstat(f.fileno()).st_size)
    rep = _progress.reporter(progress, total, _progress.describe("ckpt.load", path))
    with rep.closing():
        return _place_safetensors(_safetensors().load_file(path, device="cpu"), map_location)


def _place_safetensors(out, map_location):
    """Moves the CPU tensors of a safetensors file where map_location says
    (they were saved on no device: their location is "cpu")."""
    target = resolve_target(map_location, "cpu")
    moved = {}
    for k, t in out.items():
        if target is None:  # callable(storage, location) -> storage or None
            s = map_location(_untyped(t), "cpu")
            moved[k] = t if s is None else view(s, t.dtype, t.storage_offset(), t.shape, t.stride())
        else:
            moved[k] = t if target == "cpu" else t.to(target)
    return moved


def flatten(tree, prefix=""):
    """{tensor path: tensor} for every tensor of a nested dict/list/tuple,
    named as ckpt.save's file names them (docs/FORMAT.md 7.2: "model/fc.weight",
    "opt/state/0/exp_avg"; a key's path form, 7.3: (1, 'a') is "(1,a)").
    `prefix` (a path, not escaped) goes before every path. TypeError or
    ValueError for a key ckpt.save could not store."""
    def children(x, path, at_root):
        if isinstance(x, argparse.Namespace):
            x = vars(x)
        if isinstance(x, dict):
            for k, v in x.items():
                yield v, _ckpt.child_path(path, at_root, _ckpt.key_segment(k, key_object))
        else:
            for i, v in enumerate(x):
                yield v, _ckpt.child_path(path, at_root, str(i))

    def nested(x):
        return isinstance(x, (dict, list, tuple, argparse.Namespace))

    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    out = {}
    # An explicit stack: any depth ckpt.save takes, under Python's recursion limit.
    stack = [children(tree, prefix, not prefix)] if nested(tree) else []
    while stack:
        for v, path in stack[-1]:
            if isinstance(v, torch.Tensor):
                out[path] = v
            elif nested(v):
                stack.append(children(v, path, False))
                break
        else:
            stack.pop()
    return out


def save_safetensors(tree, path, metadata=None):
    """Writes every tensor of `tree` (a state dict, or any nesting of
    dicts/lists) to a .safetensors file under its tensor path, for tools
    that only read safetensors. Tensors that share memory are cloned
    (safetensors refuses shared storage); non-tensor values are dropped, so
    use ckpt.save for whole training states."""
    st = _safetensors()
    flat = flatten(tree)
    seen = set()
    for k, t in flat.items():
        t = t.detach()
        key = (t.device, _untyped(t).data_ptr())
        if key in seen or not t.is_contiguous() or t.storage_offset() != 0 or \
                _untyped(t).nbytes() != t.numel() * t.element_size():
            t = t.clone().contiguous()
        seen.add(key)
        flat[k] = t.cpu()
    st.save_file(flat, os.fspath(path), metadata=metadata)


def convert(src, dst, *, sync=True, progress=False):
    """Converts a .pth or .safetensors file to ckpt. progress= as in
    ckpt.load (for a .safetensors file: the bytes written)."""
    from . import _load, _save
    src, dst = os.fspath(src), os.fspath(dst)
    _progress.check(progress)
    kind = _load.sniff(src)
    if kind == "pth":
        return _import_pth(src, dst, sync, progress, "ckpt.convert")
    if kind == "safetensors":
        st = _safetensors()
        with st.safe_open(src, framework="pt") as f:
            meta = f.metadata()
        tensors = st.load_file(src)
        # As save() does: SIGINT held from the commit until this returns.
        _deferred = _save._save_file(tensors, dst, meta, sync, progress,  # noqa: F841
                                     _progress.describe("ckpt.convert", src))
        return len(tensors)
    raise ValueError(f"{src}: neither a .pth nor a .safetensors file")
