"""Small mobile networks for 32×32 inputs (CIFAR), built from the standard modules of their families.

* :func:`mobilenetv2_cifar` – MobileNetV2 (Sandler et al. 2018): inverted residual blocks (1×1 expand,
  3×3 depthwise, 1×1 linear projection), BatchNorm, ReLU6 (``nn.ReLU6``, i.e. ``hardtanh(0, 6)``),
  residual additions where stride 1 and width unchanged.
* :func:`efficientnet_cifar` – EfficientNet-B0-style MBConv blocks (Tan & Le 2019): SiLU activations and
  squeeze-and-excitation (global average pool → 1×1 conv → SiLU → 1×1 conv → sigmoid, the gate multiplies
  the depthwise output), linear 1×1 projection, residual additions.

Both have a stride-2 stem (as the ImageNet originals) and two more stride-2 stages: 32×32 → 16×16 → 8×8 →
4×4, then a 1×1 head conv, global average pooling and a linear classifier. Sized to train in minutes on a
shared 2-core CPU (a stride-1 stem costs about 4× more per epoch there).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6
            ) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1×1 expand, ReLU6] → 3×3 depthwise, ReLU6 → 1×1 project (linear)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


# (expansion t, channels c, repeats n, stride s) as in the MobileNetV2 paper's Table 2, narrowed for CIFAR
MBV2_CFG = [(1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1)]


class MobileNetV2Cifar(nn.Module):
    def __init__(self, num_classes: int = 10, stem: int = 24, head: int = 256, cfg=MBV2_CFG, in_chans: int = 3,
                 stem_stride: int = 2):
        super().__init__()
        self.stem = conv_bn(in_chans, stem, 3, stem_stride)
        blocks, cin = [], stem
        for t, c, n, s in cfg:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))


def mobilenetv2_cifar(num_classes: int = 10, **kw) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(num_classes, **kw)


class SqueezeExcite(nn.Module):
    """x · sigmoid(W2 · SiLU(W1 · mean_hw(x)))  (EfficientNet's SE, reduction from the block's input width)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """EfficientNet block: [1×1 expand, SiLU] → k×k depthwise, SiLU → SE → 1×1 project (linear)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int = 3, se_ratio: float = 0.25):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.SiLU))
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, max(1, int(cin * se_ratio))),
                   conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


# (expansion, channels, repeats, stride, kernel) after EfficientNet-B0's stage list, narrowed and shortened
EFFNET_CFG = [(1, 16, 1, 1, 3), (4, 24, 2, 1, 3), (4, 40, 2, 2, 5), (4, 64, 2, 2, 3), (4, 96, 1, 1, 3)]


class EfficientNetCifar(nn.Module):
    def __init__(self, num_classes: int = 10, stem: int = 24, head: int = 256, cfg=EFFNET_CFG, in_chans: int = 3,
                 stem_stride: int = 2):
        super().__init__()
        self.stem = conv_bn(in_chans, stem, 3, stem_stride, act=nn.SiLU)
        blocks, cin = [], stem
        for t, c, n, s, k in cfg:
            for i in range(n):
                blocks.append(MBConv(cin, c, s if i == 0 else 1, t, k))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, head, 1, act=nn.SiLU)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))


def efficientnet_cifar(num_classes: int = 10, **kw) -> EfficientNetCifar:
    return EfficientNetCifar(num_classes, **kw)
