"""Capture and restore every random number generator a training loop uses,
so a resumed run draws the same numbers as one that never stopped.

    state = {"model": ..., "rng": ckpt.rng.get_state()}
    ...
    ckpt.rng.set_state(loaded["rng"])
"""
import random

import numpy as np
import torch


def get_state(cuda=None):
    """A dict ckpt.save can store: python `random`, numpy's global
    generator, torch's CPU generator and, when CUDA is initialised (or
    cuda=True), every CUDA device's generator."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (version, internal, gauss),
        "numpy": (kind, keys, int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_state(state, cuda=None):
    """Restores what get_state() captured. A "cuda" entry is restored when
    CUDA is available (cuda=None) or required (cuda=True)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state:
        if cuda is None:
            cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
