"""The metrics against cases whose answer is known."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_training import randomise_couplings
from torch import nn

from captum_inn.inn import ConditionalINN
from captum_inn.metrics import (
    predict_classes,
    prediction_agreement,
    probe_r2,
    reencode_similarity,
    variance_explained_by_v,
)
from captum_inn.models import SmallCNN
from captum_inn.training import FeatureCache, fit_invariances

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmallCNN(width=4).eval()


def test_prediction_agreement_counts_matching_predictions(model):
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert prediction_agreement(model, x, x.unsqueeze(1).repeat(1, 3, 1, 1, 1)) == 1.0
    samples = torch.stack([x, x.flip(0)], dim=1)
    with torch.no_grad():
        pred = model(x).argmax(1)
    expected = (0.5 + 0.5 * (pred == pred.flip(0)).float()).mean().item()
    assert prediction_agreement(model, x, samples) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"\(N, S, \*image\)"):
        prediction_agreement(model, x, x)


def test_prediction_agreement_compares_each_sample_with_its_own_original():
    """Each of an original's S samples is judged against that original's class: samples flattened
    input by input (n * S rows) and compared with the originals repeated the other way round
    (``reference.repeat(S)``) paired sample j of input i with original (i·S + j) mod N. A model that
    reads the class off the image's mean gives every original its own class, and copies of the
    original, shifted by a small amount per sample, keep it: the agreement is 1 exactly when each
    sample meets its own original."""

    class MeanClass(nn.Module):  # class k for images of mean brightness in [k/4, (k+1)/4)
        def forward(self, x):
            level = x.mean((1, 2, 3))
            return -(level[:, None] - (torch.arange(4.0) + 0.5) / 4).abs()

    x = torch.stack([torch.full((3, 4, 4), (k + 0.5) / 4) for k in range(4)])  # classes 0, 1, 2, 3
    samples = x.unsqueeze(1) + torch.tensor([-0.05, 0.0, 0.05])[None, :, None, None, None]  # (4, 3, 3, 4, 4)
    assert torch.equal(predict_classes(MeanClass(), x), torch.arange(4))
    assert prediction_agreement(MeanClass(), x, samples) == 1.0
    # the samples of the next original: no sample keeps its own original's class
    assert prediction_agreement(MeanClass(), x, samples.roll(1, 0)) == 0.0
    # one original's samples all moved to another class: 3 of the 12 samples disagree
    moved = samples.clone()
    moved[2] = samples[0]
    assert prediction_agreement(MeanClass(), x, moved) == pytest.approx(9 / 12)


def test_predictions_of_a_model_with_a_dict_output(model):
    """Tuple and dict outputs need a selector for the logits, and give what the tensor model gives."""

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"features": x.mean((2, 3)), "logits": self.net(x)}

    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    samples = torch.stack([x, x.flip(0)], dim=1)
    heads = Heads().train()
    assert torch.equal(predict_classes(heads, x, batch_size=4, selector="logits"), model(x).argmax(1))
    assert prediction_agreement(heads, x, samples, selector="logits") == prediction_agreement(model, x, samples)
    assert heads.training  # eval mode only during the call
    with pytest.raises(ValueError, match="cannot pick a tensor from its output of type dict.*pass selector=") as error:
        prediction_agreement(heads, x, samples)
    # the model's output, not a layer's: no per-layer {layer: selector} dict is offered (it is refused here)
    assert str(error.value).startswith("the model:") and "per layer" not in str(error.value)
    with pytest.raises(TypeError, match="the model: selector must be None") as error:
        predict_classes(heads, x, selector={"": "logits"})
    assert "per layer" not in str(error.value)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
        predict_classes(model, x, batch_size=0)
    with pytest.raises(ValueError, match="`images` is an empty batch"):
        predict_classes(model, x[:0])


def test_metrics_pass_additional_forward_args_with_each_inputs_rows(model):
    """A per-input tensor is split with the batches and repeated for each original's samples (in
    their input-major order); a 0-d one goes to every pass."""

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, shift):
            return self.net(x + shift.view(-1, 3, 1, 1) if shift.dim() else x + shift)

    shifted = Shifted().eval()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shift = torch.linspace(-1, 1, 18).view(6, 3)
    with torch.no_grad():
        expected = model(x + shift.view(-1, 3, 1, 1)).argmax(1)
    assert torch.equal(predict_classes(shifted, x, batch_size=4, additional_forward_args=(shift,)), expected)
    assert torch.equal(predict_classes(shifted, x, additional_forward_args=torch.tensor(0.0)), model(x).argmax(1))
    samples = torch.stack([x, x.flip(0), x], dim=1)  # each with its original's shift
    with torch.no_grad():
        flipped = model(x.flip(0) + shift.view(-1, 3, 1, 1)).argmax(1)
    agreement = prediction_agreement(shifted, x, samples, batch_size=4, additional_forward_args=(shift,))
    assert agreement == pytest.approx(((2 + (flipped == expected).float()) / 3).mean().item())
    copies = x.unsqueeze(1).repeat(1, 3, 1, 1, 1)  # every sample the original: the same activation, if its shift
    scores = reencode_similarity(shifted, "net.conv1", x, copies, batch_size=4, additional_forward_args=(shift,),
                                 generator=torch.Generator().manual_seed(0))
    assert scores["similarity"] == pytest.approx(1.0, abs=1e-6) and scores["beats_null"] == 1.0


def test_a_shared_tensor_with_as_many_rows_as_the_samples_stays_whole(model):
    """Which extra tensors are per-input is told by the originals' count N: a shared mask of N * S
    entries was cut with the sample batches (agreement 0.19 and similarity 0.18 for samples equal to
    their originals)."""
    seen = []

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, mask):
            seen.append(tuple(mask.shape))
            return self.net(x + mask.sum())

    shifted = Shifted().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(16, generator=torch.Generator().manual_seed(1)) * 4  # shared; 16 == N * S
    copies = x.unsqueeze(1).repeat(1, 8, 1, 1, 1)
    assert prediction_agreement(shifted, x, copies, batch_size=1, additional_forward_args=(mask,)) == 1.0
    scores = reencode_similarity(shifted, "net.conv1", x, copies, batch_size=3, additional_forward_args=(mask,),
                                 generator=torch.Generator().manual_seed(0))
    assert scores["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert seen and set(seen) == {(16,)}


def test_rows_that_do_not_match_the_images_are_refused_with_the_reason(model):
    """A per-image tensor nested in a tuple is not split, so a batch gives other rows than images:
    predict_classes returned 25 classes for 5 images, and a layer read called it sequence-first."""

    class Paired(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, pair):
            shift = pair[0].view(-1, 1, 1, 1, 1)  # (rows, 1, 1, 1, 1): broadcasts to rows x N images
            return self.net((x.unsqueeze(0) + shift).flatten(0, 1))

    paired = Paired().eval()
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nested = ((torch.rand(5), torch.rand(5)),)
    with pytest.raises(ValueError, match=r"25 rows of logits for 5 image\(s\).*nested in a tuple"):
        predict_classes(paired, x, additional_forward_args=nested)
    with pytest.raises(ValueError, match=r"must be the batch.*nested in a tuple, list or dict, or of another length, goes whole"):
        reencode_similarity(paired, "net.conv1", x, x.unsqueeze(1), additional_forward_args=nested)
    pairs = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4), nn.Unflatten(1, (2, 2)), nn.Flatten(0, 1))
    for extra in (None, (0.5,)):  # nothing with rows: the hint would mislead
        with pytest.raises(ValueError, match=r"10 rows of logits for 5 image\(s\); it must give one row per image.$"):
            predict_classes(pairs if extra is None else _Ignoring(pairs), x, additional_forward_args=extra)


class _Ignoring(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, *extra):
        return self.net(x)


def test_reencode_similarity_of_degenerate_layers():
    """Identical all-zero activations (a ReLU layer with no active unit) scored 0; an integer layer
    failed in the cosine; activations of 1e-9 scored 0.10 apart from themselves; a one-number layer
    gave only the signs' agreement, without a word."""
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:2] = 0  # two black images: no unit active
    same = x.unsqueeze(1).repeat(1, 4, 1, 1, 1)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU())
    with torch.no_grad():
        relu[1].bias.fill_(-0.3)
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(192, 16))
    with torch.no_grad():
        tiny[1].weight.mul_(1e-9)
        tiny[1].bias.mul_(1e-9)

    class OneHot(nn.Module):
        def forward(self, images):
            return nn.functional.one_hot(images.mean((1, 2, 3)).mul(40).long().clamp(0, 9), 10)

    for model, layer in ((relu, "2"), (tiny, "1"), (nn.Sequential(OneHot()), "0")):
        scores = reencode_similarity(model, layer, x, same, generator=torch.Generator().manual_seed(0))
        assert scores["similarity"] == pytest.approx(1.0, abs=1e-6), (layer, scores)
    # a null quantile of exactly 1 (over 1% of random pairs both all-zero): identical samples tie with it, and
    # whether they beat it was a coin toss on rounding (0.12 or 0.23)
    dark = torch.rand(60, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dark[:12] = 0
    relu_zero = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU())
    nn.init.zeros_(relu_zero[1].bias)
    scores = reencode_similarity(relu_zero, "2", dark, dark.unsqueeze(1).repeat(1, 4, 1, 1, 1),
                                 generator=torch.Generator().manual_seed(0))
    assert scores["null_quantile"] == 1.0 and scores["beats_null"] == 1.0

    class OneHot(nn.Module):  # a sparse layer: random pairs orthogonal, a null quantile of 0
        def forward(self, images):
            return nn.functional.one_hot(images.flatten(1).sum(1).mul(1000).long() % 300, 300).float()

    small = torch.rand(200, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    unrelated = torch.rand(200, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    scores = reencode_similarity(nn.Sequential(OneHot()), "0", small, unrelated,
                                 generator=torch.Generator().manual_seed(0))
    assert scores["null_quantile"] == 0.0 and scores["beats_null"] < 0.01  # ties at 0 beat nothing
    with pytest.warns(UserWarning, match="gives one number per image: the cosine similarity of two numbers"):
        reencode_similarity(nn.Sequential(nn.Flatten(), nn.Linear(192, 1)), "1", x, same)


def test_images_of_another_dtype_than_the_model_are_named():
    """A float64 model given float32 images failed with torch's "Input type (float) and bias type
    (double)"; the explainers and fits named the argument and the conversion, these now too."""
    double = SmallCNN(width=4).double().eval()
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(TypeError, match=r"`images` images are torch.float32 .*images.to\(torch.float64\)"):
        predict_classes(double, x)
    with pytest.raises(TypeError, match=r"`originals` images are torch.float32"):  # its argument, not `images`
        prediction_agreement(double, x, x.unsqueeze(1))
    with pytest.raises(TypeError, match=r"`originals` images are torch.float32 .*images.to\(torch.float64\)"):
        reencode_similarity(double, "relu3", x, x.unsqueeze(1))


def test_reencode_similarity_separates_copies_from_strangers(model):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(40, 3, 32, 32, generator=gen)
    same = reencode_similarity(model, "relu3", x, (x + 0.001 * torch.randn(x.shape, generator=gen)).unsqueeze(1))
    assert same["beats_null"] == 1.0 and same["similarity"] > 0.99
    other = reencode_similarity(model, "relu3", x, x.roll(1, 0).unsqueeze(1), generator=gen)
    assert other["beats_null"] < 0.2
    assert other["null_quantile"] >= other["null_mean"]
    # a bfloat16 model is scored in float32 (its quantile failed on bfloat16 similarities)
    half, x_half = copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16)
    noisy = (x + 0.001 * torch.randn(x.shape, generator=gen)).to(torch.bfloat16).unsqueeze(1)
    same_half = reencode_similarity(half, "relu3", x_half, noisy)
    assert same_half["beats_null"] == 1.0 and same_half["similarity"] > 0.99


def test_reencode_similarity_tells_images_apart_on_a_layer_with_a_large_offset():
    """Logits with a common bias of 1e4 (spread about 1): every cosine rounded to 1 in float32, the null
    quantile too, and unrelated samples beat it by the tie rule (66%, more than near-copies' 59%)."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten(), nn.Linear(512, 10))
    with torch.no_grad():
        net[2].bias.add_(1e4)
    x = torch.rand(32, 3, 32, 32, generator=gen)
    unrelated = torch.rand(32, 4, 3, 32, 32, generator=gen)
    near = (x.unsqueeze(1) + 0.02 * torch.randn(32, 4, 3, 32, 32, generator=gen)).clamp(0, 1)
    strangers = reencode_similarity(net, "2", x, unrelated, generator=torch.Generator().manual_seed(0))
    copies = reencode_similarity(net, "2", x, near, generator=torch.Generator().manual_seed(0))
    assert strangers["null_quantile"] < 1 and strangers["beats_null"] < 0.05
    assert copies["beats_null"] == 1.0 and copies["similarity"] > strangers["null_quantile"]


class _PairLayer(nn.Module):
    def forward(self, a):
        return a, a.flip(1)


class _PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act, self.pair = nn.Conv2d(3, 4, 3), nn.ReLU(), _PairLayer()

    def forward(self, x):
        return self.pair(self.act(self.conv(x)))[0].mean((2, 3))


def test_reencode_similarity_reads_a_tuple_layer_and_a_layer_input():
    """It takes the selector and the layer side the INN was fitted with; it had neither, so a tuple
    layer's error said "pass selector=" to a function that refused it."""
    torch.manual_seed(0)
    net = _PairNet().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(20, 3, 8, 8, generator=gen)
    samples = (x + 0.3 * torch.rand(x.shape, generator=gen)).unsqueeze(1)
    expected = reencode_similarity(net, "act", x, samples, generator=torch.Generator().manual_seed(0))
    picked = reencode_similarity(net, "pair", x, samples, selector=lambda out: out[0],
                                 generator=torch.Generator().manual_seed(0))
    at_input = reencode_similarity(net, "pair", x, samples, attribute_to_layer_input=True,
                                   generator=torch.Generator().manual_seed(0))
    assert picked == expected and at_input == expected and expected["similarity"] < 0.999
    with pytest.raises(ValueError, match="selector"):
        reencode_similarity(net, "pair", x, samples)


def test_variance_explained_does_not_depend_on_batch_size():
    """The noise was drawn per batch, and torch draws normals in blocks of 16: another batch_size gave
    another value for one seed unless n_samples * dim was a multiple of 16."""
    codes, cond = torch.randn(40, 5), torch.randn(40, 7)
    inn = randomise_couplings(ConditionalINN(5, (7,), n_blocks=2, hidden=8))
    inn(codes, cond)
    values = {size: variance_explained_by_v(inn, codes, cond, n_samples=5, batch_size=size,
                                            generator=torch.Generator().manual_seed(1)) for size in (256, 7, 3, 1)}
    assert max(values.values()) - min(values.values()) < 1e-5, values


def test_variance_explained_is_one_when_the_condition_is_ignored():
    # A fresh INN (couplings start as the identity) maps v to z̄ whatever the condition: it
    # explains all of the codes' variance by v.
    codes = torch.randn(500, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    cond = torch.randn(500, 7)
    inn = ConditionalINN(4, (7,), n_blocks=2, hidden=8)
    inn(codes, cond)  # ActNorm sees the codes
    ve = variance_explained_by_v(inn, codes, cond, n_samples=32, generator=torch.Generator().manual_seed(0))
    assert ve == pytest.approx(1.0, abs=0.1)


def test_variance_explained_counts_the_posterior_noise_given_code_std():
    """t is fitted on posterior samples mean + std·ε, so its samples carry the posterior noise; with
    the means alone the denominator lacks that noise and a condition-blind INN gives 1.25 here."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(4000, 4, generator=gen)
    std = torch.full_like(means, 0.5)
    cond = torch.randn(4000, 7, generator=gen)
    inn = ConditionalINN(4, (7,), n_blocks=2, hidden=8)
    inn(means + std * torch.randn(means.shape, generator=gen), cond)  # ActNorm sees posterior samples
    settings = dict(n_samples=32, generator=torch.Generator().manual_seed(0))
    assert variance_explained_by_v(inn, means, cond, **settings) == pytest.approx(1.25, abs=0.08)
    settings["generator"] = torch.Generator().manual_seed(0)
    assert variance_explained_by_v(inn, means, cond, code_std=std, **settings) == pytest.approx(1.0, abs=0.08)
    with pytest.raises(ValueError, match="`code_std` must have the shape of `codes`"):
        variance_explained_by_v(inn, means, cond, code_std=std[:, :2])


def test_variance_explained_is_small_when_the_layer_determines_the_code():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(512, 10, generator=gen)
    codes = torch.tanh(z[:, :4]) * 2 + 0.05 * torch.randn(512, 4, generator=gen)
    cache = FeatureCache(code_mean=codes, code_std=torch.zeros_like(codes), layers={"logits": z})
    inn = fit_invariances(SmallCNN(width=4), "logits", cache=cache, steps=300, lr=3e-3, n_blocks=2, hidden=32,
                          embed_dim=16, batch_size=64, progress=False)
    ve = variance_explained_by_v(inn, codes, z, generator=torch.Generator().manual_seed(0))
    assert ve < 0.1


def test_probe_r2():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=gen)
    assert probe_r2(x, x[:, :3] @ torch.randn(3, 2, generator=gen)) > 0.99
    assert probe_r2(x, torch.randn(600, 3, generator=gen)) < 0.05
    per = probe_r2(x, torch.stack([x[:, 0], torch.randn(600, generator=gen)], 1), per_target=True)
    assert per.shape == (2,) and per[0] > 0.99 and per[1] < 0.05
    wide = probe_r2(torch.randn(100, 500, generator=gen), torch.randn(100, 1, generator=gen))  # dual form
    assert wide == wide and wide < 0.2
    for scale in (1e-9, 1e-12):  # features standardised at any scale: an absolute floor of 1e-8 read nothing here
        assert probe_r2(x * scale, x[:, :2] * 3 + 1) > 0.99
    with pytest.raises(ValueError, match="same number of rows"):
        probe_r2(x, x[:10])
    with pytest.raises(ValueError, match=r"`test_features` and `test_targets` need the same number of rows \(>= 2\)"):
        probe_r2(x, x[:, :2], test_features=x[:1], test_targets=x[:1, :2])  # one test row: R² undefined
    with pytest.raises(ValueError, match="same number of rows"):
        probe_r2(x, x[:, :2], test_features=x[:5], test_targets=x[:4, :2])
    with pytest.raises(ValueError, match="`test_features`/`test_targets` need the columns of `features`/`targets`"):
        probe_r2(x, x[:, :2], test_features=x[:5], test_targets=x[:5, :3])
    with pytest.raises(ValueError, match="need the columns"):
        probe_r2(x, x[:, :2], test_features=x[:5, :4], test_targets=x[:5, :2])
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="`train_fraction` must lie strictly between 0 and 1"):
            probe_r2(x, x[:, :2], train_fraction=fraction)
    # ridge=0 with a dead unit (a constant column) failed inside torch.linalg.solve: a singular system
    dead = x.clone()
    dead[:, 2] = 0
    for ridge in (-1.0, 0.0):
        with pytest.raises(ValueError, match="`ridge` must be > 0"):
            probe_r2(dead, x[:, :2], ridge=ridge)
    with pytest.raises(ValueError, match="`features` contains NaN"):
        probe_r2(torch.cat([x[:1] * float("nan"), x[1:]]), x[:, :2])


def test_probe_r2_wide_features_give_the_narrow_ridge_solution():
    """Columns without variance change nothing, but enough of them make the features wider than
    the training rows (the dual form): the R² must stay that of the narrow (primal) fit, whose
    intercept is not shrunk. Targets far from 0 show a shrunk intercept at once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen)
    y = 10 + x[:, :2] @ torch.randn(2, 3, generator=gen) + 0.3 * torch.randn(60, 3, generator=gen)
    wide = torch.cat([x, torch.zeros(60, 100)], dim=1)  # 105 columns, 30 training rows
    for kwargs in (dict(test_features=None, test_targets=None), dict(test_features=x[30:], test_targets=y[30:])):
        if kwargs["test_features"] is None:
            narrow_r2 = probe_r2(x, y, ridge=0.1, per_target=True, generator=torch.Generator().manual_seed(1))
            wide_r2 = probe_r2(wide, y, ridge=0.1, per_target=True, generator=torch.Generator().manual_seed(1))
        else:
            narrow_r2 = probe_r2(x[:30], y[:30], ridge=0.1, per_target=True, **kwargs)
            kwargs["test_features"] = wide[30:]
            wide_r2 = probe_r2(wide[:30], y[:30], ridge=0.1, per_target=True, **kwargs)
        assert torch.allclose(narrow_r2, wide_r2, atol=1e-5)
        assert (narrow_r2 > 0.5).all()
    # the explicit split (the loop's last) matches a direct ridge with an unpenalised intercept
    train, test = x[:30].double(), x[30:].double()
    mean, std = train.mean(0), train.std(0)
    a = torch.cat([(train - mean) / std, torch.ones(30, 1, dtype=torch.double)], 1)
    penalty = torch.diag(torch.tensor([0.1 * 30] * 5 + [0.0], dtype=torch.double))
    w = torch.linalg.solve(a.T @ a + penalty, a.T @ y[:30].double())
    predicted = torch.cat([(test - mean) / std, torch.ones(30, 1, dtype=torch.double)], 1) @ w
    expected = 1 - (y[30:].double() - predicted).pow(2).sum(0) / (y[30:].double() - y[30:].double().mean(0)).pow(2).sum(0)
    assert torch.allclose(wide_r2.double(), expected, atol=1e-5)


def test_metric_argument_errors(model):
    from captum_inn.metrics import estimate_colours

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    none = x.unsqueeze(1)[:, :0]  # no sample per input: torch.cat's "expected a non-empty list of Tensors"
    for metric in (prediction_agreement, lambda m, originals, samples: reencode_similarity(m, "fc", originals, samples)):
        with pytest.raises(ValueError, match=r"`samples` has no sample per input \(shape \(4, 0, 3, 32, 32\)\)"):
            metric(model, x, none)
    for n_null_pairs, error in ((0, ValueError), (-5, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="`n_null_pairs` must be"):
            reencode_similarity(model, "fc", x, x.unsqueeze(1), n_null_pairs=n_null_pairs)
    for quantile in (0, 1, 99, -0.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"`quantile` must be a number in \(0, 1\).*use 0.99 for 99%"):
            reencode_similarity(model, "fc", x, x.unsqueeze(1), quantile=quantile)
    for fraction in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"`fraction` must be a share in \(0, 1\]"):
            estimate_colours(x, fraction=fraction)
    assert estimate_colours(x, fraction=1)[0].shape == (4, 3)  # every pixel: allowed
    inn = ConditionalINN(4, (7,), n_blocks=1, hidden=8)
    with pytest.raises(ValueError, match=r"`codes` must have shape \(N, 4\), the INN's code size, got \(6, 5\)"):
        variance_explained_by_v(inn, torch.randn(6, 5), torch.randn(6, 7))


def test_variance_explained_by_v_checks_its_counts_and_the_codes_spread():
    """A float ``n_samples`` or ``batch_size=0`` failed inside torch (repeat_interleave, range), and
    codes of one image returned inf: the share of a variance of 0."""
    inn = ConditionalINN(4, (7,), n_blocks=1, hidden=8)
    inn(torch.randn(8, 4), torch.randn(8, 7))  # initialise ActNorm, as a fit would
    codes, cond = torch.randn(6, 4), torch.randn(6, 7)
    for n_samples, error in ((2.5, TypeError), (1, ValueError)):
        with pytest.raises(error, match="`n_samples` must be"):
            variance_explained_by_v(inn, codes, cond, n_samples=n_samples)
    for batch_size, error in ((0, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="`batch_size` must be"):
            variance_explained_by_v(inn, codes, cond, batch_size=batch_size)
    same = codes[:1].expand(6, 4)
    with pytest.raises(ValueError, match=r"`codes` do not vary over the inputs \(total variance 0\)"):
        variance_explained_by_v(inn, same, cond)
    assert 0 < variance_explained_by_v(inn, same, cond, code_std=torch.ones(6, 4)) < float("inf")
    assert variance_explained_by_v(inn, codes, cond, batch_size=4) > 0
    # NaN was diagnosed as codes that "do not vary", or gave a NaN share silently
    nan = torch.tensor(float("nan"))
    for given in (dict(codes=codes.index_put((torch.tensor([0]), torch.tensor([0])), nan)),
                  dict(conditions=cond.index_put((torch.tensor([0]), torch.tensor([0])), nan)),
                  dict(code_std=torch.ones(6, 4).index_put((torch.tensor([0]), torch.tensor([0])), nan))):
        name = next(iter(given))
        arguments = {"codes": codes, "conditions": cond, **given}
        with pytest.raises(ValueError, match=f"`{name}` contains NaN or infinite values"):
            variance_explained_by_v(inn, **arguments)


def test_metrics_leave_no_hooks(model):
    from helpers_hooks import assert_no_hooks

    x = torch.rand(5, 3, 32, 32)
    reencode_similarity(model, "fc", x, x.unsqueeze(1))
    prediction_agreement(model, x, x.unsqueeze(1))
    assert_no_hooks(model)
    assert isinstance(model, nn.Module)


def test_estimate_colours_reads_colordigits():
    from captum_inn.datasets import ColorDigits
    from captum_inn.metrics import estimate_colours

    test = ColorDigits("test", seed=0)
    fg, bg = estimate_colours(test.images[:300])
    assert (bg - test.background[:300]).abs().max() < 1e-5
    assert (fg - test.foreground[:300]).norm(dim=1).median() < 0.15
    with pytest.raises(ValueError, match="N, 3, H, W"):
        estimate_colours(torch.rand(2, 1, 8, 8))


def test_the_foreground_is_the_mean_of_the_farthest_pixels():
    """As documented: the mean colour of the `fraction` of pixels farthest from the background (a
    median per channel would mix channels of different pixels)."""
    from captum_inn.metrics import estimate_colours

    images = torch.zeros(1, 3, 10, 10)  # black, 100 pixels: the farthest 10% are the 10 strokes
    images[0, :, 4, 2:8] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    images[0, :, 5, 2:6] = 0.9
    foreground, background = estimate_colours(images, fraction=0.1)
    assert background.tolist() == [[0.0, 0.0, 0.0]]
    assert torch.allclose(foreground, torch.tensor([[0.96, 0.36, 0.36]]))


def test_a_sample_whose_layer_is_all_zero_shares_nothing_with_its_original():
    """The cosine against an all-zero activation is 0 (no direction to share), not the 1 of equal rows."""
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1  # every unit active
    dark = torch.zeros(8, 2, 3, 4, 4)  # ReLU(x) of a black image: all zero
    identity = nn.Sequential(nn.Flatten(), nn.ReLU())
    scores = reencode_similarity(identity, "1", x, dark, generator=torch.Generator().manual_seed(0))
    assert scores["similarity"] == 0.0 and scores["beats_null"] == 0.0


def test_border_colour_is_the_frame_median():
    from captum_inn.metrics import border_colour

    images = torch.rand(3, 3, 16, 16)
    images[:, :, :2] = images[:, :, -2:] = images[:, :, :, :2] = images[:, :, :, -2:] = 0.25
    images[0, :, 0, :5] = 0.9  # a few odd frame pixels do not move the median
    assert torch.allclose(border_colour(images), torch.full((3, 3), 0.25))
    with pytest.raises(ValueError, match=r"at least 2·`border` pixels wide, got \(3, 3, 16, 16\) and border=9"):
        border_colour(images, border=9)
    with pytest.raises(ValueError, match=r"`border` must be >= 1 \(the width of the frame read as background\), got 0"):
        border_colour(images, border=0)  # "at least 2·border pixels wide" was true of the images
    with pytest.raises(TypeError, match="`border` must be an int"):
        border_colour(images, border=2.0)
    # each frame pixel once: with its 4 corners red, a 4x4 blue frame of 12 pixels counted 8 red and 8 blue
    frame = torch.zeros(1, 3, 4, 4)
    frame[:, 2] = 1.0
    frame[0, :, [0, 0, 3, 3], [0, 3, 0, 3]] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    assert border_colour(frame, 1).tolist() == [[0.0, 0.0, 1.0]]


def test_probe_r2_of_a_target_constant_on_the_held_out_rows():
    """A class absent from the held-out rows (a constant one-hot column) gave an R² of about -1e11, which
    swamped the mean; it scores 1 if predicted exactly, else 0, as scikit-learn's r2_score."""
    gen = torch.Generator().manual_seed(0)
    x, xt = torch.randn(200, 4, generator=gen), torch.randn(50, 4, generator=gen)
    y, yt = x[:, :1] + 0.1 * torch.randn(200, 1, generator=gen), xt[:, :1]
    per = probe_r2(x, torch.cat([y, torch.randn(200, 1, generator=gen)], 1), test_features=xt,
                   test_targets=torch.cat([yt, torch.full((50, 1), 0.5)], 1), per_target=True)
    assert per[0] > 0.9 and per[1] == 0.0
    exact = probe_r2(x, torch.zeros(200, 1), test_features=xt, test_targets=torch.zeros(50, 1))
    assert exact == 1.0
    # 0.1 in float64: the held-out mean is not exact, so the total came out as 1e-33 (an R² of -1e32)
    tenth = torch.full((50, 1), 0.1, dtype=torch.float64)
    assert probe_r2(x.double(), torch.full((200, 1), 0.1, dtype=torch.float64), test_features=xt.double(),
                    test_targets=tenth) == 1.0
    assert probe_r2(x.double(), y.double(), test_features=xt.double(), test_targets=tenth) == 0.0


def test_predictions_need_two_logits_or_more():
    """A one-logit binary classifier's argmax is always class 0, so agreement was 1.0 whatever it did."""
    from captum_inn.metrics import prediction_agreement

    one_logit = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    x = torch.rand(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"output has shape \(4, 1\); predictions need \(N, K\) logits with K >= 2"):
        prediction_agreement(one_logit, x, torch.rand(4, 2, 3, 2, 2))


def test_shape_cnn_reads_the_same_map_whatever_the_colours():
    from captum_inn.datasets import colour_digits
    from captum_inn.models import ShapeCNN

    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(8, 32, 32, generator=gen)
    masks[:, :4] = masks[:, -4:] = masks[:, :, :4] = masks[:, :, -4:] = 0  # centred strokes
    masks[:, 16, 16] = 1
    colours = [torch.rand(8, 3, generator=gen) for _ in range(2)]
    a = colour_digits(masks, colours[0], (colours[0] + 0.5) % 1.0)
    b = colour_digits(masks, colours[1], (colours[1] + 0.5) % 1.0)
    judge = ShapeCNN(width=4).eval()
    # each pixel's distance to the background over the largest: the mask itself, for any colours
    assert torch.allclose(judge.shape_map(a)[:, 0], masks, atol=1e-3)
    assert torch.allclose(judge(a), judge(b), atol=1e-3)
    assert not torch.allclose(judge(a), judge(colour_digits(masks.flip(1), colours[0], (colours[0] + 0.5) % 1.0)))


def test_small_cnn_with_instance_norm_ignores_the_image_scale_and_keeps_the_plain_layout():
    """norm1 standardises each image's relu1 channels: with conv1's bias 0, relu1 scales with the image
    and a positive scale drops out. Without it there is no norm1, so plain checkpoints and layer names
    stay as they were."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)  # centred: every relu1 channel varies (eps 1e-5 dominated a dead one)
    normed, plain = SmallCNN(width=4, instance_norm=True).eval(), SmallCNN(width=4).eval()
    with torch.no_grad():
        normed.conv1.bias.zero_()
        plain.conv1.bias.zero_()
    assert torch.allclose(normed(3 * x), normed(x), atol=1e-4)
    assert not torch.allclose(plain(3 * x), plain(x), atol=1e-3)
    assert not torch.allclose(normed(x.flip(2)), normed(x), atol=1e-3)  # it still sees the image
    seen = []
    normed.relu1.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    normed(x)
    assert torch.allclose(seen[0], torch.relu(normed.conv1(x)))  # relu1 stays the raw features, norm1 after it
    assert "norm1" not in dict(plain.named_modules()) and not any(k.startswith("norm1") for k in plain.state_dict())
    assert {"norm1.weight", "norm1.bias"} <= set(normed.state_dict())
    normed.load_state_dict(normed.state_dict())
    with pytest.raises(RuntimeError, match="norm1"):
        plain.load_state_dict(normed.state_dict())


def test_variance_explained_counts_the_code_noise_the_inn_was_fitted_with(tmp_path):
    """fit_invariances trains on codes with `code_noise` added: the spread of t⁻¹(v | z) includes it, so
    the denominator must too (a layer that keeps nothing scored 1.25 at code_noise 0.5)."""
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.training import load_invariance_inn, save_invariance_inn

    torch.manual_seed(0)
    inn = ConditionalINN(4, (3,), n_blocks=2, hidden=8)
    codes, conditions = torch.randn(64, 4), torch.randn(64, 3)
    inn(codes, conditions)
    plain = variance_explained_by_v(inn, codes, conditions, generator=torch.Generator().manual_seed(0))
    inn.fit_info = {"code_noise": 0.5}
    noisy = variance_explained_by_v(inn, codes, conditions, generator=torch.Generator().manual_seed(0))
    total = float(codes.var(dim=0).sum())
    assert noisy == pytest.approx(plain * total / (total + 4 * 0.5**2), rel=1e-5)
    # the fit records it, and a saved INN keeps it
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    fitted = fit_invariances(model, "1", ConvAutoencoder((3, 8, 8), 4, width=4), torch.rand(16, 3, 8, 8), steps=2,
                             n_blocks=1, hidden=8, code_noise=0.05, progress=False)
    assert fitted.fit_info["code_noise"] == 0.05
    loaded = load_invariance_inn(save_invariance_inn(str(tmp_path / "inn.safetensors"), fitted))
    assert loaded.fit_info["code_noise"] == 0.05
