"""captum_inn: invertible interpretation networks for Captum.

What a layer of a trained CNN is invariant to (:class:`LayerInvariance`), fitted post hoc with
:mod:`captum_inn.training`.
"""

from captum_inn._version import __version__
from captum_inn.attr import LayerInvariance

__all__ = ["LayerInvariance", "__version__"]
