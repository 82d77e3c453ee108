"""Image data sets held whole as uint8 tensors, loaded by name through the data-set registry.

`load_image_dataset(spec, ...)` takes any registered image spec (data/registry.py):
- "cifar10", "cifar100": the official python archives, checksummed and safely parsed (data/cifar.py);
- "folder:PATH": `<class>/<image>` or `train|test/<class>/<image>` folders or archives (data/folder.py);
- "tinyimagenet:PATH": Tiny ImageNet in its official layout, val as the test split (data/tinyimagenet.py);
- "band-signal": ground-truth images whose class lives in one Fourier band (data/synthetic_images.py).

The optional validation split is seeded and stratified: each class gives round(fraction·n_c)
of its training images (at least one image must be chosen overall). This module also
re-exports the image data helpers from where they now live, so `data.images` stays the one
import for them.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import ConfigError, DataError
from .cifar import (CIFAR, CifarArchive, SafeUnpickler, load_cifar, locate_archive, parse_cifar_archive,
                    safe_loads)
from .files import IMAGE_SUFFIXES, check_digest, data_home, download_file, read_verified
from .folder import load_image_folder
from .imageset import (CIFAR_MEAN, CIFAR_STD, ImageDataset, LoadOptions, channel_mean_std, first_per_class,
                       normalize, stratified_split)
from .registry import dataset_entry
from .tinyimagenet import load_tiny_imagenet

__all__ = ["CIFAR", "CIFAR_MEAN", "CIFAR_STD", "IMAGE_SUFFIXES", "CifarArchive", "ImageDataset", "LoadOptions",
           "SafeUnpickler", "channel_mean_std", "check_digest", "data_home", "download_file", "first_per_class",
           "load_cifar", "load_image_dataset", "load_image_folder", "load_tiny_imagenet", "locate_archive",
           "normalize", "parse_cifar_archive", "read_verified", "safe_loads", "stratified_split"]


def load_image_dataset(spec: str, root: str | os.PathLike | None = None,
                       max_per_class: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                       download: bool = True, *, classes: list[str] | None = None,
                       sha256: str | None = None, test_fraction: float = 0.2) -> ImageDataset:
    """Load a registered image data set ("cifar10", "folder:PATH", ...) as one ImageDataset (on the CPU).

    max_per_class keeps the first N images of each class in each split; val_fraction > 0 moves a
    seeded, stratified part of the training set to val_x/val_y. sha256, if given, replaces the
    built-in MD5 check of an archive. `seed` seeds every random choice (a generated set, a flat
    folder's test split, the validation split). Sets other than CIFAR get their own mean/std
    from their training images.
    """
    if max_per_class is not None and (isinstance(max_per_class, bool) or max_per_class < 1):
        raise DataError(f"max_per_class={max_per_class!r} must be a positive whole number or None")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    try:
        entry, arg = dataset_entry(spec)
    except ConfigError as err:
        # Callers of this loader catch DataError; the config layer checks the spec itself earlier.
        raise DataError(str(err)) from None
    options = LoadOptions(root, max_per_class, seed, classes, sha256, test_fraction, download)
    dataset = entry.loader(arg, options)
    if val_fraction > 0:
        keep, held = stratified_split(dataset.train_y, val_fraction, seed)
        dataset = dataclasses.replace(
            dataset, train_x=dataset.train_x[keep], train_y=dataset.train_y[keep],
            val_x=dataset.train_x[held], val_y=dataset.train_y[held])
    if entry.train_stats:
        mean, std = channel_mean_std(dataset.train_x)
        dataset = dataclasses.replace(dataset, mean=mean, std=std)
    return dataset
