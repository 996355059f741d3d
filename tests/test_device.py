"""The whole public pipeline on the run's ``--device`` (``make test ARGS="--device cuda"`` on a GPU).

On the CPU (CI) these tests check the same code paths with ``device="cpu"``. On a GPU they check
that every fit trains there, that every result lands on the inputs' device, that checkpoints
written from the device load back onto it, and that what is deterministic agrees with the same
computation on the CPU (cuDNN may use TF32 convolutions, hence the tolerances of 1e-2).
"""

from __future__ import annotations

import copy

import pytest
import torch

from captum_inn import LayerConcepts, LayerInvariance
from captum_inn.datasets import ColorDigits
from captum_inn.models import SmallCNN
from captum_inn.training import (
    cache_features,
    fit_autoencoder,
    fit_concepts,
    fit_invariances,
    load_concept_inn,
    load_invariance_inn,
    save_concept_inn,
    save_invariance_inn,
)
from captum_inn.training.classifier import fit_classifier
from captum_inn.training.dynamics import Snapshots, concept_dynamics

torch.set_num_threads(1)

TINY_INN = dict(n_blocks=2, hidden=32, embed_dim=16, conv_width=8, conv_max_width=16, batch_size=32)


def on(device: torch.device, module_or_tensor) -> bool:
    """Whether every tensor of a module (or the tensor) lives on ``device``."""
    tensors = [module_or_tensor] if torch.is_tensor(module_or_tensor) else \
        list(module_or_tensor.parameters()) + list(module_or_tensor.buffers())
    return all(t.device.type == device.type for t in tensors)


@pytest.fixture(scope="module")
def fitted(device):
    """A CNN, an autoencoder, invariance INNs of two layers and a concept INN, all fitted on ``device``."""
    data = ColorDigits("train", seed=0)
    images, labels = data.images[:256], data.digits[:256]
    torch.manual_seed(0)
    snapshots = Snapshots([2])
    cnn = fit_classifier(SmallCNN(width=8), (images, labels), steps=6, batch_size=32, device=device,
                         progress=False, callback=snapshots)
    ae = fit_autoencoder(images, latent_dim=8, steps=6, width=8, batch_size=32, device=device, progress=False)
    inns = fit_invariances(cnn, ["relu3", "fc"], ae, images, steps=6, device=device, progress=False, **TINY_INN)
    e = fit_concepts(ae, data.concepts("differ"), factor_sizes={"digit": 3, "foreground": 2, "background": 2},
                     steps=6, n_blocks=2, hidden=32, pool_size=64, device=device, progress=False)
    return dict(data=data, images=images, labels=labels, cnn=cnn.eval(), ae=ae.eval(), inns=inns, e=e.eval(),
                snapshots=snapshots)


def test_every_fit_trains_on_the_device(device, fitted):
    assert on(device, fitted["cnn"]) and on(device, fitted["ae"]) and on(device, fitted["e"])
    for inn in fitted["inns"].values():
        assert on(device, inn)
        assert len(inn.history) == 6 and all(torch.isfinite(torch.tensor(inn.history)))


def test_invariance_results_land_on_the_device_and_match_the_cpu(device, fitted):
    x = fitted["images"][:4].to(device)
    explainer = LayerInvariance(fitted["cnn"], "fc", fitted["inns"]["fc"], fitted["ae"])
    inv_map = explainer.attribute(x, n_samples=4, generator=torch.Generator().manual_seed(0))
    samples = explainer.sample(x, n_samples=3, generator=torch.Generator().manual_seed(1))
    v = explainer.invariances(x)
    assert inv_map.shape == x.shape and on(device, inv_map) and torch.isfinite(inv_map).all()
    assert samples.shape == (4, 3, 3, 32, 32) and on(device, samples)
    assert on(device, v)

    cpu = LayerInvariance(copy.deepcopy(fitted["cnn"]).cpu(), "fc", copy.deepcopy(fitted["inns"]["fc"]).cpu(),
                          copy.deepcopy(fitted["ae"]).cpu())
    torch.testing.assert_close(cpu.invariances(x.cpu()), v.cpu(), rtol=1e-2, atol=1e-2)
    cpu_samples = cpu.sample(x.cpu(), n_samples=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cpu_samples, samples.cpu(), rtol=1e-2, atol=1e-2)


def test_concept_results_land_on_the_device(device, fitted):
    x = fitted["images"][:4].to(device)
    explainer = LayerConcepts(fitted["cnn"], "logits", fitted["e"], fitted["ae"])
    target = fitted["cnn"](x).argmax(1)
    attributions, delta = explainer.attribute(x, target=target, return_convergence_delta=True)
    k = len(explainer.concept_names)  # the three concepts and the residual
    assert k == 4 and attributions.shape == (4, k) and on(device, attributions) and on(device, delta)
    change = attributions.sum(1) - delta
    assert (delta.abs() <= 1e-2 * change.abs().clamp_min(1e-3)).all()
    edited = explainer.edit(x, "digit", donors=x.flip(0))
    assert edited.shape == x.shape and on(device, edited)
    assert all(on(device, f) for f in explainer.decompose(x).values())
    with_v = LayerConcepts(fitted["cnn"], "fc", fitted["e"], fitted["ae"], invariance_inn=fitted["inns"]["fc"])
    shares = with_v.encoded(x, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert shares.shape == (4, k) and on(device, shares) and torch.isfinite(shares).all()


def test_checkpoints_written_from_the_device_load_back_onto_it(device, fitted, tmp_path):
    inn, e = fitted["inns"]["fc"], fitted["e"]
    save_invariance_inn(str(tmp_path / "inn.safetensors"), inn)
    save_concept_inn(str(tmp_path / "e.safetensors"), e)
    loaded = load_invariance_inn(str(tmp_path / "inn.safetensors"), map_location=device).eval()
    loaded_e = load_concept_inn(str(tmp_path / "e.safetensors"), map_location=device).eval()
    assert on(device, loaded) and on(device, loaded_e)
    code, cond = torch.randn(5, inn.dim, device=device), torch.randn(5, 128, device=device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(code, cond)[0], inn.eval()(code, cond)[0])
        torch.testing.assert_close(loaded_e(code)[0], e(code)[0])


def test_concept_dynamics_on_the_device(device, fitted):
    checkpoints = {**fitted["snapshots"].models, 6: fitted["cnn"]}
    x = fitted["images"][:8].to(device)
    dynamics = concept_dynamics(checkpoints, "fc", fitted["ae"], fitted["e"], fitted["images"], x,
                                fitted["labels"][:8].to(device), steps=3, n_samples=2, device=device,
                                progress=False, **TINY_INN)
    assert len(dynamics.table().splitlines()) >= 3


def test_networks_elsewhere_than_device_are_a_clear_error(fitted):
    other = "meta"  # a device none of the networks is on, wherever the tests run
    with pytest.raises(ValueError, match=r"`model` is on .* but `device` is meta; move it first"):
        cache_features(fitted["cnn"], "fc", fitted["ae"], fitted["images"][:8], device=other, progress=False)
    with pytest.raises(ValueError, match=r"`representation` is on .* but `device` is meta"):
        fit_concepts(fitted["ae"], fitted["data"].concepts(), steps=1, device=other, progress=False)
    with pytest.raises(ValueError, match=r"`representation` is on .* but `device` is meta"):
        fit_concepts((fitted["cnn"], "fc"), fitted["data"].concepts(), steps=1, device=other, progress=False)


@pytest.mark.parametrize("where", ["cpu", "device"])
def test_a_generator_on_either_device_drives_every_sampler(device, fitted, where):
    from captum_inn.metrics import reencode_similarity, variance_explained_by_v

    def gen(seed):
        return torch.Generator(device="cpu" if where == "cpu" else device).manual_seed(seed)

    x = fitted["images"][:6].to(device)
    cnn, ae, inn, e = fitted["cnn"], fitted["ae"], fitted["inns"]["fc"], fitted["e"]
    explainer = LayerInvariance(cnn, "fc", inn, ae)
    concepts = LayerConcepts(cnn, "fc", e, ae, invariance_inn=inn)
    with torch.no_grad():
        samples = explainer.sample(x, n_samples=3, generator=gen(0))
        assert torch.equal(samples, explainer.sample(x, n_samples=3, generator=gen(0)))  # seeded
        assert on(device, explainer.attribute(x, n_samples=2, generator=gen(1)))
        assert on(device, concepts.edit(x, "digit", generator=gen(2)))
        assert on(device, concepts.encoded(x, n_samples=2, generator=gen(3)))
        code = ae.encode(x)
        assert on(device, code.sample(gen(4)))
        assert on(device, inn.sample(torch.randn(6, 128, device=device), generator=gen(5)))
        scores = reencode_similarity(cnn, "fc", x, samples, n_null_pairs=50, generator=gen(6))
        assert 0.0 <= scores["beats_null"] <= 1.0
        share = variance_explained_by_v(inn, code.mean, torch.randn(6, 128, device=device), n_samples=2,
                                        generator=gen(7))
        assert share >= 0.0
