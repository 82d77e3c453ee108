"""Batched on-device augmentation: random crop with zero padding and horizontal flip, and the pipeline.

One gather over the padded batch does both, with per-sample offsets drawn from an explicit
torch.Generator, so a batch costs a few kernel launches on any device and is reproducible.
Apply it to uint8 images before `normalize` to pad with black, as the usual CIFAR recipe does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ImageDataConfig
from .randaugment import RandAugment


class Augment:
    """Random crop (zero padding `crop_padding` on each side) and random horizontal flip."""

    def __init__(self, crop_padding: int = 4, flip: bool = True):
        if crop_padding < 0:
            raise ValueError(f"crop_padding={crop_padding} must be >= 0")
        self.crop_padding = crop_padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augment images x [N, C, H, W]; draws come from `gen` (on any device)."""
        n, _, h, w = x.shape
        pad = self.crop_padding
        # Draws live on the generator's device, then move: the same seed gives the same
        # augmentation whatever device the images are on.
        draw_device = gen.device
        off_y = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=draw_device).to(x.device)
        off_x = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=draw_device).to(x.device)
        flips = (torch.rand(n, generator=gen, device=draw_device) < 0.5).to(x.device)
        if not self.flip:
            flips = torch.zeros_like(flips)
        padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
        rows = off_y[:, None] + torch.arange(h, device=x.device)                  # [N, H]
        cols = off_x[:, None] + torch.arange(w, device=x.device)                  # [N, W]
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip})"


class AugmentPipeline:
    """Random crop + flip, then RandAugment(N, M), on uint8 batches; one generator feeds both."""

    def __init__(self, crop_flip: Augment | None, randaugment: RandAugment | None):
        self.crop_flip, self.randaugment = crop_flip, randaugment

    @classmethod
    def from_config(cls, d: ImageDataConfig) -> "AugmentPipeline | None":
        """The pipeline a data config asks for (None: no augmentation)."""
        crop_flip = Augment(d.crop_padding) if d.augment else None
        randaugment = RandAugment(d.randaugment[0], d.randaugment[1]) if d.randaugment else None
        return cls(crop_flip, randaugment) if crop_flip or randaugment else None

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augmented copy of the batch x [B, C, H, W]."""
        if self.crop_flip is not None:
            x = self.crop_flip(x, gen)
        if self.randaugment is not None:
            x = self.randaugment(x, gen)
        return x
