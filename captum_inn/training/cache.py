"""Feature caches: run the analysed network and the encoder once per image, train flows from the cache.

A cache lives in memory (tensors) or, for datasets larger than memory, in a folder of ``.npy``
files read by rows (:class:`~captum_inn.training.disk.DiskArray`), so the memory of a fit does
not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    default_collate,
    default_convert,
)
from tqdm import tqdm  # plain text bars: tqdm.auto warns in notebooks without ipywidgets

from captum_inn._captum_compat import _format_additional_forward_args
from captum_inn._fingerprints import (
    buffer_fingerprints,
    class_name,
    hash_tensors,
    tensor_attributes,
    tensor_bytes,
    weights_fingerprint,
)
from captum_inn._random import normal
from captum_inn.attr._common import (
    check_batch_first,
    check_finite_rows,
    check_image_input,
    check_image_size,
    check_module_device,
    check_pixel_range,
    dtype_errors_named,
    encode_images,
    forward_errors_explained,
    sequence_first_suspect,
    slice_forward_args,
    user_stacklevel,
    warn_if_batch_statistics,
)
from captum_inn.autoencoders import check_autoencoder
from captum_inn.capture import (
    LayerHooks,
    _unwrapped,
    did_not_run_hint,
    eval_mode,
    module_attributes,
    per_layer_selectors,
    resolve_layer,
    selector_record,
    warn_if_run_twice,
)
from captum_inn.training.checkpoint import (
    CheckpointError,
    creatable_path,
    load_checkpoint,
    save_checkpoint,
)
from captum_inn.training.data import (
    _images_of,
    check_image_dtype,
    count_images,
    iter_image_batches,
    loader_batching,
    loader_indices,
    per_image_rows,
    seeded_reading,
)
from captum_inn.training.disk import (
    DiskArray,
    DiskArrayWriter,
    FolderLock,
    iter_rows,
    read_manifest,
    write_manifest,
)

__all__ = ["FeatureCache", "cache_features", "source_fingerprint", "images_fingerprint", "forward_args_fingerprint"]

Array = Union[Tensor, DiskArray]
_DISK_FORMAT = 1


@dataclass
class FeatureCache:
    """What flows train on: per image, the code posterior and the activations of hooked layers.

    Every array is a tensor or a :class:`~captum_inn.training.disk.DiskArray` (see
    :meth:`open`); both are indexed by rows in the same way.

    Attributes:
        code_mean: ``(N, d)`` posterior means of ``z̄ = E(x)``.
        code_std: ``(N, d)`` posterior standard deviations (zeros for deterministic encoders).
        layers: ``{name: (N, *shape)}`` activations ``z = Φ(x)`` of every hooked layer.
        model_class: Qualified class name of the analysed model.
        source: :func:`source_fingerprint` of the model, autoencoder and images the cache was
            computed from (``""`` when unknown); a resumed fit checks it.
        layer_inputs: Whether the layers' inputs were read (``attribute_to_layer_input=True``)
            rather than their outputs; the fitted INNs record it for the explainers.
        autoencoder_weights: :func:`weights_fingerprint` of the autoencoder that gave the codes
            (``""`` when unknown); the fitted INNs record it, and the explainers refuse another.
        model_weights: :func:`weights_fingerprint` of the model whose layers were read (``""`` when
            unknown); the fitted INNs record it, and the explainers refuse another model.
        model_buffers: A short hash of each of the model's buffers (empty when unknown or without
            buffers): the explainers warn when the weights are the same but the
            buffers changed since (batch norm's running statistics, updated by a pass in train
            mode), as the layer then computes other activations.
        source_parts: Fingerprints of the parts of ``source`` (``"model"``, ``"autoencoder"``,
            ``"images"``; empty when unknown), so that a refused resume says which one changed.
        selectors: ``{layer name: selector}`` that picked each layer's tensor (``None``, an ``int``,
            a ``str``, or ``{"callable": name}``; empty when unknown); the fitted INNs record it,
            and the explainers read with it.
        forward_args: :func:`forward_args_fingerprint` of the ``additional_forward_args`` the
            model ran with (``""`` when unknown); a resumed fit refuses a cache made with others.
        image_input: The images' position among the model's arguments (0: first); the fitted
            INNs record it, and the explainers find the images there.

    Examples::

        >>> cache = FeatureCache(torch.zeros(5, 6), torch.ones(5, 6), {"fc": torch.randn(5, 10)})
        >>> len(cache), cache.latent_dim, cache.layer_shape("fc")
        (5, 6, (10,))
        >>> cache.sample_codes(torch.tensor([0, 2]), torch.Generator().manual_seed(0)).shape
        torch.Size([2, 6])
    """

    code_mean: Array
    code_std: Array
    layers: Dict[str, Array] = field(default_factory=dict)
    model_class: str = ""
    source: str = ""
    layer_inputs: bool = False
    autoencoder_weights: str = ""
    source_parts: Dict[str, str] = field(default_factory=dict)
    model_weights: str = ""
    selectors: Dict[str, Any] = field(default_factory=dict)
    forward_args: str = ""
    model_buffers: List[str] = field(default_factory=list)
    image_input: int = 0

    # what a saved cache records beside its arrays (the fields after `layers`)
    _RECORD = ("model_class", "source", "layer_inputs", "autoencoder_weights", "source_parts", "model_weights",
               "selectors", "forward_args", "model_buffers", "image_input")

    def __post_init__(self) -> None:
        # a hand-built cache with mismatched rows trained on the extra rows silently, or failed with a raw
        # IndexError mid-fit; a saved one was then refused as "edited"
        if not isinstance(self.layers, dict):
            raise TypeError(f"`layers` must be a dict {{layer name: (N, *shape) array}}, got {type(self.layers).__name__}.")
        arrays = {"code_mean": self.code_mean, "code_std": self.code_std,
                  **{f"layers[{name!r}]": values for name, values in self.layers.items()}}
        for what, values in arrays.items():
            if not isinstance(values, (Tensor, DiskArray)):
                raise TypeError(f"`{what}` must be a torch.Tensor (or a DiskArray), got {type(values).__name__}; "
                                "convert it with torch.as_tensor.")
        if len(self.code_mean.shape) != 2:
            raise ValueError(f"`code_mean` must be (N, d), one code per image, got shape {tuple(self.code_mean.shape)}.")
        if tuple(self.code_std.shape) != tuple(self.code_mean.shape):
            raise ValueError(f"`code_std` of shape {tuple(self.code_std.shape)} must have `code_mean`'s shape "
                             f"{tuple(self.code_mean.shape)}: one spread per code entry (zeros for a deterministic encoder).")
        n = self.code_mean.shape[0]
        for what, values in arrays.items():
            if len(values.shape) < 1 or values.shape[0] != n:
                raise ValueError(f"`{what}` of shape {tuple(values.shape)} must be (N, ...) with N = {n}, the rows of "
                                 "`code_mean`: every array holds one row per image, in the same order.")

    def _record(self) -> Dict[str, Any]:
        """The cache's description beside its arrays (JSON), as :meth:`save` and ``memmap_dir`` write it."""
        return {key: getattr(self, key) for key in self._RECORD}

    @classmethod
    def _from_record(cls, code_mean: Array, code_std: Array, layers: Dict[str, Array],
                    record: Mapping[str, Any]) -> FeatureCache:
        """A cache of these arrays with the description ``record`` (keys missing in older files take
        their defaults)."""
        known = {key: record[key] for key in cls._RECORD if key in record}
        for key, kind in (("layer_inputs", bool), ("source_parts", dict), ("selectors", dict), ("model_buffers", list)):
            if key in known:
                known[key] = kind(known[key])
        return cls(code_mean, code_std, layers, **known)

    def __len__(self) -> int:
        return self.code_mean.shape[0]

    @property
    def latent_dim(self) -> int:
        """Size ``d`` of the code."""
        return self.code_mean.shape[1]

    def layer_shape(self, name: str) -> tuple:
        """Per-sample shape of layer ``name``."""
        return tuple(self.layers[name].shape[1:])

    @property
    def on_disk(self) -> bool:
        """Whether the arrays are read from disk (:meth:`open`) rather than held in memory."""
        return isinstance(self.code_mean, DiskArray)

    def close(self) -> None:
        """Close the files of an on-disk cache (no-op in memory); it cannot be read afterwards.

        Examples::

            cache = FeatureCache.open("checkpoints/features")
            ...
            cache.close()
        """
        for values in (self.code_mean, self.code_std, *self.layers.values()):
            if isinstance(values, DiskArray):
                values.close()

    def check_finite(self, layers: Optional[Sequence[str]] = None) -> None:
        """Raise ``ValueError`` when the codes or the given layers hold NaN or inf (scanned in blocks)."""
        names = list(self.layers) if layers is None else list(layers)
        for label, values in (("code_mean", self.code_mean), ("code_std", self.code_std),
                              *((f"layer {n!r}", self.layers[n]) for n in names)):
            if not all(torch.isfinite(block).all() for block in iter_rows(values)):
                raise ValueError(f"The feature cache's {label} contains NaN or infinite values; check the images, "
                                 "the model and the encoder.")

    def rows(self, name: str, index: Tensor) -> Tensor:
        """Layer ``name``'s activations at the rows ``index`` (a 1-d tensor of row numbers)."""
        values = self.layers[name]
        if isinstance(values, DiskArray):
            return values[index]
        # index_select copies whole rows: a minibatch of 64x16x16 maps in 0.9 ms, against 2-3 ms
        # for advanced indexing (one thread)
        return values.index_select(0, index.to(values.device))

    def sample_codes(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """Posterior samples ``mean + std · ε`` of the codes at ``index`` (docs/method.rst: samples, not the mean)."""
        mean, std = self.code_mean[index], self.code_std[index]
        # in float32 at least: a bfloat16 cache (a bfloat16 autoencoder, or a pass under autocast) lost a
        # quarter of the noise to rounding (the codes' spread is ~70 times their posterior std)
        dtype = torch.promote_types(mean.dtype, torch.float32)
        eps = normal(mean.shape, generator, mean.device, torch.float32).to(dtype)  # one stream under any default dtype
        return mean.to(dtype) + std.to(dtype) * eps

    def save(self, path: Union[str, Path]) -> Path:
        """Write the cache to one safetensors file, atomically (a resumed fit reads it back).

        This loads every array into memory; a cache on disk is already saved (see :meth:`open`).

        Args:
            path: Target ``.safetensors`` file.

        Returns:
            The written path.
        """
        tensors = {"code_mean": self.code_mean[:], "code_std": self.code_std[:],
                   **{f"layer.{name}": value[:] for name, value in self.layers.items()}}
        meta = {"kind": "feature_cache", "config": {"layers": list(self.layers), **self._record()}}
        return save_checkpoint(path, tensors, meta)

    @classmethod
    def load(cls, path: Union[str, Path]) -> FeatureCache:
        """Read a cache written by :meth:`save` (checked like every checkpoint, never unpickled).

        Args:
            path: The ``.safetensors`` file.

        Returns:
            The :class:`FeatureCache`.

        Raises:
            CheckpointError: an unreadable file, or one whose arrays or record are missing or do
                not fit together.
        """
        tensors, meta = load_checkpoint(path, kind="feature_cache")
        try:
            names = meta["config"]["layers"]
            cache = cls._from_record(tensors["code_mean"], tensors["code_std"],  # its rows and shapes checked
                                     {n: tensors[f"layer.{n}"] for n in names}, meta["config"])
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise CheckpointError(f"Feature cache {str(path)!r} is incomplete or was edited ({type(error).__name__}: "
                                  f"{error}); delete it to recompute it.") from None
        return cache

    @classmethod
    def open(cls, folder: Union[str, Path]) -> Optional[FeatureCache]:
        """Open a cache that :func:`cache_features` wrote to ``memmap_dir``; ``None`` if it is incomplete.

        Args:
            folder: The folder (``manifest.json`` plus one ``.npy`` file per array).

        Returns:
            A :class:`FeatureCache` whose arrays are :class:`~captum_inn.training.disk.DiskArray`,
            or ``None`` when the folder holds no finished cache (the manifest is written last).
            While a pass writes into the folder, waits (with a warning) until it has finished.

        Raises:
            ValueError: the folder holds a cache of a newer format, or a damaged one (a missing,
                truncated or misshapen file, an incomplete manifest).
        """
        if Path(folder).is_file():  # was None, as if the cache were unfinished
            raise ValueError(f"{str(folder)!r} is a file, not a cache folder: a cache saved with FeatureCache.save; "
                             "read it with FeatureCache.load.")
        with FolderLock(folder, shared=True):  # waits for a pass writing into the folder
            return cls._open(Path(folder))

    @classmethod
    def _open(cls, folder: Path) -> Optional[FeatureCache]:
        """:meth:`open` without the folder's lock (a pass holding it opens what it wrote)."""
        manifest = read_manifest(folder)
        if manifest is None:
            return None
        version = manifest.get("format_version", 0)  # a hand-edited one may be anything: a TypeError before
        if manifest.get("kind") != "feature_cache" or not isinstance(version, int) or version > _DISK_FORMAT:
            raise ValueError(f"{str(folder)!r} does not hold a feature cache this version can read ({manifest.get('kind')}, "
                             f"format {manifest.get('format_version')}); delete it to recompute.")
        arrays: Dict[str, DiskArray] = {}
        try:
            for key, file in manifest["files"].items():
                arrays[key] = DiskArray(folder / file)
            if {len(a) for a in arrays.values()} != {manifest["n"]}:
                raise ValueError(f"its arrays do not all have {manifest['n']} rows")
            layers = {name: arrays[f"layer.{name}"] for name in manifest["layers"]}
            return cls._from_record(arrays["code_mean"], arrays["code_std"], layers, manifest)
        except BaseException as error:
            for array in arrays.values():  # the files opened so far
                array.close()
            if isinstance(error, (OSError, KeyError, TypeError, AttributeError, ValueError)):  # a missing file or entry
                raise ValueError(f"{str(folder)!r} holds a damaged feature cache ({type(error).__name__}: {error}); "
                                 "delete the folder to recompute it.") from None
            raise


def as_cached_rows(activation: Tensor, n: int, layer: str, additional_forward_args: Any = None) -> Tensor:
    """A layer's activation for ``n`` images as a cache holds it: the batch first (a ``ValueError``
    naming ``layer`` otherwise), integer or boolean values as float32 (as the memory-mapped cache
    stores them; a fit failed on them)."""
    check_batch_first(activation, n, f"Layer {layer!r}", additional_forward_args)
    return activation if activation.is_floating_point() else activation.float()


def _model_args(images: Tensor, extra: Tuple[Any, ...], image_input: int = 0) -> Tuple[Any, ...]:
    """The model's arguments: ``extra`` with the images inserted at position ``image_input``."""
    return (*extra[:image_input], images, *extra[image_input:])


def _check_sequence_first(model: nn.Module, layer_list: Sequence[Any], names: Sequence[str], values: Mapping[str, Tensor],
                          images: Tensor, extra: Tuple[Any, ...], attribute_to_layer_input: bool, selector: Any,
                          image_input: int) -> None:
    """Tell a batch-first ``(N, N, E)`` activation from a sequence-first ``(L, N, E)`` one with
    ``L == N`` (:func:`~captum_inn.attr._common.sequence_first_suspect`) by a pass with one image fewer."""
    n = images.shape[0]
    suspects = [name for name in names if sequence_first_suspect(values[name], n)]
    if not suspects:
        return
    with LayerHooks(model, layer_list, attribute_to_layer_input=attribute_to_layer_input, selector=selector,
                    stop_early=True) as hooks:
        hooks.run(*_model_args(images[:-1], slice_forward_args(extra, slice(0, n - 1), n) or (), image_input))
    for name in suspects:  # say where the n - 1 comes from: the user passed n images
        check_batch_first(hooks.values[name], n - 1, f"Layer {name!r} (checked with the first {n - 1} of {n} images, "
                          f"since a shape of ({n}, {n}, ...) cannot tell batch-first from sequence-first)", extra)


# images read twice more, at the start, to tell a random model (or one that mixes a batch's images)
_PROBE_IMAGES = 8


def _warn_if_random(model: nn.Module, layer_list: Sequence[Any], first_rows: Mapping[str, Tensor], images: Tensor,
                    extra: Tuple[Any, ...], attribute_to_layer_input: bool, selector: Any, image_input: int = 0) -> None:
    """Warn about a layer that does not give the same activations for the same images: a model that
    is random in eval mode (``F.dropout(h, p)`` without ``training=self.training``, noise drawn in
    ``forward``) or one that mixes the images of a batch. The INN learns what the cached read keeps and
    every explanation reads another, and ``seed`` no longer gives the same samples. The first
    ``_PROBE_IMAGES`` images are read twice more, with the caller's random streams kept."""
    k = min(images.shape[0], _PROBE_IMAGES)
    device = images.device
    reads = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        for _ in range(2):
            with LayerHooks(model, layer_list, attribute_to_layer_input=attribute_to_layer_input, selector=selector,
                            stop_early=True) as hooks:
                hooks.run(*_model_args(images[:k], slice_forward_args(extra, slice(0, k), images.shape[0]) or (),
                                      image_input))
                reads.append(dict(hooks.values))
    for name, rows in first_rows.items():
        cached, again, third = rows[:k].float(), reads[0][name].float(), reads[1][name].float()
        if not cached.numel():
            continue
        # 1% of the layer's largest value: far above rounding (another batch size may take another kernel,
        # TF32 on GPUs), far below what dropout or mixed images change
        tolerance = 1e-2 * float(cached.abs().amax())
        gap = float((again - third).abs().amax())
        random = gap > tolerance
        if not random:
            gap = float((cached - again.reshape(cached.shape)).abs().amax())
            if gap <= tolerance:
                continue
        cause = ("differ from one read of the same images to the next: the model is random in eval mode (dropout "
                 "called as F.dropout(x, p) without training=self.training, or noise drawn in forward)" if random else
                 f"of the first {k} images differ when they are read in a batch of their own: the model mixes the "
                 "images of a batch (a normalisation over the batch in eval mode)")
        warnings.warn(
            f"Layer {name!r}'s activations {cause}; largest difference {gap:.3g}. The INN learns what the cached "
            "read keeps, every explanation reads another, and `seed` no longer gives the same samples. Make the "
            "layer a function of each image alone before fitting.",
            UserWarning, stacklevel=user_stacklevel(),
        )


def _check_ordered_for_per_image_args(data: Any, extra: Tuple[Any, ...], n_rows: Optional[int]) -> None:
    """Refuse per-image extra tensors (one row per image of ``data``) beside a ``DataLoader`` whose
    batches do not come in the dataset's order, which their rows follow."""
    if not isinstance(data, DataLoader):
        return
    if isinstance(data.dataset, IterableDataset):  # its own order, unless workers interleave their batches
        unordered = f"an IterableDataset read by {data.num_workers} workers" if data.num_workers else None
    else:
        batching = loader_batching(data)
        sampler = None if batching is None else batching[0]
        # a fixed sequence of indices: the rows follow it; a BatchSampler subclass may order its batches its own
        # way (by length, say)
        fixed = isinstance(sampler, (SequentialSampler, range, list, tuple, np.ndarray, Tensor))
        ordered = fixed and (data.batch_size is not None or type(data.batch_sampler) is BatchSampler)
        unordered = None if ordered else f"a {type(data.batch_sampler if batching is None else sampler).__name__}"
    per_image = [i for i, a in enumerate(extra) if isinstance(a, Tensor) and a.dim() and a.shape[0] == n_rows]
    if unordered and per_image:
        raise ValueError(
            f"`additional_forward_args` tensor {per_image[0]} has one row per image, but `data` is a DataLoader with "
            f"{unordered}, whose batches do not come in the rows' order. Pass a DataLoader with "
            "shuffle=False, the Dataset itself or an image tensor (features are read in order; the fit shuffles them "
            "afterwards)."
        )


class _MemorySink:
    """Collects per-batch arrays in memory."""

    def __init__(self) -> None:
        self.parts: Dict[str, List[Tensor]] = {}

    def append(self, key: str, rows: Tensor) -> None:
        self.parts.setdefault(key, []).append(rows.cpu())

    def finish(self, layers: Sequence[str], record: Mapping[str, Any]) -> FeatureCache:
        arrays = {key: torch.cat(parts) for key, parts in self.parts.items()}
        return FeatureCache._from_record(arrays["code_mean"], arrays["code_std"],
                                        {n: arrays[f"layer.{n}"] for n in layers}, record)

    def abort(self) -> None:
        self.parts.clear()


class _DiskSink:
    """Streams per-batch arrays into ``.npy`` files; the manifest, written last, marks the cache complete."""

    def __init__(self, folder: Union[str, Path], n_rows: Optional[int]) -> None:
        if n_rows is None:
            raise ValueError("Caching features on disk (`memmap_dir`, or fit_invariances's memmap=True) needs data of "
                             "known length (a tensor, a sized Dataset or a DataLoader over one with a batch_size or a "
                             "BatchSampler), because the files are sized up front.")
        self.folder, self.n_rows = creatable_path(folder, "memmap_dir"), n_rows
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # raw OS errors naming neither the argument nor a fix
            raise ValueError(f"`memmap_dir` {str(folder)!r} is a file, or lies under one; pass a folder (it is "
                             "created if missing).") from None
        self.writers: Dict[str, DiskArrayWriter] = {}
        # held until the manifest is written and read back: another pass into the folder waits, so the
        # two never mix their files and manifests
        self.lock = FolderLock(self.folder)

    def append(self, key: str, rows: Tensor) -> None:
        if key not in self.writers:
            stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
            # "a b" and "a_b" (or "fc" and "FC" on a case-insensitive file system) must not share a file
            taken, file, n = {w.path.name.lower() for w in self.writers.values()}, stem + ".npy", 1
            while file.lower() in taken:
                file, n = f"{stem}.{n}.npy", n + 1
            self.writers[key] = DiskArrayWriter(self.folder / file, self.n_rows, rows.shape[1:])
        self.writers[key].append(rows)

    def finish(self, layers: Sequence[str], record: Mapping[str, Any]) -> FeatureCache:
        # the old cache stays whole until this pass has all its rows (a failed pass kept nothing);
        # without its manifest while the files are renamed in, a crash now leaves no mix of the two
        (self.folder / "manifest.json").unlink(missing_ok=True)
        files = {key: writer.close().name for key, writer in self.writers.items()}
        write_manifest(self.folder, {"kind": "feature_cache", "format_version": _DISK_FORMAT, "n": self.n_rows,
                                     "layers": list(layers), **record, "files": files})
        cache = FeatureCache._open(self.folder)  # under the lock: the next pass replaces the files
        self.lock.release()
        return cache

    def abort(self) -> None:
        try:
            for writer in self.writers.values():
                with contextlib.suppress(OSError):  # the pass's own error is the one to report
                    writer.abort()
        finally:  # on every path: a failed pass must not leave the folder locked
            self.lock.release()


@torch.no_grad()
def source_fingerprint(model: nn.Module, autoencoder: Any, data: Any, n_probe: int = 32) -> str:
    """A short hash of what a feature cache is computed from, so that a resumed fit notices a change.

    It covers every tensor of the model's and the autoencoder's state (weights and buffers; of the
    wrapped module for a ``torch.compile``'d or ``nn.DataParallel`` one, the same weights), the
    number of images, and ``n_probe`` images spread evenly over ``data`` (all of them for
    smaller sets). Reading a few images keeps it cheap for datasets on disk; a change that
    touches none of the probed images and keeps their number goes unnoticed.

    Args:
        model: The analysed network.
        autoencoder: The autoencoder (an ``nn.Module``, or any object: its tensor attributes count).
        data: Images: tensor ``(N, C, H, W)``, ``Dataset`` or ``DataLoader`` (an unsized iterable
            contributes no images).
        n_probe: How many images to read.

    Returns:
        16 hexadecimal digits.

    Examples::

        >>> from captum_inn.autoencoders import ConvAutoencoder
        >>> model, ae = nn.Linear(4, 2), ConvAutoencoder((3, 8, 8), 4)
        >>> images = torch.rand(10, 3, 8, 8)
        >>> source_fingerprint(model, ae, images) == source_fingerprint(model, ae, images.clone())
        True
        >>> source_fingerprint(model, ae, images) == source_fingerprint(model, ae, images[:9])
        False
    """
    return _source_digests(model, autoencoder, data, n_probe)[0]


class _PartedDigest:
    """One sha256 over everything (the fingerprint, unchanged across versions) and one per part."""

    def __init__(self) -> None:
        self.whole, self.parts, self.current = hashlib.sha256(), {}, None

    def start(self, part: str) -> None:
        self.current = self.parts[part] = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self.whole.update(data)
        self.current.update(data)


def _source_digests(model: nn.Module, autoencoder: Any, data: Any, n_probe: int = 32) -> Tuple[str, Dict[str, str]]:
    """:func:`source_fingerprint` and the fingerprints of its parts ``{"model", "autoencoder", "images"}``."""
    digest = _PartedDigest()
    for label, part in (("model", model), ("autoencoder", autoencoder)):
        if isinstance(part, nn.Module):  # a wrapper's state_dict names its keys "_orig_mod." or "module."
            part = _unwrapped(part)
        digest.start(label)
        digest.update(label.encode())
        hash_tensors(digest, part.state_dict() if isinstance(part, nn.Module) else tensor_attributes(part))
        for key, module in module_attributes(part).items():  # a plain object's encoder and decoder
            hash_tensors(digest, {f"{key}.{k}": v for k, v in module.state_dict().items()})
    digest.start("images")
    _hash_images(digest, data, n_probe)
    return digest.whole.hexdigest()[:16], {part: d.hexdigest()[:16] for part, d in digest.parts.items()}


def _hash_images(digest: Any, data: Any, n_probe: int) -> None:
    n = count_images(data)
    digest.update(f"images:{n}".encode())
    items, indices, collate = data, range(n or 0), None
    if isinstance(data, DataLoader):  # the images the loader draws from, not its whole dataset
        items, indices = data.dataset, loader_indices(data)
        if indices is None and hasattr(items, "__len__"):
            # a sampler that does not say which images it draws (its own, with replacement): probes over the
            # whole dataset, which hold the images it draws from (no probe at all let another set pass)
            indices = range(len(items))
        if data.collate_fn not in (default_collate, default_convert):  # its own changes what is cached
            collate = data.collate_fn
    # a torch IterableDataset has a __getitem__ that raises NotImplementedError: counted, not probed
    if indices and hasattr(items, "__getitem__") and not isinstance(items, IterableDataset):
        with seeded_reading(data):  # random transforms: the same probes every time
            for position in torch.linspace(0, len(indices) - 1, min(len(indices), n_probe)).round().long().tolist():
                try:
                    item = items[indices[position]]
                    # NumPy items as tensors (as a loader converts them): they were counted, not hashed
                    digest.update(tensor_bytes(_images_of(default_convert(item) if collate is None else collate([item]))))
                except TypeError:  # items that are not tensors (e.g. PIL images): counted, not hashed
                    digest.update(b"?")


@torch.no_grad()
def images_fingerprint(data: Any, n_probe: int = 32) -> str:
    """A short hash of a set of images: their number and ``n_probe`` of them spread evenly over
    ``data`` (the images part of :func:`source_fingerprint`), so a resumed fit notices other images.

    Examples::

        >>> images = torch.rand(10, 3, 8, 8)
        >>> images_fingerprint(images) == images_fingerprint(images.clone()), images_fingerprint(images[:9]) == images_fingerprint(images)
        (True, False)
    """
    digest = hashlib.sha256()
    _hash_images(digest, data, n_probe)
    return digest.hexdigest()[:16]


def forward_args_fingerprint(additional_forward_args: Any, image_input: int = 0) -> str:
    """A short hash of the extra arguments a model runs with (``model(images, *args)``, or with the
    images at position ``image_input`` among them), so a resumed fit notices that the cached features
    came from other ones.

    Tensors count by dtype, shape and values; numbers, strings, ``None`` and bools by value;
    lists, tuples and dicts by their items; other objects by their type only (their ``repr`` may
    hold a memory address that differs from run to run).

    Args:
        additional_forward_args: ``None``, one value, or a tuple of values, as the fits take them.
        image_input: The images' position among the model's arguments (0: first).

    Returns:
        16 hexadecimal digits; ``None`` and ``()`` give the same.

    Examples::

        >>> forward_args_fingerprint(None) == forward_args_fingerprint(())
        True
        >>> forward_args_fingerprint((1.0,)) == forward_args_fingerprint((100.0,))
        False
    """
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, Tensor):
            digest.update(f"tensor:{value.dtype}:{tuple(value.shape)}:".encode())
            digest.update(tensor_bytes(value))
        elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            digest.update(f"{type(value).__name__}:{value!r};".encode())
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}[{len(value)}]".encode())
            for item in value:
                add(item)
        elif isinstance(value, Mapping):
            digest.update(f"dict[{len(value)}]".encode())
            for key in sorted(value, key=repr):
                add(key)
                add(value[key])
        else:
            digest.update(f"object:{type(value).__module__}.{type(value).__qualname__};".encode())

    add(tuple(_format_additional_forward_args(additional_forward_args) or ()))
    if image_input:  # 0 adds nothing: the fingerprints of caches made before it was a setting stay valid
        digest.update(f"images at {image_input}".encode())
    return digest.hexdigest()[:16]


_PART_NAMES = {"model": "the model's weights or buffers (e.g. BatchNorm statistics)", "autoencoder": "the autoencoder",
               "images": "the images (their number or content)"}


def source_changes(cache: FeatureCache, model: nn.Module, autoencoder: Any, data: Any) -> Optional[str]:
    """What differs between the source ``cache`` was computed from and ``model``, ``autoencoder``
    and ``data``: ``None`` if nothing, else a phrase naming the changed parts (all three where the
    cache does not record its parts)."""
    source, parts = _source_digests(model, autoencoder, data)
    if source == cache.source:
        return None
    changed = [_PART_NAMES[p] for p in _PART_NAMES if cache.source_parts and cache.source_parts.get(p) != parts[p]]
    return " and ".join(changed) if changed else "the model, the autoencoder or the images"


_NO_IMAGES = ("`data` yields no images (an empty dataset, or a DataLoader with drop_last=True and fewer images than "
              "its batch_size); pass at least one image, or drop_last=False.")


@torch.no_grad()
def cache_features(
    model: nn.Module,
    layers: Union[str, nn.Module, Sequence[Union[str, nn.Module]]],
    autoencoder: Any,
    data: Any,
    *,
    batch_size: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    attribute_to_layer_input: bool = False,
    selector: Any = None,
    additional_forward_args: Any = None,
    image_input: int = 0,
    memmap_dir: Optional[Union[str, Path]] = None,
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
        batch_size: Images per forward pass; by default 64 on the CPU (a ResNet-18 at 64×64 runs
            31% faster per image than at 256: the activations stay in the CPU's caches) and 256
            on accelerators.
        device: Where the model runs; the cache is kept on the CPU.
        attribute_to_layer_input: Hook layer inputs instead of outputs.
        selector: Picks a tensor from non-tensor layer outputs (see :class:`captum_inn.capture.LayerHooks`).
        additional_forward_args: Extra arguments of ``model`` after the images
            (``model(images, *additional_forward_args)``). As in Captum, a tensor with one row per
            image of ``data`` (of a ``DataLoader``'s dataset, counting the images ``drop_last``
            skips) is per image: each batch gets its rows. Any other value is passed whole to
            every batch (a 0-d tensor, a tensor of another length, a non-tensor).
        image_input: Where the images go among the model's arguments, for a model that takes them
            after others: ``model(*additional_forward_args[:image_input], images,
            *additional_forward_args[image_input:])`` (the explainers' ``image_input`` for the same model).
        memmap_dir: Write the cache to this folder (one ``.npy`` file per array) instead of
            memory, for datasets whose features do not fit in memory; reopen it later with
            :meth:`FeatureCache.open`. ``data`` must have a known length. A second pass into the
            same folder (another process, say) waits until this one has finished, with a warning.
        progress: Show a progress bar.

    Returns:
        A :class:`FeatureCache` with ``layers`` keyed by layer name.

    Raises:
        ValueError: NaN or infinite pixels or features, data that yields no images, a per-image
            ``additional_forward_args`` tensor beside a ``DataLoader`` that shuffles,
            ``memmap_dir`` for data of unknown length, a folder holding an unreadable or incomplete cache, pixels far outside [0, 1]
            or of another size than the autoencoder's, data the network refuses (explained).
        TypeError: images of another dtype than the network's.

    Examples::

        >>> from captum_inn.autoencoders import ConvAutoencoder
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> _ = model(torch.rand(1, 3, 8, 8))
        >>> cache = cache_features(model, ["1", "3"], ConvAutoencoder((3, 8, 8), 6), torch.rand(5, 3, 8, 8), progress=False)
        >>> cache.code_mean.shape, cache.layer_shape("1"), cache.layer_shape("3")
        (torch.Size([5, 6]), (4, 6, 6), (10,))
    """
    check_autoencoder(autoencoder)
    check_module_device(model, device, "model")
    warn_if_batch_statistics(model, "cache_features (the fits' feature pass)")
    check_module_device(autoencoder, device, "autoencoder")
    layer_list = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    modules = dict(resolve_layer(model, layer) for layer in layer_list)  # one array per layer
    names = list(modules)
    extra = _format_additional_forward_args(additional_forward_args) or ()
    image_input = check_image_input(image_input)
    if image_input > len(extra):
        raise ValueError(f"`image_input`={image_input} puts the images after the {len(extra)} "
                         "`additional_forward_args`; it can be at most their number (the model's other arguments).")
    n_images = count_images(data)
    if n_images == 0:  # before any pass or file: the arrays would be missing (a KeyError) or empty
        raise ValueError(_NO_IMAGES)
    n_rows = per_image_rows(data)  # a DataLoader's drop_last skips the last rows, not their place
    _check_ordered_for_per_image_args(data, extra, n_rows)
    if batch_size is None:
        batch_size = 64 if torch.device(device).type == "cpu" else 256
    source, source_parts = _source_digests(model, autoencoder, data)
    sink = _MemorySink() if memmap_dir is None else _DiskSink(memmap_dir, n_images)
    bar = tqdm(total=n_images, desc="caching features", disable=not progress, leave=False, unit="img")
    seen = 0
    try:
        # a Dataset's random transforms draw the same on every pass, and the caller's generators are kept
        with eval_mode(autoencoder), bar, seeded_reading(data):
            for images in iter_image_batches(data, batch_size):
                check_image_dtype(images)  # any floating dtype: the model and autoencoder may convert it
                if images.dim() != 4:  # refused now, not by every explainer after the fit
                    raise ValueError(
                        f"`data` images must have shape (N, C, H, W), got batches of shape {tuple(images.shape)}: "
                        "the explainers read and draw images (a 1-D signal fits as (N, C, 1, L))."
                    )
                if not torch.isfinite(images).all():
                    raise ValueError("`data` contains NaN or infinite pixels; clean the images before caching features.")
                check_pixel_range(images, "data", autoencoder)
                check_image_size(images, autoencoder, "data")
                images = images.to(device)
                batch_extra = slice_forward_args(extra, slice(seen, seen + images.shape[0]), n_rows) or ()
                with LayerHooks(model, layer_list, attribute_to_layer_input=attribute_to_layer_input,
                                selector=selector, stop_early=True) as hooks, \
                        dtype_errors_named(images, model, name="data"), \
                        forward_errors_explained((images,), batch_extra, "`data`", n_rows, image_input):
                    hooks.run(*_model_args(images, batch_extra, image_input))
                    values = dict(hooks.values)
                first_rows = {}
                for name in names:
                    if name not in values:
                        raise ValueError(
                            f"layer {name!r} did not run during the forward pass; check that it is used "
                            f"in model.forward{did_not_run_hint(model, name)}."
                        )
                    rows = as_cached_rows(values[name], images.shape[0], name, batch_extra)
                    check_finite_rows(rows, f"layer {name!r}'s activations", seen)
                    sink.append(f"layer.{name}", rows)
                    first_rows[name] = rows
                if seen == 0:  # once: a sequence-first layer with as many tokens as images in a batch
                    _check_sequence_first(model, layer_list, names, values, images, batch_extra,
                                          attribute_to_layer_input, selector, image_input)
                    warn_if_run_twice(model, modules, _model_args(
                        images[:1], slice_forward_args(batch_extra, slice(0, 1), images.shape[0]) or (), image_input))
                    _warn_if_random(model, layer_list, first_rows, images, batch_extra, attribute_to_layer_input,
                                    selector, image_input)
                mean, std = encode_images(autoencoder, images, posterior=True, name="data")
                check_finite_rows(mean, "the autoencoder's code means", seen)
                check_finite_rows(std, "the autoencoder's code standard deviations", seen)
                sink.append("code_mean", mean)
                sink.append("code_std", std)
                bar.update(images.shape[0])
                seen += images.shape[0]
        if seen == 0:
            raise ValueError(_NO_IMAGES)  # data of unknown length that yielded nothing
        return sink.finish(names, {
            "model_class": class_name(model), "source": source,
            "layer_inputs": bool(attribute_to_layer_input), "autoencoder_weights": weights_fingerprint(autoencoder),
            "source_parts": source_parts, "model_weights": weights_fingerprint(model),
            "model_buffers": buffer_fingerprints(model),
            "selectors": {name: selector_record(chosen)
                          for name, chosen in per_layer_selectors(model, names, selector).items()},
            "forward_args": forward_args_fingerprint(extra, image_input),
            "image_input": image_input,
        })
    except BaseException:
        sink.abort()  # no half-written cache is left behind
        raise

