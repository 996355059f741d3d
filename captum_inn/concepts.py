"""Concepts as data: a name plus a way to draw pairs of inputs related through that concept.

The factor INN (:func:`captum_inn.training.fit_concepts`) learns one factor per concept from pairs
(docs/method.rst). A :class:`ConceptPairs` either

* ``relation="share"``: draws pairs ``(a, b)`` that **share** the concept (same digit, same colour,
  two examples of a Captum :class:`captum.concept.Concept`) and are otherwise independent; or
* ``relation="differ"``: draws pairs that share **everything but** the concept (an image and the
  same image after a colour jitter: they differ only in colour).

Build one from labels (:meth:`ConceptPairs.from_labels`), from a transformation
(:meth:`ConceptPairs.from_transform`), from a Captum concept (:meth:`ConceptPairs.from_captum`), from
:meth:`captum_inn.datasets.ColorDigits.concept`, or from any sampler ``(n, generator) -> (a, b)``.
"""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from captum_inn._fingerprints import tensor_bytes
from captum_inn._random import seeded_every_global_rng
from captum_inn.attr._common import as_optional_generator, numpy_hint, user_stacklevel

__all__ = ["ConceptPairs", "RELATIONS", "RESIDUAL", "as_concepts"]

#: How the two members of a pair relate through the concept.
RELATIONS: Tuple[str, ...] = ("share", "differ")

#: Name of the factor that holds everything no concept names.
RESIDUAL = "residual"

PairSampler = Callable[[int, torch.Generator], Tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ConceptPairs:
    """A named concept and a sampler of input pairs related through it.

    Args:
        name: The concept's name (the factor's name in the factor INN); not ``"residual"``.
        sampler: ``sampler(n, generator) -> (a, b)``, two batches of ``n`` inputs each (same
            shape), reproducible for a seeded ``torch.Generator``.
        relation: ``"share"`` (``a[i]`` and ``b[i]`` share the concept, all else independent) or
            ``"differ"`` (they share everything but the concept).
        one_set: The pairs are two examples of one set whose members all show the concept (a
            Captum ``Concept``; :meth:`from_labels` with a single label): the concept does not
            vary over them, so its score is taken about the pairs of every such concept given
            together, not about its own (:func:`~captum_inn.training.concept_scores`).

    Examples::

        >>> images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
        >>> digit = ConceptPairs.from_labels("digit", images, labels)
        >>> a, b = digit.sample(4, torch.Generator().manual_seed(0))
        >>> a.shape, digit.relation
        (torch.Size([4, 3, 8, 8]), 'share')
    """

    name: str
    sampler: PairSampler
    relation: str = "share"
    one_set: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"A concept `name` must be a non-empty str, got {self.name!r}.")
        if self.name == RESIDUAL:
            raise ValueError(f"{RESIDUAL!r} is reserved for the factor that no concept names; rename the concept.")
        if not callable(self.sampler):
            raise TypeError(f"`sampler` of concept {self.name!r} must be callable (n, generator) -> (a, b).")
        if self.relation not in RELATIONS:
            raise ValueError(f"`relation` of concept {self.name!r} must be one of {RELATIONS}, got {self.relation!r}.")
        if not isinstance(self.one_set, (bool, np.bool_)):
            raise TypeError(f"`one_set` of concept {self.name!r} must be True or False, got {self.one_set!r}.")
        if self.one_set and self.relation != "share":
            raise ValueError(f"Concept {self.name!r}: `one_set` pairs share the concept; pass relation='share'.")

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Draw ``n`` pairs ``(a, b)`` and check them.

        Args:
            n: Number of pairs, ``>= 1``.
            generator: Seeds the draw. ``None``: a generator seeded with 0 (a sampler always gets
                one), so calls without one give the same pairs; pass a generator for fresh ones.

        Returns:
            ``(a, b)``, tensors of equal shape with ``n`` rows.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"`n` (number of pairs) must be an int >= 1, got {n!r}.")
        n = int(n)  # NumPy ints, as ColorDigits.pairs takes them
        generator = as_optional_generator(generator) or torch.Generator().manual_seed(0)
        try:
            inspect.signature(self.sampler).bind(n, generator)
        except TypeError:  # Python's bare "takes 1 positional argument but 2 were given" named no concept
            raise TypeError(f"The sampler of concept {self.name!r} must take (n, generator): the number of pairs and "
                            "a torch.Generator to draw them with.") from None
        except ValueError:  # no signature to read (a builtin): called as it is
            pass
        pair = self.sampler(n, generator)
        if not (isinstance(pair, (tuple, list)) and len(pair) >= 2 and all(isinstance(t, Tensor) for t in pair[:2])):
            raise TypeError(f"The sampler of concept {self.name!r} must return a pair of tensors (a, b).")
        a, b = pair[0], pair[1]
        # not the dtype: each member is encoded on its own, in the encoder's dtype
        if a.shape != b.shape or a.device != b.device:
            raise ValueError(
                f"Concept {self.name!r}: pair members must have the same shape and device, got a "
                f"{tuple(a.shape)} on {a.device} and b {tuple(b.shape)} on {b.device}."
            )
        if a.shape[0] != n:
            raise ValueError(f"Concept {self.name!r}: the sampler returned {a.shape[0]} pairs, {n} were asked for.")
        return a, b

    def fingerprint(self, n: int = 8) -> str:
        """A short hash of ``n`` pairs drawn with fixed generators, so a resumed fit notices that a
        concept's pairs now come from other data.

        The draw does not depend on the process or the number of processes; a sampler that also
        draws from Python's, NumPy's or PyTorch's global generators gets them seeded for it (and
        the caller's streams back afterwards).

        Args:
            n: Number of pairs drawn.

        Returns:
            16 hexadecimal digits.

        Examples::

            >>> images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
            >>> digit = ConceptPairs.from_labels("digit", images, labels)
            >>> digit.fingerprint() == ConceptPairs.from_labels("digit", images.clone(), labels).fingerprint()
            True
            >>> other = torch.tensor([0, 1, 0, 1, 2, 2])               # other pairs share a label
            >>> digit.fingerprint() == ConceptPairs.from_labels("digit", images, other).fingerprint()
            False
        """
        import hashlib

        with seeded_every_global_rng(0):
            a, b = self.sample(n, torch.Generator().manual_seed(0))
        digest = hashlib.sha256(f"{self.relation}:{tuple(a.shape)}:{a.dtype}".encode())
        for member in (a, b):  # the bytes, as weights are hashed: NumPy has no bfloat16
            digest.update(tensor_bytes(member))
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_labels(cls, name: str, inputs: Tensor, labels: Union[Tensor, Sequence[Any]]) -> ConceptPairs:
        """Pairs of inputs with equal labels (``relation="share"``).

        Args:
            name: The concept (for example ``"species"``).
            inputs: ``(M, ...)`` examples.
            labels: ``(M,)`` labels of any hashable kind; every label needs two examples for pairs
                of distinct examples (a label with one example pairs with itself; NaN labels, and labels
                that each input has alone, are refused).

        Returns:
            A :class:`ConceptPairs`.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 2:
            raise ValueError(f"`inputs` must be a tensor with at least 2 examples in dim 0, got {_describe(inputs)}"
                             f"{_dataset_hint(inputs)}.")
        try:
            keys = labels.tolist() if isinstance(labels, Tensor) else list(labels)
        except TypeError:  # a number, or a 0-d array
            keys = None
        if not isinstance(keys, list):  # a 0-d tensor's tolist() is a number
            raise TypeError(f"`labels` must hold one label per input, shape ({inputs.shape[0]},), got "
                            f"{_describe(labels)}; give the label of each input, not one for all.")
        if len(keys) != inputs.shape[0]:
            raise ValueError(f"`labels` has {len(keys)} entries for {inputs.shape[0]} inputs; give one label per input.")
        groups: Dict[Any, List[int]] = {}
        for i, key in enumerate(keys):
            if isinstance(key, (Tensor, np.ndarray)) and key.ndim == 0:
                # a list of 0-d tensors ([y for _, y in dataset]): a tensor hashes by identity, which made
                # every input a group of its own, paired with itself
                key = key.item()
            if isinstance(key, numbers.Real) and key != key:  # NaN equals nothing: each one a group of its own
                raise ValueError(f"`labels` entry {i} is NaN; give every input a label (drop the unlabelled inputs).")
            try:
                if isinstance(key, (Tensor, np.ndarray)):
                    raise TypeError  # a row: a tensor would group by identity, an array is unhashable
                groups.setdefault(key, []).append(i)
            except TypeError:  # a row of a 2-d labels tensor or array
                raise TypeError(
                    f"`labels` must hold one hashable label per input, shape ({len(keys)},); entry {i} is "
                    f"{key!r}. Flatten (M, 1) labels with labels.reshape(-1); for one-hot rows pass labels.argmax(1)."
                ) from None
        if len(groups) == len(keys):
            raise ValueError(
                f"`labels`: each of the {len(keys)} inputs has a label of its own, so every pair would be an input "
                "with itself. Labels name groups of inputs that share the concept; for a continuous attribute, bin "
                "it, e.g. torch.bucketize(values, torch.quantile(values, torch.linspace(0, 1, 11)[1:-1])).")
        # every group's members in one flat tensor (ascending within a group), with each input's
        # group size, the start of its group and its own position there: pairs are drawn for a
        # whole batch at once (a loop over pairs took ~0.2 ms a pair)
        flat = torch.tensor([i for g in groups.values() for i in g], dtype=torch.long)
        sizes = torch.tensor([len(g) for g in groups.values()], dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        group_of = _group_index(len(keys), groups)
        position = torch.empty(len(keys), dtype=torch.long)
        position[flat] = torch.arange(len(keys)) - starts.repeat_interleave(sizes)

        def sampler(n: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
            a = torch.randint(inputs.shape[0], (n,), generator=generator)
            u = torch.rand(n, generator=generator, dtype=torch.float32)  # the same pairs under any default dtype
            size, start = sizes[group_of[a]], starts[group_of[a]]
            # uniform over the other members of a's group: the pick-th of them, skipping a itself
            # (min: u * (size - 1) may round up to size - 1); a alone in its group pairs with itself
            pick = torch.minimum((u * (size - 1)).long(), (size - 2).clamp_min(0))
            pick = pick + (pick >= position[a]).long()
            b = torch.where(size > 1, flat[start + pick.clamp_max(size - 1)], a)
            return inputs[a], inputs[b]

        return cls(name, sampler, "share", one_set=len(groups) == 1)

    @classmethod
    def from_transform(cls, name: str, inputs: Tensor, transform: Callable[[Tensor], Tensor],
                       per_image: Optional[bool] = None) -> ConceptPairs:
        """Pairs ``(x, transform(x))`` that differ only in what the transform changes (``relation="differ"``).

        Args:
            name: The concept the transform changes (for example ``"colour"`` for a colour jitter).
            inputs: ``(M, ...)`` examples.
            transform: Batch in, batch of the same shape out. A random transform with a parameter
                named ``generator``, or (a function, not an ``nn.Module``, whose ``forward``
                counts only by that name) a second positional one without a default or
                defaulting to ``None`` (``transform(batch, g=None)``), gets the pair sampler's
                ``torch.Generator`` there, so ``fit_concepts(..., seed=)`` makes its pairs
                reproducible; any other transform draws its own randomness (its global
                generators are seeded while a fit draws its pools). It must change every
                image, and a random one should change each image its own way (see ``per_image``).
            per_image: Call ``transform`` on one image at a time (batches of one). ``None`` (the
                default): for torchvision's transforms, which draw their random parameters once
                per call (a ``ColorJitter`` gave all 512 pairs of a chunk the same change, so a
                pool of 4,096 pairs held 8 colour changes), whole batches for any other transform,
                with a warning if it changes four copies of an image alike but differently at each
                call (say, a ``ColorJitter`` wrapped in a ``lambda``).

        Examples::

            >>> x = torch.rand(8, 3, 4, 4)
            >>> def jitter(batch, generator):       # per-image brightness, seeded by the sampler
            ...     return batch * torch.rand(batch.shape[0], 1, 1, 1, generator=generator)
            >>> pairs = ConceptPairs.from_transform("brightness", x, jitter)
            >>> a1, b1 = pairs.sample(4, torch.Generator().manual_seed(0))
            >>> a2, b2 = pairs.sample(4, torch.Generator().manual_seed(0))
            >>> torch.equal(b1, b2)
            True

        Returns:
            A :class:`ConceptPairs`.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ValueError(f"`inputs` must be a non-empty tensor with examples in dim 0, got {_describe(inputs)}"
                             f"{_dataset_hint(inputs)}.")
        if not callable(transform):
            raise TypeError(f"`transform` must be callable (batch -> batch), got {type(transform).__name__}.")
        probe = per_image is None
        if per_image is None:
            per_image = str(getattr(transform, "__module__", "")).startswith("torchvision.transforms")
        elif not isinstance(per_image, (bool, np.bool_)):
            raise TypeError(f"`per_image` must be True, False or None, got {per_image!r}.")
        passing = _generator_passing(transform)

        def transformed(batch: Tensor, generator: torch.Generator) -> Tensor:
            if passing == "keyword":
                out = transform(batch, generator=generator)
            else:
                out = transform(batch, generator) if passing == "positional" else transform(batch)
            # the pair checks in sample() would blame "the sampler", which the user never wrote
            if not isinstance(out, Tensor) or out.shape != batch.shape:
                got = f"a {tuple(out.shape)} tensor" if isinstance(out, Tensor) else f"a {type(out).__name__}"
                raise TypeError(f"The `transform` of concept {name!r} must return a batch shaped like its input "
                                f"{tuple(batch.shape)}, got {got}.")
            if out.dtype != batch.dtype:  # later, the encoder's dtype check blamed the (float) images instead
                raise TypeError(f"The `transform` of concept {name!r} must return the dtype of its input "
                                f"({batch.dtype}), got {out.dtype}; convert inside it, e.g. "
                                f"out.to({batch.dtype}) (and / 255 for 8-bit pixels).")
            return out

        def sampler(n: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
            a = inputs[torch.randint(inputs.shape[0], (n,), generator=generator)]
            batch = a.clone()  # a transform that edits its batch in place made every pair two equal images
            if per_image:
                return a, torch.cat([transformed(image, generator) for image in batch.split(1)])
            return a, transformed(batch, generator)

        if probe and not per_image:
            _warn_if_one_change_per_call(name, inputs, transformed)
        return cls(name, sampler, "differ")

    @classmethod
    def from_captum(cls, concept: Any, sampler: Optional[PairSampler] = None, max_examples: int = 10_000,
                    one_set: Optional[bool] = None) -> ConceptPairs:
        """A Captum :class:`captum.concept.Concept` as a concept: two of its examples share it.

        Args:
            concept: A ``captum.concept.Concept`` (its ``name`` and ``data_iter``).
            sampler: An explicit pair sampler; without it pairs are two examples drawn from the
                concept's ``data_iter`` (read once, up to ``max_examples``; it may yield batches
                ``(N, C, H, W)`` or single images ``(C, H, W)``, or vectors ``(N, d)`` / ``(d,)``).
            max_examples: Most examples read from ``data_iter`` (>= 2).
            one_set: The pairs are two examples of the concept's own set, so the concept is scored
                against the other such concepts given with it, not about its own pairs (where it
                scores about 0, however much the representation encodes it; see
                :class:`ConceptPairs`). ``None``: ``True`` for pairs drawn from ``data_iter``,
                ``False`` for a ``sampler``'s, which may draw any pairs sharing the concept; pass
                ``True`` for a sampler that draws two examples of the concept.

        Returns:
            A :class:`ConceptPairs` named ``concept.name``.
        """
        name = getattr(concept, "name", None)
        if name is None or not hasattr(concept, "data_iter"):
            raise TypeError(f"`concept` must be a captum.concept.Concept (with name and data_iter), got {type(concept).__name__}.")
        if one_set is not None and not isinstance(one_set, (bool, np.bool_)):
            raise TypeError(f"`one_set` must be True, False or None, got {one_set!r}.")
        if sampler is not None:
            return cls(str(name), sampler, "share", one_set=bool(one_set))
        if one_set is False:  # about their own members, two examples of one set score about 0 whatever is encoded
            raise ValueError(f"Captum concept {name!r}: pairs from its data_iter are two examples of one set "
                             "(one_set=True); one_set=False needs a pair `sampler`.")
        # -1 silently dropped the last example (a slice [:-1]); 1 or a bool cannot give a pair
        if isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral) or max_examples < 2:
            raise ValueError(f"`max_examples` must be an int >= 2 (examples read for pairs), got {max_examples!r}.")
        if concept.data_iter is None:
            raise ValueError(f"Captum concept {name!r} has no data_iter to draw pairs from: give it one, or pass "
                             "ConceptPairs.from_captum(concept, sampler=...) with a sampler (n, generator) -> (a, b).")
        examples = _read_examples(concept.data_iter, int(max_examples), str(name))
        if examples.shape[0] < 2:
            # a generator (or other one-pass iterator) read once before gives nothing the second time
            spent = (" Its data_iter is a one-pass iterator, so it may have been read before: give a list, a Dataset "
                     "or a DataLoader, which can be read again." if isinstance(concept.data_iter, Iterator) else "")
            raise ValueError(f"Captum concept {name!r} has {examples.shape[0]} example(s); pairs need at least 2.{spent}")
        return cls.from_labels(str(name), examples, [0] * examples.shape[0])


def _group_index(n: int, groups: Mapping[Any, List[int]]) -> Tensor:
    index = torch.empty(n, dtype=torch.long)
    for j, members in enumerate(groups.values()):
        index[members] = j
    return index


def _read_examples(data_iter: Iterable[Any], limit: int, name: str) -> Tensor:
    # imported here, not at the top: the training package imports this module
    from captum_inn.training.data import (
        in_dataset_order,
        seeded_reading,
        without_persistent_workers,
    )

    # the same examples each call, the caller's generators kept: a DataLoader draws its seed from the global
    # generator, and a shuffling one changed the pairs (every resume was refused) and the fits
    with seeded_reading(data_iter):
        return _read_in_order(without_persistent_workers(in_dataset_order(data_iter)), limit, name)


def _read_in_order(data_iter: Iterable[Any], limit: int, name: str) -> Tensor:
    chunks, count = [], 0
    for batch in data_iter:
        tensor = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(tensor, Tensor):
            raise TypeError(f"Captum concept {name!r}'s data_iter yields {type(tensor).__name__} objects, not tensors; "
                            "give its dataset a transform that makes tensors (torchvision's transforms.ToTensor(), or "
                            "v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])).")
        # batches (N, C, H, W) or (N, d); single examples (C, H, W) or (d,) from a loader without batching
        chunks.append(tensor.unsqueeze(0) if tensor.dim() in (1, 3) else tensor)
        count += chunks[-1].shape[0]
        if count >= limit:
            break
    if not chunks:
        return torch.empty(0)
    shapes = sorted({tuple(c.shape[1:]) for c in chunks})
    if len(shapes) > 1:  # torch.cat's size error would not say where the examples came from
        raise ValueError(f"Captum concept {name!r}'s data_iter yields examples of different shapes {shapes}; resize "
                         "them to one.")
    return torch.cat(chunks)[:limit]


def as_concepts(concepts: Any) -> List[ConceptPairs]:
    """Normalise the ways a user can give concepts into a list of :class:`ConceptPairs`.

    Accepted: one or a sequence of :class:`ConceptPairs` or ``captum.concept.Concept`` objects, or
    a mapping ``{name: sampler}`` (``relation="share"``). Names must be unique.

    TCAV's experimental sets (a list of lists) are accepted too. A set of two
    (``[[stripes, random_0], [dots, random_0], ...]``) is a concept and the random or contrast set
    TCAV tests it against: its first concept is taken, and the contrast is left out, since two
    random images share nothing a factor could hold (a ``UserWarning`` names a left-out second
    member whose name does not start with ``random``). A set of two random sets
    (``[random_0, random_1]``, TCAV's baseline for its significance test) is left out. A set of
    three or more is a relative set
    (``[[stripes, zigzagged, dotted]]``, concepts tested against each other): each of its concepts
    is taken. A concept in several sets is taken once. A single Captum concept left alone
    (``[[stripes, random_0]]``) has nothing to be told apart from when scored or fitted, which warns;
    pass ``[stripes, random_0]`` to fit the random set as a concept of its own.

    Args:
        concepts: The concepts.

    Returns:
        ``[ConceptPairs, ...]`` in the given order.

    Examples::

        >>> images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
        >>> digit = ConceptPairs.from_labels("digit", images, labels)
        >>> [c.name for c in as_concepts(digit)]
        ['digit']
        >>> [(c.name, c.relation) for c in as_concepts({"same digit": digit.sampler})]
        [('same digit', 'share')]
    """
    if isinstance(concepts, Mapping):
        for key, value in concepts.items():  # the factor takes the pairs' name: a differing key would be lost
            if isinstance(value, ConceptPairs) and value.name != str(key):
                raise ValueError(f"`concepts[{key!r}]` is a ConceptPairs named {value.name!r}; key it by its name "
                                 f"({value.name!r}), or rename it with dataclasses.replace(pairs, name={str(key)!r}).")
        items = [ConceptPairs(str(k), v) if not isinstance(v, ConceptPairs) else v for k, v in concepts.items()]
    else:
        raw = [concepts] if isinstance(concepts, ConceptPairs) or hasattr(concepts, "data_iter") else concepts
        if isinstance(raw, (list, tuple)) and raw and all(isinstance(c, (list, tuple)) and c for c in raw):
            if any(isinstance(c, ConceptPairs) for experimental_set in raw for c in experimental_set):
                # only TCAV's experimental sets (Captum concepts) keep their first entry: a list holding a list of
                # ConceptPairs fitted only its first concept
                raise TypeError("`concepts` is a list of lists holding ConceptPairs; pass one flat list of them "
                                "(e.g. ds.concepts(), not [ds.concepts()]). Nested lists are read as TCAV's "
                                "experimental sets of captum.concept.Concept objects.")
            # TCAV's experimental sets: [concept, random contrast] pairs, or relative sets of 3+ concepts (whose
            # members after the first were dropped: a three-concept set fitted one factor)
            # [random_0, random_1] is TCAV's random baseline for its significance test: no concept to fit
            random_baselines = [pair for pair in raw if len(pair) == 2 and all(_named_random(c) for c in pair)]
            if random_baselines and len(random_baselines) == len(raw):
                raise ValueError("`concepts`: every TCAV experimental set pairs two random sets (names starting "
                                 "with 'random'), TCAV's baseline for its significance test; there is no concept "
                                 "to fit. Add sets such as [stripes, random_0].")
            taken = [c for experimental_set in raw if not any(experimental_set is pair for pair in random_baselines)
                     for c in (experimental_set[:1] if len(experimental_set) == 2 else experimental_set)]
            # a pair of two real concepts lost its second one silently; Captum's random sets are named random_*
            dropped = sorted({str(getattr(pair[1], "name", pair[1])) for pair in raw if len(pair) == 2
                              and not _named_random(pair[1])
                              and all(pair[1] is not c for c in taken)})
            if dropped:
                warnings.warn(f"`concepts`: {dropped} came second in a TCAV experimental set of two, which is read "
                              "as a concept and its random contrast, so they are left out; to fit them as concepts, "
                              "pass a flat list of concepts (or a relative set of three or more).",
                              UserWarning, stacklevel=user_stacklevel())
            raw = [c for i, c in enumerate(taken) if all(c is not earlier for earlier in taken[:i])]
        if isinstance(raw, (list, tuple)) and not raw:
            raise ValueError("`concepts` is empty; give at least one concept.")
        if not isinstance(raw, (list, tuple)):
            raise TypeError(
                "`concepts` must be a ConceptPairs, a captum.concept.Concept, a non-empty list of them, "
                f"or a mapping {{name: sampler}}; got {type(concepts).__name__}."
            )
        items = []
        for c in raw:
            if isinstance(c, ConceptPairs):
                items.append(c)
            elif hasattr(c, "data_iter") and hasattr(c, "name"):
                items.append(ConceptPairs.from_captum(c))
            else:
                raise TypeError(f"Each concept must be a ConceptPairs or a captum.concept.Concept, got {type(c).__name__}.")
    if not items:
        raise ValueError("`concepts` is empty; give at least one concept.")
    names = [c.name for c in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Concept names must be unique, got {duplicates} more than once.")
    return items


def _warn_if_one_change_per_call(name: str, inputs: Tensor, transformed: Callable[[Tensor, torch.Generator], Tensor]
                                 ) -> None:
    """Warn when a random transform draws one change per call (a torchvision transform wrapped in a
    function): every pair of a batch then gets the same change, and the concept's pools hold a few
    changes only. Told by four copies of one image, changed alike within a call and otherwise in a
    second call (seeded apart; the caller's random streams are left as they were)."""
    copies = inputs[:1].expand(4, *inputs.shape[1:])
    changed = []
    for seed in (1, 2):
        with seeded_every_global_rng(seed):
            changed.append(transformed(copies.clone(), torch.Generator().manual_seed(seed)))
    if all(torch.equal(c, c[:1].expand_as(c)) for c in changed) and not torch.equal(*changed):
        warnings.warn(f"The `transform` of concept {name!r} changes every image of a batch the same way and draws "
                      "another change at each call: all pairs of a batch would differ alike. Pass per_image=True "
                      "(it is then called on one image at a time), or draw the change for each image inside it.",
                      stacklevel=user_stacklevel())


def _named_random(concept: Any) -> bool:
    """Whether a TCAV concept is one of Captum's random sets (by convention named ``random_*``)."""
    return str(getattr(concept, "name", "")).lower().startswith("random")


def _generator_passing(transform: Callable[..., Tensor]) -> Optional[str]:
    """How ``transform`` takes the sampler's generator: ``"keyword"`` (a parameter named
    ``generator``, also in a module's ``forward``), ``"positional"`` (a function's second
    positional parameter) or ``None`` (it does not).

    ``transform(batch, generator=None)`` is the usual way to write a transform that is seeded when
    it can be, and it gets the seed; a second parameter with another default
    (``transform(batch, scale=0.5)``) is a setting, not a generator, and is left alone."""
    module = isinstance(transform, nn.Module)
    try:  # a module's own forward: calling it goes through Module.__call__(*args, **kwargs)
        parameters = list(inspect.signature(transform.forward if module else transform).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature
        return None
    # by name first: in transform(batch, scale=1.0, generator=None) the second parameter is not it
    if any(p.name == "generator" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
           for p in parameters):
        return "keyword"
    if module:  # forward(x, mask=None) or kornia's forward(input, params=None): a setting, not a generator
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "positional" if len(positional) >= 2 and positional[1].default in (inspect.Parameter.empty, None) else None


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _dataset_hint(value: Any) -> str:
    """For a dataset object or a NumPy array passed where a tensor of examples is needed: where its
    tensor is, or how to make one."""
    if isinstance(value, Tensor):
        return ""
    images = getattr(value, "images", None)
    if isinstance(images, Tensor):
        return "; pass its images tensor (e.g. dataset.images)"
    if isinstance(value, torch.utils.data.DataLoader):
        return "; gather its batches into one tensor, e.g. torch.cat([x for x, _ in loader])"
    if isinstance(value, torch.utils.data.Dataset):  # an ImageFolder: captum_inn.datasets.load_image_folder reads one
        return "; stack its examples into one tensor, e.g. torch.stack([dataset[i][0] for i in range(len(dataset))])"
    return numpy_hint(value)
