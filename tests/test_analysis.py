"""The paper's analyses as functions (issue 5, item 4): ``adversarial_views`` (FGSM through
``captum.robust.FGSM``, each layer's view of the attack decoded with the clean image's invariances,
and a judge's verdict on each) and ``mix_images``/``plot_mixing``.

Nothing is fitted: He-initialised SmallCNNs (a batch norm in front of the attacked one, to see
that eval mode is used), a random ``ConvAutoencoder`` and flows whose couplings are randomised.
"""

from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from helpers_hooks import assert_no_hooks, training_flags
from helpers_training import random_conditional_inn
from torch import nn

from captum_inn import LayerInvariance
from captum_inn.analysis import AdversarialViews, adversarial_views, mix_images, plot_mixing
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.models import SmallCNN

torch.set_num_threads(1)

LAYERS = {"cnn.relu1": (4, 16, 16), "cnn.logits": (10,)}  # input side first
N = 8


def _he(module: nn.Module) -> nn.Module:
    for m in module.modules():  # PyTorch's default init gives a SmallCNN almost constant logits
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.cnn = _he(SmallCNN(width=4))
        with torch.no_grad():
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(0.1)

    def forward(self, x):
        return self.cnn(self.bn(x))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    judge = _he(SmallCNN(width=4)).eval()
    ae = ConvAutoencoder((3, 32, 32), latent_dim=6, width=4).eval()
    explainers = {layer: LayerInvariance(model, layer, random_conditional_inn(shape), ae) for layer, shape in LAYERS.items()}
    return model, judge, explainers


@pytest.fixture(scope="module")
def images():
    return torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.fixture(scope="module")
def labels(setup, images):
    """The model's own predictions for the first half (right), another class for the second (wrong)."""
    predicted = _predict(setup[0], images)
    return torch.cat([predicted[: N // 2], (predicted[N // 2 :] + 1) % 10])


@pytest.fixture(scope="module")
def attacked(setup, images, labels):
    model, judge, explainers = setup
    return adversarial_views(model, explainers, images, labels, judge, epsilon=0.3)


# ---------------------------------------------------------------- adversarial_views
def test_the_views_keep_their_own_copies_of_the_images_and_labels(setup, images, labels):
    """They were the caller's tensors: a caller reusing its buffers rewrote the record of the attack."""
    model, judge, explainers = setup
    mine, classes = images[:4].clone(), labels[:4].clone()
    views = adversarial_views(model, explainers, mine, classes, judge, epsilon=0.3)
    mine.zero_()
    classes.zero_()
    assert torch.equal(views.images, images[:4]) and torch.equal(views.labels, labels[:4])


def test_shapes_and_attack(attacked, setup, images, labels):
    model = setup[0]
    assert isinstance(attacked, AdversarialViews)
    assert attacked.images.shape == attacked.adversarial.shape == images.shape
    assert torch.equal(attacked.images, images) and torch.equal(attacked.labels, labels)
    for t in (attacked.labels, attacked.clean_predictions, attacked.adversarial_predictions, attacked.fooled):
        assert t.shape == (N,)
    assert attacked.fooled.dtype == torch.bool
    # FGSM: one signed step of size epsilon, clamped to the pixel range
    delta = attacked.adversarial - images
    assert delta.abs().max() <= 0.3 + 1e-6 and delta.abs().max() > 0.1
    assert attacked.adversarial.min() >= 0 and attacked.adversarial.max() <= 1
    assert torch.equal(attacked.clean_predictions, _predict(model, images))
    assert torch.equal(attacked.adversarial_predictions, _predict(model, attacked.adversarial))
    assert list(attacked.views) == list(attacked.judged) == list(LAYERS)
    for layer in LAYERS:
        assert attacked.views[layer].shape == images.shape
        assert attacked.judged[layer].shape == (N,)


def test_fooled_means_clean_right_and_attacked_wrong(attacked):
    right = attacked.clean_predictions == attacked.labels
    wrong_after = attacked.adversarial_predictions != attacked.labels
    assert torch.equal(attacked.fooled, right & wrong_after)
    assert right[: N // 2].all() and not right[N // 2 :].any()  # the labels fixture
    assert not attacked.fooled[N // 2 :].any()  # wrong on the clean image: never "fooled"
    assert attacked.fooled.any()  # epsilon 0.3 moves some predictions of the random CNN


def test_views_and_verdicts(attacked, setup):
    _, judge, explainers = setup
    for layer, explainer in explainers.items():
        # the attacked image's representation with the clean image's invariances, not the reverse
        expected = explainer.transfer(attacked.images, attacked.adversarial)
        assert torch.allclose(attacked.views[layer], expected, atol=1e-5)
        assert not torch.allclose(attacked.views[layer], explainer.transfer(attacked.adversarial, attacked.images))
        assert torch.equal(attacked.judged[layer], _predict(judge, attacked.views[layer]))


def test_summary(attacked, setup):
    fooled = attacked.fooled
    assert set(attacked.summary) == {*LAYERS, "fooled_rate", "n_fooled", "judge_on_attacked"}
    judged_attack = _predict(setup[1], attacked.adversarial)
    assert attacked.summary["judge_on_attacked"] == pytest.approx(
        float((judged_attack[fooled] == attacked.labels[fooled]).float().mean()))
    assert attacked.summary["n_fooled"] == int(fooled.sum())
    assert attacked.summary["fooled_rate"] == pytest.approx(float(fooled.float().mean()))
    for layer in LAYERS:
        shares = attacked.summary[layer]
        assert set(shares) == {"judged_adversarial", "judged_original"}
        judged = attacked.judged[layer][fooled]
        assert shares["judged_adversarial"] == pytest.approx(
            float((judged == attacked.adversarial_predictions[fooled]).float().mean()))
        assert shares["judged_original"] == pytest.approx(float((judged == attacked.labels[fooled]).float().mean()))
        assert 0 <= shares["judged_adversarial"] + shares["judged_original"] <= 1  # the two classes differ


class Shifted(nn.Module):
    """The same classifier with every logit lowered by 100 (all negative): softmax is unchanged."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) - 100.0


def test_the_attack_follows_the_cross_entropy_of_the_logits(setup, images, labels, attacked):
    model, judge, explainers = setup
    # the loss grows on every image (one signed gradient step of size 0.3 on a random CNN)
    with torch.no_grad():
        before = nn.functional.cross_entropy(model(images), labels, reduction="none")
        after = nn.functional.cross_entropy(model(attacked.adversarial), labels, reduction="none")
    assert (after > before).all()
    # a constant shift of the logits changes no probability, so it must not change the attack
    # (Captum's default loss, -log(output), would push negative logits the wrong way)
    shifted = Shifted(model)
    moved = {layer: LayerInvariance(shifted, "model." + layer, e.inn, e.autoencoder) for layer, e in explainers.items()}
    result = adversarial_views(shifted, moved, images, labels, judge, epsilon=0.3)
    assert torch.allclose(result.adversarial, attacked.adversarial, atol=1e-6)
    assert torch.equal(result.fooled, attacked.fooled)


class Confident(nn.Module):
    """The same classifier with its logits times 30: the same classes, predicted with p ≈ 1."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 30.0


def test_the_attack_moves_confidently_classified_images(setup, images, labels):
    """FGSM is x + ε·sign(∇loss) whatever the gradient's size; Captum's 1e-6 threshold left the
    images a confident model classifies (tiny cross-entropy gradients) unattacked."""
    model, judge, explainers = setup
    confident = Confident(model).eval()
    moved = {layer: LayerInvariance(confident, "model." + layer, e.inn, e.autoencoder) for layer, e in explainers.items()}
    result = adversarial_views(confident, moved, images, labels, judge, epsilon=0.1)
    x = images.clone().requires_grad_()
    loss = nn.functional.cross_entropy(confident(x), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().flatten(1).amax(1).min() < 1e-6  # some images' whole gradient is below Captum's threshold
    expected = (images + 0.1 * grad.sign()).clamp(0, 1)
    assert torch.allclose(result.adversarial, expected, atol=1e-6)
    assert (result.adversarial - images).abs().flatten(1).amax(1).min() > 0.09  # every image attacked


def test_nothing_fooled_gives_nan(setup, images, labels):
    model, judge, explainers = setup
    all_wrong = (labels + torch.arange(1, N + 1)) % 10
    all_wrong[all_wrong == _predict(model, images)] += 1
    all_wrong %= 10
    tiny = adversarial_views(model, explainers, images, _predict(model, images), judge, epsilon=1e-9)
    never_right = adversarial_views(model, explainers, images, all_wrong, judge, epsilon=0.3)
    for result in (tiny, never_right):
        assert not result.fooled.any()
        assert result.summary["n_fooled"] == 0 and result.summary["fooled_rate"] == 0.0
        for layer in LAYERS:
            assert math.isnan(result.summary[layer]["judged_adversarial"])
            assert math.isnan(result.summary[layer]["judged_original"])
        fig, axes = result.plot(n=3)  # falls back to the first images, and says so
        assert axes.shape == (3, 2 + len(LAYERS))
        assert fig._suptitle.get_text().startswith("the attack fooled no image: the first 3, not fooled")
    plt.close("all")


def test_batch_size_does_not_change_the_result(attacked, setup, images, labels):
    model, judge, explainers = setup
    batched = adversarial_views(model, explainers, images, labels, judge, epsilon=0.3, batch_size=3)
    assert torch.allclose(batched.adversarial, attacked.adversarial, atol=1e-6)
    assert torch.equal(batched.fooled, attacked.fooled)
    for layer in LAYERS:
        assert torch.allclose(batched.views[layer], attacked.views[layer], atol=1e-5)


def test_inside_a_callers_inference_mode(attacked, setup, images, labels):
    """FGSM needs the gradient of the loss: under the caller's inference_mode it failed with
    "element 0 of tensors does not require grad"; it now gives the result of a call outside."""
    model, judge, explainers = setup
    with torch.inference_mode():
        got = adversarial_views(model, explainers, images.clone(), labels.clone(), judge, epsilon=0.3)
    assert torch.equal(got.adversarial, attacked.adversarial) and torch.equal(got.fooled, attacked.fooled)


def test_eval_mode_used_and_restored_no_hooks_no_gradients(setup, images, labels, attacked):
    model, judge, explainers = setup
    model.train()
    judge.train()
    try:
        flags, judge_flags = training_flags(model), training_flags(judge)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # runs in eval mode itself: no training-mode warning (nor Captum's)
            result = adversarial_views(model, explainers, images, labels, judge, epsilon=0.3)
        assert training_flags(model) == flags and training_flags(judge) == judge_flags
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k  # batch norm statistics not updated by the attack
        assert_no_hooks(model)
        assert_no_hooks(judge)
        assert all(p.grad is None for p in model.parameters())  # FGSM differentiates the input only
        assert not images.requires_grad
    finally:
        model.eval()
        judge.eval()
    assert torch.allclose(result.adversarial, attacked.adversarial, atol=1e-6)  # eval mode was used


def test_plot(attacked):
    fig, axes = attacked.plot(n=2, class_names=[f"c{k}" for k in range(10)])
    assert isinstance(fig, matplotlib.figure.Figure)
    rows = min(2, int(attacked.fooled.sum()))
    assert axes.shape == (rows, 2 + len(LAYERS))
    first = int(torch.nonzero(attacked.fooled).flatten()[0])
    # each image is captioned with the model's class (clean, attacked) or the judge's (each view)
    assert axes[0, 0].get_xlabel() == f"model: c{int(attacked.clean_predictions[first])}"
    assert axes[0, 1].get_xlabel() == f"model: c{int(attacked.adversarial_predictions[first])}"
    assert axes[0, 2].get_xlabel() == f"judge: c{int(attacked.judged[next(iter(attacked.views))][first])}"
    own = plt.figure(figsize=(6, 6))
    fig, _ = attacked.plot(fig=own)
    assert fig is own
    plt.close("all")


def test_adversarial_views_takes_explainers_built_on_the_bound_forward(setup, images, labels, attacked):
    """The explainers take model.forward as well as model; adversarial_views said they explained another model."""
    model, judge, explainers = setup
    bound = {name: LayerInvariance(model.forward, name, e.inn, e.autoencoder) for name, e in explainers.items()}
    views = adversarial_views(model, bound, images, labels, judge, epsilon=0.3)
    assert torch.equal(views.adversarial, attacked.adversarial)
    assert views.views.keys() == attacked.views.keys()
    for name in views.views:  # the same decoded views and readings as through the model itself
        assert torch.allclose(views.views[name], attacked.views[name], atol=1e-6)
        assert torch.equal(views.judged[name], attacked.judged[name])


def test_adversarial_views_errors(setup, images, labels):
    model, judge, explainers = setup
    other = Net().eval()
    foreign = {"cnn.logits": LayerInvariance(other, "cnn.logits", explainers["cnn.logits"].inn,
                                             explainers["cnn.logits"].autoencoder)}

    def call(**changes):
        kwargs = dict(model=model, explainers=explainers, images=images, labels=labels, judge=judge, epsilon=0.1)
        kwargs.update(changes)
        return adversarial_views(**kwargs)

    for epsilon in (0, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match="`epsilon` must be a number > 0"):
            call(epsilon=epsilon)
    with pytest.raises(ValueError, match=rf"`labels` must have shape \({N},\)"):
        call(labels=labels[:-1])
    with pytest.raises(ValueError, match="`labels` must have shape"):
        call(labels=labels[:, None])
    with pytest.raises(ValueError, match="`labels` must be whole class indices"):  # .long() read 0.7 as class 0
        call(labels=labels.float() + 0.7)
    with pytest.raises(ValueError, match="`labels` must be class indices >= 0"):
        call(labels=labels - 100)
    with pytest.raises(TypeError, match="`judge` must be an nn.Module"):
        call(judge=lambda x: x)
    with pytest.raises(TypeError, match="non-empty dict"):
        call(explainers={})
    with pytest.raises(TypeError, match="non-empty dict"):
        call(explainers=list(explainers.values()))
    with pytest.raises(TypeError, match=r"`explainers\['x'\]` must be a LayerInvariance"):
        call(explainers={"x": judge})
    with pytest.raises(ValueError, match="another model"):
        call(explainers=foreign)
    with pytest.raises(ValueError, match="batch_size"):
        call(batch_size=0)
    # images outside the pixel bounds were clamped into them: an epsilon of 0.01 moved pixels by 2
    with pytest.raises(ValueError, match=r"`images` range over \[-2, 2\], outside \[lower_bound, upper_bound\]"):
        call(images=(images - 0.5) / 0.25)
    with pytest.raises(ValueError, match=r"`images` range over .*outside .* = \[0.0, 0.5\]"):
        call(upper_bound=0.5)
    with pytest.raises(ValueError, match=r"`lower_bound` \(1.0\) must be below `upper_bound` \(0.0\)"):
        call(lower_bound=1.0, upper_bound=0.0)
    for bad in (None, "0", float("nan")):
        with pytest.raises(ValueError, match="`lower_bound` must be a number"):
            call(lower_bound=bad)
    with pytest.warns(UserWarning, match="the autoencoder decodes images in"):  # the views' own warning
        wide = call(images=(images - 0.5) / 0.25, lower_bound=-2.0, upper_bound=2.0)  # the bounds of these pixels
    assert (wide.adversarial - (images - 0.5) / 0.25).abs().max() <= 0.1 + 1e-5
    # NumPy numbers, e.g. bounds read off an array with .min(), were refused as "not a number"
    numpy_numbers = call(epsilon=np.float32(0.1), lower_bound=np.float32(0.0), upper_bound=np.float64(1.0))
    assert torch.equal(numpy_numbers.adversarial, call().adversarial)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        call(images=images[0])
    with pytest.raises(TypeError, match=r"`images` must be one image tensor \(N, C, H, W\), got a tuple of 2 tensors"):
        call(images=(images, images))  # Captum's tuple of inputs: once "too many values to unpack"
    assert_no_hooks(model)


def _views(images: torch.Tensor) -> AdversarialViews:
    """A hand-made result for two images: the first fooled (class 1 read as 2), views of classes 3 and 0."""
    n = images.shape[0]
    return AdversarialViews(images, 1 - images, torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long),
                            torch.full((n,), 2), torch.tensor([True] + [False] * (n - 1)),
                            {"fc": images}, {"fc": torch.tensor([3] + [0] * (n - 1))}, {})


def test_adversarial_views_plot_errors():
    views = _views(torch.rand(2, 3, 8, 8))
    for n in (0, -1):
        with pytest.raises(ValueError, match="`n` must be >= 1"):
            views.plot(n=n)
    with pytest.raises(ValueError, match="`class_names` has 3 names, but class 3 is shown"):
        views.plot(class_names=["a", "b", "c"])  # the view's judged class 3 has no name
    fig, axes = views.plot(class_names=["a", "b", "c", "d"])
    assert axes[0, 2].get_xlabel() == "judge: d"
    plt.close("all")


def test_grayscale_analyses_are_drawn_in_gray_on_a_fixed_scale():
    """A dark and a bright one-channel image: each drawn in gray on [0, 1], not stretched to its
    own min/max with viridis (which would draw both alike)."""
    for value in (0.2, 0.8):
        image = torch.full((1, 1, 8, 8), value)
        for fig, _ in (plot_mixing(image, image, {"fc": image}), _views(image).plot()):
            drawn = [im for ax in fig.axes for im in ax.get_images()]
            assert len(drawn) == 3
            for im in drawn:
                assert im.get_clim() == (0.0, 1.0) and im.get_cmap().name == "gray"
            plt.close(fig)


class Recoloured(nn.Module):
    """The classifier with two more arguments: a colour shift per image ``(N, 3)`` and a gain (a float)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, shift, gain):
        return self.model(x + shift[:, :, None, None]) * gain


def test_additional_forward_args_go_with_their_images_batch(setup, images, labels, attacked):
    """A per-image tensor is cut with the images' batches for the attack, the predictions and every
    explainer's pass; a non-tensor goes to every batch: the result is that of unbatched calls with
    the whole batch's arguments."""
    from captum.robust import FGSM

    model, judge, explainers = setup
    recoloured = Recoloured(model).eval()
    moved = {layer: LayerInvariance(recoloured, "model." + layer, e.inn, e.autoencoder) for layer, e in explainers.items()}
    shift = torch.linspace(-0.2, 0.2, N * 3).view(N, 3)
    args = (shift, 2.0)
    result = adversarial_views(recoloured, moved, images, labels, judge, epsilon=0.3, batch_size=3,
                               additional_forward_args=args)
    attack = FGSM(recoloured, loss_func=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
                  lower_bound=0.0, upper_bound=1.0)
    attack.zero_thresh = 0.0
    adversarial = attack.perturb(images.clone().requires_grad_(), 0.3, labels, additional_forward_args=args).detach()
    assert torch.allclose(result.adversarial, adversarial, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(result.clean_predictions, recoloured(images, *args).argmax(1))
        assert torch.equal(result.adversarial_predictions, recoloured(result.adversarial, *args).argmax(1))
    for layer, explainer in moved.items():
        assert torch.allclose(result.views[layer], explainer.transfer(images, result.adversarial, args), atol=1e-5)
        assert torch.equal(result.judged[layer], _predict(judge, result.views[layer]))
    assert not torch.allclose(result.adversarial, attacked.adversarial, atol=1e-3)  # the arguments matter

    a, b = images[:4], images[4:]
    mixed = mix_images(moved, a, b, batch_size=3, additional_forward_args=(shift[:4], 2.0))
    plain = mix_images(explainers, a, b)
    for layer, explainer in moved.items():
        assert torch.allclose(mixed[layer], explainer.transfer(a, b, (shift[:4], 2.0)), atol=1e-6), layer
        # the random decoder's pictures vary little (about 1e-4 here), but far beyond rounding (about 1e-7)
        assert (mixed[layer] - plain[layer]).abs().max() > 1e-5, layer


# ---------------------------------------------------------------- image mixing
def test_mix_images(setup, images):
    _, _, explainers = setup
    a, b = images[:4], images[4:]
    mixed = mix_images(explainers, a, b)
    assert list(mixed) == list(LAYERS)
    for layer, explainer in explainers.items():
        assert mixed[layer].shape == a.shape
        # a's invariances, b's representation: exactly explainer.transfer(a, b)
        assert torch.allclose(mixed[layer], explainer.transfer(a, b), atol=1e-6)
        assert not torch.allclose(mixed[layer], explainer.transfer(b, a))
    batched = mix_images(explainers, a, b, batch_size=3)
    for layer in LAYERS:
        assert torch.allclose(batched[layer], mixed[layer], atol=1e-5)


def test_mixing_an_image_with_itself_gives_its_reconstruction(setup, images):
    _, _, explainers = setup
    mixed = mix_images(explainers, images[:3], images[:3])
    for layer, explainer in explainers.items():  # t⁻¹(t(E(x) | Φ(x)) | Φ(x)) = E(x)
        assert torch.allclose(mixed[layer], explainer.reconstruct(images[:3]), atol=1e-4)


def test_mix_images_errors(setup, images):
    model, _, explainers = setup
    with pytest.raises(ValueError, match="must have the same shape"):
        mix_images(explainers, images[:3], images[:4])
    with pytest.raises(ValueError, match="must have the same shape"):
        mix_images(explainers, images[:2], images[:2, :, :16, :16])
    with pytest.raises(TypeError, match="non-empty dict"):
        mix_images({}, images[:2], images[2:4])
    with pytest.raises(TypeError, match="must be a LayerInvariance"):
        mix_images({"fc": model}, images[:2], images[2:4])
    with pytest.raises(TypeError, match="invariance_source"):
        mix_images(explainers, images[:2].numpy(), images[2:4])
    with pytest.raises(TypeError, match="`representation_source` must be one image tensor"):
        mix_images(explainers, images[:2], (images[2:4], images[4:6]))
    assert_no_hooks(model)


def test_plot_mixing(setup, images):
    _, _, explainers = setup
    a, b = images[:3], images[3:6]
    fig, axes = plot_mixing(a, b, mix_images(explainers, a, b))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert axes.shape == (3, 2 + len(LAYERS))
    assert [ax.get_title() for ax in axes[0]] == ["a: invariances", "b: representation",
                                                  *(f"mix at {layer}" for layer in LAYERS)]
    plt.close("all")


def test_fit_classifier_adversarial_training_attacks_half_of_each_batch():
    """With ``adversarial_epsilon`` the model first sees half a batch, then that half moved by ±epsilon."""
    from captum_inn.training.classifier import fit_classifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = 0.2 + 0.6 * torch.rand(16, 3, 2, 2)  # away from the [0, 1] clamp
    y = torch.randint(3, (16,))
    seen = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        fit_classifier(model, (x, y), steps=1, batch_size=8, progress=False, adversarial_epsilon=0.1)
    finally:
        handle.remove()
    assert [t.shape[0] for t in seen] == [4, 8]  # the attack's pass on half the batch, then the step
    moved = (seen[1][:4] - seen[0]).abs()
    assert torch.allclose(moved, torch.full_like(moved, 0.1), atol=1e-6)
    seen.clear()
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        fit_classifier(model, (x, y), steps=1, batch_size=8, progress=False)
    finally:
        handle.remove()
    assert [t.shape[0] for t in seen] == [8]


def test_adversarial_training_updates_the_running_statistics_once_per_step_from_the_whole_batch():
    """The attack's pass (training mode, half the batch) updated batch norm's running statistics
    too: each step counted twice, once from the clean half alone."""
    from captum_inn.training.classifier import fit_classifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(16, 3, 2, 2), torch.randint(3, (16,))
    batches = []
    handle = model[1].register_forward_pre_hook(lambda _m, args: batches.append(args[0].detach().clone()))
    try:
        fit_classifier(model, (x, y), steps=2, batch_size=8, progress=False, adversarial_epsilon=0.1)
    finally:
        handle.remove()
    bn = model[1]
    assert int(bn.num_batches_tracked) == 2 and len(batches) == 4  # two passes per step, one of them counted
    expected_mean = torch.zeros(4)
    for step_input in batches[1::2]:  # the steps' passes over the whole (half attacked) batch
        expected_mean = 0.9 * expected_mean + 0.1 * step_input.mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)


def test_images_that_require_grad_are_attacked_without_a_warning(setup, images, labels, attacked):
    """Reading their range warned "Converting a tensor with requires_grad=True to a scalar"."""
    model, judge, explainers = setup
    tracked = images.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = adversarial_views(model, explainers, tracked, labels, judge, epsilon=0.3)
    assert torch.equal(got.fooled, attacked.fooled) and tracked.grad is None


def test_attack_inputs_are_named_before_the_attack(setup, images, labels):
    """A label past the logits failed inside Captum's FGSM with cross entropy's IndexError (a
    device-side assert on a GPU), float64 images with torch's dtype error, and a layer named
    "fooled_rate" lost its shares to the attack's own figure in `summary`."""
    model, judge, explainers = setup
    with pytest.raises(ValueError, match=r"`labels` holds classes up to 10, but the model gives 10 logits"):
        adversarial_views(model, explainers, images, torch.full_like(labels, 10), judge)
    with pytest.raises(TypeError, match=r"`images` images are torch.float64 .*images.to\(torch.float32\)"):
        adversarial_views(model, explainers, images.double(), labels, judge)
    with pytest.raises(ValueError, match=r"names layers \['fooled_rate'\], which `summary` uses"):
        adversarial_views(model, {"fooled_rate": next(iter(explainers.values()))}, images, labels, judge)

    class Squeezed(nn.Module):  # (K,) for one image, (N, K) for a batch: the attack takes it
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x).squeeze()

    squeezed = Squeezed().eval()
    views = {name: LayerInvariance(squeezed, f"net.{name}", e.inn, e.autoencoder) for name, e in explainers.items()}
    assert adversarial_views(squeezed, views, images, labels, judge, epsilon=0.3).summary["n_fooled"] >= 0
    with pytest.raises(ValueError, match=r"got \(10,\) for 1 image\(s\) \(a squeeze\(\) drops the batch of one"):
        adversarial_views(squeezed, views, images[:1], labels[:1], judge, epsilon=0.3)
