"""Tests of captum_inn.capture: layer resolution, hooks as a managed resource, selectors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers_hooks import Replicating, assert_no_hooks, training_flags
from torch import nn

from captum_inn.capture import LayerHooks, capture, replace_activation, resolve_layer

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Small models
# --------------------------------------------------------------------------------------------


class CountingCNN(nn.Module):
    """conv -> in-place ReLU -> conv -> in-place ReLU -> pool -> fc; counts forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)
        self.n_forward = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n_forward += 1
        return self.fc(self.pool(self.features(x)).flatten(1))


class Counter(nn.Module):
    """Identity that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return x


class Residual(nn.Module):
    """x + f(x), where f ends in an in-place ReLU, followed by an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu1(self.conv1(x)))
        out += x  # in place on conv2's output
        return self.relu2(out)


class TwoOut(nn.Module):
    """A layer that returns a tuple (features, scale)."""

    def forward(self, x: torch.Tensor):
        return x * 2, x.mean(dim=1)


@dataclasses.dataclass
class Out:
    feat: torch.Tensor
    score: torch.Tensor
    note: str = "not a tensor"


class DataclassLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> Out:
        return Out(feat=x + 1, score=x.sum(dim=1))


class DictModel(nn.Module):
    """Layers returning a tuple and a dataclass; the model returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.two = TwoOut()
        self.dc = DataclassLayer()
        self.after = Counter()

    def forward(self, x: torch.Tensor, bias: float = 0.0, *, scale: float = 1.0) -> dict:
        h, m = self.two(self.lin(x) + bias)
        o = self.dc(h * scale)
        return {"logits": self.after(o.feat), "mean": m}


class BNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.drop(self.bn(self.conv(x))))


class Reused(nn.Module):
    """Calls the same block twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x))


class Raiser(nn.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.exc


def seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)  # nonzero biases too, so the checks are not vacuous
    return model


@pytest.fixture
def cnn() -> CountingCNN:
    return seeded(CountingCNN())


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 5, 5)


# --------------------------------------------------------------------------------------------
# Values equal a step-by-step manual forward
# --------------------------------------------------------------------------------------------


def test_conv_output_before_inplace_relu(cnn, x):
    conv0, conv2 = cnn.features[0], cnn.features[2]
    z0 = F.conv2d(x, conv0.weight, conv0.bias, padding=1)
    z2 = F.conv2d(z0.relu(), conv2.weight, conv2.bias, padding=1)
    assert (z0 < 0).any()  # the in-place ReLU would change it if we did not clone

    got = capture(cnn, ["features.0", "features.1", "features.2"], x, stop_early=False)
    assert torch.equal(got["features.0"], z0)
    assert torch.equal(got["features.1"], z0.relu())
    assert torch.equal(got["features.2"], z2)
    # The ReLU's input, read with a pre-hook, is the conv output too.
    assert torch.equal(capture(cnn, "features.1", x, attribute_to_layer_input=True), z0)
    assert_no_hooks(cnn)


def test_residual_block_with_inplace_ops():
    model = seeded(Residual())
    torch.manual_seed(2)
    x = torch.randn(1, 4, 4, 4)
    a = F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)
    b = F.conv2d(a.relu(), model.conv2.weight, model.conv2.bias, padding=1)
    got = capture(model, ["conv1", "conv2", "relu2", ""], x, stop_early=False)
    assert torch.equal(got["conv1"], a)
    assert torch.equal(got["conv2"], b)  # before `out += x`
    assert torch.equal(got["relu2"], (b + x).relu())
    assert torch.equal(got[""], (b + x).relu())
    relu2_in = capture(model, model.relu2, x, attribute_to_layer_input=True)
    assert torch.equal(relu2_in, b + x)  # before the in-place ReLU
    assert_no_hooks(model)


def test_many_layers_one_forward_pass_in_given_order(cnn, x):
    layers = ["fc", cnn.features[0], "pool", "features.3"]
    got = capture(cnn, layers, x)
    assert cnn.n_forward == 1
    assert list(got) == ["fc", "features.0", "pool", "features.3"]
    assert torch.allclose(got["fc"], cnn(x), atol=0, rtol=0)
    assert got["pool"].shape == (2, 6, 1, 1)


def test_batch_size_one(cnn):
    x1 = torch.randn(1, 3, 5, 5)
    z = capture(cnn, "features.2", x1)
    assert z.shape == (1, 6, 5, 5)
    assert capture(cnn, "fc", x1).shape == (1, 5)


def test_additional_forward_args_and_multiple_inputs():
    model = seeded(DictModel())
    x = torch.randn(3, 3)
    lin = model.lin(x)
    # One value (not a tuple) is one extra argument.
    got = capture(model, "two", x, additional_forward_args=0.5, selector=0)
    assert torch.equal(got, (lin + 0.5) * 2)
    # A tuple spreads; `inputs` may be a tuple too.
    got = capture(model, "two", (x,), additional_forward_args=(0.5,), selector=0)
    assert torch.equal(got, (lin + 0.5) * 2)
    with pytest.raises(TypeError, match="inputs must be a tensor or a tuple"):
        capture(model, "two", [x])


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------


def test_selectors_of_each_kind():
    model = seeded(DictModel())
    x = torch.randn(3, 3)
    h = model.lin(x)
    assert torch.equal(capture(model, "two", x, selector=0), h * 2)
    assert torch.equal(capture(model, "two", x, selector=-1), h.mean(dim=1))
    assert torch.equal(
        capture(model, "two", x, selector=lambda o: o[0] + o[1][:, None]),
        h * 2 + h.mean(dim=1)[:, None],
    )
    assert torch.equal(capture(model, "dc", x, selector="feat"), h * 2 + 1)  # dataclass field
    assert torch.equal(capture(model, "", x, selector="logits"), h * 2 + 1)  # dict key
    assert_no_hooks(model)


def test_replace_activation_puts_the_value_where_the_selector_reads():
    """The tensor a selector reads is the one replaced; the rest of the output passes through."""
    model = seeded(DictModel())
    x = torch.randn(3, 3)
    h = model.lin(x)
    value = torch.randn(3, 4)
    with replace_activation(model.two, value, selector=0):  # tuple output: index 0
        out = model(x)
    assert torch.equal(out["logits"], value + 1) and torch.equal(out["mean"], h.mean(dim=1))
    with replace_activation(model.dc, value, selector="feat"):  # dataclass field
        assert torch.equal(model(x)["logits"], value)
    with replace_activation(model.lin, value, attribute_to_layer_input=False):  # plain tensor output
        assert torch.equal(model(x)["mean"], value.mean(dim=1))
    with replace_activation(model.two, value, attribute_to_layer_input=True):  # the first positional input
        assert torch.equal(model(x)["logits"], value * 2 + 1)
    with pytest.raises(TypeError, match="callable selector .* int index or a str key"):
        with replace_activation(model.two, value, selector=lambda o: o[0]):
            model(x)
    with pytest.raises(ValueError, match=r"`value` of shape \(3, 5\) replaces the output of TwoOut, of shape \(3, 4\)"):
        with replace_activation(model.two, torch.randn(3, 5), selector=0):
            model(x)
    assert_no_hooks(model)


def test_replace_activation_hands_the_model_a_copy_it_may_write_into():
    """The model ran on the caller's own tensor: an in-place ReLU after the layer changed it, a value
    that requires grad failed ("a leaf Variable ... in-place"), and ``out += x`` in one pass changed
    the output of an earlier one."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.relu = nn.Linear(2, 2), nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.lin(x)
            out += x
            return self.relu(out)

    model, x = seeded(Residual()), torch.randn(4, 2)
    value = torch.randn(4, 2)
    kept = value.clone()
    with replace_activation(model.lin, value):
        first, second = model(x), model(x)
    assert torch.equal(value, kept)
    assert torch.equal(first, (kept + x).relu()) and torch.equal(second, first)
    leaf = value.clone().requires_grad_(True)
    for to_input in (False, True):
        with replace_activation(model.relu if to_input else model.lin, leaf, attribute_to_layer_input=to_input):
            model(x).sum().backward()
        assert leaf.grad is not None and torch.equal(leaf.detach(), kept)
        leaf.grad = None


def test_replace_activation_once_replaces_only_the_first_call_in_the_block():
    relu = nn.ReLU()
    value = torch.full((2, 3), 7.0)
    x = -torch.ones(2, 3)
    with replace_activation(relu, value, once=True):
        assert torch.equal(relu(x), value) and torch.equal(relu(x), torch.zeros(2, 3))
    with replace_activation(relu, value):  # every call, by default
        assert torch.equal(relu(x), value) and torch.equal(relu(x), value)


def test_replace_activation_names_the_layer_by_its_path_when_given_the_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"replaces the output of layer '1.0' \(ReLU\), of shape \(5, 4\)"):
        with replace_activation(model[1][0], torch.zeros(5, 3), model=model):
            model(torch.rand(5, 3))
    with pytest.raises(ValueError, match=r"replaces the output of Sequential, of shape"):  # the model itself: no path
        with replace_activation(model, torch.zeros(5, 3), model=model):
            model(torch.rand(5, 3))


def test_replace_activation_takes_the_dtype_of_the_activation_it_replaces():
    """A float32 INN's output in a float64 model, on either side of the layer."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    value = torch.rand(5, 4)  # float32, >= 0: the ReLU passes it unchanged on the input side
    x = torch.randn(5, 3, dtype=torch.float64)
    for to_input in (False, True):
        with replace_activation(model[1], value, attribute_to_layer_input=to_input):
            out = model(x)
        assert out.dtype == torch.float64
        assert torch.allclose(out, model[2](value.double()))


def test_replace_activation_with_model_replaces_only_the_first_call_of_a_reused_module():
    """torchvision's BasicBlock calls its one relu twice; the fits read the first call, so putting that
    value back must leave the model's output as it was (the second call runs on the model's values)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.relu, self.head = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.relu(self.relu(self.lin(x)) + x))

    model, x = seeded(Block()).eval(), torch.randn(3, 4)
    expected = model(x)
    for to_input in (False, True):
        z = capture(model, "relu", x, attribute_to_layer_input=to_input)
        with replace_activation(model.relu, z, attribute_to_layer_input=to_input, model=model):
            assert torch.equal(model(x), expected) and torch.equal(model(x), expected)  # re-armed at each call
    with replace_activation(model.relu, torch.zeros(3, 4), model=model):
        assert torch.equal(model(x), model.head(model.relu(x)))
    assert_no_hooks(model)


def test_replace_activation_keyword_input_and_namedtuple_output():
    from collections import namedtuple

    Pair = namedtuple("Pair", "features aux")

    class Named(nn.Module):
        def forward(self, x):
            return Pair(x * 3, x.sum(1))

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.named, self.inner = Named(), DictModel()

        def forward(self, t):
            pair = self.named(t)
            assert isinstance(pair, Pair)  # the replacement keeps the namedtuple type
            return self.inner(pair.features, scale=torch.tensor(3.0))

    model = seeded(Wrap())
    x = torch.randn(2, 3)
    value = torch.randn(2, 3)
    with replace_activation(model.named, value, selector="features"):
        expected = model.inner(value, scale=torch.tensor(3.0))["logits"]
        assert torch.equal(model(x)["logits"], expected)
    with replace_activation(model.inner, torch.tensor(5.0), attribute_to_layer_input=True, selector="scale"):
        assert torch.equal(model(x)["logits"], model.inner(x * 3, scale=torch.tensor(5.0))["logits"])
    assert_no_hooks(model)


def test_input_keyword_argument_by_name():
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DictModel()

        def forward(self, t: torch.Tensor) -> dict:
            return self.inner(t, scale=torch.tensor(3.0))

    model = seeded(Wrap())
    x = torch.randn(2, 3)
    got = capture(model, "inner", x, attribute_to_layer_input=True, selector="scale")
    assert torch.equal(got, torch.tensor(3.0))
    # Positional input with the default selector.
    assert torch.equal(capture(model, "inner", x, attribute_to_layer_input=True), x)


def test_an_int_selector_on_the_input_side_picks_that_positional_argument():
    """On the input side an int selector indexes the layer's positional arguments: a layer called as
    layer(x, bias) is read at `bias` with selector=1 (or -1), at `x` with 0; reading only the first
    argument refused (or mixed up) the others."""
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DictModel()

        def forward(self, t: torch.Tensor) -> dict:
            return self.inner(t, t.sum(dim=1, keepdim=True))

    model = seeded(Wrap())
    x = torch.randn(2, 3)
    bias = x.sum(dim=1, keepdim=True)
    assert torch.equal(capture(model, "inner", x, attribute_to_layer_input=True, selector=1), bias)
    assert torch.equal(capture(model, "inner", x, attribute_to_layer_input=True, selector=-1), bias)
    assert torch.equal(capture(model, "inner", x, attribute_to_layer_input=True, selector=0), x)
    with LayerHooks(model, "inner", attribute_to_layer_input=True, selector=1) as hooks:
        model(x)
    assert torch.equal(hooks["inner"], bias)
    assert_no_hooks(model)


def test_per_layer_selector_dict():
    model = seeded(DictModel())
    x = torch.randn(3, 3)
    h = model.lin(x)
    got = capture(
        model, ["lin", "two", "dc", ""], x, selector={"two": 1, model.dc: "score", "": "mean"}
    )
    assert torch.equal(got["lin"], h)  # no entry: default selector
    assert torch.equal(got["two"], h.mean(dim=1))
    assert torch.equal(got["dc"], (h * 2).sum(dim=1))
    assert torch.equal(got[""], h.mean(dim=1))
    with pytest.raises(ValueError, match="not among the hooked layers"):
        capture(model, ["lin"], x, selector={"two": 0})
    assert_no_hooks(model)


@pytest.mark.parametrize(
    "layer, selector, exc, match",
    [
        ("two", None, ValueError, r"'two'.*tuple of length 2.*selector="),
        ("dc", None, ValueError, r"'dc'.*dataclass Out.*selector="),
        ("", None, ValueError, r"dict with keys \['logits', 'mean'\]"),
        ("two", 5, ValueError, "out of range"),
        ("dc", 0, ValueError, "needs a tuple/list"),
        ("dc", "nope", ValueError, "no key or attribute 'nope'"),
        ("", "nope", ValueError, "key 'nope' not in"),
        ("dc", "note", TypeError, r"layer 'dc'.*str, not a tensor"),
        ("two", lambda o: 3, TypeError, r"layer 'two'.*int, not a tensor"),
        ("two", 1.5, TypeError, "selector must be None, an int"),
    ],
)
def test_selector_errors(layer, selector, exc, match):
    model = seeded(DictModel())
    before = training_flags(model.train())
    with pytest.raises(exc, match=match):
        capture(model, layer, torch.randn(2, 3), selector=selector)
    assert_no_hooks(model)
    assert training_flags(model) == before


# --------------------------------------------------------------------------------------------
# stop_early, reuse, eval mode
# --------------------------------------------------------------------------------------------


def test_stop_early_really_stops():
    model = nn.Sequential(nn.Linear(3, 3), Counter(), nn.Linear(3, 2), Counter())
    x = torch.randn(2, 3)
    z = capture(model, "0", x)  # stop_early=True by default
    assert model[1].n == 0 and model[3].n == 0
    assert torch.equal(z, model[0](x))
    # All layers must have run before stopping: "2" is after "1".
    capture(model, ["2", "0"], x)
    assert model[1].n == 1 and model[3].n == 0
    capture(model, "0", x, stop_early=False)
    assert model[1].n == 2 and model[3].n == 1
    assert_no_hooks(model)


def test_layer_hooks_stop_early_in_with_block_is_swallowed():
    model = nn.Sequential(nn.Linear(3, 3), Counter())
    x = torch.randn(2, 3)
    reached = False
    with LayerHooks(model, "0", stop_early=True) as hooks:
        model(x)
        reached = True  # skipped: the forward pass raised the stop signal
    assert not reached and model[1].n == 0
    assert torch.equal(hooks["0"], model[0](x))
    # run() swallows it and returns None; several passes in one context each stop early.
    with LayerHooks(model, "0", stop_early=True) as hooks:
        assert hooks.run(x) is None
        assert hooks.run(x + 1) is None
        assert torch.equal(hooks["0"], model[0](x + 1))
    assert model[1].n == 0
    # A pass that another instance's run() makes belongs to that instance: a stop_early instance around
    # it neither stops it nor records it (its signal left the whole block: capture() inside it returned
    # nothing, and the statements after it were skipped silently).
    reached, expected = False, model[0](x)
    with LayerHooks(model, "1") as outer, LayerHooks(model, "0", stop_early=True) as inner:
        outer.run(x)
        assert "1" in outer.values and inner.values == {}
        assert torch.equal(capture(model, "0", x), expected)
        reached = True
    assert reached, "the statements after capture() in the block ran"
    assert inner.values == {}
    assert_no_hooks(model)


def test_hooks_entered_inside_another_pass_or_a_backward_pass_record_it():
    """A LayerHooks block inside a model's forward (a backbone read by its own hooks) under capture(), and
    capture() inside a backward pass (a tensor hook): both were muted by the isolation above."""
    backbone = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone, nn.Linear(4, 2)

        def forward(self, x):
            with LayerHooks(self.backbone, "1", eval_mode=False) as hooks:
                self.backbone(x)
            return self.head(hooks["1"])

    net, x = Net(), torch.randn(5, 3)
    assert capture(net, "head", x).shape == (5, 2)
    shapes = []
    y = backbone(torch.randn(5, 3, requires_grad=True))
    y.register_hook(lambda grad: shapes.append(tuple(capture(backbone, "1", torch.randn(2, 3)).shape)) or grad)
    y.sum().backward()
    assert shapes == [(2, 4)]
    with LayerHooks(backbone, "0") as outer:  # stop_early=False: it sees the passes of a capture() inside
        capture(backbone, "2", x)
    assert list(outer.values) == ["0"]
    assert_no_hooks(backbone)


def test_a_pass_rerun_by_gradient_checkpointing_in_backward_is_not_a_new_call():
    """torch.utils.checkpoint reruns the forward inside the backward pass: a stop_early instance raised its
    stop signal there (fit_autoencoder with such a perceptual model crashed on a private exception), and
    calls counted the rerun as a second call."""
    import torch.utils.checkpoint as checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            return checkpoint.checkpoint(self.features, x, use_reentrant=False).sum(1)

    model, x = Checkpointed(), torch.randn(2, 3, requires_grad=True)
    finished = False
    with LayerHooks(model, ["features.1", "features.3"], detach=False, stop_early=True) as hooks:
        hooks.run(x)
        sum(v.sum() for v in hooks.values.values()).backward()
        finished = True
    assert finished and x.grad is not None
    with LayerHooks(model, "features.1", detach=False) as hooks:
        model(x).sum().backward()
    assert hooks.calls == {"features.1": 1}


def test_the_model_itself_is_hooked_through_a_data_parallel_or_compiled_wrapper():
    """Layer "" named the wrapper, whose hooks never run: run() calls the wrapped module."""
    model, x = nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3)
    assert torch.equal(capture(nn.DataParallel(model), "", x), model(x).detach())


def test_replace_activation_rebuilds_torch_return_types():
    """A topk output became a plain tuple (selector 0), or failed on its read-only fields (selector "values")."""

    class TopK(nn.Module):
        def forward(self, x):
            return x.topk(2, dim=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = TopK()

        def forward(self, x):
            out = self.k(x)
            return out.values * 10 + out.indices

    net, x = Net(), torch.rand(4, 5)
    indices = x.topk(2, dim=1).indices
    for selector in (0, "values"):
        with replace_activation(net.k, torch.zeros(4, 2), selector=selector, model=net):
            assert torch.equal(net(x), indices.float())


@pytest.mark.parametrize("caught", [Exception, BaseException], ids=["except Exception", "bare except"])
def test_a_forward_that_catches_the_stop_signal_cannot_change_the_captured_value(caught):
    """A try/except fallback in forward swallowed the early-stop signal (an Exception) and ran on; a
    later call of the hooked module then stored a value the model never computes unstopped."""

    class Fallback(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            try:
                h = self.block(x)
            except caught:
                h = 2 * x  # a fallback path
            return self.head(self.block(h))  # the block reused

    model, x = Fallback(), torch.randn(3, 4)
    assert torch.equal(capture(model, "block", x), model.block(x))  # stop_early: the first call's value
    assert torch.equal(capture(model, "block", x, stop_early=False), model.block(model.block(x)))
    assert_no_hooks(model)


@pytest.mark.parametrize("wrapper", [nn.DataParallel, Replicating], ids=["DataParallel", "replicating"])
def test_a_data_parallel_model_is_read_by_its_names_in_one_unreplicated_pass(cnn, x, wrapper):
    """Capture passes run a DataParallel's .module (names still resolve in the wrapper,
    "module.fc"): on several GPUs the wrapper's forward would replicate the hooks."""
    wrapped = wrapper(cnn).train()
    flags = training_flags(wrapped)
    expected = capture(cnn, ["features.1", "fc"], x)
    got = capture(wrapped, ["module.features.1", wrapped.module.fc], x)
    assert list(got) == ["module.features.1", "module.fc"]
    assert all(torch.equal(a, b) for a, b in zip(got.values(), expected.values()))
    with LayerHooks(wrapped, "module.features.0", stop_early=True) as hooks:
        assert hooks.run(x) is None and hooks.run(x + 1) is None  # stopped early, each pass afresh
        assert hooks.calls == {"module.features.0": 1}
    assert torch.equal(hooks["module.features.0"], cnn.features[0](x + 1))
    assert_no_hooks(wrapped)
    assert training_flags(wrapped) == flags


def test_reused_module_keeps_last_value_and_counts_calls():
    model = seeded(Reused())
    x = torch.randn(2, 3)
    with LayerHooks(model, "block") as hooks:
        model(x)
        assert hooks.calls == {"block": 2}
        assert torch.equal(hooks["block"], model.block(model.block(x)))
        model(x)  # a new call of the model resets the counts
        assert hooks.calls == {"block": 2}
    # capture with stop_early stops at the first call.
    assert torch.equal(capture(model, "block", x), model.block(x))
    assert torch.equal(capture(model, "block", x, stop_early=False), model(x))


def test_stop_early_keeps_a_reused_modules_first_call_when_other_layers_are_hooked_after_it():
    """With a later layer hooked too, the pass ran on past the module's second call, which overwrote
    the first: a multi-layer cache read another activation than a single-layer fit and the explainers."""

    class TwiceThenHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu, self.head = nn.ReLU(), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.relu(self.relu(x) - 1.0))

    model, x = seeded(TwiceThenHead()), torch.randn(4, 3)
    both = capture(model, ["relu", "head"], x)
    assert torch.equal(both["relu"], capture(model, "relu", x))
    assert torch.equal(both["relu"], torch.relu(x))
    assert torch.equal(both["head"], model(x))
    with LayerHooks(model, ["relu", "head"], stop_early=True) as hooks:
        hooks.run(x)
    assert hooks.calls == {"relu": 2, "head": 1}
    assert_no_hooks(model)


def test_stop_early_copies_only_the_values_it_keeps():
    """A reused module's later calls in a stop_early pass are counted, not cloned: their values are
    dropped (a multi-layer cache of a ResNet block's relu copied its second activation each batch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Clones(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Clones.count += func is torch.ops.aten.clone.default
            return func(*args, **(kwargs or {}))

    class Thrice(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu, self.head = nn.ReLU(), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.relu(self.relu(self.relu(x) - 1.0) + 2.0))

    model, x = seeded(Thrice()), torch.randn(4, 3)
    with Clones(), LayerHooks(model, ["relu", "head"], stop_early=True) as hooks:
        hooks.run(x)
    assert hooks.calls == {"relu": 3, "head": 1}
    assert Clones.count == 3  # the input's copy (run() protects it), relu's first call and head's
    assert torch.equal(hooks["relu"], torch.relu(x))


def test_batchnorm_train_mode_is_captured_in_eval_and_flags_restored():
    model = seeded(BNModel()).train()
    model.drop.eval()  # a mixed state that model.train(True) would destroy
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    stats = (
        model.bn.running_mean.clone(),
        model.bn.running_var.clone(),
        model.bn.num_batches_tracked.clone(),
    )
    before = training_flags(model)
    x = torch.randn(4, 3, 5, 5)

    z = capture(model, ["bn", "relu"], x)
    assert training_flags(model) == before
    assert torch.equal(model.bn.running_mean, stats[0])
    assert torch.equal(model.bn.running_var, stats[1])
    assert torch.equal(model.bn.num_batches_tracked, stats[2])
    conv = model.conv(x)
    bn = F.batch_norm(
        conv, stats[0], stats[1], model.bn.weight, model.bn.bias, False, 0.0, model.bn.eps
    )
    assert torch.allclose(z["bn"], bn, atol=1e-6)
    assert torch.equal(z["relu"], z["bn"].relu())  # dropout off in eval mode

    # eval_mode=False leaves the model as it is: batch statistics, running stats updated.
    capture(model, "bn", x, eval_mode=False)
    assert not torch.equal(model.bn.running_mean, stats[0])
    assert training_flags(model) == before


# --------------------------------------------------------------------------------------------
# Hook hygiene after every kind of call
# --------------------------------------------------------------------------------------------


def _raising_model(exc: BaseException) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Raiser(exc), nn.ReLU())
    return seeded(model)


@pytest.mark.parametrize("input_side", [False, True])
@pytest.mark.parametrize(
    "case", ["normal", "bad_name", "runtime_error", "keyboard_interrupt", "not_run"]
)
def test_no_hook_left_and_flags_unchanged(case, input_side):
    x = torch.randn(2, 3, 5, 5)
    if case in ("runtime_error", "keyboard_interrupt"):
        exc = RuntimeError("boom") if case == "runtime_error" else KeyboardInterrupt()
        model = _raising_model(exc)
    else:
        model = seeded(CountingCNN())
        model.extra = nn.Linear(2, 2)  # registered but unused by forward
    model.train()
    # A submodule in eval mode inside a model in train mode: a mixed state to restore exactly.
    (model[1] if isinstance(model, nn.Sequential) else model.features[1]).eval()
    before = training_flags(model)
    assert_no_hooks(model)

    kwargs = {"attribute_to_layer_input": input_side, "stop_early": False}
    if case == "normal":
        capture(model, ["features.0", "fc", ""], x, **kwargs)
        with LayerHooks(model, "features.2", attribute_to_layer_input=input_side) as hooks:
            model(x)
        assert hooks.values["features.2"].shape[0] == 2
    elif case == "bad_name":
        with pytest.raises(ValueError, match="did you mean"):
            capture(model, ["features.0", "featurs.2"], x, **kwargs)
    elif case == "runtime_error":
        with pytest.raises(RuntimeError, match="boom"):
            capture(model, ["0", "1", "3"], x, **kwargs)
    elif case == "keyboard_interrupt":
        with pytest.raises(KeyboardInterrupt):
            capture(model, ["0", "3"], x, **kwargs)
        with pytest.raises(KeyboardInterrupt), LayerHooks(model, ["0", "3"]):
            model(x)
    else:
        with pytest.raises(ValueError, match=r"'extra' did not run.*model\.forward"):
            capture(model, ["fc", "extra"], x, **kwargs)
    assert_no_hooks(model)
    assert training_flags(model) == before


def test_user_hooks_survive(cnn, x):
    seen = []
    handle = cnn.fc.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    capture(cnn, "fc", x)
    assert seen == [(2, 5)]
    assert len(cnn.fc._forward_hooks) == 1
    handle.remove()
    assert_no_hooks(cnn)


@pytest.mark.parametrize(
    "register",
    [
        lambda m: m.register_forward_hook(lambda *a: None),
        lambda m: m.register_forward_pre_hook(lambda *a: None),
        lambda m: m.register_full_backward_hook(lambda *a: None),
        lambda m: m.register_full_backward_pre_hook(lambda *a: None),
    ],
)
def test_assert_no_hooks_detects_each_kind(register):
    model = nn.Sequential(nn.Linear(2, 2))
    handle = register(model[0])
    with pytest.raises(AssertionError, match="hooks left"):
        assert_no_hooks(model)
    handle.remove()
    assert_no_hooks(model)


def test_layer_hooks_reentry_and_reuse(cnn, x):
    hooks = LayerHooks(cnn, ["fc", "fc", cnn.fc, "pool"])  # duplicates dropped
    assert hooks.names == ["fc", "pool"]
    with hooks:
        with pytest.raises(RuntimeError, match="already active"):
            hooks.__enter__()
        cnn(x)
    assert_no_hooks(cnn)
    assert list(hooks.values) == ["fc", "pool"]
    assert torch.equal(hooks[cnn.fc], hooks["fc"])  # values stay readable after the block
    with pytest.raises(KeyError, match="not hooked"):
        hooks["features.0"]
    with hooks:  # may be entered again after leaving; values start empty
        assert hooks.values == {} and hooks.missing() == ["fc", "pool"]
        with pytest.raises(KeyError, match="has not run yet"):
            hooks["fc"]
        cnn(x)
    assert_no_hooks(cnn)
    assert "inactive" in repr(hooks)


# --------------------------------------------------------------------------------------------
# resolve_layer and argument errors
# --------------------------------------------------------------------------------------------


def test_resolve_layer(cnn):
    assert resolve_layer(cnn, "features.2") == ("features.2", cnn.features[2])
    assert resolve_layer(cnn, cnn.features[1]) == ("features.1", cnn.features[1])
    assert resolve_layer(cnn, "") == ("", cnn)
    assert resolve_layer(cnn, cnn) == ("", cnn)


def test_second_place_of_a_shared_module_warns(recwarn):
    """One nn.ReLU at positions 1 and 3: the name "3" silently read position 1's activation (hooks fire
    at a module's first call), and a fit recorded "3"."""
    act = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, nn.Conv2d(4, 4, 3, stride=2, padding=1), act)
    with pytest.warns(UserWarning, match=r"layer '3' is the module at '1' too.*runs more than once.*a module of its own") as info:
        assert resolve_layer(model, "3") == ("3", act)
    assert info[0].filename == __file__  # the user's line
    with pytest.warns(UserWarning, match="module at '1' too"):
        capture(model, "3", torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match="module at '1' too"):  # a compiled model's "3" is its _orig_mod's
        resolve_layer(torch.compile(model, backend="eager"), "3")
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    nested = nn.Sequential(nn.Identity(), block, block)  # a path through the second position of a shared block
    with pytest.warns(UserWarning, match=r"layer '2\.1' is the module at '1\.1' too"):
        resolve_layer(nested, "2.1")
    recwarn.clear()
    assert resolve_layer(model, "1") == ("1", act) and resolve_layer(model, act) == ("1", act)

    class SharedByAttribute(nn.Module):  # registered first as an attribute; its first position is its first call
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), self.act, nn.Conv2d(4, 4, 3, padding=1), self.act)

        def forward(self, x):
            return self.features(x)

    shared = SharedByAttribute()
    assert resolve_layer(shared, "features.1")[1] is shared.act and resolve_layer(shared, "act")[1] is shared.act
    assert not recwarn.list  # first positions, the module itself, an attribute alias: no warning
    with pytest.warns(UserWarning, match=r"layer 'features\.3' is the module at 'features\.1' too"):
        resolve_layer(shared, "features.3")


def test_an_attention_out_proj_gets_the_way_to_read_it():
    """nn.MultiheadAttention uses its out_proj's weights without calling it: "check that it is used in
    model.forward" pointed the wrong way."""
    block = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    with pytest.raises(ValueError, match=r"never calls it: hook the attention, 'self_attn', with selector=0"):
        capture(block, "self_attn.out_proj", torch.randn(2, 5, 8))
    assert capture(block, "self_attn", torch.randn(2, 5, 8), selector=0).shape == (2, 5, 8)


def test_unknown_name_suggests_close_matches(cnn):
    with pytest.raises(ValueError, match=r"'features\.20'.*did you mean 'features\.2'") as info:
        resolve_layer(cnn, "features.20")
    msg = str(info.value)
    assert "'features' has children: 0, 1, 2, 3" in msg
    assert "[n for n, _ in model.named_modules()]" in msg
    with pytest.raises(ValueError, match="did you mean 'pool'"):
        capture(cnn, "pol", torch.randn(1, 3, 5, 5))


def test_module_not_in_model(cnn):
    other = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match="not a submodule of the model CountingCNN"):
        resolve_layer(cnn, other)
    with pytest.raises(ValueError, match="not a submodule"):
        capture(cnn, [other], torch.randn(1, 3, 5, 5))
    assert_no_hooks(cnn)


@pytest.mark.parametrize("bad", [3, None, 1.0, torch.zeros(1)])
def test_bad_layer_type(cnn, bad):
    with pytest.raises(TypeError, match="layer must be an nn.Module or a dotted name"):
        resolve_layer(cnn, bad)
    with pytest.raises(TypeError, match="layer"):
        capture(cnn, bad, torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        resolve_layer(lambda t: t, "fc")
    with pytest.raises(ValueError, match="layers is empty"):
        LayerHooks(cnn, [])


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def test_grad_keeps_graph(cnn, x):
    xg = x.clone().requires_grad_(True)
    z = capture(cnn, "features.0", xg, grad=True)
    assert z.grad_fn is not None
    with torch.no_grad():  # grad=True re-enables gradients inside (Captum contract item 6)
        z2 = capture(cnn, "features.2", xg, grad=True)
    z2.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert cnn.features[0].weight.grad is not None
    # The default detaches, and runs without building a graph.
    assert capture(cnn, "features.0", xg).grad_fn is None
    assert not capture(cnn, "features.0", xg).requires_grad
    assert_no_hooks(cnn)


def test_grad_keeps_graph_inside_a_callers_inference_mode(cnn, x):
    """inference_mode records no graph even with gradients enabled: grad=True gave tensors without
    one there. It now keeps the graph, also for inputs made in the block (inference tensors)."""
    xg = x.clone().requires_grad_(True)
    capture(cnn, "features.2", xg, grad=True).sum().backward()
    expected, xg.grad = xg.grad, None
    expected_weight, cnn.features[0].weight.grad = cnn.features[0].weight.grad, None
    with torch.inference_mode():
        z = capture(cnn, "features.2", xg, grad=True)
        made_here = x.clone()
        w = capture(cnn, "features.2", made_here, grad=True)
        assert torch.is_inference_mode_enabled() and z.grad_fn is not None and w.grad_fn is not None
    z.sum().backward()
    assert torch.equal(xg.grad, expected) and torch.equal(cnn.features[0].weight.grad, expected_weight)
    cnn.zero_grad(set_to_none=True)
    w.sum().backward()  # the copy of the inference input sat in the graph, in its place
    assert torch.equal(cnn.features[0].weight.grad, expected_weight)
    assert not made_here.requires_grad
    assert_no_hooks(cnn)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated
def test_a_torchscript_model_or_block_is_refused_with_a_type_error_naming_it():
    """A TorchScript module runs no forward hooks: a traced model said "layer '0' did not run", a scripted
    one raised a raw RuntimeError ("get_submodule is not supported"), a scripted block hooked by module too."""
    net, x = seeded(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))), torch.randn(3, 4)
    traced = torch.jit.trace(net, x)
    with pytest.raises(TypeError, match="model is .*TorchScript.*original nn.Module"):
        capture(traced, "0", x)
    with pytest.raises(TypeError, match="model is .*TorchScript"):
        capture(torch.jit.script(net), "0", x)
    wrapper = nn.Sequential(torch.jit.trace(net, x), nn.Identity())
    with pytest.raises(TypeError, match="layer '0.0' is .*TorchScript"):
        capture(wrapper, "0.0", x)
    with pytest.raises(TypeError, match="layer is .*TorchScript"):
        capture(wrapper, wrapper[0], x)
    assert torch.equal(capture(wrapper, "1", x), net(x))  # a Python layer after a scripted block still reads


def test_hooks_are_indexed_by_module_when_hooked_by_an_alias_name():
    """A module kept under two names (``self.backbone = self.body``) hooked by its second name: indexing the
    hooks by the module resolved its first name and said it was not hooked."""

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(3, 3), nn.Linear(3, 2)
            self.backbone = self.body

        def forward(self, x):
            return self.head(self.backbone(x))

    model, x = seeded(Aliased()), torch.randn(2, 3)
    with LayerHooks(model, "backbone") as hooks:
        model(x)
    assert torch.equal(hooks[model.backbone], model.body(x)) and torch.equal(hooks["backbone"], model.body(x))
    with pytest.raises(KeyError, match="'head' is not hooked"):
        hooks[model.head]


def test_replacing_a_keyword_input_that_is_no_tensor_is_named_as_capture_names_it():
    """A keyword passed as None (mask=None) failed inside the hook with "'NoneType' object has no
    attribute 'shape'"."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x, *, mask=None):
            return self.linear(x if mask is None else x * mask)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Head()

        def forward(self, x):
            return self.head(x, mask=None)

    model, x = Model().eval(), torch.rand(3, 4)
    with pytest.raises(TypeError, match=r"layer 'head': the selected input value is a NoneType, not a tensor"):
        capture(model, "head", x, attribute_to_layer_input=True, selector="mask")
    with pytest.raises(TypeError, match=r"the selected input value is a NoneType, not a tensor"):
        with replace_activation(model.head, torch.ones(3, 4), attribute_to_layer_input=True, selector="mask"):
            model(x)
    assert not model.head._forward_pre_hooks


def test_a_layer_that_never_runs_for_its_kind_says_what_to_hook():
    """A ModuleList, or a block a torch.fx graph inlined, "did not run; check that it is used in
    model.forward", though it was."""
    import torch.fx

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model, x = Blocks().eval(), torch.rand(3, 4)
    for wrapped, name in ((model, "blocks"), (nn.DataParallel(model), "module.blocks")):
        with pytest.raises(ValueError, match=r"it is a ModuleList, a container without a forward of its own: hook one "
                                             rf"of its modules, e.g. '{name}.0'"):
            capture(wrapped, name, x)
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"a torch.fx GraphModule .* calls only the leaf modules"):
        capture(traced, "0", x)
    assert torch.equal(capture(traced, "0.1", x), torch.relu(traced.get_submodule("0.0")(x)))


def test_hooks_detach_their_values_unless_asked_to_keep_the_graph():
    """With gradients on, a captured value kept the model's graph alive (its memory) unless detached,
    as documented for detach=True; detach=False keeps it for a loss on the layer."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.randn(2, 4)
    for detach in (True, False):
        with LayerHooks(model, "0", detach=detach) as hooks:
            model(x)
            value = hooks["0"]
        assert value.requires_grad is not detach and (value.grad_fn is None) is detach
