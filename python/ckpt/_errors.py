"""Exceptions raised by ckpt. Every one derives from CkptError, and also
from the built-in exception a Python user would catch for that problem."""
import pickle


class CkptError(Exception):
    """Base class of every error ckpt raises for a file or an argument."""


class FormatError(CkptError, ValueError):
    """The file breaks a rule of the ckpt format (docs/FORMAT.md), or is not
    a file ckpt can read at all."""


class ChecksumError(FormatError):
    """Stored and computed checksums differ: the bytes were damaged."""


class UnsupportedError(CkptError, ValueError):
    """A newer format version, or something this version cannot hold."""


class NotFoundError(CkptError, KeyError):
    """A tensor path or tree path that the file does not have."""

    def __str__(self):  # KeyError would quote the message
        return Exception.__str__(self)


class InvalidArgumentError(CkptError, ValueError):
    """An impossible request (a bad range, a bad option)."""


class PickleRefusedError(InvalidArgumentError, pickle.UnpicklingError):
    """The restricted .pth reader refused a pickle: a global outside its
    allowlist (docs/PTH.md) or an object it does not convert. Nothing from
    the file was run. Also a pickle.UnpicklingError, which is what
    torch.load(weights_only=True) raises for such files, so code catching
    that keeps working."""


class CkptIOError(CkptError, OSError):
    """The operating system refused a read, write, open or rename. `errno`
    is the OS error number (errno.ENOSPC for a full disk...) where known;
    str() is the message naming the file."""


class ResourceExhaustedError(CkptError, MemoryError):
    """Out of memory or threads, or a size limit the file asked ckpt to
    exceed (the message names the limit)."""


class CudaError(CkptError, RuntimeError):
    """A CUDA runtime call failed."""
