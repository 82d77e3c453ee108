"""Pre-activation ResNet-18 for small images, scale-invariant (SPEC §4) or regular.

"resnet18-si": Conv3x3(C→k) stem; blocks [2, 2, 2, 2] with widths k, 2k, 4k, 8k and strides
1, 2, 2, 2; each block is BN → ReLU → Conv3x3 → BN → ReLU → Conv3x3 plus a shortcut. Every BN
is affine-free, convs have no bias, and a downsampling shortcut is BN → Conv1x1 on the block
input, so every block output scales linearly with the conv weights. A final BN → ReLU →
global average pool → Linear (no bias, frozen at norm `last_layer_norm`) makes the logits
invariant to scaling all conv weights together: they form one SI group. PyTorch's default
conv init gives a joint norm of ≈28 at k = 32, the SPEC's ρ.

"resnet18": the regular network of the SPEC's practical setting (k = 64 there): affine BN,
a trainable Linear head with bias, Kaiming-normal conv init, and the standard pre-activation
shortcut (Conv1x1 on the block's pre-activated input). Nothing is on the sphere.
Width comes from ModelConfig.width in both; BN uses PyTorch's default eps (1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .registry import freeze_to_norm_, register_model


class PreActBlock(nn.Module):
    """Pre-activation basic block; `si` selects affine-free BN and the BN-before-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, si: bool, bn_eps: float):
        super().__init__()
        self.si = si
        self.bn1 = nn.BatchNorm2d(c_in, eps=bn_eps, affine=not si)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=bn_eps, affine=not si)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut_bn = None
        self.shortcut_conv = None
        if stride != 1 or c_in != c_out:
            self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if si:
                self.shortcut_bn = nn.BatchNorm2d(c_in, eps=bn_eps, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update of x."""
        pre = F.relu(self.bn1(x))
        if self.shortcut_conv is None:
            shortcut = x
        elif self.si:
            # Normalizing x first keeps the shortcut linear (not quadratic) in the conv scale.
            shortcut = self.shortcut_conv(self.shortcut_bn(x))
        else:
            shortcut = self.shortcut_conv(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 with widths k, 2k, 4k, 8k; SI (frozen head) or regular."""

    def __init__(self, in_channels: int, width: int, num_outputs: int, si: bool = True,
                 last_layer_norm: float = 10.0, bn_eps: float = 1e-5, blocks: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        if width < 1:
            raise ConfigError(f"resnet18 needs model.width >= 1 (got {width})")
        self.si = si
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        stages, c_in = [], width
        for i, n_blocks in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(PreActBlock(c_in, c_out, stride, si, bn_eps))
                c_in = c_out
        self.blocks = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(c_in, eps=bn_eps, affine=not si)
        self.head = nn.Linear(c_in, num_outputs, bias=not si)
        if si:
            freeze_to_norm_(self.head.weight, last_layer_norm)
        else:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def si_parameters(self) -> list[nn.Parameter]:
        """All conv weights (one joint SI group) for the SI network; [] for the regular one."""
        if not self.si:
            return []
        return [m.weight for m in self.modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes] for normalized images [N, C, H, W]."""
        out = F.relu(self.final_bn(self.blocks(self.stem(x))))
        return self.head(out.mean(dim=(2, 3)))


@register_model("resnet18-si", input_kind="image", si_group="all", engines=("fused", "images"))
def build_resnet18_si(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> PreActResNet18:
    """SI pre-activation ResNet-18 of width cfg.width (SPEC: 32)."""
    return PreActResNet18(input_shape[0], cfg.width, num_outputs, si=True,
                          last_layer_norm=cfg.last_layer_norm)


@register_model("resnet18", input_kind="image", si_group="none", engines=("fused", "images"))
def build_resnet18(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> PreActResNet18:
    """Regular pre-activation ResNet-18 of width cfg.width (SPEC practical setting: 64)."""
    return PreActResNet18(input_shape[0], cfg.width, num_outputs, si=False)
