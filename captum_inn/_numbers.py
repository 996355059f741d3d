"""Plain numbers from the scalars users hand in: no import of the rest of the package, so that both
``captum_inn.inn`` and the argument checks of ``captum_inn.attr`` can use it."""

from __future__ import annotations

import math
import numbers
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


def _shown(value: Any) -> str:
    """``repr(value)`` for an error message, or its shape for a large array: a tensor of images
    passed in an int's place (``fit_autoencoder(images, images)``) filled the screen."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype") and math.prod(shape) > 8:
        return f"an array of shape {tuple(shape)}"
    return repr(value)


def check_int(value: Any, name: str) -> int:
    """``value`` as a plain int (NumPy integers and integer 0-d tensors included) or a ``TypeError``
    naming ``name``."""
    value = integer_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {_shown(value)} ({type(value).__name__}).")
    return int(value)


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int ``>= 1`` or a ``ValueError``/``TypeError`` naming ``name``."""
    value = check_int(value, name)
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    return value


def check_number(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite float ``>= 0`` (``> 0`` if ``positive``) or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {_shown(value)} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"`{name}` must be {'> 0' if positive else '>= 0'}, got {value}.")
    return float(value)
