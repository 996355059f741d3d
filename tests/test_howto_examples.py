"""docs/howto.rst says every snippet runs against the current API: each section's snippets run here,
in order, in one namespace holding what the page assumes (``model``, ``images``, ``autoencoder``,
...), with every fit cut to a few steps, and the values their comments state are checked."""

import re
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

import captum_inn.training as training
from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.datasets import ColorDigits
from captum_inn.models import SmallCNN

HOWTO = Path(__file__).resolve().parents[1] / "docs" / "howto.rst"
FIT_STEPS = 3

# Snippets that are not run, by a line they hold, and why; every other snippet runs in a test below.
NOT_RUN = {
    "vit = torchvision.models.vit_b_16(": "a ViT-B/16 at 128x128 with its own autoencoder: too heavy for the "
                                          "test suite (token layers are tested in test_embedders.py and test_capture.py)",
}
# How many snippets each section holds: a new one fails here until a test runs it (or NOT_RUN lists it).
SECTIONS = {"howto-layer": 6, "howto-autoencoder": 2, "howto-layers": 2, "howto-concepts": 1, "howto-resume": 2,
            "howto-distributed": 2}


def howto_snippets() -> Dict[Tuple[str, int], str]:
    """``{(section label, index within the section): code}`` of every python code block."""
    snippets: Dict[Tuple[str, int], str] = {}
    lines = HOWTO.read_text().splitlines()
    label, index = None, 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(".. _howto-") and stripped.endswith(":"):
            label, index = stripped[4:-1], 0
        if stripped != ".. code-block:: python":
            continue
        indent = len(line) - len(line.lstrip())
        body: List[str] = []
        for following in lines[i + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break  # the first line not indented deeper than the directive ends the block
            body.append(following)
        snippets[(label, index)] = textwrap.dedent("\n".join(body)).strip("\n")
        index += 1
    return snippets


def skipped(code: str) -> bool:
    return any(line in code for line in NOT_RUN)


SNIPPETS = howto_snippets()


def run_section(label: str, namespace: dict) -> dict:
    """Run the section's snippets in order in ``namespace`` (skipping those in NOT_RUN)."""
    keys = sorted(k for k in SNIPPETS if k[0] == label)
    assert keys, f"no snippets found under .. _{label}: in {HOWTO.name}"
    try:
        for key in keys:
            if not skipped(SNIPPETS[key]):
                exec(compile(SNIPPETS[key], f"{HOWTO.name}[{label}#{key[1]}]", "exec"), namespace)
    finally:
        plt.close("all")
    return namespace


@pytest.fixture(autouse=True)
def short_fits(monkeypatch, tmp_path):
    """Every fit the snippets import from captum_inn.training runs FIT_STEPS steps, quietly, in a
    fresh working directory (the snippets write ``runs/...`` and ``*.safetensors``)."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    for name in ("fit_invariances", "fit_concepts", "fit_autoencoder"):
        fit = getattr(training, name)

        def short(*args, _fit=fit, **kwargs):
            return _fit(*args, **{**kwargs, "steps": FIT_STEPS, "progress": False})

        monkeypatch.setattr(training, name, short)


@pytest.fixture(scope="module")
def digits():
    data = ColorDigits("train", seed=0)
    keep = torch.arange(0, len(data), len(data) // 96)[:96]  # every digit, a few of each
    return data.images[keep], data.digits[keep]


def page_namespace(digits) -> dict:
    """What the page assumes: a trained CNN of the demo's kind, its images and the default
    autoencoder (64-d code); ``x`` a few images to explain."""
    images, labels = digits
    torch.manual_seed(0)
    model = SmallCNN(width=32).eval()
    autoencoder = ConvAutoencoder((3, 32, 32), latent_dim=64, width=8).eval()
    return {"model": model, "images": images, "labels": labels, "autoencoder": autoencoder, "x": images[:4]}


def test_every_snippet_is_run_or_skipped_with_a_reason():
    counts = {label: sum(1 for key in SNIPPETS if key[0] == label) for label, _ in SNIPPETS}
    assert counts == SECTIONS, "howto.rst's snippets changed: run the new ones in a test here (or list them in NOT_RUN)"
    assert all(sum(line in code for code in SNIPPETS.values()) == 1 for line in NOT_RUN)
    # every code block is one this file reads (no `.. code::`, `.. sourcecode::` or other languages)
    directives = [line.strip() for line in HOWTO.read_text().splitlines()
                  if line.strip().startswith((".. code", ".. sourcecode"))]
    assert directives == [".. code-block:: python"] * len(SNIPPETS), sorted(set(directives))
    literal_code = re.search(r"::\n\n( +)(import |from \w+ import |\w+ = )", HOWTO.read_text())
    assert literal_code is None, "a literal block of code: make it a `.. code-block:: python` so it is run"


def test_choose_a_layer(digits):
    ns = page_namespace(digits)
    # the selector snippet's model: a layer "heads" whose output is a dict
    base = ns["model"]

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits, self.box = nn.Linear(128, 10), nn.Linear(128, 4)

        def forward(self, h):
            return {"logits": self.logits(h), "box": self.box(h)}

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*list(base.children())[:-1])
            self.heads = Heads()

        def forward(self, x):
            return self.heads(self.body(x))["logits"]

    keys = sorted(k for k in SNIPPETS if k[0] == "howto-layer")
    # the ViT one is not run (NOT_RUN)
    first, used_twice, on_input, more_arguments, by_selector, vit = (SNIPPETS[k] for k in keys)
    assert skipped(vit) and not any(skipped(code) for code in (first, used_twice, on_input, more_arguments, by_selector))
    exec(compile(first, "howto-layer#0", "exec"), ns)
    assert ns["shapes"] == {"layer2": (4, 128, 8, 8), "layer3.1": (4, 256, 4, 4), "layer4": (4, 512, 2, 2),
                            "fc": (4, 10)}  # as its comment states
    assert torch.equal(ns["z"], ns["capture"](ns["model"], "layer3.1", ns["x"]))

    exec(compile(used_twice, "howto-layer#1", "exec"), ns)  # on the first snippet's ResNet
    # as its comments state: LayerHooks keeps the last of two calls (the block's output), and with
    # stop_early=True the first, which the fits read
    assert ns["hooks"].calls == {"layer3.1.relu": 1}
    assert torch.equal(ns["last"], ns["capture"](ns["model"], "layer3.1", ns["x"]))
    assert not torch.equal(ns["first"], ns["last"])
    with ns["LayerHooks"](ns["model"], "layer3.1.relu") as hooks:
        ns["model"](ns["x"])
    assert hooks.calls == {"layer3.1.relu": 2}

    ns.update(page_namespace(digits))  # the ResNet was the first snippet's own model
    exec(compile(on_input, "howto-layer#2", "exec"), ns)
    assert ns["inn"].fit_info["attribute_to_layer_input"] is True
    assert ns["explainer"].attribute_to_layer_input is True

    class Scaled(SmallCNN):  # a model with an argument besides the images
        def forward(self, images, scale):
            return super().forward(images * scale)

    torch.manual_seed(0)
    images = ns["images"]  # a scale per image, rows split with the images (the fit's and x's own)
    scales = 0.8 + 0.2 * torch.rand(len(images), 1, 1, 1, generator=torch.Generator().manual_seed(0))
    ns.update(model=Scaled(width=32).eval(), scale_images=scales, scale_x=scales[:len(ns["x"])])
    exec(compile(more_arguments, "howto-layer#3", "exec"), ns)
    assert ns["result"].gradcam.shape == (4, 1, 32, 32) and ns["result"].layer == "fc"
    assert ns["samples"].shape == (4, 8, 3, 32, 32) and 0 <= ns["agreement"] <= 1

    ns["model"] = Detector().eval()
    exec(compile(by_selector, "howto-layer#4", "exec"), ns)
    assert ns["inn"].cond_shape == (4,)  # the "box" head
    assert ns["explainer"].selector == "box"  # as its comment states: the recorded selector
    assert ns["explainer"].attribute(ns["x"][:2], n_samples=2).shape == (2, 3, 32, 32)


def test_bring_your_own_autoencoder(digits):
    ns = run_section("howto-autoencoder", page_namespace(digits))
    assert ns["inn"].dim == ns["d"] == 32
    assert 0.0 <= ns["prediction_agreement"](ns["model"], ns["x"], ns["recon"].unsqueeze(1)) <= 1.0
    assert ns["recon"].shape == ns["x"].shape


def test_fit_several_layers(digits):
    ns = run_section("howto-layers", page_namespace(digits))
    assert set(ns["inns"]) == {"relu1", "relu3", "fc", "logits"}
    assert ns["inns"]["relu3"].cond_shape == (64, 8, 8)  # as its comment states
    assert ns["inns"]["logits"].fit_info["layer"] == "logits"
    assert set(ns["small"]) == {"relu3", "logits"} and ns["wide"].fit_info["layer"] == "logits"


def test_measure_and_edit_concepts(digits):
    ns = page_namespace(digits)
    ns["inn"] = training.fit_invariances(ns["model"], "fc", ns["autoencoder"], ns["images"])
    run_section("howto-concepts", ns)
    # the snippet's own tensors
    assert ns["images"].shape[1:] == (3, 32, 32) and ns["labels"].shape == ns["images"].shape[:1]
    n = len(ns["x"])
    assert ns["e"].fit_info["factor_sizes"] == {"digit": 8, "brightness": 2, "residual": 54}
    assert {k: tuple(v.shape) for k, v in ns["parts"].items()} == {"digit": (n, 8), "brightness": (n, 2),
                                                                  "residual": (n, 54)}
    assert ns["swapped"].shape == ns["x"].shape
    assert ns["scores"].shape == (n, 3) and ns["delta"].shape == (n,)
    # the completeness reference the page spells out
    e, concepts, x = ns["e"], ns["concepts"], ns["x"]
    with torch.no_grad():
        change = (concepts.output_from_factors(x)[:, 3]
                  - concepts.output_from_factors(x, torch.zeros(len(x), e.dim))[:, 3])
    assert torch.allclose(ns["scores"].sum(1) - change, ns["delta"], atol=1e-4)


def test_resume_a_fit(digits):
    ns = page_namespace(digits)
    ns["config"] = training.InvarianceConfig(n_blocks=2, hidden=32)
    run_section("howto-resume", ns)
    runs = Path("runs")
    assert {p.name for p in (runs / "inns").iterdir()} >= {"features.safetensors", "invariance_relu3.safetensors",
                                                           "invariance_logits.safetensors"}
    assert ns["inn"].fit_info["layer"] == "logits" and ns["explainer"].layer_name == "logits"


def test_run_distributed_in_one_process(digits, capsys):
    ns = page_namespace(digits)
    run_section("howto-distributed", ns)  # the first snippet writes both files the script loads
    assert Path("runs/cnn.safetensors").is_file() and Path("runs/ae.safetensors").is_file()
    assert set(ns["inns"]) == {"relu3", "logits"}
    assert "relu3" in capsys.readouterr().out  # rank 0 prints the final NLLs
