"""A plain-torch transcription of the official SplitNet code's CIFAR ResNet (mzhaoshuai/Divide-and-Co-training,
``model/resnet.py``: ``BasicBlock``, ``Bottleneck``, ``ResNet`` with ``dataset='cifar*'`` and the constructors
``wide_resnet*``, ``resnet110``/``resnet164``, ``resnext29_*``), kept to what a CIFAR network of ``split_factor`` S
builds, so the tests can count its parameters and compare its function with groupnet's ``splitnet-*`` models.

Everything that decides the architecture is copied as the official code writes it: the base-width table
{1: 16, 2: 12, 4: 8, 8: 6, 16: 4}; the WRN stem 16 and widen factor ``int(max(k / S**0.5 + 0.4, 1.0))``; ResNeXt
groups ``int(groups / S)`` with a 64-wide stem; the bottleneck width ``int(planes * base_width / 64) * groups``; the
ResNet-D downsample (``AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`` + 1x1 conv + BN, a plain
1x1 conv + BN at stride 1); the CIFAR dropout list; the init (kaiming fan_out, BN 1/0, fc N(0, 1e-3), zero-init of
``bn2``/``bn3``). Module names and their registration order follow the official ones.
"""

from __future__ import annotations

import torch
from torch import nn

INPLANES = {1: 16, 2: 12, 4: 8, 8: 6, 16: 4}


def conv3x3(in_planes, out_planes, stride=1, groups=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The official ``ResNet`` on CIFAR (layer4 and the ImageNet stem dropped: CIFAR never builds them)."""

    def __init__(self, arch, block, layers, num_classes=100, groups=1, width_per_group=64, split_factor=1,
                 dropout_p=None, init=True):
        super().__init__()
        if groups == 1:
            self.groups = groups
            self.inplanes = INPLANES[split_factor]
            if "wide_resnet" in arch:
                self.inplanes = 16
        else:
            self.groups = int(groups / split_factor) if split_factor > 1 else groups
            self.inplanes = 64
        self.base_width = width_per_group
        self.layer0 = nn.Sequential(conv3x3(3, self.inplanes), nn.BatchNorm2d(self.inplanes), nn.ReLU(inplace=True))
        inplanes_origin = self.inplanes
        if "wide_resnet" in arch:
            widen_factor = float(arch.split("_")[-1])
            inplanes_origin = inplanes_origin * int(max(widen_factor / (split_factor**0.5) + 0.4, 1.0))
        self.layer1 = self._make_layer(block, inplanes_origin, layers[0], stride=1)
        self.layer2 = self._make_layer(block, inplanes_origin * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, inplanes_origin * 4, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = None
        if arch in ["resnext29_16x64d", "resnext29_8x64d", "wide_resnet16_8", "wide_resnet40_10"]:
            if dropout_p is not None:
                self.dropout = nn.Dropout(dropout_p / split_factor)
        self.fc = nn.Linear(inplanes_origin * 4 * block.expansion, num_classes)
        if not init:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1e-3)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if stride == 1:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            else:
                downsample = nn.Sequential(
                    nn.AvgPool2d(kernel_size=2, stride=stride, ceil_mode=True, padding=0, count_include_pad=False),
                    conv1x1(self.inplanes, planes * block.expansion, stride=1),
                    nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.layer0(x))))
        x = torch.flatten(self.avgpool(x), 1)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


def wide_resnet(depth: int, k: int, **kwargs) -> ResNet:
    """``wide_resnet{depth}_{k}``: BasicBlock, [n, n, n] with n = (depth - 4) / 6 (the official constructors list
    [2]*4, [4]*4, [6]*4, [8]*4 for depths 16, 28, 40, 52); dropout 0.1 for 40-10 and 52-8 (built on CIFAR for 40-10
    only)."""
    n = (depth - 4) // 6
    if (depth, k) in ((40, 10), (52, 8)):
        kwargs["dropout_p"] = 0.1
    return ResNet(f"wide_resnet{depth}_{k}", BasicBlock, [n, n, n], **kwargs)


def resnet(depth: int, **kwargs) -> ResNet:
    """``resnet110`` ([12]*4) and ``resnet164`` ([18]*4): Bottleneck, n = (depth - 2) / 9."""
    n = (depth - 2) // 9
    return ResNet(f"resnet{depth}", Bottleneck, [n, n, n], **kwargs)


def resnext(depth: int, cardinality: int, group_width: int, **kwargs) -> ResNet:
    """``resnext29_8x64d`` / ``resnext29_16x64d``: Bottleneck [3]*4, groups and width_per_group as named."""
    n = (depth - 2) // 9
    return ResNet(f"resnext{depth}_{cardinality}x{group_width}d", Bottleneck, [n, n, n], groups=cardinality,
                  width_per_group=group_width, **kwargs)
