"""``fit_classifier``: train the network to be analysed (for demos, tests and tutorials).

``captum_inn`` analyses models users already have; this small loop exists so that the demo, the
tests and the tutorials can train their own models offline.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from captum_inn.training.loop import train_loop

__all__ = ["fit_classifier", "accuracy"]


def _as_labelled(data: Any) -> tuple[Tensor, Tensor]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0], data[1]
    if hasattr(data, "images") and hasattr(data, "targets"):  # e.g. ColorDigits
        return data.images, torch.as_tensor(data.targets)
    xs, ys = zip(*(data[i] for i in range(len(data))))
    return torch.stack(xs), torch.as_tensor(ys)


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
) -> nn.Module:
    """Train ``model`` with cross-entropy on labelled images held in memory.

    Args:
        model: A classifier mapping ``(N, C, H, W)`` to logits ``(N, K)``.
        data: ``(images, labels)``, a dataset with ``images``/``targets`` (ColorDigits), or a
            map-style dataset of ``(image, label)``.
        steps: Optimiser steps.
        batch_size: Images per step.
        lr: Adam learning rate.
        seed: Seed of the minibatches.
        device: Where to train.
        augment: Optional callable applied to each image batch during training.
        progress: Show a progress bar.

    Returns:
        The model, in eval mode, with ``history`` attached.

    Examples::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(20, 3, 2, 2), torch.randint(3, (20,))
        >>> fit_classifier(model, (x, y), steps=3, progress=False) is model
        True
    """
    images, labels = _as_labelled(data)
    images, labels = images.to(device), labels.to(device).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"`data` has {images.shape[0]} images but {labels.shape[0]} labels.")
    model.to(device)

    def loss_fn(generator: torch.Generator) -> Tensor:
        index = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        x = images[index.to(images.device)]
        if augment is not None:
            x = augment(x)
        return F.cross_entropy(model(x), labels[index.to(labels.device)])

    model.history = train_loop(
        model, loss_fn, steps=steps, lr=lr, seed=seed, progress=progress, desc="classifier",
        meta={"kind": "classifier", "config": {}},
    )
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``(N, C, H, W)`` with ``labels`` ``(N,)``."""
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, images.shape[0], batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size].cpu()).sum())
    finally:
        model.train(was_training)
    return correct / max(1, images.shape[0])
