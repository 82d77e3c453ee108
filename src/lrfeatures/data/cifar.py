"""The official CIFAR-10 and CIFAR-100 python archives: found or downloaded, checksummed, parsed safely.

`cifar-10-python.tar.gz` and `cifar-100-python.tar.gz` are found in `root` (a folder, or the
archive file itself) or in $LRFEATURES_DATA (default ~/.cache/lrfeatures), and downloaded when
missing and allowed. Every archive is checksummed before anything in it is read: the official
MD5 by default, or the sha256 the user passes instead (for a mirror or a re-packed copy). The
pickled batches are parsed in memory with a restricted unpickler that only builds numpy arrays.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
import torch

from ..errors import DataError
from .files import check_unpacked_size, data_home, download_file, read_verified
from .imageset import ImageDataset, LoadOptions, keep_first_per_class


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
                check_unpacked_size(iter([files[member].size]), f"{where}:{member}")  # read whole: bounded first
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


def cifar_loader(name: str) -> Callable[[str, LoadOptions], ImageDataset]:
    """The registry loader of archive `name` ("cifar10" or "cifar100"), which takes no argument."""

    def load(arg: str, opts: LoadOptions) -> ImageDataset:
        """CIFAR from its archive, keeping the first `max_per_class` images of each class per split."""
        dataset = load_cifar(name, opts.root, opts.download, opts.sha256)
        return keep_first_per_class(dataset, opts.max_per_class)

    return load
