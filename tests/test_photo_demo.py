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
    first, loaded = _resnet(path, photos, 2, one_step, 0, "cpu", False)
    assert not loaded
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
