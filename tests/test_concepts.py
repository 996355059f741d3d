"""Concepts: pair sampling, factor sizes, the pair likelihood, fit_concepts, LayerConcepts."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.concept import Concept
from helpers_hooks import assert_no_hooks, training_flags
from helpers_progress import record_bars
from helpers_training import LabelFirst, random_conditional_inn
from torch import nn

from captum_inn import LayerConcepts
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.concepts import ConceptPairs, as_concepts
from captum_inn.datasets import ColorDigits
from captum_inn.inn import ConditionalINN, FactorINN
from captum_inn.training import (
    CheckpointError,
    LayerRepresentation,
    concept_scores,
    estimate_factor_sizes,
    fit_concepts,
    load_checkpoint,
    load_concept_inn,
    load_invariance_inn,
    save_checkpoint,
    save_concept_inn,
)
from captum_inn.training.concepts import pair_nll

torch.set_num_threads(1)


# ---------------------------------------------------------------- synthetic data with known concepts
def synthetic(n: int = 400, seed: int = 0):
    """Vectors ``[c (2 dims), s (2 dims), noise (2 dims)]``: concept ``c`` takes 4 values, ``s`` 4."""
    g = torch.Generator().manual_seed(seed)
    c_label, s_label = torch.randint(4, (n,), generator=g), torch.randint(4, (n,), generator=g)
    angle_c, angle_s = c_label.float() * math.pi / 2, s_label.float() * math.pi / 2
    x = torch.cat([
        torch.stack([angle_c.cos(), angle_c.sin()], 1) * 1.5 + 0.1 * torch.randn(n, 2, generator=g),
        torch.stack([angle_s.cos(), angle_s.sin()], 1) * 1.5 + 0.1 * torch.randn(n, 2, generator=g),
        torch.randn(n, 2, generator=g),
    ], dim=1)
    return x, c_label, s_label


IDENTITY = nn.Sequential(nn.Identity())  # its layer "0" hands the vectors through as the representation


def test_from_labels_pairs_share_the_label_and_are_distinct():
    x, c, _ = synthetic(60)
    concept = ConceptPairs.from_labels("c", x, c)
    a, b = concept.sample(200, torch.Generator().manual_seed(0))
    index = {tuple(row.tolist()): i for i, row in enumerate(x)}
    ia = torch.tensor([index[tuple(r.tolist())] for r in a])
    ib = torch.tensor([index[tuple(r.tolist())] for r in b])
    assert torch.equal(c[ia], c[ib])
    assert (ia != ib).all()
    a2, _ = concept.sample(200, torch.Generator().manual_seed(0))
    assert torch.equal(a, a2)  # seeded


def test_from_labels_reads_a_list_of_0d_tensors_by_value():
    """[y for _, y in dataset]: tensors hash by identity, so every input was a group of its own and
    every pair was an input with itself (a concept score of exactly 1.0), silently."""
    x, c, _ = synthetic(60)
    expected = ConceptPairs.from_labels("c", x, c).sample(50, torch.Generator().manual_seed(0))
    for labels in (list(c), tuple(c), list(c.numpy().reshape(-1, 1, 1)[:, 0, 0])):
        got = ConceptPairs.from_labels("c", x, labels).sample(50, torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    zero_d_arrays = [np.array(v) for v in c.tolist()]
    got = ConceptPairs.from_labels("c", x, zero_d_arrays).sample(50, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_from_labels_draws_the_pairs_of_the_per_pair_rule():
    """The batched draw gives the pairs of the rule it replaced, drawn one pair at a time: b uniform
    over the other members of a's group (the pick-th, a skipped), a alone pairing with itself. The
    same pairs for a seed keep fingerprints and resumed fits as they were."""
    labels = torch.tensor([3, 0, 3, 7, 0, 3, 5, 0, 0, 3, 9, 3, 0, 5])  # 7 and 9 alone, 5 in two
    x = torch.arange(len(labels), dtype=torch.float32)[:, None]
    members = {}
    for i, label in enumerate(labels.tolist()):
        members.setdefault(label, []).append(i)

    def reference(n, generator):
        a = torch.randint(len(labels), (n,), generator=generator)
        u = torch.rand(n, generator=generator)
        b = a.clone()
        for k in range(n):
            group = torch.tensor(members[int(labels[a[k]])])
            if len(group) > 1:
                others = group[group != a[k]]
                b[k] = others[min(int(u[k] * (len(group) - 1)), len(others) - 1)]
        return a, b

    a, b = ConceptPairs.from_labels("c", x, labels).sample(500, torch.Generator().manual_seed(4))
    ra, rb = reference(500, torch.Generator().manual_seed(4))
    assert torch.equal(a[:, 0].long(), ra) and torch.equal(b[:, 0].long(), rb)
    assert (a == b).any() and (a != b).any()  # both kinds drawn


def test_from_transform_and_from_captum():
    x = torch.rand(10, 3, 4, 4)
    jitter = ConceptPairs.from_transform("brightness", x, lambda batch: batch * 0.5)
    a, b = jitter.sample(5)
    assert jitter.relation == "differ" and torch.allclose(b, a * 0.5)
    batches = [torch.rand(4, 3, 4, 4), torch.rand(4, 3, 4, 4)]  # Captum's data_iter: any re-iterable
    captum_concept = Concept(0, "stripes", batches)
    pairs = ConceptPairs.from_captum(captum_concept)
    a, b = pairs.sample(6)
    assert pairs.name == "stripes" and a.shape == (6, 3, 4, 4)
    assert [c.name for c in as_concepts([captum_concept])] == ["stripes"]
    singles = ConceptPairs.from_captum(Concept(1, "dots", list(torch.rand(5, 3, 4, 4))))  # one image per item
    assert singles.sample(4)[0].shape == (4, 3, 4, 4)
    random = Concept(2, "random_0", [torch.rand(4, 3, 4, 4)])
    sets = [[captum_concept, random], [Concept(1, "dots", batches), random], [captum_concept, random]]
    assert [c.name for c in as_concepts(sets)] == ["stripes", "dots"]  # TCAV's sets: their concepts, once each
    zigzag, dots = Concept(3, "zigzagged", batches), Concept(4, "dots", batches)
    # a relative set (Captum's TCAV tutorial: [[stripes, zigzagged, dotted]]) fitted only its first concept
    assert [c.name for c in as_concepts([[captum_concept, zigzag, dots], [captum_concept, random]])] == \
        ["stripes", "zigzagged", "dots"]
    with pytest.warns(UserWarning, match=r"\['zigzagged'\] came second in a TCAV experimental set of two"):
        assert [c.name for c in as_concepts([[captum_concept, zigzag]])] == ["stripes"]  # dropped silently
    with pytest.raises(TypeError, match=r"list of lists holding ConceptPairs; pass one flat list"):
        as_concepts([[jitter, pairs]])  # fitted only the first concept
    # [random_0, random_1] is TCAV's significance baseline: random_0 became a factor
    random_1 = Concept(5, "random_1", [torch.rand(4, 3, 4, 4)])
    assert [c.name for c in as_concepts([[captum_concept, random], [captum_concept, random_1], [random, random_1]])] \
        == ["stripes"]
    with pytest.raises(ValueError, match=r"every TCAV experimental set pairs two random sets"):
        as_concepts([[random, random_1]])


def test_torchvision_transforms_change_each_image_its_own_way():
    """torchvision's random transforms draw once per call: a ColorJitter on a chunk of 512 pairs gave
    them all one brightness, so a pool of 4,096 pairs held 8 colour changes. They now run image by
    image; other transforms get whole batches unless per_image says otherwise."""
    from torchvision.transforms import v2

    x = 0.2 + 0.5 * torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def brightness_factors(pairs):
        a, b = pairs.sample(64, torch.Generator().manual_seed(0))
        return torch.unique((b.flatten(1).sum(1) / a.flatten(1).sum(1)).round(decimals=4))

    torch.manual_seed(0)
    assert len(brightness_factors(ConceptPairs.from_transform("bright", x, v2.ColorJitter(brightness=0.8)))) > 32
    assert len(brightness_factors(ConceptPairs.from_transform("bright", x, v2.ColorJitter(brightness=0.8),
                                                              per_image=False))) == 1
    with pytest.warns(UserWarning, match="changes every image of a batch the same way"):
        whole = ConceptPairs.from_transform("bright", x, lambda batch: batch * (0.5 + torch.rand(())))
    assert len(brightness_factors(whole)) == 1  # another transform: whole batches, as before
    each = ConceptPairs.from_transform("bright", x, lambda batch: batch * (0.5 + torch.rand(())), per_image=True)
    assert len(brightness_factors(each)) > 32
    seeded = ConceptPairs.from_transform("grain", x, lambda batch, generator: batch + torch.randn(
        batch.shape, generator=generator), per_image=True)  # each call gets the sampler's generator
    assert torch.equal(seeded.sample(8, torch.Generator().manual_seed(1))[1],
                       seeded.sample(8, torch.Generator().manual_seed(1))[1])
    with pytest.raises(TypeError, match=r"The `transform` of concept 'crop' must return a batch shaped like its "
                                        r"input \(1, 3, 4, 4\), got a \(1, 3, 2, 2\) tensor"):
        ConceptPairs.from_transform("crop", x, v2.CenterCrop(2)).sample(4)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * scale


def test_errors_in_encoding_pairs_name_the_concept_and_the_fix():
    """8-bit pairs through a layer gave torch's "Input type (unsigned char) and bias type (float)"; one
    concept at another image size gave the autoencoder's "got (64, 3, 16, 16)", naming no concept; a
    model with a second argument gave "forward() missing 1 required positional argument"."""
    x, labels = torch.rand(40, 3, 8, 8), torch.arange(40) % 2
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    eight_bit = ConceptPairs.from_labels("digit", (x * 255).to(torch.uint8), labels)
    with pytest.raises(TypeError, match=r"Concept 'digit'.s pairs: `concepts` images are torch.uint8 but the network "
                                        r"computes in torch.float32; convert them with images.to\(torch.float32\), "
                                        r"divided by 255 for 8-bit pixels"):
        concept_scores((model, "2"), [eight_bit], n_pairs=8)
    autoencoder = ConvAutoencoder((3, 8, 8), latent_dim=4, width=4).eval()
    large = ConceptPairs.from_labels("large", torch.rand(10, 3, 16, 16), torch.arange(10) % 2)
    with pytest.raises(ValueError, match=r"^Concept 'large'.s pairs: .*\(N, 3, 8, 8\)"):
        concept_scores(autoencoder, [ConceptPairs.from_labels("digit", x, labels), large], n_pairs=8)
    with pytest.raises(TypeError, match=r"(?s)missing 1 required positional argument.*wrap it in a module whose "
                                        r"forward\(inputs\) calls model\(inputs, ...\)"):
        concept_scores((_TwoInputs(), "fc"), [ConceptPairs.from_labels("digit", x, labels)], n_pairs=8)


def test_a_captum_concept_with_a_sampler_says_how_it_is_scored():
    """A Captum concept with a pair sampler was scored about its own pairs, where two examples of one
    set score about 0 however much the representation encodes them; one_set=True scores it as the
    pairs drawn from its data_iter are."""
    examples = [torch.rand(8, 3, 4, 4)]

    def two_examples(n, generator):
        return tuple(examples[0][torch.randint(8, (n,), generator=generator)] for _ in range(2))

    assert ConceptPairs.from_captum(Concept(0, "c", examples)).one_set
    assert not ConceptPairs.from_captum(Concept(0, "c", examples), sampler=two_examples).one_set
    assert ConceptPairs.from_captum(Concept(0, "c", examples), sampler=two_examples, one_set=True).one_set
    with pytest.raises(ValueError, match="one_set=False needs a pair `sampler`"):
        ConceptPairs.from_captum(Concept(0, "c", examples), one_set=False)
    with pytest.raises(TypeError, match="`one_set` must be True, False or None, got 'yes'"):
        ConceptPairs.from_captum(Concept(0, "c", examples), one_set="yes")
    with pytest.raises(TypeError, match="`per_image` must be True, False or None, got 1"):
        ConceptPairs.from_transform("a", examples[0], lambda t: t, per_image=1)


def test_labels_that_pair_inputs_with_themselves_are_refused_or_warned_about():
    """A float attribute used as labels (every input a group of its own) or NaN labels paired every
    input with itself: the concept scored 1.0 and took the largest factor, with no word."""
    x = torch.rand(40, 3, 4, 4)
    with pytest.raises(ValueError, match="each of the 40 inputs has a label of its own"):
        ConceptPairs.from_labels("brightness", x, x.mean((1, 2, 3)))
    with pytest.raises(ValueError, match="`labels` entry 3 is NaN"):
        ConceptPairs.from_labels("c", x, [0, 1, 0, float("nan")] + [1] * 36)
    mostly_alone = ConceptPairs.from_labels("mostly alone", x, torch.cat([torch.zeros(4), torch.arange(1, 37.)]))
    identity = (nn.Sequential(nn.Flatten()), "0")
    with pytest.warns(UserWarning, match=r"'mostly alone': \d+% of its pairs are an input with itself"):
        concept_scores(identity, [mostly_alone], n_pairs=200)
    # beside a concept of many inputs, one of 6 drawn 400 times skewed the fit (every pool weighs alike)
    few = ConceptPairs.from_labels("few", x[:6], [0, 0, 0, 1, 1, 1])
    many = ConceptPairs.from_labels("many", torch.rand(400, 3, 4, 4), torch.arange(400) % 2)
    with pytest.warns(UserWarning, match=r"'few': its 400 pairs hold only 6 distinct inputs, against \d+ for another"):
        concept_scores(identity, [few, many], n_pairs=400)
    flip = ConceptPairs.from_transform("flip", x, lambda batch: batch.flip(-1))
    grain = ConceptPairs.from_transform("grain", x, lambda batch, generator: batch + 0.01 * torch.randn(
        batch.shape, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alone, or beside concepts as small: nothing to say
        concept_scores(identity, [flip, grain], n_pairs=400)  # a random transform's outputs are not more inputs
        concept_scores(identity, [few], n_pairs=400)
        concept_scores(identity, [ConceptPairs.from_labels("ok", x, torch.arange(40) % 2), few], n_pairs=200)


def test_a_transform_that_draws_one_change_per_call_is_warned_about():
    """A torchvision ColorJitter wrapped in a lambda is not recognised as torchvision's and gets whole
    batches: every pair of a batch differed by the same jitter (a spread of 0.011 in the change
    against 0.20 image by image), and nothing said so. Four copies of one image changed alike, and
    otherwise at a second call, warn; deterministic and per-image transforms do not, nor
    ``per_image`` given, and the caller's random streams are left as they were."""
    from torchvision.transforms import v2

    x = torch.rand(10, 3, 4, 4)
    jitter = v2.ColorJitter(brightness=0.8, hue=0.2)
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match=r"concept 'colour' changes every image of a batch the same way.*"
                                         r"per_image=True"):
        ConceptPairs.from_transform("colour", x, lambda batch: jitter(batch))
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.warns(UserWarning, match="the same way"):  # seeded by the sampler, one factor for the batch
        ConceptPairs.from_transform("bright", x, lambda batch, generator: batch * torch.rand(1, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConceptPairs.from_transform("colour", x, jitter)  # torchvision's own: image by image
        ConceptPairs.from_transform("flip", x, lambda batch: batch.flip(-1))  # the same change every call
        ConceptPairs.from_transform("bright", x, lambda batch, generator: batch * torch.rand(
            batch.shape[0], 1, 1, 1, generator=generator))  # a change per image
        ConceptPairs.from_transform("colour", x, lambda batch: jitter(batch), per_image=False)  # asked for
        ConceptPairs.from_transform("colour", x, lambda batch: jitter(batch), per_image=True)


def test_from_transform_gives_its_transform_a_copy():
    """A transform that edits its batch in place also changed the pairs' first members: every pair was
    two equal images, and the concept scored 0."""
    x = torch.rand(10, 3, 4, 4)

    def darken(batch, generator):
        batch[:, 0] *= torch.rand(batch.shape[0], 1, 1, generator=generator)
        return batch

    original = x.clone()
    a, b = ConceptPairs.from_transform("red", x, darken).sample(6, torch.Generator().manual_seed(0))
    assert not torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 1:], b[:, 1:]) and torch.equal(x, original)


def test_from_transform_names_the_transform_when_it_returns_another_shape():
    """A transform returning (image, target), as torchvision v2 ones with a target do, was reported
    as a bad "sampler", which the user never wrote."""
    x = torch.rand(10, 3, 4, 4)
    with pytest.raises(TypeError, match=r"`transform` of concept 'jitter' .* got a tuple"):
        ConceptPairs.from_transform("jitter", x, lambda batch: (batch * 0.5, None)).sample(4)
    with pytest.raises(TypeError, match=r"`transform` of concept 'crop' .*\(4, 3, 4, 4\), got a \(4, 3, 2, 2\) tensor"):
        ConceptPairs.from_transform("crop", x, lambda batch: batch[..., :2, :2]).sample(4)
    # 8-bit output passed here and was blamed on the (float) images by the encoder's dtype check
    with pytest.raises(TypeError, match=r"`transform` of concept 'quantise' must return the dtype of its input "
                                        r"\(torch.float32\), got torch.uint8"):
        ConceptPairs.from_transform("quantise", x, lambda batch: (batch * 255).to(torch.uint8)).sample(4)


def test_captum_concepts_are_scored_against_each_other():
    """Pairs of a Captum concept are two of its examples; scored about their own pool, every such
    concept scored about 0, on a representation that encodes the classes as on pure noise."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 3
    encoded = torch.cat([nn.functional.one_hot(y, 3).float() * 3, 0.1 * torch.randn(400, 2, generator=g)], 1)
    noise = torch.randn(400, 5, generator=g)
    identity = (nn.Sequential(nn.Identity()), "0")
    scores = {name: concept_scores(identity, [Concept(i, f"class{i}", DataLoader(data[y == i], batch_size=50))
                                              for i in range(3)], n_pairs=500)
              for name, data in (("encoded", encoded), ("noise", noise))}
    assert min(scores["encoded"].values()) > 0.9, scores
    assert max(abs(v) for v in scores["noise"].values()) < 0.1, scores
    # other pairs are scored about their own pool, whatever is given beside them
    pixels = (nn.Sequential(nn.Flatten()), "0")
    digits = ColorDigits("test", image_size=8)
    beside = [Concept(i, f"class{i}", DataLoader(digits.images[digits.digits == i][:40], batch_size=20)) for i in range(2)]
    alone = concept_scores(pixels, digits.concepts("differ"), n_pairs=300)
    mixed = concept_scores(pixels, [*digits.concepts("differ"), *as_concepts(beside)], n_pairs=300)
    assert all(mixed[name] == alone[name] for name in alone)


def test_a_lone_captum_concept_is_warned_about():
    """A Captum concept given alone (TCAV's [[stripes, random_0]] leaves the random set out) or
    labels with one value scored about 0 and took a one-dimensional factor, with no word."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    encoded = torch.cat([nn.functional.one_hot(y, 2).float() * 3, 0.1 * torch.randn(200, 2, generator=g)], 1)
    stripes, random_0 = (Concept(i, name, DataLoader(encoded[y == i], batch_size=50))
                         for i, name in enumerate(["stripes", "random_0"]))
    identity = (nn.Sequential(nn.Identity()), "0")
    for alone in ([[stripes, random_0]], [stripes], ConceptPairs.from_labels("stripes", encoded[y == 0], [1] * 100)):
        with pytest.warns(UserWarning, match=r"Concept 'stripes' is one set of examples .* the only one given.*"
                                             r"concepts=\[stripes, random_0\]"):
            assert abs(concept_scores(identity, alone, n_pairs=200)["stripes"]) < 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert concept_scores(identity, [stripes, random_0], n_pairs=200)["stripes"] > 0.9
    with pytest.warns(UserWarning, match="Concept 'stripes' is one set of examples"):
        fit_concepts(identity, [stripes], steps=1, pool_size=8, batch_size=4, n_blocks=1, hidden=8)


@pytest.mark.parametrize("max_examples", [-1, 0, 1, True, 2.5])
def test_from_captum_names_a_bad_max_examples(max_examples):
    """-1 read the examples and silently dropped the last one (a [:-1] slice); 2.5 failed in a slice."""
    with pytest.raises(ValueError, match="`max_examples` must be an int >= 2"):
        ConceptPairs.from_captum(Concept(0, "stripes", [torch.rand(4, 3, 4, 4)]), max_examples=max_examples)


def test_from_captum_says_when_a_one_pass_data_iter_was_read_before():
    """A generator as data_iter gives its examples once; the second read found none and said only that."""
    examples = (torch.rand(3, 4, 4) for _ in range(4))
    concept = Concept(0, "stripes", examples)
    assert ConceptPairs.from_captum(concept).sample(2)[0].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"has 0 example\(s\); pairs need at least 2. Its data_iter is a one-pass "
                                         r"iterator.*give a list, a Dataset or a DataLoader"):
        ConceptPairs.from_captum(concept)
    with pytest.raises(ValueError, match=r"has 1 example\(s\); pairs need at least 2.$"):  # a list: no such hint
        ConceptPairs.from_captum(Concept(0, "one", [torch.rand(1, 3, 4, 4)]))


def test_from_captum_names_examples_of_different_shapes():
    batches = [torch.rand(4, 3, 4, 4), torch.rand(2, 3, 5, 5)]
    with pytest.raises(ValueError, match=r"data_iter yields examples of different shapes \[\(3, 4, 4\), \(3, 5, 5\)\]"):
        ConceptPairs.from_captum(Concept(0, "stripes", batches))
    assert ConceptPairs.from_captum(Concept(0, "stripes", batches), max_examples=4).sample(2)[0].shape == (2, 3, 4, 4)


def test_from_captum_reads_a_shuffling_loader_in_order_and_keeps_the_callers_generators():
    """Reading a concept's DataLoader drew its seed from the global generator, and a shuffling one gave
    other pairs on every read: seeded fits differed and every resume was refused as other data."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(50, 6)
    expected = ConceptPairs.from_captum(Concept(0, "c", DataLoader(TensorDataset(x), batch_size=10)))
    state = torch.get_rng_state()
    for _ in range(2):
        shuffled = ConceptPairs.from_captum(Concept(0, "c", DataLoader(TensorDataset(x), batch_size=10, shuffle=True)))
        assert shuffled.fingerprint() == expected.fingerprint()
    assert torch.equal(torch.get_rng_state(), state)

    class Arrays(torch.utils.data.Dataset):  # NumPy items: collated into tensors, in order too
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return np.full((3, 4, 4), i / 8, dtype=np.float32)

    in_order = ConceptPairs.from_captum(Concept(0, "c", DataLoader(Arrays(), batch_size=4)))
    shuffled = ConceptPairs.from_captum(Concept(0, "c", DataLoader(Arrays(), batch_size=4, shuffle=True)))
    assert shuffled.fingerprint() == in_order.fingerprint()


def test_a_transform_taking_the_generator_makes_seeded_fits_reproducible():
    x, c, _ = synthetic(100)

    def noise(batch, generator):
        return batch + 0.3 * torch.randn(batch.shape, generator=generator)

    concepts = [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_transform("noise", x, noise)]
    settings = dict(factor_sizes={"c": 2, "noise": 2}, steps=3, n_blocks=1, hidden=8, pool_size=32, progress=False)
    a, b = (fit_concepts((IDENTITY, "0"), concepts, seed=4, **settings) for _ in range(2))
    for u, v in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="got ColorDigits; pass its images tensor"):
        ConceptPairs.from_labels("digit", ColorDigits("test"), ColorDigits("test").digits)
    with pytest.raises(ValueError, match=r"got ndarray; convert it with torch\.from_numpy"):
        ConceptPairs.from_labels("c", x.numpy(), c)
    dataset = torch.utils.data.TensorDataset(x, c)  # an ImageFolder's place: "got DataLoader." said no more
    with pytest.raises(ValueError, match=r"got DataLoader; gather its batches into one tensor, e\.g\. torch\.cat"):
        ConceptPairs.from_transform("noise", torch.utils.data.DataLoader(dataset, batch_size=4), noise)
    with pytest.raises(ValueError, match=r"got TensorDataset; stack its examples into one tensor, e\.g\. torch\.stack"):
        ConceptPairs.from_labels("c", dataset, c)


def test_colordigits_concepts():
    ds = ColorDigits("train", seed=0)
    concepts = ds.concepts()
    assert [c.name for c in concepts] == ["digit", "foreground", "background"]
    a, b = ds.concept("foreground").sample(4, torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (4, 3, 32, 32)
    assert ds.concept("digit", "differ").relation == "differ"


def test_sample_without_a_generator_uses_one_seeded_with_zero():
    # documented: generator=None draws with a generator seeded with 0 (not an unseeded one, whose
    # fixed default seed gives other pairs than manual_seed(0))
    x = torch.rand(12, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    concept = ConceptPairs.from_labels("c", x, torch.arange(12) % 3)
    a, b = concept.sample(8)
    expected_a, expected_b = concept.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(a, expected_a) and torch.equal(b, expected_b)


def test_one_set_pairs_must_share_the_concept():
    # one_set: two examples of one set, which share the concept; relation="differ" contradicts it
    def sampler(n, generator):
        return torch.rand(n, 2, generator=generator), torch.rand(n, 2, generator=generator)

    with pytest.raises(ValueError, match="`one_set` pairs share the concept"):
        ConceptPairs("c", sampler, relation="differ", one_set=True)
    assert ConceptPairs("c", sampler, relation="share", one_set=True).one_set


def test_a_transform_with_a_generator_keyword_or_default_gets_the_seed():
    """transform(batch, generator=None), a keyword-only generator and a second positional parameter
    defaulting to None all get the sampler's generator: seeded samples repeat, other seeds differ."""
    x = torch.rand(8, 3, 4, 4)

    def default(batch, generator=None):
        return batch + torch.randn(batch.shape, generator=generator)

    def keyword_only(batch, *, generator=None):
        return batch + torch.randn(batch.shape, generator=generator)

    def named_later(batch, scale=1.0, generator=None):  # the second parameter is not the generator
        return batch + scale * torch.randn(batch.shape, generator=generator)

    def second(batch, g=None):
        return batch + torch.randn(batch.shape, generator=g)

    for transform in (default, keyword_only, named_later, second):
        pairs = ConceptPairs.from_transform("noise", x, transform)
        (_, b1), (_, b2), (_, other) = (pairs.sample(4, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1))
        assert torch.equal(b1, b2), transform.__name__
        assert not torch.equal(b1, other), transform.__name__

    def setting(batch, scale=0.5):  # a second parameter with another default is a setting, not a generator
        return batch * scale

    assert torch.equal(ConceptPairs.from_transform("dim", x, setting).sample(4)[1],
                       ConceptPairs.from_transform("dim", x, setting).sample(4)[0] * 0.5)


@pytest.mark.parametrize("bad, error, match", [
    ([], ValueError, "empty|non-empty"),
    ({"colour": ConceptPairs("d", lambda n, g: (torch.rand(n, 2),) * 2)}, ValueError,
     r"`concepts\['colour'\]` is a ConceptPairs named 'd'; key it by its name"),
    ("digit", TypeError, "ConceptPairs"),
    ([ConceptPairs("a", lambda n, g: (torch.rand(n, 2),) * 2)] * 2, ValueError, "unique"),
])
def test_as_concepts_rejects(bad, error, match):
    with pytest.raises(error, match=match):
        as_concepts(bad)


def test_concept_definition_errors():
    with pytest.raises(ValueError, match="reserved"):
        ConceptPairs("residual", lambda n, g: None)
    with pytest.raises(ValueError, match="relation"):
        ConceptPairs("x", lambda n, g: None, relation="similar")
    mismatched = ConceptPairs("x", lambda n, g: (torch.rand(n, 3), torch.rand(n, 4)))
    with pytest.raises(ValueError, match="same shape"):
        mismatched.sample(2)
    # members of two float dtypes are fine (each is encoded in the encoder's dtype); they were refused
    a, b = ConceptPairs("x", lambda n, g: (torch.rand(n, 3), torch.rand(n, 3).double())).sample(2)
    assert (a.dtype, b.dtype) == (torch.float32, torch.float64)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator"):
        ConceptPairs("x", lambda n, g: (torch.rand(n, 3), torch.rand(n, 3))).sample(2, generator=5)


def test_from_labels_names_labels_that_are_not_one_per_input():
    """(M, 1) labels or one-hot rows: a TypeError naming `labels` and the fix (was "unhashable type: 'list'")."""
    x, y = torch.rand(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    for labels in (y[:, None], y[:, None].numpy(), nn.functional.one_hot(y), list(y[:, None]), list(y[:, None].numpy())):
        with pytest.raises(TypeError, match=r"`labels` must hold one hashable label per input.*reshape\(-1\)"):
            ConceptPairs.from_labels("digit", x, labels)
    for one in (torch.tensor(1), 1, y.numpy()[0]):  # "object of type 'int' has no len()" and the like before
        with pytest.raises(TypeError, match=r"`labels` must hold one label per input, shape \(6,\)"):
            ConceptPairs.from_labels("digit", x, one)


# ---------------------------------------------------------------- scores and sizes
def test_scores_measure_the_share_of_variance():
    x, c, s = synthetic(2000)
    concepts = [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("s", x, s)]
    scores = concept_scores((IDENTITY, "0"), concepts, n_pairs=2000)
    variance = x.var(0)
    expected = float(variance[:2].sum() / variance.sum())  # c fixes its two dimensions (up to noise)
    assert scores["c"] == pytest.approx(expected, abs=0.05)
    assert scores["s"] == pytest.approx(float(variance[2:4].sum() / variance.sum()), abs=0.05)
    sizes, _ = estimate_factor_sizes((IDENTITY, "0"), concepts, n_pairs=500)
    assert list(sizes) == ["c", "s", "residual"] and sum(sizes.values()) == 6


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(n_pairs=0), ValueError, "`n_pairs` must be >= 2"),
    (dict(n_pairs=1), ValueError, "`n_pairs` must be >= 2"),
    (dict(n_pairs=True), TypeError, "`n_pairs` must be an int"),
    (dict(n_pairs=2.5), TypeError, "`n_pairs` must be an int"),
    (dict(seed=1.5), TypeError, "`seed` must be an int"),
])
def test_scores_and_sizes_name_a_bad_n_pairs_or_seed(kwargs, error, match):
    """0 pairs failed inside torch.cat, 1 (or True) gave a score from a single pair, a float seed
    failed in manual_seed."""
    x, c, _ = synthetic(20)
    for scoring in (concept_scores, estimate_factor_sizes):
        with pytest.raises(error, match=match):
            scoring((IDENTITY, "0"), [ConceptPairs.from_labels("c", x, c)], **kwargs)


def test_differ_pairs_score_what_changes():
    x, _, _ = synthetic(500)

    def change_last_two(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch[:, :4], torch.randn(batch.shape[0], 2)], 1)

    scores = concept_scores((IDENTITY, "0"), [ConceptPairs.from_transform("noise", x, change_last_two)], n_pairs=2000)
    variance = x.var(0)
    assert scores["noise"] == pytest.approx(float(variance[4:].sum() / variance.sum()), abs=0.05)


def test_scores_are_taken_about_both_members_of_the_pairs():
    """A score is the members' covariance over their total variance, both about the mean of *all*
    members, a and b (docs/method.rst). For pairs b = a + shift the two halves differ: about both,
    the covariance is Var(a) − shift²/4 and the variance Var(a) + shift²/4; about the first
    members alone the pairs looked fully shared and the concept that changes the representation
    scored 0. Checked against the same formula on the very pairs the pool draws."""
    shift = torch.tensor([2.0, 0.0, 1.0, 0.0])

    def sampler(n, generator):
        a = torch.randn(n, 4, generator=generator) * torch.tensor([1.0, 0.5, 2.0, 1.0])
        return a, a + shift

    concept = ConceptPairs("shift", sampler, relation="differ")
    score = concept_scores((IDENTITY, "0"), [concept], n_pairs=400, seed=0)["shift"]
    a, b = concept.sample(400, torch.Generator().manual_seed(0))  # the pool of concept 0 under seed 0
    a, b = a.double(), b.double()
    members = torch.cat([a, b])
    centre = members.mean(0)
    shared = ((a - centre) * (b - centre)).mean(0).sum() / members.var(0, unbiased=False).sum()
    assert score == pytest.approx(1.0 - float(shared), abs=1e-5)
    # the population values: Σ(Var(a) − shift²/4) / Σ(Var(a) + shift²/4) = (6.25 − 1.25) / (6.25 + 1.25)
    assert score == pytest.approx(1.0 - 5.0 / 7.5, abs=0.1)


# ---------------------------------------------------------------- the pair likelihood
def test_pair_masks_correlate_the_shared_factor_or_everything_but_the_changed_one():
    """Which output dimensions of ``e`` the pair likelihood correlates (docs/method.rst): for a pair
    that shares concept F, F's block alone; for a pair that differs only in F, every other factor,
    the residual included, whose block the fit would otherwise leave free to hold F."""
    from captum_inn.training.concepts import _pair_masks

    e = FactorINN(7, {"a": 2, "b": 3}, n_blocks=1, hidden=8)  # a: 0-1, b: 2-4, residual: 5-6
    noop = lambda n, generator: (torch.zeros(n, 7), torch.zeros(n, 7))  # noqa: E731
    concepts = [ConceptPairs("a", noop), ConceptPairs("b", noop, relation="differ")]
    masks = _pair_masks(e, concepts)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(masks, expected)


def test_pair_nll_matches_the_bivariate_gaussian():
    rho = 0.9
    y_a, y_b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    shared = torch.tensor([True, False, False]).expand(5, 3)
    zeros = torch.zeros(5, dtype=torch.float64)
    ours = pair_nll(y_a, zeros, y_b, zeros, shared, rho)
    joint = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                   torch.tensor([[1, rho], [rho, 1]], dtype=torch.float64))
    normal = torch.distributions.Normal(0.0, 1.0)
    reference = -(joint.log_prob(torch.stack([y_a[:, 0], y_b[:, 0]], 1))
                  + normal.log_prob(y_a[:, 1:]).sum(1) + normal.log_prob(y_b[:, 1:]).sum(1))
    constant = 3 * math.log(2 * math.pi)  # the 2π terms pair_nll leaves out (6 dimensions)
    assert torch.allclose(ours, reference - constant, atol=1e-10)


# ---------------------------------------------------------------- fit_concepts
@pytest.fixture(scope="module")
def fitted():
    x, c, s = synthetic(1000)
    concepts = [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("s", x, s)]
    e = fit_concepts((IDENTITY, "0"), concepts, factor_sizes={"c": 2, "s": 2}, steps=600, n_blocks=4, hidden=64,
                     lr=2e-3, pool_size=1024, feature_noise=0.05, progress=False)
    return e, x, c, s, concepts


def test_fit_concepts_separates_the_concepts(fitted):
    e, x, c, s, concepts = fitted
    a, b = concepts[0].sample(500, torch.Generator().manual_seed(3))
    with torch.no_grad():
        fa, fb = e.split(e(a)[0]), e.split(e(b)[0])

    def corr(u, v):
        u, v = u - u.mean(0), v - v.mean(0)
        return float(((u * v).sum(0) / (u.norm(dim=0) * v.norm(dim=0))).mean())

    assert corr(fa["c"], fb["c"]) > 0.8          # the shared concept's factor agrees within pairs
    assert abs(corr(fa["s"], fb["s"])) < 0.2     # the other concept's does not
    assert e.fit_info["factor_sizes"] == {"c": 2, "s": 2, "residual": 2}
    assert e.fit_info["scores"] is None and len(e.fit_info["factor_variance"]) == 6
    assert e.history[-1] < e.history[0]


def test_fit_info_holds_the_variance_of_each_factor_over_the_pools_first_members():
    """``fit_info["factor_variance"]`` is the reference of LayerConcepts.encoded: the variance of each
    output dimension of ``e`` over the fitting pairs' first members (a standard deviation there shifted
    every share). Recomputed here on the same pairs, which the pool of concept k draws from a generator
    seeded with ``seed · 1009 + k``."""
    x, c, s = synthetic(200)
    concepts = [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("s", x, s)]
    e = fit_concepts((IDENTITY, "0"), concepts, factor_sizes={"c": 2, "s": 2}, steps=2, n_blocks=1, hidden=16,
                     pool_size=128, batch_size=16, seed=2, progress=False)
    firsts = torch.cat([concept.sample(128, torch.Generator().manual_seed(2 * 1009 + k))[0]
                        for k, concept in enumerate(concepts)])
    with torch.no_grad():
        expected = e(firsts)[0].var(0)
    assert (expected - 1).abs().max() > 0.01  # not the unit variance at which a std would pass for it
    torch.testing.assert_close(torch.tensor(e.fit_info["factor_variance"]), expected, atol=1e-5, rtol=1e-4)


def test_unused_code_dimensions_do_not_blow_up_the_first_steps():
    """A dimension the autoencoder leaves unused sits at the prior: constant mean, std 1. ActNorm was
    initialised on the means alone, scaled it by about 1/spread of its means, and the first losses
    were about 1e5."""
    import types

    class CollapsedAE(nn.Module):
        latent_dim = 8

        def encode(self, x):
            mean = x.flatten(1)[:, :8].clone()
            mean[:, 6:] *= 1e-3
            std = torch.full_like(mean, 0.05)
            std[:, 6:] = 1.0
            return types.SimpleNamespace(mean=mean, std=std)

        def decode(self, code):
            return code

    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    pairs = ConceptPairs.from_labels("a", x, (x[:, 0] > 0).long())
    inn = fit_concepts(CollapsedAE(), [pairs], steps=20, progress=False, factor_sizes={"a": 2, "residual": 6})
    assert max(inn.history) < 10


def test_fit_concepts_estimates_sizes_when_not_given():
    x, c, _ = synthetic(200)
    e = fit_concepts((IDENTITY, "0"), [ConceptPairs.from_labels("c", x, c)], steps=2, n_blocks=1, hidden=8,
                     pool_size=64, progress=False)
    assert set(e.fit_info["scores"]) == {"c"} and sum(e.factor_sizes.values()) == 6


def test_differ_pairs_that_a_transform_left_unchanged_are_warned_about():
    """A transform that changes nothing (a torchvision random one draws once per batch, so whole chunks of
    pairs came out unchanged) gave `differ` pairs of an input with itself: the score fell, unwarned."""
    x, c, s = synthetic(200)
    settings = dict(steps=1, n_blocks=1, hidden=8, pool_size=64, progress=False)
    labelled = ConceptPairs.from_labels("c", x, c)
    with pytest.warns(UserWarning, match=r"Concept 'same': 100% of its `differ` pairs are an input with itself.*"
                                         r"draws once per call, for a whole batch, per_image=True"):
        fit_concepts((IDENTITY, "0"), [labelled, ConceptPairs.from_transform("same", x, lambda batch: batch.clone())],
                     **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_concepts((IDENTITY, "0"), [labelled, ConceptPairs.from_transform("flip", x, lambda batch: -batch)],
                     **settings)


def test_a_sampler_without_the_generator_argument_is_named():
    """A sampler written as ``lambda n: ...`` failed with Python's bare "takes 1 positional argument but 2 were
    given", naming neither the concept nor the signature."""
    pairs = ConceptPairs("c", lambda n: (torch.rand(n, 4), torch.rand(n, 4)))
    with pytest.raises(TypeError, match=r"The sampler of concept 'c' must take \(n, generator\)"):
        pairs.sample(4)


def test_one_concept_given_twice_under_two_names_is_warned_about():
    """Two names for the same pairs fitted two factors of one concept, each with its full share of the
    layer, silently; concepts on other pairs, or the same inputs under other labels, are not warned about."""
    x, c, s = synthetic(200)
    settings = dict(steps=1, n_blocks=1, hidden=8, pool_size=64, progress=False)
    with pytest.warns(UserWarning, match=r"`concepts` 'c' and 'again' draw the same pairs.*pass it once"):
        fit_concepts((IDENTITY, "0"), [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("again", x, c)],
                     **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_concepts((IDENTITY, "0"), [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("s", x, s)],
                     **settings)


@pytest.mark.parametrize("kwargs, match", [
    (dict(factor_sizes={"c": 3, "residual": 4}), "sum to 7"),
    (dict(factor_sizes={"c": 6}), "leaving no residual"),
    (dict(factor_sizes={"colour": 2}), "unknown"),
    (dict(rho=1.0), "rho"),
])
def test_fit_concepts_rejects(kwargs, match):
    x, c, _ = synthetic(50)
    with pytest.raises(ValueError, match=match):
        fit_concepts((IDENTITY, "0"), [ConceptPairs.from_labels("c", x, c)], steps=1, pool_size=16, progress=False, **kwargs)


@pytest.mark.parametrize("factor_sizes, error, match", [
    ({"colour": 2}, ValueError, r"unknown: \['colour'\], missing: \['c'\]"),
    ([2], TypeError, "`factor_sizes` must be a mapping"),
    ({"c": 1.5}, ValueError, "whole"),
])
def test_fit_concepts_refuses_factor_sizes_before_encoding_the_pairs(factor_sizes, error, match):
    """A misspelt concept in ``factor_sizes`` was refused only after every pool was encoded."""
    def never(n, generator):
        raise AssertionError("drew pairs before refusing")

    with pytest.raises(error, match=match):
        fit_concepts((IDENTITY, "0"), [ConceptPairs("c", never)], factor_sizes=factor_sizes, steps=1, pool_size=16,
                     progress=False)


def test_fit_concepts_rejects_feature_maps_and_non_representations():
    conv = nn.Sequential(nn.Conv2d(3, 2, 3))
    pairs = ConceptPairs("x", lambda n, g: (torch.rand(n, 3, 6, 6), torch.rand(n, 3, 6, 6)))
    # the layer's fault, not the concept's: "Concept 'x''s pairs: Layer '0' gives ..." blamed the pairs
    with pytest.raises(ValueError, match=r"^Layer '0' gives activations of shape \(2, 4, 4\); the factor INN needs a vector"):
        fit_concepts((conv, "0"), [pairs], steps=1, pool_size=8, progress=False)
    with pytest.raises(TypeError, match="representation"):
        fit_concepts("my model", [pairs], steps=1, pool_size=8, progress=False)


def test_concept_checkpoint_round_trip_and_refusal(fitted, tmp_path):
    e = fitted[0]
    with pytest.raises(TypeError, match=r"save_concept_inn takes \(path, inn\), the path first"):
        save_concept_inn(e, str(tmp_path / "e.safetensors"))
    path = save_concept_inn(str(tmp_path / "e.safetensors"), e)
    assert isinstance(path, Path)
    loaded = load_concept_inn(str(path), representation=(IDENTITY, "0"))
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x)[0], e(x)[0])
    # the device second, as load_autoencoder takes it, was read as the representation ("str lacks decode")
    for device in ("cpu", torch.device("cpu")):
        with pytest.raises(TypeError, match=r"by keyword: load_concept_inn\(path, map_location='cpu'\)"):
            load_concept_inn(str(path), device)
    assert torch.equal(load_concept_inn(str(path), map_location="cpu")(x)[0], e(x)[0])
    assert loaded.fit_info["factor_sizes"] == e.fit_info["factor_sizes"]
    other = nn.Sequential(nn.Identity(), nn.Identity())
    with pytest.raises(CheckpointError, match="another representation"):
        load_concept_inn(str(path), representation=(other, "1"))
    with pytest.raises(CheckpointError, match="another representation"):
        load_concept_inn(str(path), representation=ConvAutoencoder((3, 8, 8), 6))
    # of another code size too: refused as a layer's INN, not as codes of size 6 ("codes of size" before)
    with pytest.raises(CheckpointError, match=r"another representation.*'kind': \('layer', 'autoencoder_code'\)"):
        load_concept_inn(str(path), representation=ConvAutoencoder((3, 8, 8), 5))


def test_a_factor_inn_saved_by_hand_loads_for_codes_of_its_size(tmp_path):
    """A FactorINN built and saved without fit_concepts records no representation; LayerConcepts reads
    it as codes, and load_concept_inn refused every autoencoder ("fitted on codes of size None")."""
    torch.manual_seed(0)
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=1, hidden=8)
    e(torch.randn(32, 6))
    path = save_concept_inn(str(tmp_path / "e.safetensors"), e.eval())
    assert load_concept_inn(str(path), representation=ConvAutoencoder((3, 8, 8), 6)).factor_names == ["a", "b", "residual"]
    with pytest.raises(CheckpointError, match="codes of size 6, but the autoencoder has latent_dim=5"):
        load_concept_inn(str(path), representation=ConvAutoencoder((3, 8, 8), 5))
    with pytest.raises(CheckpointError, match="another representation"):
        load_concept_inn(str(path), representation=(IDENTITY, "0"))


def test_the_fit_checkpoint_loads_as_the_returned_inn(tmp_path):
    """A finished fit's checkpoint holds its results (the factors' variance, LayerConcepts.encoded's
    reference), so loading it gives the returned INN; an unfinished one warns."""
    x, c, s = synthetic(200)
    concepts = [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("s", x, s)]
    path = str(tmp_path / "fit.safetensors")
    settings = dict(factor_sizes={"c": 2, "s": 2}, n_blocks=2, hidden=16, pool_size=64, progress=False)
    e = fit_concepts((IDENTITY, "0"), concepts, steps=6, checkpoint=path, checkpoint_every=4, **settings)
    loaded = load_concept_inn(path, representation=(IDENTITY, "0"))
    for key in ("factor_variance", "final_loss", "steps", "factor_sizes"):
        assert loaded.fit_info[key] == e.fit_info[key], key
    assert torch.equal(loaded(x[:4])[0], e(x[:4])[0])
    resumed = fit_concepts((IDENTITY, "0"), concepts, steps=8, checkpoint=path, checkpoint_every=4, **settings)
    assert load_concept_inn(path).fit_info["factor_variance"] == resumed.fit_info["factor_variance"]
    tensors, meta = load_checkpoint(path)
    del meta["fit_results"]  # as a fit interrupted before its end left it
    save_checkpoint(path, tensors, meta)
    with pytest.warns(UserWarning, match="unfinished fit_concepts \\(step 8\\).*prior's variance 1"):
        assert "factor_variance" not in load_concept_inn(path).fit_info


# ---------------------------------------------------------------- LayerConcepts
class VectorModel(nn.Module):
    """A classifier with a vector layer ``hidden`` (the IIN setting)."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3 * 8 * 8, 6)
        self.hidden = nn.ReLU()
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(self.bn(self.hidden(self.fc(self.flatten(x)))))


def test_layer_representation_keeps_the_model_exact():
    torch.manual_seed(0)
    model = VectorModel().eval()
    images = torch.rand(64, 3, 8, 8)
    pairs = ConceptPairs.from_labels("label", images, torch.arange(64) % 2)  # the untrained model predicts one class
    e = fit_concepts(LayerRepresentation(model, "hidden"), [pairs], steps=30, n_blocks=3, hidden=32,
                     pool_size=64, progress=False)
    explainer = LayerConcepts(model, "hidden", e)
    through = explainer.output_from_factors(images)
    assert (through - model(images)).abs().max() <= 1e-4
    assert torch.equal(through.argmax(1), model(images).argmax(1))
    factors = explainer.factors(images[:4]).requires_grad_()  # differentiable in the factors, as documented
    explainer.output_from_factors(images[:4], factors)[:, 0].sum().backward()
    assert factors.grad is not None and factors.grad.abs().sum() > 0
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="fitted on layer"):
        LayerConcepts(model, "fc", e)
    with pytest.raises(ValueError, match="autoencoder codes"):
        explainer.edit(images, "label")
    # an autoencoder beside a layer's factor INN was kept and never used, without a word
    with pytest.warns(UserWarning, match=r"`autoencoder` is not used: `concept_inn` acts on layer 'hidden' itself"):
        LayerConcepts(model, "hidden", e, ConvAutoencoder((3, 8, 8), latent_dim=4))


def test_a_compiled_model_that_has_run_is_read_and_edited():
    """torch.compile's graph skips hooks registered after it was built: once the compiled model had
    run, capture found its layer "did not run" and output_from_factors ignored the edited factors."""
    from captum_inn.capture import capture

    torch.manual_seed(0)
    model = VectorModel().eval()
    images = torch.rand(16, 3, 8, 8)
    pairs = ConceptPairs.from_labels("half", images, torch.arange(16) % 2)
    e = fit_concepts(LayerRepresentation(model, "hidden"), [pairs], steps=1, n_blocks=1, hidden=8, progress=False)
    compiled = torch.compile(model, backend="eager")
    x = images[:4]
    for grad in (False, True):  # the graphs a user's own calls built, in both grad modes
        with torch.set_grad_enabled(grad):
            compiled(x)
    assert torch.equal(capture(compiled, "_orig_mod.hidden", x), capture(model, "hidden", x))
    edited = LayerConcepts(model, "hidden", e).factors(x)
    edited[:, 0] = 3.0
    expected = LayerConcepts(model, "hidden", e).output_from_factors(x, edited)
    assert not torch.allclose(expected, model(x))  # the edit shows
    assert torch.allclose(LayerConcepts(compiled, "_orig_mod.hidden", e).output_from_factors(x, edited), expected)


def test_layer_representation_of_a_module_called_twice_keeps_the_model_exact():
    """The layer's first call is read (the pass stops there), and a warning says so; only that call is
    replaced, not the second."""

    class Twice(VectorModel):
        def forward(self, x):
            h = self.hidden(self.fc(self.flatten(x)))
            return self.out(self.hidden(self.bn(h) - 0.5))

    torch.manual_seed(0)
    model = Twice().eval()
    images = torch.rand(64, 3, 8, 8)
    pairs = ConceptPairs.from_labels("label", images, torch.arange(64) % 2)
    with pytest.warns(UserWarning, match=r"layer 'hidden' runs 2 times in each forward pass; the INN learns its "
                                         r"first call") as info:
        e = fit_concepts(LayerRepresentation(model, "hidden"), [pairs], steps=3, n_blocks=1, hidden=16,
                         pool_size=64, progress=False)
    assert [w.filename for w in info if "runs 2 times" in str(w.message)] == [__file__]
    assert (LayerConcepts(model, "hidden", e).output_from_factors(images) - model(images)).abs().max() <= 1e-4
    assert_no_hooks(model)


def test_layer_concepts_read_the_side_of_the_layer_their_inns_were_fitted_on(tmp_path):
    """The input and the output of a ReLU have the same shape, so reading the wrong side would go
    unnoticed: the side a fit recorded is the default, and the other side is refused."""
    torch.manual_seed(0)
    model = VectorModel().eval()
    images = torch.rand(64, 3, 8, 8)
    pairs = ConceptPairs.from_labels("label", images, torch.arange(64) % 2)
    on_input = LayerRepresentation(model, "hidden", attribute_to_layer_input=True)
    e = fit_concepts(on_input, [pairs], steps=5, n_blocks=1, hidden=16, pool_size=64, progress=False)
    assert e.fit_info["representation"]["attribute_to_layer_input"] is True
    explainer = LayerConcepts(model, "hidden", e)
    assert explainer.attribute_to_layer_input is True
    pre_relu = model.fc(model.flatten(images[:4]))  # the hooked input; it has negative entries
    assert torch.allclose(explainer.factors(images[:4]), e(pre_relu)[0], atol=1e-6)
    with pytest.raises(ValueError, match="`concept_inn` was fitted on the layer's input.*attribute_to_layer_input=True"):
        LayerConcepts(model, "hidden", e, attribute_to_layer_input=False)
    with pytest.raises(ValueError, match="fitted on the layer's input"):
        explainer.attribute(images[:4], target=0, attribute_to_layer_input=False)
    save_concept_inn(tmp_path / "e.safetensors", e)
    assert load_concept_inn(tmp_path / "e.safetensors", on_input).fit_info["representation"]["layer"] == "hidden"
    with pytest.raises(CheckpointError, match="attribute_to_layer_input"):
        load_concept_inn(tmp_path / "e.safetensors", LayerRepresentation(model, "hidden"))

    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    code_e = FactorINN(6, {"a": 2}, n_blocks=1, hidden=8)
    t = ConditionalINN(6, (6,), n_blocks=1, hidden=8)
    with torch.no_grad():  # ActNorm initialisation (the explainers refuse INNs that never saw data)
        code_e(torch.randn(16, 6))
        t(torch.randn(16, 6), torch.randn(16, 6))
    t.fit_info = {"layer": "hidden", "attribute_to_layer_input": True}
    assert LayerConcepts(model, "hidden", code_e, ae, invariance_inn=t).attribute_to_layer_input is True
    with pytest.raises(ValueError, match="`invariance_inn` was fitted on the layer's input"):
        LayerConcepts(model, "hidden", code_e, ae, invariance_inn=t, attribute_to_layer_input=False)
    with pytest.raises(ValueError, match="`invariance_inn` was fitted on layer 'hidden', not 'fc'"):
        LayerConcepts(model, "fc", code_e, ae, invariance_inn=t)

    # on codes, without invariance_inn, no method reads the layer: its side and selector were ignored unwarned
    with pytest.warns(UserWarning, match=r"`attribute_to_layer_input` and `selector` are not used: `concept_inn` acts "
                                         r"on the autoencoder's codes") as info:
        on_codes = LayerConcepts(model, "hidden", code_e, ae, attribute_to_layer_input=True, selector=0)
    assert info[0].filename == __file__
    with pytest.warns(UserWarning, match=r"`attribute_to_layer_input` is not used: .*no layer is read or replaced"):
        with_side = on_codes.attribute(images[:2], target=0, n_steps=2, attribute_to_layer_input=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = LayerConcepts(model, "hidden", code_e, ae, attribute_to_layer_input=False)  # Captum's default
        assert torch.allclose(plain.attribute(images[:2], target=0, n_steps=2, attribute_to_layer_input=False), with_side)


def test_layer_concepts_on_a_tuple_output_follow_the_recorded_selector(tmp_path):
    """A vector layer returning ``(h, aux)``: the concept INN is fitted on ``h`` (``selector=0``),
    records it, and the explainer reads and replaces ``h`` by default and refuses ``aux``."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(48, 6)

        def forward(self, v):
            h = self.lin(v)
            return h, h.flip(1)  # the same shape: reading the wrong one would go unnoticed

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.head = Pair(), nn.Linear(6, 3)

        def forward(self, image):
            h, aux = self.pair(image.flatten(1))
            return self.head(h) + aux.mean(1, keepdim=True)

    torch.manual_seed(0)
    model, images = TwoOutputs().eval(), torch.rand(64, 3, 4, 4)
    pairs = ConceptPairs.from_labels("label", images, torch.arange(64) % 2)
    rep = LayerRepresentation(model, "pair", selector=0)
    e = fit_concepts(rep, [pairs], steps=3, n_blocks=1, hidden=16, pool_size=64, progress=False)
    assert e.fit_info["representation"]["selector"] == 0
    explainer = LayerConcepts(model, "pair", e)
    assert explainer.selector == 0
    x = images[:4]
    assert torch.allclose(explainer.factors(x), e(model.pair.lin(x.flatten(1)))[0], atol=1e-6)
    assert torch.allclose(explainer.output_from_factors(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="`concept_inn` was fitted with selector=0, but selector=1"):
        LayerConcepts(model, "pair", e, selector=1)
    save_concept_inn(tmp_path / "e.safetensors", e)
    assert load_concept_inn(tmp_path / "e.safetensors", rep).fit_info["representation"]["selector"] == 0
    for other in (1, None):
        with pytest.raises(CheckpointError, match="selector"):
            load_concept_inn(tmp_path / "e.safetensors", LayerRepresentation(model, "pair", selector=other))
    assert load_concept_inn(tmp_path / "e.safetensors", LayerRepresentation(model, "pair", selector=lambda o: o[0]))
    # a callable selector reads factors; attributions cannot put them back, which the fit says before it runs
    first = lambda out: out[0]  # noqa: E731
    with pytest.warns(UserWarning, match=r"reads layer 'pair' with a callable selector: LayerConcepts can read"):
        by_callable = fit_concepts(LayerRepresentation(model, "pair", selector=first), [pairs], steps=3, n_blocks=1,
                                   hidden=16, pool_size=64, progress=False)
    reading = LayerConcepts(model, "pair", by_callable, selector=first)
    with pytest.warns(UserWarning, match=r"fitted with a callable selector \(.*<lambda>\), but selector=1 was passed"):
        LayerConcepts(model, "pair", by_callable, selector=1)  # read another tensor than the fit's, silently
    assert reading.factors(x).shape == (4, by_callable.dim)
    with pytest.raises(TypeError, match="a callable selector picks a tensor out of the output but cannot say where"):
        reading.attribute(x, target=0)


@pytest.fixture(scope="module")
def code_setup():
    torch.manual_seed(0)
    model = VectorModel().eval()
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    e(torch.randn(32, 6))
    for p in e.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    t = ConditionalINN(6, (6,), n_blocks=2, hidden=16)
    t(torch.randn(32, 6), torch.rand(32, 6))
    return model, ae, e.eval(), t.eval()


def test_encoded_shares_follow_their_formula_for_an_inn_that_reads_its_condition(code_setup):
    """1 − Σ_d Var_v(e_kd(z̄_s)) / Σ_d Var_x(e_kd) per input, computed here from t.sample on each input
    alone. The fixture's fresh invariance INN ignores its condition, so pairing an input's samples
    with another input's activation, or averaging a factor's variances instead of summing them,
    passed every other test."""
    from captum_inn.capture import capture

    model, ae, fixture_e, _ = code_setup
    t = random_conditional_inn((6,))
    t.embedder.set_input_statistics(capture(model, "hidden", torch.rand(64, 3, 8, 8)))
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    e.load_state_dict(fixture_e.state_dict())
    e.fit_info = {"factor_variance": [0.5, 1.0, 1.5, 2.0, 0.8, 1.2]}
    explainer = LayerConcepts(model, "hidden", e.eval(), ae, invariance_inn=t)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * torch.tensor([0.0, 0.2, 0.6, 1.0]).view(4, 1, 1, 1)
    n_samples = 4000
    # without re-encoding: the random autoencoder's E(D(·)) nearly collapses the samples (every share ~1)
    shares = explainer.encoded(x, n_samples=n_samples, seed=0, reencode=False)
    reference = torch.tensor(e.fit_info["factor_variance"])
    expected = []
    with torch.no_grad():
        for i in range(len(x)):
            z = capture(model, "hidden", x[i : i + 1]).expand(n_samples, -1)
            variance = e(t.sample(z, generator=torch.Generator().manual_seed(100 + i)))[0].var(dim=0)
            expected.append([1 - variance[s].sum() / reference[s].sum() for s in e.factor_slices.values()])
    torch.testing.assert_close(shares, torch.tensor(expected), atol=0.04, rtol=0)


@pytest.mark.parametrize("reencode", [True, False])
def test_a_reference_measures_the_factors_spread_on_its_own_images(code_setup, reencode):
    """``reference=`` images replace the fit's ``factor_variance`` by their factors' variance, read as the
    samples are (``E(D(E(x)))`` with ``reencode``): the draws' spread, recovered from the default shares,
    over that variance summed per factor. Split into parts, the same. In float64: the random
    autoencoder's ``E(D(·))`` leaves the codes a spread of about 1e-8, below float32's resolution."""
    model, ae, e, t = (copy.deepcopy(m).double() for m in code_setup)  # the fixture's are shared by the module
    e.fit_info = {"factor_variance": [0.5, 1.0, 1.5, 2.0, 0.8, 1.2]}
    explainer = LayerConcepts(model, "hidden", e, ae, invariance_inn=t)
    x, reference = torch.rand(3, 3, 8, 8, dtype=torch.float64), torch.rand(40, 3, 8, 8, dtype=torch.float64)
    by_fit = explainer.encoded(x, n_samples=8, seed=0, reencode=reencode)
    by_reference = explainer.encoded(x, n_samples=8, seed=0, reencode=reencode, reference=reference)
    with torch.no_grad():
        codes = ae.encode(reference).mean
        if reencode:
            codes = ae.encode(ae.decode(codes)).mean
        spread = e(codes)[0].var(0)
    fit = torch.tensor(e.fit_info["factor_variance"], dtype=torch.float64)
    slices = list(e.factor_slices.values())
    draws = (1 - by_fit) * torch.stack([fit[s].sum() for s in slices])  # Σ_d Var_v per input and factor
    expected = 1 - draws / torch.stack([spread[s].sum() for s in slices])
    torch.testing.assert_close(by_reference, expected, rtol=1e-4, atol=1e-5)
    in_parts = explainer.encoded(x, n_samples=8, seed=0, reencode=reencode, reference=reference, internal_batch_size=8)
    torch.testing.assert_close(in_parts, by_reference, rtol=1e-4, atol=1e-5)


def test_shares_far_below_zero_warn_and_point_at_a_reference(code_setup):
    """A concept INN that learned its few fitting images spreads any new image's factors wider than
    its recorded ``factor_variance`` (on 718 photos: shares of −1.6 to −7 at the default steps, 0.4 with
    held-out images as the reference). A named concept's shares averaging below −1 say so and name
    ``reference=``; the residual's do not (on ColorDigits they read −2 to −8 in every tutorial run)."""
    model, ae, e, t = code_setup
    e = copy.deepcopy(e)
    e.fit_info = {"factor_variance": [1e-4] * 6}
    explainer = LayerConcepts(model, "hidden", e, ae, invariance_inn=t)
    x = torch.rand(3, 3, 8, 8)
    # without re-encoding: the random autoencoder's E(D(·)) collapses the samples
    with pytest.warns(UserWarning, match=r"far below 0 \('a' -[0-9.]+, 'b' -[0-9.]+\): .*`reference=`"):
        explainer.encoded(x, n_samples=4, seed=0, reencode=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explainer.encoded(x, n_samples=4, seed=0, reencode=False, reference=torch.rand(16, 3, 8, 8))  # no warning
        e.fit_info = {"factor_variance": [1.0] * 6}
        explainer.encoded(x, n_samples=4, seed=0, reencode=False)
        e.fit_info = {"factor_variance": [1.0] * 4 + [1e-4] * 2}  # the residual's alone (see the docstring)
        assert explainer.encoded(x, n_samples=4, seed=0, reencode=False).mean(0)[2] < -1


def test_a_reference_must_be_images_of_the_inputs_shape(code_setup):
    model, ae, e, t = code_setup
    explainer = LayerConcepts(model, "hidden", e, ae, invariance_inn=t)
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"`reference` must be a tensor of images \(M, 3, 8, 8\), got list"):
        explainer.encoded(x, n_samples=2, reference=[x])
    for bad in (torch.rand(1, 3, 8, 8), torch.rand(4, 3, 4, 4), torch.rand(4, 8, 8)):
        with pytest.raises(ValueError, match=r"`reference` must hold at least 2 images of the inputs' shape"):
            explainer.encoded(x, n_samples=2, reference=bad)
    with pytest.warns(UserWarning, match="`reference`"):  # 8-bit pixels, as for `inputs`
        explainer.encoded(x, n_samples=2, reference=torch.full((4, 3, 8, 8), 255.0))


@pytest.mark.parametrize("n_steps", [2, 5, 50])
def test_trapezoid_attributions_are_exact_on_a_straight_path(n_steps):
    """Captum's trapezoid weights sum to (n-1)/n: on an output linear in the factors, where the trapezoid
    rule is exact, every attribution came out 1/n short (the delta −change/n, most of the error at 512 steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Linear(6, 3)).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    e(torch.randn(32, 6) * 3 + 1)  # ActNorm's initialisation: an affine map
    with torch.no_grad():
        for name, p in e.named_parameters():
            if ".subnet." in name:
                p.zero_()  # couplings that pass their input through: e⁻¹ is affine, the output linear in the factors
    e.fit_info = {"representation": {"kind": "layer", "layer": "1", "dim": 6}}
    explainer = LayerConcepts(model, "1", e.eval())
    x = torch.rand(4, 3, 2, 2)
    attributions, delta = explainer.attribute(x, target=1, n_steps=n_steps, return_convergence_delta=True)
    with torch.no_grad():
        change = model(x)[:, 1] - model[2](e(torch.zeros(4, 6), rev=True)[0])[:, 1]
    assert torch.allclose(attributions.sum(1), change, rtol=1e-4, atol=1e-5), (attributions.sum(1), change)
    assert delta.abs().max() <= 1e-4 * change.abs().max()
    left = explainer.attribute(x, target=1, n_steps=n_steps, method="riemann_left")  # weights 1/n: already summed to 1
    assert torch.allclose(left.sum(1), change, rtol=1e-4, atol=1e-5)


def test_attribute_is_complete(code_setup):
    model, ae, e, _ = code_setup
    explainer = LayerConcepts(model, "hidden", e, ae)
    x = torch.rand(5, 3, 8, 8)
    attributions, delta = explainer.attribute(x, target=2, return_convergence_delta=True)
    assert attributions.shape == (5, 3)
    with torch.no_grad():
        decoded = model(ae.decode(ae.encode(x).mean))[:, 2]
        base = model(ae.decode(e(torch.zeros(5, 6), rev=True)[0]))[:, 2]
    change = decoded - base
    assert torch.allclose(attributions.sum(1) - change, delta, atol=1e-5)
    assert ((attributions.sum(1) - change).abs() <= 1e-2 * change.abs() + 1e-6).all()
    assert explainer.has_convergence_delta() and explainer.multiplies_by_inputs
    assert not x.requires_grad
    # batching the path points (the inputs travel as extra arguments) changes nothing, per-input targets too
    targets = [0, 1, 2, 3, 0]
    whole = explainer.attribute(x, target=targets, n_steps=6, internal_batch_size=None)
    for size in (7, 13, 256):  # Captum takes at least one point per input
        batched = explainer.attribute(x, target=targets, n_steps=6, internal_batch_size=size)
        assert torch.allclose(batched, whole, atol=1e-5), size
    # every TargetType form, as Captum's methods accept
    for target in (torch.tensor(1), [0, 1, 2, 3, 0], torch.tensor([0, 1, 2, 3, 0])):
        assert explainer.attribute(x, target=target).shape == (5, 3)
    with pytest.raises(ValueError, match="`target` holds 3 entries for 5 inputs"):
        explainer.attribute(x, target=[0, 1, 2])
    with pytest.raises(TypeError, match="positional"):  # written for IG's order (inputs, baselines, target)
        explainer.attribute(x, 0.0, 2)


class _Scaled(nn.Module):
    """``code_setup``'s model with a per-input argument: its logits times ``scale``."""

    def __init__(self, model):
        super().__init__()
        self.net = model

    def forward(self, x, scale):
        return self.net(x) * scale[:, None]


def test_more_inputs_than_the_internal_batch_size_go_in_bounded_parts(code_setup):
    """More inputs than ``internal_batch_size``: the call took one step of every input per pass (all
    N rows at once, gigabytes for many large images, and Captum's warning). The inputs now go in parts:
    no pass is larger than the bound, no warning, and the attributions and deltas are the unbatched
    ones, with per-input targets, baselines and extra arguments cut with their inputs."""
    model, ae, e, _ = code_setup
    scaled = _Scaled(model).eval()
    explainer = LayerConcepts(scaled, "net.hidden", e, ae)
    torch.manual_seed(1)
    x, scale = torch.rand(7, 3, 8, 8), torch.rand(7) + 0.5
    targets, baselines = torch.tensor([0, 1, 2, 3, 0, 1, 2]), 0.3 * torch.randn(7, e.dim)
    rows = []
    handle = scaled.net.fc.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batched, batched_delta = explainer.attribute(
                x, target=targets, baselines=baselines, additional_forward_args=(scale,), n_steps=8,
                internal_batch_size=3, return_convergence_delta=True)
    finally:
        handle.remove()
    assert rows and max(rows) <= 3, rows
    whole, whole_delta = explainer.attribute(x, target=targets, baselines=baselines, additional_forward_args=(scale,),
                                             n_steps=8, internal_batch_size=7 * 8, return_convergence_delta=True)
    assert torch.allclose(batched, whole, atol=1e-6) and torch.allclose(batched_delta, whole_delta, atol=1e-6)
    # the default bound comes from the image size: a quarter of the other explainers' rows, at most 256
    from captum_inn.attr import _common

    assert [_common.default_gradient_rows(torch.zeros(1, 3, size, size)) for size in (8, 32, 128, 256)] == [256, 256, 85, 21]
    rows.clear()
    handle = scaled.net.fc.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("captum_inn.attr.concepts.default_gradient_rows", lambda images: 3)
            by_default = explainer.attribute(x, target=targets, baselines=baselines, additional_forward_args=(scale,),
                                             n_steps=8)
    finally:
        handle.remove()
    assert rows and max(rows) <= 3 and torch.allclose(by_default, whole, atol=1e-6), rows
    # a list of targets and a shared baseline are cut (or not) alike
    listed = explainer.attribute(x, target=targets.tolist(), baselines=baselines[:1], additional_forward_args=(scale,),
                                 n_steps=8, internal_batch_size=2)
    assert torch.allclose(listed, explainer.attribute(x, target=targets, baselines=baselines[0],
                                                      additional_forward_args=(scale,), n_steps=8), atol=1e-6)


def test_progress_bars_count_every_path_point_and_sample(code_setup, monkeypatch):
    """``show_progress=True`` shows a bar that ends at its total: ``attribute``'s over every input's
    steps and the delta's two points (over parts of the inputs too), ``encoded``'s over the samples.
    Off by default, as Captum's ``show_progress``."""
    import captum_inn.attr.concepts as module

    model, ae, e, t = code_setup
    bars = record_bars(monkeypatch, module)
    explainer = LayerConcepts(model, "hidden", e, ae, invariance_inn=t)
    x = torch.rand(5, 3, 8, 8)
    explainer.attribute(x, target=1, n_steps=6, internal_batch_size=2, show_progress=True)
    explainer.encoded(x, n_samples=4, internal_batch_size=8, show_progress=True)
    explainer.encoded_summary(x, n_samples=4, show_progress=True)
    assert bars == [("concept attributions", 5 * 8, 5 * 8, False), ("concept shares", 5 * 4, 5 * 4, False),
                    ("concept shares", 5 * 4, 5 * 4, False)]
    explainer.attribute(x, target=1, n_steps=6)
    explainer.encoded(x, n_samples=4)
    assert [bar[3] for bar in bars[3:]] == [True, True]


def test_a_model_returning_a_dict_is_refused_with_the_forward_func_to_pass(code_setup):
    """A ``{"logits": ..., "aux": ...}`` model: IG picks the target from a tensor, so the error says to
    pass a forward_func returning the logits (Captum failed with ``'dict' object has no attribute
    'shape'``); the lambda it suggests then gives the wrapped model's scores."""
    model, ae, e, _ = code_setup

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, images):
            return {"logits": self.net(images), "aux": images.mean((1, 2, 3))}

    heads = Heads().eval()
    x = torch.rand(3, 3, 8, 8)
    explainer = LayerConcepts(heads, "net.hidden", e, ae)
    with pytest.raises(TypeError, match=r"returns a dict with keys \['logits', 'aux'\].*model\(x\)\['logits'\]"):
        explainer.attribute(x, target=1, n_steps=8)
    with pytest.raises(TypeError, match="returns a dict"):
        explainer.compute_convergence_delta(torch.zeros(3, 3), None, x, target=1)
    assert_no_hooks(heads)
    scores = LayerConcepts(lambda t: heads(t)["logits"], heads.net.hidden, e, ae).attribute(x, target=1, n_steps=8)
    assert torch.allclose(scores, LayerConcepts(model, "hidden", e, ae).attribute(x, target=1, n_steps=8))


def test_a_scalar_tensor_baseline_is_the_number_it_holds(code_setup):
    """0-d tensors of any real dtype, as Captum's baselines may be (torch.tensor(0) is an int64)."""
    model, ae, e, _ = code_setup
    explainer = LayerConcepts(model, "hidden", e, ae)
    x = torch.rand(3, 3, 8, 8)
    for number, scalar in ((0, torch.tensor(0)), (1.0, torch.tensor(1)), (0.5, torch.tensor(0.5, dtype=torch.float64))):
        expected = explainer.attribute(x, target=1, n_steps=8, baselines=number)
        assert torch.allclose(explainer.attribute(x, target=1, n_steps=8, baselines=scalar), expected, atol=1e-6)
        assert torch.allclose(explainer.attribute(x, target=1, n_steps=8, baselines=(scalar,)), expected, atol=1e-6)


def test_a_tuple_of_baselines_takes_the_image_inputs_entry(code_setup):
    """Captum's tuple form holds one baseline per input; the factor-space one is the entry of the
    image input. With the image second (``image_input=1``) the first entry, the label's, was taken
    instead: the path started at another point and the scores explained another change."""
    model, ae, e, _ = code_setup

    explainer = LayerConcepts(LabelFirst(model).eval(), "net.hidden", e, ae, image_input=1)
    x, labels = torch.rand(3, 3, 8, 8), torch.arange(3)
    base = 0.5 * torch.randn(1, e.dim, generator=torch.Generator().manual_seed(0))
    direct = explainer.attribute((labels, x), target=1, n_steps=8, baselines=base)
    assert torch.allclose(explainer.attribute((labels, x), target=1, n_steps=8, baselines=(0.0, base)), direct,
                          atol=1e-6)
    assert not torch.allclose(explainer.attribute((labels, x), target=1, n_steps=8), direct, atol=1e-3)
    # the delta, and compute_convergence_delta, take the same start point
    scores, delta = explainer.attribute((labels, x), target=1, n_steps=8, baselines=(0.0, base),
                                        return_convergence_delta=True)
    recomputed = explainer.compute_convergence_delta(scores, (0.0, base), (labels, x), target=1)
    assert torch.allclose(delta, recomputed, atol=1e-5)


def test_every_method_explains_a_float64_model_with_a_float32_autoencoder(code_setup):
    """The networks fitted for a model, kept in float32 while the model is converted with .double():
    images go to the encoder in its dtype (factors, attribute and edit used to fail), and decoded
    images come back in the dtype of the images given, which the model takes."""
    import copy

    model, ae, e, t = code_setup
    plain = LayerConcepts(model, "hidden", e, ae, invariance_inn=t)
    mixed = LayerConcepts(copy.deepcopy(model).double(), "hidden", e, ae, invariance_inn=t)
    x = torch.rand(3, 3, 8, 8)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    calls = {
        "factors": lambda ex, inp: ex.factors(inp),
        "decompose": lambda ex, inp: torch.cat(list(ex.decompose(inp).values()), 1),
        "attribute": lambda ex, inp: ex.attribute(inp, target=1, n_steps=8),
        "delta": lambda ex, inp: ex.attribute(inp, target=1, n_steps=8, return_convergence_delta=True)[1],
        "compute_convergence_delta": lambda ex, inp: ex.compute_convergence_delta(
            ex.attribute(inp, target=1, n_steps=8), None, inp, target=1),
        "output_from_factors": lambda ex, inp: ex.output_from_factors(inp).detach(),
        "edit with donors": lambda ex, inp: ex.edit(inp, "a", donors=inp.flip(0)),
        "edit with a value": lambda ex, inp: ex.edit(inp, "b", value=torch.zeros(2)),
        "edit with a draw": lambda ex, inp: ex.edit(inp, "residual", generator=g()),
        "encoded": lambda ex, inp: ex.encoded(inp, n_samples=4, generator=g()),
        "encoded_summary": lambda ex, inp: torch.tensor(list(ex.encoded_summary(inp, n_samples=4, generator=g()).values())),
    }
    for name, call in calls.items():
        want, got = call(plain, x), call(mixed, x.double())
        assert torch.allclose(got.double(), want.double(), atol=1e-4), name
        if name.startswith("edit") or name == "output_from_factors":
            assert got.dtype == torch.float64, name


def test_encoded_shares_use_the_unbiased_variance_of_the_draws():
    """The reference ``factor_variance`` is an unbiased variance, so the spread of an input's draws must
    be one too: with ``n_samples=3`` the biased one is 2/3 of it and every share came out too high by a
    third of what the layer discards. On an affine path ``e(t⁻¹(v | z)) = M v + b`` (couplings that pass
    their input through) the variance of the draws is ``diag(M Mᵀ)``, and a reference of r times that
    gives a share of 1 − 1/r on average over inputs."""
    torch.manual_seed(0)
    model = VectorModel().eval()
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=1, hidden=8)
    e(torch.randn(64, 6) * torch.tensor([0.5, 1.0, 2.0, 3.0, 0.7, 1.5]) + 1)
    t = ConditionalINN(6, (6,), n_blocks=1, hidden=8, embed_dim=4)
    t(torch.randn(64, 6) * 2, torch.rand(64, 6))
    with torch.no_grad():
        for inn in (e, t):
            for name, p in inn.named_parameters():
                if ".subnet." in name:
                    p.zero_()  # identity couplings: e ∘ t⁻¹ is affine in v, whatever the condition
    jac = torch.autograd.functional.jacobian(lambda v: e(t(v, torch.rand(1, 6), rev=True)[0])[0],
                                             torch.zeros(1, 6)).reshape(6, 6)
    # references 2, 4 and 4/3 times the draws' variance: shares 1/2, 3/4 and 1/4
    e.fit_info = {"factor_variance": ((jac ** 2).sum(1) * torch.tensor([2.0, 2, 4, 4, 4 / 3, 4 / 3])).tolist()}
    explainer = LayerConcepts(model, "hidden", e.eval(), ae, invariance_inn=t.eval())
    x = torch.rand(1, 3, 8, 8).expand(1500, -1, -1, -1)
    shares = explainer.encoded(x, n_samples=3, seed=0, reencode=False)
    torch.testing.assert_close(shares.mean(0), torch.tensor([0.5, 0.75, 0.25]), atol=0.04, rtol=0)


def test_edit_decompose_encoded(code_setup):
    model, ae, e, t = code_setup
    flags = training_flags(model)
    explainer = LayerConcepts(model, "hidden", e, ae, invariance_inn=t)
    x, donors = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    factors = explainer.decompose(x)
    assert list(factors) == ["a", "b", "residual"] and factors["a"].shape == (4, 2)
    edited = explainer.edit(x, "a", donors=donors)
    after = explainer.decompose(edited)
    assert edited.shape == x.shape
    # the encoder of a random autoencoder does not re-encode its decodings exactly; check in code space
    with torch.no_grad():
        code = e(ae.encode(x).mean)[0]
        code[:, :2] = e(ae.encode(donors).mean)[0][:, :2]
        expected = ae.decode(e(code, rev=True)[0])
    assert torch.allclose(edited, expected, atol=1e-5)
    assert after["a"].shape == (4, 2)
    same = explainer.edit(x, "b", value=torch.zeros(2))
    assert same.shape == x.shape
    # the value lands in b's factor (one row for all, or one per input), every other factor kept
    rows = torch.arange(8.0).view(4, 2) / 4
    with torch.no_grad():
        code = e(ae.encode(x).mean)[0]
        for value, expected_b in ((torch.zeros(2), torch.zeros(4, 2)), (rows[:1], rows[:1].expand(4, 2)), (rows, rows)):
            code_b = code.clone()
            code_b[:, 2:4] = expected_b
            assert torch.allclose(explainer.edit(x, "b", value=value), ae.decode(e(code_b, rev=True)[0]), atol=1e-5)
    one_donor = explainer.edit(x, "a", donors=donors[:1])  # one donor for every input
    with torch.no_grad():
        code_a = code.clone()
        code_a[:, :2] = e(ae.encode(donors[:1]).mean)[0][:, :2]
    assert torch.allclose(one_donor, ae.decode(e(code_a, rev=True)[0]), atol=1e-5)
    named = Concept(0, "a", None)  # Captum's concept objects stand for their name
    assert torch.equal(explainer.edit(x, named, donors=donors), edited)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(explainer.edit(x, "residual", generator=g1), explainer.edit(x, "residual", generator=g2))
    shares = explainer.encoded(x, n_samples=8, generator=torch.Generator().manual_seed(0))
    assert shares.shape == (4, 3) and torch.isfinite(shares).all()
    # seed=, as LayerInvariance takes it: a generator seeded so, in every call
    assert torch.equal(explainer.encoded(x, n_samples=8, seed=0), shares)
    # each input takes the draws of its place in the batch: the first ones repeat alone
    torch.testing.assert_close(explainer.encoded(x[:2], n_samples=8, seed=0), shares[:2])
    assert torch.equal(explainer.edit(x, "residual", seed=0), explainer.edit(x, "residual", generator=g1.manual_seed(0)))
    assert not torch.equal(explainer.edit(x, "residual", seed=1), explainer.edit(x, "residual", seed=0))
    for call in (lambda: explainer.encoded(x, n_samples=8, seed=0, generator=g1),
                 lambda: explainer.edit(x, "residual", seed=0, generator=g1)):
        with pytest.raises(ValueError, match="at most one of `generator` and `seed`"):
            call()
    # in parts of one input (8 samples per pass, a bound of 10 decodes 1 input per pass): the same shares;
    # the default bound is set by PASS_VALUES (all 32 samples at once took 4 GB for 32 inputs of 128×128)
    seen = []
    handle = explainer.invariance_inn.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
    try:
        parts = explainer.encoded(x, n_samples=8, generator=torch.Generator().manual_seed(0), internal_batch_size=10)
    finally:
        handle.remove()
    torch.testing.assert_close(parts, shares)
    assert seen and max(seen) <= 8, seen
    from captum_inn.attr import _common

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_common, "PASS_VALUES", 16 * x[0].numel())
        torch.testing.assert_close(explainer.encoded(x, n_samples=8, generator=torch.Generator().manual_seed(0)),
                                   shares)
    with pytest.raises(ValueError, match="`internal_batch_size` must be"):
        explainer.encoded(x, n_samples=8, internal_batch_size=0)
    summary = explainer.encoded_summary(x, n_samples=8, generator=torch.Generator().manual_seed(0))
    assert set(summary) == {"a", "b", "residual"}
    for k, column in zip(summary, shares.unbind(1)):  # the same draws: mean and standard error of those shares
        assert summary[k] == pytest.approx(float(column.mean()), abs=1e-6)
        assert summary.standard_error[k] == pytest.approx(float(column.std() / 2), abs=1e-6)
    assert summary.n_inputs == 4 and " ± " in str(summary)
    from matplotlib.container import ErrorbarContainer

    from captum_inn.visualization import plot_concept_bars

    for bars in ({"hidden": summary}, summary):  # grouped (a layer each) and single: error bars drawn
        _, ax = plot_concept_bars(bars)
        assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)
    one = explainer.encoded_summary(x[:1], n_samples=4)
    assert all(math.isnan(v) for v in one.standard_error.values())
    assert training_flags(model) == flags
    assert_no_hooks(model)


def test_a_bound_forward_runs_the_model_in_eval_mode_and_a_plain_function_warns(code_setup):
    """model.forward reaches the model: every pass (attribute's backward ones too) in eval mode,
    batch norm's running statistics left alone. Behind a lambda only the hooked layer can be
    switched, which building the explainer says."""
    _, ae, e, t = code_setup
    torch.manual_seed(0)
    model = VectorModel()
    with torch.no_grad():  # running statistics unlike any batch's, so the two modes differ
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(4.0)
    x = torch.rand(3, 3, 8, 8)

    def results(explainer):
        return (explainer.attribute(x, target=1, n_steps=4), explainer.output_from_factors(x).detach(),
                explainer.encoded(x, n_samples=4, generator=torch.Generator().manual_seed(0)))

    expected = results(LayerConcepts(model.eval(), "hidden", e, ae, invariance_inn=t))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = results(LayerConcepts(model.forward, model.hidden, e, ae, invariance_inn=t))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match=r"LayerConcepts cannot switch the model to eval mode.*model.eval\(\)"):
        LayerConcepts(lambda images: model(images), model.hidden, e, ae)


def test_a_layer_module_used_twice_keeps_its_second_call_behind_a_plain_function():
    """One nn.ReLU shared by two stages: the factors are read from its first call, but behind a lambda
    (model out of reach) every call was replaced, so output_from_factors(x) was not model(x) and the
    concept attributions differed from those of the model itself, without a warning."""

    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.out, self.act = nn.Linear(8, 6), nn.Linear(6, 6), nn.Linear(6, 3), nn.ReLU()

        def forward(self, x):
            return self.out(self.act(self.l2(self.act(self.l1(x.flatten(1))))))

    torch.manual_seed(0)
    model = SharedReLU().eval()
    e = FactorINN(6, {"x": 2}, n_blocks=1, hidden=8, seed=0)
    e.fit_info = {"representation": {"kind": "layer", "layer": "act", "dim": 6}}
    with torch.no_grad():
        e(torch.randn(16, 6))  # ActNorm's initialisation
    e.eval()
    x = torch.rand(4, 2, 2, 2)
    expected = LayerConcepts(model, model.act, e).attribute(x, target=1, n_steps=16)
    for forward in (model.forward, lambda images: model(images)):
        explainer = LayerConcepts(forward, model.act, e)
        assert torch.allclose(explainer.output_from_factors(x), model(x), atol=1e-5)
        assert torch.allclose(explainer.attribute(x, target=1, n_steps=16), expected, atol=1e-6)
    assert_no_hooks(model)


@pytest.mark.parametrize("call, error, match", [
    (lambda ex, x: ex.edit(x, "colour"), ValueError, "Unknown concept"),
    (lambda ex, x: ex.edit(x, "a", donors=torch.rand(3, 3, 8, 8)), ValueError, "1 or 4"),
    (lambda ex, x: ex.edit(x, "a", value=torch.zeros(3)), ValueError, "shape"),
    (lambda ex, x: ex.edit(x, "a", donors=x, value=torch.zeros(2)), ValueError, "at most one"),
    (lambda ex, x: ex.attribute(x, target=0, baselines=torch.zeros(5)), ValueError, "baselines"),
    (lambda ex, x: ex.encoded(x), ValueError, "invariance INN"),
    (lambda ex, x: ex.attribute(x * float("nan"), target=0), ValueError, "NaN"),
    (lambda ex, x: ex.attribute(x, target=0, internal_batch_size="8"), TypeError, "`internal_batch_size` must be an int"),
    (lambda ex, x: ex.attribute(x, target=0, internal_batch_size=0), ValueError, "`internal_batch_size` must be >= 1"),
    (lambda ex, x: ex.attribute(x, target=0, n_steps="4"), TypeError, "`n_steps` must be an int"),
    (lambda ex, x: ex.attribute(x, target=0, n_steps=1), ValueError, "`n_steps` must be >= 2 for method='riemann_trapezoid'"),
])
def test_layer_concepts_bad_input(code_setup, call, error, match):
    model, ae, e, _ = code_setup
    explainer = LayerConcepts(model, "hidden", e, ae)
    with pytest.raises(error, match=match):
        call(explainer, torch.rand(4, 3, 8, 8))
    assert_no_hooks(model)


def test_layer_concepts_constructor_checks(code_setup):
    model, ae, e, t = code_setup
    with pytest.raises(ValueError, match="autoencoder"):
        LayerConcepts(model, "hidden", e)
    with pytest.raises(ValueError, match="latent_dim"):
        LayerConcepts(model, "hidden", e, ConvAutoencoder((3, 8, 8), latent_dim=5))
    with pytest.raises(TypeError, match="FactorINN"):
        LayerConcepts(model, "hidden", t, ae)
    with pytest.raises(ValueError, match="not found"):
        LayerConcepts(model, "hiden", e, ae)


def test_layer_concepts_refuse_inns_that_never_saw_data(code_setup):
    """Fresh INNs would initialise their ActNorms from the inputs being explained: refused when built."""
    model, ae, e, t = code_setup
    fresh_e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    with pytest.raises(ValueError, match=r"`concept_inn` is not fitted.*Fit it with fit_concepts, or load its checkpoint"):
        LayerConcepts(model, "hidden", fresh_e, ae)
    fresh_t = ConditionalINN(6, (6,), n_blocks=2, hidden=16)
    with pytest.raises(ValueError, match=r"`invariance_inn` is not fitted.*Fit it with fit_invariances, or load"):
        LayerConcepts(model, "hidden", e, ae, invariance_inn=fresh_t)
    assert not fresh_e.is_fitted and not fresh_t.is_fitted
    LayerConcepts(model, "hidden", e, ae, invariance_inn=t)  # the fitted pair is taken


@pytest.mark.parametrize("bad, error", [("0", TypeError), (False, TypeError), (-2, ValueError)])
def test_image_input_is_checked_when_built_and_named_at_call_time(code_setup, bad, error):
    model, ae, e, _ = code_setup
    with pytest.raises(error, match="`image_input`"):
        LayerConcepts(model, "hidden", e, ae, image_input=bad)
    explainer = LayerConcepts(model, "hidden", e, ae, image_input=2)
    with pytest.raises(ValueError, match=r"`image_input`=2 is out of range for 1 input tensors"):
        explainer.attribute(torch.rand(2, 3, 8, 8), target=0)


# ---------------------------------------------------------------- training dynamics
def test_snapshots_and_concept_dynamics(tmp_path):
    from captum_inn.training.classifier import fit_classifier
    from captum_inn.training.dynamics import Snapshots, concept_dynamics

    torch.manual_seed(0)
    model = VectorModel()
    images, labels = torch.rand(48, 3, 8, 8), torch.randint(4, (48,))
    snaps = Snapshots([0, 5], model)
    fit_classifier(model, (images, labels), steps=5, callback=snaps, progress=False)
    assert sorted(snaps.models) == [0, 5]
    assert Snapshots(torch.arange(0, 300, 100), model).steps == [0, 100, 200]  # integer 0-d tensors are steps
    for steps in (100, None):  # "'int' object is not iterable"
        with pytest.raises(TypeError, match=r"`steps` must be a sequence of step numbers, e.g. range\(0, 1001, 100\)"):
            Snapshots(steps, model)
    assert not torch.equal(snaps.models[0].fc.weight, snaps.models[5].fc.weight)  # copies, not the live model
    with pytest.raises(ValueError, match=r"follows the fit of another model \(it holds steps \[0, 5\] of a VectorModel\); "
                                         r"make a new Snapshots"):  # a second fit's step 5 replaced the first's
        fit_classifier(VectorModel(), (images, labels), steps=5, callback=snaps, progress=False)
    assert sorted(snaps.models) == [0, 5]
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    e(torch.randn(32, 6))
    dynamics = concept_dynamics(snaps.models, "hidden", ae, e.eval(), images, images[:10], labels[:10].tolist(),
                                steps=3, n_blocks=2, hidden=16, n_samples=4, progress=False)  # labels as a list
    assert dynamics.labels == ["0", "5"] and len(dynamics.accuracy) == 2
    assert set(dynamics.encoded) == {"a", "b", "residual"} and all(len(v) == 2 for v in dynamics.encoded.values())
    assert "checkpoint" in dynamics.table() and dynamics.as_dict()["layer"] == "hidden"
    errors = dynamics.as_dict()["standard_error"]
    assert set(errors) == {"a", "b", "residual"} and all(len(v) == 2 and min(v) > 0 for v in errors.values())
    assert f"{dynamics.encoded['a'][1]:.3f} ± {errors['a'][1]:.3f}" in dynamics.table().splitlines()[2]
    fig, ax = dynamics.plot()
    # the named concepts and the accuracy: the residual's share, far below 0, pressed the lines together
    assert [line.get_label() for line in ax.lines] == ["a", "b", "test accuracy"]
    assert len(ax.collections) == 2  # a band of ± 2 standard errors per concept
    fig, ax = dynamics.plot(concepts=["residual", "a"])
    assert [line.get_label() for line in ax.lines] == ["residual", "a", "test accuracy"]
    with pytest.raises(ValueError, match=r"`concepts` names \['colour'\], which the shares lack; choose from \['a', 'b', 'residual'\]"):
        dynamics.plot(concepts="colour")
    # each checkpoint's INN in its own folder; a rerun resumes them to the same result
    kw = dict(steps=3, n_blocks=2, hidden=16, n_samples=4, progress=False)
    first = concept_dynamics(snaps.models, "hidden", ae, e.eval(), images, images[:10], labels[:10],
                             checkpoint_dir=str(tmp_path), **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "5"]
    again = concept_dynamics(snaps.models, "hidden", ae, e.eval(), images, images[:10], labels[:10],
                             checkpoint_dir=str(tmp_path), **kw)
    assert again.encoded == first.encoded == dynamics.encoded
    # the Snapshots itself stands for its models ("'Snapshots' object is not iterable")
    assert concept_dynamics(snaps, "hidden", ae, e.eval(), images, images[:10], labels[:10],
                            checkpoint_dir=str(tmp_path), **kw).encoded == dynamics.encoded
    with pytest.raises(TypeError, match="Unknown setting 'memmap' for InvarianceConfig"):
        concept_dynamics(snaps.models, "hidden", ae, e.eval(), images, images[:10], memmap=True, **kw)
    # 8-bit pixels to measure on: refused before the first fit (a warning after each fit, beside shares of -1.3)
    with pytest.raises(ValueError, match=r"`eval_inputs` pixels range over \[0.*, 2\d\d\], but the autoencoder"):
        concept_dynamics(snaps.models, "hidden", ae, e.eval(), images, images[:10] * 255, labels[:10],
                         checkpoint_dir=str(tmp_path / "refused"), **kw)
    assert not (tmp_path / "refused").exists()
    from torch.utils.data import TensorDataset

    from_dataset = concept_dynamics(snaps.models, "hidden", ae, e.eval(), images, TensorDataset(images[:10]),
                                    labels[:10], **kw)
    assert from_dataset.encoded == dynamics.encoded
    for snapshot in snaps.models.values():
        assert_no_hooks(snapshot)

    # a layer read through a selector, or at its input: as fit_invariances reads it
    class TupleOut(nn.Module):
        def forward(self, h):
            return h.relu(), -h

    class Tupled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.pair = inner, TupleOut()

        def forward(self, x):
            return self.inner.out(self.inner.bn(self.pair(self.inner.fc(self.inner.flatten(x)))[0]))

    tupled = {label: Tupled(m).eval() for label, m in snaps.models.items()}
    picked = concept_dynamics(tupled, "pair", ae, e.eval(), images, images[:10], labels[:10], selector=0, **kw)
    assert picked.encoded == dynamics.encoded  # pair[0] is what "hidden" gave
    # a {module: selector} dict keyed by the first model's module (later models failed after the first fit)
    by_module = concept_dynamics(tupled, "pair", ae, e.eval(), images, images[:10], labels[:10],
                                 selector={tupled[0].pair: 0}, **kw)
    assert by_module.encoded == dynamics.encoded
    with pytest.raises(ValueError, match="pass selector="):
        concept_dynamics(tupled, "pair", ae, e.eval(), images, images[:10], **kw)
    concept_dynamics(snaps.models, "hidden", ae, e.eval(), images, images[:10], labels[:10],
                     attribute_to_layer_input=True, checkpoint_dir=str(tmp_path / "in"), **kw)
    assert load_invariance_inn(tmp_path / "in" / "5" / "invariance_hidden.safetensors").fit_info[
        "attribute_to_layer_input"] is True


def test_concept_dynamics_refuses_a_concept_inn_of_other_codes_before_any_fit(monkeypatch):
    """A concept INN fitted on a layer, or with another autoencoder, was refused by LayerConcepts only
    after the first checkpoint's features were cached and its invariance INN fitted."""
    import captum_inn.training.dynamics as dynamics
    from captum_inn.training import fit_concepts

    torch.manual_seed(0)
    model, images, labels = VectorModel().eval(), torch.rand(32, 3, 8, 8), torch.randint(4, (32,))
    ae, other = (ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval() for _ in range(2))
    pairs = [ConceptPairs.from_labels("digit", images, labels)]
    tiny = dict(steps=2, pool_size=32, n_blocks=1, hidden=8, progress=False)
    on_layer, on_other_codes = fit_concepts((model, "hidden"), pairs, **tiny), fit_concepts(other, pairs, **tiny)

    def never(*args, **kwargs):
        raise AssertionError("cached features before refusing")

    monkeypatch.setattr(dynamics, "cache_features", never)
    kw = dict(steps=2, n_blocks=1, hidden=8, n_samples=2, progress=False)
    with pytest.raises(ValueError, match="fitted on layer 'hidden' of a model, not on autoencoder codes"):
        dynamics.concept_dynamics({"0": model}, "hidden", ae, on_layer, images, images[:4], **kw)
    with pytest.raises(ValueError, match="`concept_inn` was fitted with another `autoencoder`"):
        dynamics.concept_dynamics({"0": model}, "hidden", ae, on_other_codes, images, images[:4], **kw)


@pytest.mark.parametrize("change, error, match", [
    (dict(n_samples=1), ValueError, "`n_samples` must be >= 2"),
    (dict(eval_inputs=torch.rand(3, 8, 8)), ValueError, r"`eval_inputs` images must have shape \(N, C, H, W\)"),
    (dict(eval_inputs=torch.rand(4, 3, 16, 16)), ValueError, "`eval_inputs` images have shape"),
    (dict(eval_labels=torch.zeros(1, dtype=torch.long)), ValueError, r"`eval_labels` must be a tensor of shape \(4,\)"),
    (dict(models=[(1, None), ("1", None)]), ValueError, r"labels must be distinct once made strings, got \['1'\]"),
    (dict(models=[("..", None)], checkpoint_dir="runs"), ValueError, "label '..' names no folder of its own"),
    (dict(models=[("b", None), ("./b", None)], checkpoint_dir="runs"), ValueError,
     "labels 'b' and './b' name the same folder in `checkpoint_dir`"),
    (dict(eval_labels=[0, 1]), ValueError, r"`eval_labels` must be a tensor of shape \(4,\).*got \(2,\)"),  # a list, read
    (dict(eval_labels=["a", "b", "c", "d"]), ValueError, r"`eval_labels` must be a tensor of shape \(4,\).*got list"),
    (dict(models=[("0", None), ("1", nn.Linear(2, 2))]), ValueError, "The model labelled '1'.*not found"),
])
def test_concept_dynamics_checks_what_it_measures_with_before_any_fit(monkeypatch, tmp_path, change, error, match):
    """Bad ``n_samples``, ``eval_inputs`` or ``eval_labels`` failed only after the first checkpoint's
    INN fit (``(1,)`` labels did not fail: they broadcast into a wrong accuracy); repeated labels
    shared a checkpoint folder, and a later model without the layer failed after the earlier fits."""
    import captum_inn.training.dynamics as dynamics

    torch.manual_seed(0)
    model, images = VectorModel().eval(), torch.rand(16, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=1, hidden=8)
    e(torch.randn(32, 6))

    def never(*args, **kwargs):
        raise AssertionError("cached features before refusing")

    monkeypatch.setattr(dynamics, "cache_features", never)
    kw = {**dict(models=[("0", None)], eval_inputs=images[:4], eval_labels=None, n_samples=2), **change}
    kw["models"] = [(label, m or model) for label, m in kw["models"]]
    if "checkpoint_dir" in kw:
        kw["checkpoint_dir"] = str(tmp_path / kw["checkpoint_dir"])
    with pytest.raises(error, match=match):
        dynamics.concept_dynamics(layer="hidden", autoencoder=ae, concept_inn=e.eval(), data=images, steps=2,
                                  n_blocks=1, hidden=8, progress=False, **kw)


def test_concept_dynamics_records_each_models_own_class_and_refuses_bare_models(tmp_path, capsys):
    """With tensor data every checkpoint's INN recorded the first model's class, so rerunning on a later
    checkpoint alone was refused; a list of bare models was unpacked as (label, model) pairs, a
    two-module nn.Sequential as (its first child, its second)."""
    from captum_inn.training import load_invariance_inn
    from captum_inn.training.dynamics import concept_dynamics

    class Later(VectorModel):
        pass

    torch.manual_seed(0)
    early, late, images = VectorModel().eval(), Later().eval(), torch.rand(16, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=1, hidden=8)
    e(torch.randn(32, 6))
    kw = dict(steps=2, n_blocks=1, hidden=8, embed_dim=8, batch_size=8, n_samples=2, progress=False,
              checkpoint_dir=str(tmp_path))
    concept_dynamics({"early": early, "late": late}, "hidden", ae, e.eval(), images, images[:4], **kw)
    for label, model in (("early", early), ("late", late)):
        inn = load_invariance_inn(tmp_path / label / "invariance_hidden.safetensors")
        assert inn.fit_info["model_class"].endswith(type(model).__qualname__)
    concept_dynamics({"late": late}, "hidden", ae, e.eval(), images, images[:4], **{**kw, "progress": True})  # resumes
    assert "concept_dynamics" in capsys.readouterr().err  # which checkpoint: each INN bar alone read the same
    retrained = Later().eval()  # other weights under the same label: its advice, resume=False, was no argument here
    with pytest.raises(CheckpointError, match=r"The model labelled 'late': .*pass resume=False to concept_dynamics"):
        concept_dynamics({"late": retrained}, "hidden", ae, e.eval(), images, images[:4], **kw)
    concept_dynamics({"late": retrained}, "hidden", ae, e.eval(), images, images[:4], resume=False, **kw)
    with pytest.raises(TypeError, match=r"`models` must be .* got Later; for one model pass \{'final': model\}"):
        concept_dynamics(late, "hidden", ae, e.eval(), images, images[:4], **kw)
    two_children = nn.Sequential(nn.Identity(), VectorModel())
    for models in ([two_children], [early, late], [("a", early, 1)], [(early, late)]):
        with pytest.raises(TypeError, match=r"`models` must be a non-empty \{label: nn.Module\} mapping or a list of "
                                            r"\(label, nn.Module\) pairs"):
            concept_dynamics(models, "hidden", ae, e.eval(), images, images[:4], **kw)


@pytest.fixture
def dynamics_fits(monkeypatch):
    """The keyword arguments of every ``fit_invariances`` call that ``concept_dynamics`` makes."""
    import captum_inn.training.dynamics as dynamics

    calls, fit = [], dynamics.fit_invariances

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fit(*args, **kwargs)

    monkeypatch.setattr(dynamics, "fit_invariances", spy)
    return calls


def test_concept_dynamics_keeps_the_seed_of_its_config(dynamics_fits):
    """``config=InvarianceConfig(seed=3)`` fits with seed 3 (the default ``seed`` replaced it by 0);
    an explicit ``seed=`` still wins."""
    import captum_inn.training.dynamics as dynamics
    from captum_inn.training import InvarianceConfig

    torch.manual_seed(0)
    model, images = VectorModel().eval(), torch.rand(32, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    e(torch.randn(32, 6))
    config = InvarianceConfig(seed=3, steps=2, n_blocks=1, hidden=16)
    kw = dict(n_samples=2, progress=False)
    dynamics.concept_dynamics({"0": model}, "hidden", ae, e.eval(), images, images[:4], config=config, **kw)
    dynamics.concept_dynamics({"0": model}, "hidden", ae, e.eval(), images, images[:4], config=config, seed=5, **kw)
    dynamics.concept_dynamics({"0": model}, "hidden", ae, e.eval(), images, images[:4], steps=2, n_blocks=1,
                              hidden=16, **kw)
    assert [fit["config"].seed for fit in dynamics_fits] == [3, 5, 0]


def test_concept_dynamics_caches_each_layer_beside_the_codes_of_its_own_images(dynamics_fits):
    """A shuffling DataLoader gives each checkpoint's pass another order: the codes of the first pass
    were reused beside later passes' activations, pairing each activation with another image's code."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    import captum_inn.training.dynamics as dynamics

    torch.manual_seed(0)
    model, images = VectorModel().eval(), torch.rand(48, 3, 8, 8)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    e(torch.randn(32, 6))
    loader = DataLoader(TensorDataset(images), batch_size=16, shuffle=True)
    twins = {"0": model, "1": copy.deepcopy(model)}  # the same weights: the same (activation, code) rows
    dynamics.concept_dynamics(twins, "hidden", ae, e.eval(), loader, images[:4], steps=2, n_blocks=1, hidden=16,
                              n_samples=2, progress=False)
    first, second = (fit["cache"] for fit in dynamics_fits)
    same_image = torch.cdist(second.code_mean.float(), first.code_mean.float()).argmin(1)
    assert torch.allclose(second.layers["hidden"], first.layers["hidden"][same_image], atol=1e-6)


def test_concept_pairs_of_float64_images_are_encoded_by_a_float32_autoencoder():
    """A float64 model's images, the float32 autoencoder fitted for it: encoded in the autoencoder's
    dtype, as cache_features and the explainers do (a raw "Input type (double)" RuntimeError before)."""
    torch.manual_seed(0)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    x, y = torch.rand(40, 3, 8, 8), torch.arange(40) % 2
    as_float = concept_scores(ae, [ConceptPairs.from_labels("p", x, y)], n_pairs=16)
    as_double = concept_scores(ae, [ConceptPairs.from_labels("p", x.double(), y)], n_pairs=16)
    assert as_double == pytest.approx(as_float, abs=1e-6)
    e = fit_concepts(ae, [ConceptPairs.from_labels("p", x.double(), y)], steps=2, n_blocks=1, hidden=16,
                     pool_size=16, progress=False)
    assert e.factor_names == ["p", "residual"]


class _TrainModeAutoencoder(nn.Module):
    """An autoencoder left in train mode (the nn.Module default), with BatchNorm and dropout."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.BatchNorm1d(6), nn.Dropout(0.5))
        self.dec = nn.Linear(6, 48)

    def encode(self, x):
        return self.enc(x)

    def decode(self, z):
        return self.dec(z).view(-1, 3, 4, 4)


def test_concept_pairs_of_8_bit_images_are_named_for_an_autoencoder():
    """uint8 pairs failed inside the encoder's first conv ("Input type (unsigned char) and bias type")."""
    torch.manual_seed(0)
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    pairs = [ConceptPairs.from_labels("p", torch.randint(256, (20, 3, 8, 8), dtype=torch.uint8), torch.arange(20) % 2)]
    for call in (lambda: concept_scores(ae, pairs, n_pairs=8),
                 lambda: fit_concepts(ae, pairs, steps=1, n_blocks=1, hidden=8, pool_size=8, progress=False)):
        with pytest.raises(TypeError, match=r"^Concept 'p''s pairs: Concept pairs for an autoencoder must be floating-point images .*torch.uint8.*images.float\(\) / 255"):
            call()


def test_concept_pairs_are_encoded_in_eval_mode_whatever_the_autoencoders_flags():
    torch.manual_seed(0)
    ae = _TrainModeAutoencoder()
    x, y = torch.rand(40, 3, 4, 4), torch.arange(40) % 2
    statistics = ae.enc[2].running_mean.clone()
    first = concept_scores(ae, [ConceptPairs.from_labels("parity", x, y)], n_pairs=64)
    assert first == concept_scores(ae, [ConceptPairs.from_labels("parity", x, y)], n_pairs=64)  # no dropout
    assert torch.equal(statistics, ae.enc[2].running_mean)  # no BatchNorm update
    assert ae.training and ae.enc[3].training  # the caller's flags are back


def test_a_resume_refuses_other_concept_data_and_takes_earlier_checkpoints(tmp_path):
    """The checkpoint records a fingerprint of each concept's pairs: other images or labels are
    refused (with factor sizes given nothing else would notice), the same data resumes, and a
    checkpoint of an earlier version without the record still resumes."""
    x, c, s = synthetic(200)
    concepts = [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("s", x, s)]
    path = str(tmp_path / "fit.safetensors")
    settings = dict(factor_sizes={"c": 2, "s": 2}, n_blocks=2, hidden=16, pool_size=64, progress=False,
                    checkpoint=path, checkpoint_every=2)
    fit_concepts((IDENTITY, "0"), concepts, steps=2, **settings)
    assert "pairs" not in load_concept_inn(path).fit_info
    shuffled = [ConceptPairs.from_labels("c", x, c[torch.randperm(len(c), generator=torch.Generator().manual_seed(1))]),
                concepts[1]]
    with pytest.raises(CheckpointError, match="another configuration.*pairs"):
        fit_concepts((IDENTITY, "0"), shuffled, steps=4, **settings)
    fit_concepts((IDENTITY, "0"), concepts, steps=4, **settings)  # the same data: resumes
    tensors, meta = load_checkpoint(path)
    del meta["config"]["pairs"]  # as an earlier version wrote it
    save_checkpoint(path, tensors, meta)
    fit_concepts((IDENTITY, "0"), shuffled, steps=6, **settings)  # nothing to compare with: resumes
    assert "pairs" not in load_checkpoint(path)[1]["config"]


def test_a_resume_keeps_the_factor_sizes_and_scores_its_checkpoint_estimated(tmp_path, monkeypatch):
    """The estimated scores were part of the compared configuration: estimated again with other conv kernels
    (or thread counts) they differed in their last digits, and sizes given as the first run's estimate came
    with no scores; both resumes were refused as another configuration, costing a whole refit."""
    from captum_inn.training import concepts as training_concepts

    x, c, s = synthetic(200)
    concepts = [ConceptPairs.from_labels("c", x, c), ConceptPairs.from_labels("s", x, s)]
    path = str(tmp_path / "fit.safetensors")
    settings = dict(n_blocks=2, hidden=16, pool_size=64, progress=False, checkpoint=path, checkpoint_every=2)
    first = fit_concepts((IDENTITY, "0"), concepts, steps=2, **settings)
    sizes, scores = first.fit_info["factor_sizes"], first.fit_info["scores"]
    estimate = training_concepts._scores
    monkeypatch.setattr(training_concepts, "_scores", lambda pools: {k: v + 1e-9 for k, v in estimate(pools).items()})
    drifted = fit_concepts((IDENTITY, "0"), concepts, steps=4, **settings)  # scores estimated again, a little off
    assert drifted.fit_info["scores"] == scores and drifted.fit_info["factor_sizes"] == sizes
    given = fit_concepts((IDENTITY, "0"), concepts, steps=6, factor_sizes=sizes, **settings)  # the estimate, given
    assert given.fit_info["scores"] == scores and len(given.history) == 6
    other = {name: size for name, size in sizes.items() if name != "residual"}
    other["c"] += 1  # other sizes are another fit
    with pytest.raises(CheckpointError, match="another configuration"):
        fit_concepts((IDENTITY, "0"), concepts, steps=8, factor_sizes=other, **settings)


def test_moved_running_statistics_since_a_layer_fit_are_warned_about(tmp_path):
    """A concept INN on a model layer recorded the weights but not the buffers: after a pass in train mode had
    moved batch norm's running statistics, LayerConcepts read other factors without a word (the invariance
    INN warns in that case)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    images = torch.rand(64, 3, 8, 8)
    pairs = [ConceptPairs.from_labels("half", images, torch.arange(64) % 2)]
    e = fit_concepts((model, "3"), pairs, steps=2, n_blocks=1, hidden=8, pool_size=32, progress=False)
    path = str(tmp_path / "e.safetensors")
    save_concept_inn(path, e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerConcepts(model, "3", e)  # the fit's buffers: nothing to say
    model.train()(images)  # one accidental pass in train mode
    model.eval()
    for inn in (e, load_concept_inn(path)):
        with pytest.warns(UserWarning, match=r"weights `concept_inn` was fitted with, but other buffers"):
            LayerConcepts(model, "3", inn)


def test_a_pooled_layer_is_refused_with_the_next_linear_layers_input_as_the_fix():
    """A global average pool gives (C, 1, 1): the refusal said only "use a fully connected layer";
    the flattened pool is the next linear layer's input, which the fit then takes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    images = torch.rand(32, 3, 8, 8)
    pairs = ConceptPairs.from_labels("label", images, torch.arange(32) % 2)
    with pytest.raises(ValueError, match=r"shape \(4, 1, 1\).*pass that layer with attribute_to_layer_input=True"):
        fit_concepts((model, "1"), [pairs], steps=1, n_blocks=1, hidden=8, pool_size=32, progress=False)
    with pytest.raises(ValueError, match="needs a vector layer") as refused:  # a spatial map: no pooled hint
        fit_concepts((model, "0"), [pairs], steps=1, n_blocks=1, hidden=8, pool_size=32, progress=False)
    assert "pooled" not in str(refused.value)
    e = fit_concepts(LayerRepresentation(model, "3", attribute_to_layer_input=True), [pairs], steps=1, n_blocks=1,
                     hidden=8, pool_size=32, progress=False)
    assert e.dim == 4


# ---------------------------------------------------------------- concept data: bad input named
_ROWS = torch.rand(6, 3)


def _pairs_of(n, g):
    return _ROWS[:n], _ROWS[:n]


@pytest.mark.parametrize("call, error, message", [
    (lambda: ConceptPairs(3, _pairs_of), TypeError, "concept `name` must be a non-empty str"),
    (lambda: ConceptPairs("a", 5), TypeError, "`sampler` of concept 'a' must be callable"),
    (lambda: ConceptPairs("a", _pairs_of).sample(0), ValueError, r"`n` \(number of pairs\) must be an int >= 1"),
    (lambda: ConceptPairs("a", lambda n, g: _ROWS[:n]).sample(2), TypeError, "must return a pair of tensors"),
    (lambda: ConceptPairs("a", lambda n, g: (_ROWS[:1], _ROWS[:1])).sample(2), ValueError, "returned 1 pairs, 2 were"),
    (lambda: ConceptPairs("a", lambda n, g: (_ROWS[:n], _ROWS[:n, :2])).sample(2), ValueError, "same shape and device"),
    (lambda: ConceptPairs.from_transform("a", torch.empty(0, 3), lambda t: t), ValueError, "`inputs` must be a non-empty"),
    (lambda: ConceptPairs.from_transform("a", _ROWS, 3), TypeError, "`transform` must be callable"),
    (lambda: ConceptPairs.from_captum(3), TypeError, "`concept` must be a captum.concept.Concept"),
    (lambda: ConceptPairs.from_captum(Concept(0, "c", None)), ValueError,
     r"has no data_iter to draw pairs from: give it one, or pass ConceptPairs.from_captum\(concept, sampler=...\)"),
    (lambda: ConceptPairs.from_captum(Concept(0, "c", [_ROWS[:1]])), ValueError, "1 example\\(s\\); pairs need at least 2"),
    (lambda: ConceptPairs.from_captum(Concept(0, "c", ["a"])), TypeError,
     r"Captum concept 'c'.s data_iter yields str objects, not tensors; give its dataset a transform .*ToTensor"),
    (lambda: ConceptPairs.from_captum(Concept(0, "c", [_ROWS[:2], torch.rand(2, 4)])), ValueError, "different shapes"),
    (lambda: as_concepts([]), ValueError, "`concepts` is empty"),
    (lambda: as_concepts({}), ValueError, "`concepts` is empty"),
    (lambda: as_concepts(3), TypeError, "`concepts` must be a ConceptPairs"),
    (lambda: as_concepts([3]), TypeError, "Each concept must be a ConceptPairs"),
    (lambda: as_concepts([ConceptPairs("a", _pairs_of), ConceptPairs("a", _pairs_of)]), ValueError, "unique"),
])
def test_concept_pairs_name_bad_input(call, error, message):
    """Each check the docstrings promise; no test reached most of them."""
    with pytest.raises(error, match=message):
        call()


def test_pairs_drawn_from_the_global_generators_repeat_and_resume(tmp_path):
    """A transform without a generator (torch.rand inside) drew each pool from the caller's global
    stream: the estimated scores differed on a resume, which was refused as "another
    configuration", reruns with one seed differed, and the caller's stream moved."""
    x, _, _ = synthetic(200)
    bright = ConceptPairs.from_transform("bright", x, lambda batch: batch * torch.rand(batch.shape[0], 1))
    path = str(tmp_path / "fit.safetensors")
    settings = dict(n_blocks=2, hidden=16, pool_size=64, progress=False, checkpoint=path, checkpoint_every=1)
    state = torch.random.get_rng_state()
    first = fit_concepts((IDENTITY, "0"), [bright], steps=2, **settings)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(3)  # the caller's stream moves on between the runs
    resumed = fit_concepts((IDENTITY, "0"), [bright], steps=3, **settings)
    assert len(resumed.history) == 3 and resumed.history[:2] == first.history


def test_a_module_transform_taking_the_generator_gets_it():
    """A module's signature is Module.__call__(*args, **kwargs): its forward's generator was missed."""

    class Brighten(nn.Module):
        def forward(self, batch, generator=None):
            return batch * torch.rand(batch.shape[0], 1, generator=generator)

    class Masked(nn.Module):  # a second parameter that is a setting (kornia's forward(input, params=None))
        def forward(self, batch, mask=None):
            assert mask is None
            return batch * 0.5

    x = torch.rand(10, 4)
    pairs = ConceptPairs.from_transform("bright", x, Brighten())
    first = pairs.sample(5, torch.Generator().manual_seed(0))
    again = pairs.sample(5, torch.Generator().manual_seed(0))
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    a, b = ConceptPairs.from_transform("half", x, Masked()).sample(5, torch.Generator().manual_seed(0))
    assert torch.equal(b, a * 0.5)


def test_bfloat16_pairs_are_fingerprinted_for_a_checkpoint():
    """NumPy has no bfloat16: a checkpointed fit on bfloat16 pairs failed fingerprinting them."""
    x, c, _ = synthetic(40)
    pairs = ConceptPairs.from_labels("c", x.bfloat16(), c)
    assert len(pairs.fingerprint()) == 16
    assert pairs.fingerprint() != ConceptPairs.from_labels("c", x, c).fingerprint()  # the dtype counts


def test_a_layer_tensor_the_output_does_not_use_is_named_not_a_raw_autograd_error():
    """A head's "box" tensor that the model's output never uses: attribute failed with autograd's "The
    differentiated Tensor ... appears to not have been used in the graph. Set allow_unused=True"."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 4)

        def forward(self, h):
            return {"logits": self.a(h), "box": self.b(h)}

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.heads = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU()), Heads()

        def forward(self, x):
            return self.heads(self.body(x))["logits"]

    torch.manual_seed(0)
    model, x = Detector().eval(), torch.rand(16, 3, 2, 2)
    pairs = [ConceptPairs.from_labels("c", x, torch.arange(16) % 2)]
    e = fit_concepts(LayerRepresentation(model, "heads", selector="box"), pairs, factor_sizes={"c": 2}, steps=2,
                     pool_size=16, n_blocks=1, hidden=8, progress=False)
    with pytest.raises(ValueError, match=r"tensor read from layer 'heads' \(selector 'box'\) is not used by what "
                                         r"forward_func returns"):
        LayerConcepts(model, "heads", e, selector="box").attribute(x[:2], target=1, n_steps=4)


def test_a_layer_with_dead_units_fits_without_jumps():
    """A dead ReLU unit (no spread) got noise of 1e-6 × feature_noise, a million times below the
    layer's scale: the fit's loss jumped by hundreds between steps and rose over training."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 6)
    with torch.no_grad():
        linear.weight[4:].zero_()
        linear.bias[4:] = -1.0  # units 4 and 5 are 0 for every input
    model = nn.Sequential(nn.Flatten(), linear, nn.ReLU())
    x, y = torch.rand(200, 3, 2, 2), torch.arange(200) % 2
    e = fit_concepts((model, "2"), [ConceptPairs.from_labels("parity", x, y)], steps=200, pool_size=256,
                     n_blocks=2, hidden=16, progress=False)
    history = e.history
    assert max(abs(a - b) for a, b in zip(history, history[1:])) < 10
    assert sum(history[-20:]) / 20 < sum(history[:20]) / 20 - 1  # it learns


def test_a_layer_fitted_concept_inn_and_another_model_are_named_as_they_are():
    """encoded() on a layer-fitted concept INN said to pass invariance_inn=, which the constructor then
    refuses for it; another model (another architecture) was called one "of the same shape"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, y = torch.rand(40, 3, 2, 2), torch.arange(40) % 2
    e = fit_concepts((model, "2"), [ConceptPairs.from_labels("parity", x, y)], steps=2, pool_size=16,
                     n_blocks=1, hidden=8, progress=False)
    with pytest.raises(ValueError, match=r"this concept INN acts on the layer itself\. Fit one on the codes"):
        LayerConcepts(model, "2", e).encoded(x[:4])
    other = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with pytest.raises(ValueError, match=r"another `forward_func` \(other weights: retrained, another seed, or another "
                                         r"architecture\)"):
        LayerConcepts(other, "2", e)


def test_a_layer_in_a_reentrant_checkpoint_segment_is_named_as_a_cause():
    """Its forward records no graph, and the error blamed the choice of layer alone."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(12, 6), nn.Tanh())
            self.head = nn.Linear(6, 3)
            self.checkpointed = False

        def forward(self, x):
            x = x.flatten(1)
            h = checkpoint(self.block, x, use_reentrant=True) if self.checkpointed else self.block(x)
            return self.head(h)

    torch.manual_seed(0)
    model = Checkpointed().eval()
    x, y = torch.rand(40, 3, 2, 2), torch.arange(40) % 2
    e = fit_concepts((model, "block.0"), [ConceptPairs.from_labels("parity", x, y)], steps=2, pool_size=16,
                     n_blocks=1, hidden=8, progress=False)
    model.checkpointed = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning that no input requires grad
        with pytest.raises(ValueError, match=r"torch.utils.checkpoint segment with use_reentrant=True"):
            LayerConcepts(model, "block.0", e).attribute(x[:4], target=0, n_steps=4)


def test_scores_are_a_ratio_of_variances_whatever_the_scale():
    """A score is covariance over variance: scaling the representation by 3 leaves it unchanged, and it
    matches the share of variance of the dimensions the concept fixes (a std in the denominator scaled it)."""
    x, c, _ = synthetic(1000)
    scale = torch.tensor([3.0, 3.0, 0.5, 0.5, 2.0, 2.0])
    for factor in (1.0, 4.0):
        data = x * scale * factor
        scores = concept_scores((IDENTITY, "0"), [ConceptPairs.from_labels("c", data, c)], n_pairs=2000)
        variance = data.var(0)
        assert scores["c"] == pytest.approx(float(variance[:2].sum() / variance.sum()), abs=0.05)


def _affine_inns():
    """A factor INN and an invariance INN whose couplings pass their input through (zeroed subnets):
    both are affine with per-dimension scales from ActNorm, so ``e(t⁻¹(v | z))`` is ``M v + b``."""
    torch.manual_seed(0)
    spread = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.7, 1.5])
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=8)
    e(torch.randn(64, 6) * spread.flip(0) + 1)
    t = ConditionalINN(6, (6,), n_blocks=2, hidden=8, embed_dim=4)
    t(torch.randn(64, 6) * spread, torch.rand(64, 6))
    with torch.no_grad():
        for inn in (e, t):
            for name, p in inn.named_parameters():
                if ".subnet." in name:
                    p.zero_()
    return e.eval(), t.eval()


def test_encoded_share_matches_the_variance_of_an_affine_path():
    """With ``e ∘ t⁻¹`` affine, ``Var_v(e(t⁻¹(v|z)))`` is ``diag(M Mᵀ)`` for ``M`` its Jacobian: the share
    of concept k is ``1 − Σ_k diag(M Mᵀ) / Σ_k Var_x``, with the per-dimension reference of fit_info."""
    model = VectorModel().eval()
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e, t = _affine_inns()
    c = torch.rand(1, 6)
    jac = torch.autograd.functional.jacobian(lambda v: e(t(v, c, rev=True)[0])[0], torch.zeros(1, 6)).reshape(6, 6)
    expected_var = (jac**2).sum(1)  # Var of (M v)_d for v ~ N(0, I)
    reference = expected_var * torch.tensor([2.0, 2.0, 4.0, 4.0, 1.25, 1.25])  # shares 0.5, 0.75, 0.2
    e.fit_info = {"factor_variance": reference.tolist()}
    explainer = LayerConcepts(model, "hidden", e, ae, invariance_inn=t)
    x = torch.rand(3, 3, 8, 8)
    shares = explainer.encoded(x, n_samples=4000, seed=0, reencode=False)
    expected = torch.tensor([0.5, 0.75, 0.2]).expand(3, 3)
    torch.testing.assert_close(shares, expected, atol=0.06, rtol=0)


def test_compute_convergence_delta_agrees_with_attribute_and_completeness(code_setup):
    """compute_convergence_delta is Σ attributions − (F(inputs) − F(baseline)): the same as attribute's
    delta, and with F computed here independently through e⁻¹ and the decoder."""
    model, ae, e, _ = code_setup
    explainer = LayerConcepts(model, "hidden", e, ae)
    x = torch.rand(3, 3, 8, 8)
    base = torch.full((6,), 0.7)
    scores, delta = explainer.attribute(x, target=1, baselines=base, n_steps=16, return_convergence_delta=True)
    computed = explainer.compute_convergence_delta(scores, base, x, target=1)
    torch.testing.assert_close(computed, delta, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        end = model(ae.decode(e(e(ae.encode(x).mean)[0], rev=True)[0]))[:, 1]
        start = model(ae.decode(e(base.expand(3, 6), rev=True)[0]))[:, 1]
    torch.testing.assert_close(computed, scores.sum(1) - (end - start), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Encoded shares average far below 0")  # a perturbed random t
def test_encoded_draws_of_an_input_are_conditioned_on_that_input():
    """Input i's n_samples draws are decoded under input i's activation: the first row of the shares of
    [x0, x1] equals that of [x0, x0] (same draws, same input), while the condition does matter."""
    torch.manual_seed(0)
    model = VectorModel().eval()
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=1, hidden=8)
    e(torch.randn(32, 6))
    t = ConditionalINN(6, (6,), n_blocks=2, hidden=16, embed_dim=4)
    t(torch.randn(32, 6), torch.rand(32, 6))
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a condition that reaches the couplings
    explainer = LayerConcepts(model, "hidden", e.eval(), ae, invariance_inn=t.eval())
    x = torch.rand(2, 3, 8, 8)
    mixed = explainer.encoded(x, n_samples=16, seed=0, reencode=False)
    alone = explainer.encoded(x[[0, 0]], n_samples=16, seed=0, reencode=False)
    torch.testing.assert_close(mixed[0], alone[0])
    assert not torch.allclose(mixed[1], alone[1], atol=1e-3)  # x1's condition changes its draws' spread


def test_pair_nll_is_the_density_of_the_pair_under_a_change_of_variables():
    """With y = e(x) = s ⊙ x (log|det| = Σ log s for each member), pair_nll is −log p(x_a, x_b) of the
    joint Gaussian of the x pair: both members' log-determinants count."""
    rho = 0.8
    s = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    x_a, x_b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    shared = torch.tensor([False, True, False]).expand(5, 3)
    logdet = torch.log(s).sum().expand(5)
    ours = pair_nll(x_a * s, logdet, x_b * s, logdet, shared, rho)
    cov_y = torch.eye(6, dtype=torch.float64)
    cov_y[1, 4] = cov_y[4, 1] = rho
    inv_d = torch.diag(1 / torch.cat([s, s]))
    joint = torch.distributions.MultivariateNormal(torch.zeros(6, dtype=torch.float64), inv_d @ cov_y @ inv_d)
    reference = -joint.log_prob(torch.cat([x_a, x_b], 1)) - 3 * math.log(2 * math.pi)
    torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)


def test_the_fit_loss_is_the_pairs_nll_per_number():
    """``history`` holds the pair NLL divided by the 2·d numbers of a pair: a first step that barely
    moves ``e`` (lr 1e-12) over 4,096 pairs matches the NLL of 20,000 fresh pairs under the fitted ``e``."""
    from captum_inn.training.concepts import _pair_masks

    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(4000, 8, generator=g), torch.randint(4, (4000,), generator=g)
    x[:, :2] += 2.0 * torch.randn(4, 2, generator=g)[labels]  # the label moves two of the eight numbers
    concept = ConceptPairs.from_labels("c", x, labels)
    e = fit_concepts((IDENTITY, "0"), [concept], factor_sizes={"c": 2}, steps=1, lr=1e-12, batch_size=4096,
                     pool_size=4096, n_blocks=2, hidden=16, progress=False)
    a, b = concept.sample(20000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (y_a, logdet_a), (y_b, logdet_b) = e(a), e(b)
        shared = _pair_masks(e, [concept]).expand(len(a), 8)
        per_number = pair_nll(y_a, logdet_a, y_b, logdet_b, shared, e.fit_info["rho"]).mean() / (2 * 8)
    assert e.history[0] == pytest.approx(float(per_number), rel=0.05)


def test_concept_dynamics_rows_are_each_checkpoints_own_measurements_in_the_order_given(tmp_path, monkeypatch):
    """Each row holds what its own checkpoint's INN gives (share and standard error drawn with the
    ``seed``, the model's accuracy, its INN's final NLL), in the order of ``models`` (training order,
    not sorted labels)."""
    import captum_inn.training.dynamics as dynamics_module
    from captum_inn.training.classifier import accuracy
    from captum_inn.training.dynamics import ConceptDynamics, concept_dynamics

    fitted, fit = [], dynamics_module.fit_invariances

    def spy(*args, **kwargs):  # each checkpoint's INN as fitted (a loaded one has no final NLL)
        fitted.append(fit(*args, **kwargs))
        return fitted[-1]

    monkeypatch.setattr(dynamics_module, "fit_invariances", spy)
    torch.manual_seed(0)
    images, labels = torch.rand(32, 3, 8, 8), torch.randint(4, (32,))
    models = {"5": VectorModel().eval(), "10": VectorModel().eval()}  # "10" sorts first as a string
    ae = ConvAutoencoder((3, 8, 8), latent_dim=6, width=8).eval()
    e = FactorINN(6, {"a": 2, "b": 2}, n_blocks=2, hidden=16)
    e(torch.randn(32, 6))
    dynamics = concept_dynamics(models, "hidden", ae, e.eval(), images, images[:10], labels[:10], seed=3,
                                checkpoint_dir=str(tmp_path), steps=3, n_blocks=2, hidden=16, n_samples=4,
                                progress=False)
    assert dynamics.labels == ["5", "10"]
    for i, (label, model) in enumerate(models.items()):
        inn = load_invariance_inn(tmp_path / label / "invariance_hidden.safetensors")
        shares = LayerConcepts(model, "hidden", e.eval(), ae, invariance_inn=inn).encoded_summary(
            images[:10], n_samples=4, generator=torch.Generator().manual_seed(3))
        assert {c: v[i] for c, v in dynamics.encoded.items()} == pytest.approx(dict(shares), abs=1e-6)
        assert {c: v[i] for c, v in dynamics.standard_error.items()} == pytest.approx(shares.standard_error, abs=1e-6)
        assert dynamics.accuracy[i] == accuracy(model, images[:10], labels[:10])
        assert dynamics.fit_nll[i] == fitted[i].fit_info["final_nll_per_dim"]
    # accuracy holds one value per checkpoint (None where unknown): an empty list is ragged
    with pytest.raises(ValueError, match=r"`accuracy` holds 0 values for 2 checkpoints"):
        ConceptDynamics("fc", ["0", "1"], [], {"a": [0.1, 0.2]}).table()
