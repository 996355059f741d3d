"""Invertible building blocks, knowing nothing of CNNs or Captum.

Every block follows one contract (see :class:`InvertibleModule`)::

    forward(x, c=None, rev=False, jac=True) -> (y, log_jac_det)   # log_jac_det: (N,)
"""

from captum_inn.inn.actnorm import ActNorm
from captum_inn.inn.base import InvertibleModule, NotInitializedError
from captum_inn.inn.coupling import AffineCoupling, mlp
from captum_inn.inn.embedders import (
    ConditionEmbedder,
    ConvEmbedder,
    MLPEmbedder,
    TokenEmbedder,
    make_embedder,
)
from captum_inn.inn.networks import ConditionalINN, FactorINN, factor_sizes_from_scores
from captum_inn.inn.permutation import Permutation
from captum_inn.inn.sequential import SequentialFlow, flow_blocks

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "ConditionEmbedder",
    "ConditionalINN",
    "ConvEmbedder",
    "FactorINN",
    "InvertibleModule",
    "MLPEmbedder",
    "TokenEmbedder",
    "NotInitializedError",
    "Permutation",
    "SequentialFlow",
    "factor_sizes_from_scores",
    "flow_blocks",
    "make_embedder",
    "mlp",
]
