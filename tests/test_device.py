"""The whole public pipeline on the run's ``--device`` (``make test ARGS="--device cuda"`` on a GPU).

On the CPU (CI) these tests check the same code paths with ``device="cpu"``. On a GPU they check
that every fit trains there, that every result lands on the inputs' device, that checkpoints
written from the device load back onto it, and that what is deterministic agrees with the same
computation on the CPU (cuDNN may use TF32 convolutions, hence the tolerances of 1e-2).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers_training import split_regression

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
    """Models elsewhere (CPU copies, on a GPU run) are measured on the device and stay where they were:
    concept_dynamics moved the caller's models for good."""
    checkpoints = {**fitted["snapshots"].models, 6: fitted["cnn"]}
    checkpoints = {label: copy.deepcopy(model).cpu() for label, model in checkpoints.items()}
    x = fitted["images"][:8].to(device)
    dynamics = concept_dynamics(checkpoints, "fc", fitted["ae"], fitted["e"], fitted["images"], x,
                                fitted["labels"][:8].to(device), steps=3, n_samples=2, device=device,
                                progress=False, **TINY_INN)
    assert len(dynamics.table().splitlines()) >= 3
    assert all(on(torch.device("cpu"), model) for model in checkpoints.values())


def test_networks_elsewhere_than_device_are_a_clear_error(device, fitted):
    def elsewhere(network):  # on a device the fit is not given, wherever the tests run
        return copy.deepcopy(network).to("meta")

    with pytest.raises(ValueError, match=rf"`model` is on meta but `device` is {device.type}.*; move it first"):
        cache_features(elsewhere(fitted["cnn"]), "fc", fitted["ae"], fitted["images"][:8], device=device, progress=False)
    with pytest.raises(ValueError, match=rf"`representation` is on meta but `device` is {device.type}"):
        fit_concepts(elsewhere(fitted["ae"]), fitted["data"].concepts(), steps=1, device=device, progress=False)
    with pytest.raises(ValueError, match=rf"`representation` is on meta but `device` is {device.type}"):
        fit_concepts((elsewhere(fitted["cnn"]), "fc"), fitted["data"].concepts(), steps=1, device=device, progress=False)


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


# ---------------------------------------------------------------- the captured training step (CUDA only)
@pytest.fixture
def cuda(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need --device cuda")
    return device


def _count_replays(monkeypatch):
    from captum_inn.training.loop import CapturedStep

    counts = {"captures": 0, "updates": 0}
    init, update = CapturedStep.__init__, CapturedStep.update

    def counting_init(self, *args, **kwargs):
        counts["captures"] += 1
        init(self, *args, **kwargs)

    def counting_update(self):
        counts["updates"] += 1
        update(self)

    monkeypatch.setattr(CapturedStep, "__init__", counting_init)
    monkeypatch.setattr(CapturedStep, "update", counting_update)
    return counts


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_captured_step_trains_as_the_eager_step_does(cuda, schedule, monkeypatch):
    from captum_inn.training.loop import CapturedStep, train_loop

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    net, batch_fn, loss_of = split_regression(cuda)
    eager = train_loop(net, loss_of, batch_fn=batch_fn, steps=40, lr=0.01, schedule=schedule, progress=False,
                       cuda_graph=False)
    counts = _count_replays(monkeypatch)
    graph_net, batch_fn, loss_of = split_regression(cuda)
    graphed = train_loop(graph_net, loss_of, batch_fn=batch_fn, steps=40, lr=0.01, schedule=schedule, progress=False,
                         cuda_graph=True)
    assert counts == {"captures": 1, "updates": 40 - CapturedStep.WARMUP_STEPS}
    assert graphed[-1] < 0.5 * graphed[0]
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-3, atol=1e-4)
    for a, b in zip(graph_net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_fits_capture_by_default_unless_turned_off(cuda, monkeypatch):
    from captum_inn.training.loop import train_loop

    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS", raising=False)
    counts = _count_replays(monkeypatch)
    net, batch_fn, loss_of = split_regression(cuda)
    train_loop(net, loss_of, batch_fn=batch_fn, steps=10, lr=0.01, progress=False)
    assert counts["captures"] == 1
    train_loop(net, loss_of, batch_fn=batch_fn, steps=10, lr=0.01, progress=False, cuda_graph=False)
    monkeypatch.setenv("CAPTUM_INN_CUDA_GRAPHS", "0")
    train_loop(net, loss_of, batch_fn=batch_fn, steps=10, lr=0.01, progress=False)
    assert counts["captures"] == 1
    train_loop(net, loss_of, batch_fn=batch_fn, steps=10, lr=0.01, progress=False, cuda_graph=True)
    assert counts["captures"] == 2


def test_a_captured_fit_resumes_from_its_checkpoint_and_on_the_cpu(cuda, tmp_path, monkeypatch):
    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS", raising=False)  # captured by default
    from captum_inn.training.loop import train_loop

    path = str(tmp_path / "fit.safetensors")
    net, batch_fn, loss_of = split_regression(cuda)
    whole = train_loop(net, loss_of, batch_fn=batch_fn, steps=30, lr=0.01, progress=False)
    first_net, batch_fn, loss_of = split_regression(cuda)
    train_loop(first_net, loss_of, batch_fn=batch_fn, steps=12, lr=0.01, progress=False, checkpoint=path)
    cpu_path = str(tmp_path / "for_the_cpu.safetensors")
    shutil.copy(path, cpu_path)
    resumed_net, batch_fn, loss_of = split_regression(cuda, seed=5)  # other weights: the checkpoint's must win
    resumed = train_loop(resumed_net, loss_of, batch_fn=batch_fn, steps=30, lr=0.01, progress=False, checkpoint=path)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=1e-3, atol=1e-4)

    cpu_net, cpu_batch, cpu_loss = split_regression(torch.device("cpu"), seed=5)  # the GPU fit's checkpoint, on the CPU
    on_cpu = train_loop(cpu_net, cpu_loss, batch_fn=cpu_batch, steps=30, lr=0.01, progress=False, checkpoint=cpu_path)
    torch.testing.assert_close(torch.tensor(on_cpu), torch.tensor(whole), rtol=1e-2, atol=1e-3)


def test_a_nonfinite_loss_stops_a_captured_fit_before_its_update(cuda):
    from captum_inn.training.loop import train_loop

    net, batch_fn, loss_of = split_regression(cuda)
    calls = {"n": 0}

    def poisoned_batch(generator):  # the 9th batch (step 8, captured) has NaN targets
        inputs, targets = batch_fn(generator)
        calls["n"] += 1
        return inputs, targets * float("nan") if calls["n"] == 9 else targets

    with pytest.raises(FloatingPointError, match="in step 9"):
        train_loop(net, loss_of, batch_fn=poisoned_batch, steps=20, lr=0.01, progress=False, cuda_graph=True)
    # a NaN gradient applied by Adam would have made every parameter NaN
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_batch_of_another_shape_under_a_captured_step_is_a_clear_error(cuda, monkeypatch):
    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS", raising=False)  # captured by default
    from captum_inn.training.loop import train_loop

    net, batch_fn, loss_of = split_regression(cuda)
    calls = {"n": 0}

    def shrinking(generator):
        calls["n"] += 1
        inputs, targets = batch_fn(generator)
        return (inputs, targets) if calls["n"] < 10 else (inputs[:32], targets[:32])

    with pytest.raises(ValueError, match="the same shapes every step"):
        train_loop(net, loss_of, batch_fn=shrinking, steps=20, lr=0.01, progress=False)


def test_fit_invariances_and_fit_concepts_capture_their_steps_and_train_as_the_eager_fits(cuda, fitted, monkeypatch):
    from captum_inn.training.loop import CapturedStep

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    def fit_both():
        inns = fit_invariances(fitted["cnn"], ["relu3", "fc"], fitted["ae"], fitted["images"], steps=10, device=cuda,
                               progress=False, **TINY_INN)
        e = fit_concepts(fitted["ae"], fitted["data"].concepts("differ"), factor_sizes={"digit": 3, "foreground": 2,
                         "background": 2}, steps=10, n_blocks=2, hidden=32, pool_size=64, device=cuda, progress=False)
        return {**inns, "concepts": e}

    monkeypatch.setenv("CAPTUM_INN_CUDA_GRAPHS", "0")  # eager, one layer after the other
    eager = fit_both()
    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS")  # captured, the two layers side by side on their own streams
    counts = _count_replays(monkeypatch)
    graphed = fit_both()
    assert counts == {"captures": 3, "updates": 3 * (10 - CapturedStep.WARMUP_STEPS)}
    for name, inn in graphed.items():
        assert len(inn.history) == 10
        torch.testing.assert_close(torch.tensor(inn.history), torch.tensor(eager[name].history), rtol=1e-3, atol=1e-4)
        for a, b in zip(inn.parameters(), eager[name].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_a_loss_that_cannot_be_captured_warns_and_trains_on_unless_insisted(cuda, monkeypatch):
    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS", raising=False)  # captured by default
    from captum_inn.training.loop import train_loop

    net, batch_fn, loss_of = split_regression(cuda)

    def host_reading_loss(inputs, targets):  # .item() inside: not allowed in a graph
        loss = loss_of(inputs, targets)
        return loss * (1.0 if loss.item() >= 0 else 1.0)

    with pytest.warns(UserWarning, match="Could not capture the training step"):
        history = train_loop(net, host_reading_loss, batch_fn=batch_fn, steps=12, lr=0.01, progress=False)
    assert len(history) == 12 and history[-1] < history[0]
    net, batch_fn, loss_of = split_regression(cuda)
    with pytest.raises(RuntimeError):
        train_loop(net, host_reading_loss, batch_fn=batch_fn, steps=12, lr=0.01, progress=False, cuda_graph=True)
    # the device and its random generator still work after a failed capture (torch 2.11 left the
    # generator marked as capturing, and this draw raised)
    assert torch.isfinite(torch.randn(3, device=cuda).sum())


def test_fits_side_by_side_hold_streams_of_their_own(cuda):
    from captum_inn.training.loop import own_stream

    with own_stream(cuda) as first:
        pooled = [torch.cuda.Stream(cuda).cuda_stream for _ in range(80)]  # round torch's pool (32) and more
        assert first.cuda_stream in pooled  # torch hands the same stream out again...
        with own_stream(cuda) as second:
            assert second.cuda_stream != first.cuda_stream  # ...own_stream does not
    with own_stream(cuda) as again:  # released at the end of the block
        assert again.cuda_stream is not None


def test_multi_layer_captured_fits_called_again_and_again_train_as_the_eager_fit(cuda, fitted, monkeypatch):
    """Each call draws streams from torch's pool of 32; after a few calls a fit was given the stream
    another fit was capturing on (an H200 run of benchmarks/capture_overhead_probe.py failed so)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    layers = ["relu1", "relu3", "fc", "logits"]

    def fit():
        inns = fit_invariances(fitted["cnn"], layers, fitted["ae"], fitted["images"], steps=12, device=cuda,
                               progress=False, **TINY_INN)
        return {name: torch.tensor(inn.history) for name, inn in inns.items()}

    monkeypatch.setenv("CAPTUM_INN_CUDA_GRAPHS", "0")
    eager = fit()
    monkeypatch.delenv("CAPTUM_INN_CUDA_GRAPHS")
    for _ in range(6):  # 8 pooled streams a call
        for name, history in fit().items():
            torch.testing.assert_close(history, eager[name], rtol=1e-3, atol=1e-4)


def test_nonfinite_gradients_of_a_finite_loss_stop_a_captured_fit_before_its_update(cuda, tmp_path):
    from captum_inn.training.checkpoint import load_checkpoint
    from captum_inn.training.loop import train_loop

    net, batch_fn, loss_of = split_regression(cuda)
    calls = {"n": 0}

    def batch_with_shift(generator):  # the 9th batch (step 8, captured) has shift 0
        inputs, targets = batch_fn(generator)
        calls["n"] += 1
        return inputs, targets, torch.tensor(0.0 if calls["n"] == 9 else 1.0, device=cuda)

    def loss_with_sqrt(inputs, targets, shift):  # at shift 0 the loss is finite, its gradient NaN (sqrt at 0)
        loss = loss_of(inputs, targets)
        return loss + torch.sqrt(loss * shift)

    path = str(tmp_path / "fit.safetensors")
    with pytest.raises(FloatingPointError, match="gradients became nan in step 9"):
        train_loop(net, loss_with_sqrt, batch_fn=batch_with_shift, steps=20, lr=0.01, progress=False, cuda_graph=True,
                   checkpoint=path, checkpoint_every=8)
    assert all(torch.isfinite(p).all() for p in net.parameters())  # Adam applied no NaN gradient
    tensors, saved = load_checkpoint(path, kind="module")
    assert saved["step"] == 8 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
