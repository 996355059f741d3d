"""Affine coupling with bounded log-scales, optionally conditioned on an embedding."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from captum_inn._numbers import check_int
from captum_inn.inn._fast import subnet_forward
from captum_inn.inn.base import InvertibleModule, check_vector_batch

__all__ = ["AffineCoupling", "mlp"]


def mlp(in_features: int, out_features: int, hidden: int, depth: int) -> nn.Sequential:
    """A plain MLP: ``depth`` hidden layers of width ``hidden`` with LeakyReLU.

    Args:
        in_features: Input width.
        out_features: Output width.
        hidden: Hidden width.
        depth: Number of hidden layers (``>= 1``).

    Returns:
        ``nn.Sequential`` mapping ``(N, in_features)`` to ``(N, out_features)``.

    Examples::

        >>> mlp(4, 2, hidden=16, depth=2)(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """
    depth, hidden = check_int(depth, "depth"), check_int(hidden, "hidden")  # 256.0 failed inside torch.empty
    if depth < 1:
        raise ValueError(f"`depth` must be >= 1 hidden layer, got {depth}.")
    if hidden < 1:  # 0 made every scale and shift a constant: a coupling that ignores its input
        raise ValueError(f"`hidden` must be >= 1 (the subnet's width), got {hidden}.")
    layers = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class AffineCoupling(InvertibleModule):
    """One affine coupling: half of the features scale and shift the other half.

    With ``x = (x_a, x_b)`` split along dim 1 (``x_a`` the first ``dim // 2`` features when
    ``parity=0``, the last ones when ``parity=1``)::

        s, t = split(subnet([x_a, c]))
        s = clamp · tanh(s / clamp)          # bounded log-scale: |s| < clamp
        y_b = x_b · exp(s) + t,   y_a = x_a

    so ``log|det| = Σ s``. Bounding ``s`` keeps the exponential from diverging. The last layer of
    the subnet starts at zero, so a fresh coupling is the identity (stable start of training).
    On float32 tensors on a CPU with AVX-512 the subnet runs on oneDNN matmuls in one autograd
    node, the same maths (see ``captum_inn/inn/_fast.py``; ``CAPTUM_INN_ONEDNN=0`` or ``1``
    overrides the choice).

    Args:
        dim: Number of features ``D >= 2``.
        hidden: Width of the subnet.
        depth: Hidden layers of the subnet.
        cond_dim: Width of the condition embedding concatenated to the subnet's input
            (0: unconditional).
        clamp: Bound on each log-scale.
        parity: 0 transforms the second half, 1 the first half.

    Examples::

        >>> block = AffineCoupling(6, hidden=32, cond_dim=3)
        >>> x, c = torch.randn(4, 6), torch.randn(4, 3)
        >>> y, logdet = block(x, c)
        >>> torch.allclose(block(y, c, rev=True)[0], x), logdet.shape
        (True, torch.Size([4]))
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 512,
        depth: int = 2,
        cond_dim: int = 0,
        clamp: float = 1.0,
        parity: int = 0,
    ) -> None:
        super().__init__()
        if check_int(dim, "dim") < 2:
            raise ValueError(f"An affine coupling needs `dim` >= 2 features to split, got {dim}.")
        if check_int(cond_dim, "cond_dim") < 0:  # -1 was accepted, and asked for conditions of shape (N, -1)
            raise ValueError(f"`cond_dim` must be >= 0 (0: unconditional), got {cond_dim}.")
        if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or not math.isfinite(clamp) or clamp <= 0:  # inf: inf * tanh(s / inf) is NaN, even for an identity coupling
            raise ValueError(f"`clamp` must be a finite number > 0, got {clamp}.")
        if parity not in (0, 1):
            raise ValueError(f"`parity` must be 0 or 1, got {parity}.")
        self.dim, self.cond_dim, self.clamp, self.parity = int(dim), int(cond_dim), float(clamp), parity
        half = self.dim // 2
        self.n_fixed = half if parity == 0 else self.dim - half
        self.n_transformed = self.dim - self.n_fixed
        self.subnet = mlp(self.n_fixed + self.cond_dim, 2 * self.n_transformed, hidden, depth)
        nn.init.zeros_(self.subnet[-1].weight)
        nn.init.zeros_(self.subnet[-1].bias)

    def _split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.parity == 0:
            return x[:, : self.n_fixed], x[:, self.n_fixed :]
        return x[:, self.n_transformed :], x[:, : self.n_transformed]

    def _join(self, fixed: Tensor, transformed: Tensor) -> Tensor:
        parts = (fixed, transformed) if self.parity == 0 else (transformed, fixed)
        return torch.cat(parts, dim=1)

    def forward(
        self, x: Tensor, c: Optional[Tensor] = None, rev: bool = False, jac: bool = True
    ) -> Tuple[Tensor, Tensor]:
        check_vector_batch(x, self.dim)
        weights = self.subnet[0].weight.dtype
        # an unconditional coupling ignores `c` (as the flow's docs say), whatever it is
        for name, tensor in (("x", x), ("c", c if self.cond_dim else None)):
            # else a raw "mat1 and mat2 must have the same dtype" (under autocast, Linear casts them itself)
            if tensor is not None and tensor.dtype != weights and not torch.is_autocast_enabled(tensor.device.type):
                raise TypeError(f"`{name}` is {tensor.dtype} but this coupling's weights are {weights}: convert the "
                                f"input with .to({weights}) or the flow with .to({tensor.dtype}).")
        fixed, other = self._split(x)
        cond = None
        if self.cond_dim:
            if c is None:
                raise ValueError(
                    f"This coupling is conditional (cond_dim={self.cond_dim}); pass the condition "
                    "embedding `c` of shape (N, cond_dim)."
                )
            if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape != (x.shape[0], self.cond_dim):
                if not isinstance(c, torch.Tensor):
                    raise TypeError(f"`c` must be a torch.Tensor of shape ({x.shape[0]}, {self.cond_dim}), got "
                                    f"{type(c).__name__}.")
                raise ValueError(
                    f"`c` must have shape ({x.shape[0]}, {self.cond_dim}), got {tuple(c.shape)}."
                )
            cond = c
        # subnet([fixed, c]); on float32 CPU tensors evaluated on oneDNN in one autograd node (_fast.py)
        raw_scale, shift = subnet_forward(self.subnet, fixed, cond).chunk(2, dim=1)
        if self.clamp == 1.0:  # x / 1 and 1 · x are exact: skip two elementwise passes
            log_scale = torch.tanh(raw_scale)
        else:
            log_scale = self.clamp * torch.tanh(raw_scale / self.clamp)
        if rev:
            other = (other - shift) * torch.exp(-log_scale)
        else:
            other = other * torch.exp(log_scale) + shift
        y = self._join(fixed, other)
        if not jac:
            return y, x.new_zeros(x.shape[0])
        logdet = log_scale.sum(dim=1)
        return y, (-logdet if rev else logdet)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, cond_dim={self.cond_dim}, clamp={self.clamp}, parity={self.parity}"
