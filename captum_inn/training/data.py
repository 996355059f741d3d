"""Turning what users pass as training data into batches of images."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    default_collate,
)

from captum_inn._random import seeded_every_global_rng
from captum_inn.attr._common import check_positive_int, user_stacklevel

__all__ = ["iter_image_batches", "images_as_tensor", "count_images", "per_image_rows", "check_image_dtype", "loader_indices",
           "loader_batching"]


def _images_of(batch: Any) -> Tensor:
    """The image tensor of a batch: the batch itself, or the first element of ``(x, y, …)``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"]
    raise TypeError(
        f"Cannot find images in a batch of type {type(batch).__name__}; yield tensors, "
        "(image, label) tuples, or dicts with an 'image' key."
    )


def check_image_dtype(images: Tensor, dtype: Optional[torch.dtype] = None, name: str = "data") -> None:
    """``TypeError`` naming ``name`` for images a network cannot take, with the conversion to use.

    Args:
        images: A batch of images ``(B, C, H, W)``.
        dtype: The floating dtype the network computes in (``None``: any floating dtype).
        name: The argument's name, for the message.

    Examples::

        >>> check_image_dtype(torch.rand(2, 3, 4, 4), torch.float32)       # fine: no error
        >>> check_image_dtype(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        TypeError: `data` images must be floating point (pixels in [0, 1]), got torch.uint8; ...
    """
    if not images.is_floating_point():
        raise TypeError(
            f"`{name}` images must be floating point (pixels in [0, 1]), got {images.dtype}; convert them, "
            "e.g. images.float() / 255 for 8-bit pixels."
        )
    if dtype is not None and images.dtype != dtype:
        raise TypeError(f"`{name}` images are {images.dtype} but the network computes in {dtype}; convert them with "
                        f"images.to({dtype}).")


def count_images(data: Any) -> Optional[int]:
    """Number of images in ``data`` when it is known without iterating, else ``None``.

    Args:
        data: A tensor (its first dimension counts), a sized ``Dataset``, a ``DataLoader`` (the
            images it yields: its sampler's length, less a dropped last batch) or any iterable.

    Returns:
        The number of images, or ``None`` for an unsized iterable.

    Examples::

        >>> count_images(torch.rand(5, 3, 4, 4)), count_images(iter([]))
        (5, None)
    """
    if isinstance(data, Tensor):
        return data.shape[0]
    if isinstance(data, DataLoader):
        # what the loader yields: its sampler's length, less a dropped last batch
        batching = loader_batching(data)
        if batching is None or not hasattr(batching[0], "__len__"):
            return None  # a custom batch sampler, no batching or an iterable dataset: batch sizes are unknown
        sampler, batch_size, drop_last = batching
        return (len(sampler) // batch_size) * batch_size if drop_last else len(sampler)
    return len(data) if hasattr(data, "__len__") else None


def loader_batching(loader: DataLoader) -> Optional[Tuple[Any, int, bool]]:
    """``(sampler, batch_size, drop_last)`` of a ``DataLoader`` that batches a sampler's indices,
    by its own ``batch_size`` or a ``BatchSampler`` given as ``batch_sampler``; ``None`` for an
    iterable dataset, automatic batching turned off (``batch_size=None``) or a custom batch sampler.

    Examples::

        >>> from torch.utils.data import TensorDataset
        >>> dataset = TensorDataset(torch.rand(10, 1))
        >>> loader = DataLoader(dataset, batch_sampler=BatchSampler(range(10), 4, drop_last=True))
        >>> loader_batching(loader)[1:]
        (4, True)
    """
    if isinstance(loader.dataset, IterableDataset):
        return None
    if loader.batch_size is not None:
        return loader.sampler, loader.batch_size, loader.drop_last
    batches = loader.batch_sampler
    if isinstance(batches, BatchSampler):
        return batches.sampler, batches.batch_size, batches.drop_last
    return None


def per_image_rows(data: Any) -> Optional[int]:
    """Rows of a per-image ``additional_forward_args`` tensor for ``data``: one per image it holds,
    counting those a ``DataLoader`` with ``drop_last=True`` never yields (its batches come from the
    first rows in order), so the tensor built for its dataset is still read as per image.

    Args:
        data: As for :func:`count_images`.

    Returns:
        The number of rows, or ``None`` when unknown.

    Examples::

        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> per_image_rows(DataLoader(TensorDataset(torch.rand(10, 1)), batch_size=4, drop_last=True))
        10
    """
    if not isinstance(data, DataLoader):
        return count_images(data)
    if isinstance(data.dataset, IterableDataset):  # its items in the order it yields them
        return len(data.dataset) if hasattr(data.dataset, "__len__") else None
    batching = loader_batching(data)
    return len(batching[0]) if batching is not None and hasattr(batching[0], "__len__") else None


def loader_sampler(loader: DataLoader) -> Any:
    """The sampler that picks ``loader``'s images: a batch sampler's own (``None`` if it has none),
    since ``loader.sampler`` is then a default it never uses."""
    if loader.batch_sampler is not None and loader.batch_size is None:
        return getattr(loader.batch_sampler, "sampler", None)
    return loader.sampler


def loader_indices(loader: DataLoader) -> Optional[Sequence[int]]:
    """The dataset indices ``loader`` draws its images from, in ascending order, where the sampler
    says so without drawing (sequential, random without replacement, a subset, a sequence).

    Args:
        loader: A ``DataLoader`` over a map-style dataset.

    Returns:
        The indices, or ``None`` when they cannot be known without iterating the sampler.

    Examples::

        >>> from torch.utils.data import TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.rand(10, 3)), sampler=range(4, 8))
        >>> list(loader_indices(loader))
        [4, 5, 6, 7]
    """
    sampler, dataset = loader_sampler(loader), loader.dataset
    if not hasattr(dataset, "__len__") or sampler is None:
        return None
    # over their own data source, which need not be the whole dataset (SequentialSampler(range(10)))
    if isinstance(sampler, SequentialSampler) and hasattr(sampler, "__len__"):
        return range(min(len(sampler), len(dataset)))
    if isinstance(sampler, RandomSampler) and not sampler.replacement and hasattr(sampler.data_source, "__len__") \
            and sampler.num_samples == len(sampler.data_source) <= len(dataset):
        return range(len(sampler.data_source))
    indices = getattr(sampler, "indices", sampler)  # SubsetRandomSampler keeps them in `indices`
    # NumPy indices are what scikit-learn's splits give (unread, two splits of one size looked the same)
    if isinstance(indices, (range, list, tuple)) or (isinstance(indices, (Tensor, np.ndarray)) and indices.ndim == 1):
        return sorted(int(i) for i in indices)
    return None


def in_dataset_order(data: Any) -> Any:
    """A shuffling ``DataLoader`` (default collation) as a loader of the same batches over the
    images it draws, in the dataset's order; anything else as it is. Read this way, the images come
    in one order on every call, so a fingerprint (a resume's check) does not change.

    Examples::

        >>> from torch.utils.data import TensorDataset
        >>> shuffled = DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2, shuffle=True)
        >>> [x.tolist() for (x,) in in_dataset_order(shuffled)]
        [[0.0, 1.0], [2.0, 3.0]]
    """
    shuffling = (RandomSampler, SubsetRandomSampler)  # the second is no subclass of the first
    if isinstance(data, DataLoader) and isinstance(loader_sampler(data), shuffling) and data.collate_fn is default_collate:
        indices = loader_indices(data)
        if indices is not None:  # collated as the loader collates (NumPy items become tensors)
            # a loader given a batch_sampler has no batch_size of its own (read as 1: a pass per image)
            size = data.batch_size or getattr(data.batch_sampler, "batch_size", None) or 1
            # read as the caller's loader reads (a worker_init_fn that opens a file per worker, say)
            workers = dict(worker_init_fn=data.worker_init_fn, multiprocessing_context=data.multiprocessing_context,
                           timeout=data.timeout, prefetch_factor=data.prefetch_factor) if data.num_workers else {}
            # over the dataset itself (a worker_init_fn reads get_worker_info().dataset), its images in order
            return DataLoader(data.dataset, batch_size=size, sampler=list(indices), num_workers=data.num_workers,
                              pin_memory=data.pin_memory, **workers)
    return data


def without_persistent_workers(data: Any) -> Any:
    """A ``DataLoader`` with ``persistent_workers=True`` as the same loader with workers started for
    each read; anything else as it is. Persistent workers are seeded once, when first started, so
    their random transforms drew other images on every later read (:func:`seeded_reading` seeds
    workers as they start): a second fit differed from the first, and a resume was refused.

    Examples::

        >>> from torch.utils.data import TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(4)), batch_size=2, num_workers=1, persistent_workers=True)
        >>> without_persistent_workers(loader).persistent_workers
        False
    """
    # a subclass (its own __iter__, as Accelerate's loaders have) is used as it is: a plain rebuild lost it
    if not (type(data) is DataLoader and data.num_workers and data.persistent_workers):
        return data
    if isinstance(data.dataset, IterableDataset):  # no sampler to pass: batching by size
        batching = dict(batch_size=data.batch_size, drop_last=data.drop_last)
    elif data.batch_sampler is not None:  # the loader's own (its sampler and generator inside)
        batching = dict(batch_sampler=data.batch_sampler)
    else:  # automatic batching off: one item at a time
        batching = dict(batch_size=None, sampler=data.sampler)
    return DataLoader(data.dataset, **batching, num_workers=data.num_workers, collate_fn=data.collate_fn,
                      pin_memory=data.pin_memory, timeout=data.timeout, worker_init_fn=data.worker_init_fn,
                      multiprocessing_context=data.multiprocessing_context, generator=data.generator,
                      prefetch_factor=data.prefetch_factor, persistent_workers=False)


@contextmanager
def seeded_reading(data: Any, seed: int = 0) -> Iterator[None]:
    """A read of ``data`` that draws the same on every call and leaves the caller's generators as
    they were: torch's, NumPy's and Python's global ones (random transforms, a loader's worker
    seeds), and a ``DataLoader``'s own generator and its sampler's (worker seeds, draws with
    replacement), all seeded for the read. Without the loader's, its images differed from call to
    call, and a resume's check of them refused every resume.

    Examples::

        >>> loader = DataLoader(torch.arange(8.0), batch_size=8, sampler=RandomSampler(range(8), replacement=True,
        ...                     generator=torch.Generator().manual_seed(5)))
        >>> with seeded_reading(loader):
        ...     first = next(iter(loader))
        >>> with seeded_reading(loader):
        ...     torch.equal(first, next(iter(loader)))
        True
    """
    own = {}
    if isinstance(data, DataLoader):
        for holder in (data, data.sampler, loader_sampler(data), data.batch_sampler):
            generator = getattr(holder, "generator", None)
            if isinstance(generator, torch.Generator):
                own[id(generator)] = generator
    states = [(generator, generator.get_state()) for generator in own.values()]
    try:
        for generator, _ in states:
            generator.manual_seed(seed)
        with seeded_every_global_rng(seed):
            yield
    finally:
        for generator, state in states:
            generator.set_state(state)


def _items_are_stored_arrays(data: Any) -> bool:
    """Whether ``data.images`` (and ``data.targets``) can stand for ``data``'s items: a
    :class:`~captum_inn.datasets.ColorDigits`, or an object without items of its own. A Dataset
    that keeps raw images there and transforms them in ``__getitem__`` is read through its items
    (its transforms were skipped, and a list of images failed).

    Examples::

        >>> from captum_inn.datasets import ColorDigits
        >>> _items_are_stored_arrays(ColorDigits("test")), _items_are_stored_arrays(torch.utils.data.TensorDataset(torch.zeros(2)))
        (True, False)
    """
    from captum_inn.datasets import ColorDigits

    return isinstance(data, ColorDigits) or not hasattr(data, "__getitem__")


def warn_if_random_items(data: Any, fit: str) -> None:
    """Warn where ``data``'s items differ from one read to the next (random transforms in a
    ``Dataset``): ``fit`` reads every image once, with the random generators seeded the same on every
    read (a resume must see the same images), so each image keeps one draw for all the steps, where
    the user expected fresh ones. The first item is read twice, under two seeds."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if (isinstance(dataset, (Tensor, tuple, list, dict, IterableDataset)) or _items_are_stored_arrays(dataset)
            or not hasattr(dataset, "__len__")):
        return
    try:
        if len(dataset) == 0:
            return
        reads = []
        for seed in (1, 2):
            with seeded_every_global_rng(seed):
                reads.append(_images_of(dataset[0]))
    except Exception:  # noqa: BLE001 - items the fit cannot read either: its own read names the problem
        return
    if reads[0].shape == reads[1].shape and torch.equal(reads[0], reads[1]):
        return
    warnings.warn(
        f"`data`'s items differ from one read to the next (random transforms in the Dataset, e.g. a RandomCrop): "
        f"{fit} reads every image once, with the random generators seeded the same on every read so that a resume "
        "sees the same images, and trains on that one draw of each image for all its steps. For fresh draws at "
        "every step, take the random transforms out of the Dataset and pass them as augment= (a callable on image "
        "batches, e.g. captum_inn.training.Jitter).", UserWarning, stacklevel=user_stacklevel(),
    )


def iter_image_batches(
    data: Any,
    batch_size: int = 256,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """Yield image batches ``(B, C, H, W)`` from a tensor, a ``Dataset`` or a ``DataLoader``.

    Args:
        data: ``(N, C, H, W)`` tensor; a map-style ``Dataset`` yielding images or ``(image, label)``;
            or a ``DataLoader`` (used as it is, ``batch_size`` and ``shuffle`` ignored).
        batch_size: Images per batch.
        shuffle: Shuffle (tensor and ``Dataset`` input) with ``generator``.
        generator: Seeded generator for shuffling.

    Returns:
        An iterator of ``(B, C, H, W)`` image tensors (``B = batch_size``, the last batch may be
        smaller).

    Examples::

        >>> [b.shape[0] for b in iter_image_batches(torch.rand(10, 3, 4, 4), batch_size=4)]
        [4, 4, 2]
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(data, Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"`data` must be a non-empty batch of images (N, C, H, W), got shape {tuple(data.shape)}.")
        order = torch.randperm(data.shape[0], generator=generator) if shuffle else torch.arange(data.shape[0])
        for start in range(0, data.shape[0], batch_size):
            yield data[order[start : start + batch_size]]
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data) \
            and data[0].dim() == 4 and data[1].dim() < 4 and data[1].shape[:1] == data[0].shape[:1]:
        # read as a dataset of two items, it failed as "images of different sizes"
        raise ValueError(f"`data` is a {type(data).__name__} of tensors of shapes {[tuple(t.shape) for t in data]}, "
                         "an (images, labels) pair as fit_classifier takes it; pass the images tensor alone.")
    if isinstance(data, DataLoader):
        loader = without_persistent_workers(data)
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError("`data` is empty.")
        if generator is None and not shuffle:
            # a DataLoader draws its workers' base seed from the global generator on every pass; a
            # private one leaves the caller's stream as a tensor's pass does (no workers: unused)
            generator = torch.Generator()
        loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    else:
        raise TypeError(
            f"`data` must be an image tensor, a Dataset or a DataLoader, got {type(data).__name__}."
        )
    batches = iter(loader)
    while True:
        with batching_errors_explained():
            batch = next(batches, None)
        if batch is None:
            return
        images = _images_of(batch)
        if isinstance(data, DataLoader) and data.batch_sampler is None and images.dim() == 3:
            # without automatic batching the loader yields single images: read as batches, C images of H rows
            raise ValueError(
                f"`data` is a DataLoader with batch_size=None, which yields its dataset's items one by one, here "
                f"single images of shape {tuple(images.shape)}; pass batch_size=... to the DataLoader (or pass the "
                "Dataset itself)."
            )
        yield images


_ONE_SIZE = ("transform=T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()]) to the dataset, or load "
             "the folder with captum_inn.datasets.load_image_folder(root, size=...)")


@contextmanager
def batching_errors_explained() -> Iterator[None]:
    """Re-raise the error of stacking a ``Dataset``'s items into a batch as one that names ``data``
    and the transform to use, for the usual causes (PIL images, images of several sizes)."""
    try:
        yield
    except (TypeError, RuntimeError) as error:
        friendly = _batching_error(error)
        if friendly is None:
            raise
        raise friendly from error


def _batching_error(error: Exception) -> Optional[Exception]:
    """What went wrong when a ``Dataset``'s items could not be stacked into a batch, for the usual
    causes (PIL images, images of several sizes); ``None`` for other errors."""
    text = str(error)
    if "default_collate" in text or "expected Tensor as element" in text:
        found = text.rsplit("found", 1)[-1].rsplit("got", 1)[-1].strip(" .")
        return TypeError(f"`data` yields items that are not image tensors ({found}); images must be tensors "
                         f"(C, H, W) with pixels in [0, 1]: for PIL images pass {_ONE_SIZE}.")
    if "stack expects each tensor to be equal size" in text:
        return ValueError(f"`data` yields images of different sizes ({text.split('but got', 1)[-1].strip()}); "
                          f"give them one size: pass {_ONE_SIZE}.")
    return None


def images_as_tensor(data: Any) -> Tensor:
    """All images of ``data`` (tensor, ``Dataset`` or ``DataLoader``) as one ``(N, C, H, W)`` tensor.

    Args:
        data: Images as in :func:`iter_image_batches` (a ``Dataset`` may
            yield ``(image, label)`` pairs). A tensor is returned as it is, a
            :class:`~captum_inn.datasets.ColorDigits` gives its ``images``, and a shuffling
            ``DataLoader`` its dataset's images in the dataset's order. Random transforms are
            drawn from generators seeded the same on every call (the caller's are left as they
            were), so the images, and a resume's check of them, are the same each time.

    Returns:
        ``(N, C, H, W)``.

    Examples::

        >>> from torch.utils.data import TensorDataset
        >>> images_as_tensor(TensorDataset(torch.rand(5, 3, 4, 4), torch.zeros(5))).shape
        torch.Size([5, 3, 4, 4])
    """
    if isinstance(data, Tensor):
        return data
    if hasattr(data, "images") and isinstance(data.images, Tensor) and _items_are_stored_arrays(data):  # e.g. ColorDigits
        return data.images
    # random transforms draw the same each call (and leave the caller's generators alone): a resume's
    # images fingerprint changed with every read
    with seeded_reading(data):
        return torch.cat(list(iter_image_batches(in_dataset_order(data), batch_size=256)))
