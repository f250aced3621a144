"""Hugging Face's save_pretrained layout, to and from ckpt.

    ckpt.hf.import_pretrained("tiny-llama/", "tiny-llama.ckpt")
    model = ckpt.hf.load_into(model_on_meta_device, "tiny-llama.ckpt")
    ckpt.hf.export_pretrained("tiny-llama.ckpt", "out/", max_shard_size="2GB")

A save_pretrained directory holds `model.safetensors`, or shards named by
`model.safetensors.index.json`, or (older) `pytorch_model.bin` or its
shards with `pytorch_model.bin.index.json`, beside `config.json`. Import
writes one ckpt file of the flat state dict, the config in its metadata
("hf.config"): safetensors files are read with the safetensors package,
.bin pickles through ckpt's restricted importer (nothing in them runs).
Export writes the safetensors layout transformers and accelerate read,
each file atomically. `python -m ckpt import DIR OUT.ckpt` and
`python -m ckpt export-hf IN.ckpt DIR` do the same from the shell.
"""
import json
import os
import re

import torch

from ._errors import FormatError, InvalidArgumentError, NotFoundError

__all__ = ["import_pretrained", "export_pretrained", "load_into", "state_dict"]

_ST_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG_KEY = "hf.config"


def _index(src, name):
    path = os.path.join(src, name)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not a JSON index ({e})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise FormatError(f"{path}: no weight_map of tensor names to file names")
    for k, v in wm.items():
        if os.path.basename(v) != v or v in ("", ".", ".."):
            raise FormatError(f"{path}: '{k}' names file {v!r}, not a file in {src}")
    return path, wm


def _files(src):
    """(kind, [shard paths], index path or None, weight_map or None)."""
    if not os.path.isdir(src):
        raise NotFoundError(f"{src}: not a directory (a save_pretrained directory holds "
                            "model.safetensors or pytorch_model.bin)")
    for index, kind in ((_ST_INDEX, "safetensors"), (_BIN_INDEX, "bin")):
        if os.path.exists(os.path.join(src, index)):
            path, wm = _index(src, index)
            names = sorted(set(wm.values()))
            return kind, [os.path.join(src, n) for n in names], path, wm
    for single, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if os.path.exists(os.path.join(src, single)):
            return kind, [os.path.join(src, single)], None, None
    raise NotFoundError(f"{src}: no model.safetensors, {_ST_INDEX}, pytorch_model.bin or "
                        f"{_BIN_INDEX}")


def state_dict(src):
    """The tensors of a save_pretrained directory as {name: tensor} (CPU;
    safetensors shards are mapped, not copied), and its metadata: the
    config.json text under "hf.config" and the safetensors files'
    __metadata__ entries."""
    from . import _load
    kind, paths, index, wm = _files(src)
    out, meta, where = {}, {}, {}
    for p in paths:
        if not os.path.exists(p):
            raise NotFoundError(f"{index}: names {os.path.basename(p)}, which is not in {src}")
        if kind == "safetensors":
            from .interop import _safetensors
            st = _safetensors()
            with st.safe_open(p, framework="pt") as f:
                part = {k: f.get_tensor(k) for k in f.keys()}
                meta.update(f.metadata() or {})
        else:
            part = _load.load(p, map_location="cpu")
            if not isinstance(part, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()):
                raise FormatError(f"{p}: not a state dict of tensors")
        for k, t in part.items():
            if k in out:
                raise FormatError(f"{src}: tensor '{k}' is in both {where[k]} and "
                                  f"{os.path.basename(p)}")
            if wm is not None and wm.get(k) != os.path.basename(p):
                raise FormatError(f"{p}: holds '{k}', which {os.path.basename(index)} places "
                                  f"in {wm.get(k)!r}")
            out[k] = t
            where[k] = os.path.basename(p)
    if wm is not None:
        missing = sorted(set(wm) - set(out))
        if missing:
            raise FormatError(f"{index}: names tensors no shard holds: "
                              f"{', '.join(missing[:5])}")
    config = os.path.join(src, "config.json")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            text = f.read()
        try:
            json.loads(text)
        except ValueError as e:
            raise FormatError(f"{config}: not JSON ({e})") from None
        meta[CONFIG_KEY] = text
    return out, meta


def import_pretrained(src, dst, *, sync=True):
    """Writes the save_pretrained directory `src` as the ckpt file `dst`
    (atomically). Returns the number of tensors."""
    from ._save import save
    sd, meta = state_dict(os.fspath(src))
    save(sd, os.fspath(dst), metadata=meta, sync=sync)
    return len(sd)


def _size(s):
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(s), re.IGNORECASE)
    if not m:
        raise InvalidArgumentError(f"max_shard_size {s!r}: a byte count or '5GB', '500MiB'")
    n, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(n * scale)


def _write_atomic(path, write):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_pretrained(src, dst_dir, *, max_shard_size="5GB"):
    """Writes the tensors of the ckpt file `src` (a flat state dict, as
    import_pretrained makes) to `dst_dir` in the save_pretrained safetensors
    layout: model.safetensors, or shards of at most max_shard_size ("5GB",
    "500MiB", bytes) named model-00001-of-0000N.safetensors with
    model.safetensors.index.json; config.json from the file's "hf.config".
    Returns the list of files written."""
    from ._load import File
    from .interop import _safetensors
    _safetensors()  # ImportError naming the package when it is missing
    from safetensors.torch import save_file
    limit = _size(max_shard_size)
    if limit <= 0:
        raise InvalidArgumentError(f"max_shard_size {max_shard_size!r} must be positive")
    f = File(os.fspath(src))
    names = f.keys()
    tensors = {}
    for n in names:
        if "/" in n:
            raise InvalidArgumentError(f"{src}: tensor '{n}' is nested; export takes a flat "
                                       "state dict (import_pretrained's, or ckpt.flatten's)")
        tensors[n] = f[n]
    meta = f.metadata or {}
    # Shards in name order, each up to the limit (one tensor over it alone).
    shards, cur, size = [], {}, 0
    for n in sorted(tensors):
        nb = tensors[n].numel() * tensors[n].element_size()
        if cur and size + nb > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[n] = tensors[n]
        size += nb
    if cur or not shards:
        shards.append(cur)
    os.makedirs(dst_dir, exist_ok=True)
    written, seen = [], set()

    def owned(t):
        # safetensors refuses tensors sharing memory (tied weights).
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return t.clone()
        seen.add(key)
        return t.contiguous()
    st_meta = {"format": "pt"}
    if len(shards) == 1:
        path = os.path.join(dst_dir, "model.safetensors")
        part = {k: owned(v) for k, v in shards[0].items()}
        _write_atomic(path, lambda p: save_file(part, p, metadata=st_meta))
        written.append(path)
    else:
        wm, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = {k: owned(v) for k, v in shard.items()}
            path = os.path.join(dst_dir, name)
            _write_atomic(path, lambda p: save_file(part, p, metadata=st_meta))
            written.append(path)
            for k, v in shard.items():
                wm[k] = name
                total += v.numel() * v.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}
        path = os.path.join(dst_dir, _ST_INDEX)
        _write_atomic(path, lambda p: open(p, "w").write(json.dumps(index, indent=2) + "\n"))
        written.append(path)
    if CONFIG_KEY in meta:
        path = os.path.join(dst_dir, "config.json")
        _write_atomic(path, lambda p: open(p, "w", encoding="utf-8").write(meta[CONFIG_KEY]))
        written.append(path)
    return written


def load_into(model, src, *, strict=True):
    """Loads the ckpt file `src` (or a save_pretrained directory) into
    `model`, a torch.nn.Module, by load_state_dict(assign=True): a model
    built on the meta device (transformers' `init_empty_weights`, or
    `torch.device("meta")`) gets the file's tensors as its parameters,
    zero-copy views of the mapping. Tied weights are tied again
    (`model.tie_weights()` where the model has it). Returns the model."""
    from ._load import load
    src = os.fspath(src)
    sd = state_dict(src)[0] if os.path.isdir(src) else load(src, mmap=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError(f"{src}: not a flat state dict of tensors")
    result = model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    # What the file lacks is fine only when tied to what it has; anything
    # still on the meta device is not loaded.
    left = [n for n, t in list(model.named_parameters(remove_duplicate=False)) +
            list(model.named_buffers(remove_duplicate=False)) if t.is_meta]
    if strict and (left or result.unexpected_keys):
        hint = (" (buffers outside the state dict, such as rotary inv_freq, stay on the meta "
                "device: build the model with accelerate's init_empty_weights(), which keeps "
                "buffers real)") if left and not set(left) & set(result.missing_keys) else ""
        raise InvalidArgumentError(
            f"{src}: does not fit the model: not loaded {left[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}{hint}")
    return model
