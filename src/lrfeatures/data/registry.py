"""Data-set registry: name -> `DatasetEntry` (loader plus metadata), timm style.

A spec names an entry, with an argument after a colon for the sets that take a path:
"cifar10", "band-signal", "folder:PATH", "tinyimagenet:PATH". Each entry records its
`input_kind` ("image": uint8 [N, C, H, W] ImageDatasets; "vector": the flat 2-D shape features
of SPEC §3), whether it takes a path, its loader and a one-line description. Loaders:

- image: `loader(arg: str, opts: LoadOptions) -> ImageDataset`, where `arg` is the text after
  the colon ("" for sets without a path) and `opts` carries root, max_per_class, seed,
  classes, sha256, test_fraction and download. Call them through `load_image_dataset`
  (data/images.py), which adds the validation split and the normalization statistics.
- vector: `loader(cfg: SyntheticDataConfig, seed: int) -> SyntheticData`, the shape's
  `make_synthetic` (data.shape keeps naming the shape; `get_shape`/`SHAPES` are unchanged).

The built-in sets are registered at the bottom of this module; the loader modules below it
know nothing of the registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..config import SyntheticDataConfig
from ..errors import ConfigError
from .band_redundant import load_bands_redundant
from .cifar import CIFAR, cifar_loader
from .files import tree_fingerprint
from .folder import load_folder_entry
from .imageset import LoadOptions
from .synthetic import SHAPES, SyntheticData, make_synthetic
from .synthetic_images import load_band_signal
from .tinyimagenet import load_tiny_imagenet_entry

__all__ = ["DATASETS", "DatasetEntry", "LoadOptions", "dataset_entry", "dataset_fingerprint", "dataset_names",
           "image_dataset_names", "register_dataset"]

INPUT_KINDS = {"vector": "flat 2-D shape features (data.shape)", "image": "uint8 images (data.dataset)"}
CONFIG_KEYS = {"vector": "data.shape", "image": "data.dataset"}  # the config field that names a set
Loader = Callable[..., Any]


@dataclass(frozen=True)
class DatasetEntry:
    """One registered data set: how to load it and what it is."""

    name: str
    input_kind: str                 # "vector" or "image"
    loader: Loader
    takes_path: bool = False        # spec is "name:PATH"
    description: str = ""
    train_stats: bool = True        # image sets: mean/std from the training images (else the loader's)

    @property
    def spec_form(self) -> str:
        """How a spec names it: "cifar10", or "folder:PATH" for a set that takes a path."""
        return f"{self.name}:PATH" if self.takes_path else self.name


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, input_kind: str, loader: Loader | None = None, takes_path: bool = False,
                     description: str = "", *, train_stats: bool = True) -> Any:
    """Register `loader` under `name`; without a loader, a decorator that registers the function."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"register_dataset({name!r}): input_kind must be one of {', '.join(INPUT_KINDS)}")
    if not name or ":" in name or name in DATASETS:
        raise ValueError(f"register_dataset({name!r}): the name must be new, non-empty and without ':'")

    def wrap(function: Loader) -> Loader:
        """Record `function` as the entry's loader; its docstring's first line is the default description."""
        doc = (function.__doc__ or "").strip().splitlines()
        DATASETS[name] = DatasetEntry(name, input_kind, function, takes_path,
                                      description or (doc[0] if doc else ""), train_stats)
        return function

    return wrap if loader is None else wrap(loader)


def dataset_names(input_kind: str = "image") -> list[str]:
    """Sorted spec forms ("cifar10", "folder:PATH", ...) of the registered sets of one input kind."""
    return sorted(e.spec_form for e in DATASETS.values() if e.input_kind == input_kind)


def image_dataset_names() -> list[str]:
    """Sorted spec forms of the registered image data sets (for CLI help and error messages)."""
    return dataset_names("image")


def dataset_entry(spec: str, input_kind: str = "image") -> tuple[DatasetEntry, str]:
    """(entry, argument) of a spec "name" or "name:ARG"; a one-line ConfigError if it is not usable."""
    key = CONFIG_KEYS.get(input_kind, "data.dataset")
    name, colon, arg = spec.partition(":")
    entry = DATASETS.get(name)
    if entry is None or entry.input_kind != input_kind:
        kind = f" is a {entry.input_kind} data set, not an {input_kind} one" if entry else " is unknown"
        raise ConfigError(f"{key}={spec!r}{kind}; use one of: {', '.join(dataset_names(input_kind))}")
    if entry.takes_path and not arg:
        raise ConfigError(f"{key}={spec!r} needs a path; write {name}:PATH")
    if colon and not entry.takes_path:
        raise ConfigError(f"{key}={spec!r} takes no argument; write {name}")
    return entry, arg


def dataset_fingerprint(spec: str, root: str | None = None, sha256: str | None = None) -> str:
    """The identity of an image set's files: CIFAR's md5 (or the given sha256), a folder's file names and
    contents, an archive's sha256; "" for generated sets (their config is their identity)."""
    entry, arg = dataset_entry(spec)
    if entry.name in CIFAR:
        return f"{entry.name}:" + (f"sha256:{sha256.lower()}" if sha256 else f"md5:{CIFAR[entry.name].md5}")
    if entry.takes_path:
        return tree_fingerprint(LoadOptions(root=root).path(arg).expanduser())
    return ""


def _shape_loader(name: str) -> Callable[[SyntheticDataConfig, int], SyntheticData]:
    """The vector loader of shape `name`: make_synthetic with data.shape set to it."""

    def load(cfg: SyntheticDataConfig, seed: int) -> SyntheticData:
        """Train, test and probe sets of this shape for data seed `seed`."""
        return make_synthetic(dataclasses.replace(cfg, shape=name), seed)

    return load


# ---------------------------------------------------------------- built-in data sets

for _name, _title in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")):
    # train_stats=False: CIFAR keeps the SPEC's fixed mean/std (CIFAR_MEAN, CIFAR_STD).
    register_dataset(_name, "image", cifar_loader(_name), train_stats=False,
                     description=f"{_title} from its official python archive (downloaded when missing)")
register_dataset("folder", "image", load_folder_entry, takes_path=True,
                 description="an image folder or archive: <class>/<image> or train|test/<class>/<image>")
register_dataset("tinyimagenet", "image", load_tiny_imagenet_entry, takes_path=True,
                 description="Tiny ImageNet (official layout, folder or archive); val is the test split")
register_dataset("band-signal", "image", load_band_signal,
                 description="ground-truth 32x32 images whose class lives only in the mid Fourier band")
register_dataset("bands-redundant", "image", load_bands_redundant,
                 description="16x16 images whose class is carried by the low, mid and high bands at once")
for _shape in SHAPES.values():
    register_dataset(_shape.name, "vector", _shape_loader(_shape.name),
                     description=f"2-D shape '{_shape.name}': {(_shape.__doc__ or '').strip().splitlines()[0]}")
