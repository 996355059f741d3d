"""The first examples a new user copies run as written: README.md's "Use it from Python" and
docs/getting_started.rst's "Twenty lines", with every fit cut to a few steps."""

import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Use it from Python", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def getting_started_example() -> str:
    section = (ROOT / "docs" / "getting_started.rst").read_text().split("Twenty lines", 1)[1]
    body = section.split(".. code-block:: python", 1)[1].splitlines()[1:]
    lines = []
    for line in body:
        if line.strip() and not line.startswith("    "):  # the first unindented line ends the block
            break
        lines.append(line[4:])
    return "\n".join(lines)


def shrunk(code: str) -> str:
    """``code`` with its three fits cut to 3 steps each; an error if they are not all found."""
    code, n_steps = re.subn(r"steps=\d+", "steps=3", code)
    code, n_inn = re.subn(r"fit_invariances\(([^)]*)\)", r"fit_invariances(\1, steps=3, progress=False)", code)
    if (n_steps, n_inn) != (2, 1):
        raise AssertionError(f"the example's fits changed ({n_steps} steps=, {n_inn} fit_invariances): update shrunk()")
    return code


@pytest.mark.parametrize("example", [readme_example, getting_started_example], ids=["README", "getting_started"])
def test_example_runs_and_gives_the_shapes_it_states(example):
    torch.set_num_threads(1)
    namespace = {}
    code = shrunk(example())
    assert "fit_classifier" in code and "LayerInvariance" in code  # the right block was found
    try:
        exec(compile(code, example.__name__, "exec"), namespace)
    finally:
        plt.close("all")  # the README example draws with pyplot
    assert namespace["invariance_map"].shape == (8, 3, 32, 32)  # the shapes the comments state
    assert namespace["samples"].shape == (8, 6, 3, 32, 32)
    assert namespace["ig"].shape == (8, 3, 32, 32)
    assert torch.isfinite(namespace["invariance_map"]).all()
    assert namespace["axes"].shape == (4, 10)  # each input, its reconstruction, 8 samples


def test_shrinking_refuses_an_example_it_does_not_recognise():
    with pytest.raises(AssertionError, match="update shrunk"):
        shrunk("model = fit_classifier(SmallCNN(), train, steps=3000)")
