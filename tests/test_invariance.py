"""LayerInvariance: Captum's conventions (DESIGN.md §3), the maths of its methods, bad input, hooks."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from helpers_hooks import Replicating, assert_no_hooks, training_flags
from helpers_progress import record_bars
from torch import nn

from captum_inn import LayerInvariance
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.capture import capture
from captum_inn.inn import AffineCoupling, ConditionalINN
from captum_inn.models import SmallCNN

torch.set_num_threads(1)


def _inn(cond_shape, dim=6, seed=0):
    torch.manual_seed(seed)
    inn = ConditionalINN(dim, cond_shape, n_blocks=2, hidden=16, embed_dim=8, conv_width=8, conv_max_width=16)
    for m in inn.modules():  # a non-trivial flow (fresh couplings are the identity)
        if isinstance(m, AffineCoupling):
            m.subnet[-1].reset_parameters()
    inn(torch.randn(16, dim), torch.randn(16, *cond_shape))  # ActNorm initialisation
    return inn.eval()


class LinearAutoencoder(nn.Module):
    """A deterministic linear autoencoder: every change of the code shows in the image."""

    latent_dim = 6

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(3 * 32 * 32, 6), nn.Linear(6, 3 * 32 * 32)

    def encode(self, x):
        return self.enc(x.flatten(1))

    def decode(self, code):
        return self.dec(code).view(-1, 3, 32, 32)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    ae = LinearAutoencoder().eval()
    inn_logits, inn_map = _inn((10,)), _inn((8, 8, 8))
    # standardise the conditions as fit_invariances does, so that the condition matters
    images = torch.rand(32, 3, 32, 32)
    inn_logits.embedder.set_input_statistics(capture(model, "logits", images))
    inn_map.embedder.set_input_statistics(capture(model, "relu3", images))
    return model, ae, inn_logits, inn_map


@pytest.fixture
def x():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_attribute_is_input_shaped_and_reproducible(setup, x):
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    a = explainer.attribute(x, n_samples=6, generator=torch.Generator().manual_seed(0))
    b = explainer.attribute(x, n_samples=6, generator=torch.Generator().manual_seed(0))
    c = explainer.attribute(x, n_samples=6, generator=torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and a.sum() > 0
    assert explainer.has_convergence_delta() is False and explainer.multiplies_by_inputs is False


def test_attribute_checks_its_inputs_once(setup, x, monkeypatch):
    """attribute scans the inputs for NaN once: it passed its checked inputs to the public sample,
    which scanned them again (on a GPU each scan waits for the device). The map is sample's."""
    scanned = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: scanned.append(tuple(t.shape)) or isfinite(t))
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    inv_map = explainer.attribute(x, n_samples=4, seed=1)
    assert scanned.count(tuple(x.shape)) == 1  # (the activations and the samples are checked too: other shapes)
    assert tuple(x.shape) in scanned and len(scanned) >= 2
    samples = explainer.sample(x, n_samples=4, seed=1, shared_noise=True)
    assert torch.equal(inv_map, samples.std(dim=1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        explainer.attribute(torch.where(x > 0.5, x, torch.nan), n_samples=4)


def test_internal_batch_size_equals_the_unbatched_run(setup, x):
    model, ae, _, inn_map = setup
    explainer = LayerInvariance(model, "relu3", inn_map, ae)
    full = explainer.attribute(x, n_samples=5, generator=torch.Generator().manual_seed(3))
    for size in (1, 4, 7, 100):
        part = explainer.attribute(x, n_samples=5, internal_batch_size=size, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(part, full, atol=1e-5), size
    # sample() promises the same, with fresh draws per input too
    samples = explainer.sample(x, n_samples=5, generator=torch.Generator().manual_seed(3))
    for size in (1, 4, 7, 100):
        part = explainer.sample(x, n_samples=5, internal_batch_size=size, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(part, samples, atol=1e-5), size


def test_progress_bars_count_every_sample(setup, x, monkeypatch):
    """``show_progress=True`` shows a bar over the samples that ends at its total, over parts too;
    off by default, as Captum's ``show_progress``."""
    import captum_inn.attr.invariance as module

    bars = record_bars(monkeypatch, module)
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    explainer.attribute(x, n_samples=4, internal_batch_size=8, show_progress=True)
    explainer.sample(x, n_samples=5, show_progress=True)
    assert bars == [("invariance samples", 12, 12, False), ("invariance samples", 15, 15, False)]
    explainer.attribute(x, n_samples=4)
    assert bars[2][3] is True


def test_the_map_is_the_spread_of_the_samples(setup, x):
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    samples = explainer.sample(x, n_samples=7, temperature=0.8, generator=torch.Generator().manual_seed(2),
                               shared_noise=True)
    assert samples.shape == (3, 7, 3, 32, 32)
    attr = explainer.attribute(x, n_samples=7, temperature=0.8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(attr, samples.std(dim=1), atol=1e-6)
    cold = explainer.attribute(x, n_samples=7, temperature=0.05, generator=torch.Generator().manual_seed(2))
    assert cold.mean() < attr.mean()  # lower temperature, less spread


def test_fresh_draws_follow_the_temperature_too(setup, x):
    """sample()'s fresh draws per input (its default) once ignored `temperature`; only the shared
    draws of attribute() were checked."""
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    warm, cold = (explainer.sample(x, n_samples=7, temperature=t, seed=2) for t in (1.0, 0.05))
    assert cold.std(dim=1).mean() < 0.2 * warm.std(dim=1).mean()


def test_sample_takes_a_seed_as_attribute_does(setup, x):
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    seeded = explainer.sample(x, n_samples=3, seed=5)
    assert torch.equal(seeded, explainer.sample(x, n_samples=3, seed=5))
    assert torch.equal(seeded, explainer.sample(x, n_samples=3, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="Give at most one of `generator` and `seed`"):
        explainer.sample(x, n_samples=3, seed=5, generator=torch.Generator())
    with pytest.raises(TypeError, match="`seed` must be an int"):
        explainer.sample(x, n_samples=3, seed=0.5)


def test_float64_models_are_explained(setup, x):
    """A model converted with .double() keeps its fingerprint (values hash as float32) and is read
    by the float32 INN it was fitted for; an all-float64 setup works too."""
    import copy

    from captum_inn.training import weights_fingerprint

    model, ae, inn, _ = setup
    model64 = copy.deepcopy(model).double()
    assert weights_fingerprint(model64) == weights_fingerprint(model)
    plain = LayerInvariance(model, "logits", inn, ae).attribute(x, n_samples=4, seed=0)
    mixed = LayerInvariance(model64, "logits", inn, ae).attribute(x.double(), n_samples=4, seed=0)
    assert torch.allclose(mixed.float(), plain, atol=1e-4)
    inn64, ae64 = copy.deepcopy(inn).double(), copy.deepcopy(ae).double()
    # a float64 autoencoder with the float32 INN: codes cross to the INN's dtype and back to the decoder's
    bridged = LayerInvariance(model64, "logits", inn, ae64)
    assert torch.allclose(bridged.attribute(x.double(), n_samples=4, seed=0).float(), plain, atol=1e-4)
    assert bridged.transfer(x.double(), x.double().flip(0)).dtype == torch.float64
    inn64.fit_info = {"layer": "logits", "autoencoder_weights": weights_fingerprint(ae)}  # recorded in float32
    everything = LayerInvariance(model64, "logits", inn64, ae64).attribute(x.double(), n_samples=4, seed=0)
    # float64 draws of v differ from float32 ones of the same seed: the same kind of map, other numbers
    assert everything.dtype == torch.float64 and everything.shape == x.shape and torch.isfinite(everything).all()


def test_a_half_precision_copy_of_the_fitted_model_is_refused_with_the_fix(setup, x):
    """.half() rounds the weights, so the float32 fingerprint cannot match; the message said
    "retrained, or another seed?", which a converted copy is not."""
    import copy

    from captum_inn.training import weights_fingerprint

    model, ae, inn, _ = setup
    inn = copy.deepcopy(inn)
    inn.fit_info = {"layer": "logits", "model_weights": weights_fingerprint(model)}
    for convert in (nn.Module.half, nn.Module.bfloat16):
        with pytest.raises(ValueError, match=r"computes in torch\.(float16|bfloat16).*float32 one, or fit `inn`"):
            LayerInvariance(convert(copy.deepcopy(model)), "logits", inn, ae)
    with pytest.raises(ValueError, match="retrained, another seed, or another architecture"):  # a float32 model of other weights
        LayerInvariance(SmallCNN(width=4).eval(), "logits", inn, ae)


def test_a_fitted_layer_name_matches_a_wrapped_model_but_not_another_layer_of_the_same_name(setup, x):
    """The suffix rule ("fc" for "module.fc") is for wrappers: where the fitted name is a layer of the
    model itself, a layer with the same last part is another layer."""
    model, ae, _, _ = setup
    inn = _inn((10,))
    inn.fit_info = {"layer": "logits"}
    wrapped = nn.DataParallel(model)  # DataParallel-style "module." prefix
    assert LayerInvariance(wrapped, "module.logits", inn, ae).attribute(x, n_samples=2).shape == x.shape
    # its layer is read from the wrapped .module, never through the (replicating) wrapper's forward
    assert torch.allclose(LayerInvariance(Replicating(model), "module.logits", inn, ae).attribute(x, n_samples=2, seed=0),
                          LayerInvariance(model, "logits", inn, ae).attribute(x, n_samples=2, seed=0), atol=1e-6)
    LayerInvariance(nn.Sequential(model), "0.logits", inn, ae)
    unwrapped = _inn((10,))
    unwrapped.fit_info = {"layer": "module.logits"}  # fitted on the wrapper, used on the model
    LayerInvariance(model, "logits", unwrapped, ae)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Linear(10, 10)
            self.head = nn.Sequential()
            self.head.add_module("logits", nn.Linear(10, 10))

        def forward(self, v):
            return self.head(self.logits(v))

    with pytest.raises(ValueError, match="`inn` was fitted on layer 'logits', not 'head.logits'"):
        LayerInvariance(TwoHeads(), "head.logits", inn, ae)
    two = TwoHeads()  # the bound forward reaches the model: the same names and checks (skipped before)
    with pytest.raises(ValueError, match="`inn` was fitted on layer 'logits', not 'head.logits'"):
        LayerInvariance(two.forward, two.head.logits, inn, ae)
    assert LayerInvariance(two.forward, "logits", inn, ae).layer_name == "logits"
    aliased = TwoHeads()
    aliased.alias = aliased.logits  # one module under two names: the same layer
    LayerInvariance(aliased, "alias", inn, ae)


def test_every_method_explains_a_float64_model_with_a_float32_autoencoder(setup, x):
    """The networks fitted for a model, kept in float32 while the model is converted with .double():
    images go to the encoder in its dtype (invariances and transfer used to fail), and every image
    or map comes back in the dtype of the images given."""
    import copy

    model, ae, inn, _ = setup
    plain, mixed = LayerInvariance(model, "logits", inn, ae), LayerInvariance(copy.deepcopy(model).double(), "logits", inn, ae)
    calls = {
        "attribute": lambda ex, inp: ex.attribute(inp, n_samples=3, seed=0),
        "sample": lambda ex, inp: ex.sample(inp, n_samples=2, generator=torch.Generator().manual_seed(0)),
        "reconstruct": lambda ex, inp: ex.reconstruct(inp),
        "transfer": lambda ex, inp: ex.transfer(inp, inp.flip(0)),
        "invariances": lambda ex, inp: ex.invariances(inp),  # v lives in the INN's space
    }
    for name, call in calls.items():
        want, got = call(plain, x), call(mixed, x.double())
        assert got.dtype == (inn.dtype if name == "invariances" else torch.float64), name
        assert torch.allclose(got.float(), want, atol=1e-4), name


def test_a_float64_model_with_an_autoencoder_whose_weights_are_buffers(setup, x):
    """An autoencoder without parameters (a fixed basis in buffers, as a PCA autoencoder keeps it)
    still takes images in its own dtype: a float64 model's images failed inside it."""
    import copy

    model, ae, inn, _ = setup

    class BufferAutoencoder(nn.Module):
        latent_dim = 6

        def __init__(self):
            super().__init__()
            for name, lin in (("enc", ae.enc), ("dec", ae.dec)):
                self.register_buffer(name + "_w", lin.weight.detach().clone())
                self.register_buffer(name + "_b", lin.bias.detach().clone())

        def encode(self, images):
            return nn.functional.linear(images.flatten(1), self.enc_w, self.enc_b)

        def decode(self, code):
            return nn.functional.linear(code, self.dec_w, self.dec_b).view(-1, 3, 32, 32)

    plain = LayerInvariance(model, "logits", inn, ae)
    mixed = LayerInvariance(copy.deepcopy(model).double(), "logits", inn, BufferAutoencoder().eval())
    for name in ("reconstruct", "invariances"):  # the two that encode the images
        want, got = getattr(plain, name)(x), getattr(mixed, name)(x.double())
        assert got.dtype == (inn.dtype if name == "invariances" else torch.float64), name
        assert torch.allclose(got.float(), want, atol=1e-4), name


def test_an_inputs_map_does_not_depend_on_the_rest_of_the_batch(setup, x):
    """Common random numbers: the same image gets the same map wherever it stands in a batch, and
    with `seed` in every call; without them the sampling noise would swamp what perturbation-based
    tools (sensitivity_max, FeatureAblation) measure."""
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    batch = torch.cat([x[:1], x[1:], x[:1]])  # x[0] first and last
    maps = explainer.attribute(batch, n_samples=6, seed=4)
    assert torch.allclose(maps[0], maps[-1], atol=1e-6)
    alone = explainer.attribute(x[:1], n_samples=6, seed=4)
    assert torch.allclose(alone[0], maps[0], atol=1e-6)
    assert torch.equal(explainer.attribute(x, n_samples=6, seed=4), explainer.attribute(x, n_samples=6, seed=4))
    assert not torch.equal(maps[0], explainer.attribute(x[:1], n_samples=6, seed=5)[0])
    from captum.metrics import sensitivity_max

    tiny = sensitivity_max(explainer.attribute, x, perturb_radius=1e-7, n_perturb_samples=3, n_samples=6, seed=0)
    assert float(tiny.max()) < 1e-3  # a tiny perturbation barely moves the map
    x_samples = explainer.sample(batch, n_samples=4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(x_samples[0], x_samples[-1])  # sample() draws per input unless asked
    with pytest.raises(ValueError, match="at most one of `generator` and `seed`"):
        explainer.attribute(x, seed=0, generator=torch.Generator())


def test_invariances_reconstruct_and_transfer_are_consistent(setup, x):
    model, ae, _, inn = setup
    explainer = LayerInvariance(model, model.relu3, inn, ae)
    v = explainer.invariances(x)
    assert v.shape == (3, 6)
    with torch.no_grad():
        code = ae.encode(x)
        z = model.relu3(model.conv3(model.relu2(model.conv2(model.relu1(model.conv1(x))))))
        assert torch.allclose(inn(v, z, rev=True)[0], code, atol=1e-5)
        recon = ae.decode(code)
    assert torch.allclose(explainer.reconstruct(x), recon, atol=1e-6)
    # transferring to oneself keeps the image; to a donor, it changes
    assert torch.allclose(explainer.transfer(x, x), recon, atol=1e-4)
    assert (explainer.transfer(x, x.flip(0)) - recon).abs().max() > 1e-3
    # D(t⁻¹(v_x | Φ(donor))): the inputs' invariances under the donors' layer view, not the other way round
    with torch.no_grad():
        expected = ae.decode(inn(v, z.flip(0), rev=True)[0])
    assert torch.allclose(explainer.transfer(x, x.flip(0)), expected, atol=1e-5)


def test_an_autoencoder_in_training_mode_encodes_and_decodes_on_its_running_statistics(setup, x):
    """Every method runs the autoencoder in eval mode, whatever its flag (a ConvAutoencoder has batch
    norm): in training mode each decoded pass was normalised with its own batch's statistics (a sample
    depended on the others decoded with it) and updated the running statistics, which changed every
    later explanation. Its flags and buffers come back as they were."""
    import copy

    model, _, inn, _ = setup
    torch.manual_seed(0)
    ae = ConvAutoencoder((3, 32, 32), latent_dim=6, width=4)
    with torch.no_grad():  # running statistics unlike any batch's own
        for m in ae.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    reference = LayerInvariance(model, "logits", inn, copy.deepcopy(ae).eval())
    explainer = LayerInvariance(model, "logits", inn, ae.train())
    calls = {
        "attribute": lambda ex: ex.attribute(x, n_samples=3, seed=0),
        "sample": lambda ex: ex.sample(x, n_samples=2, seed=1),
        "reconstruct": lambda ex: ex.reconstruct(x),
        "transfer": lambda ex: ex.transfer(x, x.flip(0)),
        "invariances": lambda ex: ex.invariances(x),
    }
    flags, state = training_flags(ae), {k: v.clone() for k, v in ae.state_dict().items()}
    for name, call in calls.items():
        assert torch.allclose(call(explainer), call(reference), atol=1e-5), name
    assert training_flags(ae) == flags and all(flags.values())
    for key, value in ae.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_images_given_second_are_encoded_and_explained_where_they_are(setup, x):
    """With image_input=1 every method encodes inputs[1] and attribute returns the map there (zeros
    at the other input): the same results as for the model that takes the images first."""
    model, ae, inn, _ = setup

    class ImagesSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, scale, image):
            return self.net(image * scale.view(-1, 1, 1, 1))

    first = LayerInvariance(model, "logits", inn, ae)
    second = LayerInvariance(ImagesSecond().eval(), "net.logits", inn, ae, image_input=1)
    scale = torch.ones(3)
    inputs, donors = (scale, x), (scale, x.flip(0))
    explained = second.attribute(inputs, n_samples=3, seed=0)
    assert isinstance(explained, tuple) and torch.equal(explained[0], torch.zeros_like(scale))
    assert torch.allclose(explained[1], first.attribute(x, n_samples=3, seed=0), atol=1e-6)
    assert torch.allclose(second.sample(inputs, n_samples=2, seed=1), first.sample(x, n_samples=2, seed=1), atol=1e-6)
    assert torch.allclose(second.invariances(inputs), first.invariances(x), atol=1e-6)
    assert torch.allclose(second.reconstruct(inputs), first.reconstruct(x), atol=1e-6)
    assert torch.allclose(second.transfer(inputs, donors), first.transfer(x, x.flip(0)), atol=1e-5)


def test_batch_of_one_and_tuple_inputs(setup, x):
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    assert explainer.attribute(x[:1], n_samples=3).shape == (1, 3, 32, 32)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, image, scale):
            return self.net(image * scale)

    two = TwoInputs().eval()
    explainer2 = LayerInvariance(two, "net.logits", inn, ae)
    scale = torch.ones(3, 1, 1, 1)
    out = explainer2.attribute((x, scale), n_samples=3)
    assert isinstance(out, tuple) and out[0].shape == x.shape and torch.equal(out[1], torch.zeros_like(scale))


def test_additional_forward_args_and_plain_functions(setup, x):
    model, ae, inn, _ = setup

    class WithArg(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, image, shift):
            return self.net(image + shift)

    wrapped = WithArg().eval()
    explainer = LayerInvariance(wrapped, "net.logits", inn, ae)
    g = torch.Generator
    a = explainer.attribute(x, additional_forward_args=(0.0,), n_samples=3, generator=g().manual_seed(0))
    b = LayerInvariance(model, "logits", inn, ae).attribute(x, n_samples=3, generator=g().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-6)
    # per-example tensor arguments are sliced with internal batching
    shift = torch.zeros(3, 1, 1, 1)
    c = explainer.attribute(x, additional_forward_args=(shift,), n_samples=3, internal_batch_size=3,
                            generator=g().manual_seed(0))
    assert torch.allclose(c, b, atol=1e-5)
    # a per-image tensor of another length went whole to the model: named, not only torch's shape error
    with pytest.raises(RuntimeError, match=r"tensor 0 of shape \(5, 3, 1, 1\) went whole to the model, since its 5 "
                                           r"rows are not one per image of `inputs` \(3 image\(s\)\)"):
        explainer.attribute(x, additional_forward_args=(torch.zeros(5, 3, 1, 1),), n_samples=3)
    # an argument too many: the note says how the model was called
    with pytest.raises(TypeError, match="takes 3 positional arguments but 4 were given") as caught:
        LayerInvariance(wrapped, "net.logits", inn, ae).attribute(x, additional_forward_args=(x, 0), n_samples=3)
    assert caught.value.__notes__ == [f"captum_inn called the model as model(tensor{tuple(x.shape)}, "
                                      f"tensor{tuple(x.shape)}, int): the inputs first, then additional_forward_args, "
                                      "as Captum does. For a model that takes its images elsewhere, give the fits "
                                      "`image_input=` (the images' position among the model's arguments) and the "
                                      "explainers a tuple of inputs with the images at their `image_input`."]
    # a plain function needs the layer module
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model is in eval mode: nothing to warn about
        fn_explainer = LayerInvariance(lambda inp: model(inp), model.logits, inn, ae)
    assert torch.allclose(fn_explainer.attribute(x, n_samples=3, generator=g().manual_seed(0)), b, atol=1e-6)
    with pytest.raises(TypeError, match="needs `forward_func` to be an nn.Module"):
        LayerInvariance(lambda inp: model(inp), "logits", inn, ae)


def test_a_wrapper_around_the_fitted_model_passes_the_weights_check(setup, x):
    """A wrapper with a parameter of its own (a temperature) around the model the INN was fitted
    with: its bound forward (or predict) reached the weights check, which hashed the wrapper and said
    the model was another one (it was taken before explainers on bound methods ran the check)."""
    from captum_inn.training import weights_fingerprint

    model, ae, _, _ = setup
    inn = _inn((10,))
    inn.fit_info = {"layer": "logits", "model_weights": weights_fingerprint(model)}

    class Calibrated(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model, self.temperature = inner, nn.Parameter(torch.ones(()))

        def forward(self, images):
            return self.model(images) / self.temperature

        def predict(self, images):
            return self.forward(images).softmax(1)

    wrapper = Calibrated(model)
    expected = LayerInvariance(model, "logits", inn, ae).attribute(x, n_samples=2, seed=0)
    for forward_func in (wrapper, wrapper.forward, wrapper.predict):
        explainer = LayerInvariance(forward_func, model.logits, inn, ae)
        assert explainer.layer_name == "model.logits"
        assert torch.allclose(explainer.attribute(x, n_samples=2, seed=0), expected, atol=1e-6)
    retrained = Calibrated(SmallCNN(width=4).eval())  # still refused: the model inside has other weights
    with pytest.raises(ValueError, match="`inn` was fitted with another `forward_func`"):
        LayerInvariance(retrained.forward, retrained.model.logits, inn, ae)


def test_a_bound_forward_runs_the_model_in_eval_mode_and_a_plain_function_warns(x):
    """model.forward reaches the model: batch norm on its running statistics (left as they were),
    dropout off, as with the model itself. Behind a lambda only the hooked layer can be switched,
    which building the explainer says."""
    model = nn.Sequential(nn.Conv2d(3, 4, 4, 4), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(256, 10))
    with torch.no_grad():  # running statistics unlike any batch's, so the two modes differ
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(4.0)
    ae, inn = LinearAutoencoder().eval(), _inn((10,))
    expected = LayerInvariance(model.eval(), model[5], inn, ae).attribute(x, n_samples=3, seed=0)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        bound = LayerInvariance(model.forward, model[5], inn, ae)
        got = bound.attribute(x, n_samples=3, seed=0)
        assert torch.allclose(bound.invariances(x), LayerInvariance(model, "5", inn, ae).invariances(x), atol=1e-6)
    assert torch.allclose(got, expected, atol=1e-6)
    assert all(m.training for m in model.modules())  # flags left as they were
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics too
    with pytest.warns(UserWarning, match=r"LayerInvariance cannot switch the model to eval mode.*model.eval\(\)"):
        LayerInvariance(lambda images: model(images), model[5], inn, ae)
    model.eval()


def test_a_bound_forward_hooks_the_whole_model_as_the_model_does(setup, x):
    """Layer "" names the model itself; through model.forward the model's own hook never fired
    (forward skips __call__), and the explainer said the layer "did not run"."""
    model, ae, inn, _ = setup
    expected = LayerInvariance(model, "", inn, ae).invariances(x)
    assert torch.equal(LayerInvariance(model.forward, "", inn, ae).invariances(x), expected)
    assert_no_hooks(model)


def test_an_autoencoder_with_any_config_attribute_is_accepted(setup, x):
    """``config`` is a common attribute name: an autoencoder holding a dataclass there failed every
    call with "'Cfg' object has no attribute 'get'" (the pixel-range check read it as a dict)."""
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        width: int = 4

    model, ae, inn, _ = setup

    class Configured(LinearAutoencoder):
        def __init__(self, config):
            super().__init__()
            self.load_state_dict(ae.state_dict())
            self.config = config

    expected = LayerInvariance(model, "logits", inn, ae).invariances(x)
    for config in (Cfg(), None, "v2"):
        assert torch.equal(LayerInvariance(model, "logits", inn, Configured(config).eval()).invariances(x), expected)
    sigmoid = Configured(Cfg())
    sigmoid.config.output = "sigmoid"  # an attribute says so as a dict key does: pixels must lie in [0, 1]
    with pytest.warns(UserWarning, match=r"`inputs` pixels range over \[.*, 255\], but the autoencoder decodes"):
        LayerInvariance(model, "logits", inn, sigmoid).invariances(x * 255)


@pytest.mark.parametrize("target", [None, 3, [1, 2, 3], torch.tensor([0, 1, 2]), (0,), (np.int64(0),), [(0,), (1,), (2,)]])
def test_every_target_form_is_accepted(setup, x, target):
    model, ae, inn, _ = setup
    out = LayerInvariance(model, "logits", inn, ae).attribute(x, target=target, n_samples=2)
    assert out.shape == x.shape


@pytest.mark.parametrize("target", [[1, 2], torch.tensor([0, 1])])
def test_a_target_count_other_than_the_inputs_is_refused(setup, x, target):
    model, ae, inn, _ = setup
    with pytest.raises(ValueError, match="`target` holds 2 entries for 3 inputs"):
        LayerInvariance(model, "logits", inn, ae).attribute(x, target=target, n_samples=2)


def test_composes_with_noise_tunnel_and_visualisation(setup, x):
    from captum.attr import NoiseTunnel
    from captum.attr import visualization as viz

    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    with torch.no_grad():  # NoiseTunnel and sensitivity_max call attribute under no_grad
        smooth = NoiseTunnel(explainer).attribute(x, nt_type="smoothgrad", nt_samples=2, stdevs=0.05, n_samples=3)
    assert smooth.shape == x.shape
    attr = explainer.attribute(x, n_samples=3)
    fig, _ = viz.visualize_image_attr(attr[0].permute(1, 2, 0).numpy(), x[0].permute(1, 2, 0).numpy(),
                                      method="blended_heat_map", sign="absolute_value", use_pyplot=False)
    assert fig is not None


def test_user_tensors_and_model_state_are_left_alone(setup, x):
    model, ae, inn, _ = setup
    model.train()
    ae.train()
    flags, ae_flags = training_flags(model), training_flags(ae)
    x = x.clone().requires_grad_(True)
    try:
        LayerInvariance(model, "logits", inn, ae).attribute(x, n_samples=2)
        assert x.requires_grad and x.grad is None
        assert training_flags(model) == flags and training_flags(ae) == ae_flags
    finally:
        model.eval()
        ae.eval()
    assert_no_hooks(model)


# ------------------------------------------------------------------ bad input
def test_bad_input_is_named(setup, x):
    model, ae, inn, inn_map = setup
    explainer = LayerInvariance(model, "logits", inn, ae)
    with pytest.raises(ValueError, match="did you mean"):
        LayerInvariance(model, "logit", inn, ae)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        explainer.attribute(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="floating point"):
        explainer.attribute((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        explainer.attribute(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="empty batch"):
        explainer.attribute(x[:0])
    with pytest.raises(TypeError, match="must be a tensor"):
        explainer.attribute([[1.0]])
    for n in (0, -3):
        with pytest.raises(ValueError, match="`n_samples` must be >= 1"):
            explainer.sample(x, n_samples=n)
    with pytest.raises(ValueError, match="`n_samples` must be >= 2"):
        explainer.attribute(x, n_samples=1)
    with pytest.raises(TypeError, match="`n_samples` must be an int"):
        explainer.attribute(x, n_samples=2.5)
    for t in (0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            explainer.attribute(x, temperature=t)
    with pytest.raises(ValueError, match="`internal_batch_size` must be >= 1"):
        explainer.attribute(x, internal_batch_size=0)
    for call in (explainer.sample, explainer.attribute):  # checked before any arithmetic on it
        with pytest.raises(TypeError, match=r"`internal_batch_size` must be an int, got '8' \(str\)"):
            call(x, n_samples=2, internal_batch_size="8")
    with pytest.raises(ValueError, match="fitted for layer .*Fit an INN for this layer"):
        LayerInvariance(model, "relu3", inn, ae).attribute(x)
    with pytest.raises(ValueError, match="latent_dim=8"):
        LayerInvariance(model, "logits", inn, ConvAutoencoder((3, 32, 32), latent_dim=8, width=4))
    with pytest.raises(TypeError, match="lacks encode"):
        LayerInvariance(model, "logits", inn, nn.Identity())
    with pytest.raises(TypeError, match="ConditionalINN"):
        LayerInvariance(model, "logits", nn.Linear(6, 6), ae)
    with pytest.raises(ValueError, match="one image per input"):
        explainer.transfer(x, x[:2])
    with pytest.raises(TypeError, match="generator"):
        explainer.attribute(x, generator=0)
    assert_no_hooks(model)


@pytest.mark.parametrize("bad, error", [("1", TypeError), (True, TypeError), (1.0, TypeError), (-1, ValueError)])
def test_image_input_is_checked_when_built_and_named_at_call_time(setup, x, bad, error):
    model, ae, inn, _ = setup
    with pytest.raises(error, match="`image_input`"):
        LayerInvariance(model, "logits", inn, ae, image_input=bad)
    explainer = LayerInvariance(model, "logits", inn, ae, image_input=1)  # an int: its range depends on the call
    for call in (lambda: explainer.attribute(x, n_samples=2), lambda: explainer.invariances(x)):
        with pytest.raises(ValueError, match=r"`image_input`=1 is out of range for 1 input tensors.*\(0 to 0\)"):
            call()


class _Boom(Exception):
    pass


@pytest.mark.parametrize("error", [RuntimeError("layer failed"), KeyboardInterrupt()])
def test_no_hook_survives_a_layer_that_raises(setup, x, error):
    model, ae, _, inn_map = setup
    model.train()
    flags = training_flags(model)

    def explode(module, args):
        raise error

    handle = model.conv2.register_forward_pre_hook(explode)
    try:
        with pytest.raises(type(error), match="layer failed" if str(error) else None):
            LayerInvariance(model, "relu3", inn_map, ae).attribute(x, n_samples=2)
    finally:
        handle.remove()
        model_flags = training_flags(model)
        model.eval()
    assert model_flags == flags
    assert_no_hooks(model)


def test_an_inn_that_never_saw_data_is_refused_when_built(setup, x):
    """A fresh INN's ActNorms would initialise from the batch being explained and every result
    would mean nothing: the explainer refuses it, naming the argument and the fix."""
    model, ae, _, _ = setup
    fresh = ConditionalINN(6, (10,), n_blocks=2, hidden=16, embed_dim=8)
    with pytest.raises(ValueError, match=r"`inn` is not fitted.*Fit it with fit_invariances, or load its checkpoint"):
        LayerInvariance(model, "logits", fresh, ae)
    assert not fresh.is_fitted  # refusing it did not initialise it
    with torch.no_grad():
        fresh(torch.randn(16, 6), torch.randn(16, 10))  # what fit_invariances' initialisation does
    assert LayerInvariance(model, "logits", fresh.eval(), ae).attribute(x, n_samples=2).shape == x.shape
