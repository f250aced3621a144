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
except ImportError:
    HAVE = False


# ---- what every rank runs ---------------------------------------------------------------

def _model():
    torch.manual_seed(1234)
    # Uneven on 3 ranks (10 and 7 rows), so a resume there reshards.
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                               torch.nn.Linear(10, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3))


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
    import torch.distributed.checkpoint as dcp
    import ckpt.dcp
    model, opt = _setup(world)
    _train(model, opt, range(K), rank, world)
    sd = _state(model, opt, epoch=K)
    dcp.save(sd, storage_writer=ckpt.dcp.Writer(f"{base}/ckpt"))
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(f"{base}/fs"))
    at_k = _full(model, opt)
    if rank == 0:
        _save_bytes(at_k, f"{base}/at_k.pt")

    # One rank failing mid-write: dcp.save raises on every rank, and the
    # directory keeps the checkpoint it had.
    class Failing(ckpt.dcp.Writer):
        def write_data(self, plan, planner):
            if rank == 2:
                class P:
                    def __init__(self):
                        self.n = 0

                    def resolve_data(self, item):
                        self.n += 1
                        if self.n == 2:
                            raise OSError(28, "No space left on device (injected)")
                        return planner.resolve_data(item)
                return super().write_data(plan, P())
            return super().write_data(plan, planner)
    try:
        dcp.save(_state(model, opt, epoch=99), storage_writer=Failing(f"{base}/ckpt"))
    except dcp.api.CheckpointException as e:  # (a BaseException)
        assert "No space left on device (injected)" in str(e), e
    else:
        raise AssertionError("a save with a failing rank returned")
    # (phase_resume finds epoch K there, not 99.)

    # async_save: the state at step K, while training goes on.
    fut = dcp.async_save(_state(model, opt, epoch=K),
                         storage_writer=ckpt.dcp.Writer(f"{base}/async", sync=False))
    fut.result()
    _train(model, opt, range(K, K + J), rank, world)
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
