"""captum_inn: invertible interpretation networks for Captum.

What a layer of a trained CNN is invariant to (:class:`LayerInvariance`) and which semantic
concepts it encodes (:class:`LayerConcepts`), fitted post hoc with :mod:`captum_inn.training`.
"""

from captum_inn._version import __version__
from captum_inn.attr import LayerConcepts, LayerInvariance

__all__ = ["LayerConcepts", "LayerInvariance", "__version__"]
