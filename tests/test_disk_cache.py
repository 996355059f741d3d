"""Feature caches on disk: row reads equal the in-memory cache, fits are identical, incomplete or
damaged folders are never used, and a resumed fit reuses the folder without rerunning the model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers_training import TINY, CountingCNN

from captum_inn.models import SmallCNN
from captum_inn.training import FeatureCache, cache_features, fit_invariances
from captum_inn.training.cache import _PROBE_IMAGES
from captum_inn.training.disk import DiskArray, DiskArrayWriter
from captum_inn.training.invariances import CACHE_DIR

torch.set_num_threads(1)

LAYERS = ["relu1", "fc", "logits"]


def test_disk_array_indexes_like_a_tensor(tmp_path):
    data = torch.randn(50, 3, 4)
    np.save(tmp_path / "a.npy", data.numpy())
    array = DiskArray(tmp_path / "a.npy")
    assert array.shape == data.shape and len(array) == 50
    index = torch.tensor([7, 3, 3, 49, 0, 8, 9, 10, -1])
    assert torch.equal(array[index], data[index])
    assert torch.equal(array[5], data[5]) and torch.equal(array[10:20:3], data[10:20:3]) and torch.equal(array[:], data)
    for part in (slice(5, 2), slice(-2, 3), slice(None, None, -1), slice(40, 5, -7)):
        expected = data.numpy()[part]  # torch has no negative steps
        assert array[part].shape == expected.shape and np.array_equal(array[part].numpy(), expected), part
    with pytest.raises(IndexError, match="out of range"):
        array[torch.tensor([50])]
    # -len is the first row, as for a tensor; one further is out of range
    assert torch.equal(array[torch.tensor([-50, -49])], data[torch.tensor([-50, -49])])
    with pytest.raises(IndexError, match="out of range"):
        array[torch.tensor([-51])]


def test_disk_array_keeps_the_shape_of_its_index_as_a_tensor_does(tmp_path):
    """A 0-d index (an element of torch.arange) gave a batch of one row, a 2-d index a flat batch."""
    data = torch.randn(6, 2)
    np.save(tmp_path / "a.npy", data.numpy())
    array = DiskArray(tmp_path / "a.npy")
    for index in (torch.tensor(4), torch.tensor([[0, 5], [5, 1]]), torch.tensor([[3]]), np.int64(2)):
        assert torch.equal(array[index], data[torch.as_tensor(index)])


def test_disk_array_reads_a_mask_as_a_tensor_does_and_refuses_other_indices(tmp_path):
    data = torch.randn(6, 2)
    np.save(tmp_path / "a.npy", data.numpy())
    array = DiskArray(tmp_path / "a.npy")
    mask = torch.tensor([False, True, False, True, True, False])
    assert torch.equal(array[mask], data[mask]) and torch.equal(array[mask.numpy()], data[mask])
    assert array[[]].shape == (0, 2)
    for bad, match in ((mask[:4], "boolean mask of shape"), (torch.tensor([1.7]), "must be integers"),
                       ((0, 1), "by rows only")):
        with pytest.raises(IndexError, match=match):
            array[bad]


class _RowNumbers(torch.utils.data.Dataset):
    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return i, self.array[i]


@pytest.mark.skipif(not hasattr(os, "preadv") or "fork" not in torch.multiprocessing.get_all_start_methods(),
                    reason="forked DataLoader workers and positioned reads are POSIX-only")
def test_forked_loader_workers_read_the_rows_they_ask_for(tmp_path):
    """Forked workers share the array's file descriptor, and so its position: with seek + read, one
    worker's seek between another's seek and read gave that one another row, silently (about 3% of
    rows wrong with two workers). Positioned reads leave the position alone."""
    from torch.utils.data import DataLoader

    n = 20000
    np.save(tmp_path / "rows.npy", np.repeat(np.arange(n, dtype="<f4")[:, None], 16, axis=1))
    array = DiskArray(tmp_path / "rows.npy")
    position = os.lseek(array._file.fileno(), 0, os.SEEK_CUR)
    array[torch.tensor([5, 900, 901])]
    assert os.lseek(array._file.fileno(), 0, os.SEEK_CUR) == position  # the state the workers share
    loader = DataLoader(_RowNumbers(array), batch_size=64, shuffle=True, num_workers=2,
                        multiprocessing_context="fork", generator=torch.Generator().manual_seed(0))
    wrong = sum(int((rows != index[:, None].float()).any(1).sum()) for index, rows in loader)
    assert wrong == 0


def test_disk_array_reads_a_run_in_as_many_reads_as_the_system_needs(tmp_path, monkeypatch):
    """One read returns at most about 2 GiB on Linux, and a run of rows longer than that was
    reported as a truncated file (a layer of 800 KB per image, 4096 images per scanned block)."""
    from captum_inn.training import disk

    data = torch.randn(40, 3, 5)
    np.save(tmp_path / "a.npy", data.numpy())
    calls = []
    if disk._PREAD:
        preadv = os.preadv

        def short_read(fd, buffers, offset):
            calls.append(offset)
            return preadv(fd, [buffers[0][:100]], offset)

        monkeypatch.setattr(disk.os, "preadv", short_read)
    array = DiskArray(tmp_path / "a.npy")
    if not disk._PREAD:
        real = array._file

        class ShortReads:
            def __getattr__(self, name):
                return getattr(real, name)

            def readinto(self, view):
                calls.append(real.tell())
                return real.readinto(view[:100])

        array._file = ShortReads()
    assert torch.equal(array[:], data) and torch.equal(array[torch.tensor([3, 39, 4])], data[[3, 39, 4]])
    assert len(calls) > 40 * 3 * 5 * 4 // 100  # the runs really came back in pieces
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-60])  # cut under the open array
    with pytest.raises(ValueError, match="ended early"):
        array[:]


def test_disk_array_reads_a_long_run_in_parts(tmp_path, monkeypatch):
    """macOS refuses a preadv over 2 GiB (EINVAL) rather than shortening it: runs are read in parts
    of at most 1 GiB, here made small."""
    from captum_inn.training import disk

    data = torch.randn(30, 7)
    np.save(tmp_path / "a.npy", data.numpy())
    monkeypatch.setattr(disk, "_READ_BYTES", 3 * 7 * 4)  # three rows per read
    array = DiskArray(tmp_path / "a.npy")
    reads = []
    if disk._PREAD:
        preadv = os.preadv

        def counted(fd, buffers, offset):
            assert len(buffers[0]) <= disk._READ_BYTES
            reads.append(offset)
            return preadv(fd, buffers, offset)

        monkeypatch.setattr(disk.os, "preadv", counted)
    assert torch.equal(array[:], data)
    assert not disk._PREAD or len(reads) == 10


def test_iter_rows_blocks_hold_at_most_64_mib_by_default():
    """A fixed 4096 rows per block read about 3.3 GB at once for a ResNet layer1 at 224 px."""
    from captum_inn.training.disk import iter_rows

    wide = torch.zeros(1).expand(100, 2**22)  # 16 MiB rows, without the memory
    assert [block.shape[0] for block in iter_rows(wide)] == [4] * 25
    assert [block.shape[0] for block in iter_rows(torch.zeros(10, 3))] == [10]
    assert [block.shape[0] for block in iter_rows(torch.zeros(3, 2**25))] == [1, 1, 1]  # one row over 64 MiB


def test_disk_array_refuses_other_dtypes_and_truncated_files(tmp_path):
    np.save(tmp_path / "int.npy", np.arange(10))
    with pytest.raises(ValueError, match="float32"):
        DiskArray(tmp_path / "int.npy")
    np.save(tmp_path / "ok.npy", np.zeros((10, 4), dtype="<f4"))
    blob = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(blob[:-20])
    with pytest.raises(ValueError, match="truncated"):
        DiskArray(tmp_path / "cut.npy")
    # a Fortran-ordered file holds its rows column by column: read by rows, it gave scrambled rows
    np.save(tmp_path / "fortran.npy", np.asfortranarray(np.arange(12, dtype="<f4").reshape(4, 3)))
    with pytest.raises(ValueError, match="must hold a C-ordered float32 array, found float32 Fortran-ordered"):
        DiskArray(tmp_path / "fortran.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")
    with pytest.raises(ValueError, match="not a readable .npy"):
        DiskArray(tmp_path / "junk.npy")


def test_writer_refuses_wrong_rows_and_leaves_no_partial_file(tmp_path):
    writer = DiskArrayWriter(tmp_path / "w.npy", 3, (2,))
    with pytest.raises(ValueError, match="do not match"):
        writer.append(torch.zeros(1, 3))
    writer.append(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="2 rows written, 3 announced"):
        writer.close()
    assert not list(tmp_path.iterdir())


def test_two_writers_of_one_file_each_write_their_own_rows(tmp_path):
    """Writers shared one fixed temporary name: a second pass into the folder truncated and wrote into
    the first one's file, which then held the second pass's header and rows (and the second's close
    failed). A file longer than its header says was accepted; a killed writer's temporary stays
    until the next writer of that file."""
    path = tmp_path / "a.npy"
    first, second = DiskArrayWriter(path, 2, (2,)), DiskArrayWriter(path, 4, (2,))
    first.append(torch.ones(2, 2))
    second.append(torch.full((4, 2), 2.0))
    first.close()
    assert torch.equal(DiskArray(path)[:], torch.ones(2, 2))
    second.close()
    assert torch.equal(DiskArray(path)[:], torch.full((4, 2), 2.0))
    blob = path.read_bytes()
    (tmp_path / "long.npy").write_bytes(blob + blob[-8:])
    with pytest.raises(ValueError, match="longer than its header says"):
        DiskArray(tmp_path / "long.npy")
    (tmp_path / ".a.npy.0123456789abcdef.tmp").write_bytes(b"partial")  # left by a killed pass
    with DiskArrayWriter(path, 1, (2,)) as writer:
        writer.append(torch.zeros(1, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "long.npy"]


def test_disk_cache_equals_memory_cache(images, autoencoder, tmp_path):
    model = SmallCNN(width=4).eval()
    memory = cache_features(model, LAYERS, autoencoder, images, batch_size=16, progress=False)
    disk = cache_features(model, LAYERS, autoencoder, images, batch_size=16, progress=False,
                          memmap_dir=tmp_path / "cache")
    assert disk.on_disk and not memory.on_disk
    assert len(disk) == 40 and disk.latent_dim == 6 and disk.layer_shape("relu1") == memory.layer_shape("relu1")
    for name in LAYERS:
        assert torch.equal(disk.layers[name][:], memory.layers[name])
    assert torch.equal(disk.code_mean[:], memory.code_mean) and torch.equal(disk.code_std[:], memory.code_std)
    reopened = FeatureCache.open(tmp_path / "cache")
    assert reopened.model_class == memory.model_class and list(reopened.layers) == LAYERS
    index = torch.tensor([3, 0, 39, 3])  # any order, repeats allowed: a minibatch's rows
    for name in LAYERS:
        assert torch.equal(memory.rows(name, index), memory.layers[name][index])
        assert torch.equal(disk.rows(name, index), memory.layers[name][index])


def test_fit_from_disk_equals_fit_from_memory(images, autoencoder, tmp_path):
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    from_memory = fit_invariances(model, LAYERS[1:], autoencoder, images, steps=4, progress=False, **TINY)
    from_disk = fit_invariances(model, LAYERS[1:], autoencoder, images, steps=4, progress=False, memmap=True, **TINY)
    for name in LAYERS[1:]:
        for a, b in zip(from_memory[name].state_dict().values(), from_disk[name].state_dict().values()):
            assert torch.equal(a, b)


def test_interrupted_cache_pass_leaves_no_cache(images, autoencoder, tmp_path):
    poisoned = images.clone()
    poisoned[30] = float("nan")  # the third batch of 16 fails
    with pytest.raises(ValueError, match="NaN or infinite pixels"):
        cache_features(SmallCNN(width=4).eval(), LAYERS, autoencoder, poisoned, batch_size=16, progress=False,
                       memmap_dir=tmp_path / "cache")
    assert FeatureCache.open(tmp_path / "cache") is None
    assert not list((tmp_path / "cache").glob("*.npy"))


def test_a_failed_pass_keeps_the_cache_already_in_its_folder(images, autoencoder, tmp_path):
    """The manifest of the folder's cache was deleted as a new pass began, so a pass that failed (bad pixels,
    a layer that does not run) lost a complete cache and a resumed fit ran the network again."""
    model = SmallCNN(width=4).eval()
    first = cache_features(model, LAYERS, autoencoder, images, batch_size=16, progress=False, memmap_dir=tmp_path)
    expected = first.layers["fc"][:]
    first.close()
    poisoned = images.clone()
    poisoned[30] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite pixels"):
        cache_features(model, LAYERS, autoencoder, poisoned, batch_size=16, progress=False, memmap_dir=tmp_path)
    kept = FeatureCache.open(tmp_path)
    assert kept is not None and torch.equal(kept.layers["fc"][:], expected)
    kept.close()


def test_a_loader_with_a_batch_sampler_is_cached_on_disk(images, autoencoder, tmp_path):
    """Its length was unknown (the loader has no batch_size of its own), so memmap_dir refused it."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

    dataset = TensorDataset(images)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 16, drop_last=True))
    model = SmallCNN(width=4).eval()
    disk = cache_features(model, "fc", autoencoder, loader, progress=False, memmap_dir=tmp_path)
    assert len(disk) == 32  # 40 images, the last batch of 8 dropped
    assert torch.equal(disk.layers["fc"][:], cache_features(model, "fc", autoencoder, images[:32], progress=False).layers["fc"])
    disk.close()


def test_resumed_fit_reuses_the_disk_cache(images, autoencoder, tmp_path):
    model = CountingCNN().eval()
    fit_invariances(model, "fc", autoencoder, images, steps=2, checkpoint_dir=str(tmp_path), memmap=True,
                    progress=False, **TINY)
    read = 40 + 2 * _PROBE_IMAGES + 1  # each image once, the first ones twice more (is the model random?), one to
    # count each layer's calls
    assert model.calls == read and FeatureCache.open(tmp_path / CACHE_DIR) is not None
    fit_invariances(model, "fc", autoencoder, images, steps=4, checkpoint_dir=str(tmp_path), memmap=True,
                    progress=False, **TINY)
    assert model.calls == read  # the network did not run again


def test_a_resumed_fit_closes_a_disk_cache_it_replaces(images, autoencoder, tmp_path, monkeypatch):
    """A cache without every asked layer is recomputed into its folder: its files are closed first (Windows
    cannot replace an open file; elsewhere the replaced files' space stayed held until the fit ended)."""
    from captum_inn.training import invariances

    model = CountingCNN().eval()
    fit_invariances(model, "fc", autoencoder, images, steps=2, checkpoint_dir=str(tmp_path), memmap=True,
                    progress=False, **TINY)
    opened, still_open, original = [], [], FeatureCache.open.__func__
    monkeypatch.setattr(FeatureCache, "open", classmethod(
        lambda cls, folder: opened.append(original(cls, folder)) or opened[-1]))

    def spy(*args, **kwargs):
        still_open.extend(a.path.name for c in opened for a in (c.code_mean, c.code_std, *c.layers.values())
                          if not a._file.closed)
        return cache_features(*args, **kwargs)

    monkeypatch.setattr(invariances, "cache_features", spy)
    fit_invariances(model, ["fc", "logits"], autoencoder, images, steps=2, checkpoint_dir=str(tmp_path),
                    memmap=True, progress=False, **TINY)
    assert opened and opened[0] is not None and still_open == []


@pytest.mark.parametrize("in_checkpoint_dir", [False, True], ids=["temporary", "checkpoint_dir"])
def test_a_fit_closes_its_disk_cache(images, autoencoder, tmp_path, in_checkpoint_dir):
    import gc
    import warnings

    folder, model = (str(tmp_path) if in_checkpoint_dir else None), SmallCNN(width=4).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for steps in ((2, 4) if in_checkpoint_dir else (2,)):  # the second run reuses the cache on disk
            fit_invariances(model, ["fc", "logits"], autoencoder, images, steps=steps, memmap=True,
                            checkpoint_dir=folder, progress=False, **TINY)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_layers_whose_names_map_to_one_file_name_get_a_file_each(autoencoder, tmp_path):
    """"a b" and "a_b" both become "a_b" in a file name; "fc" and "FC" are one file where case is ignored."""

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(3 * 32 * 32, width) for name, width in
                                              (("a b", 3), ("a_b", 5), ("fc", 2), ("FC", 4))})

        def forward(self, x):
            return sum(head(x.flatten(1)).sum(1) for head in self.heads.values())

    model, images = Heads().eval(), torch.rand(6, 3, 32, 32)
    names = [f"heads.{name}" for name in ("a b", "a_b", "fc", "FC")]
    memory = cache_features(model, names, autoencoder, images, progress=False)
    disk = cache_features(model, names, autoencoder, images, progress=False, memmap_dir=tmp_path / "cache")
    files = [array.path.name.lower() for array in disk.layers.values()]
    assert len(set(files)) == 4
    for name in names:
        assert torch.equal(disk.layers[name][:], memory.layers[name])
    disk.close()


def test_disk_cache_needs_data_of_known_length(autoencoder, tmp_path):
    stream = (torch.rand(4, 3, 32, 32) for _ in range(2))
    with pytest.raises((ValueError, TypeError), match="known length|must be an image tensor"):
        cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, stream, progress=False, memmap_dir=tmp_path)


def test_disk_array_serves_as_an_image_dataset(images, autoencoder, tmp_path):
    np.save(tmp_path / "images.npy", images.numpy())
    model = SmallCNN(width=4).eval()
    on_disk = cache_features(model, "fc", autoencoder, DiskArray(tmp_path / "images.npy"), batch_size=16, progress=False)
    in_memory = cache_features(model, "fc", autoencoder, images, batch_size=16, progress=False)
    assert torch.allclose(on_disk.layers["fc"], in_memory.layers["fc"], atol=1e-6)


def test_two_passes_into_one_folder_run_one_after_the_other(images, autoencoder, tmp_path, monkeypatch):
    """A second pass that started while the first was writing its manifest replaced the files under
    it: the first pass returned (and left) its own manifest over the second pass's rows."""
    import threading

    import captum_inn.training.cache as cache_module

    model, folder = SmallCNN(width=4).eval(), tmp_path / "cache"
    first_images, second_images = images[:8], images[8:16]
    expected = {id(x): cache_features(model, "fc", autoencoder, x, progress=False) for x in (first_images, second_images)}
    in_manifest, second_done = threading.Event(), threading.Event()
    write_manifest = cache_module.write_manifest

    def slow_first_manifest(*args, **kwargs):  # the first pass waits here for the second (1 s at most)
        if not in_manifest.is_set():
            in_manifest.set()
            second_done.wait(1.0)
        return write_manifest(*args, **kwargs)

    monkeypatch.setattr(cache_module, "write_manifest", slow_first_manifest)
    results = {}

    def run(x, done=None):
        results[id(x)] = cache_features(model, "fc", autoencoder, x, memmap_dir=folder, progress=False)
        if done is not None:
            done.set()

    first = threading.Thread(target=run, args=(first_images,))
    first.start()
    assert in_manifest.wait(30)
    with pytest.warns(UserWarning, match="being written by another feature-cache pass; waiting"):
        second = threading.Thread(target=run, args=(second_images, second_done))
        second.start()
        first.join(30)
        second.join(30)
    for x in (first_images, second_images):  # each pass returns its own rows and record
        assert torch.equal(results[id(x)].code_mean[:], expected[id(x)].code_mean)
        assert torch.equal(results[id(x)].layers["fc"][:], expected[id(x)].layers["fc"])
        assert results[id(x)].source == expected[id(x)].source
    reopened = FeatureCache.open(folder)  # the later pass's cache, whole
    assert reopened.source == expected[id(second_images)].source
    assert torch.equal(reopened.layers["fc"][:], expected[id(second_images)].layers["fc"])
    for cache in (*results.values(), reopened):
        cache.close()


def test_a_dropped_folder_lock_does_not_block_the_folder(tmp_path):
    import warnings

    from captum_inn.training.disk import FolderLock

    FolderLock(tmp_path)  # its holder is gone (a sink lost to an error, say)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "waiting for it to finish" would be an error here
        with FolderLock(tmp_path), FolderLock(tmp_path / "other_folder_missing", shared=True):
            pass


@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows")
def test_a_forked_child_does_not_keep_the_parents_folder_lock(tmp_path):
    """flock holds while any copy of the descriptor is open: a child forked while the lock was held
    (a loader worker) kept the folder locked after the parent released it."""
    import fcntl

    from captum_inn.training.disk import FolderLock

    lock = FolderLock(tmp_path)
    (ready_read, ready_write), (done_read, done_write) = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child says it runs, then stays alive until the parent has checked the lock
        os.close(done_write)
        os.write(ready_write, b"r")
        os.read(done_read, 1)
        os._exit(0)
    for fd in (ready_write, done_read):
        os.close(fd)
    try:
        assert os.read(ready_read, 1) == b"r"
        lock.release()
        fd = os.open(tmp_path / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the child holds a copy
        finally:
            os.close(fd)
    finally:
        os.close(done_write)
        os.close(ready_read)
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows")
def test_a_writer_that_cannot_open_the_lock_file_fails_and_a_reader_goes_on(tmp_path, monkeypatch):
    """Only a reader may go on unlocked where the lock file cannot be opened (a read-only folder, where
    no pass can be writing); a writer running unlocked could mix its files with another pass's."""
    from captum_inn.training import disk

    def refused(path, flags, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(disk.os, "open", refused)
    with pytest.raises(PermissionError):
        disk.FolderLock(tmp_path)
    with disk.FolderLock(tmp_path, shared=True) as lock:
        assert lock._fd is None


@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows")
def test_a_loader_worker_does_not_keep_the_folder_locked(images, autoencoder, tmp_path):
    """A DataLoader worker forked during the pass inherited the folder lock's descriptor: with
    persistent workers the folder stayed locked after the pass, and FeatureCache.open waited forever."""
    import fcntl

    from torch.utils.data import DataLoader

    loader = DataLoader(images[:8], batch_size=4, num_workers=1, persistent_workers=True)
    cache = cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, loader, memmap_dir=tmp_path, progress=False)
    cache.close()
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the worker holds it
    finally:
        os.close(fd)
        del loader  # its worker ends


def test_a_pass_that_fills_the_disk_unlocks_the_folder_and_removes_its_files(images, autoencoder, tmp_path,
                                                                               monkeypatch):
    """On a full disk the flush at close failed again inside the clean-up: the folder stayed locked (a later
    pass waited for ever while the failed one's traceback was kept, as a notebook keeps it) and the
    temporaries that filled the disk were left."""
    import errno
    import sys
    import warnings

    from captum_inn.training.disk import FolderLock

    class FullFile:  # a disk that filled up: a write fails, and so does the flush when the file closes
        def __init__(self, file):
            self.file, self.closed = file, False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.file.close()
            self.closed = True
            raise OSError(errno.ENOSPC, "No space left on device")

    def append(self, rows):
        self._file = FullFile(self._file)
        self._file.write(b"")

    monkeypatch.setattr(DiskArrayWriter, "append", append)
    with pytest.raises(OSError, match="No space left") as failed:
        cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, images[:8], memmap_dir=tmp_path, progress=False)
    assert failed.value.__context__ is None  # the pass's own error, not one of the clean-up
    kept = sys.exc_info(), failed  # the traceback, and the sink in its frames, stay alive
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "waiting for it to finish" would be an error here
        FolderLock(tmp_path).release()
    del kept


def test_a_full_disk_names_the_feature_cache_file(images, autoencoder, tmp_path, monkeypatch):
    """A memmap cache that filled the disk failed with "[Errno 28] No space left on device" alone,
    naming neither the file nor the cache (checkpoints already named theirs)."""
    import errno

    class FullFile:  # a disk that filled up after the header: every write fails
        def __init__(self, file):
            self.file, self.closed = file, False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.file.close()
            self.closed = True

    real_init = DiskArrayWriter.__init__

    def init_then_fill(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file = FullFile(self._file)

    monkeypatch.setattr(DiskArrayWriter, "__init__", init_then_fill)
    with pytest.raises(OSError, match=r"No space left on device, writing the feature cache file '.*\.npy' \(8 rows "
                                      r"of .*MiB; the partial file is removed\): free space there") as failed:
        cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, images[:8], memmap_dir=tmp_path, progress=False)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename.endswith(".npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows")
def test_a_file_system_without_locks_caches_and_checkpoints_unlocked(images, autoencoder, tmp_path, monkeypatch):
    import errno

    from captum_inn.training import disk

    def refuse(fd, mode):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(disk.fcntl, "flock", refuse)
    cache = cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, images[:8], memmap_dir=tmp_path / "cache",
                           progress=False)  # NFS without its lock daemon: the pass failed with OSError
    assert cache.layers["fc"].shape[0] == 8
    cache.close()
    from captum_inn.training import load_checkpoint, save_checkpoint

    save_checkpoint(str(tmp_path / "ck.safetensors"), {"w": torch.ones(2)}, {"kind": "module"})
    assert torch.equal(load_checkpoint(str(tmp_path / "ck.safetensors"))[0]["w"], torch.ones(2))


def test_a_damaged_disk_cache_is_a_clear_error(images, autoencoder, tmp_path):
    cache = cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, images[:8], memmap_dir=tmp_path / "cache",
                           progress=False)
    cache.close()
    import json

    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    unreadable = "does not hold a feature cache this version can read"
    for edit, match in (({"format_version": manifest["format_version"] + 1}, unreadable),
                        ({"format_version": "2"}, unreadable),  # a TypeError comparing str with int
                        ({"kind": "checkpoint"}, unreadable),
                        ({"n": manifest["n"] + 1}, r"damaged feature cache \(ValueError: its arrays do not all have 9 "
                                                   r"rows\); delete the folder"),
                        ({"selectors": "ab"}, "damaged feature cache.*dictionary update"),  # a raw ValueError
                        ({"files": {**manifest["files"], "code_std": manifest["files"]["layer.fc"]}},
                         r"damaged feature cache \(ValueError: `code_std` of shape \(8, 128\) must have `code_mean`'s shape")):
        manifest_path.write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(ValueError, match=match):
            FeatureCache.open(tmp_path / "cache")
    manifest_path.write_text(json.dumps(manifest))
    reopened = FeatureCache.open(tmp_path / "cache")  # the restored manifest reads again
    assert len(reopened) == 8
    reopened.close()
    (tmp_path / "cache" / "layer.fc.npy").unlink()
    with pytest.raises(ValueError, match="holds a damaged feature cache.*delete the folder to recompute"):
        FeatureCache.open(tmp_path / "cache")
    for text in ("[1, 2]", "\x80 not text"):  # JSON of another shape, bytes that are not UTF-8
        (tmp_path / "cache" / "manifest.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match="manifest.json.*delete the folder to recompute it"):
            FeatureCache.open(tmp_path / "cache")
    FeatureCache(torch.zeros(3, 2), torch.ones(3, 2), {"fc": torch.zeros(3, 4)}).save(tmp_path / "saved.safetensors")
    # the other format: was None, as if unfinished
    with pytest.raises(ValueError, match=r"is a file, not a cache folder.*read it with FeatureCache.load"):
        FeatureCache.open(tmp_path / "saved.safetensors")


@pytest.mark.skipif(os.name == "nt", reason="no flock on Windows")
def test_a_lock_file_another_user_owns_is_locked_through_a_read_only_handle(tmp_path, monkeypatch):
    """In a shared folder another user's .lock (mode 0644) cannot be opened for writing; the writer's
    pass failed with a raw PermissionError, though flock works on a read-only handle."""
    from captum_inn.training import disk

    (tmp_path / disk.FolderLock.NAME).touch()
    real_open = os.open

    def foreign(path, flags, *args):
        if str(path).endswith(disk.FolderLock.NAME) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(disk.os, "open", foreign)
    with disk.FolderLock(tmp_path) as lock:
        assert lock._fd is not None  # locked, exclusively
        monkeypatch.setattr(disk.os, "open", real_open)
        probe = os.open(tmp_path / disk.FolderLock.NAME, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                disk.fcntl.flock(probe, disk.fcntl.LOCK_SH | disk.fcntl.LOCK_NB)
        finally:
            os.close(probe)
