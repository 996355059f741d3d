"""``LayerConcepts``: a representation split into named concepts that can be scored, measured and edited."""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars, as the fits'

from captum_inn._captum_compat import (
    SUPPORTED_METHODS,
    GradientAttribution,
    LayerAttribution,
    TargetType,
    _format_additional_forward_args,
    _select_targets,
    log_usage,
)
from captum_inn._random import normal
from captum_inn.attr._common import (
    autograd_on,
    check_fitted_layer,
    check_inn_fitted,
    check_model_weights,
    check_per_input_args,
    check_pixel_range,
    check_positive_int,
    check_same_device,
    check_same_weights,
    check_target_count,
    default_gradient_rows,
    default_rows,
    dtype_errors_named,
    encode_images,
    eval_owner,
    fitted_image_input,
    fitted_selector,
    format_inputs,
    forward_module,
    layer_activation,
    layer_side,
    network_dtype,
    resolve_model_layer,
    seeded_generator,
    slice_forward_args,
    slice_target,
    user_stacklevel,
    warn_if_batch_statistics,
    warn_unreachable_model,
)
from captum_inn.autoencoders import check_autoencoder, encode_mean
from captum_inn.capture import check_autograd_weights, eager_module, eval_mode, replace_activation
from captum_inn.inn import ConditionalINN, FactorINN

__all__ = ["LayerConcepts", "EncodedShares"]


def _output_tensor(output: Any) -> Tensor:
    """``forward_func``'s output where Integrated Gradients picks a target from it: a tensor. A dict,
    tuple or dataclass is a ``TypeError`` naming the fix (Captum would fail on ``output.shape``)."""
    if isinstance(output, Tensor) and output.dim() == 0:  # Captum would fail indexing it (IndexError)
        raise TypeError(
            "`forward_func` returns one number for the whole batch, but concept attributions need an output per "
            "input, (N,) or (N, K): return per-input scores (e.g. the losses before their sum or mean)."
        )
    if isinstance(output, Tensor):
        return output
    keys = f" with keys {list(output)}" if isinstance(output, dict) else ""
    raise TypeError(
        f"`forward_func` returns a {type(output).__name__}{keys}, but concept attributions pick `target` from a "
        "tensor: pass a forward_func that returns the logits, e.g. lambda x: model(x)['logits'] with the layer "
        "given as a module, or an nn.Module wrapper (its layer names take the attribute's prefix)."
    )


class EncodedShares(dict):
    """``{concept: mean share}`` over inputs, with each mean's standard error alongside.

    What :meth:`~captum_inn.LayerConcepts.encoded_summary` returns: a plain ``dict`` of floats
    (JSON-ready, as before), plus ``standard_error``, ``{concept: std / sqrt(N)}`` of the
    per-input shares (NaN for one input). It covers both the spread over inputs and the
    Monte-Carlo noise of the samples, so two shares that differ by less than about twice their
    errors are not told apart.

    Attributes:
        standard_error: ``{concept: standard error of the mean}``.
        n_inputs: Number of inputs averaged.

    Examples::

        >>> shares = EncodedShares({"digit": 0.8, "colour": 0.1}, {"digit": 0.02, "colour": 0.03}, 50)
        >>> shares["digit"], shares.standard_error["digit"], shares.n_inputs
        (0.8, 0.02, 50)
        >>> print(shares)
        digit 0.800 ± 0.020, colour 0.100 ± 0.030 (50 inputs)
    """

    def __init__(self, shares: Dict[str, float], standard_error: Dict[str, float], n_inputs: int) -> None:
        super().__init__(shares)
        self.standard_error = dict(standard_error)
        self.n_inputs = int(n_inputs)

    @classmethod
    def from_per_input(cls, names: List[str], per_input: Tensor) -> EncodedShares:
        """From an ``(N, K)`` tensor of per-input shares (columns in ``names`` order)."""
        n = per_input.shape[0]
        mean = per_input.mean(0)
        error = per_input.std(0) / n ** 0.5 if n > 1 else torch.full_like(mean, float("nan"))
        return cls({k: float(m) for k, m in zip(names, mean)}, {k: float(e) for k, e in zip(names, error)}, n)

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:.3f} ± {self.standard_error.get(k, float('nan')):.3f}" for k, v in self.items())
        return f"{parts} ({self.n_inputs} inputs)"

_CODE, _LAYER = "autoencoder_code", "layer"


def _check_code_autoencoder(concept_inn: FactorINN, autoencoder: Any) -> None:
    """``ValueError`` unless ``concept_inn`` acts on codes of ``autoencoder``, the one it was fitted with.

    Raises:
        ValueError: ``concept_inn`` was fitted on a layer, or ``autoencoder`` is missing, of another
            code size, or has other weights than the one ``concept_inn`` was fitted with.
    """
    representation = (getattr(concept_inn, "fit_info", None) or {}).get("representation", {"kind": _CODE})
    if representation.get("kind", _CODE) != _CODE:
        raise ValueError(
            f"`concept_inn` was fitted on layer {representation.get('layer')!r} of a model, not on autoencoder codes; "
            "fit it on the codes: fit_concepts(autoencoder, concepts)."
        )
    if autoencoder is None:
        raise ValueError("`autoencoder` is needed: `concept_inn` acts on autoencoder codes.")
    check_autoencoder(autoencoder)
    latent = getattr(autoencoder, "latent_dim", None)
    if latent is not None and int(latent) != concept_inn.dim:
        raise ValueError(
            f"`concept_inn` acts on codes of size {concept_inn.dim}, but `autoencoder` has "
            f"latent_dim={latent}; pass the autoencoder it was fitted with."
        )
    check_same_weights(autoencoder, representation.get("weights"), "concept_inn", "autoencoder")


class LayerConcepts(LayerAttribution, GradientAttribution):
    r"""Named concepts of a representation, found by the factor INN ``e`` (Esser et al., 2020).

    ``e`` maps a representation to factors ``(e_1, …, e_K, e_res)``, one per concept and a residual
    (:func:`captum_inn.training.fit_concepts`). The representation is either the autoencoder code
    ``z̄`` (the default: factors decode to images, so concepts can be edited and attributed through
    the model) or the hooked vector layer itself (the IIN setting: the model's output through
    ``e⁻¹(e(z))`` equals its output through ``z``). With the layer's invariance INN ``t``,
    :meth:`encoded` measures how much of each concept the layer fixes at each input.

    The autoencoder and the INNs may compute in another floating dtype than the model (a float64
    model with the float32 networks fitted for it): images go to the encoder in its dtype, and
    decoded images (edits, and what the model sees for code representations) come back in the
    dtype of the images given.

    Args:
        forward_func: The analysed model (an ``nn.Module``) or a function that runs it (put the
            model in eval mode yourself unless it is ``model.forward``; see below).
        layer: The hooked layer (module or dotted name); with a layer-fitted ``concept_inn`` the
            layer that ``e`` acts on.
        concept_inn: The :class:`~captum_inn.inn.FactorINN` from ``fit_concepts``; INNs that never
            saw data (``is_fitted`` False) are refused, here and for ``invariance_inn``.
        autoencoder: The autoencoder whose code ``e`` acts on (needed unless ``e`` acts on the layer).
        invariance_inn: The layer's :class:`~captum_inn.inn.ConditionalINN` from
            ``fit_invariances`` (needed by :meth:`encoded`, which takes a ``concept_inn`` on
            autoencoder codes, not one fitted on the layer).
        device_ids: Captum's argument for ``DataParallel`` models (unused, kept for the API).
        attribute_to_layer_input: Whether to read the layer's input; ``None`` (default): the side the
            INN that reads the layer was fitted on (``concept_inn`` for a layer representation,
            else ``invariance_inn``; the output where unknown). The other side is refused.
        selector: Picks the tensor from a non-tensor layer output; by default the ``int`` or ``str``
            one the INN that reads the layer was fitted with (as for ``attribute_to_layer_input``).
        image_input: Which of the (tuple) inputs is the image: an int ``>= 0``, checked against
            the number of inputs at each call; ``None`` (default): where ``invariance_inn``'s fit put
            the images (``fit_invariances(..., image_input=1)``), else 0.

    Every method reads the layer with hooks that are removed when the call ends, normally or not,
    and leaves the model's training flags as they were. Every method runs the model in eval mode
    (batch norm with its running statistics, which are never updated; dropout off), also
    :meth:`attribute`'s backward passes; that needs the model in reach: ``forward_func`` the model
    itself or its bound method (``model.forward``). Behind any other function only the hooked layer
    is switched, and building the explainer warns (``UserWarning``) where that layer is in training
    mode: call ``model.eval()`` first.
    Inputs must be on the device of the fitted INN.

    Examples::

        >>> from captum_inn.models import SmallCNN
        >>> from captum_inn.autoencoders import ConvAutoencoder
        >>> from captum_inn.inn import FactorINN
        >>> model, ae = SmallCNN().eval(), ConvAutoencoder((3, 32, 32), latent_dim=8).eval()
        >>> e = FactorINN(8, {"digit": 3, "colour": 2}, n_blocks=2, hidden=16)
        >>> _ = e(torch.randn(16, 8))                                  # (normally: fit_concepts)
        >>> concepts = LayerConcepts(model, "logits", e, ae)
        >>> x = torch.rand(2, 3, 32, 32)
        >>> concepts.attribute(x, target=3).shape                      # one score per concept
        torch.Size([2, 3])
        >>> concepts.edit(x, "colour").shape                           # images, colour resampled
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Union[str, nn.Module],
        concept_inn: FactorINN,
        autoencoder: Any = None,
        invariance_inn: Optional[ConditionalINN] = None,
        device_ids: Optional[List[int]] = None,
        *,
        attribute_to_layer_input: Optional[bool] = None,
        selector: Any = None,
        image_input: Optional[int] = None,
    ) -> None:
        if not callable(forward_func):
            raise TypeError(f"`forward_func` must be a model or a callable, got {type(forward_func).__name__}.")
        image_input = fitted_image_input(image_input, getattr(invariance_inn, "fit_info", None) or {})
        name, module = resolve_model_layer(forward_func, layer)
        model = forward_module(forward_func, module)  # the model itself, or the module of model.forward
        if not isinstance(concept_inn, FactorINN):
            raise TypeError(f"`concept_inn` must be a captum_inn.inn.FactorINN (from fit_concepts), got {type(concept_inn).__name__}.")
        check_inn_fitted(concept_inn, "concept_inn", "fit_concepts", "load_concept_inn")
        representation = (getattr(concept_inn, "fit_info", None) or {}).get("representation", {"kind": _CODE})
        self.representation = representation.get("kind", _CODE)
        if self.representation == _LAYER:
            check_fitted_layer(representation.get("layer"), name, model, "concept_inn")
            check_model_weights(model, module, representation.get("weights"), "concept_inn", representation.get("buffers"))
            if autoencoder is not None and invariance_inn is None:  # with invariance_inn: the error below
                warnings.warn(
                    f"`autoencoder` is not used: `concept_inn` acts on layer {representation.get('layer')!r} itself, so "
                    "its factors are read from the layer and nothing is decoded. To edit images or measure shares, fit "
                    "it on the codes, fit_concepts(autoencoder, concepts); otherwise leave `autoencoder` out.",
                    UserWarning, stacklevel=user_stacklevel())
        else:
            _check_code_autoencoder(concept_inn, autoencoder)
            # attribute_to_layer_input=False, Captum's default, is what happens
            unused = [f"`{arg}`" for arg, value in (("attribute_to_layer_input", attribute_to_layer_input or None),
                                                     ("selector", selector)) if value is not None]
            if unused and invariance_inn is None:  # encoded() reads the layer through invariance_inn
                warnings.warn(
                    f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: `concept_inn` acts on the "
                    "autoencoder's codes, and without `invariance_inn` no method reads the layer (attribute and edit "
                    "decode codes and run the model on the images). Leave it out, or pass invariance_inn= for encoded().",
                    UserWarning, stacklevel=user_stacklevel())
        if invariance_inn is not None:
            if not isinstance(invariance_inn, ConditionalINN):
                raise TypeError(f"`invariance_inn` must be a ConditionalINN, got {type(invariance_inn).__name__}.")
            check_inn_fitted(invariance_inn, "invariance_inn", "fit_invariances", "load_invariance_inn")
            if self.representation != _CODE or invariance_inn.dim != concept_inn.dim:
                raise ValueError(
                    f"`invariance_inn` models codes of size {invariance_inn.dim}; `concept_inn` must act on the "
                    f"same autoencoder codes (it acts on a {self.representation} of size {concept_inn.dim})."
                )
            check_fitted_layer((getattr(invariance_inn, "fit_info", None) or {}).get("layer"), name, model,
                               "invariance_inn")
            check_same_weights(autoencoder, (getattr(invariance_inn, "fit_info", None) or {}).get("autoencoder_weights"),
                               "invariance_inn", "autoencoder")
            fit_info = getattr(invariance_inn, "fit_info", None) or {}
            check_model_weights(model, module, fit_info.get("model_weights"), "invariance_inn", fit_info.get("model_buffers"))
        LayerAttribution.__init__(self, forward_func, module, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.layer_name = name
        self.concept_inn = concept_inn
        self.autoencoder = autoencoder
        self.invariance_inn = invariance_inn
        # the INN that reads the layer (e itself on a layer, else t in `encoded`) names the side it was fitted on
        if self.representation == _LAYER:
            self._layer_reader, self._fitted_on_input = "concept_inn", representation.get("attribute_to_layer_input")
        else:
            self._layer_reader = "invariance_inn"
            self._fitted_on_input = (getattr(invariance_inn, "fit_info", None) or {}).get("attribute_to_layer_input")
        self.attribute_to_layer_input = layer_side(attribute_to_layer_input, self._fitted_on_input, self._layer_reader)
        reader_info = representation if self.representation == _LAYER else (getattr(invariance_inn, "fit_info", None) or {})
        self.selector = fitted_selector(selector, reader_info, self._layer_reader, forward_func, name, module)
        self.image_input = image_input
        warn_unreachable_model(forward_func, module, "LayerConcepts")
        warn_if_batch_statistics(forward_module(forward_func, module), "LayerConcepts")

    # ------------------------------------------------------------------ Captum's protocol
    def has_convergence_delta(self) -> bool:
        """``True``: :meth:`attribute` is Integrated Gradients, complete up to the returned delta.

        Examples::

            concepts.has_convergence_delta()     # True: attribute(..., return_convergence_delta=True)
        """
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        """``True``: attributions are multiplied by (factors − baseline), as in Integrated Gradients.

        Examples::

            concepts.multiplies_by_inputs        # True
        """
        return True

    @property
    def concept_names(self) -> List[str]:
        """The factors' names in order, the residual last (the columns of :meth:`attribute`).

        Examples::

            concepts.concept_names               # ['digit', 'colour', 'residual']
        """
        return self.concept_inn.factor_names

    # ------------------------------------------------------------------ the pieces
    def _concept_index(self, concept: Any) -> slice:
        if not isinstance(concept, str) and isinstance(getattr(concept, "name", None), str):
            concept = concept.name  # a captum.concept.Concept or a ConceptPairs
        if concept not in self.concept_inn.factor_sizes:
            # a column number of attribute()'s (N, K) result is the likely mix-up: name its concept
            hint = (f" Concepts are named: column {concept} of attribute() is "
                    f"{self.concept_names[concept]!r}." if isinstance(concept, int) and not isinstance(concept, bool)
                    and -len(self.concept_names) <= concept < len(self.concept_names) else "")
            close = difflib.get_close_matches(concept, self.concept_names, n=1) if isinstance(concept, str) else []
            hint += f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown concept {concept!r}; this concept INN has {self.concept_names}.{hint}")
        return self.concept_inn.factor_slices[concept]

    def _to_input(self, attribute_to_layer_input: Optional[bool]) -> bool:
        if attribute_to_layer_input is None:
            return self.attribute_to_layer_input
        return layer_side(attribute_to_layer_input, self._fitted_on_input, self._layer_reader)

    def _representation(self, inputs: Tuple[Tensor, ...], additional_forward_args: Any,
                        image_input: Optional[int] = None, attribute_to_layer_input: Optional[bool] = None,
                        name: str = "inputs") -> Tensor:
        if self.representation == _LAYER:
            z = layer_activation(self.forward_func, self.layer, inputs, additional_forward_args,
                                 self._to_input(attribute_to_layer_input), self.selector)
            if z.dim() != 2 or z.shape[1] != self.concept_inn.dim:
                raise ValueError(
                    f"Layer {self.layer_name!r} gives activations of shape {tuple(z.shape[1:])}, but `concept_inn` "
                    f"acts on vectors of size {self.concept_inn.dim}."
                )
            return z.to(self._concept_dtype)
        images = inputs[self.image_input if image_input is None else image_input]
        check_pixel_range(images, name, self.autoencoder, margin=0.5)  # as LayerInvariance: normalised pixels
        code = encode_images(self.autoencoder, images)
        if code.shape[1] != self.concept_inn.dim:
            raise ValueError(
                f"`autoencoder` gives codes of size {code.shape[1]}, but `concept_inn` acts on codes of size "
                f"{self.concept_inn.dim}; pass the autoencoder it was fitted with."
            )
        return code.to(self._concept_dtype)

    @property
    def _concept_dtype(self) -> torch.dtype:
        return network_dtype(self.concept_inn, torch.get_default_dtype())

    def _to_representation(self, factors: Tensor) -> Tensor:
        """The layer's activation or the code for ``factors``, in the dtype of the network it goes
        to (a float32 INN's output for a float64 model or autoencoder)."""
        representation = self.concept_inn(factors, rev=True, jac=False)[0]
        network = self.forward_func if self.representation == _LAYER else self.autoencoder
        return representation.to(network_dtype(network, representation.dtype))

    def _check_factors(self, factors: Tensor, n: int, name: str = "factors") -> Tensor:
        if not isinstance(factors, Tensor) or not factors.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor (N, {self.concept_inn.dim}).")
        if factors.dim() == 1:
            factors = factors.unsqueeze(0)
        if factors.dim() != 2 or factors.shape[1] != self.concept_inn.dim or factors.shape[0] not in (1, n):
            raise ValueError(
                f"`{name}` must have shape ({n}, {self.concept_inn.dim}) or ({self.concept_inn.dim},), got {tuple(factors.shape)}."
            )
        if not torch.isfinite(factors).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        return factors.expand(n, -1)

    def _baseline_factors(self, baselines: Any, factors: Tensor, n_inputs: int) -> Tensor:
        """The factor-space baseline of :meth:`attribute` for ``n_inputs`` inputs with ``factors``."""
        if isinstance(baselines, tuple):
            # Captum's tuple form, one baseline per input (NoiseTunnel passes them on so, and checks each
            # against its input): the image input's is the factor-space one; the other inputs are not attributed
            if len(baselines) not in (1, n_inputs):
                raise ValueError(f"`baselines` as a tuple holds one baseline per input ({n_inputs}), got "
                                 f"{len(baselines)}; or pass one factor-space baseline.")
            baselines = baselines[self.image_input if len(baselines) > 1 else 0]
        if baselines is None:
            return torch.zeros_like(factors)  # the prior mean
        if isinstance(baselines, (int, float)) and not isinstance(baselines, bool):
            baselines = torch.full((self.concept_inn.dim,), float(baselines))  # Captum's scalar baseline
        if (isinstance(baselines, Tensor) and baselines.dim() == 0 and not baselines.is_complex()
                and baselines.dtype != torch.bool):  # a scalar tensor, integer too: like the number
            baselines = baselines.to(factors).expand(self.concept_inn.dim)
        if isinstance(baselines, Tensor) and baselines.dim() > 2:
            raise ValueError(
                f"`baselines` are points in factor space, ({factors.shape[0]}, {self.concept_inn.dim}) or "
                f"({self.concept_inn.dim},), got {tuple(baselines.shape)}; for an image baseline pass its factors, "
                "baselines=concepts.factors(image)."
            )
        if isinstance(baselines, Tensor):
            baselines = baselines.to(factors)
        return self._check_factors(baselines, factors.shape[0], "baselines").contiguous()

    # ------------------------------------------------------------------ public methods
    @torch.no_grad()
    def factors(self, inputs: Union[Tensor, Tuple[Tensor, ...]], additional_forward_args: Any = None) -> Tensor:
        """The flat factors ``e(·)`` of the inputs' representation.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple, see ``image_input``).
            additional_forward_args: Extra arguments of ``forward_func`` (layer representations).

        Returns:
            ``(N, d)``; :meth:`decompose` names the blocks.

        Examples::

            # concepts and x = torch.rand(2, 3, 32, 32) as in the class example
            f = concepts.factors(x)              # (2, 8): d = 8 factor dimensions
        """
        return self._factors(format_inputs(inputs, self.image_input), additional_forward_args)

    @torch.no_grad()
    def _factors(self, inputs: Tuple[Tensor, ...], additional_forward_args: Any,
                 attribute_to_layer_input: Optional[bool] = None) -> Tensor:
        check_same_device(inputs[self.image_input], self.concept_inn)
        with eval_mode(self.concept_inn, self.autoencoder):
            representation = self._representation(inputs, additional_forward_args, None, attribute_to_layer_input)
            return self.concept_inn(representation, jac=False)[0]

    def decompose(self, inputs: Union[Tensor, Tuple[Tensor, ...]], additional_forward_args: Any = None) -> Dict[str, Tensor]:
        """The inputs' factors by concept.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple, see ``image_input``).
            additional_forward_args: Extra arguments of ``forward_func`` (layer representations).

        Returns:
            ``{concept: (N, size)}`` in factor order, the residual last.

        Examples::

            parts = concepts.decompose(x)        # {'digit': (2, 3), 'colour': (2, 2), 'residual': (2, 3)}
        """
        return self.concept_inn.split(self.factors(inputs, additional_forward_args))

    @torch.no_grad()
    def edit(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        concept: Any,
        donors: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
    ) -> Tensor:
        """Images with one concept replaced and every other factor kept: ``D(e⁻¹(…))``.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple, see ``image_input``).
            concept: The concept to replace: one of :attr:`concept_names`, or a concept object with
                that ``name`` (``captum.concept.Concept``, :class:`~captum_inn.concepts.ConceptPairs`).
            donors: ``(N, C, H, W)`` (or ``(1, C, H, W)``) images whose ``concept`` factor is taken,
                or a tuple shaped like ``inputs`` (its ``image_input`` entry is used).
            value: ``(N, size)``, ``(1, size)`` or ``(size,)`` factor values to put in instead.
            generator: Seeds a fresh draw ``N(0, I)`` when neither ``donors`` nor ``value`` is given.
            seed: Draw from a generator seeded with ``seed`` (on the inputs' device) instead of
                ``generator``: the same draw in every call, as :meth:`LayerInvariance.sample
                <captum_inn.LayerInvariance.sample>` takes it.

        Returns:
            ``(N, C, H, W)`` decoded edits (re-run the model on them to see what it makes of the edit).

        Examples::

            recoloured = concepts.edit(x, "colour", donors=x[:1])    # (2, 3, 32, 32): x[0]'s colour
            resampled = concepts.edit(x, "colour", seed=0)          # the same draw in every call
        """
        if self.representation != _CODE:
            raise ValueError(
                "`edit` decodes images, which needs a concept INN fitted on autoencoder codes; with a layer "
                "representation use output_from_factors(inputs, factors) on edited factors."
            )
        block = self._concept_index(concept)
        if donors is not None and value is not None:
            raise ValueError("Give at most one of `donors` and `value`.")
        if (donors is not None or value is not None) and (generator is not None or seed is not None):
            # a seed for a draw that is not made: the caller would believe the edit random and reproducible
            raise ValueError(f"`{'generator' if generator is not None else 'seed'}` seeds a fresh draw of the factor, "
                             f"made only without `donors` and `value`; drop it, or drop "
                             f"`{'donors' if donors is not None else 'value'}` to resample the concept.")
        inputs = format_inputs(inputs, self.image_input)
        generator = seeded_generator(seed, generator, inputs[self.image_input].device)
        n = inputs[0].shape[0]
        factors = self.factors(inputs).clone()
        size = block.stop - block.start
        if donors is not None:
            # the donors' images alone: a code representation never runs the model
            index = 0 if isinstance(donors, Tensor) else self.image_input
            donor_images = format_inputs(donors, index, "donors")[index]
            check_same_device(donor_images, self.concept_inn, "donors")
            expected = inputs[self.image_input].shape[1:]
            if donor_images.shape[1:] != expected:  # the autoencoder's or the model's shape error named neither
                raise ValueError(f"`donors` must be images of the inputs' shape (N, {', '.join(map(str, expected))}), "
                                 f"got {tuple(donor_images.shape)}.")
            with eval_mode(self.concept_inn, self.autoencoder):
                donor_code = self._representation((donor_images,), None, image_input=0, name="donors")
                donor_factors = self.concept_inn(donor_code, jac=False)[0]
            if donor_factors.shape[0] not in (1, n):
                count = "1 image" if n == 1 else f"1 or {n} images (one per input)"
                raise ValueError(f"`donors` must hold {count}, got {donor_factors.shape[0]}.")
            new = donor_factors[:, block].expand(n, -1)
        elif value is not None:
            shape_ok = isinstance(value, Tensor) and (
                (value.dim() == 1 and value.shape[0] == size) or (value.dim() == 2 and value.shape[1] == size and value.shape[0] in (1, n)))
            if not shape_ok or not value.is_floating_point():
                got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"`value` for concept {concept!r} must be a floating-point tensor of shape ({n}, {size}), "
                    f"(1, {size}) or ({size},); got {got}."
                )
            if not torch.isfinite(value).all():
                raise ValueError("`value` contains NaN or infinite values.")
            new = value.to(factors).reshape(-1, size).expand(n, -1)
        else:
            new = normal((n, size), generator, factors.device, factors.dtype)
        factors[:, block] = new
        with eval_mode(self.concept_inn, self.autoencoder):
            return self.autoencoder.decode(self._to_representation(factors)).to(inputs[self.image_input].dtype)

    def output_from_factors(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        factors: Optional[Tensor] = None,
        additional_forward_args: Any = None,
    ) -> Any:
        """The model's output when the representation is ``e⁻¹(factors)``.

        With a concept INN on autoencoder codes this is ``forward_func(D(e⁻¹(factors)))``; on a layer
        it runs ``forward_func(inputs)`` with the layer's activation replaced by ``e⁻¹(factors)``.
        With ``factors=None`` the inputs' own factors are used: on a layer that reproduces the
        model's output up to float error, since ``e`` is a bijection.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple).
            factors: ``(N, d)`` factors, e.g. :meth:`factors` of the inputs after an edit.
            additional_forward_args: Extra arguments of ``forward_func``.

        Returns:
            Whatever ``forward_func`` returns, differentiable in ``factors`` (to search factor space
            with gradients; wrap the call in ``torch.no_grad()`` to keep no graph).

        Examples::

            f = concepts.factors(x)                                  # (2, 8)
            f[:, :3] = 0.0                                           # reset the 'digit' block
            logits = concepts.output_from_factors(x, f)              # (2, 10)
        """
        inputs = format_inputs(inputs, self.image_input)
        n = inputs[0].shape[0]
        factors = self.factors(inputs, additional_forward_args) if factors is None else self._check_factors(factors, n)
        return self._forward_from_factors(factors, inputs, additional_forward_args)

    def _forward_from_factors(self, factors: Tensor, inputs: Tuple[Tensor, ...], additional_forward_args: Any,
                              attribute_to_layer_input: Optional[bool] = None) -> Any:
        extra = _format_additional_forward_args(additional_forward_args) or ()
        # the model in eval mode too, as for every layer read: batch norm in training mode would
        # give batch-dependent outputs and overwrite its running statistics
        model = eval_owner(self.forward_func, self.layer)
        with eval_mode(self.concept_inn, self.autoencoder, model):
            representation = self._to_representation(factors)
            if self.representation == _LAYER:
                to_input = self._to_input(attribute_to_layer_input)
                # with the model out of reach (a lambda), the first call of the layer in this one pass, the
                # call the factors were read from (a module used twice keeps its second call)
                with replace_activation(self.layer, representation, to_input, self.selector, model=model, once=True), \
                        dtype_errors_named(inputs[self.image_input], model):
                    return eager_module(self.forward_func)(*inputs, *extra)  # a compiled graph skips the hook
            # decoded images in the dtype of the images given, the model's (a float32 decoder, a float64 model)
            images = self.autoencoder.decode(representation).to(inputs[self.image_input].dtype)
            model_inputs = tuple(images if i == self.image_input else t for i, t in enumerate(inputs))
            with dtype_errors_named(inputs[self.image_input], model):
                return self.forward_func(*model_inputs, *extra)

    @torch.no_grad()
    def encoded(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        n_samples: int = 32,
        additional_forward_args: Any = None,
        generator: Optional[torch.Generator] = None,
        reencode: bool = True,
        internal_batch_size: Optional[int] = None,
        show_progress: bool = False,
        seed: Optional[int] = None,
        reference: Optional[Tensor] = None,
    ) -> Tensor:
        """Share of each concept that the hooked layer fixes at each input (docs/method.rst).

        For ``v ~ N(0, I)``, ``z̄_s = t⁻¹(v | Φ(x))`` are codes the layer cannot tell apart from
        ``x``'s; the share of concept ``k`` the layer encodes is
        ``1 − Σ_d Var_v(e_kd(z̄_s)) / Σ_d Var_x(e_kd)``, the variance over the data ``Var_x`` taken
        from the concept INN's fit (``fit_info["factor_variance"]``; 1, the prior's, if absent) or
        from ``reference`` images. Near 1: the layer pins the concept down; near 0: the layer is
        invariant to it. Estimates from ``n_samples`` draws can fall outside ``[0, 1]``: below 0
        the samples vary the concept more than the data does.

        With ``reencode`` (the default) each sampled code is decoded and encoded again,
        ``E(D(z̄_s))``, before ``e`` reads it: the concept content is read from the images the
        samples stand for, which keeps ``e`` on the codes it was fitted on (sampled codes can lie
        off that set, where ``e``'s factors are not meaningful).

        The reference ``Var_x`` is taken over ``e`` of the fitting pairs' posterior *means*. The
        re-encoded samples are posterior means too (``E(D(·))`` reads the mean), so both sides are
        noise-free codes. With ``reencode=False`` they are not comparable in the same way: ``t`` is
        fitted on posterior samples ``mean + std · ε`` (plus ``code_noise``), so ``Var_v`` also
        counts the autoencoder's posterior noise, which the reference leaves out, and the shares are
        lowered by about the noise's part of each factor's variance (for a ``ConvAutoencoder``
        fitted with the default ``kl_weight`` on 16×16 ColorDigits, d = 16, ``Σ_d E_x[std_d²]`` was
        0.05% of ``Σ_d Var_x(mean_d)``; an autoencoder with a wide posterior can push shares below 0).

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple).
            n_samples: Draws of ``v`` per input (``>= 2``).
            additional_forward_args: Extra arguments of ``forward_func``.
            generator: Seeds the draws.
            reencode: Read the factors from ``E(D(z̄_s))`` instead of ``z̄_s`` (whose variance
                includes the posterior noise, see above).
            internal_batch_size: Samples decoded per pass (the inputs go in parts of
                ``internal_batch_size // n_samples``, at least one); the shares equal one pass's up
                to float rounding. ``None``: as many as hold 2**24 pixel values (341 images of
                3×128×128); all at once took 4 GB for 32 inputs of 128×128 under ResNet-18.
            show_progress: Show a progress bar over the samples (Captum's name for it, off by default).
            seed: Draw from a generator seeded with ``seed`` (on the inputs' device) instead of
                ``generator``: the same shares in every call. Input ``i`` takes the ``i``-th block of
                ``n_samples`` draws, so an input's shares repeat at the same place in a batch (the
                first inputs' alone as in the whole batch), not at another place. Each input has
                draws of its own so that the sampling noise averages out over inputs in
                :meth:`encoded_summary`; draws shared by all inputs would not.
            reference: ``(M, C, H, W)`` images (``M >= 2``, held out from the concept INN's fit)
                whose factors' spread is ``Var_x`` instead of the fit's. A concept INN fitted on a
                few hundred images can learn them: new images' factors, and the re-encoded samples',
                then spread wider than the fit's, and shares fall far below 0 (a warning says so).
                Their factors are read as the samples' are (``E(D(E(x)))`` with ``reencode``).

        Returns:
            ``(N, K)``, columns in :attr:`concept_names` order.

        Examples::

            # needs the layer's invariance INN: LayerConcepts(..., invariance_inn=inn)
            shares = concepts.encoded(x, n_samples=32)               # (2, 3): digit, colour, residual
        """
        if self.representation == _LAYER:  # invariance_inn= is refused for it: the advice below led nowhere
            raise ValueError("`encoded` measures how much of each concept of the autoencoder codes the layer keeps; "
                             "this concept INN acts on the layer itself. Fit one on the codes, "
                             "fit_concepts(autoencoder, ...), and pass it with the layer's invariance_inn=.")
        if self.invariance_inn is None:
            raise ValueError("`encoded` needs the layer's invariance INN: pass `invariance_inn=` (from fit_invariances).")
        n_samples = check_positive_int(n_samples, "n_samples")
        if n_samples < 2:
            raise ValueError(f"`n_samples` must be >= 2 for a variance, got {n_samples}.")
        inputs = format_inputs(inputs, self.image_input)
        generator = seeded_generator(seed, generator, inputs[self.image_input].device)
        check_same_device(inputs[self.image_input], self.invariance_inn)
        check_same_device(inputs[self.image_input], self.concept_inn)
        # the invariance INN was fitted on the layer's view of [0, 1] images, as LayerInvariance warns too
        check_pixel_range(inputs[self.image_input], "inputs", self.autoencoder, margin=0.5)
        rows = (default_rows(inputs[self.image_input]) if internal_batch_size is None
                else check_positive_int(internal_batch_size, "internal_batch_size"))
        reference_variance = None if reference is None else self._reference_variance(
            reference, inputs[self.image_input], reencode, rows)
        n = inputs[0].shape[0]
        # all draws up front, in one call: the shares do not depend on the parts
        v = normal((n * n_samples, self.invariance_inn.dim), generator, inputs[self.image_input].device,
                   self.invariance_inn.dtype)
        step, variances = max(1, rows // n_samples), []
        with tqdm(total=n * n_samples, desc="concept shares", unit="sample", leave=False,
                  disable=not show_progress) as bar:
            for start in range(0, n, step):
                part = slice(start, min(start + step, n))
                z = layer_activation(self.forward_func, self.layer, tuple(t[part] for t in inputs),
                                     slice_forward_args(additional_forward_args, part, n), self.attribute_to_layer_input,
                                     self.selector)
                if tuple(z.shape[1:]) != self.invariance_inn.cond_shape:
                    raise ValueError(
                        f"`invariance_inn` was fitted for activations of shape {self.invariance_inn.cond_shape}, but "
                        f"layer {self.layer_name!r} gives {tuple(z.shape[1:])}."
                    )
                with eval_mode(self.invariance_inn):
                    embedding = self.invariance_inn.embed(z).repeat_interleave(n_samples, dim=0)
                    codes = self.invariance_inn(v[part.start * n_samples : part.stop * n_samples].to(z.device), None,
                                                rev=True, jac=False, embedding=embedding)[0]
                factors = self._code_factors(codes, reencode)
                variances.append(factors.view(part.stop - part.start, n_samples, -1).var(dim=1))
                bar.update((part.stop - part.start) * n_samples)
        variance = torch.cat(variances)
        spread = (self._factor_variance() if reference_variance is None else reference_variance).to(variance)
        shares = torch.stack([1.0 - variance[:, s].sum(1) / spread[s].sum()
                              for s in self.concept_inn.factor_slices.values()], dim=1)
        if reference is None:
            self._warn_if_overfitted(shares)
        return shares

    def _reference_variance(self, reference: Any, images: Tensor, reencode: bool, rows: int) -> Tensor:
        """Per-dimension variance of ``e`` over ``reference`` images, read as :meth:`encoded` reads its samples."""
        if not isinstance(reference, Tensor):
            raise TypeError(f"`reference` must be a tensor of images (M, {', '.join(map(str, images.shape[1:]))}), "
                            f"got {type(reference).__name__}.")
        if reference.shape[1:] != images.shape[1:] or reference.shape[0] < 2:
            raise ValueError(f"`reference` must hold at least 2 images of the inputs' shape (M, "
                             f"{', '.join(map(str, images.shape[1:]))}), got {tuple(reference.shape)}.")
        check_same_device(reference, self.concept_inn, "reference")
        check_pixel_range(reference, "reference", self.autoencoder, margin=0.5)
        factors = []
        for part in reference.split(rows):
            with eval_mode(self.autoencoder):
                codes = encode_images(self.autoencoder, part, name="reference")
            factors.append(self._code_factors(codes, reencode))
        return torch.cat(factors).var(0)

    def _code_factors(self, codes: Tensor, reencode: bool) -> Tensor:
        """``e`` of ``codes``, or of ``E(D(codes))`` with ``reencode`` (samples and reference alike)."""
        if reencode:
            with eval_mode(self.autoencoder):
                images = self.autoencoder.decode(codes.to(network_dtype(self.autoencoder, codes.dtype)))
                codes = encode_mean(self.autoencoder, images)
        with eval_mode(self.concept_inn):
            return self.concept_inn(codes.to(self._concept_dtype), jac=False)[0]

    def _warn_if_overfitted(self, shares: Tensor) -> None:
        """A named concept's shares far below 0 on average: the samples vary its factor over twice as much
        as the fit's data did, which a concept INN that learned its few fitting images does to any new
        image. Not the residual's: on ColorDigits it reads about −2 to −8 in the tutorials, most of it the
        re-encoded samples' detail (docs/pitfalls.rst), so a warning there would be in every run."""
        mean = shares.mean(0)
        low = {name: float(m) for name, m in zip(self.concept_names, mean)
               if m < -1.0 and name != self.concept_inn.residual}
        if low:
            listed = ", ".join(f"{name!r} {m:.2f}" for name, m in low.items())
            warnings.warn(f"Encoded shares average far below 0 ({listed}): the samples vary these factors over twice "
                          "as much as the concept INN's fitting data did. A concept INN fitted on few images spreads "
                          "new images' factors wider than its own; pass held-out images as `reference=` to measure the "
                          "spread on them, or fit it for fewer steps (docs/pitfalls.rst, 'Encoded shares are "
                          "estimates').", stacklevel=user_stacklevel())

    def _factor_variance(self) -> Tensor:
        """Per-dimension variance of ``e`` over the fitting data (1, the prior's, if unknown)."""
        stored = (getattr(self.concept_inn, "fit_info", None) or {}).get("factor_variance")
        return torch.tensor(stored) if stored is not None else torch.ones(self.concept_inn.dim)

    def encoded_summary(self, inputs: Union[Tensor, Tuple[Tensor, ...]], **kwargs: Any) -> EncodedShares:
        """Dataset-level share of each concept the layer encodes: :meth:`encoded` averaged over inputs.

        Args:
            inputs: ``(N, C, H, W)`` images.
            **kwargs: Passed to :meth:`encoded`.

        Returns:
            :class:`~captum_inn.attr.EncodedShares`: ``{concept: share}`` with ``.standard_error``
            ``{concept: standard error of the mean}``.

        Examples::

            summary = concepts.encoded_summary(x, n_samples=32)  # e.g. {'digit': 0.9, 'colour': 0.1, 'residual': 0.4}
            summary.standard_error["digit"]                        # e.g. 0.02: the mean's uncertainty
            print(summary)                                         # digit 0.900 ± 0.020, colour ...
        """
        return EncodedShares.from_per_input(self.concept_names, self.encoded(inputs, **kwargs))

    def _target_error(self, target: TargetType, factors: Tensor, inputs: Tuple[Tensor, ...],
                      additional_forward_args: Any, attribute_to_layer_input: Optional[bool] = None,
                      ) -> Optional[ValueError]:
        """The error naming ``target`` when picking it from the model's output is what fails (not the
        model itself, whose error the caller re-raises): out of range, or not one value per input."""
        try:
            with torch.no_grad():
                output = _output_tensor(self._forward_from_factors(factors, inputs, additional_forward_args,
                                                                   attribute_to_layer_input))
        except Exception:  # noqa: BLE001 - the model's own error: the caller re-raises the original
            return None
        try:
            picked = _select_targets(output, target)
        except (IndexError, RuntimeError, ValueError) as error:
            return ValueError(f"`target` {target!r} is out of range for the model's output ({error}).")
        except AssertionError:  # Captum's words ("Target not provided", N × steps rows) name neither
            picked = None
        if picked is not None and picked.numel() == output.shape[0]:
            return None
        return ValueError(
            f"`target` {target!r} does not pick one value per input from the model's output, of shape "
            f"{tuple(output.shape[1:])} per input: an int picks a column of (N, K) logits, a tuple one entry of "
            "an output with more dimensions (e.g. (1, 3) for (N, 2, 5)), and None an output of one value per input."
        )

    def compute_convergence_delta(
        self,
        attributions: Tensor,
        start_point: Union[None, int, float, Tensor, Tuple[Tensor]],
        end_point: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """Completeness error of concept attributions: their sum minus the change of the target output.

        Captum's method, in this class's spaces: the path starts at a factor-space baseline and ends
        at the inputs' factors, and the output is the model's through ``e⁻¹`` (decoded for code
        representations). :meth:`attribute` with ``return_convergence_delta=True`` returns the same.

        Args:
            attributions: ``(N, K)`` from :meth:`attribute` (or ``(N, d)`` per factor dimension).
            start_point: The factor-space baseline, as ``baselines`` of :meth:`attribute`: ``(N, d)``,
                ``(1, d)``, ``(d,)`` or a number (``None``: the prior mean, zeros).
            end_point: The inputs, ``(N, C, H, W)`` images (or a tuple, see ``image_input``).
            target: The output explained, any of Captum's ``TargetType`` forms.
            additional_forward_args: Extra arguments of ``forward_func``.

        Returns:
            ``(N,)``: ``Σ attributions − (output(inputs) − output(baseline))``.

        Examples::

            scores = concepts.attribute(x, target=3)
            concepts.compute_convergence_delta(scores, None, x, target=3)   # (2,), near 0
        """
        inputs = format_inputs(end_point, self.image_input)
        end = self.factors(inputs, additional_forward_args)
        start = self._baseline_factors(start_point, end, len(inputs))
        if not isinstance(attributions, Tensor) or attributions.shape[0] != end.shape[0]:
            raise ValueError(f"`attributions` must be a tensor with one row per input ({end.shape[0]}).")
        problem = self._target_error(target, end, inputs, additional_forward_args)
        if problem is not None:  # Captum's assertion would name neither the target nor the output's shape
            raise problem
        with torch.no_grad():
            change = [_select_targets(_output_tensor(self._forward_from_factors(f, inputs, additional_forward_args)),
                                      target) for f in (start, end)]
        total = attributions.reshape(end.shape[0], -1).sum(1)
        return total - (change[1] - change[0]).reshape(end.shape[0], -1).sum(1).to(total)

    def _check_gradient_path(self) -> None:
        """Refuse networks with inference-tensor weights on the path :meth:`attribute` differentiates
        (the model, or the hooked layer of a plain ``forward_func``; the autoencoder; the concept INN).

        Raises:
            ValueError: One of them was built or unpickled inside ``torch.inference_mode()``.
        """
        model = forward_module(self.forward_func, self.layer)
        needs = "LayerConcepts.attribute needs gradients through it"
        check_autograd_weights(model if model is not None else self.layer,
                               "the model" if model is not None else "the hooked layer", needs)
        check_autograd_weights(self.autoencoder, "`autoencoder`", needs)
        check_autograd_weights(self.concept_inn, "`concept_inn`", needs)

    @log_usage()
    @autograd_on
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        *,
        additional_forward_args: Any = None,
        baselines: Union[None, int, float, Tensor, Tuple[Tensor]] = None,
        n_steps: int = 512,
        method: str = "riemann_trapezoid",
        internal_batch_size: Optional[int] = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: Optional[bool] = None,
        show_progress: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Concept attributions: Integrated Gradients in factor space, summed per concept.

        The path runs from ``baselines`` (the prior mean, zeros, by default) to the inputs' factors;
        the model sees ``e⁻¹`` of each point (decoded for code representations, in place of the layer
        for layer representations). Captum's :class:`~captum.attr.IntegratedGradients` computes it,
        so the attributions are complete: their sum over concepts equals the change of the target
        output from the baseline's output to the inputs' (reconstructed) output, up to the delta.

        Column ``k`` is also Integrated Gradients with respect to a gate ``g_k`` that scales concept
        ``k``'s block of ``factors − baselines`` (from ``g = 0``, the baseline, to ``g = 1``, the
        inputs): the scores are attributions of the function
        ``g ↦ output_from_factors(inputs, baselines + g·(factors − baselines))`` at ``g = 1``, the
        ``(N, K)`` space where Captum's ``infidelity`` applies to them.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple, see ``image_input``).
            target: The output to explain, any of Captum's ``TargetType`` forms (others, such as
                a float tensor or a NumPy array, are refused with the conversion to make). The arguments
                after it are keyword-only: Integrated Gradients takes ``baselines`` second, so a
                call written for it would otherwise pass its baseline as the target.
            additional_forward_args: Extra arguments of ``forward_func``; Integrated Gradients
                expands their tensors with the inputs, so each needs one row per input (a shared
                value goes as a 0-d tensor or a non-tensor).
            baselines: Factor-space baseline ``(N, d)``, ``(1, d)`` or ``(d,)``, a number or 0-d
                tensor (every factor at that value), or Captum's tuple with one of these per input (the
                entry at ``image_input`` is used; the other inputs are not attributed); for an image
                baseline pass :meth:`factors` of it. Under ``NoiseTunnel`` give ``(1, d)``, or with
                several inputs a tuple of numbers (Captum checks each baseline against its input and
                only lets a batch of one or a number through).
            n_steps: Integration steps. The path runs through the decoder and the model, whose ReLUs
                put kinks on it; Gauss–Legendre quadrature is erratic there (50 steps left up to
                2.6% completeness error on ColorDigits, 200 steps still 2.6%), so the default is
                512 trapezoid steps. The Riemann methods need at least 2.
            method: Captum's integration method. Captum's ``"riemann_trapezoid"`` weights sum to
                ``(n_steps - 1) / n_steps``, which took ``1 / n_steps`` off every attribution; they are
                rescaled here to sum to 1 (the other methods' weights already do).
            internal_batch_size: Path points per forward and backward pass. More inputs than that
                go in parts of ``internal_batch_size`` inputs, one step of each per pass; the
                attributions equal one pass's up to float rounding. ``None``: a quarter of the
                images the other explainers decode per pass, at most 256 (256 of 3×32×32, 85 of
                3×128×128: gradient passes keep every layer's activations, and 256 path points of
                128×128 through ResNet-18 took 5 GB). Unlike Captum's ``None``, not all at once: pass
                ``N * n_steps`` for that.
            return_convergence_delta: Also return the per-input completeness error.
            attribute_to_layer_input: Override the constructor's choice (layer representations:
                read and replace the layer's input rather than its output).
            show_progress: Show a progress bar over the path points (Captum's name for it, as in
                its perturbation methods); 512 steps through a decoder and a large model take minutes.

        Returns:
            ``(N, K)`` attributions (columns :attr:`concept_names`), and with
            ``return_convergence_delta`` the ``(N,)`` delta. One tensor whatever the input format:
            like Captum's layer methods, the result lives in its own space, not the inputs'.
            Captum metrics that expect a tuple back for tuple inputs (``sensitivity_max``
            always passes a tuple) need a one-line adapter:
            ``sensitivity_max(lambda inp, **kw: (concepts.attribute(inp, **kw),), x, target=3)``.

        Examples::

            scores, delta = concepts.attribute(x, target=3, return_convergence_delta=True)
            scores.shape, delta.shape                # (2, 3) per concept, (2,)
            dict(zip(concepts.concept_names, scores[0].tolist()))
        """
        if method not in SUPPORTED_METHODS:  # Captum would fail a bare assert, after the factors are computed
            raise ValueError(f"`method` must be one of {SUPPORTED_METHODS}, got {method!r}.")
        n_steps = check_positive_int(n_steps, "n_steps")  # Captum would fail comparing a str with an int
        if n_steps < 2 and str(method).startswith("riemann"):  # Captum would fail a bare assert
            raise ValueError(f"`n_steps` must be >= 2 for method={method!r} (a Riemann sum over a path), got {n_steps}.")
        if internal_batch_size is not None:
            internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        if attribute_to_layer_input and self.representation != _LAYER:  # False, Captum's default, is what happens
            warnings.warn(
                "`attribute_to_layer_input` is not used: `concept_inn` acts on the autoencoder's codes, and attribute "
                "decodes them and runs the model on the images, so no layer is read or replaced. Leave it out.",
                UserWarning, stacklevel=user_stacklevel())
        inputs = format_inputs(inputs, self.image_input)
        n = inputs[0].shape[0]
        check_target_count(target, n, inputs[self.image_input].device)
        check_per_input_args(additional_forward_args, n)
        self._check_gradient_path()
        # Captum takes at least one step of every input per pass (and warns past internal_batch_size inputs):
        # the inputs go in parts of internal_batch_size, each integrated in passes of at most that many rows
        if internal_batch_size is None:
            internal_batch_size = default_gradient_rows(inputs[self.image_input])
        parts = [slice(i, min(i + internal_batch_size, n)) for i in range(0, n, internal_batch_size)]

        def in_part(part: slice) -> Tuple[Tuple[Tensor, ...], Any]:
            return tuple(t[part] for t in inputs), slice_forward_args(additional_forward_args, part, n)

        start = torch.cat([self._factors(*in_part(part), attribute_to_layer_input) for part in parts])
        base = self._baseline_factors(baselines, start, len(inputs))
        attributions, delta = [], []
        # IG runs n_steps path points per input, and two more for the delta (its start and end)
        with tqdm(total=n * (n_steps + 2), desc="concept attributions", unit="path point", leave=False,
                  disable=not show_progress) as bar:
            for part in parts:
                scores, error = self._integrated_gradients(
                    start[part], base[part], slice_target(target, part, n), *in_part(part), n_steps, method,
                    internal_batch_size, attribute_to_layer_input, bar)
                attributions.append(scores)
                delta.append(error)
        attributions, delta = torch.cat(attributions), torch.cat(delta)
        if method == "riemann_trapezoid":
            # Captum's trapezoid weights (1/n, halved at both ends, on n points from 0 to 1) sum to (n-1)/n, not 1:
            # every attribution came out 1/n short, most of the completeness error at the default steps
            total = attributions.flatten(1).sum(1)
            attributions = attributions * (n_steps / (n_steps - 1))
            delta = delta + (total / (n_steps - 1)).to(delta.dtype)  # sum·n/(n-1) − change, with change = sum − delta
        per_concept = torch.stack([attributions[:, s].sum(1) for s in self.concept_inn.factor_slices.values()], dim=1)
        return (per_concept, delta) if return_convergence_delta else per_concept

    def _integrated_gradients(self, start: Tensor, base: Tensor, target: TargetType, inputs: Tuple[Tensor, ...],
                              additional_forward_args: Any, n_steps: int, method: str,
                              internal_batch_size: Optional[int], attribute_to_layer_input: Optional[bool],
                              bar: tqdm) -> Tuple[Tensor, Tensor]:
        """:meth:`attribute`'s Integrated Gradients for one part of the inputs, from ``base`` to their
        factors ``start``, its errors named; ``bar`` counts the path points through the model."""
        from captum.attr import IntegratedGradients

        extra = _format_additional_forward_args(additional_forward_args) or ()

        def through_factors(factors: Tensor, *rest: Any) -> Any:
            model_inputs, model_extra = rest[: len(inputs)], rest[len(inputs):]
            output = _output_tensor(self._forward_from_factors(factors, tuple(model_inputs), model_extra or None,
                                                               attribute_to_layer_input))
            bar.update(factors.shape[0])
            return output

        try:
            # eval mode over the backward passes too (a model with activation checkpointing reruns its forward)
            with torch.enable_grad(), eval_mode(eval_owner(self.forward_func, self.layer)):
                return IntegratedGradients(through_factors).attribute(
                    start, baselines=base, target=target, additional_forward_args=(*inputs, *extra), n_steps=n_steps,
                    method=method, internal_batch_size=internal_batch_size, return_convergence_delta=True,
                )
        except AssertionError as error:
            if target is None and "Target not provided" in str(error):
                raise ValueError(
                    "`target` is needed: the model gives several outputs per input; pass the class to explain "
                    "(an int, or one per input), e.g. the prediction model(x).argmax(1)."
                ) from None
            problem = self._target_error(target, start, inputs, additional_forward_args, attribute_to_layer_input)
            if problem is None:
                raise
            raise problem from None
        except (IndexError, RuntimeError) as error:
            if "appears to not have been used in the graph" in str(error):  # autograd's words, not the user's
                raise ValueError(
                    f"The representation does not reach the model's output: the tensor read from layer "
                    f"{self.layer_name!r} (selector {self.selector!r}) is not used by what forward_func returns, "
                    "so no concept changes it. Read a tensor the output depends on; or, if it is, the layer runs "
                    "inside a torch.utils.checkpoint segment with use_reentrant=True, whose forward records no "
                    "graph: turn checkpointing off while explaining."
                ) from None
            problem = self._target_error(target, start, inputs, additional_forward_args, attribute_to_layer_input)
            if problem is None:
                raise
            raise problem from None
