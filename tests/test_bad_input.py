"""The bad-input battery: every public entry point rejects bad input with a clear exception (or a
documented warning) that names the argument; and hooks never outlive a call — normal, failing, or
interrupted with KeyboardInterrupt."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers_hooks import Gate, assert_no_hooks, training_flags
from helpers_training import LabelFirst, Unread
from torch import nn

from captum_inn import LayerConcepts, LayerInvariance
from captum_inn.analysis import adversarial_views
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.capture import capture
from captum_inn.compare import last_spatial_layer
from captum_inn.concepts import ConceptPairs
from captum_inn.datasets import ColorDigits
from captum_inn.inn import ActNorm, AffineCoupling, ConditionalINN, FactorINN
from captum_inn.metrics import estimate_colours, prediction_agreement, reencode_similarity
from captum_inn.models import SmallCNN
from captum_inn.training import (
    InvarianceConfig,
    Jitter,
    LayerRepresentation,
    cache_features,
    estimate_factor_sizes,
    fit_autoencoder,
    fit_concepts,
    fit_invariances,
    load_concept_inn,
    load_invariance_inn,
    save_concept_inn,
    save_invariance_inn,
    weights_fingerprint,
)
from captum_inn.training.checkpoint import CheckpointError
from captum_inn.training.classifier import fit_classifier
from captum_inn.training.disk import iter_rows
from captum_inn.training.dynamics import Snapshots, concept_dynamics

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.cnn = SmallCNN(width=4)
        self.never = nn.Linear(2, 2)  # registered, never called

    def forward(self, x):
        return self.cnn(self.gate(x))


def _fitted_inn(dim, cond_shape):
    inn = ConditionalINN(dim, cond_shape, n_blocks=2, hidden=16, embed_dim=4, conv_width=4, conv_max_width=8)
    with torch.no_grad():
        inn(torch.randn(16, dim), torch.randn(16, *cond_shape))
    return inn.eval()


def _named(inn, layer):
    inn.fit_info = {"layer": layer}
    return inn


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    ae = ConvAutoencoder((3, 32, 32), latent_dim=6, width=4).eval()
    inn = _fitted_inn(6, (10,))
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    with torch.no_grad():
        e(torch.randn(16, 6))
    return model, ae, inn, e.eval()


X = torch.rand(3, 3, 32, 32)


def _cases():
    """(id, call(model, ae, inn, e), exception, message pattern)."""
    inv = lambda m, ae, inn: LayerInvariance(m, "cnn.logits", inn, ae)  # noqa: E731
    con = lambda m, ae, e: LayerConcepts(m, "cnn.logits", e, ae)  # noqa: E731
    return [
        ("inputs a list of ints", lambda m, ae, inn, e: inv(m, ae, inn).attribute([1, 2]), TypeError, "`inputs` must be a tensor"),
        ("inputs a NumPy array", lambda m, ae, inn, e: inv(m, ae, inn).sample(X.numpy()), TypeError, r"got ndarray; convert it with torch\.from_numpy"),
        ("inputs 3-d", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X[0]), ValueError, r"\(N, C, H, W\)"),
        ("inputs integer dtype", lambda m, ae, inn, e: inv(m, ae, inn).sample((X * 255).long()), TypeError, "floating point"),
        ("inputs empty batch", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X[:0]), ValueError, "empty batch"),
        ("inputs NaN", lambda m, ae, inn, e: inv(m, ae, inn).sample(X * float("nan")), ValueError, "NaN"),
        ("inputs infinite", lambda m, ae, inn, e: inv(m, ae, inn).invariances(X / 0), ValueError, "NaN or infinite"),
        ("inputs on another device", lambda m, ae, inn, e: inv(m, ae, inn).sample(X.to("meta")), ValueError, "is on meta"),
        ("tuple inputs with two batch sizes", lambda m, ae, inn, e: inv(m, ae, inn).attribute((X, X[:2])), ValueError, rf"same batch size in dim 0 \(one row per example\): `inputs`\[0\] has {len(X)}, `inputs`\[1\] has 2\."),
        ("a 0-d tensor in tuple inputs", lambda m, ae, inn, e: inv(m, ae, inn).attribute((X, torch.tensor(2.0))), ValueError, r"`inputs`\[1\] is a 0-d tensor.*in `additional_forward_args`"),
        ("codes of one dimension", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", SimpleNamespace(encode=lambda x: x[:, :1, 0, 0], decode=lambda c: c, latent_dim=1), X, steps=1, progress=False), ValueError, r"`autoencoder` has latent_dim=1, but the INNs split a code into two halves"),
        ("an autoencoder of one code dimension", lambda m, ae, inn, e: fit_autoencoder(X, latent_dim=1, steps=1, progress=False), ValueError, r"`latent_dim` must be >= 2 \(the INNs split a code"),
        ("data beside a cache", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, cache=cache_features(m, "cnn.logits", ae, X, progress=False), steps=1, progress=False), ValueError, r"`data` and `cache` were both given"),
        ("a scan in blocks of no rows", lambda m, ae, inn, e: list(iter_rows(torch.ones(4, 2), chunk=-1)), ValueError, r"`chunk` must be an int >= 1"),
        ("re-encoding in batches of no images", lambda m, ae, inn, e: reencode_similarity(m, "cnn.logits", X, X[:, None], batch_size=0), ValueError, r"`batch_size` must be >= 1"),
        ("n_samples 0", lambda m, ae, inn, e: inv(m, ae, inn).sample(X, n_samples=0), ValueError, "`n_samples` must be >= 1"),
        ("temperature overflowing", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X, temperature=1e40), ValueError, r"samples hold NaN or infinite values \(temperature=1e\+40\)"),
        ("n_samples -3", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X, n_samples=-3), ValueError, "`n_samples`"),
        ("n_samples 1 for a map", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X, n_samples=1), ValueError, ">= 2 for a spread"),
        ("n_samples a float", lambda m, ae, inn, e: inv(m, ae, inn).sample(X, n_samples=2.5), TypeError, "`n_samples` must be an int"),
        ("temperature 0", lambda m, ae, inn, e: inv(m, ae, inn).sample(X, temperature=0), ValueError, "`temperature`"),
        ("temperature negative", lambda m, ae, inn, e: inv(m, ae, inn).sample(X, temperature=-1.0), ValueError, "`temperature`"),
        ("temperature infinite", lambda m, ae, inn, e: inv(m, ae, inn).sample(X, temperature=float("inf")), ValueError, "`temperature` must be finite"),
        ("internal_batch_size 0", lambda m, ae, inn, e: inv(m, ae, inn).sample(X, internal_batch_size=0), ValueError, "internal_batch_size"),
        ("generator not a Generator", lambda m, ae, inn, e: inv(m, ae, inn).sample(X, generator=0), TypeError, "`generator`"),
        ("unknown layer name", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logit", inn, ae), ValueError, "did you mean 'cnn.logits'"),
        ("layer never runs", lambda m, ae, inn, e: capture(m, "never", X), ValueError, "did not run"),
        ("INN for another layer", lambda m, ae, inn, e: LayerInvariance(m, "cnn.relu3", inn, ae).sample(X), ValueError, "Fit an INN for this layer"),
        ("INN fitted on the layer's input, read at its output", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", _named(_fitted_inn(6, (128,)), "cnn.logits"), ae).sample(X), ValueError, "fitted on the layer's input.*attribute_to_layer_input=True"),
        ("float64 images for a float32 model", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).attribute(X.double()), TypeError, r"`inputs` images are torch.float64 .*images.to\(torch.float32\)"),
        # (the autoencoder takes images in its own dtype: a float64 model may keep its float32 autoencoder)
        ("float64 images for a float32 model's invariances", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).invariances(X.double()), TypeError, r"`inputs` images are torch.float64"),
        ("float64 concept inputs for a float32 model", lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ae).attribute(X.double(), target=0), TypeError, r"`inputs` images are torch.float64 .*images.to\(torch.float32\)"),
        ("signals that are not images", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X[:, :, 0], steps=1, progress=False), ValueError, r"`data` images must have shape \(N, C, H, W\), got batches of shape \(\d+, 3, 32\)"),
        ("float64 images to cache", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X.double(), steps=1, progress=False), TypeError, r"`data` images are torch.float64 .*images.to\(torch.float32\)"),
        ("gray images for an RGB autoencoder", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).sample(X[:, :1]), ValueError, r"1 channel\(s\), the autoencoder 3: pass x.expand\(-1, 3, -1, -1\)"),
        ("channels-last images", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).sample(X.permute(0, 2, 3, 1)), ValueError, r"channels come last: pass x.permute\(0, 3, 1, 2\)"),
        ("a list of single images", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).attribute(list(X)), ValueError, r"got \(3, 32, 32\)\. A list is read as several model inputs.*torch.stack"),
        ("images of another size than the autoencoder's", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).attribute(torch.rand(2, 3, 64, 64)), ValueError, r"decodes images of shape \(3, 32, 32\).*interpolate"),
        ("INN fitted on another layer", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", _named(_fitted_inn(6, (10,)), "cnn.fc"), ae), ValueError, "fitted on layer 'cnn.fc', not 'cnn.logits'"),
        ("INN never fitted", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", ConditionalINN(6, (10,), n_blocks=1, hidden=8), ae), ValueError, r"`inn` is not fitted.*fit_invariances, or load its checkpoint"),
        ("concept INN never fitted", lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", FactorINN(6, {"a": 2}, n_blocks=1, hidden=8), ae), ValueError, r"`concept_inn` is not fitted.*fit_concepts, or load its checkpoint"),
        ("INN not an INN", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", e, ae), TypeError, "ConditionalINN"),
        ("autoencoder of another latent size", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ConvAutoencoder((3, 32, 32), 5)), ValueError, "latent_dim=5"),
        ("autoencoder without decode", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, object()), TypeError, "encode"),
        ("donors of another batch size", lambda m, ae, inn, e: inv(m, ae, inn).transfer(X, X[:2]), ValueError, "one image per input"),
        ("concept attributions without a target", lambda m, ae, inn, e: con(m, ae, e).attribute(X), ValueError, r"`target` is needed.*argmax\(1\)"),
        ("an image as concept baseline", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=1, baselines=torch.zeros_like(X)), ValueError, r"points in factor space.*baselines=concepts.factors\(image\)"),
        ("concept integration method unknown", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=1, method="trapezoid"), ValueError, r"`method` must be one of \[.*'riemann_trapezoid'.*got 'trapezoid'"),
        ("concept attributions of a model returning one number", lambda m, ae, inn, e: LayerConcepts(lambda x: m(x).sum(), m.cnn.logits, e, ae).attribute(X, target=None), TypeError, r"`forward_func` returns one number for the whole batch.*\(N,\) or \(N, K\)"),
        ("concept target out of range", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=99), ValueError, "out of range"),
        # a target of a form Captum takes that picks no single value per input: Captum's assertions said
        # "Target not provided" (of a given target) or named N × steps rows
        ("concept int target of an (N, 2, 5) output", lambda m, ae, inn, e: LayerConcepts(lambda x: m(x).view(-1, 2, 5), m.cnn.logits, e, ae).attribute(X, target=1, n_steps=4), ValueError, r"`target` 1 does not pick one value per input.*shape \(2, 5\) per input.*\(1, 3\)"),
        ("concept int target of an (N,) output", lambda m, ae, inn, e: LayerConcepts(lambda x: m(x)[:, 3], m.cnn.logits, e, ae).attribute(X, target=0, n_steps=4), ValueError, r"`target` 0 does not pick one value per input.*shape \(\) per input"),
        ("concept convergence delta with an int target of an (N,) output", lambda m, ae, inn, e: LayerConcepts(lambda x: m(x)[:, 3], m.cnn.logits, e, ae).compute_convergence_delta(torch.zeros(3, 3), None, X, target=0), ValueError, r"`target` 0 does not pick one value per input"),
        # targets outside Captum's forms: Captum failed bare asserts, or named floats "out of range"
        ("concept baseline in target's place", lambda m, ae, inn, e: con(m, ae, e).attribute(X, torch.zeros_like(X)), TypeError, r"looks like a batch of images: a baseline in target's place.*`baselines=`"),
        ("invariance baseline in target's place", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X, torch.zeros_like(X)), TypeError, r"a baseline in target's place .*LayerInvariance.attribute takes no baseline \(the invariance map needs none\); leave it out"),
        ("concept target of float labels in a column", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=torch.tensor([[1.0], [2.0], [0.0]])), TypeError, r"target.long\(\) \(target.flatten\(\).long\(\) for \(N, 1\) labels"),
        ("concept target of floats", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=torch.tensor([1.0, 2.0, 0.0])), TypeError, r"`target` holds class indices.*target.long\(\)"),
        ("concept target (N, 1)", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=torch.tensor([[1], [2], [0]])), ValueError, r"`target` has shape \(3, 1\).*target.flatten\(\)"),
        ("concept target a NumPy array", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=np.array([1, 2, 0])), TypeError, r"got ndarray.*torch.as_tensor\(target\)"),
        ("concept target a bool", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=True), TypeError, "`target` must be one of Captum's target forms, got bool"),
        ("concept target a list of tensors", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=list(torch.tensor([1, 2, 0]))), TypeError, r"torch.stack\(target\)"),
        ("concept target of 8-bit labels", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=torch.tensor([1, 2, 0], dtype=torch.uint8)), TypeError, r"`target` holds class indices as torch.uint8.*target.long\(\)"),
        ("concept target on another device", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=torch.tensor([1, 2, 0], device="meta")), ValueError, r"`target` is on meta but the inputs are on cpu; move it with target.to\('cpu'\)"),
        ("invariance target on another device", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X, target=torch.tensor([1, 2, 0], device="meta")), ValueError, r"`target` is on meta but the inputs are on cpu"),
        ("invariance target of floats", lambda m, ae, inn, e: inv(m, ae, inn).attribute(X, target=torch.tensor(1.0)), TypeError, "`target` holds class indices"),
        ("concept edit value of another shape", lambda m, ae, inn, e: con(m, ae, e).edit(X, "a", value=torch.zeros(2, 2)), ValueError, r"`value` for concept 'a' must be a floating-point tensor of shape \(3, 2\)"),
        ("concept edit from donors with a seed", lambda m, ae, inn, e: con(m, ae, e).edit(X, "a", donors=X, seed=0), ValueError, r"`seed` seeds a fresh draw of the factor, made only without `donors` and `value`; drop it, or drop `donors`"),
        ("concept edit to a value with a generator", lambda m, ae, inn, e: con(m, ae, e).edit(X, "a", value=torch.zeros(2), generator=torch.Generator()), ValueError, r"`generator` seeds a fresh draw.*or drop `value` to resample"),
        ("concept edit value NaN", lambda m, ae, inn, e: con(m, ae, e).edit(X, "a", value=torch.tensor([0.0, float("nan")])), ValueError, "`value` contains NaN"),
        ("concept shares of inputs on another device", lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ae, invariance_inn=inn).encoded(X.to("meta"), n_samples=2), ValueError, "is on meta"),
        ("unknown concept name", lambda m, ae, inn, e: con(m, ae, e).edit(X, "colour"), ValueError, "Unknown concept 'colour'"),
        ("misspelt concept name", lambda m, ae, inn, e: con(m, ae, e).edit(X, "residul"), ValueError, r"Unknown concept 'residul'; this concept INN has \['a', 'b', 'residual'\]\. Did you mean 'residual'\?"),
        ("concept given as a column number", lambda m, ae, inn, e: con(m, ae, e).edit(X, 0), ValueError, r"Unknown concept 0;.*column 0 of attribute\(\) is 'a'"),
        ("concept baselines of another size", lambda m, ae, inn, e: con(m, ae, e).attribute(X, target=0, baselines=torch.zeros(4)), ValueError, "`baselines`"),
        ("concept INN on another representation", lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ConvAutoencoder((3, 32, 32), 4)), ValueError, "latent_dim=4"),
        ("concept pool of one pair", lambda m, ae, inn, e: fit_concepts(ae, [ColorDigits("test").concept("digit")], steps=1, pool_size=1, progress=False), ValueError, "`pool_size` must give each process at least 2 pairs"),
        ("pairs with mismatched shapes", lambda m, ae, inn, e: fit_concepts(ae, [ConceptPairs("x", lambda n, g: (torch.rand(n, 3, 32, 32), torch.rand(n, 3, 16, 16)))], steps=1, pool_size=4, progress=False), ValueError, "same shape"),
        ("a fractional factor size", lambda m, ae, inn, e: fit_concepts(ae, [ColorDigits("test").concept("digit")], factor_sizes={"digit": 2.5}, steps=1, pool_size=4, progress=False), ValueError, r"`factor_sizes`\['digit'\] must be a whole number of dimensions >= 1, got 2.5"),
        ("factor sizes not summing", lambda m, ae, inn, e: fit_concepts(ae, [ColorDigits("test").concept("digit")], factor_sizes={"digit": 4, "residual": 4}, steps=1, pool_size=4, progress=False), ValueError, "sum to 8"),
        ("factor INN on a conv layer", lambda m, ae, inn, e: LayerRepresentation(m, "cnn.relu3").encode(X), ValueError, "vector layer"),
        ("ActNorm batch of one", lambda m, ae, inn, e: ActNorm(4)(torch.randn(1, 4)), ValueError, "batch"),
        # hidden=0 gave couplings that ignore their input (or crashed inside oneDNN on AVX-512 CPUs)
        ("INN subnets of width 0", lambda m, ae, inn, e: ConditionalINN(4, (3,), hidden=0), ValueError, r"`hidden` must be >= 1"),
        ("float64 input to a float32 coupling", lambda m, ae, inn, e: AffineCoupling(4)(torch.randn(3, 4, dtype=torch.float64)), TypeError, r"`x` is torch.float64 but this coupling's weights are torch.float32"),
        ("normalised images to cache for a sigmoid decoder", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, (X - 0.5) / 0.2, steps=1, progress=False), ValueError, r"`data` pixels range over \[-2.5, 2.5\], but the autoencoder decodes images in \[0, 1\].*nn.Sequential\(normalise, model\)"),
        ("8-bit pixel values for a sigmoid decoder", lambda m, ae, inn, e: fit_autoencoder(X * 255, latent_dim=4, steps=1, progress=False), ValueError, r"`data` pixels range over \[.*divide 8-bit pixels by 255"),
        ("autoencoder data with NaN", lambda m, ae, inn, e: fit_autoencoder(X * float("nan"), latent_dim=4, steps=1, progress=False), ValueError, "NaN"),
        ("cached data with NaN", lambda m, ae, inn, e: cache_features(m, "cnn.logits", ae, X * float("nan"), progress=False), ValueError, "NaN or infinite pixels"),
        ("classifier data with inf", lambda m, ae, inn, e: fit_classifier(m, (X / 0, torch.zeros(3)), steps=1, progress=False), ValueError, "NaN or infinite"),
        ("metric samples with NaN", lambda m, ae, inn, e: prediction_agreement(m, X, X[:, None] * float("nan")), ValueError, "`samples` contains NaN"),
        ("fit without data or cache", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", steps=1, progress=False), ValueError, "`autoencoder` and `data`"),
        ("layer_overrides for a layer not fitted", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, progress=False, layer_overrides={"cnn.fc": {}}), ValueError, "layer_overrides"),
        ("float batch size", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, batch_size=8.0, progress=False), TypeError, "`batch_size` must be an int, got 8.0"),
        ("negative steps", lambda m, ae, inn, e: fit_concepts(ae, [ColorDigits("test").concept("digit")], steps=-5, pool_size=4, progress=False), ValueError, "`steps` must be >= 1, got -5"),
        ("zero learning rate", lambda m, ae, inn, e: fit_autoencoder(X, latent_dim=4, steps=1, lr=0.0, progress=False), ValueError, "`lr` must be > 0"),
        ("NaN noise level", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, code_noise=float("nan"), progress=False), ValueError, "`code_noise` must be finite"),
        ("classifier with zero steps", lambda m, ae, inn, e: fit_classifier(m, (X, torch.zeros(3)), steps=0, progress=False), ValueError, "`steps` must be >= 1, got 0"),
        ("negative attack size", lambda m, ae, inn, e: fit_classifier(m, (X, torch.zeros(3)), steps=1, adversarial_epsilon=-0.1, progress=False), ValueError, "`adversarial_epsilon` must be >= 0"),
        ("float cache batch size", lambda m, ae, inn, e: cache_features(m, "cnn.logits", ae, X, batch_size=2.0, progress=False), TypeError, "`batch_size` must be an int, got 2.0"),
        ("misspelt setting", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, stpes=1, progress=False), TypeError, "did you mean 'steps'"),
        ("layer_overrides keyed by modules not fitted", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, progress=False, layer_overrides={m.cnn.fc: {}, m.cnn.relu1: {}}), ValueError, r"`layer_overrides` names layers \['cnn.fc', 'cnn.relu1'\]"),
        ("layer_overrides giving one layer twice", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, progress=False, layer_overrides={m.cnn.logits: {"steps": 1}, "cnn.logits": {"steps": 2}}), ValueError, r"`layer_overrides` gives layer 'cnn.logits' twice"),
        ("layer_overrides value not a dict", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, progress=False, layer_overrides={"cnn.logits": 5}), TypeError, r"`layer_overrides\['cnn.logits'\]` must be a dict of settings"),
        ("classifier seed beyond what the fits take", lambda m, ae, inn, e: fit_classifier(m, (X, torch.zeros(3)), steps=1, seed=-2**60, progress=False), ValueError, r"`seed` must lie strictly between -2\*\*53 and 2\*\*53"),
        ("concept scores seed beyond what the fits take", lambda m, ae, inn, e: estimate_factor_sizes((m, "cnn.fc"), [ConceptPairs.from_labels("x", X, [0, 0, 1])], n_pairs=4, seed=2**60), ValueError, r"`seed` must lie strictly between"),
        ("seed beyond what torch takes", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, progress=False, seed=2**64), ValueError, r"`seed` must lie strictly between -2\*\*53 and 2\*\*53"),
        ("explainer seed beyond what torch takes", lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).attribute(X, n_samples=2, seed=2**64), ValueError, r"`seed` must lie between -2\*\*63 and 2\*\*64 - 1"),
        ("bad setting in layer_overrides", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, progress=False, layer_overrides={"cnn.logits": {"hidden": 0}}), ValueError, "`hidden` must be >= 1"),
        ("config of another fit", lambda m, ae, inn, e: fit_autoencoder(X, latent_dim=4, config=InvarianceConfig(), progress=False), TypeError, "`config` must be an instance of AutoencoderConfig"),
        ("re-encoding with one original", lambda m, ae, inn, e: reencode_similarity(m, "cnn.fc", X[:1], X[:1, None]), ValueError, "at least 2"),
        ("agreement with mismatched samples", lambda m, ae, inn, e: prediction_agreement(m, X, X[:2, None]), ValueError, r"`samples` must have shape \(N, S"),
        ("concept fit on a device torch does not know", lambda m, ae, inn, e: fit_concepts(ae, [ColorDigits("test").concept("digit")], steps=1, pool_size=4, device="gpu", progress=False), ValueError, r"`device`='gpu' is not a torch device"),
        ("factor sizes not summing, before the pools", lambda m, ae, inn, e: fit_concepts(ae, [ConceptPairs("x", _no_pairs)], factor_sizes={"x": 4, "residual": 4}, steps=1, pool_size=4, progress=False), ValueError, "sum to 8"),
        ("a cache that is not a FeatureCache", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", cache={}, steps=1, progress=False), TypeError, "`cache` must be a FeatureCache"),
        ("a classifier callback that is not callable", lambda m, ae, inn, e: fit_classifier(m, Unread(4), steps=1, callback=5, progress=False), TypeError, r"`callback` must be callable \(callback\(step, model\)\) or None, got int"),
        ("an autoencoder augmentation that is not callable", lambda m, ae, inn, e: fit_autoencoder(Unread(4), latent_dim=4, steps=1, augment=5, progress=False), TypeError, "`augment` must be callable"),
        ("perceptual layer not in the model", lambda m, ae, inn, e: fit_autoencoder(Unread(4), latent_dim=4, steps=1, perceptual_model=SmallCNN(width=4), perceptual_layers=["relu1", "cnn"], progress=False), ValueError, r"layer 'cnn' not found in SmallCNN"),
        ("an autoencoder checkpoint that is a folder", lambda m, ae, inn, e: fit_autoencoder(Unread(4), latent_dim=4, steps=1, checkpoint=str(Path(__file__).parent), progress=False), ValueError, r"`checkpoint` '.*tests' is a folder; pass a file path in it"),
        ("an unfitted concept INN for the dynamics", lambda m, ae, inn, e: concept_dynamics({"a": m}, "cnn.fc", ae, FactorINN(4, {"a": 2}, n_blocks=1, hidden=8), Unread(4), X, torch.zeros(3, dtype=torch.long), steps=1, progress=False), ValueError, "`concept_inn` .*fit_concepts"),
        ("an autoencoder as the dynamics' concept INN", lambda m, ae, inn, e: concept_dynamics({"a": m}, "cnn.fc", ae, ae, Unread(4), X, torch.zeros(3, dtype=torch.long), steps=1, progress=False), TypeError, "`concept_inn` must be a captum_inn.inn.FactorINN"),
        ("a fractional snapshot step", lambda m, ae, inn, e: Snapshots([2.9]), TypeError, r"`steps` must be an int, got 2.9"),
        ("a memory-mapped cache folder that is a file", lambda m, ae, inn, e: cache_features(m, "cnn.fc", ae, X, memmap_dir=__file__, progress=False), ValueError, r"`memmap_dir` '.*test_bad_input.py' is a file, or lies under one"),
        # Python does not expand '~': a folder literally named '~' was made in the working directory
        ("an autoencoder checkpoint under an unexpanded ~", lambda m, ae, inn, e: fit_autoencoder(Unread(4), latent_dim=4, steps=1, checkpoint="~/runs/ae.safetensors", progress=False), ValueError, r"`checkpoint` '~/runs/ae.safetensors' starts with '~', which Python does not expand .*os.path.expanduser"),
        ("an invariance checkpoint folder under an unexpanded ~", lambda m, ae, inn, e: fit_invariances(m, "cnn.fc", ae, X, steps=1, checkpoint_dir="~/runs", progress=False), ValueError, r"`checkpoint_dir` '~/runs.*' starts with '~'"),
        ("a memory-mapped cache folder under an unexpanded ~", lambda m, ae, inn, e: cache_features(m, "cnn.fc", ae, X, memmap_dir="~/cache", progress=False), ValueError, r"`memmap_dir` '~/cache' starts with '~'"),
        ("a DataLoader yielding single images", lambda m, ae, inn, e: cache_features(m, "cnn.fc", ae, torch.utils.data.DataLoader(X, batch_size=None), progress=False), ValueError, r"DataLoader with batch_size=None, which yields its dataset's items one by one.*pass batch_size="),
        ("no layers to fit", lambda m, ae, inn, e: fit_invariances(m, [], ae, Unread(4), steps=1, progress=False), ValueError, "`layers` is empty"),
        ("a flag given as a string", lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, attribute_to_layer_input="no", progress=False), TypeError, r"`attribute_to_layer_input` must be True or False, got 'no'"),
        # dtype mistakes name the argument that holds the images (a raw RuntimeError, or another argument's name)
        ("concept pairs for a bfloat16 layer", lambda m, ae, inn, e: fit_concepts((_bf16(m), "cnn.fc"), [ConceptPairs.from_labels("c", X, [0, 1, 0])], steps=1, pool_size=4, progress=False), TypeError, r"`concepts` images are torch.float32 but the network computes in torch.bfloat16"),
        ("float32 images for a bfloat16 classifier", lambda m, ae, inn, e: fit_classifier(_bf16(m), (X, torch.zeros(3, dtype=torch.long)), steps=1, progress=False), TypeError, r"`data` images are torch.float32 but the network computes in torch.bfloat16"),
        ("float64 donors", lambda m, ae, inn, e: inv(m, ae, inn).transfer(X, X.double()), TypeError, r"`donors` images are torch.float64"),
        ("float64 samples for the agreement", lambda m, ae, inn, e: prediction_agreement(m, X, X[:, None].double()), TypeError, r"`samples` images are torch.float64"),
        ("float64 originals for the agreement", lambda m, ae, inn, e: prediction_agreement(m, X.double(), X[:, None]), TypeError, r"`originals` images are torch.float64"),
        ("a judge of another dtype", lambda m, ae, inn, e: adversarial_views(m, {"cnn.logits": inv(m, ae, inn)}, X, torch.zeros(3, dtype=torch.long), _bf16(m)), TypeError, r"`judge` computes in torch.bfloat16 but the images, and so the views, are torch.float32"),
        ("an example of another dtype for Grad-CAM's layer", lambda m, ae, inn, e: last_spatial_layer(_bf16(m), X), TypeError, r"`example` images are torch.float32"),
        ("a classifier that returns a dict", lambda m, ae, inn, e: fit_classifier(DictOut(), (X, torch.zeros(3, dtype=torch.long)), steps=1, progress=False), TypeError, r"`model` must return \(N, K\) logits, but it returns a dict with keys \['logits'\]; wrap it"),
        # checked where they are given, not at a fit's first batch or as a silently truncated number
        ("a negative Jitter shift", lambda m, ae, inn, e: Jitter(-1), ValueError, r"`pixels` must be >= 0 \(the largest shift\), got -1"),
        ("a fractional Jitter shift", lambda m, ae, inn, e: Jitter(2.5), TypeError, r"`pixels` must be an int, got 2.5"),
        ("a Jitter range upside down", lambda m, ae, inn, e: Jitter(2, value_range=(1, 0)), ValueError, r"`value_range` must be two finite numbers \(low, high\) with low < high"),
        ("normalised images for a Jitter clamping to [0, 1]", lambda m, ae, inn, e: Jitter(1)((X - 0.5) / 0.25), ValueError, r"Jitter's images range over \[-2, 2\], far outside `value_range` \(0.0, 1.0\).*value_range=None"),
        ("one image for a Jitter", lambda m, ae, inn, e: Jitter(1)(X[0]), ValueError, r"Jitter takes a batch of images \(N, C, H, W\), got \(3, 32, 32\); for one image pass image.unsqueeze\(0\)"),
        ("a Jitter flip given as a string", lambda m, ae, inn, e: Jitter(2, flip="no"), TypeError, r"`flip` must be True or False, got 'no'"),
        ("a Jitter recolouring share above 1", lambda m, ae, inn, e: Jitter(2, recolour=1.5), ValueError, r"`recolour` must be in \[0, 1\] \(the share of images recoloured\), got 1.5"),
        ("Jitter recolouring without a range", lambda m, ae, inn, e: Jitter(2, recolour=0.5, value_range=None), ValueError, r"`recolour` draws the new colours in `value_range`; pass value_range=\(low, high\)"),
        ("a fractional ColorDigits index", lambda m, ae, inn, e: ColorDigits("test")[2.7], TypeError, r"`index` must be an int, got 2.7"),
        ("a ColorDigits contrast as a string", lambda m, ae, inn, e: ColorDigits(min_contrast="0.5"), TypeError, r"`min_contrast` must be a number \(an RGB distance\), got '0.5'"),
        ("a ColorDigits contrast of None", lambda m, ae, inn, e: ColorDigits(min_contrast=None), TypeError, r"`min_contrast` must be a number \(an RGB distance\), got None"),
        ("a ColorDigits test fraction as a string", lambda m, ae, inn, e: ColorDigits(test_fraction="0.5"), ValueError, r"`test_fraction` must be a number strictly between 0 and 1, got '0.5'"),
        ("8-bit images for the colour estimate", lambda m, ae, inn, e: estimate_colours((X * 255).to(torch.uint8)), TypeError, r"`images` images must be floating point, got dtype torch.uint8; convert with .float\(\)"),
        ("concept pairs that a layer turns into NaN", lambda m, ae, inn, e: fit_concepts((nn.Sequential(NaNs(), nn.Linear(6, 2)), "0"), [ConceptPairs.from_labels("c", X, [0, 1, 0])], steps=1, pool_size=4, progress=False), ValueError, r"Concept 'c''s pairs encode to NaN or infinite values"),
    ]


def _bf16(model):
    return copy.deepcopy(model).to(torch.bfloat16)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 2)

    def forward(self, x):
        return {"logits": self.fc(x.flatten(1))}


class NaNs(nn.Module):
    """A layer that gives NaN for finite images."""

    def forward(self, x):
        return x.flatten(1)[:, :6] * float("nan")


def _no_pairs(n, generator):
    raise AssertionError("the pools were drawn before the sizes were checked")


CASES = _cases()


@pytest.mark.parametrize("name, call, error, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly(setup, name, call, error, match):
    model, ae, inn, e = setup
    flags = training_flags(model)
    with pytest.raises(error, match=match):
        call(model, ae, inn, e)
    assert_no_hooks(model)
    assert training_flags(model) == flags


def test_the_battery_has_at_least_25_cases():
    assert len(CASES) >= 25


def test_non_finite_activations_or_codes_at_explanation_time_are_named(setup):
    """The fit refused a layer that gives NaN or inf on finite pixels; the explainers returned NaN maps
    and NaN invariances for such an image, with no word."""
    model, ae, inn, e = setup

    class LogLayer(nn.Module):  # log|x|: −inf for an image of zeros
        def forward(self, x):
            return x.abs().log()

    logged = nn.Sequential(LogLayer(), nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    images = X.clone()
    images[1] = 0.0
    explainer = LayerInvariance(logged, "0", _named(_fitted_inn(6, (3, 32, 32)), "0"), ae)
    for call in (lambda: explainer.attribute(images, n_samples=2), lambda: explainer.invariances(images)):
        with pytest.raises(ValueError, match=r"hooked layer's \(LogLayer\) activations hold NaN or infinite values at "
                                             r"image 1 of `inputs`"):
            call()

    class NaNEncoder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.latent_dim = inner, inner.latent_dim

        def encode(self, x):
            return self.inner.encode(x).mean / (x.flatten(1).amax(1, keepdim=True) > 0)  # 0/0 for an image of zeros

        def decode(self, c):
            return self.inner.decode(c)

    with pytest.raises(ValueError, match=r"autoencoder's codes hold NaN or infinite values at image 1 of `inputs`"):
        LayerConcepts(model, "cnn.logits", e, NaNEncoder(ae)).factors(images)


def test_integer_scalar_tensors_count_as_ints(setup):
    """torch.tensor(3) (as a count or a sum gives it) was refused as "must be an int"; float and
    bool tensors are still refused rather than truncated."""
    model, ae, inn, e = setup
    explainer = LayerInvariance(model, "cnn.logits", inn, ae)
    assert explainer.sample(X[:1], n_samples=torch.tensor(3)).shape == (1, 3, 3, 32, 32)
    for value in (torch.tensor(3.0), torch.tensor(True), torch.tensor([3])):
        with pytest.raises(TypeError, match="`n_samples` must be an int"):
            explainer.sample(X[:1], n_samples=value)


def test_batch_of_one_works(setup):
    model, ae, inn, e = setup
    explainer = LayerInvariance(model, "cnn.logits", inn, ae)
    assert explainer.attribute(X[:1], n_samples=3).shape == (1, 3, 32, 32)
    assert LayerConcepts(model, "cnn.logits", e, ae).attribute(X[:1], target=0).shape == (1, 3)


def test_an_error_of_the_model_is_not_reported_as_a_bad_target(setup):
    model, ae, _, e = setup

    class WithLabel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.embedding = model, nn.Embedding(5, 10)

        def forward(self, image, label):
            return self.net(image) + self.embedding(label)

    concepts = LayerConcepts(WithLabel().eval(), "net.cnn.logits", e, ae)
    with pytest.raises(IndexError, match="index out of range in self"):  # label 7 of 5, target 3 is fine
        concepts.attribute(X, target=3, additional_forward_args=(torch.tensor([0, 1, 7]),), n_steps=4)


def test_layer_names_are_checked_where_both_are_known(setup):
    model, ae, _, _ = setup
    inn = _named(_fitted_inn(6, (10,)), "cnn.logits")
    wrapped = nn.Sequential(model).eval()  # the same layer is "0.cnn.logits" there
    assert LayerInvariance(wrapped, "0.cnn.logits", inn, ae).sample(X, n_samples=2).shape == (3, 2, 3, 32, 32)
    # a plain function has no layer names: the module itself is the layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model is in eval mode: nothing to warn about
        explainer = LayerInvariance(lambda images: model(images), model.cnn.logits, inn, ae)
    assert explainer.sample(X, n_samples=2).shape == (3, 2, 3, 32, 32)


def test_concept_edits_take_donors_when_the_image_is_not_the_first_input(setup):
    model, ae, _, e = setup

    labels = torch.arange(3)
    concepts = LayerConcepts(LabelFirst(model).eval(), "net.cnn.logits", e, ae, image_input=1)
    by_tensor = concepts.edit((labels, X), "a", donors=X[:1])
    by_tuple = concepts.edit((labels, X), "a", donors=(labels[:1], X[:1]))
    expected = LayerConcepts(model, "cnn.logits", e, ae).edit(X, "a", donors=X[:1])
    assert torch.equal(by_tensor, expected) and torch.equal(by_tuple, expected)
    # one input takes one donor: "must hold 1 or 1 images" said it twice
    with pytest.raises(ValueError, match=r"`donors` must hold 1 image, got 3\."):
        LayerConcepts(model, "cnn.logits", e, ae).edit(X[:1], "a", donors=X)
    # donors of another size: the autoencoder's "built for images of shape" named neither argument
    small = torch.nn.functional.interpolate(X, scale_factor=0.5)
    with pytest.raises(ValueError, match=r"`donors` must be images of the inputs' shape \(N, 3, \d+, \d+\), got "):
        LayerConcepts(model, "cnn.logits", e, ae).edit(X, "a", donors=small)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_cuda_device_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="`device` is 'cuda', but PyTorch sees no CUDA GPU"):
        fit_autoencoder(X, latent_dim=4, steps=1, device="cuda", progress=False)


def test_a_cuda_index_beyond_the_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"`device` is 'cuda:5', but PyTorch sees 1 CUDA GPU\(s\) here \(indices 0 to 0\)"):
        fit_autoencoder(X, latent_dim=4, steps=1, device="cuda:5", progress=False)


def test_a_device_torch_does_not_know_is_a_clear_error(setup):
    model, ae, _, _ = setup
    from captum_inn.training import fit_invariances
    from captum_inn.training.concepts import concept_scores

    for call in (lambda: fit_autoencoder(X, latent_dim=4, steps=1, device="gpu", progress=False),
                 lambda: fit_invariances(model, "cnn.logits", ae, X, steps=1, device="gpu", progress=False),
                 lambda: concept_scores(ae, [ConceptPairs.from_labels("a", X, torch.arange(len(X)) % 2)], device="gpu")):
        with pytest.raises(ValueError, match="`device`='gpu' is not a torch device; pass 'cpu', 'cuda'"):
            call()


@pytest.mark.parametrize("device, message", [
    ("xla", r"`device` is 'xla', but this PyTorch cannot use it \(.*\); pass device='cpu'"),
    ("meta", r"`device` is 'meta', a device without data"),
])
def test_a_device_this_torch_cannot_use_is_a_clear_error_before_any_work(device, message):
    """mps, xla or meta passed the device check and failed inside the work ("PyTorch is not linked with
    support for mps devices"; meta: "Tensor.item() cannot be called on meta tensors")."""
    with pytest.raises(ValueError, match=message):
        fit_autoencoder(X, latent_dim=4, steps=1, device=device, progress=False)


def test_a_layer_with_one_number_per_image_is_a_clear_error(setup):
    _, ae, _, _ = setup

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn, self.total = SmallCNN(width=4), nn.Identity()

        def forward(self, x):
            return self.total(self.cnn(x).sum(1))

    with pytest.raises(ValueError, match="Layer 'total' gives one number per image"):
        fit_invariances(Scalar().eval(), "total", ae, X, steps=1, progress=False)


def test_a_model_in_training_mode_is_explained_in_eval_mode_and_left_unchanged(setup):
    """Every call runs the model in eval mode and restores its flags: the explainers give their
    eval-mode results for a model in training mode, silently, and batch norm's running statistics
    are never overwritten (concept attributions used to run the model as it was)."""
    _, ae, _, e = setup
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    model(torch.rand(2, 3, 32, 32))
    with torch.no_grad():  # running statistics unlike any batch's, so the two modes differ
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(4.0)
    explainer = LayerInvariance(model, "3", _fitted_inn(6, (10,)), ae)
    concepts = LayerConcepts(model, "3", e, ae)

    def results(images):
        return (explainer.sample(images, n_samples=2, generator=torch.Generator().manual_seed(0)),
                concepts.attribute(images, target=0, n_steps=4), concepts.output_from_factors(images).detach())

    expected, expected_one = results(X), results(X[:1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for got, want in zip(results(X), expected):
            assert torch.allclose(got, want, atol=1e-6)
        for got, want in zip(results(X[:1]), expected_one):  # batch statistics of one image would differ
            assert torch.allclose(got, want, atol=1e-6)
    assert model.training and model[1].training  # flags left as they were
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics too


# ---------------------------------------------------------------- no hook outlives any call
ENTRY_POINTS = {
    "LayerInvariance.attribute": lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).attribute(X, n_samples=2),
    "LayerInvariance.sample": lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).sample(X, n_samples=2),
    "LayerInvariance.invariances": lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).invariances(X),
    "LayerInvariance.transfer": lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).transfer(X, X),
    "LayerConcepts.attribute": lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ae).attribute(X, target=1, n_steps=4),
    "LayerConcepts.encoded": lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ae, invariance_inn=inn).encoded(X, n_samples=2),
    "LayerConcepts.edit": lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ae).edit(X, "a"),
    "LayerConcepts.output_from_factors (layer)": lambda m, ae, inn, e: LayerConcepts(m, "cnn.fc", _layer_e(m), None).output_from_factors(X),
    "capture": lambda m, ae, inn, e: capture(m, ["cnn.relu1", "cnn.logits"], X),
    "cache_features": lambda m, ae, inn, e: cache_features(m, ["cnn.relu3", "cnn.logits"], ae, X, progress=False),
    "fit_invariances": lambda m, ae, inn, e: fit_invariances(m, "cnn.logits", ae, X, steps=1, n_blocks=1, hidden=8, progress=False),
    "reencode_similarity": lambda m, ae, inn, e: reencode_similarity(m, "cnn.fc", X, X[:, None]),
    "LayerRepresentation.encode": lambda m, ae, inn, e: LayerRepresentation(m, "cnn.fc").encode(X),
    "LayerInvariance.reconstruct": lambda m, ae, inn, e: LayerInvariance(m, "cnn.logits", inn, ae).reconstruct(X),
    "LayerConcepts.factors (layer)": lambda m, ae, inn, e: LayerConcepts(m, "cnn.fc", _layer_e(m), None).factors(X),
    "LayerConcepts.decompose": lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ae).decompose(X),
    "LayerConcepts.encoded_summary": lambda m, ae, inn, e: LayerConcepts(m, "cnn.logits", e, ae, invariance_inn=inn).encoded_summary(X, n_samples=2),
    "fit_concepts (layer)": lambda m, ae, inn, e: fit_concepts((m, "cnn.fc"), [ConceptPairs.from_labels("x", X, [0, 0, 1])], steps=1, pool_size=4, n_blocks=1, hidden=8, progress=False),
    "estimate_factor_sizes (layer)": lambda m, ae, inn, e: estimate_factor_sizes((m, "cnn.fc"), [ConceptPairs.from_labels("x", X, [0, 0, 1])], n_pairs=4),
    "prediction_agreement": lambda m, ae, inn, e: prediction_agreement(m, X, X[:, None]),
}


def _layer_e(model):
    e = FactorINN(128, {"x": 4}, n_blocks=1, hidden=8, seed=0)
    e.fit_info = {"representation": {"kind": "layer", "layer": "cnn.fc", "dim": 128}}
    with torch.no_grad():
        e(torch.randn(16, 128))
    return e.eval()


MODEL_FREE = {"LayerConcepts.edit", "LayerInvariance.reconstruct", "LayerConcepts.decompose"}  # decodes edited codes; the model does not run, so it cannot fail mid-call


@pytest.mark.filterwarnings("ignore:The INNs are fitted to 3 images")  # X is three images: enough to run every entry
@pytest.mark.parametrize("how", ["normal", "error", "keyboard_interrupt"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=list(ENTRY_POINTS))
def test_no_hook_survives(setup, entry, how):
    if how != "normal" and entry in MODEL_FREE:
        pytest.skip("edit, decompose and reconstruct never run the model, so a layer cannot fail inside them")
    model, ae, inn, e = setup
    flags = training_flags(model)
    call = ENTRY_POINTS[entry]
    try:
        if how == "normal":
            call(model, ae, inn, e)
        else:
            model.gate.error = RuntimeError("a layer failed") if how == "error" else KeyboardInterrupt()
            # the gate's own error, not any RuntimeError a broken entry point might raise before the model ran
            with pytest.raises(RuntimeError if how == "error" else KeyboardInterrupt,
                               match="a layer failed" if how == "error" else None):
                call(model, ae, inn, e)
    finally:
        model.gate.error = None
    assert_no_hooks(model)
    assert training_flags(model) == flags


def test_an_autoencoder_of_another_image_size_is_refused_after_decoding(setup):
    """An autoencoder without ``image_shape`` is checked on what it decodes: a model that takes any
    size (adaptive pooling) must not yield 32x32 samples for 64x64 inputs."""
    _, ae, inn, _ = setup

    class Plain(nn.Module):  # encode/decode only, no image_shape
        def __init__(self):
            super().__init__()
            self.ae = ae

        def encode(self, x):
            return self.ae.encode(x)

        def decode(self, code):
            return self.ae.decode(code)

    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10)).eval()
    explainer = LayerInvariance(model, "2", inn, Plain())
    assert explainer.attribute(X, n_samples=2).shape == X.shape
    with pytest.raises(ValueError, match=r"`inputs` images have shape \(3, 64, 64\).*decodes images of shape \(3, 32, 32\)"):
        explainer.attribute(torch.rand(2, 3, 64, 64), n_samples=2)


def test_inns_refuse_a_network_of_the_same_shape_with_other_weights(setup, tmp_path):
    """INNs record the autoencoder (or model) they were fitted with: another one of the same shape
    (a retrained one) is refused by the explainers and by load_concept_inn, also after saving."""
    model, ae, _, _ = setup
    other_ae = ConvAutoencoder((3, 32, 32), latent_dim=6, width=4).eval()
    assert weights_fingerprint(other_ae) != weights_fingerprint(ae)
    assert weights_fingerprint(nn.DataParallel(ae)) == weights_fingerprint(ae)  # names do not count
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inn = fit_invariances(model, "cnn.logits", ae, images, steps=1, n_blocks=1, hidden=8, progress=False)
    inn = load_invariance_inn(save_invariance_inn(str(tmp_path / "inn.safetensors"), inn))
    LayerInvariance(model, "cnn.logits", inn, ae)
    with pytest.raises(ValueError, match=r"`inn` was fitted with another `autoencoder` \(other weights: retrained, another seed, or another architecture\)"):
        LayerInvariance(model, "cnn.logits", inn, other_ae)
    pairs = [ConceptPairs.from_labels("x", images, [0, 1] * 8)]
    e = fit_concepts(ae, pairs, steps=1, pool_size=4, n_blocks=1, hidden=8, progress=False)
    path = str(save_concept_inn(str(tmp_path / "e.safetensors"), e))
    LayerConcepts(model, "cnn.logits", load_concept_inn(path, representation=ae), ae, invariance_inn=inn)
    with pytest.raises(ValueError, match="`concept_inn` was fitted with another `autoencoder`"):
        LayerConcepts(model, "cnn.logits", e, other_ae)
    with pytest.raises(CheckpointError, match=r"concept INN fitted on another autoencoder \(other weights"):
        load_concept_inn(path, representation=other_ae)
    e_other = fit_concepts(other_ae, pairs, steps=1, pool_size=4, n_blocks=1, hidden=8, progress=False)
    with pytest.raises(ValueError, match="`invariance_inn` was fitted with another `autoencoder`"):
        LayerConcepts(model, "cnn.logits", e_other, other_ae, invariance_inn=inn)
    on_layer = fit_concepts((model, "cnn.fc"), pairs, steps=1, pool_size=4, n_blocks=1, hidden=8, progress=False)
    LayerConcepts(model, "cnn.fc", on_layer)
    retrained = Net().eval()
    with pytest.raises(ValueError, match="`concept_inn` was fitted with another `forward_func`"):
        LayerConcepts(retrained, "cnn.fc", on_layer)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __getitem__(self, index):
        return self.items[index]

    def __len__(self):
        return len(self.items)


def test_datasets_of_pil_images_or_mixed_sizes_say_how_to_fix_them():
    from torchvision.transforms.functional import to_pil_image

    pil = [to_pil_image(torch.rand(3, 8, 8)) for _ in range(4)]
    mixed = [torch.rand(3, 8, 8), torch.rand(3, 9, 8), torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
    for fit in (lambda data: fit_autoencoder(data, latent_dim=4, steps=1, progress=False),
                lambda data: fit_classifier(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), data, steps=1, progress=False)):
        with pytest.raises(TypeError, match=r"`data` yields items that are not image tensors.*T.ToTensor\(\)"):
            fit(_Items([(image, i % 2) for i, image in enumerate(pil)]))
        with pytest.raises(ValueError, match=r"`data` yields images of different sizes.*T.CenterCrop\(size\)"):
            fit(_Items([(image, i % 2) for i, image in enumerate(mixed)]))
    labelled = _Items([(torch.rand(3, 8, 8), i % 2) for i in range(8)])
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    fit_classifier(model, torch.utils.data.DataLoader(labelled, batch_size=4), steps=2, progress=False)  # its dataset
    with pytest.raises(TypeError, match="`data` must be \\(images, labels\\), a Dataset"):
        fit_classifier(nn.Linear(2, 2), 5, steps=1, progress=False)


def test_explainers_warn_about_pixels_far_outside_the_decoders_range(setup):
    model, ae, inn, _ = setup
    explainer = LayerInvariance(model, "cnn.logits", inn, ae)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # NoiseTunnel-sized excursions pass silently
        explainer.attribute((X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(0))).clamp(-0.4, 1.4),
                            n_samples=2)
    for call in (lambda x: explainer.attribute(x, n_samples=2), explainer.invariances, explainer.reconstruct):
        with pytest.warns(UserWarning, match=r"`inputs` pixels range over \[0, 255\].*8-bit pixels / 255") as caught:
            call((X * 255).round())
        assert "NoiseTunnel" not in str(caught[0].message) and caught[0].filename == __file__  # the caller's line
    with pytest.warns(UserWarning, match=r"`inputs` pixels range over \[-.*NoiseTunnel, noise this large.*stdevs="):
        explainer.attribute(X + 2 * torch.randn(X.shape, generator=torch.Generator().manual_seed(0)), n_samples=2)


def test_concept_explainers_and_fits_check_the_pixel_range_too(setup):
    """LayerInvariance warned about normalised or 8-bit pixels and fit_invariances refused them;
    LayerConcepts and fit_concepts took them silently (Captum's TCAV tutorial normalises its
    concepts), giving concept scores 1000 times too large."""
    model, ae, inn, e = setup
    concepts = LayerConcepts(model, "cnn.logits", e, ae)
    normalised = (X - 0.45) / 0.225
    encoding = LayerConcepts(model, "cnn.logits", e, ae, invariance_inn=inn)
    for call in (lambda: concepts.attribute(normalised, target=1, n_steps=4), lambda: concepts.factors(normalised),
                 lambda: concepts.edit(normalised, "a"), lambda: encoding.encoded(normalised, n_samples=2)):
        with pytest.warns(UserWarning, match=r"`inputs` pixels range over \[-2"):
            call()
    with pytest.warns(UserWarning, match=r"`donors` pixels range over \[-2"):  # the donors, not the inputs
        concepts.edit(X, "a", donors=normalised)
    pairs = ConceptPairs.from_labels("a", normalised.repeat(4, 1, 1, 1), torch.arange(12) % 2)
    with pytest.raises(ValueError, match=r"`concepts` pixels range over \[-2.*no Normalize transform"):
        fit_concepts(ae, [pairs], factor_sizes={"a": 2}, steps=1, pool_size=8, n_blocks=1, hidden=8, progress=False)
    overshoot = ConceptPairs.from_labels("a", (X * 1.02 - 0.01).repeat(4, 1, 1, 1), torch.arange(12) % 2)
    fit_concepts(ae, [overshoot], factor_sizes={"a": 2}, steps=1, pool_size=8, n_blocks=1, hidden=8,
                 progress=False)  # a resampling transform's 1% overshoot (bicubic) is no normalisation


def test_shared_extra_tensors_go_whole_to_every_invariance_sample_pass(setup):
    """A tensor without one row per input is shared (as the fits take it): it goes whole to every pass,
    whatever internal_batch_size; a 0-d tensor too."""
    model, ae, inn, _ = setup

    class WithPalette(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = model.cnn

        def forward(self, x, palette):
            return self.cnn(x * palette.mean())

    explainer = LayerInvariance(WithPalette().eval(), "cnn.logits", inn, ae)
    for shared in (torch.rand(5, 3), torch.tensor(0.8)):
        whole = explainer.attribute(X, additional_forward_args=(shared,), n_samples=2, seed=0)
        parts = explainer.attribute(X, additional_forward_args=(shared,), n_samples=2, seed=0, internal_batch_size=2)
        assert torch.allclose(whole, parts, atol=1e-5)


def test_compare_attributions_names_an_explainer_that_takes_the_images_second(setup):
    from captum_inn.compare import compare_attributions

    model, ae, inn, _ = setup

    class ImagesSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.cnn = model.cnn

        def forward(self, scale, x):
            return self.cnn(x * scale.view(-1, 1, 1, 1))

    second = ImagesSecond().eval()
    explainer = LayerInvariance(second, "cnn.logits", inn, ae, image_input=1)
    with pytest.raises(ValueError, match=r"`invariance` takes the images as input 1, but compare_attributions gives"):
        compare_attributions(second, (torch.ones(3), X), explainer, progress=False)
    with pytest.raises(TypeError, match=r"pass the model's other inputs as `additional_forward_args`"):
        compare_attributions(model, (X, X), LayerInvariance(model, "cnn.logits", inn, ae), progress=False)


def test_networks_built_under_inference_mode_are_named_where_gradients_are_needed(setup):
    """A model built or loaded inside torch.inference_mode() keeps inference tensors as weights, which
    autograd cannot save; the calls that need gradients through it failed deep inside with PyTorch's
    "Inference tensors cannot be saved for backward". They now name the network and the fix, and the
    calls without gradients still work on it. Each refuses before the model runs."""
    import copy

    from captum_inn.analysis import adversarial_views
    from captum_inn.compare import compare_attributions
    from captum_inn.training import train_loop

    model, ae, inn, e = setup
    with torch.inference_mode():
        frozen = copy.deepcopy(model)
        frozen_ae = copy.deepcopy(ae)
        frozen_e = copy.deepcopy(e)
    assert frozen.cnn.conv1.weight.is_inference()
    labels = torch.zeros(3, dtype=torch.long)
    explainer = LayerInvariance(frozen, "cnn.logits", inn, ae)
    needs_gradients = [
        (lambda: fit_classifier(frozen, (X, labels), steps=1, progress=False), "`model`", "fit_classifier trains"),
        (lambda: fit_autoencoder(X, latent_dim=4, steps=1, progress=False, perceptual_model=frozen,
                                 perceptual_layers=["cnn.relu1"]), "`perceptual_model`", "perceptual loss"),
        (lambda: capture(frozen, "cnn.fc", X, grad=True), "`model`", r"capture\(\.\.\., grad=True\)"),
        (lambda: compare_attributions(frozen, X, explainer, progress=False), "`model`", "Grad-CAM"),
        (lambda: adversarial_views(frozen, {"cnn.logits": explainer}, X, labels, model), "`model`", "FGSM"),
        (lambda: LayerConcepts(frozen, "cnn.logits", e, ae).attribute(X, target=0), "the model", "attribute"),
        (lambda: LayerConcepts(model, "cnn.logits", e, frozen_ae).attribute(X, target=0), "`autoencoder`", "attribute"),
        (lambda: LayerConcepts(model, "cnn.logits", frozen_e, ae).attribute(X, target=0), "`concept_inn`", "attribute"),
        (lambda: LayerConcepts(lambda x: frozen(x), frozen.cnn.logits, e, ae).attribute(X, target=0),
         "the hooked layer", "LayerConcepts.attribute"),
        (lambda: compare_attributions(model, X, LayerInvariance(model, "cnn.logits", inn, ae), progress=False,
                                      concepts=LayerConcepts(model, "cnn.logits", e, frozen_ae)), "`autoencoder`",
         "LayerConcepts.attribute"),
        (lambda: train_loop(frozen, lambda g: frozen(X).sum(), steps=1, lr=1e-3, progress=False), "`module`",
         "train_loop trains"),
    ]
    for gate in (model.gate, frozen.gate):
        gate.error = RuntimeError("the model ran before the check")
    try:
        for call, name, needs in needs_gradients:
            with pytest.raises(ValueError, match=rf"{name}'s (parameter|buffer) '[\w.]+' is an inference tensor .*"
                                                 rf"inference_mode\(\)\), and .*{needs}.*copy.deepcopy"):
                call()
            assert_no_hooks(frozen)
    finally:
        model.gate.error = frozen.gate.error = None
    # without gradients the inference weights serve as well as normal ones
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(explainer.attribute(X, n_samples=2, generator=generator()),
                       LayerInvariance(model, "cnn.logits", inn, ae).attribute(X, n_samples=2, generator=generator()))
    # and the advice holds: a deep copy made outside inference mode trains
    fit_classifier(copy.deepcopy(frozen), (X, labels), steps=1, progress=False)


def test_analyses_and_metrics_name_mistakes_that_gave_valid_looking_numbers(setup, tmp_path):
    """A one-logit model's predictions were all class 0, a judge of other classes was compared with
    the model's, and originals on another pixel scale than their samples (or 8-bit donors) gave
    agreements that looked valid: each is now refused or warned about, in the caller's names."""
    from captum_inn.analysis import mix_images
    from captum_inn.compare import compare_attributions

    model, ae, inn, e = setup
    explainer = LayerInvariance(model, "cnn.logits", inn, ae)

    class FirstLogit(nn.Module):
        def forward(self, logits):
            return logits[:, :1]

    one = nn.Sequential(model, FirstLogit()).eval()
    with pytest.raises(ValueError, match=r"`model`'s output has shape \(3, 1\); predictions need \(N, K\) logits with "
                                         r"K >= 2.*torch.cat\(\[-logit, logit\], 1\)"):
        compare_attributions(one, X, LayerInvariance(one, "0.cnn.logits", inn, ae), progress=False)
    three_classes = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)).eval()
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`judge` names 3 classes but `model` 10; .* the same classes, in the same order"):
        adversarial_views(model, {"cnn.logits": explainer}, X, labels, three_classes)
    with pytest.raises(ValueError, match=r"`judge`'s output has shape \(2, 1\); predictions need"):
        adversarial_views(model, {"cnn.logits": explainer}, X, labels, nn.Sequential(model, FirstLogit()))
    normalised = (X - 0.5) / 0.25
    samples = explainer.sample(X, n_samples=2, seed=0)
    for metric in (lambda o: prediction_agreement(model, o, samples), lambda o: reencode_similarity(model, "cnn.fc", o, samples)):
        with pytest.warns(UserWarning, match=r"`originals` range over \[-2, 2\] but `samples` over .* other scales"):
            metric(normalised)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            metric(X)
    with pytest.warns(UserWarning, match=r"`representation_source` pixels range over \[0\.\d+, 25\d\]") as caught:  # X's random minimum × 255
        mix_images({"cnn.logits": explainer}, X, X.flip(0) * 255, batch_size=2)
    assert len([w for w in caught if "pixels range over" in str(w.message)]) == 1, [str(w.message) for w in caught]
    with pytest.warns(UserWarning, match=r"`invariance_source` pixels range over") as caught:
        mix_images({"cnn.logits": explainer}, X * 255, X)
    assert not any("`inputs`" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match=r"`donors` pixels range over"):
        explainer.transfer(X, X * 255)


def test_analysis_arguments_of_the_wrong_kind_are_named(setup, tmp_path):
    """Raw errors from torch or matplotlib (a str target, channels-last images, an int generator,
    an Axes as `fig`, a string of layers) now name the argument and the fix."""
    import matplotlib.pyplot as plt

    from captum_inn.compare import compare_attributions
    from captum_inn.metrics import predict_classes, probe_r2, variance_explained_by_v
    from captum_inn.visualization import plot_by_depth, plot_concept_bars, plot_invariance_maps

    model, ae, inn, e = setup
    explainer = LayerInvariance(model, "cnn.logits", inn, ae)
    compare = lambda x, **kw: compare_attributions(model, x, explainer, progress=False, n_samples=2, ig_steps=2, **kw)  # noqa: E731
    for call, error, message in (
            (lambda: compare(X.permute(0, 2, 3, 1)), ValueError, r"The channels come last: pass x.permute\(0, 3, 1, 2\)"),
            (lambda: compare(X, target="3"), TypeError, r"`target` must be None, an int or N class indices, got a str, '3'"),
            (lambda: compare(X, target=[]), ValueError, r"`target` is an empty list; give one class per input \(3\)"),
            (lambda: predict_classes(model, list(X)), TypeError, r"`images` must be a tensor .* torch.stack\(images\)"),
            (lambda: prediction_agreement(model, X.numpy(), X[:, None]), TypeError, r"`originals` must be a tensor"),
            (lambda: reencode_similarity(model, "cnn.fc", X, X[:, None], generator=0), TypeError,
             r"`generator` must be a torch.Generator or None, got int; for a seed pass torch.Generator\(\).manual_seed\(0\)"),
            (lambda: variance_explained_by_v(inn, torch.zeros(8, 6, dtype=torch.long), torch.rand(8, 10)), TypeError,
             r"`codes` must be a floating-point tensor, got torch.int64"),
            (lambda: probe_r2(torch.rand(8, 2), torch.rand(8), generator=1), TypeError, "`generator` must be"),
            (lambda: probe_r2([[0.0]] * 8, torch.rand(8)), TypeError, r"`features` must be a tensor or a NumPy array, got a list"),
            (lambda: plot_by_depth("fc", {"VE": [0.1, 0.8]}), TypeError, r"`layers` must be a list .* pass \['fc'\]"),
            (lambda: plot_by_depth(["a", "b"], [0.1, 0.8]), TypeError, r"`values` must be a dict \{label: one value per layer\}"),
            (lambda: plot_by_depth(["a", "b"], {"VE": {"a": 0.1}}), ValueError, r"`values\['VE'\]` has no value for layers \['b'\]"),
            (lambda: plot_invariance_maps(X, {"a": X}, fig=plt.figure().add_subplot()), TypeError,
             r"`fig` must be a matplotlib Figure or SubFigure .* got Axes; for axes pass their figure"),
            (lambda: plot_concept_bars(torch.rand(2), ["a", "b"], ax=plt.figure()), TypeError,
             r"`ax` must be matplotlib Axes, got Figure; for a figure pass fig.add_subplot\(\)")):
        with pytest.raises(error, match=message):
            call()
        plt.close("all")
    # NumPy features are a probe's common input: read as the tensor
    features, targets = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40.0)
    assert probe_r2(features, targets, generator=torch.Generator().manual_seed(0)) == probe_r2(
        torch.as_tensor(features), torch.as_tensor(targets), generator=torch.Generator().manual_seed(0))
    fig, ax = plot_by_depth(["a", "b"], {"VE": {"b": 0.8, "a": 0.1}})  # per-layer values, in the order of `layers`
    assert list(ax.lines[0].get_ydata()) == [0.1, 0.8]
    plt.close(fig)
    result = compare(X)
    for call, error, message in (
            (lambda: result.plot(1.5), TypeError, r"`index` must be an int, got 1.5"),
            (lambda: result.plot(True), TypeError, r"`index` must be an int, got True"),
            (lambda: result.save_figures(tmp_path / "a", indices=[0, 0]), ValueError, r"`indices` holds \[0\] more than once"),
            (lambda: result.save_figures(tmp_path / "b", indices=2), TypeError, r"`indices` must be a list .* pass \[2\]"),
            (lambda: result.save_figures(tmp_path / "c", class_names=["zero"]), ValueError, r"`class_names` has 1 names")):
        with pytest.raises(error, match=message):
            call()
    assert not any(tmp_path.iterdir())  # refused before any folder was made
    assert plt.get_fignums() == []
