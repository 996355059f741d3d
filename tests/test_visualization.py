"""The figure functions on their own: images drawn on a fixed [0, 1] scale (one channel in gray),
and the argument checks of the plots that take maps or concept scores.

Nothing is fitted; the inputs are constant images and hand-made tensors.
"""

from __future__ import annotations

import math
import os
import warnings
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from captum_inn import LayerInvariance
from captum_inn.analysis import AdversarialViews
from captum_inn.attr import EncodedShares
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.inn import ConditionalINN
from captum_inn.models import SmallCNN
from captum_inn.training.dynamics import ConceptDynamics
from captum_inn.visualization import (
    plot_by_depth,
    plot_comparison,
    plot_concept_bars,
    plot_concept_dynamics,
    plot_concept_edits,
    plot_image_grid,
    plot_invariance_maps,
    plot_invariance_samples,
    plot_layer_invariances,
    save_figure,
    to_numpy_image,
)

DARK, BRIGHT = torch.full((1, 1, 8, 8), 0.2), torch.full((1, 1, 8, 8), 0.8)


def _comparison(image):
    return SimpleNamespace(inputs=image, gradcam=torch.rand(1, 1, 8, 8), integrated_gradients=torch.randn(1, 1, 8, 8),
                           invariance_map=torch.rand(1, 1, 8, 8), samples=image.unsqueeze(1).repeat(1, 2, 1, 1, 1),
                           concept_scores=None, concept_names=[], targets=torch.tensor([0]),
                           predictions=torch.tensor([0]), layer="fc", gradcam_layer="conv")


FIGURES = {
    "plot_invariance_samples": lambda x: plot_invariance_samples(x, x, x.unsqueeze(1)),
    "plot_invariance_maps": lambda x: plot_invariance_maps(x, {"fc": torch.rand(1, 1, 8, 8)}),
    "plot_concept_edits": lambda x: plot_concept_edits(x, x, {"digit": x}),
    "plot_image_grid": lambda x: plot_image_grid({"a": x, "b": x}),
    "plot_comparison": lambda x: plot_comparison(_comparison(x)),
}


@pytest.mark.parametrize("draw", FIGURES.values(), ids=list(FIGURES))
def test_grayscale_images_are_drawn_in_gray_on_a_fixed_scale(draw):
    """A dark and a bright one-channel image must look different: matplotlib's default would
    stretch each to its own min/max (both constant images alike) and colour them with viridis."""
    for image in (DARK, BRIGHT):
        fig, _ = draw(image)
        # the images: those drawn with the image's own values (maps have other values and colormaps)
        drawn = [im for ax in fig.axes for im in ax.get_images()
                 if float(im.get_array().mean()) == pytest.approx(float(image.mean()))]
        assert drawn, "the image itself is drawn"
        for im in drawn:
            assert im.get_clim() == (0.0, 1.0)
            assert im.get_cmap().name == "gray"
        plt.close(fig)


def test_the_comparison_draws_the_input_under_grad_cam_and_keeps_the_maps_colormaps():
    fig, axes = plot_comparison(_comparison(DARK))
    base, overlay = axes[1].get_images()
    # the input is drawn whole and the map half see-through: at 0.35 under 0.75 the input made 9% of a pixel
    assert base.get_clim() == (0.0, 1.0) and base.get_cmap().name == "gray" and base.get_alpha() is None
    assert overlay.get_cmap().name == "jet" and overlay.get_alpha() == 0.5
    assert axes[2].get_images()[0].get_cmap().name == "viridis"  # Integrated Gradients: a map, not an image
    assert axes[3].get_images()[0].get_cmap().name == "magma"
    colour = torch.rand(1, 3, 8, 8)
    fig, axes = plot_comparison(_comparison(colour))
    assert axes[0].get_images()[0].get_clim() == (0.0, 1.0)


def test_class_names_with_dollar_signs_are_drawn_as_written():
    """Class names come from photo folder names: between two ``$`` matplotlib typeset them as
    mathematics (``$5 to $10`` lost its dollars) or failed the drawing after the whole run (``a$x^$``)."""
    import io

    from matplotlib import cbook

    names = ["$5 to $10", "a$x^$"]
    for target in (0, 1):
        comparison = _comparison(DARK)
        comparison.targets = comparison.predictions = torch.tensor([target])
        fig, axes = plot_comparison(comparison, class_names=names)
        fig.savefig(io.BytesIO(), format="png")
        for title in (axes[0].get_title(), axes[1].get_title()):
            assert not cbook.is_math_text(title)
            assert title.replace("\\$", "$").endswith(names[target])
    x = torch.rand(1, 3, 8, 8)
    one = torch.ones(1, dtype=torch.long)
    views = AdversarialViews(x, x, 0 * one, 0 * one, one, torch.tensor([True]), {"fc": x}, {"fc": one}, {})
    fig, axes = views.plot(class_names=names)
    fig.savefig(io.BytesIO(), format="png")
    assert not any(cbook.is_math_text(ax.get_xlabel()) for ax in axes.flat)


def test_image_figures_need_one_row_of_each_argument_per_input():
    """Rows pair input i with its own samples, maps and label: other counts drew the first rows
    without a word (more inputs than samples) or failed with an IndexError (fewer)."""
    x = torch.rand(3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`originals` holds 3 images for the 2 rows of `samples`"):
        plot_invariance_samples(x, x[:2], x[:2].unsqueeze(1))
    with pytest.raises(ValueError, match=r"`reconstructions` holds 2 images for the 3 rows of `samples`"):
        plot_invariance_samples(x, x[:2], x.unsqueeze(1))
    # the samples axis forgotten: a permute error from deep inside before
    with pytest.raises(ValueError, match=r"`samples` must be \(N, S, C, H, W\).*got shape \(3, 3, 8, 8\).*unsqueeze\(1\)"):
        plot_invariance_samples(x, x, x)
    with pytest.raises(ValueError, match=r"`n_strip` must be >= 0 \(0 shows no samples\), got -1"):  # an IndexError
        plot_comparison(_comparison(x[:1]), n_strip=-1)
    assert len(plot_comparison(_comparison(x[:1]), n_strip=0)[0].axes) == 4  # input, Grad-CAM, IG, map
    for maps in (x[:2], torch.rand(4, 3, 8, 8)):
        with pytest.raises(ValueError, match=rf"`maps\['fc'\]` holds {maps.shape[0]} maps for 3 `originals`"):
            plot_invariance_maps(x, {"fc": maps})
    with pytest.raises(ValueError, match="`row_labels` has 2 labels for 3 rows"):
        plot_image_grid({"a": x}, row_labels=["one", "two"])
    # one (C, H, W) image was read as C rows of (H, W) images, refused as "an image ... got shape (8, 8)"
    with pytest.raises(ValueError, match=r"`columns\['a'\]` must be images \(N, C, H, W\), got shape \(3, 8, 8\); "
                                         r"for one image pass image.unsqueeze\(0\)"):
        plot_image_grid({"a": x[0]})
    with pytest.raises(ValueError, match="`columns` is empty"):  # "got []"
        plot_image_grid({})
    with pytest.raises(TypeError, match=r"`columns` must be a dict \{column title: \(N, C, H, W\) images\}, got Tensor"):
        plot_image_grid(x)  # "Boolean value of Tensor ... is ambiguous"
    # scores as an array or a list of numbers are drawn as the tensor would be ("no attribute 'detach'")
    scores = torch.tensor([[0.2, 0.5], [0.4, 0.7]])
    drawn = [[bar.get_height() for bar in plot_concept_bars(value, ["a", "b"])[1].patches]
             for value in (scores, scores.numpy(), scores.tolist())]
    assert drawn[1] == pytest.approx(drawn[0]) and drawn[2] == pytest.approx(drawn[0])
    with pytest.raises(TypeError, match="`scores` must be a \\(K,\\) or \\(N, K\\) tensor of concept scores"):
        plot_concept_bars([[0.2], [0.4, 0.7]], ["a", "b"])  # ragged
    with pytest.raises(TypeError, match=r"`columns\['a'\]` must be a tensor of images \(N, C, H, W\), got ndarray; "
                                        "convert it with torch.as_tensor"):
        plot_image_grid({"a": x.numpy()})
    fig, axes = plot_image_grid({"a": x}, row_labels=["one", "two", "three"])
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["one", "two", "three"]


def test_plot_invariance_maps_refuses_tuples_and_channels_last_maps():
    """A tuple (attribute of tuple inputs) failed with an AttributeError; a map already permuted
    for Captum's visualize_image_attr, (N, H, W, C), was averaged over its rows into a strip."""
    x = torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"`maps\['fc'\]` is a tuple .*\[image_input\]"):
        plot_invariance_maps(x, {"fc": (maps, torch.zeros(2, 1))})
    with pytest.raises(ValueError, match=r"channels last; .*m.permute\(0, 3, 1, 2\)"):
        plot_invariance_maps(x, {"fc": maps.permute(0, 2, 3, 1)})
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\) maps, got \(2, 8, 8\)"):
        plot_invariance_maps(x, {"fc": maps[:, 0]})
    fig, axes = plot_invariance_maps(x, {"fc": maps, "cam": torch.rand(2, 1, 4, 4)})  # a coarse Grad-CAM map too
    assert axes.shape == (2, 3)


def test_plot_invariance_maps_needs_a_map():
    with pytest.raises(ValueError, match="`maps` is empty"):
        plot_invariance_maps(torch.rand(2, 3, 8, 8), {})


def test_plots_of_named_maps_and_edits_refuse_a_bare_tensor_with_the_dict_to_pass():
    """``attribute`` and ``edit`` return tensors; passed as they are, the plots failed with an
    AttributeError ('Tensor' object has no attribute 'items') or an ambiguous-truth RuntimeError."""
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(TypeError, match=r"`maps` must be a dict .* got Tensor; .*\{'my_layer': explainer.attribute\(x\)\}"):
        plot_invariance_maps(x, torch.rand(2, 3, 8, 8))
    with pytest.raises(TypeError, match=r"`edits` must be a dict .* got Tensor; .*\{'my_concept': concepts.edit"):
        plot_concept_edits(x, x, x)


def test_layer_concept_and_group_names_with_dollar_signs_are_drawn_as_written():
    """Layer, concept, group and checkpoint names are data, as class names are: ``a$x^$`` failed
    the drawing with a mathtext error and ``$5 to $10`` lost its dollars. Titles the caller writes
    may still use mathematics."""
    import io

    from matplotlib import cbook

    odd, money = "a$x^$", "$5 to $10"
    x = torch.rand(1, 3, 8, 8)
    comparison = _comparison(x)
    comparison.layer, comparison.gradcam_layer = odd, money
    figures = [
        plot_invariance_maps(x, {odd: torch.rand(1, 3, 8, 8), money: torch.rand(1, 3, 8, 8)})[0],
        plot_by_depth([odd, money], {odd: [0.1, 0.2], money: [0.3, 0.4]})[0],
        plot_concept_bars({odd: {money: 0.5, odd: 0.2}, money: {money: 0.1, odd: 0.3}})[0],
        plot_concept_bars(torch.rand(2), [odd, money])[0],
        plot_concept_edits(x, x, {odd: x, money: x})[0],
        plot_concept_dynamics(ConceptDynamics(odd, [money, odd], [0.5, 0.6], {odd: [0.1, 0.2], money: [0.3, 0.1]}))[0],
        plot_comparison(comparison)[0],
        plot_concept_bars(torch.rand(2), title="$z$ at fc")[0],
    ]
    for fig in figures:
        fig.savefig(io.BytesIO(), format="png")
    texts = [t.get_text() for fig in figures[:-1] for t in fig.findobj(matplotlib.text.Text) if "$" in t.get_text()]
    assert texts and not any(cbook.is_math_text(t) for t in texts)
    shown = " ".join(t.replace("\\$", "$") for t in texts)
    assert odd in shown and money in shown
    assert figures[-1].axes[0].get_title() == "$z$ at fc"  # the caller's title keeps its mathematics


def test_plot_concept_bars_checks_names_shape_and_groups():
    with pytest.raises(ValueError, match="`names` has 2 names for 3 concept scores"):
        plot_concept_bars(torch.rand(4, 3), ["digit", "colour"])
    with pytest.raises(ValueError, match=r"`scores` must be a \(K,\) or \(N, K\) tensor.*got shape \(\)"):
        plot_concept_bars(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"Group 'fc' of `scores` has no value for \['colour'\]"):
        plot_concept_bars({"relu1": {"digit": 0.9, "colour": 0.8}, "fc": {"digit": 0.7}})
    # a later group's extra concept was left out of the figure, silently
    with pytest.raises(ValueError, match=r"Group 'fc' of `scores` has concepts the first group lacks, \['colour'\]"):
        plot_concept_bars({"relu1": {"digit": 0.9}, "fc": {"digit": 0.7, "colour": 0.2}})
    fig, ax = plot_concept_bars(torch.rand(3), ["digit", "colour", "residual"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["digit", "colour", "residual"]


def test_plot_concept_edits_refuses_one_donor_without_its_batch_dimension():
    """A donor given as (C, H, W) was read as C donors ("holds 3 images for 2 `originals`")."""
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`donors` must be \(N, C, H, W\) like `originals`, got shape \(3, 8, 8\); "
                                         r"for one donor pass donor.unsqueeze\(0\)"):
        plot_concept_edits(x, x[0], {"digit": x})


def test_plot_concept_edits_takes_one_donor_for_all_rows_as_edit_does():
    """``LayerConcepts.edit(x, c, donors=x[:1])`` takes one donor; its figure failed with an IndexError."""
    x = torch.rand(3, 3, 8, 8)
    fig, axes = plot_concept_edits(x, x[:1], {"digit": x})
    assert axes.shape == (3, 3)
    for row in axes:  # the one donor in every row
        assert torch.allclose(torch.as_tensor(row[1].get_images()[0].get_array()), x[0].permute(1, 2, 0))
    with pytest.raises(ValueError, match=r"`donors` holds 2 images for 3 `originals`"):
        plot_concept_edits(x, x[:2], {"digit": x})
    with pytest.raises(ValueError, match=r"`edits\['digit'\]` holds 1 images for 3 `originals`"):
        plot_concept_edits(x, x, {"digit": x[:1]})


def _logits_explainer() -> LayerInvariance:
    """An explainer of a small CNN's logits with an INN that saw one batch (not fitted)."""
    torch.manual_seed(0)
    model, ae = SmallCNN(width=4).eval(), ConvAutoencoder((3, 32, 32), latent_dim=8).eval()
    inn = ConditionalINN(8, (10,), n_blocks=2, hidden=16)
    inn(torch.randn(4, 8), torch.randn(4, 10))  # ActNorm initialisation (normally: fit_invariances)
    return LayerInvariance(model, "logits", inn.eval(), ae)


def test_plot_layer_invariances_draws_what_the_explainer_gives():
    explainer = _logits_explainer()
    x = torch.rand(3, 3, 32, 32)
    fig, axes = plot_layer_invariances(explainer, x, n_samples=4, seed=1)
    assert axes.shape == (3, 6) and fig._suptitle.get_text() == "invariance samples at logits"
    drawn = torch.from_numpy(axes[1, 3].images[0].get_array().data.copy()).permute(2, 0, 1)
    assert torch.allclose(drawn, explainer.sample(x, 4, seed=1)[1, 1], atol=1e-6)  # row 1, sample 2
    assert torch.allclose(torch.from_numpy(axes[2, 1].images[0].get_array().data.copy()).permute(2, 0, 1),
                          explainer.reconstruct(x)[2], atol=1e-6)
    with pytest.raises(TypeError, match="`explainer` must be a captum_inn.LayerInvariance.*plot_invariance_samples"):
        plot_layer_invariances(explainer.forward_func, x)


def test_save_figure_returns_the_file_it_wrote(tmp_path):
    """matplotlib adds ``.png`` to a path without a suffix: the path returned did not exist."""
    for given, written in (("plain", "plain.png"), ("vector.svg", "vector.svg"), (tmp_path / "p.png", "p.png")):
        path = save_figure(plot_by_depth(["a", "b"], {"x": [0, 1]})[0], given if not isinstance(given, str) else
                           str(tmp_path / given))
        assert path == str(tmp_path / written) and (tmp_path / written).is_file()
    assert (tmp_path / "vector.svg").read_text().lstrip().startswith("<?xml")
    assert plt.get_fignums() == []
    # "epoch_1.5" has no format suffix (matplotlib refused "Format '5'"); a failed save closes the figure too
    assert save_figure(plot_by_depth(["a"], {"x": [1.0]})[0], tmp_path / "epoch_1.5") == str(tmp_path / "epoch_1.5.png")
    with pytest.raises(FileNotFoundError):
        save_figure(plot_by_depth(["a"], {"x": [1.0]})[0], tmp_path / "missing" / "f.png")
    assert plt.get_fignums() == []
    # a folder was written as a hidden "figures/.png.png", and the path returned did not exist
    (tmp_path / "figures").mkdir()
    for folder in (str(tmp_path / "figures") + os.sep, tmp_path / "figures"):
        with pytest.raises(ValueError, match=r"`path` .*figures.* names a folder; pass a file path in it"):
            save_figure(plot_by_depth(["a"], {"x": [1.0]})[0], folder)
    assert list((tmp_path / "figures").iterdir()) == [] and plt.get_fignums() == []


def test_plots_keep_a_callers_layout_and_draw_into_subfigures():
    """Every plot called tight_layout on the figure it drew into: a caller's constrained layout was switched
    off for the whole figure (with a warning), and a SubFigure (no tight_layout) failed with AttributeError."""
    image = torch.rand(1, 3, 8, 8)
    fig, axes = plt.subplots(1, 2, layout="constrained")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The figure layout has changed to tight"
        plot_concept_bars({"a": 0.5, "b": 0.2}, ax=axes[0])
        plot_by_depth(["conv", "fc"], {"VE": [0.1, 0.8]}, ax=axes[1])
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    left, right = plt.figure().subfigures(1, 2)
    plot_invariance_samples(image, image, image.unsqueeze(1), title="samples", fig=left)
    plot_concept_bars({"a": 0.5, "b": 0.2}, ax=right.subplots())


def test_plot_values_may_be_tensors_with_grad():
    """The grouped bars and plot_by_depth handed such values to matplotlib, which failed calling numpy() on them;
    the flat bars took them."""
    value = torch.tensor(0.5, requires_grad=True) * 1
    _, ax = plot_concept_bars({"relu1": {"digit": value, "colour": value}, "fc": {"digit": value, "colour": value}})
    assert [bar.get_height() for bar in ax.patches] == [0.5] * 4
    _, ax = plot_by_depth(["relu1", "fc"], {"VE": [value, None]})  # None: a gap, as metrics.json's null
    assert ax.lines[0].get_ydata()[0] == 0.5 and math.isnan(ax.lines[0].get_ydata()[1])


def test_nan_pixels_are_refused_not_drawn_white():
    """clamp(0, 1) keeps NaN, which matplotlib draws as white: a diverged decoder's samples looked like white
    images."""
    image = torch.rand(3, 8, 8)
    image[0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN pixels .*torch.nan_to_num"):
        to_numpy_image(image)
    with pytest.raises(ValueError, match=r"NaN pixels"):
        plot_image_grid({"a": image[None]})
    assert plt.get_fignums() == []


def test_a_long_title_is_wrapped_to_a_narrow_figure():
    """A fixed title of about 100 characters ran off both edges of a grid of two columns."""
    title = "what each layer sees in the attack (captions: the model's class, then the judge's for each layer's view)"
    fig, _ = plot_image_grid({"a": torch.rand(2, 3, 8, 8), "b": torch.rand(2, 3, 8, 8)}, title=title)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert fig._suptitle.get_text().replace("\n", " ") == title
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width


def test_concept_dynamics_of_ragged_lists_are_named_before_drawing():
    """A share list shorter than the checkpoints was matplotlib's "x and y must have same first
    dimension"; a short accuracy list drew no accuracy line, and the table mislabelled rows."""
    def dynamics(**changes):
        fields = dict(layer="fc", labels=["0", "100"], accuracy=[0.1, 0.9], encoded={"digit": [0.2, 0.8]},
                      standard_error={"digit": [0.01, 0.02]})
        return ConceptDynamics(**{**fields, **changes})

    for changes, message in (
            (dict(encoded={"digit": [0.2]}), r"`encoded\['digit'\]` holds 1 values for 2 checkpoints"),
            (dict(accuracy=[0.9]), r"`accuracy` holds 1 values for 2 checkpoints.*\(None where unknown\)"),
            (dict(standard_error={"digit": [0.1, 0.1, 0.1]}), r"`standard_error\['digit'\]` holds 3 values"),
            (dict(standard_error={"colour": [0.1, 0.1]}), r"`standard_error` names \['colour'\], which `encoded` lacks"),
            (dict(fit_nll=[1.0]), r"`fit_nll` holds 1 values")):
        for draw in (plot_concept_dynamics, ConceptDynamics.table):
            with pytest.raises(ValueError, match=message):
                draw(dynamics(**changes))
            assert plt.get_fignums() == []
    assert "0.800 ± 0.020" in dynamics().table() and "±" not in dynamics(standard_error={"digit": []}).table()
    plt.close(plot_concept_dynamics(dynamics(standard_error={"digit": []}))[0])


def test_a_refused_input_leaves_no_figure_open():
    """The figure was made before some checks: each refused call left one open, to pile up and show in a
    notebook under the traceback."""
    for call in (lambda: plot_concept_bars(torch.rand(3), ["a"]),
                 lambda: plot_by_depth(["a", "b"], {"v": [1.0]}),
                 lambda: plot_image_grid({"a": torch.rand(1, 2, 5, 9)})):  # two channels: no image
        with pytest.raises((ValueError, TypeError)):
            call()
        assert plt.get_fignums() == []


def test_image_grids_draw_names_literally_take_array_labels_and_plot_half_precision_maps():
    """plot_image_grid typeset "a$x^$" as mathematics (and failed), NumPy row labels were "ambiguous", and a
    bfloat16 comparison's maps failed in NumPy ("unsupported ScalarType BFloat16")."""
    import numpy as np

    fig, axes = plot_image_grid({"a$x^$": torch.rand(2, 3, 4, 4)}, captions={"a$x^$": ["$1", "$2"]},
                                row_labels=np.array(["r$1", "r$2"]), title="t$")
    fig.canvas.draw()
    assert axes[0, 0].get_title() == r"a\$x^\$" and axes[1, 0].get_ylabel() == r"r\$2"
    half = _comparison(torch.rand(1, 3, 8, 8))
    for key in ("gradcam", "integrated_gradients", "invariance_map"):
        setattr(half, key, getattr(half, key).to(torch.bfloat16))
    plot_comparison(half)[0].canvas.draw()


def test_a_nan_pixel_leaves_the_colour_scales_of_the_other_pixels():
    """One NaN gave a NaN scale (``max`` passes NaN, and NaN is true, so ``or 1.0`` never applied):
    the whole row of maps, and the IG panel, drawn in one colour."""
    x = torch.rand(2, 3, 8, 8)
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8) * 3
    a[0, :, 0, 0] = float("nan")
    _, axes = plot_invariance_maps(x, {"a": a, "b": b})
    assert axes[0, 1].get_images()[0].get_clim() == (0.0, pytest.approx(float(b[0].mean(0).max())))
    comparison = _comparison(x[:1])
    comparison.integrated_gradients[0, :, 0, 0] = float("nan")
    _, axes = plot_comparison(comparison)
    ig = comparison.integrated_gradients[0].abs().sum(0)
    assert axes[2].get_images()[0].get_clim() == (0.0, pytest.approx(float(ig[ig.isfinite()].quantile(0.99))))
    plt.close("all")


def test_integer_pixels_and_other_channel_counts_are_refused_by_name():
    """uint8 pixels were clamped to [0, 1] (an image all white but its zeros); two channels failed in
    matplotlib with "Invalid shape (7, 5, 2) for image data"."""
    u = (torch.rand(1, 3, 8, 8) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"got torch.uint8 pixels.*images.float\(\) / 255"):
        plot_invariance_samples(u, u / 255.0, (u / 255.0).unsqueeze(1))
    with pytest.raises(ValueError, match=r"1, 3 or 4 channels, got shape \(2, 7, 5\)"):
        plot_invariance_samples(torch.rand(1, 2, 7, 5), torch.rand(1, 2, 7, 5), torch.rand(1, 3, 2, 7, 5))
    assert not plt.get_fignums()


def test_to_numpy_image_clamps_to_the_unit_range_and_keeps_an_alpha_channel():
    """The documented contract: values outside [0, 1] are clamped (a decoder's overshoot drawn black
    or white), and RGBA images are drawn with their fourth channel."""
    image = torch.tensor([[-0.5, 0.25], [0.75, 1.5]]).expand(4, 2, 2)
    drawn = to_numpy_image(image)
    assert drawn.shape == (2, 2, 4)
    assert torch.equal(torch.from_numpy(drawn[..., 3]), torch.tensor([[0.0, 0.25], [0.75, 1.0]]))


def test_image_grids_pair_each_row_with_its_own_input():
    """Row i is input i: its own map, edits, samples, caption and label (constant images, one grey
    level per row, show which input each panel drew)."""
    x = torch.arange(1.0, 4.0).view(3, 1, 1, 1).expand(3, 3, 4, 4) / 4  # rows of 0.25, 0.5, 0.75
    maps = torch.arange(1.0, 4.0).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone()
    maps[:, 1] *= 3  # channels averaged: row i's map is 2 * (i + 1)

    def level(ax, k=0):
        return float(ax.get_images()[k].get_array().mean())

    _, axes = plot_invariance_maps(x, {"fc": maps})
    assert [level(ax) for ax in axes[:, 0]] == pytest.approx([0.25, 0.5, 0.75])
    assert [level(ax) for ax in axes[:, 1]] == pytest.approx([2.0, 4.0, 6.0])
    assert axes[0, 1].get_images()[0].get_cmap().name == "magma"  # as plot_comparison's invariance map
    _, axes = plot_concept_edits(x, x[:1], {"digit": x.flip(0)})
    assert [level(ax) for ax in axes[:, 2]] == pytest.approx([0.75, 0.5, 0.25])
    fig, axes = plot_invariance_samples(x, x, torch.stack([x, x.flip(0)], 1))
    assert [ax.get_title() for ax in axes[0]] == ["input", "recon.", "sample 1", "sample 2"]
    assert [level(ax) for ax in axes[:, 3]] == pytest.approx([0.75, 0.5, 0.25])
    _, axes = plot_image_grid({"a": x, "b": x}, row_labels=["r1", "r2", "r3"], captions={"b": ["c1", "c2", "c3"]})
    assert [ax.get_xlabel() for ax in axes[:, 1]] == ["c1", "c2", "c3"]
    assert [ax.get_ylabel() for ax in axes[:, 1]] == ["", "", ""]  # labels left of each row only


def test_plot_comparison_draws_the_chosen_input_and_the_absolute_gradients():
    """``index`` picks the row drawn in every panel; IG is the absolute value summed over channels
    (opposite signs in two channels cancelled in a plain sum); the input's title names the prediction."""
    x = torch.arange(1.0, 3.0).view(2, 1, 1, 1).expand(2, 3, 8, 8) / 4  # inputs of 0.25 and 0.5
    comparison = _comparison(x)
    comparison.samples = x.unsqueeze(1).repeat(1, 2, 1, 1, 1)
    comparison.gradcam, comparison.invariance_map = torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8)
    comparison.integrated_gradients = torch.stack([torch.ones(2, 8, 8), -torch.ones(2, 8, 8)], 1)
    comparison.integrated_gradients[:, 1, 0, 0] = -3.0
    comparison.targets, comparison.predictions = torch.tensor([0, 1]), torch.tensor([1, 0])
    comparison.concept_scores, comparison.concept_names = torch.rand(2, 2), ["a", "b"]
    comparison.concept_delta = torch.tensor([0.5, 0.25])
    _, axes = plot_comparison(comparison, index=1, class_names=["cat", "dog"])
    assert float(axes[0].get_images()[0].get_array().mean()) == pytest.approx(0.5)
    assert float(axes[4].get_images()[0].get_array().mean()) == pytest.approx(0.5)  # its own samples
    assert axes[0].get_title() == "input\npred. cat" and axes[1].get_title().endswith("dog")
    ig = axes[2].get_images()[0].get_array()
    assert float(ig[0, 0]) == 4.0 and float(ig[1, 1]) == 2.0
    assert "completeness gap 2.5e-01" in axes[-1].get_title()
    with pytest.raises(ValueError, match="`class_names` has 1 names, but class 1 is shown"):  # not an IndexError
        plot_comparison(comparison, index=1, class_names=["cat"])


def test_plot_concept_bars_draws_means_with_their_spread_and_standard_errors():
    """Documented: a batch is drawn as its mean ± standard deviation, dicts with a ``standard_error``
    (``encoded_summary``) get it as error bars, and grouped bars sit at the first group's concepts."""
    def heights_and_errors(ax):
        bars = [c for c in ax.containers if hasattr(c, "patches")]
        errors = [[(seg[1][1] - seg[0][1]) / 2 for seg in c.errorbar.lines[2][0].get_segments()]
                  for c in bars if c.errorbar is not None]
        return [[p.get_height() for p in c.patches] for c in bars], errors

    scores = torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 0.0]])
    heights, errors = heights_and_errors(plot_concept_bars(scores, ["a", "b"])[1])
    assert heights == [pytest.approx([1.0, 1.0])] and errors == [pytest.approx(scores.std(0).tolist())]
    shares = EncodedShares({"a": 0.8, "b": 0.1}, {"a": 0.02, "b": 0.03}, 50)
    heights, errors = heights_and_errors(plot_concept_bars(shares)[1])
    assert heights == [pytest.approx([0.8, 0.1])] and errors == [pytest.approx([0.02, 0.03])]
    other = EncodedShares({"b": 0.4, "a": 0.6}, {"b": 0.05, "a": 0.01}, 50)  # its concepts in another order
    heights, errors = heights_and_errors(plot_concept_bars({"relu1": shares, "fc": other})[1])
    assert heights == [pytest.approx([0.8, 0.1]), pytest.approx([0.6, 0.4])]
    assert errors == [pytest.approx([0.02, 0.03]), pytest.approx([0.01, 0.05])]


def test_plot_by_depth_takes_values_by_layer_name_in_the_order_of_layers():
    _, ax = plot_by_depth(["conv", "fc"], {"VE": {"fc": 0.8, "conv": 0.1}})
    assert list(ax.lines[0].get_ydata()) == [0.1, 0.8]


def test_plot_concept_dynamics_draws_bands_of_two_standard_errors_and_the_accuracy():
    """The docstring's band is ± 2 standard errors (shares closer than that are not told apart); the
    residual is drawn only when listed; one concept may be named as a string."""
    dynamics = ConceptDynamics("fc", ["0", "100"], [0.1, 0.9], {"digit": [0.2, 0.8], "residual": [-2.0, -1.0]},
                               standard_error={"digit": [0.01, 0.02]})
    _, ax = plot_concept_dynamics(dynamics)
    assert [line.get_label() for line in ax.lines] == ["digit", "test accuracy"]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert (band.min(), band.max()) == (pytest.approx(0.18), pytest.approx(0.84))
    _, ax = plot_concept_dynamics(dynamics, concepts="residual")
    assert [line.get_label() for line in ax.lines] == ["residual", "test accuracy"]


def test_save_figure_writes_at_the_resolution_asked(tmp_path):
    fig, _ = plot_by_depth(["a"], {"x": [1.0]})
    width = fig.get_figwidth()
    with Image.open(save_figure(fig, tmp_path / "f.png", dpi=20)) as png:
        assert png.width == round(width * 20)


def test_plot_layer_invariances_draws_samples_at_the_temperature_given():
    """The temperature scales ``v`` as in ``LayerInvariance.sample``; the figure's samples are those."""
    explainer = _logits_explainer()
    x = torch.rand(2, 3, 32, 32)
    _, axes = plot_layer_invariances(explainer, x, n_samples=2, temperature=0.25, seed=1)
    drawn = torch.from_numpy(axes[1, 2].images[0].get_array().data.copy()).permute(2, 0, 1)
    cold, warm = explainer.sample(x, 2, 0.25, seed=1)[1, 0], explainer.sample(x, 2, 1.0, seed=1)[1, 0]
    assert not torch.allclose(cold, warm, atol=1e-4)  # the temperature shows in the picture
    assert torch.allclose(drawn, cold, atol=1e-6)
