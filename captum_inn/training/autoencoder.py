"""``fit_autoencoder``: train the default convolutional autoencoder on a set of images."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from captum_inn._fingerprints import weights_fingerprint
from captum_inn._random import seeded_global_rng
from captum_inn.attr._common import (
    autograd_on,
    check_module_device,
    check_optional_callable,
    check_pixel_range,
    network_dtype,
)
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.capture import LayerHooks, check_autograd_weights, resolve_layer
from captum_inn.training.augment import (
    AUGMENT_CALL,
    augment_generators,
    augment_record,
    restart_augment,
)
from captum_inn.training.cache import images_fingerprint
from captum_inn.training.checkpoint import (
    building_from,
    load_checkpoint,
    load_module_state,
    module_tensors,
    recorded_config_has,
    save_checkpoint,
    warn_if_unfinished,
)
from captum_inn.training.data import (
    check_image_dtype,
    images_as_tensor,
    warn_if_random_items,
)
from captum_inn.training.distributed import (
    check_processes_agree,
    check_replicas_agree,
    local_batch_size,
    shard_data,
    warnings_from_rank_zero,
    world,
)
from captum_inn.training.loop import (
    check_checkpoint_writable,
    check_resumable_early,
    merged_config,
    resume_key,
    train_loop,
)

__all__ = ["AutoencoderConfig", "fit_autoencoder", "load_autoencoder", "save_autoencoder"]


@dataclass
class AutoencoderConfig:
    """Settings of :func:`fit_autoencoder`.

    Attributes:
        latent_dim: Size ``d`` of the code.
        width: Channels of the first convolution.
        output: ``"sigmoid"`` (images in ``[0, 1]``) or ``"identity"``.
        steps: Optimiser steps.
        batch_size: Images per step.
        lr: Adam learning rate.
        schedule: ``"cosine"`` decay of the learning rate or ``"constant"``.
        kl_weight: Weight of ``KL(q(z̄|x) ‖ N(0, I))`` against the summed L1 reconstruction error;
            small values give sharp reconstructions and a narrow posterior.
        seed: Seed of initialisation and minibatches.
        checkpoint_every: Steps between checkpoints.
        perceptual_layers: Layers (dotted names) of ``perceptual_model`` whose activations the
            reconstruction must match (empty: pixel loss only).
        perceptual_weight: Weight of the feature-matching loss against the per-pixel L1.

    Examples::

        config = AutoencoderConfig(latent_dim=128, steps=5000, kl_weight=0.001)
        ae = fit_autoencoder(images, config=config, checkpoint="ae.safetensors")
        ae = fit_autoencoder(images, steps=5000)   # or override single fields
    """

    latent_dim: int = 64
    width: int = 32
    output: str = "sigmoid"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"
    kl_weight: float = 0.01
    seed: int = 0
    checkpoint_every: int = 500
    perceptual_layers: Tuple[str, ...] = ()
    perceptual_weight: float = 1.0


def _layer_names(model: Any, layers: Any) -> Tuple[str, ...]:
    """``perceptual_layers`` as names of ``model``'s layers (one str or module, or several)."""
    layers = [layers] if isinstance(layers, (str, nn.Module)) else list(layers or ())
    if model is None:
        return tuple(str(layer) for layer in layers)  # refused below, with perceptual_model
    return tuple(resolve_layer(model, layer)[0] for layer in layers)


@autograd_on
@warnings_from_rank_zero()
def fit_autoencoder(
    data: Any,
    latent_dim: Optional[int] = None,
    config: Optional[AutoencoderConfig] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    checkpoint: Optional[str] = None,
    resume: bool = True,
    progress: bool = True,
    perceptual_model: Optional[nn.Module] = None,
    augment: Optional[Callable[[Tensor], Tensor]] = None,
    **overrides: Any,
) -> ConvAutoencoder:
    """Train a :class:`~captum_inn.autoencoders.ConvAutoencoder` with a Gaussian posterior.

    The loss per image is the summed L1 reconstruction error of a posterior sample plus
    ``kl_weight · KL(q(z̄|x) ‖ N(0, I))``. The images are held in memory (under ``torchrun``, each
    process holds its shard; see :mod:`captum_inn.training.distributed`).

    With ``perceptual_model`` and ``config.perceptual_layers``, a perceptual loss is added: the
    squared difference between the layers' activations on the reconstruction and on the image,
    relative to the activations' mean square, times ``perceptual_weight`` (per layer, averaged).
    On photos a pixel loss alone gives blurry codes that a CNN reads differently; the paper's
    autoencoder used a perceptual loss from a pretrained network, and offline the natural choice
    is the analysed model itself, frozen (its weights get no gradient and its mode is restored).

    Args:
        data: Images ``(N, C, H, W)``: a tensor, ``Dataset`` (``(image, label)`` items) or ``DataLoader``,
            of any floating dtype (the autoencoder is built and trained in the default dtype).
        latent_dim: Size of the code (shorthand for ``config.latent_dim``).
        config: All settings (:class:`AutoencoderConfig`); keyword ``overrides`` replace fields.
        device: Where to train.
        checkpoint: Checkpoint file; an existing one is resumed when ``resume``.
        resume: Continue from ``checkpoint`` if it exists.
        progress: Show a progress bar.
        perceptual_model: Frozen network for the perceptual loss (see above; any floating dtype, the
            reconstructions are converted to it); ``None``: pixels only.
        augment: Optional callable applied to each image batch (e.g.
            :class:`~captum_inn.training.augment.Jitter`); small datasets of photos need it. One
            that draws from its own ``generator`` attribute, as ``Jitter`` does, resumes exactly. The
            checkpoint records it (:func:`~captum_inn.training.augment.augment_record`), and a
            resume with another augmentation, or none, is refused.
        **overrides: Fields of :class:`AutoencoderConfig`.

    Returns:
        The trained autoencoder in eval mode, with ``history`` (loss per step) attached.

    Raises:
        ValueError: fewer than 2 images, images that are not square with a power-of-two side
            ``>= 8`` (:class:`~captum_inn.autoencoders.ConvAutoencoder`'s shapes), NaN or infinite
            pixels, pixels outside [0, 1] for the sigmoid decoder (8-bit values: divide by 255),
            bad settings (each named).
        CheckpointError: ``resume`` found a checkpoint of another configuration.
        FloatingPointError: the loss became NaN or infinite; the last checkpoint is left intact.

    Examples::

        >>> ae = fit_autoencoder(torch.rand(32, 3, 8, 8), latent_dim=4, steps=2, progress=False)
        >>> ae.encode(torch.rand(2, 3, 8, 8)).mean.shape
        torch.Size([2, 4])
    """
    if latent_dim is not None:
        overrides["latent_dim"] = latent_dim
    config = merged_config(AutoencoderConfig, config, overrides)
    if perceptual_model is not None:  # before the images are fingerprinted and moved
        check_autograd_weights(perceptual_model, "`perceptual_model`", "the perceptual loss needs gradients through it")
    # names, as the checkpoint records them: a str was split into letters ("relu": layer 'r' not found), and
    # modules failed at the first checkpoint write, after the steps before it
    config.perceptual_layers = _layer_names(perceptual_model, config.perceptual_layers)
    if bool(config.perceptual_layers) != (perceptual_model is not None):
        raise ValueError(
            "A perceptual loss needs both `perceptual_model` and `perceptual_layers` (layer names of it); "
            f"got perceptual_model={type(perceptual_model).__name__} and perceptual_layers={config.perceptual_layers}."
        )
    check_optional_callable(augment, "augment", AUGMENT_CALL)
    world(device)  # joins torchrun's process group, if any, before the data is sharded
    check_checkpoint_writable(checkpoint, resume, config.steps)  # before the images are read, which may take long
    settings = {**asdict(config), "perceptual_layers": list(config.perceptual_layers)}  # as JSON reads it back
    if resume:  # other settings or more steps: refused now, not after reading every image
        check_resumable_early(checkpoint, "autoencoder", resume_key(settings), config.steps, part=None)
    check_replicas_agree({"perceptual_model": perceptual_model})  # the autoencoder itself starts from rank 0's
    check_processes_agree("augment", augment_record(augment),
                          "give every process the same augmentation (each already augments its own shard of the "
                          "images, and a resumed fit restores each process's augmentation state).")
    # detached: the fit learns weights, not pixels (images that require grad got a .grad as large as the data)
    warn_if_random_items(data, "fit_autoencoder")
    images = images_as_tensor(data).detach()
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"`data` must hold at least 2 images (N, C, H, W), got shape {tuple(images.shape)}.")
    check_image_dtype(images)
    # in the dtype the autoencoder is built in, as the encoder gets a float64 model's images everywhere else
    images = images.to(torch.get_default_dtype())
    # checked on all images before sharding, so every torchrun process agrees
    if not torch.isfinite(images).all():
        raise ValueError("`data` contains NaN or infinite pixels; clean the images first.")
    if config.output == "sigmoid":
        check_pixel_range(images, "data", fix="output='sigmoid' decodes to [0, 1]; divide 8-bit pixels by 255. "
                                              "For normalised images, move the normalisation into the model (the "
                                              "figures draw pixels in [0, 1]), or pass output='identity'.")
    # what the fit learns from, beyond its settings: a resume on other images or another perceptual
    # model is refused (all images, before sharding: a resume may use another number of processes)
    source = {"images": images_fingerprint(images),
              "perceptual_model": weights_fingerprint(perceptual_model) if perceptual_model is not None else None}
    images = shard_data(images).to(device)
    batch = local_batch_size(config.batch_size, images.shape[0])
    with seeded_global_rng(config.seed):  # only the weight initialisation draws from the global RNG
        model = ConvAutoencoder(tuple(images.shape[1:]), config.latent_dim, config.width, config.output).to(device)
    hooks = None
    if perceptual_model is not None:
        check_module_device(perceptual_model, device, "perceptual_model")
        # gradients flow through the frozen network to the reconstruction, never into its weights
        hooks = LayerHooks(perceptual_model, list(config.perceptual_layers), detach=False, stop_early=True)
        frozen = [p for p in perceptual_model.parameters() if p.requires_grad]

    def perceptual_loss(recon: Tensor, x: Tensor) -> Tensor:
        # images in the perceptual model's dtype (the analysed model converted with .double()), the
        # loss back in the autoencoder's: a raw dtype error before
        seen = network_dtype(perceptual_model, recon.dtype)
        with torch.no_grad():
            try:
                hooks.run(x.to(seen))
            except (TypeError, ValueError) as error:  # "pass selector=" named an argument the fit does not take
                raise type(error)(
                    f"The perceptual loss calls perceptual_model(images) and reads a tensor at each of "
                    f"`perceptual_layers`, and that failed: {str(error).rstrip('.')}. fit_autoencoder takes no selector or extra "
                    "arguments for it: wrap it in an nn.Module whose forward(images) calls it with what it needs, "
                    "and name layers that give a tensor (or wrap a layer that gives a tuple in a module that "
                    "returns its tensor)."
                ) from error
            targets = hooks.values
        missing = [name for name in config.perceptual_layers if name not in targets]
        if missing:  # one that never ran gave torch's "stack expects a non-empty TensorList", or was left out
            raise ValueError(f"`perceptual_layers` {missing} did not run in perceptual_model's forward; name layers "
                             "that it uses.")
        hooks.run(recon.to(seen))
        losses = [((hooks.values[name] - t) ** 2).mean() / (t**2).mean().clamp_min(1e-8) for name, t in targets.items()]
        return torch.stack(losses).mean().to(recon.dtype)

    def loss_fn(generator: torch.Generator) -> Tensor:
        index = torch.randint(images.shape[0], (batch,), generator=generator)
        # drawn before the encoder is queued: copying it to a GPU afterwards would wait for the encoder
        eps = torch.randn((batch, model.latent_dim), generator=generator, dtype=torch.float32).to(device)
        x = images[index.to(images.device)]
        if augment is not None:
            x = augment(x)
        posterior = model.encode(x)
        recon = model.decode(posterior.mean + posterior.std * eps)
        l1 = (recon - x).abs().flatten(1).sum(1)
        loss = (l1 + config.kl_weight * posterior.kl()).mean() / x[0].numel()
        if hooks is not None:
            loss = loss + config.perceptual_weight * perceptual_loss(recon, x)
        return loss

    # the image shape too: a resume on other images is refused like any other changed setting
    meta = {"kind": "autoencoder", "config": {**resume_key(settings), "image_shape": list(images.shape[1:])},
            "model": model.config, "steps": config.steps}
    if recorded_config_has(checkpoint if resume else None, "source", default=True):  # older checkpoints lack it
        meta["config"]["source"] = source
    if recorded_config_has(checkpoint if resume else None, "augment", default=True):  # as "source"
        meta["config"]["augment"] = augment_record(augment)
    try:
        if hooks is not None:
            hooks.__enter__()
            for p in frozen:
                p.requires_grad_(False)
        restart_augment(augment)
        model.history = train_loop(
            model, loss_fn, steps=config.steps, lr=config.lr, schedule=config.schedule, seed=config.seed,
            checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, resume=resume, meta=meta,
            progress=progress, desc="autoencoder", generators=augment_generators(augment),
        )
    finally:
        if hooks is not None:
            hooks.__exit__(None, None, None)
            for p in frozen:
                p.requires_grad_(True)
    return model


def save_autoencoder(path: str, autoencoder: ConvAutoencoder) -> Path:
    """Save an autoencoder (weights and architecture) to one safetensors file for :func:`load_autoencoder`.

    For an autoencoder fitted without ``checkpoint=``; one fitted with it is already saved there.

    Args:
        path: Target ``.safetensors`` file (written atomically).
        autoencoder: A :class:`~captum_inn.autoencoders.ConvAutoencoder`, e.g. from :func:`fit_autoencoder`.

    Returns:
        The path written.

    Raises:
        TypeError: another autoencoder class (save your own with ``torch.save(model.state_dict(), ...)``).

    Examples::

        >>> import os, tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> ae = fit_autoencoder(torch.rand(32, 3, 8, 8), latent_dim=4, steps=2, progress=False)
        >>> path = save_autoencoder(os.path.join(folder.name, "ae.safetensors"), ae)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> torch.equal(load_autoencoder(path).encode(x).mean, ae.encode(x).mean)
        True
    """
    if not isinstance(autoencoder, ConvAutoencoder):
        raise TypeError(f"`autoencoder` must be a ConvAutoencoder (as fit_autoencoder returns), got "
                        f"{type(autoencoder).__name__}; save your own with torch.save(model.state_dict(), path).")
    meta = {"kind": "autoencoder", "config": {}, "model": autoencoder.config}
    return save_checkpoint(path, module_tensors(autoencoder), meta)


def load_autoencoder(path: str, map_location: Union[str, torch.device] = "cpu") -> ConvAutoencoder:
    """Load an autoencoder written by :func:`fit_autoencoder` (its ``checkpoint`` file) or :func:`save_autoencoder`.

    Args:
        path: The ``.safetensors`` checkpoint.
        map_location: Device of the loaded model.

    Returns:
        The autoencoder in eval mode.

    Examples::

        ae = fit_autoencoder(images, latent_dim=64, checkpoint="ae.safetensors")
        ae = load_autoencoder("ae.safetensors")                  # in a later session
        ae.encode(images[:2]).mean.shape                         # (2, 64)
    """
    tensors, meta = load_checkpoint(path, kind="autoencoder", map_location=map_location)
    with building_from(path):  # on the CPU: only the file's settings can fail here
        model = ConvAutoencoder(**meta["model"])
    load_module_state(model, tensors, path)
    warn_if_unfinished(path, meta.get("step"), meta.get("steps"), "fit_autoencoder", "checkpoint")
    return model.to(map_location).eval()
