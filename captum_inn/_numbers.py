"""Plain numbers from the scalars users hand in: no import of the rest of the package, so that both
``captum_inn.inn`` and the argument checks of ``captum_inn.attr`` can use it."""

from __future__ import annotations

from typing import Any

import torch


def integer_scalar(value: Any) -> Any:
    """``int(value)`` for an integer 0-d tensor (``torch.tensor(4)``, as a sum, count or
    ``torch.arange`` gives it), else ``value`` unchanged: float, complex and bool tensors are left to
    the caller's check, which refuses them rather than truncating."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value)
    return value
