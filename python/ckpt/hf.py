"""Hugging Face's save_pretrained layout, to and from ckpt.

    ckpt.hf.import_pretrained("tiny-llama/", "tiny-llama.ckpt")
    model = ckpt.hf.load_into(model_on_meta_device, "tiny-llama.ckpt")
    ckpt.hf.export_pretrained("tiny-llama.ckpt", "out/", max_shard_size="2GB")

A save_pretrained directory holds `model.safetensors`, or shards named by
`model.safetensors.index.json`, or (older) `pytorch_model.bin` or its
shards with `pytorch_model.bin.index.json`, beside `config.json`; they are
taken in that order, transformers' own. Import and export are the C++
library's (ckpt/hf.h), the same code as `ckpt import DIR OUT.ckpt` and
`ckpt export-hf IN.ckpt DIR`: import writes one ckpt file of the flat
state dict, the config in its metadata ("hf.config"), every safetensors
header checked as safetensors checks it and .bin pickles read by ckpt's
restricted importer (nothing in them runs); export writes the safetensors
layout transformers and accelerate read, every file complete before any
is renamed into place, an earlier export's stale weight files removed.
Neither needs the safetensors package; load_into of a directory does.
"""
import json
import os

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
    # transformers' order (and ImportHfDir's): a single file before an index.
    for name, kind in (("model.safetensors", "safetensors"), (_ST_INDEX, "safetensors"),
                       ("pytorch_model.bin", "bin"), (_BIN_INDEX, "bin")):
        if not _regular(os.path.join(src, name)):
            continue
        if not name.endswith(".json"):
            return kind, [os.path.join(src, name)], None, None
        path, wm = _index(src, name)
        names = sorted(set(wm.values()))
        return kind, [os.path.join(src, n) for n in names], path, wm
    raise NotFoundError(f"{src}: no model.safetensors, {_ST_INDEX}, pytorch_model.bin or "
                        f"{_BIN_INDEX}")


def _regular(path):
    """True for a regular file; False when nothing is there; FormatError
    for anything else (a FIFO would block the read, a directory fail it)."""
    if os.path.isfile(path):
        return True
    if os.path.lexists(path):
        raise FormatError(f"{path}: not a regular file (a directory, FIFO, device or "
                          "dangling link)")
    return False


def state_dict(src):
    """The tensors of a save_pretrained directory as {name: tensor} (CPU;
    safetensors shards are mapped, not copied), and its metadata: the
    config.json text under "hf.config" and the safetensors files'
    __metadata__ entries. (For load_into; importing to a ckpt file is
    ImportHfDir's, in C++.)"""
    from . import _load
    kind, paths, index, wm = _files(src)
    out, meta, where = {}, {}, {}
    for p in paths:
        if not _regular(p):
            raise NotFoundError(f"{index}: names {os.path.basename(p)}, which is not in {src}")
        if kind == "safetensors":
            from .interop import _safetensors
            st = _safetensors()
            try:
                with st.safe_open(p, framework="pt") as f:
                    part = {k: f.get_tensor(k) for k in f.keys()}
                    meta.update(f.metadata() or {})
            except Exception as e:  # noqa: BLE001 - SafetensorError and kin
                raise FormatError(f"{p}: not a safetensors file safetensors reads ({e})") \
                    from None
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
    if _regular(config):
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
    from . import _ckpt
    return _ckpt.import_hf(os.fspath(src), os.fspath(dst), sync)


def _size(s):
    from . import _ckpt
    if isinstance(s, bool) or not isinstance(s, (int, str)):
        raise InvalidArgumentError(f"max_shard_size {s!r}: a byte count or '5GB', '500MiB'")
    if isinstance(s, int):
        if not 0 < s < 2**63:
            raise InvalidArgumentError(f"max_shard_size {s!r} must be between 1 and 2**63 - 1")
        return s
    return _ckpt.parse_byte_size(s)


def export_pretrained(src, dst_dir, *, max_shard_size="5GB", sync=True):
    """Writes the tensors of the ckpt file `src` (a flat state dict, as
    import_pretrained makes) to `dst_dir` in the save_pretrained safetensors
    layout: model.safetensors, or shards of at most max_shard_size ("5GB",
    "500MiB", bytes) named model-00001-of-0000N.safetensors with
    model.safetensors.index.json; config.json from the file's "hf.config".
    Non-tensor values are left out. Returns the list of files written."""
    from . import _ckpt
    files, _dropped = _ckpt.export_hf(os.fspath(src), os.fspath(dst_dir),
                                      _size(max_shard_size), sync)
    return files


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
    # What the file lacks is fine only when tied to what it has (the same
    # tensor after tie_weights); anything else missing is not loaded -
    # left on the meta device, or, on a real model, left at its init.
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    loaded = {id(named[k]) for k in sd if k in named}
    left = [n for n, t in named.items() if t.is_meta]
    untied = [k for k in result.missing_keys
              if k in named and id(named[k]) not in loaded and k not in left]
    if strict and (left or untied or result.unexpected_keys):
        hint = (" (buffers outside the state dict, such as rotary inv_freq, stay on the meta "
                "device: build the model with accelerate's init_empty_weights(), which keeps "
                "buffers real)") if left and not set(left) & set(result.missing_keys) else ""
        raise InvalidArgumentError(
            f"{src}: does not fit the model: not loaded {(left + untied)[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}{hint}")
    return model
