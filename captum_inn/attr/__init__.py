"""Captum-style attribution classes: :class:`LayerInvariance` and :class:`LayerConcepts`."""

from captum_inn.attr.concepts import LayerConcepts
from captum_inn.attr.invariance import LayerInvariance

__all__ = ["LayerConcepts", "LayerInvariance"]
