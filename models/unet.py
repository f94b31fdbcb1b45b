"""U-Net: encoder/decoder with skip concats and ConvTranspose upsampling (PReLU decoder)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, prelu: bool = False) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout) if prelu else nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout) if prelu else nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 8) -> None:
        super().__init__()
        self.enc1 = DoubleConv(in_channels, base)
        self.enc2 = DoubleConv(base, base * 2)
        self.bottleneck = DoubleConv(base * 2, base * 4)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(base * 4, base * 2, 2, stride=2)
        self.dec2 = DoubleConv(base * 4, base * 2, prelu=True)
        self.up1 = nn.ConvTranspose2d(base * 2, base, 2, stride=2)
        self.dec1 = DoubleConv(base * 2, base, prelu=True)
        self.head = nn.Conv2d(base, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)  # (B, b, H, W)
        e2 = self.enc2(self.pool(e1))  # (B, 2b, H/2, W/2)
        m = self.bottleneck(self.pool(e2))  # (B, 4b, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))  # skip concat: (B, 2b | 2b, ...)
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)  # (B, classes, H, W)


def unet(num_classes: int = 2) -> UNet:
    return UNet(num_classes=num_classes)
