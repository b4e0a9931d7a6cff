"""CIFAR ResNet-20 (He et al. 2016, §4.2) with parameter-free "option A" shortcuts.

Where a stage halves the resolution and doubles the width, the shortcut subsamples the input
(every second pixel) and zero-pads the new channels: no weights, which is what most public CIFAR
ResNet checkpoints use, and what reaches sfn-deploy as ``aten.pad`` on a strided slice.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else 0
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.pad or self.stride != 1:
            short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    def __init__(self, blocks: int = 3, num_classes: int = 10, width: int = 16, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage in range(3):
            cout = width * 2 ** stage
            for i in range(blocks):
                layers.append(Block(cin, cout, 2 if stage and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes: int = 10, **kw) -> ResNetCifar:
    return ResNetCifar(3, num_classes, **kw)
