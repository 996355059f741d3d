"""The encode/decode protocol and a default convolutional autoencoder with a Gaussian posterior.

The autoencoder ``E, D`` gives every image a code ``z̄ = E(x)`` and ``x̂ = D(z̄)``. It is independent
of the analysed network: trained once per dataset and shared by every layer being analysed.
Bring your own by giving any object ``encode(x)`` (returning a code tensor ``(N, d)`` or a
distribution with ``.mean`` and ``.std`` or ``.stddev``, e.g. a ``torch.distributions.Normal``) and
``decode(code)``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from captum_inn._random import normal

__all__ = [
    "Autoencoder",
    "DiagonalGaussian",
    "ConvAutoencoder",
    "check_autoencoder",
    "encode_mean",
    "encode_posterior",
]


@runtime_checkable
class Autoencoder(Protocol):
    """What ``captum_inn`` needs of an autoencoder: ``encode`` and ``decode``.

    ``encode(x)`` maps images ``(N, C, H, W)`` to a code ``(N, d)`` or to a distribution object
    with ``mean`` ``(N, d)`` and ``std`` or ``stddev`` (the posterior's spread; the INNs train on
    samples ``mean + std · ε``); ``decode(code)`` maps ``(N, d)`` back to images.

    Examples::

        >>> class Flat:                        # a deterministic "autoencoder" of 1×4×4 images
        ...     def encode(self, x):           # (N, 1, 4, 4) -> (N, 16)
        ...         return x.flatten(1)
        ...     def decode(self, code):        # (N, 16) -> (N, 1, 4, 4)
        ...         return code.view(-1, 1, 4, 4)
        >>> isinstance(Flat(), Autoencoder)
        True
        >>> encode_mean(Flat(), torch.rand(2, 1, 4, 4)).shape
        torch.Size([2, 16])
    """

    def encode(self, x: Tensor) -> Any:  # pragma: no cover - protocol
        ...

    def decode(self, code: Tensor) -> Tensor:  # pragma: no cover - protocol
        ...


def check_autoencoder(autoencoder: Any, name: str = "autoencoder") -> None:
    """Raise a clear ``TypeError`` unless ``autoencoder`` has callable ``encode`` and ``decode``, and a
    ``ValueError`` if it declares a ``latent_dim`` below 2 (no INN can split such codes).

    Args:
        autoencoder: The object to check.
        name: Argument name used in the message.

    Examples::

        >>> check_autoencoder(ConvAutoencoder(latent_dim=8))
        >>> check_autoencoder(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        TypeError: `autoencoder` must have callable `encode(x)` and `decode(code)` methods; Linear lacks encode, decode. ...
    """
    missing = [m for m in ("encode", "decode") if not callable(getattr(autoencoder, m, None))]
    if missing:
        raise TypeError(
            f"`{name}` must have callable `encode(x)` and `decode(code)` methods; "
            f"{type(autoencoder).__name__} lacks {', '.join(missing)}. Wrap your model in a class "
            "with these two methods, or train the default with captum_inn.training.fit_autoencoder."
        )
    latent = getattr(autoencoder, "latent_dim", None)
    if isinstance(latent, int) and not isinstance(latent, bool) and latent < 2:
        # found here, before a pass over the data, not by the first coupling ("`dim` >= 2 features to split")
        raise ValueError(f"`{name}` has latent_dim={latent}, but the INNs split a code into two halves: give the "
                         "autoencoder codes of at least 2 dimensions.")


class DiagonalGaussian:
    """A diagonal Gaussian posterior ``N(mean, exp(logvar))`` over codes ``(N, d)``.

    Unlike ``torch.distributions.Normal`` its :meth:`sample` takes a ``torch.Generator``, so cached
    posterior samples are reproducible.
    The log-variance is clamped to ``[-30, 20]``: an encoder's extreme output (an untrained one, an
    image far outside its data) keeps the standard deviation, samples and KL finite.

    Args:
        mean: ``(N, d)``.
        logvar: ``(N, d)``.

    Examples::

        >>> q = DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 3))
        >>> q.sample(generator=torch.Generator().manual_seed(0)).shape, q.kl().shape
        (torch.Size([2, 3]), torch.Size([2]))
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        """Standard deviation ``(N, d)``."""
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """A reparametrised sample ``mean + std · ε`` (differentiable in mean and logvar)."""
        eps = normal(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps

    rsample = sample

    def kl(self) -> Tensor:
        """``KL(q ‖ N(0, I))`` per sample, ``(N,)``."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=1)


def encode_posterior(autoencoder: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """Encode ``x`` and return the posterior as ``(mean, std)``, both ``(N, d)``.

    A deterministic encoder (one that returns a tensor) has ``std = 0``.

    Args:
        autoencoder: Any object following :class:`Autoencoder`.
        x: ``(N, C, H, W)`` images.

    Returns:
        ``(mean, std)``, both ``(N, d)``.

    Examples::

        >>> ae = ConvAutoencoder((3, 32, 32), latent_dim=16)
        >>> mean, std = encode_posterior(ae, torch.rand(2, 3, 32, 32))
        >>> mean.shape, std.shape
        (torch.Size([2, 16]), torch.Size([2, 16]))
    """
    return _posterior(autoencoder, x, warn_without_std=True)


def _posterior(autoencoder: Any, x: Tensor, warn_without_std: bool) -> tuple[Tensor, Tensor]:
    """:func:`encode_posterior`; ``warn_without_std=False`` where only the mean is used (the
    explainers: the warning, about training on posterior samples, came once per batch there)."""
    out = autoencoder.encode(x)
    if isinstance(out, Tensor):
        mean, std = out, torch.zeros_like(out)
    elif hasattr(out, "mean"):
        mean = out.mean
        # DiagonalGaussian has .std, torch.distributions have .stddev, a few objects a std() method
        std = getattr(out, "std", None)
        std = getattr(out, "stddev", None) if std is None else std
        std = std() if callable(std) else std
        if std is None and warn_without_std:
            # attr imports this module
            from captum_inn.attr._common import user_stacklevel

            warnings.warn(f"`encode` returned a {type(out).__name__} with `.mean` but no `.std` or `.stddev`: its codes "
                          "are taken as deterministic (std 0). Give it a `std` to train on posterior samples.",
                          UserWarning, stacklevel=user_stacklevel())
        std = torch.zeros_like(mean) if std is None else std.expand_as(mean)
    else:
        raise TypeError(
            f"`autoencoder.encode` returned {type(out).__name__}; it must return a code tensor "
            "(N, d) or a distribution with a `.mean` of shape (N, d)."
        )
    if mean.dim() != 2:
        raise ValueError(
            f"`autoencoder.encode` must give codes of shape (N, d), got {tuple(mean.shape)}; "
            "flatten the code inside encode()."
        )
    return mean, std


def encode_mean(autoencoder: Any, x: Tensor) -> Tensor:
    """The posterior mean code ``(N, d)`` of images ``x`` (the code itself for deterministic encoders).

    Args:
        autoencoder: Any object following :class:`Autoencoder`.
        x: ``(N, C, H, W)`` images.

    Returns:
        ``(N, d)`` codes.

    Examples::

        >>> ae = ConvAutoencoder((3, 32, 32), latent_dim=16).eval()
        >>> encode_mean(ae, torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 16])
    """
    return _posterior(autoencoder, x, warn_without_std=False)[0]


def _power_of_two_side(side: int) -> bool:
    """Whether :class:`ConvAutoencoder` takes square images of this side: a power of two ``>= 8``
    (each stride-2 stage halves it, down to 4×4)."""
    return side >= 8 and side & (side - 1) == 0


class ConvAutoencoder(nn.Module):
    """The default autoencoder: a convolutional encoder with a Gaussian posterior and a decoder.

    Stride-2 convolutions halve the image ``n_down`` times to a 4×4 map; a linear layer gives the
    posterior mean and log-variance of the ``latent_dim`` code; the decoder mirrors the encoder with
    nearest-neighbour upsampling and convolutions. Train it with :func:`captum_inn.training.fit_autoencoder`.

    Args:
        image_shape: ``(C, H, W)`` of the images, square with a power-of-two side ``>= 8``
            (``(3, 32, 32)``, ``(1, 64, 64)``); resize others, e.g. 28×28 digits to 32×32, or bring
            your own autoencoder.
        latent_dim: Size ``d`` of the code ``z̄``.
        width: Channels of the first convolution (doubling per halving, capped at ``8 · width``).
        output: ``"sigmoid"`` for images in ``[0, 1]``, ``"identity"`` for normalised images.

    Examples::

        >>> ae = ConvAutoencoder((3, 32, 32), latent_dim=16)
        >>> q = ae.encode(torch.rand(2, 3, 32, 32))
        >>> q.mean.shape, ae.decode(q.sample()).shape
        (torch.Size([2, 16]), torch.Size([2, 3, 32, 32]))
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (3, 32, 32),
        latent_dim: int = 64,
        width: int = 32,
        output: str = "sigmoid",
    ) -> None:
        super().__init__()
        channels, height, width_px = (int(s) for s in image_shape)
        if output not in ("sigmoid", "identity"):
            raise ValueError(f"`output` must be 'sigmoid' or 'identity', got {output!r}.")
        if height != width_px or not _power_of_two_side(height):
            raise ValueError(
                f"ConvAutoencoder needs square images with a power-of-two side >= 8, got {tuple(image_shape)}; "
                "resize the images or bring your own autoencoder."
            )
        if int(latent_dim) < 2:  # every INN splits a code in two: a 1-d code was refused only after training
            raise ValueError(f"`latent_dim` must be >= 2 (the INNs split a code into two halves), got {latent_dim}.")
        self.image_shape = (channels, height, width_px)
        self.latent_dim = int(latent_dim)
        self.config: Dict[str, Any] = dict(
            image_shape=list(self.image_shape), latent_dim=self.latent_dim, width=int(width), output=output
        )
        n_down = int(math.log2(height)) - 2  # down to 4×4
        widths = [min(width * 2**i, 8 * width) for i in range(n_down)]
        enc, ch = [], channels
        for w in widths:
            enc += [nn.Conv2d(ch, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            ch = w
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.to_posterior = nn.Linear(ch * 16, 2 * self.latent_dim)
        self.from_code = nn.Sequential(nn.Linear(self.latent_dim, ch * 16), nn.LeakyReLU(0.2))
        dec = []
        for w in widths[-2::-1] + [width]:  # mirror of the encoder, ending at full resolution
            # upsample + conv rather than transposed conv: no checkerboard artefacts, which a
            # CNN with strided convolutions would notice
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, w, 3, padding=1),
                    nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            ch = w
        dec.append(nn.Conv2d(ch, channels, 3, padding=1))
        if output == "sigmoid":
            dec.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*dec)
        self._top = widths[-1]
        # channels-last convolutions: oneDNN's fast CPU kernels (about 3x faster decoding here);
        # inputs are converted on the way in and results returned in the default layout
        self.encoder.to(memory_format=torch.channels_last)
        self.decoder.to(memory_format=torch.channels_last)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior ``q(z̄ | x)`` of images ``(N, C, H, W)``; ``.mean`` is ``(N, latent_dim)``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"This autoencoder was built for images of shape (N, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(x.shape)}."
            )
        mean, logvar = self.to_posterior(self.encoder(x.contiguous(memory_format=torch.channels_last))).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, code: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` from codes ``(N, latent_dim)``."""
        if code.dim() != 2 or code.shape[1] != self.latent_dim:
            raise ValueError(f"`code` must have shape (N, {self.latent_dim}), got {tuple(code.shape)}.")
        h = self.from_code(code).view(code.shape[0], self._top, 4, 4)
        return self.decoder(h.contiguous(memory_format=torch.channels_last)).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct through the posterior mean: ``D(mean E(x))``."""
        return self.decode(self.encode(x).mean)
