"""Captum composition (issue 5, item 3): the outputs of ``LayerInvariance.attribute`` and
``LayerConcepts.attribute`` go through ``captum.attr.NoiseTunnel``, ``captum.metrics.sensitivity_max``,
``captum.metrics.infidelity`` (in the space where each attribution is defined) and
``captum.attr.visualization.visualize_image_attr(_multiple)``; after every call, normal or failed,
no hook is left on the model and its training flags are unchanged; tuples in give tuples out.

The setup is small and deterministic (no fitting): a SmallCNN with He-initialised weights (with
PyTorch's default initialisation a random SmallCNN's logits hardly move with the image, which
makes every attribution ~1e-6), a linear autoencoder onto six smooth patterns (a random
``ConvAutoencoder`` decodes nearly constant images), and flows whose couplings are randomised so
that they are not the identity.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from captum.attr import GradientAttribution, IntegratedGradients, NoiseTunnel
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from helpers_hooks import Gate, assert_no_hooks, training_flags
from helpers_training import randomise_couplings
from torch import nn

from captum_inn import LayerConcepts, LayerInvariance
from captum_inn.capture import capture
from captum_inn.inn import ConditionalINN, FactorINN
from captum_inn.models import SmallCNN

torch.set_num_threads(1)

N = 6
NT_TYPES = ["smoothgrad", "smoothgrad_sq", "vargrad"]


# ---------------------------------------------------------------- models
class Net(nn.Module):
    """SmallCNN behind a gate and a ``Dropout(0)``: in training mode the dropout triggers the
    library's training-mode warning while the outputs stay deterministic. ``scale`` makes it a
    two-input model for tuple inputs."""

    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.drop = nn.Dropout(0.0)
        self.cnn = SmallCNN(width=4)
        for m in self.cnn.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, image, scale=None):
        if scale is not None:
            image = image * scale
        return self.cnn(self.drop(self.gate(image)))


class SmoothAutoencoder(nn.Module):
    """Linear autoencoder onto six orthonormal smooth patterns: ``decode(encode(decode(c))) = decode(c)``."""

    latent_dim = 6

    def __init__(self, scale: float = 10.0):
        super().__init__()
        coarse = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        patterns = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
        q, _ = torch.linalg.qr(patterns.flatten(1).T)
        self.register_buffer("basis", q.T.contiguous())
        self.scale = scale

    def encode(self, x):
        return (x.flatten(1) - 0.5) @ self.basis.T / self.scale

    def decode(self, code):
        return (0.5 + self.scale * code @ self.basis).view(-1, 3, 32, 32)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    ae = SmoothAutoencoder().eval()
    images = ae.decode(torch.randn(32, 6, generator=torch.Generator().manual_seed(2)))

    inn = ConditionalINN(6, (10,), n_blocks=2, hidden=16, embed_dim=8, conv_width=8, conv_max_width=16)
    randomise_couplings(inn)
    with torch.no_grad():
        inn(torch.randn(16, 6), torch.randn(16, 10))  # ActNorm initialisation
    inn.embedder.set_input_statistics(capture(model, "cnn.logits", images))

    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    randomise_couplings(e)
    with torch.no_grad():
        e(torch.randn(16, 6))

    e_layer = FactorINN(128, {"x": 4}, n_blocks=1, hidden=8, seed=0)  # on the vector layer cnn.fc
    e_layer.fit_info = {"representation": {"kind": "layer", "layer": "cnn.fc", "dim": 128}}
    with torch.no_grad():
        e_layer(torch.randn(16, 128))
    return model, ae, inn.eval(), e.eval(), e_layer.eval()


@pytest.fixture
def x(setup):
    _, ae, *_ = setup
    with torch.no_grad():  # images in the autoencoder's span, so that codes are ~N(0, I)
        return ae.decode(torch.randn(N, 6, generator=torch.Generator().manual_seed(1)))


@pytest.fixture
def scale():
    return 1.0 + 0.1 * torch.rand(N, 1, 1, 1, generator=torch.Generator().manual_seed(3))


def _invariance(setup):
    model, ae, inn, _, _ = setup
    return LayerInvariance(model, "cnn.logits", inn, ae)


def _concepts(setup, layer: bool = False):
    model, ae, _, e, e_layer = setup
    return LayerConcepts(model, "cnn.fc", e_layer) if layer else LayerConcepts(model, "cnn.logits", e, ae)


@contextmanager
def left_as_it_was(model: nn.Module, mode: str = "eval", warns: Optional[bool] = False):
    """Run the block with ``model`` in ``mode``; afterwards no hook may remain and every training
    flag must be as before. Every call runs the model in eval mode and must never warn about training
    mode (``warns=False``; ``warns=None``: not checked)."""
    was = model.training
    model.train(mode == "train")
    flags = training_flags(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        training_warnings = [w for w in caught if "training mode" in str(w.message)]
        if warns is not None:
            assert bool(training_warnings) == (warns and mode == "train"), [str(w.message) for w in caught]
        assert_no_hooks(model)
        assert training_flags(model) == flags
    finally:
        model.gate.error = None
        model.train(was)


# ---------------------------------------------------------------- NoiseTunnel
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("nt_type", NT_TYPES)
def test_noise_tunnel_over_the_invariance_map(setup, x, nt_type, mode):
    explainer = _invariance(setup)
    model = setup[0]

    def run():
        with torch.random.fork_rng():  # NoiseTunnel draws its noise from the global generator
            torch.manual_seed(0)
            return NoiseTunnel(explainer).attribute(
                x, nt_type=nt_type, nt_samples=3, nt_samples_batch_size=2, stdevs=0.05, target=[1] * N,
                n_samples=4, generator=torch.Generator().manual_seed(0),
            )

    with left_as_it_was(model, mode):
        out = run()
    assert isinstance(out, torch.Tensor) and out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= (-1e-6 if nt_type == "vargrad" else 0) and out.max() > 0
    with left_as_it_was(model, mode):
        assert torch.equal(run(), out)  # reproducible with a seed and a generator


def test_noise_tunnel_passes_its_arguments_through(setup, x, scale):
    """Zero noise and one sample: smoothgrad is the map itself, vargrad zero; a per-example
    additional argument is expanded by NoiseTunnel and sliced by ``internal_batch_size``."""
    explainer = _invariance(setup)
    g = torch.Generator
    direct = explainer.attribute(x, n_samples=4, generator=g().manual_seed(7))
    smooth = NoiseTunnel(explainer).attribute(x, nt_samples=1, stdevs=0.0, n_samples=4, generator=g().manual_seed(7))
    assert torch.allclose(smooth, direct, atol=1e-6)
    var = NoiseTunnel(explainer).attribute(x, nt_type="vargrad", nt_samples=1, stdevs=0.0, n_samples=4)
    assert var.abs().max() < 1e-6

    with_arg = NoiseTunnel(explainer).attribute(
        x, nt_samples=2, stdevs=0.0, n_samples=4, additional_forward_args=(scale,), internal_batch_size=3,
        generator=g().manual_seed(7),
    )
    assert with_arg.shape == x.shape and torch.isfinite(with_arg).all()
    assert_no_hooks(setup[0])


@pytest.mark.parametrize("nt_type", NT_TYPES)
def test_noise_tunnel_tuple_in_tuple_out(setup, x, scale, nt_type):
    explainer = _invariance(setup)
    with left_as_it_was(setup[0]):
        out = NoiseTunnel(explainer).attribute(
            (x, scale), nt_type=nt_type, nt_samples=2, stdevs=(0.05, 0.01), n_samples=3,
            generator=torch.Generator().manual_seed(0),
        )
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == x.shape and out[0].max() > 0
    assert out[1].shape == scale.shape and torch.equal(out[1], torch.zeros_like(scale))
    one = NoiseTunnel(explainer).attribute((x,), nt_type=nt_type, nt_samples=2, stdevs=0.05, n_samples=3)
    assert isinstance(one, tuple) and len(one) == 1 and one[0].shape == x.shape


def test_direct_attribute_tuple_in_tuple_out(setup, x, scale):
    explainer = _invariance(setup)
    g = torch.Generator
    assert isinstance(explainer.attribute(x, n_samples=2), torch.Tensor)
    one = explainer.attribute((x,), n_samples=2)
    assert isinstance(one, tuple) and len(one) == 1
    pair = explainer.attribute((x, scale), n_samples=3, generator=g().manual_seed(0))
    assert isinstance(pair, tuple) and [t.shape for t in pair] == [x.shape, scale.shape]
    as_list = explainer.attribute([x, scale], n_samples=3, generator=g().manual_seed(0))
    assert isinstance(as_list, tuple) and all(torch.equal(a, b) for a, b in zip(as_list, pair))
    assert_no_hooks(setup[0])


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layer", [False, True], ids=["code", "layer"])
def test_noise_tunnel_over_concept_attributions(setup, x, scale, layer, mode):
    """Concept scores ``(N, K)`` live in concept space: NoiseTunnel averages them over noisy
    inputs; tuple inputs give one ``(N, K)`` tensor (not a tuple mirroring the inputs)."""
    concepts = _concepts(setup, layer)
    k = len(concepts.concept_names)
    x_before = x.clone()
    with left_as_it_was(setup[0], mode):
        scores, delta = NoiseTunnel(concepts).attribute(
            x, nt_samples=3, stdevs=0.02, target=1, n_steps=16, return_convergence_delta=True,
        )
    assert scores.shape == (N, k) and torch.isfinite(scores).all()
    assert delta.shape == (3 * N,) and torch.isfinite(delta).all()
    assert torch.equal(x, x_before) and not x.requires_grad

    direct, direct_delta = concepts.attribute(x, target=1, n_steps=16, return_convergence_delta=True)
    same, same_delta = NoiseTunnel(concepts).attribute(x, nt_samples=1, stdevs=0.0, target=1, n_steps=16,
                                                      return_convergence_delta=True)
    assert torch.allclose(same, direct, atol=1e-6) and torch.allclose(same_delta, direct_delta, atol=1e-6)

    # factor-space baselines: NoiseTunnel hands a (1, d) baseline on as a one-element tuple
    base = 0.3 * torch.ones(1, concepts.concept_inn.dim)
    with_base = NoiseTunnel(concepts).attribute(x, nt_samples=1, stdevs=0.0, target=1, n_steps=16, baselines=base)
    assert torch.allclose(with_base, concepts.attribute(x, target=1, n_steps=16, baselines=base), atol=1e-6)
    assert not torch.allclose(with_base, direct, atol=1e-4)

    with left_as_it_was(setup[0]):
        from_tuple = NoiseTunnel(concepts).attribute((x, scale), nt_type="vargrad", nt_samples=2,
                                                     stdevs=(0.02, 0.0), target=1, n_steps=8)
    assert isinstance(from_tuple, torch.Tensor) and from_tuple.shape == (N, k)
    # with several inputs Captum wants one baseline per input (a number under NoiseTunnel, which checks
    # each against its input); the image input's is the factor-space one: every such baseline was refused
    with left_as_it_was(setup[0]):
        numbers = NoiseTunnel(concepts).attribute((x, scale), nt_samples=1, stdevs=0.0, target=1, n_steps=8,
                                                  baselines=(0.3, 0.0))
        direct = concepts.attribute((x, scale), target=1, n_steps=8, baselines=(base, None))
    assert torch.allclose(numbers, direct, atol=1e-6)
    assert torch.allclose(direct, concepts.attribute((x, scale), target=1, n_steps=8, baselines=base), atol=1e-6)
    with pytest.raises(ValueError, match=r"one baseline per input \(2\), got 3"):
        concepts.attribute((x, scale), target=1, n_steps=8, baselines=(0.3, 0.0, 0.0))


@pytest.mark.parametrize("layer", [False, True], ids=["code", "layer"])
def test_concepts_are_a_gradient_attribution_with_their_own_convergence_delta(setup, x, layer):
    """Captum's ``compute_convergence_delta(attributions, baselines, inputs, target)`` in factor space:
    the delta that ``attribute`` returns, and it moves one for one with the attributions' sum."""
    concepts = _concepts(setup, layer)
    assert isinstance(concepts, GradientAttribution)
    base = torch.full((concepts.concept_inn.dim,), 0.1)
    scores, delta = concepts.attribute(x, target=2, baselines=base, n_steps=32, return_convergence_delta=True)
    assert torch.allclose(concepts.compute_convergence_delta(scores, base, x, target=2), delta, atol=1e-5)
    shifted = scores + 1.0 / scores.shape[1]  # the attributions now sum to 1 more per input
    assert torch.allclose(concepts.compute_convergence_delta(shifted, base, x, target=2), delta + 1.0, atol=1e-5)


@pytest.mark.parametrize("layer", [False, True], ids=["code", "layer"])
def test_concept_attributions_inside_a_callers_inference_mode(setup, x, layer):
    """A notebook cell under torch.inference_mode() (Captum's IG fails there): the attributions and
    delta are those of a call outside it, and the caller's mode is back afterwards."""
    concepts = _concepts(setup, layer)
    expected = concepts.attribute(x, target=2, n_steps=16, return_convergence_delta=True)
    with torch.inference_mode():
        inputs = x.clone()  # an inference tensor, as images made in the cell are
        got = concepts.attribute(inputs, target=2, n_steps=16, return_convergence_delta=True)
        assert torch.is_inference_mode_enabled()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_autograd_on_copies_inference_tensors_only():
    """The wrapper of the gradient methods copies inference tensors (autograd cannot save them) and
    passes everything else through as it is: a list a forward_func fills stays the caller's."""
    from captum_inn.attr._common import autograd_on

    seen = {}

    @autograd_on
    def record(filled, pair, extra=None):
        seen.update(filled=filled, pair=pair, extra=extra)
        return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    filled, plain = [], torch.ones(2)
    with torch.inference_mode():
        made_here = torch.ones(2)
        assert record(filled, (plain, made_here), extra=made_here)
    assert seen["filled"] is filled and seen["pair"][0] is plain
    assert not seen["pair"][1].is_inference() and not seen["extra"].is_inference()
    assert torch.equal(seen["extra"], made_here)
    untouched = (plain, [plain])
    record(filled, untouched)
    assert seen["pair"] is untouched


@pytest.mark.parametrize("layer", [False, True], ids=["code", "layer"])
def test_concept_attributions_take_number_baselines_and_the_layer_input_switch(setup, x, layer):
    concepts = _concepts(setup, layer)
    kw = dict(target=1, n_steps=8)
    plain = concepts.attribute(x, **kw)
    assert torch.allclose(concepts.attribute(x, baselines=0, **kw), plain)  # Captum's scalar baseline
    filled = concepts.attribute(x, baselines=torch.full((concepts.concept_inn.dim,), 0.5), **kw)
    assert torch.allclose(concepts.attribute(x, baselines=0.5, **kw), filled)
    assert torch.equal(concepts.attribute(x, attribute_to_layer_input=False, **kw), plain)
    if layer:  # the input of cnn.fc is not the 128-d vector the concept INN was fitted on
        with pytest.raises(ValueError, match="acts on vectors of size 128"):
            concepts.attribute(x, attribute_to_layer_input=True, **kw)


def test_concepts_on_a_layer_that_returns_a_tuple_replace_only_the_selected_tensor():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 6)

        def forward(self, v):
            h = self.lin(v)
            return h, h.abs().sum(1)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.head = Pair(), nn.Linear(6, 3)

        def forward(self, image):
            h, aux = self.pair(image.flatten(1))
            return self.head(h) + aux[:, None]

    torch.manual_seed(0)
    net, images = TwoHeads().eval(), torch.rand(4, 3, 2, 2)
    e = FactorINN(6, {"x": 2}, n_blocks=2, hidden=8)
    randomise_couplings(e)
    with torch.no_grad():
        e(torch.randn(16, 6))
    e.fit_info = {"representation": {"kind": "layer", "layer": "pair", "dim": 6}}
    concepts = LayerConcepts(net, "pair", e.eval(), selector=0)
    assert torch.allclose(concepts.output_from_factors(images), net(images), atol=1e-5)
    scores, delta = concepts.attribute(images, target=0, n_steps=64, return_convergence_delta=True)
    assert scores.shape == (4, 2) and delta.abs().max() < 1e-2


# ---------------------------------------------------------------- sensitivity_max
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sensitivity_max_of_the_invariance_map(setup, x, scale, mode):
    explainer = _invariance(setup)
    with left_as_it_was(setup[0], mode):
        sens = sensitivity_max(explainer.attribute, x, perturb_radius=0.02, n_perturb_samples=3,
                               n_samples=4, generator=torch.Generator().manual_seed(0))
    assert sens.shape == (N,) and torch.isfinite(sens).all() and (sens >= 0).all()
    with left_as_it_was(setup[0]):
        sens_tuple = sensitivity_max(explainer.attribute, (x, scale), perturb_radius=0.02, n_perturb_samples=3,
                                     max_examples_per_batch=2 * N, n_samples=4, target=list(range(N)))
    assert sens_tuple.shape == (N,) and torch.isfinite(sens_tuple).all() and (sens_tuple >= 0).all()


def _as_tuple(explain):
    """``sensitivity_max`` always calls with a tuple and expects a tuple back; concept scores are
    one tensor (like Captum's own layer methods), so they are wrapped."""
    return lambda inputs, **kwargs: (explain(inputs, **kwargs),)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sensitivity_max_of_concept_attributions(setup, x, mode):
    concepts = _concepts(setup)
    kwargs = dict(n_perturb_samples=3, target=1, n_steps=16)
    with left_as_it_was(setup[0], mode), torch.random.fork_rng():
        torch.manual_seed(0)
        near = sensitivity_max(_as_tuple(concepts.attribute), x, perturb_radius=1e-4, **kwargs)
        far = sensitivity_max(_as_tuple(concepts.attribute), x, perturb_radius=0.1, **kwargs)
    for sens in (near, far):
        assert sens.shape == (N,) and torch.isfinite(sens).all() and (sens >= 0).all()
    # Integrated Gradients through a smooth decoder is continuous: tiny perturbations, tiny change
    assert near.max() < 1e-2 and near.mean() < far.mean()


# ---------------------------------------------------------------- infidelity
def _gated_forward(concepts: LayerConcepts):
    """The function whose ``(N, K)`` input the concept scores attribute: gate ``g_k`` scales
    concept ``k``'s factor block (baseline zero), ``g = 1`` is the input; the model output comes
    from :meth:`LayerConcepts.output_from_factors`."""
    sizes = torch.tensor([s.stop - s.start for s in concepts.concept_inn.factor_slices.values()])

    def forward(gates, images, factors):
        return concepts.output_from_factors(images, gates.repeat_interleave(sizes, dim=1) * factors)

    return forward


def _drop_concepts(gates):
    """Infidelity perturbation in concept space: each concept is reset to the baseline with
    probability 1/2 (``perturbed = gates − I``); returns ``(I, perturbed)``."""
    keep = (torch.rand(gates.shape) < 0.5).to(gates)
    removed = gates * (1 - keep)
    return removed, gates - removed


def test_infidelity_of_concept_attributions_in_concept_space(setup, x):
    """Infidelity compares ``I · attribution`` with ``f(g) − f(g − I)``, so it needs attributions of
    the inputs of ``f``. Concept scores attribute concept gates (the ``LayerConcepts.attribute``
    docstring): checked here against Captum's IG on the gated function, then infidelity under
    random concept removals must beat random scores of the same norm."""
    model = setup[0]
    concepts = _concepts(setup)
    forward = _gated_forward(concepts)
    factors = concepts.factors(x)
    gates = torch.ones(N, len(concepts.concept_names))
    with left_as_it_was(model):
        scores = concepts.attribute(x, target=1, n_steps=32)
        ig = IntegratedGradients(forward).attribute(
            gates, baselines=torch.zeros_like(gates), target=1, additional_forward_args=(x, factors),
            n_steps=32, method="riemann_trapezoid",
        )
        assert torch.allclose(scores, ig * 32 / 31, atol=1e-5)  # Captum's trapezoid weights sum to 31/32

        def infid(attributions):
            with torch.random.fork_rng():  # the same perturbations for every attribution
                torch.manual_seed(0)
                return infidelity(forward, _drop_concepts, gates, attributions, target=1,
                                  additional_forward_args=(x, factors), n_perturb_samples=16)

        ours = infid(scores)
        g = torch.Generator().manual_seed(5)
        random = []
        for _ in range(8):
            r = torch.randn(scores.shape, generator=g)
            random.append(infid(r / r.norm(dim=1, keepdim=True) * scores.norm(dim=1, keepdim=True)).mean())
    assert ours.shape == (N,) and torch.isfinite(ours).all() and (ours >= 0).all()
    assert ours.mean() < 0.5 * min(random), (ours.mean(), random)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_infidelity_runs_on_the_invariance_map_in_input_space(setup, x, scale, mode):
    """The invariance map is an input-shaped spread of invariance samples, not an attribution of
    one output: it is large where the layer ignores the image, i.e. where the output does *not*
    change, so ``map · I`` is no model of ``f(x) − f(x − I)`` and the infidelity is not expected to
    be small. What must hold is that Captum's metric accepts it (input shape, tensor or tuple)."""
    model = setup[0]
    explainer = _invariance(setup)

    def noise(inputs):
        if isinstance(inputs, tuple):
            eps = tuple(0.05 * torch.randn_like(t) for t in inputs)
            return eps, tuple(t - e for t, e in zip(inputs, eps))
        eps = 0.05 * torch.randn_like(inputs)
        return eps, inputs - eps

    with left_as_it_was(model, mode):
        spread = explainer.attribute(x, n_samples=4, generator=torch.Generator().manual_seed(0))
        value = infidelity(model, noise, x, spread, target=1, n_perturb_samples=4)
    assert value.shape == (N,) and torch.isfinite(value).all() and (value >= 0).all()
    with left_as_it_was(model):
        pair = explainer.attribute((x, scale), n_samples=4)
        value_pair = infidelity(model, noise, (x, scale), pair, target=1, n_perturb_samples=4,
                                max_examples_per_batch=2 * N)
    assert value_pair.shape == (N,) and torch.isfinite(value_pair).all() and (value_pair >= 0).all()


# ---------------------------------------------------------------- visualisation
def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(1, 2, 0).numpy()


@pytest.mark.parametrize("sign", ["absolute_value", "positive"])
@pytest.mark.parametrize("method", ["heat_map", "blended_heat_map", "masked_image"])
def test_visualize_image_attr_shows_the_map(setup, x, method, sign):
    explainer = _invariance(setup)
    with left_as_it_was(setup[0]):
        spread = explainer.attribute(x[:1], n_samples=4, generator=torch.Generator().manual_seed(0))
    fig, ax = viz.visualize_image_attr(_hwc(spread[0]), _hwc(x[0].clamp(0, 1)), method=method, sign=sign,
                                       show_colorbar=True, title=f"{method} {sign}", use_pyplot=False)
    try:
        assert fig is not None and ax is not None and ax.get_title() == f"{method} {sign}"
        assert ax.images  # something was drawn
    finally:
        plt.close(fig)


def test_visualize_image_attr_multiple_shows_maps_and_smoothed_maps(setup, x):
    explainer = _invariance(setup)
    with left_as_it_was(setup[0]):
        spread = explainer.attribute(x[:1], n_samples=4, generator=torch.Generator().manual_seed(0))
        smooth = NoiseTunnel(explainer).attribute(x[:1], nt_samples=2, stdevs=0.05, n_samples=4)
    methods = ["original_image", "heat_map", "blended_heat_map", "masked_image", "heat_map"]
    signs = ["all", "absolute_value", "positive", "absolute_value", "positive"]
    for attr in (spread, smooth):
        fig, axes = viz.visualize_image_attr_multiple(_hwc(attr[0]), _hwc(x[0].clamp(0, 1)), methods, signs,
                                                      show_colorbar=True, use_pyplot=False)
        try:
            assert len(np.ravel(axes)) == len(methods)
        finally:
            plt.close(fig)


# ---------------------------------------------------------------- failures leave no hook behind
def _nt_invariance_bad_n_samples(setup, x, scale):
    NoiseTunnel(_invariance(setup)).attribute(x, nt_samples=2, stdevs=0.05, n_samples=1)


def _nt_invariance_layer_fails(setup, x, scale):
    setup[0].gate.error = RuntimeError("a layer failed")
    NoiseTunnel(_invariance(setup)).attribute((x, scale), nt_samples=2, stdevs=0.05, n_samples=2)


def _nt_invariance_interrupted(setup, x, scale):
    setup[0].gate.error = KeyboardInterrupt()
    NoiseTunnel(_invariance(setup)).attribute(x, nt_samples=2, stdevs=0.05, n_samples=2)


def _nt_invariance_bad_nt_type(setup, x, scale):
    NoiseTunnel(_invariance(setup)).attribute(x, nt_type="smoothgrad_cubed", nt_samples=2, stdevs=0.05)


def _nt_concepts_bad_target(setup, x, scale):
    NoiseTunnel(_concepts(setup)).attribute(x, nt_samples=2, stdevs=0.05, target=99, n_steps=4)


def _nt_concepts_bad_baselines(setup, x, scale):
    NoiseTunnel(_concepts(setup)).attribute(x, nt_samples=2, stdevs=0.05, target=0, baselines=torch.zeros(1, 5))


def _nt_layer_concepts_bad_target(setup, x, scale):
    NoiseTunnel(_concepts(setup, layer=True)).attribute(x, nt_samples=2, stdevs=0.05, target=99, n_steps=4)


def _nt_layer_concepts_layer_fails(setup, x, scale):
    concepts = _concepts(setup, layer=True)
    factors = concepts.factors(x)
    setup[0].gate.error = RuntimeError("a layer failed")
    concepts.output_from_factors(x, factors)  # the model fails while the layer's activation is replaced


def _sensitivity_invariance_bad_n_samples(setup, x, scale):
    sensitivity_max(_invariance(setup).attribute, x, n_perturb_samples=2, n_samples=0)


def _sensitivity_invariance_layer_fails(setup, x, scale):
    setup[0].gate.error = RuntimeError("a layer failed")
    sensitivity_max(_invariance(setup).attribute, x, n_perturb_samples=2, n_samples=2)


def _sensitivity_concepts_bad_target(setup, x, scale):
    sensitivity_max(_as_tuple(_concepts(setup).attribute), x, n_perturb_samples=2, target=99, n_steps=4)


def _infidelity_layer_concepts_layer_fails(setup, x, scale):
    concepts = _concepts(setup, layer=True)
    factors = concepts.factors(x)

    def forward(f, images):
        setup[0].gate.error = RuntimeError("a layer failed")
        return concepts.output_from_factors(images, f)

    infidelity(forward, lambda f: (0.01 * torch.ones_like(f), 0.99 * f), factors, torch.zeros_like(factors),
               target=0, additional_forward_args=(x,), n_perturb_samples=2)


FAILURES = {
    "NoiseTunnel(LayerInvariance) n_samples=1": (_nt_invariance_bad_n_samples, ValueError, ">= 2 for a spread"),
    "NoiseTunnel(LayerInvariance) layer raises, tuple input": (_nt_invariance_layer_fails, RuntimeError, "a layer failed"),
    "NoiseTunnel(LayerInvariance) KeyboardInterrupt": (_nt_invariance_interrupted, KeyboardInterrupt, None),
    "NoiseTunnel(LayerInvariance) bad nt_type": (_nt_invariance_bad_nt_type, AssertionError, "smoothgrad_cubed"),
    "NoiseTunnel(LayerConcepts) target 99": (_nt_concepts_bad_target, ValueError, "out of range"),
    "NoiseTunnel(LayerConcepts) baselines of another size": (_nt_concepts_bad_baselines, ValueError, "`baselines` must have shape"),
    "NoiseTunnel(LayerConcepts on a layer) target 99": (_nt_layer_concepts_bad_target, ValueError, "out of range"),
    "LayerConcepts.output_from_factors on a layer, layer raises": (_nt_layer_concepts_layer_fails, RuntimeError, "a layer failed"),
    "sensitivity_max(LayerInvariance) n_samples=0": (_sensitivity_invariance_bad_n_samples, ValueError, "n_samples"),
    "sensitivity_max(LayerInvariance) layer raises": (_sensitivity_invariance_layer_fails, RuntimeError, "a layer failed"),
    "sensitivity_max(LayerConcepts) target 99": (_sensitivity_concepts_bad_target, ValueError, "out of range"),
    "infidelity(LayerConcepts on a layer) layer raises": (_infidelity_layer_concepts_layer_fails, RuntimeError, "a layer failed"),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", list(FAILURES), ids=list(FAILURES))
def test_a_failing_call_leaves_no_hook_and_the_mode_unchanged(setup, x, scale, case, mode):
    call, error, match = FAILURES[case]
    with left_as_it_was(setup[0], mode, warns=None):
        with pytest.raises(error, match=match):
            call(setup, x, scale)
    # and the explainers still work afterwards
    assert _invariance(setup).attribute(x[:2], n_samples=2).shape == (2, 3, 32, 32)
    assert_no_hooks(setup[0])
