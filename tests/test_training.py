"""fit_autoencoder, the feature cache, fit_invariances, checkpoints and resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers_hooks import assert_no_hooks, training_flags
from helpers_training import TINY, CountingCNN, split_regression
from torch import nn

from captum_inn import LayerConcepts, LayerInvariance
from captum_inn.autoencoders import (
    ConvAutoencoder,
    DiagonalGaussian,
    check_autoencoder,
    encode_mean,
    encode_posterior,
)
from captum_inn.inn import FactorINN
from captum_inn.models import SmallCNN
from captum_inn.training import (
    CheckpointError,
    FeatureCache,
    InvarianceConfig,
    cache_features,
    fit_autoencoder,
    fit_invariances,
    images_fingerprint,
    load_autoencoder,
    load_checkpoint,
    load_invariance_inn,
    save_checkpoint,
    save_invariance_inn,
    source_fingerprint,
)
from captum_inn.training.cache import _PROBE_IMAGES, source_changes
from captum_inn.training.invariances import checkpoint_name

torch.set_num_threads(1)


# ------------------------------------------------------------------ autoencoders
def test_autoencoder_protocol_and_posterior():
    ae = ConvAutoencoder((3, 16, 16), latent_dim=5, width=4)
    mean, std = encode_posterior(ae, torch.rand(3, 3, 16, 16))
    assert mean.shape == std.shape == (3, 5) and (std > 0).all()

    class Deterministic:
        def encode(self, x):
            return x.flatten(1)[:, :4]

        def decode(self, code):
            return code

    mean, std = encode_posterior(Deterministic(), torch.rand(2, 3, 4, 4))
    assert torch.equal(std, torch.zeros(2, 4))

    class TorchNormal:  # torch.distributions.Normal has .stddev, not .std
        def encode(self, x):
            return torch.distributions.Normal(x.flatten(1)[:, :4], torch.full((x.shape[0], 4), 0.3))

        def decode(self, code):
            return code

    mean, std = encode_posterior(TorchNormal(), torch.rand(2, 3, 4, 4))
    assert torch.allclose(std, torch.full((2, 4), 0.3))

    class Returns:  # encode gives what it is handed
        def __init__(self, out):
            self.out = out

        def encode(self, x):
            return self.out

    code = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="with `.mean` but no `.std` or `.stddev`"):  # taken as deterministic
        assert torch.equal(encode_posterior(Returns(SimpleNamespace(mean=code)), code)[1], torch.zeros(2, 4))
    with warnings.catch_warnings():  # the explainers read the mean only: the warning, about training, came per batch
        warnings.simplefilter("error")
        assert torch.equal(encode_mean(Returns(SimpleNamespace(mean=code)), code), code)
    with pytest.raises(TypeError, match="`autoencoder.encode` returned tuple; it must return a code tensor"):
        encode_posterior(Returns((code, code)), code)
    with pytest.raises(ValueError, match=r"codes of shape \(N, d\), got \(2, 2, 2\); flatten the code"):
        encode_posterior(Returns(code.view(2, 2, 2)), code)
    with pytest.raises(TypeError, match="lacks encode, decode"):
        check_autoencoder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="power-of-two"):
        ConvAutoencoder((3, 30, 30))
    with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
        ae.decode(torch.zeros(2, 6))


def test_diagonal_gaussian_kl_matches_torch():
    q = DiagonalGaussian(torch.randn(4, 3), torch.randn(4, 3))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)
    ).sum(1)
    assert torch.allclose(q.kl(), ref, atol=1e-6)



def test_diagonal_gaussian_keeps_extreme_log_variances_finite():
    q = DiagonalGaussian(torch.zeros(2, 3), torch.tensor([[1000.0, -1000.0, 0.0]] * 2))
    assert torch.equal(q.logvar[0], torch.tensor([20.0, -30.0, 0.0]))
    assert torch.isfinite(q.kl()).all() and torch.isfinite(q.sample(torch.Generator().manual_seed(0))).all()
    assert torch.allclose(q.std[0], torch.tensor([math.exp(10.0), math.exp(-15.0), 1.0]))

def test_fit_autoencoder_learns_and_resumes_exactly(tmp_path, images, capsys):
    path = str(tmp_path / "ae.safetensors")
    full = fit_autoencoder(images, latent_dim=8, width=4, steps=30, batch_size=8, checkpoint_every=10,
                           schedule="constant", progress=False)  # cosine depends on the total steps
    assert full.history[-1] < full.history[0]
    # A fit interrupted after 20 steps resumes from its checkpoint and ends where the full run ends.
    fit_autoencoder(images, latent_dim=8, width=4, steps=20, batch_size=8, checkpoint_every=10, checkpoint=path,
                    schedule="constant", progress=False)
    resumed = fit_autoencoder(images, latent_dim=8, width=4, steps=30, batch_size=8, checkpoint_every=10,
                              checkpoint=path, schedule="constant", progress=False)
    assert len(resumed.history) == 30
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    loaded = load_autoencoder(path)
    x = images[:4]
    assert torch.allclose(loaded(x), resumed(x), atol=1e-6)
    capsys.readouterr()
    fit_autoencoder(images, latent_dim=8, width=4, steps=32, batch_size=8, checkpoint_every=10, checkpoint=path,
                    schedule="constant")  # the progress bar says where the fit went on from
    assert "(resumed at step 30)" in capsys.readouterr().err


def test_save_autoencoder_round_trips_a_fit_without_checkpoint(tmp_path, images):
    from captum_inn.training import save_autoencoder

    ae = fit_autoencoder(images, latent_dim=8, width=4, steps=3, batch_size=8, progress=False, output="identity")
    path = save_autoencoder(str(tmp_path / "ae.safetensors"), ae)
    loaded = load_autoencoder(str(path))
    assert loaded.config == ae.config and not loaded.training
    for a, b in zip(ae.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="`autoencoder` must be a ConvAutoencoder.*torch.save"):
        save_autoencoder(str(tmp_path / "other.safetensors"), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="records no step of a fit.*another `checkpoint`, or resume=False"):
        fit_autoencoder(images, latent_dim=8, width=4, steps=3, batch_size=8, progress=False, output="identity",
                        checkpoint=str(path))


def test_a_resumed_fit_augments_as_the_uninterrupted_one(tmp_path, images):
    """Jitter draws from its own generator; the checkpoint keeps its state, so a fresh Jitter in the
    resumed run (as after a crash) continues the same shifts and noise."""
    from captum_inn.training import Jitter

    path = str(tmp_path / "ae.safetensors")
    settings = dict(latent_dim=4, width=4, batch_size=8, checkpoint_every=3, schedule="constant", progress=False)
    full = fit_autoencoder(images, steps=8, augment=Jitter(2, noise=0.05, seed=0), **settings)
    fit_autoencoder(images, steps=5, checkpoint=path, augment=Jitter(2, noise=0.05, seed=0), **settings)
    resumed = fit_autoencoder(images, steps=8, checkpoint=path, augment=Jitter(2, noise=0.05, seed=0), **settings)
    assert resumed.history == full.history
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_fit_autoencoder_rejects_bad_data():
    with pytest.raises(ValueError, match="NaN"):
        fit_autoencoder(torch.full((4, 3, 8, 8), float("nan")), latent_dim=2, steps=1, progress=False)
    with pytest.raises(TypeError, match="`data` must be"):
        fit_autoencoder(42, latent_dim=2, steps=1, progress=False)


def test_a_tensor_passed_for_a_number_is_named_by_its_shape():
    """fit_autoencoder(images, images): the error printed the whole tensor as `latent_dim`."""
    images = torch.rand(20, 3, 8, 8)
    with pytest.raises(TypeError, match=r"`latent_dim` must be an int, got an array of shape \(20, 3, 8, 8\) \(Tensor\)\.$"):
        fit_autoencoder(images, images, steps=1, progress=False)
    with pytest.raises(TypeError, match=r"`lr` must be a number, got tensor\(\[0\.1000\]\)"):  # small ones as written
        fit_autoencoder(images, latent_dim=2, lr=torch.tensor([0.1]), steps=1, progress=False)


# ------------------------------------------------------------------ feature cache
def test_cache_runs_the_model_once_per_image_for_all_layers(images, autoencoder):
    model = CountingCNN().eval()
    cache = cache_features(model, ["relu1", "relu3", "fc", "logits"], autoencoder, images, batch_size=16, progress=False)
    # one pass for four layers, and the first images read twice more (is the model random?)
    assert model.calls == len(images) + 2 * _PROBE_IMAGES + 1  # and one image to count each layer's calls
    assert cache.layer_shape("relu1") == (4, 16, 16) and cache.layer_shape("logits") == (10,)
    with torch.no_grad():
        expected = model.conv1(images).relu()
    assert torch.allclose(cache.layers["relu1"], expected, atol=1e-6)
    assert cache.code_mean.shape == (40, 6) and (cache.code_std > 0).all()
    assert_no_hooks(model)


def test_the_cache_keeps_each_images_posterior_and_draws_each_code_from_its_own_row(images, autoencoder):
    """The INN trains on samples of q(z̄ | x) (docs/method.rst): the cache must hold the encoder's own
    posterior mean and std of every image, in the images' order across batches (a scaled std trained on
    codes of the wrong spread, silently), and sample_codes must draw row i's code with row i's std
    (another row's spread paired with a mean is another posterior)."""
    cache = cache_features(SmallCNN(width=4).eval(), "logits", autoencoder, images[:12], batch_size=5, progress=False)
    with torch.no_grad():
        mean, std = encode_posterior(autoencoder, images[:12])
    assert torch.allclose(cache.code_mean, mean, atol=1e-6) and torch.allclose(cache.code_std, std, atol=1e-6)
    spread = torch.zeros_like(cache.code_std)
    spread[3] = 1.0  # only image 3's code is uncertain
    one_spread = FeatureCache(cache.code_mean, spread, cache.layers)
    index = torch.tensor([3, 0, 5, 3, 11])
    codes = one_spread.sample_codes(index, torch.Generator().manual_seed(0))
    moved = (codes - cache.code_mean[index]).abs().amax(1) > 0
    assert moved.tolist() == [True, False, False, True, False]


def test_cache_a_layer_given_twice_is_cached_once(images, autoencoder, tmp_path):
    model = CountingCNN().eval()
    for memmap_dir in (None, tmp_path / "cache"):
        cache = cache_features(model, ["fc", model.fc, "logits"], autoencoder, images[:5], progress=False,
                               memmap_dir=memmap_dir)
        assert list(cache.layers) == ["fc", "logits"] and cache.layers["fc"].shape[0] == len(cache) == 5
        cache.close()


def test_cache_restores_modes_and_reports_missing_layers(images, autoencoder):
    model = CountingCNN().train()
    flags = training_flags(model)
    cache_features(model, "relu2", autoencoder, images[:4], progress=False)
    assert training_flags(model) == flags
    with pytest.raises(ValueError, match="did you mean"):
        cache_features(model, "relu9", autoencoder, images[:4], progress=False)
    assert_no_hooks(model)


def test_cache_of_data_that_yields_no_images_is_a_value_error(images, autoencoder, tmp_path):
    """A drop_last loader with fewer images than its batch (or an empty one) gave a KeyError 'code_mean'
    in memory, and on disk wrote an empty cache that it then called damaged."""
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    class NoImages(IterableDataset):  # of unknown length: found out only after the pass
        def __iter__(self):
            return iter(())

    model = CountingCNN().eval()
    for data in (DataLoader(TensorDataset(images[:3]), batch_size=4, drop_last=True), images[:0],
                 DataLoader(NoImages(), batch_size=4)):
        for memmap_dir in (None, tmp_path / "cache"):
            if memmap_dir is not None and isinstance(data, DataLoader) and isinstance(data.dataset, NoImages):
                continue  # memmap_dir refuses data of unknown length
            with pytest.raises(ValueError, match="`data` yields no images.*drop_last"):
                cache_features(model, "fc", autoencoder, data, progress=False, memmap_dir=memmap_dir)
            assert not (tmp_path / "cache" / "manifest.json").exists()
    assert_no_hooks(model)


# ------------------------------------------------------------------ fit_invariances
def test_fit_invariances_for_several_layers_from_one_pass(images, autoencoder, tmp_path):
    model = CountingCNN().eval()
    inns = fit_invariances(model, ["relu2", "logits"], autoencoder, images, steps=5, checkpoint_dir=str(tmp_path),
                           progress=False, **TINY)
    assert model.calls == len(images) + 2 * _PROBE_IMAGES + 1  # and one image to count each layer's calls
    assert set(inns) == {"relu2", "logits"}
    assert inns["relu2"].cond_shape == (8, 8, 8) and inns["logits"].cond_shape == (10,)
    assert inns["logits"].fit_info["layer"] == "logits" and inns["logits"].fit_info["latent_dim"] == 6
    for name in inns:
        assert os.path.exists(tmp_path / checkpoint_name(name))
    assert_no_hooks(model)


@pytest.mark.parametrize("memmap", [False, True])
def test_layers_fitted_side_by_side_equal_those_fitted_one_after_another(images, autoencoder, tmp_path, memmap):
    model = SmallCNN(width=4).eval()
    threads = torch.get_num_threads()
    settings = dict(steps=6, progress=False, memmap=memmap, **TINY)
    apart = fit_invariances(model, ["relu2", "fc", "logits"], autoencoder, images, workers=1, **settings)
    side = fit_invariances(model, ["relu2", "fc", "logits"], autoencoder, images, workers=3,
                           checkpoint_dir=str(tmp_path), **settings)
    assert torch.get_num_threads() == threads  # the workers' thread settings do not leak out
    for name in apart:
        assert side[name].history == pytest.approx(apart[name].history, rel=1e-4, abs=1e-5)
        for x, y in zip(apart[name].state_dict().values(), side[name].state_dict().values()):
            assert torch.allclose(x.float(), y.float(), atol=1e-4)
        assert os.path.exists(tmp_path / checkpoint_name(name))
    # and a concurrent fit resumes from its checkpoints, one layer trained longer than the others
    resumed = fit_invariances(model, ["relu2", "fc", "logits"], autoencoder, images, workers=3,
                              checkpoint_dir=str(tmp_path), layer_overrides={"fc": {"steps": 9}},
                              **{**settings, "steps": 6})
    assert [len(resumed[n].history) for n in ("relu2", "fc", "logits")] == [6, 9, 6]
    assert resumed["fc"].history[:6] == side["fc"].history


def test_the_concurrent_progress_bar_counts_the_steps_checkpoints_hold(images, autoencoder, tmp_path, monkeypatch):
    import captum_inn.training.invariances as invariances

    bars = []

    class RecordingBar(invariances.tqdm):
        def close(self):
            bars.append((self.total, self.n))
            super().close()

    model = SmallCNN(width=4).eval()
    settings = dict(workers=2, checkpoint_dir=str(tmp_path), **TINY)
    fit_invariances(model, ["fc", "logits"], autoencoder, images, steps=6, progress=False, **settings)
    monkeypatch.setattr(invariances, "tqdm", RecordingBar)
    fit_invariances(model, ["fc", "logits"], autoencoder, images, steps=6, progress=True,
                    layer_overrides={"fc": {"steps": 9}}, **settings)  # logits is finished: it takes no step
    assert bars[-1] == (15, 15)  # the bar ended at 9 (logits' 6 steps uncounted) and jumped from 0 to 7


def test_a_failing_concurrent_fit_stops_the_others_and_raises_its_error():
    from captum_inn.training.loop import run_concurrently

    steps_taken = []

    def failing(check):
        for _ in range(3):
            check()
        raise FloatingPointError("diverged")

    def long_fit(check):
        import time

        for step in range(10_000):
            check()
            steps_taken.append(step)
            time.sleep(0.001)
        return "finished"

    with pytest.raises(FloatingPointError, match="diverged"):
        run_concurrently([long_fit, failing], workers=2)
    assert 0 < len(steps_taken) < 10_000  # cancelled at a step boundary, not run to the end
    assert run_concurrently([lambda check: 1, lambda check: 2, lambda check: 3], workers=2) == [1, 2, 3]


def test_workers_must_be_a_positive_int(images, autoencoder):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`workers` must be a positive int"):
            fit_invariances(SmallCNN(width=4).eval(), ["fc", "logits"], autoencoder, images, steps=1, workers=bad,
                            progress=False, **TINY)


def test_workers_are_refused_under_torchrun(images, autoencoder, monkeypatch):
    import captum_inn.training.invariances as invariances

    monkeypatch.setattr(invariances, "world", lambda device=None: (0, 2))  # as rank 0 of two processes
    with pytest.raises(ValueError, match="`workers`=2 under torchrun.*leave `workers` out"):
        fit_invariances(SmallCNN(width=4).eval(), ["fc", "logits"], autoencoder, images, steps=1, workers=2,
                        progress=False, **TINY)


def test_fitting_learns_the_conditional_density():
    # Codes that the layer determines up to small noise: a conditional INN must learn to
    # explain them by the condition, driving the NLL far below that of an unconditional fit.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(512, 10, generator=gen)
    codes = torch.tanh(z[:, :6]) * 2 + 0.05 * torch.randn(512, 6, generator=gen)
    cache = FeatureCache(code_mean=codes, code_std=torch.zeros_like(codes), layers={"logits": z})
    inn = fit_invariances(SmallCNN(width=4), "logits", cache=cache, steps=150, lr=3e-3, progress=False,
                          **{**TINY, "batch_size": 64})
    first, last = sum(inn.history[:10]) / 10, sum(inn.history[-10:]) / 10
    assert last < first - 1.0, (first, last)


def test_initialisation_reads_rows_from_the_whole_cache():
    # A cache in data order (here sorted by the layer's value, as a dataset sorted by class would
    # be): standardising the condition on its first 1,024 rows alone would centre the layer at
    # about 0.1 (of 0..1), not at 0.5, with a fifth of its spread.
    n = 5000
    z = torch.linspace(0, 1, n).unsqueeze(1).repeat(1, 10)
    codes = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    cache = FeatureCache(code_mean=codes, code_std=torch.zeros_like(codes), layers={"logits": z})
    inn = fit_invariances(SmallCNN(width=4), "logits", cache=cache, steps=1, progress=False, **TINY)
    mean, std = inn.embedder.in_mean.flatten(), inn.embedder.in_std.flatten()
    assert torch.allclose(mean, torch.full_like(mean, 0.5), atol=0.05), mean
    assert torch.allclose(std, torch.full_like(std, 12 ** -0.5), rtol=0.1), std  # a uniform's spread


def test_fit_invariances_is_seeded(images, autoencoder):
    model = SmallCNN(width=4).eval()
    a = fit_invariances(model, "fc", autoencoder, images, steps=3, seed=5, progress=False, **TINY)
    b = fit_invariances(model, "fc", autoencoder, images, steps=3, seed=5, progress=False, **TINY)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_fit_invariances_reads_layers_as_cache_features_does(images, autoencoder):
    """Layer inputs, selectors and extra forward arguments go to the cache the fit computes, so a
    fit from the images equals one from a cache made with them; with `cache=` they are refused."""
    model = SmallCNN(width=4).eval()

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, image, shift):
            return self.net(image + shift)

    read = dict(attribute_to_layer_input=True, selector=0, additional_forward_args=(0.25,))
    cache = cache_features(Shifted().eval(), "net.logits", autoencoder, images, progress=False, **read)
    assert tuple(cache.layer_shape("net.logits")) == (128,)  # the logits' input
    a = fit_invariances(Shifted().eval(), "net.logits", autoencoder, images, steps=3, progress=False, **read, **TINY)
    b = fit_invariances(Shifted().eval(), "net.logits", cache=cache, steps=3, progress=False, **TINY)
    assert a.cond_shape == (128,)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="`selector`, `additional_forward_args`, `attribute_to_layer_input` only apply while"):
        fit_invariances(Shifted().eval(), "net.logits", cache=cache, steps=1, progress=False, **read, **TINY)
    with pytest.raises(ValueError, match="`memmap` only applies while features are cached.*memmap_dir="):
        fit_invariances(Shifted().eval(), "net.logits", cache=cache, steps=1, memmap=True, progress=False, **TINY)


def test_the_side_of_the_layer_is_recorded_and_followed(images, autoencoder, tmp_path):
    """A fit on a layer's input records it: in the cache (memory, file, disk), in ``fit_info`` and
    in saved INNs; the explainer reads that side by default and refuses the other; a resumed fit
    refuses a cache of the other side."""
    model = SmallCNN(width=4).eval()
    cache = cache_features(model, "logits", autoencoder, images[:16], attribute_to_layer_input=True, progress=False)
    assert cache.layer_inputs and FeatureCache.load(cache.save(tmp_path / "c.safetensors")).layer_inputs
    on_disk = cache_features(model, "logits", autoencoder, images[:16], attribute_to_layer_input=True,
                             memmap_dir=tmp_path / "disk", progress=False)
    assert on_disk.layer_inputs and FeatureCache.open(tmp_path / "disk").layer_inputs
    inn = fit_invariances(model, "logits", cache=cache, steps=2, progress=False, **TINY)
    assert inn.fit_info["attribute_to_layer_input"] is True
    loaded = load_invariance_inn(save_invariance_inn(tmp_path / "inn.safetensors", inn))
    assert loaded.fit_info["attribute_to_layer_input"] is True
    x = images[:2]
    by_default = LayerInvariance(model, "logits", loaded, autoencoder)
    assert by_default.attribute_to_layer_input
    g = torch.Generator
    assert torch.equal(by_default.sample(x, n_samples=2, generator=g().manual_seed(0)),
                       LayerInvariance(model, "logits", inn, autoencoder, attribute_to_layer_input=True)
                       .sample(x, n_samples=2, generator=g().manual_seed(0)))
    with pytest.raises(ValueError, match="fitted on the layer's input, but attribute_to_layer_input=False"):
        LayerInvariance(model, "logits", inn, autoencoder, attribute_to_layer_input=False)
    with pytest.raises(ValueError, match="fitted on the layer's input"):
        by_default.sample(x, attribute_to_layer_input=False)
    outputs = fit_invariances(model, "logits", autoencoder, images[:16], steps=2, checkpoint_dir=str(tmp_path / "run"),
                              progress=False, **TINY)
    assert outputs.fit_info["attribute_to_layer_input"] is False
    assert not LayerInvariance(model, "logits", outputs, autoencoder).attribute_to_layer_input
    with pytest.raises(CheckpointError, match="holds the layers' outputs, not their inputs"):
        fit_invariances(model, "logits", autoencoder, images[:16], steps=2, checkpoint_dir=str(tmp_path / "run"),
                        attribute_to_layer_input=True, progress=False, **TINY)
    # the checkpoints a fit leaves in checkpoint_dir load with the same record as the INN it returned
    inputs = fit_invariances(model, "logits", autoencoder, images[:16], steps=2, checkpoint_dir=str(tmp_path / "in"),
                             attribute_to_layer_input=True, progress=False, **TINY)
    from_checkpoint = load_invariance_inn(tmp_path / "in" / "invariance_logits.safetensors")
    for key in ("attribute_to_layer_input", "autoencoder_weights", "layer"):
        assert from_checkpoint.fit_info[key] == inputs.fit_info[key]
    assert LayerInvariance(model, "logits", from_checkpoint, autoencoder).attribute_to_layer_input


class TwoHeads(nn.Module):
    """A model whose layer ``heads`` returns a dict of two tensors of the same shape."""

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits, self.box = nn.Linear(12, 5), nn.Linear(12, 5)

        def forward(self, h):
            return {"logits": self.logits(h), "box": self.box(h)}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = self.Heads()

    def forward(self, x):
        return self.heads(self.body(x))["logits"]


def test_the_selector_is_recorded_and_followed(images, autoencoder, tmp_path):
    """A fit records the selector that picked the layer's tensor: in the cache (memory, file, disk),
    in ``fit_info`` and in saved INNs; the explainer reads with it by default and refuses another
    (both heads have the same shape, so the mix-up would otherwise go unnoticed); a resumed fit
    refuses a cache read with another selector."""
    model, x, g = TwoHeads().eval(), images[:2], torch.Generator
    cache = cache_features(model, "heads", autoencoder, images[:16], selector="box", progress=False)
    assert cache.selectors == {"heads": "box"}
    assert FeatureCache.load(cache.save(tmp_path / "c.safetensors")).selectors == {"heads": "box"}
    on_disk = cache_features(model, "heads", autoencoder, images[:16], selector={"heads": "box"},
                             memmap_dir=tmp_path / "disk", progress=False)
    assert FeatureCache.open(tmp_path / "disk").selectors == {"heads": "box"} == on_disk.selectors
    inn = fit_invariances(model, "heads", cache=cache, steps=2, progress=False, **TINY)
    loaded = load_invariance_inn(save_invariance_inn(tmp_path / "inn.safetensors", inn))
    assert inn.fit_info["selector"] == loaded.fit_info["selector"] == "box"
    by_default = LayerInvariance(model, "heads", loaded, autoencoder)
    assert by_default.selector == "box"
    assert torch.equal(by_default.sample(x, n_samples=2, generator=g().manual_seed(0)),
                       LayerInvariance(model, "heads", inn, autoencoder, selector="box")
                       .sample(x, n_samples=2, generator=g().manual_seed(0)))
    with pytest.raises(ValueError, match="fitted with selector='box', but selector='logits' was passed; pass selector='box'"):
        LayerInvariance(model, "heads", inn, autoencoder, selector="logits")
    # a {layer: selector} dict is read by its entry for this layer (names or modules; other layers ignored)
    with pytest.raises(ValueError, match="fitted with selector='box', but selector='logits'"):
        LayerInvariance(model, "heads", inn, autoencoder, selector={"heads": "logits"})
    assert LayerInvariance(model, "heads", inn, autoencoder, selector={model.heads: "box", "body": 0}).selector == "box"
    assert LayerInvariance(model, "heads", inn, autoencoder, selector={"body": 0}).selector == "box"  # none: the record
    with pytest.raises(ValueError, match="but selector='logits'"):  # a plain function: modules as keys
        LayerInvariance(lambda t: model(t), model.heads, inn, autoencoder, selector={model.heads: "logits"})
    for wrong in (True, 1.0, {"heads": True}):  # checked when built, also a dict's entry
        with pytest.raises(TypeError, match="layer 'heads': selector must be None, an int, a str or a callable, got"):
            LayerInvariance(model, "heads", inn, autoencoder, selector=wrong)
    e = FactorINN(autoencoder.latent_dim, {"a": 2}, n_blocks=1, hidden=8)
    with torch.no_grad():  # ActNorm initialisation (the explainers refuse INNs that never saw data)
        e(torch.randn(16, autoencoder.latent_dim))
    e.fit_info = {"representation": {"kind": "autoencoder_code", "dim": autoencoder.latent_dim}}
    assert LayerConcepts(model, "heads", e, autoencoder, invariance_inn=inn).selector == "box"

    # a callable is recorded by name, never compared, and must be passed again
    def pick_box(output):
        return output["box"]

    by_callable = fit_invariances(model, "heads", autoencoder, images[:16], selector=pick_box, steps=2,
                                  progress=False, **TINY)
    assert by_callable.fit_info["selector"] == {"callable": pick_box.__qualname__}
    with pytest.raises(ValueError, match="callable selector .*pick_box.*pass the same callable"):
        LayerInvariance(model, "heads", by_callable, autoencoder)
    assert LayerInvariance(model, "heads", by_callable, autoencoder, selector=lambda o: o["box"]).sample(x, 2).shape[1] == 2

    # a tensor layer is fitted without one; an INN from before the record takes any selector
    plain = fit_invariances(model, "heads.box", autoencoder, images[:16], steps=2, progress=False, **TINY)
    assert plain.fit_info["selector"] is None
    with pytest.raises(ValueError, match="fitted without a selector, but selector=0 was passed; leave selector out"):
        LayerInvariance(model, "heads.box", plain, autoencoder, selector=0)
    del loaded.fit_info["selector"]
    assert LayerInvariance(model, "heads", loaded, autoencoder, selector="logits").selector == "logits"

    # resuming refuses features picked otherwise: from the cache in checkpoint_dir, a given cache, a new one
    run = str(tmp_path / "run")
    fit_invariances(model, "heads", autoencoder, images[:16], selector="box", steps=2, checkpoint_dir=run,
                    progress=False, **TINY)
    with pytest.raises(CheckpointError, match="read layer 'heads' with selector='box', not selector='logits'"):
        fit_invariances(model, "heads", autoencoder, images[:16], selector="logits", steps=2, checkpoint_dir=run,
                        progress=False, **TINY)
    logits = cache_features(model, "heads", autoencoder, images[:16], selector="logits", progress=False)
    for again in (dict(cache=logits), dict(autoencoder=autoencoder, data=images[:16], selector="logits", memmap=True)):
        with pytest.raises(CheckpointError, match="another configuration.*selector"):
            fit_invariances(model, "heads", steps=4, checkpoint_dir=run, progress=False, **again, **TINY)
    # a checkpoint_dir of an earlier version (no selector recorded anywhere) still resumes, with or without
    # cache=, and the INN then records the selector asked for
    old = tmp_path / "old"
    fit_invariances(model, "heads", autoencoder, images[:16], selector="box", steps=2, checkpoint_dir=str(old),
                    progress=False, **TINY)
    for file in old.iterdir():
        tensors, meta = load_checkpoint(file)
        for section in ("config", "fit_info"):
            for key in ("selectors", "selector"):
                (meta.get(section) or {}).pop(key, None)
        save_checkpoint(file, tensors, meta)
    resumed = fit_invariances(model, "heads", autoencoder, images[:16], selector="box", steps=3,
                              checkpoint_dir=str(old), progress=False, **TINY)
    assert len(resumed.history) == 3 and resumed.fit_info["selector"] == "box"
    box = cache_features(model, "heads", autoencoder, images[:16], selector="box", progress=False)
    assert len(fit_invariances(model, "heads", cache=box, steps=4, checkpoint_dir=str(old), progress=False,
                               **TINY).history) == 4
    callable_run = str(tmp_path / "callable")
    fit_invariances(model, "heads", autoencoder, images[:16], selector=pick_box, steps=2, checkpoint_dir=callable_run,
                    progress=False, **TINY)
    with pytest.raises(CheckpointError, match=r"with the callable selector .*pick_box, not no selector"):
        fit_invariances(model, "heads", autoencoder, images[:16], steps=2, checkpoint_dir=callable_run,
                        progress=False, **TINY)
    assert fit_invariances(model, "heads", autoencoder, images[:16], selector=lambda o: o["box"], steps=2,
                           checkpoint_dir=callable_run, progress=False, **TINY).fit_info["steps"] == 2


def test_interrupted_fit_resumes_to_the_uninterrupted_result(images, autoencoder, tmp_path):
    model = SmallCNN(width=4).eval()
    cache = cache_features(model, "logits", autoencoder, images, progress=False)
    full = fit_invariances(model, "logits", cache=cache, steps=12, checkpoint_every=4, progress=False, **TINY)
    fit_invariances(model, "logits", cache=cache, steps=8, checkpoint_every=4, checkpoint_dir=str(tmp_path),
                    progress=False, **TINY)
    resumed = fit_invariances(model, "logits", cache=cache, steps=12, checkpoint_every=4,
                              checkpoint_dir=str(tmp_path), progress=False, **TINY)
    assert len(resumed.history) == 12
    for x, y in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5)
    with pytest.raises(CheckpointError, match="another configuration"):
        fit_invariances(model, "logits", cache=cache, steps=12, checkpoint_dir=str(tmp_path), progress=False,
                        **{**TINY, "hidden": 32})


def test_fits_and_saves_refuse_what_they_cannot_use(images, autoencoder, tmp_path):
    """A cache without the layer, a cache of one image, an INN that was never fitted, a concept INN
    of another class: each a named error (no test reached these)."""
    from captum_inn.inn import ConditionalINN
    from captum_inn.training import save_concept_inn

    model = SmallCNN(width=4).eval()
    cache = cache_features(model, "fc", autoencoder, images[:4], progress=False)
    with pytest.raises(ValueError, match=r"The cache holds layers \['fc'\], not \['logits'\]; cache them first"):
        fit_invariances(model, "logits", cache=cache, steps=1, progress=False, **TINY)
    one = cache_features(model, "fc", autoencoder, images[:1], progress=False)
    with pytest.raises(ValueError, match="at least 2 training images, the cache holds 1"):
        fit_invariances(model, "fc", cache=one, steps=1, progress=False, **TINY)
    fitted_by_hand = ConditionalINN(6, (8,), n_blocks=1, hidden=8)
    fitted_by_hand(torch.randn(4, 6), torch.randn(4, 8))  # initialises ActNorm: fitted, but no fit_info
    with pytest.raises(ValueError, match="`inn` has no `fit_info`"):
        save_invariance_inn(tmp_path / "a.safetensors", fitted_by_hand)
    with pytest.raises(TypeError, match="`inn` must be a FactorINN from fit_concepts, got ConditionalINN"):
        save_concept_inn(tmp_path / "b.safetensors", ConditionalINN(6, (8,)))
    assert list(tmp_path.iterdir()) == []


def test_code_noise_is_added_to_the_training_codes_reproducibly(images, autoencoder):
    """InvarianceConfig.code_noise (extra noise on the posterior samples): no test set it."""
    model = SmallCNN(width=4).eval()
    cache = cache_features(model, "logits", autoencoder, images, progress=False)
    plain = fit_invariances(model, "logits", cache=cache, steps=3, progress=False, **TINY)
    noisy = fit_invariances(model, "logits", cache=cache, steps=3, progress=False, code_noise=0.5, **TINY)
    again = fit_invariances(model, "logits", cache=cache, steps=3, progress=False, code_noise=0.5, **TINY)
    assert all(np.isfinite(noisy.history)) and noisy.history != plain.history
    assert noisy.history == again.history  # drawn from the fit's seeded generator


def test_code_noise_with_a_constant_code_unit_starts_on_scale():
    """ActNorm was initialised on codes without the fit's code_noise: a constant unit (a deterministic
    encoder's dead one) got a scale of ~100 per block, and the training noise reached the couplings
    blown up (first loss 2e12, never NaN, so nothing stopped the fit)."""
    class DeadUnitEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("W", torch.linalg.qr(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))[0].T)
            self.W[3] = 0.0  # code unit 3 is always 0
            self.latent_dim = 4

        def encode(self, x):
            return x.flatten(1) @ self.W.T

        def decode(self, c):
            return (c @ self.W).view(-1, 1, 8, 8)

    ae = DeadUnitEncoder()
    x = (torch.randn(256, 4, generator=torch.Generator().manual_seed(1)) @ ae.W).view(-1, 1, 8, 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2), nn.Linear(2, 3)).eval()
    inn = fit_invariances(model, "1", ae, x, steps=5, n_blocks=4, hidden=16, code_noise=0.05, progress=False)
    assert max(inn.history) < 50, inn.history  # a 4-d Gaussian NLL: a few nats per dimension at most


@pytest.mark.parametrize("memmap", [False, True])
def test_resume_refuses_a_cache_of_another_model_or_other_images(images, autoencoder, tmp_path, memmap):
    model = SmallCNN(width=4).eval()
    settings = dict(checkpoint_dir=str(tmp_path), memmap=memmap, progress=False, **TINY)
    fit_invariances(model, "fc", autoencoder, images, steps=2, **settings)
    resumed = fit_invariances(model, "fc", autoencoder, images.clone(), steps=3, **settings)  # same sources
    assert len(resumed.history) == 3
    retrained = SmallCNN(width=4).eval()
    with torch.no_grad():
        retrained.load_state_dict(model.state_dict())
        retrained.fc.weight.add_(0.01)
    changed_images = images.clone()
    changed_images[0] = 1 - changed_images[0]
    other_autoencoder = copy.deepcopy(autoencoder)
    with torch.no_grad():
        next(other_autoencoder.parameters()).add_(0.01)
    cases = {"the model's weights or buffers": (retrained, autoencoder, images),
             "the images": (model, autoencoder, changed_images),
             "the images (their number": (model, autoencoder, images[:-1]),
             "what differs: the autoencoder)": (model, other_autoencoder, images)}
    for changed, (other_model, other_autoencoder, other_images) in cases.items():  # the error names what changed
        with pytest.raises(CheckpointError, match=re.escape(changed) + ".*resume=False") as error:
            fit_invariances(other_model, "fc", other_autoencoder, other_images, steps=4, **settings)
        assert sum(part in str(error.value) for part in ("the model's", "the autoencoder", "the images")) == 1
    # resume=False recomputes the cache from the new model and fits afresh
    fresh = fit_invariances(retrained, "fc", autoencoder, images, steps=2, **{**settings, "resume": False})
    assert len(fresh.history) == 2
    fit_invariances(retrained, "fc", autoencoder, images, steps=3, **settings)  # and resumes from it


def test_float64_networks_are_fitted_with_a_float32_inn(images, autoencoder):
    model = SmallCNN(width=4).double().eval()
    ae64 = copy.deepcopy(autoencoder).double()
    inn = fit_invariances(model, "fc", ae64, images.double(), steps=3, progress=False, **TINY)
    assert inn.dtype == torch.float32 and torch.isfinite(torch.tensor(inn.history)).all()
    explained = LayerInvariance(model, "fc", inn, ae64).attribute(images[:2].double(), n_samples=3, seed=0)
    assert explained.dtype == torch.float64 and torch.isfinite(explained).all()
    # a float64 model with its float32 autoencoder: the images go to the encoder in its dtype
    mixed = fit_invariances(model, "fc", autoencoder, images.double(), steps=3, progress=False, **TINY)
    explained = LayerInvariance(model, "fc", mixed, autoencoder).attribute(images[:2].double(), n_samples=3, seed=0)
    assert explained.dtype == torch.float64 and torch.isfinite(explained).all()


class _AlwaysDropout(nn.Module):
    """Dropout as F.dropout(h, p) writes it, on in eval mode too (the MC-dropout pattern)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(h, 0.5)


class _CentredOverBatch(nn.Module):
    """Each image's features less the batch's mean: a layer that depends on the other images."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(0)


def test_a_layer_that_differs_between_reads_of_the_same_images_warns(images, autoencoder):
    """A model random in eval mode, or one that mixes a batch's images, is fitted on one read of the
    layer and explained from others: the fit says so, and keeps the caller's random streams."""
    torch.manual_seed(0)
    for last, cause in ((_AlwaysDropout(), "the model is random in eval mode"),
                        (_CentredOverBatch(), "the model mixes the images of a batch")):
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), last).eval()
        with pytest.warns(UserWarning, match=f"Layer '2'.s activations .*{cause}") as caught:
            fit_invariances(model, "2", autoencoder, images, steps=1, progress=False, **TINY)
        assert [w.filename for w in caught if "activations" in str(w.message)] == [__file__]
    from captum_inn.training.cache import _warn_if_random

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), _AlwaysDropout()).eval()
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="random in eval mode"):
        _warn_if_random(model, ["2"], {"2": torch.zeros(4, 16)}, images[:4], (), False, None)
    assert torch.equal(torch.random.get_rng_state(), state)  # its draws came from a fork of the stream
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_invariances(SmallCNN(width=4).eval(), "fc", autoencoder, images, steps=1, progress=False, **TINY)
        fit_invariances(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.Dropout(0.5)).eval(), "2",
                        autoencoder, images, steps=1, progress=False, **TINY)  # nn.Dropout is off in eval mode


class _ShiftsItsInputInPlace(SmallCNN):
    """A model that centres its input in place (``x.sub_(0.5)``), as some preprocessing does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.sub_(0.5))


def test_a_plain_function_around_a_model_that_changes_its_input_in_place_explains_the_images_given(images,
                                                                                                     autoencoder):
    """Behind a plain function (a lambda) too, the explainer's layer pass gets a copy of the images: the
    model centred the caller's images in place, and the encoder then read the centred ones."""
    from helpers_training import random_conditional_inn

    from captum_inn.capture import capture

    torch.manual_seed(0)
    model, x = _ShiftsItsInputInPlace(width=4).eval(), images[:3].clone()
    inn = random_conditional_inn(tuple(capture(model, "fc", images[:2]).shape[1:]))
    direct = LayerInvariance(model, "fc", inn, autoencoder)
    through_lambda = LayerInvariance(lambda t: model(t), model.fc, inn, autoencoder)
    assert torch.allclose(through_lambda.invariances(x), direct.invariances(x), atol=1e-6)
    assert torch.allclose(through_lambda.attribute(x, n_samples=2, seed=0), direct.attribute(x, n_samples=2, seed=0),
                          atol=1e-6)
    assert torch.equal(x, images[:3])


def test_a_model_that_changes_its_input_in_place_leaves_the_images_as_they_were(images, autoencoder):
    """The fits read the images again after the model's pass (the encoder, the randomness probe), the
    explainers and metrics too: each pass gets a copy, so nothing reads centred images, nor is a model
    that gives the same activations for the same images called random."""
    from captum_inn.capture import capture
    from captum_inn.metrics import prediction_agreement

    torch.manual_seed(0)
    model, kept = _ShiftsItsInputInPlace(width=4).eval(), images.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe reads the same images as the cached pass
        cache = cache_features(model, "fc", autoencoder, images[:20], progress=False)
    assert torch.equal(images, kept)
    assert torch.allclose(cache.code_mean, encode_mean(autoencoder, images[:20]), atol=1e-6)
    plain = SmallCNN(width=4).eval()
    plain.load_state_dict(model.state_dict())  # the same network without the in-place step
    assert torch.allclose(cache.layers["fc"], capture(plain, "fc", images[:20] - 0.5), atol=1e-6)
    assert torch.allclose(capture(model, "fc", images[:20]), cache.layers["fc"], atol=1e-6)
    inn = fit_invariances(model, "fc", autoencoder, images, steps=2, progress=False, **TINY)
    LayerInvariance(model, "fc", inn, autoencoder).attribute(images[:3], n_samples=2, seed=0)
    assert prediction_agreement(model, images[:8], images[:8, None]) == 1.0
    assert torch.equal(images, kept)
    # Captum's Integrated Gradients and FGSM give the model leaf images that require gradients, which it
    # cannot change in place: refused before Captum's "a leaf Variable ..." (Grad-CAM had changed the images)
    from captum_inn.analysis import adversarial_views
    from captum_inn.compare import compare_attributions

    explainer = LayerInvariance(model, "fc", inn, autoencoder)
    with pytest.raises(ValueError, match=r"`model` changes its input in place .*Integrated Gradients gives it images "
                                         r"that require gradients.*returns model\(x.clone\(\)\)"):
        compare_attributions(model, images[:2], explainer, n_samples=2, ig_steps=4, progress=False)
    with pytest.raises(ValueError, match=r"changes its input in place .*the FGSM attack"):
        adversarial_views(model, {"fc": explainer}, images[:4], torch.zeros(4, dtype=torch.long), model)
    assert torch.equal(images, kept)

    class Copying(nn.Module):  # the wrapper the error suggests
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x.clone())

    wrapped = Copying().eval()
    compare_attributions(wrapped, images[:2], LayerInvariance(wrapped, "model.fc", inn, autoencoder), n_samples=2,
                         ig_steps=4, progress=False)
    assert torch.equal(images, kept)


def test_a_layer_that_gives_every_image_the_same_activations_warns(images, autoencoder):
    collapsed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8)).eval()
    with torch.no_grad():
        collapsed[1].weight.mul_(1e-6)  # the bias dominates: a collapsed model's head
    with pytest.warns(UserWarning, match="Layer '1' gives almost the same activations for every image") as caught:
        fit_invariances(collapsed, "1", autoencoder, images, steps=1, progress=False, **TINY)
    assert caught[0].filename == __file__  # points at the caller's line
    # spread 6e-5 of the bias: a hint, not the false claim that the maps will say it ignores everything
    assert "the INN still reads this variation" in str(caught[0].message)
    from captum_inn.training.invariances import _warn_if_constant

    collapsed_rows = torch.cat([5 + 1e-6 * torch.randn(64, 50), 1e-6 * torch.randn(64, 1)], 1)
    with pytest.warns(UserWarning, match="almost the same activations.*float32 resolves it in fewer than 16 "
                                         "steps"):  # a unit near 0 hid the collapse
        _warn_if_constant(collapsed_rows, "head")
    with pytest.warns(UserWarning, match="almost the same activations"):  # summed in float64: no overflow
        _warn_if_constant(torch.full((64, 3), 3e37) + 1e30 * torch.randn(64, 3), "huge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # layers that vary on scales float32 squares cannot hold (their squares underflow or overflow)
        for scale in (1e-30, 1e-20, 1e25, 1e37):
            _warn_if_constant(scale * torch.rand(64, 3), f"scale {scale:g}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_invariances(SmallCNN(width=4).eval(), "fc", autoencoder, images, steps=1, progress=False, **TINY)
        # a varying layer with a few large constant units: their size made it look constant
        fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8)).eval()
        with torch.no_grad():
            fixed[1].weight[:3] = 1e-5  # near-constant: 1e4 ± 2e-4
            fixed[1].bias[:3] = 1e4
        fit_invariances(fixed, "1", autoencoder, images, steps=1, progress=False, **TINY)


def test_source_fingerprint_is_the_one_older_versions_wrote():
    """Caches and checkpoints record it and a resume compares it: its value must not change
    (pinned from the version before the fingerprint had parts)."""
    model, ae = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)), nn.Linear(4, 3)
    with torch.no_grad():  # values set without a random generator
        for i, t in enumerate([*model.parameters(), *model.buffers(), *ae.parameters()]):
            t.copy_(torch.arange(t.numel()).reshape(t.shape) * 0.01 + i)
    images = torch.arange(5 * 3 * 4 * 4, dtype=torch.float32).reshape(5, 3, 4, 4) / 240
    assert source_fingerprint(model, ae, images) == "27896d37386075aa"


def test_a_compiled_or_data_parallel_model_fingerprints_as_the_model_it_wraps(images, autoencoder, tmp_path):
    """A wrapper's state_dict names its keys "_orig_mod." or "module.": a resume with the same model
    compiled was refused as "another model (the model's weights or buffers)"."""
    model = SmallCNN(width=4).eval()
    plain = source_fingerprint(model, autoencoder, images)
    assert source_fingerprint(torch.compile(model), autoencoder, images) == plain
    assert source_fingerprint(nn.DataParallel(model), nn.DataParallel(autoencoder), images) == plain
    run = str(tmp_path / "run")
    fit_invariances(model, "relu3", autoencoder, images, steps=2, checkpoint_dir=run, progress=False, **TINY)
    inn = fit_invariances(torch.compile(model), "relu3", autoencoder, images, steps=3, checkpoint_dir=run,
                          progress=False, **TINY)
    assert inn.fit_info["steps"] == 3


def test_fitted_networks_come_back_without_the_last_steps_gradients(images, autoencoder):
    """They held a gradient as large as the weights (the last step's) on every parameter."""
    from captum_inn.training.classifier import fit_classifier

    model = SmallCNN(width=4).eval()
    fitted = [fit_invariances(model, "relu3", autoencoder, images, steps=2, progress=False, **TINY),
              fit_autoencoder(images[:8], latent_dim=4, width=4, batch_size=4, steps=2, progress=False),
              fit_classifier(SmallCNN(width=4), (images[:8], torch.arange(8) % 3), batch_size=4, steps=2,
                             progress=False)]
    for network in fitted:
        assert all(p.grad is None for p in network.parameters()), type(network).__name__


def test_fingerprints_hash_the_weights_in_place_and_keep_their_values():
    """The hashes read each CPU tensor's own memory (no bytes copy per weight, a sixth of a
    fingerprint's time) and give the values recorded before (pinned)."""
    import numpy as np

    from captum_inn._fingerprints import tensor_bytes
    from captum_inn.training import weights_fingerprint

    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
    with torch.no_grad():
        for i, t in enumerate([*model.parameters(), *model.buffers()]):
            t.copy_(torch.arange(t.numel()).reshape(t.shape) * 0.01 + i)
    weight = model[0].weight.detach()
    assert np.shares_memory(tensor_bytes(weight), weight.numpy())
    assert bytes(tensor_bytes(torch.zeros(0))) == b""
    assert weights_fingerprint(model) == weights_fingerprint(model.double()) == "da0bc6e2119af9bb"


def test_a_plain_object_autoencoder_is_fingerprinted_by_the_networks_it_holds():
    """The protocol allows any object with encode/decode; one holding its networks as attributes
    hashed to the same value whatever their weights, so a retrained one passed the weight check."""
    from captum_inn.training import weights_fingerprint

    class Plain:
        def __init__(self, seed):
            torch.manual_seed(seed)
            self.enc, self.dec, self.scale = nn.Linear(4, 2), nn.Linear(2, 4), torch.tensor(2.0)

    assert weights_fingerprint(Plain(0)) == weights_fingerprint(Plain(0))
    assert weights_fingerprint(Plain(0)) != weights_fingerprint(Plain(1))
    retrained = Plain(0)
    with torch.no_grad():
        retrained.dec.bias.add_(0.1)
    assert weights_fingerprint(retrained) != weights_fingerprint(Plain(0))


def test_source_changes_names_parts_and_survives_caches_without_them(images, autoencoder, tmp_path):
    model = SmallCNN(width=4).eval()
    cache = cache_features(model, "fc", autoencoder, images, progress=False)
    assert set(cache.source_parts) == {"model", "autoencoder", "images"}
    assert cache.source == source_fingerprint(model, autoencoder, images)  # the whole, as before the parts
    assert FeatureCache.load(cache.save(tmp_path / "c.safetensors")).source_parts == cache.source_parts
    assert source_changes(cache, model, autoencoder, images.clone()) is None
    assert source_changes(cache, model, autoencoder, images[:-1]) == "the images (their number or content)"
    older = dataclasses.replace(cache, source_parts={})  # written by a version without the parts
    assert source_changes(older, model, autoencoder, images[:-1]) == "the model, the autoencoder or the images"


def test_an_inn_checkpoint_of_another_models_features_is_refused_even_with_a_fresh_cache(images, autoencoder, tmp_path):
    """A fit that caches again (another set of layers here) must not resume an INN trained on another
    model's features: the INN checkpoint records where its features came from."""
    model, other = SmallCNN(width=4).eval(), SmallCNN(width=4).eval()
    settings = dict(checkpoint_dir=str(tmp_path), progress=False, **TINY)
    fit_invariances(model, "fc", autoencoder, images, steps=2, checkpoint_every=1, **settings)
    with pytest.raises(CheckpointError, match="another configuration"):
        fit_invariances(other, ["fc", "logits"], autoencoder, images, steps=3, **settings)


def test_a_bad_schedule_is_refused_before_the_pass_over_the_data(images, autoencoder):
    model = CountingCNN().eval()
    with pytest.raises(ValueError, match="`schedule` must be 'constant' or 'cosine', got 'Cosine'"):
        fit_invariances(model, "fc", autoencoder, images, schedule="Cosine", steps=1, progress=False, **TINY)
    assert model.calls == 0  # it was refused only after the features were cached


def test_each_layer_is_listed_once(images, autoencoder):
    model = SmallCNN(width=4).eval()
    with pytest.raises(ValueError, match="`layers` lists layer 'fc' more than once"):
        fit_invariances(model, ["fc", model.fc], autoencoder, images, steps=1, progress=False, **TINY)


def test_fits_leave_the_global_random_stream_as_they_found_it(images, autoencoder):
    model = SmallCNN(width=4).eval()
    cache = cache_features(model, "fc", autoencoder, images, progress=False)
    fits = [lambda: fit_invariances(model, "fc", cache=cache, steps=1, progress=False, **TINY),
            lambda: fit_autoencoder(images, latent_dim=4, width=4, steps=1, progress=False)]
    for fit in fits:
        torch.manual_seed(1234)
        expected = torch.rand(3, generator=torch.Generator().manual_seed(1234))
        fit()
        assert torch.equal(torch.rand(3), expected)
    # and the fits stay seeded: the same initial weights whatever the global state
    torch.manual_seed(1)
    first = fit_invariances(model, "fc", cache=cache, steps=1, progress=False, **TINY)
    torch.manual_seed(2)
    second = fit_invariances(model, "fc", cache=cache, steps=1, progress=False, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_a_pass_over_a_dataset_leaves_the_global_random_stream_as_a_tensor_does(images, autoencoder):
    """The DataLoader built around a Dataset drew its workers' base seed from the global generator
    on every pass, so caching or fitting on a Dataset moved the caller's stream (a tensor did not)."""
    from torch.utils.data import TensorDataset

    model = SmallCNN(width=4).eval()
    data = TensorDataset(images[:8], torch.zeros(8))
    for run in (lambda: cache_features(model, "fc", autoencoder, data, progress=False),
                lambda: fit_autoencoder(data, latent_dim=4, width=4, batch_size=4, steps=1, progress=False)):
        torch.manual_seed(1234)
        run()
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(1234)))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_fits_train_inside_a_callers_no_grad_or_inference_mode(images, autoencoder, mode):
    """A notebook cell that evaluates the model under no_grad and then fits: every fit failed with
    "element 0 of tensors does not require grad"; it now trains as outside the block."""
    from captum_inn.concepts import ConceptPairs
    from captum_inn.training import fit_concepts
    from captum_inn.training.classifier import fit_classifier

    model = SmallCNN(width=4).eval()
    expected = fit_invariances(model, "fc", autoencoder, images, steps=1, progress=False, **TINY)
    labels = torch.arange(len(images)) % 3
    classifier = SmallCNN(width=4)
    with mode():
        cell_images, cell_labels = images.clone(), labels.clone()  # inference tensors under inference_mode
        inn = fit_invariances(model, "fc", autoencoder, cell_images, steps=1, progress=False, **TINY)
        fit_autoencoder(cell_images, latent_dim=4, width=4, steps=1, progress=False)
        fit_concepts(autoencoder, [ConceptPairs.from_labels("a", cell_images, cell_labels)], factor_sizes={"a": 2},
                     steps=1, n_blocks=1, hidden=8, progress=False)
        fit_classifier(classifier, (cell_images, cell_labels), steps=1, progress=False)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert all(torch.equal(a, b) for a, b in zip(inn.state_dict().values(), expected.state_dict().values()))


def test_fits_leave_images_that_require_grad_without_a_grad(images):
    """Images that require grad (left over from a saliency method) got a .grad as large as the data
    from fit_autoencoder and fit_classifier, and a warning; the fits learn weights only."""
    from captum_inn.training.classifier import fit_classifier

    images = images[:8]
    plain = fit_autoencoder(images, latent_dim=4, width=4, batch_size=4, steps=2, progress=False)
    tracked = images.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = fit_autoencoder(tracked, latent_dim=4, width=4, batch_size=4, steps=2, progress=False)
        fit_classifier(SmallCNN(width=4), (tracked, torch.arange(8) % 3), batch_size=4, steps=1, progress=False)
    assert tracked.grad is None and tracked.requires_grad
    assert fitted.history == plain.history


def test_changed_settings_of_any_layer_are_refused_before_any_layer_trains(tmp_path, images, autoencoder, monkeypatch):
    model = SmallCNN(width=4).eval()
    layers, run = ["relu3", "fc", "logits"], str(tmp_path / "run")
    fit_invariances(model, layers, autoencoder, images, steps=4, checkpoint_dir=run, progress=False, **TINY)
    import captum_inn.training.invariances as invariances

    passes = []
    monkeypatch.setattr(invariances, "cache_features", lambda *a, **k: passes.append(1))
    with pytest.raises(CheckpointError, match=r"invariance_logits.safetensors.*another configuration \(lr: 0.0005 in the checkpoint, 0.005 now\)"):
        fit_invariances(model, layers, autoencoder, images, steps=8, checkpoint_dir=run, progress=False,
                        layer_overrides={"logits": {"lr": 5e-3}}, **TINY)
    with pytest.raises(ValueError, match="already holds 4 steps, more than `steps`=2"):
        fit_invariances(model, layers, autoencoder, images, steps=2, checkpoint_dir=run, progress=False, **TINY)
    assert passes == []  # refused before the pass over the data, and so before any layer trained
    for name in layers:
        assert load_checkpoint(tmp_path / "run" / f"invariance_{name}.safetensors")[1]["step"] == 4


def test_checkpoint_problems_show_before_training_and_resumes_cannot_go_back(tmp_path, images):
    from captum_inn.training import train_loop

    lin = nn.Linear(3, 1)
    x = torch.randn(32, 3)

    def loss_fn(generator):
        rows = torch.randint(32, (8,), generator=generator)
        return lin(x[rows]).pow(2).mean()

    (tmp_path / "afile").write_text("not a folder")
    steps_taken = []
    for bad, match in ((tmp_path / "afile" / "ck.safetensors", r"No checkpoint can be written .*\('.*afile' is a file, not a folder\)"),
                       (tmp_path, "is a folder; pass a file path in it")):
        with pytest.raises(ValueError, match=match):
            train_loop(lin, loss_fn, steps=100, lr=0.01, checkpoint=str(bad), progress=False,
                       callback=lambda step, module: steps_taken.append(step))
    assert steps_taken == []  # refused before the first step
    path = str(tmp_path / "fit" / "ck.safetensors")
    train_loop(lin, loss_fn, steps=10, lr=0.01, checkpoint=path, progress=False)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())  # like any file the user writes
    with pytest.raises(ValueError, match="already holds 10 steps, more than `steps`=4"):
        train_loop(lin, loss_fn, steps=4, lr=0.01, checkpoint=path, progress=False)
    # a resumed autoencoder fit on images of another shape is refused like any other change
    ae_path = str(tmp_path / "ae.safetensors")
    fit_autoencoder(images, latent_dim=4, width=4, steps=2, checkpoint=ae_path, progress=False)
    bigger = torch.nn.functional.interpolate(images, scale_factor=2)
    with pytest.raises(CheckpointError, match="another configuration"):
        fit_autoencoder(bigger, latent_dim=4, width=4, steps=3, checkpoint=ae_path, progress=False)


def test_the_check_of_a_checkpoint_place_leaves_no_probe_behind(tmp_path):
    # the probe file that shows the folder writable is removed again: the new folder stays empty
    from captum_inn.training.checkpoint import check_checkpoint_path

    assert check_checkpoint_path(tmp_path / "new" / "fit.safetensors") == tmp_path / "new" / "fit.safetensors"
    assert list((tmp_path / "new").iterdir()) == []


def test_a_checkpoint_without_the_optimizer_state_is_a_clear_error(tmp_path):
    from captum_inn.training import train_loop
    from captum_inn.training.checkpoint import module_tensors

    lin = nn.Linear(3, 1)
    path = str(tmp_path / "ck.safetensors")
    meta = {"kind": "module", "config": {}}
    save_checkpoint(path, module_tensors(lin), {**meta, "step": 2, "history": [1.0, 0.5]})
    with pytest.raises(CheckpointError, match="does not hold a whole fit of this module.*resume=False"):
        train_loop(lin, lambda g: lin(torch.ones(1, 3)).sum(), steps=4, lr=0.1, checkpoint=path, meta=meta,
                   progress=False)


def test_a_resume_uses_its_own_adam_settings_and_refuses_damaged_ones(tmp_path):
    """The file's Adam settings were loaded as they were: an edited rate trained at that rate, `maximize`
    turned the fit into gradient ascent; NaN weights or moments failed as "lower the learning rate",
    and an infinite second moment froze its weight, silently."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from captum_inn.training import train_loop

    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))

    def fit(path, steps):
        torch.manual_seed(0)
        lin = nn.Linear(3, 1)
        train_loop(lin, lambda g: (lin(x) - 1).pow(2).mean(), steps=steps, lr=0.01, checkpoint=str(path),
                   checkpoint_every=5, progress=False)
        return lin

    fit(tmp_path / "ck.safetensors", 5)
    with safe_open(str(tmp_path / "ck.safetensors"), "pt") as f:
        doc, tensors = json.loads(f.metadata()["captum_inn"]), {k: f.get_tensor(k) for k in f.keys()}
    reference = fit(tmp_path / "ck.safetensors", 10)

    def edited(name, change_doc=None, key=None, value=None):
        changed_doc, changed = json.loads(json.dumps(doc)), {k: v.clone() for k, v in tensors.items()}
        if change_doc:
            change_doc(changed_doc["optimizer"]["param_groups"][0])
        if key:
            changed[key].view(-1)[0] = value
        save_file(changed, str(tmp_path / name), metadata={"captum_inn": json.dumps(changed_doc)})
        return tmp_path / name

    assert torch.equal(fit(edited("same.safetensors"), 10).weight, reference.weight)  # an unedited copy resumes
    for name, change_doc, key, value, match in (
            ("rate", lambda group: group.update(lr=0.5), None, None, r"rate is 0.5, this fit's constant rate 0.01"),
            ("maximize", lambda group: group.update(maximize=True), None, None, r"settings differ .*\['maximize'\]"),
            ("eps", lambda group: group.update(eps=1.0), None, None, r"settings differ .*\['eps'\]"),
            ("weights", None, "model.weight", float("nan"), r"NaN or infinite values in \['weight'\]"),
            ("moment", None, "optim.0.exp_avg", float("nan"), r"'exp_avg' of parameter 0 holds NaN, infinite values"),
            ("second", None, "optim.0.exp_avg_sq", float("inf"), r"'exp_avg_sq' of parameter 0 holds NaN, infinite or "
                                                                   r"negative values")):
        with pytest.raises(CheckpointError, match=match):
            fit(edited(f"{name}.safetensors", change_doc, key, value), 10)


def test_the_progress_bar_shows_the_loss_of_a_short_fit_as_it_falls(monkeypatch):
    import captum_inn.training.loop as loop

    shown = []

    class RecordingBar(loop.tqdm):
        def set_postfix(self, **kwargs):
            shown.append(float(kwargs["loss"]))

    monkeypatch.setattr(loop, "tqdm", RecordingBar)
    lin = nn.Linear(3, 1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    history = loop.train_loop(lin, lambda g: (lin(x) - 1).pow(2).mean(), steps=30, lr=0.1, progress=True)
    # 30 steps: refreshed every step (every 50 before, so the bar kept the first step's loss), the last one included
    assert len(shown) == 30 and shown[-1] == pytest.approx(history[-1], abs=1e-3) and shown[-1] < shown[0]


def test_an_inn_saved_where_a_fit_keeps_its_checkpoint_is_a_clear_error(images, autoencoder, tmp_path):
    """save_invariance_inn's file records no step; a fit resuming from it raised a bare KeyError."""
    from captum_inn.training import train_loop

    model = SmallCNN(width=4).eval()
    inn = fit_invariances(model, "fc", autoencoder, images[:16], steps=1, progress=False, **TINY)
    save_invariance_inn(str(tmp_path / checkpoint_name("fc")), inn)
    with pytest.raises(CheckpointError, match="records no step of a fit.*another `checkpoint_dir`"):
        fit_invariances(model, "fc", autoencoder, images[:16], steps=1, checkpoint_dir=str(tmp_path),
                        progress=False, **TINY)
    lin = nn.Linear(3, 1)
    path = str(tmp_path / "ck.safetensors")
    save_checkpoint(path, {}, {"kind": "module", "config": {}})
    with pytest.raises(CheckpointError, match="records no step of a fit"):
        train_loop(lin, lambda g: lin(torch.ones(1, 3)).sum(), steps=2, lr=0.1, checkpoint=path, progress=False)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_images_of_the_wrong_dtype_and_unlabelled_classifier_data_are_clear_errors(images, autoencoder):
    from captum_inn.training.classifier import fit_classifier

    model = SmallCNN(width=4).eval()
    with pytest.raises(TypeError, match=r"must be floating point.*images.float\(\) / 255"):
        fit_autoencoder((images * 255).to(torch.uint8), latent_dim=4, steps=1, progress=False)
    # float64 images (a float64 model's) are fitted in the autoencoder's dtype, as the encoder reads them elsewhere
    fitted = [fit_autoencoder(data, latent_dim=4, steps=2, width=4, progress=False).state_dict()
              for data in (images.double(), images)]
    assert all(torch.equal(fitted[0][key], fitted[1][key]) for key in fitted[1])
    with pytest.raises(TypeError, match="must be floating point"):
        cache_features(model, "fc", autoencoder, (images * 255).to(torch.uint8), progress=False)
    with pytest.raises(TypeError, match="holds images but no labels"):
        fit_classifier(model, images, steps=1, progress=False)


def test_fit_classifier_trains_on_the_images_a_loader_draws_from_only():
    """A DataLoader's sampler was ignored: its whole dataset, held-out images included, was trained on."""
    from torch.utils.data import (
        DataLoader,
        DistributedSampler,
        RandomSampler,
        Sampler,
        Subset,
        SubsetRandomSampler,
        TensorDataset,
        WeightedRandomSampler,
    )

    from captum_inn.training.classifier import fit_classifier

    images, labels = torch.rand(20, 3, 2, 2), torch.randint(3, (20,))
    images[10:] = float("nan")  # the held-out half, never drawn by the loader
    dataset = TensorDataset(images, labels)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    loader = DataLoader(dataset, batch_size=4, sampler=SubsetRandomSampler(range(10)))
    assert fit_classifier(model, loader, steps=2, progress=False) is model
    # random samplers say which images they draw from: every one, or those of positive weight (they were
    # refused, though fit_classifier took them before it read the sampler)
    weights = torch.cat([torch.ones(10), torch.zeros(10)])
    for sampler in (WeightedRandomSampler(weights, 20), RandomSampler(range(10), replacement=True),
                    RandomSampler(range(10), num_samples=40)):
        held_out = dataset if isinstance(sampler, WeightedRandomSampler) else Subset(dataset, range(10))
        assert fit_classifier(model, DataLoader(held_out, batch_size=4, sampler=sampler), steps=2, progress=False) is model
    # a DistributedSampler draws one process's share; fit_classifier shards the whole dataset itself
    # (it was refused after the sampler check came in, and worked before)
    distributed = DistributedSampler(Subset(dataset, range(10)), num_replicas=2, rank=0)
    assert fit_classifier(model, DataLoader(Subset(dataset, range(10)), batch_size=4, sampler=distributed), steps=2,
                          progress=False) is model

    class EveryOther(Sampler):  # a sampler that says nothing of its images until drawn
        def __iter__(self):
            return iter(range(0, 20, 2))

        def __len__(self):
            return 10

    with pytest.raises(TypeError, match="sampler does not say which images it draws.*a Subset of it"):
        fit_classifier(model, DataLoader(dataset, batch_size=4, sampler=EveryOther()), steps=1, progress=False)


def test_source_fingerprint_reads_datasets_and_loaders(images, autoencoder):
    model = SmallCNN(width=4).eval()
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(len(images)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=7)
    reference = source_fingerprint(model, autoencoder, images)
    assert source_fingerprint(model, autoencoder, dataset) == reference
    assert source_fingerprint(model, autoencoder, loader) == reference
    assert cache_features(model, "fc", autoencoder, images, progress=False).source == reference


def test_a_loader_counts_and_fingerprints_the_images_it_yields(images, autoencoder, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    model = SmallCNN(width=4).eval()
    dataset = TensorDataset(images, torch.zeros(len(images)))
    first, second = (DataLoader(dataset, batch_size=4, sampler=range(a, b)) for a, b in ((0, 10), (10, 20)))
    assert source_fingerprint(model, autoencoder, first) != source_fingerprint(model, autoencoder, second)
    assert source_fingerprint(model, autoencoder, first) == source_fingerprint(model, autoencoder, images[:10])
    dropping = DataLoader(dataset, batch_size=7, drop_last=True)
    cache = cache_features(model, "fc", autoencoder, dropping, memmap_dir=tmp_path / "cache", progress=False)
    assert len(cache) == (len(images) // 7) * 7
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_loader_with_a_batch_sampler_is_read_by_its_batch_samplers_images():
    """loader.sampler is a default SequentialSampler that a batch_sampler loader never uses: the
    fingerprint (and fit_classifier) read the whole dataset instead of the batch sampler's images."""
    from torch.utils.data import BatchSampler, DataLoader, TensorDataset

    from captum_inn.training.data import loader_indices

    dataset = TensorDataset(torch.rand(20, 3, 4, 4))
    first, second = (DataLoader(dataset, batch_sampler=BatchSampler(range(a, b), 4, False)) for a, b in ((0, 10), (10, 20)))
    assert list(loader_indices(first)) == list(range(10))
    assert images_fingerprint(first) != images_fingerprint(second)


def test_numpy_sampler_indices_say_which_images_a_loader_draws():
    """scikit-learn's splits are NumPy arrays: a SubsetRandomSampler over one was read as "indices unknown",
    so two disjoint halves had one fingerprint and a resume on the other half used the first's features."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from captum_inn.training.data import loader_indices

    dataset = TensorDataset(torch.rand(20, 3, 4, 4))
    halves = [DataLoader(dataset, batch_size=4, sampler=SubsetRandomSampler(np.arange(a, 20, 2))) for a in (0, 1)]
    assert list(loader_indices(halves[1])) == list(range(1, 20, 2))
    assert images_fingerprint(halves[0]) != images_fingerprint(halves[1])


def test_per_image_rows_follow_batch_samplers_and_a_wrong_length_is_named():
    """A loader given a BatchSampler counted no images, so a per-image tensor went whole to every batch (a
    shuffling one gave features of the wrong images without an error); a tensor of the wrong length failed in
    the model with torch's shape error alone."""
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        IterableDataset,
        RandomSampler,
        TensorDataset,
    )

    torch.manual_seed(0)
    model, images, weight = _Weighted().eval(), torch.rand(8, 3, 8, 8), torch.rand(8, 1) + 0.5
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    with torch.no_grad():
        expected = torch.cat([model(images[i : i + 1], weight[i : i + 1]) for i in range(8)])
    dataset = TensorDataset(images)
    ordered = DataLoader(dataset, batch_sampler=BatchSampler(range(8), 3, drop_last=False))
    torch.testing.assert_close(cache_features(model, "fc", ae, ordered, progress=False,
                                              additional_forward_args=(weight,)).layers["fc"], expected)
    shuffled = DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 8, drop_last=False))
    with pytest.raises(ValueError, match=r"tensor 0 has one row per image, but `data` is a DataLoader with a "
                                         r"RandomSampler"):
        cache_features(model, "fc", ae, shuffled, progress=False, additional_forward_args=(weight,))
    with pytest.raises(RuntimeError, match=r"`additional_forward_args` tensor 0 of shape \(9, 1\) went whole to the "
                                           r"model.*\(8 image\(s\)\)\. A per-image tensor needs 8 rows"):
        cache_features(model, "fc", ae, images, batch_size=4, progress=False, additional_forward_args=(torch.rand(9, 1),))

    class Stream(IterableDataset):  # of unknown length: its rows cannot be told per image
        def __iter__(self):
            return iter(images)

    with pytest.raises(RuntimeError, match=r"went whole to the model.*of unknown number.*data of known length"):
        cache_features(model, "fc", ae, Stream(), batch_size=4, progress=False, additional_forward_args=(weight,))


class _ImagesSecond(nn.Module):
    """A model that takes the images after another argument: forward(scale, x)."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN(width=4)

    def forward(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * scale[:, :, None, None])


def test_a_model_that_takes_its_images_second_is_fitted_with_image_input(images, autoencoder, tmp_path):
    """The fits called model(images, *additional_forward_args) only: torch's error for a model that takes
    the images second said nothing of that. `image_input` puts them where the model takes them (the
    same fit as through a wrapper that reorders the arguments), and a failing call notes how it was made."""
    from captum_inn.training import forward_args_fingerprint

    model, scale = _ImagesSecond().eval(), torch.rand(8, 1, generator=torch.Generator().manual_seed(0)) + 0.5
    with pytest.raises(RuntimeError) as caught:
        fit_invariances(model, "net.fc", autoencoder, images[:8], additional_forward_args=(scale,), steps=1,
                        progress=False, **TINY)
    assert caught.value.__notes__[0].startswith("captum_inn called the model as model(tensor(8, 3, 32, 32), "
                                                "tensor(8, 1)): the inputs first")
    with pytest.raises(ValueError, match=r"`image_input`=2 puts the images after the 1 `additional_forward_args`"):
        fit_invariances(model, "net.fc", autoencoder, images[:8], additional_forward_args=(scale,), image_input=2,
                        steps=1, progress=False, **TINY)

    class ImagesFirst(nn.Module):  # what a user had to write
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, *rest):
            return self.model(*rest, x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probes (randomness, sequence-first, aliases) call it the same way
        fitted = fit_invariances(model, "net.fc", autoencoder, images[:8], additional_forward_args=(scale,),
                                 image_input=1, steps=3, progress=False, **TINY)
    wrapped = fit_invariances(ImagesFirst().eval(), model.net.fc, autoencoder, images[:8],
                              additional_forward_args=(scale,), steps=3, progress=False, **TINY)
    for key, value in wrapped.state_dict().items():
        assert torch.equal(fitted.state_dict()[key], value), key
    # the fit records where the images went, and the explainers find them there unless told otherwise
    assert fitted.fit_info["image_input"] == 1 and "image_input" not in wrapped.fit_info
    save_invariance_inn(tmp_path / "inn.safetensors", fitted)
    loaded = load_invariance_inn(tmp_path / "inn.safetensors")
    explainer = LayerInvariance(model, "net.fc", loaded, autoencoder)
    assert explainer.image_input == 1
    explained = explainer.attribute((scale[:3], images[:3]), n_samples=2, seed=0)
    assert explained[1].shape == images[:3].shape
    cache = cache_features(model, "net.fc", autoencoder, images[:8], additional_forward_args=(scale,), image_input=1,
                           progress=False)
    cache.save(tmp_path / "cache.safetensors")
    assert FeatureCache.load(tmp_path / "cache.safetensors").image_input == 1
    with pytest.raises(ValueError, match=r"got \(3, 1\)\. Input 1 of the tuple has the shape of images \(3, 3, 32, 32\): "
                                         r"pass image_input=1 to the explainer \(and the fit\)"):
        LayerInvariance(model, "net.fc", fitted, autoencoder, image_input=0).attribute((scale[:3], images[:3]),
                                                                                       n_samples=2)
    assert forward_args_fingerprint((scale,), 1) != forward_args_fingerprint((scale,))  # a cache of the other call
    with pytest.raises(RuntimeError) as caught:  # the note shows the images where they went
        fit_invariances(model, "net.fc", autoencoder, images[:8], additional_forward_args=(torch.ones(8, 2),),
                        image_input=1, steps=1, progress=False, **TINY)
    assert caught.value.__notes__[0].startswith("captum_inn called the model as model(tensor(8, 2), tensor(8, 3, 32, "
                                                "32)): the images at position 1 (`image_input`)")


def test_a_loader_without_automatic_batching_over_single_images_is_refused():
    """DataLoader(batch_size=None) yields (C, H, W) images one by one: they were joined along the channels
    (12 images became 36) and the error spoke of 1-D signals."""
    from torch.utils.data import DataLoader

    from captum_inn.training.data import images_as_tensor

    loader = DataLoader(torch.rand(12, 3, 8, 8), batch_size=None)
    for call in (lambda: images_as_tensor(loader),
                 lambda: cache_features(SmallCNN(width=4).eval(), "fc", ConvAutoencoder((3, 8, 8), 4, width=4), loader,
                                        progress=False)):
        with pytest.raises(ValueError, match=r"DataLoader with batch_size=None.*single images of shape \(3, 8, 8\); "
                                             r"pass batch_size="):
            call()
    batches = DataLoader(torch.rand(2, 5, 3, 8, 8), batch_size=None)  # items that are batches: read as they are
    assert images_as_tensor(batches).shape == (10, 3, 8, 8)


def test_a_layer_named_by_a_second_name_of_a_module_called_twice_is_warned_about():
    """``self.act2 = self.act1`` called as both: "act2" cached act1's activation (hooks read a module's first
    call), unwarned. A pass over one image counts the calls: an alias called once, and the first name, are
    not warned about."""

    class Shared(nn.Module):
        def __init__(self, twice):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.act1 = nn.ReLU()
            self.act2 = self.act1  # one module, two names
            self.twice = twice

        def forward(self, x):
            h = self.act1(self.conv1(x))
            return self.act2(self.conv2(h)) if self.twice else self.conv2(h)

    ae, images = ConvAutoencoder((3, 8, 8), latent_dim=4, width=4).eval(), torch.rand(3, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"layer 'act2' runs 2 times in each forward pass: it is one module object with "
                                         r"the names \['act1', 'act2'\].*a module of its own") as info:
        cache_features(Shared(twice=True).eval(), "act2", ae, images, progress=False)
    assert info[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache_features(Shared(twice=True).eval(), "act1", ae, images, progress=False)  # its first name: its first call
        cache_features(Shared(twice=False).eval(), ["act2", "conv2"], ae, images, progress=False)  # an alias called once


def test_a_layer_whose_module_runs_twice_is_warned_about():
    """torchvision's BasicBlock calls its relu after conv1 and again on the block's output: the cache held
    the first call while Captum's LayerActivation reads the last, unwarned. The block itself, which runs
    once, is not warned about."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.relu(self.conv1(x))) + x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Block()).eval()
    ae, images = ConvAutoencoder((3, 8, 8), latent_dim=4, width=4).eval(), torch.rand(3, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"layer '1.relu' runs 2 times in each forward pass; the INN learns its "
                                         r"first call.*LayerActivation.*the block '1' itself") as info:
        cache = cache_features(model, "1.relu", ae, images, progress=False)
    assert [w.filename for w in info if "runs 2 times" in str(w.message)] == [__file__]
    first_call = torch.relu(model[1].conv1(model[0](images)))
    assert torch.allclose(cache.layers["1.relu"].float(), first_call, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache_features(model, ["1", "1.conv1"], ae, images, progress=False)


def test_random_transforms_inside_a_dataset_are_warned_about_by_the_fits_that_read_it_once():
    """A Dataset with a random transform (a RandomCrop) was read once, seeded, by fit_autoencoder and
    fit_classifier: each image kept one draw for every step, unwarned; augment= draws afresh."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from captum_inn.training.classifier import fit_classifier

    images, labels = torch.rand(16, 3, 8, 8), torch.arange(16) % 2

    class Shifted(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return torch.roll(images[i], int(torch.randint(-2, 3, ())), dims=-1), labels[i]

    random_transform = r"`data`'s items differ from one read to the next .*pass them as augment="
    with pytest.warns(UserWarning, match=random_transform) as info:
        fit_autoencoder(Shifted(), latent_dim=4, width=4, steps=1, batch_size=8, progress=False)
    assert [w.filename for w in info if "items differ" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match=random_transform):
        fit_classifier(SmallCNN(num_classes=2, width=4, image_size=8), DataLoader(Shifted(), batch_size=4),
                       steps=1, batch_size=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_autoencoder(TensorDataset(images, labels), latent_dim=4, width=4, steps=1, batch_size=8, progress=False)
    with pytest.raises(TypeError, match=r"`data` is a dict \(keys \['images', 'labels'\]\); pass \(images, labels\)"):
        fit_classifier(SmallCNN(num_classes=2, width=4, image_size=8), {"images": images, "labels": labels},
                       steps=1, progress=False)


def test_a_perceptual_model_it_cannot_call_or_read_is_explained():
    """A perceptual layer giving a tuple was told to "pass selector=", which fit_autoencoder does not take; a
    perceptual model needing a second argument failed with torch's TypeError at the first step."""

    class TupleLayer(nn.Module):
        def forward(self, x):
            return x, x.mean()

    class TwoArguments(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, scale):
            return self.conv(x) * scale

    images = torch.rand(8, 3, 8, 8)
    for model, layer, error in ((nn.Sequential(nn.Conv2d(3, 4, 3), TupleLayer()), "1", ValueError),
                                (TwoArguments(), "conv", TypeError)):
        with pytest.raises(error, match=r"The perceptual loss calls perceptual_model\(images\).*fit_autoencoder takes no "
                                        r"selector or extra arguments for it: wrap it in an nn.Module"):
            fit_autoencoder(images, latent_dim=4, width=4, steps=1, perceptual_model=model.eval(),
                            perceptual_layers=[layer], progress=False)


def test_a_layer_that_runs_on_some_inputs_only_is_explained_as_such():
    """A routed layer (``out[mask] = expert(h[mask])``) gave (15, 5) for 24 inputs, and the error advised a
    transpose for sequence-first layers, which would give (5, 15)."""

    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.expert = nn.Linear(3 * 8 * 8, 5), nn.Linear(5, 5)

        def forward(self, x):
            h = self.stem(x.flatten(1))
            routed = h[:, 0] > 0
            return torch.where(routed[:, None], h.clone().index_put((routed,), self.expert(h[routed])), h)

    model = Routed().eval()
    images = torch.rand(24, 3, 8, 8)
    with torch.no_grad():
        n_routed = int((model.stem(images.flatten(1))[:, 0] > 0).sum())
    assert 0 < n_routed < 24
    with pytest.raises(ValueError, match=rf"shape \({n_routed}, 5\) for 24 input\(s\).*It holds {n_routed} rows, and no "
                                         r"dimension of 24: a layer that runs on only some inputs.*hook a layer that "
                                         r"every input passes through"):
        cache_features(model, "expert", ConvAutoencoder((3, 8, 8), 4, width=4), images, batch_size=24, progress=False)


def test_batch_norm_without_running_statistics_is_warned_about():
    """Such a layer normalises with each batch's own statistics in eval mode too, so the cache's batches of 64
    and an explanation's N gave an image other activations (1.1 on a scale of 2.8), unwarned."""
    from captum_inn.training import LayerRepresentation

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3)).eval()
    ae, images = ConvAutoencoder((3, 8, 8), latent_dim=4, width=4).eval(), torch.rand(6, 3, 8, 8)
    match = r"batch norm '1' of the model has no running statistics \(track_running_stats=False\).*nn.GroupNorm"
    with pytest.warns(UserWarning, match=r"cache_features \(the fits' feature pass\): " + match):
        cache_features(model, "3", ae, images, progress=False)
    with pytest.warns(UserWarning, match=r"LayerRepresentation: " + match):
        LayerRepresentation(model, "3")
    with pytest.warns(UserWarning, match=match):
        inn = fit_invariances(model, "3", ae, images, steps=1, progress=False, **TINY)
    with pytest.warns(UserWarning, match=r"LayerInvariance: " + match):
        LayerInvariance(model, "3", inn, ae)
    model[1] = nn.BatchNorm2d(4).eval()  # running statistics: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerRepresentation(model, "3")


def test_fewer_images_than_code_dimensions_are_warned_of(images, autoencoder):
    """A batch to explain passed where the training set belongs: the INN can learn those few codes."""
    model = SmallCNN(width=4).eval()
    with pytest.warns(UserWarning, match=r"fitted to 5 images, fewer than the autoencoder's 6 code dimensions.*"
                                         r"Pass the training set"):
        fit_invariances(model, "fc", autoencoder, images[:5], steps=1, progress=False, **TINY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_invariances(model, "fc", autoencoder, images[:6], steps=1, progress=False, **TINY)
    assert not [w for w in caught if "code dimensions" in str(w.message)]


def test_save_load_and_refusals(images, autoencoder, tmp_path):
    model = SmallCNN(width=4).eval()
    inn = fit_invariances(model, "relu3", autoencoder, images, steps=2, progress=False, **TINY)
    path = str(tmp_path / "t.safetensors")
    save_invariance_inn(path, inn)
    loaded = load_invariance_inn(path, layer_shape=(8, 8, 8), latent_dim=6)
    z, code = torch.randn(3, 8, 8, 8), torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(loaded(code, z)[0], inn(code, z)[0])
    with pytest.raises(CheckpointError, match=r"fitted for layer 'relu3'.*\(8, 8, 8\), but `layer_shape` is \(10,\)"):
        load_invariance_inn(path, layer_shape=(10,))
    with pytest.raises(CheckpointError, match="codes of size 6"):
        load_invariance_inn(path, latent_dim=64)


def test_an_edited_feature_cache_file_is_a_checkpoint_error(tmp_path):
    """A saved cache missing a layer's tensor raised a bare KeyError; one whose arrays have other row
    counts loaded, and the fit failed later (or paired the wrong rows)."""
    cache = FeatureCache(torch.zeros(5, 6), torch.ones(5, 6), {"fc": torch.randn(5, 10)})
    meta = {"kind": "feature_cache", "config": {"layers": ["fc"], **cache._record()}}
    for tensors, match in (({"code_mean": cache.code_mean, "code_std": cache.code_std}, "KeyError: 'layer.fc'"),
                           ({"code_mean": cache.code_mean, "code_std": cache.code_std, "layer.fc": torch.randn(4, 10)},
                            r"`layers\['fc'\]` of shape \(4, 10\) must be \(N, ...\) with N = 5")):
        save_checkpoint(tmp_path / "features.safetensors", tensors, meta)
        with pytest.raises(CheckpointError, match=f"is incomplete or was edited.*{match}.*delete it to recompute"):
            FeatureCache.load(tmp_path / "features.safetensors")
    cache.save(tmp_path / "whole.safetensors")
    assert torch.equal(FeatureCache.load(tmp_path / "whole.safetensors").layers["fc"], cache.layers["fc"])


def test_a_hand_built_feature_cache_whose_arrays_do_not_fit_together_is_refused():
    """Extra layer rows trained silently on images without codes, fewer failed mid-fit with a raw
    IndexError, and a code_std of another shape was saved and then refused as "edited" on load."""
    codes = torch.zeros(5, 6)
    for arguments, error, match in (
        ((codes, torch.ones(5, 6), {"fc": torch.randn(6, 10)}), ValueError,
         r"`layers\['fc'\]` of shape \(6, 10\) must be \(N, ...\) with N = 5, the rows of `code_mean`"),
        ((codes, torch.ones(5, 3), {}), ValueError, r"`code_std` of shape \(5, 3\) must have `code_mean`'s shape \(5, 6\)"),
        ((codes.flatten(), codes.flatten(), {}), ValueError, r"`code_mean` must be \(N, d\), one code per image"),
        ((codes.numpy(), codes, {}), TypeError, r"`code_mean` must be a torch.Tensor .*torch.as_tensor"),
        ((codes, codes, [torch.zeros(5, 2)]), TypeError, r"`layers` must be a dict \{layer name: \(N, \*shape\) array\}"),
    ):
        with pytest.raises(error, match=match):
            FeatureCache(*arguments)
    assert len(FeatureCache(codes, codes, {"score": torch.zeros(5)})) == 5  # a layer of one value per image


def test_checkpoints_and_caches_of_views_of_one_tensor_are_saved(tmp_path):
    values = torch.randn(7, 10)  # "c" shares its storage at another offset, with the same 5 rows as the others
    cache = FeatureCache(values[:5, :6].contiguous(), torch.ones(5, 6), {"a": values[:5], "b": values[:5], "c": values[2:]})
    loaded = FeatureCache.load(cache.save(tmp_path / "cache.safetensors"))
    assert all(torch.equal(loaded.layers[k], cache.layers[k]) for k in "abc")
    tensors, _ = load_checkpoint(save_checkpoint(tmp_path / "ck.safetensors", {"w": values, "row": values[1]}, {}))
    assert torch.equal(tensors["row"], values[1]) and torch.equal(tensors["w"], values)


def test_checkpoint_format_is_checked_before_use(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"kind": "invariance_inn"})
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "garbage.safetensors")
    with pytest.raises(CheckpointError, match="holds kind 'invariance_inn', expected 'autoencoder'"):
        load_checkpoint(path, kind="autoencoder")
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    import captum_inn.training.checkpoint as ck

    # a plain safetensors file (e.g. a model's weights), and metadata that is not JSON
    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="is a safetensors file but not a captum_inn checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    save_file({"w": torch.ones(1)}, str(tmp_path / "json.safetensors"), metadata={ck._META_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="json.safetensors' has corrupted metadata"):
        load_checkpoint(tmp_path / "json.safetensors")

    newer = tmp_path / "newer.safetensors"
    old = ck.FORMAT_VERSION
    ck.FORMAT_VERSION = old + 1
    try:
        save_checkpoint(newer, {"w": torch.ones(1)}, {"kind": "x"})
    finally:
        ck.FORMAT_VERSION = old
    with pytest.raises(CheckpointError, match="format version 2"):
        load_checkpoint(newer)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary files left


def test_divergence_stops_with_a_clear_error(images, autoencoder, tmp_path):
    model = SmallCNN(width=4).eval()
    cache = cache_features(model, "logits", autoencoder, images, progress=False)
    cache.code_mean[3] = float("inf")
    with pytest.raises(ValueError, match="code_mean contains NaN or infinite"):  # rejected before training
        fit_invariances(model, "logits", cache=cache, steps=50, checkpoint_dir=str(tmp_path), progress=False, **TINY)
    cache.code_mean[3] = 0.0
    with pytest.raises(ValueError, match="`lr` must be finite"):  # a setting that cannot train is rejected too
        fit_invariances(model, "logits", cache=cache, steps=50, progress=False, **{**TINY, "lr": float("inf")})
    with pytest.raises(FloatingPointError, match=r"in step \d+\. Lower the learning rate \(now 1e\+30\)"):
        fit_invariances(model, "logits", cache=cache, steps=50, checkpoint_dir=str(tmp_path), progress=False,
                        **{**TINY, "lr": 1e30})


def test_restored_adam_moments_take_their_parameters_memory_layout():
    from captum_inn.training.checkpoint import load_optimizer, optimizer_tensors

    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.1)
    conv(torch.rand(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    tensors, meta = optimizer_tensors(optimizer)
    tensors = {k: v.contiguous() for k, v in tensors.items()}  # as a safetensors file gives them back
    restored = torch.optim.Adam(conv.parameters(), lr=0.1)
    load_optimizer(restored, tensors, meta)
    moments = restored.state[conv.weight]
    assert moments["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moments["exp_avg"], optimizer.state[conv.weight]["exp_avg"])
    assert torch.equal(moments["exp_avg_sq"], optimizer.state[conv.weight]["exp_avg_sq"])


def test_merged_config_takes_numpy_scalars_as_plain_numbers():
    import numpy as np

    from captum_inn.training.loop import merged_config

    config = merged_config(InvarianceConfig, InvarianceConfig(hidden=32), {"steps": np.int64(7), "lr": np.float32(0.5)})
    assert (config.steps, config.lr, config.hidden) == (7, 0.5, 32)
    assert type(config.steps) is int and type(config.lr) is float  # JSON-safe in checkpoints


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_train_loop_adam_matches_the_per_tensor_adam_bit_for_bit(weight_decay, monkeypatch):
    """train_loop's multi-tensor (foreach) Adam: the same arithmetic as PyTorch's per-tensor loop."""
    from captum_inn.training.loop import train_loop

    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))

    def fit() -> list:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

        def loss_fn(generator):
            rows = torch.randint(64, (16,), generator=generator)
            return (net(x[rows]).squeeze(1) - x[rows].sum(1)).pow(2).mean()

        train_loop(net, loss_fn, steps=30, lr=0.01, weight_decay=weight_decay, progress=False)
        return [p.detach().clone() for p in net.parameters()]

    multi_tensor = fit()
    requested = []

    def per_tensor_adam(cls):  # PyTorch's per-tensor loop, whatever train_loop asks for
        def init(self, params, **kwargs):
            requested.append(kwargs.get("foreach"))
            cls.__init__(self, params, **{**kwargs, "foreach": False})
        return type(cls.__name__, (cls,), {"__init__": init})

    for cls in (torch.optim.Adam, torch.optim.AdamW):
        monkeypatch.setattr(torch.optim, cls.__name__, per_tensor_adam(cls))
    per_tensor = fit()
    assert requested == [True]  # train_loop asked for the multi-tensor path
    assert all(torch.equal(a, b) for a, b in zip(multi_tensor, per_tensor))


def test_train_loop_with_batch_fn_computes_what_the_single_loss_fn_computes():
    """Splitting the minibatch from the loss (what a CUDA graph needs) changes nothing on the CPU."""
    from captum_inn.training.loop import train_loop

    net, batch_fn, loss_of = split_regression()
    whole = train_loop(net, lambda generator: loss_of(*batch_fn(generator)), steps=25, lr=0.01, schedule="cosine", progress=False)
    split_net, batch_fn, loss_of = split_regression()
    split = train_loop(split_net, loss_of, batch_fn=batch_fn, steps=25, lr=0.01, schedule="cosine", progress=False)
    assert split == whole
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), split_net.parameters()))


def test_train_loop_lists_the_parameters_once_per_fit_not_per_step():
    """Gradient clipping gets the parameter list made before the loop: walking the module tree for
    them every step was a few percent of a small INN's step (the fits' results are unchanged: the
    bit-for-bit tests around this one)."""
    from captum_inn.training.loop import train_loop

    class Counting(nn.Sequential):
        listed = 0

        def parameters(self, recurse=True):
            Counting.listed += 1
            return super().parameters(recurse)

    counts = []
    for steps in (2, 12):
        net, batch_fn, loss_of = split_regression()
        counted = Counting(*net)
        Counting.listed = 0
        train_loop(counted, loss_of, batch_fn=batch_fn, steps=steps, lr=0.01, grad_clip=1e-3, progress=False)
        counts.append(Counting.listed)
    assert counts[0] == counts[1], counts


def test_cuda_graph_true_where_none_can_be_captured_is_a_clear_error():
    from captum_inn.training.loop import train_loop

    net, batch_fn, loss_of = split_regression()
    with pytest.raises(ValueError, match=r"cuda_graph=True.*not on a CUDA device"):
        train_loop(net, loss_of, batch_fn=batch_fn, steps=2, lr=0.01, progress=False, cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph=True.*needs `batch_fn`"):
        train_loop(net, lambda generator: loss_of(*batch_fn(generator)), steps=2, lr=0.01, progress=False,
                   cuda_graph=True)
    with pytest.raises(TypeError, match="`cuda_graph` must be True, False or None"):
        train_loop(net, loss_of, batch_fn=batch_fn, steps=2, lr=0.01, progress=False, cuda_graph="yes")


def test_optimizer_checkpoints_keep_the_loading_optimizers_own_implementation():
    """A checkpoint of a captured GPU fit (capturable Adam, rate in a tensor) resumes on the CPU, and back."""
    from captum_inn.training.checkpoint import load_optimizer, optimizer_tensors

    net = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=torch.tensor(0.02))
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, meta = optimizer_tensors(optimizer)
    json.dumps(meta)  # the rate is stored as a number
    assert meta["param_groups"][0]["lr"] == pytest.approx(0.02)
    meta["param_groups"][0]["capturable"] = True  # as a captured fit writes it

    plain = torch.optim.Adam(net.parameters(), lr=0.5, foreach=True)
    load_optimizer(plain, tensors, meta)
    group = plain.param_groups[0]
    assert (group["capturable"], group["foreach"]) == (False, True)  # this optimiser's own way of running
    assert group["lr"] == pytest.approx(0.02)  # the fit's rate
    net(torch.randn(4, 3)).sum().backward()
    plain.step()  # a capturable flag on CPU parameters would raise here

    rate = torch.tensor(0.5)
    held = torch.optim.Adam(net.parameters(), lr=rate)
    load_optimizer(held, tensors, meta)
    assert held.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(0.02)  # the same tensor, refilled


def test_when_train_loop_captures_its_step(monkeypatch):
    """The decision alone (pure; the capture itself is tested on CUDA in tests/test_device.py)."""
    from captum_inn.training.loop import _use_cuda_graph

    cuda, cpu, batch_fn = torch.device("cuda"), torch.device("cpu"), (lambda generator: ())
    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS", raising=False)
    assert _use_cuda_graph(None, batch_fn, cuda, 1)  # the default on CUDA
    assert not _use_cuda_graph(False, batch_fn, cuda, 1)
    monkeypatch.setenv("CAPTUM_INN_CUDA_GRAPHS", "0")  # the opt-out
    assert not _use_cuda_graph(None, batch_fn, cuda, 1)
    assert _use_cuda_graph(True, batch_fn, cuda, 1)
    monkeypatch.setenv("CAPTUM_INN_CUDA_GRAPHS", "1")
    assert not _use_cuda_graph(None, None, cuda, 1)  # no batch_fn: nothing to capture
    assert not _use_cuda_graph(None, batch_fn, cpu, 1)
    assert not _use_cuda_graph(None, batch_fn, cuda, 2)  # torchrun: eager all-reduce
    with pytest.raises(ValueError, match="2 processes"):
        _use_cuda_graph(True, batch_fn, cuda, 2)


def test_how_many_layers_train_at_once_on_cuda(monkeypatch, images, autoencoder):
    """Each layer trained at once on a GPU holds two of torch's 32 pooled streams (the decision
    alone; the streams are tested on CUDA in tests/test_device.py)."""
    from captum_inn.training.invariances import MAX_CUDA_WORKERS, _auto_workers

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing here touches a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS", raising=False)
    assert _auto_workers(None, 3, cuda) == 3
    assert _auto_workers(None, 20, cuda) == MAX_CUDA_WORKERS
    assert _auto_workers(12, 20, cuda) == 12
    monkeypatch.setenv("CAPTUM_INN_CUDA_GRAPHS", "0")  # eager steps on a GPU: one layer at a time
    assert _auto_workers(None, 20, cuda) == 1
    with pytest.raises(ValueError, match=r"`workers`=17 on cuda.*at most 16"):
        fit_invariances(SmallCNN(width=4).eval(), ["fc", "logits"], autoencoder, images, steps=1, workers=17,
                        device="cuda", progress=False)


def test_a_dataset_with_random_transforms_fingerprints_the_same_every_time(images):
    """Its probes are drawn with fixed generators, so a resume is not refused for "other images",
    and the caller's random streams are left as they were."""
    import random

    import numpy as np

    class RandomlyFlipped(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            flip = torch.rand(()) < 0.5 or random.random() < 0.5 or np.random.rand() < 0.5
            return (images[i].flip(-1) if flip else images[i]), 0

    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    assert images_fingerprint(RandomlyFlipped()) == images_fingerprint(RandomlyFlipped())
    assert torch.equal(torch.random.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_a_loaders_own_collate_fn_counts_in_the_images_fingerprint(images):
    """The probes were the dataset's items before collation, so a loader that dims its images reused the
    features of one that does not."""
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    dataset = TensorDataset(images)
    plain = DataLoader(dataset, batch_size=4)
    dimmed = DataLoader(dataset, batch_size=4, collate_fn=lambda items: [default_collate(items)[0] * 0.5])
    assert images_fingerprint(plain) == images_fingerprint(dataset)  # the default collation: as before
    assert images_fingerprint(dimmed) != images_fingerprint(plain)


@pytest.mark.parametrize("failure", [FloatingPointError, KeyboardInterrupt])
def test_a_failed_fit_leaves_the_module_in_eval_mode(failure):
    """As a finished fit does: a classifier whose fit stopped is not left dropping units."""
    from captum_inn.training.loop import train_loop

    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).eval()

    def loss_fn(generator):
        if failure is KeyboardInterrupt and net.training:
            raise KeyboardInterrupt
        return net(torch.randn(4, 3, generator=generator)).sum() * float("nan")

    with pytest.raises(failure):
        train_loop(net, loss_fn, steps=3, lr=0.1, progress=False)
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("memmap", [False, True])
def test_a_resume_refuses_a_cache_made_with_other_forward_args(images, autoencoder, tmp_path, memmap):
    """The features depend on ``additional_forward_args``; a cache computed with others is stale."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN(width=4)

        def forward(self, image, scale):
            return self.net(image) * scale

    model = Scaled().eval()
    run = dict(steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=1, memmap=memmap, progress=False, **TINY)
    fit_invariances(model, "net.fc", autoencoder, images, additional_forward_args=(1.0,), **run)
    fit_invariances(model, "net.fc", autoencoder, images, additional_forward_args=(1.0,), **run)  # the same: resumes
    with pytest.raises(CheckpointError, match="other `additional_forward_args`.*resume=False"):
        fit_invariances(model, "net.fc", autoencoder, images, additional_forward_args=(100.0,), **run)
    with pytest.raises(CheckpointError, match="other `additional_forward_args`"):
        fit_invariances(model, "net.fc", autoencoder, images, **run)


def test_a_large_layer_initialises_its_inn_on_fewer_rows(monkeypatch):
    """The embedder statistics and ActNorms start from up to 1024 rows, fewer where those would take
    more than _INIT_BYTES (a 64×56×56 map: 0.8 GB), never fewer than 64."""
    from captum_inn.training import invariances

    cache = FeatureCache(torch.randn(300, 4), torch.zeros(300, 4), {"map": torch.randn(300, 3, 8, 8)})
    asked = []
    rows = FeatureCache.rows
    monkeypatch.setattr(FeatureCache, "rows", lambda self, name, index: asked.append(len(index)) or rows(self, name, index))
    config = InvarianceConfig(n_blocks=2, hidden=8, embed_dim=4)

    def build() -> None:  # the rows of the constant-layer check, then of the initialisation
        invariances._initialise(invariances._build(cache, "map", config, torch.device("cpu")), cache, "map", config,
                                torch.device("cpu"))

    build()
    monkeypatch.setattr(invariances, "_INIT_BYTES", 4 * 3 * 8 * 8 * 100)  # room for 100 rows
    build()
    monkeypatch.setattr(invariances, "_INIT_BYTES", 1)
    build()
    assert asked == [300, 300, 100, 100, 64, 64]


def test_fit_classifier_refuses_labels_and_images_it_would_misread():
    """Fractional labels were truncated (0.7 trained as class 0), -100 was ignored by cross-entropy,
    labels past the logits, one-hot labels, 8-bit images and no images failed inside torch."""
    from captum_inn.training.classifier import fit_classifier

    images, labels = torch.rand(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])

    def fit(x, y, **kwargs):
        fit_classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (x, y), steps=1, batch_size=4,
                       progress=False, **kwargs)

    fit(images, labels.float())  # whole numbers in a float tensor are class indices
    for bad in (torch.full((6,), 0.7), torch.full((6,), float("nan"))):
        with pytest.raises(ValueError, match="`data` labels must be whole class indices"):
            fit(images, bad)
    with pytest.raises(ValueError, match=r"`data` labels must be class indices >= 0, got -100"):
        fit(images, torch.full((6,), -100))
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\).*got \(6, 3\).*labels.argmax\(1\)"):
        fit(images, nn.functional.one_hot(labels, 3))
    for kwargs in ({}, {"adversarial_epsilon": 0.1}):
        with pytest.raises(ValueError, match=r"labels up to 5 but the model gives logits of shape \(\d+, 3\)"):
            fit(images, torch.tensor([0, 1, 2, 0, 1, 5]), **kwargs)
    with pytest.raises(TypeError, match=r"`data` images must be floating point.*images.float\(\) / 255"):
        fit((images * 255).to(torch.uint8), labels)
    with pytest.raises(ValueError, match="`data` holds no images"):
        fit(images[:0], labels[:0])


def test_fit_classifier_takes_numpy_or_list_labels_beside_an_image_tensor():
    """(images, labels) with NumPy or list labels was read as a dataset: "too many values to unpack"."""
    from captum_inn.training.classifier import fit_classifier

    images, labels = torch.rand(6, 3, 2, 2), [0, 1, 2, 0, 1, 2]
    for given in (labels, np.array(labels), tuple(labels)):
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        assert fit_classifier(model, (images, given), steps=1, batch_size=4, progress=False) is model
    with pytest.raises(ValueError, match="labels must be whole class indices"):
        fit_classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (images, np.full(6, 0.5)), steps=1,
                       progress=False)


def test_layer_overrides_take_a_layer_by_module_as_layers_do(images, autoencoder):
    """Keyed by module, two overrides failed sorting modules ("'<' not supported between 'Linear'
    and 'ReLU'"), and one was refused as a layer not fitted."""
    model = SmallCNN(width=4).eval()
    inns = fit_invariances(model, [model.fc, "logits"], autoencoder, images, steps=2, progress=False,
                           layer_overrides={model.fc: {"steps": 3}, model.logits: {"steps": 1}}, **TINY)
    assert [len(inns[n].history) for n in ("fc", "logits")] == [3, 1]


class _ResizingDataset(torch.utils.data.Dataset):
    """Raw 6×6 images in `images`, their labels in `targets`; items are the images resized to 8×8."""

    def __init__(self, as_list=False):
        raw = torch.rand(12, 3, 6, 6, generator=torch.Generator().manual_seed(0))
        self.images = list(raw) if as_list else raw
        self.targets = torch.arange(12) % 3

    def __len__(self):
        return 12

    def __getitem__(self, i):
        image = torch.as_tensor(self.images[i])
        return nn.functional.interpolate(image[None], size=8, mode="bilinear")[0], int(self.targets[i])


def test_a_dataset_with_images_and_targets_attributes_is_read_through_its_items():
    """Only ColorDigits' `images`/`targets` are its items: another Dataset's transforms were skipped
    (a raw shape error here, no error at all for a normalising one) and a list of images failed."""
    from captum_inn.training.classifier import fit_classifier
    from captum_inn.training.data import images_as_tensor

    for as_list in (False, True):
        data = _ResizingDataset(as_list)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
        assert fit_classifier(model, data, steps=2, progress=False) is model
        assert images_as_tensor(data).shape == (12, 3, 8, 8)


def test_accuracy_checks_its_labels():
    """(N, 1) labels broadcast into an accuracy of 6.0, (1,) ones into a wrong fraction; list or
    NumPy labels failed with an AttributeError."""
    import numpy as np

    from captum_inn.training.classifier import accuracy

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(6, 3, 2, 2)
    y = model(x).argmax(1)
    assert accuracy(model, x, y) == accuracy(model, x, y.tolist()) == accuracy(model, x, y.numpy()) == 1.0
    assert accuracy(model, x, np.asarray(y.tolist(), dtype=np.int32)) == 1.0
    with pytest.raises(ValueError, match=r"`labels` must have shape \(N,\).*labels.flatten\(\)"):
        accuracy(model, x, y[:, None])
    for short in (y[:1], y[:4]):
        with pytest.raises(ValueError, match=rf"`labels` has {len(short)} labels for 6 images"):
            accuracy(model, x, short)


def test_fit_classifier_draws_by_a_weighted_samplers_weights():
    """A WeightedRandomSampler balances classes; its weights were dropped and the minibatches drawn
    uniformly over the images of positive weight."""
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    from captum_inn.training.classifier import fit_classifier

    images = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    dataset = TensorDataset(images, torch.zeros(10, dtype=torch.long))
    weights = torch.tensor([0.0, 9.0] + [1.0 / 8] * 8)  # image 1 nine times as likely as the other eight together
    seen = []

    def record(batch):
        seen.extend(batch[:, 0, 0, 0].long().tolist())
        return batch

    loader = DataLoader(dataset, batch_size=50, sampler=WeightedRandomSampler(weights, 10))
    fit_classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), loader, steps=20, batch_size=50, augment=record,
                   progress=False)
    assert 0 not in seen and 0.85 < seen.count(1) / len(seen) < 0.95  # 0.9 expected; uniform gave 1/9


def test_adversarial_training_needs_batches_of_four():
    """Half of a batch of 3 is one image, on which batch norm fails in training mode with a raw error."""
    from captum_inn.training.classifier import fit_classifier

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    x, y = torch.rand(10, 3, 2, 2), torch.randint(3, (10,))
    with pytest.raises(ValueError, match=r"`adversarial_epsilon` attacks half of each batch.*at least 4 .*batch norm, got 3"):
        fit_classifier(model, (x, y), steps=1, batch_size=3, adversarial_epsilon=0.1, progress=False)
    assert fit_classifier(model, (x, y), steps=1, batch_size=4, adversarial_epsilon=0.1, progress=False) is model
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # no batch norm: a half of one image is fine
    assert fit_classifier(plain, (x, y), steps=1, batch_size=2, adversarial_epsilon=0.1, progress=False) is plain
    with pytest.raises(ValueError, match=r"at least 2 images per process, got 1"):
        fit_classifier(plain, (x, y), steps=1, batch_size=1, adversarial_epsilon=0.1, progress=False)


def test_dropout_in_a_fit_draws_seeded_streams_that_a_resume_continues(tmp_path):
    """Dropout draws from torch's global generator, which fits neither seeded nor saved: the same seed gave
    other models, the caller's stream moved, and a resumed fit drew other masks than an uninterrupted one."""
    from captum_inn.training import train_loop
    from captum_inn.training.classifier import fit_classifier

    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 4, 4), torch.randint(3, (24,))
    base = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    state = torch.get_rng_state()
    first, second = (fit_classifier(copy.deepcopy(base), (x, y), steps=5, seed=1, progress=False) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    def fit(module, steps, **settings):
        def loss_fn(generator):
            rows = torch.randint(24, (8,), generator=generator)
            return nn.functional.cross_entropy(module(x[rows]), y[rows])
        return train_loop(module, loss_fn, steps=steps, lr=0.01, progress=False, **settings)

    whole = copy.deepcopy(base)
    expected = fit(whole, 10)
    resumed = copy.deepcopy(base)
    fit(resumed, 5, checkpoint=str(tmp_path / "fit.safetensors"))
    torch.rand(3)  # the caller draws in between
    assert fit(resumed, 10, checkpoint=str(tmp_path / "fit.safetensors")) == expected
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))


def test_perceptual_layers_are_taken_as_names_of_layers_that_run(tmp_path):
    """A str was split into letters (layer 'r' not found); modules trained until the first checkpoint
    write, then failed (not JSON); a layer that never ran gave torch's "stack expects a non-empty
    TensorList", or beside one that ran was left out silently."""

    class Judge(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.unused = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 4)

        def forward(self, x):
            return self.relu(self.conv(x))

    judge, images = Judge().eval(), torch.rand(8, 3, 8, 8)
    settings = dict(latent_dim=4, width=4, steps=2, progress=False, perceptual_model=judge)
    one = fit_autoencoder(images, perceptual_layers="relu", checkpoint=str(tmp_path / "a.safetensors"), **settings)
    by_module = fit_autoencoder(images, perceptual_layers=[judge.relu], checkpoint=str(tmp_path / "b.safetensors"),
                                **settings)
    assert one.history == by_module.history
    assert load_checkpoint(tmp_path / "b.safetensors")[1]["config"]["perceptual_layers"] == ["relu"]
    with pytest.raises(ValueError, match=r"`perceptual_layers` \['unused'\] did not run in perceptual_model's forward"):
        fit_autoencoder(images, perceptual_layers=["relu", "unused"], **settings)


def test_a_cache_of_another_model_is_refused_at_the_fit():
    """fit_invariances(model_b, cache=cache_of_a) trained on a's features and recorded a's weights, and the
    explainer for b then refused the INN, saying to fit it again for b, which the user just did."""
    torch.manual_seed(0)
    a, b, images = _Weighted().eval(), _Weighted().eval(), torch.rand(8, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    cache = cache_features(a, "fc", ae, images, progress=False, additional_forward_args=(0.5,))
    with pytest.raises(ValueError, match=r"`cache` was computed from another model than `model`.*cache_features\(model"):
        fit_invariances(b, "fc", cache=cache, steps=1, progress=False, **TINY)
    assert fit_invariances(a.train(), "fc", cache=cache, steps=1, progress=False, **TINY).fit_info["layer"] == "fc"
    other = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()  # the explainer refused it after the fit
    with pytest.raises(ValueError, match=r"`autoencoder` is another one than the cache's codes came from"):
        fit_invariances(a, "fc", other, cache=cache, steps=1, progress=False, **TINY)
    # one CPU device: "cpu:0" was refused for a model on "cpu", with advice (model.to("cpu:0")) that left it there
    assert cache_features(a, "fc", ae, images, device="cpu:0", progress=False, additional_forward_args=(0.5,)).layers[
        "fc"].shape == (8, 10)


def test_an_explainer_warns_when_the_models_running_statistics_changed_since_the_fit(tmp_path):
    """The weights check hashed parameters only: after one pass in train mode the batch norm's running
    statistics moved, the layer gave other activations, and the explainer took the INN silently."""
    from captum_inn.training import load_invariance_inn, save_invariance_inn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).eval()
    images = torch.rand(16, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    inn = fit_invariances(model, "3", ae, images, steps=1, progress=False, **TINY)
    with pytest.raises(TypeError, match=r"save_invariance_inn takes \(path, inn\), the path first"):
        save_invariance_inn(inn, tmp_path / "inn.safetensors")  # said "`inn` has no `fit_info`"
    save_invariance_inn(tmp_path / "inn.safetensors", inn)
    fitted_state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerInvariance(model, "3", inn, ae)
    model.train()
    with torch.no_grad():
        model(images)  # one pass in train mode: the running statistics move, the weights do not
    model.eval()
    for fitted in (inn, load_invariance_inn(tmp_path / "inn.safetensors")):
        with pytest.warns(UserWarning, match=r"weights `inn` was fitted with, but other buffers \(batch norm's running "
                                             r"statistics.*model.load_state_dict"):
            LayerInvariance(model, "3", fitted, ae)
    model.load_state_dict(fitted_state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerInvariance(model, "3", inn, ae)
        # a wrapper adding a buffer of its own (a temperature), or the INN fitted on one: nothing moved
        calibrated = _Calibrated(model).eval()
        LayerInvariance(calibrated, model[3], inn, ae)
        on_wrapper = fit_invariances(calibrated, "net.3", ae, images, steps=1, progress=False, **TINY)
        LayerInvariance(model, "3", on_wrapper, ae)
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    with pytest.warns(UserWarning, match="other buffers"):  # moved statistics, through the wrapper too
        LayerInvariance(_Calibrated(model).eval(), model[3], inn, ae)


class _Calibrated(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("temperature", torch.tensor(2.0))

    def forward(self, x):
        return self.net(x) / self.temperature


class _Weighted(nn.Module):
    """A conv net whose second argument weighs each image's features: ``(N, 1)`` broadcasts over a batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x, weight):
        return self.fc(self.conv(x).mean((2, 3)) * weight)


def test_a_per_image_tensor_given_to_a_fit_follows_its_images_into_every_batch():
    """The fits gave their extra arguments whole to every batch, so a per-image (N, 1) tensor spread a batch
    of one image into 8 rows (and the error blamed a sequence-first layer). As in Captum, a tensor with one row
    per image is now cut with the images: the features are those of each image with its own row."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model, images, weight = _Weighted().eval(), torch.rand(8, 3, 8, 8), torch.rand(8, 1) + 0.5
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    with torch.no_grad():
        expected = torch.cat([model(images[i : i + 1], weight[i : i + 1]) for i in range(8)])
    for batch_size in (1, 3, 8):
        cache = cache_features(model, "fc", ae, images, batch_size=batch_size, progress=False,
                               additional_forward_args=(weight,))
        torch.testing.assert_close(cache.layers["fc"], expected)
    ordered = DataLoader(TensorDataset(images), batch_size=3)
    torch.testing.assert_close(cache_features(model, "fc", ae, ordered, progress=False,
                                              additional_forward_args=(weight,)).layers["fc"], expected)
    # drop_last skips the last images, not their rows: the tensor built for the dataset stays per image
    dropping = DataLoader(TensorDataset(images), batch_size=3, drop_last=True)
    torch.testing.assert_close(cache_features(model, "fc", ae, dropping, progress=False,
                                              additional_forward_args=(weight,)).layers["fc"], expected[:6])
    for shuffled in (DataLoader(TensorDataset(images), batch_size=3, shuffle=True),
                     DataLoader(TensorDataset(images), batch_size=3, shuffle=True, drop_last=True)):
        with pytest.raises(ValueError, match=r"tensor 0 has one row per image, but `data` is a DataLoader with a "
                                             r"RandomSampler.*shuffle=False"):
            cache_features(model, "fc", ae, shuffled, progress=False, additional_forward_args=(weight,))
    # a tensor of another length is still shared by every batch; one that fits no batch is explained
    with pytest.raises(ValueError, match=r"Layer 'fc' gave an activation of shape \(5, 10\) for 1 input\(s\).*"
                                         r"one row per input \(per image of the fits' `data`\)"):
        cache_features(model, "fc", ae, images, batch_size=1, progress=False, additional_forward_args=(torch.rand(5, 1),))
    cache = cache_features(model, "fc", ae, images, batch_size=4, progress=False, additional_forward_args=(0.5,))
    assert cache.layers["fc"].shape == (8, 10)
    with pytest.raises(ValueError, match="must be the batch") as refused:
        cache_features(_SequenceFirst().eval(), "tokens", ae, images, batch_size=4, progress=False)
    assert "additional_forward_args" not in str(refused.value)  # the hint only where extra arguments were given


class _SequenceFirst(nn.Module):
    """A conv map of 8x8 images read as 36 tokens, sequence first: (L, N, E) at ``tokens``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.tokens = nn.Identity()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.tokens(self.conv(x).flatten(2).permute(2, 0, 1)).mean(0))


def test_a_layer_without_the_batch_first_is_refused_naming_the_fix():
    """A sequence-first layer's (L, N, E) was cached as L rows mixing images, paired with the codes of the
    first images, and fitted without an error; a squeeze() that drops a batch of one failed after the whole
    pass with a raw torch error."""
    from captum_inn.attr._common import layer_activation  # how every explainer reads a layer

    torch.manual_seed(0)
    model, images = _SequenceFirst().eval(), torch.rand(8, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    with pytest.raises(ValueError, match=r"Layer 'tokens' gave an activation of shape \(36, 4, 8\) for 4 input\(s\): its "
                                         r"first dimension must be the batch.*selector=lambda out: out.transpose\(0, 1\)"):
        cache_features(model, "tokens", ae, images, batch_size=4, progress=False)
    cache = cache_features(model, "tokens", ae, images, batch_size=4, progress=False,
                           selector=lambda out: out.transpose(0, 1))
    assert cache.layers["tokens"].shape == (8, 36, 8)
    inn = fit_invariances(model, "tokens", cache=cache, steps=1, progress=False, **TINY)
    explainer = LayerInvariance(model, "tokens", inn, ae, selector=lambda out: out.transpose(0, 1))
    assert explainer.sample(images[:2], n_samples=2).shape == (2, 2, 3, 8, 8)

    with pytest.raises(ValueError, match=r"hooked layer \(Identity\) gave an activation of shape \(36, 2, 8\) for 2 input"):
        layer_activation(model, model.tokens, (images[:2],))


def test_a_sequence_first_layer_with_as_many_tokens_as_images_is_refused_too():
    """(L, N, E) with L == N has the batch's size first: 64 patches and batches of 64 images were
    cached as token rows (each mixing images) and fitted, and the explainers and reencode_similarity
    read it so too; a pass with one image fewer tells the two apart."""
    from captum_inn.attr._common import layer_activation
    from captum_inn.metrics import reencode_similarity

    torch.manual_seed(0)
    model, images = _SequenceFirst().eval(), torch.rand(72, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    # the 35 inputs are the check's pass, which the message says (the user passed 36)
    refused = (r"\(checked with the first 35 of 36 (images|inputs), since a shape of \(36, 36, ...\) cannot tell "
               r"batch-first from sequence-first\) gave an activation of shape \(36, 35, 8\) for 35 input\(s\): its first "
               r"dimension must be the batch")
    with pytest.raises(ValueError, match=refused):
        cache_features(model, "tokens", ae, images, batch_size=36, progress=False)
    with pytest.raises(ValueError, match=refused):
        layer_activation(model, model.tokens, (images[:36],))
    with pytest.raises(ValueError, match=refused):
        reencode_similarity(model, "tokens", images[:36], images[:36].unsqueeze(1), batch_size=36)
    # a batch-first layer of as many tokens as images is read as it is, with the same one extra pass
    fine = lambda out: out.transpose(0, 1)  # noqa: E731
    cache = cache_features(model, "tokens", ae, images, batch_size=36, progress=False, selector=fine)
    assert torch.equal(cache.layers["tokens"][:36], layer_activation(model, model.tokens, (images[:36],), selector=fine))


@pytest.mark.parametrize("memmap", [False, True])
def test_a_layer_with_integer_outputs_fits_in_memory_as_on_disk(memmap, tmp_path):
    """The memory-mapped cache stored an integer layer as float32 and fitted it; the in-memory cache kept int64
    and the fit failed ("mean(): could not infer output dtype ... Got: Long")."""

    class Quantised(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.levels = nn.Identity()

        def forward(self, x):
            return self.levels((self.conv(x) * 8).round().long()).float().mean((2, 3))

    torch.manual_seed(0)
    model, images = Quantised().eval(), torch.rand(8, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    cache = cache_features(model, "levels", ae, images, progress=False,
                           memmap_dir=str(tmp_path / "cache") if memmap else None)
    assert cache.layers["levels"][:2].dtype == torch.float32
    inn = fit_invariances(model, "levels", cache=cache, steps=1, progress=False, **TINY)
    assert inn.fit_info["layer_shape"] == [4, 6, 6]
    if not memmap:  # concept_dynamics reads a later checkpoint's layer by its own path: float32 there too
        from captum_inn.concepts import ConceptPairs
        from captum_inn.training import fit_concepts
        from captum_inn.training.dynamics import concept_dynamics

        e = fit_concepts(ae, [ConceptPairs.from_labels("parity", images, torch.arange(8) % 2)], steps=2, pool_size=8,
                         n_blocks=1, hidden=8, progress=False)
        result = concept_dynamics([("a", model), ("b", Quantised().eval())], "levels", ae, e, images, images[:4],
                                  steps=1, n_blocks=1, hidden=8, embed_dim=4, n_samples=2, progress=False)
        assert result.labels == ["a", "b"]


class _WrappedAutoencoder:
    """An autoencoder that is a plain object holding an encoder and a decoder module."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(192, 6), nn.BatchNorm1d(6), nn.Dropout(0.5))
        self.dec = nn.Sequential(nn.Linear(6, 192), nn.Sigmoid(), nn.Unflatten(1, (3, 8, 8)))

    def encode(self, x):
        return self.enc(x)

    def decode(self, z):
        return self.dec(z)


def test_a_plain_object_autoencoder_runs_in_eval_mode_and_its_weights_count_in_the_source(tmp_path):
    """Its modules stayed in training mode while caching (batch norm's statistics changed, dropout made the
    codes random), and the source fingerprint hashed only its own tensor attributes, so a resume took the
    codes of another such autoencoder."""
    torch.manual_seed(0)
    model, images = nn.Sequential(nn.Flatten(), nn.Linear(192, 5)).eval(), torch.rand(12, 3, 8, 8)
    ae = _WrappedAutoencoder(1)
    statistics = ae.enc[2].running_mean.clone()
    first, second = (cache_features(model, "1", ae, images, progress=False) for _ in range(2))
    assert torch.equal(ae.enc[2].running_mean, statistics) and ae.enc.training
    assert torch.equal(first.code_mean, second.code_mean)
    assert source_fingerprint(model, ae, images) != source_fingerprint(model, _WrappedAutoencoder(2), images)


def test_a_resume_without_data_still_checks_the_model_and_the_autoencoder(images, autoencoder, tmp_path):
    """Resuming with data=None skipped every source check: another model and autoencoder trained on the old
    features, and the INN then refused the very model it was just fitted for."""
    torch.manual_seed(0)
    model, other = SmallCNN(width=4).eval(), SmallCNN(width=4).eval()
    for memmap in (False, True):
        folder = str(tmp_path / f"memmap{memmap}")
        fit_invariances(model, "fc", autoencoder, images[:12], steps=2, checkpoint_dir=folder, memmap=memmap,
                        progress=False, **TINY)
        with pytest.raises(CheckpointError, match=r"another model, autoencoder or set of images .*\(what differs: the model\)"):
            fit_invariances(other, "fc", autoencoder, None, steps=4, checkpoint_dir=folder, memmap=memmap, progress=False,
                            **TINY)
        assert fit_invariances(model, "fc", autoencoder, None, steps=4, checkpoint_dir=folder, memmap=memmap, progress=False,
                               **TINY).fit_info["steps"] == 4


def test_fits_side_by_side_in_threads_leave_the_callers_generator_alone(images, autoencoder):
    """Each fit saved and restored torch's one global generator: with two layers fitted in two threads, the
    caller could be left with one fit's seeded stream."""
    model = SmallCNN(width=4).eval()
    cache = cache_features(model, ["relu1", "fc"], autoencoder, images[:16], progress=False)
    for _ in range(3):
        state = torch.get_rng_state()
        fit_invariances(model, ["fc", "relu1"], cache=cache, steps=3, workers=2, progress=False,
                        layer_overrides={"relu1": {"steps": 30}}, **TINY)
        assert torch.equal(torch.get_rng_state(), state)


def test_an_unusable_checkpoint_place_is_named_before_the_pass_over_the_data(images, autoencoder, tmp_path, monkeypatch):
    """A checkpoint_dir inside a file failed with a raw NotADirectoryError after every image went
    through the model (fit_concepts: after encoding every pool)."""
    import captum_inn.training.concepts as concepts_module
    import captum_inn.training.invariances as invariances
    from captum_inn.concepts import ConceptPairs
    from captum_inn.training import fit_concepts

    model = SmallCNN(width=4).eval()
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(invariances, "cache_features", lambda *a, **k: pytest.fail("the data was read"))
    monkeypatch.setattr(concepts_module, "_encode_pools", lambda *a, **k: pytest.fail("the pools were encoded"))
    for folder in ("afile", "afile/sub"):
        with pytest.raises(ValueError, match=rf"No checkpoint can be written at `checkpoint_dir` '.*{folder}/invariance_fc"):
            fit_invariances(model, "fc", autoencoder, images, steps=2, checkpoint_dir=str(tmp_path / folder),
                            progress=False, **TINY)
    pairs = ConceptPairs.from_labels("parity", images, torch.arange(len(images)) % 2)
    with pytest.raises(ValueError, match=r"No checkpoint can be written at `checkpoint`"):
        fit_concepts((model, "fc"), [pairs], steps=2, pool_size=8, n_blocks=1, hidden=8, progress=False,
                     checkpoint=str(tmp_path / "afile" / "c.safetensors"))


def test_a_finished_fit_is_read_back_without_writing(images, autoencoder, tmp_path, monkeypatch):
    """Its folder may be read-only: the write probe refused it ("No checkpoint can be written")."""
    import captum_inn.training.invariances as invariances
    import captum_inn.training.loop as loop

    model = SmallCNN(width=4).eval()
    run = str(tmp_path / "run")
    first = fit_invariances(model, "fc", autoencoder, images, steps=2, checkpoint_dir=run, progress=False, **TINY)
    import captum_inn.training.concepts as concepts_module
    from captum_inn.concepts import ConceptPairs
    from captum_inn.training import fit_concepts

    pairs = ConceptPairs.from_labels("parity", images, torch.arange(len(images)) % 2)
    settings = dict(steps=2, pool_size=8, n_blocks=1, hidden=8, progress=False, checkpoint=str(tmp_path / "c.safetensors"))
    concepts = fit_concepts((model, "fc"), [pairs], **settings)
    for module in (invariances, loop):  # loop's: train_loop's, fit_autoencoder's and fit_concepts' own check
        monkeypatch.setattr(module, "check_checkpoint_path", lambda *a, **k: pytest.fail("a write was probed"))
    monkeypatch.setattr(concepts_module, "save_checkpoint", lambda *a, **k: pytest.fail("the results were rewritten"))
    again = fit_invariances(model, "fc", autoencoder, images, steps=2, checkpoint_dir=run, progress=False, **TINY)
    assert again.history == first.history
    assert fit_concepts((model, "fc"), [pairs], **settings).fit_info == concepts.fit_info


def test_train_loop_trains_inside_no_grad():
    """A fit called inside torch.no_grad() (a notebook cell under it) still computes gradients."""
    from captum_inn.training.loop import train_loop

    torch.manual_seed(0)
    lin, x = nn.Linear(3, 1), torch.randn(16, 3)
    before = lin.weight.detach().clone()
    with torch.no_grad():
        train_loop(lin, lambda generator: lin(x).pow(2).mean(), steps=3, lr=1e-2, progress=False)
    assert not torch.equal(before, lin.weight)


def test_cache_features_keeps_no_graph_and_names_the_image_whose_features_are_not_finite():
    """Cached codes and activations carry no autograd graph, and a layer that turns one image's finite
    pixels into NaN is reported during the pass, naming that image."""

    class Holes(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(192, 3)

        def forward(self, x):
            flat = x.flatten(1).clone()
            flat[x[:, 0, 0, 0] == 1.0] = float("nan")
            return self.head(flat)

    torch.manual_seed(0)
    ae = ConvAutoencoder((3, 8, 8), 4, width=4)
    x = torch.rand(10, 3, 8, 8) * 0.5
    cache = cache_features(Holes(), ["head"], ae, x, batch_size=4, progress=False)
    assert cache.code_mean.grad_fn is None and cache.layers["head"].grad_fn is None
    x[7, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="Layer 'head''s activations hold NaN or infinite values at image 7 of `data`"):
        cache_features(Holes(), ["head"], ae, x, batch_size=4, progress=False)


def test_train_loop_ignores_an_outer_autocast():
    """Steps run in full precision under a caller's autocast: it reused the first step's low-precision
    weights in every later step, so nothing trained (autocast clears its cache only on leaving)."""
    from captum_inn.training.loop import train_loop

    def fit(autocast):
        torch.manual_seed(0)
        lin, x = nn.Linear(3, 1), torch.randn(64, 3)

        def loss_fn(generator):
            rows = torch.randint(64, (16,), generator=generator)
            return (lin(x[rows]).squeeze(1).float() - x[rows].sum(1)).pow(2).mean()

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            history = train_loop(lin, loss_fn, steps=30, lr=0.05, progress=False)
            assert torch.is_autocast_enabled("cpu") == autocast  # the caller's setting back
        return lin, history

    (plain, plain_history), (under, under_history) = fit(False), fit(True)
    assert under_history == plain_history and torch.equal(under.weight, plain.weight)
    assert under_history[-1] < 0.1 * under_history[0]


def test_a_bfloat16_cache_draws_its_training_codes_in_float32():
    """Codes of a bfloat16 autoencoder (or of a pass under autocast) are noised in float32: in bfloat16
    a quarter of the posterior noise rounded away."""
    torch.manual_seed(0)
    ae = ConvAutoencoder((3, 8, 8), 6, width=4).to(torch.bfloat16)
    cache = cache_features(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), ["1"], ae, torch.rand(32, 3, 8, 8),
                           progress=False)
    assert cache.code_mean.dtype == torch.bfloat16
    index = torch.arange(32)
    codes = cache.sample_codes(index, torch.Generator().manual_seed(0))
    assert codes.dtype == torch.float32
    noisy = cache.code_std[index] > 0
    assert noisy.float().mean() > 0.9 and (codes != cache.code_mean[index].float())[noisy].all()


@pytest.mark.filterwarnings("ignore:`data`'s items differ")  # random transforms on purpose
def test_fits_on_a_loader_with_persistent_workers_repeat():
    """Persistent workers were seeded once: their random transforms drew other images on every later
    read, so a second fit differed from the first (and a resume was refused)."""
    from torch.utils.data import DataLoader, Dataset

    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    class Noisy(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return (images[i] + 0.05 * torch.rand(3, 8, 8)).clamp(0, 1)

    loader = DataLoader(Noisy(), batch_size=8, num_workers=1, persistent_workers=True)
    settings = dict(latent_dim=4, width=4, steps=2, batch_size=8, progress=False)
    first, second = fit_autoencoder(loader, **settings), fit_autoencoder(loader, **settings)
    assert all(torch.equal(value, second.state_dict()[key]) for key, value in first.state_dict().items())

    class Scaled(DataLoader):  # a subclass's own __iter__ (Accelerate's loaders) is kept: it is used as it is
        def __iter__(self):
            for batch in super().__iter__():
                yield batch * 0

    from captum_inn.training.data import iter_image_batches

    scaled = Scaled(Noisy(), batch_size=8, num_workers=1, persistent_workers=True)
    assert all(not batch.any() for batch in iter_image_batches(scaled))


def test_a_reused_jitter_augments_as_a_fresh_one():
    """A fit starts a Jitter from its seed: a second fit with the same object differed from the first."""
    from captum_inn.training import Jitter
    from captum_inn.training.classifier import (
        Jitter as JitterFromClassifier,  # its home before training/augment.py
    )
    from captum_inn.training.classifier import fit_classifier

    assert JitterFromClassifier is Jitter

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latent_dim=4, width=4, steps=3, batch_size=8, progress=False)
    jitter = Jitter(1, noise=0.05, seed=0)
    runs = [fit_autoencoder(x, augment=jitter, **settings), fit_autoencoder(x, augment=jitter, **settings),
            fit_autoencoder(x, augment=Jitter(1, noise=0.05, seed=0), **settings)]
    for run in runs[1:]:
        assert all(torch.equal(value, run.state_dict()[key]) for key, value in runs[0].state_dict().items())

    def classifier(augment):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
        return fit_classifier(model, (x, torch.arange(16) % 2), steps=3, augment=augment, progress=False)

    jitter = Jitter(1, noise=0.05, seed=0)
    a, b = classifier(jitter), classifier(jitter)
    assert all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_initialized(), reason="CUDA already started: its generators are seeded directly")
def test_seeded_work_queues_no_seed_for_cudas_lazy_start(monkeypatch, tmp_path):
    """torch.manual_seed also queues a seed for CUDA's lazy start, which fork_rng cannot take back: the
    user's first CUDA draws followed the fit's seed (7 here) instead of their own."""
    queued = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: queued.append(seed))
    x = torch.rand(8, 3, 8, 8)
    ae = fit_autoencoder(x, latent_dim=4, width=4, steps=1, batch_size=4, seed=7, progress=False,
                         checkpoint=str(tmp_path / "ae.safetensors"))
    load_autoencoder(tmp_path / "ae.safetensors")
    cache_features(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), ["1"], ae, x, progress=False)
    assert queued == []


def test_an_interrupt_while_the_fits_start_stops_every_fit(monkeypatch):
    """A Ctrl-C while the pool started its threads left a fit training in the background."""
    import concurrent.futures
    import threading
    import time

    from captum_inn.training.loop import run_concurrently

    submit = concurrent.futures.ThreadPoolExecutor.submit

    def interrupted(self, *args, **kwargs):
        submit(self, *args, **kwargs)  # the thread starts, then the Ctrl-C lands
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", interrupted)
    steps = []

    def task(check):
        for i in range(20):
            time.sleep(0.02)
            check()
            steps.append(i)

    with pytest.raises(KeyboardInterrupt):
        run_concurrently([task, task], workers=2)
    done = len(steps)
    time.sleep(0.2)
    assert len(steps) == done and not [t for t in threading.enumerate() if t.name.startswith("captum_inn_fit")]


def test_a_non_finite_loss_mentions_a_checkpoint_only_where_one_is_written(tmp_path):
    from captum_inn.training.loop import train_loop

    lin = nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="became nan in step 1") as error:
        train_loop(lin, lambda generator: lin(torch.ones(1, 2)).sum() * float("nan"), steps=2, lr=0.1, progress=False)
    assert "checkpoint" not in str(error.value)
    with pytest.raises(FloatingPointError, match="The last checkpoint was left as it was"):
        train_loop(lin, lambda generator: lin(torch.ones(1, 2)).sum() * float("nan"), steps=2, lr=0.1, progress=False,
                   checkpoint=str(tmp_path / "fit.safetensors"))


def test_fit_concepts_under_autocast_measures_the_trained_factors():
    """The factors' spread after the fit was read through autocast's cached copy of the untrained
    weights (the ActNorm start ran under the caller's autocast too)."""
    from captum_inn.concepts import ConceptPairs
    from captum_inn.training import fit_concepts

    torch.manual_seed(0)
    images, labels = torch.rand(64, 6, 1, 1), torch.arange(64) % 2
    model = nn.Sequential(nn.Flatten(), nn.Identity())  # no product: autocast leaves the features as they are

    def fit():
        return fit_concepts((model, "1"), [ConceptPairs.from_labels("parity", images, labels)], factor_sizes={"parity": 2},
                            steps=20, pool_size=32, n_blocks=1, hidden=8, progress=False)

    plain = fit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fit()
    assert under.fit_info["factor_variance"] == plain.fit_info["factor_variance"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_learning_rate_follows_the_documented_schedule(schedule):
    """The cosine schedule runs half a cosine from lr to 1% of lr over the steps; nothing checked
    its ends. Adam with a constant gradient moves a weight by exactly the step's rate, so the
    weight's path reads the rates back."""
    from captum_inn.training import train_loop

    weight = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    module = nn.Module()
    module.weight = weight
    path = []
    steps, lr = 40, 0.1
    train_loop(module, lambda generator: weight.sum(), steps=steps, lr=lr, grad_clip=None, schedule=schedule,
               callback=lambda step, m: path.append(float(weight.detach())), progress=False)
    rates = -np.diff([0.0, *path])
    cosine = lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps)))
    assert np.allclose(rates, cosine if schedule == "cosine" else np.full(steps, lr), rtol=1e-6)


def _determined_codes(noise):
    """Codes that a 10-unit layer `z` fixes up to Gaussian noise of std `noise`."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(512, 10, generator=gen)
    return z, torch.tanh(z[:, :6]) * 2 + noise * torch.randn(512, 6, generator=gen)


def test_a_fitted_inn_beats_the_best_unconditional_gaussian_and_maps_codes_to_a_standard_normal():
    """Maximum likelihood, checked against an independent computation: the fitted density (the INN's own
    v and log-determinant, not the loss it reported) is far better than the best Gaussian that ignores
    the layer, and v is standard normal. With the log-determinant's sign flipped the loss still fell
    (v shrank towards 0), so a test of the falling loss alone passed."""
    z, codes = _determined_codes(0.05)
    cache = FeatureCache(code_mean=codes, code_std=torch.zeros_like(codes), layers={"logits": z})
    inn = fit_invariances(SmallCNN(width=4), "logits", cache=cache, steps=150, lr=3e-3, progress=False,
                          **{**TINY, "batch_size": 64})
    with torch.no_grad():
        v, logdet = inn(codes, z)
    nll_per_dim = float((0.5 * v.pow(2).sum(1) - logdet).mean()) / 6  # as final_nll_per_dim, without ½·log 2π
    gaussian_per_dim = float((0.5 + codes.std(0).log()).mean())  # the best N(μ, diag σ²), same constant left out
    assert nll_per_dim < gaussian_per_dim - 1.0, (nll_per_dim, gaussian_per_dim)
    assert 0.7 < float(v.std()) < 1.3 and float(v.mean().abs()) < 0.2


def test_a_fit_reads_a_layer_on_any_scale_and_offset_alike():
    """The condition is standardised with the layer's statistics before the fit: a layer 1000·z + 500
    trains exactly as z does (without the statistics, it saturated the embedder)."""
    z, codes = _determined_codes(0.05)
    histories = []
    for layer in (z, 1000 * z + 500):
        cache = FeatureCache(code_mean=codes, code_std=torch.zeros_like(codes), layers={"logits": layer})
        histories.append(fit_invariances(SmallCNN(width=4), "logits", cache=cache, steps=20, lr=3e-3, progress=False,
                                         **{**TINY, "batch_size": 64}).history)
    assert np.allclose(histories[0], histories[1], rtol=1e-3, atol=1e-3)


def test_code_noise_is_added_to_the_training_codes():
    """Codes the layer fixes exactly, with code_noise=0.3: no density of the noisy codes has an NLL below
    that noise's entropy, 0.5 + log 0.3 per dimension (without ½·log 2π). Without the noise in the steps
    the fit went far below it."""
    z, codes = _determined_codes(0.0)
    floor = 0.5 + float(np.log(0.3))
    cache = FeatureCache(code_mean=codes, code_std=torch.zeros_like(codes), layers={"logits": z})
    # 400 steps: the fit without the noise reached -0.98, below the floor of -0.70; with it, -0.18
    inn = fit_invariances(SmallCNN(width=4), "logits", cache=cache, steps=400, lr=3e-3, code_noise=0.3,
                          progress=False, **{**TINY, "batch_size": 64})
    assert inn.fit_info["final_nll_per_dim"] > floor - 0.05, (inn.fit_info["final_nll_per_dim"], floor)


# ------------------------------------------------------------------ documented loss terms and shapes
def test_the_autoencoder_loss_is_the_l1_error_of_a_posterior_sample_plus_weighted_kl(monkeypatch):
    """The documented loss per image: summed L1 error of a posterior *sample* + kl_weight · KL."""
    seen = {}
    encode, decode = ConvAutoencoder.encode, ConvAutoencoder.decode

    def recording_encode(self, x):
        seen["x"], seen["q"] = x.detach().clone(), encode(self, x)
        return seen["q"]

    def recording_decode(self, code):
        seen["code"], seen["recon"] = code.detach().clone(), decode(self, code)
        return seen["recon"]

    monkeypatch.setattr(ConvAutoencoder, "encode", recording_encode)
    monkeypatch.setattr(ConvAutoencoder, "decode", recording_decode)
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ae = fit_autoencoder(images, latent_dim=4, width=4, steps=1, batch_size=4, kl_weight=3.0, progress=False)
    x, q, recon = seen["x"], seen["q"], seen["recon"].detach()
    # decoded from mean + std · eps, not the mean itself
    assert not torch.allclose(seen["code"], q.mean.detach())
    expected = ((recon - x).abs().flatten(1).sum(1) + 3.0 * q.kl().detach()).mean() / x[0].numel()
    assert ae.history[0] == pytest.approx(float(expected), rel=1e-5)


def test_the_perceptual_model_stays_frozen_and_its_loss_is_relative_and_weighted():
    """Its weights get no gradient and keep requires_grad; the loss is relative to the activations' mean
    square (a network with 10x the activations gives the same loss) and scaled by perceptual_weight."""
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    loud = copy.deepcopy(net)
    with torch.no_grad():
        for p in loud.parameters():
            p.mul_(10)

    def first_loss(model, weight):
        ae = fit_autoencoder(images, latent_dim=4, width=4, steps=1, batch_size=4, perceptual_model=model,
                             perceptual_layers=["0"], perceptual_weight=weight, progress=False)
        return ae.history[0]

    base = fit_autoencoder(images, latent_dim=4, width=4, steps=1, batch_size=4, progress=False).history[0]
    one = first_loss(net, 1.0)
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert first_loss(loud, 1.0) == pytest.approx(one, rel=1e-4)
    assert one > base and first_loss(net, 3.0) - base == pytest.approx(3 * (one - base), rel=1e-4)


def test_fit_autoencoder_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_autoencoder(torch.rand(1, 3, 8, 8), latent_dim=2, steps=1, progress=False)


def test_encode_posterior_calls_a_std_method_and_broadcasts_a_shared_std():
    """The protocol allows a std() method, and (mean, std) both come back (N, d)."""
    code = torch.rand(2, 3)

    class Returns:
        def __init__(self, out):
            self.out = out

        def encode(self, x):
            return self.out

        def decode(self, c):
            return c

    _, std = encode_posterior(Returns(SimpleNamespace(mean=code, std=lambda: torch.full((2, 3), 0.5))), code)
    assert torch.equal(std, torch.full((2, 3), 0.5))
    _, std = encode_posterior(Returns(SimpleNamespace(mean=code, std=torch.tensor(0.5))), code)
    assert std.shape == (2, 3)


def test_conv_autoencoder_shapes_and_output_range():
    # sigmoid decodes into [0, 1]; identity does not squash
    code = 100 * torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    out = ConvAutoencoder((1, 8, 8), latent_dim=3, width=2).eval().decode(code)
    assert out.min() >= 0 and out.max() <= 1
    assert ConvAutoencoder((1, 8, 8), latent_dim=3, width=2, output="identity").eval().decode(code).abs().max() > 1
    with pytest.raises(ValueError, match="power-of-two side >= 8"):
        ConvAutoencoder((3, 4, 4))
    # channels double per halving, capped at 8 · width
    widths = [m.out_channels for m in ConvAutoencoder((1, 128, 128), latent_dim=2, width=1).encoder
              if isinstance(m, nn.Conv2d)]
    assert widths == [1, 2, 4, 8, 8]


def test_adversarial_training_attacks_half_the_batch_by_fgsm_in_the_pixel_range():
    """adversarial_epsilon: the first half of each batch becomes x + ε·sign(∇loss) clamped to [0, 1],
    and the attack's pass leaves batch norm's running statistics to the step (counted once)."""
    from captum_inn.training.classifier import fit_classifier

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
            self.inputs = []

        def forward(self, x):
            self.inputs.append(x.detach().clone())
            return self.net(x)

    torch.manual_seed(0)
    model = Recording()
    start = copy.deepcopy(model.net)
    x, y = torch.rand(8, 3, 2, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(8, dtype=torch.long)
    fit_classifier(model, (x, y), steps=1, batch_size=4, adversarial_epsilon=0.3, progress=False)
    clean, stepped = model.inputs[0], model.inputs[1]  # the attack's pass on the first half, then the step's
    attacked = clean.clone().requires_grad_(True)
    start.train()
    (gradient,) = torch.autograd.grad(nn.functional.cross_entropy(start(attacked), y[:2]), attacked)
    assert torch.allclose(stepped[:2], (clean + 0.3 * gradient.sign()).clamp(0, 1))
    assert int(model.net[2].num_batches_tracked) == 1
