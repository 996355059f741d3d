"""``fit_classifier``: train the network to be analysed (for demos, tests and tutorials).

``captum_inn`` analyses models users already have; this small loop exists so that the demo, the
tests and the tutorials can train their own models offline.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    WeightedRandomSampler,
    default_collate,
)

from captum_inn.attr._common import (
    autograd_on,
    check_number,
    check_optional_callable,
    check_positive_int,
    class_indices,
    dtype_errors_named,
)
from captum_inn.capture import check_autograd_weights
from captum_inn.metrics import predict_classes
from captum_inn.training.augment import (
    AUGMENT_CALL,
    Jitter,
    augment_generators,
    augment_record,
    restart_augment,
)
from captum_inn.training.data import (
    _items_are_stored_arrays,
    batching_errors_explained,
    check_image_dtype,
    loader_indices,
    loader_sampler,
    seeded_reading,
    warn_if_random_items,
)
from captum_inn.training.distributed import (
    local_batch_size,
    shard_data,
    warnings_from_rank_zero,
    world,
)
from captum_inn.training.loop import _check_seed, train_loop

# Jitter and the augmentation records lived here before training/augment.py: imports of them keep working
__all__ = ["fit_classifier", "accuracy", "Jitter", "augment_generators", "augment_record"]


def _as_labelled(data: Any) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(images, labels, weights)``: ``weights`` are a ``WeightedRandomSampler``'s, one per image
    kept (``None``: minibatches are drawn uniformly)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1], None
    if (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor) and data[0].dim() >= 2
            and isinstance(data[1], (np.ndarray, list, tuple))):  # (images, NumPy or list labels): read as a
        return data[0], torch.as_tensor(np.asarray(data[1])), None  # dataset, it unpacked into nonsense
    if isinstance(data, dict):  # read as a dataset, it failed on data[0] with a bare KeyError: 0
        raise TypeError(f"`data` is a dict (keys {sorted(map(str, data))}); pass (images, labels), e.g. "
                        "(data['images'], data['labels']), or a Dataset of (image, label) pairs.")
    if isinstance(data, Tensor):
        raise TypeError("`data` holds images but no labels; pass (images, labels), a Dataset of (image, label) "
                        "pairs, or an object with `images` and `targets` (e.g. ColorDigits).")
    if hasattr(data, "images") and hasattr(data, "targets") and _items_are_stored_arrays(data):  # e.g. ColorDigits
        return data.images, torch.as_tensor(data.targets), None
    indices, weights, collate, source = None, None, default_collate, data
    if isinstance(data, DataLoader):  # the classifier draws its own minibatches, from the loader's images only
        collate = data.collate_fn  # its own may convert or normalise the items (as the loader yields them)
        if not isinstance(data.dataset, IterableDataset):  # an iterable one gives all it yields
            indices = loader_indices(data)
            if indices is None:
                indices, weights = _random_sampler_draws(loader_sampler(data), data.dataset)
            if indices is None:
                raise TypeError("`data` is a DataLoader whose sampler does not say which images it draws (a custom "
                                "sampler); pass its dataset, a Subset of it, or (images, labels).")
        data = data.dataset
    iterable = isinstance(data, IterableDataset)  # read as it yields (its __getitem__ raises NotImplementedError)
    if not iterable and (not hasattr(data, "__getitem__") or not hasattr(data, "__len__")):
        raise TypeError(f"`data` must be (images, labels), a Dataset of (image, label) pairs or a DataLoader over "
                        f"one, got {type(data).__name__}.")
    with seeded_reading(source):  # random transforms: the same images every call, the caller's generators kept
        items = list(data) if iterable else [data[i] for i in (range(len(data)) if indices is None else indices)]
    if isinstance(source, DataLoader) and source.batch_sampler is None:  # no batching: its collate_fn takes one item
        items, collate = [collate(item) for item in items], default_collate
    with batching_errors_explained():
        batch = collate(items)
    images, labels = _images_and_labels(batch)
    return images, torch.as_tensor(labels), weights


_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def _images_and_labels(batch: Any) -> Tuple[Tensor, Any]:
    """The images and labels of a collated batch of items: ``(image, label, ...)`` tuples, or dicts
    with an ``"image"`` key and a label under one of :data:`_LABEL_KEYS`."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor):
        return batch[0], batch[1]
    if isinstance(batch, dict) and "image" in batch:
        key = next((k for k in _LABEL_KEYS if k in batch), None)
        if key is not None:
            return batch["image"], batch[key]
    shown = f"dicts with keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__
    raise TypeError(f"`data` yields items that are not labelled images ({shown}); fit_classifier needs "
                    f"(image, label, ...) tuples or dicts with an 'image' key and one of {list(_LABEL_KEYS)}.")


def _random_sampler_draws(sampler: Any, dataset: Any) -> Tuple[Optional[List[int]], Optional[Tensor]]:
    """The images a random sampler draws from, where its draws differ from pass to pass (with
    replacement, a longer or shorter pass, weights): every image, or those of positive weight with
    their weights. ``loader_indices`` leaves them out, since the images fingerprint must not change."""
    # a DistributedSampler draws one process's share: fit_classifier shards the whole dataset itself
    if isinstance(sampler, (RandomSampler, DistributedSampler)) and hasattr(dataset, "__len__"):
        return list(range(len(dataset))), None
    if isinstance(sampler, WeightedRandomSampler):
        weights = torch.as_tensor(sampler.weights, dtype=torch.float64)
        kept = torch.nonzero(weights > 0).flatten()
        return kept.tolist(), weights[kept]
    return None, None


@autograd_on
@warnings_from_rank_zero()
def fit_classifier(
    model: nn.Module,
    data: Any,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    augment: Optional[Any] = None,
    progress: bool = True,
    weight_decay: float = 0.0,
    callback: Optional[Callable[[int, nn.Module], None]] = None,
    adversarial_epsilon: float = 0.0,
) -> nn.Module:
    """Train ``model`` with cross-entropy on labelled images held in memory.

    The small loop that trains the demos', tests' and tutorials' own models: unlike the ``fit_*``
    functions of the INNs and the autoencoder, it writes no checkpoint, so an interrupted run starts
    again from step 0.

    Args:
        model: A classifier mapping ``(N, C, H, W)`` to logits ``(N, K)``.
        data: ``(images, labels)`` (labels ``(N,)`` class indices: a tensor, NumPy array or list),
            a dataset with ``images``/``targets`` (ColorDigits), a map-style dataset of
            ``(image, label)``, or a ``DataLoader`` over one (the images its sampler draws from,
            with a ``WeightedRandomSampler``'s weights; the minibatches are drawn here, with
            replacement).
        steps: Optimiser steps.
        batch_size: Images per step (under torchrun, summed over the processes: each draws its
            share from its own shard of the images).
        lr: Adam learning rate.
        seed: Seed of the minibatches (and of torch's global generators during the steps: dropout).
            Those generators are one per process: a fit called from another thread than the main
            one leaves them alone, so its dropout draws differ from run to run.
        device: Where to train.
        augment: Optional callable applied to each image batch during training.
        progress: Show a progress bar.
        weight_decay: Decoupled weight decay (AdamW).
        callback: ``callback(step, model)`` after every step, e.g. to snapshot the model for
            :func:`captum_inn.training.dynamics.concept_dynamics`.
        adversarial_epsilon: With ``> 0``, adversarial training (Goodfellow et al., 2015): half
            of each batch is replaced by its FGSM attack of this size against the current model
            (pixels clamped to ``[0, 1]``; the attack's pass uses batch statistics, as the step's,
            and leaves batch norm's running statistics to the step). Gives a judge that reads shapes, not the pixel patterns
            an attack on another CNN leaves (see :func:`captum_inn.analysis.adversarial_views`).

    Returns:
        The model, in eval mode, with ``history`` attached.

    Examples::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(20, 3, 2, 2), torch.randint(3, (20,))
        >>> fit_classifier(model, (x, y), steps=3, progress=False) is model
        True
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    seed = _check_seed(seed)  # as the other fits': the minibatch seeds derive from it
    # before the data is read (train_loop checks them again): a callback of 5 failed after a step had
    # changed the weights
    check_positive_int(steps, "steps")
    check_number(lr, "lr", positive=True)
    check_number(weight_decay, "weight_decay")
    check_optional_callable(augment, "augment", AUGMENT_CALL)
    check_optional_callable(callback, "callback", "callback(step, model)")
    check_autograd_weights(model, "`model`", "fit_classifier trains its weights")
    adversarial_epsilon = check_number(adversarial_epsilon, "adversarial_epsilon")
    n_ranks = world(device)[1]  # joins torchrun's process group (NCCL on GPUs, each process on its own) before moving
    warn_if_random_items(data, "fit_classifier")
    images, labels, weights = _as_labelled(data)
    images = images.detach()  # the fit learns weights: images that require grad got a .grad as large as the data
    check_image_dtype(images)  # 8-bit pixels: a raw dtype error from the first layer otherwise
    labels = class_indices(labels, "`data` labels")
    images, labels = images.to(device), labels.to(device)
    if not torch.isfinite(images).all():
        raise ValueError("`data` contains NaN or infinite pixels; clean the images before training.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"`data` has {images.shape[0]} images but {labels.shape[0]} labels.")
    if images.shape[0] == 0:
        raise ValueError("`data` holds no images; pass at least one labelled image.")
    top_label = int(labels.max())  # checked against the model's logits at the first step
    # under torchrun each process draws its share of the batch from its own shard (as the other fits)
    n_images = images.shape[0]
    images, labels = shard_data(images), shard_data(labels)
    if weights is not None:  # a WeightedRandomSampler's balance, kept in each process's shard
        weights = shard_data(weights)
    batch = local_batch_size(batch_size, images.shape[0])
    # the attacked half: no image from a batch of one, and one image fails batch norm in training mode.
    # Checked on the smallest process's batch (shards differ by an image), so that every process refuses
    fewest = min(batch, n_images // n_ranks)
    smallest = 4 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 2
    if adversarial_epsilon > 0 and fewest < smallest:
        raise ValueError(f"`adversarial_epsilon` attacks half of each batch, which needs batches of at least {smallest} "
                         f"images per process{' for a model with batch norm' if smallest == 4 else ''}, got {fewest} "
                         "(from batch_size, the number of images and of processes).")
    model.to(device)

    checked: List[bool] = []

    def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
        if not checked:  # once, on the first logits: a label past them is an IndexError on the CPU and
            if not isinstance(logits, Tensor):  # a dict or tuple failed inside cross_entropy ("no attribute 'dim'")
                got = type(logits).__name__ + (f" with keys {list(logits)}" if isinstance(logits, Mapping) else "")
                raise TypeError(f"`model` must return (N, K) logits, but it returns a {got}; wrap it in an nn.Module "
                                "whose forward returns the logits (e.g. model(x)['logits']) and fit that wrapper.")
            if logits.dim() != 2 or top_label >= logits.shape[1]:  # a device-side assert on a GPU
                raise ValueError(f"`data` has labels up to {top_label} but the model gives logits of shape "
                                 f"{tuple(logits.shape)}; labels must be class indices 0 … K-1 for (N, K) logits.")
            checked.append(True)
        return F.cross_entropy(logits, y)

    def loss_fn(generator: torch.Generator) -> Tensor:
        if weights is None:
            index = torch.randint(images.shape[0], (batch,), generator=generator)
        else:  # as the loader's WeightedRandomSampler would draw them (it was read as uniform)
            index = torch.multinomial(weights, batch, replacement=True, generator=generator)
        x = images[index.to(images.device)]
        if augment is not None:
            x = augment(x)
        y = labels[index.to(labels.device)]
        with dtype_errors_named(x, model, name="data"):  # float32 images for a bfloat16 model: torch's raw error
            if adversarial_epsilon > 0:
                half = x.shape[0] // 2
                x_attacked = x[:half].detach().requires_grad_(True)
                with _running_statistics_kept(model):
                    (gradient,) = torch.autograd.grad(cross_entropy(model(x_attacked), y[:half]), x_attacked)
                x = torch.cat([(x[:half] + adversarial_epsilon * gradient.sign()).clamp(0, 1), x[half:]])
            return cross_entropy(model(x), y)

    restart_augment(augment)
    model.history = train_loop(
        model, loss_fn, steps=steps, lr=lr, schedule="cosine", seed=seed, progress=progress, desc="classifier",
        meta={"kind": "classifier", "config": {}}, weight_decay=weight_decay, callback=callback,
    )
    return model


@contextmanager
def _running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """A pass in training mode (batch statistics, as the step's own) that leaves the normalisation
    layers' running statistics as they were: the attack's pass counted each step twice in them,
    once from the clean half alone."""
    saved = [(buffer, buffer.clone()) for module in model.modules()
             if isinstance(module, nn.modules.batchnorm._NormBase) for buffer in module.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Any, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``(N, C, H, W)`` with ``labels`` ``(N,)``.

    The model runs in eval mode without gradients; its training flag is restored.

    Args:
        model: A classifier returning logits ``(N, K)``.
        images: ``(N, C, H, W)``.
        labels: ``(N,)`` class indices (a tensor, a list or a NumPy array).
        batch_size: Images per forward pass.

    Returns:
        The fraction of correct predictions, in ``[0, 1]``.

    Examples::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x = torch.rand(8, 3, 2, 2)
        >>> accuracy(model, x, model(x).argmax(1))
        1.0
    """
    # checked first: (N, 1) labels broadcast against (N,) predictions into a wrong count (accuracy 6.0)
    labels = class_indices(torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels), "`labels`")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"`labels` has {labels.shape[0]} labels for {images.shape[0]} images; give one per image.")
    predicted = predict_classes(model, images, batch_size)
    return int((predicted.cpu() == labels.cpu()).sum()) / max(1, images.shape[0])
