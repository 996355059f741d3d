"""Tests of captum_inn.datasets: ColorDigits, colour_digits and concept-pair sampling."""

from __future__ import annotations

import pytest
import torch

from captum_inn.datasets import FACTORS, SPLITS, ColorDigits, colour_digits

torch.set_num_threads(1)

N_DIGITS = 1797


@pytest.fixture(scope="module")
def train() -> ColorDigits:
    return ColorDigits("train", seed=0)


@pytest.fixture(scope="module")
def test_split() -> ColorDigits:
    return ColorDigits("test", seed=0)


# ----------------------------------------------------------------- basics


def test_shapes_dtypes_range(train: ColorDigits) -> None:
    n = len(train)
    assert train.images.shape == (n, 3, 32, 32)
    assert train.images.dtype == torch.float32
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    assert train.digits.shape == (n,) and train.digits.dtype == torch.long
    assert train.foreground.shape == (n, 3) and train.background.shape == (n, 3)
    assert train.source_index.shape == (n,) and train.source_index.dtype == torch.long
    assert train.masks.shape == (n, 32, 32)
    assert set(train.digits.tolist()) == set(range(10))
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and y == int(train.digits[0])
    torch.testing.assert_close(train[-1][0], train.images[n - 1])
    assert "train" in repr(train)


def test_image_size_option() -> None:
    ds = ColorDigits("test", image_size=16, test_fraction=0.1)
    assert ds.images.shape[1:] == (3, 16, 16)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0


def test_determinism_and_seeds(train: ColorDigits) -> None:
    again = ColorDigits("train", seed=0)
    assert torch.equal(again.images, train.images)
    assert torch.equal(again.source_index, train.source_index)
    other = ColorDigits("train", seed=1)
    assert not torch.equal(other.source_index, train.source_index)
    assert not torch.allclose(other.foreground, train.foreground)


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ds = ColorDigits("test", seed=5)
    ds.pairs("digit", n=4)
    assert torch.equal(torch.rand(3), expected)


def test_split_disjoint_and_covering(train: ColorDigits, test_split: ColorDigits) -> None:
    tr = set(train.source_index.tolist())
    te = set(test_split.source_index.tolist())
    assert not tr & te
    assert tr | te == set(range(N_DIGITS))
    assert len(train) + len(test_split) == N_DIGITS
    assert 0.15 < len(test_split) / N_DIGITS < 0.25
    # stratified: every class is on both sides
    assert set(test_split.digits.tolist()) == set(range(10))
    # train and test colour streams differ
    assert not torch.allclose(train.foreground[:5], test_split.foreground[:5])
    everything = ColorDigits("all")
    assert len(everything) == N_DIGITS
    assert sorted(everything.source_index.tolist()) == list(range(N_DIGITS))


def test_recolorings() -> None:
    ds = ColorDigits("test", recolorings=3)
    assert len(ds) == 3 * ds.n_images
    m = ds.n_images
    assert torch.equal(ds.source_index[:m], ds.source_index[m : 2 * m])
    assert torch.equal(ds.digits[:m], ds.digits[2 * m :])
    assert not torch.allclose(ds.foreground[:m], ds.foreground[m : 2 * m])
    assert ds.source_index.unique().numel() == m


def test_every_class_keeps_an_image_on_each_side_of_the_split() -> None:
    # documented: "Every class keeps at least one image on each side", also for extreme fractions
    # (round(0.001 * 180) is 0 test images, round(0.999 * 180) is 0 training images)
    tiny = ColorDigits("test", test_fraction=0.001, image_size=8)
    assert sorted(tiny.digits.tolist()) == list(range(10))
    huge = ColorDigits("train", test_fraction=0.999, image_size=8)
    assert sorted(huge.digits.tolist()) == list(range(10))


def test_train_test_and_all_draw_colours_from_different_streams() -> None:
    # documented: train, test and "all" use different colour streams; sharing one gave the first
    # rows of every split the same colours (only contrast redraws told them apart)
    train, test, everything = (ColorDigits(split, image_size=8) for split in SPLITS)
    for one, other in ((train, test), (train, everything), (test, everything)):
        m = min(len(one), len(other))
        assert not bool((one.foreground[:m] == other.foreground[:m]).all(dim=1).any())


# ------------------------------------------------------------- colouring


def test_colour_formula_endpoints() -> None:
    masks = torch.zeros(2, 5, 5)
    masks[:, 2, 2] = 1.0
    masks[:, 0, 0] = 0.25
    fg = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.7, 0.4]])
    bg = torch.tensor([[0.0, 0.5, 1.0], [0.6, 0.6, 0.1]])
    x = colour_digits(masks, fg, bg)
    assert x.shape == (2, 3, 5, 5)
    torch.testing.assert_close(x[:, :, 2, 2], fg, rtol=0, atol=0)
    torch.testing.assert_close(x[:, :, 4, 4], bg, rtol=0, atol=0)
    torch.testing.assert_close(x[:, :, 0, 0], 0.25 * fg + 0.75 * bg)
    # (N, 1, H, W) masks and a shared (3,) colour
    y = colour_digits(masks.unsqueeze(1), fg, bg[0])
    torch.testing.assert_close(y[:, :, 4, 4], bg[0].expand(2, 3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="foreground"):
        colour_digits(masks, torch.rand(3, 3), bg)
    with pytest.raises(ValueError, match="masks"):
        colour_digits(torch.rand(5, 5), fg, bg)


def test_colour_digits_clamps_to_the_unit_range() -> None:
    # documented: the result is clamped to [0, 1]; masks a little outside it (resampling overshoot)
    # must not give pixels outside the image range
    masks = torch.tensor([[[1.5, -0.5]]])
    x = colour_digits(masks, torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.1, 0.8, 0.5]))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(x[0, :, 0, 1], torch.tensor([0.0, 1.0, 0.5]))


def test_reconstruct_from_factors(train: ColorDigits) -> None:
    for i in (0, 17, len(train) - 1):
        f = train.factors(i)
        assert set(f) >= set(FACTORS)
        assert f["digit"] == train[i][1]
        rebuilt = colour_digits(train.masks[i : i + 1], f["foreground"], f["background"])[0]
        torch.testing.assert_close(rebuilt, train[i][0], rtol=0, atol=0)
    # masks are the bilinearly upsampled sklearn digits
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[train.factors(0)["source_index"]]).float() / 16
    up = torch.nn.functional.interpolate(raw[None, None], size=(32, 32), mode="bilinear")
    torch.testing.assert_close(train.masks[0], up[0, 0])


# ----------------------------------------------------------------- pairs


@pytest.mark.parametrize("factor", FACTORS)
def test_pairs_share_exactly_named_factor(train: ColorDigits, factor: str) -> None:
    n = 200
    a, b, fa, fb = train.pairs(factor, n=n, generator=0, return_factors=True)
    assert a.shape == b.shape == (n, 3, 32, 32)
    assert float(b.min()) >= 0.0 and float(b.max()) <= 1.0
    torch.testing.assert_close(a, train.images[fa["index"]], rtol=0, atol=0)
    same_digit = fa["digit"] == fb["digit"]
    same_fg = (fa["foreground"] == fb["foreground"]).all(dim=1)
    same_bg = (fa["background"] == fb["background"]).all(dim=1)
    same_image = fa["source_index"] == fb["source_index"]
    shared = {"digit": same_digit, "foreground": same_fg, "background": same_bg}
    assert bool(shared[factor].all())
    for other in FACTORS:
        if other != factor:
            # independent: a digit matches by chance ~10% of the time, a colour never
            assert float(shared[other].float().mean()) < 0.3, other
    assert float(same_image.float().mean()) < 0.05  # a different handwritten image
    # b is exactly its factors, coloured
    b_masks = train.masks[: train.n_images][_local(train, fb["source_index"])]
    torch.testing.assert_close(
        b, colour_digits(b_masks, fb["foreground"], fb["background"]), rtol=0, atol=0
    )


@pytest.mark.parametrize("differ_in", FACTORS)
def test_pairs_differ_in_one_factor(train: ColorDigits, differ_in: str) -> None:
    a, b, fa, fb = train.pairs(differ_in=differ_in, n=100, generator=3, return_factors=True)
    same = {
        "digit": fa["digit"] == fb["digit"],
        "foreground": (fa["foreground"] == fb["foreground"]).all(dim=1),
        "background": (fa["background"] == fb["background"]).all(dim=1),
    }
    assert not bool(same[differ_in].any())
    for other in FACTORS:
        if other != differ_in:
            assert bool(same[other].all()), other
    same_image = fa["source_index"] == fb["source_index"]
    if differ_in == "digit":
        assert not bool(same_image.any())
    else:
        assert bool(same_image.all())
        # only the differing colour changed the picture
        torch.testing.assert_close(
            b, colour_digits(train.masks[fa["index"]], fb["foreground"], fb["background"])
        )


def test_pairs_stay_in_split(test_split: ColorDigits) -> None:
    allowed = set(test_split.source_index.tolist())
    for factor in FACTORS:
        _, _, fa, fb = test_split.pairs(factor, n=64, generator=1, return_factors=True)
        assert set(fb["source_index"].tolist()) <= allowed
        assert set(fa["source_index"].tolist()) <= allowed


def test_pairs_deterministic(train: ColorDigits) -> None:
    a1, b1 = train.pairs("foreground", n=8, generator=7)
    a2, b2 = train.pairs("foreground", n=8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    a3, _ = train.pairs("foreground", n=8, generator=8)
    assert not torch.equal(a1, a3)
    # the default stream is seeded from the dataset seed and advances between calls
    fresh = ColorDigits("train", seed=0)
    c1, d1 = fresh.pairs("digit", n=8)
    c2, _ = fresh.pairs("digit", n=8)
    assert not torch.equal(c1, c2)
    e1, f1 = ColorDigits("train", seed=0).pairs("digit", n=8)
    assert torch.equal(c1, e1) and torch.equal(d1, f1)
    a, b = train.pairs("digit", n=1, generator=0)  # a batch of one works
    assert a.shape == b.shape == (1, 3, 32, 32)


def test_the_default_pair_stream_draws_no_colour_of_the_dataset() -> None:
    # pairs drawn from the dataset's colour stream would repeat its colours: a fresh colour of b
    # would equal a sample's colour exactly, and a "fresh" pair would recolour with known colours
    data = ColorDigits("train", seed=0)
    known = {tuple(c) for c in torch.cat([data.foreground, data.background]).tolist()}
    drawn = []
    for colour in ("foreground", "background"):
        _, _, _, fb = data.pairs(differ_in=colour, n=512, return_factors=True)
        drawn += fb[colour].tolist()
    assert not known & {tuple(c) for c in drawn}


def test_pairs_sharing_the_digit_never_reuse_the_handwritten_image() -> None:
    # documented: the same class but a different handwritten image (every class has ~140 here);
    # picking a's own image 1 time in ~140 would slip under a rate threshold
    data = ColorDigits("train", image_size=8)
    _, _, fa, fb = data.pairs("digit", n=4000, generator=0, return_factors=True)
    assert bool((fa["digit"] == fb["digit"]).all())
    assert not bool((fa["source_index"] == fb["source_index"]).any())


@pytest.mark.parametrize("relation", ["share", "differ"])
def test_concept_draws_the_pairs_of_its_relation(train: ColorDigits, relation: str) -> None:
    # documented: "share" gives pairs(factor=...), "differ" gives pairs(differ_in=...)
    key = "factor" if relation == "share" else "differ_in"
    for factor in FACTORS:
        concept = train.concept(factor, relation)
        assert concept.relation == relation
        a, b = concept.sample(6, torch.Generator().manual_seed(2))
        ea, eb = train.pairs(n=6, generator=torch.Generator().manual_seed(2), **{key: factor})
        assert torch.equal(a, ea) and torch.equal(b, eb), factor


def _local(ds: ColorDigits, source_index: torch.Tensor) -> torch.Tensor:
    """Position of each global source index among the split's sorted images."""
    sources = ds.source_index[: ds.n_images]
    return torch.searchsorted(sources, source_index)


# ------------------------------------------------------------ DataLoader


def test_dataloader(train: ColorDigits) -> None:
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.long


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("pairs", [{"factor": "background"}, {"differ_in": "foreground"}])
def test_pairs_keep_the_contrast_at_its_largest_setting(pairs) -> None:
    """A pair keeps one colour and redraws the other until they contrast: a kept colour near the
    middle grey leaves only the corners' tips to draw from, so a high min_contrast (0.9 was
    accepted) failed with "could not draw colours" after 10,000 draws all missed."""
    from captum_inn.datasets import _ensure_contrast

    data = ColorDigits("train", min_contrast=0.866, image_size=8)
    a, b, fa, fb = data.pairs(n=3000, generator=0, return_factors=True, **pairs)
    for f in (fa, fb):
        assert float((f["foreground"] - f["background"]).norm(dim=1).min()) >= 0.866
    grey = torch.full((4, 3), 0.5)  # the worst kept colour: only the corners themselves are far enough
    drawn = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    for redraw in ("foreground", "background"):
        fg, bg = (drawn, grey) if redraw == "foreground" else (grey, drawn)
        fg2, bg2 = _ensure_contrast(fg, bg, torch.Generator().manual_seed(0), 0.866, redraw)
        kept = bg2 if redraw == "foreground" else fg2
        assert torch.equal(kept, grey) and bool(((fg2 - bg2).norm(dim=1) >= 0.866).all())


def test_a_kept_colour_off_the_middle_grey_gets_its_farthest_corner() -> None:
    """Next to the middle grey (0.49) only ~5e-6 of the cube lies 0.866 away, so 10,000 draws mostly
    miss; the fallback must take the corner farthest from the kept colour (white), not the nearest."""
    from captum_inn.datasets import _ensure_contrast

    kept = torch.full((8, 3), 0.49)
    drawn = torch.rand(8, 3, generator=torch.Generator().manual_seed(0))
    for redraw in ("foreground", "background"):
        fg, bg = (drawn, kept) if redraw == "foreground" else (kept, drawn)
        fg2, bg2 = _ensure_contrast(fg, bg, torch.Generator().manual_seed(0), 0.866, redraw)
        assert torch.equal(bg2 if redraw == "foreground" else fg2, kept)
        assert bool(((fg2 - bg2).norm(dim=1) >= 0.866).all()), redraw


def test_the_default_min_contrast_holds_for_samples_and_pairs() -> None:
    # documented: colours closer than min_contrast (0.4 by default) are redrawn, for the dataset's
    # samples and for the synthesised b of every kind of pair
    data = ColorDigits("test", image_size=8)
    assert data.min_contrast == 0.4
    assert float((data.foreground - data.background).norm(dim=1).min()) >= 0.4
    for kwargs in [{key: f} for key in ("factor", "differ_in") for f in FACTORS]:
        _, _, _, fb = data.pairs(n=500, generator=0, return_factors=True, **kwargs)
        assert float((fb["foreground"] - fb["background"]).norm(dim=1).min()) >= 0.4, kwargs


def test_bad_inputs(train: ColorDigits) -> None:
    with pytest.raises(ValueError, match=r"`split`.*'train', 'test', 'all'.*'val'"):
        ColorDigits("val")
    with pytest.raises(ValueError, match="recolorings.*>= 1"):
        ColorDigits(recolorings=0)
    with pytest.raises(TypeError, match="recolorings"):
        ColorDigits(recolorings=1.5)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            ColorDigits(test_fraction=bad)
    with pytest.raises(ValueError, match="seed"):
        ColorDigits(seed=-1)
    with pytest.raises(ValueError, match="image_size"):
        ColorDigits(image_size=0)
    for bad in (-0.1, 0.87, 0.99):  # no colour lies farther than sqrt(3)/2 from the middle grey
        with pytest.raises(ValueError, match=r"`min_contrast` must lie in \[0, 0.866\]"):
            ColorDigits(min_contrast=bad)
    with pytest.raises(ValueError, match=r"'digit', 'foreground', 'background'.*'colour'"):
        train.pairs("colour", n=4)
    with pytest.raises(ValueError, match="differ_in.*'digit'"):
        train.pairs(differ_in="shape", n=4)
    with pytest.raises(ValueError, match="exactly one"):
        train.pairs("digit", n=4, differ_in="background")
    with pytest.raises(ValueError, match="exactly one"):
        train.pairs(n=4)
    with pytest.raises(ValueError, match=r"`n`.*>= 1"):
        train.pairs("digit", n=0)
    with pytest.raises(TypeError, match="generator"):
        train.pairs("digit", n=2, generator="zero")
    with pytest.raises(IndexError, match="out of range"):
        train[len(train)]


def test_integer_masks_colour_as_float_masks_and_items_are_copies():
    """An integer mask cast the colours to integers (0.2 became 0: black images), and an item was a view
    of the dataset's storage, so an in-place transform (x.sub_(0.5)) changed the dataset for every read."""
    from captum_inn.datasets import colour_digits

    mask = torch.zeros(1, 2, 2, dtype=torch.long)
    mask[0, 0, 0] = 1
    fg, bg = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.9, 0.8, 0.7])
    for masks in (mask, mask.bool(), mask.to(torch.uint8)):
        assert torch.equal(colour_digits(masks, fg, bg), colour_digits(mask.float(), fg, bg))
    data = ColorDigits("test")
    image, _ = data[0]
    kept = image.clone()
    image.sub_(0.5)
    assert torch.equal(data[0][0], kept)


def test_colordigits_is_the_same_float32_data_under_a_float64_default_dtype():
    """Its colours were drawn in the default dtype: under float64 they came out float64, from
    another random stream, so one seed gave other images, colours and pairs."""
    reference = ColorDigits(split="test", image_size=8)
    pairs = reference.pairs("digit", n=4, generator=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = ColorDigits(split="test", image_size=8)
        again = data.pairs("digit", n=4, generator=0)
    finally:
        torch.set_default_dtype(previous)
    assert data.foreground.dtype == data.background.dtype == torch.float32
    assert torch.equal(data.images, reference.images) and torch.equal(data.foreground, reference.foreground)
    assert all(torch.equal(a, b) for a, b in zip(again, pairs))
