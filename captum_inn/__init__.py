"""captum_inn: invertible interpretation networks for Captum."""

from captum_inn._version import __version__

__all__ = ["__version__"]
