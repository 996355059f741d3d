"""A fixed random permutation of the features."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from captum_inn._numbers import check_int, check_positive_int
from captum_inn.inn.base import InvertibleModule, check_vector_batch

__all__ = ["Permutation"]


class Permutation(InvertibleModule):
    """Permute the features of ``(N, D)`` vectors by a fixed random permutation.

    The permutation is drawn once from a local ``torch.Generator`` seeded with ``seed`` (global RNGs
    are never touched) and stored as buffers, so it travels with the state dict. Its
    log-determinant is zero.

    Args:
        dim: Number of features ``D``.
        seed: Seed of the permutation.

    Examples::

        >>> perm = Permutation(5, seed=3)
        >>> x = torch.randn(2, 5)
        >>> y, logdet = perm(x)
        >>> torch.equal(perm(y, rev=True)[0], x), logdet.tolist()
        (True, [0.0, 0.0])
    """

    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")  # 2.5 built 2
        generator = torch.Generator().manual_seed(check_int(seed, "seed"))  # 1.9 was seed 1
        perm = torch.randperm(self.dim, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(
        self, x: Tensor, c: Optional[Tensor] = None, rev: bool = False, jac: bool = True
    ) -> Tuple[Tensor, Tensor]:
        check_vector_batch(x, self.dim)
        index = self.inverse_perm if rev else self.perm
        return torch.index_select(x, 1, index), x.new_zeros(x.shape[0])  # = x[:, index], faster

    def extra_repr(self) -> str:
        return f"{self.dim}"
