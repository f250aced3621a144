#!/usr/bin/env python3
"""Sharded checkpoints from Python, against PyTorch DCP and the disk, in one run.

Spawned gloo processes (file:// init) hold an FSDP-like state dict: float32
DTensors sharded on dim 0 (torch 2.x; the rows divide by 12 so that 2, 3 and
4 ranks shard it evenly). Per round, best of --repeat after one untimed
round, page cache warm, every figure the slowest rank's:

  save on N   raw write()+fsync of each rank's bytes, a file per rank;
              ckpt.distributed.save (fsync on); DCP dcp.save (FileSystemWriter,
              fsync on); dcp.save with ckpt as its storage plug-in
              (ckpt.dcp.Writer, fsync on); ckpt.distributed.async_save until it returns (staged)
              beside a copy of the rank's tensors into buffers made once
              (the memcpy floor; async_save reuses its staging buffers)
  load on M   the last save loaded by M ranks into DTensors sharded on dim 0
              (a reshard when M != N) and on dim 1: bytes read (the ranks'
              /proc/self/io rchar, summed) over the bytes their shards hold,
              for ckpt.distributed.load (verify off), dcp.load, and dcp.load
              with ckpt.dcp.Reader (verify off); for ckpt also its LoadStats (pread bytes + bytes copied from the
              mapping, which rchar does not count)

  .venv-torch2/bin/python bench/run_dist.py [--total-mb 512] [--repeat 5]

Prints ratios; bench/RESULTS.md records them.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TENSORS = 32
COLS = 1020  # divides by 2, 3 and 4


def rchar():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def slowest(x):
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def total(x):
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def timed(fn):
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - t0)


def state(mesh, rows, placement, fill):
    from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: F401
    from torch.distributed.tensor import Shard
    sd = {}
    world, rank = dist.get_world_size(), dist.get_rank()
    for i in range(TENSORS):
        if placement == 0:
            local = torch.empty(rows // world, COLS)
        else:
            local = torch.empty(rows, COLS // world)
        if fill:
            g = torch.Generator().manual_seed(1000 * i + rank)
            local.uniform_(generator=g)
        else:
            local.zero_()
        sd[f"model.layer{i}.weight"] = DTensor.from_local(local, mesh, [Shard(placement)],
                                                          run_check=False)
    return sd


def saved_global(i, rows, saved):
    """Tensor i as `saved` ranks filled it in state(..., fill=True)."""
    parts = []
    for r in range(saved):
        g = torch.Generator().manual_seed(1000 * i + r)
        parts.append(torch.empty(rows // saved, COLS).uniform_(generator=g))
    return torch.cat(parts)


def local_bytes(sd):
    return sum(v.to_local().numel() * v.to_local().element_size() for v in sd.values())


def save_phase(rank, world, init, args, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import ckpt.dcp
    import ckpt.distributed as cdist
    mesh = init_device_mesh("cpu", (world,))
    rows = args.rows
    sd = state(mesh, rows, 0, fill=True)
    nbytes = local_bytes(sd)
    best = {}
    floor = [torch.empty_like(v.to_local()) for v in sd.values()]
    for rep in range(args.repeat + 1):
        raw = os.path.join(out, f"raw-{rank}")

        def write_raw():
            with open(raw, "wb") as f:
                for v in sd.values():  # the tensor's own bytes, no copy
                    f.write(memoryview(v.to_local().numpy()).cast("B"))
                f.flush()
                os.fsync(f.fileno())
        r = {"raw": timed(write_raw)}
        os.unlink(raw)
        ck_dir = os.path.join(out, f"ckpt-n{world}-{rep}")
        dcp_dir = os.path.join(out, f"dcp-n{world}-{rep}")
        r["ckpt"] = timed(lambda: cdist.save(sd, checkpoint_id=ck_dir))
        r["dcp"] = timed(lambda: dcp.save(sd, checkpoint_id=dcp_dir))
        plugin_dir = os.path.join(out, f"plugin-n{world}-{rep}")
        r["plugin"] = timed(lambda: dcp.save(sd, storage_writer=ckpt.dcp.Writer(plugin_dir)))
        handle = []
        async_dir = os.path.join(out, f"async-n{world}-{rep}")
        r["async"] = timed(lambda: handle.append(cdist.async_save(sd, checkpoint_id=async_dir)))
        handle[0].result()
        # Into buffers made once, as async_save's staging buffers are
        # reused from the previous save.
        r["memcpy"] = timed(lambda: [b.copy_(v.to_local()) for b, v in zip(floor, sd.values())])
        if rep > 0:
            for k, v in r.items():
                best[k] = min(best.get(k, 1e30), v)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(async_dir)
            if rep < args.repeat:
                shutil.rmtree(ck_dir)
                shutil.rmtree(dcp_dir)
                shutil.rmtree(plugin_dir)
        dist.barrier()
    if rank == 0:
        gb = nbytes * world / 1e9
        print(f"save on {world} ranks: {TENSORS} DTensors, {nbytes * world / 2**20:.0f} MiB "
              f"({nbytes / 2**20:.0f} MiB per rank), best of {args.repeat}")
        for k, label in (("raw", "raw write()+fsync, a file per rank"),
                         ("ckpt", "ckpt.distributed.save"),
                         ("dcp", "dcp.save (FileSystemWriter)"),
                         ("plugin", "dcp.save (ckpt.dcp.Writer)"),
                         ("async", "ckpt.distributed.async_save, until it returns"),
                         ("memcpy", "copy of the rank's tensors into buffers")):
            print(f"  {label:<48} {best[k]:7.3f} s  {gb / best[k]:6.2f} GB/s")
        print(f"  ckpt save / raw: {best['raw'] / best['ckpt']:.2f} of raw bandwidth "
              f"(target >= 0.90)")
        print(f"  ckpt save vs dcp.save: {best['dcp'] / best['ckpt']:.2f}x (target >= 1.3)")
        print(f"  dcp.save with ckpt.dcp.Writer vs FileSystemWriter: "
              f"{best['dcp'] / best['plugin']:.2f}x")
        print(f"  async blocking / memcpy: {best['async'] / best['memcpy']:.2f} "
              f"(target <= 1.2)")
    _exit()


def load_phase(rank, world, init, args, out, saved):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import ckpt.dcp
    import ckpt.distributed as cdist
    mesh = init_device_mesh("cpu", (world,))
    plugin_dir = os.path.join(out, f"plugin-n{saved}-{args.repeat}")
    ck_dir = os.path.join(out, f"ckpt-n{saved}-{args.repeat}")
    dcp_dir = os.path.join(out, f"dcp-n{saved}-{args.repeat}")
    for placement, what in ((0, "dim 0"), (1, "dim 1")):
        res = {}
        stats, reader = [], ckpt.dcp.Reader(plugin_dir, verify=False)
        for name, fn in (("ckpt", lambda sd: stats.append(
                              cdist.load(sd, checkpoint_id=ck_dir, verify=False))),
                         ("dcp", lambda sd: dcp.load(sd, checkpoint_id=dcp_dir)),
                         ("plugin", lambda sd: dcp.load(sd, storage_reader=reader))):
            sd = state(mesh, args.rows, placement, fill=False)
            need = local_bytes(sd)
            dist.barrier()
            r0 = rchar()
            t = timed(lambda: fn(sd))
            read = rchar() - r0
            res[name] = (total(read) / total(need), t)
            # The values must be the saved ones: this rank's box of the
            # global tensor the saving ranks' seeds made.
            for i in range(TENSORS):
                local = sd[f"model.layer{i}.weight"].to_local()
                full = saved_global(i, args.rows, saved)
                if placement == 0:
                    n = args.rows // world
                    want = full[rank * n:(rank + 1) * n]
                else:
                    n = COLS // world
                    want = full[:, rank * n:(rank + 1) * n]
                assert torch.equal(local, want), (name, i)
        # ckpt's own count: bytes it read by pread plus bytes it copied from
        # the mapping (small runs; rchar does not see those).
        st = stats[-1]
        lib = total(st["bytes_read"]) / total(st["bytes_needed"])
        plug = total(reader.stats["bytes_read"]) / total(reader.stats["bytes_needed"])
        if rank == 0:
            print(f"load of a {saved}-rank save on {world} ranks, sharded on {what}: "
                  f"read / needed: ckpt {lib:.4f} by LoadStats, {res['ckpt'][0]:.4f} by "
                  f"rchar ({res['ckpt'][1]:.3f} s); dcp {res['dcp'][0]:.4f} by rchar "
                  f"({res['dcp'][1]:.3f} s); dcp.load with ckpt.dcp.Reader "
                  f"{plug:.4f} by LoadStats, {res['plugin'][0]:.4f} by rchar "
                  f"({res['plugin'][1]:.3f} s)")
    _exit()


def _exit():
    """destroy_process_group, then exit without finalizing Python: torch
    2.x's gloo worker threads may drop a tensor's last reference while the
    interpreter finalizes and abort the process (it happens with dcp alone
    too), which spawn reports as a failure."""
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def spawn(fn, world, *rest):
    fd, path = tempfile.mkstemp(prefix="ckpt-dist-init-")
    os.close(fd)
    os.unlink(path)
    mp.start_processes(fn, args=(world, "file://" + path) + rest, nprocs=world,
                       start_method="spawn")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total-mb", type=int, default=512)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = p.parse_args()
    if not hasattr(torch.distributed, "tensor") and torch.__version__ < "2":
        print("run_dist: needs torch 2.x (DTensor, DCP)")
        return 77
    per_tensor = args.total_mb * 2**20 // TENSORS
    args.rows = max(12, per_tensor // (COLS * 4) // 12 * 12)
    out = tempfile.mkdtemp(prefix="ckpt-bench-dist-", dir=args.dir)
    try:
        print(f"torch {torch.__version__}; {os.cpu_count()} cores; {out}")
        for n in (2, 4):
            spawn(save_phase, n, args, out)
        spawn(load_phase, 3, args, out, 4)
        spawn(load_phase, 2, args, out, 2)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
