"""Feature caches: run the analysed network and the encoder once per image, train flows from the cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from captum_inn._captum_compat import _format_additional_forward_args
from captum_inn.autoencoders import check_autoencoder, encode_posterior
from captum_inn.capture import LayerHooks, eval_mode, resolve_layer
from captum_inn.training.data import count_images, iter_image_batches

__all__ = ["FeatureCache", "cache_features"]


@dataclass
class FeatureCache:
    """What flows train on: per image, the code posterior and the activations of hooked layers.

    Attributes:
        code_mean: ``(N, d)`` posterior means of ``z̄ = E(x)``.
        code_std: ``(N, d)`` posterior standard deviations (zeros for deterministic encoders).
        layers: ``{name: (N, *shape)}`` activations ``z = Φ(x)`` of every hooked layer.
        model_class: Qualified class name of the analysed model.
    """

    code_mean: Tensor
    code_std: Tensor
    layers: Dict[str, Tensor] = field(default_factory=dict)
    model_class: str = ""

    def __len__(self) -> int:
        return self.code_mean.shape[0]

    @property
    def latent_dim(self) -> int:
        """Size ``d`` of the code."""
        return self.code_mean.shape[1]

    def layer_shape(self, name: str) -> tuple:
        """Per-sample shape of layer ``name``."""
        return tuple(self.layers[name].shape[1:])

    def sample_codes(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """Posterior samples ``mean + std · ε`` of the codes at ``index`` (DESIGN.md §5: not the mean)."""
        mean, std = self.code_mean[index], self.code_std[index]
        eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return mean + std * eps

    def save(self, path: Union[str, Path]) -> Path:
        """Write the cache to one safetensors file, atomically (a resumed fit reads it back).

        Args:
            path: Target ``.safetensors`` file.

        Returns:
            The written path.
        """
        from captum_inn.training.checkpoint import save_checkpoint

        tensors = {"code_mean": self.code_mean, "code_std": self.code_std,
                   **{f"layer.{name}": value for name, value in self.layers.items()}}
        meta = {"kind": "feature_cache", "config": {"layers": list(self.layers), "model_class": self.model_class}}
        return save_checkpoint(path, tensors, meta)

    @classmethod
    def load(cls, path: Union[str, Path]) -> FeatureCache:
        """Read a cache written by :meth:`save` (checked like every checkpoint, never unpickled).

        Args:
            path: The ``.safetensors`` file.

        Returns:
            The :class:`FeatureCache`.
        """
        from captum_inn.training.checkpoint import load_checkpoint

        tensors, meta = load_checkpoint(path, kind="feature_cache")
        names = meta["config"]["layers"]
        return cls(tensors["code_mean"], tensors["code_std"], {n: tensors[f"layer.{n}"] for n in names},
                   meta["config"]["model_class"])


@torch.no_grad()
def cache_features(
    model: nn.Module,
    layers: Union[str, nn.Module, Sequence[Union[str, nn.Module]]],
    autoencoder: Any,
    data: Any,
    *,
    batch_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    attribute_to_layer_input: bool = False,
    selector: Any = None,
    additional_forward_args: Any = None,
    progress: bool = True,
) -> FeatureCache:
    """One pass over ``data``: hooked activations of every layer and the code posterior per image.

    The model runs once per image for all layers together (and stops after the deepest hooked
    layer); the encoder runs once per image. The model and autoencoder run in eval mode and their
    modes are restored.

    Args:
        model: The analysed network ``f`` (frozen).
        layers: One layer or several (modules or dotted names, see :func:`captum_inn.capture.resolve_layer`).
        autoencoder: Object with ``encode``/``decode`` (:class:`captum_inn.autoencoders.Autoencoder`).
        data: Images: tensor ``(N, C, H, W)``, ``Dataset`` or ``DataLoader``.
        batch_size: Images per forward pass.
        device: Where the model runs; the cache is kept on the CPU.
        attribute_to_layer_input: Hook layer inputs instead of outputs.
        selector: Picks a tensor from non-tensor layer outputs (see :class:`captum_inn.capture.LayerHooks`).
        additional_forward_args: Extra arguments of ``model`` after the images.
        progress: Show a progress bar.

    Returns:
        A :class:`FeatureCache` with ``layers`` keyed by layer name.

    Examples::

        >>> from captum_inn.autoencoders import ConvAutoencoder
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> _ = model(torch.rand(1, 3, 8, 8))
        >>> cache = cache_features(model, ["1", "3"], ConvAutoencoder((3, 8, 8), 6), torch.rand(5, 3, 8, 8), progress=False)
        >>> cache.code_mean.shape, cache.layer_shape("1"), cache.layer_shape("3")
        (torch.Size([5, 6]), (4, 6, 6), (10,))
    """
    check_autoencoder(autoencoder)
    layer_list = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    names = [resolve_layer(model, layer)[0] for layer in layer_list]
    extra = _format_additional_forward_args(additional_forward_args) or ()
    means, stds, acts = [], [], {name: [] for name in names}
    bar = tqdm(total=count_images(data), desc="caching features", disable=not progress, leave=False, unit="img")
    with eval_mode(autoencoder), bar:
        for images in iter_image_batches(data, batch_size):
            if images.is_floating_point() and not torch.isfinite(images).all():
                raise ValueError("`data` contains NaN or infinite pixels; clean the images before caching features.")
            images = images.to(device)
            with LayerHooks(model, layer_list, attribute_to_layer_input=attribute_to_layer_input,
                            selector=selector, stop_early=True) as hooks:
                hooks.run(images, *extra)
                values = dict(hooks.values)
            for name in names:
                if name not in values:
                    raise ValueError(
                        f"layer {name!r} did not run during the forward pass; check that it is used "
                        "in model.forward."
                    )
                acts[name].append(values[name].cpu())
            mean, std = encode_posterior(autoencoder, images)
            means.append(mean.cpu())
            stds.append(std.cpu())
            bar.update(images.shape[0])
    return FeatureCache(
        code_mean=torch.cat(means),
        code_std=torch.cat(stds),
        layers={name: torch.cat(chunks) for name, chunks in acts.items()},
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )
