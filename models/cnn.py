"""Convolutional architectures, small but structurally faithful to their namesakes.

Each covers a coupling pattern: VGG (flatten conv -> linear), ResNet (residual adds with
downsample), MobileNetV2 (depthwise + inverted residual), ResNeXt (grouped conv), DenseNet
(growing concat), Inception (branch concat), SE-ResNet (broadcast channel scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class VGG(nn.Module):
    """VGG with BatchNorm; the classifier sees the conv features flattened (C*H*W)."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] = (16, "M", 32, "M", 64, 64, "M"),
        num_classes: int = 10,
        image: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = 3, image
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                assert isinstance(v, int)
                layers += [
                    nn.Conv2d(cin, v, 3, padding=1),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(cin * size * size, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, C, H, W)
        return self.classifier(torch.flatten(x, 1))  # (B, C*H*W) -> (B, classes)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)  # residual add couples the stage's stream


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, cin: int, width: int, stride: int = 1, groups: int = 1, group_width: int | None = None
    ) -> None:
        super().__init__()
        mid = group_width * groups if group_width else width
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        widths: tuple[int, ...] = (16, 32, 64, 128),
        num_classes: int = 10,
        **block_kwargs: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        stages = []
        for i, (n, width) in enumerate(zip(layers, widths, strict=False)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1, **block_kwargs))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2 = stages[0], stages[1]
        self.layer3 = stages[2] if len(stages) > 2 else nn.Identity()
        self.layer4 = stages[3] if len(stages) > 3 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C)
        return self.fc(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(cin, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU6(True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        setting: tuple[tuple[int, int, int, int], ...] = (
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 2, 2),
            (6, 64, 1, 2),
        ),
        last: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 16, 3, 2)]
        cin = 16
        for t, c, n, s in setting:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(x.mean([2, 3]))  # global average pool as a mean


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.norm1(x)))  # pre-activation: BN of the concat input
        return self.conv2(F.relu(self.norm2(out)))


class DenseNet(nn.Module):
    """DenseNet-BC: each layer sees the concat of every earlier feature map in its block."""

    def __init__(
        self,
        growth: int = 8,
        layers: tuple[int, ...] = (3, 3),
        init: int = 16,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, init, 3, padding=1, bias=False)
        blocks, transitions = [], []
        cin = init
        for i, n in enumerate(layers):
            blocks.append(nn.ModuleList(DenseLayer(cin + k * growth, growth) for k in range(n)))
            cin += n * growth
            if i < len(layers) - 1:
                transitions.append(
                    nn.Sequential(
                        nn.BatchNorm2d(cin),
                        nn.ReLU(),
                        nn.Conv2d(cin, cin // 2, 1, bias=False),
                        nn.AvgPool2d(2),
                    )
                )
                cin //= 2
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.norm = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = [x]
            for layer in block:  # type: ignore[attr-defined]
                features.append(layer(torch.cat(features, 1)))  # (B, sum C_k, H, W)
            x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionBlock(nn.Module):
    def __init__(
        self, cin: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], pool: int
    ) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_bn(cin, c3[0], 1), conv_bn(c3[0], c3[1], 3))
        self.branch5 = nn.Sequential(
            conv_bn(cin, c5[0], 1), conv_bn(c5[0], c5[1], 3), conv_bn(c5[1], c5[1], 3)
        )
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)]
        return torch.cat(branches, 1)  # channel offsets: c1 | c3 | c5 | pool


class Inception(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.block1 = InceptionBlock(32, 16, (16, 24), (8, 12), 12)
        self.block2 = InceptionBlock(64, 24, (24, 32), (8, 16), 16)
        self.fc = nn.Linear(88, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s  # broadcast over H, W: couples C only


class SEBlock(BasicBlock):
    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__(cin, width, stride)
        self.se = SqueezeExcite(width)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + identity)


def vgg(num_classes: int = 10) -> VGG:
    return VGG(num_classes=num_classes)


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18's layout (2-2-2-2 basic blocks) at a quarter of its width."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def resnet18_full(num_classes: int = 1000) -> ResNet:
    """ResNet-18 at its full width (64-512 channels, 11.7 M params) with the zoo's 3x3 stem (no
    downsampling before stage 1): 4.4 GMACs at 64 px, real-size layers for timing."""
    return ResNet(BasicBlock, [2, 2, 2, 2], widths=(64, 128, 256, 512), num_classes=num_classes)


def resnet_bottleneck(num_classes: int = 10) -> ResNet:
    """ResNet-50-style bottleneck blocks (1x1 reduce, 3x3, 1x1 expand x4), two stages."""
    return ResNet(Bottleneck, [2, 1], widths=(8, 16), num_classes=num_classes)


def resnext(num_classes: int = 10) -> ResNet:
    """ResNeXt: bottlenecks whose 3x3 conv has 4 groups of width 4."""
    return ResNet(
        Bottleneck, [1, 1], widths=(8, 16), num_classes=num_classes, groups=4, group_width=4
    )


def mobilenet_v2(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes)


def densenet(num_classes: int = 10) -> DenseNet:
    return DenseNet(num_classes=num_classes)


def inception(num_classes: int = 10) -> Inception:
    return Inception(num_classes=num_classes)


def se_resnet(num_classes: int = 10) -> ResNet:
    return ResNet(SEBlock, [1, 1], widths=(16, 32), num_classes=num_classes)
