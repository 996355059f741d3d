"""Shared test helpers for hook hygiene (DESIGN.md, Captum contract item 7).

Import from any test module as ``from helpers_hooks import assert_no_hooks``: ``tests/`` has no
``__init__.py``, so pytest's default ``prepend`` import mode puts this folder on ``sys.path``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["HOOK_DICTS", "Gate", "Replicating", "assert_no_hooks", "training_flags"]

#: The per-module hook registries of ``nn.Module`` that a capture could leave behind. The
#: ``*_with_kwargs`` / ``*_always_called`` dicts are bookkeeping keyed by the same handles.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def assert_no_hooks(model: nn.Module) -> None:
    """Fail if any module of ``model`` (the model included) still holds a hook.

    Args:
        model: The model to inspect; every module from ``model.named_modules()`` is checked.

    Raises:
        AssertionError: Listing each ``(module name, registry, count)`` that is not empty.
    """
    left = []
    for name, module in model.named_modules(remove_duplicate=False):
        for attr in HOOK_DICTS:
            registry = getattr(module, attr, None)
            if registry:
                left.append((name or "<model>", attr, len(registry)))
    assert not left, f"hooks left on the model: {left}"


def training_flags(model: nn.Module) -> dict:
    """Return ``{module name: training flag}`` for every module, to compare before and after."""
    return {name: m.training for name, m in model.named_modules(remove_duplicate=False)}


class Gate(nn.Module):
    """Passes its input through, or raises what it is armed with (mid-forward, hooks registered)."""

    def __init__(self):
        super().__init__()
        self.error = None

    def forward(self, x):
        if self.error is not None:
            raise self.error
        return x


class Replicating(nn.DataParallel):
    """A multi-GPU ``nn.DataParallel`` as far as a CPU test can tell: its own ``forward`` is where
    the wrapper would replicate the model (replicas' hooks writing captured values from concurrent
    threads, the early-stop signal re-raised as another exception), so it refuses to run. Without
    GPUs ``device_ids`` is empty, as for a plain ``DataParallel`` here."""

    def forward(self, *args, **kwargs):
        raise AssertionError("DataParallel.forward ran: on several GPUs the model would be replicated")
