"""Batched on-device RandAugment(N, M) (Cubuk et al. 2020) for image batches [B, C, H, W].

Each sample gets N ops drawn uniformly (with replacement) from `OPS`, applied in order, all at
the same magnitude M on the usual 0..30 scale; m = M / 30. Signed ops flip a fair coin per
sample and per layer. Ranges at magnitude m (M = 14 in the paper's ViT, m = 0.467):

  identity, autocontrast, equalize   no magnitude
  rotate          angle ±30°·m about the centre (positive = counter-clockwise on screen)
  shear_x/y       shear factor ±0.3·m about the centre: x_src = x + s·y (resp. y_src = y + s·x)
  translate_x/y   shift ±0.45·m·width (resp. height) pixels, as torchvision's 150/331 of the size
  solarize        pixels strictly above 1 − m are inverted (x -> 1 − x); M = 0 changes nothing
  posterize       keep 8 − round(4·m) bits of each 8-bit value (8 … 4 bits)
  color, contrast, brightness, sharpness
                  blend factor f = 1 ± 0.9·m against, respectively: the grayscale image
                  (ITU-R 601 luma), the image's mean gray level, black, and the image smoothed
                  by the PIL 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13 (border pixels kept)

Geometric ops fill uncovered pixels with `fill` (0, black) and sample with `interpolation`
("nearest" as torchvision's default, or "bilinear"). Pixels are clamped to [0, 1].
Apply it to raw images (uint8 or float in [0, 1]) before mean/std normalization.
uint8 in -> uint8 out (rounded); float in -> same float dtype out.

The work is grouped by op, never by sample: per layer, samples are sorted by their drawn op and
each op runs once on its whole group with batched tensor math (affine_grid/grid_sample for
geometry, a scatter_add histogram for equalize).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

MAX_MAGNITUDE = 30.0
OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")

# An op maps (float images [b, C, H, W] in [0, 1], m in [0, 1], signs [b] of ±1, options)
# to images of the same shape; unsigned ops ignore `signs`.
Op = Callable[..., torch.Tensor]


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Grayscale [b, 1, H, W]: ITU-R 601 luma for RGB, the image itself for one channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(x: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """base + f·(x − base), per-sample factor f, clamped to [0, 1]."""
    return (base + factor.view(-1, 1, 1, 1) * (x - base)).clamp_(0, 1)


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> integer 8-bit levels 0..255 (int64)."""
    return (x * 255).round_().long()


def _factor(m: float, signs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 1 + 0.9 * m * signs.to(x.dtype)


def identity(x, m, signs, **_):
    """The image unchanged."""
    return x


def autocontrast(x, m, signs, **_):
    """Stretch each channel of each image to span [0, 1] (flat channels are left alone)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    scale = torch.where(span > 0, 1 / span.clamp_min(1e-12), torch.ones_like(span))
    offset = torch.where(span > 0, lo, torch.zeros_like(lo))
    return ((x - offset) * scale).clamp_(0, 1)


def equalize(x, m, signs, **_):
    """PIL-style histogram equalization of each channel of each image, on 8-bit levels."""
    b, c, h, w = x.shape
    levels = _to_levels(x).view(b, c, h * w)
    hist = torch.zeros(b, c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, levels, torch.ones_like(levels))
    # PIL's step ignores the count of the brightest level present.
    top_count = hist.gather(2, levels.amax(dim=2, keepdim=True))
    step = (h * w - top_count) // 255  # [b, c, 1]
    safe = step.clamp_min(1)
    lut = (hist.cumsum(2) + safe // 2) // safe
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut[..., :-1]], dim=2).clamp_(0, 255)
    mapped = torch.where(step > 0, lut.gather(2, levels), levels)
    return mapped.view(b, c, h, w).to(x.dtype) / 255


def solarize(x, m, signs, **_):
    """Invert pixels strictly above the threshold 1 − m."""
    return torch.where(x > 1 - m, 1 - x, x)


def posterize(x, m, signs, **_):
    """Keep the top 8 − round(4m) bits of each 8-bit level."""
    bits = 8 - round(4 * m)
    mask = 256 - 2 ** (8 - bits)
    return (_to_levels(x) & mask).to(x.dtype) / 255


def color(x, m, signs, **_):
    """Saturation: blend with the grayscale image by 1 ± 0.9m."""
    return _blend(x, _luma(x), _factor(m, signs, x))


def contrast(x, m, signs, **_):
    """Contrast: blend with the image's mean gray level by 1 ± 0.9m."""
    mean = _luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, _factor(m, signs, x))


def brightness(x, m, signs, **_):
    """Brightness: blend with black, i.e. multiply by 1 ± 0.9m."""
    return _blend(x, torch.zeros_like(x), _factor(m, signs, x))


def sharpness(x, m, signs, **_):
    """Sharpness: blend with the PIL-smoothed image by 1 ± 0.9m; border pixels are kept."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, _factor(m, signs, x))


def warp(x: torch.Tensor, matrix: torch.Tensor, interpolation: str = "nearest",
         fill: float = 0.0) -> torch.Tensor:
    """Sample x at A·p for each output pixel p; A [b, 2, 3] in centred pixel coordinates."""
    b, c, h, w = x.shape
    # Pixel offsets from the centre -> normalized [-1, 1] coordinates (align_corners=False).
    to_norm = torch.tensor([2 / w, 2 / h], dtype=x.dtype, device=x.device)
    theta = matrix.clone()
    theta[:, :, :2] = matrix[:, :, :2] * to_norm.view(1, 2, 1) / to_norm.view(1, 1, 2)
    theta[:, :, 2] = matrix[:, :, 2] * to_norm
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    if fill == 0:
        return F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros",
                             align_corners=False).clamp_(0, 1)
    # An extra channel of ones, sampled alike, tells how much of each pixel lies outside.
    sampled = F.grid_sample(torch.cat([x, torch.ones_like(x[:, :1])], 1), grid,
                            mode=interpolation, padding_mode="zeros", align_corners=False)
    out, inside = sampled[:, :c], sampled[:, c:]
    return (out + (1 - inside) * fill).clamp_(0, 1)


def _affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
            d: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Batch of matrices [[a, b, tx], [c, d, ty]] from per-sample tensors [b]."""
    return torch.stack([torch.stack([a, b, tx], 1), torch.stack([c, d, ty], 1)], 1).to(x.dtype)


def rotation_matrix(degrees: torch.Tensor) -> torch.Tensor:
    """Sampling matrices [b, 2, 3] that rotate content counter-clockwise (y axis points down)."""
    t = torch.deg2rad(degrees)
    zero = torch.zeros_like(t)
    # Output pixel p shows input pixel M·p: at +90° the pixel right of the centre shows the
    # one below it, i.e. content turns from 6 o'clock to 3 o'clock.
    return torch.stack([torch.stack([t.cos(), -t.sin(), zero], 1),
                        torch.stack([t.sin(), t.cos(), zero], 1)], 1)


def rotate(x, m, signs, interpolation="nearest", fill=0.0):
    """Rotate about the centre by ±30°·m."""
    degrees = 30 * m * signs.to(x.dtype)
    return warp(x, rotation_matrix(degrees).to(x.dtype), interpolation, fill)


def _shear_or_shift(x, signs, interpolation, fill, shear_x=0.0, shear_y=0.0, tx=0.0, ty=0.0):
    s = signs.to(x.dtype)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    matrix = _affine(x, one, shear_x * s, shear_y * s, one, tx * s, ty * s)
    return warp(x, matrix, interpolation, fill)


def shear_x(x, m, signs, interpolation="nearest", fill=0.0):
    """Horizontal shear about the centre: x_src = x + s·y, s = ±0.3m."""
    return _shear_or_shift(x, signs, interpolation, fill, shear_x=0.3 * m)


def shear_y(x, m, signs, interpolation="nearest", fill=0.0):
    """Vertical shear about the centre: y_src = y + s·x, s = ±0.3m."""
    return _shear_or_shift(x, signs, interpolation, fill, shear_y=0.3 * m)


def translate_x(x, m, signs, interpolation="nearest", fill=0.0):
    """Shift content by ±0.45m·width pixels horizontally."""
    return _shear_or_shift(x, signs, interpolation, fill, tx=-0.45 * m * x.shape[3])


def translate_y(x, m, signs, interpolation="nearest", fill=0.0):
    """Shift content by ±0.45m·height pixels vertically."""
    return _shear_or_shift(x, signs, interpolation, fill, ty=-0.45 * m * x.shape[2])


OP_FUNCTIONS: dict[str, Op] = {
    "identity": identity, "autocontrast": autocontrast, "equalize": equalize,
    "rotate": rotate, "solarize": solarize, "color": color, "posterize": posterize,
    "contrast": contrast, "brightness": brightness, "sharpness": sharpness,
    "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x,
    "translate_y": translate_y,
}
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


class RandAugment:
    """RandAugment(num_ops, magnitude) over whole batches, seeded by a torch.Generator."""

    def __init__(self, num_ops: int = 2, magnitude: float = 14, ops: Sequence[str] = OPS,
                 interpolation: str = "nearest", fill: float = 0.0):
        if not isinstance(num_ops, int) or num_ops < 0:
            raise ConfigError(f"RandAugment num_ops must be an integer >= 0, got {num_ops!r}")
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ConfigError(f"RandAugment magnitude must be in [0, 30], got {magnitude!r}; "
                              "the paper's ViT uses 14")
        unknown = [op for op in ops if op not in OP_FUNCTIONS]
        if unknown or not ops:
            raise ConfigError(f"unknown or no RandAugment ops {unknown or list(ops)}; "
                              f"choose from: {', '.join(OPS)}")
        if interpolation not in ("nearest", "bilinear"):
            raise ConfigError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        if not 0 <= fill <= 1:
            raise ConfigError(f"fill must be a gray level in [0, 1], got {fill!r}")
        self.num_ops, self.magnitude = num_ops, float(magnitude)
        self.ops, self.interpolation, self.fill = tuple(ops), interpolation, float(fill)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented copy of `images` (uint8 or float in [0, 1], [B, C, H, W])."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"RandAugment needs images [B, C, H, W] with C = 1 or 3, got shape "
                            f"{tuple(images.shape)}; add/remove the batch or channel dimension")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise DataError(f"RandAugment needs uint8 or float images, got {images.dtype}; "
                            "convert them first")
        is_uint8 = images.dtype == torch.uint8
        # Half precision would round the blends visibly; compute in float32 (or float64).
        work = torch.float64 if images.dtype == torch.float64 else torch.float32
        x = images.to(work) / 255 if is_uint8 else images.to(work, copy=True)
        batch, m = x.shape[0], self.magnitude / MAX_MAGNITUDE
        for _ in range(self.num_ops):
            # Draw on the generator's device, then move: any generator works with any images.
            choice = torch.randint(len(self.ops), (batch,), generator=generator,
                                   device=generator.device).to(x.device)
            signs = (torch.randint(2, (batch,), generator=generator, device=generator.device)
                     .to(x.device) * 2 - 1)
            order = choice.argsort(stable=True)
            counts = torch.bincount(choice, minlength=len(self.ops)).tolist()  # one sync per layer
            for name, idx in zip(self.ops, order.split(counts)):
                if idx.numel() == 0 or name == "identity":
                    continue
                extra = ({"interpolation": self.interpolation, "fill": self.fill}
                         if name in GEOMETRIC else {})
                x[idx] = OP_FUNCTIONS[name](x[idx], m, signs[idx], **extra)
        if is_uint8:
            return (x * 255).round_().clamp_(0, 255).to(torch.uint8)
        return x.to(images.dtype)
