"""ckpt.dcp: ckpt as torch.distributed.checkpoint's storage plug-in, run
with DCP's own planners under gloo (spawned processes, file:// init).

The resume test trains a small MLP under FSDP2 (fully_shard) with Adam on 4
CPU ranks, saves it at step K twice, through ckpt.dcp.Writer and through
DCP's FileSystemWriter, and goes on to step K+J. New jobs of 4, 2 and 3
ranks then load each checkpoint (ckpt.dcp.Reader, FileSystemReader) and
train on to K+J: every one must start from exactly the saved state, bit for
bit (full model and optimizer state), and on 4 ranks end bit-identical to
the uninterrupted run. On 2 and 3 ranks the gradients are summed in another
order, so the run cannot match the 4-rank one bit for bit: there the ckpt
resume must match the FileSystemReader resume of the same world size bit
for bit (and the 4-rank end within float tolerance).

Needs torch 2.4+ (FSDP2, DCP's StorageMeta); skipped, visibly, under 1.13.
"""
import datetime
import io
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import unittest

import torch

K, J = 3, 2           # steps before the save, steps after it
BATCH = 12            # rows per step: divisible by 2, 3 and 4 ranks
TIMEOUT_S = 300

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    import torch.distributed.checkpoint as _dcp  # noqa: F401
    from torch.distributed.checkpoint.metadata import StorageMeta  # noqa: F401
    HAVE = True
except Exception:  # noqa: BLE001 - 1.13's fsdp does not even import on Python 3.11
    HAVE = False


# ---- what every rank runs ---------------------------------------------------------------

def _model():
    torch.manual_seed(1234)
    # Uneven on 3 ranks (10 and 7 rows), so a resume there reshards.
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                               torch.nn.Linear(10, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3))


class Opaque:
    """An object a torch.save pickle holds by reference to its class."""


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def _setup(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, steps, rank, world):
    for step in steps:
        x, y = _batch(step)
        rows = BATCH // world
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _state(model, opt, epoch):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "extra": {"epoch": epoch, "note": "mid-run"}}


def _full(model, opt):
    """Every tensor of the model's and optimizer's state, whole, by name
    (collective: DTensors gathered)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    out = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, torch.Tensor):
            t = x.full_tensor() if hasattr(x, "full_tensor") else x
            out[prefix] = t.detach().clone()
        else:
            out[prefix] = x
    walk("model", msd)
    walk("optim", osd)
    return out


def _save_bytes(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _same(a, b, what):
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {k}"
            assert torch.equal(x.view(torch.uint8) if x.dim() else x.reshape(1).view(torch.uint8),
                               y.view(torch.uint8) if y.dim() else y.reshape(1).view(torch.uint8)), \
                f"{what}: {k} differs"
        else:
            assert x == y, f"{what}: {k}: {x!r} != {y!r}"


def phase_train(rank, world, base):
    """4 ranks: K steps, both saves, J more steps; the failure and async
    cases on the same group."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import ckpt.dcp
    model, opt = _setup(world)
    _train(model, opt, range(K), rank, world)
    sd = _state(model, opt, epoch=K)
    class Counting(ckpt.dcp.Writer):  # which shards the commit took records of
        carried = None

        def finish(self, metadata, results):
            self.carried = sorted(wr.storage_data.rank for rr in results for wr in rr
                                  if wr.storage_data.record is not None)
            return super().finish(metadata, results)
    w = Counting(f"{base}/ckpt")
    dcp.save(sd, storage_writer=w)
    if rank == 0:  # every rank's record reached the coordinator: no read-back
        assert w.carried == list(range(world)), w.carried
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(f"{base}/fs"))
    at_k = _full(model, opt)
    if rank == 0:
        _save_bytes(at_k, f"{base}/at_k.pt")

    # One rank failing mid-write: dcp.save raises on every rank, and the
    # directory keeps the checkpoint it had; the next save there sweeps the
    # failed one's hidden leftovers.
    class Failing(ckpt.dcp.Writer):
        def write_data(self, plan, planner):
            if rank == 2:
                class P:
                    def __init__(self):
                        self.n = 0

                    def resolve_data(self, item):
                        self.n += 1
                        if self.n == 1:
                            raise OSError(28, "No space left on device (injected)")
                        return planner.resolve_data(item)
                return super().write_data(plan, P())
            return super().write_data(plan, planner)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))

    def rows(v):  # every rank holds a part, so rank 2 has items to fail on
        return distribute_tensor(torch.full((8,), v), mesh, [Shard(0)])
    fail = f"{base}/fail"
    dcp.save({"x": rows(0.0), "epoch": K}, storage_writer=ckpt.dcp.Writer(fail, sync=False))
    try:
        dcp.save({"x": rows(9.0), "epoch": 99}, storage_writer=Failing(fail))
    except dcp.api.CheckpointException as e:  # (a BaseException)
        assert "No space left on device (injected)" in str(e), e
    else:
        raise AssertionError("a save with a failing rank returned")
    kept = {"x": torch.zeros(8), "epoch": -1}
    dcp.load(kept, storage_reader=ckpt.dcp.Reader(fail))
    assert kept["epoch"] == K and torch.equal(kept["x"], torch.zeros(8)), kept
    dist.barrier()
    assert os.path.isdir(f"{base}/.fail.tmp")  # documented: DCP has no failure hook
    dist.barrier()
    dcp.save({"x": torch.ones(8), "epoch": 5}, storage_writer=ckpt.dcp.Writer(fail, sync=False))
    assert not os.path.exists(f"{base}/.fail.tmp")

    # A Reader used again, with no checkpoint_id, reads what is there now.
    reader = ckpt.dcp.Reader(fail)
    got = {"x": torch.zeros(8), "epoch": -1}
    dcp.load(got, storage_reader=reader)
    assert got["epoch"] == 5
    dcp.save({"x": torch.full((8,), 2.0), "epoch": 6},
             storage_writer=ckpt.dcp.Writer(fail, sync=False))
    dcp.load(got, storage_reader=reader)
    assert got["epoch"] == 6 and torch.equal(got["x"], torch.full((8,), 2.0)), got

    # What is at the target is checked before any rank writes.
    os.makedirs(f"{base}/ahead", exist_ok=True)  # empty: replaced
    dcp.save({"x": torch.ones(2)}, storage_writer=ckpt.dcp.Writer(f"{base}/ahead", sync=False))
    if rank == 0:
        os.makedirs(f"{base}/foreign")
        open(f"{base}/foreign/notes.txt", "w").close()
    dist.barrier()
    for target, w, says in ((f"{base}/foreign", ckpt.dcp.Writer(f"{base}/foreign"),
                             "not a ckpt sharded checkpoint"),
                            (fail, ckpt.dcp.Writer(fail, overwrite=False), "exists")):
        try:
            dcp.save({"x": torch.ones(2)}, storage_writer=w)
        except dcp.api.CheckpointException as e:
            assert says in str(e), e
        else:
            raise AssertionError(f"a save over {target} returned")
    assert os.path.exists(f"{base}/foreign/notes.txt")
    assert not os.path.exists(f"{base}/.foreign.tmp")  # refused before any write

    # A value that would need code to load is refused at save, by its key.
    try:
        dcp.save({"x": torch.ones(2), "obj": Opaque()},
                 storage_writer=ckpt.dcp.Writer(f"{base}/opaque", sync=False))
    except dcp.api.CheckpointException as e:
        assert "obj: ckpt.dcp stores non-tensor values as plain data" in str(e), e
    else:
        raise AssertionError("a save of an object returned")

    # async_save: the state at step K, while training goes on (its own gloo
    # group, as DCP advises: the training's collectives run meanwhile).
    pg = dist.new_group(backend="gloo")
    fut = dcp.async_save(_state(model, opt, epoch=K), process_group=pg,
                         storage_writer=ckpt.dcp.Writer(f"{base}/async", sync=False))
    _train(model, opt, range(K, K + J), rank, world)
    fut.result()
    end = _full(model, opt)
    if rank == 0:
        _save_bytes(end, f"{base}/end4.pt")


def _resume(model, opt, reader):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    sd = _state(model, opt, epoch=-1)
    dcp.load(sd, storage_reader=reader)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return sd["extra"]


def phase_resume(rank, world, base):
    import torch.distributed.checkpoint as dcp
    import ckpt.dcp
    at_k = torch.load(f"{base}/at_k.pt", weights_only=True)
    if rank == 0:
        # Non-tensor values are typed values in a shard's rank-local tree
        # (no pickle in the files); DCP's metadata records where and what.
        import glob
        values = {}
        for f in sorted(glob.glob(f"{base}/ckpt/shard-*.ckpt")):
            values.update(ckpt.load(f).get("rank_local", {}).get("torch.dcp.values", {}))
        assert values["extra.epoch"] == K and values["extra.note"] == "mid-run", values
        assert type(values["extra.epoch"]) is int
        md = ckpt.dcp.Reader(f"{base}/ckpt").read_metadata()
        assert md.storage_meta.checkpoint_id == f"{base}/ckpt", md.storage_meta
        assert md.version == "1.0.0", md.version
    ends = {}
    for name, reader in (("ckpt", ckpt.dcp.Reader(f"{base}/ckpt")),
                         ("fs", dcp.FileSystemReader(f"{base}/fs")),
                         ("async", ckpt.dcp.Reader(f"{base}/async"))):
        model, opt = _setup(world)
        extra = _resume(model, opt, reader)
        assert extra == {"epoch": K, "note": "mid-run"}, (name, extra)
        _same(at_k, _full(model, opt), f"{name} loaded on {world} ranks")
        if name == "ckpt":
            st = reader.stats
            assert st["bytes_read"] == st["bytes_needed"], st
        _train(model, opt, range(K, K + J), rank, world)
        ends[name] = _full(model, opt)
    # The saved weights into DTensors sharded on dim 1 (strided local
    # views: read through a buffer) and into float64 ones (converted).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    for dtype in (torch.float32, torch.float64):
        sd = {"model": {k[len("model/"):]: distribute_tensor(torch.zeros(v.shape, dtype=dtype),
                                                             mesh, [Shard(v.dim() - 1)])
                        for k, v in at_k.items() if k.startswith("model/")}}
        dcp.load(sd, storage_reader=ckpt.dcp.Reader(f"{base}/ckpt"))
        for k, v in sd["model"].items():
            assert torch.equal(v.full_tensor(), at_k[f"model/{k}"].to(dtype)), (dtype, k)
    _same(ends["fs"], ends["ckpt"], f"ckpt vs FileSystemReader resume on {world} ranks")
    _same(ends["ckpt"], ends["async"], f"async_save resume on {world} ranks")
    end4 = torch.load(f"{base}/end4.pt", weights_only=True)
    if world == 4:
        _same(end4, ends["ckpt"], "resume on 4 ranks vs the uninterrupted run")
    else:
        for k, v in end4.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.allclose(v, ends["ckpt"][k], rtol=1e-4, atol=1e-5), k


def _worker(rank, world, phase, base):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{base}/init-{phase}-{world}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    import ckpt.distributed  # noqa: F401
    try:
        globals()[phase](rank, world, base)
        r = "ok"
    except BaseException:  # noqa: BLE001 - recorded for the test method
        r = traceback.format_exc()
    with open(f"{base}/out-{phase}-{world}.{rank}", "w") as f:
        f.write(r)
    if r != "ok":
        os._exit(1)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see docs/PYTHON.md: torch 2.x gloo threads at interpreter exit


def _run_phase(phase, world, base):
    """Runs `phase` on `world` spawned ranks in a process whose __main__ is
    this file. Returns the records of the ranks."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), phase, str(world), base],
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    recs = []
    for rank in range(world):
        p = f"{base}/out-{phase}-{world}.{rank}"
        recs.append(open(p).read() if os.path.exists(p) else f"no record (exit "
                    f"{r.returncode}: {r.stderr[-3000:]})")
    return recs


@unittest.skipUnless(HAVE, f"torch {torch.__version__} has no FSDP2 / DCP StorageMeta "
                     "(ckpt.dcp needs torch 2.4+)")
class FsdpResumeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix="ckpt-dcp-")
        cls.train = _run_phase("phase_train", 4, cls.base)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, ignore_errors=True)

    def check(self, recs):
        bad = [f"rank {i}:\n{r}" for i, r in enumerate(recs) if r != "ok"]
        if bad:
            self.fail("\n".join(bad))

    def test_0_train_save_failure_async_on_4(self):
        self.check(self.train)

    def test_resume_on_4_bit_identical(self):
        self.check(self.train)
        self.check(_run_phase("phase_resume", 4, self.base))

    def test_resume_on_2(self):
        self.check(self.train)
        self.check(_run_phase("phase_resume", 2, self.base))

    def test_resume_on_3(self):
        self.check(self.train)
        self.check(_run_phase("phase_resume", 3, self.base))


@unittest.skipUnless(HAVE, f"torch {torch.__version__}: ckpt.dcp needs torch 2.4+")
class MetadataTest(unittest.TestCase):
    """What needs no group: the typed metadata's refusals."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ckpt-dcp-md-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _dir(self, meta_json):
        """A one-rank sharded checkpoint of one tensor whose manifest holds
        `meta_json` as DCP's metadata."""
        from ckpt import _ckpt
        import ckpt.dcp
        d = os.path.join(self.tmp, f"c{len(os.listdir(self.tmp))}")
        w = _ckpt.Writer(_ckpt.dist_shard_path(d, 0, 1), sync=False)
        from ckpt._dtypes import TORCH_TO_CODE
        n = w.add_chunk("w", TORCH_TO_CODE[torch.float32], [2, 2], [0, 0], [2, 2],
                        torch.zeros(4, dtype=torch.float32).view(torch.uint8).numpy())
        w.set_shard_root([n], None, None, 0, 1)
        w.commit()
        meta = {} if meta_json is None else {ckpt.dcp.METADATA_KEY: meta_json}
        _ckpt.dist_commit_written(d, 1, 0, False, False, meta)
        return d

    def read(self, meta_json):
        import ckpt.dcp
        return ckpt.dcp.Reader(self._dir(meta_json)).read_metadata()

    def test_plain_sharded_checkpoint_gives_its_tensors(self):
        md = self.read(None)
        m = md.state_dict_metadata["w"]
        self.assertEqual(m.size, torch.Size([2, 2]))
        self.assertEqual(m.properties.dtype, torch.float32)
        self.assertEqual([tuple(c.sizes) for c in m.chunks], [(2, 2)])

    def test_hostile_metadata_is_refused_by_name(self):
        import ckpt
        good = ('{"format":"ckpt.dcp/1","tensors":{},"bytes":{},"planner_data":null,'
                '"storage_meta":null}')
        self.read(good)
        cases = {
            "not json": "not JSON",
            '{"format":"other"}': "not ckpt.dcp/1",
            good.replace('"tensors":{}', '"tensors":{"w":{"dtype":"torch.nn"}}'):
                "not a torch dtype",
            good.replace('"tensors":{}', '"tensors":{"w":{"dtype":"torch.int64"}}'):
                "the manifest",
            good.replace('"tensors":{}', '"tensors":{"ghost":{"dtype":"torch.int64"}}'):
                "does not hold",
            good.replace('"bytes":{}', '"bytes":{"w":0}'): "both a tensor and bytes",
            good.replace('"bytes":{}', '"bytes":{"x":5}'): "name file 5",
            good.replace('"planner_data":null', '"planner_data":{"eval":"os.system"}'):
                "not a value ckpt.dcp writes",
            good.replace('"planner_data":null', '"planner_data":{"dict":[[{"list":[]},1]]}'):
                "does not decode",
            good.replace('"planner_data":null', '"planner_data":' + '{"list":[' * 5000 +
                         ']}' * 5000): "not JSON",
            good.replace('"tensors":{}', '"tensors":{"w":"x"}'): "not dict",
            good.replace('"tensors":{}', '"tensors":{"w":{"dtype":"torch.float32",'
                         '"strides":["2",1]}}'): "are not ints",
            good.replace('"tensors":{}', '"tensors":{"w":{"dtype":"torch.float32",'
                         '"requires_grad":"false"}}'): "'requires_grad'",
            good.replace('"storage_meta":null', '"storage_meta":{"modules":"abc"}'):
                "'modules'",
            good.replace('"storage_meta":null', '"storage_meta":null,"version":3'):
                "'version'",
        }
        for doc, says in cases.items():
            with self.subTest(doc=doc[:60]):
                with self.assertRaises(ckpt.FormatError) as cm:
                    self.read(doc)
                self.assertIn(says, str(cm.exception))
                self.assertIn("MANIFEST.ckptm", str(cm.exception))

    def test_planner_data_round_trips_and_refuses_objects(self):
        from ckpt.dcp import _decode, _encode
        x = {"a": ("b", 1), "c": [torch.Size([2, 3]), None, 1.5, True], 4: {"d": ()}}
        self.assertEqual(_decode(_encode(x, "t"), "t"), x)
        with self.assertRaises(TypeError) as cm:
            _encode({"f": object()}, "the planner's data")
        self.assertIn("object cannot be stored without pickle", str(cm.exception))

    def test_a_dcp_directory_is_named_not_misread(self):
        import ckpt
        import ckpt.dcp
        d = os.path.join(self.tmp, "dcp")
        os.makedirs(d)
        open(os.path.join(d, ".metadata"), "wb").close()
        with self.assertRaises(ckpt.InvalidArgumentError) as cm:
            ckpt.dcp.Reader(d).read_metadata()
        self.assertIn("FileSystemReader", str(cm.exception))


if __name__ == "__main__":
    import torch.multiprocessing as mp
    phase, world, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    procs = [mp.get_context("spawn").Process(target=_worker, args=(r, world, phase, base))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S - 30)
    for p in procs:
        if p.is_alive():
            p.kill()
    sys.exit(1 if any(p.exitcode for p in procs) else 0)
