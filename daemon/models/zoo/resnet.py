"""ResNet-18 and ResNet-50 shaped benchmark models (randomly initialised, no pretrained weights).

They exist to give the daemon realistic compute per image; their outputs carry no meaning. The
architecture follows torchvision's ResNet (v1.5: stride on the 3x3 conv of a Bottleneck), written
out here because torchvision is not a dependency.

Contract:

* ``resnet18_style(num_classes, seed)`` / ``resnet50_style(num_classes, seed)`` return a model in
  eval() mode whose every parameter and buffer is a function of ``seed`` alone: initialisation
  draws from a private ``torch.Generator``, never from the global RNG, so the same seed gives the
  same outputs in any process regardless of what else has used the global RNG.
* ``forward`` takes float32 NCHW with 3 channels and any height/width >= 32 (adaptive average
  pooling before the classifier) and returns logits of shape (N, num_classes).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(c_in, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50+)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv1x1(c_in, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv1x1(width, width * self.expansion), nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max-pool), four stages, adaptive average pool, linear classifier."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.c_in = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, layers[0], stride=1)
        self.layer2 = self._stage(block, 128, layers[1], stride=2)
        self.layer3 = self._stage(block, 256, layers[2], stride=2)
        self.layer4 = self._stage(block, 512, layers[3], stride=2)
        # Adaptive pooling is what lets any input size >= 32 reach the classifier as a vector.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block: type[BasicBlock | Bottleneck], width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.c_in != width * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.c_in, width * block.expansion, stride),
                                       nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.c_in, width, stride, downsample)]
        self.c_in = width * block.expansion
        layers += [block(self.c_in, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@torch.no_grad()
def _init_weights(model: nn.Module, seed: int) -> None:
    """torchvision's initialisation scheme, drawn from a private generator seeded with ``seed``.

    Every parameter and buffer is overwritten, so the result does not depend on the global RNG
    draws the module constructors made.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            # nn.Linear's own default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound, generator=gen)
            nn.init.uniform_(m.bias, -bound, bound, generator=gen)


def _build(block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], num_classes: int, seed: int) -> ResNet:
    model = ResNet(block, layers, num_classes)
    _init_weights(model, seed)
    return model.eval()


def resnet18_style(num_classes: int = 1000, seed: int = 0) -> ResNet:
    """ResNet-18 layout (BasicBlock, 2-2-2-2), deterministic random weights from ``seed``, eval() mode."""
    return _build(BasicBlock, (2, 2, 2, 2), num_classes, seed)


def resnet50_style(num_classes: int = 1000, seed: int = 0) -> ResNet:
    """ResNet-50 layout (Bottleneck, 3-4-6-3), deterministic random weights from ``seed``, eval() mode."""
    return _build(Bottleneck, (3, 4, 6, 3), num_classes, seed)
