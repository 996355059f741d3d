"""Shared by the training tests: a CNN that counts the images it sees, tiny INN settings, data that must not
be read (`Unread`), and the `images` and `autoencoder` fixtures (registered in the root conftest.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_inn.autoencoders import ConvAutoencoder
from captum_inn.inn import AffineCoupling, ConditionalINN
from captum_inn.models import SmallCNN

TINY = dict(n_blocks=2, hidden=16, embed_dim=8, conv_width=8, conv_max_width=16, batch_size=16)


class Unread(torch.utils.data.Dataset):
    """Images that must not be read: the call is to be refused before its data pass."""

    def __init__(self, n: int = 16):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        raise AssertionError("the data was read before the call was refused")


def split_regression(device="cpu", seed=0, width=64):
    """A small net and its loss in ``train_loop``'s split form: ``batch_fn(generator)`` draws rows on
    the CPU and moves them to ``device``, ``loss_of(inputs, targets)`` only computes."""
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).to(device)

    def batch_fn(generator):
        rows = torch.randint(512, (64,), generator=generator)
        return x[rows].to(device), x[rows].sum(1).to(device)

    def loss_of(inputs, targets):
        return (net(inputs).squeeze(1) - targets).pow(2).mean()

    return net, batch_fn, loss_of


def randomise_couplings(flow):
    """Give every coupling's last subnet layer random weights (fresh couplings are the identity)."""
    for m in flow.modules():
        if isinstance(m, AffineCoupling):
            m.subnet[-1].reset_parameters()
    return flow


def random_conditional_inn(cond_shape, dim=6):
    """A tiny ConditionalINN with random couplings and ActNorm initialised."""
    inn = ConditionalINN(dim, cond_shape, n_blocks=2, hidden=16, embed_dim=8, conv_width=8, conv_max_width=16)
    randomise_couplings(inn)
    with torch.no_grad():
        inn(torch.randn(16, dim), torch.randn(16, *cond_shape))  # ActNorm initialisation
    return inn.eval()


class CountingCNN(SmallCNN):
    def __init__(self):
        super().__init__(width=4)
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        return super().forward(x)


@pytest.fixture(scope="module")
def images():
    return torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def autoencoder():
    torch.manual_seed(0)
    return ConvAutoencoder((3, 32, 32), latent_dim=6, width=4).eval()


class LabelFirst(nn.Module):
    """``net`` behind a label it ignores: the image is the second input (``image_input=1``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, label, image):
        return self.net(image)
