"""Small reference models that the demo, the tests and the tutorials train from scratch."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """A five-layer CNN for 32×32 images with named layers to hook.

    ``conv1`` (stride 2) → ``relu1`` → ``conv2`` (stride 2) → ``relu2`` → ``conv3`` → ``relu3`` →
    ``flatten`` → ``fc`` → ``relu4`` → ``logits``. The ReLUs are in-place (as in torchvision), which
    :mod:`captum_inn.capture` handles by cloning.

    Args:
        in_channels: Image channels.
        num_classes: Number of logits.
        width: Channels of ``conv1`` (``conv2``/``conv3`` have twice as many).
        image_size: Side of the square input.

    Examples::

        >>> SmallCNN()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, image_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 4, stride=2, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.relu3 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, 128)
        self.relu4 = nn.ReLU(inplace=True)
        self.logits = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        x = self.relu4(self.fc(self.flatten(x)))
        return self.logits(x)
