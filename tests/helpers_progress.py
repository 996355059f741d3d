"""Shared test helper: record the progress bars a module shows.

Import as ``from helpers_progress import record_bars`` (``tests/`` is on ``sys.path``, see
``helpers_hooks``).
"""

from __future__ import annotations

from types import ModuleType
from typing import List, Optional, Tuple

__all__ = ["record_bars"]


def record_bars(monkeypatch, module: ModuleType) -> List[Tuple[str, Optional[float], float, bool]]:
    """Replace ``module.tqdm`` by a subclass that records ``(desc, n, total, disable)`` of each bar
    when it closes (``n`` None for a disabled bar, which counts nothing): a bar that ends at its
    total counted all the work it announced."""
    closed: List[Tuple[str, Optional[float], float, bool]] = []

    class Recorded(module.tqdm):
        def __init__(self, *args, **kwargs):
            self._shown = (kwargs.get("desc"), kwargs.get("total"), bool(kwargs.get("disable")))
            super().__init__(*args, **kwargs)

        def close(self):
            if not getattr(self, "_recorded", False):  # tqdm closes again on garbage collection
                self._recorded = True
                desc, total, disable = self._shown
                # a disabled bar counts nothing
                closed.append((desc, None if disable else self.n, total, disable))
            super().close()

    monkeypatch.setattr(module, "tqdm", Recorded)
    return closed
