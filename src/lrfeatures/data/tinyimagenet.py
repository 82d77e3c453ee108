"""Tiny ImageNet (`tinyimagenet:PATH`) in its official layout; its labelled `val` split is the test set.

    PATH/train/<wnid>/images/*.JPEG      training images (<wnid>_boxes.txt beside them is ignored)
    PATH/val/images/*.JPEG               validation images, labelled by
    PATH/val/val_annotations.txt         tab-separated: file name, wnid, bbox x0 y0 x1 y1
    PATH/wnids.txt                       optional: the class order (else the sorted train wnids)
    PATH/words.txt                       optional: wnid <tab> readable names (-> class_names)

PATH may also be a .zip (like the official tiny-imagenet-200.zip) or a .tar(.gz) of that tree,
with one optional top folder. The unlabelled PATH/test/ is ignored. Images are 64x64 in the
official release (any one size is accepted); its few grayscale JPEGs are widened to RGB.
`classes=` picks a subset of wnids in the given order; `max_per_class` keeps the first N
files of each class by name, in train and in val.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .files import Source, is_image_path, open_source
from .folder import decode_splits, select_per_class
from .imageset import ImageDataset, LoadOptions

EXPECTED = "expected train/<wnid>/images/*.JPEG and val/images + val/val_annotations.txt"


def _refuse(where: str, why: str) -> DataError:
    """The one-line error for a tree that is not laid out like Tiny ImageNet."""
    return DataError(f"{where} is not a Tiny ImageNet folder ({why}): {EXPECTED}")


def _text(source: Source, name: str, where: str) -> list[str]:
    """The non-empty lines of a small text file of the tree."""
    try:
        text = source.read([name])[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(where, f"{name} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _top(names: list[str], where: str) -> str:
    """The tree's top folder ("" or "top/"), found by its val/val_annotations.txt."""
    tops = sorted(n[: -len("val/val_annotations.txt")] for n in names
                  if n.split("/")[-2:] == ["val", "val_annotations.txt"] and n.count("/") <= 2)
    if len(tops) != 1:
        raise _refuse(where, f"several trees: {tops}" if tops else "no val/val_annotations.txt")
    return tops[0]


def _train_groups(names: list[str], top: str, where: str) -> dict[str, list[str]]:
    """{wnid: training image paths} from top/train/<wnid>/images/*."""
    groups: dict[str, list[str]] = {}
    for name in names:
        if name.startswith(top + "train/") and is_image_path(name):
            parts = name[len(top):].split("/")
            if len(parts) != 4 or parts[2] != "images":
                raise _refuse(where, f"training image {name} is not in train/<wnid>/images/")
            groups.setdefault(parts[1], []).append(name)
    if not groups:
        raise _refuse(where, "no images in train/<wnid>/images/")
    return groups


def _val_groups(source: Source, names: list[str], top: str, where: str) -> dict[str, list[str]]:
    """{wnid: validation image paths} as val/val_annotations.txt labels them."""
    present, groups = set(names), {}
    annotations = f"{top}val/val_annotations.txt"
    for number, line in enumerate(_text(source, annotations, where), 1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise _refuse(where, f"line {number} of {annotations} has no tab-separated file name and wnid")
        file = f"{top}val/images/{fields[0]}"
        if file not in present:
            raise _refuse(where, f"{annotations} names {fields[0]} but {top}val/images/ has no such file")
        groups.setdefault(fields[1], []).append(file)
    return groups


def _class_order(source: Source, names: list[str], top: str, train: dict[str, list[str]],
                 val: dict[str, list[str]], where: str) -> list[str]:
    """All wnids in label order: wnids.txt if present (it must match train/), else sorted."""
    if f"{top}wnids.txt" in names:
        order = _text(source, f"{top}wnids.txt", where)
        missing, unlisted = sorted(set(order) - set(train)), sorted(set(train) - set(order))
        if missing:
            raise _refuse(where, f"wnids.txt lists {missing[0]} but train/{missing[0]}/images/ holds no images")
        if unlisted:
            raise _refuse(where, f"train/{unlisted[0]} is not listed in wnids.txt")
        if len(set(order)) != len(order):
            raise _refuse(where, "wnids.txt lists a wnid twice")
    else:
        order = sorted(train)
    unknown = sorted(set(val) - set(order))
    if unknown:
        raise _refuse(where, f"val_annotations.txt names wnid {unknown[0]}, which has no train/{unknown[0]}/images")
    return order


def _subset(order: list[str], classes: list[str] | None, where: str) -> list[str]:
    """The chosen wnids: `classes` (a subset of `order`, in the order given), else all."""
    if classes is None:
        return order
    known = set(order)
    unknown = [c for c in classes if c not in known]
    if unknown or len(set(classes)) != len(classes) or not classes:
        raise DataError(f"{where}: classes= must list distinct wnids of its train/ folders "
                        f"(unknown: {unknown[:3]}); see its wnids.txt")
    return list(classes)


def _words(source: Source, names: list[str], top: str, wnids: list[str], where: str) -> list[str] | None:
    """The readable name of each wnid from words.txt (the wnid itself where it has none), if present."""
    if f"{top}words.txt" not in names:
        return None
    words = dict(line.split("\t", 1) for line in _text(source, f"{top}words.txt", where) if "\t" in line)
    return [words.get(w, w).strip() for w in wnids]


def load_tiny_imagenet(path: str | os.PathLike, classes: list[str] | None = None,
                       max_per_class: int | None = None, sha256: str | None = None) -> ImageDataset:
    """Tiny ImageNet from a folder or archive in the official layout; `val` becomes the test split."""
    path = Path(path).expanduser()
    where = str(path)
    with open_source(path, sha256, "Tiny ImageNet folder", "tinyimagenet") as source:
        names = source.names()
        top = _top(names, where)
        train, val = _train_groups(names, top, where), _val_groups(source, names, top, where)
        order = _subset(_class_order(source, names, top, train, val, where), classes, where)
        split_files = {"train": select_per_class(train, order, max_per_class),
                       "test": select_per_class(val, order, max_per_class)}
        parts, labels = decode_splits(source, split_files, where, rgb=True)
        class_names = _words(source, names, top, order, where)
    return ImageDataset(parts["train"], labels["train"], parts["test"], labels["test"], order,
                        f"tinyimagenet:{path.name}", class_names=class_names)


def load_tiny_imagenet_entry(arg: str, opts: LoadOptions) -> ImageDataset:
    """The registry loader of `tinyimagenet:PATH` (a relative PATH is taken under `root`)."""
    return load_tiny_imagenet(opts.path(arg), opts.classes, opts.max_per_class, opts.sha256)
