"""PyTorch reference models: LeNet-5 (TensorState tutorial) and a small MobileNetV2.

Every layer is its own module so that forward hooks, and the names that survive
ONNX export (``/conv1/Conv``, ``/features/features.1/conv/conv.0/conv.0.0/Conv`` ...),
can address single layers.
"""

from __future__ import annotations

import torch
from torch import nn

from models import (
    MOBILENET_V2_SMALL_BLOCKS,
    MOBILENET_V2_SMALL_LAST,
    MOBILENET_V2_SMALL_STEM,
)

__all__ = [
    "ConvBNReLU6",
    "InvertedResidual",
    "LeNet5",
    "MobileNetV2Small",
    "lenet5",
    "mobilenet_v2_small",
]


class LeNet5(nn.Module):
    """LeNet-5 as in the TensorState tutorial, for 1x28x28 inputs and 10 classes.

    Each convolution is followed by ELU and BatchNorm (in that order, as in the
    tutorial); the first two are max-pooled. The conv outputs are 24x24, 8x8 and
    1x1, so ``conv3`` flattens to 100 features for the ``dense`` classifier.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.elu1 = nn.ELU()
        self.bn1 = nn.BatchNorm2d(20)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.elu2 = nn.ELU()
        self.bn2 = nn.BatchNorm2d(50)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(50, 100, kernel_size=4)
        self.elu3 = nn.ELU()
        self.bn3 = nn.BatchNorm2d(100)
        self.dense = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N, 1, 28, 28]`` images to ``[N, num_classes]`` logits."""
        x = self.pool1(self.bn1(self.elu1(self.conv1(x))))
        x = self.pool2(self.bn2(self.elu2(self.conv2(x))))
        x = self.bn3(self.elu3(self.conv3(x)))
        return self.dense(torch.flatten(x, 1))


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6, the basic MobileNetV2 unit."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_ch,
                out_ch,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project.

    The expansion is skipped when ``expand_ratio == 1``. The input is added to the
    output when the block keeps both resolution and width (``stride == 1`` and
    ``in_ch == out_ch``).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block, adding the skip connection where shapes allow it."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style network (width ~0.5, 7 inverted residual blocks).

    The layout comes from :data:`models.MOBILENET_V2_SMALL_BLOCKS`.

    ``features[0]`` is the stride-2 stem, ``features[1..7]`` the blocks (three of
    which have skip connections) and ``features[8]`` the final 1x1 ConvBNReLU6;
    global average pooling feeds the linear ``classifier``. Sized for 3x96x96
    inputs, which reach 6x6 before pooling.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, MOBILENET_V2_SMALL_STEM, stride=2)]
        in_ch = MOBILENET_V2_SMALL_STEM
        for expand, out_ch, stride in MOBILENET_V2_SMALL_BLOCKS:
            layers.append(InvertedResidual(in_ch, out_ch, stride, expand))
            in_ch = out_ch
        layers.append(ConvBNReLU6(in_ch, MOBILENET_V2_SMALL_LAST, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(MOBILENET_V2_SMALL_LAST, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[N, 3, H, W]`` images to ``[N, num_classes]`` logits."""
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def lenet5(num_classes: int = 10) -> LeNet5:
    """Return a freshly initialised :class:`LeNet5`."""
    return LeNet5(num_classes)


def mobilenet_v2_small(num_classes: int = 10) -> MobileNetV2Small:
    """Return a freshly initialised :class:`MobileNetV2Small`."""
    return MobileNetV2Small(num_classes)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm2d statistics and an affine map far from the identity, in place.

    Freshly built BatchNorms compute (almost) the identity, which hides whether
    an export folded them into the convolution before them; tests use this so
    that it shows. Draws from torch's global generator (seed it first).
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    return model
