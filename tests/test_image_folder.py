"""Real photos (issue 5, item 2): ``load_image_folder`` on an ImageFolder-layout folder,
``Jitter(flip=True)``, and ``fit_autoencoder`` with a perceptual loss and an augmentation.

The folders are written with PIL into ``tmp_path`` (non-square images of several sizes, JPEG and
PNG, RGB, grayscale and RGBA); the AnimalFaces-10 sample is used when it exists next to the
project (``../shared/data/animalfaces10``) and the test is skipped otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_hooks import assert_no_hooks, training_flags
from PIL import Image
from torch import nn

from captum_inn.datasets import ColorDigits, ImageFolderSplit, load_image_folder
from captum_inn.training import Jitter, fit_autoencoder
from captum_inn.training.augment import augment_record
from captum_inn.training.autoencoder import load_autoencoder

torch.set_num_threads(1)

CLASSES = ("cat", "dog", "fox")
SIZES = [(40, 30), (25, 50), (64, 48), (33, 17), (20, 60)]  # (width, height): none square
ANIMALFACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "animalfaces10"


def _colour(c: int, i: int) -> tuple:
    """A distinct solid colour per image, to recognise it after loading."""
    return (40 + 80 * c, 30 + 45 * i, 200 - 60 * c)


def _write_folder(root: Path, per_class: int = 5) -> Path:
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[i % len(SIZES)]
            image = Image.new("RGB", (w, h), _colour(c, i))
            if i % 3 == 0:
                image.save(folder / f"img{i}.jpg", quality=95)
            elif i % 3 == 1:
                image.convert("RGBA").save(folder / f"img{i}.png")
            else:
                image.save(folder / f"img{i}.png")
        (folder / "notes.txt").write_text("not an image")  # ignored, as by ImageFolder
    return root


@pytest.fixture
def folder(tmp_path):
    return _write_folder(tmp_path / "photos")


def _identify(images: torch.Tensor, labels: torch.Tensor) -> list:
    """(class, image index) of each loaded image, by its (solid) colour."""
    found = []
    for image, label in zip(images, labels):
        rgb = (image.mean((1, 2)) * 255).tolist()
        c = int(label)
        i = min(range(5), key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, _colour(c, k))))
        assert max(abs(a - b) for a, b in zip(rgb, _colour(c, i))) < 4
        found.append((c, i))
    return found


# ---------------------------------------------------------------- load_image_folder
def test_shapes_range_and_split_per_class(folder):
    split = load_image_folder(folder, size=16, test_fraction=0.2, seed=0)
    assert isinstance(split, ImageFolderSplit)
    assert split.classes == CLASSES and split.root == str(folder)
    assert split.train_images.shape == (12, 3, 16, 16) and split.test_images.shape == (3, 3, 16, 16)
    for images in (split.train_images, split.test_images):
        assert images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1
    for labels in (split.train_labels, split.test_labels):
        assert labels.dtype == torch.long
    # every class on both sides: 4 + 1 of its 5 images
    assert split.train_labels.bincount(minlength=3).tolist() == [4, 4, 4]
    assert split.test_labels.bincount(minlength=3).tolist() == [1, 1, 1]
    train = _identify(split.train_images, split.train_labels)
    test = _identify(split.test_images, split.test_labels)
    assert sorted(train + test) == [(c, i) for c in range(3) for i in range(5)]  # each image once


def test_resize_then_centre_crop(tmp_path):
    """The shorter side becomes `size`, the centre square is kept (Resize + CenterCrop)."""
    for name, array in (("wide", np.zeros((20, 60, 3), np.uint8)), ("tall", np.zeros((60, 20, 3), np.uint8))):
        folder = tmp_path / "stripes" / name
        folder.mkdir(parents=True)
        thirds = np.array_split(np.arange(60), 3)
        for k, colour in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
            if name == "wide":
                array[:, thirds[k]] = colour
            else:
                array[thirds[k]] = colour
        for i in range(2):
            Image.fromarray(array).save(folder / f"{i}.png")
    split = load_image_folder(tmp_path / "stripes", size=10, test_fraction=0.5)
    images = torch.cat([split.train_images, split.test_images])
    assert images.shape == (4, 3, 10, 10)
    # the middle third (green) fills the square crop, up to the antialiasing at its borders
    green = images[:, 1].mean((1, 2))
    assert (green > 0.85).all() and (images[:, 0].mean((1, 2)) < 0.1).all()


def test_split_is_deterministic_per_seed_and_changes_with_it(folder):
    a = load_image_folder(folder, size=8, seed=0)
    b = load_image_folder(folder, size=8, seed=0)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_images, b.test_images)
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_labels, b.test_labels)
    tests = {seed: sorted(_identify(s.test_images, s.test_labels))
             for seed in range(4) for s in [load_image_folder(folder, size=8, seed=seed)]}
    assert any(tests[seed] != tests[0] for seed in (1, 2, 3))


def test_test_fraction_and_max_per_class(folder):
    half = load_image_folder(folder, size=8, test_fraction=0.6)
    assert half.test_labels.bincount().tolist() == [3, 3, 3] and half.train_labels.bincount().tolist() == [2, 2, 2]
    most = load_image_folder(folder, size=8, test_fraction=0.99)  # keeps one training image per class
    assert most.train_labels.bincount().tolist() == [1, 1, 1]
    least = load_image_folder(folder, size=8, test_fraction=0.01)  # and one test image
    assert least.test_labels.bincount().tolist() == [1, 1, 1]
    small = load_image_folder(folder, size=8, max_per_class=3)
    assert small.train_labels.bincount().tolist() == [2, 2, 2]
    assert small.test_labels.bincount().tolist() == [1, 1, 1]
    two = load_image_folder(folder, size=8, max_per_class=2)
    assert len(two.train_labels) == len(two.test_labels) == 3
    everything = load_image_folder(folder, size=8, max_per_class=100)
    assert len(everything.train_labels) + len(everything.test_labels) == 15


@pytest.mark.parametrize("seed", range(4))
def test_a_smaller_split_trains_on_no_photo_a_larger_one_holds_out(folder, seed):
    """The held-out photos are a prefix of each class's order, whatever max_per_class is: a model
    fitted on a quick run's split is never scored on its own training photos."""
    full = load_image_folder(folder, size=8, seed=seed, test_fraction=0.6)  # 3 of each class's 5 held out
    held_out = set(_identify(full.test_images, full.test_labels))
    for most in (2, 3, 4):
        small = load_image_folder(folder, size=8, seed=seed, test_fraction=0.6, max_per_class=most)
        assert not held_out & set(_identify(small.train_images, small.train_labels)), most
        assert set(_identify(small.test_images, small.test_labels)) <= held_out


def test_load_image_folder_errors(tmp_path, folder):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(missing)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (10, 10)).save(flat / "a.png")  # images, but no class folders
    with pytest.raises(ValueError, match="ImageFolder layout"):
        load_image_folder(flat)
    empty_class = _write_folder(tmp_path / "with_empty")
    (empty_class / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"class 'zebra' in `root` has 0 image\(s\)"):  # named, with the extensions
        load_image_folder(empty_class)
    lonely = _write_folder(tmp_path / "lonely")
    (lonely / "owl").mkdir()
    Image.new("RGB", (12, 9)).save(lonely / "owl" / "only.png")
    with pytest.raises(ValueError, match="'owl'.*>= 2"):
        load_image_folder(lonely)
    for size in (7, 0, 8.0, True):
        with pytest.raises(ValueError, match="`size` must be an int >= 8"):
            load_image_folder(folder, size=size)
    for fraction in (0, 1, 1.5, -0.2, float("nan"), "0.5"):  # a string failed later, in round()
        with pytest.raises(ValueError, match="`test_fraction` must be a number in"):
            load_image_folder(folder, test_fraction=fraction)
    with pytest.raises(TypeError, match="`seed` must be an int"):  # 1.5 was truncated to 1
        load_image_folder(folder, seed=1.5)
    assert load_image_folder(folder, size=np.int64(8)).train_images.shape[-1] == 8  # was refused
    assert load_image_folder(folder, size=8, max_per_class=np.int64(2)).train_images.shape[0] > 0  # was refused
    for cap in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="`max_per_class`"):
            load_image_folder(folder, max_per_class=cap)


def test_hidden_files_and_folders_are_skipped(tmp_path):
    """A Jupyter .ipynb_checkpoints folder was taken for a class (and refused as empty), a macOS
    "._img0.png" resource fork was opened as a photo (PIL could not identify it)."""
    root = _write_folder(tmp_path / "photos")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "cat" / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "dog" / ".thumbnails").mkdir()
    Image.new("RGB", (10, 10)).save(root / "dog" / ".thumbnails" / "img0.png")
    split = load_image_folder(root, size=16, test_fraction=0.2, seed=0)
    assert split.classes == CLASSES
    assert len(split.train_labels) + len(split.test_labels) == 15
    _identify(torch.cat([split.train_images, split.test_images]), torch.cat([split.train_labels, split.test_labels]))
    (root / ".hidden_class").mkdir()
    Image.new("RGB", (10, 10)).save(root / ".hidden_class" / "a.png")
    Image.new("RGB", (10, 10)).save(root / ".hidden_class" / "b.png")
    assert load_image_folder(root, size=16).classes == CLASSES


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="symbolic links need a POSIX file system")
def test_a_photo_reachable_by_several_paths_is_read_once(tmp_path):
    """torchvision follows symbolic links: a link to the class's own folder read each photo again, so the
    same photos landed on both sides of the split (a loop: about 40 copies of each)."""
    root = _write_folder(tmp_path / "photos")
    expected = load_image_folder(root, size=16, test_fraction=0.2, seed=0)
    os.symlink(root / "cat", root / "cat" / "again")
    split = load_image_folder(root, size=16, test_fraction=0.2, seed=0)
    assert len(split.train_labels) + len(split.test_labels) == len(expected.train_labels) + len(expected.test_labels)
    assert torch.equal(split.test_images, expected.test_images)


def test_sixteen_bit_grayscale_keeps_its_grey_level(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey at 255: a mid-grey 16-bit PNG loaded as white."""
    root = _write_folder(tmp_path / "photos")
    (root / "grey").mkdir()
    for i, level in enumerate((16384, 32768, 65535)):
        Image.fromarray(np.full((12, 20), level, dtype=np.uint16)).save(root / "grey" / f"g{i}.png")
    assert Image.open(root / "grey" / "g1.png").mode.startswith("I")
    split = load_image_folder(root, size=8, test_fraction=0.4, seed=0)
    images = torch.cat([split.train_images, split.test_images])[torch.cat([split.train_labels, split.test_labels]) == 3]
    levels = sorted(round(float(image.mean()) * 255) for image in images)
    assert levels == [64, 128, 255]
    assert all(float(image.std()) == 0.0 for image in images)


def test_a_float_image_in_zero_one_keeps_its_grey_level(tmp_path):
    """A 32-bit float TIFF (mode F) in [0, 1]: PIL's convert("RGB") clipped it to black."""
    root = _write_folder(tmp_path / "photos")
    (root / "grey").mkdir()
    for i, level in enumerate((0.25, 0.5, 1.0)):
        Image.fromarray(np.full((12, 20), level, dtype=np.float32)).save(root / "grey" / f"g{i}.tif")
    assert Image.open(root / "grey" / "g1.tif").mode == "F"
    split = load_image_folder(root, size=8, test_fraction=0.4, seed=0)
    images = torch.cat([split.train_images, split.test_images])[torch.cat([split.train_labels, split.test_labels]) == 3]
    assert sorted(round(float(image.mean()) * 255) for image in images) == [64, 128, 255]


@pytest.mark.parametrize("orientation, upright", [(6, lambda a: np.rot90(a, k=-1)), (8, lambda a: np.rot90(a, k=1)),
                                                   (3, lambda a: np.rot90(a, k=2)), (2, lambda a: a[:, ::-1]),
                                                   (5, lambda a: a.transpose(1, 0, 2))])
def test_a_photo_is_loaded_upright_by_its_exif_orientation(tmp_path, orientation, upright):
    """A phone photo stores its pixels on their side with an EXIF orientation tag; viewers turn it
    (6: 90° clockwise, 8: counter-clockwise, 3: 180°, 2: mirrored, 5: transposed). Loaded, it equals
    the stored pixels turned that way. The photos are square and unscaled, so nothing is cropped."""
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:, :, 2] = 255
    stored[:4, :8] = (0, 255, 0)  # a green bar on the top left: no two turns or mirrors give the same image
    for name in ("tagged", "upright"):
        (tmp_path / "photos" / name).mkdir(parents=True)
    for i in range(2):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(tmp_path / "photos" / "tagged" / f"{i}.png", exif=exif)
        Image.fromarray(np.ascontiguousarray(upright(stored))).save(tmp_path / "photos" / "upright" / f"{i}.png")
    split = load_image_folder(tmp_path / "photos", size=16, test_fraction=0.5)
    images = torch.cat([split.train_images, split.test_images])
    labels = torch.cat([split.train_labels, split.test_labels])
    tagged, straight = images[labels == split.classes.index("tagged")], images[labels == split.classes.index("upright")]
    assert torch.equal(tagged, straight)
    assert not torch.equal(tagged[0], torch.from_numpy(stored).permute(2, 0, 1).float() / 255)  # it was turned


def test_a_photo_with_damaged_exif_data_loads_as_stored(tmp_path, monkeypatch):
    """Pillow raises SyntaxError or struct.error on damaged EXIF data; the photo itself is readable,
    so it loads with its stored pixels instead of stopping the whole folder."""
    root = _write_folder(tmp_path / "photos")
    expected = load_image_folder(root, size=16)

    from PIL import JpegImagePlugin, PngImagePlugin

    calls = []

    def damaged(self):
        calls.append(self.format)
        raise SyntaxError("not a TIFF file (header b'' not valid)")

    for cls in (Image.Image, JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile):
        if "getexif" in vars(cls):  # the plugins override it
            monkeypatch.setattr(cls, "getexif", damaged)
    got = load_image_folder(root, size=16)
    assert {"JPEG", "PNG"} <= set(calls)  # every photo's EXIF was damaged
    assert torch.equal(got.train_images, expected.train_images) and torch.equal(got.test_images, expected.test_images)


@pytest.mark.skipif(not ANIMALFACES.is_dir(), reason="../shared/data/animalfaces10 is not there")
def test_animalfaces10_loads_as_719_plus_179():
    split = load_image_folder(ANIMALFACES, size=64)
    assert split.train_images.shape == (719, 3, 64, 64)
    assert split.test_images.shape == (179, 3, 64, 64)
    assert len(split.classes) == 10 and split.classes[0] == "n02099601"
    assert split.train_labels.unique().tolist() == list(range(10))
    assert split.test_labels.unique().tolist() == list(range(10))
    assert 0 <= split.train_images.min() and split.train_images.max() <= 1
    assert split.train_images.std() > 0.1  # photos, not blank


# ---------------------------------------------------------------- Jitter(flip=True)
def _asymmetric(n: int) -> torch.Tensor:
    ramp = torch.linspace(0, 0.5, 8).expand(n, 3, 8, 8)  # left dark, right bright
    return ramp + 0.4 * torch.rand(n, 1, 1, 1, generator=torch.Generator().manual_seed(n))


def test_jitter_flips_about_half_the_images():
    images = _asymmetric(400)
    out = Jitter(pixels=0, flip=True, seed=0)(images)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert (flipped ^ kept).all()  # each image either mirrored or left as it was
    assert 150 <= int(flipped.sum()) <= 250
    again = Jitter(pixels=0, flip=True, seed=0)(images)
    assert torch.equal(out, again)  # seeded
    other = Jitter(pixels=0, flip=True, seed=1)(images)
    assert not torch.equal(out, other)
    jitter = Jitter(pixels=0, flip=True, seed=0)
    assert not torch.equal(jitter(images), jitter(images))  # a new draw per call


def test_jitter_without_flip_keeps_the_orientation():
    images = _asymmetric(64)
    assert torch.equal(Jitter(pixels=0, flip=False, seed=0)(images), images)
    assert torch.equal(Jitter(pixels=0, seed=0)(images), images)  # flip is off by default
    shifted = Jitter(pixels=2, noise=0.0, flip=False, seed=0)(images)
    # a shift with replicated edges keeps the left-to-right ramp increasing (never reversed)
    assert (shifted[..., -1] >= shifted[..., 0]).all()


def test_jitter_with_shift_noise_and_flip():
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = Jitter(pixels=1, noise=0.1, flip=True, seed=3)(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, Jitter(pixels=1, noise=0.1, flip=True, seed=3)(images))


def test_jitter_recolours_a_two_colour_image_keeping_its_strokes():
    train = ColorDigits("train", recolorings=1, seed=0)
    images, masks = train.images[:200], train.masks[:200]
    out = Jitter(pixels=0, recolour=0.5, seed=0)(images)
    changed = (out - images).abs().flatten(1).amax(1) > 1e-4
    assert 70 <= int(changed.sum()) <= 130  # about half recoloured, the rest left exactly as they were
    assert torch.equal(out[~changed], images[~changed])
    # a recoloured digit is m * fg' + (1 - m) * bg' for the same intensity mask m: per channel, an
    # affine function of m, whose two ends are new colours
    m = masks[changed].flatten(1)
    for image, mask in zip(out[changed].flatten(2), m):
        design = torch.stack([mask, torch.ones_like(mask)], 1)
        fit = torch.linalg.lstsq(design, image.T).solution
        assert torch.allclose(design @ fit, image.T, atol=1e-4)
    new_fg = out[changed].flatten(2).gather(2, m.argmax(1).view(-1, 1, 1).expand(-1, 3, 1))[..., 0]
    assert (new_fg - train.foreground[:200][changed]).norm(dim=1).median() > 0.2
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, Jitter(pixels=0, recolour=0.5, seed=0)(images))  # seeded
    assert torch.equal(Jitter(pixels=0, seed=0)(images), images)  # off by default
    # a resume with another share is refused; records of fits without recolouring are as before
    assert augment_record(Jitter(recolour=0.5))["Jitter"]["recolour"] == 0.5
    assert "recolour" not in augment_record(Jitter())["Jitter"]


# ---------------------------------------------------------------- fit_autoencoder: perceptual loss, augment
class Perceptual(nn.Sequential):
    def __init__(self):
        torch.manual_seed(1)
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(inplace=True))
        with torch.no_grad():
            self[1].running_mean.fill_(0.2)
            self[1].running_var.fill_(0.5)


AE = dict(latent_dim=4, width=4, batch_size=8, schedule="constant", progress=False)


@pytest.fixture(scope="module")
def photos():
    return torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pixel_only(photos):
    return fit_autoencoder(photos, steps=3, **AE)


def test_perceptual_fit_leaves_the_perceptual_model_as_it_was(photos, pixel_only):
    net = Perceptual().train()
    net[3].bias.requires_grad_(False)  # a user's own frozen parameter stays frozen
    net[0].eval()  # and a user's own per-module mode stays
    flags = training_flags(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    requires = {k: p.requires_grad for k, p in net.named_parameters()}
    ae = fit_autoencoder(photos, steps=3, perceptual_model=net, perceptual_layers=("2", "3"), **AE)
    assert len(ae.history) == 3 and all(np.isfinite(ae.history))
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights and batch-norm statistics unchanged
    assert {k: p.requires_grad for k, p in net.named_parameters()} == requires
    assert all(p.grad is None for p in net.parameters())
    assert training_flags(net) == flags
    assert_no_hooks(net)
    # the feature term is added: the first step (same initialisation and batch) costs more
    assert ae.history[0] > pixel_only.history[0]


def test_perceptual_loss_trains_the_autoencoder(photos, pixel_only):
    zero = fit_autoencoder(photos, steps=3, perceptual_model=Perceptual(), perceptual_layers=["3"],
                           perceptual_weight=0.0, **AE)
    assert zero.history == pytest.approx(pixel_only.history, rel=1e-5)
    weighted = fit_autoencoder(photos, steps=3, perceptual_model=Perceptual(), perceptual_layers=["3"],
                               perceptual_weight=5.0, **AE)
    # its gradient reaches the autoencoder through the frozen network: other weights
    changed = [not torch.allclose(a, b) for a, b in zip(weighted.state_dict().values(), zero.state_dict().values())]
    assert any(changed)


def test_a_float64_perceptual_model_gives_the_loss_of_its_float32_original(photos):
    """The analysed model, the natural perceptual model, may be a float64 one (as the explainers
    and fit_invariances take): the reconstructions go to it in its dtype (a raw dtype error before)."""
    kwargs = dict(steps=2, perceptual_layers=["3"], perceptual_weight=5.0, **AE)
    plain = fit_autoencoder(photos, perceptual_model=Perceptual(), **kwargs)
    doubled = fit_autoencoder(photos, perceptual_model=Perceptual().double(), **kwargs)
    assert doubled.history == pytest.approx(plain.history, rel=1e-5)
    assert all(p.dtype == torch.float32 for p in doubled.parameters())


def test_perceptual_arguments_must_come_together(photos):
    with pytest.raises(ValueError, match="needs both `perceptual_model` and `perceptual_layers`"):
        fit_autoencoder(photos, steps=1, perceptual_model=Perceptual(), **AE)
    with pytest.raises(ValueError, match="needs both `perceptual_model` and `perceptual_layers`"):
        fit_autoencoder(photos, steps=1, perceptual_layers=("3",), **AE)
    net = Perceptual()
    with pytest.raises(ValueError, match="not found"):
        fit_autoencoder(photos, steps=1, perceptual_model=net, perceptual_layers=("9",), **AE)
    assert_no_hooks(net)
    assert all(p.requires_grad for p in net.parameters())


def test_perceptual_fit_fails_cleanly(photos):
    """A perceptual network that raises mid-fit leaves no hook and its flags restored."""
    net = Perceptual().train()
    calls = {"n": 0}

    def fail_on_third(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("perceptual: boom")

    handle = net[0].register_forward_pre_hook(fail_on_third)
    try:
        with pytest.raises(RuntimeError, match="perceptual: boom"):
            fit_autoencoder(photos, steps=3, perceptual_model=net, perceptual_layers=("3",), **AE)
    finally:
        handle.remove()
    assert_no_hooks(net)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("layers", [("2", "3"), ["2", "3"]])
def test_perceptual_fit_resumes_from_its_checkpoint(photos, tmp_path, layers):
    path = str(tmp_path / "ae.safetensors")
    settings = dict(perceptual_layers=layers, perceptual_weight=0.5, checkpoint_every=2, **AE)
    first = fit_autoencoder(photos, steps=4, checkpoint=path, perceptual_model=Perceptual(), **settings)
    # the config went through JSON (tuple → list); the same settings must still resume
    resumed = fit_autoencoder(photos, steps=6, checkpoint=path, perceptual_model=Perceptual(), **settings)
    assert len(resumed.history) == 6
    assert resumed.history[:4] == first.history
    straight = fit_autoencoder(photos, steps=6, perceptual_model=Perceptual(), **settings)
    assert resumed.history == pytest.approx(straight.history, rel=1e-5)
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    loaded = load_autoencoder(path)
    x = photos[:2]
    assert torch.allclose(loaded(x), resumed(x), atol=1e-6)


def test_resume_refuses_other_perceptual_layers(photos, tmp_path):
    path = str(tmp_path / "ae.safetensors")
    fit_autoencoder(photos, steps=2, checkpoint=path, perceptual_model=Perceptual(), perceptual_layers=("3",), **AE)
    with pytest.raises(Exception, match="another configuration"):
        fit_autoencoder(photos, steps=4, checkpoint=path, perceptual_model=Perceptual(), perceptual_layers=("2",), **AE)


def test_augment_is_applied_to_every_batch(photos, pixel_only):
    seen = []

    def augment(x):
        seen.append(tuple(x.shape))
        return 1.0 - x

    ae = fit_autoencoder(photos, steps=3, augment=augment, **AE)
    assert seen == [(8, 3, 16, 16)] * 3
    assert ae.history != pixel_only.history  # trained on the augmented images
    jittered = fit_autoencoder(photos, steps=2, augment=Jitter(1, flip=True, seed=0), **AE)
    assert len(jittered.history) == 2


def test_a_photo_that_cannot_be_read_is_named(tmp_path):
    """A truncated JPEG failed with PIL's "image file is truncated", naming no file among hundreds."""
    root = _write_folder(tmp_path / "photos")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "dog" / "cut.jpg")
    data = (root / "dog" / "cut.jpg").read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot be read, '.*cut\.jpg'.*truncated.*remove or replace it"):
        load_image_folder(root, size=8, test_fraction=0.5)
    (root / "dog" / "cut.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot be read, '.*cut\.jpg'"):
        load_image_folder(root, size=8, test_fraction=0.5)
    (root / "dog" / "cut.jpg").unlink()
    # Pillow's guard against decompression bombs (over ~179 MP, or a damaged header claiming it) is no OSError
    Image.new("1", (15000, 12500)).save(root / "dog" / "panorama.png")
    with pytest.raises(ValueError, match=r"too large to read safely, '.*panorama\.png'.*MAX_IMAGE_PIXELS"):
        load_image_folder(root, size=8, test_fraction=0.5)


def test_a_photo_linked_into_a_second_class_is_refused_naming_both(folder):
    """The first class in sorted order kept a photo reachable from two: it was labelled that class and
    missing from its own, without a word."""
    os.symlink((folder / "fox" / "img0.jpg").resolve(), folder / "cat" / "looks_like_a_cat.jpg")
    with pytest.raises(ValueError, match=r"one photo in two classes, 'cat' \(.*looks_like_a_cat.jpg'\) and 'fox' "
                                         r"\(.*img0.jpg'\), through a link"):
        load_image_folder(folder, size=8)


def test_a_png_that_pillow_refuses_is_named(folder):
    """An oversized colour profile is Pillow's ValueError, which escaped without the file's name."""
    Image.new("RGB", (20, 20)).save(folder / "dog" / "big_profile.png", icc_profile=b"\0" * (2 * 2**20))
    with pytest.raises(ValueError, match=r"cannot be read, '.*big_profile.png': Decompressed data too large"):
        load_image_folder(folder, size=8, test_fraction=0.5)


def test_a_32_bit_integer_image_of_8_bit_values_keeps_its_brightness(tmp_path):
    """Every mode-I image was scaled as 16-bit, so 0…255 data came out black."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.fromarray(np.full((12, 12), 200, np.int32)).save(tmp_path / name / f"{k}.tif")
    split = load_image_folder(tmp_path, size=8, test_fraction=0.5)
    assert torch.allclose(torch.cat([split.train_images, split.test_images]), torch.tensor(200 / 255))
    # a 16-bit PGM opens as mode I too: dark ones (values up to 255) stay dark, as the same PNG does
    from captum_inn.datasets import _load_rgb

    for suffix in ("pgm", "png"):
        Image.fromarray(np.full((4, 4), 255, np.uint16)).save(tmp_path / f"dark.{suffix}")
        assert np.asarray(_load_rgb(str(tmp_path / f"dark.{suffix}"))).max() == 1


def test_splits_compare_by_identity(folder):
    split = load_image_folder(folder, size=8)
    assert split == split and split != load_image_folder(folder, size=8)  # == of tensors failed


@pytest.mark.skipif(os.name == "nt", reason="byte file names")
def test_class_names_that_are_not_utf8_are_refused_before_any_work(tmp_path):
    """A Latin-1 folder name loaded fine, then failed the figures and the report after the whole fit."""
    root = os.fsencode(tmp_path)
    for name in (b"caf\xe9", b"dog"):
        os.makedirs(os.path.join(root, name))
        for k in range(2):
            Image.new("RGB", (9, 9)).save(os.path.join(root, name, f"{k}.png".encode()))
    with pytest.raises(ValueError, match="class folders whose names are not valid UTF-8"):
        load_image_folder(tmp_path, size=8)
