"""Random draws that accept a ``torch.Generator`` on any device.

PyTorch draws only on the generator's own device, so code that draws noise for tensors on a GPU
with a user's generator must draw where the generator lives and move the result: a seeded CPU
generator then gives the same numbers whatever the device of the computation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

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
