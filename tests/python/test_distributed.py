"""ckpt.distributed under torch.distributed gloo: spawned processes
(file:// init, start method "spawn"), each loaded box compared BIT FOR BIT
with the box cut from a single-process reference built from the same seed.

One pool of 4 processes runs every scenario (spawning costs seconds per
process on 2 cores); each scenario ends with a barrier, records per rank
"ok" or its traceback, and the test methods read those records. Groups of
1-3 ranks are gloo subgroups of the 4 made up front in every process.
DTensor scenarios need torch 2.x and are skipped, visibly, under 1.13.
"""
import argparse
import collections
import datetime
import os
import shutil
import sys
import tempfile
import traceback
import unittest

import numpy as np
import torch
import torch.multiprocessing as mp

from util import tensor_bytes

WORLD = 4
TIMEOUT_S = 240  # the whole pool; a hung collective fails at 60 s instead

# ---- the reference: the same values in every process ---------------------

# name -> (shape, dtype)
TENSORS = {
    "w_even": ((8, 5), torch.float32),      # dim 0: even on 1, 2, 4 ranks
    "w_uneven": ((6, 3), torch.int64),      # dim 0: 6 rows on 4 ranks, one empty
    "w_col": ((4, 7), torch.bfloat16),      # dim 1
    "w_grid": ((4, 6), torch.float32),      # 2x2 grid when 4 ranks save
    "mask": ((3, 4), torch.bool),           # replicated
    "scalar": ((), torch.float32),          # 0-d, replicated
    "empty": ((0, 4), torch.float32),       # empty, replicated
    "scalar_chunk": ((), torch.int64),      # 0-d Chunk, every rank a replica
    "empty_rows": ((0, 3), torch.bfloat16),  # empty, Chunks of 0 rows on dim 0
    "bool_chunk": ((5,), torch.bool),       # 1-d bool on dim 0 (4 ranks: 2, 2, 1, 0)
}
# 0-d and empty tensors have a scenario of their own (sc_zero_d_and_empty).
EDGE = ("scalar", "empty", "scalar_chunk", "empty_rows", "bool_chunk")
MAIN = tuple(n for n in TENSORS if n not in EDGE)
LAYOUT = {"w_even": 0, "w_uneven": 0, "w_col": 1, "w_grid": "grid",
          "mask": None, "scalar": None, "empty": None, "scalar_chunk": "replicas",
          "empty_rows": 0, "bool_chunk": 0}


def reference(name):
    shape, dtype = TENSORS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == torch.int64:
        return torch.randint(-2**62, 2**62, shape, generator=g, dtype=torch.int64)
    return torch.randn(shape, generator=g).to(dtype)


def split(n, parts, i):
    """[start, end) of part i of n cut in `parts` (ceil-sized blocks, as
    torch.chunk and DTensor's Shard: trailing parts may be empty)."""
    size = -(-n // parts) if parts else n
    start = min(i * size, n)
    return start, min(start + size, n)


def box(name, rank, world, layout=None):
    """(offsets, sizes) of rank's box of tensor `name` on `world` ranks."""
    shape = TENSORS[name][0]
    layout = LAYOUT[name] if layout is None else layout
    offsets, sizes = [0] * len(shape), list(shape)
    if layout == "grid" and world == 4:
        for d, i in ((0, rank // 2), (1, rank % 2)):
            a, b = split(shape[d], 2, i)
            offsets[d], sizes[d] = a, b - a
    elif layout in (0, 1):
        a, b = split(shape[layout], world, rank)
        offsets[layout], sizes[layout] = a, b - a
    elif layout == "grid":  # not 4 ranks: rows
        a, b = split(shape[0], world, rank)
        offsets[0], sizes[0] = a, b - a
    return offsets, sizes


def cut(t, offsets, sizes):
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, n)
    return t.contiguous()


def state_dict(cdist, rank, world, fill=True, layouts=None, names=MAIN):
    """The state dict rank `rank` of `world` holds: its boxes (zeros when
    not `fill`, to be loaded into) and some non-tensor values."""
    layouts = layouts or {}
    sd = {"model": {}, "step": 7 if fill else 0, "name": "run" if fill else "",
          "opt": {"lr": 0.1 if fill else 0.0, "betas": (0.9, 0.99) if fill else (0, 0)}}
    for name in names:
        shape, dtype = TENSORS[name]
        layout = layouts.get(name, LAYOUT[name])
        ref = reference(name)
        if layout is None:
            sd["model"][name] = ref.clone() if fill else torch.zeros(shape, dtype=dtype)
            continue
        offsets, sizes = box(name, rank, world, layout)
        local = cut(ref, offsets, sizes) if fill else torch.zeros(sizes, dtype=dtype)
        if layout == "replicas":  # the whole tensor, declared held by every rank
            sd["model"][name] = cdist.Chunk(local, shape, offsets, rank, world)
        else:
            sd["model"][name] = cdist.Chunk(local, shape, offsets)
    return sd


def check_loaded(sd, rank, world, layouts=None, names=MAIN):
    layouts = layouts or {}
    for name in names:
        layout = layouts.get(name, LAYOUT[name])
        v = sd["model"][name]
        ref = reference(name)
        if layout is None:
            got, want = v, ref
        else:
            offsets, sizes = box(name, rank, world, layout)
            got, want = v.local, cut(ref, offsets, sizes)
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), \
            (name, got.dtype, got.shape, want.dtype, want.shape)
        assert tensor_bytes(got) == tensor_bytes(want), f"{name}: values differ"
    assert sd["step"] == 7 and sd["name"] == "run", sd
    assert sd["opt"] == {"lr": 0.1, "betas": (0.9, 0.99)}, sd["opt"]


# ---- scenarios (run on every rank of the pool) -------------------------------

def _reshard_matrix(ctx, names, tag):
    cdist, rank = ctx.cdist, ctx.rank
    for n in range(1, WORLD + 1):
        d = os.path.join(ctx.tmp, f"{tag}-{n}")
        if rank < n:
            info = cdist.save(state_dict(cdist, rank, n, names=names), d, ctx.groups[n],
                              sync=False)
            assert info.files == n and info.tensors == len(names), info
        ctx.barrier()
        for m in range(1, WORLD + 1):
            if rank < m:
                sd = state_dict(cdist, rank, m, fill=False, names=names)
                stats = cdist.load(sd, d, ctx.groups[m], verify=False)
                check_loaded(sd, rank, m, names=names)
                assert stats["bytes_read"] == stats["bytes_needed"], stats
            ctx.barrier()


def sc_reshard(ctx):
    """Save on N, load on M, N and M in {1, 2, 3, 4}; dim 0 even and uneven,
    dim 1, grid, replicated; f32/bf16/i64/bool."""
    _reshard_matrix(ctx, MAIN, "reshard")


def sc_zero_d_and_empty(ctx):
    """The same matrix for a 0-d and an empty tensor (replicated)."""
    _reshard_matrix(ctx, EDGE, "edge")


def sc_dim0_to_dim1(ctx):
    """Rows saved, columns loaded (and columns saved, rows loaded)."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "rows")
    # Coordinator 3 writes the globals tree, the manifest and commits.
    cdist.save(state_dict(cdist, rank, WORLD), d, coordinator_rank=3, sync=False,
               metadata={"step": "200"})
    md = cdist.read_manifest(d)
    assert md.metadata.get("step") == "200", md.metadata
    assert md.files[md.globals_file]["rank"] == 3, (md.globals_file, md.files)
    flipped = {"w_even": 1, "w_uneven": 1, "w_col": 0, "w_grid": 1}
    for m in (2, 3):
        if rank < m:
            sd = state_dict(cdist, rank, m, fill=False, layouts=flipped)
            stats = cdist.load(sd, d, ctx.groups[m], verify=True)
            check_loaded(sd, rank, m, flipped)
            assert stats["bytes_needed"] <= stats["bytes_read"], stats
        ctx.barrier()


def sc_replicas(ctx):
    """FSDP x replica: 2 shards of rows, each held by 2 ranks; the bytes
    are written once (the shard files hold the tensor's bytes once)."""
    cdist, rank = ctx.cdist, ctx.rank
    ref = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)
    shard, replica = rank // 2, rank % 2
    a, b = split(40, 2, shard)
    d = os.path.join(ctx.tmp, "replicas")
    info = cdist.save({"w": cdist.Chunk(ref[a:b].clone(), (40, 6), (a, 0), replica, 2),
                       "ddp": ref.clone(), "arr": np.arange(10, dtype=np.int16)}, d, sync=False)
    assert info.tensors == 3, info
    md = cdist.read_manifest(d)
    for path in ("w", "ddp"):
        chunk_bytes = sum(c.length for c in md.tensors[path].chunks)
        assert chunk_bytes == ref.numel() * 4, (path, chunk_bytes)
    if rank < 3:
        lo, hi = split(40, 3, rank)
        sd = {"w": cdist.Chunk(torch.zeros(hi - lo, 6), (40, 6), (lo, 0)),
              "ddp": torch.zeros(40, 6), "arr": np.zeros(10, dtype=np.int16)}
        cdist.load(sd, d, ctx.groups[3])
        assert torch.equal(sd["w"].local, ref[lo:hi]) and torch.equal(sd["ddp"], ref)
        assert (sd["arr"] == np.arange(10)).all(), sd["arr"]
    ctx.barrier()


def sc_rank_local(ctx):
    """RankLocal values come back per rank at the same world size; at
    another one the error names the keys and both sizes, on every rank."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "local")
    cdist.save({"w": torch.ones(3), "rng": cdist.RankLocal({"seed": rank, "t": torch.full(
        (2,), float(rank))})}, d, sync=False)
    sd = {"w": torch.zeros(3), "rng": cdist.RankLocal(None)}
    cdist.load(sd, d)
    assert sd["rng"].value["seed"] == rank and torch.equal(
        sd["rng"].value["t"], torch.full((2,), float(rank))), sd["rng"]
    if rank < 2:
        try:
            cdist.load({"w": torch.zeros(3), "rng": cdist.RankLocal(None)}, d, ctx.groups[2])
        except ctx.ckpt.InvalidArgumentError as e:
            assert "'rng'" in str(e) and "4 ranks" in str(e) and "on 2" in str(e), str(e)
        else:
            raise AssertionError("rank-local state loaded at another world size")
    ctx.barrier()
    # An existing directory is refused on every rank, or replaced whole.
    try:
        cdist.save({"w": torch.ones(3)}, d, sync=False)
    except ctx.ckpt.CkptError as e:
        assert d in str(e), str(e)
    else:
        raise AssertionError("saved over an existing checkpoint without overwrite")
    cdist.save({"w": torch.full((3,), 2.0)}, d, overwrite=True, sync=False)
    sd = {"w": torch.zeros(3)}
    cdist.load(sd, d)
    assert torch.equal(sd["w"], torch.full((3,), 2.0)), sd
    ctx.barrier()


class _Interrupting:
    """Raises KeyboardInterrupt when ckpt.save looks at it (as a Ctrl-C
    during a save would arrive)."""

    def __getattr__(self, name):
        raise KeyboardInterrupt


def sc_failure(ctx):
    """One rank raising inside save: every rank gets the error naming it,
    no directory appears (nor its temporary)."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "failed")
    sd = {"w": torch.ones(4), "mine": cdist.RankLocal(lambda: 0 if rank == 2 else rank)}
    if rank != 2:
        sd["mine"] = cdist.RankLocal(rank)
    try:
        cdist.save(sd, d, sync=False)
    except ctx.ckpt.CkptError as e:
        assert "rank 2" in str(e) and "cannot save" in str(e), str(e)
    else:
        raise AssertionError("save succeeded although rank 2 failed")
    ctx.barrier()
    assert not os.path.exists(d), os.listdir(ctx.tmp)
    assert not any(n.startswith(".failed") for n in os.listdir(ctx.tmp)), os.listdir(ctx.tmp)
    ctx.barrier()  # every rank looked before the next save makes the temporary again
    # The next save of the same directory works.
    sd["mine"] = cdist.RankLocal(rank)
    cdist.save(sd, d, sync=False)
    ctx.barrier()
    # A KeyboardInterrupt on rank 3 stays one there; the others get the
    # error naming it instead of waiting for rank 3 forever.
    d2 = os.path.join(ctx.tmp, "interrupted")
    sd = {"w": torch.ones(4), "mine": cdist.RankLocal(_Interrupting() if rank == 3 else rank)}
    try:
        cdist.save(sd, d2, sync=False)
    except KeyboardInterrupt:
        assert rank == 3
    except ctx.ckpt.CkptError as e:
        assert rank != 3 and "rank 3" in str(e) and "KeyboardInterrupt" in str(e), str(e)
    else:
        raise AssertionError("save succeeded although rank 3 was interrupted")
    ctx.barrier()
    assert not os.path.exists(d2)


def _optimizer_like(fill):
    z = (lambda t: t) if fill else torch.zeros_like
    return {"opt": {"state": {0: {"exp_avg": z(torch.arange(3.0)), "step": 4 if fill else 0},
                              1: {"exp_avg": z(torch.full((2,), 2.0))}},
                    "param_groups": [{"lr": 0.1 if fill else 0.0, "params": [0, 1] if fill else []}]},
            "ns": argparse.Namespace(a=1 if fill else 0, t=z(torch.arange(3))),
            "tup": (z(torch.ones(2)), "x" if fill else "y"),
            "od": collections.OrderedDict(b=2 if fill else 0, a=z(torch.ones(1))),
            "a/b": z(torch.ones(1)), "dtype": torch.float16 if fill else None}


def sc_structures(ctx):
    """An optimizer-like state dict (int keys), a Namespace, a tuple, an
    OrderedDict, a key with '/': tensors filled in place, other values
    replaced (a tuple's own items stay), paths as ckpt.save gives them."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "structures")
    if rank < 2:
        cdist.save(_optimizer_like(True), d, ctx.groups[2], sync=False)
    ctx.barrier()
    if rank < 3:
        got = _optimizer_like(False)
        cdist.load(got, d, ctx.groups[3])
        want = _optimizer_like(True)
        want["tup"] = (want["tup"][0], "y")
        assert repr(got) == repr(want), (got, want)
        assert type(got["od"]) is collections.OrderedDict and type(got["ns"]) is argparse.Namespace
        names = ctx.ckpt.flatten(_optimizer_like(True))
        assert sorted(cdist.read_manifest(d).tensors) == sorted(names), names
    ctx.barrier()


def sc_load_mismatch(ctx):
    """One rank's state dict disagreeing with the checkpoint (dtype, then
    shape, then a missing tensor): every rank raises, naming that rank and
    the tensor; nothing was copied into the others' tensors."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "replicas")  # sc_replicas's save
    cases = [({"ddp": torch.zeros(40, 6, dtype=torch.float64)}, "was saved as torch.float32"),
             ({"ddp": torch.zeros(40, 7)}, "was saved with shape (40, 6)"),
             ({"nope": torch.zeros(1)}, "no tensor 'nope'")]
    for bad, why in cases:
        sd = {"ddp": torch.zeros(40, 6)}
        if rank == 1:
            sd = bad
        try:
            cdist.load(sd, d)
        except ctx.ckpt.CkptError as e:
            assert "rank 1" in str(e) and why in str(e), str(e)
        else:
            raise AssertionError(f"loaded although rank 1's state dict is wrong ({why})")
        if rank != 1:
            assert not sd["ddp"].any(), "copied into a tensor although the load failed"
    ctx.barrier()


def sc_flipped_byte(ctx):
    """A flipped byte fails every load that reads it, on every rank (a
    ChecksumError naming the rank), and not a load of another tensor; the
    failed load left the state dict's non-tensor and RankLocal values as
    they were."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "flipped")
    cdist.save({"a": torch.arange(64.0), "b": torch.ones(64), "step": 5,
                "rl": cdist.RankLocal(rank)}, d, sync=False)
    md = cdist.read_manifest(d)
    if rank == 0:
        c = md.tensors["a"].chunks[0]
        with open(os.path.join(d, md.files[c.file]["name"]), "r+b") as f:
            f.seek(c.offset + 1)
            byte = f.read(1)
            f.seek(c.offset + 1)
            f.write(bytes([byte[0] ^ 0x10]))
    ctx.barrier()
    # The tensors are undefined after a failed read (read in place); the
    # non-tensor and rank-local values are set only after it succeeded.
    sd = {"a": torch.zeros(64), "b": torch.zeros(64), "step": 0, "rl": cdist.RankLocal(None)}
    try:
        cdist.load(sd, d)
    except ctx.ckpt.ChecksumError as e:
        assert "rank 0" in str(e), str(e)
    else:
        raise AssertionError("loaded a tensor with a flipped byte")
    assert sd["step"] == 0 and sd["rl"].value is None, sd
    sd = {"b": torch.zeros(64)}
    cdist.load(sd, d)
    assert torch.equal(sd["b"], torch.ones(64))
    ctx.barrier()


def sc_async(ctx):
    """Tensors mutated right after async_save returns are saved with their
    pre-mutation values; a second async_save waits for the first."""
    cdist, rank = ctx.cdist, ctx.rank
    a, b = split(8, WORLD, rank)
    ref = reference("w_even")
    sd = {"w": cdist.Chunk(ref[a:b].clone(), (8, 5), (a, 0)), "rep": ref.clone(), "step": 1,
          "rl": cdist.RankLocal(torch.full((3,), float(rank)))}
    d1, d2 = os.path.join(ctx.tmp, "async-1"), os.path.join(ctx.tmp, "async-2")
    h1 = cdist.async_save(sd, d1, sync=False)
    assert h1.staged()
    with torch.no_grad():  # the next optimizer step
        sd["w"].local.add_(1)
        sd["rep"].mul_(-1)
        sd["rl"].value.add_(100)
    sd["step"] = 2
    h2 = cdist.async_save(sd, d2, sync=False)
    assert h1.done(), "the second async_save did not wait for the first"
    i1, i2 = h1.result(), h2.result()
    # The second save staged into the first one's buffers (same shapes).
    ptrs = {b.data_ptr() for bufs in cdist._STAGING.values() for b in bufs}
    h3 = cdist.async_save(sd, os.path.join(ctx.tmp, "async-3"), sync=False)
    h3.result()
    assert ptrs and ptrs == {b.data_ptr() for bufs in cdist._STAGING.values() for b in bufs}
    assert i1.path.endswith("async-1") and i2.path.endswith("async-2"), (i1, i2)
    for d, delta, step in ((d1, 0, 1), (d2, 1, 2)):
        got = {"w": cdist.Chunk(torch.zeros(b - a, 5), (8, 5), (a, 0)), "rep": torch.zeros(8, 5),
               "step": 0, "rl": cdist.RankLocal(None)}
        cdist.load(got, d)
        assert torch.equal(got["w"].local, ref[a:b] + delta), d
        assert torch.equal(got["rep"], ref * (1 if delta == 0 else -1)), d
        assert got["step"] == step, got["step"]
        assert torch.equal(got["rl"].value, torch.full((3,), float(rank) + 100 * delta)), d
    ctx.barrier()


def sc_async_failure(ctx):
    """An error of one rank inside async_save reaches result() on every rank."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "async-failed")
    sd = {"w": torch.ones(2), "x": cdist.RankLocal(object() if rank == 1 else 1)}
    h = cdist.async_save(sd, d, sync=False)
    try:
        h.result()
    except ctx.ckpt.CkptError as e:
        assert "rank 1" in str(e), str(e)
    else:
        raise AssertionError("async save succeeded although rank 1 failed")
    ctx.barrier()
    assert not os.path.exists(d)


def sc_consolidate(ctx):
    """The sharded directory as one ordinary file: whole tensors where
    they sat, the non-tensor values with them."""
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "reshard-4")  # sc_reshard's 4-rank save
    if rank == 0:
        out = os.path.join(ctx.tmp, "whole.ckpt")
        cdist.consolidate(d, out, sync=False)
        whole = ctx.ckpt.load(out)
        for name in MAIN:
            assert tensor_bytes(whole["model"][name]) == tensor_bytes(reference(name)), name
        assert whole["step"] == 7 and whole["opt"]["betas"] == (0.9, 0.99), whole
        cdist.verify(d)
        md = cdist.read_manifest(d)
        assert md.world_size == 4 and sorted(md.tensors) == sorted(
            f"model/{n}" for n in MAIN), md.tensors.keys()
        assert md.tensors["model/w_grid"].shape == (4, 6)
        assert len(md.tensors["model/w_grid"].chunks) == 4
        # A box across the grid's four chunks, and a whole tensor, alone.
        got = cdist.read(d, "model/w_grid", (1, 2), (2, 3))
        assert tensor_bytes(got) == tensor_bytes(reference("w_grid")[1:3, 2:5]), got
        got = cdist.read(d, "model/w_col")
        assert tensor_bytes(got) == tensor_bytes(reference("w_col"))
        try:
            cdist.read(d, "model/nope")
        except ctx.ckpt.NotFoundError as e:
            assert "model/nope" in str(e), str(e)
        else:
            raise AssertionError("read a tensor that is not there")
    ctx.barrier()


def sc_subgroup_async(ctx):
    """async_save and load by the members of a 2-rank group alone, once
    prepare() made its gloo groups on every process; the world's next
    groups (sc_dtensor's meshes) are still made alike on every rank."""
    cdist, rank = ctx.cdist, ctx.rank
    g = ctx.groups[2]
    if rank < 2:
        cdist.prepare(g)
    else:  # a non-member holds no group object: it names the ranks
        try:
            cdist.prepare(g)
            raise AssertionError("prepare(NON_GROUP_MEMBER) passed")
        except ctx.ckpt.InvalidArgumentError as e:
            assert "not a member" in str(e), e
        cdist.prepare(ranks=[0, 1])
    d = os.path.join(ctx.tmp, "subgroup-async")
    if rank < 2:
        a, b = split(8, 2, rank)
        ref = reference("w_even")
        h = cdist.async_save({"w": cdist.Chunk(ref[a:b].clone(), (8, 5), (a, 0))}, d, g,
                             sync=False)
        h.result()
        sd = {"w": torch.zeros(8, 5)}
        cdist.load(sd, d, g)
        assert torch.equal(sd["w"], ref)
    ctx.barrier()


class _InterruptedCopy(torch.Tensor):
    """A tensor whose copy is interrupted: detach(), which staging calls
    first, raises KeyboardInterrupt (as a Ctrl-C arriving while
    async_save copies it would)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach:
            raise KeyboardInterrupt
        return super().__torch_function__(func, types, args, kwargs or {})


def sc_async_interrupted(ctx):
    """A KeyboardInterrupt on rank 3 while async_save stages (its second
    tensor of three) stays one there, raised once its thread has taken the
    error to the commit: every other rank's result() raises promptly,
    naming rank 3, instead of waiting for it until the gloo timeout. No
    directory appears; the next async_save and save work on every rank."""
    cdist, rank = ctx.cdist, ctx.rank
    a, b = split(8, WORLD, rank)
    ref = reference("w_even")
    local = ref[a:b].clone()
    if rank == 3:
        local = local.as_subclass(_InterruptedCopy)
    sd = {"first": torch.ones(3), "w": cdist.Chunk(local, (8, 5), (a, 0)),
          "last": torch.full((2,), 2.0), "step": 5}
    d = os.path.join(ctx.tmp, "async-interrupted")
    try:
        h = cdist.async_save(sd, d, sync=False)
    except KeyboardInterrupt:
        assert rank == 3
        h = cdist._INFLIGHT  # the thread that took the interrupt to the commit
    else:
        assert rank != 3, "async_save staged a tensor whose copy was interrupted"
    try:
        h.result(timeout=30)  # the commit takes well under a second
    except ctx.ckpt.CkptError as e:
        assert "rank 3" in str(e) and "KeyboardInterrupt" in str(e), str(e)
    else:
        raise AssertionError("async save succeeded although rank 3 was interrupted")
    ctx.barrier()
    assert not os.path.exists(d), os.listdir(ctx.tmp)
    ctx.barrier()  # every rank looked before the next save makes the temporary again
    sd["w"] = cdist.Chunk(ref[a:b].clone(), (8, 5), (a, 0))
    info = cdist.async_save(sd, d, sync=False).result(timeout=60)
    assert info.path.endswith("async-interrupted") and info.tensors == 3, info
    d2 = os.path.join(ctx.tmp, "after-interrupt")
    cdist.save(sd, d2, sync=False)
    for path in (d, d2):
        got = {"first": torch.zeros(3), "w": torch.zeros(8, 5), "last": torch.zeros(2), "step": 0}
        cdist.load(got, path)
        assert torch.equal(got["w"], ref) and torch.equal(got["first"], torch.ones(3)), path
        assert torch.equal(got["last"], torch.full((2,), 2.0)) and got["step"] == 5, got
    ctx.barrier()


def sc_dtensor(ctx):
    """DTensor Shard/Replicate on 1-D and 2-D meshes: saved on one layout,
    loaded on others and as Chunks."""
    if not ctx.cdist.HAS_DTENSOR:
        return "skipped"
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    cdist, rank = ctx.cdist, ctx.rank
    mesh1 = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (2, 2))
    ref = {"a": reference("w_uneven"), "b": reference("w_even"), "c": reference("w_col")}
    sd = {"a": distribute_tensor(ref["a"], mesh1, [Shard(0)]),
          "b": distribute_tensor(ref["b"], mesh2, [Shard(0), Shard(1)]),
          "c": distribute_tensor(ref["c"], mesh2, [Replicate(), Shard(1)])}
    d = os.path.join(ctx.tmp, "dtensor")
    info = cdist.save(sd, d, sync=False)
    md = cdist.read_manifest(d)
    # The Replicate() mesh dim's two replicas split each column block by
    # rows: every byte written once, by both of them.
    c = md.tensors["c"]
    assert sum(ch.length for ch in c.chunks) == ref["c"].numel() * 2, c
    assert len({ch.file for ch in c.chunks}) == 4, c
    assert info.tensors == 3
    layouts = [
        {"a": (mesh1, [Shard(1)]), "b": (mesh1, [Replicate()]), "c": (mesh2, [Shard(0), Shard(1)])},
        {"a": (mesh2, [Shard(1), Shard(0)]), "b": (mesh2, [Replicate(), Shard(0)]),
         "c": (mesh1, [Shard(0)])},
    ]
    for lay in layouts:
        got = {k: distribute_tensor(torch.zeros_like(ref[k]), m, p) for k, (m, p) in lay.items()}
        cdist.load(got, d)
        for k in got:
            assert tensor_bytes(got[k].full_tensor()) == tensor_bytes(ref[k]), (k, lay[k])
    # Plain Chunks read what DTensors wrote.
    if rank < 3:
        lo, hi = split(8, 3, rank)
        got = {"b": cdist.Chunk(torch.zeros(hi - lo, 5), (8, 5), (lo, 0))}
        cdist.load(got, d, ctx.groups[3])
        assert torch.equal(got["b"].local, ref["b"][lo:hi])
    ctx.barrier()
    return None


def sc_dcp(ctx):
    """A torch.distributed.checkpoint directory saved on 4 ranks (DTensor
    rows, a replicated tensor) loads on 3 as Chunks, bit for bit, its
    .metadata never unpickled; its non-tensor values stay as they are."""
    if not ctx.cdist.HAS_DTENSOR:
        return "skipped"
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    cdist, rank = ctx.cdist, ctx.rank
    mesh = init_device_mesh("cpu", (WORLD,))
    rows, rep = reference("w_uneven"), reference("w_col")
    d = os.path.join(ctx.tmp, "dcp")
    dcp.save({"rows": distribute_tensor(rows, mesh, [Shard(0)]), "rep": rep.clone(), "step": 3},
             checkpoint_id=d)
    ctx.barrier()
    if rank < 3:
        lo, hi = split(6, 3, rank)
        sd = {"rows": cdist.Chunk(torch.zeros(hi - lo, 3, dtype=torch.int64), (6, 3), (lo, 0)),
              "rep": torch.zeros(4, 7, dtype=torch.bfloat16), "step": 0}
        cdist.load(sd, d, ctx.groups[3])
        assert tensor_bytes(sd["rows"].local) == tensor_bytes(rows[lo:hi])
        assert tensor_bytes(sd["rep"]) == tensor_bytes(rep)
        assert sd["step"] == 0, sd["step"]
    ctx.barrier()
    return None


def sc_reinit(ctx):
    """After destroy_process_group() and a new init_process_group(), saves
    and loads make their gloo groups again (the old ones are gone). Last:
    the pool's subgroups die with the old default group."""
    import torch.distributed as dist
    cdist, rank = ctx.cdist, ctx.rank
    d = os.path.join(ctx.tmp, "before-reinit")
    cdist.save({"w": torch.ones(4)}, d, sync=False)
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{ctx.tmp}/init-again", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    d = os.path.join(ctx.tmp, "after-reinit")
    cdist.save({"w": torch.full((4,), 2.0)}, d, sync=False)
    sd = {"w": torch.zeros(4)}
    cdist.load(sd, d)
    assert torch.equal(sd["w"], torch.full((4,), 2.0)), sd
    h = cdist.async_save({"w": torch.full((4,), 3.0)}, os.path.join(ctx.tmp, "async-reinit"),
                         sync=False)
    h.result()
    ctx.barrier()


SCENARIOS = [sc_reshard, sc_dim0_to_dim1, sc_replicas, sc_structures, sc_load_mismatch,
             sc_rank_local, sc_flipped_byte,
             sc_failure,
             sc_async, sc_async_failure, sc_consolidate, sc_subgroup_async,
             sc_async_interrupted, sc_dtensor,
             sc_zero_d_and_empty, sc_dcp,  # late: a failing scenario ends its rank's run
             sc_reinit]  # the very last: it replaces the default group


class _Ctx:
    pass


def _worker(rank, world, init_file, tmp, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    import ckpt
    import ckpt.distributed as cdist
    ctx = _Ctx()
    ctx.rank, ctx.tmp, ctx.ckpt, ctx.cdist = rank, tmp, ckpt, cdist
    # Every process makes every subgroup, in the same order (new_group is
    # collective over the default group).
    ctx.groups = {n: dist.new_group(list(range(n)), backend="gloo") for n in range(1, world)}
    ctx.groups[world] = None
    ctx.barrier = dist.barrier
    for sc in SCENARIOS:
        try:
            r = sc(ctx) or "ok"
        except BaseException:  # noqa: BLE001 - recorded for the test method
            r = traceback.format_exc()
        with open(os.path.join(out, f"{sc.__name__}.{rank}"), "w") as f:
            f.write(r)
        if r not in ("ok", "skipped"):
            # The others may wait in a collective this rank will not make:
            # its exit closes their connections, so they fail at once too
            # (instead of at the 60 s timeout), each recording where.
            os._exit(1)
    dist.destroy_process_group()
    # torch 2.x's gloo worker threads may drop a tensor's last reference
    # while Python finalizes, which aborts the process: exit without it.
    os._exit(0)


def _pool(base):
    """Runs the pool (in a process of its own, whose __main__ is this file:
    spawned children re-import the parent's __main__, and run.py's would
    run the whole suite again). Exit 0 when every worker ended."""
    import time
    tmp, out = os.path.join(base, "ck"), os.path.join(base, "out")
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_worker, args=(r, WORLD, os.path.join(base, "init"), tmp, out))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    late = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in late:
        procs[r].kill()
        print(f"rank {r} ran past {TIMEOUT_S} s", file=sys.stderr)
    return 1 if late or any(p.exitcode for p in procs) else 0


_RESULTS = None  # scenario -> [record of each rank]
_POOL_ERROR = None


def setUpModule():
    global _RESULTS, _POOL_ERROR  # noqa: PLW0603
    import subprocess
    base = tempfile.mkdtemp(prefix="ckpt-dist-")
    out = os.path.join(base, "out")
    os.makedirs(os.path.join(base, "ck"))
    os.makedirs(out)
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--pool", base],
                           capture_output=True, text=True, timeout=TIMEOUT_S + 60)
        if r.returncode != 0:
            _POOL_ERROR = f"exit {r.returncode}: {r.stderr[-4000:]}"
        _RESULTS = {}
        for sc in SCENARIOS:
            recs = []
            for rank in range(WORLD):
                p = os.path.join(out, f"{sc.__name__}.{rank}")
                recs.append(open(p).read() if os.path.exists(p) else f"rank {rank}: no record")
            _RESULTS[sc.__name__] = recs
    finally:
        shutil.rmtree(base, ignore_errors=True)


class DistributedTest(unittest.TestCase):
    def check(self, name):
        recs = _RESULTS[name]
        if all(r == "skipped" for r in recs):
            self.skipTest(f"torch {torch.__version__} has no DTensor")
        bad = [f"rank {i}:\n{r}" for i, r in enumerate(recs) if r != "ok"]
        if bad:
            self.fail("\n".join(bad) + (f"\npool: {_POOL_ERROR}" if _POOL_ERROR else ""))

    def test_reshard_n_to_m(self):
        self.check("sc_reshard")

    def test_reshard_zero_d_and_empty(self):
        self.check("sc_zero_d_and_empty")

    def test_dim0_saved_dim1_loaded(self):
        self.check("sc_dim0_to_dim1")

    def test_replicas_written_once(self):
        self.check("sc_replicas")

    def test_structures(self):
        self.check("sc_structures")

    def test_load_mismatch_on_one_rank(self):
        self.check("sc_load_mismatch")

    def test_flipped_byte(self):
        self.check("sc_flipped_byte")

    def test_rank_local(self):
        self.check("sc_rank_local")

    def test_one_rank_failing(self):
        self.check("sc_failure")

    def test_async_save(self):
        self.check("sc_async")

    def test_async_failure(self):
        self.check("sc_async_failure")

    def test_consolidate_and_manifest(self):
        self.check("sc_consolidate")

    def test_dtensor(self):
        self.check("sc_dtensor")

    def test_subgroup_async(self):
        self.check("sc_subgroup_async")

    def test_async_interrupted_while_staging(self):
        self.check("sc_async_interrupted")

    def test_groups_after_reinit(self):
        self.check("sc_reinit")

    def test_dcp_directory(self):
        self.check("sc_dcp")


class LocalTest(unittest.TestCase):
    """What needs no group."""

    def test_chunk_checks_its_box(self):
        import ckpt
        import ckpt.distributed as cdist
        with self.assertRaises(ckpt.InvalidArgumentError):
            cdist.Chunk(torch.zeros(3, 2), (4, 2), (2, 0))
        with self.assertRaises(ckpt.InvalidArgumentError):
            cdist.Chunk(torch.zeros(3), (4, 2), (0,))
        with self.assertRaises(ckpt.InvalidArgumentError):
            cdist.Chunk(torch.zeros(3), (3,), (0,), replica_index=2, replica_count=2)
        c = cdist.Chunk(torch.zeros(0, 2), (4, 2), (4, 0))
        self.assertEqual(c.replica_count, 1)

    def test_lazy_attribute(self):
        import ckpt
        self.assertIs(ckpt.distributed, sys.modules["ckpt.distributed"])

    def test_save_without_a_group_is_refused(self):
        import ckpt
        import ckpt.distributed as cdist
        if torch.distributed.is_initialized():
            self.skipTest("a group is initialized")
        with self.assertRaises(ckpt.InvalidArgumentError):
            cdist.save({"w": torch.zeros(1)}, tempfile.gettempdir() + "/never")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pool"]:
        sys.exit(_pool(sys.argv[2]))
    unittest.main()
