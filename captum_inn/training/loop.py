"""The one training loop behind every ``fit_*`` function: Adam, a progress bar, checkpoints, resume
(``fit_classifier``, which trains the demos' and tests' own models, writes no checkpoint)."""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import fields, replace
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
    TypeVar,
)

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars: tqdm.auto warns in notebooks without ipywidgets

from captum_inn.attr._common import (
    autograd_on,
    check_int,
    check_number,
    check_positive_int,
    user_stacklevel,
)
from captum_inn.capture import check_autograd_weights
from captum_inn.inn.embedders import check_patch_to, check_token_dim
from captum_inn.training.checkpoint import (
    CheckpointError,
    check_checkpoint_path,
    dtype_mismatch,
    finished_checkpoint,
    load_checkpoint,
    load_optimizer,
    module_tensors,
    non_finite_entries,
    optimizer_tensors,
    read_header,
    save_checkpoint,
    strip_prefix,
)
from captum_inn.training.distributed import (
    average_buffers,
    average_gradients,
    check_processes_agree,
    gather_generator_states,
    raising_together,
    sync_module,
    world,
)

__all__ = ["train_loop", "resume_key", "merged_config", "cuda_graphs_by_default", "check_resumable"]

# Settings that may change between a fit and its resumption (train longer, save more often).
_RESUMABLE = ("steps", "checkpoint_every")


# Range rules of the numeric settings shared by the ``*Config`` classes; every int without a rule of
# its own must be >= 1 (sizes, counts, steps) and every other float >= 0 (noise levels, loss weights).
_POSITIVE_FLOATS = ("lr", "clamp")
_SCHEDULES = ("constant", "cosine")


def _check_schedule(value: Any, name: str = "schedule") -> str:
    if value not in _SCHEDULES:
        raise ValueError(f"`{name}` must be 'constant' or 'cosine', got {value!r}.")
    return value


def _check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as a fit's seed, strictly between -2**53 and 2**53, or an error naming ``name``.

    The fits derive further seeds from it (per process, step, block and concept: ``seed * 1009 +
    k``), and those must stay within the 64 bits torch takes; 2**64 failed inside the INN's
    permutation, after the pass over the data.

    Examples::

        >>> _check_seed(7)
        7
    """
    value = check_int(value, name)
    if abs(value) >= 2**53:
        raise ValueError(f"`{name}` must lie strictly between -2**53 and 2**53, got {value}; the fits derive "
                         "further seeds from it (seed * 1009 + k), which must stay within torch's 64 bits.")
    return value


# settings with a rule of their own (a bad schedule is refused before a fit's pass over the data)
_OWN_CHECKS = {"conv_patch_to": check_patch_to, "token_dim": check_token_dim, "schedule": _check_schedule,
               "seed": _check_seed}

_Config = TypeVar("_Config")
T = TypeVar("T")


def merged_config(cls: Type[_Config], config: Optional[_Config], overrides: Mapping[str, Any]) -> _Config:
    """``config`` (or ``cls()``) with ``overrides`` applied, every numeric setting checked.

    Args:
        cls: A settings dataclass such as :class:`~captum_inn.training.InvarianceConfig`.
        config: Base settings, or ``None`` for the defaults.
        overrides: Field values that replace the base ones (the ``**overrides`` of a ``fit_*``).

    Returns:
        A new ``cls`` instance.

    Raises:
        TypeError: an unknown setting, or a value of the wrong type (``batch_size=64.0``).
        ValueError: a value out of range (``steps=0``, ``lr=-1``, ``code_noise=nan``).

    Examples::

        >>> from captum_inn.training import InvarianceConfig
        >>> merged_config(InvarianceConfig, None, {"steps": 50}).steps
        50
        >>> merged_config(InvarianceConfig, None, {"stpes": 50})
        Traceback (most recent call last):
        ...
        TypeError: Unknown setting 'stpes' for InvarianceConfig (did you mean 'steps'?).
    """
    base = cls() if config is None else config
    if not isinstance(base, cls):
        raise TypeError(f"`config` must be an instance of {cls.__name__}, got {type(base).__name__}.")
    names = [f.name for f in fields(cls)]
    for key in overrides:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid settings: {', '.join(names)}"
            raise TypeError(f"Unknown setting {key!r} for {cls.__name__} ({hint}).")
    defaults = cls()
    merged = replace(base, **overrides)
    checked = {f.name: _checked_setting(f.name, getattr(merged, f.name), getattr(defaults, f.name)) for f in fields(cls)}
    return replace(merged, **checked)


def _checked_setting(name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of its numeric ``default`` (NumPy scalars included), or an error if out of range."""
    if name in _OWN_CHECKS:
        return _OWN_CHECKS[name](value, name)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return value
    if isinstance(default, int):
        return check_positive_int(value, name)
    return check_number(value, name, positive=name in _POSITIVE_FLOATS)


# Rank r's minibatch generator is seeded with seed + stride · r (rank 0: the single-process seed).
_RANK_SEED_STRIDE = 1_000_003


def _generator_key(rank: int) -> str:
    return "rng.generator" if rank == 0 else f"rng.generator.{rank}"


def _extra_generator_key(index: int, rank: int = 0) -> str:
    # per rank: a process whose shard is smaller than its share of the batch draws fewer augmentations
    return f"rng.extra.{index}" if rank == 0 else f"rng.extra.{index}.{rank}"


def _global_generator_key(rank: int) -> str:
    return f"rng.global.{rank}"


def _global_seed(seed: int, rank: int, start: int) -> int:
    """The seed of torch's global generators during a fit's steps from ``start`` (dropout draws from
    them): another stream than the minibatch generator's, in torch's 64-bit range."""
    return (int(seed) * 1009 + 0x5EED + _RANK_SEED_STRIDE * rank + start) % 2**64


def _cosine_rate(lr: float, step: int, steps: int) -> float:
    """The cosine schedule's rate at ``step`` of ``steps``: half a cosine from ``lr`` to 1% of it."""
    return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps))))


def _warn_if_schedule_stretched(checkpoint: Any, schedule: str, lr: float, start: int, saved_steps: Any,
                                steps: int) -> None:
    """Warn when a cosine fit resumes with other ``steps`` than the checkpoint's: the rate is a function
    of ``step / steps``, so it jumps at the resume (a finished fit extended restarts near ``lr``)."""
    if schedule != "cosine" or not isinstance(saved_steps, int) or saved_steps == steps or start >= steps:
        return
    before, after = _cosine_rate(lr, start, saved_steps), _cosine_rate(lr, start, steps)
    warnings.warn(
        f"{str(checkpoint)!r} holds {start} steps of a cosine schedule over {saved_steps} steps; this fit's is over "
        f"{steps}, so the rate jumps from {before:.3g} to {after:.3g} at step {start} (a warm restart, not the "
        f"schedule of an uninterrupted fit of {steps} steps). For one smooth schedule, pass resume=False.",
        UserWarning, stacklevel=user_stacklevel(),
    )


def resume_key(config: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a fit's settings that a resumed fit must share with the checkpoint.

    ``steps`` and ``checkpoint_every`` may change between runs (a resume can train longer).

    Args:
        config: The fit's settings as a dict (e.g. ``dataclasses.asdict(config)``).

    Returns:
        ``config`` without the resumable keys.

    Examples::

        >>> resume_key({"steps": 2000, "lr": 0.001, "checkpoint_every": 500})
        {'lr': 0.001}
    """
    return {k: v for k, v in config.items() if k not in _RESUMABLE}


def config_differences(saved: Any, current: Any, prefix: str = "") -> str:
    """The settings in which two (nested) configurations differ, as ``"key: saved -> current"``
    entries (dotted keys for nested dicts), so a refused resume says what changed.

    Examples::

        >>> config_differences({"inn": {"hidden": 32}, "lr": 1e-3}, {"inn": {"hidden": 64}, "lr": 1e-3})
        'inn.hidden: 32 in the checkpoint, 64 now'
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        parts = [config_differences(saved.get(k, "unset"), current.get(k, "unset"), f"{prefix}{k}.")
                 for k in sorted(set(saved) | set(current), key=str) if saved.get(k, "unset") != current.get(k, "unset")]
        return "; ".join(p for p in parts if p)
    if saved == current:
        return ""
    return f"{prefix.rstrip('.') or 'config'}: {saved!r} in the checkpoint, {current!r} now"


def check_resumable(checkpoint: Any, saved_config: Any, config: Any, saved_step: int, steps: int) -> None:
    """Refuse to resume ``checkpoint`` with other settings, or with fewer ``steps`` than it holds.

    Raises:
        CheckpointError: the configurations differ (the message lists what changed).
        ValueError: ``saved_step > steps``.

    Examples::

        >>> check_resumable("fit.safetensors", {"lr": 1e-3}, {"lr": 1e-3}, saved_step=100, steps=200)
    """
    if saved_config != config:
        raise CheckpointError(
            f"Checkpoint {str(checkpoint)!r} was written by a fit with another configuration "
            f"({config_differences(saved_config, config)}); pass resume=False or another path."
        )
    if saved_step > steps:
        raise ValueError(
            f"Checkpoint {str(checkpoint)!r} already holds {saved_step} steps, more than `steps`={steps}; pass "
            f"steps >= {saved_step} to continue it, or resume=False to start afresh."
        )


def check_resumable_early(path: Any, kind: str, train: Mapping[str, Any], steps: int, argument: str = "checkpoint",
                          part: Optional[str] = "train") -> None:
    """Before a fit's pass over its data: :func:`check_resumable` of the checkpoint at ``path`` (if
    any) for its training settings and steps, read from the header alone (the rest of its record is
    compared when the fit starts). ``part``: where the checkpoint's config holds ``train``; ``None``
    for the config itself (its keys of ``train`` are compared)."""
    if path is None or not Path(path).exists():
        return
    saved = read_header(path)
    if saved is None or saved.get("kind") != kind or "step" not in saved:
        _, saved = load_checkpoint(path, kind=kind)  # unreadable or another kind's: its own error
    config = saved.get("config") or {}
    recorded = config.get(part) if part else {key: config.get(key) for key in train}
    check_resumable(path, recorded, dict(train), saved_step(path, saved, argument), steps)


def saved_step(checkpoint: Any, saved: Mapping[str, Any], argument: str = "checkpoint") -> int:
    """The number of steps the checkpoint ``saved`` (its metadata) holds, or a :class:`CheckpointError`
    where it records none: a file saved after a fit (``save_invariance_inn``), not a fit's checkpoint.
    ``argument``: the caller's argument that named the file, for the message.

    Examples::

        >>> saved_step("fit.safetensors", {"step": 100})
        100
    """
    step = saved.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(
            f"{str(checkpoint)!r} records no step of a fit in progress (step={step!r}): it is not a fit's checkpoint "
            f"(an INN saved after its fit, say) or it was edited. Pass another `{argument}`, or resume=False to "
            "overwrite it."
        )
    return step


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off (on the CPU and ``device``) for work on an INN's weights: under a caller's autocast,
    every pass after the first reused its cached low-precision copy of the first pass's weights
    (autocast clears that cache only when its outermost block exits), so steps trained nothing and
    a pass after the fit read the untrained weights."""
    with contextlib.ExitStack() as stack:
        for kind in sorted({"cpu", torch.device(device).type} & {"cpu", "cuda"}):
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def final_loss(history: Sequence[float], n: int = 100) -> float:
    """The mean of a fit's last ``n`` losses (NaN for none): what its ``fit_info`` reports, less
    noisy than the last step's."""
    tail = list(history[-n:])
    return float(sum(tail) / len(tail)) if tail else math.nan


def check_checkpoint_writable(checkpoint: Optional[str], resume: bool, steps: int) -> None:
    """Before a fit: ``ValueError`` in every process when ``checkpoint`` cannot be written.

    Only rank 0 writes, so only rank 0 checks (another node may not see its folder); under torchrun
    the others learn of its error instead of waiting for it. A finished fit resumed writes nothing
    (it may sit in a read-only folder), so it is not checked.

    Args:
        checkpoint: The checkpoint file, or ``None`` (nothing to check).
        resume: Whether the fit resumes from it.
        steps: The fit's steps (a checkpoint holding them all is finished).
    """
    with raising_together():
        if checkpoint is not None and world()[0] == 0 and not (resume and finished_checkpoint(checkpoint, steps)):
            check_checkpoint_path(checkpoint)


@autograd_on
def train_loop(
    module: nn.Module,
    loss_fn: Callable[[torch.Generator], Tensor],
    *,
    steps: int,
    lr: float,
    betas: tuple = (0.9, 0.999),
    seed: int = 0,
    grad_clip: Optional[float] = 10.0,
    schedule: str = "constant",
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    meta: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    desc: str = "fit",
    weight_decay: float = 0.0,
    callback: Optional[Callable[[int, nn.Module], None]] = None,
    batch_fn: Optional[Callable[[torch.Generator], Sequence[Tensor]]] = None,
    cuda_graph: Optional[bool] = None,
    generators: Sequence[torch.Generator] = (),
) -> List[float]:
    """Minimise ``loss_fn`` over ``module``'s parameters for ``steps`` Adam steps.

    ``loss_fn(generator)`` draws its own minibatch with ``generator`` and returns a scalar loss. A
    fit resumed from a checkpoint (which stores the model, the optimiser and the generator state)
    continues exactly where it stopped. What draws from torch's global generators during the steps
    (dropout, a torchvision transform) draws from streams seeded by ``seed`` and saved with the
    checkpoint (on the CPU; a CUDA device's is reseeded at a resume), and the caller's streams are
    left as they were. Those generators are one per process, so a fit in another thread than the
    main one (fits side by side) leaves them alone, unseeded.

    Ctrl-C during a fit with a checkpoint ends the step under way, writes the checkpoint, and
    raises ``KeyboardInterrupt`` saying so: run the same call again to resume from that step. A
    second Ctrl-C stops at once (the last checkpoint stays). This holds in one process's main
    thread over Python's own handler; fits side by side (``fit_invariances`` of several layers)
    each write the step they finished when the caller is interrupted. Under ``torchrun``, or
    killed, a fit resumes from its last periodic checkpoint.

    With ``batch_fn``, each step calls ``loss_fn(*batch_fn(generator))`` instead: ``batch_fn`` draws
    the minibatch (and any noise) and moves it to the device; ``loss_fn`` only computes. On a GPU
    this split lets the step be captured once as a CUDA graph and replayed (``cuda_graph``): an INN
    step is a thousand small kernels, and replaying them costs a fraction of launching them one by
    one (benchmarks/README.md, "GPU run"). On the CPU the split changes nothing.

    Under ``torchrun`` (:mod:`captum_inn.training.distributed`) each rank has its own generator,
    rank 0's parameters are copied to all ranks before the first step, gradients and losses are
    averaged after each backward pass, and only rank 0 writes the checkpoint (with every rank's
    generator state).

    Args:
        module: The model being fitted (switched to train mode, left in eval mode).
        loss_fn: ``generator -> scalar loss``.
        steps: Total number of steps, counting those done before a resume.
        lr: Adam learning rate.
        betas: Adam betas.
        seed: Seed of the minibatch generator, and of torch's global generators during the steps.
        grad_clip: Clip the gradient norm to this value (``None``: no clipping).
        schedule: ``"constant"`` or ``"cosine"`` (half a cosine from ``lr`` towards 1% of ``lr``,
            reached at the end of the fit; the rate is a function of the step, so a resumed fit
            follows the same schedule; one resumed with other ``steps`` warns, as its rate jumps).
        checkpoint: Path of the checkpoint file; ``None`` keeps nothing on disk.
        checkpoint_every: Steps between checkpoints (the last step is always saved).
        resume: Continue from ``checkpoint`` when it exists. A resume refuses (``CheckpointError``)
            a checkpoint written with another ``lr``, ``betas``, ``weight_decay``, ``grad_clip`` or
            ``schedule``, and one whose state is damaged (checked before anything is loaded).
        meta: JSON metadata stored in the checkpoint (must contain ``kind`` and ``config``;
            a resume refuses a checkpoint whose ``config`` differs).
        progress: Show a progress bar.
        desc: Label of the progress bar.
        weight_decay: Decoupled weight decay (AdamW); 0 gives plain Adam.
        callback: ``callback(step, module)`` after every step (``step`` counts completed steps),
            e.g. to keep snapshots of a model over its training.
        batch_fn: ``generator -> tensors``, the minibatch of a step on ``module``'s device; the
            tensors must have the same shapes every step. ``loss_fn`` then takes those tensors.
        cuda_graph: Capture the step (``loss_fn``, backward, clipping, Adam) as CUDA graphs after
            a few eager warm-up steps. ``None`` (default): when ``batch_fn`` is given, ``module``
            is on a CUDA device, the fit runs in one process and :func:`~captum_inn.training.loop.cuda_graphs_by_default`
            (unless ``CAPTUM_INN_CUDA_GRAPHS=0``); should the capture fail (a
            ``loss_fn`` that reads values on the host, say), the fit warns and goes on eagerly.
            ``True``: capture, and a failed capture is an error. ``False``: never. The captured
            step reads the loss and the gradients' norm on the host between the backward pass and
            the update, so a non-finite loss or gradient stops the fit before it changes any
            parameter, as in the eager step.
        generators: Further CPU generators the step draws from (an augmentation's own, say). Their
            states are saved in the checkpoint and restored on resume, so a resumed fit draws what
            an uninterrupted one would (under ``torchrun``: each rank's own; rank 0's on every rank
            for a checkpoint of another number of processes).

    Returns:
        The loss of every step (including those of the run that was resumed).

    Raises:
        FloatingPointError: the loss, or the gradients of a finite loss, became NaN or infinite;
            the step is not applied and the last checkpoint is left intact.
        ValueError: ``cuda_graph=True`` where no graph can be captured (no ``batch_fn``, not on a
            CUDA device, or several processes).

    Examples::

        >>> lin = nn.Linear(3, 1)
        >>> x = torch.randn(64, 3)
        >>> def loss_fn(generator):                # draws its own minibatch of 16 rows
        ...     rows = torch.randint(64, (16,), generator=generator)
        ...     return (lin(x[rows]).squeeze(1) - x[rows].sum(1)).pow(2).mean()
        >>> losses = train_loop(lin, loss_fn, steps=50, lr=0.05, progress=False)
        >>> len(losses), losses[-1] < losses[0]
        (50, True)

        The same fit with the minibatch drawn apart from the loss, the form a CUDA graph captures:

        >>> def batch_fn(generator):               # on the GPU, also moves the rows there
        ...     rows = torch.randint(64, (16,), generator=generator)
        ...     return x[rows], x[rows].sum(1)
        >>> def loss_of(inputs, targets):          # computes only: no draws, no host reads
        ...     return (lin(inputs).squeeze(1) - targets).pow(2).mean()
        >>> losses = train_loop(lin, loss_of, batch_fn=batch_fn, steps=50, lr=0.05, progress=False)
        >>> losses[-1] < losses[0]
        True
    """
    _check_schedule(schedule)
    check_autograd_weights(module, "`module`", "train_loop trains its weights")
    steps, checkpoint_every = check_positive_int(steps, "steps"), check_positive_int(checkpoint_every, "checkpoint_every")
    lr, weight_decay = check_number(lr, "lr", positive=True), check_number(weight_decay, "weight_decay")
    if grad_clip is not None:  # a negative bound turned every step around (gradient ascent), 0 stopped learning
        grad_clip = check_number(grad_clip, "grad_clip", positive=True)
    seed = _check_seed(seed)
    meta = dict(meta or {"kind": "module", "config": {}})
    parameter = next(module.parameters(), None)  # under torchrun on GPUs the process group is NCCL's
    device = torch.device("cpu") if parameter is None else parameter.device
    rank, n_ranks = world(device)
    # torch's global generators are one per process: fits side by side in threads (fit_invariances' workers)
    # saving and restoring them would leave the caller another fit's stream, so only the main thread's do
    own_streams = threading.current_thread() is threading.main_thread()
    # settings that differ between processes gave replicas that drift apart silently (another lr), a
    # crash in the collectives (other steps) or a hang (a checkpoint on rank 0 only): refused in every process
    check_processes_agree("train_loop settings", {
        "steps": steps, "lr": lr, "betas": [float(b) for b in betas], "grad_clip": grad_clip, "schedule": schedule,
        "weight_decay": weight_decay, "checkpoint": checkpoint is not None, "checkpoint_every": checkpoint_every,
        "resume": bool(resume), "generators": len(generators), "global_streams": own_streams,
        **({f"config.{k}": v for k, v in meta["config"].items()} if isinstance(meta.get("config"), Mapping)
           else {"config": meta.get("config")})},
        "Give every process the same settings (only process 0 writes the checkpoint, but every process needs "
        "its path).", by_key=True)
    graphed = _use_cuda_graph(cuda_graph, batch_fn, device, n_ranks)
    generator = torch.Generator().manual_seed(int(seed) + _RANK_SEED_STRIDE * rank)
    global_state: Optional[Tensor] = None  # of torch's global CPU generator, from the checkpoint
    # foreach: the same per-element arithmetic as the per-tensor loop (bit for bit), in fewer calls;
    # an INN has over a hundred small parameters, so on the CPU a step is ~10% faster. capturable:
    # the step count and bias corrections stay on the GPU, so the update can be captured
    adam = dict(lr=lr, betas=betas, foreach=True, capturable=graphed)
    optimizer = (torch.optim.AdamW(module.parameters(), weight_decay=weight_decay, **adam)
                 if weight_decay else torch.optim.Adam(module.parameters(), **adam))
    # listed once: walking the module tree for its parameters every step was ~4% of an INN step
    parameters = list(module.parameters())
    start, history = 0, []
    # what the optimiser and the steps are made of: a resume with others would go on with the
    # checkpoint's (Adam's saved rate and decay) or mix the two, whatever the fit's own config holds
    loop_settings = {"lr": float(lr), "betas": [float(b) for b in betas], "weight_decay": float(weight_decay),
                     "grad_clip": None if grad_clip is None else float(grad_clip), "schedule": schedule}
    check_checkpoint_writable(checkpoint, resume, steps)
    # what one process alone cannot read (its own generator states damaged) stops every process
    with raising_together():
        if checkpoint is not None and resume and Path(checkpoint).exists():
            tensors, saved = load_checkpoint(checkpoint, kind=meta["kind"])
            check_resumable(checkpoint, saved.get("config"), meta.get("config"), saved_step(checkpoint, saved), steps)
            if "loop" in saved and saved["loop"] != loop_settings:  # absent in checkpoints of older versions
                raise CheckpointError(
                    f"Checkpoint {checkpoint!r} was written with other train_loop settings "
                    f"({config_differences(saved['loop'], loop_settings)}); pass resume=False or another path."
                )
            try:
                # checked whole before anything is loaded: load_state_dict copies the tensors that fit before it
                # refuses the others, which left the module part checkpoint, part its own
                state = strip_prefix(tensors, "model.")
                _check_state_fits(module, state)
                start = saved_step(checkpoint, saved)
                history = _saved_history(saved.get("history"), start)
                main_state = tensors[_generator_key(rank)] if int(saved.get("world_size", 1)) == n_ranks else None
                # absent in checkpoints of older versions: reseeded for the steps from here on
                global_state = tensors.get(_global_generator_key(rank)) if main_state is not None and own_streams else None
                _check_generator_state(main_state, generator, _generator_key(rank))
                _check_generator_state(global_state, torch.default_generator, _global_generator_key(rank))
                # this rank's states; rank 0's from a checkpoint of another number of processes or an older version
                extra_keys = [_extra_generator_key(i, rank) if main_state is not None and _extra_generator_key(i, rank) in tensors
                              else _extra_generator_key(i) for i in range(len(generators))]
                for key, extra in zip(extra_keys, generators):
                    _check_generator_state(tensors.get(key), extra, key)
                load_optimizer(optimizer, tensors, saved["optimizer"])
                rates = [float(group["lr"]) for group in optimizer.param_groups]
                if schedule == "constant" and any(not math.isclose(rate, lr, rel_tol=1e-6) for rate in rates):
                    # an edited rate trained at that rate, while the checkpoint's config recorded the fit's own
                    raise ValueError(f"the optimiser's rate is {rates[0]:g}, this fit's constant rate {lr:g} (the file was "
                                     "edited or damaged)")
                module.load_state_dict(state)
            except (KeyError, RuntimeError, ValueError, TypeError) as error:
                raise CheckpointError(
                    f"Checkpoint {checkpoint!r} does not hold a whole fit of this module ({type(error).__name__}: "
                    f"{error}); pass resume=False to start afresh, or another path."
                ) from None
            for key, extra in zip(extra_keys, generators):
                if key in tensors:  # absent in checkpoints of older versions
                    extra.set_state(tensors[key])
            _warn_if_schedule_stretched(checkpoint, schedule, lr, start, saved.get("total_steps"), steps)
            if main_state is not None:
                generator.set_state(main_state)
            else:
                if start < steps:  # a finished fit draws no more minibatches: the warning said it differed
                    warnings.warn(f"{checkpoint!r} was written by a fit with {saved.get('world_size', 1)} processes, this one "
                                  f"has {n_ranks}: the minibatch order after step {start} differs from an uninterrupted run.",
                                  stacklevel=user_stacklevel())
                generator.manual_seed(int(seed) + _RANK_SEED_STRIDE * rank + start)
            del tensors, saved  # restored: the whole checkpoint (the model and Adam's moments) need not stay in memory
    sync_module(module)

    def write(step: int) -> None:
        average_buffers(module)  # collectives: every rank takes part
        states = gather_generator_states(generator)
        global_states = gather_generator_states(torch.default_generator) if own_streams else []
        extra_states = [gather_generator_states(extra) for extra in generators]
        # every rank waits for the file (one that went on and read it, after the last step say, found the
        # checkpoint before), and stops when rank 0 could not write it (a full disk) instead of waiting on
        with raising_together():
            if rank == 0:
                optim_tensors, optim_meta = optimizer_tensors(optimizer)
                tensors = {**module_tensors(module), **optim_tensors,
                           **{_generator_key(r): s for r, s in enumerate(states)},
                           **{_global_generator_key(r): s for r, s in enumerate(global_states)},
                           **{_extra_generator_key(i, r): s for i, states_i in enumerate(extra_states)
                              for r, s in enumerate(states_i)}}
                save_checkpoint(checkpoint, tensors, {**meta, "step": step, "history": history,
                                                      "optimizer": optim_meta, "world_size": n_ranks,
                                                      "loop": loop_settings, "total_steps": steps})

    if graphed:  # after the resume: the captured update reads the rate from this tensor
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    # fit_classifier writes no checkpoint: "the last checkpoint" sent users looking for one
    kept = " The last checkpoint was left as it was." if checkpoint is not None else ""

    def check_finite(loss: float, step: int) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"{desc}: the loss became {loss} in step {step + 1}. Lower the learning rate "
                f"(now {lr}) or check the inputs for NaN/inf; for an INN, a smaller `clamp` (bound on the "
                f"coupling scales) also helps.{kept}"
            )

    def check_gradients(norm: float, loss: float, step: int) -> None:
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"{desc}: the gradients became {norm} in step {step + 1} (the loss, {loss}, is finite). "
                f"Lower the learning rate (now {lr}) or check the inputs' scale (huge values overflow), and check "
                "the loss for operations without a finite gradient where it is evaluated (sqrt or log at 0, "
                f"norms of zero vectors).{kept}"
            )

    def eager_step(step: int, batch: Optional[Sequence[Tensor]] = None) -> float:
        try:
            if batch is None and batch_fn is not None:
                batch = batch_fn(generator)
            loss = loss_fn(generator) if batch is None else loss_fn(*batch)
            # after the loss: a loss_fn that runs a backward pass of its own (an attack) leaves no gradient
            optimizer.zero_grad(set_to_none=True)
            # backward even for a NaN loss: all ranks must join the all-reduce, and testing the loss
            # first would make the host wait for the device every step; check_finite raises before
            # the optimiser moves anything
            loss.backward()
        except Exception as error:  # in one process of several (batch norm on its one-image batch, say)
            if n_ranks == 1:
                raise
            # the step's tensors go before joining: after an out-of-memory error the all-reduce needs the
            # gradients' size again, and its own failure would leave the others waiting. Its frames keep
            # their lines for the traceback, not their locals
            batch = loss = None
            traceback.clear_frames(error.__traceback__)
            average_gradients(module, torch.zeros(()), failed=True)  # the others stop too, not wait for it
            raise error
        value = float(average_gradients(module, loss).detach())
        check_finite(value, step)
        # a finite loss can still give NaN or infinite gradients (a sqrt at 0): Adam would write NaN into every
        # weight, and the next checkpoint would keep them (max_norm inf: the norm, the gradients unchanged)
        norm = nn.utils.clip_grad_norm_(parameters, float("inf") if grad_clip is None else grad_clip)
        check_gradients(float(norm), value, step)
        optimizer.step()
        return value

    captured: Optional[CapturedStep] = None
    side: Optional[torch.cuda.Stream] = None  # a graphed fit's own stream
    module.train()
    # the bar shows a running mean of the loss, refreshed about 20 times a fit and at most every 50 steps
    loss_every = max(1, min(50, (steps - start) // 20))
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{desc} (resumed at step {start})" if start else desc,
               disable=not progress or rank != 0, leave=False)
    streams = contextlib.ExitStack()
    try:
        stop = streams.enter_context(_StopAfterStep(checkpoint is not None and n_ranks == 1, desc))
        streams.enter_context(full_precision(device))  # INNs train in float32, whatever surrounds the fit
        if own_streams:
            streams.enter_context(_global_streams(device, global_state, _global_seed(seed, rank, start)))
        if graphed:  # warm-up, capture and replays on a stream of this fit's own (CUDA graphs need a side stream)
            side = streams.enter_context(own_stream(device))
            streams.enter_context(running_on(side, device))
        for step in bar:
            if schedule == "cosine":
                rate = _cosine_rate(lr, step, steps)
                for group in optimizer.param_groups:
                    if torch.is_tensor(group["lr"]):
                        group["lr"].fill_(rate)
                    else:
                        group["lr"] = rate
            batch = None
            if graphed and captured is None and step >= start + CapturedStep.WARMUP_STEPS and step + 1 < steps:
                batch = batch_fn(generator)
                captured = _capture_or_warn(module, optimizer, loss_fn, batch, grad_clip, side, strict=cuda_graph is True)
                graphed = captured is not None
            if captured is not None:
                loss, norm = captured.forward_backward(batch_fn(generator) if batch is None else batch)
                check_finite(loss, step)  # before the update: a bad step changes no parameter
                check_gradients(norm, loss, step)
                captured.update()
            else:  # eager, and a graphed fit's warm-up steps
                loss = eager_step(step, batch)
            history.append(loss)
            if callback is not None:
                try:
                    callback(step + 1, module)
                except FitCancelled:  # a sibling fit failed, or the caller was interrupted: keep this step
                    if checkpoint is not None and n_ranks == 1:
                        write(step + 1)
                    raise
            if (step - start) % loss_every == 0 or step + 1 == steps:
                recent = history[-loss_every:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            # (a stop is only requested of a fit with a checkpoint)
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps or stop.requested):
                write(step + 1)
            if stop.requested:
                raise KeyboardInterrupt(f"{desc} stopped after step {step + 1} of {steps}, which {str(checkpoint)!r} "
                                        "holds: run the same call again to resume from there.")
    except BaseException:  # a failed or interrupted fit leaves the module in eval mode, as a finished one
        module.eval()
        raise
    finally:
        bar.close()
        if captured is not None:  # its graphs go while the fit still holds their stream (a traceback kept them)
            with contextlib.suppress(RuntimeError):
                side.synchronize()
            captured = None
        streams.close()
    # the last step's gradients: no use to the caller, as much memory as the weights (and, with CUDA
    # graphs, in the graphs' memory pool)
    optimizer.zero_grad(set_to_none=True)
    average_buffers(module)
    module.eval()
    return history


class _StopAfterStep:
    """Ctrl-C during a fit with a checkpoint: the step under way ends, its checkpoint is written, and
    then ``KeyboardInterrupt`` (up to ``checkpoint_every - 1`` steps were lost before); a second
    Ctrl-C stops at once. Only in one process's main thread (a signal reaches no other thread, and
    under ``torchrun`` every rank must stop at the same step), and only over Python's own handler
    (a handler of the caller's is left alone)."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.requested = False
        self.desc = desc
        self.enabled = (enabled and threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{self.desc}: stopping after this step, once its checkpoint is written (Ctrl-C again to stop "
                   "at once).", file=sys.stderr)

    def __enter__(self) -> _StopAfterStep:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


_streams_in_use: Set[int] = set()  # of own_stream's claims, by raw stream
_streams_lock = threading.Lock()


@contextlib.contextmanager
def own_stream(device: torch.device) -> Iterator[torch.cuda.Stream]:
    """A CUDA stream of ``device`` that no other fit of this process holds, until the block ends.

    ``torch.cuda.Stream()`` hands out a pool of 32 streams in turn, so fits side by side could be
    given one stream: one fit's replays then ran on the stream another was capturing a graph on
    (seen on an H200 as "Cannot copy between CPU and CUDA tensors during CUDA graph capture", after
    a few multi-layer fits had gone round the pool); work issued there is recorded, not run.
    """
    with _streams_lock:
        for _ in range(64):
            stream = torch.cuda.Stream(device)
            if stream.cuda_stream not in _streams_in_use:
                break
        else:
            raise RuntimeError(f"Every pooled CUDA stream of {device} is held by another fit of this process; "
                               "fit fewer layers at a time (`workers=`).")
        _streams_in_use.add(stream.cuda_stream)
    try:
        yield stream
    finally:
        with _streams_lock:
            _streams_in_use.discard(stream.cuda_stream)


@contextlib.contextmanager
def running_on(stream: torch.cuda.Stream, device: torch.device,
               caller: Optional[torch.cuda.Stream] = None) -> Iterator[None]:
    """Make ``stream`` the current one: it starts after what the caller's stream holds (the module's
    initialisation), and the caller's stream goes on after it. ``caller``: that stream, where it is
    another thread's (by default this thread's current one)."""
    caller = torch.cuda.current_stream(device) if caller is None else caller
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    except BaseException:
        with contextlib.suppress(RuntimeError):  # the fit's own error is the one to see
            stream.synchronize()
        raise
    # the last replayed update is done before its graph and memory pool are freed
    stream.synchronize()
    caller.wait_stream(stream)


@contextlib.contextmanager
def _global_streams(device: torch.device, state: Optional[Tensor], seed: int) -> Iterator[None]:
    """Torch's global generators for a fit's steps (dropout draws from them): the CPU one restored from
    ``state`` (a checkpoint's) or seeded with ``seed``, a CUDA device's seeded (not saved: a resumed fit's
    dropout on the GPU draws other masks); the caller's streams are restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        if state is not None:
            torch.set_rng_state(state)
        else:
            torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _check_state_fits(module: nn.Module, state: Dict[str, Tensor]) -> None:
    """``ValueError`` unless ``state`` has exactly ``module``'s entries, each of its shape and kind of
    dtype (``load_state_dict`` casts integers into floating weights without a word)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"entries missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{key!r} has shape {tuple(state[key].shape)} there, {tuple(value.shape)} here")
    mismatch = dtype_mismatch(own, state)
    if mismatch:
        raise ValueError(f"it holds {mismatch}")
    bad = non_finite_entries(state)  # the loaders refused these; a resume failed on them as "lower the learning rate"
    if bad:
        raise ValueError(f"NaN or infinite values in {bad[:3]}")


def _check_generator_state(state: Optional[Tensor], generator: torch.Generator, key: str) -> None:
    """``ValueError`` unless ``state`` (if any) can be the state of ``generator``: checked before
    anything is loaded, as ``set_state`` fails only after the module took the checkpoint's weights."""
    if state is None:
        return
    expected = generator.get_state()
    if state.dtype != torch.uint8 or state.shape != expected.shape:
        raise ValueError(f"{key!r} is a {state.dtype} tensor of shape {tuple(state.shape)}, not the state of a "
                         f"{generator.device} generator (uint8, {tuple(expected.shape)})")


def _saved_history(history: Any, step: int) -> List[float]:
    """The checkpoint's losses: one finite number per step it holds (an edited file gave a fit more
    losses than steps, or a string read as a list of characters)."""
    if not isinstance(history, list) or len(history) != step or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in history):
        shown = f"{len(history)} entries" if isinstance(history, list) else type(history).__name__
        raise ValueError(f"its loss history ({shown}) is not one finite number for each of its {step} steps")
    return [float(v) for v in history]


def cuda_graphs_by_default() -> bool:
    """Whether fits on a CUDA device capture their steps as CUDA graphs unless told
    (``train_loop(cuda_graph=None)``): yes, unless ``CAPTUM_INN_CUDA_GRAPHS=0`` is in the environment.

    The captured step passed this project's GPU checks on 2026-12-04 (``benchmarks/cuda_checks.sh``
    on an H200: the same losses as the eager step, 7x its steps per second; benchmarks/README.md).
    Turn it off to compare with the eager step, or for a ``loss_fn`` that a capture would reject
    (such a capture falls back to the eager step with a warning anyway).

    Examples::

        >>> import os
        >>> cuda_graphs_by_default() == (os.environ.get("CAPTUM_INN_CUDA_GRAPHS", "").strip() != "0")
        True
    """
    return os.environ.get("CAPTUM_INN_CUDA_GRAPHS", "").strip() != "0"


def _use_cuda_graph(cuda_graph: Optional[bool], batch_fn: Optional[Callable], device: torch.device,
                    n_ranks: int) -> bool:
    """Whether :func:`train_loop` captures its step: ``cuda_graph=None`` decides, ``True`` insists."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"`cuda_graph` must be True, False or None, got {cuda_graph!r}.")
    reasons = [why for why, failed in (
        ("it needs `batch_fn` (the minibatch drawn apart from the loss)", batch_fn is None),
        (f"the module is on {device}, not on a CUDA device", device.type != "cuda"),
        (f"this fit runs in {n_ranks} processes (gradients are all-reduced eagerly)", n_ranks > 1),
    ) if failed]
    if cuda_graph and reasons:
        raise ValueError(f"`cuda_graph=True` cannot capture this step: {'; '.join(reasons)}. "
                         "Pass cuda_graph=None to capture where possible.")
    if cuda_graph is None:
        return not reasons and cuda_graphs_by_default()
    return cuda_graph


class CapturedStep:
    """A training step captured as two CUDA graphs and replayed (internal to :func:`train_loop`).

    The first graph computes the loss, its gradients and their norm (clipping them) from static
    copies of the batch, the second applies Adam (``capturable=True``). Between the two the host
    reads the loss and the norm, so a non-finite loss or gradient stops the fit before the update.
    Replaying launches a whole step at once instead of its thousand small kernels one by one.

    Args:
        module: The model (its warm-up steps done, so lazily built state exists).
        optimizer: Its optimiser, built with ``capturable=True``.
        loss_fn: ``*batch -> scalar loss`` (no host reads inside).
        batch: A batch of the shapes every later batch has (copied, not kept).
        grad_clip: As in :func:`train_loop`.
        stream: The stream to capture on, one that no other thread works on (``None``: PyTorch's
            capture stream, for a single fit).
    """

    WARMUP_STEPS = 3  # eager steps before the capture (cuBLAS handles, Adam's state, autograd set-up)
    _capture_lock = threading.Lock()  # one capture at a time when fits run in threads

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[..., Tensor],
                 batch: Sequence[Tensor], grad_clip: Optional[float],
                 stream: Optional[torch.cuda.Stream] = None) -> None:
        self.inputs: Tuple[Tensor, ...] = tuple(t.detach().clone() for t in batch)
        generator = _device_generator(self.inputs[0].device if self.inputs else next(module.parameters()).device)
        with CapturedStep._capture_lock:
            before = generator.clone_state() if hasattr(generator, "clone_state") else None
            try:
                optimizer.zero_grad(set_to_none=True)  # the capture allocates the gradients in its pool
                self.loss_graph = torch.cuda.CUDAGraph()
                # thread_local: fits in other threads may keep working (on their own streams) meanwhile
                with torch.cuda.graph(self.loss_graph, stream=stream, capture_error_mode="thread_local"):
                    loss = loss_fn(*self.inputs)
                    loss.backward()
                    # max_norm inf: the norm alone, the gradients unchanged (as the eager step)
                    norm = nn.utils.clip_grad_norm_(module.parameters(), float("inf") if grad_clip is None else grad_clip)
                    self.readout = torch.stack([loss.detach().float().reshape(()), norm.float().reshape(())])
                self.update_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.update_graph, pool=self.loss_graph.pool(), stream=stream,
                                      capture_error_mode="thread_local"):
                    optimizer.step()
            except BaseException:
                # a capture that fails midway leaves the device's generator marked as capturing (torch
                # 2.11 on an H200): every later random draw on that device then raised "Offset increment
                # outside graph capture". The state from before the capture is put back.
                if before is not None:
                    generator.graphsafe_set_state(before)
                raise

    def forward_backward(self, batch: Sequence[Tensor]) -> Tuple[float, float]:
        """Copy ``batch`` into the static inputs, replay the loss and gradients, return the loss and
        the gradients' norm (before clipping)."""
        if len(batch) != len(self.inputs):
            raise ValueError(f"`batch_fn` returned {len(batch)} tensors, the captured step takes {len(self.inputs)}.")
        for static, tensor in zip(self.inputs, batch):
            if static.shape != tensor.shape:
                raise ValueError(
                    f"`batch_fn` returned a tensor of shape {tuple(tensor.shape)} where the captured step took "
                    f"{tuple(static.shape)}; a CUDA graph needs the same shapes every step. Keep the batch "
                    "size fixed, or pass cuda_graph=False."
                )
            static.copy_(tensor)
        # replays wait while another fit captures: on torch before 2.7 every capture marked the device's
        # generator as capturing, and a replay launched meanwhile raised (the launch alone is held)
        with CapturedStep._capture_lock:
            self.loss_graph.replay()
        loss, norm = self.readout.tolist()
        return loss, norm

    def update(self) -> None:
        """Replay the Adam update."""
        with CapturedStep._capture_lock:
            self.update_graph.replay()


def _device_generator(device: torch.device) -> torch.Generator:
    """The default generator of a CUDA ``device`` (its index, or the current device's)."""
    return torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index]


def _capture_or_warn(module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[..., Tensor],
                     batch: Sequence[Tensor], grad_clip: Optional[float], stream: torch.cuda.Stream,
                     strict: bool) -> Optional[CapturedStep]:
    """A :class:`CapturedStep` on ``stream``, or ``None`` with a warning when the capture fails and
    ``strict`` is off."""
    stream.synchronize()  # the warm-up steps are done
    try:
        return CapturedStep(module, optimizer, loss_fn, batch, grad_clip, stream)
    except Exception as error:  # e.g. a loss_fn that reads a value on the host (not allowed in a graph)
        if strict:
            raise
        optimizer.zero_grad(set_to_none=True)
        warnings.warn(f"Could not capture the training step as a CUDA graph ({type(error).__name__}: "
                      f"{str(error)[:300]}); training on without it. Pass cuda_graph=False to skip the attempt.",
                      stacklevel=user_stacklevel())
        return None




class FitCancelled(Exception):
    """Raised inside a concurrent fit whose siblings failed or were interrupted (internal)."""


def run_concurrently(tasks: Sequence[Callable[[Callable[[], None]], T]], workers: int) -> List[T]:
    """Run independent fits in ``workers`` threads, each with an equal share of torch's CPU threads.

    An INN training step on the CPU is mostly many small ops, which do not use two cores well:
    two fits side by side, one thread each, do about 1.1-1.3x the steps of the same fits one after
    another with two threads each (measured on 2 cores). Each task gets a ``check()`` function to
    call after every step; it raises :class:`FitCancelled` once another task has failed or the
    caller was interrupted, so no thread keeps training unseen. Checkpoints already written stay,
    and a rerun resumes from them.

    Args:
        tasks: ``task(check) -> result`` callables.
        workers: Threads (1 runs the tasks one after another in this thread).

    Returns:
        The results, in the order of ``tasks``.

    Raises:
        The first exception a task raised (after all threads stopped); ``KeyboardInterrupt`` if
        interrupted while waiting.

    Examples::

        >>> run_concurrently([lambda check: 1, lambda check: 2], workers=2)
        [1, 2]
    """
    if workers <= 1 or len(tasks) <= 1:
        return [task(lambda: None) for task in tasks]
    stop = threading.Event()
    threads_before = torch.get_num_threads()
    per_worker = max(1, threads_before // workers)

    def check() -> None:
        if stop.is_set():
            raise FitCancelled()

    def run(task: Callable[[Callable[[], None]], T]) -> T:
        torch.set_num_threads(per_worker)  # thread-local for OpenMP; restored for the caller below
        return task(check)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captum_inn_fit")
    futures: List[Future] = []
    try:
        # submitted inside the try: a Ctrl-C while the pool started its threads left a fit training unseen
        for task in tasks:
            futures.append(pool.submit(run, task))
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            stop.set()
        wait(futures)
    except BaseException:  # KeyboardInterrupt while waiting: stop the threads at their next step
        stop.set()
        wait(futures)
        raise
    finally:
        pool.shutdown(wait=True)
        torch.set_num_threads(threads_before)  # a worker's setting can leak into the BLAS libraries
    errors = [f.exception() for f in futures if f.exception() is not None]
    first = next((e for e in errors if not isinstance(e, FitCancelled)), errors[0] if errors else None)
    if first is not None:
        raise first
    return [f.result() for f in futures]
