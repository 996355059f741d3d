"""Small reference models that the demo, the tests and the tutorials train from scratch."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN", "ShapeCNN"]


class SmallCNN(nn.Module):
    """A five-layer CNN for 32×32 images with named layers to hook.

    ``conv1`` (stride 2) → ``relu1`` → [``norm1``] → ``conv2`` (stride 2) → ``relu2`` → ``conv3`` →
    ``relu3`` → ``flatten`` → ``fc`` → ``relu4`` → ``logits``. The ReLUs are in-place (as in
    torchvision), which :mod:`captum_inn.capture` handles by cloning.

    With ``instance_norm=True``, ``norm1`` (:class:`torch.nn.InstanceNorm2d`, learned scale and
    shift) standardises each image's first-layer channels on their own, so the image's overall
    colours reach the later layers only through the contrasts they make. Trained on ColorDigits,
    such a CNN's ``fc`` lets the colours go as it learns the digit, as the paper's classifiers did
    (on every seed tried when also trained with weight decay, as the demo's is); without it ``fc``
    keeps them (docs/pitfalls.rst has the scores). The demo analyses this variant. ``norm1`` comes
    after ``relu1`` so that ``relu1`` stays the raw first-layer features: standardised, its flat
    channels magnified small pixel perturbations (an FGSM attack showed in ``relu1``'s view as the
    attack's digit more often), and a norm after ``conv2`` left the colours in ``fc``.

    Args:
        in_channels: Image channels.
        num_classes: Number of logits.
        width: Channels of ``conv1`` (``conv2``/``conv3`` have twice as many).
        image_size: Side of the square input.
        instance_norm: Standardise each image's first-layer channels (``norm1``, after ``relu1``).

    Examples::

        >>> SmallCNN()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, image_size: int = 32,
                 instance_norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 4, stride=2, padding=1)
        # registered only when used, so the plain CNN's layer names (and checkpoints) stay as they were
        self.norm1 = nn.InstanceNorm2d(width, affine=True) if instance_norm else None
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
        if self.norm1 is not None:
            x = self.norm1(x)
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        x = self.relu4(self.fc(self.flatten(x)))
        return self.logits(x)


class ShapeCNN(nn.Module):
    """A :class:`SmallCNN` that reads the shape of a two-colour image, whatever its colours.

    Each pixel becomes its colour distance to the background (the median colour of the border
    frame, :func:`~captum_inn.metrics.border_colour`), divided by the image's largest distance;
    a one-channel :class:`SmallCNN` classifies that map. The demo uses it as the **judge** that
    names the digit of decoded, edited and attacked ColorDigits images: colours cannot sway it,
    so a colour edit is judged by the digit shape it leaves, and pixel perturbations aimed at
    another CNN's colour channels move it less (on the demo's FGSM images it reads 92% of the
    attacked images that fool the CNN correctly; 89%, against 72% for a colour CNN fine-tuned on
    FGSM attacks, when the attack still skipped the pixels with the smallest gradients).

    Args:
        num_classes: Number of logits.
        width: Channels of the first convolution.
        image_size: Side of the square input.
        border: Width of the frame read as background.

    Examples::

        >>> ShapeCNN()(torch.rand(2, 3, 32, 32)).shape   # (N, 3, H, W) -> (N, num_classes)
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 24, image_size: int = 32, border: int = 2) -> None:
        super().__init__()
        self.border = int(border)
        self.cnn = SmallCNN(in_channels=1, num_classes=num_classes, width=width, image_size=image_size)

    def shape_map(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` images to ``(N, 1, H, W)`` distance maps in ``[0, 1]``."""
        from captum_inn.metrics import border_colour

        background = border_colour(x, self.border)[:, :, None, None]
        distance = (x - background).pow(2).sum(1, keepdim=True).add(1e-8).sqrt()  # eps: finite gradient at 0
        return distance / distance.flatten(1).amax(1).clamp_min(1e-3)[:, None, None, None]

    def forward(self, x: Tensor) -> Tensor:
        return self.cnn(self.shape_map(x))
