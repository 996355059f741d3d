"""One pipeline with Captum's saliency methods and the invariances: ``compare_attributions``.

For each input it computes, with one batching control:

* Grad-CAM (:class:`captum.attr.LayerGradCam` with ``relu_attributions=True``, as in the Grad-CAM
  paper, upsampled bilinearly to the input with :meth:`captum.attr.LayerAttribution.interpolate`):
  *where* the target class's evidence is;
* Integrated Gradients (:class:`captum.attr.IntegratedGradients`): which pixels move the target;
* the invariance map (:meth:`captum_inn.LayerInvariance.attribute`): which pixels the layer ignores;
* a strip of invariance samples (:meth:`captum_inn.LayerInvariance.sample`): what it ignores;
* optionally concept scores (:meth:`captum_inn.LayerConcepts.attribute`).

:meth:`Comparison.plot` draws one figure per input: input | Grad-CAM | IG | invariance map |
samples | concept bars.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars, as the fits'

from captum_inn.attr import LayerConcepts, LayerInvariance
from captum_inn.attr._common import (
    autograd_on,
    check_image_size,
    check_per_input_args,
    check_positive_int,
    default_rows,
    dtype_errors_named,
    forward_module,
    one_image_tensor,
    runs_model,
    slice_forward_args,
    user_stacklevel,
)
from captum_inn.capture import (
    check_autograd_weights,
    check_input_unchanged,
    copied_tensors,
    eager_module,
    eval_mode,
    resolve_layer,
)
from captum_inn.metrics import check_class_logits
from captum_inn.training.checkpoint import creatable_path

__all__ = ["Comparison", "compare_attributions", "last_spatial_layer"]


@dataclass
class Comparison:
    """Every map of :func:`compare_attributions` for ``N`` inputs of shape ``(C, H, W)``.

    Attributes:
        inputs: ``(N, C, H, W)``.
        targets: ``(N,)`` the explained class of each input.
        predictions: ``(N,)`` the model's predicted class.
        gradcam: ``(N, 1, H, W)`` Grad-CAM at ``gradcam_layer`` (``relu_attributions=True``),
            upsampled bilinearly to the input.
        integrated_gradients: ``(N, C, H, W)``.
        invariance_map: ``(N, C, H, W)`` spread of the invariance samples at ``layer``.
        samples: ``(N, S, C, H, W)`` invariance samples at ``layer``.
        reconstructions: ``(N, C, H, W)`` the autoencoder's reconstructions ``D(E(x))``.
        concept_scores: ``(N, K)`` concept attributions, or ``None`` without a concept explainer.
        concept_names: The ``K`` concept names (empty without concepts).
        layer: Name of the layer whose invariances are shown.
        gradcam_layer: Name of the layer Grad-CAM reads.
        integrated_gradients_delta: ``(N,)`` completeness gap of Integrated Gradients (Captum's
            convergence delta: the attributions' sum minus the output change from the baseline).
        concept_delta: ``(N,)`` the same for the concept scores, or ``None`` without concepts.

    Examples::

        result = compare_attributions(model, x, explainer, n_samples=8)   # x: (N, C, H, W)
        result.gradcam.shape, result.invariance_map.shape   # (N, 1, H, W), (N, C, H, W)
        fig, axes = result.plot(0, class_names=classes)     # one input's maps side by side
        paths = result.save_figures("figures")              # figures/comparison_<i>.png
    """

    inputs: Tensor
    targets: Tensor
    predictions: Tensor
    gradcam: Tensor
    integrated_gradients: Tensor
    invariance_map: Tensor
    samples: Tensor
    reconstructions: Tensor
    concept_scores: Optional[Tensor]
    concept_names: List[str]
    layer: str
    gradcam_layer: str
    integrated_gradients_delta: Optional[Tensor] = None
    concept_delta: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def plot(self, index: int = 0, class_names: Optional[Sequence[str]] = None, n_strip: int = 6,
             fig: Any = None) -> Tuple[Any, Any]:
        """One figure for input ``index`` (see :func:`captum_inn.visualization.plot_comparison`)."""
        from captum_inn.visualization import plot_comparison

        return plot_comparison(self, index, class_names=class_names, n_strip=n_strip, fig=fig)

    def save_figures(self, folder: Union[str, Path], class_names: Optional[Sequence[str]] = None,
                     prefix: str = "comparison", indices: Optional[Sequence[int]] = None,
                     n_strip: int = 6) -> List[str]:
        """Write one PNG per input (``<prefix>_<index>.png``, samples shown: ``n_strip``; only the
        inputs ``indices`` when given, all checked before any file is written) into ``folder``;
        return the paths. ``prefix`` is a file name stem (sub-folders go in ``folder``)."""
        from captum_inn.visualization import check_comparison_class_names, save_figure

        def whole(i: Any) -> Optional[int]:  # an int, numpy int or integer tensor of one element; else None
            try:
                return None if isinstance(i, bool) else operator.index(i)
            except TypeError:
                return None

        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "/\\") or prefix in (".", ".."):
            # a path in it wrote outside `folder` ("../x") or failed once `folder` was made ("sub/x")
            raise ValueError(f"`prefix` must be a file name stem without a folder, got {prefix!r}; put sub-folders "
                             "in `folder`.")
        if indices is not None and (whole(indices) is not None or isinstance(indices, (str, bytes))):
            raise TypeError(f"`indices` must be a list of input indices, got {indices!r}; for one input pass [{indices!r}].")
        given = list(range(len(self)) if indices is None else indices)
        indices = [whole(i) for i in given]
        bad = [g for g, i in zip(given, indices) if i is None or not 0 <= i < len(self)]
        if bad:  # before any file is written, in the argument's own name
            raise ValueError(f"`indices` must hold input indices in 0…{len(self) - 1}, got {bad[:5]}.")
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:  # the file of each was written twice, and its path returned twice
            raise ValueError(f"`indices` holds {repeated} more than once; give each input once.")
        check_comparison_class_names(self, class_names)  # before the folder is made
        folder = creatable_path(folder, "folder")
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in indices:
            fig, _ = self.plot(i, class_names=class_names, n_strip=n_strip)
            paths.append(save_figure(fig, str(folder / f"{prefix}_{i}.png")))
        return paths


def last_spatial_layer(model: nn.Module, example: Tensor, *, additional_forward_args: Any = None) -> str:
    """Name of the last module (in execution order) whose output is a feature map larger than 1×1.

    The default layer of Grad-CAM: for a torchvision ResNet it is ``"layer4"``.

    Args:
        model: The model.
        example: ``(N, C, H, W)`` inputs for one forward pass (one image is enough).
        additional_forward_args: Extra arguments of the model after the images, as in Captum.

    Returns:
        A dotted module name.

    Examples::

        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> last_spatial_layer(model, torch.rand(1, 3, 8, 8))
        '1'
    """
    example = one_image_tensor(example, "example", "pass the model's other inputs as `additional_forward_args`")
    order = _spatial_layers(model, example, additional_forward_args)
    if not order:
        raise ValueError("The model has no layer with a spatial feature map; pass `gradcam_layer` explicitly.")
    return order[-1][0]


def _spatial_layers(model: nn.Module, example: Tensor, additional_forward_args: Any = None) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(name, (C, H, W))`` of each module whose output is a feature map larger than 1×1, in execution order."""
    order: List[Tuple[str, Tuple[int, ...]]] = []
    handles = []

    def record(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
                order.append((name, tuple(output.shape[1:])))
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        with torch.no_grad(), eval_mode(model), dtype_errors_named(example, model, name="example"):
            # a compiled graph skips hooks added after it was built
            eager_module(model)(example[:1], *_first_row(additional_forward_args, example.shape[0]))
    finally:
        for handle in handles:
            handle.remove()
    return order


def _check_baselines(baselines: Any, images: Tensor) -> None:
    """``ig_baselines`` as Captum takes them for these images, or an error naming the shape, device or
    dtype that differs and the fix."""
    if baselines is None or (isinstance(baselines, (int, float)) and not isinstance(baselines, bool)):
        if baselines is not None and not math.isfinite(baselines):  # Integrated Gradients all NaN, unwarned
            raise ValueError(f"`ig_baselines` must be finite, got {baselines}.")
        return
    if not isinstance(baselines, Tensor):  # a NumPy number too: Captum takes Python numbers only
        hint = "; pass float(ig_baselines)" if isinstance(baselines, numbers.Real) else ""
        raise TypeError(f"`ig_baselines` must be None, a number or a tensor, got {type(baselines).__name__}{hint}.")
    n, image = images.shape[0], tuple(images.shape[1:])
    if baselines.dim() != 4 or tuple(baselines.shape[1:]) != image or baselines.shape[0] not in (1, n):
        raise ValueError(
            f"`ig_baselines` must have shape ({n}, {', '.join(map(str, image))}) (one per input) or "
            f"(1, {', '.join(map(str, image))}) (one for all), got {tuple(baselines.shape)}; for a single image "
            "use baseline.unsqueeze(0)."
        )
    if baselines.device != images.device:
        raise ValueError(f"`ig_baselines` is on {baselines.device} but the inputs are on {images.device}; move it "
                         "with ig_baselines.to(inputs.device).")
    if baselines.dtype != images.dtype:  # Captum would fail inside the model with a dtype message naming neither
        raise TypeError(f"`ig_baselines` is {baselines.dtype} but the inputs are {images.dtype}; convert it with "
                        "ig_baselines.to(inputs.dtype).")
    if not torch.isfinite(baselines).all():
        raise ValueError("`ig_baselines` contains NaN or infinite values; Integrated Gradients would be NaN.")


def _first_row(additional_forward_args: Any, n: int) -> Tuple[Any, ...]:
    """The additional arguments of the first of ``n`` inputs, for a pass over ``example[:1]``."""
    return slice_forward_args(additional_forward_args, slice(0, 1), n) or ()


def _outputs(model: nn.Module, module: nn.Module, example: Tensor, extra: Tuple[Any, ...] = ()) -> List[Any]:
    """The outputs of every call of ``module`` in one forward pass of ``model(example, *extra)``."""
    seen: List[Any] = []
    handle = module.register_forward_hook(lambda _m, _a, output: seen.append(output))
    try:
        with torch.no_grad():
            eager_module(model)(example, *extra)
    finally:
        handle.remove()
    return seen


def _warn_reused(name: str, calls: int) -> None:
    warnings.warn(
        f"Grad-CAM layer {name!r} runs {calls} times in one forward pass, and Captum's LayerGradCam reads its "
        "last call (the explainers read its first); pass gradcam_layer= a module that runs once (for "
        "torchvision's BasicBlock, the block, e.g. 'layer3.1', rather than its reused 'layer3.1.relu').",
        UserWarning, stacklevel=user_stacklevel(),  # the caller of compare_attributions
    )


def _check_gradcam_layer(model: nn.Module, name: str, module: nn.Module, example: Tensor,
                         extra: Tuple[Any, ...] = ()) -> None:
    """Grad-CAM weighs the channels of an ``(N, C, H, W)`` map; refuse other layers by name (Captum
    would fail inside its upsampling with a message about spatial dimensions). A module that runs
    more than once is read by Captum at its last call: warn."""
    seen = _outputs(model, module, example, extra)
    output = seen[0] if seen else None
    if not (isinstance(output, Tensor) and output.dim() == 4):
        got = (f"activations of shape {tuple(output.shape[1:])} per image" if isinstance(output, Tensor)
               else "no output (it did not run)" if output is None else f"a {type(output).__name__}")
        raise ValueError(
            f"Grad-CAM needs a layer with an (N, C, H, W) feature map, but `gradcam_layer` {name!r} gives {got}. "
            "Pass a convolutional layer (for a vision transformer its patch embedding, e.g. 'conv_proj'), or "
            "leave gradcam_layer=None to use the last one with a spatial map."
        )
    if len(seen) > 1:
        _warn_reused(name, len(seen))


@autograd_on
def compare_attributions(
    model: nn.Module,
    inputs: Tensor,
    invariance: LayerInvariance,
    target: Union[None, int, Tensor, Sequence[int]] = None,
    *,
    additional_forward_args: Any = None,
    gradcam_layer: Union[None, str, nn.Module] = None,
    concepts: Optional[LayerConcepts] = None,
    n_samples: int = 16,
    ig_steps: int = 50,
    ig_baselines: Union[None, float, Tensor] = None,
    concept_steps: int = 512,
    internal_batch_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> Comparison:
    """Grad-CAM, Integrated Gradients, the invariance map, invariance samples and concept scores at once.

    Args:
        model: The classifier, ``(N, C, H, W) → (N, K)`` logits. It is run in eval mode (batch
            norm uses its running statistics) and its mode is restored.
        inputs: ``(N, C, H, W)`` images.
        invariance: A :class:`~captum_inn.LayerInvariance` for ``model`` (built on ``model`` or
            ``model.forward``; its layer's INN fitted).
        target: The explained class: ``None`` (each input's predicted class), an int (or
            one-element tensor, or Captum's one-index tuple ``(3,)``) for all, or ``(N,)`` classes
            (also as Captum's list of one-index tuples ``[(3,), (1,), ...]``).
        additional_forward_args: Extra arguments of the model after the images, as in Captum
            (``model(inputs, *additional_forward_args)``), given to every method (and to the
            explainers, which read the layer with them). Captum's gradient methods expand tensors
            with the inputs: a tensor needs ``N`` rows (a 0-d one, or a non-tensor, is shared).
        gradcam_layer: Layer for Grad-CAM (module or dotted name). Default: the invariance layer
            if its output is a feature map (read without a selector, not at its input, from a module
            that runs once per forward pass), else :func:`last_spatial_layer` (``layer4`` of a
            ResNet). A given module that runs several times warns: Captum reads its last call.
        concepts: Optional :class:`~captum_inn.LayerConcepts` whose scores are added.
        n_samples: Invariance samples per input (``>= 2``; the map is their spread).
        ig_steps: Integrated Gradients steps.
        ig_baselines: IG baseline: ``None`` (black image), a float, or a tensor ``(N, C, H, W)``
            like ``inputs`` (one baseline per input) or ``(1, C, H, W)`` (one for all), on the
            inputs' device and of their dtype.
        concept_steps: Integrated Gradients steps of the concept scores (``LayerConcepts.attribute``'s
            ``n_steps``, >= 2; its default 512 keeps the completeness gap small through ReLU kinks).
        internal_batch_size: The most rows any method sends through a network at once (IG's
            interpolation steps, decoded samples, Grad-CAM and concept passes); ``None``: as many
            images as hold 2**24 pixel values (341 of 3×128×128; for the concept scores' gradient passes
            a quarter of that, at most 256).
            Results do not depend on it beyond float rounding.
        generator: ``torch.Generator`` for reproducible samples.
        progress: Show a progress bar over the methods' passes (the concept scores' default 512
            Integrated Gradients steps dominate).

    Returns:
        A :class:`Comparison`; every map has the input's spatial size.

    Raises:
        TypeError: ``model``, ``invariance``, ``concepts`` or ``ig_baselines`` of the wrong type, a
            model whose output is not ``(N, K)`` logits (a dict, a tuple: wrap it), or an
            ``ig_baselines`` tensor of another dtype than ``inputs``, a boolean ``target``.
        ValueError: explainers built for another model, ``n_samples`` < 2, ``concept_steps`` < 2, a ``target`` of the
            wrong shape or outside the classes, ``ig_baselines`` of the wrong shape or device, a
            model without a spatial layer for Grad-CAM (pass ``gradcam_layer``), an
            ``additional_forward_args`` tensor without ``N`` rows.

    Examples::

        >>> from captum_inn.models import SmallCNN
        >>> from captum_inn.autoencoders import ConvAutoencoder
        >>> from captum_inn.inn import ConditionalINN
        >>> model, ae = SmallCNN().eval(), ConvAutoencoder((3, 32, 32), latent_dim=8).eval()
        >>> inn = ConditionalINN(8, (10,), n_blocks=2, hidden=16)
        >>> _ = inn(torch.randn(4, 8), torch.randn(4, 10))          # (normally: fit_invariances)
        >>> result = compare_attributions(model, torch.rand(2, 3, 32, 32), LayerInvariance(model, "logits", inn, ae),
        ...                               n_samples=4, ig_steps=8)
        >>> result.gradcam.shape, result.integrated_gradients.shape, result.samples.shape
        (torch.Size([2, 1, 32, 32]), torch.Size([2, 3, 32, 32]), torch.Size([2, 4, 3, 32, 32]))
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}; {_wrap_advice()}")
    check_autograd_weights(model, "`model`", "Grad-CAM and Integrated Gradients need gradients through it")
    if not isinstance(invariance, LayerInvariance):
        raise TypeError(f"`invariance` must be a captum_inn.LayerInvariance, got {type(invariance).__name__}.")
    # the explainers take the model itself or its bound forward (model.forward), the same model
    if not runs_model(invariance.forward_func, model):
        raise ValueError("`invariance` explains another model (or runs it through a function other than model.forward); "
                         "build it with LayerInvariance(model, layer, inn, ae).")
    if concepts is not None:
        if not isinstance(concepts, LayerConcepts):
            raise TypeError(f"`concepts` must be a captum_inn.LayerConcepts or None, got {type(concepts).__name__}.")
        concepts._check_gradient_path()  # before Grad-CAM and IG run, not after them
    if concepts is not None and not runs_model(concepts.forward_func, model):
        raise ValueError("`concepts` explains another model (or runs it through a function other than model.forward); "
                         "build it with LayerConcepts(model, layer, concept_inn, ae).")
    layer_name = invariance.layer_name
    if forward_module(invariance.forward_func, invariance.layer) is None:  # model.forward patched with a plain
        layer_name = resolve_layer(model, invariance.layer)[0]  # function: the explainer named the layer by type
    for explainer, name in ((invariance, "invariance"), (concepts, "concepts")):
        if explainer is not None and explainer.image_input != 0:  # never read here: the other input's shape was blamed
            raise ValueError(
                f"`{name}` takes the images as input {explainer.image_input}, but compare_attributions gives them to "
                "the model first (Grad-CAM and Integrated Gradients attribute `inputs`): wrap the model so that its "
                "forward takes the images first, pass its other inputs as `additional_forward_args`, and build the "
                "explainers on the wrapper.")
    # a tuple of two failed unpacking into one
    images = one_image_tensor(inputs, "inputs", "pass the model's other inputs as `additional_forward_args`")
    # before the model's first pass, whose conv error said nothing of the channels coming last
    check_image_size(images, invariance.autoencoder)
    n = images.shape[0]
    # None: bounded as the explainers bound it (all of IG's n × ig_steps rows at once took 3 GB for 8 images
    # of 128×128 under ResNet-18)
    batch = default_rows(images) if internal_batch_size is None else check_positive_int(internal_batch_size,
                                                                                          "internal_batch_size")
    check_positive_int(ig_steps, "ig_steps")
    if check_positive_int(concept_steps, "concept_steps") < 2:  # refused now, not after the other methods ran
        raise ValueError(f"`concept_steps` must be >= 2 (the concept attributions' trapezoid rule), got {concept_steps}.")
    if check_positive_int(n_samples, "n_samples") < 2:
        raise ValueError(f"`n_samples` must be >= 2 for an invariance map (their spread), got {n_samples}.")
    _check_baselines(ig_baselines, images)
    check_per_input_args(additional_forward_args, n)

    def args_of(part: slice) -> Optional[Tuple[Any, ...]]:
        return slice_forward_args(additional_forward_args, part, n)

    first = _first_row(additional_forward_args, n)
    predictions, classes = _predictions(model, images, batch, additional_forward_args, layer_name)
    targets = _targets(target, predictions, classes)

    # Everything below runs in eval mode, like the explainers' own calls: Captum's passes would
    # otherwise run the model as it is (batch statistics, updated running statistics).
    with eval_mode(model), tqdm(desc="compare_attributions", disable=not progress, leave=False) as bar:
        chosen = gradcam_layer is None
        if chosen:  # the invariance layer where Grad-CAM can read it: its output, a map of more than one cell
            # from a module that runs once (Captum reads a reused module's last call, the explainers its first)
            readable = invariance.selector is None and not invariance.attribute_to_layer_input
            z = invariance._activation((images[:1],), first) if readable else None
            readable = z is not None and z.dim() == 4 and z.shape[2] * z.shape[3] > 1 \
                and len(_outputs(model, invariance.layer, images[:1], first)) == 1
            gradcam_layer = layer_name if readable else last_spatial_layer(
                model, images, additional_forward_args=additional_forward_args)
        gradcam_name, gradcam_module = resolve_layer(model, gradcam_layer)
        # the default too: a module that runs twice (one nn.ReLU after two convolutions) is read by Captum at
        # its last call, which it warns about
        _check_gradcam_layer(model, gradcam_name, gradcam_module, images[:1], first)
        if ig_baselines is None:
            ig_baselines = torch.zeros_like(images)

        gradcam_parts, ig_parts, ig_deltas, concept_parts, concept_deltas = [], [], [], [], []
        gradcam = LayerGradCam(eager_module(model), gradcam_module)  # Captum's hooks, as ours
        ig = IntegratedGradients(model)
        # IG expands each input to ig_steps rows: a bound takes max(1, batch // ig_steps) inputs per call
        # (Captum splits their steps into passes of `batch` rows)
        rows = max(1, batch // ig_steps)
        bar.reset(total=len(range(0, n, batch)) * (3 if concepts is not None else 2) + len(range(0, n, rows)) + 1)
        bar.set_postfix_str("Grad-CAM")
        for start in range(0, n, batch):
            part = slice(start, min(start + batch, n))
            cam = gradcam.attribute(images[part], target=targets[part], additional_forward_args=args_of(part),
                                    relu_attributions=True)
            if chosen and start == 0 and cam.shape[2] * cam.shape[3] <= 4:
                _warn_coarse_gradcam(model, gradcam_name, tuple(cam.shape[2:]), images, additional_forward_args)
            gradcam_parts.append(LayerAttribution.interpolate(cam.detach(), tuple(images.shape[2:]), "bilinear"))
            bar.update()
        bar.set_postfix_str("Integrated Gradients")
        for start in range(0, n, rows):
            part = slice(start, min(start + rows, n))
            # a per-input baseline is sliced with the inputs; a (1, C, H, W) one broadcasts
            per_input = isinstance(ig_baselines, Tensor) and ig_baselines.dim() == 4 and ig_baselines.shape[0] == n
            base = ig_baselines[part] if per_input else ig_baselines
            attributions, delta = ig.attribute(images[part], baselines=base, target=targets[part],
                                               additional_forward_args=args_of(part), n_steps=ig_steps,
                                               internal_batch_size=batch, return_convergence_delta=True)
            ig_parts.append(attributions.detach())
            ig_deltas.append(delta.detach())
            bar.update()
        if concepts is not None:
            bar.set_postfix_str("concept scores")
            for start in range(0, n, batch):
                part = slice(start, min(start + batch, n))
                scores, delta = concepts.attribute(images[part], target=targets[part],
                                                   additional_forward_args=args_of(part), n_steps=concept_steps,
                                                   internal_batch_size=internal_batch_size, return_convergence_delta=True)
                concept_parts.append(scores.detach())
                concept_deltas.append(delta.detach())
                bar.update()
        bar.set_postfix_str("invariance samples")
        samples = invariance.sample(images, n_samples, additional_forward_args=additional_forward_args,
                                    internal_batch_size=internal_batch_size, generator=generator, shared_noise=True)
        bar.update()
        # the reconstructions in chunks too: the autoencoder is a network like the others (the images were
        # checked by sample, once)
        bar.set_postfix_str("reconstructions")
        reconstruction_parts = []
        for start in range(0, n, batch):
            reconstruction_parts.append(invariance._reconstruct(images[start : start + batch]))
            bar.update()
    reconstructions = torch.cat(reconstruction_parts)
    return Comparison(  # copies: a caller reusing its input or target buffers rewrote the record of this call
        inputs=images.detach().clone(),
        targets=targets.clone(),
        predictions=predictions,
        gradcam=torch.cat(gradcam_parts),
        integrated_gradients=torch.cat(ig_parts),
        invariance_map=samples.std(dim=1),  # what LayerInvariance.attribute returns, from the same samples
        samples=samples,
        reconstructions=reconstructions,
        concept_scores=torch.cat(concept_parts) if concepts is not None else None,
        concept_names=list(concepts.concept_names) if concepts is not None else [],
        layer=layer_name,
        gradcam_layer=gradcam_name,
        integrated_gradients_delta=torch.cat(ig_deltas),
        concept_delta=torch.cat(concept_deltas) if concepts is not None else None,
    )


def _warn_coarse_gradcam(model: nn.Module, name: str, size: Tuple[int, ...], example: Tensor,
                         additional_forward_args: Any) -> None:
    """Warn that the default Grad-CAM layer's map is too coarse, naming the last layer before it with a
    larger map (the hint named ResNet's 'layer3' for every model, even when Grad-CAM already read
    'layer3'); a module without weights that gives the images back before any layer with weights ran
    (a Normalize in front) is no feature map."""
    order = _spatial_layers(model, example, additional_forward_args)
    names = [n for n, _ in order]
    modules = dict(model.named_modules())
    larger, weighted = [], False
    for layer_name, shape in order[:names.index(name)] if name in names else order:
        has_weights = any(True for _ in getattr(modules.get(layer_name), "parameters", lambda: ())())
        preprocessing = not weighted and not has_weights and shape == tuple(example.shape[1:])
        weighted = weighted or has_weights
        if shape[1] * shape[2] > size[0] * size[1] and not preprocessing:
            larger.append((layer_name, shape))
    hint = (f"pass gradcam_layer= an earlier layer with a larger map, such as {larger[-1][0]!r} "
            f"({larger[-1][1][1]}×{larger[-1][1][2]})" if larger else
            "no layer of the model has a larger map at this input size: use larger images")
    warnings.warn(f"Grad-CAM at {name!r} is a {size[0]}×{size[1]} map at this input size, too coarse to show "
                  f"where; {hint}.", UserWarning, stacklevel=user_stacklevel())


def _wrap_advice(layer: str = "<layer>") -> str:
    """How to give Grad-CAM and IG the logits of a model that returns something else."""
    return ("Grad-CAM and Integrated Gradients need a model that returns the logits: wrap it, e.g. an nn.Module "
            "whose forward returns self.model(x)['logits'], and build the LayerInvariance on that wrapper (its "
            f"layer names take the attribute's prefix, 'model.{layer}').")


def _predictions(model: nn.Module, images: Tensor, batch: int, additional_forward_args: Any,
                 layer: str) -> Tuple[Tensor, int]:
    """The model's top-1 classes ``(N,)`` and its number of classes, from one pass over the images
    in chunks of ``batch`` (as :func:`~captum_inn.metrics.predict_classes`; a separate pass of one
    image for the class count ran the model once more). An output other than ``(N, K)`` logits (a
    dict, a tuple) is a ``TypeError`` that says how to wrap the model (Captum would fail inside)."""
    parts = []
    with torch.no_grad(), eval_mode(model), dtype_errors_named(images, model):
        for start in range(0, images.shape[0], batch):
            part = slice(start, start + batch)
            (copy,) = copied_tensors((images[part],))
            output = model(copy, *(slice_forward_args(additional_forward_args, part, images.shape[0]) or ()))
            check_input_unchanged(copy, "Integrated Gradients")
            if not isinstance(output, Tensor) or output.dim() != 2:
                got = (f"a tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) else
                       f"a {type(output).__name__}" + (f" with keys {list(output)}" if isinstance(output, dict) else ""))
                raise TypeError(f"`model` must return (N, K) logits, but it returns {got}. {_wrap_advice(layer)}")
            check_class_logits(output, "`model`")  # one logit: every input "predicted" class 0
            parts.append(output.argmax(1))
    return torch.cat(parts), output.shape[1]


def _targets(target: Any, predictions: Tensor, classes: int) -> Tensor:
    n = predictions.shape[0]
    if target is None:
        return predictions
    if isinstance(target, (bool, str, bytes)):  # "3" was torch's "invalid data type 'str'"
        raise TypeError(f"`target` must be None, an int or N class indices, got a {type(target).__name__}, {target!r}.")
    if isinstance(target, (list, tuple)) and len(target) == 0:  # an empty list read as a float tensor
        raise ValueError(f"`target` is an empty {type(target).__name__}; give one class per input ({n}), an int for "
                         "all, or None for each input's predicted class.")
    # Captum's one-index tuples, which its explainers (and captum_inn's) take: (3,) for all, [(3,), (1,)] per input
    if isinstance(target, tuple) and len(target) == 1 and isinstance(target[0], int):
        target = target[0]
    elif isinstance(target, list) and target and all(isinstance(t, tuple) and len(t) == 1 for t in target):
        target = [t[0] for t in target]
    if isinstance(target, int):
        targets = torch.full((n,), target, dtype=torch.long, device=predictions.device)
    else:
        targets = torch.as_tensor(target, device=predictions.device)
        if targets.dtype == torch.bool:  # .long() would read a mask as classes 0 and 1
            raise TypeError("`target` holds class indices, but got booleans; pass class indices, e.g. "
                            "mask.long() or mask.nonzero().")
        if targets.is_floating_point():  # the shape error below would blame a shape that is right
            raise TypeError(f"`target` holds class indices, but got {targets.dtype} values; pass whole numbers "
                            "(target.long() for a tensor).")
        if targets.numel() == 1 and not isinstance(target, (list, tuple)):
            # a one-element tensor (or numpy int) is one class for all, as in Captum's TargetType
            targets = targets.reshape(()).expand(n)
        if targets.dim() != 1 or targets.shape[0] != n:
            raise ValueError(f"`target` must be None, an int or {n} class indices (one per input), got shape "
                             f"{tuple(targets.shape)}.")
        targets = targets.long()
    if targets.min() < 0 or targets.max() >= classes:
        raise ValueError(f"`target` holds classes outside 0…{classes - 1}: {sorted(set(targets.tolist()))[:10]}.")
    return targets
