"""Hand-written plain torch architectures, as a user would write them, for the stacking tests.

Each covers a forward pattern: residual adds (ResNet basic and bottleneck), channel concatenation (DenseNet,
Inception, U-Net skips), depthwise convs and inverted residuals (MobileNetV2), channel split and shuffle
(ShuffleNet), squeeze-and-excitation gating, and an MLP with LayerNorm. Tiny widths: the tests run them in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: str = "basic", num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 8)
        if block == "basic":
            self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 12, stride=2))
            width = 12
        else:
            self.layers = nn.Sequential(Bottleneck(8, 2), Bottleneck(8, 3, stride=2))
            width = 12
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 5, in_channels: int = 3, drop: float = 0.0) -> None:
        super().__init__()
        self.drop = drop
        self.conv0 = nn.Conv2d(in_channels, 6, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(6, 3), DenseLayer(9, 3))
        self.trans = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 6, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(6, 4), DenseLayer(10, 4))
        self.norm = nn.BatchNorm2d(14)
        self.classifier = nn.Linear(14, num_classes)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.conv0(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1)
        x = x.view(x.size(0), -1)
        x = F.dropout(x, self.drop, self.training)
        return self.classifier(x)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 4, 1)
        self.b2 = nn.Sequential(conv_bn(cin, 3, 1), conv_bn(3, 5, 3))
        self.b3 = nn.Sequential(conv_bn(cin, 2, 1), conv_bn(2, 3, 3), conv_bn(3, 3, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 2, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class Inception(nn.Module):
    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 6)
        self.mixed1 = InceptionBlock(6)
        self.mixed2 = InceptionBlock(14)
        self.fc = nn.Linear(14, num_classes)

    def forward(self, x):
        x = self.mixed2(F.max_pool2d(self.mixed1(self.stem(x)), 2))
        return self.fc(x.mean(dim=(-2, -1)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, 6, 3, 2, act=nn.ReLU6), InvertedResidual(6, 6, 1, 2), InvertedResidual(6, 8, 2, 3),
            InvertedResidual(8, 8, 1, 2), conv_bn(8, 16, 1, act=nn.ReLU6))
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean([2, 3]))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(conv_bn(half, half, 1), conv_bn(half, half, 3, groups=half, act=nn.Identity),
                                    conv_bn(half, half, 1))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleNet(nn.Module):
    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 8)
        self.units = nn.Sequential(ShuffleUnit(8), ShuffleUnit(8))
        self.split_conv = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.units(self.stem(x))
        a, b = torch.split(x, [4, 4], dim=1)
        x = torch.cat([a, self.split_conv(b), x.narrow(1, 2, 4)], 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SEBlock(nn.Module):
    """Squeeze-and-excitation with linear layers (indexing the gate back to (N, C, 1, 1)) or 1x1 convs."""

    def __init__(self, c: int, r: int = 2, linear: bool = True) -> None:
        super().__init__()
        self.linear = linear
        if linear:
            self.fc = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(inplace=True), nn.Linear(c // r, c), nn.Sigmoid())
        else:
            self.fc = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1), nn.Hardsigmoid())

    def forward(self, x):
        if self.linear:
            s = self.fc(x.mean((2, 3)))
            return x * s[:, :, None, None]
        return x * self.fc(F.adaptive_avg_pool2d(x, 1))


class SENet(nn.Module):
    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, 8)
        self.block = BasicBlock(8, 8)
        self.se1 = SEBlock(8, linear=True)
        self.se2 = SEBlock(8, linear=False)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.se2(self.se1(self.block(self.stem(x))))
        return self.fc(F.adaptive_max_pool2d(x, 1).squeeze(-1).squeeze(-1))


class UNet(nn.Module):
    """Encoder-decoder with skip concatenation; a pooled 1x1-conv head gives class logits."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.enc1, self.enc2 = conv_bn(in_channels, 4), conv_bn(4, 6)
        self.bottom = conv_bn(6, 8)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = conv_bn(8 + 6, 6)
        self.dec1 = conv_bn(6 + 4, 4)
        self.head = nn.Conv2d(4, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up(b), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False), e1], 1))
        return self.head(d1).mean((2, 3))


class MLP(nn.Module):
    def __init__(self, num_classes: int = 5, in_channels: int = 3, image: int = 8, drop: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image * image, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(drop),
            nn.Linear(16, 12), nn.LayerNorm(12), nn.SiLU(), nn.Linear(12, num_classes))

    def forward(self, x):
        return self.net(x)


class FunctionalNet(nn.Module):
    """Convs and a linear called functionally on the model's own parameters, and a per-channel learnable scale."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, in_channels, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)  # inner groups = 3
        self.gamma = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.head = nn.Parameter(torch.randn(num_classes, 6) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.conv2d(x, self.w2, None, 2, 1, 1, 3) * self.gamma
        return F.linear(x.mean((2, 3)), self.head)


ARCHS = {
    "resnet_basic": lambda: ResNet("basic"),
    "resnet_bottleneck": lambda: ResNet("bottleneck"),
    "densenet": DenseNet,
    "inception": Inception,
    "mobilenetv2": MobileNetV2,
    "shufflenet": ShuffleNet,
    "senet": SENet,
    "unet": UNet,
    "mlp": MLP,
    "functional": FunctionalNet,
}
"""name -> factory of a plain model reading (N, 3, 8, 8) and returning (N, 5)."""
