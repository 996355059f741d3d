"""The oneDNN evaluation of coupling subnets (captum_inn/inn/_fast.py) computes what the modules
compute: outputs, log-determinants and every gradient agree with the module path in float32, and
it steps aside where it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from captum_inn.inn import AffineCoupling, SequentialFlow, _fast, flow_blocks

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not _fast.kernel_available(), reason="oneDNN linear kernel not available here")


@pytest.fixture(autouse=True)
def fast_path():
    """The fast path on for every test here, also on CPUs where it is not the default."""
    before = _fast._STATE.get("enabled")
    _fast._STATE["enabled"] = True
    yield
    _fast._STATE["enabled"] = before


@pytest.fixture
def module_path():
    """Switch the fast path off inside the block (back on afterwards)."""
    class Switch:
        def __enter__(self):
            _fast._STATE["enabled"] = False

        def __exit__(self, *exc):
            _fast._STATE["enabled"] = True

    yield Switch()


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _run(module, x, c, c_grad):
    x = x.clone().requires_grad_()
    c = None if c is None else c.clone().requires_grad_(c_grad)
    module.zero_grad(set_to_none=True)
    y, logdet = module(x) if c is None else module(x, c)
    weights = torch.linspace(-1, 1, y.shape[1])
    (0.3 * y.pow(2).sum() + logdet.sum() + (y * weights).sum()).backward()
    return y, logdet, x.grad, None if c is None else c.grad, [p.grad for p in module.parameters()]


def _assert_same(fast, reference):
    """Equal up to float32 rounding, measured against each tensor's largest entry (summation order
    differs between the BLAS libraries, and random flows have gradients spanning many magnitudes)."""
    pairs = list(zip(fast[:4], reference[:4])) + list(zip(fast[4], reference[4]))
    for a, b in pairs:
        assert (a is None) == (b is None)
        if a is not None:
            error = float((a - b).detach().abs().max())
            assert error <= 1e-4 * float(b.detach().abs().max()) + 1e-6, error


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("dim,cond_dim,clamp", [(2, 0, 1.0), (5, 3, 1.5), (8, 3, 1.0), (8, 0, 0.7)])
@pytest.mark.parametrize("c_grad", [True, False])
def test_coupling_matches_the_module_path(module_path, parity, dim, cond_dim, clamp, c_grad):
    coupling = AffineCoupling(dim, hidden=16, cond_dim=cond_dim, parity=parity, clamp=clamp)
    _randomise(coupling)
    x = torch.randn(7, dim, generator=torch.Generator().manual_seed(1))
    c = torch.randn(7, cond_dim, generator=torch.Generator().manual_seed(2)) if cond_dim else None
    fast = _run(coupling, x, c, c_grad)
    with module_path:
        reference = _run(copy.deepcopy(coupling), x, c, c_grad)
    _assert_same(fast, reference)


@pytest.mark.parametrize("depth,batch,cond_dim", [(3, 9, 5), (1, 1, 0), (2, 64, 4)])
def test_flow_matches_the_module_path(module_path, depth, batch, cond_dim):
    flow = SequentialFlow(flow_blocks(16, 3, hidden=32, depth=depth, cond_dim=cond_dim))
    args = (torch.randn(32, cond_dim),) if cond_dim else ()
    with torch.no_grad():
        flow(torch.randn(32, 16), *args)  # ActNorm initialisation
    _randomise(flow)
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(3))
    c = torch.randn(batch, cond_dim, generator=torch.Generator().manual_seed(4)) if cond_dim else None
    fast = _run(flow, x, c, True)
    with module_path:
        reference = _run(copy.deepcopy(flow), x, c, True)
    _assert_same(fast, reference)


def test_frozen_parameters_and_inverse(module_path):
    flow = SequentialFlow(flow_blocks(16, 2, hidden=32, cond_dim=4))
    c = torch.randn(6, 4)
    with torch.no_grad():
        flow(torch.randn(32, 16), torch.randn(32, 4))
    _randomise(flow)
    flow.requires_grad_(False)
    x = torch.randn(6, 16, requires_grad=True)
    y, logdet = flow(x, c)
    logdet.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in flow.parameters())
    with torch.no_grad():
        back, logdet_rev = flow(y, c, rev=True)
    scale = max(1.0, float(y.detach().abs().max()))
    assert torch.allclose(back, x, atol=2e-4 * scale) and torch.allclose(logdet, -logdet_rev, atol=1e-3)


def test_steps_aside_for_hooks_float64_and_when_switched_off(monkeypatch):
    coupling = AffineCoupling(6, hidden=8, cond_dim=2)
    calls = []
    coupling.subnet[0].register_forward_hook(lambda *args: calls.append(1))
    coupling(torch.randn(3, 6), torch.randn(3, 2))
    assert calls == [1]  # a hooked subnet runs as a module, so its hooks fire
    plain = AffineCoupling(6, hidden=8).double()
    y, _ = plain(torch.randn(3, 6, dtype=torch.float64))
    assert y.dtype == torch.float64
    monkeypatch.setenv("CAPTUM_INN_ONEDNN", "0")
    assert _fast._probe() is False


@pytest.mark.parametrize("capability, setting, expected", [
    ("AVX512", "", True), ("AVX2", "", False), ("DEFAULT", "", False),  # by default: AVX-512 only
    ("AVX2", "1", True), ("AVX512", "0", False), ("AVX512", "off", False),  # the environment overrides
])
def test_default_follows_the_cpu_and_the_environment_overrides(monkeypatch, capability, setting, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("CAPTUM_INN_ONEDNN", setting)
    assert _fast._probe() is expected


def test_double_backward_raises_instead_of_a_wrong_result():
    coupling = AffineCoupling(6, hidden=8, cond_dim=2)
    _randomise(coupling)
    x = torch.randn(4, 6, requires_grad=True)
    y, _ = coupling(x, torch.randn(4, 2))
    # with torch.autograd.grad the second derivative dropped the subnet's terms silently (a wrong
    # Hessian-vector product, an all-zero Hessian of a coupling's log-determinant)
    with pytest.raises(RuntimeError, match="Second derivatives through a coupling's oneDNN path.*CAPTUM_INN_ONEDNN=0"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    y, _ = coupling(x, torch.randn(4, 2))
    (grad,) = torch.autograd.grad(y.pow(2).sum(), x)  # first derivatives as before
    assert torch.isfinite(grad).all()


# torch's forward AD loads its jvp decompositions with torch.jit.script on first use, which warns
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_mode_ad_takes_the_module_path(module_path):
    """A dual input (forward-mode AD) gives the module path's tangent on every CPU: the oneDNN node
    has no jvp, so taking it would fail only where the fast path is the default."""
    import torch.autograd.forward_ad as fwAD

    flow = SequentialFlow(flow_blocks(6, 2, hidden=8, cond_dim=2))
    _randomise(flow)
    x, tangent, c = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 2)

    def jvp():
        with fwAD.dual_level():
            y, _ = flow(fwAD.make_dual(x, tangent), c)
            return fwAD.unpack_dual(y).tangent

    fast = jvp()  # the fast path is on (fixture)
    with module_path:
        reference = jvp()
    assert fast is not None and torch.allclose(fast, reference, atol=1e-5)
    # a dual condition alone steps aside as well
    with fwAD.dual_level():
        y, _ = flow(x, fwAD.make_dual(c, torch.ones_like(c)))
        assert fwAD.unpack_dual(y).tangent is not None


def test_empty_batch_takes_the_module_path():
    """An empty batch backpropagates as on the module path (oneDNN's weight-gradient product of
    an empty batch failed, so only CPUs taking the fast path raised)."""
    coupling = AffineCoupling(4, hidden=8, cond_dim=2)
    _randomise(coupling)
    x = torch.randn(0, 4, requires_grad=True)
    y, logdet = coupling(x, torch.randn(0, 2))
    (y.sum() + logdet.sum()).backward()
    assert x.grad.shape == (0, 4)
    assert all(p.grad is not None and not p.grad.any() for p in coupling.parameters())


def test_a_strided_bias_takes_the_module_path(module_path):
    """oneDNN read a non-contiguous bias as if it were contiguous: outputs off by hundreds, silently."""
    coupling = AffineCoupling(6, hidden=8, cond_dim=2)
    _randomise(coupling)
    x, c = torch.randn(4, 6), torch.randn(4, 2)
    with module_path:
        expected = coupling(x, c)[0]
    with torch.no_grad():
        for layer in coupling.subnet[::2]:  # the same values, stored with stride 2
            layer.bias = torch.nn.Parameter(torch.stack([layer.bias, torch.full_like(layer.bias, 99.0)], 1).reshape(-1)[::2])
    assert not coupling.subnet[0].bias.is_contiguous()
    assert torch.allclose(coupling(x, c)[0], expected, atol=1e-5)


@pytest.mark.parametrize("context", ["autocast", "float64 default"])
def test_a_first_call_under_autocast_or_another_default_dtype_does_not_switch_the_path_off(monkeypatch, context):
    """The one-time probe ran in the first caller's context and failed there (a bfloat16 reference, a
    float64 tensor oneDNN has no kernel for), which kept the module path for the whole process."""
    monkeypatch.setenv("CAPTUM_INN_ONEDNN", "1")
    for key in ("enabled", "available"):
        monkeypatch.delitem(_fast._STATE, key, raising=False)
    coupling = AffineCoupling(6, hidden=8)
    if context == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            coupling(torch.randn(4, 6))
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            assert _fast._kernel_works()
        finally:
            torch.set_default_dtype(default)
    assert _fast.fast_path_enabled() and _fast.kernel_available()
