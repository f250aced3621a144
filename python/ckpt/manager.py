"""CheckpointManager: numbered checkpoints in one directory, pruned safely.

The directory itself is the index: each checkpoint is one file
`step-<step>.ckpt` written atomically by ckpt.save (temporary file, fsync,
rename, fsync of the directory), with its step and metrics in the file's
metadata. So there is no index file to get out of step with the data:
after a crash at any moment every `step-*.ckpt` present is complete, and
latest() is the most recently saved one that opens. Each file also
records its place in the save order (a sequence number one above the
highest in the directory), and pruning goes by that order, not by step:
after a rollback (resuming from step 5 while steps 8-10 exist) the new
step-6 file is the newest and is kept, whatever its number. Old
checkpoints are removed only after the new one is durable, and the save
just made is never removed. One manager (one process; for sharded steps
one process group, whose coordinator prunes) writes a directory at a time.

Sharded steps (save_sharded, ckpt.distributed) are directories
`step-<step>` holding a manifest (docs/SHARDED.md), written by every rank
of a process group and committed by one rename; the step, metrics and
save order are in the manifest's metadata. A directory is one of them
only when its manifest reads and validates, so latest() never offers a
step whose save did not commit. Pruning renames a step's directory to
`.step-<step>.deleting` before removing its files, so a half-removed
step never looks complete. The temporary directories of saves
(`.step-<step>.tmp`) and such leftovers are swept by exact name only,
and a `.step-<step>.tmp` only when no writer holds a lock on a file in
it and nothing in it changed for _LIVE_GRACE_S seconds: a live save of
another rank or process is never touched (its ranks may reach the save
minutes apart).
"""
import fcntl
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from ._errors import CkptError
from ._load import load as _load, open as _open
from ._save import _save_file

_NAME = re.compile(r"^step-(\d+)\.ckpt$")
_TEMP = re.compile(r"^\.step-\d+\.ckpt\.tmp-")
# Sharded steps: a directory per step, its save's temporary directory
# (ckpt::dist::ShardPath's `.<name>.tmp`) and a pruned step being removed.
_DIR_NAME = re.compile(r"^step-(\d+)$")
_DIR_TEMP = re.compile(r"^\.step-\d+\.tmp$")
_DIR_DELETING = re.compile(r"^\.step-\d+\.deleting$")
_MANIFEST = "MANIFEST.ckptm"
# A save's temporary directory untouched this long, with no writer's lock
# in it, is a crashed save's.
_LIVE_GRACE_S = 600
_META_STEP = "ckpt.manager.step"
_META_METRICS = "ckpt.manager.metrics"
_META_SEQ = "ckpt.manager.seq"


def _remove_if_unlocked(path):
    """Unlinks a writer's temporary unless a live writer holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a live writer's
    try:
        st, now = os.fstat(fd), os.lstat(path)
        if (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _locked_inside(path):
    """True when a live writer holds the lock of a file in directory `path`."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    for name in names:
        try:
            fd = os.open(os.path.join(path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


def _newest_change(path):
    """The latest mtime of directory `path` and of what it holds."""
    newest = os.lstat(path).st_mtime
    for name in os.listdir(path):
        try:
            newest = max(newest, os.lstat(os.path.join(path, name)).st_mtime)
        except OSError:
            pass
    return newest


def _sweep_dir_if_dead(path, grace):
    """Removes a save's temporary directory unless the save may be live."""
    try:
        if _locked_inside(path) or time.time() - _newest_change(path) < grace:
            return
    except OSError:
        return
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    metrics: dict = field(default_factory=dict)
    # Place in the save order: higher is newer (0: written before ckpt kept it).
    seq: int = 0
    # A sharded step: `path` is a directory (ckpt.distributed), not a file.
    sharded: bool = False

    def _recency(self):
        return (self.seq, self.step)


class CheckpointManager:
    """CheckpointManager(directory, keep_last=N, keep_best=K,
    metric="val_loss", mode="min").

    keep_last: how many of the most recently saved checkpoints to keep
    (None: all); the save just made is always one of them.
    keep_best: how many of the best by `metric` to keep besides them.
    """

    def __init__(self, directory, keep_last=3, keep_best=0, metric=None, mode="min"):
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be at least 1 (or None to keep all)")
        if keep_best < 0:
            raise ValueError("keep_best must be >= 0")
        if keep_best and not metric:
            raise ValueError("keep_best needs metric=")
        if mode not in ("min", "max"):
            raise ValueError("mode is 'min' or 'max'")
        self.directory = os.fspath(directory)
        self.keep_last, self.keep_best, self.metric, self.mode = keep_last, keep_best, metric, mode
        os.makedirs(self.directory, exist_ok=True)
        self._sweep()

    def _sweep(self):
        """Removes what saves that a crash interrupted left behind, by
        exact name. ckpt's writer holds an exclusive flock on a temporary
        while it writes it, so one whose lock can be taken belongs to
        nobody; another process saving into this directory right now keeps
        its file."""
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if _TEMP.match(name):
                _remove_if_unlocked(path)
            elif _DIR_DELETING.match(name):
                shutil.rmtree(path, ignore_errors=True)
            elif _DIR_TEMP.match(name):
                _sweep_dir_if_dead(path, _LIVE_GRACE_S)

    def path_for(self, step):
        return os.path.join(self.directory, f"step-{step:010d}.ckpt")

    def sharded_path_for(self, step):
        """The directory of sharded step `step` (save_sharded)."""
        return os.path.join(self.directory, f"step-{step:010d}")

    def save(self, state, step, metrics=None, metadata=None, *, progress=False):
        """Saves `state` as checkpoint `step` (durable when this returns),
        then prunes. `metrics` is a dict of numbers stored with it. Returns
        its CheckpointInfo. progress= as in ckpt.save."""
        step, metrics, meta, seq = self._prepare(step, metrics, metadata)
        path = self.path_for(step)
        # SIGINT stays held from the commit until this method returns, so an
        # interrupt cannot split the save from its pruning (see _save_file).
        _deferred = _save_file(state, path, meta, True, progress)  # noqa: F841
        info = CheckpointInfo(step, path, metrics, seq)
        self._prune(info)
        return info

    def _prepare(self, step, metrics, metadata):
        step = int(step)
        if step < 0:
            raise ValueError("step must be >= 0")
        metrics = dict(metrics or {})
        for k, v in metrics.items():
            if not isinstance(k, str) or not isinstance(v, (int, float)):
                raise TypeError("metrics is a dict of str to numbers")
            metrics[k] = float(v)
        meta = dict(metadata or {})
        seq = 1 + max((i.seq for i in self.list()), default=0)
        meta[_META_STEP] = str(step)
        meta[_META_METRICS] = json.dumps(metrics, allow_nan=True)
        meta[_META_SEQ] = str(seq)
        return step, metrics, meta, seq

    def save_sharded(self, state_dict, step, metrics=None, metadata=None, *,
                     process_group=None, coordinator_rank=0, sync=True):
        """Saves `state_dict` as sharded step `step` with
        ckpt.distributed.save, collectively: every rank of `process_group`
        calls it with its own values (the coordinator's `metrics` are the
        ones kept). Once every rank has returned, the step is committed;
        the coordinator then prunes, as save() does, and sweeps leftovers.
        Returns its CheckpointInfo on every rank."""
        from . import distributed as cdist  # imports torch.distributed
        step, metrics, meta, seq = self._prepare(step, metrics, metadata)
        path = self.sharded_path_for(step)
        cdist.save(state_dict, path, process_group, coordinator_rank,
                   overwrite=os.path.isdir(path), sync=sync, metadata=meta)
        info = CheckpointInfo(step, path, metrics, seq, True)
        if self._group_rank(process_group) == coordinator_rank:
            self._prune(info)
            self._sweep()
        return info

    @staticmethod
    def _group_rank(process_group):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            return 0
        return dist.get_rank(process_group)

    def _read_sharded(self, name, step):
        path = os.path.join(self.directory, name)
        if not os.path.isfile(os.path.join(path, _MANIFEST)):
            return None  # a directory, but no committed sharded step
        try:
            from . import distributed as cdist
            meta = cdist.read_manifest(path).metadata
        except (CkptError, OSError, ImportError):
            return None  # not a valid manifest: never offered for resuming
        return self._info(path, step, meta, True)

    @staticmethod
    def _info(path, step, meta, sharded):
        try:
            metrics = json.loads(meta.get(_META_METRICS, "{}"))
        except ValueError:
            metrics = {}
        if not isinstance(metrics, dict):
            metrics = {}
        try:
            seq = max(0, int(meta.get(_META_SEQ, "0")))
        except ValueError:
            seq = 0
        return CheckpointInfo(step, path, metrics, seq, sharded)

    def _read(self, name, step):
        path = os.path.join(self.directory, name)
        try:
            with _open(path) as f:
                meta = f.metadata
        except (CkptError, OSError):
            return None  # not a complete ckpt file: never offered for resuming
        return self._info(path, step, meta, False)

    def list(self):
        """Every complete checkpoint (files and sharded steps), oldest
        step first."""
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            info = None
            if m:
                info = self._read(name, int(m.group(1)))
            else:
                m = _DIR_NAME.match(name)
                if m:
                    info = self._read_sharded(name, int(m.group(1)))
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda i: (i.step, i.sharded))

    def latest(self):
        """The most recently saved checkpoint, or None. That is the highest
        step unless steps were saved out of order (after a rollback, the
        newest save wins)."""
        return max(self.list(), key=CheckpointInfo._recency, default=None)

    def _ranked(self, infos):
        def value(i):
            v = i.metrics.get(self.metric)
            return None if v is None or math.isnan(v) else v
        sign = 1 if self.mode == "min" else -1  # best first; ties: newest save first
        scored = [i for i in infos if value(i) is not None]
        return sorted(scored, key=lambda i: (sign * value(i), -i.seq, -i.step))

    def best(self):
        """The checkpoint with the best `metric` (ties: the newest save), or None."""
        if not self.metric:
            raise ValueError("best() needs the manager's metric=")
        ranked = self._ranked(self.list())
        return ranked[0] if ranked else None

    def load_latest(self, map_location=None, **kwargs):
        """ckpt.load of latest(), or None when there is none yet. Keywords
        go to ckpt.load: progress=True shows a bar of the bytes loaded, a
        callable progress(done, total) is called instead."""
        info = self.latest()
        if info is not None and info.sharded:
            raise ValueError(f"the latest checkpoint, step {info.step}, is sharded "
                             f"({info.path}): load it with load_latest_sharded(state_dict)")
        return None if info is None else _load(info.path, map_location, **kwargs)

    def load_latest_sharded(self, state_dict, process_group=None, **kwargs):
        """ckpt.distributed.load of the most recently saved sharded step
        into `state_dict` (in place, resharding), collectively; returns
        its CheckpointInfo, or None when there is none yet. Keywords go to
        ckpt.distributed.load."""
        from . import distributed as cdist
        info = max((i for i in self.list() if i.sharded), key=CheckpointInfo._recency,
                   default=None)
        if info is not None:
            cdist.load(state_dict, info.path, process_group, **kwargs)
        return info

    def _prune(self, new):
        """Keeps the keep_last most recent saves (by save order, never by
        step), the keep_best best, and always `new`, the save just made."""
        if self.keep_last is None:
            return
        infos = self.list()
        recent = sorted(infos, key=CheckpointInfo._recency, reverse=True)
        keep = {new.path} | {i.path for i in recent[:self.keep_last]}
        if self.keep_best and self.metric:
            keep |= {i.path for i in self._ranked(infos)[:self.keep_best]}
        for i in infos:
            if i.path in keep:
                continue
            if i.sharded:
                # Out of sight first (one rename), then its files: a step
                # half removed never looks complete.
                gone = os.path.join(self.directory, "." + os.path.basename(i.path) + ".deleting")
                shutil.rmtree(gone, ignore_errors=True)  # a crashed pruning's
                try:
                    os.rename(i.path, gone)
                except OSError:
                    continue
                shutil.rmtree(gone, ignore_errors=True)
                continue
            try:
                os.unlink(i.path)
            except FileNotFoundError:
                pass
