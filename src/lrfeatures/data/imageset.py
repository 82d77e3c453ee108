"""The in-memory image data set every image loader returns, its normalization and its splits.

`ImageDataset` holds a whole data set as uint8 [N, C, H, W] tensors on the CPU. `LoadOptions`
is what `load_image_dataset` hands every registered image loader (see data/registry.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import DataError
from ..seeding import generator

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class ImageDataset:
    """A whole image data set as uint8 [N, C, H, W] images and int64 [N] labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    name: str
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    class_names: list[str] | None = None  # readable names of `classes` where the source has them

    def to(self, device: str | torch.device) -> "ImageDataset":
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0..num_classes-1)."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])


@dataclass(frozen=True)
class LoadOptions:
    """The arguments of `load_image_dataset` that a registered image loader may use."""

    root: str | os.PathLike | None = None
    max_per_class: int | None = None
    seed: int = 0
    classes: list[str] | None = None
    sha256: str | None = None
    test_fraction: float = 0.2
    download: bool = True

    def path(self, arg: str) -> Path:
        """The PATH of a `name:PATH` spec; a relative one is taken under `root` when that is given."""
        path = Path(arg).expanduser()
        return Path(self.root) / path if self.root is not None and not path.is_absolute() else path


# ---------------------------------------------------------------- normalization

def normalize(x: torch.Tensor, mean: Iterable[float] | torch.Tensor = CIFAR_MEAN,
              std: Iterable[float] | torch.Tensor = CIFAR_STD, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """(x/255 - mean) / std per channel for uint8 [N, C, H, W]; float input is taken as [0, 1].

    In a hot loop pass mean/std as tensors already on x's device to skip a host-to-device copy.
    """
    if x.dtype == torch.uint8:
        x = x.to(dtype) / 255.0
    elif not x.is_floating_point():
        raise DataError(f"normalize got {x.dtype} images; pass uint8 (0..255) or float (0..1) images")
    mean_t, std_t = (torch.as_tensor(v if isinstance(v, torch.Tensor) else tuple(v), dtype=x.dtype,
                                     device=x.device).view(-1, 1, 1) for v in (mean, std))
    return (x - mean_t) / std_t


def channel_mean_std(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale (chunked, float64)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3)).cpu()
        squares += (part * part).sum(dim=(0, 2, 3)).cpu()
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ---------------------------------------------------------------- slicing and splitting

def first_per_class(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (in original order) of the first `n` samples of each class."""
    order = torch.sort(y, stable=True).indices
    sorted_y = y[order]
    start = torch.searchsorted(sorted_y, sorted_y, right=False)
    rank = torch.arange(len(y), device=y.device) - start
    return torch.sort(order[rank < n]).values


def keep_first_per_class(dataset: ImageDataset, n: int | None) -> ImageDataset:
    """`dataset` with only the first `n` images of each class in train and in test (all if None)."""
    if n is None:
        return dataset
    train_idx, test_idx = first_per_class(dataset.train_y, n), first_per_class(dataset.test_y, n)
    return dataclasses.replace(dataset, train_x=dataset.train_x[train_idx], train_y=dataset.train_y[train_idx],
                               test_x=dataset.test_x[test_idx], test_y=dataset.test_y[test_idx])


def stratified_split(y: torch.Tensor, fraction: float, seed: int, stream: str = "val_split"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of indices into (kept, held out); each class holds out round(fraction·n_c)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction {fraction} must be in (0, 1)")
    perm = torch.randperm(len(y), generator=generator("images", stream, seed))
    y_cpu = y.cpu()
    grouped = perm[torch.sort(y_cpu[perm], stable=True).indices]  # by class, random within class
    labels = y_cpu[grouped]
    rank = torch.arange(len(y)) - torch.searchsorted(labels, labels, right=False)
    counts = torch.bincount(y_cpu)
    n_out = torch.floor(counts.double() * fraction + 0.5).long()
    held = rank < n_out[labels]
    if not held.any() or held.all():
        raise DataError(f"a {fraction} split of {len(y)} images leaves one side empty; "
                        "change the fraction or use more images")
    return torch.sort(grouped[~held]).values, torch.sort(grouped[held]).values
