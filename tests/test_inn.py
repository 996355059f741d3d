"""Deep tests of every invertible component (DESIGN.md §6, the zuko habit).

Every case randomises all parameters first (a zero-initialised subnet makes a coupling the
identity and the test vacuous), then checks in float64: inversion, the log-determinant against
``slogdet`` of the autograd Jacobian, forward = −reverse log-determinant, gradients for every
parameter, exact save/load (through safetensors, the checkpoint format) and batch size 1.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load, save

from captum_inn.inn import (
    ActNorm,
    AffineCoupling,
    ConditionalINN,
    FactorINN,
    NotInitializedError,
    Permutation,
    SequentialFlow,
    factor_sizes_from_scores,
    flow_blocks,
)

torch.set_num_threads(1)

EMBED = 6


def _embedding(n, gen):
    return torch.randn(n, EMBED, generator=gen, dtype=torch.float64)


def _vector_condition(n, gen):
    return torch.randn(n, 7, generator=gen, dtype=torch.float64) * 3 + 1


def _map_condition(n, gen):
    return torch.randn(n, 3, 9, 6, generator=gen, dtype=torch.float64)


# name -> (factory(dim) -> module, condition(n, gen) -> tensor or None, input shape(dim))
COMPONENTS = {
    "actnorm": (lambda d: ActNorm(d), None, lambda d: (d,)),
    # channels share their scale over the spatial positions: (2, d/2, 1) or (1, d, 1) maps
    "actnorm_feature_map": (lambda d: ActNorm(2 - d % 2), None, lambda d: (2 - d % 2, d // (2 - d % 2), 1)),
    "coupling": (lambda d: AffineCoupling(d, hidden=16, parity=0), None, lambda d: (d,)),
    "coupling_other_half": (lambda d: AffineCoupling(d, hidden=16, parity=1, clamp=2.0), None, lambda d: (d,)),
    "coupling_conditional": (
        lambda d: AffineCoupling(d, hidden=16, cond_dim=EMBED), _embedding, lambda d: (d,)
    ),
    "permutation": (lambda d: Permutation(d, seed=1), None, lambda d: (d,)),
    "sequential": (lambda d: SequentialFlow(flow_blocks(d, 2, hidden=16, cond_dim=EMBED)), _embedding, lambda d: (d,)),
    "conditional_inn_vector": (
        lambda d: ConditionalINN(d, (7,), n_blocks=2, hidden=16, embed_dim=5), _vector_condition, lambda d: (d,)
    ),
    "conditional_inn_feature_map": (
        lambda d: ConditionalINN(d, (3, 9, 6), n_blocks=2, hidden=16, embed_dim=5), _map_condition, lambda d: (d,)
    ),
    "factor_inn": (lambda d: FactorINN(d, {"a": 1}, n_blocks=2, hidden=16), None, lambda d: (d,)),
}


def _randomise_(module: torch.nn.Module, gen: torch.Generator, std: float = 0.4) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def _build(name, dim, device, seed=0):
    factory, condition, shape = COMPONENTS[name]
    gen = torch.Generator().manual_seed(seed)
    module = factory(dim).double().to(device)
    init_x = (torch.randn(16, *shape(dim), generator=gen, dtype=torch.float64) * 2 + 0.5).to(device)
    init_c = condition(16, gen).to(device) if condition else None
    module(init_x, init_c)  # data-dependent initialisation on a real forward batch
    _randomise_(module, gen)
    x = torch.randn(5, *shape(dim), generator=gen, dtype=torch.float64).to(device)
    c = condition(5, gen).to(device) if condition else None
    return module, x, c


def _one(c, i):
    return None if c is None else c[i : i + 1]


@pytest.mark.parametrize("dim", [2, 3, 5, 8])
@pytest.mark.parametrize("name", list(COMPONENTS))
def test_invertible_component(name, dim, device):
    module, x, c = _build(name, dim, device)
    y, logdet = module(x, c)
    assert logdet.shape == (x.shape[0],)
    if name != "permutation":
        assert (y - x).abs().max() > 1e-3, "randomised component must not be the identity"

    # inverse(forward(x)) == x
    x_back, logdet_rev = module(y, c, rev=True)
    assert (x_back - x).abs().max() < 1e-10

    # forward log-det == −reverse log-det at matching points
    assert torch.allclose(logdet, -logdet_rev, rtol=0, atol=1e-10)

    # log-det == slogdet of the autograd Jacobian, per sample, both directions (batch of one)
    for i in range(x.shape[0]):
        def fwd(xi, i=i):
            return module(xi.unsqueeze(0), _one(c, i))[0].reshape(-1)

        def rev(yi, i=i):
            return module(yi.unsqueeze(0), _one(c, i), rev=True)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(fwd, x[i])
        jac = jac.reshape(jac.shape[0], -1)
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        assert abs(float(logabs) - float(logdet[i].detach())) < 1e-8
        jac_rev = torch.autograd.functional.jacobian(rev, y[i]).reshape(jac.shape)
        assert abs(float(torch.linalg.slogdet(jac_rev)[1]) - float(logdet_rev[i].detach())) < 1e-8

    # batch size 1 after initialisation gives the same as within a batch
    y0, ld0 = module(x[:1], _one(c, 0))
    assert torch.allclose(y0, y[:1], rtol=0, atol=1e-12)
    assert torch.allclose(ld0, logdet[:1], rtol=0, atol=1e-12)

    # every parameter receives a gradient from the likelihood loss
    module.zero_grad()
    x_grad = x.clone().requires_grad_(True)  # lets parameter-free blocks backpropagate too
    y, logdet = module(x_grad, c)
    nll = (0.5 * y.reshape(y.shape[0], -1).pow(2).sum(1) - logdet).mean()
    nll.backward()
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all()
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"

    # the condition matters for conditional components
    if c is not None:
        y_other, _ = module(x, c.flip(0) + 1.0)
        assert (y_other - y).abs().max() > 1e-6

    # save/load of the state dict (through safetensors, the checkpoint format) reproduces exactly
    blob = save({k: v.contiguous() for k, v in module.state_dict().items()})
    fresh = COMPONENTS[name][0](dim).double().to(device)
    fresh.load_state_dict(load(blob))
    with torch.no_grad():
        y1, ld1 = module(x, c)
        y2, ld2 = fresh(x, c)
    assert torch.equal(y1, y2) and torch.equal(ld1, ld2)


def test_jac_false_skips_logdet_but_not_the_transform():
    module, x, c = _build("conditional_inn_vector", 4, "cpu")
    y, _ = module(x, c)
    y_nojac, logdet = module(x, c, jac=False)
    assert torch.equal(y, y_nojac)
    assert torch.equal(logdet, torch.zeros(5, dtype=torch.float64))


# ---------------------------------------------------------------- ActNorm
def test_actnorm_initialises_on_first_forward_batch():
    norm = ActNorm(3)
    x = torch.randn(64, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 7
    assert not bool(norm.initialized)
    y, _ = norm(x)
    assert bool(norm.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    # a second batch does not re-initialise
    before = norm.loc.detach().clone()
    norm(torch.randn(8, 3, 4, 4))
    assert torch.equal(norm.loc, before)


def test_actnorm_reverse_before_initialisation_is_an_error():
    with pytest.raises(NotInitializedError, match="not initialised.*reverse"):
        ActNorm(4)(torch.randn(8, 4), rev=True)


def test_actnorm_batch_of_one_before_initialisation_is_an_error():
    norm = ActNorm(4)
    with pytest.raises(ValueError, match="at least 2 samples.*batch of 1"):
        norm(torch.randn(1, 4))
    assert not bool(norm.initialized)
    norm.initialize(torch.randn(10, 4))
    assert bool(norm.initialized)
    assert norm(torch.randn(1, 4))[0].shape == (1, 4)


def test_actnorm_initialized_flag_travels_with_the_state_dict():
    norm = ActNorm(4)
    norm(torch.randn(10, 4) * 3)
    fresh = ActNorm(4)
    fresh.load_state_dict(norm.state_dict())
    assert bool(fresh.initialized)
    x = torch.randn(1, 4)
    assert torch.equal(fresh(x, rev=True)[0], norm(x, rev=True)[0])


def test_actnorm_wrong_channels():
    with pytest.raises(ValueError, match="built for 4 channels"):
        ActNorm(4)(torch.randn(3, 5))


def test_actnorm_refuses_a_first_batch_with_nan():
    """It initialised NaN parameters, and every later output was NaN."""
    norm = ActNorm(2)
    with pytest.raises(ValueError, match="first forward batch, which holds NaN or infinite values"):
        norm(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    assert not bool(norm.initialized)


def test_actnorm_refuses_integer_input_before_and_after_initialisation():
    """Before, a dtype error from mean(); after, integers were promoted silently."""
    norm = ActNorm(3)
    for _ in range(2):
        with pytest.raises(TypeError, match=r"floating-point tensor, got torch.int64; .*\.float\(\)"):
            norm(torch.ones(4, 3, dtype=torch.long))
        norm(torch.randn(8, 3))


def test_actnorm_does_not_blow_up_a_feature_constant_at_initialisation():
    """A dead ReLU unit (constant on the first batch) got log_scale = -log(eps), about 13.8: a later
    input where it varies by 0.5 reached the couplings as 5e5."""
    x = torch.randn(16, 3)
    x[:, 1] = 0
    norm = ActNorm(3)
    norm(x)
    floor = 0.01 * float(x.std(0).median())  # 1% of the median feature's spread
    assert float(norm.log_scale.detach().exp()[1]) == pytest.approx(1 / floor, rel=1e-3)  # 1e6 before
    with torch.no_grad():
        assert float(norm(torch.tensor([[0.0, 0.5, 0.0]]))[0].abs().max()) == pytest.approx(0.5 / floor, rel=1e-3)
    # most units dead: the median of the ones that vary sets the floor (the median of all was 0)
    mostly_dead = torch.zeros(16, 3)
    mostly_dead[:, 0] = torch.randn(16)
    sparse = ActNorm(3)
    sparse(mostly_dead)
    assert float(sparse.log_scale.detach().exp().max()) == pytest.approx(1 / (0.01 * float(mostly_dead[:, 0].std())),
                                                                          rel=1e-3)
    all_dead = ActNorm(2)
    all_dead(torch.zeros(4, 2))
    assert torch.allclose(all_dead.log_scale.detach().exp(), torch.full((2,), 100.0), rtol=1e-3)  # 1 / 0.01
    # features of ordinary spread are still brought to unit variance
    y = norm(x)[0]
    assert torch.allclose(y[:, [0, 2]].std(0), torch.ones(2), atol=1e-4)


# ---------------------------------------------------------------- couplings and permutations
def test_coupling_scales_are_bounded():
    block = AffineCoupling(6, hidden=8, clamp=0.5)
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(50.0)
    _, logdet = block(torch.randn(4, 6) * 100)
    assert torch.isfinite(logdet).all()
    assert logdet.abs().max() <= 0.5 * 3 + 1e-6


def test_coupling_starts_as_identity_for_stable_training():
    block = AffineCoupling(6, hidden=8)
    x = torch.randn(4, 6)
    y, logdet = block(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(4))


def test_conditional_coupling_needs_its_condition():
    block = AffineCoupling(4, hidden=8, cond_dim=3)
    with pytest.raises(ValueError, match="pass the condition"):
        block(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"`c` must have shape \(2, 3\)"):
        block(torch.randn(2, 4), torch.randn(2, 5))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        Permutation(4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        Permutation(4)(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="dim` >= 2"):
        AffineCoupling(1)
    for clamp in (float("inf"), float("nan"), 0.0):  # inf gave NaN outputs even for an identity coupling
        with pytest.raises(ValueError, match="`clamp` must be a finite number > 0"):
            AffineCoupling(4, clamp=clamp)
    with pytest.raises(TypeError, match="InvertibleModule"):
        SequentialFlow([torch.nn.Linear(2, 2)])


def test_permutation_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = Permutation(32, seed=1), Permutation(32, seed=1), Permutation(32, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.perm, b.perm) and not torch.equal(a.perm, c.perm)
    assert torch.equal(a.perm[a.inverse_perm], torch.arange(32))


def test_flow_blocks_permute_each_block_by_its_own_seed():
    # as documented (block i: seed + i); one permutation repeated would pair the same features in
    # every block whose power of it repeats them (a permutation of order 2 returns them after 2)
    perms = [b.perm for b in flow_blocks(16, 4, hidden=8, seed=7) if isinstance(b, Permutation)]
    assert len(perms) == 4
    for i, perm in enumerate(perms):
        assert torch.equal(perm, Permutation(16, seed=7 + i).perm)
    assert len({tuple(p.tolist()) for p in perms}) == 4


# ---------------------------------------------------------------- the two networks
def test_conditional_inn_20_blocks_dim_128_round_trips_float32():
    torch.manual_seed(0)
    t = ConditionalINN(128, (64, 8, 8), n_blocks=20, hidden=512, embed_dim=128)
    for module in t.modules():  # leave the identity start: give every coupling a real transform
        if isinstance(module, AffineCoupling):
            module.subnet[-1].reset_parameters()
    x = torch.randn(32, 128)
    c = torch.randn(32, 64, 8, 8)
    with torch.no_grad():
        v, _ = t(x, c)
        x_back, _ = t(v, c, rev=True)
    assert (v - x).abs().max() > 0.1
    rel = (x_back - x).abs().max() / x.abs().max()
    assert rel <= 1e-4, f"max relative round-trip error {rel:.2e}"


def test_conditional_inn_rejects_a_condition_of_another_layer():
    t = ConditionalINN(4, (10,), n_blocks=1, hidden=8)
    with pytest.raises(ValueError, match="fitted for another layer"):
        t(torch.randn(3, 4), torch.randn(3, 12))
    with pytest.raises(ValueError, match="needs the condition"):
        t(torch.randn(3, 4))
    with pytest.raises(ValueError, match="same batch size"):
        t(torch.randn(3, 4), torch.randn(2, 10))


def test_conditional_inn_takes_a_vector_layer_size_as_an_int():
    """``cond_shape=10`` failed with "'int' object is not iterable"; load_invariance_inn's layer_shape takes it."""
    assert ConditionalINN(4, 10, n_blocks=1, hidden=8).cond_shape == (10,)


def test_conditional_inn_sampling_is_reproducible_and_checks_temperature():
    t = ConditionalINN(4, (10,), n_blocks=1, hidden=8)
    c = torch.randn(6, 10)
    t(torch.randn(6, 4), c)
    a = t.sample(c, 0.7, generator=torch.Generator().manual_seed(3))
    b = t.sample(c, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (6, 4)
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got 0.0"):
        t.sample(c, 0.0)
    for bad in (float("inf"), float("nan")):  # inf gave inf and NaN codes
        with pytest.raises(ValueError, match="`temperature` must be finite"):
            t.sample(c, bad)


def test_conditional_inn_samples_at_a_temperature_carry_invariances_scaled_by_it():
    """``sample`` draws ``v ~ N(0, T² I)``: mapped forward again, samples drawn at temperature T from one
    seed give T times the invariances of the samples at temperature 1 from that seed (the temperature
    was dropped, and every temperature gave the samples of 1)."""
    torch.manual_seed(0)
    t = ConditionalINN(4, (10,), n_blocks=2, hidden=8, embed_dim=4)
    c = torch.randn(6, 10)
    t(torch.randn(6, 4) * 2 + 1, c)
    _randomise_(t, torch.Generator().manual_seed(1))
    t.double()
    c = c.double()
    unit = t.sample(c, 1.0, generator=torch.Generator().manual_seed(3))
    for temperature in (0.3, 2.5):
        warm = t.sample(c, temperature, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(t(warm, c)[0], temperature * t(unit, c)[0])


def test_condition_statistics_standardise_the_input():
    t = ConditionalINN(4, (3, 5, 5), n_blocks=1, hidden=8)
    c = torch.randn(20, 3, 5, 5) * 10 + 4
    t.embedder.set_input_statistics(c)
    z = t.embedder.standardize(c)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-8, 1e6])
def test_a_layer_on_any_scale_is_standardised(scale):
    """eps (1e-5) was added to every unit's floor whole: a layer on a 1e-6 scale standardised to a
    spread of 0.1, on 1e-8 to 0.001, and its fit came out far worse."""
    c = torch.randn(1024, 32, generator=torch.Generator().manual_seed(0)) * scale
    emb = ConditionalINN(4, (32,), n_blocks=1, hidden=8).embedder
    emb.set_input_statistics(c)
    assert emb.standardize(c).std().item() == pytest.approx(1.0, abs=0.01)


def test_factor_inn_split_merge_and_sizes():
    e = FactorINN(10, {"digit": 4, "colour": 3}, n_blocks=1, hidden=8)
    assert e.factor_sizes == {"digit": 4, "colour": 3, "residual": 3}
    y = torch.randn(2, 10)
    parts = e.split(y)
    assert list(parts) == ["digit", "colour", "residual"]
    assert torch.equal(e.merge(parts), y)
    with pytest.raises(KeyError, match=r"No factor named 'color'; the factors are \['digit', 'colour', 'residual'\]"):
        parts["color"]
    assert parts.get("color") is None and "colour" in parts
    with pytest.raises(ValueError, match="missing"):
        e.merge({"digit": parts["digit"]})
    with pytest.raises(ValueError, match=r"keys \['shape'\] that are not factors"):  # dropped without a word before
        e.merge({**parts, "shape": parts["digit"]})
    with pytest.raises(ValueError, match="sum to dim=10"):
        FactorINN(10, {"digit": 8, "colour": 3})
    with pytest.raises(ValueError, match="unconditional"):
        e(y, torch.randn(2, 3))
    explicit = FactorINN(10, {"residual": 2, "digit": 8})
    assert list(explicit.factor_sizes) == ["digit", "residual"]


def test_factor_inn_merge_lays_factors_out_in_factor_order_whatever_the_dicts_order():
    """``merge`` is the inverse of ``split`` for a dict in any key order: concatenating the factors in
    the order the dict was given put a ``{"residual": ..., "colour": ..., "digit": ...}`` dict's blocks
    where other factors belong, and ``e⁻¹`` of it decoded another representation."""
    e = FactorINN(10, {"digit": 4, "colour": 3}, n_blocks=1, hidden=8)
    y = torch.randn(2, 10)
    parts = e.split(y)
    reordered = {name: parts[name] for name in reversed(list(parts))}
    assert list(reordered) == ["residual", "colour", "digit"]
    assert torch.equal(e.merge(reordered), y)
    for name, block in e.split(e.merge(reordered)).items():
        assert torch.equal(block, parts[name]), name


@pytest.mark.parametrize("dim", [4, 16, 128])
def test_factor_sizes_from_scores(dim):
    scores = {"digit": 2.0, "foreground": 0.3, "background": -1.0}
    sizes = factor_sizes_from_scores(scores, dim)
    assert list(sizes) == ["digit", "foreground", "background", "residual"]
    assert sum(sizes.values()) == dim and min(sizes.values()) >= 1
    assert sizes["digit"] >= sizes["foreground"] >= sizes["background"]
    assert FactorINN.from_scores(dim, scores, n_blocks=1, hidden=8).factor_sizes == sizes


def test_factor_sizes_need_room():
    with pytest.raises(ValueError, match="too small"):
        factor_sizes_from_scores({"a": 1.0, "b": 1.0}, dim=2)


def test_rarely_active_units_do_not_explode_the_standardised_condition():
    # A ReLU unit that is zero on all but one statistics sample must not be divided by ~0.
    c = torch.randn(200, 6).abs()
    c[:, 0] = 0.0
    c[7, 0] = 1e-3
    emb = ConditionalINN(4, (6,), n_blocks=1, hidden=8).embedder
    emb.set_input_statistics(c)
    active = torch.zeros(1, 6)
    active[0, 0] = 1.0  # the unit fires on a test input
    assert emb.standardize(active).abs().max() < 100
    # no unit varies (a collapsed layer): later inputs were scaled by 1/eps = 1e5
    emb.set_input_statistics(torch.zeros(64, 6))
    assert emb.standardize(torch.full((1, 6), 0.5)).abs().max() < 10


def test_a_few_units_on_a_far_larger_scale_do_not_floor_the_others():
    """One unit at 1e4 among 63 at 1: the floor, 10% of the mean spread, divided every other unit by
    about 16, so the INN could hardly read them (invariance samples then varied what the layer kept)."""
    c = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    c[:, 0] *= 1e4
    emb = ConditionalINN(4, (64,), n_blocks=1, hidden=8).embedder
    emb.set_input_statistics(c)
    assert torch.allclose(emb.in_std[1:], c[:, 1:].std(0))
    assert emb.standardize(c)[:, 1:].std(0).min() > 0.99
    c[:, 0] /= 1e4 / 20  # a unit 20 times the others' scale: the floor as before, 10% of the mean spread
    emb.set_input_statistics(c)
    assert torch.allclose(emb.in_std[1:], c[:, 1:].std(0).clamp_min(0.1 * float(c.std(0).mean())))


def test_actnorm_loading_an_uninitialised_state_makes_it_uninitialised_again():
    norm = ActNorm(4)
    norm(torch.randn(10, 4))  # initialised, and remembered without reading the buffer
    norm.load_state_dict(ActNorm(4).state_dict())
    assert not bool(norm.initialized)
    with pytest.raises(NotInitializedError):
        norm(torch.randn(3, 4), rev=True)
    y, _ = norm(torch.randn(32, 4) * 5 + 2)  # initialises on this batch again
    assert torch.allclose(y.mean(0), torch.zeros(4), atol=1e-4)


def test_is_fitted_says_whether_every_actnorm_saw_data():
    t = ConditionalINN(4, (3,), n_blocks=2, hidden=8, embed_dim=4)
    e = FactorINN(4, {"a": 2}, n_blocks=2, hidden=8)
    assert not t.is_fitted and not e.is_fitted
    with torch.no_grad():
        t(torch.randn(8, 4), torch.randn(8, 3))
        e(torch.randn(8, 4))
    assert t.is_fitted and e.is_fitted
    copy = ConditionalINN(4, (3,), n_blocks=2, hidden=8, embed_dim=4)
    copy.load_state_dict(t.state_dict())  # a loaded checkpoint is fitted
    assert copy.is_fitted
    norms = [m for m in t.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 2
    norms[-1].load_state_dict(ActNorm(4).state_dict())  # one ActNorm that never saw data is enough
    assert not t.is_fitted


def test_codes_of_another_float_dtype_are_cast_to_the_inns():
    torch.manual_seed(0)
    t = ConditionalINN(4, (3,), n_blocks=2, hidden=8, embed_dim=4)
    e = FactorINN(4, {"a": 2}, n_blocks=2, hidden=8)
    x, c = torch.randn(8, 4), torch.randn(8, 3)
    with torch.no_grad():
        t(x, c)
        e(x)
        for args, net in (((c,), t), ((), e)):
            for rev in (False, True):
                y, logdet = net(x.double(), *args, rev=rev)  # was: a matmul dtype error
                y32, logdet32 = net(x, *args, rev=rev)
                assert y.dtype == torch.float32 and torch.equal(y, y32) and torch.equal(logdet, logdet32)


def test_a_precomputed_embedding_is_checked_and_cast_as_the_condition_is():
    """A wrong batch was blamed on `c` (passed as None), a float64 embedding failed in a subnet."""
    torch.manual_seed(0)
    t = ConditionalINN(4, (6,), n_blocks=2, hidden=8, embed_dim=3)
    x, c = torch.randn(5, 4), torch.randn(5, 6)
    with torch.no_grad():
        expected = t(x, c)[0]
        embedding = t.embed(c)
        assert torch.equal(t(x, embedding=embedding.double())[0], expected)
        for bad in (embedding[:3], embedding[:, :2], "h"):
            with pytest.raises(ValueError, match=r"`embedding` must be self.embed\(c\) for the 5 rows of `x`, shape \(5, 3\)"):
                t(x, embedding=bad)


def test_conditional_inn_refuses_an_empty_condition_embedding():
    with pytest.raises(ValueError, match=r"`embed_dim` must be >= 1 .*got 0"):
        ConditionalINN(4, (3,), n_blocks=1, hidden=8, embed_dim=0)


@pytest.mark.parametrize("sizes, match", [
    ({"a": True}, r"`factor_sizes`\['a'\] must be a whole number of dimensions >= 1, got True"),
    ({"a": 2.5}, r"`factor_sizes`\['a'\] must be a whole number .* got 2.5"),
    ({"a": 2.0}, r"`factor_sizes`\['a'\] must be a whole number .* got 2.0"),
    ({"a": 0}, r"`factor_sizes`\['a'\] must be a whole number .* >= 1, got 0"),
    ({"a": torch.tensor(2.0)}, r"`factor_sizes`\['a'\] must be a whole number .* got tensor\(2.\)"),
    ({"a": torch.tensor(True)}, r"`factor_sizes`\['a'\] must be a whole number .* got tensor\(True\)"),
])
def test_factor_inn_refuses_sizes_it_would_have_truncated_or_merged(sizes, match):
    with pytest.raises(ValueError, match=match):
        FactorINN(8, sizes, n_blocks=1, hidden=8)


def test_factor_inn_takes_an_integer_tensor_as_a_size():
    """torch.tensor(4) (a sum or count of sizes) was refused as not "a whole number of dimensions"."""
    e = FactorINN(8, {"a": torch.tensor(3), "b": torch.tensor(2, dtype=torch.int32)}, n_blocks=1, hidden=8)
    assert e.factor_sizes == {"a": 3, "b": 2, "residual": 3}


def test_factor_inn_merge_checks_each_factor():
    e = FactorINN(6, {"a": 2, "b": 1}, n_blocks=1, hidden=8)
    parts = e.split(torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"`factors`\['b'\] must have shape \(N, 1\), got \(5, 2\)"):
        e.merge({**parts, "b": parts["a"]})
    with pytest.raises(ValueError, match=r"`factors`\['a'\] must have shape \(N, 2\), got \(2,\)"):
        e.merge({**parts, "a": parts["a"][0]})
    with pytest.raises(ValueError, match=r"same batch size: `factors`\['residual'\] has 4 rows, `factors`\['a'\] has 5"):
        e.merge({**parts, "residual": parts["residual"][:4]})


def test_actnorm_takes_an_empty_batch_and_gives_a_writable_logdet():
    norm = ActNorm(3)
    norm(torch.randn(16, 3, 2, 5))  # initialised
    y, logdet = norm(torch.randn(0, 3, 2, 5))  # was: an IndexError on x[0, 0]
    assert y.shape == (0, 3, 2, 5) and logdet.shape == (0,)
    assert norm(torch.randn(0, 3, 2, 5), rev=True)[1].shape == (0,)
    y, logdet = norm(torch.randn(4, 3, 2, 5))
    expected = norm.log_scale.detach().sum() * 10
    logdet += 1.0  # was: an in-place write into an expand() view
    assert torch.allclose(logdet.detach(), (expected + 1.0).expand(4))


def test_inn_arguments_that_gave_nan_raw_errors_or_silent_truncation_are_named(tmp_path):
    """Audit findings: each was a raw torch/Python error, NaN parameters, a silently truncated size,
    or an INN that saved but would not load back; now an error naming the argument."""
    import numpy as np

    from captum_inn.inn import ConvEmbedder, MLPEmbedder
    from captum_inn.training import save_invariance_inn

    cases = [
        (lambda: FactorINN(6, {"a": 2}, residual=5, n_blocks=1, hidden=8), TypeError,
         r"`residual` must be a non-empty str naming the residual factor, got 5 \(int\)"),
        (lambda: factor_sizes_from_scores({"a": 1.0}, 10.0), TypeError, r"`dim` must be an int, got 10.0"),
        (lambda: ActNorm(3, eps=-1.0), ValueError, r"`eps` must be >= 0, got -1.0"),
        (lambda: ActNorm(3, eps=float("nan")), ValueError, r"`eps` must be finite"),
        (lambda: ConditionalINN(4, (3, 8, 8), n_blocks=1, hidden=8, conv_width=0), ValueError,
         r"`conv_width` must be >= 1, got 0"),
        (lambda: ConditionalINN(4, (3,), n_blocks=1, hidden=256.0), TypeError, r"`hidden` must be an int, got 256.0"),
        (lambda: FactorINN(4, {"a": 1}, n_blocks=1.7, hidden=8), TypeError, r"`n_blocks` must be an int, got 1.7"),
        (lambda: AffineCoupling(4, hidden=8, cond_dim=-1), ValueError, r"`cond_dim` must be >= 0"),
        (lambda: ConvEmbedder((3, 16, 16), width=64, max_width=8), ValueError,
         r"`max_width` \(8\) must be >= `width` \(64\)"),
    ]
    for build, error, match in cases:
        with pytest.raises(error, match=match):
            build()

    embedder = MLPEmbedder((4,), out_dim=3, hidden=8)
    batch = torch.randn(64, 4)
    batch[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`batch` holds NaN or infinite values"):
        embedder.set_input_statistics(batch)  # one NaN made every later embedding NaN
    with pytest.raises(ValueError, match="`eps` must be >= 0"):
        embedder.set_input_statistics(torch.randn(64, 4), eps=-10.0)
    assert torch.equal(embedder.in_std, torch.ones_like(embedder.in_std))  # left as it was

    t = ConditionalINN(4, (5,), n_blocks=1, hidden=8, embed_dim=6)
    x, c = torch.randn(2, 4), torch.randn(2, 5)
    t(x, c)
    with pytest.raises(TypeError, match=r"The condition `c` must be a torch.Tensor .*got ndarray; pass torch.as_tensor"):
        t(x, np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match=r"The condition `c` is torch.complex64"):
        t.sample(torch.randn(2, 5, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"Pass the condition `c` or its `embedding`"):
        t(x, torch.randn(9, 5), embedding=t.embed(c))  # `c` of another batch was ignored
    assert torch.allclose(t(x, c.long())[0], t(x, c.long().float())[0])  # an integer layer is cast, as cached

    coupling = AffineCoupling(4, hidden=8)  # unconditional: ignores `c`, whatever it is
    assert torch.equal(coupling(x, torch.randn(2, 3, dtype=torch.float64))[0], coupling(x)[0])
    with pytest.raises(TypeError, match=r"`x` must be a torch.Tensor of shape \(N, dim\), got list"):
        SequentialFlow(flow_blocks(4, 1, hidden=8))([[0.0] * 4] * 2)

    e = FactorINN(4, {"a": 2}, n_blocks=1, hidden=8)
    e(torch.randn(8, 4))
    with pytest.raises(TypeError, match=r"`inn` must be a ConditionalINN from fit_invariances, got FactorINN; save a "
                                        r"FactorINN with save_concept_inn"):
        save_invariance_inn(str(tmp_path / "e.safetensors"), e)
    t.fit_info = dict(layer="l", layer_shape=[6], latent_dim=4, model_class="M")
    with pytest.raises(ValueError, match=r"says layer shape \(6,\) and codes of size 4, but the INN takes \(5,\) and 4"):
        save_invariance_inn(str(tmp_path / "t.safetensors"), t)
    t.fit_info = dict(layer="l", latent_dim=4)
    with pytest.raises(ValueError, match=r"`inn.fit_info` lacks \['layer_shape', 'model_class'\]"):
        save_invariance_inn(str(tmp_path / "t.safetensors"), t)
    assert not list(tmp_path.iterdir())


def test_actnorm_standardises_a_batch_on_any_scale():
    """eps=1e-6 was added whole to the spread: a layer spread by 1e-7 came out of the first ActNorm at
    a tenth of unit variance (0.5 at 1e-6), which its docstring promises."""
    for scale in (1e-7, 1e-5, 1.0, 1e3):
        norm = ActNorm(4)
        y, _ = norm(torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale)
        assert torch.allclose(y.std(0), torch.ones(4, dtype=torch.float64), atol=1e-3), (scale, y.std(0))


def test_inn_call_arguments_of_the_wrong_kind_are_named():
    """A list as the condition, a string temperature, an int generator, a non-numeric score or a NaN
    residual score (blamed on `scores`) failed with raw errors; 2.5 features built 2."""
    t = ConditionalINN(4, (3,), n_blocks=1, hidden=8, embed_dim=4)
    t(torch.randn(8, 4), torch.randn(8, 3))
    with pytest.raises(TypeError, match=r"The condition `c` must be a torch.Tensor .*got list"):
        t(torch.randn(2, 4), [[1.0, 2.0, 3.0]] * 2)
    with pytest.raises(TypeError, match=r"`temperature` must be a number, got '1'"):
        t.sample(torch.randn(2, 3), temperature="1")
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator or None, got int"):
        t.sample(torch.randn(2, 3), generator=0)
    with pytest.raises(ValueError, match=r"`scores` and `residual_score` must be finite, got \{'a': 1.0\} and nan"):
        factor_sizes_from_scores({"a": 1.0}, 4, residual_score=float("nan"))
    with pytest.raises(TypeError, match=r"`scores\['a'\]` must be a number, got 'x'"):
        factor_sizes_from_scores({"a": "x"}, 4)
    with pytest.raises(TypeError, match=r"`scores` must be a mapping"):
        factor_sizes_from_scores(["a", "b"], 10)
    assert factor_sizes_from_scores({"a": -3.0}, 4, residual_score=-1.0) == {"a": 1, "residual": 3}
    with pytest.raises(TypeError, match=r"`num_features` must be an int, got 2.5"):
        ActNorm(2.5)
    with pytest.raises(TypeError, match=r"`seed` must be an int, got 1.9"):
        FactorINN(4, {"a": 1}, n_blocks=1, hidden=8, seed=1.9)  # was seed 1
    with pytest.raises(TypeError, match=r"`clamp` must be a number, got '2'"):
        FactorINN(4, {"a": 1}, n_blocks=1, hidden=8, clamp="2")
    with pytest.raises(ValueError, match=r"`clamp` must be a finite number > 0, got 2"):
        AffineCoupling(4, hidden=8, clamp="2")
    from captum_inn.inn import MLPEmbedder

    with pytest.raises(ValueError, match=r"`out_dim` must be >= 1, got 0"):
        MLPEmbedder((3,), out_dim=0)  # an empty embedding


def test_a_concept_inn_whose_fit_info_the_file_cannot_hold_is_refused_before_writing(tmp_path):
    """A tensor in fit_info failed inside json.dumps naming no key; a key "inn" replaced the architecture,
    so the file was written and then refused as damaged."""
    from captum_inn.training import save_concept_inn

    e = FactorINN(4, {"a": 1}, n_blocks=1, hidden=8)
    e(torch.randn(8, 4))
    e.fit_info = {"note": torch.tensor(1.0)}
    with pytest.raises(TypeError, match=r"holds a value JSON cannot store .*Tensor.*tensor.tolist\(\)"):
        save_concept_inn(str(tmp_path / "e.safetensors"), e)
    e.fit_info = {"inn": "v2"}
    with pytest.raises(ValueError, match=r"`inn.fit_info` has a key 'inn'.*rename it"):
        save_concept_inn(str(tmp_path / "e.safetensors"), e)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("sizes", [{1: 2}, {"a": 1, 1: 2, "1": 2}, {"": 2}, {("a", "b"): 2}])
def test_factor_names_must_be_strings(sizes):
    """A key 1 was saved as "1": split(y)[1] then failed, and {1: 2, "1": 2} named one factor twice."""
    with pytest.raises(TypeError, match=r"`factor_sizes` keys name factors and must be non-empty str"):
        FactorINN(8, sizes, n_blocks=1, hidden=8)
    with pytest.raises(TypeError, match=r"`scores` keys name factors and must be non-empty str"):
        factor_sizes_from_scores(dict.fromkeys(sizes, 0.5), 8)


def test_an_input_on_another_device_is_named():
    """A CPU batch into a CUDA INN failed deep in a subnet naming two devices, not the argument."""
    t = ConditionalINN(4, (3,), n_blocks=1, hidden=8, embed_dim=4)
    e = FactorINN(4, {"a": 1}, n_blocks=1, hidden=8)
    elsewhere = torch.device("meta")  # any device but the INN's; no accelerator needed
    with pytest.raises(ValueError, match=r"`x` is on meta but the ConditionalINN is on cpu; move one of them"):
        t(torch.randn(2, 4, device=elsewhere), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"`c` is on meta but the ConditionalINN is on cpu.*c.to\('cpu'\)"):
        t(torch.randn(2, 4), torch.randn(2, 3, device=elsewhere))
    with pytest.raises(ValueError, match=r"`embedding` is on meta but the ConditionalINN is on cpu"):
        t(torch.randn(2, 4), embedding=torch.randn(2, 4, device=elsewhere))
    with pytest.raises(ValueError, match=r"`x` is on meta but the FactorINN is on cpu"):
        e(torch.randn(2, 4, device=elsewhere))


def test_conditional_inverse_takes_a_precomputed_embedding():
    t = ConditionalINN(4, (3,), n_blocks=2, hidden=8, embed_dim=4)
    zbar, c = torch.randn(8, 4), torch.randn(8, 3)
    v, logdet = t(zbar, c)
    back, inverse_logdet = t.inverse(v, embedding=t.embed(c))
    assert torch.allclose(back, zbar, atol=1e-5) and torch.allclose(logdet, -inverse_logdet, atol=1e-5)
    assert torch.allclose(t.inverse(v, c)[0], back)


def test_config_records_the_conv_width_the_embedder_was_built_with():
    """A maximum below conv_width is widened to it; the config said the smaller number."""
    t = ConditionalINN(4, (2, 8, 8), n_blocks=1, hidden=8, embed_dim=4, conv_width=32, conv_max_width=16)
    assert t.config["conv_max_width"] == 32
    assert ConditionalINN(**t.config).state_dict().keys() == t.state_dict().keys()


def test_an_unfitted_inn_is_not_saved(tmp_path):
    """The file held an INN that every explainer refuses, and no word was said when it was written."""
    from captum_inn.training import save_concept_inn, save_invariance_inn

    e = FactorINN(4, {"a": 1}, n_blocks=1, hidden=8)
    with pytest.raises(ValueError, match=r"`inn` is not fitted .*fit_concepts first"):
        save_concept_inn(str(tmp_path / "e.safetensors"), e)
    t = ConditionalINN(4, (3,), n_blocks=1, hidden=8, embed_dim=4)
    t.fit_info = {"layer": "fc", "layer_shape": [3], "latent_dim": 4, "model_class": "Net"}
    with pytest.raises(ValueError, match=r"`inn` is not fitted .*fit_invariances first"):
        save_invariance_inn(str(tmp_path / "t.safetensors"), t)
    assert not list(tmp_path.iterdir())


def _largest_remainder_sizes(scores, dim, residual_score):
    """Independent statement of the documented rule: one dimension each, then
    softmax(scores + [residual_score]) · (dim − #factors) by largest remainder."""
    values = list(scores.values()) + [residual_score]
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    free = dim - len(values)
    quotas = [w / sum(weights) * free for w in weights]
    sizes = [1 + math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(values)), key=lambda i: quotas[i] - math.floor(quotas[i]), reverse=True)
    for i in by_remainder[: dim - sum(sizes)]:
        sizes[i] += 1
    return dict(zip(list(scores) + ["residual"], sizes))


@pytest.mark.parametrize("dim,scores,residual_score", [
    (16, {"digit": 2.0, "colour": 0.5}, 1.0),
    (23, {"digit": 1.3, "fg": 0.2, "bg": -0.7}, 1.0),
    (64, {"digit": 0.9, "colour": 0.1}, 0.25),
    (11, {"a": 0.0, "b": 0.0, "c": 0.0}, 2.0),
    (37, {"a": 3.0, "b": -1.0}, -0.5),
])
def test_factor_sizes_follow_softmax_with_largest_remainder(dim, scores, residual_score):
    """Sizes equal an independent largest-remainder split of softmax(scores) over the free dims."""
    got = factor_sizes_from_scores(scores, dim, residual_score=residual_score)
    assert got == _largest_remainder_sizes(scores, dim, residual_score)


def test_flow_blocks_transform_both_halves():
    """The two couplings of a unit act on complementary halves, so with trained (non-zero) subnets the
    log-determinant of a single unit depends on every input feature."""
    torch.manual_seed(0)
    flow = SequentialFlow(flow_blocks(6, 1, hidden=8))
    flow(torch.randn(32, 6))  # initialise ActNorm
    for block in flow.blocks:
        if isinstance(block, AffineCoupling):
            torch.nn.init.normal_(block.subnet[-1].weight, std=0.5)
    x = torch.randn(16, 6, requires_grad=True)
    _, logdet = flow(x)
    (grad,) = torch.autograd.grad(logdet.sum(), x)
    assert (grad.abs().sum(0) > 1e-6).all(), grad.abs().sum(0)
