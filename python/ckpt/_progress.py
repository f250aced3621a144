"""Progress reports for long work (ckpt.load, ckpt.save, conversions).

Every API with a `progress=` keyword takes:
- False or None (the default): nothing is shown and nothing is counted;
- True: a bar on stderr, tqdm's if tqdm is installed, else one plain line
  redrawn with a carriage return; bytes done of the total and GB/s;
- a callable progress(done_bytes, total_bytes), for other UIs: called
  from the thread that does the work, first with done = 0, then as
  storages are read or written (per storage or per batch of at least
  64 MiB, but no more often than every 1/256 of the total), last with
  done == total once the work is finished (a save: its file committed),
  never before; done never decreases and a (done, total) pair never
  repeats. An exception from it stops the work and propagates.
"""
import contextlib
import os
import sys
import time

# Work is reported in batches of at least this many bytes (a copying load
# splits its parallel read into such batches so that the bar moves).
BATCH = 64 << 20
# ...and told to the sink at most this many times per job (plus first and
# last), however many storages it has: 10,000 small tensors make 10,000
# add()s but only this many calls into tqdm or the user's function.
STEPS = 256


def check(progress):
    """TypeError unless `progress` is a valid progress= argument."""
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise TypeError("progress must be True, False, None or a callable "
                        f"progress(done, total), not {type(progress).__name__}")


def reporter(progress, total, desc):
    """A Reporter for a progress= argument, or None when it is off."""
    check(progress)
    if progress is None or progress is False:
        return None
    return Reporter(_bar(desc) if progress is True else progress, total)


def describe(what, path):
    """The bar's label: 'ckpt.load model.ckpt'."""
    try:
        name = os.path.basename(os.fspath(path))
    except TypeError:
        name = ""
    return f"{what} {name}" if name else what


class Reporter:
    """Counts bytes done of a total and tells its sink, never past the
    total and never the same (done, total) twice in a row."""

    def __init__(self, sink, total):
        self.sink, self.done = sink, 0
        self._set_total(total)
        self._last = None  # the (done, total) last told
        self._closed = False
        self._tell()

    def _set_total(self, total):
        self.total = int(total)
        self._step = max(1, self.total // STEPS)
        self._next = 0  # tell the sink once done reaches this (or the total)

    def _tell(self):
        # done == total only from close(): for a save, once the file is
        # committed, so a sink that logs "saved" at 100% is right.
        cap = self.total if self._closed else max(0, self.total - 1)
        now = (min(self.done, cap), self.total)
        if now != self._last:
            self._last = now
            self._next = now[0] + self._step
            self.sink(*now)

    def add(self, n):
        self.done += n
        if self.done >= self._next or self.done >= self.total:
            self._tell()

    def at(self, done):
        """Sets done (a count from C++'s own progress calls); never lowers it."""
        if done > self.done:
            self.done = done
        if self.done >= self._next or self.done >= self.total:
            self._tell()

    def expect(self, n):
        """The work left is n bytes from here: total = done + n (the second
        part of a two-part job, such as a .pth load's load after its
        conversion)."""
        self._set_total(self.done + n)
        self._next = self.done  # the first add() of the new part is told

    @contextlib.contextmanager
    def closing(self):
        """close() when the block ends normally, abandon() when it raises."""
        try:
            yield self
        except BaseException:
            self.abandon()
            raise
        self.close()

    def close(self):
        """The work is done: reports done == total, then closes a bar."""
        if self._closed:
            return
        self._closed = True
        self.done = self.total
        try:
            self._tell()
        finally:
            self._end()

    def abandon(self):
        """The work failed: closes a bar without claiming it finished."""
        if not self._closed:
            self._closed = True
            self._end()

    def _end(self):
        if isinstance(self.sink, (_TqdmSink, _PlainLine)):  # never a user's object
            self.sink.close()


def _bar(desc):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainLine(desc)
    return _TqdmSink(tqdm, desc)


class _TqdmSink:
    """(done, total) calls onto a tqdm bar in bytes (tqdm shows GB/s)."""

    def __init__(self, tqdm, desc):
        self._tqdm, self._desc, self._bar, self._n = tqdm, desc, None, 0

    def __call__(self, done, total):
        if self._bar is None:
            self._bar = self._tqdm(total=total, desc=self._desc, unit="B",
                                   unit_scale=True, unit_divisor=1000,
                                   dynamic_ncols=True)
        elif self._bar.total != total:
            self._bar.total = total
        if done > self._n:
            self._bar.update(done - self._n)
            self._n = done

    def close(self):
        if self._bar is not None:
            self._bar.close()


def _gb(n):
    return f"{n / 1e9:.2f}"


class _PlainLine:
    """One line on stderr, redrawn at most ten times a second:
    'ckpt.load m.ckpt: 1.20/4.00 GB  30%  2.41 GB/s'; ends with a newline."""

    def __init__(self, desc, stream=None):
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.last = None  # when the line was last drawn
        self.width = 0
        self.drawn = False

    def __call__(self, done, total):
        now = time.perf_counter()
        if self.last is not None and done < total and now - self.last < 0.1:
            return
        self.last = now
        sec = now - self.start
        pct = 100.0 * done / total if total else 100.0
        line = f"{self.desc}: {_gb(done)}/{_gb(total)} GB {pct:3.0f}%"
        if sec > 0 and done:
            line += f"  {done / sec / 1e9:.2f} GB/s"
        pad = " " * max(0, self.width - len(line))
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self.drawn = True

    def close(self):
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
