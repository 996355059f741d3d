"""Reading any layer of any PyTorch model, safely.

Everything in ``captum_inn`` that needs a layer's activation ``z = Φ(x)`` reads it through this
module. It does three things and promises one:

* :func:`resolve_layer` turns a module object or a dotted name (``"layer3.1.relu"``,
  ``"features.8"``) into ``(name, module)``, with error messages that suggest close names.
* :class:`LayerHooks` is a context manager that hooks one or several layers (their outputs, or
  their inputs with pre-hooks), picks a tensor out of any output type (tensor, tuple, list, dict,
  dataclass) with a *selector*, and clones it so that later in-place operations
  (``nn.ReLU(inplace=True)``) cannot change it.
* :func:`capture` runs one forward pass and returns the captured tensor(s).

The promise (docs/reliability.rst): after any call, normal or failed (including a
``KeyboardInterrupt`` inside the forward pass), no hook is left on the model and every module's
``training`` flag is what it was.

Examples::

    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18()
    >>> x = torch.randn(2, 3, 64, 64)
    >>> z = capture(model, "layer3", x)              # (2, 256, 4, 4)
    >>> zs = capture(model, ["layer1", model.fc], x)  # {"layer1": (2, 64, 16, 16), "fc": (2, 1000)}
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import itertools
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LayerSpec", "Selector", "resolve_layer", "module_names", "LayerHooks", "capture", "eval_mode", "replace_activation"]

#: A layer, given as the module object itself or as its dotted name in ``model.named_modules()``.
LayerSpec = Union[str, nn.Module]

#: Picks one tensor out of a layer's output (or input tuple), given as ``None`` (the default rule),
#: an ``int`` index, a ``str`` key / attribute name, or a callable ``output -> Tensor``.
Selector = Union[None, int, str, Callable[[Any], Tensor]]

_HOW_TO_LIST = "list all names with [n for n, _ in model.named_modules()]"


class _StopForward(BaseException):
    """Raised from a hook to abort the rest of a forward pass (``stop_early=True``).

    A ``BaseException``, like ``GeneratorExit``: a forward's ``except Exception`` fallback must not
    catch it. One that catches it anyway (a bare ``except:``) cannot change the captured values:
    once raised, later calls of the hooked layers in that pass store nothing and raise it again.

    It carries the :class:`LayerHooks` that raised it so that only that instance swallows it; a
    nested ``LayerHooks`` never silences another one's signal. A multi-GPU ``nn.DataParallel``
    would re-raise it from a replica thread as ``_StopForward(message)``, the owner lost, so
    :meth:`LayerHooks.run` never runs one: it calls the wrapped ``.module``.
    """

    def __init__(self, owner: LayerHooks) -> None:
        super().__init__("forward pass stopped early by captum_inn.capture.LayerHooks")
        self.owner = owner


# --------------------------------------------------------------------------------------------
# Resolving layers
# --------------------------------------------------------------------------------------------


def resolve_layer(model: nn.Module, layer: LayerSpec) -> Tuple[str, nn.Module]:
    """Find a layer of ``model`` by module object or dotted name.

    Args:
        model: The model that contains the layer.
        layer: The layer itself (an ``nn.Module`` that is a submodule of ``model``, or ``model``
            itself), or its dotted name as in ``model.named_modules()``, e.g.
            ``"layer3.1.relu"`` or ``"features.8"``. The empty string ``""`` names ``model``.

    Returns:
        ``(name, module)``: the dotted name (for a module given as an object and registered under
        several names, the first one ``named_modules()`` gives; a name is returned as given;
        ``""`` for ``model``) and the module.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, ``layer`` is neither a ``str`` nor an
            ``nn.Module``, or the layer is (inside) a TorchScript module, whose forward runs no hooks.
        ValueError: If ``layer`` is a module that is not part of ``model``, or a name that does
            not exist (the message lists close matches).

    Examples::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten())
        >>> resolve_layer(model, "0")
        ('0', Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1)))
        >>> resolve_layer(model, model[1])[0]
        '1'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_torchscript(model, "model")
    if isinstance(layer, nn.Module):
        _refuse_torchscript(layer, "layer")
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(
            f"the module {type(layer).__name__} passed as layer is not a submodule of the model "
            f"{type(model).__name__} (was it taken from a copy of the model?); pass a module "
            f"of this model or its dotted name ({_HOW_TO_LIST})"
        )
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(_unknown_name_message(model, layer)) from None
        parent = model
        for part in layer.split(".") if layer else ():  # a layer inside a scripted block runs no hooks either
            parent = parent.get_submodule(part)
            _refuse_torchscript(parent, f"layer {layer!r}")
        _warn_if_alias(model, layer)
        return layer, module
    raise TypeError(
        f"layer must be an nn.Module or a dotted name (str) such as 'layer3.1.relu', "
        f"got {type(layer).__name__}: {layer!r}"
    )


def _warn_if_alias(model: nn.Module, layer: str) -> None:
    """Warn when the path ``layer`` passes through a later position of a module that an ``nn.Sequential``
    holds at an earlier one too (one ``nn.ReLU`` at positions 1 and 3): the module runs more than once per
    forward pass and hooks read its first call, so ``"3"`` silently read position 1's activation, and the
    fit recorded ``"3"``. Other second names (``self.act2 = self.act1``) may or may not be called:
    the feature cache runs the model to tell (:func:`module_names`); ``torch.compile``'s ``_orig_mod``
    names no second call."""
    parts = layer.split(".") if layer else []
    parent: Any = model
    for i, part in enumerate(parts):
        if isinstance(parent, nn.Module) and part not in parent._modules:
            parent = _unwrapped(parent)  # a compiled model's "3" is its _orig_mod's
        child = parent._modules.get(part) if isinstance(parent, nn.Module) else None
        if isinstance(parent, nn.Sequential) and child is not None:
            earlier = next(key for key, m in parent._modules.items() if m is child)
            if earlier != part:
                first = ".".join([*parts[:i], earlier, *parts[i + 1:]])
                from captum_inn.attr._common import user_stacklevel  # that module imports this one

                warnings.warn(
                    f"layer {layer!r} is the module at {first!r} too: one module object at two positions of an "
                    "nn.Sequential, so it runs more than once in each forward pass, and hooks read its first call "
                    f"({first!r}), not {layer!r}'s. Give {layer!r} a module of its own (e.g. a second nn.ReLU()).",
                    UserWarning, stacklevel=user_stacklevel(),
                )
                return
        parent = child if child is not None else getattr(parent, part)


def module_names(model: nn.Module, module: nn.Module) -> List[str]:
    """Every name of ``module`` in ``model`` (one module object may be registered under several:
    ``self.backbone = self.body``), in registration order, without the prefixes of wrappers that
    call what they wrap once (``torch.compile``'s ``_orig_mod.``, ``DataParallel``'s ``module.``).

    Examples::

        >>> act = nn.ReLU()
        >>> module_names(nn.Sequential(nn.Linear(2, 2), act, nn.Linear(2, 2), act), act)
        ['1', '3']
    """
    return list(dict.fromkeys(_without_wrappers(name) for name, m in model.named_modules(remove_duplicate=False)
                              if m is module))


def warn_if_run_twice(model: nn.Module, modules: Mapping[str, nn.Module], args: Tuple[Any, ...]) -> None:
    """Warn about each layer whose module runs more than once in one pass of ``model(*args)`` (one
    image is enough): hooks here read its first call, which the fits learn and every explainer
    replaces. For a second name of one module (``self.act2 = self.act1``) that first call may be
    another name's; for a module reused inside a block (torchvision's ``BasicBlock`` calls its
    ``relu`` after ``bn1`` and again on the block's output) Captum's ``LayerActivation`` reads the
    last call, so the two disagree unwarned. The first of several names is not warned about (its
    call is the first). ``modules`` is ``{layer name: module}``."""
    from captum_inn.attr._common import user_stacklevel  # that module imports this one

    calls: Dict[int, int] = {}

    def count(module: nn.Module, _args: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1

    handles = [m.register_forward_pre_hook(count) for m in {id(m): m for m in modules.values()}.values()]
    try:
        with torch.no_grad(), eval_mode(model):
            _unwrapped(model)(*copied_tensors(args))  # a DataParallel's replicas would not be counted
    finally:
        for handle in handles:
            handle.remove()
    for name, module in modules.items():
        n_calls = calls.get(id(module), 0)
        if n_calls < 2:
            continue
        names = module_names(model, module)
        if names[0] != name:
            warnings.warn(
                f"layer {name!r} runs {n_calls} times in each forward pass: it is one module object with the names "
                f"{names}, and its features are those of its first call, whichever name the model calls it by (the "
                f"call as {names[0]!r}, if the model makes that first). Give {name!r} a module of its own (e.g. a "
                "second nn.ReLU()).", UserWarning, stacklevel=user_stacklevel(),
            )
            continue
        if len(names) > 1:  # its first name, and its first call: the one the name asks for
            continue
        parent = name.rpartition(".")[0]
        block = (f" (for a torchvision residual block's relu, the block {parent!r} itself, whose output is its last "
                 "call)") if parent else ""
        warnings.warn(
            f"layer {name!r} runs {n_calls} times in each forward pass; the INN learns its first call, the one every "
            "explainer here reads and replaces, while Captum's LayerActivation and LayerGradCam read its last. If you "
            f"meant a later call, hook a module that runs once there{block}.",
            UserWarning, stacklevel=user_stacklevel(),
        )


def _without_wrappers(name: str) -> str:
    """``name`` without the prefixes of wrappers that call the module they wrap once (``_orig_mod.``,
    ``module.``)."""
    parts = name.split(".") if name else []
    while parts and parts[0] in ("_orig_mod", "module"):
        parts = parts[1:]
    return ".".join(parts)


def _refuse_torchscript(module: nn.Module, what: str) -> None:
    """``TypeError`` for a TorchScript module: its compiled forward never calls Python hooks, so a
    layer in it could not be read (a raw RuntimeError, or "did not run", before)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError(
            f"{what} is (inside) a TorchScript module ({type(module).__name__}, from torch.jit.script or "
            "torch.jit.trace), whose compiled forward does not run forward hooks, so its layers cannot be read; "
            "pass the original nn.Module instead"
        )


def check_autograd_weights(module: Any, name: str, needs: str) -> None:
    """Raise ``ValueError`` if ``module`` (skipped unless an ``nn.Module``) holds inference tensors.

    A module built or unpickled inside ``torch.inference_mode()`` keeps inference tensors as weights,
    and autograd cannot save them for backward; PyTorch's own error ("Inference tensors
    cannot be saved for backward") names neither the module nor the fix. ``needs`` says what needs
    autograd, e.g. "capture(..., grad=True) needs gradients through it".
    """
    if not isinstance(module, nn.Module):
        return
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for tensor_name, tensor in named:
            if not nn.parameter.is_lazy(tensor) and tensor.is_inference():  # a lazy one has no data yet
                raise ValueError(
                    f"{name}'s {kind} {tensor_name!r} is an inference tensor ({name} was built or unpickled "
                    f"inside torch.inference_mode()), and {needs}; autograd cannot use it. Build "
                    "it outside inference mode (torch.no_grad() is enough for evaluation), or use a "
                    "copy.deepcopy of it made outside inference mode (the copy's weights are normal tensors)."
                )


def normal_tensors(value: Any) -> Any:
    """``value`` with each inference tensor in it (or in a tuple or list of it) copied to a normal
    one (a copy of the data: build large datasets outside inference mode); called outside inference
    mode. Everything else, a tuple or list without inference tensors included, is ``value`` itself,
    so that a list the function or a ``forward_func`` fills stays the caller's."""
    if isinstance(value, Tensor):
        return value.clone() if value.is_inference() else value
    if type(value) in (tuple, list):
        items = [normal_tensors(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    return value


def _unknown_name_message(model: nn.Module, name: str) -> str:
    """Build the error message for a layer name that ``model`` does not have."""
    names = [n for n, _ in model.named_modules() if n]
    msg = f"layer {name!r} not found in {type(model).__name__}"
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if matches:
        msg += "; did you mean " + ", ".join(repr(m) for m in matches) + "?"
    # Say where the path stops resolving: "features.20" -> "'features' has children 0..9".
    parts = name.split(".")
    parent, parent_name = model, ""
    for i, part in enumerate(parts[:-1]):
        child = parent._modules.get(part)
        if child is None:
            break
        parent, parent_name = child, ".".join(parts[: i + 1])
    children = list(parent._modules)
    if children:
        shown = ", ".join(children[:10]) + (", ..." if len(children) > 10 else "")
        where = repr(parent_name) if parent_name else "the model"
        msg += f" ({where} has children: {shown})"
    return msg + f"; {_HOW_TO_LIST}"


def _as_layer_list(layers: Union[LayerSpec, Sequence[LayerSpec]]) -> Tuple[List[LayerSpec], bool]:
    """Return ``(list of layers, single)`` where ``single`` says one layer was given bare."""
    if isinstance(layers, (str, nn.Module)):
        return [layers], True
    if isinstance(layers, (list, tuple)):
        if len(layers) == 0:
            raise ValueError("layers is empty; pass a layer (module or dotted name) or a list")
        return list(layers), False
    raise TypeError(
        "layers must be a layer (nn.Module or dotted name) or a list/tuple of layers, "
        f"got {type(layers).__name__}"
    )


# --------------------------------------------------------------------------------------------
# Selecting a tensor from any output type
# --------------------------------------------------------------------------------------------


_SELECTOR_HINT = (
    "pass selector= with an int index, a str key/attribute name, or a callable "
    "output -> tensor (a dict {layer name: selector} sets one per layer)"
)
#: The same for a model's own output (one selector: no per-layer dict).
_OUTPUT_SELECTOR_HINT = "pass selector= with an int index, a str key/attribute name, or a callable output -> tensor"


def check_selector(selector: Any, name: str, model_output: bool = False) -> None:
    """``TypeError`` unless ``selector`` (for layer ``name``, or the model's output) is ``None``, an
    ``int`` (not a bool), a ``str`` or a callable."""
    if isinstance(selector, bool) or not (selector is None or isinstance(selector, (int, str)) or callable(selector)):
        who, hint = _selection_subject(name, model_output)
        raise TypeError(f"{who}: selector must be None, an int, a str or a callable, got {selector!r}; {hint}")


def _selection_subject(name: str, model_output: bool) -> Tuple[str, str]:
    """Who the errors of a selection name, and the hint they give."""
    return ("the model", _OUTPUT_SELECTOR_HINT) if model_output else (f"layer {name!r}", _SELECTOR_HINT)


def _select(
    value: Any, selector: Selector, name: str, what: str, kwargs: Optional[Dict[str, Any]] = None,
    model_output: bool = False,
) -> Tensor:
    """Apply ``selector`` to a layer's output (or input tuple) and check it yields a tensor.

    Args:
        value: The layer output, or the positional-argument tuple for inputs.
        selector: See :data:`Selector`.
        name: The layer name, for error messages.
        what: ``"output"`` or ``"input"``, for error messages.
        kwargs: Keyword arguments of the call (inputs only); a ``str`` selector may name one.
        model_output: ``value`` is the model's own output (``predict_classes``): errors name the
            model, and no per-layer selector.
    """
    check_selector(selector, name, model_output)
    who, hint = _selection_subject(name, model_output)
    if selector is None:
        if isinstance(value, Tensor):
            selected = value
        elif isinstance(value, (tuple, list)) and len(value) == 1:
            selected = value[0]
        else:
            extra = f" (keyword arguments: {sorted(kwargs)})" if kwargs else ""
            raise ValueError(
                f"{who}: cannot pick a tensor from its {what} of type "
                f"{_describe(value)}{extra}; {hint}"
            )
    elif callable(selector) and not isinstance(selector, (int, str)):
        selected = selector(value)
    elif isinstance(selector, int):
        if not isinstance(value, (tuple, list)):
            raise ValueError(
                f"{who}: int selector {selector} needs a tuple/list {what}, got "
                f"{_describe(value)}; {hint}"
            )
        if not -len(value) <= selector < len(value):
            raise ValueError(
                f"{who}: selector index {selector} is out of range for its {what} "
                f"of length {len(value)}"
            )
        selected = value[selector]
    else:  # a str
        if kwargs is not None and selector in kwargs:
            selected = kwargs[selector]
        elif isinstance(value, Mapping):
            if selector not in value:
                raise ValueError(
                    f"{who}: key {selector!r} not in its {what}; keys: {list(value)}"
                )
            selected = value[selector]
        elif hasattr(value, selector):
            selected = getattr(value, selector)
        else:
            raise ValueError(
                f"{who}: its {what} of type {_describe(value)} has no key or "
                f"attribute {selector!r}"
                + (f" (keyword arguments: {sorted(kwargs)})" if kwargs else "")
            )
    if not isinstance(selected, Tensor):
        raise TypeError(
            f"{who}: the selected {what} value is a {type(selected).__name__}, "
            f"not a tensor; {hint}"
        )
    return selected


def _names_layer(model: Any, key: Any, name: str, module: nn.Module) -> bool:
    """Whether a ``{layer: selector}`` key (a module, or a name in ``model``) is this layer."""
    if isinstance(key, str):
        return key == name or (isinstance(model, nn.Module) and resolve_layer(model, key)[1] is module)
    return key is module


def selector_for_layer(model: Any, name: str, module: nn.Module, selector: Any) -> Selector:
    """The selector one layer is read with: ``selector`` itself, or its entry for this layer when it
    is a ``{layer: selector}`` dict (keys: names in ``model``, or module objects; entries for other
    layers are ignored, so a multi-layer fit's dict can be passed as it is)."""
    if not isinstance(selector, Mapping):
        return selector
    return next((entry for key, entry in selector.items() if _names_layer(model, key, name, module)), None)


def per_layer_selectors(model: nn.Module, names: Sequence[str], selector: Any) -> Dict[str, Selector]:
    """Expand ``selector`` (one for all, or a ``{layer: selector}`` dict) to every layer name; a
    dict entry for a layer not in ``names`` is an error."""
    modules = {name: resolve_layer(model, name)[1] for name in names}
    for key in selector if isinstance(selector, Mapping) else ():
        if not any(_names_layer(model, key, name, module) for name, module in modules.items()):
            raise ValueError(
                f"selector dict has an entry for layer {resolve_layer(model, key)[0]!r}, which is not among the "
                f"hooked layers {list(names)}"
            )
    return {name: selector_for_layer(model, name, module, selector) for name, module in modules.items()}


def selector_record(selector: Selector) -> Any:
    """What a fit records of a selector (JSON): ``None``, an ``int`` or a ``str`` as it is; a
    callable as ``{"callable": its name}``, which is never compared (two callables may agree)."""
    if selector is None or isinstance(selector, (int, str)):
        return selector
    return {"callable": getattr(selector, "__qualname__", type(selector).__qualname__)}


def is_comparable_selector(record: Any) -> bool:
    """Whether a recorded selector can be compared with another (not a callable's record)."""
    return not isinstance(record, Mapping)


def _describe(value: Any) -> str:
    """Short type description for error messages (tuple/list lengths, dict keys, dataclasses)."""
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)}"
    if dataclasses.is_dataclass(value):
        fields = [f.name for f in dataclasses.fields(value)]
        return f"dataclass {type(value).__name__} with fields {fields}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Hooks as a managed resource
# --------------------------------------------------------------------------------------------


class LayerHooks:
    """Context manager that captures the outputs (or inputs) of layers during forward passes.

    On entering, it registers one forward hook per layer (a forward pre-hook when
    ``attribute_to_layer_input=True``) plus one pre-hook on ``model`` that resets the captured
    values at the start of every call of ``model``; with ``eval_mode=True`` it records the
    ``training`` flag of every module and calls ``model.eval()``. On leaving, in a ``finally``
    (also on errors and ``KeyboardInterrupt``), it removes every handle and restores every
    module's flag. Captured values stay readable after the ``with`` block.

    Entering an instance that is already active raises ``RuntimeError`` (hooks are never
    registered twice); an instance may be entered again after it has been left.

    A model wrapped in ``nn.DataParallel`` is hooked by its names (``"module.fc"``) and run by
    :meth:`run` as the wrapped ``.module`` on the wrapper's first device, one pass, as the wrapper
    runs on a single device: replicas on several GPUs would write the captured values from
    concurrent threads, and the early-stop signal would come back from a replica as another
    exception.

    Two kinds of calls are not this instance's: a pass that another instance's :meth:`run` makes
    inside a ``stop_early=True`` block (``capture()`` or an explainer there: this block's stop
    signal would end that pass and leave the whole block), and a part of the forward pass that
    gradient checkpointing reruns inside the backward pass (not another call of the layer).

    A module that runs several times in one forward pass (a reused block) keeps the value of its
    **last** call; ``calls[name]`` counts the calls. With ``stop_early=True`` the forward pass is
    aborted as soon as every hooked layer has run once (a private exception is raised from the
    hook), so a reused module then keeps its *first* value (also when it runs again before the
    other hooked layers have run). The ``with`` statement (and
    :meth:`run`) swallow exactly that exception; all others propagate.

    Args:
        model: The model whose layers are hooked.
        layers: One layer or a list/tuple of layers, each an ``nn.Module`` of ``model`` or a
            dotted name (see :func:`resolve_layer`). Duplicates are dropped.
        attribute_to_layer_input: Capture each layer's input (its positional arguments, as a
            tuple) instead of its output.
        selector: How to pick a tensor from the output (or input tuple): ``None`` takes a tensor
            as is and a tuple/list of length 1 as its element, an ``int`` indexes a tuple/list,
            a ``str`` is a dict key or attribute name (for inputs, also a keyword argument), a
            callable maps the output to a tensor. A dict ``{layer: selector}`` (keys are names
            or modules) sets one per layer; layers missing from it use ``None``.
        clone: Clone captured tensors, so that later in-place operations in the forward pass
            (``nn.ReLU(inplace=True)``) cannot change them.
        detach: Detach captured tensors from the autograd graph. Pass ``False`` to keep the
            graph (gradient methods need it).
        eval_mode: Put the model in eval mode while active (BatchNorm uses its running
            statistics and does not update them; dropout is off).
        stop_early: Abort the forward pass once every hooked layer has produced a value.

    Attributes:
        names: The hooked layer names, in the order given (duplicate names dropped; one module
            asked for under two names is hooked under both).
        calls: ``{name: number of calls}`` in the latest forward pass of ``model``.

    Examples::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Flatten())
        >>> x = torch.randn(4, 3, 8, 8)
        >>> with LayerHooks(model, ["0", "2"]) as hooks:
        ...     _ = model(x)
        >>> hooks["0"].shape          # conv output before the in-place ReLU
        torch.Size([4, 8, 6, 6])
        >>> list(hooks.values)        # in the order the layers were given
        ['0', '2']
        >>> with LayerHooks(model, model[1], attribute_to_layer_input=True) as hooks:
        ...     _ = model(x)
        >>> hooks.values["1"].shape   # the ReLU's input (selector None takes args[0])
        torch.Size([4, 8, 6, 6])
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Union[LayerSpec, Sequence[LayerSpec]],
        *,
        attribute_to_layer_input: bool = False,
        selector: Union[Selector, Mapping[LayerSpec, Selector]] = None,
        clone: bool = True,
        detach: bool = True,
        eval_mode: bool = True,
        stop_early: bool = False,
    ) -> None:
        layer_list, _ = _as_layer_list(layers)
        resolved: Dict[str, nn.Module] = {}
        for layer in layer_list:
            name, module = resolve_layer(model, layer)
            if module is model:  # the model itself: the module run() calls (a DataParallel's, a compiled one's)
                module = _unwrapped(model)
            resolved.setdefault(name, module)  # dicts keep insertion order: order as given
        self.model = model
        self.names: List[str] = list(resolved)
        self._modules = resolved
        self._selectors = per_layer_selectors(model, self.names, selector)
        self.attribute_to_layer_input = attribute_to_layer_input
        self.clone = clone
        self.detach = detach
        self.eval_mode = eval_mode
        self.stop_early = stop_early
        self.calls: Dict[str, int] = {}
        self._values: Dict[str, Tensor] = {}
        self._stopped = False  # the early-stop signal was raised in this forward pass
        self._handles: List[RemovableHandle] = []
        self._flags: List[Tuple[nn.Module, bool]] = []
        self._active = False
        self._entered, self._task = -1, -1  # set on entering (see _isolated and _listening)

    # -- context management -------------------------------------------------------------------

    def __enter__(self) -> LayerHooks:
        if self._active:
            raise RuntimeError("this LayerHooks is already active; hooks are registered once")
        self._active = True
        self._entered = next(_ENTERED)  # which run() passes are this block's to stop (_listening)
        self._task = _graph_task()
        self.clear()
        try:
            if self.eval_mode:
                # Record every module's own flag: model.train(flag) would overwrite submodules
                # that the user had set differently (e.g. a frozen BatchNorm in eval mode).
                self._flags = [(m, m.training) for m in self.model.modules()]
                self.model.eval()
            # Registered first, so it runs before any pre-hook on the model itself (on the module
            # that run() calls: a DataParallel's .module).
            self._handles.append(_unwrapped(self.model).register_forward_pre_hook(self._reset_hook))
            for name, module in self._modules.items():
                if self.attribute_to_layer_input:
                    handle = module.register_forward_pre_hook(
                        self._make_pre_hook(name), with_kwargs=True
                    )
                else:
                    handle = module.register_forward_hook(self._make_hook(name))
                self._handles.append(handle)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        self._release()
        # Swallow only our own early-stop signal; everything else propagates.
        return isinstance(exc, _StopForward) and exc.owner is self

    def _release(self) -> None:
        """Remove every handle and restore every training flag (safe to call repeatedly)."""
        try:
            while self._handles:
                self._handles.pop().remove()
        finally:
            for module, flag in self._flags:
                module.training = flag  # not module.train(flag): that would recurse
            self._flags = []
            self._active = False

    # -- hooks ------------------------------------------------------------------------------

    def _reset_hook(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        # Each call of the model starts a fresh capture (and a fresh stop_early countdown).
        if not self._isolated():
            self._task = _graph_task()  # the pass's autograd task: outside backward, or the backward it runs in
            self.clear()

    def _isolated(self) -> bool:
        """Whether a stop_early instance is inside a pass that another instance's run() makes, begun within
        this block (capture() or an explainer there): its stop signal would end that pass and leave the
        whole block silently, so it neither records nor stops it."""
        running = getattr(_RUNNING, "state", None)
        return (self.stop_early and running is not None and running[0] is not self
                and self._entered < running[1])

    def _listening(self) -> bool:
        """Whether this call of a hooked module belongs to this instance's pass: not isolated from it, and
        not a rerun of part of the forward inside a backward pass (gradient checkpointing: the stop signal
        fired there, and the calls were counted twice)."""
        return not self._isolated() and _graph_task() == self._task

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            if self._listening():
                self._store(name, _select(output, self._selectors[name], name, "output"))

        return hook

    def _make_pre_hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            if self._listening():
                self._store(name, _select(args, self._selectors[name], name, "input", kwargs))

        return pre_hook

    def _store(self, name: str, value: Tensor) -> None:
        if self._stopped:  # the model caught the signal and ran on: keep the first values, stop again
            raise _StopForward(self)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.stop_early and name in self._values:
            # a reused module running again before the other layers: keep its first call, the value a
            # single-layer capture (and replace_activation(model=...)) reads; no copy of a value not kept
            return
        if self.detach:
            value = value.detach()
        if self.clone:
            # Clone now: an in-place op later in the forward pass would overwrite the storage.
            value = value.clone()
        self._values[name] = value
        if self.stop_early and len(self._values) == len(self.names):
            self._stopped = True
            raise _StopForward(self)

    # -- reading ----------------------------------------------------------------------------

    @property
    def values(self) -> Dict[str, Tensor]:
        """``{name: tensor}`` of the layers captured so far, in the order the layers were given.

        Returns:
            A new dict; layers that have not run are absent.
        """
        return {name: self._values[name] for name in self.names if name in self._values}

    def __getitem__(self, layer: LayerSpec) -> Tensor:
        """Return the captured value of ``layer`` (a hooked name or module).

        Raises:
            KeyError: If the layer is not hooked or has not run yet.
        """
        if isinstance(layer, nn.Module):  # by identity: a module hooked by one of its names (an alias) too
            name = next((n for n, m in self._modules.items() if m is layer), None) or resolve_layer(self.model, layer)[0]
        else:
            name = layer
        if name not in self._modules:
            raise KeyError(f"layer {name!r} is not hooked; hooked layers: {self.names}")
        if name not in self._values:
            raise KeyError(f"layer {name!r} has not run yet (run a forward pass of the model)")
        return self._values[name]

    def clear(self) -> None:
        """Forget captured values and call counts (done automatically at each call of model)."""
        self._values = {}
        self.calls = {}
        self._stopped = False

    def missing(self) -> List[str]:
        """Return the hooked layer names that have not produced a value yet."""
        return [name for name in self.names if name not in self._values]

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call ``model(*args, **kwargs)``, swallowing this instance's early-stop signal.

        An ``nn.DataParallel`` model is not replicated: its ``.module`` runs on the wrapper's
        first device (inputs moved there, as the wrapper does), once. Tensor arguments reach the
        model as copies: a model that changes its input in place (``x.sub_(0.5)`` in ``forward``)
        leaves the caller's images as they were, which captum_inn reads again (the encoder, a
        second pass); gradients flow through the copies to the originals.

        Returns:
            The model's output, or ``None`` if the pass was stopped early.

        Examples::

            >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
            >>> with LayerHooks(model, "0", stop_early=True) as hooks:
            ...     out = hooks.run(torch.randn(5, 4))   # stopped after layer "0"
            >>> out is None, hooks["0"].shape
            (True, torch.Size([5, 3]))
        """
        outer = getattr(_RUNNING, "state", None)
        _RUNNING.state = (self, next(_ENTERED))
        args, kwargs = copied_tensors(args), {key: copied_tensors((value,))[0] for key, value in kwargs.items()}
        try:
            if isinstance(self.model, nn.DataParallel):
                return _run_unreplicated(self.model, args, kwargs)
            return eager_module(self.model)(*args, **kwargs)
        except _StopForward as exc:
            if exc.owner is not self:
                raise
            return None
        finally:
            _RUNNING.state = outer

    def __repr__(self) -> str:
        kind = "inputs" if self.attribute_to_layer_input else "outputs"
        state = "active" if self._active else "inactive"
        return f"LayerHooks({type(self.model).__name__}, {kind} of {self.names}, {state})"


def _is_structseq(value: Any) -> bool:
    """Whether ``value`` is a struct sequence, as ``torch.return_types.topk``."""
    return isinstance(value, tuple) and hasattr(type(value), "n_fields")


def _graph_task() -> int:
    """The autograd graph task running now (-1 outside a backward pass): a forward that gradient
    checkpointing reruns inside a backward pass is no pass of the model."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if task is None else task()


#: ``(instance, number)`` of the LayerHooks whose run() is making a pass, per thread (see ``_isolated``)
_RUNNING = threading.local()
#: Numbers in order of entering blocks and starting run() passes
_ENTERED = itertools.count()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module that :meth:`LayerHooks.run` calls: a ``DataParallel``'s ``.module``, a compiled
    model's eager one (:func:`eager_module`), else ``model``."""
    return model.module if isinstance(model, nn.DataParallel) else eager_module(model)


def eager_module(model: Any) -> Any:
    """A ``torch.compile``'d model's eager module (``._orig_mod``), else ``model`` itself.

    A compiled graph does not see hooks registered after it was built (dynamo does not guard on
    them), so once the compiled model has run, a capture found that its layer "did not run" and a
    replaced activation was silently ignored. The eager module runs the same weights with its hooks.

    Examples::

        >>> net = nn.Linear(2, 2)
        >>> eager_module(net) is net
        True
    """
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # never imported here: loading dynamo takes seconds
    return model._orig_mod if dynamo is not None and isinstance(model, dynamo.OptimizedModule) else model


def did_not_run_hint(model: Any, layer: Any) -> str:
    """Why a layer that the model holds may never run, for the "did not run" errors: a container
    without a forward of its own, or a ``torch.fx`` graph that calls only the traced leaf modules
    ("check that it is used in model.forward" pointed the wrong way), or an ``nn.MultiheadAttention``'s
    ``out_proj``, whose weights it uses without calling the module."""
    module = layer if isinstance(layer, nn.Module) else None
    if module is None and isinstance(model, nn.Module):  # the name as given ("module.blocks"), or inside a wrapper
        module = dict(model.named_modules()).get(layer)
        if module is None:
            module = dict(_unwrapped(model).named_modules()).get(layer)
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        first = next(iter(module.named_children()), (None,))[0]
        example = f", e.g. '{layer}.{first}'" if isinstance(layer, str) and first is not None else ""
        return (f"; it is a {type(module).__name__}, a container without a forward of its own: hook one of its "
                f"modules{example}")
    name = layer if isinstance(layer, str) else next(
        (n for n, m in model.named_modules() if m is module), None) if isinstance(model, nn.Module) else None
    attention = name.rpartition(".")[0] if name and name.rpartition(".")[2] == "out_proj" else None
    if attention is not None and isinstance(dict(model.named_modules()).get(attention), nn.MultiheadAttention):
        return (f"; nn.MultiheadAttention applies its out_proj's weights in functional code and never calls it: hook "
                f"the attention, '{attention}', with selector=0 (its output; it returns (output, weights))")
    fx = sys.modules.get("torch.fx")
    if fx is not None and isinstance(_unwrapped(model) if isinstance(model, nn.Module) else model, fx.GraphModule):
        return ("; a torch.fx GraphModule (create_feature_extractor, symbolic_trace) calls only the leaf modules of "
                "the traced model: hook a leaf, e.g. the last layer inside the block")
    return ""


def copied_tensors(values: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """``values`` with each tensor replaced by a copy, for a model's arguments: a model that changes
    its input in place (``x.sub_(0.5)`` in ``forward``) would change the caller's images, which
    captum_inn reads again. A pass over a batch costs far more than copying it; gradients flow
    through a copy to the original.

    Examples::

        >>> x = torch.zeros(2)
        >>> (copy, flag) = copied_tensors((x, True))
        >>> _ = copy.add_(1); x, flag
        (tensor([0., 0.]), True)
    """
    return tuple(value.clone() if isinstance(value, Tensor) else value for value in values)


def check_input_unchanged(copy: Tensor, method: str) -> None:
    """A ``ValueError`` when the model changed ``copy``, the copy of the images it was given
    (:func:`copied_tensors`), in place: ``method`` (a Captum method) gives it images that require
    gradients, which autograd refuses to change in place, with an error naming neither."""
    if copy._version:
        raise ValueError(f"`model` changes its input in place (an in-place step on x in forward, such as "
                         f"x.sub_(0.5)); {method} gives it images that require gradients, which autograd cannot change "
                         "in place. Make the step out of place (x = x - 0.5), or pass a wrapper module whose forward(x) "
                         "returns model(x.clone()) and build the explainers on it.")


def _run_unreplicated(model: nn.DataParallel, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """``model(*args, **kwargs)`` as ``DataParallel`` runs on one device: the inputs scattered to
    its first device (none without GPUs) and its ``.module`` called in this thread."""
    if model.device_ids:
        scattered, scattered_kwargs = model.scatter(args, kwargs, model.device_ids[:1])
        args, kwargs = (scattered[0], scattered_kwargs[0]) if scattered or scattered_kwargs else ((), {})
    return model.module(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# One-call capture
# --------------------------------------------------------------------------------------------


def capture(
    model: nn.Module,
    layers: Union[LayerSpec, Sequence[LayerSpec]],
    inputs: Union[Tensor, Tuple[Any, ...]],
    *,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    selector: Union[Selector, Mapping[LayerSpec, Selector]] = None,
    eval_mode: bool = True,
    stop_early: bool = True,
    grad: bool = False,
) -> Union[Tensor, Dict[str, Tensor]]:
    """Run one forward pass ``model(*inputs, *additional_forward_args)`` and return activations.

    Args:
        model: The model (an ``nn.DataParallel`` runs as its ``.module``, see :class:`LayerHooks`).
        layers: One layer, or a list/tuple of layers (modules of ``model`` or dotted names).
        inputs: A tensor or a tuple of tensors, each ``(N, ...)``: dim 0 is the batch.
        additional_forward_args: ``None``, one value, or a tuple of values passed after
            ``inputs`` (Captum's convention: anything that is not a tuple is one argument).
        attribute_to_layer_input: Capture each layer's input instead of its output.
        selector: Picks a tensor from non-tensor outputs; see :class:`LayerHooks`.
        eval_mode: Run the model in eval mode (training flags are restored afterwards).
        stop_early: Stop the forward pass once every layer has run (saves compute when the
            layers are early). A module that runs several times then yields its first call's
            value; pass ``False`` to run the whole model and get the last call's.
        grad: Run with gradients enabled and keep the graph (values are not detached);
            otherwise run under ``torch.no_grad()``.

    Returns:
        The captured tensor if ``layers`` is a single layer, else ``{name: tensor}`` in the order
        the layers were given (duplicate names dropped). Shapes are the layer's, e.g. ``(N, C, H, W)``.

    Raises:
        ValueError: If a layer name is unknown, or a hooked layer did not run.
        TypeError: If ``layers``, ``inputs`` or a selected value has the wrong type.

    Examples::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Flatten())
        >>> x = torch.randn(4, 3, 8, 8)
        >>> capture(model, "0", x).shape
        torch.Size([4, 8, 6, 6])
        >>> {k: v.shape for k, v in capture(model, ["0", model[2]], x).items()}
        {'0': torch.Size([4, 8, 6, 6]), '2': torch.Size([4, 288])}
    """
    _, single = _as_layer_list(layers)
    if isinstance(inputs, Tensor):
        args: Tuple[Any, ...] = (inputs,)
    elif isinstance(inputs, tuple):
        args = inputs
    else:
        raise TypeError(
            f"inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}"
        )
    if additional_forward_args is None:
        extra: Tuple[Any, ...] = ()
    elif isinstance(additional_forward_args, tuple):
        extra = additional_forward_args
    else:
        extra = (additional_forward_args,)

    hooks = LayerHooks(
        model,
        layers,
        attribute_to_layer_input=attribute_to_layer_input,
        selector=selector,
        detach=not grad,
        eval_mode=eval_mode,
        stop_early=stop_early,
    )
    if grad:
        check_autograd_weights(model, "`model`", "capture(..., grad=True) needs gradients through it")
    # grad=True keeps the graph inside a caller's inference_mode too (which records none), from
    # copies of any inference tensors among the arguments (autograd cannot save those)
    with torch.inference_mode(False) if grad else contextlib.nullcontext(), torch.set_grad_enabled(grad), hooks:
        if grad:
            args, extra = normal_tensors(args), normal_tensors(extra)
        hooks.run(*args, *extra)
    missing = hooks.missing()
    if missing:
        raise ValueError(
            f"layer {missing[0]!r} did not run during the forward pass; check that it is used "
            f"in model.forward" + did_not_run_hint(model, missing[0])
            + (f" (layers that did not run: {missing})" if len(missing) > 1 else "")
        )
    values = hooks.values
    return values[hooks.names[0]] if single else values


def module_attributes(obj: Any) -> Dict[str, nn.Module]:
    """The ``nn.Module`` attributes of a plain object, by name (an autoencoder object that wraps an
    encoder and a decoder); ``{}`` for a module itself or an object without any.

    Examples::

        >>> class Wrapper:
        ...     def __init__(self):
        ...         self.decoder, self.encoder, self.scale = nn.Linear(2, 4), nn.Linear(4, 2), 3.0
        >>> list(module_attributes(Wrapper()))
        ['decoder', 'encoder']
    """
    if isinstance(obj, nn.Module):
        return {}
    found = {k: v for k, v in getattr(obj, "__dict__", {}).items() if isinstance(v, nn.Module)}
    return {k: found[k] for k in sorted(found)}


@contextmanager
def eval_mode(*modules: Any) -> Iterator[None]:
    """Put modules in eval mode for the block, then restore every submodule's own flag.

    A plain object (e.g. a user's autoencoder that wraps an encoder and a decoder) has its
    ``module_attributes`` switched; other arguments (``None``) are ignored.

    Args:
        *modules: Modules (or other objects) to switch.

    Examples::

        >>> net = nn.Sequential(nn.BatchNorm1d(3)).train()
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    # a plain object's modules too: its batch norm updated its statistics, and its dropout drew, while caching
    modules = [m for mod in modules for m in ([mod] if isinstance(mod, nn.Module) else module_attributes(mod).values())]
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for mod in modules:
            mod.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _with_replaced(value: Any, selector: Selector, replacement: Tensor, name: str, what: str) -> Any:
    """``value`` (a layer's output, or its positional-argument tuple) with the tensor that
    ``selector`` picks (see :func:`_select`) swapped for ``replacement``; containers are copied,
    never changed in place. Callers have run ``_select`` on ``value`` (its checks and errors)."""
    if selector is None:
        if isinstance(value, Tensor):
            return replacement
        selector = 0
    if callable(selector) and not isinstance(selector, (int, str)):
        raise TypeError(
            f"layer {name!r}: a callable selector picks a tensor out of the {what} but cannot say where to "
            "put a replacement back; pass an int index or a str key/attribute name instead"
        )
    if _is_structseq(value):  # torch.return_types (topk, max, sort): built from a sequence, fields read-only
        items = list(value)
        items[selector if isinstance(selector, int) else type(value).__match_args__.index(selector)] = replacement
        return type(value)(items)
    if isinstance(selector, int):
        items = list(value)
        items[selector] = replacement
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # namedtuples keep their type
    if isinstance(value, Mapping):
        copied = dict(value) if type(value) is dict else copy.copy(value)
        copied[selector] = replacement
        return copied
    if hasattr(value, "_fields"):  # a namedtuple field
        return value._replace(**{selector: replacement})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{selector: replacement})  # frozen ones too
    copied = copy.copy(value)  # another object with the tensor as an attribute
    setattr(copied, selector, replacement)
    return copied


@contextmanager
def replace_activation(
    module: nn.Module, value: Tensor, attribute_to_layer_input: bool = False, selector: Selector = None,
    *, model: Optional[nn.Module] = None, once: bool = False,
) -> Iterator[None]:
    """Within the block, ``module``'s output (or first input) is replaced by ``value``.

    The rest of the model then runs on ``value``: this is how a representation given in another
    coordinate system (for example ``e⁻¹`` of edited factors) is fed back through the model. The
    hook is removed when the block ends, normally or not.

    Args:
        module: The layer.
        value: The replacement, shaped like the layer's activation ``(N, ...)``.
        attribute_to_layer_input: Replace the layer's input instead of its output.
        selector: Which tensor of a non-tensor output (or of the inputs) to replace, as in
            :class:`LayerHooks`: an ``int`` index or a ``str`` key, attribute or keyword-argument
            name; everything else in the output passes through unchanged. A callable selector
            cannot be inverted and is a ``TypeError``.
        model: The model whose forward pass runs ``module``. Given, only the *first* call of
            ``module`` in each call of ``model`` is replaced, the call that :func:`capture`, the
            fits and the explainers read (torchvision's ``BasicBlock`` calls its ``relu`` twice:
            the second call, the block's output, then runs on the model's own values). Without
            it, every call of ``module`` is replaced, unless ``once``. A ``torch.compile``'d model
            skips hooks added after it was built: inside the block run ``eager_module(model)``.
        once: Replace only the first call of ``module`` within the block: for a block around one
            forward pass whose model is out of reach (a lambda), where a layer module used twice
            (one ``nn.ReLU`` shared by two stages) must keep its second call.

    Examples::

        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with replace_activation(net[1], torch.zeros(4, 2)):
        ...     torch.equal(net(torch.rand(4, 3)), net[2](torch.zeros(4, 2)))
        True
    """
    name = type(module).__name__
    armed = [True]  # whether the next call of module is replaced (re-armed at each call of model)
    per_pass = model is not None and model is not module
    first_only = per_pass or once

    def rearm(_model: nn.Module, _args: Any) -> None:
        armed[0] = True

    def take() -> bool:
        """Whether to replace this call (with a model: its first call in the current pass only)."""
        replace, armed[0] = armed[0], armed[0] and not first_only
        return replace

    def matched(current: Tensor) -> Tensor:
        """A copy of ``value`` in the activation's floating dtype (a float32 INN's output in a float64
        model): the model may write into it (``ReLU(inplace=True)``, ``out += identity``), which changed
        the caller's tensor, failed for one that requires grad, and changed earlier passes' outputs."""
        if current.shape != value.shape:
            path = next((n for n, m in _unwrapped(model).named_modules() if m is module), None) if model is not None else None
            layer = f"layer {path!r} ({name})" if path else name  # "" is the model itself
            raise ValueError(f"`value` of shape {tuple(value.shape)} replaces the {'input' if attribute_to_layer_input else 'output'} "
                             f"of {layer}, of shape {tuple(current.shape)}; pass a value shaped like that activation.")
        both_floating = isinstance(current, Tensor) and current.is_floating_point() and value.is_floating_point()
        return value.to(current.dtype, copy=True) if both_floating else value.clone()

    def output_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if not take():
            return None
        return _with_replaced(output, selector, matched(_select(output, selector, name, "output")), name, "output")

    def input_hook(_module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if not take():
            return None
        if isinstance(selector, str) and selector in kwargs:  # checked as capture checks it (None, a float: named)
            return args, {**kwargs, selector: matched(_select(args, selector, name, "input", kwargs))}
        return _with_replaced(args, selector, matched(_select(args, selector, name, "input")), name, "input"), kwargs

    handles = [_unwrapped(model).register_forward_pre_hook(rearm)] if per_pass else []
    try:
        handles.append(module.register_forward_pre_hook(input_hook, with_kwargs=True) if attribute_to_layer_input
                       else module.register_forward_hook(output_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
