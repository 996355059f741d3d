"""The comparison pipeline (issue 5, items 1–2): ``compare_attributions`` puts Captum's Grad-CAM and
Integrated Gradients beside the invariance map, invariance samples and concept scores, with one
batching control; ``Comparison.plot``/``save_figures`` draw it; ``last_spatial_layer`` picks
Grad-CAM's default layer; and ``capture`` hooks a torchvision ResNet-18 by name.

Nothing is fitted: a He-initialised SmallCNN behind a gate (that raises on a chosen forward call)
and a batch norm (to see that eval mode is used and running statistics are left alone), a random
``ConvAutoencoder`` and flows whose couplings are randomised.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torchvision
from helpers_hooks import assert_no_hooks, training_flags
from helpers_training import random_conditional_inn, randomise_couplings
from torch import nn
from torchvision.transforms import Normalize

from captum_inn import LayerConcepts, LayerInvariance
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.capture import capture
from captum_inn.compare import Comparison, compare_attributions, last_spatial_layer
from captum_inn.datasets import ColorDigits
from captum_inn.inn import FactorINN
from captum_inn.models import SmallCNN
from captum_inn.visualization import plot_comparison, plot_image_grid

torch.set_num_threads(1)

FAST = dict(n_samples=3, ig_steps=4)  # small settings for the behaviour tests


# ---------------------------------------------------------------- models
class Gate(nn.Module):
    """Counts its calls; raises ``error`` on call number ``fail_at`` (0-based) when armed."""

    def __init__(self):
        super().__init__()
        self.calls, self.fail_at, self.error = 0, None, RuntimeError("gate: boom")

    def forward(self, x):
        if self.fail_at is not None and self.calls == self.fail_at:
            self.calls += 1
            raise self.error
        self.calls += 1
        return x


class Net(nn.Module):
    """gate → BatchNorm2d → SmallCNN(width=4). The batch norm has non-trivial running statistics,
    so batch statistics (training mode) would give other outputs than eval mode."""

    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.bn = nn.BatchNorm2d(3)
        self.cnn = SmallCNN(width=4)
        for m in self.cnn.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        with torch.no_grad():
            self.bn.running_mean.fill_(0.4)
            self.bn.running_var.fill_(0.09)

    def forward(self, x):
        return self.cnn(self.bn(self.gate(x)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    ae = ConvAutoencoder((3, 32, 32), latent_dim=6, width=4).eval()
    inns = {"cnn.logits": random_conditional_inn((10,)), "cnn.fc": random_conditional_inn((128,)), "cnn.relu2": random_conditional_inn((8, 8, 8))}
    e = randomise_couplings(FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16))
    with torch.no_grad():
        e(torch.randn(16, 6))
    return model, ae, inns, e.eval()


def _invariance(setup, layer="cnn.logits"):
    model, ae, inns, _ = setup
    return LayerInvariance(model, layer, inns[layer], ae)


def _concepts(setup):
    model, ae, _, e = setup
    return LayerConcepts(model, "cnn.logits", e, ae)


@pytest.fixture
def x():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_inside_a_callers_inference_mode(setup, x):
    """Integrated Gradients and Grad-CAM need gradients: under the caller's inference_mode Captum
    failed with "element 0 of tensors does not require grad"; the result is that of a call outside."""
    model, explainer = setup[0], _invariance(setup)
    kwargs = dict(n_samples=2, ig_steps=4, progress=False)
    expected = compare_attributions(model, x, explainer, generator=_gen(), **kwargs)
    with torch.inference_mode():
        got = compare_attributions(model, x.clone(), explainer, generator=_gen(), **kwargs)
    for name in ("gradcam", "integrated_gradients", "invariance_map"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


# ---------------------------------------------------------------- 64 ColorDigits images
@pytest.fixture(scope="module")
def digits64():
    return ColorDigits("test").images[:64]


@pytest.fixture(scope="module")
def comparisons(setup, digits64):
    """The same call with all rows at once and with internal_batch_size=7."""
    model, explainer = setup[0], _invariance(setup)
    kwargs = dict(n_samples=4, ig_steps=8)
    whole = compare_attributions(model, digits64, explainer, generator=_gen(), **kwargs)
    batched = compare_attributions(model, digits64, explainer, internal_batch_size=7, generator=_gen(), **kwargs)
    return whole, batched


def test_a_compiled_model_that_has_run_is_compared_as_the_model(setup, x):
    """Grad-CAM's hooks and the default layer's search were skipped by torch.compile's graph once
    the compiled model had run ("no layer with a spatial feature map")."""
    _, ae, inns, _ = setup
    model = SmallCNN(width=4).eval()
    compiled = torch.compile(model, backend="eager")
    for grad in (False, True):  # the graphs a user's own calls built
        with torch.set_grad_enabled(grad):
            compiled(x)
            compiled(x[:1])
    expected = compare_attributions(model, x, LayerInvariance(model, "relu2", inns["cnn.relu2"], ae),
                                    generator=_gen(), progress=False, **FAST)
    got = compare_attributions(compiled, x, LayerInvariance(compiled, "_orig_mod.relu2", inns["cnn.relu2"], ae),
                               generator=_gen(), progress=False, **FAST)
    assert got.gradcam_layer == "_orig_mod.relu2"
    for name in ("gradcam", "integrated_gradients", "invariance_map"):
        assert torch.allclose(getattr(got, name), getattr(expected, name), atol=1e-6), name
    assert expected.gradcam.abs().sum() > 0  # a map that shows the hooks ran


def test_every_map_has_the_input_size_on_64_colordigits(comparisons, digits64):
    n, c, h, w = digits64.shape
    result = comparisons[0]
    assert isinstance(result, Comparison) and len(result) == n == 64
    assert result.gradcam.shape == (n, 1, h, w)
    assert result.integrated_gradients.shape == (n, c, h, w)
    assert result.invariance_map.shape == (n, c, h, w)
    assert result.samples.shape == (n, 4, c, h, w)
    assert result.reconstructions.shape == (n, c, h, w)
    assert result.targets.shape == result.predictions.shape == (n,)
    assert result.concept_scores is None and result.concept_names == []
    assert result.layer == "cnn.logits" and result.gradcam_layer == "cnn.relu3"
    assert torch.equal(result.inputs, digits64)
    for t in (result.gradcam, result.integrated_gradients, result.invariance_map, result.samples):
        assert torch.isfinite(t).all()
        assert not t.requires_grad
    assert (result.gradcam >= 0).all() and result.gradcam.amax() > 0  # relu_attributions, not all zero
    assert result.integrated_gradients.abs().amax() > 0
    assert torch.allclose(result.invariance_map, result.samples.std(dim=1))
    assert result.invariance_map.amax() > 0  # randomised flow: the samples differ


def test_targets_default_to_the_predictions(comparisons, setup, digits64):
    result = comparisons[0]
    with torch.no_grad():
        expected = setup[0](digits64).argmax(1)
    assert torch.equal(result.predictions, expected)
    assert torch.equal(result.targets, expected)


def test_internal_batch_size_does_not_change_the_results(comparisons):
    whole, batched = comparisons
    assert torch.equal(whole.targets, batched.targets) and torch.equal(whole.predictions, batched.predictions)
    # different batch shapes may round differently, nothing more
    for name in ("gradcam", "integrated_gradients", "invariance_map", "samples", "reconstructions"):
        a, b = getattr(whole, name), getattr(batched, name)
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def test_same_generator_seed_gives_the_same_samples(setup, x):
    model, explainer = setup[0], _invariance(setup)
    a = compare_attributions(model, x, explainer, generator=_gen(3), **FAST)
    b = compare_attributions(model, x, explainer, generator=_gen(3), **FAST)
    c = compare_attributions(model, x, explainer, generator=_gen(4), **FAST)
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, c.samples)


@pytest.mark.parametrize("form", ["int", "list", "tensor", "scalar tensor", "one-element tensor", "one-index tuple",
                                  "list of one-index tuples"])
def test_int_and_tensor_targets(setup, x, form):
    """Every form of Captum's TargetType for one class per input; a one-element tensor is one class
    for all, as in Captum (it was refused as a count mismatch)."""
    model, explainer = setup[0], _invariance(setup)
    n = x.shape[0]
    target = {"int": 3, "list": [3] * n, "tensor": torch.full((n,), 3), "scalar tensor": torch.tensor(3),
              "one-element tensor": torch.tensor([3]),
              # Captum's forms, which the explainers took and compare_attributions refused
              "one-index tuple": (3,), "list of one-index tuples": [(3,)] * n}[form]
    result = compare_attributions(model, x, explainer, target=target, generator=_gen(), **FAST)
    assert torch.equal(result.targets, torch.full((n,), 3))
    reference = compare_attributions(model, x, explainer, target=3, generator=_gen(), **FAST)
    assert torch.allclose(result.integrated_gradients, reference.integrated_gradients)
    assert torch.allclose(result.gradcam, reference.gradcam)


def test_per_input_targets_are_explained_per_input(setup, x):
    model, explainer = setup[0], _invariance(setup)
    targets = torch.tensor([0, 5, 9, 2])
    result = compare_attributions(model, x, explainer, target=targets, generator=_gen(), **FAST)
    assert torch.equal(result.targets, targets)
    for i, t in enumerate(targets.tolist()):
        one = compare_attributions(model, x[i : i + 1], explainer, target=t, generator=_gen(), **FAST)
        assert torch.allclose(one.integrated_gradients[0], result.integrated_gradients[i], atol=1e-6)
        assert torch.allclose(one.gradcam[0], result.gradcam[i], atol=1e-6)


def test_concept_scores_present_with_concepts_and_absent_without(setup, x):
    model, explainer, concepts = setup[0], _invariance(setup), _concepts(setup)
    result = compare_attributions(model, x, explainer, concepts=concepts, generator=_gen(), **FAST)
    assert result.concept_names == ["a", "b", concepts.concept_names[-1]] == concepts.concept_names
    assert result.concept_scores.shape == (x.shape[0], 3)
    assert torch.allclose(result.concept_scores, concepts.attribute(x, target=result.targets), atol=1e-5)
    without = compare_attributions(model, x, explainer, generator=_gen(), **FAST)
    assert without.concept_scores is None and without.concept_names == [] and without.concept_delta is None


@pytest.mark.parametrize("internal_batch_size", [None, 2])
def test_the_progress_bar_counts_every_pass(setup, x, monkeypatch, internal_batch_size):
    import captum_inn.compare as compare

    bars = []

    class RecordingBar(compare.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shown, self.stages = not kwargs["disable"], []
            bars.append(self)

        def set_postfix_str(self, s="", refresh=True):
            self.stages.append(s)
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(compare, "tqdm", RecordingBar)
    model, explainer, concepts = setup[0], _invariance(setup), _concepts(setup)
    compare_attributions(model, x[:3], explainer, concepts=concepts, concept_steps=4,
                         internal_batch_size=internal_batch_size, generator=_gen(), **FAST)
    (bar,) = bars
    assert bar.n == bar.total > 0 and bar.shown
    assert bar.stages == ["Grad-CAM", "Integrated Gradients", "concept scores", "invariance samples", "reconstructions"]
    compare_attributions(model, x[:3], explainer, generator=_gen(), progress=False, **FAST)
    assert not bars[1].shown and bars[1].total == 4 and "concept scores" not in bars[1].stages  # one pass per method


def test_completeness_gaps_are_the_methods_own(setup, x):
    """Both IG deltas are Captum's: the attributions' sum minus the output change (returned per
    input); ``concept_steps`` is passed on as the concept attributions' ``n_steps``."""
    from captum.attr import IntegratedGradients

    model, explainer, concepts = setup[0], _invariance(setup), _concepts(setup)
    result = compare_attributions(model, x, explainer, concepts=concepts, concept_steps=32, generator=_gen(), **FAST)
    _, ig_delta = IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=result.targets,
                                                       n_steps=FAST["ig_steps"], return_convergence_delta=True)
    assert torch.allclose(result.integrated_gradients_delta, ig_delta, atol=1e-5)
    scores, delta = concepts.attribute(x, target=result.targets, n_steps=32, return_convergence_delta=True)
    assert torch.allclose(result.concept_scores, scores, atol=1e-5)
    assert torch.allclose(result.concept_delta, delta, atol=1e-5) and result.concept_delta.shape == (x.shape[0],)
    with pytest.raises(ValueError, match="`concept_steps` must be >= 1"):
        compare_attributions(model, x, explainer, concepts=concepts, concept_steps=0, **FAST)
    with pytest.raises(ValueError, match="`concept_steps` must be >= 2"):  # was Captum's bare assert, at the end
        compare_attributions(model, x, explainer, concepts=concepts, concept_steps=1, **FAST)


class Shifted(Net):
    """Net with a second argument: a per-image colour shift ``(N, 3)`` added to the images."""

    def forward(self, x, shift):
        return super().forward(x + shift[:, :, None, None])


@pytest.mark.parametrize("internal_batch_size", [None, 2])
def test_additional_forward_args_reach_every_method_with_each_inputs_rows(setup, x, internal_batch_size):
    """A per-input tensor is split with the inputs (chunks of internal_batch_size, the first row for
    the layer checks, each sample's original): every map is that of the method called on the whole
    batch with it."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    base, ae, inns, e = setup
    model = Shifted().eval()
    model.load_state_dict(base.state_dict())
    shift = torch.linspace(-0.3, 0.3, x.shape[0] * 3).view(-1, 3)
    explainer = LayerInvariance(model, "cnn.logits", inns["cnn.logits"], ae)
    concepts = LayerConcepts(model, "cnn.logits", e, ae)
    result = compare_attributions(model, x, explainer, concepts=concepts, additional_forward_args=(shift,),
                                  internal_batch_size=internal_batch_size, concept_steps=8, generator=_gen(5), **FAST)
    args = dict(target=result.targets, additional_forward_args=(shift,))
    assert torch.equal(result.predictions, model(x, shift).argmax(1)) and result.gradcam_layer == "cnn.relu3"
    cam = LayerGradCam(model, model.cnn.relu3).attribute(x, relu_attributions=True, **args)
    ig, delta = IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), n_steps=FAST["ig_steps"],
                                                     return_convergence_delta=True, **args)
    expected = {"gradcam": LayerAttribution.interpolate(cam, (32, 32), "bilinear"), "integrated_gradients": ig,
                "integrated_gradients_delta": delta, "concept_scores": concepts.attribute(x, n_steps=8, **args),
                "samples": explainer.sample(x, FAST["n_samples"], additional_forward_args=(shift,), generator=_gen(5),
                                            shared_noise=True)}
    for name, value in expected.items():
        assert torch.allclose(getattr(result, name), value, rtol=1e-4, atol=1e-5), name
    unshifted = compare_attributions(base, x, _invariance(setup), generator=_gen(5), **FAST)
    assert not torch.allclose(result.integrated_gradients, unshifted.integrated_gradients, atol=1e-3)  # it matters
    with pytest.raises(ValueError, match=r"`additional_forward_args` tensor 0 has shape \(2, 3\).*one row per input"):
        compare_attributions(model, x, explainer, additional_forward_args=(shift[:2],), **FAST)
    with pytest.raises(ValueError, match=r"`additional_forward_args` tensor 0 has shape \(2, 3\).*one row per input"):
        concepts.attribute(x, n_steps=8, target=result.targets, additional_forward_args=(shift[:2],))  # was torch's


def test_concept_scores_do_not_depend_on_internal_batch_size(setup, x):
    model, explainer, concepts = setup[0], _invariance(setup), _concepts(setup)
    x = x[:3]
    whole = compare_attributions(model, x, explainer, concepts=concepts, generator=_gen(), **FAST)
    batched = compare_attributions(model, x, explainer, concepts=concepts, internal_batch_size=7,
                                   generator=_gen(), **FAST)
    assert torch.allclose(whole.concept_scores, batched.concept_scores, rtol=1e-4, atol=1e-5)


def test_internal_batch_size_bounds_every_pass(setup, x):
    """The documented promise: no network sees more than internal_batch_size rows at once."""
    model, ae = setup[0], setup[1]
    explainer, concepts = _invariance(setup), _concepts(setup)
    seen = []

    def record(_module, args):
        seen.append(args[0].shape[0])

    handles = [model.register_forward_pre_hook(record), ae.register_forward_pre_hook(record),
               ae.encoder.register_forward_pre_hook(record), ae.from_code.register_forward_pre_hook(record)]
    try:
        compare_attributions(model, x[:3], explainer, concepts=concepts, internal_batch_size=5,
                             generator=_gen(), **FAST)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and max(seen) <= 5, sorted(set(seen))


def test_passes_are_bounded_by_default(setup, x, monkeypatch):
    """internal_batch_size=None sent every row at once: IG's N × ig_steps rows with gradients (3 GB for 8
    images of 128×128 under ResNet-18). By default a pass now holds at most 2**24 pixel values (here
    lowered to three 32×32 images), and the results are those of an explicit bound."""
    from captum_inn.attr import _common

    model, ae = setup[0], setup[1]
    explainer, concepts = _invariance(setup), _concepts(setup)
    seen = []

    def record(_module, args):
        seen.append(args[0].shape[0])

    monkeypatch.setattr(_common, "PASS_VALUES", 3 * x[0].numel())
    handles = [model.register_forward_pre_hook(record), ae.register_forward_pre_hook(record),
               ae.encoder.register_forward_pre_hook(record), ae.from_code.register_forward_pre_hook(record)]
    try:
        bounded = compare_attributions(model, x, explainer, concepts=concepts, generator=_gen(), **FAST)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and max(seen) <= 3, sorted(set(seen))
    explicit = compare_attributions(model, x, explainer, concepts=concepts, internal_batch_size=3, generator=_gen(),
                                    **FAST)
    for field in ("integrated_gradients", "invariance_map", "concept_scores", "gradcam"):
        torch.testing.assert_close(getattr(bounded, field), getattr(explicit, field))
    samples = explainer.sample(x, 5, generator=_gen())  # 20 samples, 3 decoded per pass
    torch.testing.assert_close(samples, explainer.sample(x, 5, internal_batch_size=10**6, generator=_gen()))


@pytest.mark.parametrize("internal_batch_size", [None, 3])
def test_predictions_and_the_class_count_come_from_one_pass(setup, x, internal_batch_size):
    """The predicted classes and the number of classes are read from one pass over the inputs (in
    chunks of internal_batch_size); the class count took a pass of one image of its own first."""
    model, explainer = setup[0], _invariance(setup)
    seen = []
    handle = model.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
    try:  # an explicit layer: one pass of one image checks it, then Grad-CAM runs
        result = compare_attributions(model, x, explainer, gradcam_layer="cnn.conv2",
                                      internal_batch_size=internal_batch_size, generator=_gen(), **FAST)
    finally:
        handle.remove()
    chunks = [len(x)] if internal_batch_size is None else [3, 1]
    assert seen[:len(chunks) + 1] == [*chunks, 1], seen
    with torch.no_grad():
        assert torch.equal(result.predictions, model(x).argmax(1))


def test_without_internal_batch_size_integrated_gradients_runs_every_row_at_once(setup, x):
    """internal_batch_size=None is documented as "all at once": one IG pass of N × ig_steps rows
    (it used to run one input per call, ig_steps rows at a time)."""
    model, explainer = setup[0], _invariance(setup)
    n, steps = x.shape[0], 5
    seen = []
    handle = model.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
    try:
        result = compare_attributions(model, x, explainer, n_samples=3, ig_steps=steps, generator=_gen())
    finally:
        handle.remove()
    assert seen.count(n * steps) == 1 and max(seen) == n * steps, seen
    assert seen.count(steps) == 0, seen  # no pass of one input's steps
    bounded = compare_attributions(model, x, explainer, n_samples=3, ig_steps=steps, internal_batch_size=7,
                                   generator=_gen())
    assert torch.allclose(result.integrated_gradients, bounded.integrated_gradients, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "layer, expected",
    [("cnn.relu2", "cnn.relu2"),  # a feature map: Grad-CAM reads the invariance layer itself
     ("cnn.logits", "cnn.relu3"),  # a vector: the last spatial layer
     ("cnn.fc", "cnn.relu3")],
)
def test_gradcam_layer_default(setup, x, layer, expected):
    model = setup[0]
    result = compare_attributions(model, x, _invariance(setup, layer), generator=_gen(), **FAST)
    assert result.layer == layer and result.gradcam_layer == expected
    assert result.gradcam.shape == (x.shape[0], 1, 32, 32)


def test_the_default_gradcam_layer_skips_an_invariance_layer_read_through_a_selector(setup, x):
    """Grad-CAM reads a layer's whole output: a layer whose maps come as a tuple (read with a
    selector) is not chosen for it; the last spatial layer is."""

    class TwoMaps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, x):
            h = self.conv(x)
            return h, -h

    class Net2(nn.Module):
        def __init__(self):
            super().__init__()
            self.maps, self.relu, self.head = TwoMaps(), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(4 * 16 * 16, 10))

        def forward(self, x):
            return self.head(self.relu(self.maps(x)[0]))

    torch.manual_seed(0)
    model = Net2().eval()
    inn = random_conditional_inn((4, 16, 16))
    inn.fit_info = {"layer": "maps", "selector": 0}
    explainer = LayerInvariance(model, "maps", inn, setup[1])
    assert explainer.selector == 0
    result = compare_attributions(model, x, explainer, generator=_gen(), **FAST)
    assert result.gradcam_layer == "relu" and result.gradcam.shape == (x.shape[0], 1, 32, 32)


def test_a_coarse_default_gradcam_layer_warns(setup, x):
    """A default Grad-CAM layer of 2x2 (ResNet's layer4 at 64 px) shows nothing; say so, and not for
    a layer the user chose."""
    coarse = nn.Sequential(nn.Conv2d(3, 4, 3, stride=16, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 10)).eval()
    explainer = LayerInvariance(coarse, "3", setup[2]["cnn.logits"], setup[1])
    with pytest.warns(UserWarning, match=r"Grad-CAM at '1' is a 2×2 map at this input size.*no layer of the model "
                                         "has a larger map") as caught:
        compare_attributions(coarse, x, explainer, generator=_gen(), **FAST)
    assert [w.filename for w in caught if "too coarse" in str(w.message)] == [__file__]  # the caller's line
    # the hint names a real earlier layer (it named ResNet's 'layer3' for every model, 'layer3' itself too)
    two_stages = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=4, padding=1),
                               nn.ReLU(), nn.Flatten(), nn.Linear(16, 10)).eval()
    with pytest.warns(UserWarning, match=r"Grad-CAM at '3' is a 2×2 map.*gradcam_layer= an earlier layer with a "
                                         r"larger map, such as '1' \(8×8\)"):
        compare_attributions(two_stages, x, LayerInvariance(two_stages, "5", setup[2]["cnn.logits"], setup[1]),
                             generator=_gen(), **FAST)
    # a stem with the images' shape is a feature map; a Normalize in front gives the images back: no feature map
    stem = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=16, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 10)).eval()
    with pytest.warns(UserWarning, match=r"Grad-CAM at '3' is a 2×2 map.*such as '1' \(32×32\)"):
        compare_attributions(stem, x, LayerInvariance(stem, "5", setup[2]["cnn.logits"], setup[1]), generator=_gen(),
                             **FAST)
    normalised = nn.Sequential(Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), coarse).eval()
    with pytest.warns(UserWarning, match="no layer of the model has a larger map"):
        compare_attributions(normalised, x, LayerInvariance(normalised, "1.3", setup[2]["cnn.logits"], setup[1]),
                             generator=_gen(), **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compare_attributions(coarse, x, explainer, gradcam_layer="1", generator=_gen(), **FAST)


@pytest.mark.parametrize("given", ["name", "module"])
def test_gradcam_layer_given(setup, x, given):
    model = setup[0]
    layer = "cnn.relu1" if given == "name" else model.cnn.relu1
    result = compare_attributions(model, x, _invariance(setup), gradcam_layer=layer, generator=_gen(), **FAST)
    assert result.gradcam_layer == "cnn.relu1"
    assert result.gradcam.shape == (x.shape[0], 1, 32, 32)  # 16×16 upsampled


@pytest.mark.parametrize("layer, got", [("cnn.fc", r"activations of shape \(\d+,\) per image"),
                                       ("cnn.logits", r"activations of shape \(10,\) per image")])
def test_a_gradcam_layer_without_a_feature_map_is_refused_by_name(setup, x, layer, got):
    """A vector or token layer (a ViT's encoder blocks) has no channels × positions for Grad-CAM to
    weigh; Captum would fail inside its upsampling."""
    with pytest.raises(ValueError, match=rf"Grad-CAM needs a layer with an \(N, C, H, W\) feature map, but "
                                         rf"`gradcam_layer` '{layer}' gives {got}.*conv_proj"):
        compare_attributions(setup[0], x, _invariance(setup), gradcam_layer=layer, generator=_gen(), **FAST)


def test_ig_baselines(setup, x):
    model, explainer = setup[0], _invariance(setup)
    black = compare_attributions(model, x, explainer, target=1, generator=_gen(), **FAST)
    zero = compare_attributions(model, x, explainer, target=1, ig_baselines=0.0, generator=_gen(), **FAST)
    tensor = compare_attributions(model, x, explainer, target=1, ig_baselines=torch.zeros_like(x),
                                  generator=_gen(), **FAST)
    grey = compare_attributions(model, x, explainer, target=1, ig_baselines=0.5, generator=_gen(), **FAST)
    assert torch.allclose(black.integrated_gradients, zero.integrated_gradients)
    assert torch.allclose(black.integrated_gradients, tensor.integrated_gradients)
    assert not torch.allclose(black.integrated_gradients, grey.integrated_gradients)
    # one baseline per input, in parts of one input (internal_batch_size 4 // 4 steps): each its own baseline
    own = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    parts = compare_attributions(model, x, explainer, target=1, ig_baselines=own, internal_batch_size=4,
                                 generator=_gen(), **FAST)
    from captum.attr import IntegratedGradients

    expected = IntegratedGradients(copy.deepcopy(model).eval()).attribute(x, baselines=own, target=1, n_steps=FAST["ig_steps"])
    assert torch.allclose(parts.integrated_gradients, expected, atol=1e-6)
    nan = torch.zeros_like(x)
    nan[0, 0, 0, 0] = float("nan")
    for bad in (float("nan"), float("inf"), nan):  # Integrated Gradients and its deltas were all NaN, unwarned
        with pytest.raises(ValueError, match="`ig_baselines`.*(finite|NaN or infinite)"):
            compare_attributions(model, x, explainer, target=1, ig_baselines=bad, **FAST)


def test_a_comparison_keeps_its_own_copies_of_the_inputs_and_targets(setup, x):
    """Its fields were the caller's tensors: a caller reusing its buffers rewrote the record of the call."""
    model, explainer = setup[0], _invariance(setup)
    images, target = x.clone(), torch.full((x.shape[0],), 1)
    result = compare_attributions(model, images, explainer, target=target, generator=_gen(), **FAST)
    images.zero_()
    target.fill_(7)
    assert torch.equal(result.inputs, x) and result.targets.tolist() == [1] * x.shape[0]


def test_last_spatial_layer_checks_its_example(setup, x):
    """One (C, H, W) image had its channels read as the batch and failed inside the model."""
    model = setup[0]
    with pytest.raises(ValueError, match=r"`example` images must have shape \(N, C, H, W\).*x.unsqueeze\(0\)"):
        last_spatial_layer(model, x[0])
    with pytest.raises(TypeError, match="`example` images must be floating point"):
        last_spatial_layer(model, (x * 255).to(torch.uint8))


# ---------------------------------------------------------------- modes and hooks
def test_model_mode_restored_batch_norm_untouched_no_hooks(setup, x):
    model, explainer, concepts = setup[0], _invariance(setup), _concepts(setup)
    reference = compare_attributions(model, x, explainer, concepts=concepts, generator=_gen(), **FAST)
    model.train()
    try:
        flags = training_flags(model)
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the pipeline runs eval mode itself: nothing to warn about
            result = compare_attributions(model, x, explainer, concepts=concepts, generator=_gen(), **FAST)
        assert training_flags(model) == flags
        assert_no_hooks(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, buffers[k]), k  # running statistics not updated
    finally:
        model.eval()
    # eval mode was used: the same results as from the model in eval mode
    assert torch.equal(result.predictions, reference.predictions)
    assert torch.allclose(result.integrated_gradients, reference.integrated_gradients, atol=1e-6)
    assert torch.allclose(result.concept_scores, reference.concept_scores, atol=1e-5)
    assert not x.requires_grad


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_no_hook_left_and_mode_restored_when_a_forward_pass_fails(setup, x, mode):
    """Arm the gate to fail on each forward call of a normal run in turn."""
    model, explainer, concepts = setup[0], _invariance(setup), _concepts(setup)
    gate = model.gate
    x = x[:2]
    run = dict(concepts=concepts, generator=_gen(), **FAST)
    gate.calls = 0
    compare_attributions(model, x, explainer, **run)
    n_calls = gate.calls
    assert n_calls > 5
    model.train(mode == "train")
    flags = training_flags(model)
    try:
        for k in sorted({0, 1, 2, 3, n_calls // 3, n_calls // 2, n_calls - 2, n_calls - 1}):
            gate.calls, gate.fail_at = 0, k
            with pytest.raises(RuntimeError, match="gate: boom"):
                compare_attributions(model, x, explainer, **run)
            assert_no_hooks(model)
            assert training_flags(model) == flags, k
    finally:
        gate.fail_at = None
        model.eval()


def test_inputs_of_another_dtype_than_the_model_are_named(setup, x):
    model, ae, inns, _ = setup
    double = copy.deepcopy(model).double()
    explainer = LayerInvariance(double, "cnn.logits", inns["cnn.logits"], ae)
    with pytest.raises(TypeError, match=r"`inputs` images are torch.float32 .*images.to\(torch.float64\)"):
        compare_attributions(double, x, explainer, **FAST)


def test_explainers_built_on_the_bound_forward_are_the_models(setup, x):
    """The explainers take ``model.forward`` as well as ``model``: compare_attributions accepted only
    the model itself ("explains another model"), and named the layer by its module's type."""
    model, ae, inns, e = setup
    layer = model.cnn.relu2
    bound = LayerInvariance(model.forward, layer, inns["cnn.relu2"], ae)
    concepts = LayerConcepts(model.forward, model.cnn.logits, e, ae)
    result = compare_attributions(model, x, bound, concepts=concepts, generator=_gen(), concept_steps=4, **FAST)
    direct = compare_attributions(model, x, _invariance(setup, "cnn.relu2"), concepts=_concepts(setup), generator=_gen(),
                                  concept_steps=4, **FAST)
    assert result.layer == result.gradcam_layer == "cnn.relu2"
    assert torch.allclose(result.gradcam, direct.gradcam) and torch.allclose(result.samples, direct.samples)
    assert torch.allclose(result.concept_scores, direct.concept_scores)
    assert_no_hooks(model)


def test_an_explainer_on_a_patched_forward_names_its_layer_in_the_model(setup, x):
    """``model.forward`` replaced by a plain function (a monkeypatch, a decorator's wrapper) is the
    model's forward, so compare_attributions takes it; the explainer can name its layer only by its
    type, and Grad-CAM's default layer was looked up by that name ("layer 'ReLU' not found")."""
    import functools

    model, ae, inns, _ = setup
    patched = Net().eval()
    patched.load_state_dict(model.state_dict())
    original = patched.forward
    patched.forward = functools.wraps(original)(lambda images: original(images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plain function's eval-mode warning
        explainer = LayerInvariance(patched.forward, patched.cnn.relu2, inns["cnn.relu2"], ae)
    result = compare_attributions(patched, x, explainer, generator=_gen(), **FAST)
    direct = compare_attributions(model, x, _invariance(setup, "cnn.relu2"), generator=_gen(), **FAST)
    assert result.layer == result.gradcam_layer == "cnn.relu2"
    assert torch.allclose(result.gradcam, direct.gradcam) and torch.allclose(result.samples, direct.samples)


# ---------------------------------------------------------------- bad input
def test_bad_input_errors(setup, x):
    model, explainer = setup[0], _invariance(setup)
    other = Net().eval()
    other_explainer = LayerInvariance(other, "cnn.logits", setup[2]["cnn.logits"], setup[1])
    cases = [
        (TypeError, "must be an nn.Module", lambda: compare_attributions(lambda t: t, x, explainer)),
        (TypeError, "LayerInvariance", lambda: compare_attributions(model, x, _concepts(setup))),
        (TypeError, "LayerInvariance", lambda: compare_attributions(model, x, None)),
        # a tuple of two tensors failed unpacking ("too many values to unpack")
        (TypeError, r"`inputs` must be one image tensor \(N, C, H, W\), got a tuple of 2 tensors",
         lambda: compare_attributions(model, (x, x), explainer)),
        (TypeError, r"`ig_baselines` must be None, a number or a tensor, got float32; pass float\(ig_baselines\)",
         lambda: compare_attributions(model, x, explainer, ig_baselines=np.float32(0.5))),
        (ValueError, "another model", lambda: compare_attributions(model, x, other_explainer)),
        (TypeError, "LayerConcepts", lambda: compare_attributions(model, x, explainer, concepts=explainer)),
        (ValueError, r"outside 0…9", lambda: compare_attributions(model, x, explainer, target=10)),
        (ValueError, r"outside 0…9", lambda: compare_attributions(model, x, explainer, target=-1)),
        (ValueError, r"outside 0…9", lambda: compare_attributions(model, x, explainer, target=[0, 1, 2, 12])),
        (ValueError, "one per input", lambda: compare_attributions(model, x, explainer, target=[0, 1])),
        (ValueError, "one per input", lambda: compare_attributions(model, x, explainer, target=torch.zeros(4, 1, dtype=torch.long))),
        (ValueError, "one per input", lambda: compare_attributions(model, x, explainer, target=torch.zeros(4, dtype=torch.long)[:2])),
        # the right shape in floats: the message blamed the shape
        (TypeError, r"`target` holds class indices, but got torch.float32 values; .*target.long\(\)",
         lambda: compare_attributions(model, x, explainer, target=torch.zeros(4))),
        (TypeError, "torch.float32 values", lambda: compare_attributions(model, x, explainer, target=[1.0, 2.0, 0.0, 1.0])),
        (TypeError, "bool", lambda: compare_attributions(model, x, explainer, target=True)),
        (TypeError, "booleans", lambda: compare_attributions(model, x, explainer, target=torch.ones(4, dtype=torch.bool))),
        (TypeError, "booleans", lambda: compare_attributions(model, x, explainer, target=[True, False, True, False])),
        (ValueError, r"`n_samples` must be >= 2", lambda: compare_attributions(model, x, explainer, n_samples=1)),
        (ValueError, r"`ig_steps` must be >= 1", lambda: compare_attributions(model, x, explainer, ig_steps=0)),
        (ValueError, "internal_batch_size", lambda: compare_attributions(model, x, explainer, internal_batch_size=0)),
        (ValueError, r"\(N, C, H, W\)", lambda: compare_attributions(model, x[0], explainer)),
        (ValueError, "empty batch", lambda: compare_attributions(model, x[:0], explainer)),
        (ValueError, "`concepts` explains another model",
         lambda: compare_attributions(model, x, explainer, concepts=LayerConcepts(other, "cnn.logits", setup[3], setup[1]))),
        (ValueError, r"`ig_baselines` must have shape \(4, 3, 32, 32\) .* got \(3, 32, 32\); .*unsqueeze\(0\)",
         lambda: compare_attributions(model, x, explainer, ig_baselines=torch.zeros(3, 32, 32))),
        (TypeError, "`ig_baselines` must be None, a number or a tensor",
         lambda: compare_attributions(model, x, explainer, ig_baselines="black")),
        (TypeError, r"`ig_baselines` is torch.float64 but the inputs are torch.float32; .*ig_baselines.to\(inputs.dtype\)",
         lambda: compare_attributions(model, x, explainer, ig_baselines=torch.zeros(1, 3, 32, 32, dtype=torch.float64))),
        (TypeError, r"`ig_baselines` is torch.int64 .*ig_baselines.to\(inputs.dtype\)",
         lambda: compare_attributions(model, x, explainer, ig_baselines=torch.zeros(4, 3, 32, 32, dtype=torch.long))),
        (ValueError, r"`ig_baselines` is on meta but the inputs are on cpu; .*ig_baselines.to\(inputs.device\)",
         lambda: compare_attributions(model, x, explainer, ig_baselines=torch.zeros(1, 3, 32, 32, device="meta"))),
        (ValueError, "NaN", lambda: compare_attributions(model, x * float("nan"), explainer)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
        assert_no_hooks(model)
        assert not model.training


# ---------------------------------------------------------------- figures
@pytest.fixture
def no_show(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("plt.show() was called")

    monkeypatch.setattr(plt, "show", refuse)
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def with_concepts(setup):
    x = torch.rand(2, 3, 32, 32, generator=_gen(5))
    return compare_attributions(setup[0], x, _invariance(setup), concepts=_concepts(setup), n_samples=8,
                                ig_steps=4, generator=_gen())


def test_plot_returns_fig_and_axes(comparisons, with_concepts, no_show):
    fig, axes = comparisons[0].plot(1)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(axes) == 4 + 4  # input, Grad-CAM, IG, map, then all 4 samples (fewer than n_strip=6)
    fig, axes = with_concepts.plot(0, class_names=[f"class {k}" for k in range(10)])
    assert len(axes) == 4 + 6 + 1  # n_strip=6 of 8 samples, and the concept bars
    fig, axes = with_concepts.plot(1, n_strip=2)
    assert len(axes) == 4 + 2 + 1
    own = plt.figure(figsize=(16, 2.5))
    fig, _ = plot_comparison(with_concepts, 0, fig=own)
    assert fig is own


def test_save_figures_writes_pngs(with_concepts, tmp_path, no_show):
    paths = with_concepts.save_figures(tmp_path / "figures", prefix="cmp")
    assert [p.rsplit("/", 1)[-1] for p in map(str, paths)] == ["cmp_0.png", "cmp_1.png"]
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
    assert all((tmp_path / "figures" / f"cmp_{i}.png").stat().st_size > 1000 for i in range(2))
    assert plt.get_fignums() == []  # save_figure closes them
    only = with_concepts.save_figures(tmp_path, indices=[1])
    assert len(only) == 1 and str(only[0]).endswith("comparison_1.png")
    narrow = with_concepts.save_figures(tmp_path / "narrow", indices=[1], n_strip=2)[0]
    assert Path(narrow).stat().st_size < Path(only[0]).stat().st_size  # fewer samples drawn
    # a bad index was found only after the figures before it were written, named `index` (plot's argument)
    for bad in ([0, 2], [-1], [0.0]):
        with pytest.raises(ValueError, match=r"`indices` must hold input indices in 0…1, got \["):
            with_concepts.save_figures(tmp_path / "bad", indices=bad)
        assert not (tmp_path / "bad").exists() and plt.get_fignums() == []
    assert len(with_concepts.save_figures(tmp_path / "np", indices=[np.int64(1), torch.tensor(0)])) == 2
    # a prefix with a folder in it wrote outside `folder` ("../x") or failed after making it ("sub/x")
    for bad in ("../../escaped", "sub/cmp", "", ".."):
        with pytest.raises(ValueError, match=r"`prefix` must be a file name stem without a folder"):
            with_concepts.save_figures(tmp_path / "prefixed" / "figures", prefix=bad)
    assert not (tmp_path / "prefixed").exists() and not (tmp_path / "escaped_0.png").exists()


def test_plot_errors(with_concepts, no_show):
    with pytest.raises(ValueError, match="index"):
        with_concepts.plot(2)
    shown = max(int(with_concepts.targets.max()), int(with_concepts.predictions.max()))
    plt.close("all")
    with pytest.raises(ValueError, match=f"`class_names` has {shown} names, but class {shown} is shown"):
        with_concepts.plot(0, class_names=[str(k) for k in range(shown)])
    assert plt.get_fignums() == []  # refused before a figure was opened (one was left open)
    with pytest.raises(ValueError, match="same number of images"):
        plot_image_grid({"a": torch.rand(2, 3, 8, 8), "b": torch.rand(3, 3, 8, 8)})
    with pytest.raises(ValueError, match="captions"):
        plot_image_grid({"a": torch.rand(2, 3, 8, 8)}, captions={"a": ["only one"]})
    with pytest.raises(ValueError, match="captions"):
        plot_image_grid({"a": torch.rand(2, 3, 8, 8)}, captions={"z": ["x", "y"]})


# ---------------------------------------------------------------- last_spatial_layer and ResNet-18
@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_last_spatial_layer_of_resnet18(resnet):
    resnet.train()
    flags = training_flags(resnet)
    assert last_spatial_layer(resnet, torch.rand(2, 3, 64, 64)) == "layer4"  # 2×2
    assert last_spatial_layer(resnet, torch.rand(1, 3, 32, 32)) == "layer3"  # layer4 is 1×1 there
    assert_no_hooks(resnet)
    assert training_flags(resnet) == flags
    resnet.eval()


def test_last_spatial_layer_of_small_models():
    assert last_spatial_layer(SmallCNN(width=4), torch.rand(1, 3, 32, 32)) == "relu3"


def test_a_default_grad_cam_layer_that_runs_twice_is_warned_about():
    """One nn.ReLU after two convolutions: Captum reads it at its last call, the explainers at their first.
    Given as gradcam_layer it was warned about; chosen by default it was not."""
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.inn import ConditionalINN

    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
            self.logits = nn.Linear(4, 3)

        def forward(self, x):
            return self.logits(self.relu(self.c2(self.relu(self.c1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model, ae = SharedReLU().eval(), ConvAutoencoder((3, 8, 8), latent_dim=4, width=4).eval()
    inn = ConditionalINN(4, (3,), n_blocks=1, hidden=8)
    inn(torch.randn(4, 4), torch.randn(4, 3))  # (normally: fit_invariances)
    assert last_spatial_layer(model, torch.rand(1, 3, 8, 8)) == "relu"
    with pytest.warns(UserWarning, match=r"'relu'.*runs 2 times"):
        result = compare_attributions(model, torch.rand(2, 3, 8, 8), LayerInvariance(model, "logits", inn, ae),
                                      n_samples=2, ig_steps=4, progress=False)
    assert result.gradcam_layer == "relu"
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="gradcam_layer"):
        last_spatial_layer(mlp, torch.rand(1, 3, 2, 2))
    assert_no_hooks(mlp)


RESNET_LAYERS = ["layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]


def _manual_forward(model, x):
    out = {}
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for name in RESNET_LAYERS[:4]:
        h = out[name] = getattr(model, name)(h)
    out["avgpool"] = model.avgpool(h)
    out["fc"] = model.fc(torch.flatten(out["avgpool"], 1))
    return out


def test_capture_hooks_resnet18_by_name_in_one_pass(resnet):
    x = torch.rand(2, 3, 64, 64, generator=_gen(2))
    resnet.eval()
    with torch.no_grad():
        expected = _manual_forward(resnet, x)
        logits = resnet(x)
    calls = []
    handle = resnet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        values = capture(resnet, RESNET_LAYERS, x)
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward pass for all six layers
    assert list(values) == RESNET_LAYERS
    shapes = {"layer1": (64, 16, 16), "layer2": (128, 8, 8), "layer3": (256, 4, 4), "layer4": (512, 2, 2),
              "avgpool": (512, 1, 1), "fc": (10,)}
    for name in RESNET_LAYERS:
        assert values[name].shape == (2, *shapes[name])
        # the in-place ReLUs of later blocks did not overwrite what was captured
        assert torch.allclose(values[name], expected[name], atol=1e-6), name
    assert torch.allclose(values["fc"], logits, atol=1e-6)
    assert (values["layer4"] >= 0).all()  # a block ends with its ReLU
    assert_no_hooks(resnet)


def test_capture_from_resnet18_in_train_mode_uses_eval_mode_and_restores_it(resnet):
    x = torch.rand(3, 3, 64, 64, generator=_gen(3))
    resnet.eval()
    with torch.no_grad():
        expected = _manual_forward(resnet, x)
    resnet.train()
    resnet.layer2[0].bn1.eval()  # a user's own mixed setting must survive too
    flags = training_flags(resnet)
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    try:
        values = capture(resnet, RESNET_LAYERS, x)
        assert training_flags(resnet) == flags
        assert resnet.training and not resnet.layer2[0].bn1.training
        for k, v in resnet.state_dict().items():
            assert torch.equal(v, state[k]), k  # running_mean/var and num_batches_tracked untouched
        for name in RESNET_LAYERS:
            assert torch.allclose(values[name], expected[name], atol=1e-6), name  # running statistics used
        assert_no_hooks(resnet)
        # capture(eval_mode=False) is the opt-out: batch statistics, and running stats move
        capture(resnet, "layer1", x, eval_mode=False)
        assert not torch.equal(resnet.bn1.running_mean, state["bn1.running_mean"])
        assert training_flags(resnet) == flags
    finally:
        resnet.load_state_dict(state)
        resnet.eval()


def test_ig_baseline_of_one_image_broadcasts(setup, x):
    model, explainer = setup[0], _invariance(setup)
    grey = torch.full((1, 3, 32, 32), 0.5)
    one = compare_attributions(model, x, explainer, target=1, ig_baselines=grey, internal_batch_size=5,
                               generator=_gen(), **FAST)
    full = compare_attributions(model, x, explainer, target=1, ig_baselines=grey.expand_as(x).clone(),
                                generator=_gen(), **FAST)
    assert torch.allclose(one.integrated_gradients, full.integrated_gradients, atol=1e-6)


def test_grad_cam_is_not_read_from_a_reused_module_at_another_call_than_the_invariance():
    """torchvision's BasicBlock calls its ``relu`` twice. The explainers read ``"layer3.1.relu"`` at
    its first call (inside the block); Captum's LayerGradCam at its last (the block's output). The
    default Grad-CAM layer must not be that module under its name (the two maps would be of
    different activations); a given one warns."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    inn = random_conditional_inn((256, 4, 4))
    autoencoder = ConvAutoencoder((3, 64, 64), latent_dim=inn.dim).eval()
    explainer = LayerInvariance(model, "layer3.1.relu", inn, autoencoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layer4 at 64 px is coarse
        result = compare_attributions(model, x, explainer, generator=_gen(), **FAST)
    assert result.gradcam_layer != "layer3.1.relu"
    assert result.gradcam_layer == last_spatial_layer(model, x)
    with pytest.warns(UserWarning, match=r"'layer3.1.relu' runs 2 times.*last call.*'layer3.1'") as caught:
        compare_attributions(model, x, explainer, gradcam_layer="layer3.1.relu", generator=_gen(), **FAST)
    assert [w.filename for w in caught if "runs 2 times" in str(w.message)] == [__file__]  # the caller's line
    assert_no_hooks(model)


def test_a_model_without_logits_is_refused_with_the_wrapper_to_write(setup, x):
    """A model returning a dict (or a plain function) cannot go to Grad-CAM and IG as it is; the error
    says so and how to wrap it, not ``pass selector=`` (which compare_attributions does not take)."""

    class Heads(nn.Module):
        def __init__(self, cnn):
            super().__init__()
            self.cnn = cnn

        def forward(self, images):
            return {"logits": self.cnn(images), "aux": images.mean((1, 2, 3))}

    heads = Heads(setup[0]).eval()
    explainer = LayerInvariance(heads, "cnn.cnn.logits", setup[2]["cnn.logits"], setup[1])
    with pytest.raises(TypeError, match=r"returns a dict with keys \['logits', 'aux'\].*wrap it.*'model.cnn.cnn.logits'"):
        compare_attributions(heads, x, explainer, generator=_gen(), **FAST)
    assert_no_hooks(heads)
    with pytest.raises(TypeError, match=r"got function; .*wrap it"):
        compare_attributions(lambda images: heads(images)["logits"], x, explainer, generator=_gen(), **FAST)


def test_pixels_out_of_range_are_warned_about_once_per_comparison(setup):
    """The reconstructions' chunks each warned again, quoting their own range (no filter merged them)."""
    x = (torch.rand(6, 3, 32, 32, generator=_gen(2)) - 0.5) / 0.2  # normalised images: far outside [0, 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare_attributions(setup[0], x, _invariance(setup), n_samples=2, ig_steps=2, internal_batch_size=2,
                             progress=False)
    assert len([w for w in caught if "pixels range over" in str(w.message)]) == 1
