"""Captum-style attribution classes: :class:`LayerInvariance` and :class:`LayerConcepts`."""

from captum_inn.attr.concepts import EncodedShares, LayerConcepts
from captum_inn.attr.invariance import LayerInvariance

__all__ = ["EncodedShares", "LayerConcepts", "LayerInvariance"]
