"""The condition embedders: large feature maps are cut into patches first, small ones are not; token
sequences are projected token by token."""

import numpy as np
import pytest
import torch
from torch import nn

from captum_inn.inn import ConditionalINN, ConvEmbedder, TokenEmbedder, make_embedder
from captum_inn.inn.embedders import FLATTEN_TOKENS_UP_TO
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


def test_patch_padding_is_split_evenly_between_the_sides():
    """Rows 10 in patches of 3 take 2 of padding, one above and one below; columns 7 in patches of 2
    take 1, on the right."""
    embedder = ConvEmbedder((2, 10, 7), out_dim=8, width=8, max_width=16, patch_to=4)
    (pad,) = [layer for layer in embedder.net if isinstance(layer, nn.ZeroPad2d)]
    assert pad.padding == (0, 1, 1, 1)  # (left, right, top, bottom)


@pytest.mark.parametrize("shape", [(3, 13, 9), (2, 17, 17), (2, 1, 20)])
def test_odd_sides_are_padded_so_every_pixel_reaches_the_embedding(shape):
    torch.manual_seed(0)
    embedder = ConvEmbedder(shape, out_dim=8, width=8, max_width=16)
    assert any(isinstance(layer, nn.ZeroPad2d) for layer in embedder.net)
    c = torch.randn(1, *shape, requires_grad=True)
    embedder(c).pow(2).sum().backward()
    reached = c.grad.abs().sum(1)[0] > 0
    assert bool(reached.all()), f"pixels without influence: {(~reached).nonzero().tolist()}"


def test_the_convolutions_double_the_width_up_to_max_width_and_no_further():
    # max_width is the largest number of channels: doubling past it costs its square in weights
    embedder = ConvEmbedder((4, 32, 32), out_dim=8, width=8, max_width=12, patch_to=None)
    assert [conv.out_channels for conv in _convs(embedder)] == [8, 12, 12, 12]
    assert embedder(torch.randn(2, 4, 32, 32)).shape == (2, 8)


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
    inn(torch.randn(4, 4), torch.randn(4, 4, 16, 16))  # initialises ActNorm, as one fitting step does
    path = save_invariance_inn(str(tmp_path / "new.safetensors"), inn)
    tensors, meta = load_checkpoint(str(path), kind="invariance_inn")
    del meta["config"]["inn"]["conv_patch_to"]  # what fits before the setting wrote
    save_checkpoint(str(tmp_path / "old.safetensors"), tensors, meta)
    loaded = load_invariance_inn(str(tmp_path / "old.safetensors"))
    assert _convs(loaded.embedder)[0].kernel_size == (1, 1)
    for key, value in module_tensors(inn).items():
        assert torch.equal(module_tensors(loaded)[key], value), key


# ------------------------------------------------------------ token sequences (transformer layers)
def test_long_token_sequences_get_the_token_embedder_and_other_shapes_do_not():
    assert FLATTEN_TOKENS_UP_TO == 16_384
    kinds = {shape: type(make_embedder(shape, 8, hidden=16)).__name__
             for shape in [(197, 384), (65, 256), (65, 252), (17, 96), (2000, 16), (1, 20000), (20000,), (64, 1, 1),
                           (8, 4, 4)]}
    assert kinds == {(197, 384): "TokenEmbedder", (65, 256): "TokenEmbedder",  # 16,640 numbers
                     (65, 252): "MLPEmbedder", (17, 96): "MLPEmbedder",  # 16,380 and fewer: flattened, as before
                     (2000, 16): "MLPEmbedder",  # no more features than it would keep: nothing to save
                     (1, 20000): "MLPEmbedder", (20000,): "MLPEmbedder", (64, 1, 1): "MLPEmbedder",
                     (8, 4, 4): "ConvEmbedder"}
    assert type(make_embedder((197, 384), 8, hidden=16, token_dim=None)).__name__ == "MLPEmbedder"
    assert type(make_embedder((197, 384), 8, hidden=16, token_dim=512)).__name__ == "MLPEmbedder"


def test_a_sequence_of_exactly_flatten_tokens_up_to_numbers_is_still_flattened():
    # "at most this many numbers" are flattened; the token embedder takes over only above the limit
    assert 64 * 256 == FLATTEN_TOKENS_UP_TO
    assert type(make_embedder((64, 256), 8, hidden=16)).__name__ == "MLPEmbedder"
    assert type(make_embedder((64, 257), 8, hidden=16)).__name__ == "TokenEmbedder"


def test_the_token_embedder_projects_each_token_with_one_shared_map():
    embedder = TokenEmbedder((197, 768), out_dim=8, hidden=32, token_dim=16)
    linears = [layer for layer in embedder.modules() if isinstance(layer, nn.Linear)]
    assert linears[0].weight.shape == (16, 768) and linears[1].weight.shape == (32, 197 * 16)
    # flattened into an MLP, the first layer alone would hold 197 * 768 * 32 = 4.8 M weights
    assert sum(p.numel() for p in embedder.parameters()) < 0.25 * 197 * 768 * 32


def test_every_token_and_feature_reaches_the_embedding_in_its_place():
    torch.manual_seed(0)
    embedder = TokenEmbedder((7, 24), out_dim=8, hidden=32, token_dim=4)
    c = torch.randn(2, 7, 24, requires_grad=True)
    out = embedder(c)
    out.pow(2).sum().backward()
    assert bool((c.grad.abs().sum(0) > 0).all())
    with torch.no_grad():  # not a pooled bag of tokens: moving a token changes the embedding
        assert not torch.allclose(embedder(c.flip(1)), out, atol=1e-4)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_token_dim_must_be_a_positive_int_named_as_the_caller_spells_it(bad, error):
    with pytest.raises(error, match="`token_dim`"):
        TokenEmbedder((5, 32), out_dim=8, token_dim=bad)
    with pytest.raises(error, match="`token_dim`"):
        ConditionalINN(4, (5, 32), n_blocks=1, hidden=8, embed_dim=8, token_dim=bad)
    with pytest.raises(error, match="`token_dim`"):  # before any data is read
        merged_config(InvarianceConfig, None, {"token_dim": bad})
    with pytest.raises(ValueError, match="tokens, features"):
        TokenEmbedder((5, 32, 2), out_dim=8)


def test_an_inn_saved_before_token_dim_existed_loads_with_its_flattening_embedder(tmp_path):
    torch.manual_seed(0)
    inn = ConditionalINN(4, (65, 256), n_blocks=1, hidden=8, embed_dim=8, token_dim=None)
    assert type(inn.embedder).__name__ == "MLPEmbedder"  # the default would project the tokens
    inn.fit_info = {"layer": "blocks", "layer_shape": [65, 256], "latent_dim": 4, "model_class": "Net", "steps": 1}
    inn(torch.randn(4, 4), torch.randn(4, 65, 256))  # initialises ActNorm, as one fitting step does
    path = save_invariance_inn(str(tmp_path / "new.safetensors"), inn)
    tensors, meta = load_checkpoint(str(path), kind="invariance_inn")
    del meta["config"]["inn"]["token_dim"]  # what fits before the setting wrote
    save_checkpoint(str(tmp_path / "old.safetensors"), tensors, meta)
    loaded = load_invariance_inn(str(tmp_path / "old.safetensors"))
    assert type(loaded.embedder).__name__ == "MLPEmbedder"
    for key, value in module_tensors(inn).items():
        assert torch.equal(module_tensors(loaded)[key], value), key


def test_a_vision_transformer_block_is_fitted_explained_saved_and_reloaded(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from captum_inn import LayerInvariance
    from captum_inn.autoencoders import ConvAutoencoder
    from captum_inn.training import fit_invariances

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=1, num_heads=2,
                                               hidden_dim=256, mlp_dim=32, num_classes=10).eval()
    ae = ConvAutoencoder((3, 32, 32), latent_dim=8, width=8).eval()
    images = torch.rand(64, 3, 32, 32)
    inn = fit_invariances(vit, "encoder.layers.encoder_layer_0", ae, images, steps=3, n_blocks=1, hidden=16,
                          embed_dim=8, batch_size=16, progress=False, checkpoint_dir=str(tmp_path))
    assert type(inn.embedder).__name__ == "TokenEmbedder" and inn.cond_shape == (65, 256)
    maps = LayerInvariance(vit, "encoder.layers.encoder_layer_0", inn, ae).attribute(images[:2], n_samples=3)
    assert maps.shape == (2, 3, 32, 32) and bool(torch.isfinite(maps).all())
    loaded = load_invariance_inn(str(tmp_path / "invariance_encoder.layers.encoder_layer_0.safetensors"))
    assert type(loaded.embedder).__name__ == "TokenEmbedder" and loaded.config["token_dim"] == 16
    z = torch.randn(4, 65, 256)
    assert torch.equal(loaded.embed(z), inn.eval().embed(z))


def test_input_statistics_refuse_samples_of_another_shape():
    # (N, 2, 2) samples for a (4,)-shaped layer have as many numbers per sample: their statistics were
    # reshaped into the buffers silently, from the wrong layer
    embedder = make_embedder((4,), 8, hidden=16)
    with pytest.raises(ValueError, match=r"per-sample shape \(2, 2\), but this INN was built for a layer of shape \(4,\)"):
        embedder.set_input_statistics(torch.randn(16, 2, 2))
    assert torch.equal(embedder.in_mean, torch.zeros(4)) and torch.equal(embedder.in_std, torch.ones(4))
