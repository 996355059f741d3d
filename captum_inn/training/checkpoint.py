"""Checkpoints that are written atomically and never unpickled.

One checkpoint is one ``.safetensors`` file: the tensors (module state, optimiser state, RNG state)
plus a JSON document in the file's metadata (format version, what the module is, its config, the
step). Writing goes to a temporary file in the same folder, is fsynced, then renamed over the old
file, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

try:
    import fcntl
except ImportError:  # Windows: a file another process holds open cannot be deleted there anyway
    fcntl = None
_LOCKING = fcntl is not None  # a temporary file is renamed while still open (and locked)

__all__ = ["FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "check_checkpoint_path"]

FORMAT_VERSION = 1
_META_KEY = "captum_inn"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, newer, or for something else.

    A subclass of ``ValueError``.

    Examples::

        >>> load_checkpoint("no/such/file.safetensors")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        CheckpointError: No checkpoint at 'no/such/file.safetensors'.
    """


def save_checkpoint(path: PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and the JSON-serialisable ``meta`` to ``path`` atomically.

    Args:
        path: Target file (conventionally ``*.safetensors``); its folder is created.
        tensors: Name to tensor, each of any shape (moved to CPU, made contiguous; views of one
            tensor are copied apart).
        meta: JSON-serialisable description; ``format_version`` is added.

    Returns:
        The path written.

    Examples::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ck.safetensors")
        >>> _ = save_checkpoint(p, {"w": torch.ones(2)}, {"kind": "demo"})
        >>> tensors, meta = load_checkpoint(p, kind="demo")
        >>> tensors["w"].tolist(), meta["format_version"]
        ([1.0, 1.0], 1)
    """
    path = creatable_path(path, "path")
    if path.is_dir():  # os.replace failed with a raw IsADirectoryError naming the hidden temporary
        raise IsADirectoryError(f"{str(path)!r} is a folder; pass a file path in it, e.g. "
                                f"{str(path / 'name.safetensors')!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    document = dict(meta)
    document["format_version"] = FORMAT_VERSION
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    storages = set()
    for k, v in payload.items():  # safetensors refuses tensors that share memory (views of one tensor)
        if v.untyped_storage().data_ptr() in storages:
            payload[k] = v.clone()
        storages.add(v.untyped_storage().data_ptr())
    try:
        text = json.dumps(document)
    except (TypeError, ValueError) as error:  # a tensor in an INN's fit_info: json's message named no key
        raise TypeError(f"The checkpoint's description holds a value JSON cannot store ({error}); keep plain "
                        "numbers, strings, lists and dicts there (e.g. in `fit_info`: tensor.tolist()).") from None
    blob = save(payload, metadata={_META_KEY: text})
    try:
        write_atomically(path, blob)
    except OSError as error:
        if error.filename is None:  # a full disk: "No space left on device" alone
            raise OSError(error.errno, f"{error.strerror}, writing the checkpoint {str(path)!r} ({len(blob):,} bytes; "
                          "the previous checkpoint there, if any, is intact)", str(path)) from error
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some file systems cannot fsync a directory; the data itself is synced
        pass
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing: into a temporary file of its own beside it (a
    concurrent writer never writes into it), then :func:`commit_temporary`. An interrupted or failed
    write leaves the previous file as it was and no temporary behind."""
    _remove_stale_temporaries(path)
    tmp, fd = _new_temporary(path)
    file = os.fdopen(fd, "wb")
    try:
        file.write(data)
        commit_temporary(file, tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            file.close()
        Path(tmp).unlink(missing_ok=True)
        raise


def commit_temporary(file: BinaryIO, tmp: Union[str, os.PathLike], path: Path) -> None:
    """Make the written temporary file ``tmp`` (open as ``file``) the file at ``path``, and close it:
    synced to the disk first, then renamed while still open, and so still locked, where files lock
    (no other writer's clean-up of stale temporaries removes it), or after closing on Windows (which
    renames only closed files)."""
    file.flush()
    os.fsync(file.fileno())
    if _LOCKING:
        os.replace(tmp, path)
    file.close()
    if not _LOCKING:
        os.replace(tmp, path)


def _temporaries(path: Path) -> str:
    """The glob of ``path``'s temporary files: its name escaped (``[``, ``*``, ``?`` are literal) and
    exactly the 16 hex digits that :func:`_new_temporary` adds, so no other file's temporaries match."""
    return f".{glob.escape(path.name)}.{'[0-9a-f]' * 16}.tmp"


def _new_temporary(path: Path) -> Tuple[str, int]:
    """A fresh temporary file beside ``path``: its name and a descriptor open for writing, locked
    (``flock``) where the platform has it, so that a concurrent writer's clean-up sees it is alive."""
    while True:
        # created with mode 0666 less the umask, like any other file the user writes (mkstemp would give 0600)
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if fcntl is None:
            return tmp, fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (NFS without its lock daemon): clean-ups cannot
            return tmp, fd  # lock it either, so they leave it alone (_remove_stale_temporaries)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        if os.fstat(fd).st_nlink:
            return tmp, fd
        os.close(fd)  # another writer's clean-up removed it before the lock was taken: take another


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` that writers killed mid-write left behind; those a live
    writer holds (locked, or open on Windows) stay."""
    for stale in path.parent.glob(_temporaries(path)):
        with contextlib.suppress(OSError):
            if fcntl is None:
                stale.unlink()
                continue
            fd = os.open(stale, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer is alive
                stale.unlink()
            finally:
                os.close(fd)


def creatable_path(path: PathLike, name: str) -> Path:
    """``path`` as a ``Path``, refused (``ValueError`` naming argument ``name``) where it starts with
    ``~``: Python does not expand it, so the folders about to be created would be a folder literally
    named ``~`` in the working directory (one a later ``rm -rf ~...`` would aim at the home folder).

    Examples::

        >>> creatable_path("runs/fit.safetensors", "checkpoint").name
        'fit.safetensors'
    """
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith("~"):
        raise ValueError(f"`{name}` {text!r} starts with '~', which Python does not expand (a folder named '~' would "
                         f"be made here); pass os.path.expanduser({text!r}).")
    return Path(text)


def check_checkpoint_path(path: PathLike, name: str = "checkpoint") -> Path:
    """Fail before any training when no checkpoint can be written at ``path``.

    A fit learns of an unwritable location otherwise only at its first checkpoint, after minutes
    of work. The folder is created (as :func:`~captum_inn.training.save_checkpoint` would) and a probe file written and
    removed.

    Args:
        path: The checkpoint file.
        name: The argument's name, for the error message.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``path`` is a folder, or its folder cannot be created or written to.

    Examples::

        >>> import tempfile, os
        >>> check_checkpoint_path(os.path.join(tempfile.mkdtemp(), "new", "fit.safetensors")).name
        'fit.safetensors'
    """
    path = creatable_path(path, name)
    if path.is_dir():
        raise ValueError(f"`{name}` {str(path)!r} is a folder; pass a file path in it, e.g. {str(path / 'fit.safetensors')!r}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{secrets.token_hex(8)}.probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        # mkdir's "File exists" for a checkpoint_dir that is a file did not say which file
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{str(blocking)!r} is a file, not a folder" if blocking is not None else error.strerror or error
        raise ValueError(
            f"No checkpoint can be written at `{name}` {str(path)!r} ({reason}); pass a path in a "
            "folder you can write to."
        ) from None
    return path


def load_checkpoint(
    path: PathLike, kind: Optional[str] = None, map_location: Union[str, torch.device] = "cpu"
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a checkpoint written by :func:`~captum_inn.training.save_checkpoint`, checking it before returning.

    Args:
        path: The ``.safetensors`` file.
        kind: If given, the ``kind`` the metadata must declare (e.g. ``"invariance_inn"``).
        map_location: Device for the tensors.

    Returns:
        ``(tensors, meta)``: ``{name: tensor}`` with the shapes and dtypes they were saved with,
        and the metadata dict.

    Raises:
        ValueError: a ``map_location`` this machine cannot use (``"cuda"`` without a GPU).
        CheckpointError: a folder, a missing or truncated file, a damaged header or metadata; no captum_inn
            metadata; a newer format version; another kind. (safetensors stores no checksum, so
            bits flipped inside the tensor data itself load without an error.)

    Examples::

        tensors, meta = load_checkpoint("ae.safetensors", kind="autoencoder")   # CheckpointError if not
        meta["config"]["latent_dim"]                     # the fit's settings
        {name: t.shape for name, t in tensors.items()}   # as saved
    """
    from captum_inn.attr._common import as_device

    # before the file is read: an unusable device was reported as a corrupted checkpoint, to be deleted
    device = as_device(map_location, "map_location")
    path = Path(path)
    if path.is_dir():
        what = ("a memory-mapped feature cache; open it with FeatureCache.open" if (path / "manifest.json").exists()
                else "pass a file in it (a checkpoint_dir holds one per layer: checkpoint_name(layer))")
        raise CheckpointError(f"{str(path)!r} is a folder, not a checkpoint file: {what}.")
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {str(path)!r}.")
    try:  # a file this process may not read is not a damaged one (safetensors calls both "not found")
        open(path, "rb").close()
    except OSError as exc:
        raise CheckpointError(f"Checkpoint {str(path)!r} cannot be read ({exc.strerror or exc}); give this user read "
                              "access to it, or pass another path.") from None
    try:

        # one open for the metadata and the tensors: a fit replacing the file between two opens gave the
        # metadata of one step with the weights of the next
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is truncated or corrupted ({exc}); delete it to start over, "
            "or restore it from a copy."
        ) from exc
    if raw_meta is None:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a captum_inn checkpoint.")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"Checkpoint {str(path)!r} has corrupted metadata ({exc}).") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"Checkpoint {str(path)!r} has corrupted metadata (a JSON {type(meta).__name__}, "
                              "not an object).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} has format version {version!r}; this captum_inn reads versions "
            f"up to {FORMAT_VERSION}. Upgrade captum_inn to load it."
        )
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds kind {meta.get('kind')!r}, expected {kind!r}."
        )
    if device.type != "cpu":
        tensors = {key: tensor.to(device) for key, tensor in tensors.items()}
    return tensors, meta


@contextlib.contextmanager
def building_from(path: PathLike):
    """Turn the errors of building a module from a checkpoint's metadata (a missing or unknown
    setting, a wrong value) into one :class:`CheckpointError` naming the file. The block runs with
    PyTorch's global generators seeded and the caller's states back after: a module's initial
    weights, replaced by the file's, drew from the caller's stream.

    Examples::

        >>> with building_from("ae.safetensors"):  # doctest: +IGNORE_EXCEPTION_DETAIL
        ...     {}["model"]
        Traceback (most recent call last):
        ...
        CheckpointError: Checkpoint 'ae.safetensors' does not describe a module this version can build ...
    """
    from captum_inn._random import seeded_global_rng

    try:
        with seeded_global_rng(0):
            yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not describe a module this version can build ({type(error).__name__}: "
            f"{error}); it is damaged or was edited. Restore it from a copy, or fit again."
        ) from error


def load_module_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], path: PathLike,
                      prefix: str = "model.") -> None:
    """Load the tensors under ``prefix`` into ``module``, refusing missing, extra, misshapen or
    non-finite ones with a :class:`CheckpointError` (a damaged file, not a silent NaN model).

    Args:
        module: The freshly built module.
        tensors: ``{name: tensor}`` as :func:`load_checkpoint` returns them, each of the shape of
            the module's entry.
        path: The checkpoint, named in errors.
        prefix: The prefix of the module's entries.

    Examples::

        >>> net = torch.nn.Linear(2, 1)
        >>> load_module_state(net, {"model.weight": torch.ones(1, 2), "model.bias": torch.zeros(1)}, "ck.safetensors")
        >>> net.weight.sum().item()
        2.0
    """
    state = strip_prefix(tensors, prefix)
    bad = non_finite_entries(state)
    if bad:
        raise CheckpointError(f"Checkpoint {str(path)!r} holds NaN or infinite values in {', '.join(bad[:3])}"
                              f"{' …' if len(bad) > 3 else ''}; restore it from a copy, or fit again.")
    mismatch = dtype_mismatch(module.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"Checkpoint {str(path)!r} holds {mismatch}: it was edited or damaged; restore it from "
                              "a copy, or fit again.")
    floating = {value.dtype for value in state.values() if value.is_floating_point()}
    own = {value.dtype for value in module.state_dict().values() if value.is_floating_point()}
    if len(floating) == 1 and floating != own:
        # a network comes back in the dtype it was saved in: load_state_dict cast it to the module's,
        # which is the default dtype's (a float32 INN built under a float64 default came back float64)
        module.to(next(iter(floating)))
    with building_from(path):
        module.load_state_dict(state)


def non_finite_entries(state: Mapping[str, torch.Tensor]) -> List[str]:
    """The names of ``state``'s floating-point tensors that hold NaN or infinite values."""
    return [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def dtype_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """A phrase naming the first entry of ``state`` whose kind of dtype differs from ``own``'s
    (integers or booleans for floating weights, which ``load_state_dict`` casts silently, or the
    reverse, or another integer dtype); ``None`` if none does."""
    for key, value in own.items():
        if key not in state:
            continue
        saved = state[key]
        if saved.is_floating_point() != value.is_floating_point() or (
                not value.is_floating_point() and saved.dtype != value.dtype):
            return f"{key!r} as {saved.dtype} where the module keeps {value.dtype}"
    return None


def warn_if_unfinished(path: PathLike, step: Any, steps: Any, fit: str, argument: str) -> None:
    """Warn when a fit's checkpoint holds fewer steps than the fit was asked for (it was stopped).

    Examples::

        >>> warn_if_unfinished("ae.safetensors", 3000, 3000, "fit_autoencoder", "checkpoint")   # finished: silent
    """
    if isinstance(step, int) and isinstance(steps, int) and step < steps:
        # attr imports the training package
        from captum_inn.attr._common import user_stacklevel

        warnings.warn(
            f"{str(path)!r} is a checkpoint of an unfinished {fit} (step {step} of {steps}); call {fit} again "
            f"with the same `{argument}` and steps={steps} to finish it.", UserWarning, stacklevel=user_stacklevel(),
        )


def read_header(path: Optional[PathLike]) -> Optional[Dict[str, Any]]:
    """The metadata of the checkpoint at ``path``, read from the file's header alone; ``None``
    where there is no readable checkpoint (a resume reports an unreadable one itself).

    Examples::

        >>> read_header(None) is None
        True
    """
    if path is None or not Path(path).is_file():
        return None
    try:

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
        return meta if isinstance(meta, dict) and isinstance(meta.get("config"), dict) else None
    except Exception:
        return None


def finished_checkpoint(path: Optional[PathLike], steps: int) -> bool:
    """Whether ``path`` holds a fit's checkpoint of at least ``steps`` steps (read from its header
    alone): resuming it trains and writes nothing.

    Examples::

        >>> finished_checkpoint(None, 100)
        False
    """
    meta = read_header(path)
    step = None if meta is None else meta.get("step")
    return isinstance(step, int) and not isinstance(step, bool) and step >= steps


def recorded_config_has(path: Optional[PathLike], key: str, default: bool) -> bool:
    """Whether the checkpoint at ``path`` records ``key`` in its ``config`` (read from the header
    alone); ``default`` where there is no readable checkpoint. A fit records a new entry only where
    an older checkpoint it resumes has it too, so checkpoints of older versions still resume.

    Examples::

        >>> recorded_config_has(None, "source", default=True)   # no checkpoint yet: record it
        True
    """
    meta = read_header(path)
    return default if meta is None else key in meta["config"]


def module_tensors(module: torch.nn.Module, prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """The module's state dict under ``prefix`` (safetensors cannot hold shared storage: clone)."""
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split an optimiser's state dict into tensors and a JSON-serialisable rest (no pickle); the rest
    lists the parameters that have a state, so that a state removed from the file is noticed."""
    state = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{pid}.{key}"] = value.detach().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    # a rate held in a tensor (a captured CUDA step reads it there) is stored as the number it holds
    groups = [{k: float(v) if torch.is_tensor(v) else v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "with_state": sorted(int(p) for p in state["state"])}


# How an optimiser runs, not what it learned: a resumed fit keeps its own (a checkpoint written by a
# CUDA-graph fit, capturable=True, must load into a CPU fit, which cannot capture).
_IMPLEMENTATION_FLAGS = ("capturable", "foreach", "fused", "differentiable")


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str = "optim."
) -> None:
    """Inverse of :func:`optimizer_tensors`.

    Raises:
        ValueError: a state that is not whole, as Adam keeps it: parameters with a state other than
            those the file lists, a moment missing, of another shape, or not floating-point (the
            step failed on it later, or a removed state restarted silently); a moment with NaN or
            infinite values (or a negative second moment); settings other than the rate that
            differ from ``optimizer``'s (an edited or damaged file).
    """
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for pid, scalars in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(scalars)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if "with_state" in meta and sorted(state) != sorted(meta["with_state"]):  # absent in older checkpoints
        raise ValueError(f"the optimiser state holds parameters {sorted(state)[:5]}, the file lists "
                         f"{sorted(meta['with_state'])[:5]}")
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        for pid, pstate in state.items():
            param = params[pid] if 0 <= pid < len(params) else None
            for key in ("step", "exp_avg", "exp_avg_sq"):
                value = pstate.get(key)
                if value is None:
                    raise ValueError(f"the optimiser state of parameter {pid} has no {key!r}")
                if key != "step" and (param is None or not torch.is_tensor(value) or not value.is_floating_point()
                                      or value.shape != param.shape):
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    raise ValueError(f"the optimiser's {key!r} of parameter {pid} is {shape}, not a moment of its "
                                     f"shape {tuple(param.shape) if param is not None else '(no such parameter)'}")
                # a NaN moment failed the first step as "lower the learning rate"; an infinite second moment froze
                # its weight for the rest of the fit, silently
                if key != "step" and not (torch.isfinite(value).all() and (key == "exp_avg" or (value >= 0).all())):
                    raise ValueError(f"the optimiser's {key!r} of parameter {pid} holds NaN, infinite"
                                     f"{' or negative' if key == 'exp_avg_sq' else ''} values")
    # Moments in their parameter's memory layout (channels-last convolutions), not the file's
    # contiguous one: Adam's update then pairs like with like without copies, and PyTorch's fused
    # Adam kernel, which walks memory in order, would pair the wrong elements otherwise.
    for pid, pstate in state.items():
        param = params[pid] if 0 <= pid < len(params) else None
        for key, value in pstate.items():
            if param is not None and isinstance(value, torch.Tensor) and value.shape == param.shape:
                pstate[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    # the file's settings were taken as they were: an edited or damaged `maximize` or `eps` trained silently. The
    # rate is the one that may differ (the schedule's at the save; train_loop checks it); any other is refused
    def as_stored(value: Any) -> Any:  # as the file's JSON holds it: tuples as lists, tensors as numbers
        return json.loads(json.dumps(float(value) if torch.is_tensor(value) else value))

    for saved, current in zip(meta["param_groups"], optimizer.param_groups):
        differing = sorted(key for key, value in saved.items() if key in current and key not in
                           ("params", "lr", "initial_lr", *_IMPLEMENTATION_FLAGS)
                           and as_stored(current[key]) != as_stored(value))
        if differing:
            raise ValueError(f"the optimiser's settings differ from this fit's in {differing} (the file was edited "
                             "or damaged)")
    groups = [{**saved, **{k: current[k] for k in _IMPLEMENTATION_FLAGS if k in current}}
              for saved, current in zip(meta["param_groups"], optimizer.param_groups)]
    rate_tensors = [group["lr"] if torch.is_tensor(group["lr"]) else None for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for group, rate in zip(optimizer.param_groups, rate_tensors):
        if rate is not None:  # keep the tensor, with the stored value
            group["lr"] = rate.fill_(float(group["lr"]))
