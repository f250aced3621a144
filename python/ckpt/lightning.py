"""ckpt as Lightning's checkpoint format: a CheckpointIO plug-in.

    import lightning as L
    from ckpt.lightning import CkptCheckpointIO
    trainer = L.Trainer(plugins=[CkptCheckpointIO()],
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(save_last=True)])
    trainer.fit(model)                      # .ckpt files in ckpt's format
    trainer.fit(model, ckpt_path="last")    # resumes from them

Every checkpoint Lightning writes (ModelCheckpoint's top-k and last,
trainer.save_checkpoint) becomes a ckpt file: committed atomically with
fsyncs (a crash mid-save leaves the previous file), checksummed, and loaded
without unpickling anything, whatever `weights_only` says: the model,
optimizer, scheduler and loop state are stored as typed values, and a value
ckpt cannot hold is refused at save time, by its path in the checkpoint.

Lightning reads checkpoints through the plug-in only inside a Trainer.
`LightningModule.load_from_checkpoint` (and strategies that checkpoint on
their own, FSDPStrategy's sharded state and DeepSpeed) call torch.load,
which cannot read a ckpt file: use `ckpt.lightning.load_from_checkpoint
(Model, path)` for the former.
"""
import os

from ._load import load as _load
from ._save import save as _save
from .rng import get_state as get_rng_state
from .rng import set_state as set_rng_state

try:  # the unified package, then the standalone one
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover - depends on what is installed
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from pytorch_lightning.callbacks import Callback as _Callback

__all__ = ["CkptCheckpointIO", "RngState", "load_from_checkpoint"]


def _local(path):
    """`path` as a local file name; a URL (s3://, gs://, hdfs://...) is
    refused up front, where torch's CheckpointIO would hand it to fsspec:
    ckpt writes and maps local files only."""
    path = os.fspath(path)
    if "://" in path:
        from ._errors import InvalidArgumentError
        raise InvalidArgumentError(
            f"{path}: CkptCheckpointIO writes local files only (ckpt maps them); use a local "
            "or mounted directory for ModelCheckpoint(dirpath=...), or Lightning's default "
            "TorchCheckpointIO for remote storage")
    return path


class CkptCheckpointIO(CheckpointIO):
    """Saves and loads Lightning checkpoints as ckpt files.

    `sync` (default True) fsyncs each file and its directory before the
    save returns; `metadata` (str -> str) goes into every file's metadata.
    `storage_options` of Trainer.save_checkpoint may be a dict with a
    "metadata" entry for that file alone."""

    def __init__(self, *, sync=True, metadata=None):
        super().__init__()
        self.sync = bool(sync)
        self.metadata = dict(metadata or {})

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        meta = dict(self.metadata)
        if storage_options is not None:
            if not isinstance(storage_options, dict) or set(storage_options) - {"metadata"}:
                raise TypeError("CkptCheckpointIO takes storage_options={'metadata': {str: "
                                f"str}}, not {storage_options!r}")
            meta.update(storage_options.get("metadata") or {})
        path = _local(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        _save(checkpoint, path, metadata=meta or None, sync=self.sync)

    def load_checkpoint(self, path, map_location="cpu", weights_only=None):
        """Loads a ckpt file, or a .pth one that TorchCheckpointIO wrote
        before the switch (through ckpt's restricted importer). Neither
        runs code from the file, so `weights_only` changes nothing. Tensors
        land on the CPU unless map_location says otherwise, as with
        TorchCheckpointIO (Lightning's strategy moves them after)."""
        path = _local(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return _load(path, map_location=map_location)

    def remove_checkpoint(self, path):
        path = _local(path)
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def load_from_checkpoint(cls, path, map_location="cpu", strict=None, **kwargs):
    """`cls.load_from_checkpoint(path, ...)` for a checkpoint CkptCheckpointIO
    wrote (cls a LightningModule or LightningDataModule subclass): the
    model built from the saved hyperparameters (kwargs override them) with
    its state dict loaded, the way Lightning's own does it (its checkpoint
    migration and hparams rules, which live in lightning.pytorch.core.saving
    and are called here), the file read by ckpt instead of torch.load."""
    import lightning.pytorch as pl
    from lightning.pytorch.core.saving import _load_state
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint
    path = _local(path)
    checkpoint = _pl_migrate_checkpoint(_load(path, map_location=map_location),
                                        checkpoint_path=path)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    return _load_state(cls, checkpoint, strict=strict, **kwargs)


class RngState(_Callback):
    """Saves every random generator a run draws from (python, numpy, torch
    CPU and CUDA: ckpt.rng) in each checkpoint and restores them on
    resume, so that shuffling, dropout and augmentation after a resume draw
    what an uninterrupted run would have drawn. (Lightning itself does not
    save them.) Under DDP each rank's generators are gathered into the one
    checkpoint rank 0 writes, and each rank gets its own back on resume (a
    resume on another number of ranks: ranks past the saved count get rank
    0's, with a warning). Set num_sanity_val_steps=0 for a bit-identical
    resume: a sanity check draws from torch's generator after the restore."""

    @staticmethod
    def _world():
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist, dist.get_rank(), dist.get_world_size()
        return None, 0, 1

    def state_dict(self):
        # Lightning builds the checkpoint on every rank (rank 0 writes it),
        # so this gather is a collective all ranks reach.
        state = get_rng_state()
        dist, _, world = self._world()
        if dist is None or world == 1:
            return {"rng": state}
        states = [None] * world
        dist.all_gather_object(states, state)
        return {"rng": states[0], "rng_per_rank": states}

    def load_state_dict(self, state_dict):
        per = state_dict.get("rng_per_rank")
        _, rank, world = self._world()
        if per is not None and rank < len(per):
            set_rng_state(per[rank])
            return
        if per is not None:
            import warnings
            warnings.warn(f"RngState: the checkpoint holds {len(per)} ranks' generators, this "
                          f"is rank {rank} of {world}: it resumes with rank 0's")
        set_rng_state(state_dict["rng"])
