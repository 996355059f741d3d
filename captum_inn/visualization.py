"""Figures: invariance samples per layer, invariance maps, metrics by depth, concept bars, edits and dynamics.

matplotlib is imported lazily; every function accepts an optional ``ax``/``fig`` and returns
``(fig, ax)``; nothing calls ``plt.show()``. Names that come from data (layers, concepts, classes,
column headers, captions) are drawn as written; a ``title`` or ``ylabel`` you pass is matplotlib
text, where ``$...$`` is mathematics (write ``\\$`` for a dollar sign).
"""

from __future__ import annotations

import functools
import os
import textwrap
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, from_numpy

from captum_inn.attr._common import check_int

__all__ = [
    "to_numpy_image",
    "plot_invariance_samples",
    "plot_layer_invariances",
    "plot_invariance_maps",
    "plot_by_depth",
    "plot_concept_bars",
    "plot_concept_edits",
    "plot_concept_dynamics",
    "plot_comparison",
    "plot_image_grid",
    "save_figure",
]


def _plt():
    import matplotlib.pyplot as plt  # lazily: matplotlib picks a headless backend without a display

    return plt


def _lay_out(fig: Any) -> None:
    """``tight_layout`` for a figure that has no layout of its own: a caller's figure with a layout
    engine (constrained layout) keeps it, and a ``SubFigure`` is laid out by its parent (it has no
    ``tight_layout``)."""
    from matplotlib.layout_engine import PlaceHolderLayoutEngine, TightLayoutEngine

    if not hasattr(fig, "tight_layout"):
        return
    engine = fig.get_layout_engine()  # a placeholder is what an earlier tight_layout leaves
    if engine is None or isinstance(engine, (PlaceHolderLayoutEngine, TightLayoutEngine)):
        fig.tight_layout()


def _check_drawing_target(fig: Any = None, ax: Any = None) -> None:
    """A ``fig`` that cannot hold subplots or an ``ax`` that cannot plot, named before any drawing (an
    Axes passed as ``fig`` said "'Axes' object has no attribute 'subplots'")."""
    if fig is not None and not hasattr(fig, "subplots"):
        hint = "; for axes pass their figure (ax.figure) or a subfigure of it" if hasattr(fig, "plot") else ""
        raise TypeError(f"`fig` must be a matplotlib Figure or SubFigure to draw into, got {type(fig).__name__}{hint}.")
    if ax is not None and not hasattr(ax, "plot"):
        hint = "; for a figure pass fig.add_subplot()" if hasattr(ax, "subplots") else ""
        raise TypeError(f"`ax` must be matplotlib Axes, got {type(ax).__name__}{hint}.")


def _value(value: Any) -> float:
    """A value to plot as a float: a number, a one-element tensor (with grad, on a GPU: matplotlib
    failed on them) or ``None`` (a gap, as ``null`` in metrics.json)."""
    if value is None:
        return float("nan")
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _suptitle(fig: Any, title: str, fontsize: float, grow: bool) -> None:
    """``fig``'s title, wrapped to its width (a long one on a figure of one or two columns ran off
    both edges); with ``grow`` the figure grows by the lines added (its rows were squeezed)."""
    width_inches = fig.bbox.width / fig.dpi
    chars = max(20, int(width_inches * 72 / (0.55 * fontsize)))  # an average glyph is about 0.55 em wide
    lines = [line for part in str(title).split("\n") for line in (textwrap.wrap(part, chars) or [""])]  # its own breaks kept
    fig.suptitle("\n".join(lines), fontsize=fontsize)
    if grow and len(lines) > 1:
        fig.set_figheight(fig.get_figheight() + 1.25 * fontsize / 72 * (len(lines) - 1))


def _no_figure_left_on_error(function: Callable) -> Callable:
    """Close the figures ``function`` opened when it raises: a figure left open by a refused input piled up,
    and showed in a notebook under the traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        plt = _plt()
        before = set(plt.get_fignums())
        try:
            return function(*args, **kwargs)
        except BaseException:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
            raise

    return wrapper


def to_numpy_image(image: Tensor):
    """``(C, H, W)`` tensor in ``[0, 1]`` → ``(H, W, C)`` numpy array (grayscale stays 2-d).

    Args:
        image: ``(C, H, W)`` floating-point image with 1 (gray), 3 (RGB) or 4 (RGBA) channels;
            values are clamped to ``[0, 1]``.

    Returns:
        A float32 numpy array ``(H, W, C)``, or ``(H, W)`` for one channel.

    Raises:
        TypeError: integer pixels (``uint8`` in 0…255 would all be drawn white; pass ``image / 255``).
        ValueError: another number of channels, not ``(C, H, W)``, or NaN pixels.

    Examples::

        >>> to_numpy_image(torch.rand(3, 8, 8)).shape, to_numpy_image(torch.rand(1, 8, 8)).shape
        ((8, 8, 3), (8, 8))
    """
    if not image.is_floating_point():
        raise TypeError(f"Images are drawn from pixels in [0, 1], got {image.dtype} pixels (clamped, 0…255 would all "
                        "be white); pass images.float() / 255.")
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"An image to draw must be (C, H, W) with 1, 3 or 4 channels, got shape {tuple(image.shape)}; "
                         "for channels last use image.permute(2, 0, 1), for other channels pick three of them.")
    image = image.detach().float().cpu()
    if image.isnan().any():  # clamp keeps NaN, which matplotlib draws white, like real white pixels
        raise ValueError("An image to draw holds NaN pixels (they would be drawn white, like real white ones); "
                         "find where they come from (a diverged decoder or INN, say), or replace them with "
                         "torch.nan_to_num(images) to draw the rest.")
    image = image.clamp(0, 1)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image.permute(1, 2, 0).numpy()


def _literal(text: Any) -> str:
    """``text`` as matplotlib draws it literally: a name between two ``$`` (a class folder named
    ``$5 to $10``) would otherwise be typeset as mathematics, or fail the drawing (``a$x^$``)."""
    return str(text).replace("$", r"\$")


def _finite_max(values: Tensor, quantile: Optional[float] = None) -> Optional[float]:
    """The largest (or ``quantile``) finite value, for a colour scale; ``None`` when there is none,
    or it is not above 0 (a NaN pixel gave a NaN scale: the whole map one colour)."""
    finite = values[values.isfinite()].float()
    if finite.numel() == 0:
        return None
    top = float(finite.max() if quantile is None else finite.quantile(quantile))
    return top if top > 0 else None


def _show(ax: Any, image: Tensor) -> None:
    """Draw a ``(C, H, W)`` image in ``[0, 1]`` on a fixed scale: black is 0 and white is 1.

    matplotlib would stretch a one-channel image to its own min/max and colour it with viridis,
    so a dark and a bright grey image would look alike; one channel is drawn in gray.
    """
    ax.imshow(to_numpy_image(image), cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=1)


@_no_figure_left_on_error
def plot_invariance_samples(
    originals: Tensor,
    reconstructions: Tensor,
    samples: Tensor,
    title: str = "",
    fig: Any = None,
) -> Tuple[Any, Any]:
    """A grid: one row per input — the input, its reconstruction, then its invariance samples.

    Args:
        originals: ``(N, C, H, W)`` in ``[0, 1]``.
        reconstructions: ``(N, C, H, W)``.
        samples: ``(N, S, C, H, W)``.
        title: Figure title.
        fig: Optional figure to draw into.

    Returns:
        ``(fig, axes)`` with ``axes`` of shape ``(N, S + 2)``.

    Examples::

        >>> fig, axes = plot_invariance_samples(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 4, 3, 8, 8))
        >>> axes.shape
        (2, 6)
    """
    _check_drawing_target(fig=fig)
    plt = _plt()
    if samples.dim() != 5:  # e.g. (N, C, H, W) without the samples axis: a raw permute error before
        raise ValueError(f"`samples` must be (N, S, C, H, W), S samples per input, got shape {tuple(samples.shape)}; "
                         "for one sample per input pass samples.unsqueeze(1).")
    n, s = samples.shape[:2]
    for what, images in (("originals", originals), ("reconstructions", reconstructions)):
        if images.shape[0] != n:  # row i pairs input i with its own samples
            raise ValueError(f"`{what}` holds {images.shape[0]} images for the {n} rows of `samples` (N, S, C, H, W); "
                             "give one per row.")
    own = fig is None  # a caller's figure keeps its size
    if own:
        fig = plt.figure(figsize=(1.1 * (s + 2), 1.15 * n + 0.4))
    axes = fig.subplots(n, s + 2, squeeze=False)
    for i in range(n):
        row = [originals[i], reconstructions[i]] + [samples[i, j] for j in range(s)]
        for j, image in enumerate(row):
            ax = axes[i, j]
            _show(ax, image)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(["input", "recon."][j] if j < 2 else f"sample {j - 1}", fontsize=8)
    if title:
        _suptitle(fig, title, fontsize=10, grow=own)
    _lay_out(fig)
    return fig, axes


@_no_figure_left_on_error
def plot_layer_invariances(
    explainer: Any,
    inputs: Any,
    n_samples: int = 8,
    *,
    temperature: float = 1.0,
    seed: Optional[int] = 0,
    additional_forward_args: Any = None,
    title: Optional[str] = None,
    fig: Any = None,
) -> Tuple[Any, Any]:
    """:func:`plot_invariance_samples` in one call: a :class:`~captum_inn.LayerInvariance`'s inputs,
    reconstructions and invariance samples.

    Args:
        explainer: A :class:`~captum_inn.LayerInvariance`.
        inputs: ``(N, C, H, W)`` images in ``[0, 1]`` (or the explainer's tuple of inputs).
        n_samples: Samples per input.
        temperature: Scale of ``v`` (see :meth:`~captum_inn.LayerInvariance.sample`).
        seed: Seeds the samples (the same figure in every call); ``None`` draws fresh ones.
        additional_forward_args: Extra arguments of the explainer's ``forward_func``.
        title: Figure title; default ``"invariance samples at <layer>"``.
        fig: Optional figure to draw into.

    Returns:
        ``(fig, axes)`` with ``axes`` of shape ``(N, n_samples + 2)``.

    Examples::

        fig, axes = plot_layer_invariances(LayerInvariance(model, "fc", inn, ae), x[:4])
    """
    from captum_inn.attr import LayerInvariance

    if not isinstance(explainer, LayerInvariance):
        raise TypeError(f"`explainer` must be a captum_inn.LayerInvariance, got {type(explainer).__name__}; "
                        "for tensors you already have, call plot_invariance_samples(originals, reconstructions, samples).")
    samples = explainer.sample(inputs, n_samples, temperature, additional_forward_args, seed=seed)
    images = inputs[explainer.image_input] if isinstance(inputs, (tuple, list)) else inputs
    title = f"invariance samples at {_literal(explainer.layer_name)}" if title is None else title
    return plot_invariance_samples(images, explainer.reconstruct(inputs), samples, title=title, fig=fig)


@_no_figure_left_on_error
def plot_invariance_maps(
    originals: Tensor,
    maps: Dict[str, Tensor],
    fig: Any = None,
) -> Tuple[Any, Any]:
    """Inputs next to their invariance maps for several layers (channels averaged, shared scale per row).

    Args:
        originals: ``(N, C, H, W)``.
        maps: ``{layer name: (N, C, H, W)}`` from :meth:`captum_inn.LayerInvariance.attribute`.
        fig: Optional figure.

    Returns:
        ``(fig, axes)`` with ``axes`` of shape ``(N, 1 + len(maps))``.

    Examples::

        >>> fig, axes = plot_invariance_maps(torch.rand(2, 3, 8, 8), {"a": torch.rand(2, 3, 8, 8)})
        >>> axes.shape
        (2, 2)
    """
    _check_drawing_target(fig=fig)
    if not isinstance(maps, Mapping):  # attribute() gives a bare tensor; the layer name is the column title
        raise TypeError(f"`maps` must be a dict {{layer name: (N, C, H, W) map}}, got {type(maps).__name__}; "
                        "for one layer pass {'my_layer': explainer.attribute(x)}.")
    if not maps:
        raise ValueError("`maps` is empty; give at least one {layer name: (N, C, H, W) map}, e.g. from "
                         "LayerInvariance.attribute.")
    plt = _plt()
    n = originals.shape[0]
    for name, m in maps.items():
        if isinstance(m, (tuple, list)):  # attribute of tuple inputs mirrors them: one entry per input tensor
            raise TypeError(f"`maps[{name!r}]` is a {type(m).__name__} (attribute of tuple inputs gives one entry per "
                            "input tensor); pass the image's map, e.g. explainer.attribute(inputs)[image_input].")
        if not isinstance(m, Tensor) or m.dim() != 4:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"`maps[{name!r}]` must be (N, C, H, W) maps, got {got}.")
        channels = originals.shape[1]  # channels last, as Captum's visualize_image_attr takes them: a wrong picture
        if tuple(m.shape[1:3]) == tuple(originals.shape[2:]) and m.shape[3] in (1, channels) \
                and m.shape[1] not in (1, channels):
            raise ValueError(f"`maps[{name!r}]` has shape {tuple(m.shape)}, channels last; pass it channels first, "
                             "m.permute(0, 3, 1, 2).")
        if m.shape[0] != n:  # row i pairs input i with its own maps
            raise ValueError(f"`maps[{name!r}]` holds {m.shape[0]} maps for {n} `originals`; give one per input.")
    own = fig is None  # a caller's figure keeps its size
    if own:
        fig = plt.figure(figsize=(1.5 * (len(maps) + 1), 1.5 * n + 0.4))
    axes = fig.subplots(n, len(maps) + 1, squeeze=False)
    for i in range(n):
        heat = [m[i].detach().float().cpu().mean(0) for m in maps.values()]
        vmax = max(_finite_max(h) or 0.0 for h in heat) or 1.0
        _show(axes[i, 0], originals[i])
        for j, (name, h) in enumerate(zip(maps, heat), start=1):
            axes[i, j].imshow(h.numpy(), cmap="magma", vmin=0, vmax=vmax)
            if i == 0:
                axes[i, j].set_title(_literal(name), fontsize=8)
        if i == 0:
            axes[i, 0].set_title("input", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    _suptitle(fig, "invariance maps (bright: the layer ignores it)", fontsize=9, grow=own)
    _lay_out(fig)
    return fig, axes


@_no_figure_left_on_error
def plot_by_depth(
    layers: Sequence[str],
    values: Dict[str, Sequence[float]],
    ylabel: str = "",
    ax: Any = None,
) -> Tuple[Any, Any]:
    """Lines of one or more metrics against layer depth.

    Args:
        layers: Layer names, input side first.
        values: ``{label: one value per layer}``, the values a list in the order of ``layers`` or a
            dict ``{layer: value}``.
        ylabel: Label of the y axis.
        ax: Optional axes.

    Returns:
        ``(fig, ax)``.

    Examples::

        >>> fig, ax = plot_by_depth(["conv", "fc"], {"VE": [0.1, 0.8]})
    """
    _check_drawing_target(ax=ax)
    if isinstance(layers, (str, bytes)):  # "fc" was drawn as two layers, f and c
        raise TypeError(f"`layers` must be a list of layer names, got the string {layers!r}; for one layer pass [{layers!r}].")
    if not isinstance(values, Mapping):
        raise TypeError(f"`values` must be a dict {{label: one value per layer}}, got {type(values).__name__}; for one "
                        "line pass {'my metric': values}.")
    layers, values = list(layers), dict(values)
    for label, ys in values.items():
        if isinstance(ys, Mapping):  # {layer: value}, as the metrics are often kept: in the order of `layers`
            missing = [layer for layer in layers if layer not in ys]
            if missing:
                raise ValueError(f"`values[{label!r}]` has no value for layers {missing}; give one per layer.")
            values[label] = ys = [ys[layer] for layer in layers]
        if len(ys) != len(layers):
            raise ValueError(f"`values[{label!r}]` has {len(ys)} values for {len(layers)} layers; give one per layer.")
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
    else:
        fig = ax.figure
    for label, ys in values.items():
        ax.plot(range(len(layers)), [_value(y) for y in ys], marker="o",
                label=_literal(label))
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([_literal(layer) for layer in layers])
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _lay_out(fig)
    return fig, ax


@_no_figure_left_on_error
def plot_concept_bars(
    scores: Any,
    names: Sequence[str] = None,
    title: str = "",
    ylabel: str = "",
    ax: Any = None,
) -> Tuple[Any, Any]:
    """Bars per concept: one input's scores, or the mean (± standard deviation) over a batch.

    Args:
        scores: ``(K,)`` or ``(N, K)`` tensor (e.g. :meth:`captum_inn.LayerConcepts.attribute` or
            ``encoded``), or a ``{concept: value}`` dict, or ``{group: {concept: value}}`` for
            grouped bars (e.g. one group per layer). Dicts with a ``standard_error``
            (:meth:`~captum_inn.LayerConcepts.encoded_summary`) get it as error bars.
        names: Concept names for tensor scores, e.g. ``explainer.concept_names`` of a
            :class:`~captum_inn.LayerConcepts` (default: the column numbers).
        title: Axes title.
        ylabel: Label of the y axis.
        ax: Optional axes.

    Returns:
        ``(fig, ax)``.

    Examples::

        >>> fig, ax = plot_concept_bars(torch.rand(4, 3), ["digit", "colour", "residual"])
        >>> fig, ax = plot_concept_bars({"relu1": {"digit": 0.9, "colour": 0.8}, "fc": {"digit": 0.7, "colour": 0.2}})
    """
    _check_drawing_target(ax=ax)
    import numpy as np

    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
    else:
        fig = ax.figure
    if isinstance(scores, dict) and scores and all(isinstance(v, dict) for v in scores.values()):
        groups = list(scores)
        concepts = list(next(iter(scores.values())))
        for group in groups:  # bars are placed by the first group's concepts: every group needs them, and no others
            missing = [c for c in concepts if c not in scores[group]]
            extra = [c for c in scores[group] if c not in concepts]
            if missing or extra:
                problem = f"has no value for {missing}" if missing else f"has concepts the first group lacks, {extra}"
                raise ValueError(f"Group {group!r} of `scores` {problem}; every group needs the concepts of the first "
                                 f"group, {concepts}, and no others.")
        width = 0.8 / len(groups)
        for g, group in enumerate(groups):
            ax.bar(np.arange(len(concepts)) + (g - (len(groups) - 1) / 2) * width,
                   [_value(scores[group][c]) for c in concepts], width, yerr=_standard_errors(scores[group], concepts),
                   capsize=2, label=_literal(group))
        ax.legend(fontsize=8)
    else:
        if isinstance(scores, dict):
            concepts, values = list(scores), [_value(v) for v in scores.values()]
            errors = _standard_errors(scores, concepts)
        else:
            if not isinstance(scores, Tensor):  # an array or list of scores: an AttributeError ("detach") before
                try:
                    scores = from_numpy(np.asarray(scores, dtype=np.float64))
                except (TypeError, ValueError):
                    raise TypeError(f"`scores` must be a (K,) or (N, K) tensor of concept scores (or an array of "
                                    f"numbers), or a dict {{concept: score}}, got {type(scores).__name__}.") from None
            values_t = scores.detach().float().cpu()
            if values_t.dim() not in (1, 2):
                raise ValueError(f"`scores` must be a (K,) or (N, K) tensor of concept scores, got shape "
                                 f"{tuple(values_t.shape)}; for one score pass scores.reshape(1).")
            if values_t.dim() == 2:
                values, errors = values_t.mean(0).tolist(), (values_t.std(0).tolist() if values_t.shape[0] > 1 else None)
            else:
                values, errors = values_t.tolist(), None
            concepts = list(names) if names is not None else [str(k) for k in range(len(values))]
            if len(concepts) != len(values):
                raise ValueError(f"`names` has {len(concepts)} names for {len(values)} concept scores; give one "
                                 "name per column of `scores`.")
        ax.bar(range(len(concepts)), values, yerr=errors, capsize=3, color="tab:blue")
    ax.set_xticks(range(len(concepts)))
    ax.set_xticklabels([_literal(c) for c in concepts])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    _lay_out(fig)
    return fig, ax


@_no_figure_left_on_error
def plot_concept_edits(
    originals: Tensor,
    donors: Tensor,
    edits: Dict[str, Tensor],
    title: str = "",
    fig: Any = None,
) -> Tuple[Any, Any]:
    """A grid: one row per input — the input, the donor, then the input with each concept taken from the donor.

    Args:
        originals: ``(N, C, H, W)`` in ``[0, 1]``.
        donors: ``(N, C, H, W)``, or ``(1, C, H, W)``: one donor for every row (as
            :meth:`~captum_inn.LayerConcepts.edit` takes it).
        edits: ``{concept: (N, C, H, W)}`` edited images (:meth:`captum_inn.LayerConcepts.edit`).
        title: Figure title.
        fig: Optional figure to draw into.

    Returns:
        ``(fig, axes)`` with ``axes`` of shape ``(N, 2 + len(edits))``.

    Examples::

        >>> fig, axes = plot_concept_edits(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), {"digit": torch.rand(2, 3, 8, 8)})
        >>> axes.shape
        (2, 3)
    """
    _check_drawing_target(fig=fig)
    if not isinstance(edits, Mapping):  # edit() gives a bare tensor; the concept name is the column title
        raise TypeError(f"`edits` must be a dict {{concept: (N, C, H, W) edited images}}, got {type(edits).__name__}; "
                        "for one concept pass {'my_concept': concepts.edit(x, 'my_concept', donors=donors)}.")
    plt = _plt()
    n, columns = originals.shape[0], 2 + len(edits)
    if donors.dim() != originals.dim():  # one donor as (C, H, W) was read as C donors
        raise ValueError(f"`donors` must be (N, C, H, W) like `originals`, got shape {tuple(donors.shape)}; for one "
                         "donor pass donor.unsqueeze(0).")
    if donors.shape[0] == 1:
        donors = donors.expand(n, *donors.shape[1:])
    for what, images in (("donors", donors), *((f"edits[{c!r}]", e) for c, e in edits.items())):
        if images.shape[0] != n:
            raise ValueError(f"`{what}` holds {images.shape[0]} images for {n} `originals`; give one per row"
                             f"{' (or one donor for all)' if what == 'donors' else ''}.")
    own = fig is None  # a caller's figure keeps its size
    if own:
        fig = plt.figure(figsize=(1.3 * columns, 1.2 * n + 0.5))
    axes = fig.subplots(n, columns, squeeze=False)
    headers = ["input a", "donor b", *(f"a with b's {_literal(c)}" for c in edits)]
    for i in range(n):
        row = [originals[i], donors[i], *(e[i] for e in edits.values())]
        for j, image in enumerate(row):
            _show(axes[i, j], image)
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(headers[j], fontsize=7)
    if title:
        _suptitle(fig, title, fontsize=10, grow=own)
    _lay_out(fig)
    return fig, axes


def _standard_errors(values: Any, concepts: Sequence[str]) -> Optional[List[float]]:
    """The ``standard_error`` of an :class:`~captum_inn.attr.EncodedShares`, in ``concepts`` order."""
    errors = getattr(values, "standard_error", None)
    return None if errors is None else [errors[c] for c in concepts]


@_no_figure_left_on_error
def plot_concept_dynamics(dynamics: Any, ax: Any = None, concepts: Optional[Sequence[str]] = None) -> Tuple[Any, Any]:
    """Each concept's encoded share over training checkpoints, with the test accuracy when known
    and a band of ± 2 standard errors where the shares have them.

    Args:
        dynamics: A :class:`captum_inn.training.dynamics.ConceptDynamics`.
        ax: Optional axes.
        concepts: The concepts to draw, in order; ``None``: every named one. The residual (what no
            pair names) is drawn only when listed: its share, often far below 0, set the scale and
            pressed the named concepts' lines together.

    Returns:
        ``(fig, ax)``.

    Examples::

        >>> from captum_inn.training.dynamics import ConceptDynamics
        >>> dynamics = ConceptDynamics("fc", ["0", "100"], [0.1, 0.9], {"digit": [0.2, 0.8], "colour": [0.5, 0.3]})
        >>> fig, ax = plot_concept_dynamics(dynamics)
    """
    _check_drawing_target(ax=ax)
    dynamics.check_lengths()  # before a figure is opened
    chosen = _chosen_concepts(dynamics.encoded, concepts)
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
    else:
        fig = ax.figure
    x = range(len(dynamics.labels))
    errors = getattr(dynamics, "standard_error", None) or {}
    for concept in chosen:
        shares = dynamics.encoded[concept]
        line, = ax.plot(x, shares, marker="o", label=_literal(concept))
        if errors.get(concept):  # a band of ± 2 standard errors of the mean share (an empty list: none known)
            low = [m - 2 * e for m, e in zip(shares, errors[concept])]
            high = [m + 2 * e for m, e in zip(shares, errors[concept])]
            ax.fill_between(list(x), low, high, color=line.get_color(), alpha=0.15, lw=0)
    if all(a is not None for a in dynamics.accuracy):
        ax.plot(x, dynamics.accuracy, color="black", ls="--", marker="x", label="test accuracy")
    ax.set_xticks(list(x))
    ax.set_xticklabels([_literal(label) for label in dynamics.labels])
    ax.set_xlabel("checkpoint (training step)")
    ax.set_ylabel("share encoded by the layer")
    ax.set_title(f"what {_literal(dynamics.layer)} encodes during training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _lay_out(fig)
    return fig, ax


def _chosen_concepts(shares: Mapping[str, Any], concepts: Optional[Sequence[str]]) -> List[str]:
    """``concepts`` checked against the concepts of ``shares``; ``None``: all but the residual."""
    from captum_inn.concepts import RESIDUAL

    if concepts is None:
        return [name for name in shares if name != RESIDUAL] or list(shares)
    if isinstance(concepts, str):  # "digit" was read as five concepts d, i, g, ...
        concepts = [concepts]
    unknown = [name for name in concepts if name not in shares]
    if unknown:
        raise ValueError(f"`concepts` names {unknown}, which the shares lack; choose from {list(shares)}.")
    return list(concepts)


def check_comparison_class_names(comparison: Any, class_names: Optional[Sequence[str]]) -> None:
    """``ValueError`` when ``class_names`` lacks a name for a class that a comparison's titles show."""
    if class_names is not None:
        largest = max(int(comparison.targets.max()), int(comparison.predictions.max()))
        if len(class_names) <= largest:
            raise ValueError(f"`class_names` has {len(class_names)} names, but class {largest} is shown; give one "
                             "name per class of the model's output.")


def _heat(ax: Any, values: Any, title: str, cmap: str, vmin: Any = None, vmax: Any = None, base: Any = None) -> None:
    if base is not None:  # the input under the map, on its own fixed [0, 1] scale, visible through it
        _show(ax, base)
    ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.5 if base is not None else 1.0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


@_no_figure_left_on_error
def plot_comparison(
    comparison: Any,
    index: int = 0,
    class_names: Sequence[str] = None,
    n_strip: int = 6,
    fig: Any = None,
) -> Tuple[Any, Any]:
    """One input's row: input | Grad-CAM | Integrated Gradients | invariance map | samples | concept bars.

    Grad-CAM is drawn over the input; IG as the absolute value summed over channels; the
    invariance map averaged over channels (bright: the layer ignores that pixel); then ``n_strip``
    invariance samples; then the concept scores when the comparison has them.

    Args:
        comparison: A :class:`captum_inn.compare.Comparison`.
        index: Which input.
        class_names: Names of the classes, for the titles.
        n_strip: Invariance samples shown (at most the number computed).
        fig: Optional figure to draw into.

    Returns:
        ``(fig, axes)``: a list of the axes, left to right.

    Examples::

        >>> from types import SimpleNamespace
        >>> c = SimpleNamespace(inputs=torch.rand(1, 3, 8, 8), gradcam=torch.rand(1, 1, 8, 8),
        ...     integrated_gradients=torch.randn(1, 3, 8, 8), invariance_map=torch.rand(1, 3, 8, 8),
        ...     samples=torch.rand(1, 4, 3, 8, 8), concept_scores=None, concept_names=[], targets=torch.tensor([1]),
        ...     predictions=torch.tensor([1]), layer="fc", gradcam_layer="layer4")
        >>> fig, axes = plot_comparison(c)
        >>> len(axes)
        8
    """
    _check_drawing_target(fig=fig)
    plt = _plt()
    n = comparison.inputs.shape[0]
    index = check_int(index, "index")  # 1.5 was torch's IndexError, True input 1
    if not 0 <= index < n:
        raise ValueError(f"`index` must be in 0…{n - 1}, got {index}.")
    check_comparison_class_names(comparison, class_names)
    n_strip = check_int(n_strip, "n_strip")
    if n_strip < 0:  # fewer axes than the strip draws into: an IndexError before
        raise ValueError(f"`n_strip` must be >= 0 (0 shows no samples), got {n_strip}.")
    strip = min(n_strip, comparison.samples.shape[1])
    has_concepts = comparison.concept_scores is not None
    columns = 4 + strip + (1 if has_concepts else 0)
    if fig is None:
        fig = plt.figure(figsize=(1.55 * columns + (1.5 if has_concepts else 0), 2.2))
    widths = [1] * (4 + strip) + ([2.2] if has_concepts else [])
    axes = list(fig.subplots(1, columns, gridspec_kw={"width_ratios": widths}))

    def name(k: int) -> str:
        return _literal(class_names[k]) if class_names is not None else str(k)

    image = comparison.inputs[index]
    target, predicted = int(comparison.targets[index]), int(comparison.predictions[index])
    _show(axes[0], image)
    axes[0].set_title(f"input\npred. {name(predicted)}", fontsize=8)
    axes[0].axis("off")
    # float32 for NumPy and quantile: a bfloat16 or float16 model's maps come in its dtype
    _heat(axes[1], comparison.gradcam[index, 0].detach().float().cpu().numpy(), f"Grad-CAM\n{_literal(comparison.gradcam_layer)}, "
          f"{name(target)}", "jet", vmin=0, base=image)
    ig = comparison.integrated_gradients[index].detach().float().abs().sum(0).cpu()
    _heat(axes[2], ig.numpy(), f"Integrated\nGradients, {name(target)}", "viridis", vmin=0,
          vmax=_finite_max(ig, quantile=0.99))
    _heat(axes[3], comparison.invariance_map[index].detach().float().mean(0).cpu().numpy(),
          f"invariance map\n{_literal(comparison.layer)}", "magma", vmin=0)
    for j in range(strip):
        ax = axes[4 + j]
        _show(ax, comparison.samples[index, j])
        ax.axis("off")
        if j == 0:
            ax.set_title(f"what {_literal(comparison.layer)}\nignores: samples", fontsize=8, loc="left")
    if has_concepts:
        delta = getattr(comparison, "concept_delta", None)
        gap = "" if delta is None else f"\ncompleteness gap {float(delta[index]):.1e}"
        plot_concept_bars(comparison.concept_scores[index], comparison.concept_names,
                          title=f"concepts → {name(target)}{gap}", ax=axes[-1])
        axes[-1].tick_params(labelsize=7)
    _lay_out(fig)
    return fig, axes


@_no_figure_left_on_error
def plot_image_grid(
    columns: Dict[str, Tensor],
    row_labels: Sequence[str] = None,
    title: str = "",
    fig: Any = None,
    captions: Optional[Dict[str, Sequence[str]]] = None,
) -> Tuple[Any, Any]:
    """Images side by side: one column per entry of ``columns``, one row per image.

    Used for the adversarial and image-mixing analyses (input | attacked | decoded view per layer).

    Args:
        columns: ``{column title: (N, C, H, W)}`` in ``[0, 1]``, all with the same ``N``.
        row_labels: Optional ``N`` labels written left of each row.
        title: Figure title.
        fig: Optional figure.
        captions: Optional ``{column title: N captions}`` written under that column's images.

    Returns:
        ``(fig, axes)`` with ``axes`` of shape ``(N, len(columns))``.

    Examples::

        >>> fig, axes = plot_image_grid({"a": torch.rand(2, 3, 8, 8), "b": torch.rand(2, 3, 8, 8)},
        ...                             captions={"b": ["cat", "dog"]})
        >>> axes.shape
        (2, 2)
    """
    _check_drawing_target(fig=fig)
    plt = _plt()
    if not isinstance(columns, Mapping):  # a bare tensor: "Boolean value of Tensor ... is ambiguous" before
        raise TypeError(f"`columns` must be a dict {{column title: (N, C, H, W) images}}, got "
                        f"{type(columns).__name__}; for one column pass {{'images': x}}.")
    if not columns:
        raise ValueError("`columns` is empty; pass at least one {column title: (N, C, H, W) images}.")
    for column, images in columns.items():  # a single (C, H, W) image was read as C images of (H, W)
        if not isinstance(images, Tensor) or images.dim() != 4:
            if not isinstance(images, Tensor):  # an AttributeError ("no attribute 'is_floating_point'") before
                raise TypeError(f"`columns[{column!r}]` must be a tensor of images (N, C, H, W), got "
                                f"{type(images).__name__}; convert it with torch.as_tensor.")
            raise ValueError(f"`columns[{column!r}]` must be images (N, C, H, W), got shape {tuple(images.shape)}; for "
                             "one image pass image.unsqueeze(0).")
    sizes = {t.shape[0] for t in columns.values()}
    if len(sizes) != 1:
        raise ValueError(f"Every column of `columns` needs the same number of images, got {sorted(sizes)}.")
    n, m = sizes.pop(), len(columns)
    captions = captions or {}
    unknown = sorted(set(captions) - set(columns))
    if unknown or any(len(c) != n for c in captions.values()):
        raise ValueError(f"`captions` needs {n} captions per column title of `columns`; got {unknown or 'other counts'}.")
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"`row_labels` has {len(row_labels)} labels for {n} rows; give one per image of a column.")
    own = fig is None  # a caller's figure keeps its size
    if own:
        fig = plt.figure(figsize=(1.35 * m + (0.8 if row_labels is not None else 0), (1.35 + 0.2 * bool(captions)) * n + 0.5))
    axes = fig.subplots(n, m, squeeze=False)
    for j, (header, images) in enumerate(columns.items()):
        for i in range(n):
            ax = axes[i, j]
            _show(ax, images[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_literal(header), fontsize=7)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(_literal(row_labels[i]), fontsize=7)
            if header in captions:
                ax.set_xlabel(_literal(captions[header][i]), fontsize=7)
    if title:
        _suptitle(fig, title, fontsize=10, grow=own)
    _lay_out(fig)
    return fig, axes


def save_figure(fig: Any, path: Any, dpi: int = 110) -> str:
    """Save ``fig`` and close it (figures in loops would otherwise pile up in memory).

    Args:
        fig: A matplotlib figure (e.g. the ``fig`` of any function here).
        path: Target file; its suffix picks the format (``.png``, ``.pdf``, ``.svg``, …), and a
            path without one (``ve``, ``epoch_1.5``) gets ``.png``.
        dpi: Resolution.

    Returns:
        The path of the written file, as a string.

    Raises:
        ValueError: ``path`` names a folder (the figure is closed, as after a save).

    Examples::

        >>> import os, tempfile
        >>> fig, ax = plot_by_depth(["conv", "fc"], {"VE": [0.1, 0.8]})
        >>> save_figure(fig, os.path.join(tempfile.mkdtemp(), "ve.png")).endswith("ve.png")
        True
    """
    path = os.fspath(path)
    if not os.path.basename(path) or os.path.isdir(path):  # "figures/" was written as a hidden "figures/.png.png"
        _plt().close(fig)
        raise ValueError(f"`path` {path!r} names a folder; pass a file path in it, e.g. "
                         f"{os.path.join(path, 'figure.png')!r}.")
    # matplotlib would add it: the path returned is the file written; "epoch_1.5" has no format suffix either
    if os.path.splitext(path)[1][1:].lower() not in fig.canvas.get_supported_filetypes():
        path += ".png"
    try:
        fig.savefig(path, dpi=dpi)
    finally:  # closed on a failed save too (a missing folder)
        _plt().close(fig)
    return str(path)


