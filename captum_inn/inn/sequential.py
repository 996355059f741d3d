"""A sequence of invertible blocks, and the standard flow block of the method."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from captum_inn._numbers import check_positive_int
from captum_inn.inn.actnorm import ActNorm
from captum_inn.inn.base import InvertibleModule
from captum_inn.inn.coupling import AffineCoupling
from captum_inn.inn.permutation import Permutation

__all__ = ["SequentialFlow", "flow_blocks"]


class SequentialFlow(InvertibleModule):
    """Chain invertible blocks; the log-determinants add up.

    Forward runs the blocks in order, reverse runs their inverses in reverse order. The same
    condition ``c`` is passed to every block (unconditional blocks ignore it).

    Args:
        blocks: Invertible blocks following the contract of :class:`InvertibleModule`.

    Examples::

        >>> flow = SequentialFlow(flow_blocks(dim=4, n_blocks=2, hidden=16))
        >>> x = torch.randn(8, 4)
        >>> y, logdet = flow(x)
        >>> torch.allclose(flow(y, rev=True)[0], x, atol=1e-5), logdet.shape
        (True, torch.Size([8]))
    """

    def __init__(self, blocks: Iterable[InvertibleModule]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        for i, block in enumerate(self.blocks):
            if not isinstance(block, InvertibleModule):
                raise TypeError(
                    f"block {i} is a {type(block).__name__}; every block must subclass "
                    "captum_inn.inn.InvertibleModule."
                )

    def forward(
        self, x: Tensor, c: Optional[Tensor] = None, rev: bool = False, jac: bool = True
    ) -> Tuple[Tensor, Tensor]:
        if not isinstance(x, torch.Tensor):  # a list failed on x.new_zeros
            raise TypeError(f"`x` must be a torch.Tensor of shape (N, dim), got {type(x).__name__}.")
        logdet = x.new_zeros(x.shape[0])
        blocks = reversed(self.blocks) if rev else self.blocks
        for block in blocks:
            x, block_logdet = block(x, c, rev=rev, jac=jac)
            if jac:
                logdet = logdet + block_logdet
        return x, logdet

    def __len__(self) -> int:
        return len(self.blocks)


def flow_blocks(
    dim: int,
    n_blocks: int,
    hidden: int = 512,
    depth: int = 2,
    cond_dim: int = 0,
    clamp: float = 1.0,
    seed: int = 0,
) -> List[InvertibleModule]:
    """The reference flow: ``n_blocks`` × (ActNorm → coupling → coupling (other half) → permutation).

    Args:
        dim: Number of features.
        n_blocks: Number of repetitions of the four-block unit.
        hidden: Width of the coupling subnets.
        depth: Hidden layers of the coupling subnets.
        cond_dim: Width of the condition embedding (0: unconditional).
        clamp: Bound on each coupling log-scale.
        seed: Seed of the permutations (block ``i`` uses ``seed + i``).

    Returns:
        A list of ``4 · n_blocks`` blocks, ready for :class:`SequentialFlow`.

    Examples::

        >>> len(flow_blocks(dim=8, n_blocks=3))
        12
    """
    n_blocks = check_positive_int(n_blocks, "n_blocks")  # 1.7 built one block
    blocks: List[InvertibleModule] = []
    for i in range(n_blocks):
        blocks += [
            ActNorm(dim),
            AffineCoupling(dim, hidden, depth, cond_dim, clamp, parity=0),
            AffineCoupling(dim, hidden, depth, cond_dim, clamp, parity=1),
            Permutation(dim, seed=seed + i),
        ]
    return blocks
