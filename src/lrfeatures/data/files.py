"""Files behind the image data sets: checksums, downloads, file trees (folder, tar, zip), decoding.

A file tree is read through a *source*: a directory, a tar archive (.tar, .tar.gz) or a zip
archive, all seen as posix relative paths with hidden parts (".DS_Store", "._x.jpg",
"__MACOSX/._y") skipped. `open_source` checks an archive's digest before anything in it is read,
and unpacks a gzip stream into a temp file, never past $LRFEATURES_MAX_UNPACKED_GB (a gzip bomb
stops there). `tree_fingerprint` is a tree's identity for the experiment store.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import IO, Iterator, Protocol

import numpy as np
import torch

from ..errors import DataError
from ..store.files import file_hash

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# What a damaged archive raises while its members are read (gzip.BadGzipFile is an OSError).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error)
MAX_UNPACKED_ENV = "LRFEATURES_MAX_UNPACKED_GB"
DEFAULT_MAX_UNPACKED_GB = 8.0


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


# ---------------------------------------------------------------- file trees

def visible(name: str) -> bool:
    """A path with no hidden part (like .DS_Store, ._x.jpg or .git/...)."""
    return not any(part.startswith(".") for part in name.split("/"))


def is_image_path(name: str) -> bool:
    """A visible .png/.jpg/.jpeg path (any letter case, e.g. Tiny ImageNet's .JPEG)."""
    return name.lower().endswith(IMAGE_SUFFIXES) and visible(name)


class Source(Protocol):
    """A file tree: its visible file names, and their bytes."""

    def names(self) -> list[str]:
        """Sorted relative posix paths of all visible files."""

    def read(self, names: list[str]) -> list[bytes]:
        """The bytes of each named file, in the order given."""


class DirSource:
    """Files under a directory, named by their relative posix paths."""

    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        """Relative paths of all visible files."""
        names = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in names if visible(n))

    def read(self, names: list[str]) -> list[bytes]:
        """The bytes of each named file."""
        return [(self.root / n).read_bytes() for n in names]


class TarSource:
    """Files inside a (decompressed) tar archive, read in archive order."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        # Plain string ops: pathlib costs seconds on the 60,000 members of a CIFAR-sized folder.
        self.members = {}
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isfile() and visible(name):
                self.members[name] = member

    def names(self) -> list[str]:
        """Member paths of all visible files."""
        return sorted(self.members)

    def read(self, names: list[str]) -> list[bytes]:
        """The bytes of each named member."""
        # Reading in offset order never seeks backwards, which keeps a large tar fast.
        by_offset = sorted(names, key=lambda n: self.members[n].offset)
        blobs = {n: self.tar.extractfile(self.members[n]).read() for n in by_offset}
        return [blobs[n] for n in names]


class ZipSource:
    """Files inside a zip archive (like the official tiny-imagenet-200.zip)."""

    def __init__(self, archive: zipfile.ZipFile):
        self.archive = archive
        self.members = {info.filename.removeprefix("./"): info for info in archive.infolist()
                        if not info.is_dir() and visible(info.filename.removeprefix("./"))}

    def names(self) -> list[str]:
        """Member paths of all visible files."""
        return sorted(self.members)

    def read(self, names: list[str]) -> list[bytes]:
        """The bytes of each named member."""
        return [self.archive.read(self.members[n]) for n in names]


def unpacked_limit() -> int:
    """Most bytes an archive may unpack to ($LRFEATURES_MAX_UNPACKED_GB, default 8): a gzip bomb stops there."""
    text = os.environ.get(MAX_UNPACKED_ENV, "")
    try:
        return int(float(text or DEFAULT_MAX_UNPACKED_GB) * 2**30)
    except ValueError:
        raise DataError(f"${MAX_UNPACKED_ENV}={text!r} must be a number of GiB") from None


def one_line(err: BaseException) -> str:
    """An exception's message on one line (tarfile's "not a tar archive" spans five)."""
    return " ".join(str(err).split())


def check_file_digest(path: Path, sha256: str | None) -> None:
    """Raise DataError unless the file has the given sha256 (read in blocks, never whole)."""
    if not sha256:
        return
    actual = file_hash(path)
    if actual != sha256.lower():
        raise DataError(f"{path} is corrupt or incomplete (sha256 {actual}, expected {sha256.lower()}); "
                        "delete it and download it again, or pass the sha256 of your own copy")


def gunzip_limited(path: Path, limit: int) -> IO[bytes]:
    """The decompressed content of a .gz file in an anonymous temp file, stopping past `limit` bytes."""
    out = tempfile.TemporaryFile()
    with gzip.open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            if out.tell() + len(block) > limit:
                out.close()
                raise DataError(f"{path} unpacks to more than {limit / 2**30:g} GiB; raise "
                                f"${MAX_UNPACKED_ENV} if it really is that large")
            out.write(block)
    out.seek(0)
    return out


def check_unpacked_size(sizes: Iterator[int], where: str) -> None:
    """Refuse an archive whose members declare more bytes than the unpacked limit."""
    limit = unpacked_limit()
    if sum(sizes) > limit:
        raise DataError(f"{where} unpacks to more than {limit / 2**30:g} GiB; raise ${MAX_UNPACKED_ENV} "
                        "if it really is that large")


def open_archive(path: Path, stack: contextlib.ExitStack) -> Source:
    """A zip or tar source over an archive file; gzip is inflated in a stream to a temp file, with a limit."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"PK\x03\x04":
        archive = stack.enter_context(zipfile.ZipFile(path))
        check_unpacked_size((info.file_size for info in archive.infolist()), str(path))
        return ZipSource(archive)
    if magic[:2] == b"\x1f\x8b":  # inflated once: member reads then seek in a plain file
        fileobj = stack.enter_context(gunzip_limited(path, unpacked_limit()))
        tar = stack.enter_context(tarfile.open(fileobj=fileobj, mode="r:"))
    else:
        tar = stack.enter_context(tarfile.open(path, mode="r:*"))
    source = TarSource(tar)
    check_unpacked_size((m.size for m in source.members.values()), str(path))
    return source


@contextlib.contextmanager
def open_source(path: Path, sha256: str | None, what: str, prefix: str) -> Iterator[Source]:
    """The file tree at `path`: a folder, or a tar/.tar.gz/zip archive whose sha256 is checked first.

    `what` and `prefix` name the tree in the error for a missing path ("image folder", "folder").
    """
    where = str(path)
    if path.is_dir():
        yield DirSource(path)
        return
    if not path.is_file():
        raise DataError(f"{what} {where} does not exist; check the path after '{prefix}:'")
    check_file_digest(path, sha256)
    with contextlib.ExitStack() as stack:
        try:
            source = open_archive(path, stack)
        except (*ARCHIVE_ERRORS, OSError) as err:
            raise DataError(f"{where} is neither a folder nor a readable tar or zip archive ({one_line(err)}); "
                            "give a folder or a .tar.gz or .zip of one") from None
        try:
            yield source
        except ARCHIVE_ERRORS as err:
            raise DataError(f"{where} is a damaged archive ({one_line(err)}); get a fresh copy") from None


def tree_fingerprint(path: Path) -> str:
    """The identity of a file tree: sha256 of an archive file, or of a folder's visible file names and contents."""
    if path.is_file():
        return "sha256:" + file_hash(path)
    if not path.is_dir():
        return ""
    digest = hashlib.sha256()
    source = DirSource(path)
    for name in source.names():
        digest.update(name.encode() + b"\0" + file_hash(path / name).encode() + b"\n")
    return "tree-sha256:" + digest.hexdigest()


def decode_images(blobs: list[bytes], names: list[str], where: str, rgb: bool = False) -> torch.Tensor:
    """Decode images of one size to uint8 [N, C, H, W]; grayscale becomes RGB if `rgb` or any is colour."""
    from PIL import Image, UnidentifiedImageError

    arrays, first = [], None
    for blob, name in zip(blobs, names):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
                image = image.convert("L" if gray and not rgb else "RGB")
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
