"""``fit_concepts``: the factor INN ``e`` that splits a representation into named concepts.

``e`` is fitted by maximum likelihood on pairs of inputs (docs/method.rst). For a pair ``(a, b)``
that shares concept ``F`` the factor ``e_F(b)`` is correlated with ``e_F(a)`` by a fixed ``ρ`` and
every other factor is independent; for a pair that differs *only* in ``F``, every factor but
``F`` is correlated (the residual included). The residual factor, which holds everything no
concept names, is always **last**.

The representation is the autoencoder code ``z̄`` by default (edits then decode to images), or a
vector layer of the analysed model (:class:`LayerRepresentation`, the IIN setting: ``e`` is a
bijection, so the model's output through ``e⁻¹(e(z))`` is unchanged). As for the invariance INNs,
the encoder runs once per pair member: a pool of pairs per concept is drawn and encoded up front,
then ``e`` trains from that pool.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars: tqdm.auto warns in notebooks without ipywidgets

from captum_inn._fingerprints import buffer_fingerprints, class_name, weights_fingerprint
from captum_inn._random import seeded_every_global_rng, seeded_global_rng
from captum_inn.attr._common import (
    as_device,
    autograd_on,
    check_int,
    check_module_device,
    check_pixel_range,
    dtype_errors_named,
    encode_images,
    user_stacklevel,
    warn_if_batch_statistics,
)
from captum_inn.autoencoders import check_autoencoder
from captum_inn.capture import (
    capture,
    eval_mode,
    is_comparable_selector,
    resolve_layer,
    selector_for_layer,
    selector_record,
    warn_if_run_twice,
)
from captum_inn.concepts import RESIDUAL, ConceptPairs, as_concepts
from captum_inn.inn import FactorINN, factor_sizes_from_scores
from captum_inn.inn.networks import check_factor_size
from captum_inn.training.checkpoint import (
    CheckpointError,
    building_from,
    finished_checkpoint,
    load_checkpoint,
    load_module_state,
    module_tensors,
    read_header,
    recorded_config_has,
    save_checkpoint,
)
from captum_inn.training.distributed import (
    check_replicas_agree,
    gather_rows,
    local_batch_size,
    raising_together,
    warnings_from_rank_zero,
    world,
)
from captum_inn.training.loop import (
    _check_seed,
    check_checkpoint_writable,
    check_resumable_early,
    final_loss,
    full_precision,
    merged_config,
    resume_key,
    train_loop,
)

__all__ = [
    "ConceptConfig",
    "LayerRepresentation",
    "concept_scores",
    "estimate_factor_sizes",
    "fit_concepts",
    "load_concept_inn",
    "pair_nll",
    "save_concept_inn",
]


@dataclass
class ConceptConfig:
    """Settings of :func:`fit_concepts`.

    Attributes:
        n_blocks: Flow blocks of ``e``.
        hidden: Width of the coupling subnets.
        depth: Hidden layers of the coupling subnets.
        clamp: Bound on each coupling log-scale.
        rho: Correlation of a shared factor between the members of a pair (0.975 as in the
            reference code); must lie in ``(0, 1)``.
        pool_size: Pairs per concept drawn and encoded once before training.
        batch_size: Pairs per concept per step.
        steps: Optimiser steps.
        lr: Adam learning rate.
        schedule: ``"constant"`` or ``"cosine"``.
        feature_noise: For deterministic representations (a model layer), Gaussian noise of this
            fraction of each dimension's standard deviation is added to the features (dead ReLU
            units would otherwise give a degenerate density; one without spread gets this fraction
            of the median spread of those that vary).
        seed: Seed of the pair pools, initialisation and minibatches.
        checkpoint_every: Steps between checkpoints.

    Examples::

        config = ConceptConfig(n_blocks=12, steps=4000, rho=0.95)
        e = fit_concepts(ae, [digit, colour], config, checkpoint="concepts.safetensors")
    """

    n_blocks: int = 8
    hidden: int = 256
    depth: int = 2
    clamp: float = 1.0
    rho: float = 0.975
    pool_size: int = 4096
    batch_size: int = 64
    steps: int = 2000
    lr: float = 5e-4
    schedule: str = "constant"
    feature_noise: float = 0.02
    seed: int = 0
    checkpoint_every: int = 500


@dataclass
class LayerRepresentation:
    """A vector layer of the analysed model as the representation ``e`` acts on (the IIN setting).

    Args:
        model: The analysed network.
        layer: A module or dotted name whose activation is a vector ``(N, d)`` per batch.
        attribute_to_layer_input: Use the layer's input instead of its output.
        selector: Picks the tensor from a non-tensor layer output (see
            :class:`~captum_inn.capture.LayerHooks`); an ``int`` or ``str`` one is recorded, and
            :class:`~captum_inn.LayerConcepts` reads the layer with it (pass a callable to it again:
            it serves the methods that read factors, and ``fit_concepts`` warns that attributions,
            which put factors back into the layer, cannot use it).

    Examples::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> rep = LayerRepresentation(model, "2")
        >>> rep.encode(torch.rand(4, 3, 2, 2))[0].shape
        torch.Size([4, 6])
    """

    model: nn.Module
    layer: Union[str, nn.Module]
    attribute_to_layer_input: bool = False
    selector: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(self.model).__name__}.")
        self.layer_name, self.module = resolve_layer(self.model, self.layer)
        warn_if_batch_statistics(self.model, "LayerRepresentation")
        # a {layer: selector} dict: its entry for this layer
        self.layer_selector = selector_for_layer(self.model, self.layer_name, self.module, self.selector)

    def encode(self, inputs: Tensor) -> Tuple[Tensor, Tensor]:
        """``(features, zeros)``: the layer's activation ``(N, d)`` (deterministic, so zero spread)."""
        try:
            z = capture(self.model, self.layer, inputs, attribute_to_layer_input=self.attribute_to_layer_input,
                        selector=self.layer_selector)
        except TypeError as error:
            if "required positional argument" not in str(error):
                raise
            raise TypeError(f"{error}\n(LayerRepresentation runs the model on the concepts' examples alone, "
                            "model(inputs): for a model that takes more arguments, wrap it in a module whose "
                            "forward(inputs) calls model(inputs, ...) and name the layer inside it, e.g. "
                            "LayerRepresentation(wrapped, 'net.fc'); see docs/howto.rst.)") from error
        if z.dim() != 2:
            # a global pool's (C, 1, 1) is a vector in all but shape; its flattened form is the next
            # linear layer's input, which e can replace in the forward pass (a selector's copy cannot)
            pooled = (" A pooled map (C, 1, 1) is flattened at the input of the linear layer after it: pass "
                      "that layer with attribute_to_layer_input=True (for a torchvision ResNet's 'avgpool': "
                      "LayerRepresentation(model, 'fc', attribute_to_layer_input=True)).") if (
                z.dim() == 4 and z.shape[2:] == (1, 1)) else ""
            error = ValueError(
                f"Layer {self.layer_name!r} gives activations of shape {tuple(z.shape[1:])}; the factor INN "
                f"needs a vector layer (N, d). Use a fully connected layer, or the autoencoder code.{pooled}"
            )
            error.about_the_representation = True  # the layer's, whatever the pairs: fit_concepts names no concept
            raise error
        return z, torch.zeros_like(z)

    def describe(self, dim: int) -> Dict[str, Any]:
        """What a checkpoint records about this representation."""
        described = {"kind": "layer", "dim": int(dim), "layer": self.layer_name,
                     "attribute_to_layer_input": bool(self.attribute_to_layer_input),
                     "model_class": class_name(self.model),
                     "weights": weights_fingerprint(self.model)}
        selector = selector_record(self.layer_selector)
        if selector is not None and is_comparable_selector(selector):  # only then: older checkpoints still resume
            described["selector"] = selector
        return described


def _as_representation(representation: Any) -> Any:
    """``(model, layer)`` as a :class:`LayerRepresentation`; anything else as it is."""
    if isinstance(representation, tuple) and len(representation) == 2 and isinstance(representation[0], nn.Module):
        return LayerRepresentation(*representation)
    return representation


def _callable_selector_record(representation: Any) -> Optional[Dict[str, str]]:
    """The record of the callable selector a layer representation reads with (``None`` for no selector,
    an int or a str one, or an autoencoder): a callable serves the reading methods only, since
    attributions put factors back into the layer, which a callable cannot say where."""
    representation = _as_representation(representation)
    if not isinstance(representation, LayerRepresentation):
        return None
    record = selector_record(representation.layer_selector)
    return None if record is None or is_comparable_selector(record) else record


def _as_encoder(representation: Any, device: Optional[Union[str, torch.device]] = None,
                ) -> Tuple[Callable[[Tensor], Tuple[Tensor, Tensor]], Callable[[int], Dict[str, Any]]]:
    """``(encode: inputs -> (mean, std), describe: dim -> dict)`` of an autoencoder or a layer;
    with ``device``, its network must be there."""
    representation = _as_representation(representation)
    if isinstance(representation, LayerRepresentation):
        if device is not None:
            check_module_device(representation.model, device, "representation")
        layer = representation
        counted: List[bool] = []  # the layer's calls per pass are counted once, on the first examples

        def encode_layer(images: Tensor) -> Tuple[Tensor, Tensor]:
            with dtype_errors_named(images, layer.model, name="concepts"):  # a bfloat16 model: a raw RuntimeError
                features = layer.encode(images)
                if not counted:
                    counted.append(True)
                    warn_if_run_twice(layer.model, {layer.layer_name: layer.module}, (images[:1],))
                return features

        return encode_layer, representation.describe
    try:
        check_autoencoder(representation)
    except TypeError as error:
        raise TypeError(
            "`representation` must be an autoencoder (encode/decode), a LayerRepresentation(model, layer) "
            f"or a (model, layer) tuple; {error}"
        ) from None
    if device is not None:
        check_module_device(representation, device, "representation")

    def encode(images: Tensor) -> Tuple[Tensor, Tensor]:
        if not images.is_floating_point():  # a conv encoder would fail on a raw dtype error
            raise TypeError(f"Concept pairs for an autoencoder must be floating-point images (pixels in [0, 1]), got "
                            f"{images.dtype}; build the pairs from images.float() / 255 for 8-bit pixels.")
        # normalised or 8-bit pixels (Captum's TCAV tutorial normalises its concepts) fitted without a word, on codes of
        # images the autoencoder never saw; a resampling transform's overshoot (bicubic: 1%) is no such mistake
        low, high = (float(v) for v in torch.aminmax(images.detach()))
        if low < -0.5 or high > 1.5:
            check_pixel_range(images, "concepts", representation,
                              fix="the autoencoder decodes images in [0, 1]: build the concepts' examples from such "
                                  "images (8-bit pixels / 255, no Normalize transform), and normalise inside the model.")
        with eval_mode(representation):  # as cache_features: no BatchNorm updates, no dropout
            return encode_images(representation, images, posterior=True, name="concepts")

    return encode, (lambda dim: {"kind": "autoencoder_code", "dim": int(dim),
                                 "weights": weights_fingerprint(representation)})


@dataclass
class _PairPool:
    """Encoded pairs of one concept: posterior means and spreads of both members."""

    concept: ConceptPairs
    mean_a: Tensor
    std_a: Tensor
    mean_b: Tensor
    std_b: Tensor


class _ExampleCount:
    """How many of a concept's sampled pairs are an input with itself, and how many distinct inputs
    the pairs' first members are (each hashed, where it lies, by a fixed random projection of its
    values; a transform's random outputs, all distinct, would count as many inputs)."""

    def __init__(self) -> None:
        self.pairs, self.with_itself, self.hashes, self.projection = 0, 0, [], None

    def add(self, a: Tensor, b: Tensor) -> None:
        flat_a = a.detach().flatten(1).float()
        if self.projection is None:
            self.projection = torch.randn(flat_a.shape[1], generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float32).to(flat_a.device)
        self.pairs += flat_a.shape[0]
        if a.shape == b.shape:  # members of other shapes (an encoder that pools any size) are never equal
            self.with_itself += int((a == b).flatten(1).all(1).sum())
        self.hashes.append((flat_a @ self.projection).cpu())

    def distinct(self) -> int:
        return int(torch.unique(torch.cat(self.hashes)).numel()) if self.hashes else 0

    def warn_if_degenerate(self, name: str, relation: str, n_pairs: int, distinct: int, most_distinct: int) -> None:
        if relation == "share" and self.with_itself * 2 > self.pairs:
            # labels that each input has alone (a float attribute) pair every input with itself: the concept
            # scored 1.0 and took the largest factor, silently
            warnings.warn(
                f"Concept {name!r}: {self.with_itself / self.pairs:.0%} of its pairs are an input with itself, which "
                "makes the concept look fully kept; its score and factor size mean nothing. Labels that only one "
                "input has cause this (a float attribute used as labels: bin it, e.g. torch.bucketize(values, "
                "torch.quantile(values, torch.linspace(0, 1, 11)[1:-1]))).", UserWarning, stacklevel=user_stacklevel())
        if relation == "differ" and self.with_itself * 10 > self.pairs:
            # a transform that left images unchanged (p < 1, or one that draws once per call for a whole chunk
            # of pairs): pairs meant to differ in the concept shared it, and the score fell silently
            warnings.warn(
                f"Concept {name!r}: {self.with_itself / self.pairs:.0%} of its `differ` pairs are an input with "
                "itself, so they show no change of the concept and its score is too low. The transform must change "
                "every image: give a random one p=1, and one that draws once per call, for a whole batch, "
                "per_image=True in ConceptPairs.from_transform (torchvision's transforms run image by image "
                "already).", UserWarning, stacklevel=user_stacklevel())
        if distinct * 10 < min(n_pairs, most_distinct):
            # every concept's pool weighs the same in the fit: a few inputs drawn thousands of times, beside concepts
            # of thousands, skew the factor INN and the factor variance that LayerConcepts.encoded divides by
            warnings.warn(
                f"Concept {name!r}: its {n_pairs} pairs hold only {distinct} distinct inputs, against "
                f"{most_distinct} for another concept. Every concept's pairs weigh alike in the fit, so these few "
                "inputs weigh as much as all the others and skew the factor INN (and the factor variance that "
                "LayerConcepts.encoded divides by); give the concept more examples.",
                UserWarning, stacklevel=user_stacklevel())


def _warn_if_lone_set(concepts: Sequence[ConceptPairs]) -> None:
    """A ``one_set`` concept is told apart from the other sets given with it; alone, it has nothing to be."""
    sets = [c.name for c in concepts if c.one_set]
    if len(sets) == 1:
        warnings.warn(
            f"Concept {sets[0]!r} is one set of examples (a captum.concept.Concept, or from_labels with one label) "
            "and the only one given: its pairs are two of its own examples, which share nothing the set's other "
            "members lack, so it scores about 0 and its factor learns nothing particular to it. Give it a set to "
            "be told apart from: another concept as one set, such as TCAV's random set passed as a concept of its "
            f"own (concepts=[{sets[0]}, random_0], a flat list: in [[{sets[0]}, random_0]] the random set is "
            "left out), or pairs from labels over several groups (ConceptPairs.from_labels).",
            UserWarning, stacklevel=user_stacklevel(),
        )


def _warn_if_repeated(fingerprints: Mapping[str, str]) -> None:
    """Warn when two concepts draw the same pairs (equal fingerprints, as one concept given twice under
    two names): the factor INN splits that concept between two factors, and its share is counted twice."""
    first: Dict[str, str] = {}
    for name, print_ in fingerprints.items():
        if print_ in first:
            warnings.warn(f"`concepts` {first[print_]!r} and {name!r} draw the same pairs, so the factor INN splits "
                          "one concept between two factors and counts its share twice; pass it once.",
                          UserWarning, stacklevel=user_stacklevel())
        first.setdefault(print_, name)


@contextlib.contextmanager
def _naming_concept(name: str) -> Iterator[None]:
    """Errors of encoding one concept's pairs name that concept (the autoencoder's "got (64, 3, 64, 64)"
    said neither which concept nor that 64 is a chunk of its pairs)."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError) as error:
        if (type(error) not in (TypeError, ValueError, RuntimeError) or str(error).startswith(f"Concept {name!r}")
                or getattr(error, "about_the_representation", False)):
            raise  # torch's OutOfMemoryError and the like keep their type; messages that name it, or the layer alone
        raise type(error)(f"Concept {name!r}'s pairs: {error}") from error


@torch.no_grad()
def _encode_pools(
    encode: Callable[[Tensor], Tuple[Tensor, Tensor]], concepts: Sequence[ConceptPairs], n_pairs: int,
    seed: int, device: torch.device, progress: bool, chunk: int = 512,
) -> List[_PairPool]:
    pools, counts = [], {}
    bar = tqdm(total=n_pairs * len(concepts), desc="encoding concept pairs", disable=not progress, leave=False, unit="pair")
    with bar:
        for k, concept in enumerate(concepts):
            generator = torch.Generator().manual_seed(seed * 1009 + k)
            # a sampler may also draw from Python's, NumPy's or PyTorch's global generators (a transform
            # without a generator): seeded too, so a pool repeats for a resume (its scores were refused
            # as "another configuration") and the caller's streams are left as they were; another seed
            # than the generator's, so the two streams do not repeat each other
            with seeded_every_global_rng((seed * 1009 + k) ^ 0x5EED):
                parts: Dict[str, List[Tensor]] = {"ma": [], "sa": [], "mb": [], "sb": []}
                examples = counts[concept.name] = _ExampleCount()
                for start in range(0, n_pairs, chunk):
                    a, b = concept.sample(min(chunk, n_pairs - start), generator)
                    examples.add(a, b)
                    for member, key in ((a, "a"), (b, "b")):
                        if not torch.isfinite(member).all():
                            raise ValueError(f"Concept {concept.name!r} produced pairs with NaN or infinite values.")
                        with _naming_concept(concept.name):  # an image size one concept alone has, say
                            mean, std = encode(member.to(device))
                        mean, std = mean.flatten(1).float().cpu(), std.flatten(1).float().cpu()
                        # found here, not as "`scores` must be finite" (none given) or a silent NaN score
                        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                            raise ValueError(f"Concept {concept.name!r}'s pairs encode to NaN or infinite values (the "
                                             "pairs themselves are finite); check the representation's network (a "
                                             "division by zero, an overflow) before fitting or scoring concepts.")
                        parts["m" + key].append(mean)
                        parts["s" + key].append(std)
                    bar.update(a.shape[0])
            pools.append(_PairPool(concept, *(torch.cat(parts[k]) for k in ("ma", "sa", "mb", "sb"))))
    distinct = {name: count.distinct() for name, count in counts.items()}
    relations = {concept.name: concept.relation for concept in concepts}
    for name, count in counts.items():
        count.warn_if_degenerate(name, relations[name], n_pairs, distinct[name], max(distinct.values()))
    dims = {p.mean_a.shape[1] for p in pools}
    if len(dims) != 1:
        raise ValueError(f"The concepts' pairs encode to different sizes {sorted(dims)}; all must come from one representation.")
    return pools


def _scores(pools: Sequence[_PairPool]) -> Dict[str, float]:
    """Each pool's summed covariance of pair members over the total variance (1 − that for ``differ``
    pairs), about the pool's own members; for ``one_set`` concepts (a Captum ``Concept``: two of its
    examples) about the members of all of them together, since the concept does not vary within one
    set (about its own pool each scored about 0, however much the representation encodes it)."""
    sets = [pool for pool in pools if pool.concept.one_set]
    shared_reference = _reference(sets) if sets else None
    scores = {}
    for pool in pools:
        centre, total = shared_reference if pool.concept.one_set else _reference([pool])
        cov = ((pool.mean_a.double() - centre) * (pool.mean_b.double() - centre)).mean(0).sum()
        shared = float(cov / total)
        scores[pool.concept.name] = shared if pool.concept.relation == "share" else 1.0 - shared
    return scores


def _reference(pools: Sequence[_PairPool]) -> Tuple[Tensor, Tensor]:
    """The mean and summed variance of the pools' members."""
    members = torch.cat([torch.cat([pool.mean_a, pool.mean_b]) for pool in pools]).double()
    total = members.var(0, unbiased=False).sum()
    if total <= 0:
        raise ValueError(f"The representation does not vary over the pairs of {[p.concept.name for p in pools]}.")
    return members.mean(0), total


def _pools_for(representation: Any, concepts: Any, n_pairs: int, seed: int, device: Union[str, torch.device],
               progress: bool) -> List[_PairPool]:
    # as fit_concepts' pool_size: a score is a covariance over pairs (0 pairs failed inside torch.cat)
    if check_int(n_pairs, "n_pairs") < 2:
        raise ValueError(f"`n_pairs` must be >= 2 (pairs per concept for its score), got {n_pairs}.")
    seed = _check_seed(seed)  # concept seeds are seed * 1009 + k
    encode, _ = _as_encoder(representation, device)
    concept_list = as_concepts(concepts)
    _warn_if_lone_set(concept_list)
    return _encode_pools(encode, concept_list, n_pairs, seed, as_device(device), progress)


def concept_scores(
    representation: Any, concepts: Any, *, n_pairs: int = 2000, seed: int = 0,
    device: Union[str, torch.device] = "cpu", progress: bool = False,
) -> Dict[str, float]:
    """Each concept's share of the representation's variance, estimated from its pairs (docs/method.rst).

    For ``share`` pairs: the summed covariance of the two members over the total variance; for
    ``differ`` pairs: one minus that (the variance that changes with the concept), about the
    concept's own pairs. A Captum ``Concept`` (pairs of two of its examples, ``one_set``) does not
    vary within its set: its score is taken about the pairs of all such concepts given, so it
    scores high where its examples cluster apart from the other concepts' examples; alone, it has
    nothing to be told apart from (a warning says so) and scores about ``−1/(n−1)`` for ``n`` examples (two distinct
    examples of a set vary against each other): about 0 for many examples, −1 for two.

    Args:
        representation: An autoencoder, a :class:`LayerRepresentation` or ``(model, layer)``.
        concepts: Concepts (see :func:`captum_inn.concepts.as_concepts`).
        n_pairs: Pairs drawn per concept (>= 2).
        seed: Seeds the pairs.
        device: Where the encoder runs.
        progress: Show a progress bar.

    Returns:
        ``{concept: score}`` in the concepts' order.

    Examples::

        >>> from captum_inn.concepts import ConceptPairs
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
        >>> x, y = torch.rand(20, 3, 2, 2), torch.arange(20) % 2
        >>> scores = concept_scores((model, "1"), [ConceptPairs.from_labels("parity", x, y)], n_pairs=64)
        >>> list(scores)
        ['parity']
    """
    return _scores(_pools_for(representation, concepts, n_pairs, seed, device, progress))


def estimate_factor_sizes(
    representation: Any, concepts: Any, *, n_pairs: int = 2000, seed: int = 0,
    device: Union[str, torch.device] = "cpu", progress: bool = False,
) -> Tuple[Dict[str, int], Dict[str, float]]:
    """Factor sizes from the data: one dimension each, the rest in proportion to
    ``softmax(scores, residual score 1)`` (:func:`~captum_inn.inn.factor_sizes_from_scores`, docs/method.rst).

    Args:
        representation: An autoencoder, a :class:`LayerRepresentation` or ``(model, layer)``.
        concepts: Concepts (see :func:`captum_inn.concepts.as_concepts`).
        n_pairs: Pairs drawn per concept (>= 2).
        seed: Seeds the pairs.
        device: Where the encoder runs.
        progress: Show a progress bar.

    Returns:
        ``(sizes, scores)``: ``{concept: size, ..., "residual": size}`` summing to ``d`` and the
        :func:`concept_scores` they came from.

    Examples::

        >>> from captum_inn.concepts import ConceptPairs
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
        >>> x, y = torch.rand(20, 3, 2, 2), torch.arange(20) % 2
        >>> sizes, scores = estimate_factor_sizes((model, "1"), [ConceptPairs.from_labels("parity", x, y)], n_pairs=64)
        >>> sum(sizes.values()), list(sizes)
        (6, ['parity', 'residual'])
    """
    pools = _pools_for(representation, concepts, n_pairs, seed, device, progress)
    scores = _scores(pools)
    return factor_sizes_from_scores(scores, pools[0].mean_a.shape[1], residual=RESIDUAL), scores


def _check_size_names(factor_sizes: Mapping[str, int], names: Sequence[str]) -> Dict[str, int]:
    """What of ``factor_sizes`` can be checked before the pairs are encoded (the type, names and
    sizes); the sizes as ints, in the order of ``names``, the residual's last where given."""
    if not isinstance(factor_sizes, Mapping):
        raise TypeError(f"`factor_sizes` must be a mapping {{concept: size}}, got {type(factor_sizes).__name__}.")
    unknown = [k for k in factor_sizes if k not in names and k != RESIDUAL]
    missing = [n for n in names if n not in factor_sizes]
    if unknown or missing:
        raise ValueError(
            f"`factor_sizes` must name exactly the concepts {list(names)} (and optionally {RESIDUAL!r}); "
            f"unknown: {unknown}, missing: {missing}."
        )
    sizes = {n: check_factor_size(n, factor_sizes[n]) for n in names}
    if RESIDUAL in factor_sizes:
        sizes[RESIDUAL] = check_factor_size(RESIDUAL, factor_sizes[RESIDUAL])
    return sizes


def _check_dim(dim: int, names: Sequence[str], sizes: Optional[Dict[str, int]]) -> Optional[Dict[str, int]]:
    """The representation's size against the concepts and the sizes checked by :func:`_check_size_names`
    (before the pools where it is known); ``sizes`` back."""
    if dim < len(names) + 1:
        raise ValueError(f"The representation has {dim} dimensions, too few for {len(names)} concepts and a residual.")
    if sizes is not None:
        total = sum(sizes.values())
        if RESIDUAL in sizes and total != dim:
            raise ValueError(f"`factor_sizes` {sizes} sum to {total}, but the representation has {dim} dimensions.")
        if RESIDUAL not in sizes and total >= dim:
            raise ValueError(
                f"`factor_sizes` {sizes} sum to {total}, leaving no residual in a representation of "
                f"{dim} dimensions; they must sum to at most {dim - 1} (or include {RESIDUAL!r} and sum to {dim})."
            )
    return sizes


def _resumed_estimate(checkpoint: Any, names: Sequence[str], dim: int, sizes: Dict[str, int],
                      scores: Optional[Dict[str, float]]) -> Tuple[Dict[str, int], Optional[Dict[str, float]]]:
    """The factor sizes and scores a resumed fit keeps: those its checkpoint estimated, where it did
    and the sizes agree (or are estimated again). Scores estimated again differ in their last digits
    (another conv backend, thread count or number of processes), and sizes given as the ones the
    first run estimated came with no scores: both refused the resume as another configuration. The
    pairs' fingerprints, compared on resume, decide whether the data is the same."""
    config = (read_header(checkpoint) or {}).get("config") or {}
    saved_sizes, saved_scores = config.get("factor_sizes"), config.get("scores")
    if not (isinstance(saved_sizes, dict) and isinstance(saved_scores, dict)) or config.get("concepts") != list(names):
        return sizes, scores
    if sum(saved_sizes.values()) != dim or set(saved_sizes) != {*names, RESIDUAL}:
        return sizes, scores  # another representation: the resume check says so
    given_matches = all(saved_sizes.get(k) == v for k, v in sizes.items()) and (
        RESIDUAL in sizes or saved_sizes[RESIDUAL] == dim - sum(sizes.values()))
    if scores is not None or given_matches:
        return dict(saved_sizes), dict(saved_scores)
    return sizes, scores


# Rank r encodes its pairs with seed + stride · r, so the ranks' pairs differ.
_RANK_POOL_SEED = 7919


def _pair_masks(inn: FactorINN, concepts: Sequence[ConceptPairs]) -> Tensor:
    """``(K, d)`` bool: which output dimensions of ``e`` are correlated within a pair of concept k."""
    masks = torch.zeros(len(concepts), inn.dim, dtype=torch.bool)
    for k, concept in enumerate(concepts):
        block = inn.factor_slices[concept.name]
        if concept.relation == "share":
            masks[k, block] = True
        else:
            masks[k] = True
            masks[k, block] = False
    return masks


def pair_nll(y_a: Tensor, logdet_a: Tensor, y_b: Tensor, logdet_b: Tensor, shared: Tensor, rho: float) -> Tensor:
    """Negative log-likelihood per pair of the factor model (docs/method.rst), without the 2π constant.

    Args:
        y_a: ``(P, d)`` factors of the first members.
        logdet_a: ``(P,)`` log-determinants of ``e`` at the first members.
        y_b: ``(P, d)`` factors of the second members.
        logdet_b: ``(P,)`` log-determinants of ``e`` at the second members.
        shared: ``(P, d)`` bool, the dimensions correlated within each pair.
        rho: The correlation.

    Returns:
        ``(P,)``.

    Examples::

        >>> y = torch.randn(4, 6)
        >>> shared = torch.zeros(4, 6, dtype=torch.bool)
        >>> shared[:, :2] = True                   # the first factor (2 dims) is shared
        >>> pair_nll(y, torch.zeros(4), y, torch.zeros(4), shared, rho=0.975).shape
        torch.Size([4])
    """
    residual = torch.where(shared, (y_b - rho * y_a) ** 2 / (1 - rho**2) + math.log(1 - rho**2), y_b**2)
    return 0.5 * y_a.pow(2).sum(1) - logdet_a + 0.5 * residual.sum(1) - logdet_b


@autograd_on
@warnings_from_rank_zero()
def fit_concepts(
    representation: Any,
    concepts: Any,
    config: Optional[ConceptConfig] = None,
    *,
    factor_sizes: Optional[Mapping[str, int]] = None,
    device: Union[str, torch.device] = "cpu",
    checkpoint: Optional[str] = None,
    resume: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> FactorINN:
    """Fit the factor INN ``e`` on concept pairs (docs/method.rst).

    Args:
        representation: The autoencoder whose code ``z̄`` ``e`` acts on (the default setting:
            edits decode to images), or a :class:`LayerRepresentation` / ``(model, layer)`` for a
            vector layer of the model (the IIN setting).
        concepts: One or more :class:`~captum_inn.concepts.ConceptPairs` (or
            ``captum.concept.Concept`` objects, or ``{name: sampler}``), in factor order.
        config: :class:`ConceptConfig`; keyword ``overrides`` replace its fields.
        factor_sizes: ``{concept: size}`` (optionally with ``"residual"``); ``None`` estimates them
            from the pairs (:func:`estimate_factor_sizes`).
        device: Where ``e`` trains and the encoder runs.
        checkpoint: Checkpoint file (atomic safetensors + JSON); resumed when ``resume``.
        resume: Continue from an existing checkpoint.
        progress: Show progress bars.
        **overrides: Fields of :class:`ConceptConfig`.

    Returns:
        The fitted :class:`~captum_inn.inn.FactorINN` (eval mode, factors in concept order, the
        residual last). ``fit_info`` holds the representation, the concepts and their relations,
        the ``factor_sizes``, the ``scores`` they were estimated from (``None`` when given) and the
        final loss; ``history`` the loss per step: the pairs' negative log-likelihood (nats, without
        the 2π constant) divided by the ``2·d`` numbers of a pair.

    Raises:
        ValueError: ``factor_sizes`` that are not whole numbers >= 1 or do not sum to the
            representation's size, ``rho`` outside (0, 1), too few dimensions for the concepts and
            a residual, pairs of mismatched shapes, concepts encoded to different sizes, a concept
            whose pairs do not vary, NaN or infinite pairs, an unknown representation.
        TypeError: a representation or ``factor_sizes`` of the wrong type.
        CheckpointError: ``resume`` found a checkpoint of another configuration, or of pairs
            drawn from other data (:meth:`~captum_inn.concepts.ConceptPairs.fingerprint`).
        FloatingPointError: the loss became NaN or infinite; the last checkpoint is left intact.

    Examples::

        >>> from captum_inn.concepts import ConceptPairs
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
        >>> x, y = torch.rand(20, 3, 2, 2), torch.arange(20) % 2
        >>> e = fit_concepts((model, "1"), [ConceptPairs.from_labels("parity", x, y)], steps=3,
        ...                  pool_size=32, n_blocks=2, hidden=16, progress=False)
        >>> e.factor_names, e.fit_info["representation"]["kind"]
        (['parity', 'residual'], 'layer')
    """
    config = merged_config(ConceptConfig, config, overrides)
    if not 0.0 < config.rho < 1.0:
        raise ValueError(f"`rho` must lie strictly between 0 and 1, got {config.rho}.")
    concept_list = as_concepts(concepts)
    _warn_if_lone_set(concept_list)
    names = [c.name for c in concept_list]
    # a misspelt name is refused now, not after encoding every pool
    given = None if factor_sizes is None else _check_size_names(factor_sizes, names)
    device = as_device(device)  # "gpu" was torch's raw RuntimeError
    callable_selector = _callable_selector_record(representation)
    if callable_selector is not None:  # attributions refuse it, but only after the fit
        warnings.warn(
            f"`representation` reads layer {_as_representation(representation).layer_name!r} with a callable "
            "selector: LayerConcepts can read factors with it (factors, decompose, encoded), but attribute and "
            "output_from_factors put factors back into the layer's output, which a callable cannot say where, and "
            "refuse it. For those, refit with an int index or a str key that picks the same tensor, or hook a "
            "module whose output is the vector itself.",
            UserWarning, stacklevel=user_stacklevel(),
        )
    encode, describe = _as_encoder(representation, device)
    latent = getattr(representation, "latent_dim", None)  # an autoencoder's size is known before its pools
    if isinstance(latent, int) and not isinstance(latent, bool):
        _check_dim(latent, names, given)
    rank, n_ranks = world(device)
    network = representation.model if isinstance(representation, LayerRepresentation) else (
        representation[0] if isinstance(representation, tuple) else representation)
    check_replicas_agree({"representation": network})
    # under torchrun each process encodes its share of the pairs; all then train on the union
    if config.pool_size // n_ranks < 2:
        raise ValueError(f"`pool_size` must give each process at least 2 pairs per concept, got {config.pool_size} "
                         f"for {n_ranks} process(es); the pools' statistics need more (the default is 4096).")
    # an unusable place is named now, not after encoding every pool; a finished fit writes nothing (it may be
    # read back from a read-only folder)
    check_checkpoint_writable(checkpoint, resume, config.steps)
    if resume:  # other settings or more steps: refused now, not after encoding every pool
        check_resumable_early(checkpoint, "concept_inn", resume_key(asdict(config)), config.steps)
    fingerprints = {c.name: c.fingerprint() for c in concept_list}  # after the checks: a few pairs drawn
    _warn_if_repeated(fingerprints)
    with raising_together():  # each process draws and checks its own pools
        pools = _encode_pools(encode, concept_list, config.pool_size // n_ranks, config.seed + _RANK_POOL_SEED * rank,
                              device, progress and rank == 0)
    for pool in pools:
        for key in ("mean_a", "std_a", "mean_b", "std_b"):
            setattr(pool, key, gather_rows(getattr(pool, key)))
    dim = pools[0].mean_a.shape[1]
    sizes = _check_dim(dim, names, given)
    scores = None
    if sizes is None:
        scores = _scores(pools)
        sizes = factor_sizes_from_scores(scores, dim, residual=RESIDUAL)
    sizes, scores = _resumed_estimate(checkpoint if resume else None, names, dim, sizes, scores)
    # deterministic features get a small noise floor (fraction of each dimension's spread); a dimension
    # without spread (a dead ReLU unit) counts the median spread of those that vary: an absolute floor
    # (1e-6) gave it noise a million times smaller than the layer's scale, and the fit a loss that jumped
    for pool in pools:
        if not (pool.std_a.any() or pool.std_b.any()):
            spread = torch.cat([pool.mean_a, pool.mean_b]).std(0)
            alive = spread > 1e-6 * spread.max()  # float rounding leaves a constant unit a spread near 0
            varying = spread[alive]
            typical = varying.median() if varying.numel() else spread.new_tensor(1.0)
            spread = torch.where(alive, spread, typical) * config.feature_noise
            pool.std_a, pool.std_b = spread.expand_as(pool.mean_a), spread.expand_as(pool.mean_b)

    # only the weight initialisation draws from the global RNG; float32 under any default dtype
    with seeded_global_rng(config.seed, torch.float32):
        inn = FactorINN(dim, sizes, residual=RESIDUAL, n_blocks=config.n_blocks, hidden=config.hidden,
                        depth=config.depth, clamp=config.clamp, seed=config.seed).to(device)
    masks = _pair_masks(inn, concept_list).to(device)
    # ActNorm's data-dependent initialisation on rows drawn as the training draws them (mean + std * noise):
    # on the means alone, a dimension the autoencoder leaves unused (collapsed to the prior: constant
    # mean, std near 1) got a scale of about 1/spread of its means, and its training rows that much larger
    noise = torch.Generator().manual_seed(config.seed)
    with torch.no_grad(), full_precision(device):
        rows = [p.mean_a[:256] + p.std_a[:256] * torch.randn(p.mean_a[:256].shape, generator=noise,
                                                             dtype=p.mean_a.dtype).to(p.mean_a.device) for p in pools]
        inn(torch.cat(rows).to(device))

    info = {
        "representation": describe(dim),
        "concepts": names,
        "relations": [c.relation for c in concept_list],
        "factor_sizes": dict(inn.factor_sizes),
        "scores": scores,
        "rho": config.rho,
    }
    meta = {"kind": "concept_inn", "config": {"inn": inn.config, "train": resume_key(asdict(config)), **info}}
    if checkpoint is not None and recorded_config_has(checkpoint if resume else None, "pairs", default=True):
        # a resume on other concept data is refused; checkpoints of earlier versions lack the record
        meta["config"]["pairs"] = fingerprints
    batch = local_batch_size(config.batch_size)

    shared = torch.cat([masks[k].expand(batch, dim) for k in range(len(pools))])

    def batch_fn(generator: torch.Generator) -> Tuple[Tensor]:
        a_rows, b_rows = [], []
        for pool in pools:
            index = torch.randint(pool.mean_a.shape[0], (batch,), generator=generator)
            eps = torch.randn(2, batch, dim, generator=generator, dtype=torch.float32)
            a_rows.append(pool.mean_a[index] + pool.std_a[index] * eps[0])
            b_rows.append(pool.mean_b[index] + pool.std_b[index] * eps[1])
        return (torch.cat(a_rows + b_rows).to(device),)

    def loss_fn(x: Tensor) -> Tensor:
        y, logdet = inn(x)
        half = len(pools) * batch
        nll = pair_nll(y[:half], logdet[:half], y[half:], logdet[half:], shared, config.rho)
        return nll.mean() / (2 * dim)

    # a finished fit read back keeps the results it recorded: the factors' spread comes from the pools,
    # which another number of processes draws otherwise, and the file was rewritten (in a folder that
    # may be read-only, by rank 0 alone)
    recorded = (read_header(checkpoint) or {}).get("fit_results") if resume and finished_checkpoint(
        checkpoint, config.steps) else None
    history = train_loop(
        inn, loss_fn, batch_fn=batch_fn, steps=config.steps, lr=config.lr, schedule=config.schedule, seed=config.seed,
        checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, resume=resume, meta=meta,
        progress=progress, desc="concept INN",
    )
    if isinstance(recorded, dict) and recorded.get("steps") == config.steps and "factor_variance" in recorded:
        results = recorded
    else:
        with torch.no_grad(), full_precision(device):  # each factor's spread, the reference of LayerConcepts.encoded
            factors = torch.cat([inn(p.mean_a[:1024].to(device), jac=False)[0] for p in pools])
        results = {"steps": config.steps, "final_loss": final_loss(history),
                   "factor_variance": factors.var(0).cpu().tolist()}
    inn.fit_info = {**info, **results}
    if info["representation"].get("kind") == "layer":
        # kept out of the resume record too (older checkpoints resume): LayerConcepts warns when running
        # statistics moved since the fit (the weights alone matched, and other factors were read silently)
        inn.fit_info["representation"] = {**inn.fit_info["representation"], "buffers": buffer_fingerprints(network)}
    if callable_selector is not None:
        # kept out of the resume record (older checkpoints resume), but LayerConcepts must know: an int
        # selector there read another tensor than the fit's callable, silently
        inn.fit_info["representation"] = {**inn.fit_info["representation"], "selector": callable_selector}
    inn.history = history
    if checkpoint is not None:
        # no process goes on (say, to load_concept_inn(checkpoint)) before the file has its results, and
        # every process stops when rank 0 could not write them
        with raising_together():
            if rank == 0:
                # the finished fit's results (factor_variance: the reference of LayerConcepts.encoded) go into
                # its checkpoint too, so load_concept_inn of it gives this INN; a resume reads only "config"
                tensors, saved = load_checkpoint(checkpoint, kind="concept_inn")
                if saved.get("fit_results") != results:  # a finished fit read back has them already
                    save_checkpoint(checkpoint, tensors, {**saved, "fit_results": results})
    return inn


def save_concept_inn(path: str, inn: FactorINN) -> Path:
    """Save a fitted factor INN (weights, architecture, representation, concepts) to one safetensors file.

    Args:
        path: Target ``.safetensors`` file (written atomically).
        inn: A :class:`~captum_inn.inn.FactorINN` from :func:`fit_concepts`.

    Returns:
        The written path.

    Examples::

        e = fit_concepts(ae, [digit, colour])
        save_concept_inn("concepts.safetensors", e)
    """
    if isinstance(path, nn.Module):
        raise TypeError(f"save_concept_inn takes (path, inn), the path first; got a {type(path).__name__} as `path`.")
    if not isinstance(inn, FactorINN):
        raise TypeError(f"`inn` must be a FactorINN from fit_concepts, got {type(inn).__name__}.")
    if not inn.is_fitted:  # its ActNorms never saw data: the file would hold an INN every explainer refuses
        raise ValueError("`inn` is not fitted (its ActNorm layers never saw data); fit it with fit_concepts first.")
    info = getattr(inn, "fit_info", None) or {}
    if "inn" in info:  # it replaced the architecture: the file was written, then refused as damaged
        raise ValueError("`inn.fit_info` has a key 'inn', which the file keeps for the architecture; rename it.")
    return save_checkpoint(path, module_tensors(inn), {"kind": "concept_inn", "config": {"inn": inn.config, **info}})


def load_concept_inn(path: str, representation: Any = None, *,
                     map_location: Union[str, torch.device] = "cpu") -> FactorINN:
    """Load a factor INN saved by :func:`save_concept_inn`, refusing one fitted on another representation.

    Args:
        path: The ``.safetensors`` file.
        representation: When given (an autoencoder, :class:`LayerRepresentation` or ``(model,
            layer)``), the checkpoint must have been fitted on the same kind of representation,
            the same layer, side of it (input or output) and size.
        map_location: Device of the loaded tensors.

    Returns:
        The :class:`~captum_inn.inn.FactorINN` in eval mode, with ``fit_info``.

    Raises:
        CheckpointError: The file is not a concept INN, or was fitted on another representation.

    Examples::

        e = load_concept_inn("concepts.safetensors", representation=ae)   # refuses another representation
        concepts = LayerConcepts(model, "layer4", e, ae)
    """
    if isinstance(representation, (str, torch.device)):  # load_autoencoder(path, "cpu") takes the device second
        raise TypeError(f"`representation` is {representation!r}, a device? load_concept_inn takes the device by "
                        f"keyword: load_concept_inn(path, map_location={str(representation)!r}).")
    tensors, meta = load_checkpoint(path, map_location=map_location, kind="concept_inn")
    with building_from(path):
        config = dict(meta["config"])
        inn = FactorINN(**config["inn"])
    load_module_state(inn, tensors, path)
    config.pop("pairs", None)  # the checkpoint's record of the concept data, for a resume only
    if config.pop("train", None) is not None:  # a checkpoint written during a fit
        if "fit_results" not in meta:
            warnings.warn(
                f"{path} is a checkpoint of an unfinished fit_concepts (step {meta.get('step')}): it lacks the "
                "factors' variance over the data, so LayerConcepts.encoded would compare with the prior's "
                "variance 1. Resume the fit to its end, or load a file written by save_concept_inn.",
                UserWarning, stacklevel=user_stacklevel(),
            )
        with building_from(path):  # an edited fit_results ([1]) failed in dict.update, naming no file
            config.update(meta.get("fit_results", {}))
    config.pop("inn")
    if representation is not None:
        representation = _as_representation(representation)
        expected = _as_encoder(representation)[1](inn.dim)
        # a FactorINN saved without fit_concepts records no representation: codes of its size, as
        # LayerConcepts reads it
        saved = config.get("representation") or {"kind": "autoencoder_code", "dim": inn.dim}
        if isinstance(representation, LayerRepresentation):
            keys = ("kind", "dim", "layer")
            if "attribute_to_layer_input" in saved:  # absent in files from before it was recorded
                keys += ("attribute_to_layer_input",)
            if is_comparable_selector(selector_record(representation.layer_selector)):  # callables: not compared
                keys += ("selector",)
        else:
            keys = ("kind",)
            latent = getattr(representation, "latent_dim", None)
            # only codes have a size to compare: an INN fitted on a layer is refused below for its kind
            if saved.get("kind") == expected["kind"] and latent is not None and int(latent) != saved.get("dim"):
                raise CheckpointError(
                    f"{path}: concept INN fitted on codes of size {saved.get('dim')}, but the autoencoder has "
                    f"latent_dim={latent}."
                )
        mismatch = {k: (saved.get(k), expected.get(k)) for k in keys if saved.get(k) != expected.get(k)}
        if mismatch:
            raise CheckpointError(
                f"{path}: concept INN fitted on another representation; (saved, given) differ in {mismatch}."
            )
        if saved.get("weights") and saved["weights"] != expected["weights"]:
            raise CheckpointError(
                f"{path}: concept INN fitted on another {'model' if saved.get('kind') == 'layer' else 'autoencoder'} "
                "(other weights: retrained, another seed, or another architecture); pass the one it was fitted with."
            )
    inn.fit_info = config
    return inn.to(map_location).eval()
