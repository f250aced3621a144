"""Moving to and from other formats: .pth (torch.save) and .safetensors."""
import argparse
import os

import torch

from . import _ckpt
from ._load import (_converted, _Loader, _open_reader, _untyped, renamed_errors,
                    resolve_target, view)
from ._save import key_object


def _load_pth(path, map_location, mmap=False, name=None, encoding="utf-8"):
    # The restricted importer (lib/pth) reads the pickle without running it;
    # anything outside its allowlist is refused with the name it found.
    # Errors name the user's file (`name`), never the temporary ones.
    name = name or path
    names = {path: name}
    with renamed_errors(names), _converted(path, encoding=encoding) as tmp:
        names[tmp] = name
        reader = _open_reader(tmp, mmap)  # the mapping outlives the file's name
        return _Loader(reader, map_location, mmap, name=name).load()


def import_pth(src, dst, *, sync=True):
    """Converts a torch.save file to a ckpt file (like `pth2ckpt SRC DST`).
    Returns the number of tensors."""
    return _ckpt.import_pth(os.fspath(src), os.fspath(dst), sync)


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("reading or writing .safetensors needs the safetensors "
                          "package (pip install safetensors)") from e
    return st


def _load_safetensors(path, map_location):
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


def convert(src, dst, *, sync=True):
    """Converts a .pth or .safetensors file to ckpt."""
    from . import _load, _save
    src, dst = os.fspath(src), os.fspath(dst)
    kind = _load.sniff(src)
    if kind == "pth":
        return import_pth(src, dst, sync=sync)
    if kind == "safetensors":
        st = _safetensors()
        with st.safe_open(src, framework="pt") as f:
            meta = f.metadata()
        tensors = st.load_file(src)
        _save.save(tensors, dst, metadata=meta, sync=sync)
        return len(tensors)
    raise ValueError(f"{src}: neither a .pth nor a .safetensors file")
