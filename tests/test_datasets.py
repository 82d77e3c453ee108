"""The data-set registry and its sets: Tiny ImageNet, CIFAR-100 on a fake archive, band-signal."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lrfeatures.data import registry
from lrfeatures.data.images import CIFAR_MEAN, ImageDataset, first_per_class, load_image_dataset
from lrfeatures.data.registry import DATASETS, dataset_entry, image_dataset_names, register_dataset
from lrfeatures.data.synthetic import make_synthetic
from lrfeatures.data.synthetic_images import BandSignalConfig, make_band_signal_images
from lrfeatures.data.tinyimagenet import load_tiny_imagenet
from lrfeatures.config import SyntheticDataConfig
from lrfeatures.errors import ConfigError, DataError

IMAGE_SETS = ["band-signal", "bands-redundant", "cifar10", "cifar100", "folder:PATH", "tinyimagenet:PATH"]
TINY_LAYOUT = "train/<wnid>/images/*.JPEG and val/images + val/val_annotations.txt"


def one_line(err: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be a single line."""
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- Tiny ImageNet

def save_jpeg(path: Path, size: tuple[int, int], value: int, gray: bool = False) -> None:
    """A JPEG whose pixels depend on position and `value` (grayscale if `gray`)."""
    from PIL import Image

    w, h = size
    grid = (np.arange(h)[:, None] * 9 + np.arange(w)[None, :] * 5 + 17 * value) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.fromarray(grid.astype(np.uint8), "L").save(path, "JPEG")
    else:
        rgb = np.stack([grid, 255 - grid, (grid + 80) % 256], -1).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(path, "JPEG")


def decoded(path: Path) -> torch.Tensor:
    """The uint8 [3, H, W] pixels Pillow decodes from `path`, as RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy())


WNIDS = ["n03", "n01", "n02"]  # wnids.txt order, deliberately not sorted


def make_tiny(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (8, 8),
              wnids_file: bool = True) -> Path:
    """A fake Tiny ImageNet tree: 3 wnids x n_train train images, n_val val images each, one grayscale."""
    for c, wnid in enumerate(WNIDS):
        for i in range(n_train):
            save_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", size, 10 * c + i,
                      gray=(wnid, i) == ("n01", 0))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t4\t4\n")
    lines = []
    for k in range(n_val * len(WNIDS)):
        wnid = WNIDS[k % len(WNIDS)]
        save_jpeg(root / "val" / "images" / f"val_{k}.JPEG", size, 100 + k)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t1\t6\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    save_jpeg(root / "test" / "images" / "test_0.JPEG", size, 200)  # unlabelled: ignored
    if wnids_file:
        (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\nn03\tbullfrog\n"
                                    "n99\tnot in this set\n")
    return root


def test_tiny_imagenet_official_layout(tmp_path):
    root = make_tiny(tmp_path / "tiny")
    ds = load_image_dataset(f"tinyimagenet:{root}")
    assert ds.classes == WNIDS and ds.name == "tinyimagenet:tiny"
    assert ds.class_names == ["bullfrog", "goldfish, Carassius auratus", "salamander"]
    assert ds.train_x.shape == (12, 3, 8, 8) and ds.train_x.dtype == torch.uint8
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test_x.shape == (6, 3, 8, 8) and ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(ds.train_x[5], decoded(root / "train" / "n01" / "images" / "n01_1.JPEG"))
    gray = ds.train_x[4]  # n01_0.JPEG is grayscale: widened to three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # val_k is labelled WNIDS[k % 3]: class n03 holds val_0 and val_3, in name order
    assert torch.equal(ds.test_x[1], decoded(root / "val" / "images" / "val_3.JPEG"))
    assert ds.mean != CIFAR_MEAN  # statistics of its own training images
    (root / "wnids.txt").unlink()
    assert load_tiny_imagenet(root).classes == sorted(WNIDS)


def test_tiny_imagenet_classes_subset_and_max_per_class(tmp_path):
    root = make_tiny(tmp_path / "tiny")
    ds = load_tiny_imagenet(root, classes=["n02", "n01"], max_per_class=2)
    assert ds.classes == ["n02", "n01"] and ds.train_y.tolist() == [0, 0, 1, 1]
    assert ds.test_y.tolist() == [0, 0, 1, 1]
    full = load_tiny_imagenet(root)
    assert torch.equal(ds.train_x[:2], full.train_x[8:10]) and torch.equal(ds.train_x[2:], full.train_x[4:6])
    only_gray = load_tiny_imagenet(root, classes=["n01"], max_per_class=1)
    assert only_gray.input_shape == (3, 8, 8)  # RGB even when every chosen image is grayscale
    with pytest.raises(DataError, match="classes=") as info:
        load_tiny_imagenet(root, classes=["n01", "n07"])
    assert "n07" in one_line(info)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_tiny_imagenet_archive_matches_the_folder(tmp_path, kind):
    root = make_tiny(tmp_path / "tiny-imagenet-200")
    archive = tmp_path / f"tiny.{kind}"
    if kind == "zip":  # like the official tiny-imagenet-200.zip: one top folder
        with zipfile.ZipFile(archive, "w") as out:
            for path in sorted(root.rglob("*")):
                out.write(path, path.relative_to(tmp_path).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as out:
            out.add(root, arcname="tiny-imagenet-200")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    from_dir = load_tiny_imagenet(root, max_per_class=3)
    from_archive = load_tiny_imagenet(archive, max_per_class=3, sha256=sha)
    assert torch.equal(from_dir.train_x, from_archive.train_x) and torch.equal(from_dir.test_y, from_archive.test_y)
    with pytest.raises(DataError, match="corrupt"):
        load_tiny_imagenet(archive, sha256="0" * 64)


def test_tiny_imagenet_relative_path_is_taken_under_root(tmp_path):
    make_tiny(tmp_path / "tiny", n_train=2, n_val=1)
    ds = load_image_dataset("tinyimagenet:tiny", root=tmp_path, val_fraction=0.5, seed=0)
    assert ds.train_x.shape[0] == 3 and ds.val_x.shape[0] == 3 and ds.test_x.shape[0] == 3


def test_tiny_imagenet_mixed_sizes_name_two_files_in_one_line(tmp_path):
    root = make_tiny(tmp_path / "tiny", n_train=2, n_val=1)
    save_jpeg(root / "train" / "n02" / "images" / "n02_1.JPEG", (10, 6), 0)
    with pytest.raises(DataError, match="mixes image sizes") as info:
        load_image_dataset(f"tinyimagenet:{root}")
    message = one_line(info)
    assert "n03_0.JPEG is 8x8" in message and "n02_1.JPEG is 10x6" in message


def test_folder_mixed_sizes_is_one_line(tmp_path):
    save_jpeg(tmp_path / "a" / "0.jpg", (8, 8), 0)
    save_jpeg(tmp_path / "b" / "0.jpg", (6, 8), 1)
    with pytest.raises(DataError, match="mixes image sizes") as info:
        load_image_dataset(f"folder:{tmp_path}")
    message = one_line(info)
    assert "a/0.jpg is 8x8" in message and "b/0.jpg is 6x8" in message


def drop_annotations(root: Path) -> None:
    """Remove val/val_annotations.txt."""
    (root / "val" / "val_annotations.txt").unlink()


def flatten_train(root: Path) -> None:
    """Move train/<wnid>/images/* up into train/<wnid>/ (no images/ folder)."""
    for images in (root / "train").glob("*/images"):
        for path in images.iterdir():
            path.rename(images.parent / path.name)
        images.rmdir()


def unknown_wnid(root: Path) -> None:
    """Label one val image with a wnid that has no train folder."""
    path = root / "val" / "val_annotations.txt"
    path.write_text(path.read_text().replace("val_0.JPEG\tn03", "val_0.JPEG\tn77"))


def missing_class_folder(root: Path) -> None:
    """Delete one wnid's train folder that wnids.txt still lists."""
    shutil.rmtree(root / "train" / "n02")


def missing_val_image(root: Path) -> None:
    """Delete a val image that val_annotations.txt names."""
    (root / "val" / "images" / "val_1.JPEG").unlink()


@pytest.mark.parametrize("damage, detail", [(drop_annotations, "no val/val_annotations.txt"),
                                            (flatten_train, "not in train/<wnid>/images/"),
                                            (unknown_wnid, "n77"),
                                            (missing_class_folder, "n02"),
                                            (missing_val_image, "val_1.JPEG")])
def test_wrong_tiny_imagenet_layouts_name_the_expected_layout(tmp_path, damage, detail):
    root = make_tiny(tmp_path / "tiny", n_train=2, n_val=1)
    damage(root)
    with pytest.raises(DataError, match="is not a Tiny ImageNet folder") as info:
        load_image_dataset(f"tinyimagenet:{root}")
    message = one_line(info)
    assert TINY_LAYOUT in message and detail in message


def test_missing_tiny_imagenet_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_image_dataset(f"tinyimagenet:{tmp_path / 'nowhere'}")
    assert "tinyimagenet:" in one_line(info)


# ---------------------------------------------------------------- CIFAR-100 on a fake archive

def fake_cifar100(tmp_path: Path, n_train: int = 12, n_test: int = 5) -> tuple[Path, dict, dict, list[str]]:
    """A cifar-100-python.tar.gz laid out like the official one, written member by member."""
    rng = np.random.default_rng(7)
    names = [f"fine{i:02d}" for i in range(100)]

    def batch(n: int, tag: bytes) -> dict:
        """One pickled split: bytes keys, uint8 [n, 3072] rows, fine and coarse labels."""
        return {b"filenames": [b"f%d.png" % i for i in range(n)], b"batch_label": tag,
                b"fine_labels": [int(v) for v in rng.integers(0, 4, n)],
                b"coarse_labels": [0] * n, b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}

    train, test = batch(n_train, b"training batch"), batch(n_test, b"testing batch")
    meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"all"] * 20}
    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_dir_info("cifar-100-python"))
        for member, obj in (("train", train), ("test", test), ("meta", meta)):
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, train, test, names


def _dir_info(name: str) -> tarfile.TarInfo:
    """A tar directory entry."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_cifar100_on_a_fake_official_archive(tmp_path):
    path, train, test, names = fake_cifar100(tmp_path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    ds = load_image_dataset("cifar100", root=tmp_path, download=False, sha256=sha)
    assert ds.classes == names and ds.name == "cifar100" and ds.mean == CIFAR_MEAN
    assert torch.equal(ds.train_x, torch.from_numpy(train[b"data"].reshape(-1, 3, 32, 32)))
    assert ds.train_y.tolist() == train[b"fine_labels"] and ds.test_y.tolist() == test[b"fine_labels"]
    part = load_image_dataset("cifar100", root=path, download=False, sha256=sha, max_per_class=1)
    assert torch.equal(part.train_y, ds.train_y[first_per_class(ds.train_y, 1)])
    with pytest.raises(DataError, match="md5") as info:  # the official MD5 unless a sha256 is given
        load_image_dataset("cifar100", root=tmp_path, download=False)
    one_line(info)


# ---------------------------------------------------------------- band-signal

@pytest.fixture(scope="module")
def band_signal() -> ImageDataset:
    """band-signal of data seed 1, three images per class."""
    return load_image_dataset("band-signal", seed=1, max_per_class=3)


def test_band_signal_through_the_registry(band_signal):
    ds = band_signal
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.test_x.shape == (30, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.classes == [f"class{c}" for c in range(10)]
    assert torch.bincount(ds.train_y).tolist() == [3] * 10 and torch.bincount(ds.test_y).tolist() == [3] * 10
    x_train, y_train, _, _ = make_band_signal_images(BandSignalConfig(), seed=1, dtype="uint8")
    keep = first_per_class(y_train, 3)
    assert torch.equal(ds.train_x, x_train[keep]) and torch.equal(ds.train_y, y_train[keep])
    assert 0.4 < ds.mean[0] < 0.6  # its own statistics: images sit around mid-gray


def test_band_signal_is_deterministic_in_the_seed(band_signal):
    again = load_image_dataset("band-signal", seed=1, max_per_class=3)
    assert torch.equal(again.train_x, band_signal.train_x) and torch.equal(again.test_y, band_signal.test_y)
    other = load_image_dataset("band-signal", seed=2, max_per_class=3)
    assert not torch.equal(other.train_x, band_signal.train_x)


def test_band_signal_refuses_classes_and_arguments():
    with pytest.raises(DataError, match="fixed classes") as info:
        load_image_dataset("band-signal", classes=["class0"])
    one_line(info)
    with pytest.raises(DataError, match="takes no argument") as info:
        load_image_dataset("band-signal:low")
    one_line(info)


# ---------------------------------------------------------------- the registry

def test_registry_lists_and_entries():
    assert image_dataset_names() == IMAGE_SETS
    entry, arg = dataset_entry("folder:/some/where:odd")
    assert entry.name == "folder" and entry.takes_path and arg == "/some/where:odd"
    assert dataset_entry("cifar10") == (DATASETS["cifar10"], "")
    assert all(e.description and "\n" not in e.description for e in DATASETS.values())
    assert {e.input_kind for e in DATASETS.values()} == {"image", "vector"}


def test_unknown_name_lists_the_image_sets_in_one_line():
    with pytest.raises(ConfigError) as info:
        dataset_entry("foo")
    assert one_line(info) == f"data.dataset='foo' is unknown; use one of: {', '.join(IMAGE_SETS)}"
    with pytest.raises(ConfigError, match="vector data set") as info:
        dataset_entry("tick")
    one_line(info)
    with pytest.raises(DataError, match="is unknown") as info:  # load_image_dataset raises DataError
        load_image_dataset("mnist\nx")
    one_line(info)


@pytest.mark.parametrize("spec, message", [("folder", "needs a path"), ("folder:", "needs a path"),
                                           ("tinyimagenet", "needs a path"), ("cifar10:x", "takes no argument")])
def test_path_arguments_are_checked(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        dataset_entry(spec)
    one_line(info)


def test_synthetic_shapes_are_registered_as_vector_sets():
    entry, _ = dataset_entry("circles", "vector")
    assert entry.input_kind == "vector" and not entry.takes_path
    cfg = SyntheticDataConfig(n_features=2, n_train=8, n_test=8, n_probe=4)
    got, want = entry.loader(cfg, 3), make_synthetic(SyntheticDataConfig(shape="circles", n_features=2, n_train=8,
                                                                         n_test=8, n_probe=4), 3)
    assert torch.equal(got.x_train, want.x_train) and torch.equal(got.y_probe, want.y_probe)
    with pytest.raises(ConfigError, match="data.shape='cifar10'"):
        dataset_entry("cifar10", "vector")


def test_register_dataset_as_a_decorator(monkeypatch):
    monkeypatch.setattr(registry, "DATASETS", dict(DATASETS))

    @register_dataset("two-images", "image")
    def two_images(arg, opts):
        """Two 2x2 images per split, for testing."""
        x = torch.full((4, 1, 2, 2), opts.seed, dtype=torch.uint8)
        y = torch.tensor([0, 1, 0, 1])
        return ImageDataset(x, y, x, y, ["a", "b"], "two-images")

    assert registry.DATASETS["two-images"].description == "Two 2x2 images per split, for testing."
    ds = load_image_dataset("two-images", seed=5, val_fraction=0.5)
    assert ds.train_x.shape[0] == 2 and ds.val_x.shape[0] == 2 and ds.mean == pytest.approx((5 / 255,))
    with pytest.raises(ValueError, match="must be new"):
        register_dataset("two-images", "image", two_images)
    with pytest.raises(ValueError, match="input_kind"):
        register_dataset("three", "audio", two_images)
