"""The one contract every invertible block of :mod:`captum_inn.inn` follows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["InvertibleModule", "NotInitializedError"]


class NotInitializedError(RuntimeError):
    """Raised when a block with data-dependent initialisation is used before it has seen data.

    Examples::

        >>> from captum_inn.inn import ActNorm
        >>> ActNorm(4)(torch.randn(2, 4), rev=True)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        NotInitializedError: ActNorm is not initialised: its first call must be a forward pass ...
    """


class InvertibleModule(nn.Module, ABC):
    """Base class of every invertible block.

    **The block contract.** Every block implements::

        forward(x, c=None, rev=False, jac=True) -> (y, log_jac_det)

    - ``x``: a batch, dim 0 is the batch (``(N, D)`` for the vector flows).
    - ``c``: the condition (an embedding of shape ``(N, cond_dim)``) or ``None``. The blocks
      that are not conditional (:class:`~captum_inn.inn.ActNorm`,
      :class:`~captum_inn.inn.Permutation`, an unconditional
      :class:`~captum_inn.inn.AffineCoupling`) ignore it, so a sequence of blocks can pass one
      condition to all of them. A whole unconditional flow, :class:`~captum_inn.inn.FactorINN`,
      refuses one instead: a condition given to it is a mistake.
    - ``rev=False`` computes ``y = f(x | c)`` and ``log|det ∂f/∂x|``.
      ``rev=True`` treats its input as ``y`` and computes ``x = f⁻¹(y | c)`` together with the
      log-determinant **of the inverse**, ``log|det ∂f⁻¹/∂y| = −log|det ∂f/∂x|``, so that
      ``forward`` and ``reverse`` log-determinants of matching points sum to zero.
    - ``log_jac_det`` always has shape ``(N,)``. With ``jac=False`` a block may skip the
      computation and return zeros of that shape.

    Examples::

        >>> from captum_inn.inn import Permutation
        >>> block = Permutation(4, seed=0)
        >>> x = torch.randn(8, 4)
        >>> y, logdet = block(x)
        >>> x_back, _ = block(y, rev=True)
        >>> torch.equal(x, x_back), logdet.shape
        (True, torch.Size([8]))
    """

    @abstractmethod
    def forward(
        self, x: Tensor, c: Optional[Tensor] = None, rev: bool = False, jac: bool = True
    ) -> Tuple[Tensor, Tensor]:
        """Apply the block (``rev=False``) or its inverse (``rev=True``); see the class docstring."""

    def inverse(self, y: Tensor, c: Optional[Tensor] = None, jac: bool = True) -> Tuple[Tensor, Tensor]:
        """Shorthand for ``self(y, c, rev=True, jac=jac)``.

        Args:
            y: Output-space batch, same shape as the forward output.
            c: The condition, as for :meth:`forward`.
            jac: Whether to compute the log-determinant of the inverse.

        Returns:
            ``(x, log_jac_det)`` with ``log_jac_det`` of shape ``(N,)``.
        """
        return self(y, c, rev=True, jac=jac)


def check_device(x: Tensor, module: nn.Module, name: str = "x", what: Optional[str] = None) -> None:
    """Raise a clear error when ``x`` is not on the device of ``module``'s weights (torch named only
    two devices deep inside a subnet, not which argument to move). ``what`` names the module in the
    message (its class name by default)."""
    weight = next(module.parameters(), None)
    if weight is not None and x.device != weight.device:
        raise ValueError(f"`{name}` is on {x.device} but the {what or type(module).__name__} is on {weight.device}; "
                         f"move one of them (e.g. {name}.to('{weight.device}')).")


def check_vector_batch(x: Tensor, dim: int, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a floating ``(N, dim)`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, {dim}), got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor, got dtype {x.dtype}; convert it with .float()."
        )
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(
            f"`{name}` must have shape (N, {dim}) for this flow, got {tuple(x.shape)}; "
            "flatten the batch to vectors or build the flow for this dimension."
        )
