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

import json
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from captum_inn._captum_compat import _format_additional_forward_args
from captum_inn._fingerprints import weights_fingerprint
from captum_inn.attr._common import as_device, user_stacklevel

__all__ = ["world", "is_main", "local_batch_size", "shard_data", "shard_forward_args", "sync_module",
           "warnings_from_rank_zero", "average_gradients", "average_buffers", "gather_rows", "gather_generator_states", "gather_texts", "barrier", "check_replicas_agree",
           "check_processes_agree", "raising_together"]


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
    if device is not None:
        as_device(device)  # an unknown device or CUDA without a GPU: a clear error before any work
    _maybe_init(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _this_rank() -> int:
    """This process's rank without starting a process group (torchrun's ``RANK``); 0 outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


@contextmanager
def warnings_from_rank_zero() -> Iterator[None]:
    """Under torchrun, let rank 0 alone show warnings (the fits are wrapped in this): every process
    checks the same settings, so each warning was printed once per process. Errors are raised by
    every rank. A warning about data in another rank's shard alone is not shown.

    Examples::

        >>> with warnings_from_rank_zero():    # the warning shows here, not on rank 1 of a torchrun run
        ...     warnings.warn("`lr` is large")    # doctest: +SKIP
    """
    if _this_rank() == 0:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _comm(tensor: Tensor) -> Tensor:
    """``tensor`` where the backend can communicate it (NCCL only moves CUDA tensors)."""
    if torch.distributed.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _in_place(collective: Callable[..., Any], tensor: Tensor, **kwargs: Any) -> None:
    """``collective(tensor, **kwargs)`` through :func:`_comm`, the result copied back into ``tensor``: a CPU
    fit in a process group that NCCL started (an earlier CUDA fit's) failed ("No backend type associated
    with device type cpu") at its first step."""
    moved = _comm(tensor)
    collective(moved, **kwargs)
    if moved is not tensor:
        tensor.copy_(moved)


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or no distributed run).

    Examples::

        >>> is_main()
        True
    """
    return world()[0] == 0


def local_batch_size(batch_size: int, n_local: Optional[int] = None) -> int:
    """This rank's share of a global ``batch_size`` (at most its number of samples).

    Args:
        batch_size: The global batch size (summed over ranks), at least the number of processes.
        n_local: Number of samples this rank holds; ``None`` where each step draws its batch anew
            (concept pairs), so nothing caps it.

    Returns:
        ``batch_size // world size``, capped at ``n_local`` when given.

    Examples::

        >>> local_batch_size(128, n_local=1000)    # 64 on each of 2 ranks under torchrun
        128
        >>> local_batch_size(128, n_local=50)
        50
    """
    _, size = world()
    if batch_size < size:
        raise ValueError(f"`batch_size` {batch_size} is smaller than the number of processes {size}; "
                         "each process needs at least one sample per step.")
    if batch_size % size:  # the docs promise a single process's optimisation with the same global batch
        warnings.warn(f"`batch_size` {batch_size} is not a multiple of the {size} processes: each draws "
                      f"{batch_size // size}, a global batch of {batch_size // size * size}; pass a multiple of {size}.",
                      UserWarning, stacklevel=user_stacklevel())
    return batch_size // size if n_local is None else min(batch_size // size, n_local)


def shard_data(data: Any) -> Any:
    """This rank's shard (every ``world``-th item, starting at ``rank``) of a tensor or ``Dataset``.

    Args:
        data: Images as a tensor or a map-style ``Dataset`` (a ``DataLoader`` cannot be resharded).

    Returns:
        ``data`` itself outside a distributed run; under torchrun ``data[rank::world]`` for a
        tensor (``(N, C, H, W)`` becomes about ``(N / world, C, H, W)``) or a ``Subset``.

    Raises:
        ValueError: under torchrun, fewer items than processes (a process would get none).
        TypeError: under torchrun, a ``DataLoader`` or data without ``len`` and indexing.

    Examples::

        >>> shard_data(torch.rand(10, 3, 4, 4)).shape   # rank 1 of 2 would get rows 1, 3, 5, 7, 9
        torch.Size([10, 3, 4, 4])
    """
    rank, size = world()
    if size == 1:
        return data
    if isinstance(data, DataLoader):
        raise TypeError("Under torchrun pass the images as a tensor or a Dataset, not a DataLoader: each process "
                        "reads its own shard of them.")
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"Under torchrun pass the images as a tensor or a map-style Dataset (with __len__ and "
                        f"__getitem__), not a {type(data).__name__}: each process reads its own shard of them.")
    n = len(data)
    if n < size:  # every process knows n, so all raise here rather than one failing alone with an empty shard
        raise ValueError(f"`data` has {n} item(s), fewer than the {size} processes of this torchrun run: each process "
                         "needs at least one; pass more images or start fewer processes.")
    if isinstance(data, Tensor):
        return data[rank::size]
    return Subset(data, range(rank, n, size))


def shard_forward_args(additional_forward_args: Any, n: Optional[int]) -> Any:
    """``additional_forward_args`` with each per-image tensor (``n`` rows first, one per image of
    the data) cut to this rank's shard, as :func:`shard_data` cuts the images; other values whole.

    Args:
        additional_forward_args: ``None``, one value or a tuple of values, as the fits take them.
        n: Number of images in the (unsharded) data; ``None`` when unknown (nothing is cut).

    Returns:
        ``additional_forward_args`` itself outside a distributed run; else a tuple.

    Examples::

        >>> shard_forward_args((torch.arange(10), "mode"), 10)   # rank 1 of 2: (tensor([1, 3, 5, 7, 9]), 'mode')
        (tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), 'mode')
    """
    if additional_forward_args is None or world()[1] == 1:
        return additional_forward_args
    return tuple(shard_data(a) if isinstance(a, Tensor) and a.dim() and a.shape[0] == n else a
                 for a in _format_additional_forward_args(additional_forward_args))


def sync_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (after a data-dependent initialisation).

    Args:
        module: The replica to overwrite in place with rank 0's values (a no-op outside torchrun).

    Examples::

        >>> flow = torch.nn.Linear(3, 3)
        >>> sync_module(flow)       # every rank now holds rank 0's weights
    """
    if world()[1] == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            _in_place(torch.distributed.broadcast, tensor.data, src=0)


def average_gradients(module: nn.Module, loss: Tensor, failed: bool = False) -> Tensor:
    """Average the gradients of ``module`` and the ``loss`` over ranks in one all-reduce.

    Args:
        module: The replica whose ``.grad`` tensors are replaced by their average over ranks.
        loss: This rank's scalar loss, shape ``()`` (after ``loss.backward()``).
        failed: This rank's step raised (its ``loss`` and gradients are ignored). It still joins the
            all-reduce, so the other ranks learn of it instead of waiting for it; the caller then
            raises its own error.

    Returns:
        The averaged loss, shape ``()`` (``loss`` itself outside a distributed run).

    Raises:
        RuntimeError: On a rank whose step did not fail, when another rank's did.

    Examples::

        >>> lin = torch.nn.Linear(3, 1)
        >>> loss = lin(torch.randn(8, 3)).pow(2).mean()
        >>> loss.backward()
        >>> average_gradients(lin, loss) is loss      # outside torchrun
        True
    """
    rank, size = world()
    if size == 1:
        return loss
    params = [p for p in module.parameters() if p.requires_grad]
    if failed:
        for p in params:
            p.grad = None
    # a parameter without a gradient on some ranks (a branch the data decides) joins with zeros there, as
    # under DistributedDataParallel: the ranks summed different tensors, and the replicas drifted apart.
    # Which ranks had one travels in the same reduction (a count per parameter)
    dtype, device = (params[0].dtype, params[0].device) if params else (torch.float32, loss.device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
                     + [torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device),
                        torch.tensor([float(failed and r == rank) for r in range(size)], dtype=dtype, device=device),
                        loss.detach().reshape(1).to(dtype=dtype, device=device)])
    _in_place(torch.distributed.all_reduce, flat)
    failures = [r for r, count in enumerate(flat[-1 - size:-1].tolist()) if count > 0]
    if failures and not failed:
        raise RuntimeError(f"Process(es) {failures} of this torchrun run failed in this training step (their own error "
                           "says why); this process stops with them instead of waiting for them.")
    offset, counts = 0, flat[-1 - size - len(params):-1 - size].tolist()
    for p, count in zip(params, counts):
        if count > 0:  # none anywhere: left without a gradient, as in one process
            averaged = flat[offset : offset + p.numel()].view_as(p) / size
            if p.grad is None:
                p.grad = averaged.to(p.dtype).clone()
            else:
                p.grad.copy_(averaged)
        offset += p.numel()
    return flat[-1] / size



def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (batch-norm running statistics) over ranks, in place.

    Each rank's running statistics follow its own minibatches; averaging them at every checkpoint
    and at the end keeps the replicas identical, and a resumed fit equal to an uninterrupted one.

    Args:
        module: The replica whose floating-point buffers are averaged (a no-op outside torchrun).

    Examples::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> average_buffers(net)    # running_mean / running_var: the mean over ranks
    """
    size = world()[1]
    if size == 1:
        return
    with torch.no_grad():
        for buffer in module.buffers():
            if buffer.is_floating_point():
                # rank 0's values plus the mean difference from them: buffers equal on every rank (an
                # embedder's input statistics) stay exactly as they are, where (x + x + x) / 3 changed
                # about one value in seven in its last bit
                first = buffer.data.clone()
                _in_place(torch.distributed.broadcast, first, src=0)
                difference = buffer.data - first
                _in_place(torch.distributed.all_reduce, difference)
                buffer.data.copy_(first + difference / size)


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's ``rows`` (equal shapes) in rank order; ``rows`` outside a distributed run.

    Args:
        rows: ``(M, *shape)``, the same shape on every rank.

    Returns:
        ``(world · M, *shape)``, rank 0's rows first (``rows`` itself outside torchrun).

    Examples::

        >>> gather_rows(torch.zeros(4, 8)).shape      # (8, 8) on 2 ranks
        torch.Size([4, 8])
    """
    _, size = world()
    if size == 1:
        return rows
    rows_comm = _comm(rows.contiguous())
    parts: List[Tensor] = [torch.empty_like(rows_comm) for _ in range(size)]
    torch.distributed.all_gather(parts, rows_comm)
    return torch.cat(parts).to(rows.device)


def gather_generator_states(generator: torch.Generator) -> List[Tensor]:
    """Every rank's minibatch RNG state, in rank order (so rank 0 can checkpoint them all).

    Args:
        generator: This rank's minibatch generator.

    Returns:
        One ``uint8`` state per rank, each of shape ``(L,)`` as ``generator.get_state()`` gives
        (``L = 5056`` for a CPU generator).

    Examples::

        >>> states = gather_generator_states(torch.Generator().manual_seed(0))
        >>> len(states), states[0].dtype
        (1, torch.uint8)
    """
    state = generator.get_state()
    _, size = world()
    if size == 1:
        return [state]
    state_comm = _comm(state)
    parts = [torch.empty_like(state_comm) for _ in range(size)]
    torch.distributed.all_gather(parts, state_comm)
    return [part.cpu() for part in parts]


def gather_texts(text: str) -> List[str]:
    """Every rank's ``text``, in rank order (so every rank can agree on, e.g., all shards' sources).

    Args:
        text: This rank's string.

    Returns:
        One string per rank.

    Examples::

        >>> gather_texts("abc")                        # one process
        ['abc']
    """
    _, size = world()
    if size == 1:
        return [text]
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    length = _comm(torch.tensor([data.numel()]))
    lengths = [torch.empty_like(length) for _ in range(size)]
    torch.distributed.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    if longest == 0:
        return [""] * size
    padded = _comm(torch.cat([data, torch.zeros(longest - data.numel(), dtype=torch.uint8)]))
    parts = [torch.empty_like(padded) for _ in range(size)]
    torch.distributed.all_gather(parts, padded)
    return [bytes(part.cpu()[: int(n)].tolist()).decode() for part, n in zip(parts, lengths)]


def barrier() -> None:
    """Wait for every rank (no-op outside a distributed run).

    Examples::

        >>> if is_main():
        ...     pass                # e.g. write a shared file once
        >>> barrier()               # the other ranks wait here until it exists
    """
    if world()[1] > 1:
        torch.distributed.barrier()


def check_replicas_agree(networks: Mapping[str, Optional[Any]]) -> None:
    """``ValueError`` when the processes of a distributed fit hold different weights or buffers of
    a network that the fit does not train (the analysed model, a given autoencoder): each process
    would compute its shard's features with another network, and the fit would run without an error.

    A network built in each process without a seed differs between them; so do batch norm's running
    statistics after a forward pass in training mode in some processes only. No-op outside a
    distributed run; ``None`` entries are skipped.

    Args:
        networks: ``{argument name: network}``, compared by
            :func:`~captum_inn.training.weights_fingerprint` (with the buffers).

    Examples::

        >>> check_replicas_agree({"model": nn.Linear(2, 2)})     # one process: nothing to compare
    """
    if world()[1] == 1:
        return
    for name, network in networks.items():
        if network is None:
            continue
        weights = gather_texts(weights_fingerprint(network))
        if len(set(weights)) > 1:
            odd = [rank for rank, p in enumerate(weights) if p != weights[0]]
            raise ValueError(
                f"`{name}` has other weights in process(es) {odd} than in process 0: every process of a torchrun "
                "fit must hold the same network. Load its weights from one file in every process, or seed its "
                "construction (torch.manual_seed) the same way in each."
            )
        with_buffers = gather_texts(weights_fingerprint(network, buffers=True))
        if len(set(with_buffers)) > 1:
            odd = [rank for rank, p in enumerate(with_buffers) if p != with_buffers[0]]
            raise ValueError(
                f"`{name}` has the same weights but other buffers (e.g. batch norm's running statistics) in "
                f"process(es) {odd} than in process 0, so its features would differ between the processes. "
                "Load its whole state_dict from one file in every process, and run it in eval() mode before "
                "the fit in each."
            )


@contextmanager
def raising_together() -> Iterator[None]:
    """Work whose error in one process stops every process of a distributed fit.

    An error raised in the block in one process only (NaN in its shard's features, too few images
    in its shard, a checkpoint folder rank 0 cannot write to) would stop that process alone and
    leave the others waiting for it in their next collective. At the block's end every process learns whether another's failed: the failed one
    raises its own error, the others a ``ValueError`` quoting it. The block must hold no collective.
    No-op outside a distributed run.

    Examples::

        >>> with raising_together():   # one process: the block's own error, if any
        ...     pass
    """
    if world()[1] == 1:
        yield
        return
    failure = None
    try:
        yield
    except Exception as error:  # re-raised below, once the other processes are told
        failure = error
    texts = gather_texts("" if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [rank for rank, text in enumerate(texts) if text]
    if failed:
        raise ValueError(f"Process {failed[0]} of this torchrun run stopped: {texts[failed[0]]}")


def check_processes_agree(name: str, record: Any, fix: str, by_key: bool = False) -> None:
    """``ValueError`` in every process of a distributed fit when ``record`` (a JSON-able description
    of a setting, e.g. :func:`~captum_inn.training.augment.augment_record`) differs between them.

    Each process checks a resumed checkpoint against its own settings; a setting that differed in
    one process only would stop that process alone and leave the others waiting for it. No-op
    outside a distributed run.

    Args:
        name: The argument, for the message.
        record: This process's description of it.
        fix: What to do, for the message.
        by_key: ``record`` is a dict of settings; the message names those that differ.

    Examples::

        >>> check_processes_agree("augment", {"Jitter": {"seed": 0}}, "pass the same one")  # one process
    """
    if world()[1] == 1:
        return
    # what JSON cannot hold compares by type: a repr may hold a memory address, which differs per process
    texts = gather_texts(json.dumps(record, sort_keys=True, default=lambda value: type(value).__qualname__))
    if len(set(texts)) > 1:
        odd = [rank for rank, text in enumerate(texts) if text != texts[0]]
        theirs, ours = json.loads(texts[odd[0]]), json.loads(texts[0])
        if by_key:  # a dict of settings: name the ones that differ
            keys = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k))
            raise ValueError(f"`{name}` differ between processes: " + "; ".join(
                f"{k} is {json.dumps(theirs.get(k))} in process {odd[0]} but {json.dumps(ours.get(k))} in process 0"
                for k in keys) + f". {fix}")
        raise ValueError(f"`{name}` is {texts[odd[0]]} in process {odd[0]} but {texts[0]} in process 0: {fix}")
