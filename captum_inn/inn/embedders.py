"""Condition embedders: turn a layer activation of any shape into one vector per sample.

The conditional INN embeds the hooked layer's activation ``z = Φ(x)`` once per sample and feeds
the embedding ``h(z)`` to every coupling. The embedder is trained jointly with the flow.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from captum_inn._numbers import check_number, check_positive_int
from captum_inn.inn.coupling import mlp

__all__ = ["ConditionEmbedder", "MLPEmbedder", "TokenEmbedder", "ConvEmbedder", "make_embedder", "FLATTEN_TOKENS_UP_TO"]

#: Token sequences of at most this many numbers per sample are flattened into an MLP (whose first
#: layer then has at most ``16,384 · hidden`` weights); longer ones get a :class:`TokenEmbedder`.
#: On a small ViT neither embedder fitted clearly better (docs/pitfalls.rst), so the cheaper one
#: takes over only where the flattened one gets expensive.
FLATTEN_TOKENS_UP_TO = 16_384


def _optional_int(value: object, name: str, minimum: int, why: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= {minimum} or None, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum} or None ({why}), got {value}.")
    return int(value)


def check_patch_to(value: object, name: str = "patch_to") -> Optional[int]:
    """``value`` as ``None`` or an int ``>= 4`` (the conv embedder's ``patch_to``), else an error naming ``name``.

    Examples::

        >>> check_patch_to(8), check_patch_to(None)
        (8, None)
    """
    return _optional_int(value, name, 4, "the embedder stops at 4x4 maps")


def check_token_dim(value: object, name: str = "token_dim") -> Optional[int]:
    """``value`` as ``None`` or an int ``>= 1`` (the token embedder's ``token_dim``), else an error naming ``name``.

    Examples::

        >>> check_token_dim(16), check_token_dim(None)
        (16, None)
    """
    return _optional_int(value, name, 1, "features kept per token")


class ConditionEmbedder(nn.Module):
    """Base class: standardises the condition, then embeds it to ``(N, out_dim)``.

    Activations of different layers live on very different scales (logits in the tens, early
    features near zero), so the input is standardised with per-feature (vectors) or per-channel
    (feature maps) statistics stored as buffers. :meth:`set_input_statistics` sets them from the
    data (the fit functions do this from their feature cache); the default is the identity.

    Args:
        in_shape: Shape of one condition sample (without the batch dim).
        out_dim: Width of the embedding.

    Examples::

        >>> embedder = MLPEmbedder((10,), out_dim=8, hidden=32)   # a ConditionEmbedder subclass
        >>> embedder.set_input_statistics(torch.randn(100, 10) * 5 + 3)
        >>> embedder(torch.randn(5, 10)).shape                    # (N, *in_shape) -> (N, out_dim)
        torch.Size([5, 8])
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.in_shape: Tuple[int, ...] = tuple(int(s) for s in in_shape)
        if not self.in_shape or any(s < 1 for s in self.in_shape):
            raise ValueError(f"`in_shape` must be a non-empty shape of positive sizes, got {in_shape}.")
        self.out_dim = check_positive_int(out_dim, "out_dim")  # 0 gave an empty embedding, -1 a raw error
        stat_shape = self._statistics_shape()
        self.register_buffer("in_mean", torch.zeros(stat_shape))
        self.register_buffer("in_std", torch.ones(stat_shape))

    def _statistics_shape(self) -> Tuple[int, ...]:
        return self.in_shape

    def _statistics_dims(self) -> Tuple[int, ...]:
        return (0,)

    @torch.no_grad()
    def set_input_statistics(self, batch: Tensor, eps: float = 1e-5) -> None:
        """Standardise future inputs with the mean and standard deviation of ``batch``.

        Args:
            batch: ``(N, *in_shape)`` condition samples, ``N >= 2``.
            eps: Added to the floor of the standard deviation (10% of the mean spread, each unit's
                spread counted at most 100 times the 90th percentile's, or 0.1 where nothing
                varies), so rarely active units stay on the scale of the others; at most 1% of the
                floor, so a layer on a tiny scale (1e-6) is standardised too.
        """
        self._check(batch)
        eps = check_number(eps, "eps")
        if batch.shape[0] < 2:
            raise ValueError(f"`batch` needs at least 2 samples to estimate statistics, got {batch.shape[0]}.")
        if not batch.is_floating_point():  # torch's mean() "could not infer output dtype"
            raise TypeError(f"`batch` must be floating point, got {batch.dtype}; pass batch.float().")
        if not torch.isfinite(batch).all():  # one NaN made every later embedding NaN
            raise ValueError("`batch` holds NaN or infinite values; clean the condition samples first.")
        dims = self._statistics_dims()
        mean = batch.mean(dim=dims).reshape(self.in_mean.shape)
        std = batch.std(dim=dims).reshape(self.in_std.shape)
        # Floor at 10% of the typical spread: a unit that is almost always zero (a dead ReLU on
        # these samples) must not turn its rare activations into huge standardised values.
        # None varying at all (a collapsed layer): as if the spread were 1, not eps (later inputs scaled by 1e5)
        typical = float(std.mean())
        spreads = std.flatten()
        reference = float(torch.quantile(spreads.float(), 0.9)) if spreads.numel() <= 2**24 else float(spreads.max())
        if 0 < 100 * reference < float(spreads.max()):
            # a few units on a far larger scale (one at 1e4 among units at 1) count at most 100 times the 90th
            # percentile: their spread raised the floor of every other unit (divided by 157 for 64 units), so
            # the INN could hardly read them
            typical = float(spreads.clamp_max(100 * reference).mean())
        # eps capped at 1% of the floor: added whole, it flattened a layer on a 1e-6 scale to a tenth of
        # the others' scale (every unit's std became 1e-5), and its fit came out far worse
        floor = 0.1 * typical + min(eps, 1e-3 * typical) if typical > 0 else 0.1 + eps
        self.in_mean.copy_(mean)
        self.in_std.copy_(std.clamp_min(floor))

    def _check(self, c: Tensor) -> None:
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"The condition must be a torch.Tensor, got {type(c).__name__}.")
        if tuple(c.shape[1:]) != self.in_shape:
            raise ValueError(
                f"The condition has per-sample shape {tuple(c.shape[1:])}, but this INN was built "
                f"for a layer of shape {self.in_shape}: it was fitted for another layer (or another "
                "input size). Use the INN fitted for this layer."
            )

    def standardize(self, c: Tensor) -> Tensor:
        """``(c - mean) / std`` with the stored statistics."""
        return (c - self.in_mean).div_(self.in_std)  # in place: half the time for a 128×64×16×16 batch

    def forward(self, c: Tensor) -> Tensor:
        """Embed a batch of conditions.

        Args:
            c: ``(N, *in_shape)``.

        Returns:
            ``(N, out_dim)``.
        """
        self._check(c)
        return self.net(self.standardize(c))


class MLPEmbedder(ConditionEmbedder):
    """Embed an activation of any shape by flattening it and applying an MLP.

    Args:
        in_shape: Per-sample shape, e.g. ``(512,)`` for a fully connected layer.
        out_dim: Width of the embedding.
        hidden: Hidden width of the MLP.
        depth: Hidden layers of the MLP.

    Examples::

        >>> MLPEmbedder((10,), out_dim=8, hidden=32)(torch.randn(5, 10)).shape
        torch.Size([5, 8])
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int = 128, hidden: int = 512, depth: int = 2) -> None:
        super().__init__(in_shape, out_dim)
        self.net = nn.Sequential(nn.Flatten(), mlp(math.prod(self.in_shape), self.out_dim, hidden, depth))


class TokenEmbedder(ConditionEmbedder):
    """Embed a sequence of tokens ``(T, D)``, such as a transformer block's output, without one
    weight per (token, feature, hidden unit). :func:`make_embedder` picks it for sequences of more
    than ``FLATTEN_TOKENS_UP_TO`` (16,384) numbers.

    One linear map, shared by all tokens, keeps ``token_dim`` features of each token (followed by a
    LeakyReLU: the 1×1 convolution of :class:`ConvEmbedder`, over tokens); an MLP embeds the
    ``T · token_dim`` results. Flattening ``(197, 768)`` tokens of a ViT-B/16 into
    :class:`MLPEmbedder` would put ``151,296 · hidden`` weights (and Adam's two buffers each) into
    its first layer; here it has ``768 · token_dim + 197 · token_dim · hidden``
    (docs/pitfalls.rst). The last axis is the one projected: ``(tokens, features)``, the layout of
    batch-first transformers (torchvision, timm, Hugging Face). Statistics are per token and feature,
    as in :class:`MLPEmbedder`.

    Args:
        in_shape: ``(T, D)``.
        out_dim: Width of the embedding.
        hidden: Hidden width of the MLP.
        token_dim: Features kept per token.
        depth: Hidden layers of the MLP.

    Examples::

        >>> TokenEmbedder((65, 192), out_dim=8, hidden=32)(torch.randn(2, 65, 192)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int = 128, hidden: int = 512, token_dim: int = 16,
                 depth: int = 2) -> None:
        if len(in_shape) != 2:
            raise ValueError(f"TokenEmbedder needs a (tokens, features) shape, got {tuple(in_shape)}.")
        token_dim = check_token_dim(token_dim)
        if token_dim is None:
            raise ValueError("`token_dim` must be an int >= 1 for a TokenEmbedder; use MLPEmbedder to flatten whole.")
        super().__init__(in_shape, out_dim)
        tokens, features = self.in_shape
        self.net = nn.Sequential(nn.Linear(features, token_dim), nn.LeakyReLU(0.2), nn.Flatten(),
                                 mlp(tokens * token_dim, self.out_dim, hidden, depth))


class ConvEmbedder(ConditionEmbedder):
    """Embed a feature map ``(C, H, W)`` of any spatial size with strided convolutions.

    A first convolution maps the ``C`` channels to ``width``. On maps of at most ``patch_to``
    pixels a side it is a 1×1 convolution. On larger maps it projects non-overlapping patches
    (kernel = stride = ``ceil(side / patch_to)`` per side, the map zero-padded to a whole number of
    patches, evenly on both sides, an odd pixel of padding at the bottom or right), so the map
    shrinks to at most ``patch_to`` a side before any 4×4 convolution runs (5× cheaper on a 16×16
    map, 10× on 32×32; docs/pitfalls.rst). Then 4×4 stride-2 convolutions halve the resolution
    (doubling the width up to ``max_width``) until the map is at most 4×4, and a linear layer maps
    the flattened result to ``out_dim``. Statistics are per channel.

    Args:
        in_shape: ``(C, H, W)``.
        out_dim: Width of the embedding.
        width: Channels after the first convolution.
        max_width: Largest number of channels.
        patch_to: Largest side the first convolution leaves (at least 4); ``None`` keeps every map
            at full resolution there (a 1×1 convolution), as INNs saved before this setting were
            built.

    Examples::

        >>> ConvEmbedder((16, 13, 9), out_dim=8)(torch.randn(2, 16, 13, 9)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int = 128, width: int = 64, max_width: int = 256,
                 patch_to: Optional[int] = 8) -> None:
        if len(in_shape) != 3:
            raise ValueError(f"ConvEmbedder needs a (C, H, W) feature map shape, got {tuple(in_shape)}.")
        patch_to = check_patch_to(patch_to)
        super().__init__(in_shape, out_dim)
        width, max_width = check_positive_int(width, "width"), check_positive_int(max_width, "max_width")
        if max_width < width:  # the first convolution would have more channels than the largest allowed
            raise ValueError(f"`max_width` ({max_width}) must be >= `width` ({width}), the channels of the first "
                             "convolution.")
        channels, height, width_px = self.in_shape
        layers: list = []
        patch = (1, 1) if patch_to is None else (math.ceil(height / patch_to), math.ceil(width_px / patch_to))
        if patch != (1, 1):
            pad_h, pad_w = (-height) % patch[0], (-width_px) % patch[1]
            if pad_h or pad_w:  # whole patches: no edge row or column is dropped
                layers.append(nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
            height, width_px = (height + pad_h) // patch[0], (width_px + pad_w) // patch[1]
        layers += [nn.Conv2d(channels, width, kernel_size=patch, stride=patch), nn.LeakyReLU(0.2)]
        ch = width
        while max(height, width_px) > 4 and min(height, width_px) >= 2:
            out_ch = min(2 * ch, max_width)
            layers += [nn.Conv2d(ch, out_ch, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            ch, height, width_px = out_ch, height // 2, width_px // 2
        layers += [nn.Flatten(), nn.Linear(ch * height * width_px, self.out_dim)]
        self.net = nn.Sequential(*layers)

    def _statistics_shape(self) -> Tuple[int, ...]:
        return (self.in_shape[0], 1, 1)

    def _statistics_dims(self) -> Tuple[int, ...]:
        return (0, 2, 3)


def make_embedder(
    in_shape: Sequence[int],
    out_dim: int = 128,
    hidden: int = 512,
    conv_width: int = 64,
    conv_max_width: int = 256,
    conv_patch_to: Optional[int] = 8,
    token_dim: Optional[int] = 16,
) -> ConditionEmbedder:
    """Pick the embedder for an activation shape: convolutions for ``(C, H, W)``, a token
    projection for ``(T, D)``, else an MLP.

    Args:
        in_shape: Per-sample activation shape.
        out_dim: Width of the embedding.
        hidden: Hidden width of the MLP (also the MLP behind the token projection).
        conv_width: Channels of the conv embedder's first layer.
        conv_max_width: Largest number of channels of the conv embedder (cost grows with its square).
        conv_patch_to: Largest side the conv embedder's first layer leaves (see :class:`ConvEmbedder`).
        token_dim: Features kept per token by :class:`TokenEmbedder`, used for ``(T, D)`` shapes
            with ``T > 1``, ``D > token_dim`` and more than ``FLATTEN_TOKENS_UP_TO`` (16,384) numbers;
            ``None`` flattens every sequence into an :class:`MLPEmbedder`, as INNs saved before this
            setting were built.

    Returns:
        A :class:`ConvEmbedder` for 3-d shapes with a spatial extent, a :class:`TokenEmbedder` for
        long token sequences, else an :class:`MLPEmbedder`.

    Examples::

        >>> [type(make_embedder(s)).__name__ for s in [(64, 8, 8), (197, 384), (17, 96), (10,)]]
        ['ConvEmbedder', 'TokenEmbedder', 'MLPEmbedder', 'MLPEmbedder']
    """
    in_shape = tuple(int(s) for s in in_shape)
    conv_patch_to = check_patch_to(conv_patch_to, "conv_patch_to")
    token_dim = check_token_dim(token_dim, "token_dim")
    if len(in_shape) == 3 and in_shape[1] * in_shape[2] > 1:
        return ConvEmbedder(in_shape, out_dim, width=conv_width, max_width=max(conv_width, conv_max_width),
                            patch_to=conv_patch_to)
    tokens_pay = len(in_shape) == 2 and math.prod(in_shape) > FLATTEN_TOKENS_UP_TO and in_shape[0] > 1
    if tokens_pay and token_dim is not None and in_shape[1] > token_dim:
        return TokenEmbedder(in_shape, out_dim, hidden, token_dim)
    return MLPEmbedder(in_shape, out_dim, hidden)
