"""Random draws that accept a ``torch.Generator`` on any device.

PyTorch draws only on the generator's own device, so code that draws noise for tensors on a GPU
with a user's generator must draw where the generator lives and move the result: a seeded CPU
generator then gives the same numbers whatever the device of the computation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor


def generator_device(generator: Optional[torch.Generator]) -> torch.device:
    """Where ``generator`` draws (the CPU for ``None``, PyTorch's global CPU generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def normal(shape: Sequence[int], generator: Optional[torch.Generator], device: Union[str, torch.device],
           dtype: Optional[torch.dtype] = None) -> Tensor:
    """Standard normal draws of ``shape`` on ``device``, from ``generator`` (any device) or, for
    ``None``, from the global generator of ``device``."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


@contextmanager
def seeded_global_rng(seed: int, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """PyTorch's global generators seeded with ``seed`` inside the block, the caller's states back after.

    Module constructors draw their initial weights from the global generators, so a fit seeds them
    for a reproducible start; restoring them afterwards leaves the user's own random stream as it was.
    With ``dtype``, that is the default dtype inside the block: weights are drawn in the default
    dtype, so a float32 network built under a float64 default started from other values.

    Examples::

        >>> state = torch.random.get_rng_state()
        >>> with seeded_global_rng(0):
        ...     a = torch.rand(2)
        >>> torch.equal(torch.random.get_rng_state(), state), torch.equal(a, torch.rand(2, generator=torch.Generator().manual_seed(0)))
        (True, True)
    """
    cuda = torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        # not torch.manual_seed: it also queues a seed for CUDA's lazy start (which fork_rng cannot take
        # back, so the user's next CUDA draws followed the fit's seed) and reseeds MPS for good
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            torch.cuda.manual_seed_all(int(seed))
        default = torch.get_default_dtype()
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(default)


@contextmanager
def seeded_every_global_rng(seed: int) -> Iterator[None]:
    """:func:`seeded_global_rng`, and Python's and NumPy's global generators too.

    For code that calls a user's dataset, whose transforms may draw from any of them (e.g. a
    random flip): inside the block the draws repeat from call to call, and the caller's streams
    are left as they were.

    Examples::

        >>> import random
        >>> state = random.getstate()
        >>> with seeded_every_global_rng(0):
        ...     a = random.random()
        >>> with seeded_every_global_rng(0):
        ...     b = random.random()
        >>> a == b, random.getstate() == state
        (True, True)
    """
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        random.seed(int(seed))
        np.random.seed(int(seed) % 2**32)  # NumPy's legacy seed takes 0 … 2**32 - 1 only
        with seeded_global_rng(seed):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
