"""The one training loop behind every ``fit_*`` function: Adam, a progress bar, checkpoints, resume."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars: tqdm.auto warns in notebooks without ipywidgets

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

__all__ = ["train_loop", "resume_key"]

# Settings that may change between a fit and its resumption (train longer, save more often).
_RESUMABLE = ("steps", "checkpoint_every")


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
    meta = dict(meta or {"kind": "module", "config": {}})
    rank, n_ranks = world()
    generator = torch.Generator().manual_seed(int(seed) + _RANK_SEED_STRIDE * rank)
    optimizer = (torch.optim.AdamW(module.parameters(), lr=lr, betas=betas, weight_decay=weight_decay) if weight_decay
                 else torch.optim.Adam(module.parameters(), lr=lr, betas=betas))
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
                f"(now {lr}), clamp the coupling scales more strongly (smaller `clamp`), or check the "
                "inputs for NaN/inf. The last checkpoint was left as it was."
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
