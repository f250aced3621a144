"""Writes DCP (torch.distributed.checkpoint) directories for tests/dcp_test.cc.

Run with a torch 2.x python: make_dcp.py OUT. Under OUT:
  single/        one process, nested state dict: f32/bf16/i64/bool, 0-d,
                 empty, non-tensor values (BytesStorageMetadata items)
  ranks2/ ranks4/  spawned gloo processes (file:// init), DTensors sharded
                 by rows, by columns (uneven: 6 rows on 4 ranks), a 2x2
                 grid and HSDP (replicate x shard) on a 2x2 mesh (4 ranks),
                 replicated DTensors and plain tensors
  single_st/ ranks2_st/  the same as SAFETENSORS-format files
                 (FileSystemWriter serialization_format=SAFETENSORS)
  per_item/      single/'s state dict, one file per item
                 (FileSystemWriter single_file_per_rank=False)
  proto2/ proto5/ enum_by_value/  single/ with .metadata pickled again:
                 protocols 2 and 5, and the memory-format enum as Python
                 < 3.11 pickles it (the class called with its value)
  <dir>/ref.txt  one line per tensor: fqn TAB path TAB dtype TAB shape
                 (comma-separated) TAB file of its full raw bytes (C order)
  variants/NAME/ a copy of a small DCP dir with one thing changed that the
                 reader must refuse (names in variants/expect.txt: NAME TAB
                 a substring the error must contain)
  hostile/NAME.metadata  pickles naming forbidden globals (expect.txt)
  hostile/dcp_class.pth  a torch.save file holding a DCP Metadata object,
                 which the .pth importer must still refuse
"""
import copy
import io
import os
import pickle
import shutil
import sys
import tempfile
import warnings
import zipfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

warnings.filterwarnings("ignore")


def write_ref(out, tensors):
    """tensors: fqn -> (path, tensor). Raw bytes in C order."""
    os.makedirs(os.path.join(out, "ref"), exist_ok=True)
    with open(os.path.join(out, "ref.txt"), "w") as f:
        for i, (fqn, (path, t)) in enumerate(sorted(tensors.items())):
            t = t.detach().contiguous()
            name = f"ref/{i}.bin"
            raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            with open(os.path.join(out, name), "wb") as g:
                g.write(raw.numpy().tobytes())
            dtype = str(t.dtype).replace("torch.", "")
            shape = ",".join(str(s) for s in t.shape)
            f.write(f"{fqn}\t{path}\t{dtype}\t{shape}\t{name}\n")


def writer(out, fmt):
    """None: dcp.save's default (TORCH_SAVE items, one file per rank);
    "safetensors": serialization_format=SAFETENSORS; "per_item": one file
    per item."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat
    if fmt is None:
        return None
    if fmt == "per_item":
        return FileSystemWriter(out, single_file_per_rank=False)
    return FileSystemWriter(out, serialization_format=SerializationFormat.SAFETENSORS)


def single(out, fmt=None):
    g = torch.Generator().manual_seed(1)
    model = {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "idx": torch.randint(-2**40, 2**40, (4,), generator=g),
        "mask": torch.rand(7, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "view": torch.arange(20, dtype=torch.float32)[5:11].reshape(2, 3),
    }
    sd = {"model": model, "opt": {"step": 7, "lr": 0.125, "name": "adam"},
          "lst": [1, torch.arange(3, dtype=torch.int64)],
          "a/b": torch.ones(2),
          # An optimizer's int-keyed state (planner_data has the key as '0').
          "optim": {"state": {0: {"exp_avg": torch.full((2, 2), 3.0)}}}}
    dcp.save(sd, checkpoint_id=out, storage_writer=writer(out, fmt))
    refs = {f"model.{k}": (f"model/{k}", v) for k, v in model.items()}
    refs["lst.1"] = ("lst/1", sd["lst"][1])
    refs["a/b"] = ("a~1b", sd["a/b"])
    refs["optim.state.0.exp_avg"] = ("optim/state/0/exp_avg",
                                     sd["optim"]["state"][0]["exp_avg"])
    write_ref(out, refs)


def full_tensors(world):
    g = torch.Generator().manual_seed(100 + world)
    t = {
        "rows": torch.randn(8, 6, generator=g),
        "cols": torch.randn(6, 10, generator=g).to(torch.bfloat16),
        "uneven": torch.randint(0, 1000, (6, 3), generator=g),
        "repl": torch.randn(5, generator=g),
        "mask": torch.rand(world * 3, 2, generator=g) > 0.5,
        "plain": torch.arange(7, dtype=torch.int64),
    }
    if world == 4:
        t["grid"] = torch.randn(6, 8, generator=g)
        t["hsdp"] = torch.randn(4, 3, generator=g).to(torch.bfloat16)
    return t


def rank_main(rank, world, init, out, fmt):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    t = full_tensors(world)
    sd = {
        "rows": distribute_tensor(t["rows"], mesh, [Shard(0)]),
        "cols": distribute_tensor(t["cols"], mesh, [Shard(1)]),
        "uneven": distribute_tensor(t["uneven"], mesh, [Shard(0)]),
        "repl": distribute_tensor(t["repl"], mesh, [Replicate()]),
        "nested": {"mask": distribute_tensor(t["mask"], mesh, [Shard(0)]),
                   "plain": t["plain"].clone()},
        "step": 3,
    }
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2))
        sd["grid"] = distribute_tensor(t["grid"], mesh2, [Shard(0), Shard(1)])
        # FSDP x replicas (HSDP): each row block held by two ranks.
        sd["hsdp"] = distribute_tensor(t["hsdp"], mesh2, [Replicate(), Shard(0)])
    dcp.save(sd, checkpoint_id=out, storage_writer=writer(out, fmt))
    dist.barrier()
    dist.destroy_process_group()


def multi(out, world, fmt=None):
    fd, init = tempfile.mkstemp(prefix="dcp-init-")
    os.close(fd)
    os.unlink(init)
    mp.start_processes(rank_main, args=(world, "file://" + init, out, fmt),
                       nprocs=world, start_method="spawn")
    t = full_tensors(world)
    refs = {k: (k, v) for k, v in t.items() if k not in ("mask", "plain")}
    refs["nested.mask"] = ("nested/mask", t["mask"])
    refs["nested.plain"] = ("nested/plain", t["plain"])
    write_ref(out, refs)


def load_md(d):
    with open(os.path.join(d, ".metadata"), "rb") as f:
        return pickle.load(f)


def dump_md(d, md):
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def storage_key(md, fqn):
    return [k for k in md.storage_data if k.fqn == fqn]


def replace_item(d, md, fqn, data, name):
    """Points fqn's (only) item at a new file holding `data`."""
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    (k,) = storage_key(md, fqn)
    info = md.storage_data[k]
    info.relative_path, info.offset, info.length = name, 0, len(data)


def saved(obj):
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def reencoded(out):
    src = os.path.join(out, "single")
    md = load_md(src)
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    class ByValue(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, _MEM_FORMAT_ENCODING):
                return type(obj), (obj.value,)
            return NotImplemented

    for name, dump in (("proto2", lambda f: pickle.dump(md, f, protocol=2)),
                       ("proto5", lambda f: pickle.dump(md, f, protocol=5)),
                       ("enum_by_value", lambda f: ByValue(f, protocol=4).dump(md))):
        d = os.path.join(out, name)
        shutil.copytree(src, d)
        with open(os.path.join(d, ".metadata"), "wb") as f:
            dump(f)
    raw = open(os.path.join(out, "enum_by_value", ".metadata"), "rb").read()
    assert b"getattr" not in raw


def variants(out):
    base = os.path.join(out, "variants", "_base")
    dcp.save({"t": torch.arange(24, dtype=torch.float32).reshape(4, 6),
              "u": torch.arange(6, dtype=torch.float32),
              "o": {"k": 1}}, checkpoint_id=base)
    expect = []

    def make(name, fn, why):
        d = os.path.join(out, "variants", name)
        shutil.copytree(base, d)
        md = load_md(d)
        fn(d, md)
        dump_md(d, md)
        expect.append((name, why))

    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    make("noncontig", lambda d, md: replace_item(
        d, md, "t", saved(t.t().contiguous().t()), "nc.distcp"), "not contiguous")
    make("dtype", lambda d, md: replace_item(
        d, md, "t", saved(t.double()), "dt.distcp"), "float64")
    make("shape", lambda d, md: replace_item(
        d, md, "t", saved(t.reshape(6, 4)), "sh.distcp"), "shape")

    def deflate(d, md):
        src = zipfile.ZipFile(io.BytesIO(saved(t)))
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w") as z:
            for info in src.infolist():
                comp = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
                z.writestr(info.filename, src.read(info.filename), compress_type=comp)
        replace_item(d, md, "t", b.getvalue(), "df.distcp")
    make("deflate", deflate, "compressed")

    def transform(d, md):
        (k,) = storage_key(md, "t")
        md.storage_data[k].transform_descriptors = ["stream.zstd"]
    make("transform", transform, "stream.zstd")

    def overlap(d, md):
        c = md.state_dict_metadata["t"].chunks
        c.append(copy.deepcopy(c[0]))
    make("overlap", overlap, "overlap")

    def missing(d, md):
        md.state_dict_metadata["t"].size = torch.Size([5, 6])
    make("missing", missing, "cover")

    def nostorage(d, md):
        for k in storage_key(md, "u"):
            del md.storage_data[k]
    make("nostorage", nostorage, "no storage_data")

    def outside(d, md):
        (k,) = storage_key(md, "u")
        md.storage_data[k].offset = 10**9
    make("outside", outside, "does not lie within")

    def escape(d, md):
        (k,) = storage_key(md, "u")
        md.storage_data[k].relative_path = "../x.distcp"
    make("escape", escape, "not a plain file name")

    def bad_offset(d, md):
        c = md.state_dict_metadata["u"].chunks[0]
        c.offsets = torch.Size([3])
    make("chunkbounds", bad_offset, "chunk at (3,)")

    def notensor(d, md):
        replace_item(d, md, "t", saved({"x": 1}), "nt.distcp")
    make("notensor", notensor, "not a tensor")

    # A SAFETENSORS-format file whose header gives a tensor one byte more.
    d = os.path.join(out, "variants", "st_offsets")
    dcp.save({"t": t}, storage_writer=writer(d, "safetensors"))
    f = os.path.join(d, "__0_0.distcp")
    raw = open(f, "rb").read()
    assert raw.count(b'"data_offsets":[0,96]') == 1
    open(f, "wb").write(raw.replace(b'"data_offsets":[0,96]', b'"data_offsets":[0,97]'))
    expect.append(("st_offsets", "data_offsets [0, 97)"))
    with open(os.path.join(out, "variants", "expect.txt"), "w") as f:
        for name, why in expect:
            f.write(f"{name}\t{why}\n")


class Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hostile(out):
    h = os.path.join(out, "hostile")
    os.makedirs(h, exist_ok=True)
    from torch.distributed.checkpoint.metadata import Metadata
    import builtins
    cases = {
        "os_system": (Reduce(os.system, ("echo pwned",)), "posix system"),
        "eval": (Reduce(builtins.eval, ("1",)), "builtins eval"),
        "subprocess": (Reduce(__import__("subprocess").Popen, (["true"],)),
                       "subprocess Popen"),
        # A real Metadata whose planner_data hides a call.
        "inside": (Metadata(state_dict_metadata={},
                            planner_data=Reduce(os.system, ("x",))), "posix system"),
        # A tensor: DCP metadata never holds one.
        "tensor": (Metadata(state_dict_metadata={}, planner_data=torch.ones(1)),
                   "torch._utils _rebuild_tensor_v2"),
    }
    with open(os.path.join(h, "expect.txt"), "w") as f:
        for name, (obj, why) in cases.items():
            with open(os.path.join(h, name + ".metadata"), "wb") as g:
                pickle.dump(obj, g)
            f.write(f"{name}\t{why}\n")
        # getattr on something that is not one of DCP's enums.
        raw = (b"\x80\x02cbuiltins\ngetattr\nctorch\nSize\n"
               b"X\x08\x00\x00\x00__init__\x86R.")
        with open(os.path.join(h, "getattr.metadata"), "wb") as g:
            g.write(raw)
        f.write("getattr\tgetattr on a 'torch.Size'\n")
        # getattr on DCP's enum, but not for one of its members.
        raw = (b"\x80\x02cbuiltins\ngetattr\n"
               b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"
               b"X\t\x00\x00\x00__class__\x86R.")
        with open(os.path.join(h, "enum_attr.metadata"), "wb") as g:
            g.write(raw)
        f.write("enum_attr\t_MEM_FORMAT_ENCODING has no member '__class__'\n")
        # A storage class: data in a .pth, nothing DCP metadata holds.
        with open(os.path.join(h, "storage.metadata"), "wb") as g:
            g.write(b"\x80\x02ctorch\nFloatStorage\n.")
        f.write("storage\tforbidden global 'torch FloatStorage'\n")
    torch.save({"md": load_md(os.path.join(out, "single"))},
               os.path.join(h, "dcp_class.pth"))


def main():
    out = sys.argv[1]
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    single(os.path.join(out, "single"))
    for w in (2, 4):
        multi(os.path.join(out, f"ranks{w}"), w)
    # SAFETENSORS-format files (FileSystemWriter serialization_format).
    single(os.path.join(out, "single_st"), "safetensors")
    multi(os.path.join(out, "ranks2_st"), 2, "safetensors")
    single(os.path.abspath(os.path.join(out, "per_item")), "per_item")
    reencoded(out)
    variants(out)
    hostile(out)
    print("make_dcp: wrote", out)


if __name__ == "__main__":
    main()
