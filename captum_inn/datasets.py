"""ColorDigits: the embedded default dataset, and concept-pair sampling.

``ColorDigits`` colours the 1,797 handwritten 8×8 digits that ship with scikit-learn
(:func:`sklearn.datasets.load_digits`), so nothing is ever downloaded. Every image is upsampled
bilinearly to ``image_size × image_size`` (32 by default), its ``[0, 1]`` intensity becomes a mask
``m``, and the pixel is ``m · fg + (1 − m) · bg`` with a foreground colour ``fg`` and a background
colour ``bg`` drawn independently and uniformly from ``[0, 1]³`` for every sample (redrawn when
they are closer than ``min_contrast``, so that no digit is invisible). The three
generative factors, :data:`FACTORS`, are therefore known exactly:

* ``"digit"``: the digit class ``0…9`` (and the handwritten image behind it);
* ``"foreground"``: the RGB colour of the stroke;
* ``"background"``: the RGB colour of the rest.

That makes ``ColorDigits`` the test bed for the factor INN (docs/method.rst): :meth:`ColorDigits.pairs`
samples pairs that share one named factor (or that share every factor but one), which is what the
concept loss consumes. The colouring formula lives in one place, :func:`colour_digits`.

For photos, :func:`load_image_folder` reads an image folder (one sub-folder per class) into
memory at one size, split per class into training and test images (:class:`ImageFolderSplit`),
ready for every ``fit_*`` function.

Examples::

    >>> from captum_inn.datasets import ColorDigits
    >>> train = ColorDigits("train", seed=0)
    >>> image, label = train[0]
    >>> image.shape, image.dtype, type(label)
    (torch.Size([3, 32, 32]), torch.float32, <class 'int'>)
    >>> a, b = train.pairs("background", n=8, generator=0)   # a[i], b[i] share the background
    >>> a.shape, b.shape
    (torch.Size([8, 3, 32, 32]), torch.Size([8, 3, 32, 32]))
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from captum_inn.attr._common import check_int

__all__ = ["FACTORS", "SPLITS", "ColorDigits", "ImageFolderSplit", "PhotoReadError", "colour_digits", "load_image_folder"]

#: The generative factors of :class:`ColorDigits`, in the order concept INNs use them.
FACTORS: Tuple[str, ...] = ("digit", "foreground", "background")

#: The valid values of ``ColorDigits(split=...)``.
SPLITS: Tuple[str, ...] = ("train", "test", "all")

#: Number of digit classes.
NUM_CLASSES = 10

# Independent random streams derived from the user's seed (never the global RNGs).
_STREAM_SPLIT = 0
_STREAM_COLOURS = {"train": 1, "test": 2, "all": 3}
_STREAM_PAIRS = {"train": 11, "test": 12, "all": 13}
_MAX_CONTRAST = math.sqrt(3) / 2  # the farthest corner of the RGB cube from its centre: any kept colour has one

GeneratorLike = Union[None, int, torch.Generator]


def colour_digits(masks: Tensor, foreground: Tensor, background: Tensor) -> Tensor:
    """Colour intensity masks: ``pixel = m · foreground + (1 − m) · background``.

    The single place the ColorDigits colouring formula lives. A pixel whose mask is exactly 1
    equals the foreground colour, one whose mask is exactly 0 equals the background colour. The
    result is clamped to ``[0, 1]`` (a no-op for masks and colours in ``[0, 1]`` up to rounding).

    Args:
        masks: Intensities in ``[0, 1]``, shape ``(N, H, W)`` or ``(N, 1, H, W)``.
        foreground: Stroke colours, shape ``(N, 3)`` (or ``(3,)``, shared by all ``N``).
        background: Background colours, shape ``(N, 3)`` (or ``(3,)``, shared by all ``N``).

    Returns:
        Tensor: Images of shape ``(N, 3, H, W)``, in the dtype of floating ``masks`` (the default
        floating dtype for integer or boolean ones).

    Raises:
        ValueError: If the shapes do not fit together.

    Examples::

        >>> masks = torch.zeros(2, 4, 4)
        >>> masks[:, 1:3, 1:3] = 1.0                      # a bright square
        >>> fg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> bg = torch.tensor([0.0, 0.0, 1.0])            # one background for both
        >>> x = colour_digits(masks, fg, bg)
        >>> x.shape, x[0, :, 1, 1].tolist(), x[1, :, 0, 0].tolist()
        (torch.Size([2, 3, 4, 4]), [1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    """
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(
            f"`masks` must have shape (N, H, W) or (N, 1, H, W), got {tuple(masks.shape)}."
        )
    if not masks.is_floating_point():  # integer masks made integer colours (0.2 became 0: black images)
        masks = masks.to(torch.get_default_dtype())
    n = masks.shape[0]
    colours = []
    for name, colour in (("foreground", foreground), ("background", background)):
        colour = torch.as_tensor(colour, dtype=masks.dtype, device=masks.device)
        if colour.dim() == 1:
            colour = colour.unsqueeze(0).expand(n, -1)
        if colour.dim() != 2 or colour.shape[1] != 3 or colour.shape[0] not in (1, n):
            raise ValueError(
                f"`{name}` must have shape ({n}, 3) or (3,) to match {n} masks, "
                f"got {tuple(colour.shape)}."
            )
        colours.append(colour[:, :, None, None])
    fg, bg = colours
    return (masks * fg + (1.0 - masks) * bg).clamp_(0.0, 1.0)


def _ensure_contrast(
    foreground: Tensor, background: Tensor, generator: torch.Generator, min_contrast: float, redraw: str
) -> Tuple[Tensor, Tensor]:
    """Redraw colours (uniform in ``[0, 1]³``) until every digit differs from its background.

    Rows whose RGB distance ``‖fg − bg‖`` is below ``min_contrast`` get the colour(s) named by
    ``redraw`` (``"both"``, ``"foreground"``, ``"background"`` or ``"none"``) drawn again; an
    invisible digit has no digit concept to interpret.
    """
    foreground, background = foreground.clone(), background.clone()
    if redraw == "none" or min_contrast <= 0:
        return foreground, background
    for _ in range(10_000):
        low = (foreground - background).norm(dim=1) < min_contrast
        if not low.any():
            return foreground, background
        k = int(low.sum())
        if redraw in ("both", "foreground"):
            foreground[low] = torch.rand(k, 3, generator=generator, dtype=torch.float32)
        if redraw in ("both", "background"):
            background[low] = torch.rand(k, 3, generator=generator, dtype=torch.float32)
    # a kept colour near the cube's centre leaves only its corners' tips to draw from: the corner
    # farthest from it lies at least sqrt(3)/2 >= min_contrast away
    low = (foreground - background).norm(dim=1) < min_contrast
    if redraw == "foreground":
        foreground[low] = (background[low] < 0.5).to(foreground.dtype)
    else:
        background[low] = (foreground[low] < 0.5).to(background.dtype)
    return foreground, background


@functools.lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The bundled scikit-learn digits: intensities in ``[0, 1]`` (1797, 8, 8) and labels, read once
    and shared (read-only) by every dataset."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    targets = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def _derived_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` from ``(seed, stream)``."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _upsample(images: np.ndarray, size: int) -> Tensor:
    """Bilinear resize of ``(N, 8, 8)`` intensities to ``(N, size, size)`` float32 in ``[0, 1]``."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.squeeze(1).clamp_(0.0, 1.0).contiguous()


class ColorDigits(Dataset):
    """Coloured handwritten digits with known factors, built from scikit-learn's bundled digits.

    Each of the 1,797 8×8 digits is upsampled bilinearly to ``image_size × image_size``; its
    ``[0, 1]`` intensity ``m`` colours the pixel as ``m · fg + (1 − m) · bg`` (see
    :func:`colour_digits`), with ``fg`` and ``bg`` independent uniform RGB colours per sample.

    The train/test split is by handwritten image (no image appears in both) and stratified by
    digit class; ``recolorings=k`` makes ``k`` independently coloured copies of every image in the
    split, sample ``r · n_images + j`` being copy ``r`` of image ``j``. Everything is computed in
    the constructor, deterministically from ``seed`` with local generators (global RNGs are never
    touched); train, test and ``"all"`` use different colour streams.

    ``dataset[i]`` is ``(image, label)`` with ``image`` of shape ``(3, image_size, image_size)``,
    float32 in ``[0, 1]``, and ``label`` the digit as an ``int``, so the dataset plugs into
    standard classification loops and :class:`torch.utils.data.DataLoader`.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (every image, no split).
        recolorings: Number ``k >= 1`` of independently coloured copies of each image.
        seed: Non-negative integer; fixes the split, the colours and the default pair stream.
            Build the train and test splits with the same ``seed`` (and ``test_fraction``): other
            values split the digits otherwise, so the two would share handwritten images (288 of
            359 test images for seeds 0 and 1).
        test_fraction: Share of each digit class that goes to the test split, in ``(0, 1)``.
            Every class keeps at least one image on each side.
        image_size: Side length of the square images (the 8×8 originals are resized to it).
        min_contrast: Smallest RGB distance ``‖fg − bg‖`` between a digit and its background;
            pairs closer than this are redrawn so every digit stays visible (``0``: fully
            independent colours; at most ``sqrt(3)/2``, about 0.866).

    Attributes:
        images (Tensor): ``(N, 3, S, S)`` float32 in ``[0, 1]``, ``N = k · n_images``.
        digits (Tensor): ``(N,)`` long, the digit classes (same as :attr:`targets`).
        foreground (Tensor): ``(N, 3)`` float32, the stroke colours.
        background (Tensor): ``(N, 3)`` float32, the background colours.
        source_index (Tensor): ``(N,)`` long, the index of the underlying handwritten image in
            ``sklearn.datasets.load_digits()`` (0…1796).
        masks (Tensor): ``(N, S, S)`` float32, the upsampled intensity masks.
        n_images (int): Number of distinct handwritten images in the split.

    Raises:
        ValueError: On an unknown ``split``, ``recolorings < 1``, ``test_fraction`` outside
            ``(0, 1)``, a negative ``seed`` or ``image_size < 1``.

    Examples::

        >>> train = ColorDigits("train", recolorings=2, seed=0)
        >>> len(train) == 2 * train.n_images
        True
        >>> x, y = train[3]
        >>> x.shape, 0 <= y <= 9
        (torch.Size([3, 32, 32]), True)
        >>> f = train.factors(3)
        >>> torch.allclose(x, colour_digits(train.masks[3:4], f["foreground"], f["background"])[0])
        True
        >>> loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
        >>> xb, yb = next(iter(loader))
        >>> xb.shape, yb.dtype
        (torch.Size([64, 3, 32, 32]), torch.int64)
    """

    num_classes: int = NUM_CLASSES

    def __init__(
        self,
        split: str = "train",
        recolorings: int = 1,
        seed: int = 0,
        test_fraction: float = 0.2,
        image_size: int = 32,
        min_contrast: float = 0.4,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
        if isinstance(recolorings, bool) or not isinstance(recolorings, (int, np.integer)):
            raise TypeError(f"`recolorings` must be an int, got {type(recolorings).__name__}.")
        if recolorings < 1:
            raise ValueError(
                f"`recolorings` must be >= 1 (copies of each image), got {recolorings}."
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
        if seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed}.")
        # "0.5" was read as a number, and the repr showed it as one
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) \
                or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"`test_fraction` must be a number strictly between 0 and 1, got {test_fraction!r}.")
        test_fraction = float(test_fraction)
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
            raise TypeError(f"`image_size` must be an int, got {type(image_size).__name__}.")
        if image_size < 1:
            raise ValueError(f"`image_size` must be >= 1, got {image_size}.")

        if isinstance(min_contrast, bool) or not isinstance(min_contrast, numbers.Real):  # "0.5" passed float()
            raise TypeError(f"`min_contrast` must be a number (an RGB distance), got {min_contrast!r}.")
        if not 0.0 <= float(min_contrast) <= _MAX_CONTRAST:
            raise ValueError(f"`min_contrast` must lie in [0, {_MAX_CONTRAST:.3f}], got {min_contrast}: a pair that "
                             "keeps one colour must find another that far from it, and no colour lies farther than "
                             "sqrt(3)/2 from the middle grey.")
        self.min_contrast = float(min_contrast)
        self.split = split
        self.recolorings = int(recolorings)
        self.seed = int(seed)
        self.test_fraction = test_fraction
        self.image_size = int(image_size)

        raw_images, raw_targets = _load_digits()
        sources = self._split_indices(raw_targets, split, self.seed, test_fraction)
        self._sources = torch.from_numpy(sources)  # (n_images,) global indices, sorted
        self._image_masks = _upsample(raw_images[sources], self.image_size)  # (n_images, S, S)
        self._image_digits = torch.from_numpy(raw_targets[sources].copy())  # (n_images,)
        self.n_images = int(sources.shape[0])

        # Per-class member tables for vectorised pair sampling (local image indices).
        members = [torch.nonzero(self._image_digits == c).flatten() for c in range(NUM_CLASSES)]
        self._class_sizes = torch.tensor([len(m) for m in members], dtype=torch.long)
        width = int(self._class_sizes.max())
        self._class_members = torch.zeros(NUM_CLASSES, width, dtype=torch.long)
        self._position_in_class = torch.zeros(self.n_images, dtype=torch.long)
        for c, m in enumerate(members):
            self._class_members[c, : len(m)] = m
            self._position_in_class[m] = torch.arange(len(m))

        # Samples: copy r of image j sits at r * n_images + j.
        n = self.recolorings * self.n_images
        self._local = torch.arange(self.n_images).repeat(self.recolorings)  # (N,)
        colour_gen = torch.Generator().manual_seed(_derived_seed(self.seed, _STREAM_COLOURS[split]))
        self._foreground, self._background = _ensure_contrast(
            torch.rand(n, 3, generator=colour_gen, dtype=torch.float32),
            torch.rand(n, 3, generator=colour_gen, dtype=torch.float32),
            colour_gen, self.min_contrast, redraw="both",
        )
        self._digits = self._image_digits[self._local]
        self._source_index = self._sources[self._local]
        self._images = colour_digits(
            self._image_masks[self._local], self._foreground, self._background
        )
        self._pair_generator = torch.Generator().manual_seed(
            _derived_seed(self.seed, _STREAM_PAIRS[split])
        )

    # ------------------------------------------------------------------ split

    @staticmethod
    def _split_indices(
        targets: np.ndarray, split: str, seed: int, test_fraction: float
    ) -> np.ndarray:
        """Sorted global image indices of ``split``, stratified by class."""
        if split == "all":
            return np.arange(targets.shape[0], dtype=np.int64)
        rng = np.random.default_rng([seed, _STREAM_SPLIT])
        chosen = []
        for c in range(NUM_CLASSES):
            idx = rng.permutation(np.flatnonzero(targets == c))
            n_test = int(round(test_fraction * len(idx)))
            n_test = min(max(n_test, 1), len(idx) - 1)
            chosen.append(idx[:n_test] if split == "test" else idx[n_test:])
        return np.sort(np.concatenate(chosen)).astype(np.int64)

    # --------------------------------------------------------------- Dataset

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        """Return ``(image, label)``: a ``(3, S, S)`` float32 image and its digit as an int."""
        i = self._check_index(index)
        return self._images[i].clone(), int(self._digits[i])  # a copy: an in-place transform changed the dataset

    def _check_index(self, index: int) -> int:
        i = check_int(index, "index")  # int(2.7) read image 2
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Index {index} is out of range for a ColorDigits of length {n}.")
        return i % n

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, recolorings={self.recolorings}, "
            f"seed={self.seed}, test_fraction={self.test_fraction}, "
            f"image_size={self.image_size}; {len(self)} samples of {self.n_images} images)"
        )

    # -------------------------------------------------------------- tensors

    @property
    def images(self) -> Tensor:
        """``(N, 3, S, S)`` float32 in ``[0, 1]``: every image of the split."""
        return self._images

    @property
    def digits(self) -> Tensor:
        """``(N,)`` long: the digit class of every sample."""
        return self._digits

    @property
    def targets(self) -> Tensor:
        """``(N,)`` long: alias of :attr:`digits` (torchvision's name for labels)."""
        return self._digits

    @property
    def foreground(self) -> Tensor:
        """``(N, 3)`` float32 in ``[0, 1]``: the stroke colour of every sample."""
        return self._foreground

    @property
    def background(self) -> Tensor:
        """``(N, 3)`` float32 in ``[0, 1]``: the background colour of every sample."""
        return self._background

    @property
    def source_index(self) -> Tensor:
        """``(N,)`` long: index of each sample's handwritten image in ``load_digits()``."""
        return self._source_index

    @property
    def masks(self) -> Tensor:
        """``(N, S, S)`` float32 in ``[0, 1]``: the upsampled intensity mask of every sample."""
        return self._image_masks[self._local]

    def factors(self, index: int) -> Dict[str, Union[int, Tensor]]:
        """The generative factors of sample ``index``.

        Args:
            index: Sample index (negative indices count from the end).

        Returns:
            dict: ``digit`` (int), ``foreground`` and ``background`` (``(3,)`` float32 tensors)
            and ``source_index`` (int, the handwritten image in ``load_digits()``).

        Examples::

            >>> ds = ColorDigits("test")
            >>> f = ds.factors(0)
            >>> sorted(f), f["foreground"].shape
            (['background', 'digit', 'foreground', 'source_index'], torch.Size([3]))
        """
        i = self._check_index(index)
        return {
            "digit": int(self._digits[i]),
            "foreground": self._foreground[i].clone(),
            "background": self._background[i].clone(),
            "source_index": int(self._source_index[i]),
        }

    # ---------------------------------------------------------------- pairs

    def _resolve_generator(self, generator: GeneratorLike) -> torch.Generator:
        if generator is None:
            return self._pair_generator
        if isinstance(generator, torch.Generator):
            return generator
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            return torch.Generator().manual_seed(int(generator))
        raise TypeError(
            "`generator` must be None, an int seed or a torch.Generator, "
            f"got {type(generator).__name__}."
        )

    def concept(self, factor: str, relation: str = "share"):
        """One generative factor as a :class:`captum_inn.concepts.ConceptPairs` for the factor INN.

        Args:
            factor: One of :data:`FACTORS`.
            relation: ``"share"`` (pairs share ``factor``, see :meth:`pairs` with ``factor=``) or
                ``"differ"`` (pairs differ only in ``factor``, ``differ_in=``).

        Returns:
            A :class:`~captum_inn.concepts.ConceptPairs` named ``factor``.

        Examples::

            >>> digit = ColorDigits("train").concept("digit")
            >>> a, b = digit.sample(4, torch.Generator().manual_seed(0))
            >>> a.shape, digit.relation
            (torch.Size([4, 3, 32, 32]), 'share')
        """
        from captum_inn.concepts import ConceptPairs

        if factor not in FACTORS:
            raise ValueError(f"`factor` must be one of {FACTORS}, got {factor!r}.")
        if relation not in ("share", "differ"):
            raise ValueError(f"`relation` must be 'share' or 'differ', got {relation!r}.")
        key = "factor" if relation == "share" else "differ_in"

        def sampler(n: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
            return self.pairs(n=n, generator=generator, **{key: factor})

        return ConceptPairs(factor, sampler, relation)

    def concepts(self, relation: str = "share") -> list:
        """All of :data:`FACTORS` as concepts (see :meth:`concept`).

        Args:
            relation: ``"share"`` or ``"differ"``.

        Returns:
            ``[ConceptPairs, ...]`` for digit, foreground and background.
        """
        return [self.concept(f, relation) for f in FACTORS]

    def _pick(self, classes: Tensor, u: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Uniform local image of each class in ``classes``, optionally not ``exclude``."""
        sizes = self._class_sizes[classes]
        if exclude is None:
            r = (u * sizes).long().clamp_(max=sizes - 1)
        else:
            choices = (sizes - 1).clamp(min=1)
            r = (u * choices).long().clamp_(max=choices - 1)
            skip = (sizes > 1) & (r >= self._position_in_class[exclude])
            r = r + skip.long()
        return self._class_members[classes, r]

    def pairs(
        self,
        factor: str | None = None,
        n: int = 16,
        generator: GeneratorLike = None,
        *,
        differ_in: str | None = None,
        return_factors: bool = False,
    ) -> Union[
        Tuple[Tensor, Tensor],
        Tuple[Tensor, Tensor, Dict[str, Tensor], Dict[str, Tensor]],
    ]:
        """Sample ``n`` concept pairs ``(a, b)`` for the factor INN.

        Exactly one of ``factor`` and ``differ_in`` is given.

        * ``factor=F``: ``a[i]`` and ``b[i]`` share factor ``F``; every other factor of ``b[i]`` is
          drawn independently. Sharing ``"digit"`` means the same class but a different
          handwritten image (when the class has more than one) with independent colours;
          sharing ``"foreground"`` (``"background"``) means an identical colour with an
          independent handwritten image and independent other colour.
        * ``differ_in=F``: ``b[i]`` shares every factor of ``a[i]`` but ``F``. For
          ``"digit"`` it is the same colours on an image of a different class; for a colour, the
          same handwritten image and other colour with a freshly drawn colour ``F``.

        ``a`` are samples of this dataset (uniform indices); ``b`` are synthesised from the split's
        masks with :func:`colour_digits`, so shared colours are exactly equal. Only images of this
        split are used.

        Args:
            factor: The shared factor, one of :data:`FACTORS`.
            n: Number of pairs, ``>= 1``.
            generator: ``None`` (the dataset's own stream, seeded from ``seed``, which advances
                with every call), an int seed or a ``torch.Generator``. The same seed gives the
                same pairs.
            differ_in: The only factor in which ``a`` and ``b`` differ, one of :data:`FACTORS`.
            return_factors: Also return the factors of ``a`` and ``b``.

        Returns:
            ``(a, b)``, two ``(n, 3, S, S)`` float32 tensors; with ``return_factors=True``,
            ``(a, b, factors_a, factors_b)`` where each dict holds ``digit`` ``(n,)`` long,
            ``foreground`` and ``background`` ``(n, 3)`` float32 and ``source_index`` ``(n,)``
            long; ``factors_a`` also holds ``index`` ``(n,)`` long, the dataset indices of ``a``.

        Raises:
            ValueError: On an unknown factor, both or neither of ``factor``/``differ_in``, or
                ``n < 1``.

        Examples::

            >>> ds = ColorDigits("train")
            >>> a, b, fa, fb = ds.pairs("foreground", n=4, generator=0, return_factors=True)
            >>> a.shape, bool((fa["foreground"] == fb["foreground"]).all())
            (torch.Size([4, 3, 32, 32]), True)
            >>> a, b = ds.pairs(differ_in="digit", n=4, generator=0)
            >>> b.shape
            torch.Size([4, 3, 32, 32])
        """
        if (factor is None) == (differ_in is None):
            raise ValueError(
                "Give exactly one of `factor` (the shared factor) and `differ_in` (the only "
                f"differing factor); got factor={factor!r}, differ_in={differ_in!r}."
            )
        name, value = ("factor", factor) if factor is not None else ("differ_in", differ_in)
        if value not in FACTORS:
            raise ValueError(f"`{name}` must be one of {FACTORS}, got {value!r}.")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"`n` must be an int, got {type(n).__name__}.")
        if n < 1:
            raise ValueError(f"`n` (number of pairs) must be >= 1, got {n}.")
        n = int(n)
        g = self._resolve_generator(generator)

        # Draw every random stream every time, so results depend only on the generator state.
        index = torch.randint(len(self), (n,), generator=g)
        u_image = torch.rand(n, generator=g, dtype=torch.float32)
        u_class = torch.rand(n, generator=g, dtype=torch.float32)
        fresh_fg = torch.rand(n, 3, generator=g, dtype=torch.float32)
        fresh_bg = torch.rand(n, 3, generator=g, dtype=torch.float32)

        a_local = self._local[index]
        a_digit = self._digits[index]
        a_fg = self._foreground[index]
        a_bg = self._background[index]

        if factor is not None:
            b_fg, b_bg = fresh_fg, fresh_bg
            if factor == "digit":
                b_local = self._pick(a_digit, u_image, exclude=a_local)
            else:
                b_local = (u_image * self.n_images).long().clamp_(max=self.n_images - 1)
                if factor == "foreground":
                    b_fg = a_fg.clone()
                else:
                    b_bg = a_bg.clone()
        else:
            b_local, b_fg, b_bg = a_local, a_fg.clone(), a_bg.clone()
            if differ_in == "digit":
                offset = (u_class * (NUM_CLASSES - 1)).long().clamp_(max=NUM_CLASSES - 2)
                other = (a_digit + 1 + offset) % NUM_CLASSES
                b_local = self._pick(other, u_image)
            elif differ_in == "foreground":
                b_fg = fresh_fg
            else:
                b_bg = fresh_bg

        # Keep b's digit visible: redraw only the colour that b does not share with a.
        redraw = {"digit": "both", "foreground": "background", "background": "foreground"}[factor] \
            if factor is not None else {"digit": "none", "foreground": "foreground", "background": "background"}[differ_in]
        b_fg, b_bg = _ensure_contrast(b_fg, b_bg, g, self.min_contrast, redraw)
        a = self._images[index]
        b = colour_digits(self._image_masks[b_local], b_fg, b_bg)
        if not return_factors:
            return a, b
        factors_a = {
            "digit": a_digit,
            "foreground": a_fg,
            "background": a_bg,
            "source_index": self._sources[a_local],
            "index": index,
        }
        factors_b = {
            "digit": self._image_digits[b_local],
            "foreground": b_fg,
            "background": b_bg,
            "source_index": self._sources[b_local],
        }
        return a, b, factors_a, factors_b


@dataclass(frozen=True, eq=False)  # compared by identity: == of the generated __eq__ failed on the tensors
class ImageFolderSplit:
    """Photos of an ``ImageFolder``-layout folder, loaded as tensors and split per class.

    Attributes:
        train_images: ``(N_train, 3, size, size)`` float32 in ``[0, 1]``.
        train_labels: ``(N_train,)`` long class indices.
        test_images: ``(N_test, 3, size, size)``.
        test_labels: ``(N_test,)``.
        classes: Folder names, in class-index order (sorted, as ``torchvision.datasets.ImageFolder``).
        root: The folder the images came from.

    Examples::

        split = load_image_folder("path/to/animalfaces10", size=64)
        split.train_images.shape               # (N_train, 3, 64, 64)
        split.classes[int(split.train_labels[0])]
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: Tuple[str, ...]
    root: str


@functools.cache
def _exif_turns() -> Dict[int, Any]:
    from PIL import Image

    t = Image.Transpose
    # EXIF orientation 1 is upright; the others name the turn or mirror that shows the photo upright
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
            7: t.TRANSVERSE, 8: t.ROTATE_90}


def _is_32_bit_tiff(image: Any) -> bool:
    """A TIFF whose samples are 32-bit (BitsPerSample 32); PGMs and 16-bit files open as mode I too."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(258) if image.format == "TIFF" and tags is not None else None
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return bits == 32


def _load_rgb(path: str):
    """The image at ``path`` as 8-bit RGB (PIL), upright. 16-bit grayscale (PNG, TIFF: mode ``I;16…``;
    PGM of any depth: mode ``I``) is scaled by 255/65535 first: PIL's own conversion, and so torchvision's
    image loader, clips it at 255 (a mid grey turned white); a 32-bit integer TIFF (mode ``I``) of values
    up to 255 is taken as they are; a 32-bit float image (mode ``F``) in ``[0, 1]`` is scaled by 255,
    which that conversion clipped to black. A photo with an EXIF orientation (most
    phone photos) is turned as a viewer shows it; torchvision's loader keeps the stored pixels,
    which lie on their side."""
    from PIL import Image

    with open(path, "rb") as file:
        image = Image.open(file)
        image.load()
        try:  # damaged EXIF data (Pillow raises SyntaxError, struct.error, ...) leaves the stored pixels
            orientation = int(image.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - the photo itself is readable
            orientation = 1
    turn = _exif_turns().get(orientation)
    if turn is not None:
        image = image.transpose(turn)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode == "F":  # a float image in [0, 1] (PIL's conversion clipped it to black), else 0…255
            scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        elif _is_32_bit_tiff(image) and values.max(initial=0.0) <= 255:  # 8-bit values in 32-bit integers (a
            scale = 1.0  # numpy int32 array saved as TIFF) were scaled to black
        else:  # 16-bit grey (PNG and TIFF as I;16, PGM of any maxval as I, scaled by Pillow to 0…65535)
            scale = 255 / 65535
        image = Image.fromarray((values * scale).round().clip(0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


def _encodes(name: str) -> bool:
    """Whether a file name read from the disk is text (a name in another encoding than the file
    system's comes back with surrogate escapes, which no figure or page can write)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_images(root: Union[str, os.PathLike], name: str = "root") -> Tuple[Tuple[str, ...], Dict[int, list]]:
    """The class names and ``{class index: image paths}`` of an ImageFolder-layout folder, without
    reading an image (hidden files and folders skipped); a ``ValueError`` naming ``name`` for a
    folder without class folders or images, or a class with fewer than two images."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    def visible(path: str) -> bool:  # no hidden file or folder below root: macOS "._x.jpg", .ipynb_checkpoints
        return not any(part.startswith(".") for part in Path(os.path.relpath(path, root)).parts)

    class VisibleImageFolder(ImageFolder):
        def find_classes(self, directory: str) -> Tuple[list, Dict[str, int]]:
            classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and visible(entry.path))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {cls: i for i, cls in enumerate(classes)}

    try:  # allow_empty: a class without images is named below (torchvision said the whole root held none)
        folder = VisibleImageFolder(str(root), is_valid_file=lambda path: visible(path) and
                                    has_file_allowed_extension(path, IMG_EXTENSIONS), allow_empty=True)
    except (FileNotFoundError, RuntimeError) as error:  # no class folders
        raise ValueError(f"`{name}` {str(root)!r} holds no images in ImageFolder layout: {error}") from None
    by_class: Dict[int, list] = {}
    seen: Dict[str, Tuple[int, str]] = {}
    for path, label in folder.samples:
        real = os.path.realpath(path)
        if real not in seen:  # one photo by several paths (symlinks) would land on both sides of the split
            seen[real] = (label, path)
            by_class.setdefault(label, []).append(path)
        elif seen[real][0] != label:  # the first class found kept it: the photo's own class lost it, unsaid
            raise ValueError(f"`{name}` holds one photo in two classes, {folder.classes[seen[real][0]]!r} "
                             f"({seen[real][1]!r}) and {folder.classes[label]!r} ({path!r}), through a link; a photo "
                             "has one class: remove the link (or the linked class folder).")
    unwritable = [cls for cls in folder.classes if not _encodes(cls)]
    if unwritable:  # the figures and the report failed on them, after the whole fit
        raise ValueError(f"`{name}` has class folders whose names are not valid UTF-8, {unwritable!r}; rename them "
                         "(they come from an archive in another encoding, often Latin-1).")
    for label, cls in enumerate(folder.classes):
        count = len(by_class.get(label, []))
        if count < 2:
            raise ValueError(f"class {cls!r} in `{name}` has {count} image(s); each class needs >= 2 (files ending in "
                             f"{', '.join(IMG_EXTENSIONS)}).")
    return tuple(folder.classes), by_class


class PhotoReadError(ValueError):
    """A photo of an image folder that cannot be read (damaged, truncated, not an image, or too
    large to decode safely); the message names the file. A ``ValueError``, so code that caught
    those from :func:`load_image_folder` still does.

    Examples::

        try:
            split = load_image_folder("photos", size=64)
        except PhotoReadError as error:
            print(error)   # `root` holds a photo that cannot be read, 'photos/cat/3.jpg': ...; remove or replace it.
    """


def load_image_folder(
    root: Union[str, os.PathLike],
    size: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_per_class: Optional[int] = None,
    *,
    name: str = "root",
) -> ImageFolderSplit:
    """Load an image folder (one sub-folder per class) into memory, resized and split per class.

    Each photo is turned upright by its EXIF orientation (as viewers show phone photos; torchvision's
    loader does not), its shorter side resized to ``size`` (antialiased) and the centre ``size × size``
    square kept, as ``torchvision.transforms.Resize(size) + CenterCrop(size)`` would. A transparent
    image's alpha channel is dropped, as torchvision's loader does. The split
    is drawn per class with a seeded generator, so every class is in both parts. Hidden files and
    folders (names starting with ``.``: ``.ipynb_checkpoints``, macOS ``._photo.jpg``) are skipped,
    and a photo reachable by several paths (symbolic links) is read once.

    Args:
        root: Folder in ``torchvision.datasets.ImageFolder`` layout (``root/<class>/<image>``).
        size: Side of the square images.
        test_fraction: Share of each class held out, in ``(0, 1)``; each class keeps at least one
            image on each side.
        seed: Seed of the split.
        max_per_class: Use at most this many images per class (for quick runs); ``None``: all.
        name: The folder's name in error messages (a caller's own argument, such as ``images``).

    Returns:
        An :class:`ImageFolderSplit`.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: On a bad argument, a folder not in ImageFolder layout, a class with fewer
            than two images, or a photo that cannot be read (named; :class:`PhotoReadError`).

    Examples::

        >>> split = load_image_folder("path/to/animalfaces10", size=64)  # doctest: +SKIP
        >>> split.train_images.shape, len(split.classes)                   # doctest: +SKIP
        (torch.Size([719, 3, 64, 64]), 10)
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"`{name}` {str(root)!r} is not a folder; pass a folder with one sub-folder of images per class "
            "(torchvision ImageFolder layout)."
        )
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8:  # NumPy ints are welcome
        raise ValueError(f"`size` must be an int >= 8, got {size!r}.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be a number in (0, 1), got {test_fraction!r}.")
    size, seed = int(size), check_int(seed, "seed")
    # "at most max_per_class": a value below 2 cannot be honoured (one image on each side), so say
    # so instead of silently loading 2
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, numbers.Integral)
                                      or max_per_class < 2):
        raise ValueError(f"`max_per_class` must be None or an int >= 2 (one image on each side), got {max_per_class!r}.")
    max_per_class = None if max_per_class is None else int(max_per_class)
    classes, by_class = _find_images(root, name=name)
    generator = torch.Generator().manual_seed(seed)
    parts = {"train": ([], []), "test": ([], [])}
    for label in sorted(by_class):
        paths = by_class[label]
        order = torch.randperm(len(paths), generator=generator).tolist()
        # the held-out photos are a prefix of the class's order whatever max_per_class is, so a
        # model trained on a smaller split never meets its training photos in a larger split's test
        n_test = min(max(1, round(test_fraction * len(order))), len(order) - 1)
        test_order, train_order = order[:n_test], order[n_test:]
        if max_per_class is not None and max_per_class < len(order):
            kept = min(max(1, round(test_fraction * max_per_class)), max_per_class - 1, n_test)
            test_order, train_order = test_order[:kept], train_order[:max_per_class - kept]
        for side, chosen in (("test", test_order), ("train", train_order)):
            for i in chosen:
                try:
                    pil = _load_rgb(paths[i])
                # a truncated download's "image file is truncated" (OSError), a PNG's oversized text or
                # colour-profile chunk (ValueError): the file was not named
                except (OSError, ValueError) as error:
                    raise PhotoReadError(f"`{name}` holds a photo that cannot be read, {paths[i]!r}: {error}; remove "
                                         "or replace it.") from error
                except Image.DecompressionBombError as error:  # over ~179 MP, or a damaged header that claims it
                    raise PhotoReadError(f"`{name}` holds a photo too large to read safely, {paths[i]!r}: {error}; shrink "
                                         "or remove it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file.") from error
                image = TF.pil_to_tensor(pil)
                image = TF.center_crop(TF.resize(image, size, antialias=True), [size, size])
                images, labels = parts[side]
                images.append(image)
                labels.append(label)

    def stack(name: str) -> Tuple[Tensor, Tensor]:
        images, labels = parts[name]
        return torch.stack(images).float().div_(255.0), torch.tensor(labels, dtype=torch.long)

    train_x, train_y = stack("train")
    test_x, test_y = stack("test")
    return ImageFolderSplit(train_x, train_y, test_x, test_y, classes, str(root))
