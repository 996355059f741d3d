"""A faster CPU evaluation of the coupling subnets: the same float32 maths on oneDNN matmuls.

The subnets of :class:`~captum_inn.inn.AffineCoupling` are plain MLPs (``Linear`` and
``LeakyReLU`` layers). Almost all of a flow's training time on a CPU is their matrix products. The
BLAS that PyTorch calls for ``nn.Linear`` on the CPU (MKL) can be much slower than oneDNN, which
PyTorch ships as well. On AMD CPUs MKL runs its AVX2 code, about 2.4x slower per product than
oneDNN's AVX-512 code on a Zen 5 core. :func:`subnet_forward` evaluates such an MLP on oneDNN
(``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor uses for CPU linears, with the
LeakyReLU fused as a post-op) inside one autograd node with a hand-written backward:

- every product is an IEEE float32 product (oneDNN's default strict fp32 mode, no bf16/tf32
  down-conversion). Results differ from MKL's only in rounding (summation order).
- the backward skips the gradient of the condition columns of the first layer when the condition
  does not need one (a fixed embedding), a product ``nn.Linear`` on ``cat([x_a, c])`` always computes.

The fast path is taken only where it computes exactly what the modules would, for float32 CPU
tensors without autocast, functorch transforms, forward-mode AD (dual tensors), tracing, module hooks
or a changed subnet structure.
Otherwise the subnet runs as a normal module. Its backward is once-differentiable: a backward pass
with ``create_graph=True`` through it (a Hessian, a gradient penalty) raises.

The path is the default only on CPUs with AVX-512 (``torch.backends.cpu.get_cpu_capability()``):
on an AVX2-only AMD EPYC oneDNN's products were slower than MKL's and a flow step took 11% longer
(``benchmarks/README.md``). The environment variable ``CAPTUM_INN_ONEDNN`` overrides the choice:
``1`` takes the path wherever the kernel works, ``0`` never takes it.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules import module as _module

__all__ = ["subnet_forward", "fast_path_enabled", "kernel_available"]

_STATE: dict = {}


def fast_path_enabled() -> bool:
    """Whether subnets take the oneDNN path here: the kernel works and the CPU or the environment
    asks for it (checked once)."""
    enabled = _STATE.get("enabled")
    if enabled is None:
        enabled = _STATE["enabled"] = _probe()
    return enabled


def kernel_available() -> bool:
    """Whether this PyTorch build has a working oneDNN linear kernel (checked once)."""
    available = _STATE.get("available")
    if available is None:
        available = _STATE["available"] = _kernel_works()
    return available


def _cpu_favours_onednn() -> bool:
    # measured (benchmarks/README.md): with AVX-512 a flow step on oneDNN is 1.5x FrEIA's on MKL;
    # with AVX2 only, 11% slower than the module path
    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def _probe() -> bool:
    setting = os.environ.get("CAPTUM_INN_ONEDNN", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting not in ("1", "true", "yes", "on") and not _cpu_favours_onednn():
        return False
    return kernel_available()


def _kernel_works() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        # float32 and no autocast whatever the first caller's context: the answer is kept for the process
        with torch.autocast("cpu", enabled=False):
            x, w, b = (torch.randn(*s, generator=g, dtype=torch.float32) for s in ((5, 7), (3, 7), (3,)))
            y = op(x, w, b, "leaky_relu", [0.2], "")
            ok = y.shape == (5, 3) and torch.allclose(y, F.leaky_relu(F.linear(x, w, b), 0.2), atol=1e-5)
            gw = op(y.t(), x.t(), None, "none", [], "")  # transposed (strided) operands, as in the backward
            ok = ok and torch.allclose(gw, y.t() @ x, atol=1e-5)
        _STATE["op"] = op
        return bool(ok)
    except Exception:  # an older or CPU-only build without the kernel: keep the module path
        return False


def _plan(subnet: nn.Module) -> Optional[List[Tuple[nn.Linear, Optional[float]]]]:
    """``[(linear, slope of the LeakyReLU after it or None)]`` for a hook-free ``Linear (LeakyReLU Linear)*``."""
    if type(subnet) is not nn.Sequential or len(subnet) % 2 == 0:
        return None
    layers = list(subnet)
    plan = []
    for i, layer in enumerate(layers):
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks:
            return None
        if i % 2 == 0:
            if type(layer) is not nn.Linear:
                return None
            plan.append([layer, None])
        else:
            if type(layer) is not nn.LeakyReLU or not layer.negative_slope > 0:
                return None  # the backward reads the sign of the input from the output: slope > 0
            plan[-1][1] = float(layer.negative_slope)
    if subnet._forward_hooks or subnet._forward_pre_hooks or subnet._backward_hooks or subnet._backward_pre_hooks:
        return None
    return [(lin, slope) for lin, slope in plan]


def _inputs_allow(x: Tensor, c: Optional[Tensor]) -> bool:
    """Whether the inputs and the calling context allow the oneDNN path (checked before the one-time
    probe, which a first call under autocast or vmap would otherwise have failed for the process)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    if x.shape[0] == 0:  # oneDNN's weight-gradient product has no primitive for an empty batch
        return False
    if c is not None and (c.dtype != torch.float32 or c.device.type != "cpu"):
        return False
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return False
    if torch.is_autocast_enabled("cpu") or torch._C._are_functorch_transforms_active():
        return False
    # forward-mode AD: the oneDNN node has no jvp, so a dual input would fail on the CPUs that take
    # this path and not on the others
    if _is_dual(x) or (c is not None and _is_dual(c)):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return True


def _parameters_allow(plan) -> bool:
    if plan is None:
        return False
    for lin, _ in plan:
        w, b = lin.weight, lin.bias
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.layout != torch.strided:
            return False
        # oneDNN reads a strided bias as if it were contiguous (wrong values, silently)
        if b is not None and (b.dtype != torch.float32 or b.device.type != "cpu" or not b.is_contiguous()):
            return False
        if _is_dual(w) or (b is not None and _is_dual(b)):
            return False
    return True


def _is_dual(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (immediate outside a ``dual_level``)."""
    return forward_ad.unpack_dual(t).tangent is not None


def _dense(t: Tensor) -> Tensor:
    """``t`` itself if it is contiguous or the transpose of a contiguous matrix, else a contiguous copy.

    oneDNN falls back to a reference kernel, thousands of times slower, on other strides (a column
    block of a matrix, e.g. the fixed half ``x[:, :k]``)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _layer(x: Tensor, w: Tensor, b: Optional[Tensor], slope: Optional[float]) -> Tensor:
    op = _STATE["op"]
    x, w = _dense(x), _dense(w)
    if slope is None:
        return op(x, w, b, "none", [], "")
    return op(x, w, b, "leaky_relu", [slope], "")


def _mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` on oneDNN (``b`` may be a strided view)."""
    return _STATE["op"](_dense(a), _dense(b), None, "none", [], "")


class _MLP(torch.autograd.Function):
    """``mlp([fixed, c])`` in one node; inputs: slopes, fixed, c (or None), then weight, bias per layer."""

    @staticmethod
    def forward(ctx, slopes: Sequence[Optional[float]], fixed: Tensor, c: Optional[Tensor], *params: Tensor) -> Tensor:
        u = fixed.contiguous() if c is None else torch.cat([fixed, c], dim=1)
        acts = [u]
        h = u
        for i, slope in enumerate(slopes):
            h = _layer(h, params[2 * i], params[2 * i + 1], slope)
            acts.append(h)
        ctx.slopes = tuple(slopes)
        ctx.n_fixed = fixed.shape[1]
        ctx.has_c = c is not None
        ctx.has_bias = tuple(params[2 * i + 1] is not None for i in range(len(slopes)))
        ctx.save_for_backward(*acts[:-1], *(params[2 * i] for i in range(len(slopes))))
        return h

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            # create_graph=True (a Hessian, a gradient penalty): once_differentiable's error fired only if a
            # second backward walked this node, and torch.autograd.grad dropped the subnet's terms silently
            raise RuntimeError(
                "Second derivatives through a coupling's oneDNN path are not supported (create_graph=True: a "
                "Hessian, a gradient penalty). Set CAPTUM_INN_ONEDNN=0 in the environment before the first INN "
                "runs, and the subnets run as modules, which differentiate twice."
            )
        with torch.no_grad():
            return _MLP._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        n = len(ctx.slopes)
        saved = ctx.saved_tensors
        inputs, weights = saved[:n], saved[n:]
        needs = ctx.needs_input_grad  # (slopes, fixed, c, w0, b0, w1, b1, ...)
        grads: List[Optional[Tensor]] = [None] * (2 * n)
        g = grad.contiguous()
        for i in reversed(range(n)):
            inp, w = inputs[i], weights[i]
            if needs[3 + 2 * i]:
                grads[2 * i] = _mm_t(g.t(), inp.t())
            if needs[4 + 2 * i] and ctx.has_bias[i]:
                grads[2 * i + 1] = g.sum(0)
            if i > 0:
                g = _mm_t(g, w.t())
                slope = ctx.slopes[i - 1]  # the activation that produced this layer's input
                g = torch.ops.aten.leaky_relu_backward(g, inp, slope, True)  # sign read from the output
        w0, k = weights[0], ctx.n_fixed
        grad_fixed = _mm_t(g, w0[:, :k].t()) if needs[1] else None  # column blocks: copied by _dense
        grad_c = _mm_t(g, w0[:, k:].t()) if (ctx.has_c and needs[2]) else None
        return (None, grad_fixed, grad_c, *grads)


def subnet_forward(subnet: nn.Module, fixed: Tensor, c: Optional[Tensor]) -> Tensor:
    """``subnet(cat([fixed, c], 1))`` (or ``subnet(fixed)`` for ``c=None``), on oneDNN where it applies."""
    plan = _plan(subnet) if _inputs_allow(fixed, c) and fast_path_enabled() else None
    if not _parameters_allow(plan):
        return subnet(fixed if c is None else torch.cat([fixed, c], dim=1))
    slopes = [slope for _, slope in plan]
    params = []
    for lin, _ in plan:
        params += [lin.weight, lin.bias]
    needs_grad = torch.is_grad_enabled() and (
        fixed.requires_grad or (c is not None and c.requires_grad) or any(p is not None and p.requires_grad for p in params)
    )
    if not needs_grad:
        h = fixed.contiguous() if c is None else torch.cat([fixed, c], dim=1)
        for (lin, slope) in plan:
            h = _layer(h, lin.weight, lin.bias, slope)
        return h
    return _MLP.apply(slopes, fixed, c, *params)
