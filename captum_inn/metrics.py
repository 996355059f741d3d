"""Quantitative checks of invariances: do samples keep what the layer encodes, and drop the rest?

- :func:`predict_classes`: top-1 classes of a classifier (a tensor, tuple or dict output).
- :func:`prediction_agreement`: the network (or an independent judge) predicts the same class on
  invariance samples as on the original.
- :func:`reencode_similarity`: samples re-encode, at the layer, closer to the original activation
  than random image pairs do.
- :func:`variance_explained_by_v`: the share of the code's variance carried by the invariances
  ``v`` (docs/method.rst): near 0 the layer keeps everything, near 1 it keeps nothing.
- :func:`probe_r2`: how well a known factor (e.g. colour) is linearly predictable from features
  (``v`` or ``z``), on held-out data.
- :func:`estimate_colours`: the two colours of a ColorDigits-like image, to judge concept edits.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from captum_inn._random import generator_device, normal
from captum_inn.attr._common import (
    NOT_SPLIT,
    as_optional_generator,
    check_batch_first_read,
    check_int,
    check_number,
    check_positive_int,
    dtype_errors_named,
    holds_tensor,
    one_image_tensor,
    slice_forward_args,
    user_stacklevel,
)
from captum_inn.capture import Selector, _select, capture, copied_tensors, eval_mode
from captum_inn.inn import ConditionalINN

__all__ = ["predict_classes", "prediction_agreement", "reencode_similarity", "variance_explained_by_v", "probe_r2", "estimate_colours",
           "border_colour"]


def predict_classes(model: nn.Module, images: Tensor, batch_size: int = 512, selector: Selector = None, *,
                    additional_forward_args: Any = None) -> Tensor:
    """Top-1 classes of ``model`` on ``images``, in eval mode and without gradients (each
    module's training flag is restored).

    Args:
        model: A classifier returning logits ``(N, K)``, or a tuple, list or dict holding them.
        images: ``(N, C, H, W)``.
        batch_size: Images per forward pass.
        selector: Picks the logits from a non-tensor output: an int index, a str key or attribute,
            or a callable ``output -> (N, K)`` (as for :class:`captum_inn.capture.LayerHooks`).
        additional_forward_args: Extra arguments of the model after the images, as in Captum
            (``model(images, *additional_forward_args)``); tensors with ``N`` rows are sliced with
            the images, other values passed to every batch.

    Returns:
        ``(N,)`` class indices, on the images' device.

    Examples::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> predict_classes(model, torch.rand(4, 3, 2, 2)).shape
        torch.Size([4])
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    images = _image_tensor(images, "images")
    if images.shape[0] == 0:
        raise ValueError("`images` is an empty batch; pass at least one image.")
    n = images.shape[0]
    return _classes(model, images, batch_size, selector,
                    lambda rows: slice_forward_args(additional_forward_args, rows, n))


def _classes(model: nn.Module, images: Tensor, batch_size: int, selector: Selector,
             extra_for: Callable[[slice], Any], name: str = "images") -> Tensor:
    """:func:`predict_classes`, with ``extra_for(rows)`` giving the extra arguments of ``images[rows]``;
    a dtype mistake names the argument ``name``."""
    classes = []
    with torch.no_grad(), eval_mode(model), dtype_errors_named(images, model, name=name):
        for s in range(0, images.shape[0], batch_size):
            (batch,), extra = copied_tensors((images[s : s + batch_size],)), extra_for(slice(s, s + batch_size))
            logits = _select(model(batch, *(extra or ())), selector, type(model).__name__, "output", model_output=True)
            check_class_logits(logits)
            if logits.shape[0] != batch.shape[0]:
                raise ValueError(f"The model gave {logits.shape[0]} rows of logits for {batch.shape[0]} image(s); it "
                                 "must give one row per image." + (" " + NOT_SPLIT if holds_tensor(extra) else ""))
            classes.append(logits.argmax(1))
    return torch.cat(classes)


def _image_tensor(value: Any, name: str) -> Tensor:
    """``value`` if it is a tensor; a ``TypeError`` naming ``name`` and the conversion otherwise (a list
    or an array failed on a missing ``.shape`` or ``.dim``)."""
    if isinstance(value, Tensor):
        return value
    fix = "torch.stack(images)" if isinstance(value, (list, tuple)) else "torch.as_tensor(images).float()"
    raise TypeError(f"`{name}` must be a tensor of images (N, C, H, W), got a {type(value).__name__}; convert it "
                    f"with {fix}.")


def check_class_logits(logits: Tensor, what: str = "The model") -> None:
    """``ValueError`` unless ``logits`` is ``(N, K)`` with ``K >= 2``: one logit's argmax is always
    class 0 (every prediction 0, an agreement of 1.0)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"{what}'s output has shape {tuple(logits.shape)}; predictions need (N, K) logits "
                         "with K >= 2. For a one-logit binary classifier wrap it to return "
                         "torch.cat([-logit, logit], 1).")


def _unit_rows(z: Tensor) -> Tensor:
    """Rows scaled to a largest magnitude of 1, in float32 at least (an integer layer's one-hot rows
    failed in the cosine, a bfloat16 layer's in the quantile): the cosine is scale-free, and
    cosine_similarity's absolute eps scored activations of 1e-9 0.10 apart from themselves."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z / z.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension (``b`` broadcast against ``a`` from dim 1), in
    float64 as ``1 - ½‖â - b̂‖²`` of the rows at unit length: rows that share a large offset (a
    layer at 1e4 ± 1) have cosines of 1 - 1e-9, which all rounded to 1 in float32, so unrelated
    samples tied with a null quantile of 1 and beat it. Exactly 1 for equal rows: two all-zero rows
    (a ReLU layer with no active unit) scored 0, and other equal rows rounded to 1 ± 2e-7, so against a
    null quantile of exactly 1 (random pairs of images that both leave every unit off) whether they
    beat it was a coin toss. 0 against an all-zero row."""
    step = max(1, 2**24 // max(1, a[0].numel()))  # rows at a time: two temporaries of a's size, not more
    parts = []
    for start in range(0, a.shape[0], step):
        x, y = a[start : start + step], b[start : start + step]
        norm_x, norm_y = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
        tiny = torch.finfo(x.dtype).tiny
        squared_gap = (x / norm_x.clamp_min(tiny) - y / norm_y.clamp_min(tiny)).square_().sum(-1, dtype=torch.float64)
        zero = ((norm_x == 0) | (norm_y == 0)).squeeze(-1)
        parts.append(torch.where((x == y).all(-1), 1.0,
                                 torch.where(zero, 0.0, 1.0 - 0.5 * squared_gap)).clamp(-1.0, 1.0))
    return torch.cat(parts)


def _sample_rows(additional_forward_args: Any, n: int, s: int) -> Callable[[slice], Any]:
    """Extra arguments for rows of the ``n * s`` samples flattened input by input: each sample gets its
    original's rows (per-input tensors are told by ``n``, the originals' count, not by ``n * s``)."""
    def extra_for(rows: slice) -> Any:
        return slice_forward_args(additional_forward_args, torch.arange(*rows.indices(n * s)) // s, n)
    return extra_for


def _check_samples(originals: Tensor, samples: Tensor) -> None:
    originals, samples = _image_tensor(originals, "originals"), _image_tensor(samples, "samples")
    if samples.dim() != originals.dim() + 1 or samples.shape[0] != originals.shape[0] or samples.shape[2:] != originals.shape[1:]:
        raise ValueError(
            f"`samples` must have shape (N, S, *image) matching `originals` {tuple(originals.shape)}, "
            f"got {tuple(samples.shape)}."
        )
    if originals.shape[0] == 0:
        raise ValueError("`originals` is an empty batch; pass at least one image.")
    if samples.shape[1] == 0:  # torch.cat failed on the empty list of sample batches
        raise ValueError(f"`samples` has no sample per input (shape {tuple(samples.shape)}); pass (N, S, *image) with "
                         "S >= 1, e.g. LayerInvariance.sample(x, n_samples=8).")
    for name, t in (("originals", originals), ("samples", samples)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
    _warn_if_other_scales(originals, samples)


def _warn_if_other_scales(originals: Tensor, samples: Tensor) -> None:
    """Originals and samples on other pixel scales (normalised or 8-bit originals beside samples
    decoded in [0, 1]) gave an agreement or a re-encoding score that looked valid: the model saw
    the two kinds of image differently. Told by one of the two lying about [0, 1] (within half the
    range, as the explainers' pixel check) and the other not; a low-contrast decoder's samples
    (an autoencoder early in its fit) span less than their originals and are no such mistake."""
    (low_o, high_o), (low_s, high_s) = ((float(v) for v in torch.aminmax(t.detach().float()))
                                        for t in (originals, samples))
    if (-0.5 <= low_o and high_o <= 1.5) != (-0.5 <= low_s and high_s <= 1.5):
        warnings.warn(f"`originals` range over [{low_o:.3g}, {high_o:.3g}] but `samples` over [{low_s:.3g}, "
                      f"{high_s:.3g}]: the model sees them on other scales (normalised or 8-bit originals beside "
                      "samples decoded in [0, 1]?). Pass the originals the explainer took, and normalise inside the "
                      "model, nn.Sequential(normalise, model).", UserWarning, stacklevel=user_stacklevel())


def prediction_agreement(
    model: nn.Module, originals: Tensor, samples: Tensor, batch_size: int = 512, selector: Selector = None, *,
    additional_forward_args: Any = None,
) -> float:
    """Fraction of samples on which ``model`` predicts the class it predicts on their original.

    Args:
        model: A classifier returning logits ``(N, K)`` (the analysed model, or an independently
            trained judge).
        originals: ``(N, C, H, W)``.
        samples: ``(N, S, C, H, W)``, e.g. from :meth:`captum_inn.LayerInvariance.sample`.
        batch_size: Images per forward pass.
        selector: Picks the logits from a tuple or dict output (see :func:`predict_classes`).
        additional_forward_args: Extra arguments of the model after the images (see
            :func:`predict_classes`); an original's rows go with each of its samples.

    Returns:
        Agreement in ``[0, 1]``.

    Examples::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x = torch.rand(4, 3, 2, 2)
        >>> prediction_agreement(model, x, x.unsqueeze(1).repeat(1, 5, 1, 1, 1))
        1.0
    """
    _check_samples(originals, samples)
    batch_size = check_positive_int(batch_size, "batch_size")
    n, s = samples.shape[:2]
    reference = _classes(model, originals, batch_size, selector,
                         lambda rows: slice_forward_args(additional_forward_args, rows, n), "originals")
    predicted = _classes(model, samples.reshape(n * s, *samples.shape[2:]), batch_size, selector,
                         _sample_rows(additional_forward_args, n, s), "samples").view(n, s)
    return float((predicted == reference.unsqueeze(1)).float().mean())


def reencode_similarity(
    model: nn.Module,
    layer: Any,
    originals: Tensor,
    samples: Tensor,
    *,
    n_null_pairs: int = 2000,
    quantile: float = 0.99,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 512,
    selector: Selector = None,
    attribute_to_layer_input: bool = False,
    additional_forward_args: Any = None,
) -> Dict[str, float]:
    """Do samples re-encode at ``layer`` closer to their original than random pairs of images do?

    Similarity is the cosine similarity of flattened activations. The null distribution is the
    similarity of random pairs of different originals; a sample *beats the null* when its
    similarity to its own original exceeds the null's ``quantile`` (by default: it is more
    similar than 99% of random pairs), or equals it at 1 (activations equal to the original's,
    where over 1% of random pairs are equal too). Two all-zero activations (a ReLU layer with no
    unit active) count as equal, similarity 1.

    Args:
        model: The analysed network.
        layer: The layer (module or dotted name).
        originals: ``(N, C, H, W)``, ``N >= 2``.
        samples: ``(N, S, C, H, W)``.
        n_null_pairs: Random pairs in the null distribution.
        quantile: Quantile of the null a sample must exceed.
        generator: Seeds the random pairs.
        batch_size: Images per forward pass.
        selector: Picks the tensor from a layer that returns a tuple or dict (see
            :func:`~captum_inn.capture.capture`), as for the INN fitted there.
        attribute_to_layer_input: Re-encode at the layer's input, for an INN fitted there.
        additional_forward_args: Extra arguments of the model after the images (see
            :func:`predict_classes`); an original's rows go with each of its samples.

    Returns:
        A dict with ``beats_null`` (fraction of samples above the threshold), ``similarity`` (mean
        sample similarity), ``null_quantile`` (the threshold) and ``null_mean`` (mean random-pair
        similarity).

    Examples::

        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
        >>> x = torch.rand(6, 3, 8, 8)
        >>> same = x.unsqueeze(1).repeat(1, 4, 1, 1, 1)        # (6, 4, 3, 8, 8): "samples" equal to x
        >>> scores = reencode_similarity(model, "0", x, same, generator=torch.Generator().manual_seed(0))
        >>> sorted(scores), round(scores["similarity"], 4)
        (['beats_null', 'null_mean', 'null_quantile', 'similarity'], 1.0)
    """
    _check_samples(originals, samples)
    as_optional_generator(generator)  # an int seed failed on `.device`
    if originals.shape[0] < 2:
        raise ValueError("`originals` needs at least 2 images to form random pairs.")
    n_null_pairs = check_positive_int(n_null_pairs, "n_null_pairs")
    batch_size = check_positive_int(batch_size, "batch_size")  # 0 failed in range(), -1 in torch.cat
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0 < quantile < 1:
        raise ValueError(f"`quantile` must be a number in (0, 1), got {quantile!r}; use 0.99 for 99%.")

    def encode(images: Tensor, extra_for: Callable[[slice], Any], name: str) -> Tensor:
        rows, parts = images.shape[0], []

        def read(start: int, count: int) -> Tensor:
            return capture(model, layer, images[start : start + count], selector=selector,
                           attribute_to_layer_input=attribute_to_layer_input,
                           additional_forward_args=extra_for(slice(start, start + count)))

        with dtype_errors_named(images, model, name=name):
            for start in range(0, rows, batch_size):
                count = min(batch_size, rows - start)
                z = read(start, count)
                # as the fits read it: a sequence-first layer's (L, N, E) mixed images into rows
                check_batch_first_read(z, count, f"Layer {layer!r}", lambda k, start=start: read(start, k),
                                       extra_for(slice(start, start + count)))
                parts.append(_unit_rows(z.flatten(1)))
        return torch.cat(parts)

    n, s = samples.shape[:2]
    z = encode(originals, lambda rows: slice_forward_args(additional_forward_args, rows, n), "originals")
    if z.shape[1] == 1:
        warnings.warn(f"Layer {layer!r} gives one number per image: the cosine similarity of two numbers is only "
                      "whether their signs agree, so the scores say little; re-encode at a wider layer.",
                      UserWarning, stacklevel=user_stacklevel())
    z_samples = encode(samples.reshape(n * s, *samples.shape[2:]), _sample_rows(additional_forward_args, n, s),
                       "samples").view(n, s, -1)
    similarity = _cosine(z_samples, z.unsqueeze(1))
    where = generator_device(generator)
    i = torch.randint(n, (n_null_pairs,), generator=generator, device=where).to(z.device)
    j = (i + torch.randint(1, n, (n_null_pairs,), generator=generator, device=where).to(z.device)) % n  # j != i
    null = _cosine(z[i], z[j])
    threshold = torch.quantile(null, float(quantile))
    return {
        # ties count only at 1 (equal activations): at a quantile of 0 (a sparse layer, random pairs orthogonal)
        # unrelated samples tied with it
        "beats_null": float(((similarity > threshold) | ((threshold >= 1) & (similarity >= 1))).float().mean()),
        "similarity": float(similarity.mean()),
        "null_quantile": float(threshold),
        "null_mean": float(null.mean()),
    }


@torch.no_grad()
def variance_explained_by_v(
    inn: ConditionalINN,
    codes: Tensor,
    conditions: Tensor,
    n_samples: int = 16,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 256,
    *,
    code_std: Optional[Tensor] = None,
) -> float:
    """Share of the code's variance carried by the invariances ``v`` (docs/method.rst).

    ``VE_v = Σ_d E_x[Var_v(z̄_d | z)] / Σ_d Var_x(z̄_d)``: the variance of ``z̄ = t⁻¹(v | z)`` over
    ``v ~ N(0, I)`` with ``z`` fixed, averaged over inputs, relative to the total variance of the
    codes. Near 0 the layer keeps almost everything of ``z̄``; near 1 it is invariant to almost
    everything.

    ``z̄`` is a posterior sample: :func:`~captum_inn.training.fit_invariances` trains ``t`` on
    ``mean + std · ε``, so the samples' spread includes the posterior noise. Pass posterior
    samples as ``codes``, or the means with their ``code_std``, which adds the noise's variance
    ``Σ_d E_x[std_d²]`` to the denominator. With means alone the denominator lacks it, and a
    perfectly fitted INN of a layer that keeps nothing gives slightly more than 1. An INN fitted with
    ``code_noise`` (recorded in its ``fit_info``) was trained on codes with that noise added too: its
    variance, ``d · code_noise²``, is added to the denominator as well (a layer that keeps nothing
    gave 1.25 at ``code_noise=0.5`` on unit-scale codes).

    Args:
        inn: The fitted conditional INN of the layer.
        codes: ``(N, d)`` codes ``z̄`` of the inputs: posterior samples, or means with ``code_std``.
        conditions: ``(N, *layer shape)`` activations ``z`` of the same inputs.
        n_samples: Samples of ``v`` per input (``>= 2``).
        generator: Seeds ``v``.
        batch_size: Inputs per pass.
        code_std: ``(N, d)`` posterior standard deviations when ``codes`` are the means
            (``autoencoder.encode(x).std``); ``None``: ``codes`` are samples, or the encoder is
            deterministic.

    Returns:
        ``VE_v``, a float (near ``[0, 1]``; above 1 only for a poorly fitted INN, or for means
        passed without ``code_std``).

    Examples::

        >>> inn = ConditionalINN(8, (10,), n_blocks=2, hidden=16)
        >>> _ = inn(torch.randn(4, 8), torch.randn(4, 10))          # (normally: fit_invariances)
        >>> ve = variance_explained_by_v(inn, torch.randn(32, 8), torch.randn(32, 10), n_samples=4)
        >>> isinstance(ve, float)
        True
    """
    if check_int(n_samples, "n_samples") < 2:  # a spread needs two samples
        raise ValueError(f"`n_samples` must be >= 2, got {n_samples}.")
    as_optional_generator(generator)
    for name, values in (("codes", codes), ("conditions", conditions), ("code_std", code_std)):
        if values is not None and (not isinstance(values, Tensor) or not values.is_floating_point()):
            got = values.dtype if isinstance(values, Tensor) else type(values).__name__
            raise TypeError(f"`{name}` must be a floating-point tensor, got {got}; convert it with "
                            "torch.as_tensor(values).float().")
    n_samples, batch_size = int(n_samples), check_positive_int(batch_size, "batch_size")
    if codes.shape[0] != conditions.shape[0] or codes.shape[0] < 2:
        raise ValueError("`codes` and `conditions` need the same number of rows, at least 2.")
    if codes.dim() != 2 or codes.shape[1] != inn.dim:  # z̄ from the INN has inn.dim columns: the codes must too
        raise ValueError(f"`codes` must have shape (N, {inn.dim}), the INN's code size, got {tuple(codes.shape)}; "
                         "pass the codes of the autoencoder the INN was fitted with.")
    for name, values in (("codes", codes), ("conditions", conditions), ("code_std", code_std)):
        # NaN made the total "not vary" (a wrong diagnosis), or the result NaN silently
        if values is not None and values.is_floating_point() and not torch.isfinite(values).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
    within = []
    # drawn at once: drawn per batch, the stream depended on batch_size (torch draws normals in blocks of 16)
    noise = normal((codes.shape[0] * n_samples, inn.dim), generator, conditions.device, torch.float32)
    with eval_mode(inn):
        for start in range(0, codes.shape[0], batch_size):
            c = conditions[start : start + batch_size]
            emb = inn.embed(c).repeat_interleave(n_samples, dim=0)
            v = noise[start * n_samples : start * n_samples + emb.shape[0]].to(emb)
            zbar = inn(v, None, rev=True, jac=False, embedding=emb)[0].view(c.shape[0], n_samples, -1)
            within.append(zbar.var(dim=1).sum(dim=1))
    total = codes.var(dim=0).sum()
    if code_std is not None:
        if code_std.shape != codes.shape:
            raise ValueError(f"`code_std` must have the shape of `codes` {tuple(codes.shape)}, got {tuple(code_std.shape)}.")
        total = total + code_std.pow(2).mean(dim=0).sum()  # Var(mean + std·ε) = Var(mean) + E[std²]
    code_noise = (getattr(inn, "fit_info", None) or {}).get("code_noise") or 0.0
    total = total + inn.dim * float(code_noise) ** 2  # the fit's codes: mean + std·ε + code_noise·η
    if not total > 0:  # the denominator: VE_v would be inf or NaN
        raise ValueError("`codes` do not vary over the inputs (total variance 0), so no share of it can be "
                         "explained; pass the codes of different inputs (or their posterior `code_std`).")
    return float(torch.cat(within).mean() / total)


def _probe_tensor(value: Any, name: str) -> Optional[Tensor]:
    """A probe's features or targets as a tensor (NumPy arrays converted); ``None`` stays ``None``."""
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    raise TypeError(f"`{name}` must be a tensor or a NumPy array, got a {type(value).__name__}.")


def probe_r2(
    features: Tensor,
    targets: Tensor,
    *,
    train_fraction: float = 0.5,
    ridge: float = 1e-2,
    generator: Optional[torch.Generator] = None,
    per_target: bool = False,
    test_features: Optional[Tensor] = None,
    test_targets: Optional[Tensor] = None,
) -> Union[float, Tensor]:
    """Held-out R² of a ridge-regression probe from ``features`` to ``targets``.

    Features are flattened and standardised on the training rows; the probe is fitted in closed
    form; R² is measured on held-out rows, averaged over target columns. Values near 1: the
    factor is (linearly) readable from the features; near 0 (or below): it is not. By default the
    rows are split at random; pass ``test_features``/``test_targets`` to fit on all of
    ``features`` (e.g. training images) and measure on a separate set (e.g. test images).

    Args:
        features: ``(N, ...)``, e.g. ``v`` or a layer's activations ``z``.
        targets: ``(N,)`` or ``(N, T)``, e.g. RGB colours.
        train_fraction: Share of rows used to fit the probe (without a separate test set).
        ridge: L2 penalty (relative to the number of training rows), > 0.
        generator: Seeds the split.
        per_target: Return the R² of every target column instead of their mean.
        test_features: Optional ``(M, ...)`` held-out features.
        test_targets: Optional ``(M, T)`` held-out targets.

    Returns:
        Mean R² (float), or ``(T,)`` R² values with ``per_target``. A target constant on the held-out
        rows scores 1 if predicted to rounding, else 0 (scikit-learn's convention).

    Examples::

        >>> x = torch.randn(400, 5)
        >>> round(probe_r2(x, x[:, :2] * 3 + 1), 3)
        1.0
    """
    as_optional_generator(generator)
    # arrays are taken as they come (a probe of NumPy features is common); other types are named
    features, targets, test_features, test_targets = (
        _probe_tensor(value, name) for value, name in ((features, "features"), (targets, "targets"),
                                                       (test_features, "test_features"), (test_targets, "test_targets")))
    if not 0 < check_number(train_fraction, "train_fraction") < 1:
        raise ValueError(f"`train_fraction` must lie strictly between 0 and 1, got {train_fraction}.")
    # > 0: a dead unit (a constant feature column, common in ReLU activations) leaves the system singular
    check_number(ridge, "ridge", positive=True)
    # a small ridge regression, solved on the CPU in double precision wherever the features live
    x = features.reshape(features.shape[0], -1).detach().cpu().double()
    y = targets.reshape(targets.shape[0], -1).detach().cpu().double()
    if y.shape[0] != x.shape[0] or x.shape[0] < 4:
        raise ValueError(
            f"`features` and `targets` need the same number of rows (>= 4), got {x.shape[0]} and {y.shape[0]}."
        )
    if (test_features is None) != (test_targets is None):
        raise ValueError("Pass both `test_features` and `test_targets`, or neither.")
    for name, t in (("features", features), ("targets", targets), ("test_features", test_features),
                    ("test_targets", test_targets)):
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
    if test_features is not None:
        x_te = test_features.reshape(test_features.shape[0], -1).detach().cpu().double()
        y_te = test_targets.reshape(test_targets.shape[0], -1).detach().cpu().double()
        if x_te.shape[0] != y_te.shape[0] or x_te.shape[0] < 2:  # R² needs the targets' spread over the test rows
            raise ValueError(f"`test_features` and `test_targets` need the same number of rows (>= 2), got "
                             f"{x_te.shape[0]} and {y_te.shape[0]}.")
        if x_te.shape[1] != x.shape[1] or y_te.shape[1] != y.shape[1]:
            raise ValueError(f"`test_features`/`test_targets` need the columns of `features`/`targets`: "
                             f"{x.shape[1]}/{y.shape[1]} after flattening, got {x_te.shape[1]}/{y_te.shape[1]}.")
        n_train = x.shape[0]
        x, y = torch.cat([x, x_te]), torch.cat([y, y_te])
        tr, te = torch.arange(n_train), torch.arange(n_train, x.shape[0])
    else:
        order = torch.randperm(x.shape[0], generator=generator, device=generator_device(generator)).cpu()
        n_train = max(2, min(x.shape[0] - 2, int(round(train_fraction * x.shape[0]))))
        tr, te = order[:n_train], order[n_train:]
    mean, std = x[tr].mean(0), x[tr].std(0)
    # a column constant up to rounding (a dead unit) is left unscaled; an absolute floor (1e-8) also
    # flattened real features of a small scale, and the probe read nothing from them
    constant = std <= 1e-6 * x[tr].abs().amax(0)
    std = torch.where(constant, torch.ones_like(std), std)
    xs = (x - mean) / std
    a = xs[tr]
    # The features are centred on the training rows, so the unshrunk intercept is the training
    # targets' mean: both forms fit centred targets, and neither penalises the intercept.
    y_mean = y[tr].mean(0)
    yc = y[tr] - y_mean
    penalty = ridge * n_train
    if a.shape[1] <= a.shape[0]:  # primal ridge: (d × d) system
        w = torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1], dtype=a.dtype), a.T @ yc)
    else:  # wide features (e.g. a conv layer): the dual (n × n) system gives the same ridge solution
        w = a.T @ torch.linalg.solve(a @ a.T + penalty * torch.eye(a.shape[0], dtype=a.dtype), yc)
    residual = y[te] - (y_mean + xs[te] @ w)
    total = (y[te] - y[te].mean(0)).pow(2).sum(0)
    error = residual.pow(2).sum(0)
    # a target constant on the held-out rows (its values, not a sum that rounding leaves at 1e-33) has no
    # variance to explain (dividing by a clamped 0 gave -1e11): 1 where it is predicted to rounding, else 0,
    # as scikit-learn's r2_score
    constant = (y[te] == y[te][:1]).all(0)
    exact = (residual.abs() <= 1e-6 * y[te].abs().clamp_min(1.0)).all(0)
    r2 = torch.where(constant, exact.to(error.dtype), 1.0 - error / total.clamp_min(1e-300))
    return r2.float() if per_target else float(r2.mean())


@torch.no_grad()
def border_colour(images: Tensor, border: int = 2) -> Tensor:
    """The median colour of each image's ``border``-pixel frame: the background of centred objects.

    Args:
        images: ``(N, C, H, W)``.
        border: Width of the frame.

    Returns:
        ``(N, C)``.

    Examples::

        >>> images = torch.zeros(1, 3, 8, 8); images[:, 0] = 1.0; images[:, :, 3:5, 3:5] = 0.5
        >>> border_colour(images).tolist()
        [[1.0, 0.0, 0.0]]
    """
    border = check_int(border, "border")
    if border < 1:  # "at least 2·border pixels wide" was true of every image
        raise ValueError(f"`border` must be >= 1 (the width of the frame read as background), got {border}.")
    images = one_image_tensor(images, "images")  # a uint8 batch failed inside torch's median or norm
    if border > min(images.shape[2:]) // 2:
        raise ValueError(f"`images` must be (N, C, H, W) at least 2·`border` pixels wide, got {tuple(images.shape)} "
                         f"and border={border}.")
    mask = torch.zeros(images.shape[2:], dtype=torch.bool, device=images.device)
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = True, True, True, True
    # each frame pixel once: four strips counted the corners twice, which could move the median
    return images.flatten(2)[:, :, mask.flatten()].median(dim=2).values


def estimate_colours(images: Tensor, border: int = 2, fraction: float = 0.1) -> Tuple[Tensor, Tensor]:
    """Foreground and background colours of two-colour images such as ColorDigits and their edits.

    The background is the median colour of a ``border``-pixel frame (digits are centred); the
    foreground is the mean colour of the ``fraction`` of pixels farthest from it. On ColorDigits
    test images the background is exact and the foreground error is small (the strokes are
    anti-aliased), which is what judging concept edits needs.

    Args:
        images: ``(N, 3, H, W)``.
        border: Width of the frame read as background.
        fraction: Share of pixels averaged as foreground.

    Returns:
        ``(foreground, background)``, each ``(N, 3)``.

    Examples::

        >>> from captum_inn.datasets import colour_digits
        >>> masks = torch.zeros(1, 8, 8); masks[:, 2:6, 2:6] = 1
        >>> fg, bg = estimate_colours(colour_digits(masks, torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 0, 1.0]])))
        >>> fg.tolist(), bg.tolist()
        ([[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]])
    """
    images = one_image_tensor(images, "images")
    if images.shape[1] != 3:
        raise ValueError(f"`images` must have shape (N, 3, H, W), got {tuple(images.shape)}.")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be a share in (0, 1] of the pixels, got {fraction!r}; use 0.1 for 10%.")
    background = border_colour(images, border)
    distance = (images - background[:, :, None, None]).norm(dim=1).flatten(1)
    k = max(1, int(distance.shape[1] * fraction))
    index = distance.topk(k, dim=1).indices
    foreground = torch.gather(images.flatten(2), 2, index[:, None].expand(-1, 3, -1)).mean(2)
    return foreground, background
