"""One record from a stream: exactly the bytes of one saved file, so that
ckpt.load(f) leaves `f` just after it (several saves in one stream load
back one by one, as with torch.load).

  ckpt         the preamble says how long the file is
  safetensors  8-byte header length, JSON header, data up to the last end
  legacy .pth  five pickles, then each storage as an int64 count and its
               bytes: the pickles are walked by pickletools (parsed, never
               run) to learn each storage's element size
  zip .pth     its end is only known from its central directory at the very
               end: the rest of the stream is the record

Nothing here trusts a length before bounding it by what the stream holds:
bytes are read in pieces, so a hostile length costs no big allocation.
"""
import json
import pickletools
import struct

from . import _ckpt
from ._errors import FormatError, PickleRefusedError
from ._load import sniff_bytes

_PIECE = 16 << 20

# Storage classes of legacy persistent ids -> bytes per element.
_ELEMENT_SIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
    "ByteStorage": 1, "BoolStorage": 1, "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8, "QInt8Storage": 1, "QUInt8Storage": 1, "QInt32Storage": 4,
    "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1,
}


def stream_name(f):
    """What errors call a file object: its file name, else "<stream>"."""
    name = getattr(f, "name", None)
    return name if isinstance(name, str) and name else "<stream>"


class _Source:
    """Reads from a file object, keeping every byte read: `data` is the
    record so far, `pos` how much of it has been parsed."""

    def __init__(self, f, name):
        self.f = f
        self.name = name
        self.data = bytearray()
        self.pos = 0

    def _fill(self, end):
        while len(self.data) < end:
            chunk = self.f.read(min(_PIECE, end - len(self.data)))
            if not chunk:
                return
            self.data += chunk

    def read(self, n):
        """The next n bytes (fewer only at the end of the stream)."""
        self._fill(self.pos + n)
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    def exact(self, n, what):
        at = self.pos
        got = self.read(n)
        if len(got) != n:
            raise FormatError(f"{self.name}: truncated: {what} needs {n} bytes at offset "
                              f"{at}, the stream ends after {len(got)}")
        return got

    def rest(self):
        while self.read(_PIECE):
            pass

    def readline(self):
        out = bytearray()
        while True:
            c = self.read(1)
            out += c
            if not c or c == b"\n":
                return bytes(out)


def read_record(f, name):
    """(kind, bytes) of the next saved file in `f`: kind is 'ckpt', 'pth',
    'safetensors' or None (unknown: the rest of the stream)."""
    src = _Source(f, name)
    src._fill(9)
    head = bytes(src.data[:9])
    kind = sniff_bytes(head)
    if kind == "ckpt":
        _ckpt_record(src)
    elif kind == "pth" and head[:1] == b"\x80":
        _legacy_record(src)
    elif kind == "safetensors":
        _safetensors_record(src)
    else:  # a zip .pth (its end is at the end), or unknown
        src.rest()
    return kind, bytes(src.data)


def _ckpt_record(src):
    src.exact(64, "the preamble")
    header_offset, header_size = struct.unpack_from("<QQ", src.data, 32)
    end = header_offset + header_size
    if end < 64:
        return  # the reader names what is wrong with this preamble
    if _ckpt.xxh3_64(bytes(src.data[:56])) != struct.unpack_from("<Q", src.data, 56)[0]:
        return  # a damaged preamble: its length means nothing; the reader says so
    src.exact(end - 64, f"the rest of the ckpt file of {end} bytes")


def _safetensors_record(src):
    n = int.from_bytes(src.exact(8, "the header size"), "little")
    if n > 100 << 20:  # safetensors' own limit on the header
        raise FormatError(f"{src.name}: safetensors header of {n} bytes (100 MiB at most)")
    src.exact(n, "the safetensors header")
    try:
        meta = json.loads(bytes(src.data[8:8 + n]))
        end = max([0] + [int(v["data_offsets"][1]) for k, v in meta.items()
                         if k != "__metadata__"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise FormatError(f"{src.name}: unreadable safetensors header ({e})") from None
    src.exact(end, "the safetensors data")


class _Global:
    def __init__(self, module, name):
        self.module, self.name = module, name


_MARK = object()
_UNKNOWN = object()
_STRINGS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
            "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}


_MAX_WALK_OPS = 1 << 22
_MAX_WALK_STACK = 1 << 20
_MAX_WALK_BYTES = 32 << 20  # the importer's max_pickle_bytes


def _walk(src, what):
    """Parses one pickle (pickletools: nothing is run or imported) and
    returns (persistent ids, the value on top at STOP when it is a list of
    str) — as far as a symbolic stack can tell."""
    stack, memo, pids = [], {}, []

    def pop_mark():
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise ValueError("MARK missing")

    def pop():
        if not stack:
            raise ValueError("stack underflow")
        return stack.pop()

    start = src.pos
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(src)):
            # This walk is pure Python and runs before the importer's own
            # bounds: cap it so that a hostile stream costs seconds and
            # MiBs, not minutes and GiBs (12 M pushes took 10 s and 900 MB).
            if count >= _MAX_WALK_OPS or len(stack) > _MAX_WALK_STACK or \
                    src.pos - start > _MAX_WALK_BYTES:
                raise PickleRefusedError(
                    f"{src.name}:{start}: legacy .pth {what} pickle is larger than this "
                    f"reader walks in a stream ({_MAX_WALK_OPS} opcodes, "
                    f"{_MAX_WALK_STACK} stack items, {_MAX_WALK_BYTES >> 20} MiB); "
                    "load it from a path, where the importer's limits apply")
            n = op.name
            if n in _STRINGS or n in _INTS:
                stack.append(arg)
            elif n == "NONE":
                stack.append(None)
            elif n in ("NEWTRUE", "NEWFALSE"):
                stack.append(n == "NEWTRUE")
            elif n == "GLOBAL":
                module, _, name = arg.partition(" ")
                stack.append(_Global(module, name))
            elif n == "STACK_GLOBAL":
                name, module = pop(), pop()
                stack.append(_Global(module, name))
            elif n == "MARK":
                stack.append(_MARK)
            elif n == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif n in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(n[-1])
                items = [pop() for _ in range(k)][::-1]
                stack.append(tuple(items))
            elif n == "EMPTY_TUPLE":
                stack.append(())
            elif n == "EMPTY_LIST":
                stack.append([])
            elif n == "LIST":
                stack.append(pop_mark())
            elif n == "APPEND":
                v = pop()
                if stack and isinstance(stack[-1], list):
                    stack[-1].append(v)
            elif n == "APPENDS":
                items = pop_mark()
                if stack and isinstance(stack[-1], list):
                    stack[-1].extend(items)
            elif n in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else _UNKNOWN
            elif n == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else _UNKNOWN
            elif n in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _UNKNOWN))
            elif n == "BINPERSID":
                pids.append(pop())
                stack.append(_UNKNOWN)
            elif n == "PERSID":
                stack.append(_UNKNOWN)
            elif n == "STOP":
                top = stack[-1] if stack else None
                keys = top if isinstance(top, list) and all(isinstance(k, str) for k in top) \
                    else None
                return pids, keys
            elif n in ("PROTO", "FRAME"):
                pass
            else:  # any other opcode: its effect on the stack's shape only
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                else:
                    for _ in before:
                        pop()
                stack.extend(_UNKNOWN for _ in op.stack_after)
    except PickleRefusedError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error) as e:
        raise FormatError(f"{src.name}:{start}: legacy .pth {what} pickle: {e}") from None
    raise FormatError(f"{src.name}:{start}: legacy .pth {what} pickle has no STOP")


def _legacy_record(src):
    for what in ("magic number", "protocol version", "sys_info"):
        _walk(src, what)
    pids, _ = _walk(src, "object")
    _, keys = _walk(src, "storage keys")
    sizes = {}
    for pid in pids:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and \
                isinstance(pid[1], _Global) and isinstance(pid[2], str):
            sizes[pid[2]] = _ELEMENT_SIZE.get(pid[1].name)
    if keys is None or any(sizes.get(k) is None for k in keys):
        src.rest()  # not a layout this walk understands: the importer decides
        return
    for k in keys:
        count = struct.unpack("<q", src.exact(8, f"the size of legacy storage '{k}'"))[0]
        if count < 0:
            raise FormatError(f"{src.name}:{src.pos - 8}: legacy storage '{k}' has "
                              f"a negative size")
        src.exact(count * sizes[k], f"legacy storage '{k}'")
