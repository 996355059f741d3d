"""Root pytest configuration: shared by the test suite and the docstring examples."""

import sys

import pytest
import torch

# Every test and docstring example runs torch on one thread: beside other work (another pytest
# worker, a notebook) two threads run several times slower. The test files say so too, but a
# single file run alone (or a docstring example) would otherwise get torch's default.
torch.set_num_threads(1)

# the `images` and `autoencoder` fixtures of the training tests (tests/ is on the pythonpath)
pytest_plugins = ["helpers_training"]


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the tests (e.g. cuda, cuda:1); tests that need one take the `device` fixture.",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {name} requested but CUDA is not available")
    return dev


@pytest.fixture(autouse=True)
def _doctest_torch(doctest_namespace):
    # Docstring examples use `torch` without importing it.
    doctest_namespace["torch"] = torch


@pytest.fixture(autouse=True)
def _close_figures_after_each_test():
    # a test that draws and keeps its figures (to read them) left them open for the next test on its
    # worker: a test asserting that a refused call opens no figure then failed after it
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
