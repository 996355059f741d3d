"""Property tests (hypothesis) of the invertible core: for random dimensions, depths, batch sizes
(including 1), conditions and dtypes, flows invert within tolerance, give finite log-determinants,
and are deterministic under a seed."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captum_inn.inn import ConditionalINN, FactorINN, SequentialFlow, flow_blocks

torch.set_num_threads(1)

TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9}
# derandomize: the same examples on every run, so CI never fails on a draw nobody can reproduce
COMMON = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _scale(*tensors: torch.Tensor) -> float:
    """Round-off in the largest value the map passes through propagates back through the inverse, so
    the inversion tolerance is relative to it (random subnets can expand inputs a hundredfold)."""
    return max(1.0, *(float(t.abs().max()) for t in tensors))


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Give every parameter a random value (zero-initialised subnets would make the tests vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _initialise(module: torch.nn.Module, dim: int, dtype: torch.dtype, cond=None) -> None:
    """ActNorm's data-dependent initialisation on a real batch of 16 (never a batch of one)."""
    x = torch.randn(16, dim, dtype=dtype, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        module(x) if cond is None else module(x, cond(16))


dims = st.integers(min_value=2, max_value=9)
depths = st.integers(min_value=1, max_value=4)
batches = st.integers(min_value=1, max_value=6)
dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(min_value=0, max_value=2**16)


@COMMON
@given(dim=dims, depth=depths, batch=batches, dtype=dtypes, seed=seeds, clamp=st.floats(0.5, 2.0))
def test_unconditional_flow_inverts(dim, depth, batch, dtype, seed, clamp):
    torch.manual_seed(seed)  # subnet weights come from the global RNG; hypothesis replays must match
    flow = SequentialFlow(flow_blocks(dim, depth, hidden=16, clamp=clamp, seed=seed)).to(dtype)
    _initialise(flow, dim, dtype)
    _randomise(flow, seed)
    x = torch.randn(batch, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y, logdet = flow(x)
        back, logdet_rev = flow(y, rev=True)
    assert y.shape == x.shape and logdet.shape == (batch,)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert torch.allclose(back, x, atol=TOLERANCE[dtype] * _scale(x, y))
    assert torch.allclose(logdet, -logdet_rev, atol=TOLERANCE[dtype] * dim * depth * 10)


@COMMON
@given(dim=dims, depth=depths, batch=batches, dtype=dtypes, seed=seeds,
       cond_shape=st.sampled_from([(3,), (7,), (2, 5, 5), (4, 8, 3)]))
def test_conditional_inn_inverts_for_any_condition(dim, depth, batch, dtype, seed, cond_shape):
    torch.manual_seed(seed)
    inn = ConditionalINN(dim, cond_shape, n_blocks=depth, hidden=16, embed_dim=6, seed=seed,
                         conv_width=4, conv_max_width=8).to(dtype)

    def cond(n: int, s: int = seed) -> torch.Tensor:
        return torch.randn(n, *cond_shape, dtype=dtype, generator=torch.Generator().manual_seed(s + 1))

    _initialise(inn, dim, dtype, cond)
    _randomise(inn, seed)
    x = torch.randn(batch, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    c = cond(batch)
    with torch.no_grad():
        v, logdet = inn(x, c)
        back = inn(v, c, rev=True)[0]
        other = inn(x, cond(batch, seed + 7))[0]
    assert torch.isfinite(v).all() and torch.isfinite(logdet).all()
    assert torch.allclose(back, x, atol=TOLERANCE[dtype] * _scale(x, v))
    assert not torch.allclose(v, other)  # the condition matters


@COMMON
@given(dim=st.integers(min_value=3, max_value=9), depth=depths, batch=batches, dtype=dtypes, seed=seeds)
def test_factor_inn_split_merge_and_inverse(dim, depth, batch, dtype, seed):
    torch.manual_seed(seed)
    e = FactorINN(dim, {"a": 1, "b": dim - 2}, n_blocks=depth, hidden=16, seed=seed).to(dtype)
    _initialise(e, dim, dtype)
    _randomise(e, seed)
    x = torch.randn(batch, dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y, logdet = e(x)
        assert torch.equal(e.merge(e.split(y)), y)
        back = e(y, rev=True)[0]
    assert torch.isfinite(logdet).all()
    assert torch.allclose(back, x, atol=TOLERANCE[dtype] * _scale(x, y))


@COMMON
@given(dim=dims, depth=depths, seed=seeds)
def test_same_seed_same_flow(dim, depth, seed):
    outputs = []
    for _ in range(2):
        torch.manual_seed(seed)
        inn = ConditionalINN(dim, (4,), n_blocks=depth, hidden=16, embed_dim=6, seed=seed)
        _initialise(inn, dim, torch.float32, lambda n: torch.ones(n, 4))
        x = torch.randn(3, dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            outputs.append(inn(x, torch.ones(3, 4))[0])
    assert torch.equal(outputs[0], outputs[1])
