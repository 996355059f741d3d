"""Loading fitted networks: damaged or edited checkpoints fail with a CheckpointError naming the file,
checkpoints of stopped fits warn, an INN refuses a model with other weights, and a resumed
autoencoder fit refuses other images."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers_training import TINY
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from captum_inn import LayerConcepts, LayerInvariance
from captum_inn.concepts import ConceptPairs
from captum_inn.models import SmallCNN
from captum_inn.training import (
    CheckpointError,
    fit_autoencoder,
    fit_concepts,
    fit_invariances,
    load_autoencoder,
    load_concept_inn,
    load_invariance_inn,
    save_invariance_inn,
)
from captum_inn.training.checkpoint import _META_KEY
from captum_inn.training.invariances import checkpoint_name

torch.set_num_threads(1)


def _rewrite(path, out, edit_meta=None, edit_tensors=None):
    """A copy of the checkpoint at ``path`` with its metadata or tensors edited (as a user or a
    broken tool might), still a well-formed safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[_META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta is not None:
        meta = edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(out), metadata={_META_KEY: json.dumps(meta)})
    return out


@pytest.fixture
def fitted(images, autoencoder, tmp_path):
    model = SmallCNN(width=4).eval()
    inn = fit_invariances(model, "fc", autoencoder, images, steps=2, progress=False, **TINY)
    return model, inn, save_invariance_inn(tmp_path / "fc.safetensors", inn)


def _concept_inn(autoencoder, images, **settings):
    labels = torch.arange(len(images)) % 2
    return fit_concepts(autoencoder, [ConceptPairs.from_labels("a", images, labels)], factor_sizes={"a": 2}, steps=2,
                        pool_size=16, progress=False, n_blocks=1, hidden=8, **settings)


def _without(key):
    def edit(meta):
        meta.pop(key)
        return meta
    return edit


def _config_edit(change):
    def edit(meta):
        change(meta["config"])
        return meta
    return edit


def _inn_missing_tensor(tensors):
    tensors.pop(sorted(k for k in tensors if k.startswith("model."))[0])


def _inn_nan(tensors):
    key = sorted(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))


def _inn_reshaped(tensors):
    key = sorted(k for k in tensors if k.startswith("model.") and tensors[k].dim() == 2)[0]
    tensors[key] = tensors[key][:, :-1].contiguous()


@pytest.mark.parametrize("edit_meta, edit_tensors, message", [
    (_without("config"), None, "KeyError"),
    (_config_edit(lambda c: c.pop("inn")), None, "KeyError"),
    (_config_edit(lambda c: c["inn"].update(bogus=1)), None, "bogus"),
    (_config_edit(lambda c: c["inn"].update(dim=-3)), None, "does not describe a module"),
    (_config_edit(lambda c: c["inn"].update(n_blocks=c["inn"]["n_blocks"] + 1)), None, "does not describe a module"),
    (lambda meta: [meta], None, "corrupted metadata"),
    (None, _inn_missing_tensor, "does not describe a module"),
    (None, _inn_reshaped, "does not describe a module"),
    (None, _inn_nan, "NaN or infinite"),
])
def test_a_damaged_invariance_inn_file_is_a_checkpoint_error(fitted, tmp_path, edit_meta, edit_tensors, message):
    _, _, path = fitted
    damaged = _rewrite(path, tmp_path / "damaged.safetensors", edit_meta, edit_tensors)
    with pytest.raises(CheckpointError, match=message) as error:
        load_invariance_inn(str(damaged))
    assert "damaged.safetensors" in str(error.value)


def test_damaged_autoencoder_and_concept_files_are_checkpoint_errors(images, autoencoder, tmp_path):
    ae_path = tmp_path / "ae.safetensors"
    fit_autoencoder(images, latent_dim=4, width=4, steps=2, checkpoint=str(ae_path), progress=False)
    with pytest.raises(CheckpointError, match="KeyError"):
        load_autoencoder(str(_rewrite(ae_path, tmp_path / "a1.safetensors", _without("model"))))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_autoencoder(str(_rewrite(ae_path, tmp_path / "a2.safetensors", edit_tensors=_inn_nan)))

    def as_integers(tensors):  # load_state_dict cast them into the float weights without a word
        key = sorted(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())[0]
        tensors[key] = (tensors[key] * 100).long()

    with pytest.raises(CheckpointError, match=r"a3.safetensors' holds '.*' as torch.int64 where the module keeps "
                                              r"torch.float32: it was edited or damaged"):
        load_autoencoder(str(_rewrite(ae_path, tmp_path / "a3.safetensors", edit_tensors=as_integers)))
    concepts = tmp_path / "concepts.safetensors"
    _concept_inn(autoencoder, images, checkpoint=str(concepts))
    with pytest.raises(CheckpointError, match="KeyError"):
        load_concept_inn(str(_rewrite(concepts, tmp_path / "c1.safetensors", _config_edit(lambda c: c.pop("inn")))))


def test_an_integer_entry_of_another_integer_dtype_is_a_checkpoint_error():
    # load_state_dict cast an int32 counter into the module's int64 one without a word
    from captum_inn.training.checkpoint import load_module_state, module_tensors

    tensors = module_tensors(nn.BatchNorm1d(2))
    tensors["model.num_batches_tracked"] = tensors["model.num_batches_tracked"].int()
    with pytest.raises(CheckpointError, match=r"'ck.safetensors' holds 'num_batches_tracked' as torch.int32 where the "
                                              r"module keeps torch.int64"):
        load_module_state(nn.BatchNorm1d(2), tensors, "ck.safetensors")


def test_checkpoints_of_stopped_fits_warn_and_finished_ones_do_not(images, autoencoder, tmp_path):
    model = SmallCNN(width=4).eval()
    fit_invariances(model, "fc", autoencoder, images, steps=3, checkpoint_every=1, checkpoint_dir=str(tmp_path),
                    progress=False, **TINY)
    checkpoint = str(tmp_path / checkpoint_name("fc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_invariance_inn(checkpoint).fit_info["step"] == 3  # a finished fit: no warning
    stopped = _rewrite(checkpoint, tmp_path / "stopped.safetensors", lambda meta: {**meta, "step": 1})
    with pytest.warns(UserWarning, match=r"unfinished fit_invariances \(step 1 of 3\)"):
        load_invariance_inn(str(stopped))
    # one step short is unfinished too
    last_but_one = _rewrite(checkpoint, tmp_path / "last_but_one.safetensors", lambda meta: {**meta, "step": 2})
    with pytest.warns(UserWarning, match=r"unfinished fit_invariances \(step 2 of 3\)"):
        load_invariance_inn(str(last_but_one))

    ae_path = tmp_path / "ae.safetensors"
    fit_autoencoder(images, latent_dim=4, width=4, steps=2, checkpoint=str(ae_path), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_autoencoder(str(ae_path))
    fit_autoencoder(images, latent_dim=4, width=4, steps=2, checkpoint=str(ae_path), progress=False)
    stopped_ae = _rewrite(ae_path, tmp_path / "stopped_ae.safetensors", lambda meta: {**meta, "steps": 5})
    with pytest.warns(UserWarning, match=r"unfinished fit_autoencoder \(step 2 of 5\)"):
        load_autoencoder(str(stopped_ae))


def test_a_checkpoint_of_exactly_the_steps_asked_for_counts_as_finished(tmp_path):
    # "at least `steps` steps", read from the header: a resume of it trains and writes nothing
    from captum_inn.training import save_checkpoint
    from captum_inn.training.checkpoint import finished_checkpoint

    path = save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.ones(1)}, {"kind": "x", "config": {}, "step": 5})
    assert finished_checkpoint(path, 4) and finished_checkpoint(path, 5) and not finished_checkpoint(path, 6)


def test_an_invariance_inn_refuses_a_model_with_other_weights(images, autoencoder, fitted):
    model, inn, path = fitted
    retrained = SmallCNN(width=4).eval()  # the same architecture, other weights
    for candidate in (inn, load_invariance_inn(str(path))):
        LayerInvariance(model, "fc", candidate, autoencoder)  # the model it was fitted with
        LayerInvariance(torch.nn.DataParallel(model), "module.fc", candidate, autoencoder)  # wrapped: the same weights
        with pytest.raises(ValueError, match="another `forward_func`.*fit `inn` again"):
            LayerInvariance(retrained, "fc", candidate, autoencoder)


def test_load_invariance_inn_checks_its_expected_sizes(autoencoder, fitted):
    """latent_dim=ae (as load_concept_inn takes representation=ae) and a layer shape of floats or a
    string were int()'s raw TypeError or ValueError."""
    _, inn, path = fitted
    shape, latent = tuple(inn.fit_info["layer_shape"]), inn.fit_info["latent_dim"]
    loaded = load_invariance_inn(path, layer_shape=torch.Size(shape), latent_dim=torch.tensor(latent))
    assert loaded.dim == latent
    assert load_invariance_inn(path, layer_shape=shape[0]).dim == latent  # a vector layer's size alone
    with pytest.raises(TypeError, match=r"`latent_dim` is a ConvAutoencoder; pass its size, latent_dim=ae.latent_dim"):
        load_invariance_inn(path, latent_dim=autoencoder)
    with pytest.raises(TypeError, match=r"`latent_dim` must be an int, got '16'"):
        load_invariance_inn(path, latent_dim="16")
    with pytest.raises(TypeError, match=r"`layer_shape` must be the per-sample activation shape as a tuple of ints"):
        load_invariance_inn(path, layer_shape="10")
    with pytest.raises(TypeError, match=r"`layer_shape\[0\]` must be an int, got 10.5"):
        load_invariance_inn(path, layer_shape=(10.5,))
    with pytest.raises(CheckpointError, match=rf"codes of size {latent}, but this autoencoder's codes have size 3"):
        load_invariance_inn(path, latent_dim=3)


def test_layer_concepts_refuses_an_invariance_inn_of_a_model_with_other_weights(images, autoencoder, fitted):
    model, inn, _ = fitted
    concept_inn = _concept_inn(autoencoder, images)
    LayerConcepts(model, "fc", concept_inn, autoencoder, invariance_inn=inn)
    with pytest.raises(ValueError, match="`invariance_inn` was fitted with another `forward_func`"):
        LayerConcepts(SmallCNN(width=4).eval(), "fc", concept_inn, autoencoder, invariance_inn=inn)


@pytest.mark.filterwarnings("ignore:.*of a cosine schedule over 2 steps")  # resumed with steps=3 on purpose
def test_a_resumed_autoencoder_fit_refuses_other_images_and_another_perceptual_model(images, tmp_path):
    path = str(tmp_path / "ae.safetensors")
    settings = dict(latent_dim=4, width=4, checkpoint=path, progress=False)
    fit_autoencoder(images, steps=2, **settings)
    assert len(fit_autoencoder(images.clone(), steps=3, **settings).history) == 3  # the same images resume
    other = images.clone()
    other[0] = 1 - other[0]
    with pytest.raises(CheckpointError, match="source.images"):
        fit_autoencoder(other, steps=4, **settings)
    perceptual = SmallCNN(width=4).eval()
    with pytest.raises(CheckpointError, match=r"perceptual_layers: \[\] in the checkpoint, \['relu1'\] now"):
        fit_autoencoder(images, steps=4, perceptual_model=perceptual, perceptual_layers=("relu1",), **settings)
    judged = dict(settings, checkpoint=str(tmp_path / "judged.safetensors"), perceptual_layers=("relu1",))
    fit_autoencoder(images, steps=2, perceptual_model=perceptual, **judged)
    with pytest.raises(CheckpointError, match="source.perceptual_model"):  # the same layers of another network
        fit_autoencoder(images, steps=4, perceptual_model=SmallCNN(width=4).eval(), **judged)
    with pytest.raises(ValueError, match="needs both `perceptual_model` and `perceptual_layers`"):  # not the resume's
        fit_autoencoder(images, steps=4, perceptual_layers=("relu1",), **settings)


@pytest.mark.filterwarnings("ignore:.*of a cosine schedule over 2 steps")  # resumed with steps=3 on purpose
def test_a_resumed_autoencoder_fit_refuses_another_augmentation(images, tmp_path):
    """The augmentation shapes what the fit learns from, as the images do; a resume with another one
    (or none) went on silently, a fit that matched neither setting."""
    from captum_inn.training import Jitter

    path = str(tmp_path / "ae.safetensors")
    settings = dict(latent_dim=4, width=4, checkpoint=path, progress=False)
    fit_autoencoder(images, steps=2, augment=Jitter(2, noise=0.05, seed=0), **settings)
    assert len(fit_autoencoder(images, steps=3, augment=Jitter(2, noise=0.05, seed=0), **settings).history) == 3
    for other, shown in ((None, r"augment: \{'Jitter': .*\} in the checkpoint, None now"),
                         (Jitter(1, noise=0.05, seed=0), "augment.Jitter.pixels: 2 in the checkpoint, 1 now"),
                         (torch.nn.Identity(), "in the checkpoint, 'Identity\\(\\)' now")):
        with pytest.raises(CheckpointError, match=rf"{shown}\); pass resume=False"):
            fit_autoencoder(images, steps=4, augment=other, **settings)


@pytest.mark.filterwarnings("ignore:.*of a cosine schedule over 2 steps")  # resumed with steps=3 on purpose
def test_a_resumed_autoencoder_fit_tells_transforms_apart_by_their_settings(images, tmp_path):
    """Beyond Jitter, the record is the transform's repr without memory addresses: a torchvision
    transform of the same class with another setting is refused (its class name alone let it
    through), while the same pipeline rebuilt, as a resumed run does, with a new lambda at another
    address, resumes."""
    from torchvision import transforms

    def pipeline(p):
        return transforms.Compose([transforms.RandomHorizontalFlip(p), lambda x: x.clamp(0, 1)])

    path = str(tmp_path / "ae.safetensors")
    settings = dict(latent_dim=4, width=4, checkpoint=path, progress=False)
    fit_autoencoder(images, steps=2, augment=pipeline(0.5), **settings)
    assert len(fit_autoencoder(images, steps=3, augment=pipeline(0.5), **settings).history) == 3
    with pytest.raises(CheckpointError, match=r"augment: 'Compose.*p=0.5.*' in the checkpoint, 'Compose.*p=0.3.*' now"):
        fit_autoencoder(images, steps=4, augment=pipeline(0.3), **settings)


@pytest.mark.filterwarnings("ignore:.*of a cosine schedule over 2 steps")  # resumed with steps=3 on purpose
def test_an_autoencoder_checkpoint_of_an_older_version_still_resumes(images, tmp_path):
    path = tmp_path / "ae.safetensors"
    settings = dict(latent_dim=4, width=4, checkpoint=str(path), progress=False)
    fit_autoencoder(images, steps=2, **settings)
    # as written before the source and the augmentation were recorded
    _rewrite(path, path, _config_edit(lambda c: (c.pop("source"), c.pop("augment"))))
    assert len(fit_autoencoder(images, steps=3, **settings).history) == 3


def test_layers_that_would_share_a_checkpoint_file_are_refused_before_any_work(images, autoencoder, tmp_path):
    """The whole model "" and a submodule named "model" both map to invariance_model.safetensors: the
    second layer found the first one's checkpoint and stopped, after the first had trained."""

    class Probabilities(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = SmallCNN(width=4)

        def forward(self, x):
            return self.model(x).softmax(1)

    wrapper = Probabilities().eval()
    with pytest.raises(ValueError, match=r"Layers \['', 'model'\] would share the checkpoint file "
                                         r"'invariance_model.safetensors'"):
        fit_invariances(wrapper, ["", "model"], autoencoder, images, steps=2, checkpoint_dir=str(tmp_path),
                        progress=False, **TINY)
    assert list(tmp_path.iterdir()) == []  # refused before the pass over the data
    assert set(fit_invariances(wrapper, ["", "model"], autoencoder, images, steps=1, progress=False, **TINY)) == {"", "model"}


def test_layers_whose_checkpoint_files_differ_only_in_case_are_refused(images, autoencoder, tmp_path):
    """invariance_Head and invariance_head are one file on macOS and Windows: one INN overwrote the other."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = SmallCNN(width=4)
            self.Head, self.head = nn.Identity(), nn.Identity()

        def forward(self, x):
            return self.head(self.Head(self.body(x)))

    with pytest.raises(ValueError, match=r"Layers \['Head', 'head'\] would share the checkpoint file"):
        fit_invariances(TwoHeads().eval(), ["Head", "head"], autoencoder, images, steps=2,
                        checkpoint_dir=str(tmp_path), progress=False, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_a_saved_unfinished_inn_keeps_its_step(images, autoencoder, tmp_path):
    """Saving the INN of a stopped fit and loading the file reported the target steps as done."""
    model = SmallCNN(width=4).eval()
    fit_invariances(model, "fc", autoencoder, images, steps=3, checkpoint_every=1, checkpoint_dir=str(tmp_path),
                    progress=False, **TINY)
    stopped = _rewrite(tmp_path / checkpoint_name("fc"), tmp_path / "stopped.safetensors", lambda meta: {**meta, "step": 1})
    with pytest.warns(UserWarning, match="unfinished"):
        inn = load_invariance_inn(str(stopped))
    assert (inn.fit_info["step"], inn.fit_info["steps"]) == (1, 3)
    saved = load_invariance_inn(save_invariance_inn(tmp_path / "saved.safetensors", inn))
    assert (saved.fit_info["step"], saved.fit_info["steps"]) == (1, 3)
    assert load_invariance_inn(str(tmp_path / checkpoint_name("fc")), layer_shape=128).fit_info["step"] == 3  # an int


@pytest.mark.filterwarnings("ignore:.*of a cosine schedule over 2 steps")  # resumed with steps=3 on purpose
@pytest.mark.filterwarnings("ignore:`data`'s items differ")  # random transforms on purpose
def test_an_autoencoder_fit_on_a_dataset_with_random_transforms_resumes_and_keeps_the_callers_generators(images, tmp_path):
    """A random flip in __getitem__ drew from the global generators: each read gave other images, so a
    resume was refused as "another configuration (source.images)", and the caller's stream moved."""
    from torch.utils.data import Dataset

    class RandomFlips(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i].flip(-1) if torch.rand(()) < 0.5 else images[i]

    settings = dict(latent_dim=4, width=4, checkpoint=str(tmp_path / "ae.safetensors"), progress=False)
    state = torch.get_rng_state()
    fit_autoencoder(RandomFlips(), steps=2, **settings)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(fit_autoencoder(RandomFlips(), steps=3, **settings).history) == 3


@pytest.mark.filterwarnings("ignore:.*of a cosine schedule over 2 steps")  # resumed with steps=3 on purpose
def test_an_autoencoder_fit_on_a_shuffling_loader_resumes(images, tmp_path):
    """The images were read by iterating the loader, in a new order on every call, so the resume's
    images fingerprint differed and it was refused as "another configuration (source.images)"."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    dataset = TensorDataset(images, torch.zeros(len(images)))
    subset = SubsetRandomSampler(range(0, len(images), 2))  # shuffles too, and is no RandomSampler
    for name, loader in (("all", DataLoader(dataset, batch_size=4, shuffle=True)),
                         ("subset", DataLoader(dataset, batch_size=4, sampler=subset))):
        settings = dict(latent_dim=4, width=4, checkpoint=str(tmp_path / f"{name}.safetensors"), progress=False)
        fit_autoencoder(loader, steps=2, **settings)
        assert len(fit_autoencoder(loader, steps=3, **settings).history) == 3


def test_a_shuffling_batch_sampler_is_read_in_order_in_its_own_batches():
    """A loader given batch_sampler= has no batch_size: it was read in batches of one (a pass per image)."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    from captum_inn.training.data import in_dataset_order

    dataset = TensorDataset(torch.arange(10.0))
    loader = DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 4, drop_last=False))
    assert [x.tolist() for (x,) in in_dataset_order(loader)] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]


def test_a_refused_resume_leaves_the_module_as_it_was(tmp_path):
    """load_state_dict copied the entries whose shapes fit before refusing the others: after "pass
    resume=False to start afresh" the fit trained a module part checkpoint, part its own."""
    from captum_inn.training import CheckpointError, train_loop

    x, path = torch.randn(32, 3), str(tmp_path / "fit.safetensors")

    def fit(module):
        return train_loop(module, lambda g: module(x[torch.randint(32, (8,), generator=g)]).pow(2).mean(),
                          steps=5, lr=0.1, checkpoint=path, progress=False)

    torch.manual_seed(0)
    fit(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)))
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'1.weight' has shape \(1, 4\) there, \(2, 4\) here"):
        fit(other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


# ------------------------------------------------------------ reading data at scale (loaders, workers, samplers)
class _NumpyItems(torch.utils.data.Dataset):
    """Items (float32 NumPy image, label), as a dataset reading arrays from disk gives them."""

    def __init__(self, images):
        self.images = images.numpy()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


class _Brightened(torch.utils.data.Dataset):
    """Each image scaled by a random factor from torch's global generator (a random transform)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i] * (0.5 + 0.5 * torch.rand(()))


class _NeedsWorkerInit(torch.utils.data.Dataset):
    """Reads only in a worker that its worker_init_fn prepared (a file opened per worker, say)."""

    def __init__(self, images):
        self.images, self.opened = images, False

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if not self.opened:
            raise RuntimeError("file not opened: worker_init_fn did not run")
        return self.images[i]


def _open_file(_worker_id):
    torch.utils.data.get_worker_info().dataset.opened = True


class _OwnSampler(torch.utils.data.Sampler):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))


def test_the_images_check_reads_numpy_items_and_loaders_of_unknown_draws(images):
    """A NumPy dataset, or a loader with its own sampler or one drawing with replacement, hashed no
    image at all: a resume reused the features of other images without a word."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from captum_inn.training import images_fingerprint

    others = torch.rand(images.shape, generator=torch.Generator().manual_seed(9))
    forms = {"numpy dataset": lambda x: _NumpyItems(x),
             "loader over it": lambda x: DataLoader(_NumpyItems(x), batch_size=8),
             "own sampler": lambda x: DataLoader(x, batch_size=8, sampler=_OwnSampler(len(x))),
             "own batch sampler": lambda x: DataLoader(x, batch_sampler=BatchSampler(_OwnSampler(len(x)), 8, False)),
             "with replacement": lambda x: DataLoader(x, batch_size=8, sampler=RandomSampler(x, replacement=True))}
    for form, make in forms.items():
        assert images_fingerprint(make(images)) == images_fingerprint(make(images)), form
        assert images_fingerprint(make(images)) != images_fingerprint(make(others)), form


def test_reading_a_loader_leaves_its_generators_and_draws_the_same_each_time(images):
    """A loader's own generator (its workers' seeds) and its sampler's (draws with replacement) were
    advanced by every read: other images on each call, and every resume refused."""
    from captum.concept import Concept
    from torch.utils.data import DataLoader, RandomSampler

    from captum_inn.training.data import images_as_tensor

    g, h = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    loaders = [DataLoader(_Brightened(images[:16]), batch_size=8, num_workers=2, generator=g),
               DataLoader(images[:16], batch_size=8, sampler=RandomSampler(images[:16], replacement=True, generator=h))]
    for loader in loaders:
        states = (g.get_state(), h.get_state())
        first = images_as_tensor(loader)
        assert torch.equal(first, images_as_tensor(loader))
        pairs = ConceptPairs.from_captum(Concept(0, "c", loader))
        assert pairs.fingerprint() == ConceptPairs.from_captum(Concept(0, "c", loader)).fingerprint()
        assert torch.equal(g.get_state(), states[0]) and torch.equal(h.get_state(), states[1])


def test_a_shuffled_loader_is_read_with_its_worker_init_fn(images):
    """Read in dataset order through a new loader that dropped worker_init_fn: the workers failed."""
    from torch.utils.data import DataLoader

    from captum_inn.training.data import images_as_tensor

    loader = DataLoader(_NeedsWorkerInit(images[:16]), batch_size=4, num_workers=2, worker_init_fn=_open_file,
                        shuffle=True)
    assert torch.equal(images_as_tensor(loader), images[:16])


def test_a_sequential_sampler_over_part_of_the_dataset_draws_that_part():
    from torch.utils.data import DataLoader, SequentialSampler

    from captum_inn.training.data import loader_indices

    loader = DataLoader(torch.rand(40, 3), batch_size=5, sampler=SequentialSampler(range(10)))
    assert list(loader_indices(loader)) == list(range(10))  # was all 40: trained on, and probed, images never drawn


def test_caching_a_dataset_with_random_transforms_repeats_and_keeps_the_callers_streams(images, autoencoder):
    from captum_inn.training import cache_features

    model = SmallCNN(width=4).eval()
    state = torch.get_rng_state()
    first = cache_features(model, "fc", autoencoder, _Brightened(images[:8]), progress=False)
    second = cache_features(model, "fc", autoencoder, _Brightened(images[:8]), progress=False)
    assert torch.equal(first.code_mean, second.code_mean) and torch.equal(torch.get_rng_state(), state)


def test_data_forms_are_read_or_named(images, autoencoder):
    """(images, labels) given where images alone are read failed as "images of different sizes";
    fit_classifier took neither dict items nor (image, label, extra) ones, and skipped a loader's
    collate_fn (uint8 items its collate scales were refused as uint8)."""
    from torch.utils.data import DataLoader

    from captum_inn.training import cache_features
    from captum_inn.training.classifier import _as_labelled

    labels = torch.arange(len(images)) % 3
    with pytest.raises(ValueError, match=r"an \(images, labels\) pair as fit_classifier takes it; pass the images tensor alone"):
        cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, (images, labels), progress=False)
    for pair in ((images, labels), (images, labels[:, None]), (images, torch.nn.functional.one_hot(labels))):
        with pytest.raises(ValueError, match="pass the images tensor alone"):
            fit_autoencoder(pair, latent_dim=4, width=4, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"must have shape \(N, C, H, W\), got batches of shape \(3, 1, 3, 32, 32\)"):
        cache_features(SmallCNN(width=4).eval(), "fc", autoencoder, [images[:1]] * 3, progress=False)  # not a pair
    as_dicts = [{"image": x, "label": int(y)} for x, y in zip(images, labels)]
    as_triples = [(x, y, "extra") for x, y in zip(images, labels)]
    scaled = DataLoader([((x * 255).to(torch.uint8), y) for x, y in zip(images, labels)], batch_size=8,
                        collate_fn=lambda items: (torch.stack([x for x, _ in items]).float() / 255,
                                                  torch.tensor([int(y) for _, y in items])))
    unbatched = DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=None)  # collates no batch
    for data in (as_dicts, as_triples, scaled, unbatched):
        x, y, _ = _as_labelled(data)
        assert torch.allclose(x, images, atol=1 / 255) and torch.equal(y, labels)
    with pytest.raises(TypeError, match=r"not labelled images \(dicts with keys \['image', 'kind'\]\)"):
        _as_labelled([{"image": x, "kind": "a"} for x in images])


def test_a_sized_iterable_dataset_is_read_as_it_yields(images, autoencoder):
    """torch's IterableDataset has a __getitem__ that raises NotImplementedError: a sized one was probed by
    index, so caching its features and fit_classifier failed with that error."""
    from torch.utils.data import DataLoader, IterableDataset

    from captum_inn.training import cache_features
    from captum_inn.training.classifier import _as_labelled

    labels = torch.arange(len(images)) % 3

    class Sized(IterableDataset):
        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)

        def __len__(self):
            return len(self.items)

    model = SmallCNN(width=4).eval()
    expected = cache_features(model, "fc", autoencoder, images, progress=False).layers["fc"]
    for data in (Sized(images), DataLoader(Sized(images), batch_size=8)):
        assert torch.equal(cache_features(model, "fc", autoencoder, data, progress=False).layers["fc"], expected)
    pairs = list(zip(images, labels))
    for data in (Sized(pairs), DataLoader(Sized(pairs), batch_size=8)):
        x, y, _ = _as_labelled(data)
        assert torch.equal(x, images) and torch.equal(y, labels)


def test_a_float64_network_comes_back_in_float64(images, tmp_path):
    """The loaders built the network in float32 and load_state_dict cast the saved float64 weights."""
    from captum_inn.training import load_concept_inn, save_concept_inn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 6), nn.ReLU()).eval()
    pairs = [ConceptPairs.from_labels("parity", images, torch.arange(len(images)) % 2)]
    e = fit_concepts((model, "2"), pairs, steps=2, pool_size=16, n_blocks=1, hidden=8, progress=False).double()
    loaded = load_concept_inn(str(save_concept_inn(str(tmp_path / "e.safetensors"), e)))
    z = torch.randn(5, 6, dtype=torch.float64)
    assert loaded.dtype == torch.float64 and torch.equal(loaded(z, jac=False)[0], e(z, jac=False)[0])


def test_a_float64_default_dtype_changes_no_fit_and_no_loaded_network(images, autoencoder, tmp_path):
    """Under torch.set_default_dtype(torch.float64): fit_concepts crashed ("addmv input tensors must have the
    same dtype"), seeded pairs came from another random stream, the fits built float64 INNs, and saved
    float32 networks loaded back as float64."""
    from captum_inn.training import save_autoencoder, save_concept_inn

    labels = torch.arange(len(images)) % 2
    pairs = ConceptPairs.from_labels("a", images, labels)
    model = SmallCNN(width=4).eval()
    reference = (pairs.sample(6, torch.Generator().manual_seed(0)), _concept_inn(autoencoder, images, seed=0),
                 fit_invariances(model, "fc", autoencoder, images, steps=2, progress=False, **TINY))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        drawn = pairs.sample(6, torch.Generator().manual_seed(0))
        e = _concept_inn(autoencoder, images, seed=0)
        inn = fit_invariances(model, "fc", autoencoder, images, steps=2, progress=False, **TINY)
        loaded = (load_concept_inn(str(save_concept_inn(str(tmp_path / "e.safetensors"), e))),
                  load_invariance_inn(str(save_invariance_inn(tmp_path / "t.safetensors", inn))),
                  load_autoencoder(save_autoencoder(str(tmp_path / "ae.safetensors"), autoencoder)))
    finally:
        torch.set_default_dtype(previous)
    assert all(torch.equal(a, b) for a, b in zip(drawn, reference[0]))
    assert e.dtype == inn.dtype == torch.float32 and all(net.dtype == torch.float32 for net in loaded[:2])
    assert next(loaded[2].parameters()).dtype == torch.float32
    for fitted, again in zip(reference[1:], (e, inn)):
        for (name, a), b in zip(fitted.state_dict().items(), again.state_dict().values()):
            torch.testing.assert_close(b, a, msg=name)


def test_a_bfloat16_autoencoder_comes_back_in_bfloat16(tmp_path):
    """Any one floating dtype is kept, not float64 alone (bfloat16 weights came back as float32)."""
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.training import load_autoencoder, save_autoencoder

    torch.manual_seed(0)
    ae = ConvAutoencoder((3, 8, 8), 4, width=4).to(torch.bfloat16)
    loaded = load_autoencoder(save_autoencoder(str(tmp_path / "ae.safetensors"), ae))
    assert all(loaded.state_dict()[k].dtype == v.dtype and torch.equal(loaded.state_dict()[k], v)
               for k, v in ae.state_dict().items())
