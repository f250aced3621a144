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
just made is never removed. One manager (one process) writes a directory
at a time.
"""
import fcntl
import json
import math
import os
import re
from dataclasses import dataclass, field

from ._errors import CkptError
from ._load import load as _load, open as _open
from ._save import _save_file

_NAME = re.compile(r"^step-(\d+)\.ckpt$")
_TEMP = re.compile(r"^\.step-\d+\.ckpt\.tmp-")
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


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str
    metrics: dict = field(default_factory=dict)
    # Place in the save order: higher is newer (0: written before ckpt kept it).
    seq: int = 0

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
        # Temporaries left by a save that a crash interrupted. ckpt's writer
        # holds an exclusive flock on a temporary while it writes it, so one
        # whose lock can be taken belongs to nobody; another process saving
        # into this directory right now keeps its file.
        for name in os.listdir(self.directory):
            if _TEMP.match(name):
                _remove_if_unlocked(os.path.join(self.directory, name))

    def path_for(self, step):
        return os.path.join(self.directory, f"step-{step:010d}.ckpt")

    def save(self, state, step, metrics=None, metadata=None, *, progress=False):
        """Saves `state` as checkpoint `step` (durable when this returns),
        then prunes. `metrics` is a dict of numbers stored with it. Returns
        its CheckpointInfo. progress= as in ckpt.save."""
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
        path = self.path_for(step)
        # SIGINT stays held from the commit until this method returns, so an
        # interrupt cannot split the save from its pruning (see _save_file).
        _deferred = _save_file(state, path, meta, True, progress)  # noqa: F841
        info = CheckpointInfo(step, path, metrics, seq)
        self._prune(info)
        return info

    def _read(self, name, step):
        path = os.path.join(self.directory, name)
        try:
            with _open(path) as f:
                meta = f.metadata
        except (CkptError, OSError):
            return None  # not a complete ckpt file: never offered for resuming
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
        return CheckpointInfo(step, path, metrics, seq)

    def list(self):
        """Every complete checkpoint, oldest step first."""
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m:
                info = self._read(name, int(m.group(1)))
                if info is not None:
                    found.append(info)
        return sorted(found, key=lambda i: i.step)

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
        return None if info is None else _load(info.path, map_location, **kwargs)

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
            if i.path not in keep:
                try:
                    os.unlink(i.path)
                except FileNotFoundError:
                    pass
