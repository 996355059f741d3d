"""Augmentations for the fits: :class:`Jitter`, and what a checkpoint records of any augmentation
so that a resumed fit draws as an uninterrupted one would."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, List

import torch
from torch import Tensor
from torch.nn import functional as F

from captum_inn.attr._common import check_int, check_number

__all__ = ["Jitter", "augment_generators", "augment_record", "restart_augment"]


#: What a fit's ``augment`` is called with and returns (named when it is not callable).
AUGMENT_CALL = "a batch of images in, a batch out"


class Jitter:
    """Augmentation: recolour, shift a batch by up to ``pixels`` (edges replicated), flip, add Gaussian noise; seeded.

    Small shifts and noise make a classifier of centred digits far less brittle, which keeps its
    predictions stable on faithful reconstructions. Recolouring maps each channel of an image
    affinely so that its darkest and brightest pixels take new random values in ``value_range``: a
    two-colour image (ColorDigits) gets a new foreground and background colour, its strokes kept,
    so a classifier sees every digit in ever new colours and learns that colour says nothing.

    Args:
        pixels: Largest shift in x and y.
        noise: Standard deviation of the added noise (0: none).
        flip: Mirror a random half of the images left-right (for photos, not for digits).
        recolour: Share of the images recoloured, in ``[0, 1]`` (0: none; needs a ``value_range``).
        value_range: The result is clamped to this range (``None``: no clamping).
        seed: Seed of the recolouring, the shifts, the flips and the noise.

    Examples::

        >>> Jitter(2, noise=0.05, seed=0)(torch.rand(4, 3, 8, 8)).shape
        torch.Size([4, 3, 8, 8])
        >>> red_digit = (torch.rand(1, 1, 8, 8) > 0.5) * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
        >>> recoloured = Jitter(0, recolour=1.0)(red_digit)
        >>> recoloured[0].flatten(1).T.unique(dim=0).shape[0]  # two colours still, new ones
        2
    """

    def __init__(self, pixels: int = 2, noise: float = 0.0, value_range=(0.0, 1.0), seed: int = 0,
                 flip: bool = False, recolour: float = 0.0) -> None:
        # checked here, not at the first batch of a fit: pixels=-1 slid the crop out of the image, 2.5 was cut to 2
        self.pixels, self.noise = check_int(pixels, "pixels"), check_number(noise, "noise")
        if self.pixels < 0:
            raise ValueError(f"`pixels` must be >= 0 (the largest shift), got {self.pixels}.")
        if value_range is not None:
            pair = isinstance(value_range, (tuple, list)) and len(value_range) == 2 and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value_range)
            if not pair or not value_range[0] < value_range[1]:
                raise ValueError(f"`value_range` must be two finite numbers (low, high) with low < high, or None "
                                 f"(no clamping), got {value_range!r}.")
        if not isinstance(flip, bool):
            raise TypeError(f"`flip` must be True or False, got {flip!r}.")
        self.recolour = check_number(recolour, "recolour")
        if not 0 <= self.recolour <= 1:
            raise ValueError(f"`recolour` must be in [0, 1] (the share of images recoloured), got {recolour}.")
        if self.recolour > 0 and value_range is None:
            raise ValueError("`recolour` draws the new colours in `value_range`; pass value_range=(low, high) "
                             "with it (e.g. (0.0, 1.0) for images in [0, 1]).")
        self.value_range, self.flip, self.seed = value_range, bool(flip), check_int(seed, "seed")
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4:  # one (C, H, W) image: an IndexError in the padding
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"Jitter takes a batch of images (N, C, H, W), got {got}; for one image pass "
                             "image.unsqueeze(0).")
        if self.value_range is not None:
            # normalised images clamped to (0, 1) lost most of their pixels without a word
            low, high = (float(v) for v in torch.aminmax(images.detach()))
            margin = 0.5 * (self.value_range[1] - self.value_range[0])
            if low < self.value_range[0] - margin or high > self.value_range[1] + margin:
                raise ValueError(f"Jitter's images range over [{low:.3g}, {high:.3g}], far outside `value_range` "
                                 f"{tuple(self.value_range)}, to which it clamps them; pass your pixels' range "
                                 "(value_range=(low, high)) or value_range=None (no clamping).")
        if self.recolour > 0:
            images = self._recoloured(images)
        p = self.pixels
        if p > 0:
            padded = F.pad(images, (p, p, p, p), mode="replicate")
            dx, dy = torch.randint(0, 2 * p + 1, (2,), generator=self.generator).tolist()
            images = padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]
        if self.flip:
            mirrored = torch.rand(images.shape[0], generator=self.generator, dtype=torch.float32) < 0.5
            images = torch.where(mirrored.to(images.device)[:, None, None, None], images.flip(-1), images)
        if self.noise > 0:
            images = images + self.noise * torch.randn(images.shape, generator=self.generator, dtype=torch.float32).to(images)
        if self.value_range is not None:
            images = images.clamp(*self.value_range)
        return images

    def _recoloured(self, images: Tensor) -> Tensor:
        """A share ``recolour`` of ``images`` with each channel mapped affinely onto new random ends."""
        n, c = images.shape[:2]
        low, high = self.value_range
        ends = low + (high - low) * torch.rand(2, n, c, 1, 1, generator=self.generator, dtype=torch.float32)
        chosen = torch.rand(n, 1, 1, 1, generator=self.generator, dtype=torch.float32) < self.recolour
        ends, chosen = ends.to(images), chosen.to(images.device)
        darkest, brightest = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
        # a flat channel (foreground and background alike in it) stays flat, at its new value
        unit = (images - darkest) / (brightest - darkest).clamp_min(1e-6)
        return torch.where(chosen, ends[0] + unit * (ends[1] - ends[0]), images)


_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in a repr: where the object lives, not its settings


def augment_record(augment: Any) -> Any:
    """What a fit's checkpoint records of its augmentation, so that a resume with another one is
    refused: ``None``; a :class:`Jitter`'s settings; a function's qualified name; otherwise the
    object's ``repr``, which for torchvision transforms and ``nn.Module`` holds their settings
    (memory addresses, as in a function's repr inside a ``Compose``, are left out; an object
    without a ``repr`` of its own is recorded by its class's qualified name). A library that
    changes how a transform prints (a torchvision upgrade) makes a resume refuse it.

    Examples::

        >>> augment_record(Jitter(2, noise=0.05))
        {'Jitter': {'pixels': 2, 'noise': 0.05, 'value_range': [0.0, 1.0], 'flip': False, 'seed': 0}}
        >>> augment_record(torch.nn.Dropout(0.1)), augment_record(None)
        ('Dropout(p=0.1, inplace=False)', None)
    """
    if augment is None:
        return None
    if isinstance(augment, Jitter):
        value_range = None if augment.value_range is None else [float(v) for v in augment.value_range]
        record = {"pixels": augment.pixels, "noise": augment.noise, "value_range": value_range,
                  "flip": augment.flip, "seed": augment.seed}
        if augment.recolour > 0:  # recorded only where used, so earlier checkpoints' records still match
            record["recolour"] = augment.recolour
        return {"Jitter": record}
    if hasattr(augment, "__qualname__") or type(augment).__repr__ is object.__repr__:
        # a function names itself, as does an object by its class when its repr would be only its address
        named = augment if hasattr(augment, "__qualname__") else type(augment)
        return f"{getattr(named, '__module__', None) or type(augment).__module__}.{named.__qualname__}"
    # the settings, not where the object happens to live: equal for the same transform in a resumed run
    return _MEMORY_ADDRESS.sub("", repr(augment))


def augment_generators(augment: Any) -> List[torch.Generator]:
    """The generator an augmentation draws from, if it exposes one as ``generator`` (as
    :class:`Jitter` does): a fit checkpoints its state, so a resumed fit augments as an
    uninterrupted one would.

    Args:
        augment: The augmentation callable, or ``None``.

    Returns:
        ``[augment.generator]`` or ``[]``.

    Examples::

        >>> len(augment_generators(Jitter(2))), augment_generators(None)
        (1, [])
    """
    generator = getattr(augment, "generator", None)
    return [generator] if isinstance(generator, torch.Generator) and generator.device.type == "cpu" else []


def restart_augment(augment: Any) -> None:
    """Start a :class:`Jitter` from its seed, as a fit begins: the same seed and settings then augment
    alike however much the object drew before (a second fit with one ``Jitter`` differed from the
    first, though both recorded the same seed). A resumed fit then restores the checkpoint's state.

    Examples::

        >>> jitter = Jitter(2, noise=0.1)
        >>> first = jitter(torch.zeros(1, 1, 4, 4))
        >>> restart_augment(jitter)
        >>> torch.equal(first, jitter(torch.zeros(1, 1, 4, 4)))
        True
    """
    if isinstance(augment, Jitter):
        augment.generator.manual_seed(augment.seed)
