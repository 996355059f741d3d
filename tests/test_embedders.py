"""The condition embedders: large feature maps are cut into patches first, small ones are not."""

import numpy as np
import pytest
import torch
from torch import nn

from captum_inn.inn import ConditionalINN, ConvEmbedder, make_embedder
from captum_inn.training import InvarianceConfig, load_invariance_inn, save_invariance_inn
from captum_inn.training.checkpoint import load_checkpoint, module_tensors, save_checkpoint
from captum_inn.training.loop import merged_config


def _convs(embedder):
    return [layer for layer in embedder.net if isinstance(layer, nn.Conv2d)]


def test_large_maps_are_cut_into_patches_before_any_4x4_convolution():
    embedder = ConvEmbedder((16, 16, 16), out_dim=8, width=8, max_width=16)
    first, *rest = _convs(embedder)
    assert first.kernel_size == first.stride == (2, 2)  # 16x16 -> 8x8
    assert [c.kernel_size for c in rest] == [(4, 4)]     # 8x8 -> 4x4
    assert embedder(torch.randn(3, 16, 16, 16)).shape == (3, 8)
    wide = ConvEmbedder((4, 56, 20), out_dim=8, width=8, max_width=16)
    assert _convs(wide)[0].stride == (7, 3)                # each side to at most 8


def test_maps_of_at_most_8_a_side_build_exactly_as_before():
    for shape in [(32, 8, 8), (16, 4, 4), (8, 2, 2), (8, 5, 7)]:
        torch.manual_seed(0)
        new = ConvEmbedder(shape, out_dim=8, width=8, max_width=16)
        torch.manual_seed(0)
        old = ConvEmbedder(shape, out_dim=8, width=8, max_width=16, patch_to=None)
        assert str(new.net) == str(old.net)
        for (key, a), b in zip(new.state_dict().items(), old.state_dict().values()):
            assert torch.equal(a, b), key


def test_patch_to_none_keeps_the_full_resolution_1x1_convolution():
    embedder = ConvEmbedder((16, 16, 16), out_dim=8, width=8, max_width=16, patch_to=None)
    convs = _convs(embedder)
    assert convs[0].kernel_size == (1, 1) and [c.kernel_size for c in convs[1:]] == [(4, 4), (4, 4)]


@pytest.mark.parametrize("shape", [(3, 13, 9), (2, 17, 17), (2, 1, 20)])
def test_odd_sides_are_padded_so_every_pixel_reaches_the_embedding(shape):
    torch.manual_seed(0)
    embedder = ConvEmbedder(shape, out_dim=8, width=8, max_width=16)
    assert any(isinstance(layer, nn.ZeroPad2d) for layer in embedder.net)
    c = torch.randn(1, *shape, requires_grad=True)
    embedder(c).pow(2).sum().backward()
    reached = c.grad.abs().sum(1)[0] > 0
    assert bool(reached.all()), f"pixels without influence: {(~reached).nonzero().tolist()}"


@pytest.mark.parametrize("bad, error", [(3, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError),
                                        ("8", TypeError)])
def test_patch_to_must_be_an_int_of_at_least_4_named_as_the_caller_spells_it(bad, error):
    with pytest.raises(error, match="`patch_to`"):
        ConvEmbedder((4, 16, 16), out_dim=8, patch_to=bad)
    with pytest.raises(error, match="`conv_patch_to`"):
        ConditionalINN(4, (4, 16, 16), n_blocks=1, hidden=8, embed_dim=8, conv_patch_to=bad)
    with pytest.raises(error, match="`conv_patch_to`"):  # before any data is read
        merged_config(InvarianceConfig, None, {"conv_patch_to": bad})


def test_fit_settings_take_none_and_numpy_ints_for_conv_patch_to():
    assert merged_config(InvarianceConfig, None, {"conv_patch_to": None}).conv_patch_to is None
    assert merged_config(InvarianceConfig, None, {"conv_patch_to": np.int64(16)}).conv_patch_to == 16


def test_make_embedder_and_the_inn_pass_patch_to_on():
    assert _convs(make_embedder((4, 32, 32), 8, conv_width=8, conv_patch_to=16))[0].stride == (2, 2)
    inn = ConditionalINN(4, (4, 32, 32), n_blocks=1, hidden=8, embed_dim=8, conv_width=8, conv_max_width=8)
    assert inn.config["conv_patch_to"] == 8 and _convs(inn.embedder)[0].stride == (4, 4)
    legacy = ConditionalINN(4, (4, 32, 32), n_blocks=1, hidden=8, embed_dim=8, conv_width=8, conv_max_width=8,
                            conv_patch_to=None)
    assert legacy.config["conv_patch_to"] is None and _convs(legacy.embedder)[0].stride == (1, 1)


def test_an_inn_saved_before_conv_patch_to_existed_loads_with_its_full_resolution_embedder(tmp_path):
    torch.manual_seed(0)
    inn = ConditionalINN(4, (4, 16, 16), n_blocks=1, hidden=8, embed_dim=8, conv_width=8, conv_max_width=8,
                         conv_patch_to=None)
    inn.fit_info = {"layer": "conv", "layer_shape": [4, 16, 16], "latent_dim": 4, "model_class": "Net", "steps": 1}
    path = save_invariance_inn(str(tmp_path / "new.safetensors"), inn)
    tensors, meta = load_checkpoint(str(path), kind="invariance_inn")
    del meta["config"]["inn"]["conv_patch_to"]  # what fits before the setting wrote
    save_checkpoint(str(tmp_path / "old.safetensors"), tensors, meta)
    loaded = load_invariance_inn(str(tmp_path / "old.safetensors"))
    assert _convs(loaded.embedder)[0].kernel_size == (1, 1)
    for key, value in module_tensors(inn).items():
        assert torch.equal(module_tensors(loaded)[key], value), key
