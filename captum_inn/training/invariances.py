"""``fit_invariances``: fit the conditional INN ``t(z̄ | Φ(x))`` of hooked layers by maximum likelihood.

    L_t = E_x [ ½‖t(z̄ | Φ(x))‖² − log|det ∂t/∂z̄| ],   z̄ ~ q(z̄ | x)

Minimising it makes ``v = t(z̄ | z)`` standard normal and independent of ``z``: ``v`` carries what
the layer discarded (docs/method.rst). The network and the encoder run once per image (a
:class:`~captum_inn.training.cache.FeatureCache`); every layer's INN then trains from the cache.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from captum_inn._fingerprints import class_name, weights_fingerprint
from captum_inn._random import seeded_global_rng
from captum_inn.attr._common import (
    as_device,
    autograd_on,
    check_image_input,
    check_int,
    user_stacklevel,
)
from captum_inn.capture import (
    is_comparable_selector,
    per_layer_selectors,
    resolve_layer,
    selector_record,
)
from captum_inn.inn import ConditionalINN, FactorINN
from captum_inn.training.cache import (
    FeatureCache,
    cache_features,
    forward_args_fingerprint,
    source_changes,
    source_fingerprint,
)
from captum_inn.training.checkpoint import (
    CheckpointError,
    building_from,
    check_checkpoint_path,
    finished_checkpoint,
    load_checkpoint,
    load_module_state,
    module_tensors,
    read_header,
    save_checkpoint,
    warn_if_unfinished,
)
from captum_inn.training.data import count_images
from captum_inn.training.distributed import (
    check_replicas_agree,
    gather_texts,
    local_batch_size,
    raising_together,
    shard_data,
    shard_forward_args,
    warnings_from_rank_zero,
    world,
)
from captum_inn.training.loop import (
    check_resumable_early,
    cuda_graphs_by_default,
    final_loss,
    full_precision,
    merged_config,
    own_stream,
    resume_key,
    run_concurrently,
    running_on,
    train_loop,
)

__all__ = [
    "InvarianceConfig",
    "fit_invariances",
    "save_invariance_inn",
    "load_invariance_inn",
    "checkpoint_name",
]


@dataclass
class InvarianceConfig:
    """Settings of :func:`fit_invariances` (the architecture of ``t`` and its optimisation).

    Attributes:
        n_blocks: Flow blocks (each ActNorm, two couplings, a permutation).
        hidden: Width of the coupling subnets.
        depth: Hidden layers of the coupling subnets.
        embed_dim: Width of the condition embedding.
        conv_width: First-layer channels of the embedder of feature-map layers.
        conv_max_width: Largest channel count of that embedder.
        conv_patch_to: Largest side that embedder's first layer leaves (larger maps are cut into
            patches, :class:`~captum_inn.inn.ConvEmbedder`); ``None`` convolves at full resolution.
        token_dim: Features per token kept by the embedder of long token-sequence layers
            ``(T, D)`` (a ViT block's output, :class:`~captum_inn.inn.TokenEmbedder`); ``None``
            flattens every sequence into an MLP.
        clamp: Bound on each coupling log-scale.
        steps: Optimiser steps per layer.
        batch_size: Cached samples per step.
        lr: Adam learning rate.
        schedule: ``"constant"`` (as the reference implementation) or ``"cosine"`` decay.
        code_noise: Standard deviation of extra Gaussian noise added to the posterior samples.
        seed: Seed of the initialisation and the minibatches.
        checkpoint_every: Steps between checkpoints.

    Examples::

        config = InvarianceConfig(n_blocks=12, hidden=512, steps=5000, schedule="cosine")
        inns = fit_invariances(model, ["layer2", "layer4"], ae, images, config, checkpoint_dir="inns")
        inn = fit_invariances(model, "layer4", ae, images, steps=5000)   # or override single fields
    """

    n_blocks: int = 8
    hidden: int = 256
    depth: int = 2
    embed_dim: int = 64
    conv_width: int = 32
    conv_max_width: int = 128
    conv_patch_to: Optional[int] = 8
    token_dim: Optional[int] = 16
    clamp: float = 1.0
    steps: int = 2000
    batch_size: int = 128
    lr: float = 5e-4
    schedule: str = "constant"
    code_noise: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500


#: File name of the feature cache that :func:`fit_invariances` keeps in ``checkpoint_dir``.
CACHE_FILE = "features.safetensors"
#: Folder of the on-disk feature cache (``memmap=True``) in ``checkpoint_dir``.
CACHE_DIR = "features"


def checkpoint_name(layer: str) -> str:
    """File name of a layer's INN checkpoint, e.g. ``invariance_layer3.1.relu.safetensors``.

    Args:
        layer: The layer's dotted name; characters other than letters, digits, ``_``, ``.`` and
            ``-`` become ``_``.

    Returns:
        The file name (without folder) that ``fit_invariances(checkpoint_dir=...)`` writes.

    Examples::

        >>> checkpoint_name("layer3.1.relu"), checkpoint_name("")
        ('invariance_layer3.1.relu.safetensors', 'invariance_model.safetensors')
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", layer) or "model"
    return f"invariance_{safe}.safetensors"


#: Rows of a layer that initialise an INN's embedder statistics and ActNorms, and the memory they may take.
_INIT_ROWS, _MIN_INIT_ROWS, _INIT_BYTES = 1024, 64, 256 * 2**20


def _build(cache: FeatureCache, name: str, config: InvarianceConfig, device: torch.device) -> ConditionalINN:
    """A fresh INN for one cached layer, its weights drawn; :func:`_initialise` then sets it up from the data.

    Warns here, in the caller's thread, when the layer hardly varies (a warning from a fit's thread
    would point at no line of the caller's)."""
    # only the weight initialisation draws from the global RNG; float32 under any default dtype
    with seeded_global_rng(config.seed, torch.float32):
        inn = ConditionalINN(
            cache.latent_dim, cache.layer_shape(name), n_blocks=config.n_blocks, hidden=config.hidden,
            depth=config.depth, embed_dim=config.embed_dim, clamp=config.clamp, seed=config.seed,
            conv_width=config.conv_width, conv_max_width=config.conv_max_width, conv_patch_to=config.conv_patch_to,
            token_dim=config.token_dim,
        ).to(device)
    # the rows are gathered again by _initialise (a fit's thread on the CPU), not kept: several layers'
    # rows (up to _INIT_BYTES each) would otherwise wait in memory at once
    _warn_if_constant(cache.rows(name, _init_rows(cache, name, config)), name)
    return inn


def _init_rows(cache: FeatureCache, name: str, config: InvarianceConfig) -> Tensor:
    """The rows that initialise an INN: up to 1024, fewer for a large layer (a 64×56×56 map: 0.8 GB
    for 1024), at least 64."""
    row_bytes = 4 * math.prod(cache.layer_shape(name))
    n_init = min(_INIT_ROWS, max(_MIN_INIT_ROWS, _INIT_BYTES // max(1, row_bytes)))
    return torch.randperm(len(cache), generator=torch.Generator().manual_seed(config.seed))[:n_init]


def _initialise(inn: ConditionalINN, cache: FeatureCache, name: str, config: InvarianceConfig,
                device: torch.device) -> None:
    """Set an INN's embedder statistics and ActNorms from the data. Draws from no global generator,
    so fits side by side on the CPU run it in their own threads."""
    init = _init_rows(cache, name, config)
    init_conditions = cache.rows(name, init).to(device)
    inn.embedder.set_input_statistics(init_conditions)
    with torch.no_grad(), full_precision(device):  # ActNorm's data-dependent initialisation, on a large real batch
        init_gen = torch.Generator().manual_seed(config.seed)
        codes = cache.sample_codes(init, init_gen)
        if config.code_noise > 0:
            # the codes the fit trains on: without the noise, a constant code unit (a deterministic encoder's dead
            # unit) got ActNorm scales of ~100 per block, which blew the training noise up (losses of 1e12, no NaN)
            codes = codes + config.code_noise * torch.randn(codes.shape, generator=init_gen, dtype=torch.float32).to(codes)
        inn(codes.to(device, inn.dtype), init_conditions)


# a unit's spread in fewer float32 steps than this (of its size) is mostly rounding for the INN
_RESOLVED_STEPS = 16


def _warn_if_constant(conditions: Tensor, name: str) -> None:
    """Warn when a layer gives (almost) the same activations for every image: a collapsed or
    untrained model. The INN then finds that the layer ignores everything, which is true but
    rarely what was meant to be explained."""
    # each unit's spread against its own mean size, floored at the median unit's: against the layer's mean,
    # a few large (near-)constant units (1e4, a batch norm with a large shift) made a varying layer look
    # constant; against its own alone, one unit of a collapsed head whose bias is near 0 hid the collapse.
    # Sums by blocks, no whole copy of the rows (past _INIT_BYTES with temporaries); in float32, a fifth of
    # the time of float64 sums and torch's std over a 64×16×16 map's 1024 rows and precise enough for a 1e-3
    # threshold; in float64 for a float64 layer, or where a float32 sum overflowed (units near 1e35).
    # Deviations in units of their floor, so that their squares stay in range on any scale (1e-20 too)
    flat = conditions.detach().flatten(1)
    n, blocks = flat.shape[0], flat.split(max(1, 2**22 // max(1, flat.shape[1])))
    for total in (torch.float64,) if flat.dtype == torch.float64 else (torch.float32, torch.float64):
        sizes = sum(block.abs().sum(0, dtype=total) for block in blocks) / n
        mean = sum(block.sum(0, dtype=total) for block in blocks) / n
        if torch.isfinite(sizes).all() and torch.isfinite(mean).all():
            break
    floor = torch.maximum(sizes, sizes.median()).clamp_min(1e-30)
    squares = sum(((block.to(total) - mean) / floor).square_().sum(0) for block in blocks)
    largest = float((squares.double() / max(1, n - 1)).sqrt().max())
    if n > 1 and largest < 1e-3:
        # the embedder standardises each unit, so a flat layer's variation is read as long as float32 resolves
        # it: 5 + 1e-4 * logits fitted as the logits do; 5 + 1e-6 * logits kept the prediction 0.50 (0.61)
        effect = (f"float32 resolves it in fewer than {_RESOLVED_STEPS} steps, so the INN reads almost none of it and "
                  "its invariance maps will say the layer ignores everything"
                  if largest < _RESOLVED_STEPS * torch.finfo(torch.float32).eps else
                  "the INN still reads this variation (each unit is standardised), but a layer this flat usually "
                  "means a problem; if its offset is by design, ignore this warning")
        warnings.warn(
            f"Layer {name!r} gives almost the same activations for every image (largest spread of a unit across "
            f"images {largest:.1e} of its mean size, or of the median unit's where that is larger): {effect}. Check "
            "that the model is trained, its batch norms' running statistics too (torchvision's MobileNetV3 and "
            "EfficientNet update them with momentum 0.01, so a short training leaves them near their start), "
            "and that the images are what it expects (size, normalisation).",
            UserWarning, stacklevel=user_stacklevel(),  # the caller of fit_invariances
        )


def _train(
    inn: ConditionalINN, cache: FeatureCache, name: str, config: InvarianceConfig, device: torch.device,
    checkpoint: Optional[str], resume: bool, progress: bool, callback: Optional[Callable[[int, nn.Module], None]] = None,
    source: str = "",
) -> ConditionalINN:
    fit_info = {
        "layer": name, "layer_shape": list(cache.layer_shape(name)), "latent_dim": cache.latent_dim,
        "model_class": cache.model_class,
    }
    # the features' source: a checkpoint of an INN fitted to another model's features is refused
    meta = {"kind": "invariance_inn",
            "config": {"inn": inn.config, "train": resume_key(asdict(config)), **fit_info, "source": source}}
    if cache.layer_inputs:  # only then, so checkpoints of fits on outputs resume across versions
        meta["config"]["layer_inputs"] = True
    if _selector_in_config(cache.selectors.get(name), checkpoint if resume else None):
        meta["config"]["selector"] = cache.selectors[name]
    # beside the config (not compared on resume): what load_invariance_inn gives the explainers
    fit_info.update({"attribute_to_layer_input": cache.layer_inputs,
                     "autoencoder_weights": cache.autoencoder_weights or None,
                     "model_weights": cache.model_weights or None, "model_buffers": list(cache.model_buffers) or None,
                     "steps": config.steps, "code_noise": config.code_noise})
    if name in cache.selectors:  # how the explainers pick the layer's tensor (caches from before: unknown)
        fit_info["selector"] = cache.selectors[name]
    if cache.image_input:  # where the explainers find the images among the inputs, unless told otherwise
        fit_info["image_input"] = cache.image_input
    meta["fit_info"] = fit_info
    n = len(cache)
    batch = local_batch_size(config.batch_size, n)

    def batch_fn(generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        index = torch.randint(n, (batch,), generator=generator)
        codes = cache.sample_codes(index, generator)
        if config.code_noise > 0:
            codes = codes + config.code_noise * torch.randn(codes.shape, generator=generator, dtype=torch.float32).to(codes)
        # the INN trains in its own dtype (float32) whatever the network's; embed casts the conditions
        return codes.to(device, inn.dtype), cache.rows(name, index).to(device)

    def loss_fn(codes: Tensor, condition: Tensor) -> Tensor:
        v, logdet = inn(codes, condition)
        return (0.5 * v.pow(2).sum(1) - logdet).mean() / cache.latent_dim

    history = train_loop(
        inn, loss_fn, batch_fn=batch_fn, steps=config.steps, lr=config.lr, schedule=config.schedule, seed=config.seed,
        checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, resume=resume, meta=meta, progress=progress,
        desc=f"INN {name}", callback=callback,
    )
    inn.fit_info = {**fit_info, "final_nll_per_dim": final_loss(history)}
    inn.history = history
    return inn


# layers trained at once on a CUDA device by default; each holds two of torch's 32 pooled streams
# (own_stream: its thread's, and its captured steps')
MAX_CUDA_WORKERS = 8


def _auto_workers(workers: Optional[int], n_layers: int, device: torch.device) -> int:
    if workers is not None:
        return workers
    if world(device)[1] > 1:
        return 1  # ranks must issue their collectives in one order
    if device.type == "cuda" and cuda_graphs_by_default() and not torch.version.hip:
        # captured steps on their own streams overlap (ROCm pools as few as 3 streams: one at a time there)
        return min(n_layers, MAX_CUDA_WORKERS)
    if device.type != "cpu":
        return 1  # other accelerators queue their own work
    return max(1, min(n_layers, torch.get_num_threads()))


def _checkpoint_step(path: Optional[str], steps: int) -> int:
    """The steps a layer's checkpoint holds (read from its header; 0 without one), at most ``steps``."""
    step = (read_header(path) or {}).get("step")
    return min(step, steps) if isinstance(step, int) and not isinstance(step, bool) and step > 0 else 0


def _fit_layers(cache: FeatureCache, names: Sequence[str], configs: Mapping[str, InvarianceConfig],
                device: torch.device, checkpoint_dir: Optional[str], resume: bool, progress: bool,
                workers: int, source: str) -> Dict[str, ConditionalINN]:
    """Train one INN per layer, ``workers`` at a time, under one progress bar when concurrent.

    ``source``: fingerprint of what the features came from, recorded in the checkpoints."""
    paths = {n: str(Path(checkpoint_dir) / checkpoint_name(n)) if checkpoint_dir else None for n in names}
    built = {n: _build(cache, n, configs[n], device) for n in names}  # in order: the global RNG is not thread-safe
    # initialised from the data in the fits' threads on the CPU, side by side; here, one after another, elsewhere
    # (each initialisation's rows, up to _INIT_BYTES, would be on the device at once)
    in_threads = device.type == "cpu" and workers > 1 and len(names) > 1
    if not in_threads:
        for n in names:
            _initialise(built[n], cache, n, configs[n], device)
    if workers <= 1 or len(names) <= 1:
        return {n: _train(built[n], cache, n, configs[n], device, paths[n], resume, progress, source=source) for n in names}
    # the steps that checkpoints already hold count as done: a finished layer takes no step to report
    done = {n: _checkpoint_step(paths[n], configs[n].steps) if resume else 0 for n in names}
    bar = tqdm(total=sum(configs[n].steps for n in names), initial=sum(done.values()),
               desc=f"INNs for {len(names)} layers ({workers} at a time)", disable=not progress, leave=False)
    lock = threading.Lock()
    # the INNs were built and initialised on the caller's current stream (read here: it is per thread)
    caller = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def task_for(name: str) -> Callable[[Callable[[], None]], ConditionalINN]:
        def task(check: Callable[[], None]) -> ConditionalINN:
            def after_step(step: int, module: nn.Module) -> None:
                with lock:
                    done[name] = step
                    bar.n = sum(done.values())
                    if step % 10 == 0:
                        bar.refresh()
                check()
            if in_threads:
                _initialise(built[name], cache, name, configs[name], device)
            if device.type != "cuda":
                return _train(built[name], cache, name, configs[name], device, paths[name], resume, False, after_step, source)
            # the current stream is per thread: this fit's own, done before another stream reads the INN
            with own_stream(device) as stream, running_on(stream, device, caller):
                return _train(built[name], cache, name, configs[name], device, paths[name], resume, False,
                              after_step, source)
        return task

    try:
        results = run_concurrently([task_for(n) for n in names], workers)
    except KeyboardInterrupt as interrupt:
        # each fit in training wrote the step it had finished (train_loop on FitCancelled); Python's bare
        # interrupt said nothing of it
        saved = [paths[n] for n in names if paths[n] is not None and Path(paths[n]).exists()]
        if str(interrupt) or not saved:
            raise
        raise KeyboardInterrupt(f"INNs for {len(names)} layers stopped, each after a whole step, which its checkpoint "
                                f"holds ({', '.join(saved)}): run the same call again to resume.") from None
    finally:
        bar.close()
    return dict(zip(names, results))


@autograd_on
@warnings_from_rank_zero()
def fit_invariances(
    model: nn.Module,
    layers: Union[str, nn.Module, Sequence[Union[str, nn.Module]]],
    autoencoder: Any = None,
    data: Any = None,
    config: Optional[InvarianceConfig] = None,
    *,
    cache: Optional[FeatureCache] = None,
    device: Union[str, torch.device] = "cpu",
    checkpoint_dir: Optional[str] = None,
    resume: bool = True,
    progress: bool = True,
    layer_overrides: Optional[Mapping[Union[str, nn.Module], Mapping[str, Any]]] = None,
    memmap: bool = False,
    workers: Optional[int] = None,
    attribute_to_layer_input: bool = False,
    selector: Any = None,
    additional_forward_args: Any = None,
    image_input: int = 0,
    **overrides: Any,
) -> Union[ConditionalINN, Dict[str, ConditionalINN]]:
    """Fit the conditional INN ``t(z̄ | Φ(x))`` of one or several hooked layers.

    Args:
        model: The analysed network (frozen; run in eval mode, its mode restored).
        layers: One layer or a list (modules or dotted names such as ``"layer3.1.relu"``).
        autoencoder: Gives the codes ``z̄`` (``encode``/``decode``); shared by all layers.
        data: Training images (tensor, ``Dataset`` or ``DataLoader``); read once for all layers.
        config: Architecture and optimisation (:class:`InvarianceConfig`); keyword ``overrides``
            replace fields.
        cache: A precomputed :func:`~captum_inn.training.cache_features` result (then
            ``autoencoder`` and ``data`` are not needed).
        device: Where the INNs train.
        checkpoint_dir: Folder for one checkpoint per layer (:func:`~captum_inn.training.invariances.checkpoint_name`) and the
            feature cache, when computed here (``features.safetensors``; with ``memmap=True`` the
            folder ``features/``; under ``torchrun`` one per process, ``features.rank{r}of{n}...``);
            existing checkpoints and the cache are reused when ``resume``, so a resumed fit neither
            reruns the network nor changes its data.
        resume: Continue from existing checkpoints.
        progress: Show progress bars.
        layer_overrides: ``{layer: {field: value}}`` with layers by name or module: settings for
            single layers on top of ``config`` and ``overrides`` (e.g. a lower learning rate for a
            low-dimensional layer).
        memmap: Keep the feature cache on disk (``checkpoint_dir/features/``, or a temporary
            folder without ``checkpoint_dir``) and read minibatches from it, so memory does not
            grow with the dataset (see :func:`~captum_inn.training.cache_features`).
        workers: How many layers' INNs train at the same time, each on an equal share of torch's
            CPU threads. ``None``: on the CPU, as many as there are layers and threads (an INN step
            is many small ops that leave a second core idle; several fits side by side finish
            sooner); on a CUDA device with captured steps
            (:func:`~captum_inn.training.loop.cuda_graphs_by_default`), up to 8 layers at once,
            each on streams of its own, where their replays overlap (at most 16); otherwise one at a time on
            accelerators, and under ``torchrun`` (where more than 1 is refused: the processes must
            all-reduce their gradients in one order).
            Each fit computes the same either way; only the thread count differs, which changes
            floating-point rounding (over thousands of steps: a different, equally good fit).
        attribute_to_layer_input: Fit on the layers' inputs instead of their outputs (recorded in
            ``fit_info``; :class:`~captum_inn.LayerInvariance` reads the same side by default).
        selector: Picks the tensor from a non-tensor layer output (see
            :class:`~captum_inn.capture.LayerHooks`; a dict ``{layer name: selector}`` sets one per layer).
            Recorded in ``fit_info["selector"]`` (a callable by its name); the explainers read with it.
        additional_forward_args: Extra arguments of ``model.forward`` after the images
            (``model(images, *additional_forward_args)``). A tensor with one row per image of
            ``data`` is per image (each batch of the feature pass gets its rows, and under torchrun
            each process its shard's); any other value is passed whole to every batch.
        image_input: Where the images go among the model's arguments, for a model that takes them
            after others (``forward(scale, x)``: ``image_input=1``, ``additional_forward_args=(scale,)``);
            the explainers take ``image_input`` for the same model.
        **overrides: Fields of :class:`InvarianceConfig`.

    Returns:
        The fitted :class:`~captum_inn.inn.ConditionalINN` (eval mode) for a single layer, or
        ``{layer name: INN}`` for a list. Each INN carries ``fit_info`` (layer, layer shape, latent
        size, model class, whether the layer's input was read, the selector, the ``weights_fingerprint`` of
        the autoencoder and of the model, steps, final NLL per dimension: the mean loss of the last
        steps, without the constant ½·log 2π) and ``history``.

    Raises:
        ValueError: bad settings, each named (a layer listed twice, ``layer_overrides`` for a layer
            not fitted, ``workers`` < 1, read settings together with ``cache=``, a layer with one
            number per image, fewer than 2 images, neither ``cache`` nor ``autoencoder`` and
            ``data``), NaN or infinite pixels or features, and data the network refuses
            (the message explains what the data loader gave).
        TypeError: images of another dtype than the network's.
        CheckpointError: ``resume`` found a checkpoint or feature cache of another configuration,
            layer side, model, autoencoder or set of images (the message says which; pass
            ``resume=False`` or another ``checkpoint_dir``).
        FloatingPointError: the loss became NaN or infinite; the last checkpoint is left intact.

    Examples::

        >>> from captum_inn.autoencoders import ConvAutoencoder
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
        >>> ae = ConvAutoencoder((3, 8, 8), latent_dim=6)
        >>> inns = fit_invariances(model, ["1", "3"], ae, torch.rand(64, 3, 8, 8), steps=3,
        ...                        n_blocks=2, hidden=16, progress=False)
        >>> sorted(inns), inns["3"].fit_info["layer_shape"]
        (['1', '3'], [10])
    """
    config = merged_config(InvarianceConfig, config, overrides)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1):
        raise ValueError(f"`workers` must be a positive int (or None for automatic), got {workers!r}.")
    workers = None if workers is None else int(workers)  # NumPy ints, as batch_size takes them
    if workers is not None and workers > 16 and as_device(device).type == "cuda":
        raise ValueError(f"`workers`={workers} on {device}: each layer trained at once holds two of torch's 32 pooled "
                         f"CUDA streams; pass at most 16 (the default is up to {MAX_CUDA_WORKERS}).")
    if world(device)[1] > 1 and workers is not None and workers > 1:  # also joins torchrun's process group
        raise ValueError(f"`workers`={workers} under torchrun: the processes must issue their gradient all-reduces "
                         "in one order, so their layers train one after another; leave `workers` out (or pass 1).")
    if cache is None:  # the features come from these networks: every process must compute them alike
        check_replicas_agree({"model": model, "autoencoder": autoencoder})
    single = not isinstance(layers, (list, tuple))
    layer_list = [layers] if single else list(layers)
    if not layer_list:  # before a memory-mapped cache's folder and lock are made
        raise ValueError("`layers` is empty; pass a layer (module or dotted name) or a list of them.")
    resolved = [resolve_layer(model, layer) for layer in layer_list]
    names = [name for name, _ in resolved]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"`layers` lists layer {twice[0]!r} more than once (by name or module); list each layer once.")
    if cache is not None:
        if not isinstance(cache, FeatureCache):
            raise TypeError(f"`cache` must be a FeatureCache from cache_features (or FeatureCache.load / .open), "
                            f"got {type(cache).__name__}.")
        _check_cache_model(cache, model)
        if autoencoder is not None and cache.autoencoder_weights \
                and weights_fingerprint(autoencoder) != cache.autoencoder_weights:  # the explainer refused it later
            raise ValueError("`autoencoder` is another one than the cache's codes came from; with `cache=` leave it "
                             "out, or pass the one given to cache_features.")
        if data is not None:  # was ignored silently: the fit used the cache's images, not these
            raise ValueError("`data` and `cache` were both given; the fit reads the cache's features only. Leave `data` "
                             "out, or pass the images to cache_features to make a cache of them.")
    for flag, value in (("attribute_to_layer_input", attribute_to_layer_input), ("resume", resume), ("memmap", memmap)):
        if not isinstance(value, (bool, np.bool_)):  # "no" read the layers' inputs, resumed or memory-mapped
            raise TypeError(f"`{flag}` must be True or False, got {value!r}.")
    read = {k: v for k, v in (("selector", selector), ("additional_forward_args", additional_forward_args)) if v is not None}
    if attribute_to_layer_input:
        read["attribute_to_layer_input"] = True
    if check_image_input(image_input):  # 0, the default, is no read setting (it is allowed beside `cache`)
        read["image_input"] = image_input
    caching = [*read, "memmap"] if memmap else list(read)
    if cache is not None and caching:
        raise ValueError(f"{', '.join(f'`{k}`' for k in caching)} only appl{'ies' if len(caching) == 1 else 'y'} while "
                         "features are cached; with `cache=` pass them to cache_features, which made the cache "
                         "(memmap_dir= there).")
    with contextlib.ExitStack() as stack:
        # keyed by name or module, as `layers` is (one layer given both ways would keep one silently)
        keys = [resolve_layer(model, k)[0] if isinstance(k, nn.Module) else k for k in dict(layer_overrides or {})]
        twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
        if twice:
            raise ValueError(f"`layer_overrides` gives layer {twice[0]!r} twice (by name and by module); give each once.")
        layer_overrides = dict(zip(keys, dict(layer_overrides or {}).values()))
        unknown = sorted(set(layer_overrides) - set(names), key=str)
        if unknown:  # before the pass over the data, which may take long
            raise ValueError(f"`layer_overrides` names layers {unknown} that are not fitted here ({names}).")
        for layer, settings in layer_overrides.items():
            if not isinstance(settings, Mapping):
                raise TypeError(f"`layer_overrides[{layer!r}]` must be a dict of settings, e.g. {{'steps': 500}}, "
                                f"got {type(settings).__name__}.")
        if checkpoint_dir:  # "" and "model", "conv 1" and "conv_1", or "Conv" and "conv" (case-insensitive file
            # systems: macOS, Windows) would share one file
            files = [checkpoint_name(n).casefold() for n in names]
            shared = sorted({f for f in files if files.count(f) > 1})
            if shared:
                clash = [n for n in names if checkpoint_name(n).casefold() == shared[0]]
                raise ValueError(f"Layers {clash} would share the checkpoint file {shared[0]!r} in `checkpoint_dir` (names are "
                                 "compared ignoring case, as macOS and Windows do); fit them in separate calls, each "
                                 "with its own checkpoint_dir.")
        configs = {n: merged_config(InvarianceConfig, config, layer_overrides.get(n, {})) for n in names}
        if checkpoint_dir:  # an unusable folder (a file, read-only) is named before the pass over the data
            for n in names:
                path = Path(checkpoint_dir) / checkpoint_name(n)
                if not (resume and finished_checkpoint(path, configs[n].steps)):  # reading needs no writing
                    check_checkpoint_path(path, name="checkpoint_dir")
        if checkpoint_dir and resume:  # every layer's, before the pass over the data and any training
            _check_checkpoints(checkpoint_dir, configs)
        given = cache is not None
        with raising_together():  # each process caches and checks its own shard of the data
            cache = _cache_for(model, layer_list, names, autoencoder, data, cache, checkpoint_dir, resume, memmap,
                               device, progress, stack, read)
            missing = [n for n in names if n not in cache.layers]
            if missing:
                raise ValueError(f"The cache holds layers {sorted(cache.layers)}, not {missing}; cache them first.")
            scalar = [n for n in names if not tuple(cache.layer_shape(n))]
            if scalar:
                raise ValueError(f"Layer {scalar[0]!r} gives one number per image (shape (N,)); an INN is conditioned "
                                 "on a vector or a map per image: pick a layer of shape (N, D) or (N, C, H, W).")
            cache.check_finite(names)
            if len(cache) < 2:
                raise ValueError(f"Fitting needs at least 2 training images, the cache holds {len(cache)}." if world()[1] == 1
                                 else f"Fitting needs at least 2 training images per process, this process's cache "
                                 f"holds {len(cache)}: pass more images or start fewer processes.")
            n_images = len(cache) * world()[1]  # each process holds its shard
            if n_images < cache.latent_dim:  # e.g. a batch to explain passed where the training set belongs
                warnings.warn(
                    f"The INNs are fitted to {n_images} images, fewer than the autoencoder's {cache.latent_dim} code "
                    "dimensions: they can learn these images rather than what varies among images, and their samples "
                    "and maps then say little. Pass the training set (thousands of images).",
                    UserWarning, stacklevel=user_stacklevel())
        device = torch.device(device)
        inns = _fit_layers(cache, names, configs, device, checkpoint_dir, resume, progress,
                           _auto_workers(workers, len(names), device), _checkpoint_source(model, autoencoder, data, cache, given))
    return inns[names[0]] if single else inns


def _check_checkpoints(checkpoint_dir: str, configs: Mapping[str, InvarianceConfig]) -> None:
    """Refuse, for all layers at once, checkpoints in ``checkpoint_dir`` of other training settings
    (the rest of a checkpoint's record is compared when its layer's fit starts)."""
    for name, config in configs.items():
        check_resumable_early(Path(checkpoint_dir) / checkpoint_name(name), "invariance_inn",
                              resume_key(asdict(config)), config.steps, "checkpoint_dir")


def _checkpoint_source(model: nn.Module, autoencoder: Any, data: Any, cache: FeatureCache, given: bool) -> str:
    """What the checkpoints record as the features' source: the model, autoencoder and images as a
    whole, so that a fit resumes with another number of processes (each caches another shard)."""
    if given or autoencoder is None or data is None:  # a cache made elsewhere: every process's own
        return "+".join(gather_texts(cache.source))
    if world()[1] == 1:
        return cache.source  # computed from all of `data` (or reused: then checked against it)
    return source_fingerprint(model, autoencoder, data)


def _selector_in_config(selector: Any, resumed: Optional[str]) -> bool:
    """Whether an INN checkpoint's config records the (int/str) ``selector``, so that a resume
    refuses features picked by another one. Not where the checkpoint being ``resumed`` lacks it and
    records the same selector, or none at all (an earlier version's: it would no longer resume)."""
    if selector is None or not is_comparable_selector(selector):
        return False
    saved = read_header(resumed)
    if saved is None or "selector" in saved["config"]:
        return True
    recorded = (saved.get("fit_info") or {}).get("selector", selector)
    return recorded != selector  # another one (or a callable): recorded, so the resume refuses it


def _check_cached_selectors(cache: FeatureCache, where: Any, asked: Mapping[str, Any]) -> None:
    """Refuse a reused cache whose layers were picked with another selector than ``asked`` (two
    callables cannot be compared and pass)."""
    for name, selector in asked.items():
        if name not in cache.selectors:
            continue  # a cache from before selectors were recorded
        cached, now = cache.selectors[name], selector_record(selector)
        if not (is_comparable_selector(cached) or is_comparable_selector(now)) or cached == now:
            continue
        raise CheckpointError(
            f"The feature cache {str(where)!r} read layer {name!r} with {_selector_text(cached)}, not "
            f"{_selector_text(now)}; pass the same selector, or resume=False to start afresh there."
        )


def _selector_text(record: Any) -> str:
    """A recorded selector in words, for error messages."""
    if record is None:
        return "no selector"
    return f"the callable selector {record['callable']}" if not is_comparable_selector(record) else f"selector={record!r}"


def _check_cache_model(cache: FeatureCache, model: nn.Module) -> None:
    """``ValueError`` when ``cache`` was computed from another model than ``model``: the fit trained on
    the other's features, recorded its weights, and the explainer for ``model`` then refused the INN.
    A cache without the record (an earlier version's) is taken."""
    recorded = cache.model_weights
    if recorded and isinstance(model, nn.Module) and weights_fingerprint(model) != recorded:
        raise ValueError(
            f"`cache` was computed from another model than `model` (other weights: another seed, retrained, or "
            f"another architecture{'' if cache.model_class == class_name(model) else f': {cache.model_class}'}); "
            "pass the model it was computed from, or cache this one's features with cache_features(model, ...)."
        )


def _cache_for(model, layer_list, names, autoencoder, data, cache, checkpoint_dir, resume, memmap, device, progress,
               stack: contextlib.ExitStack, read: Dict[str, Any]) -> FeatureCache:
    """The given cache, the one a resumed fit left in ``checkpoint_dir``, or a fresh one (saved there).

    ``read``: how :func:`~captum_inn.training.cache_features` reads the layers (hook inputs,
    selector, extra forward arguments)."""
    if cache is not None:
        return cache
    rank, n_ranks = world(device)
    # under torchrun each process caches its shard, which depends on the number of processes: a resume
    # with another number read a shard of other images and was refused
    suffix = f".rank{rank}of{n_ranks}" if n_ranks > 1 else ""
    if "additional_forward_args" in read and data is not None:  # per-image tensors follow the images there
        read = {**read, "additional_forward_args": shard_forward_args(read["additional_forward_args"],
                                                                       count_images(data))}
    reused, where = None, None
    if memmap:
        folder = (Path(checkpoint_dir) / f"{CACHE_DIR}{suffix}" if checkpoint_dir
                  else Path(stack.enter_context(tempfile.TemporaryDirectory())))
        reused, where = (FeatureCache.open(folder) if resume else None), folder
        if reused is not None:
            stack.callback(reused.close)
    else:
        cache_path = Path(checkpoint_dir) / CACHE_FILE.replace(".", f"{suffix}.", 1) if checkpoint_dir else None
        if resume and cache_path is not None and cache_path.exists():
            reused, where = FeatureCache.load(cache_path), cache_path
    if reused is not None and set(names) <= set(reused.layers) \
            and reused.layer_inputs != bool(read.get("attribute_to_layer_input", False)):
        raise CheckpointError(
            f"The feature cache {str(where)!r} holds the layers' {'inputs' if reused.layer_inputs else 'outputs'}, "
            f"not their {'outputs' if reused.layer_inputs else 'inputs'}; pass "
            f"attribute_to_layer_input={reused.layer_inputs}, or resume=False to start afresh there."
        )
    if reused is not None and set(names) <= set(reused.layers):
        asked = per_layer_selectors(model, names, read.get("selector"))
        _check_cached_selectors(reused, where, asked)
        asked_args = forward_args_fingerprint(read.get("additional_forward_args"), read.get("image_input", 0))
        if reused.forward_args and reused.forward_args != asked_args:  # "": a cache from before it was recorded
            raise CheckpointError(
                f"The feature cache {str(where)!r} was computed with other `additional_forward_args` than the "
                "ones given now, so it holds other features; pass the same ones, or resume=False to start "
                "afresh there."
            )
        if not reused.selectors:  # an earlier version's cache: the INNs record the selector asked for
            reused.selectors = {name: selector_record(selector) for name, selector in asked.items()}
        # a resumed fit continues on the very same features, unless what they came from changed
        if reused.source and autoencoder is not None and data is not None:
            changed = source_changes(reused, model, autoencoder, shard_data(data))
        else:  # without the images, the networks at least: another model or autoencoder was taken silently
            changed = " and ".join(f"the {what}" for what, recorded, given in (
                ("model", reused.model_weights, model), ("autoencoder", reused.autoencoder_weights, autoencoder))
                if recorded and given is not None and recorded != weights_fingerprint(given))
        if changed:
            raise CheckpointError(
                f"The feature cache {str(where)!r} was computed from another model, autoencoder or set of "
                f"images than the ones given now (what differs: {changed}), so the checkpoints in "
                "`checkpoint_dir` do not belong to them; pass resume=False to start afresh there, or use "
                "another `checkpoint_dir`."
            )
        return reused
    if reused is not None:  # it lacks a layer: its files are replaced now, and must not stay open (Windows)
        reused.close()
    if autoencoder is None or data is None:
        raise ValueError("Pass `autoencoder` and `data` (or a precomputed `cache`).")
    cache = cache_features(model, layer_list, autoencoder, shard_data(data), device=device,
                           progress=progress and rank == 0, memmap_dir=folder if memmap else None, **read)
    if memmap:  # its files close when the fit ends (before a temporary folder is removed)
        stack.callback(cache.close)
    elif cache_path is not None:
        cache.save(cache_path)
    return cache


def save_invariance_inn(path: str, inn: ConditionalINN) -> Path:
    """Save a fitted INN (weights, architecture, layer description) to one safetensors file.

    Args:
        path: Target ``.safetensors`` file (written atomically).
        inn: A fitted INN with ``fit_info`` (as returned by :func:`fit_invariances`).

    Returns:
        The path written.

    Examples::

        inn = fit_invariances(model, "layer4", ae, images)
        save_invariance_inn("layer4.safetensors", inn)
    """
    if isinstance(path, nn.Module):  # said "`inn` has no fit_info" of the path
        raise TypeError(f"save_invariance_inn takes (path, inn), the path first; got a {type(path).__name__} as `path`.")
    if not isinstance(inn, ConditionalINN):  # a FactorINN failed with a bare KeyError: 'layer_shape'
        hint = "; save a FactorINN with save_concept_inn" if isinstance(inn, FactorINN) else ""
        raise TypeError(f"`inn` must be a ConditionalINN from fit_invariances, got {type(inn).__name__}{hint}.")
    if not inn.is_fitted:  # its ActNorms never saw data: the file would hold an INN every explainer refuses
        raise ValueError("`inn` is not fitted (its ActNorm layers never saw data); fit it with fit_invariances first.")
    info = getattr(inn, "fit_info", None)
    if info is None:
        raise ValueError("`inn` has no `fit_info`; save INNs returned by fit_invariances.")
    missing = [key for key in ("layer", "layer_shape", "latent_dim", "model_class") if key not in info]
    if missing:
        raise ValueError(f"`inn.fit_info` lacks {missing}; save INNs returned by fit_invariances.")
    # the header is what load_invariance_inn checks: one that contradicts the weights refused the right layer
    shape = info["layer_shape"]  # an int is a vector layer's size, as ConditionalINN and the loader take it
    if (list(shape) if isinstance(shape, (list, tuple)) else [shape]) != list(inn.cond_shape) or info["latent_dim"] != inn.dim:
        raise ValueError(f"`inn.fit_info` says layer shape {tuple(info['layer_shape'])} and codes of size "
                         f"{info['latent_dim']}, but the INN takes {tuple(inn.cond_shape)} and {inn.dim}; save the "
                         "fit_info that fit_invariances gave it.")
    meta = {"kind": "invariance_inn", "config": {"inn": inn.config, **{k: info[k] for k in ("layer", "layer_shape", "latent_dim", "model_class")}}, "fit_info": info}
    return save_checkpoint(path, module_tensors(inn), meta)


def load_invariance_inn(
    path: str,
    *,
    layer_shape: Optional[Sequence[int]] = None,
    latent_dim: Optional[int] = None,
    map_location: Union[str, torch.device] = "cpu",
) -> ConditionalINN:
    """Load a fitted INN, refusing one for another layer shape or latent size before any computation.

    Args:
        path: A file from :func:`save_invariance_inn` or a ``fit_invariances`` checkpoint.
        layer_shape: Expected per-sample activation shape of the hooked layer.
        latent_dim: Expected size of the autoencoder's code.
        map_location: Device of the loaded INN.

    Returns:
        The INN in eval mode with ``fit_info``.

    Raises:
        CheckpointError: unreadable file, or a layer shape / latent size that does not match.

    Examples::

        inn = load_invariance_inn("layer4.safetensors", layer_shape=(512, 2, 2), latent_dim=64)
        explainer = LayerInvariance(model, "layer4", inn, ae)
    """
    tensors, meta = load_checkpoint(path, kind="invariance_inn", map_location=map_location)
    with building_from(path):
        config = meta["config"]
        saved_shape = tuple(int(size) for size in config["layer_shape"])
        saved_latent = int(config["latent_dim"])
        inn_config = dict(config["inn"])
        inn_config.setdefault("conv_patch_to", None)  # saved before the setting existed: full-resolution embedder
        inn_config.setdefault("token_dim", None)  # likewise: token sequences flattened into an MLP
        info = dict(meta.get("fit_info") or {k: config[k] for k in ("layer", "layer_shape", "latent_dim", "model_class")})
    if isinstance(latent_dim, nn.Module):  # load_concept_inn takes the autoencoder itself: a raw int() error here
        raise TypeError(f"`latent_dim` is a {type(latent_dim).__name__}; pass its size, latent_dim=ae.latent_dim "
                        "(LayerInvariance(model, layer, inn, ae) checks the autoencoder's weights).")
    if latent_dim is not None:
        latent_dim = check_int(latent_dim, "latent_dim")
    if isinstance(layer_shape, numbers.Integral) and not isinstance(layer_shape, bool):  # a vector layer's size
        layer_shape = (layer_shape,)
    if layer_shape is not None:
        if isinstance(layer_shape, (str, bytes)) or not isinstance(layer_shape, (Sequence, torch.Size)):
            raise TypeError(f"`layer_shape` must be the per-sample activation shape as a tuple of ints, such as "
                            f"(512, 2, 2), got {layer_shape!r}.")
        layer_shape = tuple(check_int(size, f"layer_shape[{i}]") for i, size in enumerate(layer_shape))
    if layer_shape is not None and layer_shape != saved_shape:
        raise CheckpointError(
            f"{str(path)!r} was fitted for layer {config.get('layer')!r} with activations of shape {saved_shape}, "
            f"but `layer_shape` is {tuple(layer_shape)}. Fit an INN for the layer of that shape (fit_invariances), "
            "or pass the shape of the layer this INN was fitted for."
        )
    if latent_dim is not None and latent_dim != saved_latent:
        raise CheckpointError(
            f"{str(path)!r} was fitted on autoencoder codes of size {saved_latent}, but this "
            f"autoencoder's codes have size {latent_dim}. Use the autoencoder it was fitted with."
        )
    with building_from(path):  # on the CPU: only the file's settings can fail here
        inn = ConditionalINN(**inn_config)
    load_module_state(inn, tensors, path)
    inn = inn.to(map_location)
    if "train" in config:  # a fit's checkpoint: its config says which side of the layer was read
        info.setdefault("attribute_to_layer_input", bool(config.get("layer_inputs", False)))
        warn_if_unfinished(path, meta.get("step"), info.get("steps"), "fit_invariances", "checkpoint_dir")
    # a fit's checkpoint has its step in the header, a saved INN in its fit_info (an unfinished one's stays so)
    inn.fit_info = {**info, "step": meta.get("step", info.get("step", info.get("steps")))}
    return inn.eval()
