"""Image data sets held whole as uint8 tensors: CIFAR-10/100 archives and image folders.

Sources (`load_image_dataset(spec, ...)`):
- "cifar10", "cifar100": the official python archives (`cifar-10-python.tar.gz`,
  `cifar-100-python.tar.gz`), found in `root` (a folder, or the archive file itself) or in
  $LRFEATURES_DATA (default ~/.cache/lrfeatures), downloaded when missing and allowed.
  Every archive is checksummed before anything in it is read: the official MD5 by default,
  or the sha256 the user passes instead (for a mirror or a re-packed copy). The pickled
  batches are parsed in memory with a restricted unpickler that only builds numpy arrays.
- "folder:PATH": a folder or a .tar.gz of images, either `<class>/<image>` or
  `train/<class>/<image>` + `test/<class>/<image>` (one optional top folder is allowed).
  Classes are sorted by name unless `classes=` gives the order. PNG and JPEG, decoded with
  Pillow; all images must have one size. A flat folder has no test split, so a seeded,
  stratified `test_fraction` of it is held out as the test set.

The optional validation split is seeded and stratified: each class gives round(fraction·n_c)
of its training images (at least one image must be chosen overall).
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import DataError
from ..seeding import generator

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class CifarArchive:
    """Where an official CIFAR archive lives and how its batches are named."""

    filename: str
    url: str
    md5: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    meta_member: str
    label_key: str
    names_key: str


CIFAR = {
    "cifar10": CifarArchive(
        "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",), "batches.meta", "labels", "label_names"),
    "cifar100": CifarArchive(
        "cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", ("train",), ("test",), "meta",
        "fine_labels", "fine_label_names"),
}


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


# ---------------------------------------------------------------- checksums and download

def check_digest(data: bytes, where: str, md5: str | None = None, sha256: str | None = None) -> None:
    """Raise DataError unless `data` has the given sha256 (preferred) or md5."""
    if sha256:
        algo, expected, actual = "sha256", sha256.lower(), hashlib.sha256(data).hexdigest()
    elif md5:
        algo, expected, actual = "md5", md5.lower(), hashlib.md5(data, usedforsecurity=False).hexdigest()
    else:
        return
    if actual != expected:
        raise DataError(f"{where} is corrupt or incomplete ({algo} {actual}, expected {expected}); "
                        "delete it and download it again, or pass the sha256 of your own copy")


def read_verified(path: Path, md5: str | None = None, sha256: str | None = None) -> bytes:
    """The bytes of `path`, checked against a digest; the same bytes are then parsed."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    check_digest(data, str(path), md5, sha256)
    return data


def download_file(url: str, dest: Path, md5: str | None = None, sha256: str | None = None) -> None:
    """Download `url` to a temporary file next to `dest`, verify it, then rename it into place.

    A failed or corrupt download is deleted, so `dest` only ever holds a verified file.
    """
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    hashers = {"md5": hashlib.md5(usedforsecurity=False), "sha256": hashlib.sha256()}
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                size = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        for hasher in hashers.values():
                            hasher.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise DataError(f"could not download {url} ({err}); connect to the internet or put "
                            f"{dest.name} in {dest.parent} yourself (or pass root=)") from None
        algo, expected = ("sha256", sha256) if sha256 else ("md5", md5)
        if expected and hashers[algo].hexdigest() != expected.lower():
            raise DataError(f"download of {url} is corrupt ({algo} {hashers[algo].hexdigest()}, "
                            f"expected {expected}); it was deleted, try again")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def data_home() -> Path:
    """Where archives are found and downloaded by default: $LRFEATURES_DATA or ~/.cache/lrfeatures."""
    return Path(os.environ.get("LRFEATURES_DATA") or Path.home() / ".cache" / "lrfeatures")


def locate_archive(archive: CifarArchive, root: str | os.PathLike | None) -> Path:
    """The archive's path: `root` itself if it is a file, else `root`/filename (or the data home)."""
    base = Path(root).expanduser() if root is not None else data_home()
    return base if base.is_file() else base / archive.filename


# ---------------------------------------------------------------- restricted unpickling

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python-3 protocol-2 pickles store bytes; only latin-1 is allowed."""
    if encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _safe_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch may name: numpy array reconstruction and latin-1 bytes."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays, never arbitrary objects."""

    allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global only if it is on the allow list."""
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")
        return self.allowed[(module, name)]


def safe_loads(data: bytes, where: str) -> Any:
    """Unpickle `data` with SafeUnpickler; any failure is a DataError naming `where`."""
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001  (any unpickling failure means a bad file)
        raise DataError(f"{where} is not a valid CIFAR batch ({err}); use the official archive") from None


# ---------------------------------------------------------------- CIFAR archives

def _str_keys(obj: Any, where: str) -> dict[str, Any]:
    """A batch dict with its bytes keys decoded."""
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}, not a dict; use the official archive")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode_batch(obj: Any, label_key: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 3, 32, 32] images and int64 [n] labels from one CIFAR batch dict."""
    batch = _str_keys(obj, where)
    data, labels = batch.get("data"), batch.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise DataError(f"{where}: 'data' must be a uint8 [n, 3072] array; use the official archive")
    labels = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
    if labels is None or labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: {label_key!r} must list one integer label per image; "
                        "use the official archive")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), row by row.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def parse_cifar_archive(data: bytes, archive: CifarArchive, where: str = "archive"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(train_x, train_y, test_x, test_y, classes) from the bytes of a verified CIFAR archive."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            files = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def load(member: str) -> Any:
                """Unpickle one named batch of the archive."""
                if member not in files:
                    raise DataError(f"{where} has no member {member!r}; use the official "
                                    f"{archive.filename}")
                return safe_loads(tar.extractfile(files[member]).read(), f"{where}:{member}")

            meta = _str_keys(load(archive.meta_member), f"{where}:{archive.meta_member}")
            train = [_decode_batch(load(m), archive.label_key, f"{where}:{m}") for m in archive.train_members]
            test = [_decode_batch(load(m), archive.label_key, f"{where}:{m}") for m in archive.test_members]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(f"{where} is not a readable .tar.gz ({err}); download it again") from None
    names = meta.get(archive.names_key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: meta has no class name list {archive.names_key!r}; "
                        "use the official archive")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    train_x, train_y = (torch.cat(parts) for parts in zip(*train))
    test_x, test_y = (torch.cat(parts) for parts in zip(*test))
    for y in (train_y, test_y):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise DataError(f"{where}: labels fall outside 0..{len(classes) - 1}; use the official archive")
    return train_x, train_y, test_x, test_y, classes


def load_cifar(name: str, root: str | os.PathLike | None = None, download: bool = True,
               sha256: str | None = None) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from its official archive (found, or downloaded), checksummed first."""
    archive = CIFAR[name]
    path = locate_archive(archive, root)
    if not path.is_file():
        if not download:
            raise DataError(f"{path} does not exist; put {archive.filename} there, pass root= "
                            "pointing at it, or allow downloading")
        download_file(archive.url, path, md5=archive.md5, sha256=sha256)
    data = read_verified(path, md5=archive.md5, sha256=sha256)
    train_x, train_y, test_x, test_y, classes = parse_cifar_archive(data, archive, str(path))
    return ImageDataset(train_x, train_y, test_x, test_y, classes, name)


# ---------------------------------------------------------------- image folders

class _DirSource:
    """Image files under a directory, named by their relative posix paths."""

    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        """Relative paths of all image files (hidden files skipped)."""
        names = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in names if _is_image_path(n))

    def read(self, names: list[str]) -> list[bytes]:
        """The bytes of each named file."""
        return [(self.root / n).read_bytes() for n in names]


class _TarSource:
    """Image files inside a (decompressed) tar archive, read in archive order."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        # Plain string ops: pathlib costs seconds on the 60,000 members of a CIFAR-sized folder.
        self.members = {}
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isfile() and _is_image_path(name):
                self.members[name] = member

    def names(self) -> list[str]:
        """Member paths of all image files."""
        return sorted(self.members)

    def read(self, names: list[str]) -> list[bytes]:
        """The bytes of each named member."""
        by_offset = sorted(names, key=lambda n: self.members[n].offset)
        blobs = {n: self.tar.extractfile(self.members[n]).read() for n in by_offset}
        return [blobs[n] for n in names]


def _is_image_path(name: str) -> bool:
    """A .png/.jpg/.jpeg path with no hidden part (like .DS_Store or ._x.jpg)."""
    return name.lower().endswith(IMAGE_SUFFIXES) and not any(p.startswith(".") for p in name.split("/"))


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


def _decode_images(blobs: list[bytes], names: list[str], where: str) -> torch.Tensor:
    """Decode images to uint8 [N, C, H, W]; grayscale is widened to RGB if any image is colour."""
    from PIL import Image, UnidentifiedImageError

    arrays, first = [], None
    for blob, name in zip(blobs, names):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
                array = np.asarray(image)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"{where}: cannot decode {name} ({err}); remove or re-save it") from None
        if first is None:
            first = (name, array.shape[:2])
        elif array.shape[:2] != first[1]:
            raise DataError(f"{where} mixes image sizes: {first[0]} is {first[1][1]}x{first[1][0]} but "
                            f"{name} is {array.shape[1]}x{array.shape[0]}; resize all images to one size")
        arrays.append(array if array.ndim == 3 else array[:, :, None])
    channels = max(a.shape[2] for a in arrays)
    stacked = np.stack([np.broadcast_to(a, a.shape[:2] + (channels,)) for a in arrays])
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))


def _select(groups: dict[str, list[str]], classes: list[str], max_per_class: int | None
            ) -> tuple[list[str], list[int]]:
    """Files and labels of one split, the first `max_per_class` files of each class by name."""
    files, labels = [], []
    for label, cls in enumerate(classes):
        chosen = sorted(groups.get(cls, []))[:max_per_class]
        files += chosen
        labels += [label] * len(chosen)
    return files, labels


def load_image_folder(path: str | os.PathLike, classes: list[str] | None = None,
                      max_per_class: int | None = None, sha256: str | None = None,
                      test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """An image folder (directory or .tar.gz); a flat one is split into train/test by `test_fraction`."""
    path = Path(path).expanduser()
    where = str(path)
    if path.is_dir():
        source, tar = _DirSource(path), None
    elif path.is_file():
        data = read_verified(path, sha256=sha256)
        try:
            # Inflate once up front: member reads then seek in memory instead of re-inflating.
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{where} is neither a folder nor a readable tar archive ({err}); "
                            "give a folder or a .tar.gz of one") from None
        source = _TarSource(tar)
    else:
        raise DataError(f"image folder {where} does not exist; check the path after 'folder:'")
    try:
        groups = _layout(source.names(), where)
        order = _class_order(groups, classes, where)
        split_files = {split: _select(groups[split], order, max_per_class)
                       for split in ("train", "test", "all") if split in groups}
        for split, (files, _) in split_files.items():
            if not files:
                raise DataError(f"{where}: the {split} split holds no images; add some")
        names = [n for files, _ in split_files.values() for n in files]
        images = _decode_images(source.read(names), names, where)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise DataError(f"{where} is a damaged archive ({err}); get a fresh copy") from None
    finally:
        if tar is not None:
            tar.close()
    sizes = [len(files) for files, _ in split_files.values()]
    parts = dict(zip(split_files, torch.split(images, sizes)))
    labels = {s: torch.tensor(y, dtype=torch.int64) for s, (_, y) in split_files.items()}
    if "all" in parts:
        train_idx, test_idx = stratified_split(labels["all"], test_fraction, seed, "test_split")
        train_x, train_y = parts["all"][train_idx], labels["all"][train_idx]
        test_x, test_y = parts["all"][test_idx], labels["all"][test_idx]
    else:
        train_x, train_y, test_x, test_y = parts["train"], labels["train"], parts["test"], labels["test"]
    name = f"folder:{path.name}"
    return ImageDataset(train_x, train_y, test_x, test_y, order, name)


# ---------------------------------------------------------------- slicing and splitting

def first_per_class(y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (in original order) of the first `n` samples of each class."""
    order = torch.sort(y, stable=True).indices
    sorted_y = y[order]
    start = torch.searchsorted(sorted_y, sorted_y, right=False)
    rank = torch.arange(len(y), device=y.device) - start
    return torch.sort(order[rank < n]).values


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


# ---------------------------------------------------------------- entry point

def load_image_dataset(spec: str, root: str | os.PathLike | None = None,
                       max_per_class: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                       download: bool = True, *, classes: list[str] | None = None,
                       sha256: str | None = None, test_fraction: float = 0.2) -> ImageDataset:
    """Load "cifar10", "cifar100" or "folder:PATH" as one ImageDataset (on the CPU).

    max_per_class keeps the first N images of each class in each split; val_fraction > 0 moves a
    seeded, stratified part of the training set to val_x/val_y. sha256, if given, replaces the
    built-in MD5 check. Folder data sets get their own mean/std from their training images.
    """
    if max_per_class is not None and (isinstance(max_per_class, bool) or max_per_class < 1):
        raise DataError(f"max_per_class={max_per_class!r} must be a positive whole number or None")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if spec in CIFAR:
        dataset = load_cifar(spec, root, download, sha256)
        if max_per_class is not None:
            train_idx = first_per_class(dataset.train_y, max_per_class)
            test_idx = first_per_class(dataset.test_y, max_per_class)
            dataset = dataclasses.replace(
                dataset, train_x=dataset.train_x[train_idx], train_y=dataset.train_y[train_idx],
                test_x=dataset.test_x[test_idx], test_y=dataset.test_y[test_idx])
    elif spec.startswith("folder:") and spec[len("folder:"):]:
        path = Path(spec[len("folder:"):]).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        dataset = load_image_folder(path, classes, max_per_class, sha256, test_fraction, seed)
    else:
        raise DataError(f"unknown image data set {spec!r}; choose one of: cifar10, cifar100, folder:PATH")
    if val_fraction > 0:
        keep, held = stratified_split(dataset.train_y, val_fraction, seed)
        dataset = dataclasses.replace(
            dataset, train_x=dataset.train_x[keep], train_y=dataset.train_y[keep],
            val_x=dataset.train_x[held], val_y=dataset.train_y[held])
    if spec not in CIFAR:
        mean, std = channel_mean_std(dataset.train_x)
        dataset = dataclasses.replace(dataset, mean=mean, std=std)
    return dataset
