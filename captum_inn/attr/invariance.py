"""``LayerInvariance``: what a hooked layer is invariant to, as samples and as an input-shaped map."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm  # plain text bars, as the fits'

from captum_inn._captum_compat import (
    LayerAttribution,
    TargetType,
    _format_output,
    _is_tuple,
    log_usage,
)
from captum_inn._random import normal
from captum_inn.attr._common import (
    check_fitted_layer,
    check_image_size,
    check_inn_fitted,
    check_model_weights,
    check_number,
    check_pixel_range,
    check_positive_int,
    check_same_device,
    check_same_weights,
    check_target_count,
    default_rows,
    encode_images,
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
    warn_if_batch_statistics,
    warn_unreachable_model,
)
from captum_inn.autoencoders import check_autoencoder
from captum_inn.capture import eval_mode
from captum_inn.inn import ConditionalINN

__all__ = ["LayerInvariance"]


class LayerInvariance(LayerAttribution):
    r"""Invariances of a layer, recovered by a conditional INN ``t(z̄ | Φ(x))`` (Rombach et al., 2020).

    With ``z = Φ(x)`` the hooked layer's activation and ``z̄ = E(x)`` the autoencoder's code, the
    fitted INN makes ``v = t(z̄ | z)`` standard normal and independent of ``z``: ``v`` holds what
    the layer discarded. Decoding ``D(t⁻¹(v | z))`` for random ``v`` gives images the layer cannot
    tell apart from ``x``; what varies across them is what the layer is invariant to. The model is
    never changed.

    The autoencoder and the INN may compute in another floating dtype than the model (a float64
    model with the float32 networks fitted for it): images go to the encoder in its dtype, and
    every image or map returned (samples, reconstructions, transfers, the map) is in the dtype of
    the images given.

    Args:
        forward_func: The analysed model (an ``nn.Module``) or a function that runs it (put the
            model in eval mode yourself unless it is ``model.forward``; see below).
        layer: The hooked layer: a module, or a dotted name such as ``"layer3.1.relu"`` when
            ``forward_func`` is the model or its ``model.forward``.
        inn: The :class:`~captum_inn.inn.ConditionalINN` fitted for this layer
            (:func:`captum_inn.training.fit_invariances`); one that never saw data
            (``inn.is_fitted`` False) is refused.
        autoencoder: The autoencoder the INN was fitted with (``encode``/``decode``).
        device_ids: Captum's argument for ``DataParallel`` models (unused here, kept for the API).
        attribute_to_layer_input: Whether to read the layer's input; ``None`` (default): as the INN
            was fitted (``inn.fit_info["attribute_to_layer_input"]``; the output where unknown).
            The other side than the fit's is refused.
        selector: Picks the tensor from a non-tensor layer output (see :class:`captum_inn.capture.LayerHooks`);
            by default the ``int`` or ``str`` one the INN was fitted with (``inn.fit_info["selector"]``).
        image_input: Which of the (tuple) inputs is the image the autoencoder encodes: an int
            ``>= 0``, checked against the number of inputs at each call; ``None`` (default): where
            the INN's fit put the images (``fit_invariances(..., image_input=1)``), else 0.

    Every method reads the layer with hooks that are removed when the call ends, normally or not,
    and leaves the model's training flags as they were. The model runs in eval mode (batch norm on
    its running statistics, dropout off) whatever its flags, so a batch of one gives what it gives
    in any batch; that needs the model in reach: ``forward_func`` the model itself or its bound
    method (``model.forward``). Behind any other function only the hooked layer is switched, and
    building the explainer warns (``UserWarning``) where that layer is in training mode: call
    ``model.eval()`` first. Batch norm without running statistics (``track_running_stats=False``)
    uses each batch's own in eval mode too, so there the batch matters; building the explainer
    warns. Inputs must be on the device of the fitted INN.

    Examples::

        >>> from captum_inn.models import SmallCNN
        >>> from captum_inn.autoencoders import ConvAutoencoder
        >>> from captum_inn.inn import ConditionalINN
        >>> model, ae = SmallCNN().eval(), ConvAutoencoder((3, 32, 32), latent_dim=8).eval()
        >>> inn = ConditionalINN(8, (10,), n_blocks=2, hidden=16)
        >>> _ = inn(torch.randn(4, 8), torch.randn(4, 10))          # (normally: fit_invariances)
        >>> explainer = LayerInvariance(model, "logits", inn, ae)
        >>> x = torch.rand(2, 3, 32, 32)
        >>> explainer.attribute(x, n_samples=4).shape                 # invariance map, like x
        torch.Size([2, 3, 32, 32])
        >>> explainer.sample(x, n_samples=5).shape                    # (N, S, C, H, W)
        torch.Size([2, 5, 3, 32, 32])
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: Union[str, nn.Module],
        inn: ConditionalINN,
        autoencoder: Any,
        device_ids: Optional[List[int]] = None,
        *,
        attribute_to_layer_input: Optional[bool] = None,
        selector: Any = None,
        image_input: Optional[int] = None,
    ) -> None:
        if not callable(forward_func):
            raise TypeError(f"`forward_func` must be a model or a callable, got {type(forward_func).__name__}.")
        image_input = fitted_image_input(image_input, getattr(inn, "fit_info", None) or {})
        name, module = resolve_model_layer(forward_func, layer)
        if not isinstance(inn, ConditionalINN):
            raise TypeError(
                f"`inn` must be a captum_inn.inn.ConditionalINN (fitted with fit_invariances), got "
                f"{type(inn).__name__}."
            )
        check_inn_fitted(inn, "inn", "fit_invariances", "load_invariance_inn")
        model = forward_module(forward_func, module)  # the model itself, or the module of model.forward
        check_fitted_layer((getattr(inn, "fit_info", None) or {}).get("layer"), name, model, "inn")
        check_autoencoder(autoencoder)
        latent = getattr(autoencoder, "latent_dim", None)
        if latent is not None and int(latent) != inn.dim:
            raise ValueError(
                f"`inn` transforms codes of size {inn.dim}, but `autoencoder` has latent_dim={latent}; "
                "pass the autoencoder the INN was fitted with."
            )
        check_same_weights(autoencoder, (getattr(inn, "fit_info", None) or {}).get("autoencoder_weights"),
                           "inn", "autoencoder")
        # a retrained model's layer means something else
        fit_info = getattr(inn, "fit_info", None) or {}
        check_model_weights(model, module, fit_info.get("model_weights"), "inn", fit_info.get("model_buffers"))
        super().__init__(forward_func, module, device_ids)
        self.layer_name = name
        self.inn = inn
        self.autoencoder = autoencoder
        self._fitted_on_input = (getattr(inn, "fit_info", None) or {}).get("attribute_to_layer_input")
        self.attribute_to_layer_input = self._check_read(attribute_to_layer_input)
        self.selector = fitted_selector(selector, getattr(inn, "fit_info", None) or {}, "inn", forward_func, name, module)
        self.image_input = image_input
        warn_unreachable_model(forward_func, module, "LayerInvariance")
        warn_if_batch_statistics(forward_module(forward_func, module), "LayerInvariance")

    # ------------------------------------------------------------------ Captum's protocol
    def has_convergence_delta(self) -> bool:
        """``False``: the invariance map has no completeness property to check.

        Examples::

            explainer.has_convergence_delta()    # False
        """
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        """``False``: the map is a spread of samples, not a product with the input.

        Examples::

            explainer.multiplies_by_inputs       # False
        """
        return False

    # ------------------------------------------------------------------ the pieces
    def _check_read(self, attribute_to_layer_input: Optional[bool]) -> bool:
        return layer_side(attribute_to_layer_input, self._fitted_on_input, "inn")

    def _activation(self, inputs: Tuple[Tensor, ...], additional_forward_args: Any,
                    attribute_to_layer_input: Optional[bool] = None, name: str = "inputs") -> Tensor:
        to_input = self.attribute_to_layer_input if attribute_to_layer_input is None else self._check_read(
            attribute_to_layer_input)
        z = layer_activation(self.forward_func, self.layer, inputs, additional_forward_args, to_input, self.selector,
                             name)
        if tuple(z.shape[1:]) != self.inn.cond_shape:
            fitted = (getattr(self.inn, "fit_info", None) or {}).get("layer", "another layer")
            read = f"the input of layer {self.layer_name!r}" if to_input else f"layer {self.layer_name!r}"
            fix = "Fit an INN for this layer."
            if fitted == self.layer_name or self.layer_name.endswith("." + fitted):
                # the same layer: most likely fitted on its input and read at its output, or the reverse
                fix = (f"Was it fitted on the layer's {'output' if to_input else 'input'}? Then pass "
                       f"attribute_to_layer_input={not to_input}; otherwise fit an INN for this layer.")
            raise ValueError(
                f"`inn` was fitted for layer {fitted!r} with activations of shape {self.inn.cond_shape}, "
                f"but {read} gives {tuple(z.shape[1:])}. {fix}"
            )
        return z

    def _code(self, images: Tensor) -> Tensor:
        code = encode_images(self.autoencoder, images)  # the model still sees the images as given
        if code.shape[1] != self.inn.dim:
            raise ValueError(
                f"`autoencoder` gives codes of size {code.shape[1]}, but `inn` was fitted on codes of "
                f"size {self.inn.dim}; pass the autoencoder the INN was fitted with."
            )
        return code

    def _decode(self, code: Tensor, like: Tensor) -> Tensor:
        # codes from the INN (float32) go to the decoder in its own dtype (a float64 autoencoder);
        # the images come back in the dtype of the images given (`like`), the model's
        return self.autoencoder.decode(code.to(network_dtype(self.autoencoder, code.dtype))).to(like.dtype)

    def _check_images(self, images: Tensor) -> None:
        """Images the autoencoder can take: its size (samples never encode the input, so a model
        that accepts any size would otherwise give maps of the autoencoder's size, silently) and,
        for a decoder to [0, 1], a warning for pixels far outside [0, 1] (normalised or 8-bit)."""
        check_image_size(images, self.autoencoder)
        check_pixel_range(images, "inputs", self.autoencoder, margin=0.5)

    def _chunks(self, n: int, size: Optional[int]) -> List[slice]:
        size = n if size is None else check_positive_int(size, "internal_batch_size")
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    # ------------------------------------------------------------------ public methods
    @torch.no_grad()
    def invariances(self, inputs: Union[Tensor, Tuple[Tensor, ...]], additional_forward_args: Any = None) -> Tensor:
        """``v = t(E(x) | Φ(x))``: the part of each input's code that the layer discards.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple whose ``image_input`` entry is the image).
            additional_forward_args: Extra arguments of ``forward_func``.

        Returns:
            ``(N, d)``.

        Examples::

            # explainer and x = torch.rand(2, 3, 32, 32) as in the class example
            v = explainer.invariances(x)         # (2, d): d = the autoencoder's latent_dim
        """
        inputs = format_inputs(inputs, self.image_input)
        check_same_device(inputs[self.image_input], self.inn)
        self._check_images(inputs[self.image_input])
        with eval_mode(self.inn, self.autoencoder):
            z = self._activation(inputs, additional_forward_args)
            return self.inn(self._code(inputs[self.image_input]).to(self.inn.dtype), z, jac=False)[0]

    @torch.no_grad()
    def reconstruct(self, inputs: Union[Tensor, Tuple[Tensor, ...]]) -> Tensor:
        """``D(E(x))``: the autoencoder's reconstruction, the reference for every sample.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple, see ``image_input``).

        Returns:
            ``(N, C, H, W)``.

        Examples::

            x_hat = explainer.reconstruct(x)     # (2, 3, 32, 32), like x
        """
        inputs = format_inputs(inputs, self.image_input)
        self._check_images(inputs[self.image_input])
        return self._reconstruct(inputs[self.image_input])

    @torch.no_grad()
    def _reconstruct(self, images: Tensor) -> Tensor:
        """:meth:`reconstruct` of images already checked (compare_attributions' chunks: the pixel-range
        warning, which quotes each chunk's range, came once per chunk)."""
        with eval_mode(self.autoencoder):
            return self._decode(self._code(images), images)

    @torch.no_grad()
    def transfer(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        donors: Union[Tensor, Tuple[Tensor, ...]],
        additional_forward_args: Any = None,
    ) -> Tensor:
        """Keep the layer's view of ``donors`` and the invariances of ``inputs``.

        ``D(t⁻¹(t(E(x) | Φ(x)) | Φ(donor)))``: the network sees (at this layer) the donor, the
        picture keeps the input's nuisances (docs/method.rst, mixing).

        Args:
            inputs: ``(N, C, H, W)`` images whose invariances are kept.
            donors: ``(N, C, H, W)`` images whose layer representation is kept.
            additional_forward_args: Extra arguments of ``forward_func`` (same for both).

        Returns:
            ``(N, C, H, W)``.

        Examples::

            # x[1]'s nuisances, as the layer sees x[0]
            mixed = explainer.transfer(x[1:], donors=x[:1])   # (1, 3, 32, 32)
        """
        v = self.invariances(inputs, additional_forward_args)
        donors = format_inputs(donors, self.image_input, name="donors")
        check_same_device(donors[self.image_input], self.inn, "donors")
        # the model sees the donors as it sees the inputs: on the autoencoder's scale
        check_pixel_range(donors[self.image_input], "donors", self.autoencoder, margin=0.5)
        if donors[0].shape[0] != v.shape[0]:
            raise ValueError(f"`donors` needs one image per input ({v.shape[0]}), got {donors[0].shape[0]}.")
        with eval_mode(self.inn, self.autoencoder):
            z = self._activation(donors, additional_forward_args, name="donors")
            return self._decode(self.inn(v, z, rev=True, jac=False)[0], donors[self.image_input])

    @torch.no_grad()
    def sample(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        n_samples: int = 8,
        temperature: float = 1.0,
        additional_forward_args: Any = None,
        internal_batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        attribute_to_layer_input: Optional[bool] = None,
        shared_noise: bool = False,
        seed: Optional[int] = None,
        show_progress: bool = False,
    ) -> Tensor:
        """Invariance samples ``D(t⁻¹(v | Φ(x)))``, ``v ~ N(0, temperature² I)``.

        What stays fixed across a row is what the layer encodes; what varies is what it ignores.

        Args:
            inputs: ``(N, C, H, W)`` images (or a tuple, see ``image_input``).
            n_samples: Samples per input ``S >= 1``.
            temperature: Scale of ``v`` (``> 0``; below 1 gives more typical samples).
            additional_forward_args: Extra arguments of ``forward_func``. A tensor with one row per
                input is split with the inputs; any other value goes whole to every pass (so a
                shared tensor should not have ``N`` rows: pass it as a 0-d tensor or bind it).
            internal_batch_size: Samples decoded per pass (results equal the unbatched run up to float
                rounding). ``None``: as many as hold 2**24 pixel values (341 images of 3×128×128), which
                keeps memory to a GB or two; all ``N · S`` at once took 16 GB for 256 such images.
            generator: ``torch.Generator`` for reproducible samples.
            attribute_to_layer_input: Override the constructor's choice.
            shared_noise: Use the same ``S`` draws of ``v`` for every input (common random
                numbers): an input's samples then do not depend on the other inputs of the call
                or on its position among them (:meth:`attribute` does this). ``False``: fresh
                draws per input.
            seed: Draw ``v`` from a generator seeded with ``seed`` (on the inputs' device),
                instead of ``generator``: the same samples in every call.
            show_progress: Show a progress bar over the samples (Captum's name for it, off by default).

        Returns:
            ``(N, S, C, H, W)``.

        Examples::

            g = torch.Generator().manual_seed(0)
            samples = explainer.sample(x, n_samples=5, generator=g)   # (2, 5, 3, 32, 32)
            samples = explainer.sample(x, n_samples=5, seed=0)        # the same in every call
        """
        n_samples = check_positive_int(n_samples, "n_samples")
        out: List[Tensor] = []  # filled part by part: the samples and one part in memory, not the parts and their cat

        def keep(part: slice, n: int, images: Tensor) -> None:
            if not out:
                out.append(images.new_empty((n * n_samples, *images.shape[1:])))
            out[0][part.start * n_samples : part.stop * n_samples] = images

        formatted = format_inputs(inputs, self.image_input)
        self._sample(formatted, n_samples, temperature, additional_forward_args, internal_batch_size, generator,
                     attribute_to_layer_input, shared_noise, seed, keep, show_progress)
        return out[0].view(formatted[0].shape[0], n_samples, *out[0].shape[1:])

    @torch.no_grad()
    def _sample(self, inputs: Tuple[Tensor, ...], n_samples: int, temperature: float, additional_forward_args: Any,
                internal_batch_size: Optional[int], generator: Optional[torch.Generator],
                attribute_to_layer_input: Optional[bool], shared_noise: bool, seed: Optional[int],
                consume: Callable[[slice, int, Tensor], None], show_progress: bool = False) -> None:
        """:meth:`sample` of inputs from ``format_inputs`` (:meth:`attribute`
        checked its inputs already: a second check scanned them for NaN again); it checks the numbers.

        Each part of the inputs (``internal_batch_size // n_samples`` of them, at least one) goes to
        ``consume(part, N, samples)`` as soon as it is decoded, ``samples`` ``(len(part) * S, C, H, W)``,
        so a caller that reduces them (:meth:`attribute`) never holds all ``N * S`` images."""
        temperature = check_number(temperature, "temperature", positive=True)
        if internal_batch_size is not None:  # before the division below turns a bad one into a raw error
            internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        else:
            internal_batch_size = default_rows(inputs[self.image_input])
        generator = seeded_generator(seed, generator, inputs[self.image_input].device)
        check_same_device(inputs[self.image_input], self.inn)
        self._check_images(inputs[self.image_input])
        n = inputs[0].shape[0]
        device = inputs[self.image_input].device
        dtype = self.inn.dtype  # v lives in the INN's space, whatever the images' dtype
        # All noise is drawn up front, so any internal_batch_size gives the same samples.
        if shared_noise:  # sample s of every input gets draw s
            noise = normal((n_samples, self.inn.dim), generator, device, dtype) * float(temperature)
        else:
            noise = normal((n * n_samples, self.inn.dim), generator, device, dtype) * float(temperature)
        with eval_mode(self.inn, self.autoencoder), tqdm(total=n * n_samples, desc="invariance samples", unit="sample",
                                                         leave=False, disable=not show_progress) as bar:
            for part in self._chunks(n, max(1, internal_batch_size // n_samples)):
                chunk = tuple(t[part] for t in inputs)
                extra = slice_forward_args(additional_forward_args, part, n)
                z = self._activation(chunk, extra, attribute_to_layer_input)
                embedding = self.inn.embed(z).repeat_interleave(n_samples, dim=0)
                count = part.stop - part.start
                part_noise = noise.repeat(count, 1) if shared_noise else noise[part.start * n_samples : part.stop * n_samples]
                decoded = [self._decode(self.inn(part_noise[sub], None, rev=True, jac=False, embedding=embedding[sub])[0],
                                        inputs[self.image_input])
                           for sub in self._chunks(count * n_samples, internal_batch_size)]
                if part.start == 0:  # any autoencoder
                    check_image_size(inputs[self.image_input], self.autoencoder, decoded=decoded[0].shape[1:])
                samples = decoded[0] if len(decoded) == 1 else torch.cat(decoded)
                if not bool(torch.isfinite(samples).all()):  # temperature=1e40 gave an infinite map, silently
                    raise ValueError(
                        f"The invariance samples hold NaN or infinite values (temperature={temperature:g}): the INN's "
                        "inverse or the decoder overflowed. Sample at a temperature near 1 (it scales v ~ N(0, I)).")
                consume(part, n, samples)
                bar.update(count * n_samples)

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        target: TargetType = None,
        additional_forward_args: Any = None,
        n_samples: int = 16,
        temperature: float = 1.0,
        internal_batch_size: Optional[int] = None,
        attribute_to_layer_input: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        show_progress: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, ...]]:
        """The invariance map: how much each pixel varies across the layer's invariance samples.

        The per-pixel, per-channel standard deviation of ``n_samples`` samples of
        :meth:`sample`. High values: the layer is invariant to that pixel's content; low values:
        the layer pins it down. The map has the input's shape, so Captum's
        ``visualize_image_attr`` shows it as it shows Grad-CAM or Integrated Gradients.

        The map is a Monte-Carlo estimate: for Gaussian samples, a standard deviation from ``S``
        samples is off by about ``1 / sqrt(2 (S - 1))`` of itself (18% at 16 samples). Every input of a call gets
        the same ``S`` draws of ``v`` (common random numbers), so an input's map does not depend on
        the rest of the batch, and two inputs' maps differ only where the inputs do. With ``seed``
        every call draws the same ``v``: then Captum's perturbation tools (``sensitivity_max``,
        ``NoiseTunnel``, ``FeatureAblation``) see how the map changes with the input, not the
        sampling noise of separate calls.

        Args:
            inputs: ``(N, C, H, W)`` images, or a tuple of tensors whose ``image_input`` entry is the image.
            target: Accepted for Captum compatibility (every ``TargetType`` form) and not used:
                the map describes the layer, not one output. A list of another length than the
                inputs, a tensor of neither 1 nor that many entries (Captum's rule), a float tensor
                or another type (a NumPy array) is refused.
            additional_forward_args: Extra arguments of ``forward_func``. A tensor with one row per
                input is split with the inputs; any other value goes whole to every pass (so a
                shared tensor should not have ``N`` rows: pass it as a 0-d tensor or bind it).
            n_samples: Samples per input (``>= 2``).
            temperature: Scale of the invariances ``v`` (``> 0``).
            internal_batch_size: Samples decoded per pass; the result equals the unbatched run up to float
                rounding. ``None``: as many as hold 2**24 pixel values (341 images of 3×128×128).
            attribute_to_layer_input: Override the constructor's choice.
            generator: ``torch.Generator`` for a reproducible map (its state advances).
            seed: Draw ``v`` from a generator seeded with ``seed`` in every call (on the inputs'
                device), instead of ``generator``.
            show_progress: Show a progress bar over the samples (Captum's name for it, off by default).

        Returns:
            ``(N, C, H, W)`` (tensor in) or a tuple mirroring the inputs, with the map at
            ``image_input`` and zeros elsewhere (tuple or list in).

        Examples::

            inv_map = explainer.attribute(x, n_samples=16)   # (2, 3, 32, 32), like x
            from captum.attr import visualization as viz
            viz.visualize_image_attr(inv_map[0].permute(1, 2, 0).numpy(), sign="absolute_value")
            from captum.metrics import sensitivity_max
            sensitivity_max(explainer.attribute, x, seed=0)   # the same v in every call
        """
        # format_inputs accepts a list of tensors too; it comes back as a tuple (Captum's
        # _format_output would otherwise fail an internal assert on a list of several tensors).
        is_tuple = _is_tuple(inputs) or isinstance(inputs, list)
        n_samples = check_positive_int(n_samples, "n_samples")
        if n_samples < 2:
            raise ValueError(f"`n_samples` must be >= 2 for a spread, got {n_samples}.")
        formatted = format_inputs(inputs, self.image_input)
        # unused, but a wrong count is a caller's mistake
        check_target_count(target, formatted[0].shape[0], formatted[self.image_input].device, takes_baselines=False)
        maps: List[Tensor] = []  # each part's spread as it is decoded: never all N * S samples in memory

        def spread_of(part: slice, n: int, images: Tensor) -> None:
            if not maps:
                maps.append(images.new_empty((n, *images.shape[1:])))
            maps[0][part] = images.view(-1, n_samples, *images.shape[1:]).std(dim=1)

        self._sample(formatted, n_samples, temperature, additional_forward_args, internal_batch_size, generator,
                     attribute_to_layer_input, True, seed, spread_of, show_progress)
        spread = maps[0]
        result = tuple(
            spread if i == self.image_input else torch.zeros_like(t) for i, t in enumerate(formatted)
        )
        return _format_output(is_tuple, result)
