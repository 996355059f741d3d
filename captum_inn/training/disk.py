"""Arrays on disk that are read by rows, so a fit's memory does not grow with its dataset.

A :class:`DiskArray` is a float32 ``.npy`` file (NumPy's documented format, read with
``allow_pickle`` off). Indexing it reads just the requested rows with plain file reads into a
fresh tensor. Rows are not memory-mapped into the process: pages touched through a mapping count
towards the process's resident memory until the kernel reclaims them, so a fit that samples every
row would grow with the file. The kernel's page cache still keeps hot rows fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from captum_inn.training.checkpoint import (
    _new_temporary,
    _remove_stale_temporaries,
    commit_temporary,
    write_atomically,
)

try:
    import fcntl
except ImportError:  # Windows: no flock (see FolderLock)
    fcntl = None

__all__ = ["DiskArray", "DiskArrayWriter", "FolderLock", "iter_rows", "read_manifest", "write_manifest"]

_DTYPE = np.dtype("<f4")
_PREAD = hasattr(os, "preadv")
_SCAN_BYTES = 64 << 20  # iter_rows' default block
_READ_BYTES = 1 << 30  # at most one read's worth on every system


class DiskArray:
    """A read-only float32 ``.npy`` array on disk, indexed by rows like a tensor.

    Supports ``len``, ``shape``, ``array[i]``, ``array[a:b]``, ``array[mask]`` (a boolean ``(N,)`` mask) and
    ``array[index_tensor]`` (any order, repeats allowed); each returns a new CPU tensor. Also usable as a map-style ``Dataset``
    of images (``array[i]`` is one image).

    Args:
        path: A C-ordered little-endian float32 ``.npy`` file (as :class:`DiskArrayWriter` writes).

    Examples::

        >>> import tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "a.npy")
        >>> np.save(p, np.arange(12, dtype="<f4").reshape(4, 3))
        >>> a = DiskArray(p)
        >>> a.shape, a[torch.tensor([3, 0, 3])][:, 0].tolist()
        (torch.Size([4, 3]), [9.0, 0.0, 9.0])
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
            except ValueError as error:
                raise ValueError(f"{str(self.path)!r} is not a readable .npy file ({error}).") from None
            self._offset = f.tell()
        if fortran or np.dtype(dtype) != _DTYPE or len(shape) < 1:
            raise ValueError(f"{str(self.path)!r} must hold a C-ordered float32 array, found {dtype} "
                             f"{'Fortran' if fortran else 'C'}-ordered with shape {shape}.")
        self.shape = torch.Size(shape)
        self._row_shape = tuple(shape[1:])
        self._row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * _DTYPE.itemsize
        expected = self._offset + self._row_bytes * shape[0]
        if self.path.stat().st_size != expected:
            state = "truncated" if self.path.stat().st_size < expected else "longer than its header says"
            raise ValueError(f"{str(self.path)!r} is {state}: {self.path.stat().st_size} bytes, "
                             f"{expected} expected for shape {shape}. Recompute it.")
        self._file = open(self.path, "rb", buffering=0)
        self._lock = threading.Lock()  # where there is no pread: seek + read must not interleave between threads

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, (int, np.integer)):
            return self[torch.tensor([int(index)])][0]
        if isinstance(index, slice):  # its rows only (an index of every row made a scan by slices quadratic)
            return self[torch.from_numpy(np.arange(*index.indices(len(self))))]  # empty for [5:2], as a tensor
        if isinstance(index, tuple):
            raise IndexError(f"A DiskArray is indexed by rows only (an int, a slice, row numbers or a mask), "
                             f"got the tuple {index!r}; read the rows first, then index them: array[rows][...].")
        rows = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
        if rows.dtype == np.bool_:  # a mask, as a tensor reads it (not rows 0 and 1)
            if rows.shape != (len(self),):
                raise IndexError(f"A boolean mask of shape {rows.shape} for {len(self)} rows; pass one of shape "
                                 f"({len(self)},).")
            rows = np.flatnonzero(rows)
        elif rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise IndexError(f"Row indices must be integers or a boolean mask, got {rows.dtype}; convert them "
                             "with .long().")
        index_shape = rows.shape  # a 0-d index gives one row, an (A, B) index (A, B, *row), as a tensor does
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"Row index out of range for {len(self)} rows.")
        rows = np.where(rows < 0, rows + len(self), rows)
        unique, inverse = np.unique(rows, return_inverse=True)
        buffer = np.empty((unique.size, *self._row_shape), dtype=_DTYPE)
        # read runs of consecutive rows with one call each
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for run in np.split(np.arange(unique.size), breaks):
            if run.size:
                self._read_into(memoryview(buffer[run[0] : run[-1] + 1].reshape(-1).view(np.uint8)),
                                self._offset + int(unique[run[0]]) * self._row_bytes)
        out = buffer if np.array_equal(unique, rows) else buffer[inverse.reshape(-1)]
        return torch.from_numpy(out.reshape(*index_shape, *self._row_shape))

    def _read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from the file at ``offset``. Positioned reads (pread) leave the descriptor's
        position alone: DataLoader workers forked from one process share it, and a seek in one
        between another's seek and read gave that one another row. One read returns at most about
        2 GiB on Linux (macOS refuses a longer one), so a run is read in parts of at most 1 GiB."""
        done = 0
        while done < len(view):
            part = view[done : done + _READ_BYTES]  # macOS refuses a preadv over 2 GiB (EINVAL), not shortens it
            if _PREAD:
                got = os.preadv(self._file.fileno(), [part], offset + done)
            else:  # Windows, where workers are spawned and reopen the file
                with self._lock:
                    self._file.seek(offset + done)
                    got = self._file.readinto(part)
            if not got:
                raise ValueError(f"{str(self.path)!r} ended early; it was changed or truncated.")
            done += got

    def close(self) -> None:
        """Close the file (the array cannot be read afterwards)."""
        self._file.close()

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers reopen the file
        return {"path": str(self.path)}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"DiskArray({str(self.path)!r}, shape={tuple(self.shape)})"


class DiskArrayWriter:
    """Write a float32 ``.npy`` file row block by row block (the rows never sit in memory together).

    The file is written under a temporary name of its own and renamed when :meth:`close` finds all rows
    written, so a half-written array is never mistaken for a complete one.

    Args:
        path: Target ``.npy`` file.
        n_rows: Total number of rows.
        row_shape: Shape of one row.

    Examples::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.npy")
        >>> with DiskArrayWriter(p, 3, (2,)) as w:
        ...     w.append(torch.ones(2, 2)); w.append(torch.zeros(1, 2))
        >>> DiskArray(p)[:].sum().item()
        4.0
    """

    def __init__(self, path: Union[str, os.PathLike], n_rows: int, row_shape: Sequence[int]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.n_rows, self.row_shape, self.written = int(n_rows), tuple(int(s) for s in row_shape), 0
        _remove_stale_temporaries(self.path)  # left by a pass that was killed
        # its own temporary file (locked while written): another pass into the folder cannot write into it
        tmp, fd = _new_temporary(self.path)
        self._tmp, self._file = Path(tmp), os.fdopen(fd, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(_DTYPE), "fortran_order": False,
                  "shape": (self.n_rows, *self.row_shape)}
        np.lib.format.write_array_header_2_0(self._file, header)

    def append(self, rows: Tensor) -> None:
        """Append a block of rows ``(B, *row_shape)``."""
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"Rows of shape {tuple(rows.shape[1:])} do not match {self.row_shape} in {str(self.path)!r}.")
        if self.written + rows.shape[0] > self.n_rows:
            raise ValueError(f"More than the announced {self.n_rows} rows written to {str(self.path)!r}.")
        with self._naming_write_errors():
            self._file.write(rows.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.written += rows.shape[0]

    def close(self) -> Path:
        """Finish the file (fsync, rename into place) and return its path."""
        if self._file.closed:
            return self.path
        if self.written != self.n_rows:
            self.abort()
            raise ValueError(f"{str(self.path)!r}: {self.written} rows written, {self.n_rows} announced.")
        with self._naming_write_errors():
            commit_temporary(self._file, self._tmp, self.path)
        return self.path

    @contextlib.contextmanager
    def _naming_write_errors(self) -> Iterator[None]:
        """A full disk said "No space left on device" alone, naming neither the file nor the cache."""
        try:
            yield
        except OSError as error:
            if error.filename is not None:
                raise
            size = (self.n_rows * int(np.prod(self.row_shape, dtype=np.int64)) * _DTYPE.itemsize) / 2**20
            raise OSError(error.errno, f"{error.strerror}, writing the feature cache file {str(self.path)!r} "
                          f"({self.n_rows:,} rows of {self.row_shape}, {size:,.1f} MiB; the partial file is removed): "
                          "free space there, or cache the features in another folder", str(self.path)) from error

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._file.closed:
            # closing flushes, which fails again on a full disk: the file is dropped all the same
            with contextlib.suppress(OSError):
                self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DiskArrayWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


# the FolderLocks this process holds: a forked child (a DataLoader worker started during a cache pass)
# inherits their descriptors, and flock holds while any copy is open, so the child closes its copies
_HELD: weakref.WeakSet = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # not LOCK_UN: that would release the parent's lock too


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class FolderLock:
    """A lock on a cache folder (``flock`` on its ``.lock`` file): exclusive while a pass writes the
    folder's arrays and manifest, shared while a finished cache is opened. Two passes into one folder
    then run one after the other instead of mixing their files and manifests, and a reader never pairs
    one pass's manifest with another's files. The kernel releases it when the process dies.

    Waiting for another holder warns first. A no-op where the platform has no ``flock`` (Windows) or
    the file system refuses it, and for a reader that cannot create the lock file (a read-only
    folder, where no pass can be writing).

    Args:
        folder: An existing folder.
        shared: Take the reader's (shared) lock instead of the writer's (exclusive) one.

    Examples::

        >>> import tempfile
        >>> with FolderLock(tempfile.mkdtemp()):
        ...     pass                          # write the folder's files and manifest here
    """

    NAME = ".lock"

    def __init__(self, folder: Union[str, os.PathLike], shared: bool = False) -> None:
        self._fd: Optional[int] = None
        if fcntl is None:
            return
        path = Path(folder) / self.NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            # another user's lock file (mode 0644 in a shared folder): flock works on a read-only handle too
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                if not shared:
                    raise
                return
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                # attr imports the training package
                from captum_inn.attr._common import user_stacklevel

                warnings.warn(f"{str(folder)!r} is being written by another feature-cache pass; waiting for it to "
                              "finish.", UserWarning, stacklevel=user_stacklevel())
                fcntl.flock(fd, mode)
        except OSError:  # a file system without locks (NFS without its lock daemon): unlocked, as on Windows
            os.close(fd)
            return
        except BaseException:  # interrupted while waiting
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(self)

    def release(self) -> None:
        """Release the lock (again: no-op)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __del__(self) -> None:  # a lock whose holder is gone must not block the folder until the process ends
        with contextlib.suppress(Exception):  # at interpreter exit `os` may be gone
            self.release()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def iter_rows(array: Union[Tensor, DiskArray], chunk: Optional[int] = None) -> Iterator[Tensor]:
    """Blocks of ``chunk`` rows of a tensor or a :class:`DiskArray` (for scans that must not load it all).

    Args:
        array: ``(N, *row_shape)`` tensor or :class:`DiskArray`.
        chunk: Rows per block; by default as many as fit in 64 MiB (at least one), so a scan's
            memory does not grow with the rows' size either.

    Yields:
        ``(B, *row_shape)`` tensors with ``B = chunk`` (the last block may be shorter): views of a
        tensor, new CPU tensors read from a :class:`DiskArray`.

    Examples::

        >>> [tuple(block.shape) for block in iter_rows(torch.zeros(10, 3), chunk=4)]
        [(4, 3), (4, 3), (2, 3)]
    """
    if chunk is None:
        row_bytes = int(np.prod(tuple(array.shape[1:]), dtype=np.int64)) * array.dtype.itemsize
        chunk = max(1, _SCAN_BYTES // max(1, row_bytes))
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:  # a negative one yielded nothing: a scan passed
        raise ValueError(f"`chunk` must be an int >= 1 (rows per block) or None, got {chunk!r}.")
    for start in range(0, len(array), chunk):
        yield array[start : start + chunk]


def write_manifest(folder: Union[str, os.PathLike], document: Dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (it is written last: its presence marks a complete folder).

    Args:
        folder: An existing folder.
        document: JSON-serialisable content.

    Returns:
        The path of ``manifest.json``.

    Examples::

        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> write_manifest(folder, {"rows": 10}).name
        'manifest.json'
        >>> read_manifest(folder)
        {'rows': 10}
    """
    path = Path(folder) / "manifest.json"
    write_atomically(path, json.dumps(document, indent=1).encode())
    return path


def read_manifest(folder: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The folder's ``manifest.json``, or ``None`` when the folder is incomplete.

    Args:
        folder: The folder to read.

    Returns:
        The manifest's content, or ``None`` when there is no ``manifest.json``.

    Raises:
        ValueError: The manifest exists but cannot be read or parsed.

    Examples::

        >>> import tempfile
        >>> read_manifest(tempfile.mkdtemp()) is None       # nothing written yet
        True
    """
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is unreadable ({error}); delete the folder to recompute it.") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{str(path)!r} holds a {type(manifest).__name__}, not a manifest; delete the folder to "
                         "recompute it.")
    return manifest
