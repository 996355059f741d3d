"""Fingerprints of networks: short hashes that let a fitted INN tell the model and autoencoder it was
fitted with from others of the same shape (a retrained one, another seed)."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

from captum_inn.capture import module_attributes


def tensor_bytes(tensor: Tensor) -> Any:
    """The tensor's bytes for ``hashlib``: a view of a contiguous CPU tensor's memory, not a copy
    (``tobytes()`` copied every weight once more per fingerprint, a sixth of its time)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def tensor_attributes(obj: Any) -> Dict[str, Tensor]:
    return {key: value for key, value in getattr(obj, "__dict__", {}).items() if isinstance(value, Tensor)}


def hash_tensors(digest: Any, tensors: Dict[str, Tensor]) -> None:
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensor_bytes(tensors[key]))


def class_name(obj: Any) -> str:
    """The qualified class name a checkpoint records for a model, e.g. ``captum_inn.models.SmallCNN``."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


@torch.no_grad()
def weights_fingerprint(network: Any, buffers: bool = False) -> str:
    """A short hash of a network's parameters, so an INN can tell the autoencoder or model it was
    fitted with from another one of the same shape (a retrained one, another seed).

    Buffers (batch norm's running statistics) count only with ``buffers=True``; the parameters'
    names, the device, the memory layout and the floating dtype never do (values are hashed as
    float32): the same weights wrapped in ``DataParallel``, on another device or converted with
    ``.double()`` give the same fingerprint.

    Args:
        network: An ``nn.Module`` (its parameters), or any object (its tensor attributes and the
            parameters of its ``nn.Module`` attributes).
        buffers: Hash a module's buffers after its parameters too.

    Returns:
        16 hexadecimal digits.

    Examples::

        >>> a, b = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> weights_fingerprint(a) == weights_fingerprint(b), weights_fingerprint(a) == weights_fingerprint(a.eval())
        (False, True)
    """
    digest = hashlib.sha256()
    if isinstance(network, nn.Module):  # values in order, not names: a wrapped model ("module.") is the same
        for tensor in itertools.chain(network.parameters(), network.buffers() if buffers else ()):
            digest.update(tensor_bytes(as_float32(tensor)))
    else:  # its tensor attributes, then the weights of its modules (an object wrapping an encoder and a decoder)
        hash_tensors(digest, {k: as_float32(v) for k, v in tensor_attributes(network).items()})
        for key, module in module_attributes(network).items():
            digest.update(key.encode())
            digest.update(weights_fingerprint(module, buffers).encode())
    return digest.hexdigest()[:16]


def buffer_fingerprints(network: Any) -> List[str]:
    """A short hash of each buffer of a module (sorted; none for other objects): what
    ``check_model_weights`` (``captum_inn.attr._common``) compares, as a multiset, to tell running statistics that moved from
    buffers a wrapper adds or leaves out (a temperature, a normalisation's mean)."""
    if not isinstance(network, nn.Module):
        return []
    return sorted(hashlib.sha256(tensor_bytes(as_float32(b))).hexdigest()[:12] for b in network.buffers())


def as_float32(tensor: Tensor) -> Tensor:
    """Floating tensors as float32: float32 weights converted with ``.double()`` (exactly) hash
    alike; float32 values hash as they are."""
    return tensor.detach().float() if tensor.is_floating_point() else tensor
