"""The one place that imports Captum's private helpers (they change between releases).

Captum 0.9 keeps these in ``captum._utils``; if a release moves them, only this file changes.
"""

from __future__ import annotations

from captum._utils.common import (  # noqa: F401 - re-exported
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _select_targets,
)
from captum._utils.typing import TargetType  # noqa: F401 - re-exported
from captum.attr import GradientAttribution, LayerAttribution  # noqa: F401 - public base classes
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS  # noqa: F401 - re-exported
from captum.log import log_usage  # noqa: F401

__all__ = [
    "GradientAttribution",
    "LayerAttribution",
    "SUPPORTED_METHODS",
    "TargetType",
    "_format_additional_forward_args",
    "_format_output",
    "_format_tensor_into_tuples",
    "_is_tuple",
    "_select_targets",
    "log_usage",
]
