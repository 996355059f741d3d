"""The photo demo reuses an earlier run's ResNet only where a fresh training would give the same one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from captum_inn.photo_demo import PhotoDemoSettings, _resnet


@pytest.fixture
def one_step():
    return dataclasses.replace(PhotoDemoSettings(), size=16, cnn_steps=1)


def _photos(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(8, 3, 16, 16, generator=generator), torch.arange(8) % 2


def test_resnet_is_reused_only_with_the_same_recipe_photos_and_threads(tmp_path, one_step):
    path, photos = tmp_path / "resnet18.safetensors", _photos(0)
    state = torch.get_rng_state()
    first, loaded = _resnet(path, photos, 2, one_step, 0, "cpu", False)
    assert not loaded and torch.equal(torch.get_rng_state(), state)  # its initial weights reseeded the caller's stream
    again, loaded = _resnet(path, photos, 2, one_step, 0, "cpu", False)
    assert loaded
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

    # the same number of other photos: a fresh ResNet, not the last run's
    assert not _resnet(path, _photos(1), 2, one_step, 0, "cpu", False)[1]
    assert _resnet(path, _photos(1), 2, one_step, 0, "cpu", False)[1]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # another floating-point path trains another ResNet
        assert not _resnet(path, _photos(1), 2, one_step, 0, "cpu", False)[1]
    finally:
        torch.set_num_threads(threads)


class _StopAfterAutoencoder(Exception):
    pass


def test_autoencoder_is_continued_only_for_the_same_steps(tmp_path, monkeypatch):
    """A rerun with other ``ae_steps`` (same ResNet) fits its autoencoder afresh: resuming failed with a
    ValueError for fewer steps, and for more continued the last run's fit on its cosine schedule, unlike
    a fresh run."""
    from PIL import Image

    import captum_inn.photo_demo as photo_demo
    from captum_inn.training import load_checkpoint

    generator = torch.Generator().manual_seed(0)
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(5):
            pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{i}.png")

    def stop(*args, **kwargs):  # the autoencoder is fitted and saved: skip the INNs and the report
        raise _StopAfterAutoencoder

    monkeypatch.setattr(photo_demo, "cache_features", stop)
    tiny = dataclasses.replace(PhotoDemoSettings(), size=16, cnn_steps=1, ae_steps=4, ae_width=8, latent_dim=8)

    def history(out, ae_steps):
        with pytest.raises(_StopAfterAutoencoder):
            photo_demo.run_photo_demo(tmp_path / "photos", out=tmp_path / out,
                                      settings=dataclasses.replace(tiny, ae_steps=ae_steps), progress=False)
        return load_checkpoint(str(tmp_path / out / "checkpoints" / "autoencoder.safetensors"))[1]["history"]

    first = history("rerun", 4)
    assert history("rerun", 4) == first  # the same settings: the finished fit is taken as it is
    # a fresh fit of 2 steps is the first 2 of the 4-step fit (its rate changes only after the first step)
    assert history("rerun", 2) == first[:2]
    assert history("rerun", 6) == history("fresh", 6)


def test_resnet_of_another_device_is_not_reused(tmp_path, one_step):
    """A GPU trains another ResNet than the CPU (another floating-point path, as another thread
    count): a CPU rerun after a run with --device cuda reused the GPU's ResNet and continued its autoencoder."""
    from captum_inn.training import load_checkpoint, save_checkpoint

    path, photos = tmp_path / "resnet18.safetensors", _photos(0)
    _resnet(path, photos, 2, one_step, 0, "cpu", False)
    tensors, meta = load_checkpoint(path, kind="classifier")
    assert meta["config"]["device"] == "cpu"
    save_checkpoint(path, tensors, {"kind": "classifier", "config": {**meta["config"], "device": "cuda"}})
    assert not _resnet(path, photos, 2, one_step, 0, "cpu", False)[1]
    assert _resnet(path, photos, 2, one_step, 0, "cpu", False)[1]


@pytest.mark.parametrize("size, gradcam", [(64, "layer3"), (32, "layer2")])
def test_report_names_the_grad_cam_layer_it_uses(size, gradcam):
    """The page said "Grad-CAM at the last feature map" (layer4) while the figures show Grad-CAM at layer3;
    at --quick's 32 px layer3 has 2×2 cells, so the figures use layer2 and the page says so."""
    from captum_inn.photo_demo import PHOTO_LAYERS, _gradcam_layer, _html

    layer = {"shape": [1], "agreement": 0.5, "agreement_random_condition": 0.1, "variance_explained_by_v": 0.5,
             "reencode_beats_null": 0.9}
    metrics = {"layers": {name: layer for name in PHOTO_LAYERS}, "failures": [], "images": "photos",
               "classes": ["cat", "dog"], "n_train": 8, "n_test": 2, "settings": {"size": size},
               "classifier_test_accuracy": 0.5, "reconstruction_agreement": 0.5, "timings_s": {}}
    figures = {"comparisons": ["figures/comparison_0.png"], "maps": "figures/invariance_maps.png",
               "mixing": "figures/mixing.png", **{f"samples_{n}": f"figures/samples_{n}.png" for n in PHOTO_LAYERS}}
    page = _html(metrics, figures)
    assert f"Grad-CAM at <code>{gradcam}</code>" in page and "last feature map" not in page
    assert _gradcam_layer(size) == gradcam


def test_resnet_is_not_reused_after_one_photo_or_label_changed(tmp_path, one_step, monkeypatch):
    """The recipe hashed 32 probed photos and no label: a rerun after an unprobed photo was edited, or a
    photo relabelled, reused the ResNet trained on the old set."""
    import captum_inn.photo_demo

    monkeypatch.setattr(captum_inn.photo_demo, "fit_classifier", lambda *args, **kwargs: None)  # the recipe is tested
    path = tmp_path / "resnet18.safetensors"
    images, labels = torch.rand(33, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(33) % 2
    assert not _resnet(path, (images, labels), 2, one_step, 0, "cpu", False)[1]
    probed = set(torch.linspace(0, 32, 32).round().long().tolist())  # images_fingerprint's probes
    edited = images.clone()
    edited[min(set(range(33)) - probed)] = 0.5
    assert not _resnet(path, (edited, labels), 2, one_step, 0, "cpu", False)[1]
    relabelled = labels.clone()
    relabelled[0] = 1
    assert not _resnet(path, (edited, relabelled), 2, one_step, 0, "cpu", False)[1]
    assert _resnet(path, (edited, relabelled), 2, one_step, 0, "cpu", False)[1]


def test_the_mixing_figure_pairs_photos_of_different_classes():
    """--quick shows 3 photos; on two classes (0, 1, 0) a shift by one paired photo 0 with photo 2,
    both of class 0, under a caption about mixing in b's class evidence."""
    from captum_inn.photo_demo import _one_per_class, _other_class_partners

    for n_classes, rows in ((2, 3), (5, 6), (3, 6), (10, 6)):
        labels = torch.arange(40) % n_classes
        shown = labels[_one_per_class(labels, rows)]
        partners = _other_class_partners(shown)
        assert bool((shown[partners] != shown).all()), (n_classes, rows)
    assert _other_class_partners(torch.tensor([4, 4])).tolist() == [0, 1]  # one class: each photo with itself


def test_a_size_the_autoencoder_cannot_take_is_refused_before_any_work(tmp_path):
    """The autoencoder found a size of 48 px only after the ResNet had trained for minutes."""
    from captum_inn.photo_demo import PhotoDemoSettings, run_photo_demo

    for size in (48, 100, 4, 8):  # 8: no layer of a 4×4 Grad-CAM map (layer2 was 1×1)
        with pytest.raises(ValueError, match=rf"`settings.size` must be a power of two >= 16.*got {size}"):
            run_photo_demo(tmp_path / "no_photos_needed", out=tmp_path / "report",
                           settings=dataclasses.replace(PhotoDemoSettings(), size=size))
    with pytest.raises(ValueError, match=r"`settings.n_figures` must be >= 1, got 0"):  # an index error after training
        run_photo_demo(tmp_path / "no_photos_needed", out=tmp_path / "report",
                       settings=dataclasses.replace(PhotoDemoSettings(), n_figures=0))
    assert not (tmp_path / "report").exists()
