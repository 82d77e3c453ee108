"""Image folders (`folder:PATH`): `<class>/<image>` or `train|test/<class>/<image>` trees.

PATH is a folder or a .tar(.gz) or .zip of one (one optional top folder is allowed). Classes are
sorted by name unless `classes=` gives the order. PNG and JPEG, decoded with Pillow; all images
must have one size. A flat folder has no test split, so a seeded, stratified `test_fraction` of
it is held out as the test set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DataError
from .files import Source, decode_images, is_image_path, open_source
from .imageset import ImageDataset, LoadOptions, stratified_split


def _layout(names: list[str], where: str) -> dict[str, dict[str, list[str]]]:
    """Group image paths as {split: {class: sorted files}}; split is 'train'/'test' or 'all'."""
    if not names:
        raise DataError(f"{where} holds no .png/.jpg/.jpeg images; point it at <class>/<image> "
                        "or train|test/<class>/<image> folders")
    parts = [tuple(n.split("/")) for n in names]
    split_layout = all(len(p) >= 3 and p[-3] in ("train", "test") for p in parts) and \
        len({p[:-3] for p in parts}) == 1
    flat_layout = all(len(p) >= 2 for p in parts) and len({p[:-2] for p in parts}) == 1
    if not (split_layout or flat_layout):
        raise DataError(f"{where} mixes folder depths (e.g. {names[0]!r}, {names[-1]!r}); lay it out as "
                        "<class>/<image> or train|test/<class>/<image>")
    groups: dict[str, dict[str, list[str]]] = {}
    for name, p in zip(names, parts):
        split = p[-3] if split_layout else "all"
        groups.setdefault(split, {}).setdefault(p[-2], []).append(name)
    if split_layout and set(groups) != {"train", "test"}:
        raise DataError(f"{where} has only a {next(iter(groups))}/ folder; add the other of "
                        "train/ and test/, or use a flat <class>/<image> folder")
    return groups


def _class_order(groups: dict[str, dict[str, list[str]]], classes: list[str] | None, where: str
                 ) -> list[str]:
    """The label order: `classes` if given (it must match the folders), else sorted names."""
    found = sorted(set().union(*(g.keys() for g in groups.values())))
    if classes is None:
        return found
    missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    if missing or extra or len(set(classes)) != len(classes):
        raise DataError(f"{where}: classes= does not match its class folders (missing {missing}, "
                        f"unlisted {extra}); list every class folder exactly once")
    return list(classes)


def select_per_class(groups: dict[str, list[str]], classes: list[str], max_per_class: int | None
                     ) -> tuple[list[str], list[int]]:
    """Files and labels of one split, the first `max_per_class` files of each class by name."""
    files, labels = [], []
    for label, cls in enumerate(classes):
        chosen = sorted(groups.get(cls, []))[:max_per_class]
        files += chosen
        labels += [label] * len(chosen)
    return files, labels


def decode_splits(source: Source, split_files: dict[str, tuple[list[str], list[int]]], where: str,
                  rgb: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({split: uint8 images}, {split: int64 labels}) of each split's chosen files, decoded in one pass."""
    for split, (files, _) in split_files.items():
        if not files:
            raise DataError(f"{where}: the {split} split holds no images; add some")
    # One pass over all splits, so that mixed sizes are caught across train and test too.
    names = [n for files, _ in split_files.values() for n in files]
    images = decode_images(source.read(names), names, where, rgb=rgb)
    sizes = [len(files) for files, _ in split_files.values()]
    parts = dict(zip(split_files, torch.split(images, sizes)))
    labels = {s: torch.tensor(y, dtype=torch.int64) for s, (_, y) in split_files.items()}
    return parts, labels


def load_image_folder(path: str | os.PathLike, classes: list[str] | None = None,
                      max_per_class: int | None = None, sha256: str | None = None,
                      test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """An image folder (directory or archive); a flat one is split into train/test by `test_fraction`."""
    path = Path(path).expanduser()
    where = str(path)
    with open_source(path, sha256, "image folder", "folder") as source:
        groups = _layout([n for n in source.names() if is_image_path(n)], where)
        order = _class_order(groups, classes, where)
        split_files = {split: select_per_class(groups[split], order, max_per_class)
                       for split in ("train", "test", "all") if split in groups}
        parts, labels = decode_splits(source, split_files, where)
    if "all" in parts:
        train_idx, test_idx = stratified_split(labels["all"], test_fraction, seed, "test_split")
        train_x, train_y = parts["all"][train_idx], labels["all"][train_idx]
        test_x, test_y = parts["all"][test_idx], labels["all"][test_idx]
    else:
        train_x, train_y, test_x, test_y = parts["train"], labels["train"], parts["test"], labels["test"]
    return ImageDataset(train_x, train_y, test_x, test_y, order, f"folder:{path.name}")


def load_folder_entry(arg: str, opts: LoadOptions) -> ImageDataset:
    """The registry loader of `folder:PATH` (a relative PATH is taken under `root`)."""
    return load_image_folder(opts.path(arg), opts.classes, opts.max_per_class, opts.sha256,
                             opts.test_fraction, opts.seed)
