"""The two networks of the method: the conditional INN ``t`` and the factor INN ``e``."""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from captum_inn._numbers import check_int, check_number, check_positive_int, integer_scalar
from captum_inn._random import normal
from captum_inn.inn.actnorm import ActNorm
from captum_inn.inn.base import InvertibleModule, check_device, check_vector_batch
from captum_inn.inn.embedders import check_patch_to, check_token_dim, make_embedder
from captum_inn.inn.sequential import SequentialFlow, flow_blocks

__all__ = ["ConditionalINN", "FactorINN", "factor_sizes_from_scores"]


def _actnorms_initialized(network: nn.Module) -> bool:
    # ActNorm initialises from the first forward batch it sees, whatever it is: an INN whose
    # ActNorms never saw data was neither fitted nor loaded from a checkpoint
    return all(bool(m.initialized) for m in network.modules() if isinstance(m, ActNorm))


def check_factor_names(mapping: Mapping[Any, Any], name: str) -> None:
    """Factor names must be strings: a checkpoint's JSON header stores them so, and a key 1 made "1"
    could not be looked up as 1 (nor be told apart from a key "1")."""
    for key in mapping:
        if not isinstance(key, str) or not key:
            raise TypeError(f"`{name}` keys name factors and must be non-empty str, got {key!r} "
                            f"({type(key).__name__}); use {str(key)!r}.")


def check_factor_size(key: Any, size: Any, name: str = "factor_sizes") -> int:
    """``size`` as an int ``>= 1`` (a factor's number of dimensions), else a ``ValueError`` naming the factor.

    Shared by :class:`FactorINN` and ``fit_concepts``: bools and non-integral numbers (``2.5``,
    ``2.0``) are refused rather than truncated.

    Examples::

        >>> check_factor_size("digit", 3)
        3
    """
    size = integer_scalar(size)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"`{name}`[{key!r}] must be a whole number of dimensions >= 1, got {size!r}.")
    return int(size)


class ConditionalINN(InvertibleModule):
    """``v = t(z̄ | z)``: a bijection of the autoencoder code ``z̄`` conditioned on a layer's activation.

    Trained by maximum likelihood under a standard normal prior, ``v`` becomes independent of ``z``
    and so carries exactly what the layer discarded: its invariances (docs/method.rst). The condition
    ``z`` (any per-sample shape) is embedded once per call by :func:`make_embedder` and the
    embedding is concatenated into every coupling.

    Args:
        dim: Size ``d`` of the code ``z̄``.
        cond_shape: Per-sample shape of the layer activation ``z``, e.g. ``(64, 8, 8)`` or ``(10,)``.
        n_blocks: Number of flow blocks (each ActNorm, two couplings, a permutation).
        hidden: Width of the coupling subnets.
        depth: Hidden layers of the coupling subnets.
        embed_dim: Width of the condition embedding.
        clamp: Bound on each coupling log-scale.
        seed: Seed of the permutations.
        conv_width: First-layer channels of the embedder for feature-map conditions.
        conv_max_width: Largest channel count of that embedder.
        conv_patch_to: Largest side that embedder's first layer leaves: larger maps are cut into
            patches first (:class:`~captum_inn.inn.ConvEmbedder`); ``None`` convolves at full
            resolution, as INNs saved before this setting were built.
        token_dim: Features per token that the embedder of long token-sequence conditions
            ``(T, D)`` keeps (:class:`~captum_inn.inn.TokenEmbedder`); ``None`` flattens every
            sequence into an MLP, as INNs saved before this setting were built.

    Examples::

        >>> t = ConditionalINN(dim=8, cond_shape=(16, 4, 4), n_blocks=2, hidden=32, embed_dim=16)
        >>> zbar, z = torch.randn(5, 8), torch.randn(5, 16, 4, 4)
        >>> v, logdet = t(zbar, z)                  # (5, 8), (5,)
        >>> torch.allclose(t(v, z, rev=True)[0], zbar, atol=1e-5)
        True
        >>> t.sample(z, temperature=0.5).shape      # invariance samples of z̄
        torch.Size([5, 8])
    """

    def __init__(
        self,
        dim: int,
        cond_shape: Sequence[int],
        n_blocks: int = 20,
        hidden: int = 512,
        depth: int = 2,
        embed_dim: int = 128,
        clamp: float = 1.0,
        seed: int = 0,
        conv_width: int = 64,
        conv_max_width: int = 256,
        conv_patch_to: Optional[int] = 8,
        token_dim: Optional[int] = 16,
    ) -> None:
        super().__init__()
        if check_int(embed_dim, "embed_dim") < 1:  # an empty embedding would leave every coupling unconditional
            raise ValueError(
                f"`embed_dim` must be >= 1 (the width of the condition embedding), got {embed_dim}; "
                "with 0 the INN would ignore the layer's activation."
            )
        # whole numbers, checked here: 1.7 blocks built 1, and conv_width=0 failed at the first forward pass
        dim, n_blocks, hidden, depth, embed_dim, conv_width, conv_max_width = (
            check_positive_int(value, name) for value, name in (
                (dim, "dim"), (n_blocks, "n_blocks"), (hidden, "hidden"), (depth, "depth"), (embed_dim, "embed_dim"),
                (conv_width, "conv_width"), (conv_max_width, "conv_max_width")))
        self.dim = dim
        # an int is a vector layer's size, as load_invariance_inn's layer_shape takes it
        self.cond_shape = ((check_positive_int(cond_shape, "cond_shape"),) if isinstance(cond_shape, numbers.Integral)
                           else tuple(check_positive_int(s, "cond_shape") for s in cond_shape))
        self.config: Dict[str, Any] = dict(
            dim=self.dim, cond_shape=list(self.cond_shape), n_blocks=int(n_blocks), hidden=int(hidden),
            depth=int(depth), embed_dim=int(embed_dim), clamp=float(check_number(clamp, "clamp", positive=True)),
            seed=check_int(seed, "seed"),
            # the embedder widens a maximum below conv_width to it: record what was built
            conv_width=int(conv_width), conv_max_width=max(int(conv_width), int(conv_max_width)),
            conv_patch_to=check_patch_to(conv_patch_to, "conv_patch_to"),
            token_dim=check_token_dim(token_dim, "token_dim"),
        )
        self.embedder = make_embedder(self.cond_shape, embed_dim, hidden, conv_width, conv_max_width, conv_patch_to,
                                      token_dim)
        self.flow = SequentialFlow(flow_blocks(self.dim, n_blocks, hidden, depth, embed_dim, clamp, seed))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the INN's weights, in which it takes codes and gives invariances and embeddings."""
        return next(self.parameters()).dtype

    @property
    def is_fitted(self) -> bool:
        """``True`` once the INN has seen data, that is once every ActNorm is initialised (by
        ``fit_invariances``, a loaded checkpoint or a first forward pass on real data). The explainers
        refuse an INN that is not fitted.

        Examples::

            >>> t = ConditionalINN(dim=8, cond_shape=(10,), n_blocks=2, hidden=32, embed_dim=16)
            >>> t.is_fitted
            False
            >>> _ = t(torch.randn(16, 8), torch.randn(16, 10))   # initialises ActNorm on this batch
            >>> t.is_fitted
            True
        """
        return _actnorms_initialized(self)

    def embed(self, c: Tensor) -> Tensor:
        """The condition embedding ``h(z)``, ``(N, embed_dim)``; reuse it across many samples.
        Activations of another float dtype (a ``.double()`` model's) are cast to the INN's."""
        _check_condition(c)
        check_device(c, self, "c")
        return self.embedder(c.to(self.dtype))

    def forward(
        self,
        x: Tensor,
        c: Optional[Tensor] = None,
        rev: bool = False,
        jac: bool = True,
        embedding: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Map ``z̄ → v`` (or ``v → z̄`` with ``rev=True``) given the layer activation ``c``.

        Args:
            x: ``(N, dim)`` codes (``rev=False``) or invariances ``v`` (``rev=True``).
            c: ``(N, *cond_shape)`` activations of the hooked layer.
            rev: Direction.
            jac: Whether to compute the log-determinant.
            embedding: A precomputed ``self.embed(c)`` (then ``c`` may be ``None``).

        Returns:
            ``(y, log_jac_det)`` of shapes ``(N, dim)`` and ``(N,)``, in the INN's dtype.
        """
        check_vector_batch(x, self.dim)
        check_device(x, self)
        x = x.to(self.dtype)  # as embed() casts the condition: a float64 code into a float32 INN
        if embedding is not None and c is not None:  # `c` was ignored without a word, whatever its rows
            raise ValueError("Pass the condition `c` or its `embedding` (self.embed(c)), not both.")
        if embedding is None:
            if c is None:
                raise ValueError(
                    "ConditionalINN needs the condition `c`: the hooked layer's activation for "
                    f"each sample, shape (N, {', '.join(map(str, self.cond_shape))})."
                )
            _check_condition(c)  # before its shape is read (a list had none)
            if c.shape[0] != x.shape[0]:
                raise ValueError(
                    f"`x` and `c` must have the same batch size, got {x.shape[0]} and {c.shape[0]}."
                )
            embedding = self.embed(c)
        else:  # checked and cast as embed() gives it: a wrong batch read as a bad `c`, a float64 one failed in a subnet
            width = self.config["embed_dim"]
            if not isinstance(embedding, torch.Tensor) or embedding.shape != (x.shape[0], width):
                got = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
                raise ValueError(f"`embedding` must be self.embed(c) for the {x.shape[0]} rows of `x`, shape "
                                 f"({x.shape[0]}, {width}), got {got}.")
            check_device(embedding, self, "embedding")
            embedding = embedding.to(self.dtype)
        return self.flow(x, embedding, rev=rev, jac=jac)

    def inverse(self, y: Tensor, c: Optional[Tensor] = None, jac: bool = True,
                embedding: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``z̄ = t⁻¹(v | c)``: shorthand for ``self(y, c, rev=True, jac=jac, embedding=embedding)``.

        Args:
            y: ``(N, dim)`` invariances ``v``.
            c: ``(N, *cond_shape)`` activations of the hooked layer.
            jac: Whether to compute the log-determinant of the inverse.
            embedding: A precomputed ``self.embed(c)`` (then ``c`` may be ``None``).

        Returns:
            ``(zbar, log_jac_det)`` of shapes ``(N, dim)`` and ``(N,)``.
        """
        return self(y, c, rev=True, jac=jac, embedding=embedding)

    @torch.no_grad()
    def sample(
        self,
        c: Tensor,
        temperature: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Draw ``z̄ = t⁻¹(v | c)`` with ``v ~ N(0, temperature² I)``: one invariance sample per row.

        Args:
            c: ``(N, *cond_shape)`` activations.
            temperature: Scale of ``v``; finite and ``> 0``.
            generator: Optional ``torch.Generator`` for reproducible samples.

        Returns:
            ``(N, dim)`` codes.
        """
        # finite too: an infinite temperature gave codes of inf and NaN without a word
        check_number(temperature, "temperature", positive=True)
        if generator is not None and not isinstance(generator, torch.Generator):  # an int failed on .device
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}; "
                            "for a seed pass torch.Generator().manual_seed(seed).")
        _check_condition(c)
        v = normal((c.shape[0], self.dim), generator, c.device, self.dtype)
        return self(v * temperature, c, rev=True, jac=False)[0]


def _check_condition(c: Any) -> None:
    """A layer activation the INN can take: a real tensor (a NumPy array failed on ``.to``, a complex
    one was cast with its imaginary part dropped). Integer and boolean layers are cast, as the
    feature cache stores them (float32)."""
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"The condition `c` must be a torch.Tensor of the layer's activations, got "
                        f"{type(c).__name__}; pass torch.as_tensor(c).")
    if c.is_complex():
        raise TypeError(f"The condition `c` is {c.dtype}; the INN takes real activations (pass c.real or c.abs()).")


def factor_sizes_from_scores(
    scores: Mapping[str, float],
    dim: int,
    residual: str = "residual",
    residual_score: float = 1.0,
) -> Dict[str, int]:
    """Split ``dim`` among factors in proportion to ``softmax(scores)`` (docs/method.rst).

    Each named factor gets its score (e.g. the summed covariance of pair members over the total
    variance), the residual gets ``residual_score``. Every factor first gets one dimension; the
    other ``dim - len(scores) - 1`` are shared out as ``softmax · (dim - len(scores) - 1)``, rounded
    by largest remainder, so the sizes sum to ``dim`` and none is empty.

    Args:
        scores: Factor name to score, in the order the factors should appear.
        dim: Total size to split; at least ``len(scores) + 1``.
        residual: Name of the residual factor (appended last).
        residual_score: Score of the residual.

    Returns:
        Ordered ``{name: size}`` including the residual, summing to ``dim``.

    Examples::

        >>> factor_sizes_from_scores({"digit": 2.0, "colour": 0.5}, dim=16)
        {'digit': 9, 'colour': 3, 'residual': 4}
    """
    if not isinstance(residual, str) or not residual:
        raise TypeError(f"`residual` must be a non-empty str naming the residual factor, got {residual!r} "
                        f"({type(residual).__name__}).")
    dim = check_int(dim, "dim")  # 10.0 failed slicing
    if not isinstance(scores, Mapping):
        raise TypeError(f"`scores` must be a mapping {{factor name: score}}, got {type(scores).__name__}.")
    check_factor_names(scores, "scores")
    if residual in scores:
        raise ValueError(f"`scores` must not contain the residual name {residual!r}.")
    names = list(scores) + [residual]
    if dim < len(names):
        raise ValueError(f"`dim`={dim} is too small for {len(names)} factors (one dimension each).")
    for name, score in (*((f"scores[{n!r}]", v) for n, v in scores.items()), ("residual_score", residual_score)):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):  # scores may be negative: any real
            raise TypeError(f"`{name}` must be a number, got {score!r}.")
    values = torch.tensor([float(v) for v in scores.values()] + [float(residual_score)], dtype=torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError(f"`scores` and `residual_score` must be finite, got {dict(scores)} and {residual_score}.")
    share = torch.softmax(values, dim=0) * (dim - len(names))  # one dimension each is reserved
    sizes = share.floor().long() + 1
    remainder = (share - share.floor()).tolist()
    order = sorted(range(len(names)), key=lambda i: -remainder[i])
    for i in order[: dim - int(sizes.sum())]:
        sizes[i] += 1
    return {name: int(size) for name, size in zip(names, sizes)}


class _Factors(dict):
    """A plain dict of named factors whose missing key says which names there are."""

    def __missing__(self, name: Any) -> Tensor:
        raise KeyError(f"No factor named {name!r}; the factors are {list(self)}.")


class FactorINN(InvertibleModule):
    """``e``: an unconditional bijection whose output is split into named factors plus a residual.

    The output ``(e_1, …, e_K, e_res)`` is laid out in the order of ``factor_sizes``, the residual
    last. Each factor is standard normal under the pair likelihood of docs/method.rst;
    :meth:`split` and :meth:`merge` convert between the flat output and named factors.

    Args:
        dim: Size of the representation (the code ``z̄`` or a vector layer).
        factor_sizes: ``{name: size}`` of the named factors, in order. A key equal to ``residual``
            fixes the residual's size; otherwise the residual takes what is left (at least 1).
        residual: Name of the residual factor.
        n_blocks: Number of flow blocks.
        hidden: Width of the coupling subnets.
        depth: Hidden layers of the coupling subnets.
        clamp: Bound on each coupling log-scale.
        seed: Seed of the permutations.

    Examples::

        >>> e = FactorINN(8, {"digit": 3, "colour": 2}, n_blocks=2, hidden=32)
        >>> e.factor_sizes
        {'digit': 3, 'colour': 2, 'residual': 3}
        >>> y, logdet = e(torch.randn(4, 8))
        >>> {k: v.shape[1] for k, v in e.split(y).items()}
        {'digit': 3, 'colour': 2, 'residual': 3}
    """

    def __init__(
        self,
        dim: int,
        factor_sizes: Mapping[str, int],
        residual: str = "residual",
        n_blocks: int = 12,
        hidden: int = 512,
        depth: int = 2,
        clamp: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        if not isinstance(residual, str) or not residual:  # 5 saved as "5" by JSON: the file would not load back
            raise TypeError(f"`residual` must be a non-empty str naming the residual factor, got {residual!r} "
                            f"({type(residual).__name__}).")
        if not isinstance(factor_sizes, Mapping) or not factor_sizes:
            raise TypeError(
                "`factor_sizes` must be a non-empty mapping {name: size}; to derive sizes from "
                "concept scores use factor_sizes_from_scores(scores, dim)."
            )
        check_factor_names(factor_sizes, "factor_sizes")
        sizes = {key: check_factor_size(key, size) for key, size in factor_sizes.items()}
        if residual not in sizes:
            sizes[residual] = self.dim - sum(sizes.values())
        else:
            sizes[residual] = sizes.pop(residual)  # residual last
        if sum(sizes.values()) != self.dim or sizes[residual] < 1:
            raise ValueError(
                f"Factor sizes {sizes} must sum to dim={self.dim} with a residual of at least 1."
            )
        self.residual = residual
        self.factor_sizes: Dict[str, int] = sizes
        self.config: Dict[str, Any] = dict(
            dim=self.dim, factor_sizes=dict(sizes), residual=residual, n_blocks=int(n_blocks),
            hidden=int(hidden), depth=int(depth), clamp=check_number(clamp, "clamp", positive=True),
            seed=check_int(seed, "seed"),
        )
        self.flow = SequentialFlow(flow_blocks(self.dim, n_blocks, hidden, depth, 0, clamp, seed))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the INN's weights, in which it takes representations and gives factors."""
        return next(self.parameters()).dtype

    @property
    def is_fitted(self) -> bool:
        """``True`` once the INN has seen data, that is once every ActNorm is initialised (by
        ``fit_concepts``, a loaded checkpoint or a first forward pass on real data).
        :class:`~captum_inn.LayerConcepts` refuses an INN that is not fitted.

        Examples::

            >>> e = FactorINN(8, {"digit": 3}, n_blocks=2, hidden=32)
            >>> e.is_fitted
            False
            >>> _ = e(torch.randn(16, 8))   # initialises ActNorm on this batch
            >>> e.is_fitted
            True
        """
        return _actnorms_initialized(self)

    @property
    def factor_names(self) -> List[str]:
        """Names of all factors, the residual last."""
        return list(self.factor_sizes)

    @property
    def factor_slices(self) -> Dict[str, slice]:
        """``{name: slice}`` into the flat output."""
        slices, start = {}, 0
        for name, size in self.factor_sizes.items():
            slices[name] = slice(start, start + size)
            start += size
        return slices

    def forward(
        self, x: Tensor, c: Optional[Tensor] = None, rev: bool = False, jac: bool = True
    ) -> Tuple[Tensor, Tensor]:
        """Map a representation to the flat factors (or back with ``rev=True``).

        Args:
            x: ``(N, dim)``.
            c: Must be ``None``: the factor INN is unconditional.
            rev: Direction.
            jac: Whether to compute the log-determinant.

        Returns:
            ``(y, log_jac_det)`` of shapes ``(N, dim)`` and ``(N,)``, in the INN's dtype.
        """
        if c is not None:
            raise ValueError("FactorINN is unconditional; call it without `c`.")
        check_vector_batch(x, self.dim)
        check_device(x, self)
        x = x.to(self.dtype)  # a float64 representation into a float32 INN, as ConditionalINN takes it
        return self.flow(x, None, rev=rev, jac=jac)

    def split(self, y: Tensor) -> Dict[str, Tensor]:
        """Named factors ``{name: (N, size)}`` of a flat output ``(N, dim)``; an unknown name's
        ``KeyError`` lists the factors."""
        check_vector_batch(y, self.dim, "y")
        return _Factors((name, y[:, s]) for name, s in self.factor_slices.items())

    def merge(self, factors: Mapping[str, Tensor]) -> Tensor:
        """Inverse of :meth:`split`: ``{name: (N, size)}`` → ``(N, dim)``."""
        missing = [n for n in self.factor_sizes if n not in factors]
        if missing:
            raise ValueError(f"`factors` is missing {missing}; expected keys {self.factor_names}.")
        unknown = [n for n in factors if n not in self.factor_sizes]
        if unknown:  # they would be dropped without a word
            raise ValueError(f"`factors` has keys {unknown} that are not factors of this INN; expected keys "
                             f"{self.factor_names}.")
        batch = None
        for name, size in self.factor_sizes.items():
            factor = factors[name]
            if not isinstance(factor, torch.Tensor) or factor.dim() != 2 or factor.shape[1] != size:
                shape = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
                raise ValueError(f"`factors`[{name!r}] must have shape (N, {size}), got {shape}.")
            if batch is not None and factor.shape[0] != batch[1]:
                raise ValueError(
                    f"The factors must have the same batch size: `factors`[{name!r}] has {factor.shape[0]} rows, "
                    f"`factors`[{batch[0]!r}] has {batch[1]}."
                )
            batch = batch or (name, factor.shape[0])
        return torch.cat([factors[n] for n in self.factor_sizes], dim=1)

    @classmethod
    def from_scores(cls, dim: int, scores: Mapping[str, float], **kwargs: Any) -> FactorINN:
        """Build a factor INN whose sizes come from concept scores (:func:`factor_sizes_from_scores`).

        Args:
            dim: Size of the representation.
            scores: ``{concept: score}``.
            **kwargs: Further arguments of :class:`FactorINN`.

        Returns:
            A :class:`FactorINN`.
        """
        residual = kwargs.get("residual", "residual")
        return cls(dim, factor_sizes_from_scores(scores, dim, residual=residual), **kwargs)


