"""Activation normalisation (Glow's ActNorm) with data-dependent initialisation."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from captum_inn._numbers import check_number, check_positive_int
from captum_inn.inn.base import InvertibleModule, NotInitializedError

__all__ = ["ActNorm"]


class ActNorm(InvertibleModule):
    """Per-channel affine normalisation ``y = (x + loc) · exp(log_scale)``.

    ``loc`` and ``log_scale`` are initialised from the first forward batch so that each channel of
    ``y`` has zero mean and unit variance on that batch (Kingma & Dhariwal, 2018); a channel
    nearly constant there, below 1% of the median spread, is scaled as one at that 1%. The
    ``initialized`` buffer records that this happened, so a state dict restores it. To
    initialise again from another batch call :meth:`initialize` (clearing the buffer by hand, a
    Glow idiom, is not seen by a module that has already run). Channels are dim 1; any trailing
    (spatial) dims share the channel's parameters.

    Args:
        num_features: Number of channels ``C`` (dim 1 of the input).
        eps: Added to the standard deviation at initialisation.

    Examples::

        >>> norm = ActNorm(4)
        >>> y, logdet = norm(torch.randn(16, 4) * 3 + 1)   # initialises on this batch
        >>> bool(norm.initialized), y.shape, logdet.shape
        (True, torch.Size([16, 4]), torch.Size([16]))
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")  # 2.5 built 2 features
        self.eps = check_number(eps, "eps")  # -1 or NaN gave NaN scales without a word
        self.loc = nn.Parameter(torch.zeros(self.num_features))
        self.log_scale = nn.Parameter(torch.zeros(self.num_features))
        self.register_buffer("initialized", torch.tensor(False))
        # the buffer's value, once it is known to be True: reading the buffer of a GPU module
        # every forward would wait for the GPU each time
        self._initialized_seen = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._initialized_seen = False  # a loaded state may be uninitialised; read the buffer again
        super()._load_from_state_dict(*args, **kwargs)

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ActNorm input must be a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():  # promoted silently once initialised, a dtype error before
            raise TypeError(f"ActNorm input must be a floating-point tensor, got {x.dtype}; convert it with .float().")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ActNorm was built for {self.num_features} channels (dim 1), "
                f"got input of shape {tuple(x.shape)}."
            )

    @torch.no_grad()
    def initialize(self, batch: Tensor) -> None:
        """Set ``loc`` and ``log_scale`` so that ``batch`` maps to zero mean, unit variance (a
        feature's spread counts as at least 1% of the median spread of the features that vary, or
        0.01 when none does, so a constant one is not scaled by ``1 / eps``).

        Args:
            batch: ``(N, C, *)`` with ``N >= 2`` real samples (not a reverse-direction input).

        Raises:
            ValueError: for a batch of one, whose variance is undefined, or one with NaN or
                infinite values.
        """
        self._check(batch)
        if batch.shape[0] < 2:
            raise ValueError(
                "ActNorm initialises from the statistics of its first forward batch and needs at "
                f"least 2 samples, got a batch of {batch.shape[0]}. Run one forward pass with a "
                "larger batch (or call .initialize(batch)), or load a fitted checkpoint."
            )
        if not torch.isfinite(batch).all():  # NaN parameters would make every later output NaN
            raise ValueError("ActNorm initialises from its first forward batch, which holds NaN or infinite values; "
                             "clean the data first.")
        dims = [d for d in range(batch.dim()) if d != 1]
        mean = batch.mean(dim=dims)
        # a constant feature (a dead ReLU unit) would get a scale of 1/eps, about 1e6, and any later
        # input where it varies would reach the couplings a million times too large
        std = batch.std(dim=dims)
        varying = std[std > 1e-5 * std.max()]  # the median of the features that vary, at any scale (none: 1)
        floor = 1e-2 * (float(varying.median()) if varying.numel() else 1.0)
        std = std.clamp_min(floor)
        self.loc.copy_(-mean)
        # eps at most 0.1% of the floor (the same 1e-6 for features spread by 0.1 or more): added whole, it
        # left a layer on a 1e-7 scale at a tenth of unit variance
        self.log_scale.copy_(-torch.log(std + min(self.eps, 1e-3 * floor)))
        self.initialized.fill_(True)
        self._initialized_seen = True

    def forward(
        self, x: Tensor, c: Optional[Tensor] = None, rev: bool = False, jac: bool = True
    ) -> Tuple[Tensor, Tensor]:
        self._check(x)
        if not self._initialized_seen and not bool(self.initialized):
            if rev:
                raise NotInitializedError(
                    "ActNorm is not initialised: its first call must be a forward pass on real "
                    "data (N >= 2), not a reverse call. Fit the flow or load a checkpoint first."
                )
            self.initialize(x.detach())
        self._initialized_seen = True
        loc = self._view(self.loc, x)
        log_scale = self._view(self.log_scale, x)
        if rev:
            y = x * torch.exp(-log_scale) - loc
        else:
            y = (x + loc) * torch.exp(log_scale)
        if not jac:
            return y, x.new_zeros(x.shape[0])
        positions = math.prod(x.shape[2:])  # spatial positions sharing each channel's scale (also for N = 0)
        # a tensor of its own, not an expand() view: callers may add to it in place
        logdet = (self.log_scale.sum() * positions).expand(x.shape[0]).clone()
        return y, (-logdet if rev else logdet)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
