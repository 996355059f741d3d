"""The one training loop behind every ``fit_*`` function: Adam, a progress bar, checkpoints, resume."""

from __future__ import annotations

import difflib
import math
import threading
import warnings
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Type, TypeVar

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars: tqdm.auto warns in notebooks without ipywidgets

from captum_inn.attr._common import check_int, check_number, check_positive_int
from captum_inn.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer,
    module_tensors,
    optimizer_tensors,
    save_checkpoint,
    strip_prefix,
)
from captum_inn.training.distributed import (
    average_buffers,
    average_gradients,
    gather_generator_states,
    sync_module,
    world,
)

__all__ = ["train_loop", "resume_key", "merged_config"]

# Settings that may change between a fit and its resumption (train longer, save more often).
_RESUMABLE = ("steps", "checkpoint_every")


# Range rules of the numeric settings shared by the ``*Config`` classes; every other int must be
# >= 1 (sizes, counts, steps) and every other float >= 0 (noise levels, loss weights).
_ANY_INT = ("seed",)
_POSITIVE_FLOATS = ("lr", "clamp")

_Config = TypeVar("_Config")


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
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return value
    if isinstance(default, int):
        return check_int(value, name) if name in _ANY_INT else check_positive_int(value, name)
    return check_number(value, name, positive=name in _POSITIVE_FLOATS)


# Rank r's minibatch generator is seeded with seed + stride · r (rank 0: the single-process seed).
_RANK_SEED_STRIDE = 1_000_003


def _generator_key(rank: int) -> str:
    return "rng.generator" if rank == 0 else f"rng.generator.{rank}"


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
) -> List[float]:
    """Minimise ``loss_fn`` over ``module``'s parameters for ``steps`` Adam steps.

    ``loss_fn(generator)`` draws its own minibatch with ``generator`` and returns a scalar loss. All
    randomness of a fit flows through that one generator, so a fit resumed from a checkpoint (which
    stores the model, the optimiser and the generator state) continues exactly where it stopped.

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
        seed: Seed of the minibatch generator.
        grad_clip: Clip the gradient norm to this value (``None``: no clipping).
        schedule: ``"constant"`` or ``"cosine"`` (decay to 1% of ``lr`` at the last step; the rate
            is a function of the step, so a resumed fit follows the same schedule).
        checkpoint: Path of the checkpoint file; ``None`` keeps nothing on disk.
        checkpoint_every: Steps between checkpoints (the last step is always saved).
        resume: Continue from ``checkpoint`` when it exists.
        meta: JSON metadata stored in the checkpoint (must contain ``kind`` and ``config``;
            a resume refuses a checkpoint whose ``config`` differs).
        progress: Show a progress bar.
        desc: Label of the progress bar.
        weight_decay: Decoupled weight decay (AdamW); 0 gives plain Adam.
        callback: ``callback(step, module)`` after every step (``step`` counts completed steps),
            e.g. to keep snapshots of a model over its training.

    Returns:
        The loss of every step (including those of the run that was resumed).

    Raises:
        FloatingPointError: the loss became NaN or infinite; the last checkpoint is left intact.

    Examples::

        >>> lin = nn.Linear(3, 1)
        >>> x = torch.randn(64, 3)
        >>> def loss_fn(generator):                # draws its own minibatch of 16 rows
        ...     rows = torch.randint(64, (16,), generator=generator)
        ...     return (lin(x[rows]).squeeze(1) - x[rows].sum(1)).pow(2).mean()
        >>> losses = train_loop(lin, loss_fn, steps=50, lr=0.05, progress=False)
        >>> len(losses), losses[-1] < losses[0]
        (50, True)
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"`schedule` must be 'constant' or 'cosine', got {schedule!r}.")
    steps, checkpoint_every = check_positive_int(steps, "steps"), check_positive_int(checkpoint_every, "checkpoint_every")
    lr, weight_decay = check_number(lr, "lr", positive=True), check_number(weight_decay, "weight_decay")
    meta = dict(meta or {"kind": "module", "config": {}})
    parameter = next(module.parameters(), None)  # under torchrun on GPUs the process group is NCCL's
    rank, n_ranks = world(None if parameter is None else parameter.device)
    generator = torch.Generator().manual_seed(int(seed) + _RANK_SEED_STRIDE * rank)
    # foreach: the same per-element arithmetic as the per-tensor loop (bit for bit), in fewer calls;
    # an INN has over a hundred small parameters, so on the CPU a step is ~10% faster
    optimizer = (torch.optim.AdamW(module.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
                 if weight_decay else torch.optim.Adam(module.parameters(), lr=lr, betas=betas, foreach=True))
    start, history = 0, []
    if checkpoint is not None and resume and Path(checkpoint).exists():
        tensors, saved = load_checkpoint(checkpoint, kind=meta["kind"])
        if saved.get("config") != meta.get("config"):
            raise CheckpointError(
                f"Checkpoint {checkpoint!r} was written by a fit with another configuration "
                f"({saved.get('config')} vs {meta.get('config')}); pass resume=False or another path."
            )
        module.load_state_dict(strip_prefix(tensors, "model."))
        load_optimizer(optimizer, tensors, saved["optimizer"])
        start, history = int(saved["step"]), list(saved["history"])
        if int(saved.get("world_size", 1)) == n_ranks:
            generator.set_state(tensors[_generator_key(rank)])
        else:
            warnings.warn(f"{checkpoint!r} was written by a fit with {saved.get('world_size', 1)} processes, this one "
                          f"has {n_ranks}: the minibatch order after step {start} differs from an uninterrupted run.",
                          stacklevel=2)
            generator.manual_seed(int(seed) + _RANK_SEED_STRIDE * rank + start)
    sync_module(module)

    def write(step: int) -> None:
        average_buffers(module)  # collectives: every rank takes part
        states = gather_generator_states(generator)
        if rank != 0:
            return
        optim_tensors, optim_meta = optimizer_tensors(optimizer)
        tensors = {**module_tensors(module), **optim_tensors, **{_generator_key(r): s for r, s in enumerate(states)}}
        save_checkpoint(checkpoint, tensors, {**meta, "step": step, "history": history, "optimizer": optim_meta,
                                              "world_size": n_ranks})

    module.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not progress or rank != 0,
               leave=False)
    for step in bar:
        if schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps))))
        loss = loss_fn(generator)
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss) or n_ranks > 1:  # all ranks must join the gradient all-reduce
            loss.backward()
        loss = average_gradients(module, loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{desc}: the loss became {float(loss.detach())} at step {step}. Lower the learning rate "
                f"(now {lr}) or check the inputs for NaN/inf; for an INN, a smaller `clamp` (bound on the "
                "coupling scales) also helps. The last checkpoint was left as it was."
            )
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        optimizer.step()
        history.append(float(loss.detach()))
        if callback is not None:
            callback(step + 1, module)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(history[-50:]) / len(history[-50:]):.3f}")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            write(step + 1)
    average_buffers(module)
    module.eval()
    return history


T = TypeVar("T")


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
    futures = [pool.submit(run, task) for task in tasks]
    try:
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
