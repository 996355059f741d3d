"""What a layer learns as the network trains: encoded concept shares over training checkpoints.

The experiment of Esser et al. (2020, Fig. 4): for each checkpoint of the analysed model, fit the
layer's invariance INN ``t`` and measure, with a fixed concept INN ``e`` on the autoencoder code,
the share of each concept the layer encodes (:meth:`captum_inn.LayerConcepts.encoded`). On
ColorDigits a digit classifier's late layers learn the digit and shed the colours as it trains.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars, as the fits'

from captum_inn._fingerprints import buffer_fingerprints, class_name, weights_fingerprint
from captum_inn.attr._common import (
    as_device,
    check_image_size,
    check_inn_fitted,
    check_int,
    check_module_device,
    check_pixel_range,
    check_positive_int,
    format_inputs,
)
from captum_inn.attr.concepts import LayerConcepts, _check_code_autoencoder
from captum_inn.capture import capture, resolve_layer
from captum_inn.inn import FactorINN
from captum_inn.training.cache import FeatureCache, _source_digests, as_cached_rows, cache_features
from captum_inn.training.checkpoint import CheckpointError
from captum_inn.training.classifier import accuracy
from captum_inn.training.data import images_as_tensor, iter_image_batches
from captum_inn.training.invariances import InvarianceConfig, fit_invariances
from captum_inn.training.loop import merged_config

__all__ = ["ConceptDynamics", "Snapshots", "concept_dynamics"]


class Snapshots:
    """A ``callback`` for :func:`~captum_inn.training.classifier.fit_classifier` (or ``train_loop``)
    that keeps a frozen copy of the model after chosen steps.

    Args:
        steps: Steps (counted from 1) after which to copy the model; ``0`` copies the model as
            it is now (before training). A step past the fit's last one is never reached, so
            ``snaps.models`` lacks it: compare ``sorted(snaps.models)`` with the steps asked for.
        model: The model, needed only for a step-0 snapshot. One ``Snapshots`` follows one
            model's fit: a call with another model is a ``ValueError`` (it would replace the
            first fit's snapshots). A resumed fit of the same model replaces the steps it redoes.

    Examples::

        >>> from captum_inn.training.classifier import fit_classifier
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> snaps = Snapshots([0, 2, 4], model)
        >>> _ = fit_classifier(model, (torch.rand(8, 3, 2, 2), torch.randint(3, (8,))), steps=4,
        ...                    callback=snaps, progress=False)
        >>> sorted(snaps.models)
        [0, 2, 4]
    """

    def __init__(self, steps: Sequence[int], model: Optional[nn.Module] = None) -> None:
        if not isinstance(steps, Iterable) or isinstance(steps, (str, bytes)):  # Snapshots(100, model): "not iterable"
            raise TypeError(f"`steps` must be a sequence of step numbers, e.g. range(0, 1001, 100), got "
                            f"{type(steps).__name__}.")
        # 2.9 was taken as step 2; torch.arange(0, 300, 100)'s integer 0-d tensors are steps
        self.steps = sorted({check_int(s, "steps") for s in steps})
        if any(s < 0 for s in self.steps):
            raise ValueError(f"`steps` must be >= 0, got {self.steps}.")
        self.models: Dict[int, nn.Module] = {}
        self._followed = model  # the model whose fit this follows (set at the first call when not given)
        if 0 in self.steps:
            if model is None:
                raise ValueError("A step-0 snapshot needs `model`.")
            self.models[0] = _frozen_copy(model)

    def __call__(self, step: int, model: nn.Module) -> None:
        if self._followed is None:
            self._followed = model
        elif model is not self._followed:  # a second fit's step 100 silently replaced the first's
            raise ValueError(f"This Snapshots follows the fit of another model (it holds steps {sorted(self.models)} "
                             f"of a {type(self._followed).__name__}); make a new Snapshots for each model's fit.")
        if step in self.steps:
            self.models[step] = _frozen_copy(model)


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


@dataclass
class ConceptDynamics:
    """Encoded concept shares per checkpoint (the result of :func:`concept_dynamics`).

    Attributes:
        layer: The analysed layer.
        labels: Checkpoint labels, in order (e.g. training steps).
        accuracy: Test accuracy per checkpoint (``None`` without labels).
        encoded: ``{concept: [share per checkpoint]}``.
        fit_nll: Final NLL per dimension of each checkpoint's invariance INN.
        standard_error: ``{concept: [standard error of the share per checkpoint]}`` over the
            evaluation inputs (:class:`~captum_inn.attr.EncodedShares`); shares that differ by
            less than about twice it are not told apart.

    Examples::

        dynamics = concept_dynamics(snaps.models, "layer3", ae, e, images, x_test, y_test)
        dynamics.labels, dynamics.encoded["colour"]   # ['0', '100', '1000'], one share per checkpoint
        print(dynamics.table())
        fig, ax = dynamics.plot()
    """

    layer: str
    labels: List[str]
    accuracy: List[Optional[float]]
    encoded: Dict[str, List[float]] = field(default_factory=dict)
    fit_nll: List[float] = field(default_factory=list)
    standard_error: Dict[str, List[float]] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def check_lengths(self) -> None:
        """``ValueError`` naming the first field that does not hold one value per checkpoint (a
        table or plot of ragged lists would mislabel checkpoints or fail inside matplotlib)."""
        n = len(self.labels)
        fields = [("accuracy", self.accuracy, False), *((f"encoded[{c!r}]", v, False) for c, v in self.encoded.items()),
                  ("fit_nll", self.fit_nll, True),
                  *((f"standard_error[{c!r}]", v, True) for c, v in self.standard_error.items())]
        for name, values, may_be_empty in fields:
            if len(values) != n and not (may_be_empty and len(values) == 0):
                raise ValueError(f"`{name}` holds {len(values)} values for {n} checkpoints (`labels` {self.labels}); "
                                 "give one per checkpoint" + (" (None where unknown)." if name == "accuracy" else "."))
        unknown = [c for c in self.standard_error if c not in self.encoded]
        if unknown:
            raise ValueError(f"`standard_error` names {unknown}, which `encoded` lacks ({list(self.encoded)}).")

    def table(self) -> str:
        """A plain-text table: one row per checkpoint, accuracy and the share of each concept
        (± its standard error where known)."""
        self.check_lengths()
        concepts = list(self.encoded)
        head = ["checkpoint", "accuracy", *concepts]
        rows = [head]

        def cell(concept: str, i: int) -> str:
            errors = self.standard_error.get(concept)
            share = f"{self.encoded[concept][i]:.3f}"
            return share if not errors else f"{share} ± {errors[i]:.3f}"

        for i, label in enumerate(self.labels):
            acc = self.accuracy[i]
            rows.append([label, "-" if acc is None else f"{acc:.3f}", *(cell(c, i) for c in concepts)])
        widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)

    def plot(self, ax: Any = None, concepts: Optional[Sequence[str]] = None) -> Tuple[Any, Any]:
        """Lines of each concept's encoded share over the checkpoints.

        Args:
            ax: Optional matplotlib axes.
            concepts: The concepts to draw; ``None``: every named one, without the residual
                (:func:`~captum_inn.visualization.plot_concept_dynamics`).

        Returns:
            ``(fig, ax)``.
        """
        from captum_inn.visualization import plot_concept_dynamics

        return plot_concept_dynamics(self, ax=ax, concepts=concepts)


def _layer_features(model: nn.Module, layer: str, data: Any, device: torch.device, read: Mapping[str, Any],
                    batch_size: int = 256) -> Tensor:
    """The layer's activations over ``data`` (model in eval mode, its mode restored), read as
    ``read`` says (``attribute_to_layer_input``, ``selector``)."""
    return torch.cat([as_cached_rows(capture(model, layer, images.to(device), **read), images.shape[0], layer).cpu()
                      for images in iter_image_batches(data, batch_size)])


def concept_dynamics(
    models: Union[Mapping[Any, nn.Module], Sequence[Tuple[Any, nn.Module]], Snapshots],
    layer: Union[str, nn.Module],
    autoencoder: Any,
    concept_inn: FactorINN,
    data: Any,
    eval_inputs: Tensor,
    eval_labels: Optional[Tensor] = None,
    config: Optional[InvarianceConfig] = None,
    *,
    n_samples: int = 16,
    seed: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    checkpoint_dir: Optional[str] = None,
    resume: bool = True,
    progress: bool = True,
    attribute_to_layer_input: bool = False,
    selector: Any = None,
    **overrides: Any,
) -> ConceptDynamics:
    """Fit the layer's invariance INN for every checkpoint and measure the encoded concept shares.

    The autoencoder encodes an image tensor ``data`` once; each checkpoint runs over ``data`` once
    to cache its layer, then its INN trains from the cache. A ``Dataset`` or ``DataLoader``, which
    may shuffle or augment anew on every pass, is encoded in each checkpoint's pass, so that every
    layer activation is cached beside the code of its own image.

    Args:
        models: ``{label: model}`` or ``[(label, model), ...]``, in training order, or a
            :class:`Snapshots` (its ``.models``).
        layer: The layer (module of the first model, or a dotted name; names are safer).
        autoencoder: The autoencoder ``concept_inn`` was fitted on.
        concept_inn: A :class:`~captum_inn.inn.FactorINN` from ``fit_concepts`` on autoencoder codes.
        data: Training images for the invariance INNs.
        eval_inputs: ``(N, C, H, W)`` images where the shares are measured (a tensor, or a
            ``Dataset`` / ``DiskArray`` of images, read into memory).
        eval_labels: ``(N,)`` labels for each checkpoint's accuracy (optional; a tensor, a list or a
            NumPy array).
        config: :class:`~captum_inn.training.invariances.InvarianceConfig` of the INNs;
            ``overrides`` replace fields.
        n_samples: Invariance samples per input for :meth:`~captum_inn.LayerConcepts.encoded`
            (half its default of 32, so a curve over many checkpoints costs half as much). The
            per-input variances are unbiased for any count, so a share measured by hand with 32
            estimates the same quantity; the two differ by sampling noise, which their standard
            errors bound.
        seed: Seeds the INN fits and the samples; ``None``: ``config.seed`` (0 without a ``config``).
        device: Where to fit.
        checkpoint_dir: Folder for each checkpoint's INN, in a sub-folder per label
            (``checkpoint_dir/<label>/``); a rerun resumes them (each model's features are
            computed again, which is cheap next to the INN fits).
        resume: Resume each checkpoint's INN from ``checkpoint_dir``; ``False`` fits them afresh
            (after retraining the models under the same labels, whose checkpoints are refused).
        progress: Show progress bars.
        attribute_to_layer_input: Read the layer's input instead of its output.
        selector: Picks the tensor from a non-tensor layer output (see
            :class:`~captum_inn.capture.LayerHooks`); as in :func:`~captum_inn.training.fit_invariances`.
        **overrides: Fields of ``InvarianceConfig`` (other settings are refused).

    Returns:
        A :class:`ConceptDynamics` (``.table()``, ``.plot()``, ``.as_dict()``).

    Examples::

        snaps = Snapshots([0, 100, 1000], model)
        fit_classifier(model, (images, labels), steps=1000, callback=snaps)
        dynamics = concept_dynamics(snaps.models, "layer3", ae, e, images, x_test, y_test)  # x_test: (N, C, H, W)
        dynamics.as_dict()["encoded"]                 # {concept: [share per checkpoint]}
    """
    if isinstance(models, Snapshots):
        models = models.models
    if isinstance(models, nn.Module) or not isinstance(models, Iterable):  # "'SmallCNN' object is not iterable"
        raise TypeError(f"`models` must be a {{label: nn.Module}} mapping, a list of (label, nn.Module) pairs or a "
                        f"Snapshots, got {type(models).__name__}; for one model pass {{'final': model}}.")
    items = list(models.items()) if isinstance(models, Mapping) else list(models)
    # each item a (label, model) pair, checked before unpacking: a bare two-module nn.Sequential would
    # unpack as (its first child as the label, its second as the model)
    if not items or not all(isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], nn.Module)
                            and not isinstance(item[0], nn.Module) for item in items):
        raise TypeError("`models` must be a non-empty {label: nn.Module} mapping or a list of (label, nn.Module) "
                        "pairs, e.g. Snapshots(...).models or [('early', model_a), ('late', model_b)].")
    name = layer if isinstance(layer, str) else resolve_layer(items[0][1], layer)[0]
    device = as_device(device)
    seeded = {} if seed is None else {"seed": seed}  # without one, config's seed stands
    config = merged_config(InvarianceConfig, config, {**seeded, **overrides})  # unknown settings: refused now
    if not isinstance(concept_inn, FactorINN):  # an autoencoder there failed with a raw AttributeError
        raise TypeError(f"`concept_inn` must be a captum_inn.inn.FactorINN from fit_concepts, got "
                        f"{type(concept_inn).__name__}.")
    # refused now: it was, after the first checkpoint's cache and INN fit (left in checkpoint_dir)
    check_inn_fitted(concept_inn, "concept_inn", "fit_concepts", "load_concept_inn")
    check_module_device(concept_inn, device, "concept_inn")  # the autoencoder is checked by cache_features
    _check_code_autoencoder(concept_inn, autoencoder)  # refused now, not after the first checkpoint's INN fit
    eval_inputs = images_as_tensor(eval_inputs).to(device)
    # what the measurements take is checked now too, not after the first checkpoint's INN fit
    if isinstance(eval_labels, (list, tuple, np.ndarray)):  # as accuracy() and fit_classifier take them
        try:
            eval_labels = torch.as_tensor(np.asarray(eval_labels))
        except (TypeError, ValueError):  # strings, ragged lists: left for the check below to name
            pass
    _check_measurements(items, name, autoencoder, eval_inputs, eval_labels, n_samples, checkpoint_dir)
    base: Optional[FeatureCache] = None
    if isinstance(selector, Mapping):  # keyed by the first model's modules: later models have their own
        selector = {resolve_layer(items[0][1], key)[0] if isinstance(key, nn.Module) else key: value
                    for key, value in selector.items()}
    read = {"attribute_to_layer_input": bool(attribute_to_layer_input), "selector": selector}
    result = ConceptDynamics(layer=name, labels=[], accuracy=[], encoded={c: [] for c in concept_inn.factor_names},
                             standard_error={c: [] for c in concept_inn.factor_names})
    # which checkpoint is being fitted: each one's INN bar alone read the same for all
    with tqdm(items, desc="concept_dynamics", unit="checkpoint", disable=not progress) as checkpoints:
        for label, model in checkpoints:
            checkpoints.set_postfix_str(f"checkpoint {label}")
            try:
                check_module_device(model, device, "model")
            except ValueError:  # a copy moves: the caller's model stays where it is (.to moved it for good)
                model = copy.deepcopy(model).to(device)
            if base is None or not isinstance(data, Tensor):  # a loader's next pass may be in another order
                base = cache_features(model, [name], autoencoder, data, device=device, progress=progress, **read)
                cache = base
            else:  # the same codes; this model's layer, and its own source for the checkpoint's record
                source, parts = _source_digests(model, autoencoder, data)
                cache = replace(base, layers={name: _layer_features(model, name, data, device, read)}, source=source,
                                source_parts=parts, model_weights=weights_fingerprint(model),
                                model_buffers=buffer_fingerprints(model), model_class=class_name(model))
            folder = str(Path(checkpoint_dir) / str(label)) if checkpoint_dir is not None else None
            try:
                inn = fit_invariances(model, name, cache=cache, config=config, device=device, checkpoint_dir=folder,
                                      resume=resume, progress=progress)
            except CheckpointError as error:  # its "pass resume=False" had no such argument here
                raise CheckpointError(f"The model labelled {label!r}: {error} (Models retrained under the same labels, "
                                      "or other INN settings, give other checkpoints: pass resume=False to "
                                      "concept_dynamics, or another checkpoint_dir.)") from None
            explainer = LayerConcepts(model, name, concept_inn, autoencoder, invariance_inn=inn, selector=selector)
            shares = explainer.encoded_summary(eval_inputs, n_samples=n_samples, generator=torch.Generator().manual_seed(config.seed))
            result.labels.append(str(label))
            result.accuracy.append(None if eval_labels is None else accuracy(model, eval_inputs, eval_labels.to(device)))
            result.fit_nll.append(inn.fit_info["final_nll_per_dim"])
            for concept, share in shares.items():
                result.encoded[concept].append(share)
                result.standard_error[concept].append(shares.standard_error[concept])
    return result


def _check_measurements(items: Sequence[Tuple[Any, nn.Module]], name: str, autoencoder: Any, eval_inputs: Tensor,
                        eval_labels: Optional[Tensor], n_samples: Any, checkpoint_dir: Optional[str]) -> None:
    """The arguments that :func:`concept_dynamics` reads only after a checkpoint's INN fit."""
    if check_positive_int(n_samples, "n_samples") < 2:
        raise ValueError(f"`n_samples` must be >= 2 for a variance, got {n_samples}.")
    format_inputs(eval_inputs, 0, "eval_inputs")
    check_image_size(eval_inputs, autoencoder, "eval_inputs")
    # 8-bit or normalised pixels: found now, not as a warning after each checkpoint's fit beside wrong shares
    check_pixel_range(eval_inputs, "eval_inputs", autoencoder)
    if eval_labels is not None:
        # (1,) labels would broadcast against the predictions and give a wrong accuracy without a word
        if not isinstance(eval_labels, Tensor) or tuple(eval_labels.shape) != (eval_inputs.shape[0],):
            got = tuple(eval_labels.shape) if isinstance(eval_labels, Tensor) else type(eval_labels).__name__
            raise ValueError(f"`eval_labels` must be a tensor of shape ({eval_inputs.shape[0]},), one class index per "
                             f"image of `eval_inputs`, got {got}.")
    labels = [str(label) for label, _ in items]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # one result row and one checkpoint folder per label
        raise ValueError(f"`models` labels must be distinct once made strings, got {repeated} more than once.")
    if checkpoint_dir is not None:
        root = Path(checkpoint_dir).resolve()
        folders: Dict[Path, str] = {}
        for label in labels:
            folder = Path(root, label).resolve()
            if root not in folder.parents:  # "", "." or "..": not a folder of its own
                raise ValueError(f"`models` label {label!r} names no folder of its own inside `checkpoint_dir`; give "
                                 "labels such as steps or names.")
            if folder in folders:  # "b" and "./b": the second fit refused (or with resume=False, overwrote) the first's
                raise ValueError(f"`models` labels {folders[folder]!r} and {label!r} name the same folder in "
                                 "`checkpoint_dir`; give labels that differ as folder names.")
            folders[folder] = label
    for label, model in items:  # a later checkpoint without the layer: refused before the first fit
        try:
            resolve_layer(model, name)
        except (ValueError, TypeError) as error:
            raise type(error)(f"The model labelled {label!r}: {error}") from None
