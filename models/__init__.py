"""Example architectures, each covering coupling patterns the analyzer must get right.

``MODELS[name]`` gives a :class:`ModelSpec`: a factory for a freshly initialised model and a
helper that makes example inputs of the right shape. No weights are downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import cnn, transformers, unet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch dim
    description: str
    tokens: int = 0  # > 0: integer token ids in [0, tokens)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        if self.tokens:
            return (torch.randint(0, self.tokens, (batch, *self.input_shape), generator=generator),)
        return (torch.randn(batch, *self.input_shape, generator=generator),)

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory().eval()


_IMAGE = (3, 32, 32)
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("vgg", cnn.vgg, _IMAGE, "VGG-BN: flatten conv -> linear"),
        ModelSpec("resnet18", cnn.resnet18, _IMAGE, "ResNet-18 layout: residual adds, downsample"),
        ModelSpec(
            "resnet_bottleneck", cnn.resnet_bottleneck, _IMAGE, "ResNet-50-style bottlenecks"
        ),
        ModelSpec("mobilenet_v2", cnn.mobilenet_v2, _IMAGE, "depthwise convs, inverted residuals"),
        ModelSpec("resnext", cnn.resnext, _IMAGE, "grouped 3x3 convs (4 groups)"),
        ModelSpec("densenet", cnn.densenet, _IMAGE, "DenseNet-BC: growing concat"),
        ModelSpec("inception", cnn.inception, _IMAGE, "Inception: branch concat"),
        ModelSpec("se_resnet", cnn.se_resnet, _IMAGE, "squeeze-excitation broadcast scale"),
        ModelSpec("unet", unet.unet, (3, 32, 32), "U-Net: skip concat, ConvTranspose, PReLU"),
        ModelSpec("vit", transformers.vit, _IMAGE, "ViT: patch conv, cls token, MHA, layer scale"),
        ModelSpec(
            "gpt", transformers.gpt, (16,), "nanoGPT: fused qkv split, tied embedding", tokens=96
        ),
        ModelSpec(
            "llama", transformers.llama, (16,), "LLaMA: RMSNorm, SwiGLU, GQA, rotary", tokens=96
        ),
    ]
}


# real-size models for demos and benchmarks (not swept by the test suite)
LARGE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "resnet18_full",
            cnn.resnet18_full,
            (3, 64, 64),
            "ResNet-18 at full width (64-512 ch, 11.7 M params), 64 px: 4.4 GMACs",
        ),
    ]
}
ALL: dict[str, ModelSpec] = {**MODELS, **LARGE}


def get(name: str) -> ModelSpec:
    try:
        return ALL[name]
    except KeyError:
        raise KeyError(f"unknown model '{name}'; the zoo has: {', '.join(ALL)}") from None


__all__ = ["ALL", "LARGE", "MODELS", "ModelSpec", "get"]
