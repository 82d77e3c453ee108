"""The scale-invariant ConvNet of SPEC §4.

Conv3x3(C→c) + BN + ReLU, then `depth` blocks Conv3x3 + BN + ReLU + MaxPool(2) that double the
width, then a max pool over what is left of the image (4x4 for 32x32 inputs and depth 3, the
SPEC's MaxPool(4)) → Flatten → Linear(c·2^depth → classes), frozen at norm `last_layer_norm`.
Convs have no bias and BN has no affine parameters, so all conv weights form one SI group.

`ModelConfig.depth` is the number of doubling blocks: the SPEC network needs depth = 3, while
the config's default (2) is the MLP's, so presets must set model.depth = 3. The input side
must be divisible by 2^depth; BN uses PyTorch's default eps (1e-5), ModelConfig.norm_eps is
the MLP's LayerNorm eps and is not used here. Conv weights keep PyTorch's default init, whose
joint norm (≈12.6 at width 32) is the SPEC's ρ = 12.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .registry import freeze_to_norm_, register_model


def conv_bn_relu(c_in: int, c_out: int, bn_eps: float) -> list[nn.Module]:
    """Conv3x3 without bias → BN without affine → ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out, eps=bn_eps, affine=False), nn.ReLU()]


class SIConvNet(nn.Module):
    """ConvNet whose conv weights are jointly scale-invariant; the head is frozen."""

    def __init__(self, in_channels: int, image_size: int, width: int, depth: int, num_outputs: int,
                 last_layer_norm: float = 10.0, bn_eps: float = 1e-5):
        super().__init__()
        if width < 1:
            raise ConfigError(f"convnet-si needs model.width >= 1 (got {width})")
        if depth < 1 or image_size % 2 ** depth or image_size < 2 ** depth:
            raise ConfigError(f"convnet-si with model.depth={depth} needs 1 <= depth and an image side "
                              f"divisible by 2^depth (got {image_size}); use model.depth=3 for 32x32 images")
        layers = conv_bn_relu(in_channels, width, bn_eps)
        for i in range(depth):
            layers += conv_bn_relu(width * 2 ** i, width * 2 ** (i + 1), bn_eps) + [nn.MaxPool2d(2)]
        # The last pool covers the whole remaining map, so one value per channel reaches the head.
        layers += [nn.MaxPool2d(image_size // 2 ** depth), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * 2 ** depth, num_outputs, bias=False)
        freeze_to_norm_(self.head.weight, last_layer_norm)

    def si_parameters(self) -> list[nn.Parameter]:
        """All conv weights: one joint SI group."""
        return [m.weight for m in self.features if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes] for normalized images [N, C, H, W]."""
        return self.head(self.features(x))


@register_model("convnet-si", input_kind="image", si_group="all", engines=("fused", "images"))
def build_convnet_si(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> SIConvNet:
    """SI ConvNet for square images of shape (C, H, H); width c = cfg.width, blocks = cfg.depth."""
    if input_shape[1] != input_shape[2]:  # build_model has checked the shape is (C, H, W)
        raise ConfigError(f"convnet-si needs square images (C, H, H); got input shape {input_shape}")
    return SIConvNet(input_shape[0], input_shape[1], cfg.width, cfg.depth, num_outputs, cfg.last_layer_norm)
