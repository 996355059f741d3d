"""Input checks (shared by the Captum-style classes, the analyses and the ``fit_*`` functions) and layer reading."""

from __future__ import annotations

import collections
import functools
import numbers
import operator
import sys
import warnings
from contextlib import contextmanager
from typing import (
    Any,
    Callable,
    Iterator,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import torch
from torch import Tensor, nn

from captum_inn._captum_compat import _format_additional_forward_args, _format_tensor_into_tuples
from captum_inn._fingerprints import buffer_fingerprints, weights_fingerprint
from captum_inn._numbers import (  # noqa: F401 - re-exported: the checks are imported from here
    _shown,
    check_int,
    check_number,
    check_positive_int,
    integer_scalar,
)
from captum_inn.autoencoders import encode_mean, encode_posterior
from captum_inn.capture import (
    LayerHooks,
    check_selector,
    copied_tensors,
    did_not_run_hint,
    is_comparable_selector,
    normal_tensors,
    resolve_layer,
    selector_for_layer,
    selector_record,
)
from captum_inn.inn.base import check_device

__all__ = [
    "autograd_on",
    "format_inputs",
    "one_image_tensor",
    "resolve_model_layer",
    "layer_activation",
    "check_positive_int",
    "check_same_device",
    "check_fitted_layer",
    "layer_side",
    "as_device",
    "dtype_errors_named",
    "network_dtype",
    "check_target_count",
    "check_pixel_range",
    "check_image_size",
    "weights_fingerprint",
    "buffer_fingerprints",
    "check_same_weights",
    "check_model_weights",
    "slice_forward_args",
    "check_per_input_args",
    "fitted_image_input",
    "forward_errors_explained",
    "NOT_SPLIT",
    "holds_tensor",
]


T = TypeVar("T")


def autograd_on(function: Callable[..., T]) -> Callable[..., T]:
    """``function`` with autograd on, whatever the caller's mode: a fit or a gradient-based
    explanation called inside the caller's ``torch.no_grad()`` or ``torch.inference_mode()`` (a
    notebook cell that evaluates the model) otherwise failed with "element 0 of tensors does not
    require grad", as Captum's own gradient methods do under ``inference_mode``."""

    @functools.wraps(function)
    def with_autograd(*args: Any, **kwargs: Any) -> T:
        # inference_mode(False) too, and copies of the arguments made in it: images and labels made
        # under the caller's inference mode are inference tensors, which autograd cannot save
        with torch.inference_mode(False), torch.enable_grad():
            args = tuple(normal_tensors(a) for a in args)
            kwargs = {k: normal_tensors(v) for k, v in kwargs.items()}
            return function(*args, **kwargs)

    return with_autograd


def numpy_hint(value: Any) -> str:
    """For a NumPy array where a tensor is needed: how to convert it (Captum takes tensors only)."""
    return "; convert it with torch.from_numpy(...)" if type(value).__module__ == "numpy" else ""


def format_inputs(inputs: Any, image_index: int = 0, name: str = "inputs") -> Tuple[Tensor, ...]:
    """Captum's input convention (tensor or tuple of tensors, dim 0 the batch), checked.

    Raises ``TypeError``/``ValueError`` naming ``name`` for non-tensors, empty batches, mismatched
    batch sizes, non-floating or non-4-d image tensors and NaN/inf values.
    """
    if isinstance(inputs, Tensor):
        inputs_tuple = (inputs,)
    elif isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        inputs_tuple = tuple(inputs)
    else:
        raise TypeError(
            f"`{name}` must be a tensor (N, C, H, W) or a tuple of tensors with the batch in dim 0, "
            f"got {type(inputs).__name__}{numpy_hint(inputs)}."
        )
    inputs_tuple = _format_tensor_into_tuples(inputs_tuple)
    scalars = [i for i, t in enumerate(inputs_tuple) if t.dim() == 0]
    if scalars:
        raise ValueError(
            f"`{name}`[{scalars[0]}] is a 0-d tensor, but every tensor in `{name}` needs a batch in dim 0 "
            "(one row per example): pass a value that every example shares in `additional_forward_args`, "
            "or give it one row per example.")
    sizes = {t.shape[0] for t in inputs_tuple}
    if len(sizes) != 1:
        rows = ", ".join(f"`{name}`[{i}] has {t.shape[0]}" for i, t in enumerate(inputs_tuple))
        raise ValueError(f"Every tensor in `{name}` needs the same batch size in dim 0 (one row per example): {rows}.")
    if 0 in sizes:
        raise ValueError(f"`{name}` is an empty batch; pass at least one example.")
    if not 0 <= image_index < len(inputs_tuple):  # the explainers' image_input, checked as an int when built
        raise ValueError(f"`image_input`={image_index} is out of range for {len(inputs_tuple)} input tensors; pass "
                         f"the image's position among the inputs (0 to {len(inputs_tuple) - 1}).")
    image = inputs_tuple[image_index]
    # the images elsewhere in a tuple: the model's other argument was read as them (image_input left at 0)
    elsewhere = next((j for j, t in enumerate(inputs_tuple) if j != image_index and t.dim() == 4
                      and t.is_floating_point()), None)
    other = ("" if elsewhere is None else f" Input {elsewhere} of the tuple has the shape of images "
             f"{tuple(inputs_tuple[elsewhere].shape)}: pass image_input={elsewhere} to the explainer (and the fit).")
    if not image.is_floating_point():
        raise TypeError(f"`{name}` images must be floating point, got dtype {image.dtype}; convert with "
                        f".float().{other}")
    if image.dim() != 4:
        hint = other
        if image.dim() == 3 and not other and not isinstance(inputs, Tensor):
            hint = (f" A {type(inputs).__name__} is read as several model inputs, each with the batch in dim 0; "
                    "stack single images into one tensor with torch.stack.")
        elif image.dim() == 3 and not other:  # one image: its channels were read as the batch
            hint = " For one image, pass a batch of one: x.unsqueeze(0)."
        raise ValueError(f"`{name}` images must have shape (N, C, H, W), got {tuple(image.shape)}.{hint}")
    for t in inputs_tuple:
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            raise ValueError(f"`{name}` contains NaN or infinite values; clean or clamp the inputs first.")
    return inputs_tuple


def one_image_tensor(value: Any, name: str,
                     others: str = "these analyses take no extra model inputs (join batches of images with torch.cat)",
                     ) -> Tensor:
    """``value`` checked as Captum inputs, then required to be one image tensor: the analyses and
    :func:`~captum_inn.compare.compare_attributions` take one ``(N, C, H, W)`` batch; ``others`` says
    where other inputs go."""
    inputs = format_inputs(value, name=name)
    if len(inputs) != 1:
        raise TypeError(f"`{name}` must be one image tensor (N, C, H, W), got a {type(value).__name__} of "
                        f"{len(inputs)} tensors; {others}.")
    return inputs[0]


def check_image_size(images: Tensor, autoencoder: Any, name: str = "inputs",
                     decoded: Optional[Tuple[int, ...]] = None) -> None:
    """``ValueError`` naming ``name`` when the autoencoder takes and decodes images (of shape
    ``decoded``, by default its ``image_shape`` where it has one) of another shape than ``images``."""
    shape = tuple(images.shape[1:])
    decoded = getattr(autoencoder, "image_shape", None) if decoded is None else decoded
    if decoded is None or tuple(decoded) == shape:
        return
    fix = (f"Resize the images (torch.nn.functional.interpolate(x, size={tuple(decoded[-2:])})) or fit an "
           "autoencoder (and INNs) for images of this size.")
    if shape == (*decoded[1:], decoded[0]):
        fix = "The channels come last: pass x.permute(0, 3, 1, 2)."
    elif len(shape) == len(decoded) and shape[1:] == tuple(decoded[1:]):  # resizing would not help
        fix = (f"The images have {shape[0]} channel(s), the autoencoder {decoded[0]}: "
               + (f"pass x.expand(-1, {decoded[0]}, -1, -1) for gray images, or " if shape[0] == 1 else "")
               + f"fit an autoencoder (and INNs) for {shape[0]}-channel images.")
    raise ValueError(f"`{name}` images have shape {shape}, but the autoencoder takes and decodes images of shape "
                     f"{tuple(decoded)}. {fix}")


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn``, called where the warning is raised, that points at
    the first frame outside ``captum_inn`` (told by its module's name, so a path spelt another way
    or a symlink does not matter): the user's own line, however deep in the package (and through
    however many wrappers) the warning comes from. A fixed count broke whenever a call path changed
    (a decorator added a frame). Code of the package run as a program (the demo) and fits in worker
    threads point at the frame that started them (``runpy``, ``concurrent.futures``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _inside_package(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    return level


#: Modules whose frames wrap the package's functions (``@torch.no_grad()``, ``contextmanager``,
#: Captum's ``@log_usage()`` on ``attribute`` and its ``NoiseTunnel`` calling it).
_WRAPPERS = ("torch.utils._contextlib", "contextlib", "functools", "captum.")


def _inside_package(module: str) -> bool:
    return module.partition(".")[0] == "captum_inn" or module.startswith(_WRAPPERS)


def class_indices(labels: Tensor, name: str) -> Tensor:
    """``labels`` as ``(N,)`` long class indices, or an error naming ``name`` and the fix: ``.long()``
    silently truncated fractional labels (0.7 read as class 0) and cross-entropy ignores -100."""
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape (N,) (one class index per image), got "
                         f"{tuple(labels.shape)}; pass labels.flatten() for (N, 1) labels, labels.argmax(1) for "
                         "one-hot or probability labels.")
    if labels.is_floating_point():
        if not (torch.isfinite(labels).all() and (labels == labels.round()).all()):
            raise ValueError(f"{name} must be whole class indices, got fractional, NaN or infinite values; "
                             "pass integer class labels (e.g. labels.argmax(1) for probabilities).")
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0, got {int(labels.min())}.")
    return labels


def check_pixel_range(images: Tensor, name: str, autoencoder: Any = None, fix: Optional[str] = None,
                      margin: float = 0.0) -> None:
    """Images outside ``[0, 1]`` although the autoencoder decodes to ``[0, 1]`` (a
    ``ConvAutoencoder`` with ``output="sigmoid"``; ``autoencoder=None`` checks regardless): normalised
    or 8-bit pixels would be compared with images they can never look like.

    With ``margin == 0`` a ``ValueError`` naming ``name``; with ``margin > 0`` a ``UserWarning``,
    only for pixels beyond ``[-margin, 1 + margin]`` (explainers: Captum's NoiseTunnel and
    sensitivity metrics perturb inputs a little past the range, which is fine)."""
    config = getattr(autoencoder, "config", None)  # a ConvAutoencoder's dict; another autoencoder's may be anything
    output = config.get("output") if isinstance(config, Mapping) else getattr(config, "output", None)
    if autoencoder is not None and output != "sigmoid":
        return
    low, high = (float(v) for v in torch.aminmax(images.detach()))  # one pass (and one device wait)
    if low >= -margin and high <= 1 + margin:
        return
    fix = fix or ("the autoencoder decodes images in [0, 1], like the ones it was fitted on; pass such images "
                  "(8-bit pixels / 255) and normalise inside the model, nn.Sequential(normalise, model).")
    message = f"`{name}` pixels range over [{low:.3g}, {high:.3g}], but {fix}"
    if margin > 0:
        if low < -margin:  # the explainers' usual case: Captum's NoiseTunnel (stdevs=1.0 by default)
            message += (" Under Captum's NoiseTunnel, noise this large is the cause: pass stdevs of a few percent "
                        "of the pixel range (e.g. stdevs=0.05).")
        warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
    else:
        raise ValueError(message)


def check_optional_callable(value: Any, name: str, call: str) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is ``None`` or callable as ``call`` says (an int
    given as a fit's augmentation or callback failed at the first step, after the data was read)."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be callable ({call}) or None, got {type(value).__name__}.")


def check_image_input(value: Any) -> int:
    """The explainers' ``image_input`` as an int ``>= 0``, or an error naming it (its upper bound
    depends on each call's inputs: :func:`format_inputs` checks it there)."""
    value = check_int(value, "image_input")
    if value < 0:
        raise ValueError(f"`image_input` must be >= 0 (the image's position among the inputs), got {value}.")
    return value


def fitted_image_input(value: Any, fit_info: Mapping[str, Any]) -> int:
    """The explainers' ``image_input``: as given, else the fit's (``fit_invariances(image_input=1)``
    records it in ``fit_info``), else 0."""
    return int(fit_info.get("image_input", 0)) if value is None else check_image_input(value)


def resolve_model_layer(forward_func: Callable, layer: Union[str, nn.Module]) -> Tuple[str, nn.Module]:
    """The layer's name and module; a dotted name needs ``forward_func`` to be the model itself or
    its bound ``forward`` (``model.forward``), which also name a layer module by its path."""
    if isinstance(forward_func, nn.Module):
        return resolve_layer(forward_func, layer)
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module) and (isinstance(layer, str) or any(m is layer for m in owner.modules())):
        return resolve_layer(owner, layer)
    if isinstance(layer, nn.Module):
        return type(layer).__name__, layer
    raise TypeError(
        "`layer` given by name needs `forward_func` to be an nn.Module (or its bound forward); pass the layer "
        "module itself when forward_func is a plain function."
    )


def check_inn_fitted(inn: Any, what: str, fit: str, load: str) -> None:
    """``ValueError`` for an INN that never saw data (``inn.is_fitted`` is False), naming ``what``.

    Its ActNorms would initialise from the first batch explained, so every result would mean
    nothing rather than fail: the explainers refuse it when built.
    """
    if not inn.is_fitted:
        raise ValueError(
            f"`{what}` is not fitted: its ActNorm layers have never seen data, so it would initialise them "
            f"from the inputs being explained and give meaningless results. Fit it with {fit}, or load its "
            f"checkpoint ({load})."
        )


def check_fitted_layer(fitted: Optional[str], name: str, forward_func: Callable, what: str) -> None:
    """``ValueError`` when an INN fitted on layer ``fitted`` is used for layer ``name``.

    Names are compared only where both are known: ``fitted`` from the INN's ``fit_info`` and ``name``
    from a model given as an ``nn.Module`` (a plain function has no layer names). A name that is a
    dotted suffix of the other (``"fc"`` and ``"module.fc"``) counts as the same only where
    ``fitted`` names no layer of the model (the model wraps the fitted one, or the fit was on a
    wrapper): in a model with both ``"fc"`` and ``"head.fc"`` they are two layers.
    """
    if fitted is None or not isinstance(forward_func, nn.Module) or fitted == name:
        return
    try:
        fitted_module: Optional[nn.Module] = forward_func.get_submodule(fitted)
    except AttributeError:
        fitted_module = None
    if fitted_module is None:
        if name.endswith("." + fitted) or fitted.endswith("." + name):
            return
    elif fitted_module is forward_func.get_submodule(name):  # one module registered under two names
        return
    raise ValueError(
        f"`{what}` was fitted on layer {fitted!r}, not {name!r}; pass that layer or fit an INN for this one."
    )


def layer_side(asked: Optional[bool], fitted: Optional[bool], what: str) -> bool:
    """Whether to read the layer's input: as ``asked``, or as the INN ``what`` was ``fitted`` when not
    asked (the output where the fit does not say); asking for the other side is a ``ValueError``,
    since a layer's input and output often have the same shape and the mix-up would go unnoticed."""
    if asked is None:
        return bool(fitted)
    if fitted is not None and bool(asked) != bool(fitted):
        side = "input" if fitted else "output"
        raise ValueError(
            f"`{what}` was fitted on the layer's {side}, but attribute_to_layer_input={asked} reads its "
            f"{'output' if fitted else 'input'}; pass attribute_to_layer_input={bool(fitted)} (or leave it out), "
            "or fit an INN on that side."
        )
    return bool(asked)


def fitted_selector(asked: Any, fit_info: Mapping[str, Any], what: str, forward_func: Any, name: str,
                    module: nn.Module) -> Any:
    """The selector to read layer ``name`` (``module``) with: ``asked`` (a ``{layer: selector}``
    dict: its entry for this layer), or the ``int``/``str`` one the INN ``what`` was fitted with
    (``fit_info["selector"]``) where that gives none. Another one, or none where the fit used a
    callable, is a ``ValueError``: the layer would be read otherwise than it was fitted."""
    mine = selector_for_layer(forward_func, name, module, asked)
    check_selector(mine, name)  # now, not at the first call
    if "selector" not in fit_info:  # fitted before selectors were recorded
        return mine
    fitted = fit_info["selector"]
    if mine is None:
        if not is_comparable_selector(fitted):
            raise ValueError(
                f"`{what}` was fitted with a callable selector ({fitted['callable']}); pass the same callable "
                "as selector= to read the layer as it was fitted."
            )
        return fitted
    now = selector_record(mine)
    if is_comparable_selector(now) and not is_comparable_selector(fitted):  # nothing tells if they pick alike
        warnings.warn(f"`{what}` was fitted with a callable selector ({fitted['callable']}), but selector={mine!r} "
                      "was passed; unless it picks the same tensor, the layer is read otherwise than it was fitted. "
                      "Pass the same callable.", UserWarning, stacklevel=user_stacklevel())
    if is_comparable_selector(now) and is_comparable_selector(fitted) and now != fitted:
        if fitted is None:
            fix = f"`{what}` was fitted without a selector, but selector={mine!r} was passed; leave selector out"
        else:  # negative indices are compared as written, so -1 and 1 of a pair differ here
            fix = (f"`{what}` was fitted with selector={fitted!r}, but selector={mine!r} was passed; pass "
                   f"selector={fitted!r} (or leave it out)")
        raise ValueError(f"{fix}, or fit an INN with this selector.")
    return mine


def runs_model(forward_func: Any, model: nn.Module) -> bool:
    """Whether an explainer's ``forward_func`` is ``model`` or its bound ``model.forward`` (another
    method, ``model.predict``, may return other scores than the logits an analysis of ``model`` reads)."""
    return forward_func is model or forward_func == model.forward


def forward_module(forward_func: Callable, layer: nn.Module) -> Optional[nn.Module]:
    """The model behind ``forward_func``, which the explainers switch to eval mode: ``forward_func``
    itself (an ``nn.Module``), or the module of a bound method (``model.forward``) that holds
    ``layer``; ``None`` for any other function (a lambda, a closure), whose model is out of reach."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module) and any(m is layer for m in owner.modules()):
        return owner
    return None


def eval_owner(forward_func: Callable, layer: nn.Module) -> nn.Module:
    """What a pass puts in eval mode: the model (:func:`forward_module`), else only the layer."""
    model = forward_module(forward_func, layer)
    return layer if model is None else model


def warn_unreachable_model(forward_func: Callable, layer: nn.Module, what: str) -> None:
    """A ``UserWarning`` (once, when an explainer is built) for a ``forward_func`` whose model the
    explainer cannot switch to eval mode: only the hooked layer would be, so batch norm elsewhere
    would run on (and update) batch statistics and dropout would stay on. Not where the layer is
    in eval mode already: ``model.eval()`` has switched the whole model, the layer with it."""
    if forward_module(forward_func, layer) is None and any(m.training for m in layer.modules()):
        warnings.warn(
            f"`forward_func` is a plain function, so {what} cannot switch the model to eval mode (only the hooked "
            "layer): batch norm in training mode would use and update batch statistics, and dropout would stay "
            "on. Call model.eval() first, or pass the model itself (or model.forward) as forward_func.",
            UserWarning, stacklevel=user_stacklevel(),
        )


def warn_if_batch_statistics(model: Optional[nn.Module], what: str) -> None:
    """A ``UserWarning`` for batch norm without running statistics (``track_running_stats=False``):
    it normalises with each batch's own statistics in eval mode too, so an image's activation
    depends on the images that share its batch (the cache's 64, an explanation's N), and the
    promise that a batch of one gives what any batch gives does not hold."""
    if model is None:
        return
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
    if names:
        shown = ", ".join(repr(name) for name in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"{what}: batch norm {shown} of the model has no running statistics (track_running_stats=False), so it "
            "normalises with each batch's own statistics in eval mode too: an image's activation depends on the "
            "images that share its batch, in the fit and in every explanation. Give it running statistics "
            "(track_running_stats=True, fitted in training) or use nn.GroupNorm or nn.LayerNorm.",
            UserWarning, stacklevel=user_stacklevel(),
        )


# Said where a pass gave other rows than inputs and extra arguments were given: a per-input tensor that
# was not split with the inputs spreads a batch's rows (it read as a sequence-first layer).
NOT_SPLIT = ("Only tensors given directly in `additional_forward_args` with one row per input (per image of the "
             "fits' `data`) are split with the inputs: one nested in a tuple, list or dict, or of another length, "
             "goes whole to every pass. Pass per-input tensors directly, or bind them in a wrapper module.")


def holds_tensor(value: Any) -> bool:
    """Whether ``value`` is a tensor of at least one dimension, or a tuple, list or dict holding one
    (extra arguments that could have rows; numbers and 0-d tensors have none)."""
    if isinstance(value, Tensor):
        return value.dim() > 0
    if isinstance(value, Mapping):
        return any(holds_tensor(v) for v in value.values())
    return isinstance(value, (tuple, list)) and any(holds_tensor(v) for v in value)


def check_batch_first(activation: Tensor, n: int, layer: str, additional_forward_args: Any = None) -> None:
    """``ValueError`` unless ``activation``'s first dimension holds the ``n`` inputs of the pass (a
    sequence-first layer's ``(L, N, E)`` was read as ``L`` rows, each mixing images, silently)."""
    if activation.dim() == 0 or activation.shape[0] != n:
        extra = holds_tensor(additional_forward_args)
        shape = tuple(activation.shape)
        if 0 < len(shape) and shape[0] < n and n not in shape[1:]:  # no dimension holds the inputs: fewer rows
            cause = (f"it holds {shape[0]} rows, and no dimension of {n}: a layer that runs on only some inputs "
                     "(routing, a mixture of experts, an early exit, a loop over some samples) cannot be read per "
                     "input; hook a layer that every input passes through.")
        else:
            cause = ("a sequence-first layer (nn.TransformerEncoderLayer, nn.MultiheadAttention or nn.LSTM without "
                     "batch_first=True) gives (L, N, E), and a squeeze() drops a batch of one; put the batch first "
                     "with a selector, e.g. selector=lambda out: out.transpose(0, 1), or hook another layer.")
        raise ValueError(
            f"{layer} gave an activation of shape {shape} for {n} input(s): its first dimension must be the batch. "
            f"{cause[0].upper()}{cause[1:]}" + (" " + NOT_SPLIT if extra else "")
        )


def sequence_first_suspect(activation: Tensor, n: int) -> bool:
    """Whether an activation of ``n`` inputs could be a sequence-first layer's ``(L, N, E)`` with as
    many tokens as inputs (``L == N``), which its shape cannot tell from ``(N, L, E)``: a pass with
    one input fewer can (64 patches of a 32×32 image and batches of 64 were fitted as token rows)."""
    return activation.dim() == 3 and n >= 2 and activation.shape[0] == activation.shape[1] == n


def check_batch_first_read(activation: Tensor, n: int, layer: str, read_first: Callable[[int], Tensor],
                           additional_forward_args: Any = None) -> None:
    """:func:`check_batch_first`, and where the shape cannot tell (:func:`sequence_first_suspect`)
    the same check of ``read_first(n - 1)``, the activation of the first ``n - 1`` inputs."""
    check_batch_first(activation, n, layer, additional_forward_args)
    if sequence_first_suspect(activation, n):
        check_batch_first(read_first(n - 1), n - 1, f"{layer} (checked with the first {n - 1} of {n} inputs, since a "
                          f"shape of ({n}, {n}, ...) cannot tell batch-first from sequence-first)", additional_forward_args)


def slice_forward_args(additional_forward_args: Any, part: Union[slice, Tensor], n: int) -> Optional[Tuple[Any, ...]]:
    """Per-input additional arguments (tensors with batch ``n`` first) cut to the rows ``part`` of
    the inputs, a slice or an index tensor (repeats allowed: ``arange(a, b) // S`` gives the rows of
    ``S`` samples per input); other values as they are. Which tensors are per-input is decided by
    ``n`` alone, so a shared tensor that happens to have as many rows as the samples stays whole."""
    if additional_forward_args is None:
        return None
    args = _format_additional_forward_args(additional_forward_args)
    return tuple(a[part.to(a.device) if isinstance(part, Tensor) else part]
                 if isinstance(a, Tensor) and a.dim() and a.shape[0] == n else a for a in args)


def check_per_input_args(additional_forward_args: Any, n: int) -> None:
    """Captum's gradient methods expand every tensor of ``additional_forward_args`` (but a 0-d one)
    with the inputs, so each must have one row per input: refuse another batch before any method
    runs (IntegratedGradients would fail inside the model with a shape error naming neither)."""
    for i, a in enumerate(_format_additional_forward_args(additional_forward_args) or ()):
        if isinstance(a, Tensor) and a.dim() and a.shape[0] != n:
            raise ValueError(
                f"`additional_forward_args` tensor {i} has shape {tuple(a.shape)}, but Captum expands its tensors "
                f"with the inputs, so each needs one row per input ({n} first). Pass a value shared by all inputs "
                "as a 0-d tensor or a non-tensor, or bind it in a wrapper module whose forward calls the model."
            )


@contextmanager
def forward_errors_explained(inputs: Tuple[Any, ...], extra: Tuple[Any, ...], of: str,
                             n_rows: Union[int, None, str] = "batch", image_input: int = 0) -> Iterator[None]:
    """Name the likely cause of a network's failure in a pass ``model(*inputs, *extra)``, which torch's
    shape errors never do: an extra tensor with another number of rows than the batch went whole
    to it, since its rows are not one per image of ``of`` (``n_rows`` images; ``None`` when unknown,
    by default the batch's), the usual mistake with a per-image tensor; otherwise a note says how the
    model was called (with the fits' images at ``image_input`` among ``extra``), for a model that
    takes its images elsewhere."""
    batch = inputs[0].shape[0]
    if n_rows == "batch":
        n_rows = batch
    try:
        yield
    except (RuntimeError, IndexError) as error:
        whole = [(i, tuple(a.shape)) for i, a in enumerate(extra)
                 if isinstance(a, Tensor) and a.dim() and a.shape[0] != batch]
        if not whole:
            _note_call(error, inputs, extra, image_input)
            raise
        i, shape = whole[0]
        images, fix = (("of unknown number", "data of known length: a tensor, a sized Dataset or a DataLoader over one")
                       if n_rows is None else (f"{n_rows} image(s)", f"{n_rows} rows, one per image"))
        raise type(error)(f"{error}\n(`additional_forward_args` tensor {i} of shape {shape} went whole to the model, "
                          f"since its {shape[0]} rows are not one per image of {of} ({images}). A per-image "
                          f"tensor needs {fix}.)") from error
    except TypeError as error:  # "forward() missing 1 required positional argument"
        _note_call(error, inputs, extra, image_input)
        raise


def _note_call(error: BaseException, inputs: Tuple[Any, ...], extra: Tuple[Any, ...], image_input: int) -> None:
    """Add to ``error`` how the model was called: the inputs first, as Captum calls it, unless a fit
    was told to put its images at ``image_input``."""
    def shown(value: Any) -> str:
        return f"tensor{tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__

    args = [shown(a) for a in extra]
    call = ", ".join(args[:image_input] + [shown(t) for t in inputs] + args[image_input:])
    order = (f"the images at position {image_input} (`image_input`) among additional_forward_args" if image_input
             else "the inputs first, then additional_forward_args, as Captum does")
    note = (f"captum_inn called the model as model({call}): {order}. For a model that takes its images elsewhere, "
            "give the fits `image_input=` (the images' position among the model's arguments) and the explainers a "
            "tuple of inputs with the images at their `image_input`.")
    if note not in getattr(error, "__notes__", ()):  # a pass inside another explained one
        error.add_note(note)


def check_finite_rows(values: Tensor, what: str, first: int = 0, of: str = "`data`",
                      before: str = "caching features") -> None:
    """A ``ValueError`` naming the image when batch-first ``values`` (rows from image ``first`` on)
    hold NaN or inf: the pixels were checked finite, so the network or the encoder made them; found
    where they are made, not as a NaN result (explainers) or a fit's failure (caches)."""
    finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(1)
    if not bool(finite.all()):
        row = first + int((~finite).nonzero()[0, 0])
        raise ValueError(f"{what[0].upper()}{what[1:]} hold NaN or infinite values at image {row} of {of} (its pixels "
                         "are finite); check the network there (a division by zero, a log of zero, an overflow in a "
                         f"low-precision dtype) before {before}.")


def layer_activation(
    forward_func: Callable,
    layer: nn.Module,
    inputs: Tuple[Tensor, ...],
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    selector: Any = None,
    name: str = "inputs",
) -> Tensor:
    """Run ``forward_func(*inputs, *additional_forward_args)`` once and return the layer's activation.

    The pass runs in eval mode (the model where :func:`forward_module` reaches it, else only the
    layer) and stops after the layer; hooks are removed and training flags restored afterwards.
    A dtype mistake names the argument ``name`` (``"donors"`` for :meth:`LayerInvariance.transfer`).
    """
    activation = _read_layer(forward_func, layer, inputs, additional_forward_args, attribute_to_layer_input, selector,
                             name)
    n = inputs[0].shape[0]
    # the check's own pass reads the first n - 1 inputs unchecked: its error says where n - 1 comes from
    check_batch_first_read(activation, n, f"The hooked layer ({type(layer).__name__})", lambda k: _read_layer(
        forward_func, layer, tuple(t[:k] for t in inputs), slice_forward_args(additional_forward_args, slice(0, k), n),
        attribute_to_layer_input, selector, name), additional_forward_args)
    check_finite_rows(activation.detach(), f"the hooked layer's ({type(layer).__name__}) activations", of=f"`{name}`",
                      before="explaining")
    return activation


def _read_layer(forward_func: Callable, layer: nn.Module, inputs: Tuple[Tensor, ...], additional_forward_args: Any,
                attribute_to_layer_input: bool, selector: Any, name: str) -> Tensor:
    """:func:`layer_activation`'s pass, without its batch-first check."""
    extra = _format_additional_forward_args(additional_forward_args) or ()
    owner = eval_owner(forward_func, layer)
    with LayerHooks(owner, layer, attribute_to_layer_input=attribute_to_layer_input,
                    selector=selector, stop_early=True) as hooks, \
            dtype_errors_named(next((t for t in inputs if t.is_floating_point()), inputs[0]), owner, name=name), \
            forward_errors_explained(inputs, extra, f"`{name}`"):
        if isinstance(owner, nn.Module) and runs_model(forward_func, owner):
            # the model or its bound forward: run as LayerHooks runs it, through __call__ (a hook on the
            # model itself, layer "", fires) and a DataParallel unreplicated (a replica's thread would
            # die of the hook's early stop)
            hooks.run(*inputs, *extra)
        else:
            forward_func(*copied_tensors(inputs), *extra)
    values = hooks.values
    if not values:
        raise ValueError(
            "The hooked layer did not run during the forward pass; check that it is used by forward_func"
            f"{did_not_run_hint(owner, layer)}."
        )
    return next(iter(values.values()))


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_index_tuple(value: Any) -> bool:
    """A tuple that indexes an output (its entries anything ``operator.index`` takes, NumPy ints too)."""
    def whole(i: Any) -> bool:
        try:
            return not isinstance(i, bool) and operator.index(i) is not None
        except TypeError:
            return False
    return isinstance(value, tuple) and all(whole(i) for i in value)


def check_target_count(target: Any, n: int, device: Optional[torch.device] = None, *,
                       takes_baselines: bool = True) -> None:
    """Captum's ``TargetType`` for ``n`` inputs, checked: ``None``, an int, a tuple of ints, an
    integer tensor of one or ``n`` entries (1-d; int32 or int64, on ``device``, the inputs', for
    several), or a list of ``n`` ints or tuples. Anything else
    is a ``TypeError``/``ValueError`` naming ``target`` (Captum would fail a bare internal assert
    or index with floats, or an unused target would hide a mistake)."""
    forms = ("pass an int, a tuple of ints, an integer tensor with one entry or one per input, or a list of one "
             "int (or tuple) per input")
    if target is None or _is_index(target):
        return
    if isinstance(target, tuple):
        if not _is_index_tuple(target):
            raise TypeError(f"`target` {target!r} is a tuple, which Captum reads as one index into each output; "
                            f"it must hold ints; {forms}.")
        return
    if isinstance(target, Tensor):
        if target.is_floating_point() and target.dim() >= 3:
            # Integrated Gradients takes baselines second: a call written for it put an image batch here
            fix = ("Pass the class to explain as `target`, and a baseline by keyword, `baselines=`." if takes_baselines
                   else "LayerInvariance.attribute takes no baseline (the invariance map needs none); leave it out.")
            raise TypeError(f"`target` is a {target.dtype} tensor of shape {tuple(target.shape)}, which looks like a "
                            "batch of images: a baseline in target's place (Integrated Gradients takes baselines "
                            f"second)? {fix}")
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            rows = " (target.flatten().long() for (N, 1) labels, target.argmax(1) for one-hot rows)" \
                if target.dim() == 2 else ""
            raise TypeError(f"`target` holds class indices, but the tensor is {target.dtype}; convert it with "
                            f"target.long(){rows}.")
        if target.numel() not in (1, n):
            raise ValueError(f"`target` holds {target.numel()} entries for {n} inputs; {forms}.")
        if target.numel() > 1 and target.dtype not in (torch.int32, torch.int64):  # Captum gathers with it
            raise TypeError(f"`target` holds class indices as {target.dtype}, which torch.gather cannot index with "
                            "(8-bit labels, say); convert it with target.long().")
        if target.numel() > 1 and device is not None and target.device != device:  # labels left on the CPU
            raise ValueError(f"`target` is on {target.device} but the inputs are on {device}; move it with "
                             f"target.to('{device}').")
        if target.numel() > 1 and target.dim() != 1:
            raise ValueError(f"`target` has shape {tuple(target.shape)}; one class per input is a 1-d tensor "
                             "(target.flatten()).")
        return
    if isinstance(target, list):
        if len(target) != n:
            raise ValueError(f"`target` holds {len(target)} entries for {n} inputs; {forms}.")
        if not (all(_is_index(t) for t in target)
                or all(_is_index_tuple(t) for t in target)):
            raise TypeError(f"`target` is a list, which must hold one int (or one tuple of ints) per input, got "
                            f"{target[:3]!r}{'…' if n > 3 else ''}; for tensors pass torch.stack(target).")
        return
    hint = " (a NumPy value: convert it with torch.as_tensor(target) or int(target))" \
        if type(target).__module__ == "numpy" else ""
    raise TypeError(f"`target` must be one of Captum's target forms, got {type(target).__name__}{hint}; {forms}.")


def slice_target(target: Any, part: slice, n: int) -> Any:
    """A :func:`check_target_count`-checked ``target`` for the inputs ``part`` of ``n``: a list or
    tensor with one entry per input is cut to the part's; shared forms (``None``, an int, a tuple,
    a tensor of one entry) are every part's."""
    if isinstance(target, list) or (isinstance(target, Tensor) and target.numel() == n > 1):
        return target[part]
    return target


def network_dtype(network: Any, default: torch.dtype) -> torch.dtype:
    """The floating dtype of a network's weights: its parameters, else its buffers (a PCA-style
    autoencoder keeps its basis in buffers); ``default`` for a network with neither floating."""
    if isinstance(network, nn.Module):
        for tensor in (*network.parameters(), *network.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
    return default


# values of the images one pass decodes or runs by default (64 MB in float32): with the networks' activations
# about a GB or two whatever the image size, where all N × S samples of 256 images at 128×128 needed 16 GB
PASS_VALUES = 2**24


# a backward pass keeps every layer's activations for the gradients: a quarter of the rows (256 path points of
# 3×128×128 through a decoder and ResNet-18 took 5 GB), and at most 256, where passes stop getting faster
GRADIENT_ROWS_DIVISOR, MAX_GRADIENT_ROWS = 4, 256


def default_gradient_rows(images: Tensor) -> int:
    """Path points per gradient pass when ``internal_batch_size`` is ``None``: a quarter of
    :func:`default_rows`, at most 256 (256 of 3×32×32, 85 of 3×128×128, 21 of 3×256×256)."""
    return max(1, min(MAX_GRADIENT_ROWS, default_rows(images) // GRADIENT_ROWS_DIVISOR))


def default_rows(images: Tensor) -> int:
    """Images per pass when ``internal_batch_size`` is ``None``: as many as hold :data:`PASS_VALUES`
    values (5,461 images of 3×32×32, 341 of 3×128×128, 85 of 3×256×256), at least one."""
    return max(1, PASS_VALUES // max(1, images[0].numel()))


@contextmanager
def dtype_errors_named(images: Tensor, *modules: Any, name: str = "inputs") -> Iterator[None]:
    """Turn the error of a network fed images of another floating dtype than its weights, or integer
    images (8-bit pixels), into a ``TypeError`` naming ``name`` and the conversion. Only failures are
    rewritten: a model that converts its input itself (or embeds token ids) keeps working."""
    try:
        yield
    except RuntimeError as error:
        dtypes = {p.dtype for m in modules if isinstance(m, nn.Module) for p in m.parameters() if p.is_floating_point()}
        if len(dtypes) == 1 and images.dtype not in dtypes:
            want = str(next(iter(dtypes))).replace("torch.", "")
            if images.is_floating_point():
                raise TypeError(
                    f"`{name}` images are {images.dtype} but the network computes in torch.{want}; convert them "
                    f"with images.to(torch.{want}). ({error})"
                ) from error
            # "Input type (unsigned char) and bias type (float) should be the same": names neither argument nor fix
            if not images.is_complex() and "type" in str(error).lower():
                raise TypeError(
                    f"`{name}` images are {images.dtype} but the network computes in torch.{want}; convert them "
                    f"with images.to(torch.{want}), divided by 255 for 8-bit pixels. ({error})"
                ) from error
        raise


def encode_images(autoencoder: Any, images: Tensor, *, posterior: bool = False, name: str = "inputs") -> Any:
    """The autoencoder's codes of ``images``: the mean ``(N, d)``, or ``(mean, std)`` with ``posterior``.
    The images go in the encoder's own dtype (a float64 model's images, a float32 autoencoder), as
    the codes go to its decoder in its own; dtype errors name ``name``."""
    images = images.to(network_dtype(autoencoder, images.dtype))
    with dtype_errors_named(images, autoencoder, name=name):
        codes = encode_posterior(autoencoder, images) if posterior else encode_mean(autoencoder, images)
    check_finite_rows((codes[0] if posterior else codes).detach(), "the autoencoder's codes", of=f"`{name}`",
                      before="explaining")
    return codes


def check_same_device(tensor: Tensor, module: nn.Module, name: str = "inputs") -> None:
    """``ValueError`` naming ``name`` when ``tensor`` is not on the device of ``module``'s parameters."""
    check_device(tensor, module, name, what="INN")


def as_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, or a ``ValueError`` naming ``name`` (before any work starts):
    for a string torch does not know (``"gpu"``), CUDA where PyTorch sees no GPU (or not that
    index), ``"meta"``, and a device this PyTorch build cannot use (``"mps"`` elsewhere than on a Mac).

    Examples::

        >>> as_device("cpu")
        device(type='cpu')
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"`{name}`={device!r} is not a torch device; pass 'cpu', 'cuda', 'cuda:1', 'mps' or a "
                         "torch.device.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`{name}` is {str(device)!r}, but PyTorch sees no CUDA GPU here "
                         f"(torch.cuda.is_available() is False); pass {name}='cpu'.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"`{name}` is {str(device)!r}, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) here "
                         f"(indices 0 to {torch.cuda.device_count() - 1}); pass {name}='cuda' or another index.")
    if parsed.type == "cpu" and parsed.index is not None:  # one CPU device: "cpu:0" was refused for a model on "cpu",
        parsed = torch.device("cpu")  # with advice (model.to("cpu:0")) that left it on "cpu"
    if parsed.type == "meta":  # tensors without values: every pass would fail reading them
        raise ValueError(f"`{name}` is 'meta', a device without data; pass {name}='cpu' or a GPU.")
    if parsed.type not in ("cpu", "cuda"):  # mps, xpu, ...: a tensor there says whether this build has it
        try:
            torch.empty(1, device=parsed)
        except Exception as error:  # noqa: BLE001 - what a missing backend raises varies (RuntimeError, ImportError)
            reason = (str(error).splitlines() or [type(error).__name__])[0].split(". ")[0][:160]
            raise ValueError(f"`{name}` is {str(device)!r}, but this PyTorch cannot use it ({reason}); "
                             f"pass {name}='cpu'.") from None
    return parsed


def check_module_device(module: Any, device: Union[str, torch.device], name: str) -> None:
    """``ValueError`` naming ``name`` when ``module``'s parameters are not on ``device`` (the fit's
    ``device=`` argument): the analysed model and encoder stay where the user put them."""
    if not isinstance(module, nn.Module):
        return
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    want = as_device(device)
    if tensor is None or (tensor.device.type == want.type and want.index in (None, tensor.device.index)):
        return
    raise ValueError(
        f"`{name}` is on {tensor.device} but `device` is {want}; move it first ({name}.to('{want}')) "
        f"or pass device='{tensor.device}'."
    )


def as_optional_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """Check that ``generator`` is ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        seeded = (f"; for a seed pass torch.Generator().manual_seed({generator})"
                  if isinstance(generator, numbers.Integral) and not isinstance(generator, bool) else "")
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}{seeded}.")
    return generator


def seeded_generator(seed: Optional[int], generator: Optional[torch.Generator],
                     device: torch.device) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded with ``seed``, else the checked ``generator`` (at most one given)."""
    as_optional_generator(generator)
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("Give at most one of `generator` and `seed`.")
    seed = check_int(seed, "seed")
    if not -(2**63) <= seed < 2**64:  # torch's range; beyond it "Overflow when unpacking long long"
        raise ValueError(f"`seed` must lie between -2**63 and 2**64 - 1 (a torch generator's seed), got {seed}.")
    return torch.Generator(device).manual_seed(seed)


def check_model_weights(model: Optional[nn.Module], layer: nn.Module, recorded: Optional[str], what: str,
                        recorded_buffers: Optional[Sequence[str]] = None) -> None:
    """:func:`check_same_weights` for the model an explainer reaches (``None``: none, nothing to
    check): the INN's model is ``model`` or a module inside it that holds ``layer``, so a wrapper
    with parameters of its own (a temperature) around the fitted model is taken, as is its bound
    ``forward`` or ``predict``; a retrained model inside it is still refused. ``recorded_buffers``
    (:func:`buffer_fingerprints` at the fit): a warning when the weights match but neither set of
    buffers holds the other (a wrapper may add or leave out buffers of its own; moved running
    statistics change buffers on both sides)."""
    if model is None or not recorded:
        return
    if weights_fingerprint(model) != recorded and not any(
            m is not layer and any(s is layer for s in m.modules()) and weights_fingerprint(m) == recorded
            for m in model.modules()):  # holders hashed only on a mismatch
        check_same_weights(model, recorded, what, "forward_func")
    elif recorded_buffers:
        fitted, now = collections.Counter(recorded_buffers), collections.Counter(buffer_fingerprints(model))
        if fitted - now and now - fitted:
            warnings.warn(
                f"The model has the weights `{what}` was fitted with, but other buffers (batch norm's running "
                "statistics, updated by any pass in train mode since): its layer now computes other activations than "
                f"the ones `{what}` learned. Restore the buffers (model.load_state_dict), or fit `{what}` again.",
                UserWarning, stacklevel=user_stacklevel(),
            )


def check_same_weights(network: Any, recorded: Optional[str], what: str, name: str) -> None:
    """``ValueError`` when ``network`` (argument ``name``) has other weights than the one ``what``
    was fitted with (``recorded``: its :func:`weights_fingerprint`; ``None`` or ``""``: unknown)."""
    if recorded and weights_fingerprint(network) != recorded:
        dtype = network_dtype(network, torch.float32)
        if dtype in (torch.float16, torch.bfloat16):  # rounded weights: the float32 fingerprint cannot match
            raise ValueError(
                f"`{what}` was fitted with another `{name}`. This one computes in {dtype}: if it is "
                "a copy converted with .half() or .bfloat16(), its rounded weights count as other weights; pass the "
                f"float32 one, or fit `{what}` with the converted one."
            )
        raise ValueError(
            f"`{what}` was fitted with another `{name}` (other weights: retrained, another seed, or another "
            f"architecture); pass the one it was fitted with, or fit `{what}` again for this `{name}`."
        )
