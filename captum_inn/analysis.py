"""The paper's analyses as functions: what the network sees in an adversarial input, and image mixing.

Both decode one image's layer representation with another image's invariances,
``D(t⁻¹(v_a | Φ(b)))`` (:meth:`captum_inn.LayerInvariance.transfer`), layer by layer:

* :func:`adversarial_views`: ``a`` the clean image, ``b`` its FGSM-attacked copy
  (:class:`captum.robust.FGSM`). Each layer's view shows what that layer "sees" in the attack;
  an independent judge classifier says which class each view shows. Rombach et al. found that
  early layers still see the original class and deep layers the adversarial one: the attack acts
  on the semantics of deep layers.
* :func:`mix_images`: ``a`` gives the invariances (what the layer ignores), ``b`` the
  representation (what it encodes).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from captum_inn.attr import LayerInvariance
from captum_inn.attr._common import (
    autograd_on,
    check_pixel_range,
    check_positive_int,
    class_indices,
    dtype_errors_named,
    network_dtype,
    one_image_tensor,
    runs_model,
    slice_forward_args,
)
from captum_inn.capture import (
    check_autograd_weights,
    check_input_unchanged,
    copied_tensors,
    eval_mode,
)
from captum_inn.metrics import check_class_logits, predict_classes

__all__ = ["AdversarialViews", "adversarial_views", "mix_images", "plot_mixing"]


def _check_explainers(explainers: Mapping[str, LayerInvariance], model: Optional[nn.Module] = None) -> None:
    if not isinstance(explainers, Mapping) or not explainers:
        raise TypeError("`explainers` must be a non-empty dict {layer name: LayerInvariance}, input side first.")
    for name, explainer in explainers.items():
        if not isinstance(explainer, LayerInvariance):
            raise TypeError(f"`explainers[{name!r}]` must be a LayerInvariance, got {type(explainer).__name__}.")
        if model is not None and not runs_model(explainer.forward_func, model):
            raise ValueError(f"`explainers[{name!r}]` explains another model than `model` (or runs it through a "
                             "function other than model.forward).")


def _cross_entropy(outputs: Tensor, labels: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(outputs, labels, reduction="none")


def _transfer(explainer: LayerInvariance, inputs: Tensor, donors: Tensor, batch: int,
              additional_forward_args: Any = None, names: Tuple[str, Optional[str]] = ("inputs", "donors")) -> Tensor:
    """``explainer.transfer`` in parts of ``batch``; a pixel-range warning names the caller's arguments
    (``names``; ``None``: not checked), once for all parts, not ``transfer``'s ``inputs``/``donors``
    once per part."""
    for images, name in zip((inputs, donors), names):
        if name is not None:
            check_pixel_range(images, name, explainer.autoencoder, margin=0.5)
    n = inputs.shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`(inputs|donors)` pixels range over", category=UserWarning)
        return torch.cat([explainer.transfer(inputs[s : s + batch], donors[s : s + batch],
                                             slice_forward_args(additional_forward_args, slice(s, s + batch), n))
                          for s in range(0, n, batch)])


@dataclass
class AdversarialViews:
    """Result of :func:`adversarial_views` for ``N`` images.

    Attributes:
        images: ``(N, C, H, W)`` clean images.
        adversarial: ``(N, C, H, W)`` their FGSM-attacked copies.
        labels: ``(N,)`` true classes.
        clean_predictions: ``(N,)`` the model's classes on ``images``.
        adversarial_predictions: ``(N,)`` the model's classes on ``adversarial``.
        fooled: ``(N,)`` bool, the model was right on the clean image and wrong on the attacked one.
        views: ``{layer: (N, C, H, W)}`` the attacked image's representation at that layer,
            decoded with the clean image's invariances.
        judged: ``{layer: (N,)}`` the judge's class for each view.
        summary: ``{layer: {"judged_adversarial": share, "judged_original": share}}`` over the
            fooled images (``nan`` when none was fooled), plus ``"fooled_rate"``, ``"n_fooled"`` and
            ``"judge_on_attacked"`` (the share of fooled attacked images the judge itself reads as
            their true class: well below its clean accuracy means the attack transfers to the judge).

    Examples::

        views = adversarial_views(cnn, {"relu1": early, "logits": late}, x, y, judge)
        views.adversarial.shape               # (N, C, H, W), like x
        views.fooled.float().mean()           # share of images the attack fooled
        views.judged["logits"]                # (N,) the judge's class for the view at "logits"
        fig, axes = views.plot(n=4)
    """

    images: Tensor
    adversarial: Tensor
    labels: Tensor
    clean_predictions: Tensor
    adversarial_predictions: Tensor
    fooled: Tensor
    views: Dict[str, Tensor]
    judged: Dict[str, Tensor]
    summary: Dict[str, Any]

    def plot(self, n: int = 6, class_names: Optional[Sequence[str]] = None, fig: Any = None) -> Tuple[Any, Any]:
        """Rows of fooled images: clean | attacked | each layer's view, titled with the judge's verdicts
        (where the attack fooled no image, the first ``n`` images, and the title says so)."""
        from captum_inn.visualization import plot_image_grid  # which draws every name literally

        n = check_positive_int(n, "n")  # the rows to draw: at least one
        rows = torch.nonzero(self.fooled).flatten()[:n]
        title = "what each layer sees in the attack (captions: the model's class, then the judge's for each layer's view)"
        if rows.numel() == 0:  # drawn all the same (the views still show what each layer keeps), but said
            rows = torch.arange(min(n, self.images.shape[0]))
            title = f"the attack fooled no image: the first {rows.numel()}, not fooled; {title}"

        if class_names is not None and rows.numel():
            shown = [self.clean_predictions[rows], self.adversarial_predictions[rows],
                     *(judged[rows] for judged in self.judged.values())]
            largest = int(torch.cat(shown).max())
            if len(class_names) <= largest:
                raise ValueError(f"`class_names` has {len(class_names)} names, but class {largest} is shown; give one "
                                 "name per class of the model's output.")

        def name(k: int) -> str:
            return str(class_names[k]) if class_names is not None else str(k)

        columns = {"clean": self.images[rows], "attacked": self.adversarial[rows]}
        columns.update({f"view at {layer}": views[rows] for layer, views in self.views.items()})
        captions = {"clean": [f"model: {name(int(self.clean_predictions[i]))}" for i in rows],
                    "attacked": [f"model: {name(int(self.adversarial_predictions[i]))}" for i in rows]}
        captions.update({f"view at {layer}": [f"judge: {name(int(self.judged[layer][i]))}" for i in rows]
                         for layer in self.views})
        return plot_image_grid(columns, title=title, fig=fig, captions=captions)


@contextlib.contextmanager
def _judge_dtype_named(judge: nn.Module, images: Tensor) -> Iterator[None]:
    """A judge of another dtype than the images is named as the mistake (the message said to convert
    `images`, which the analysed model needs as they are)."""
    try:
        yield
    except TypeError as error:
        dtype = network_dtype(judge, images.dtype)
        if dtype != images.dtype:
            raise TypeError(f"`judge` computes in {dtype} but the images, and so the views, are {images.dtype}; "
                            f"pass a judge in the images' dtype, judge.to({images.dtype}).") from error
        raise


def _judge_classes(judge: nn.Module, images: Tensor, batch: int) -> Tensor:
    """The judge's classes of views (in the images' dtype)."""
    with _judge_dtype_named(judge, images):
        return predict_classes(judge, images, batch)


@torch.no_grad()
def _judge_class_count(judge: nn.Module, images: Tensor) -> int:
    """The number of classes the judge names, from one pass on up to two images."""
    with _judge_dtype_named(judge, images), dtype_errors_named(images, judge, name="images"), eval_mode(judge):
        (probe,) = copied_tensors((images[:2],))
        logits = judge(probe)
    if not isinstance(logits, Tensor):
        raise TypeError(f"`judge` must return (N, K) logits, got a {type(logits).__name__}; wrap it to return them.")
    check_class_logits(logits, "`judge`")
    return logits.shape[1]


_SUMMARY_KEYS = ("judge_on_attacked", "fooled_rate", "n_fooled")


@torch.no_grad()
def _class_count(model: nn.Module, images: Tensor, additional_forward_args: Any = None) -> int:
    """The number of logits ``model`` gives, from one pass on up to two images (a model that squeezes
    its output gives ``(N, K)`` for two, as for the attack's batches); a ``ValueError`` for other outputs."""
    (probe,) = copied_tensors((images[:2],))
    logits = model(probe, *(slice_forward_args(additional_forward_args, slice(0, 2), images.shape[0]) or ()))
    check_input_unchanged(probe, "the FGSM attack")
    if isinstance(logits, Tensor) and logits.dim() == 2:
        return logits.shape[-1]
    shown = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
    squeezed = " (a squeeze() drops the batch of one image: the attack's last batch can hold one)" if (
        isinstance(logits, Tensor) and logits.dim() == 1 and probe.shape[0] == 1) else ""
    raise ValueError(f"`model` must return (N, K) logits for the attack, got {shown} for {probe.shape[0]} image(s)"
                     f"{squeezed}; wrap it to return them.")


@autograd_on
def adversarial_views(
    model: nn.Module,
    explainers: Mapping[str, LayerInvariance],
    images: Tensor,
    labels: Tensor,
    judge: nn.Module,
    epsilon: float = 0.1,
    lower_bound: float = 0.0,
    upper_bound: float = 1.0,
    batch_size: int = 256,
    additional_forward_args: Any = None,
) -> AdversarialViews:
    """Attack ``images`` with FGSM and decode each layer's view of the attack with the clean invariances.

    Args:
        model: The attacked classifier ``(N, C, H, W) → (N, K)``; run in eval mode, mode restored.
        explainers: ``{layer name: LayerInvariance}`` for ``model``, input side first.
        images: ``(N, C, H, W)`` clean images.
        labels: ``(N,)`` their true classes (the attack's target to move away from).
        judge: An independently trained classifier that names the class each view shows.
        epsilon: FGSM step size (in the units of the pixels).
        lower_bound: Smallest pixel value of the attacked image (``images`` must not go below it).
        upper_bound: Largest pixel value (``images`` must not exceed it).
        batch_size: Images per pass.
        additional_forward_args: Extra arguments of ``model`` after the images, as in Captum
            (``model(images, *additional_forward_args)``): given to the attack, to the model's
            predictions and to every explainer's pass (for the clean and the attacked image alike).
            Tensors with ``N`` rows go with their images' batch; other values to every batch. The
            judge sees the images only.

    Returns:
        :class:`AdversarialViews`.

    Examples::

        >>> views = adversarial_views(cnn, {"relu1": early, "logits": late}, x, y, judge)  # doctest: +SKIP
        >>> views.summary["logits"]["judged_adversarial"]                                    # doctest: +SKIP
        0.7
    """
    from captum.robust import FGSM

    _check_explainers(explainers, model)
    taken = sorted(set(explainers) & set(_SUMMARY_KEYS))
    if taken:  # their shares would be overwritten in `summary` by the attack's own figures, silently
        raise ValueError(f"`explainers` names layers {taken}, which `summary` uses for the attack's own figures "
                         f"({list(_SUMMARY_KEYS)}); give those layers other keys.")
    check_autograd_weights(model, "`model`", "FGSM needs gradients through it")
    images = one_image_tensor(images, "images")
    labels = class_indices(torch.as_tensor(labels, device=images.device), "`labels`")  # .long() truncated 0.7 to 0
    if labels.shape != (images.shape[0],):
        raise ValueError(f"`labels` must have shape ({images.shape[0]},), one class per image, got {tuple(labels.shape)}.")
    if not isinstance(judge, nn.Module):
        raise TypeError(f"`judge` must be an nn.Module classifier, got {type(judge).__name__}.")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0:
        raise ValueError(f"`epsilon` must be a number > 0, got {epsilon!r}.")
    for name, bound in (("lower_bound", lower_bound), ("upper_bound", upper_bound)):
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or bound != bound:
            raise ValueError(f"`{name}` must be a number, got {bound!r}.")
    if not lower_bound < upper_bound:
        raise ValueError(f"`lower_bound` ({lower_bound}) must be below `upper_bound` ({upper_bound}).")
    low, high = (float(v) for v in torch.aminmax(images.detach()))  # detached: no warning of a scalar with grad
    if low < lower_bound or high > upper_bound:  # FGSM clamps to the bounds: the "attack" would redraw the image
        raise ValueError(f"`images` range over [{low:.3g}, {high:.3g}], outside [lower_bound, upper_bound] = "
                         f"[{lower_bound}, {upper_bound}], to which the attacked images are clamped; pass the bounds "
                         "of your pixels' range (and epsilon in those units).")
    batch = check_positive_int(batch_size, "batch_size")
    n = images.shape[0]

    def extra(s: int) -> Any:
        return slice_forward_args(additional_forward_args, slice(s, s + batch), n)

    # Captum's default loss is -log(output), meant for probabilities: on logits it reverses the
    # attack wherever the true class's logit is negative. The classifier gives logits: cross entropy.
    attack = FGSM(model, loss_func=_cross_entropy, lower_bound=lower_bound, upper_bound=upper_bound)
    # FGSM steps by the gradient's sign, whatever its size; Captum leaves pixels whose gradient is
    # below 1e-6 unchanged, which on a confident prediction (cross entropy's gradient ~ 1 − p) is
    # every pixel: the attack skipped exactly the images a model is surest of.
    attack.zero_thresh = 0.0
    # The whole analysis in eval mode (also the explainers' passes, which would otherwise warn).
    with eval_mode(model):
        with dtype_errors_named(images, model, name="images"):
            classes = _class_count(model, images, additional_forward_args)
        if int(labels.max()) >= classes:  # cross entropy's IndexError (a device-side assert on a GPU) named neither
            raise ValueError(f"`labels` holds classes up to {int(labels.max())}, but the model gives {classes} logits; "
                             f"labels must be class indices 0 … {classes - 1}.")
        judge_classes = _judge_class_count(judge, images)
        if judge_classes != classes:  # its classes are compared with the model's: other indices mean nothing
            raise ValueError(f"`judge` names {judge_classes} classes but `model` {classes}; the judge says which of "
                             "the model's classes each view shows, so it must be a classifier of the same classes, in "
                             "the same order.")
        adversarial = torch.cat([
            # a copy that requires grad: else Captum sets the flag itself and warns on every call
            attack.perturb(images[s : s + batch].detach().clone().requires_grad_(), float(epsilon),
                           labels[s : s + batch], additional_forward_args=extra(s)).detach()
            for s in range(0, n, batch)
        ])
        clean_pred, adv_pred = (predict_classes(model, x, batch, additional_forward_args=additional_forward_args)
                                for x in (images, adversarial))
        fooled = (clean_pred == labels) & (adv_pred != labels)
        views, judged, summary = {}, {}, {}
        for layer, explainer in explainers.items():
            views[layer] = _transfer(explainer, images, adversarial, batch, additional_forward_args,
                                     ("images", None))  # the attack stays within the images' bounds
            judged[layer] = _judge_classes(judge, views[layer], batch)
            if fooled.any():
                summary[layer] = {
                    "judged_adversarial": float((judged[layer][fooled] == adv_pred[fooled]).float().mean()),
                    "judged_original": float((judged[layer][fooled] == labels[fooled]).float().mean()),
                }
            else:
                summary[layer] = {"judged_adversarial": float("nan"), "judged_original": float("nan")}
        # the judge on the attacked images themselves: a judge the attack transfers to would mix
        # what a layer sees with what the judge sees
        judged_attack = _judge_classes(judge, adversarial, batch)
    summary["judge_on_attacked"] = (float((judged_attack[fooled] == labels[fooled]).float().mean()) if fooled.any()
                                    else float("nan"))
    summary["fooled_rate"] = float(fooled.float().mean())
    summary["n_fooled"] = int(fooled.sum())
    # copies: a caller reusing its image or label buffers rewrote the record of this call
    return AdversarialViews(images.detach().clone(), adversarial, labels.clone(), clean_pred, adv_pred, fooled, views,
                            judged, summary)


def mix_images(
    explainers: Mapping[str, LayerInvariance],
    invariance_source: Tensor,
    representation_source: Tensor,
    batch_size: int = 256,
    additional_forward_args: Any = None,
) -> Dict[str, Tensor]:
    """Per layer: the representation of ``representation_source`` decoded with the invariances of ``invariance_source``.

    Args:
        explainers: ``{layer name: LayerInvariance}``.
        invariance_source: ``(N, C, H, W)`` images ``a`` whose invariances (what the layer ignores) are kept.
        representation_source: ``(N, C, H, W)`` images ``b`` whose layer representation is kept.
        batch_size: Images per pass.
        additional_forward_args: Extra arguments of the explainers' model after the images, as in
            Captum, the same for ``a`` and ``b`` (as in :meth:`~captum_inn.LayerInvariance.transfer`).
            Tensors with ``N`` rows go with their images' batch; other values to every batch.

    Returns:
        ``{layer: (N, C, H, W)}`` mixed images.

    Examples::

        >>> mixed = mix_images({"fc": explainer}, a, b)   # doctest: +SKIP
        >>> mixed["fc"].shape                              # doctest: +SKIP
        torch.Size([8, 3, 32, 32])
    """
    _check_explainers(explainers)
    a = one_image_tensor(invariance_source, "invariance_source")
    b = one_image_tensor(representation_source, "representation_source")
    if a.shape != b.shape:
        raise ValueError(f"`invariance_source` {tuple(a.shape)} and `representation_source` {tuple(b.shape)} "
                         "must have the same shape (one pair per row).")
    batch = check_positive_int(batch_size, "batch_size")
    return {layer: _transfer(explainer, a, b, batch, additional_forward_args, ("invariance_source", "representation_source"))
            for layer, explainer in explainers.items()}


def plot_mixing(
    invariance_source: Tensor,
    representation_source: Tensor,
    mixed: Dict[str, Tensor],
    fig: Any = None,
) -> Tuple[Any, Any]:
    """Rows of pairs: ``a`` (invariances) | ``b`` (representation) | the mix at each layer.

    Args:
        invariance_source: ``(N, C, H, W)`` images ``a``.
        representation_source: ``(N, C, H, W)`` images ``b``.
        mixed: :func:`mix_images`'s result, ``{layer: (N, C, H, W)}``.
        fig: Optional figure.

    Returns:
        ``(fig, axes)``.

    Examples::

        mixed = mix_images({"relu1": early, "logits": late}, a, b)   # a, b: (N, C, H, W)
        fig, axes = plot_mixing(a, b, mixed)                         # N rows, 2 + 2 columns
        fig.savefig("mixing.png")
    """
    from captum_inn.visualization import plot_image_grid

    columns: Dict[str, Union[Tensor, List]] = {"a: invariances": invariance_source, "b: representation": representation_source}
    columns.update({f"mix at {layer}": images for layer, images in mixed.items()})
    return plot_image_grid(columns, title="image mixing: b as each layer sees it, with a's invariances", fig=fig)
