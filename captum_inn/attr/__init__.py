"""Captum-style attribution classes: :class:`LayerInvariance`."""

from captum_inn.attr.invariance import LayerInvariance

__all__ = ["LayerInvariance"]
