"""Distributed data parallel fitting under ``torchrun`` (gloo on the CPU, NCCL on GPUs).

Every ``fit_*`` function runs unchanged under ``torchrun --nproc_per_node=N script.py``:

- the process group is started from torchrun's environment on first use (or use your own);
- each process reads its shard of the data (every ``N``-th image) and draws ``batch_size / N``
  samples per step, so the global batch and the optimisation match a single process;
- after each backward pass the gradients (and the loss, for the progress bar and the history)
  are averaged across processes, so the replicas stay identical;
- only rank 0 writes checkpoints; a resumed fit restores every rank's minibatch RNG state.

Outside torchrun every function here is a no-op, so single-process fits are unchanged.
"""

from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

__all__ = ["world", "is_main", "local_batch_size", "shard_data", "sync_module", "average_gradients", "average_buffers",
           "gather_rows", "gather_generator_states", "barrier"]


def _maybe_init(device: Any = None) -> None:
    """Start the default process group from torchrun's environment, once."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return
    if not torch.distributed.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")


def world(device: Any = None) -> Tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` outside a distributed run.

    Args:
        device: The device the fit uses (chooses NCCL for CUDA, gloo otherwise, when the process
            group is started here).

    Examples::

        >>> world()
        (0, 1)
    """
    _maybe_init(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _comm(tensor: Tensor) -> Tensor:
    """``tensor`` where the backend can communicate it (NCCL only moves CUDA tensors)."""
    if torch.distributed.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or no distributed run)."""
    return world()[0] == 0


def local_batch_size(batch_size: int, n_local: int) -> int:
    """This rank's share of a global ``batch_size`` (at most its number of samples)."""
    _, size = world()
    if batch_size < size:
        raise ValueError(f"`batch_size` {batch_size} is smaller than the number of processes {size}; "
                         "each process needs at least one sample per step.")
    return min(batch_size // size, n_local)


def shard_data(data: Any) -> Any:
    """This rank's shard (every ``world``-th item, starting at ``rank``) of a tensor or ``Dataset``.

    Args:
        data: Images as a tensor or a map-style ``Dataset`` (a ``DataLoader`` cannot be resharded).

    Returns:
        ``data`` itself outside a distributed run.
    """
    rank, size = world()
    if size == 1:
        return data
    if isinstance(data, DataLoader):
        raise TypeError("Under torchrun pass the images as a tensor or a Dataset, not a DataLoader: each process "
                        "reads its own shard of them.")
    if isinstance(data, Tensor):
        return data[rank::size]
    return Subset(data, range(rank, len(data), size))


def sync_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (after a data-dependent initialisation)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def average_gradients(module: nn.Module, loss: Tensor) -> Tensor:
    """Average the gradients of ``module`` and the ``loss`` over ranks in one all-reduce.

    Returns:
        The averaged loss (``loss`` itself outside a distributed run).
    """
    _, size = world()
    if size == 1:
        return loss
    params = [p for p in module.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1).to(params[0].grad.dtype)])
    torch.distributed.all_reduce(flat)
    flat /= size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return flat[-1]


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (batch-norm running statistics) over ranks, in place.

    Each rank's running statistics follow its own minibatches; averaging them at every checkpoint
    and at the end keeps the replicas identical, and a resumed fit equal to an uninterrupted one.
    """
    if world()[1] == 1:
        return
    with torch.no_grad():
        for buffer in module.buffers():
            if buffer.is_floating_point():
                torch.distributed.all_reduce(buffer.data)
                buffer.data /= world()[1]


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's ``rows`` (equal shapes) in rank order; ``rows`` outside a distributed run."""
    _, size = world()
    if size == 1:
        return rows
    rows_comm = _comm(rows.contiguous())
    parts: List[Tensor] = [torch.empty_like(rows_comm) for _ in range(size)]
    torch.distributed.all_gather(parts, rows_comm)
    return torch.cat(parts).to(rows.device)


def gather_generator_states(generator: torch.Generator) -> List[Tensor]:
    """Every rank's minibatch RNG state, in rank order (so rank 0 can checkpoint them all)."""
    state = generator.get_state()
    _, size = world()
    if size == 1:
        return [state]
    state_comm = _comm(state)
    parts = [torch.empty_like(state_comm) for _ in range(size)]
    torch.distributed.all_gather(parts, state_comm)
    return [part.cpu() for part in parts]


def barrier() -> None:
    """Wait for every rank (no-op outside a distributed run)."""
    if world()[1] > 1:
        torch.distributed.barrier()
