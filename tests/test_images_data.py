"""Image data: CIFAR archives (checksums, safe parsing, download), image folders, splits, augmentation."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.data import cifar, images
from lrfeatures.data.augment import Augment
from lrfeatures.data.images import (CIFAR, CIFAR_MEAN, CIFAR_STD, ImageDataset, channel_mean_std,
                                    download_file, first_per_class, load_image_dataset,
                                    normalize, stratified_split)
from lrfeatures.errors import DataError

JPEG_TAR = Path("/work/shared/data/cifar10-jpeg.tar.gz")
CIFAR10_ORDER = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------- fake CIFAR archives

def fake_batch(rng: np.random.Generator, n: int, n_classes: int, label_key: bytes) -> dict:
    """A batch dict laid out like the official ones (bytes keys, uint8 [n, 3072] data)."""
    return {b"batch_label": b"fake batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(v) for v in rng.integers(0, n_classes, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def make_tar_gz(members: dict[str, bytes]) -> bytes:
    """A .tar.gz holding `members` (path -> bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def fake_cifar10(tmp_path: Path, n_train: int = 4, n_test: int = 3, protocol: int = 2
                 ) -> tuple[Path, str, list[dict], dict]:
    """Write a tiny cifar-10-python.tar.gz; return (path, sha256, train batches, test batch)."""
    rng = np.random.default_rng(0)
    train = [fake_batch(rng, n_train, 10, b"labels") for _ in range(5)]
    test = fake_batch(rng, n_test, 10, b"labels")
    meta = {b"label_names": [c.encode() for c in CIFAR10_ORDER], b"num_vis": 3072}
    members = {f"cifar-10-batches-py/data_batch_{i + 1}": pickle.dumps(b, protocol=protocol)
               for i, b in enumerate(train)}
    members["cifar-10-batches-py/test_batch"] = pickle.dumps(test, protocol=protocol)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(meta, protocol=protocol)
    data = make_tar_gz(members)
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), train, test


def as_images(batch: dict) -> torch.Tensor:
    """The official row layout: 1024 red, 1024 green, 1024 blue values, row-major."""
    return torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_fake_cifar10_parses_when_its_checksum_is_given(tmp_path, protocol):
    path, sha, train, test = fake_cifar10(tmp_path, protocol=protocol)
    ds = load_image_dataset("cifar10", root=tmp_path, download=False, sha256=sha)
    assert ds.classes == CIFAR10_ORDER and ds.name == "cifar10"
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.train_x, torch.cat([as_images(b) for b in train]))
    assert ds.train_y.tolist() == [v for b in train for v in b[b"labels"]]
    assert torch.equal(ds.test_x, as_images(test))
    assert ds.test_y.tolist() == test[b"labels"]
    # root may also name the archive file itself
    again = load_image_dataset("cifar10", root=path, download=False, sha256=sha)
    assert torch.equal(again.train_x, ds.train_x)
    assert ds.mean == CIFAR_MEAN and ds.std == CIFAR_STD


def test_official_md5_is_checked_by_default(tmp_path):
    fake_cifar10(tmp_path)
    with pytest.raises(DataError, match="md5"):
        load_image_dataset("cifar10", root=tmp_path, download=False)


def test_corrupt_archive_is_refused_before_anything_is_parsed(tmp_path, monkeypatch):
    path, sha, _, _ = fake_cifar10(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a corrupt archive reached the parser")

    monkeypatch.setattr(cifar, "parse_cifar_archive", must_not_run)  # where load_cifar looks them up
    monkeypatch.setattr(cifar, "safe_loads", must_not_run)
    with pytest.raises(DataError, match="corrupt or incomplete") as info:
        load_image_dataset("cifar10", root=tmp_path, download=False, sha256=sha)
    assert "\n" not in str(info.value)
    assert path.exists()  # a user's own file is reported, not deleted


def test_partial_archive_is_refused(tmp_path):
    path, sha, _, _ = fake_cifar10(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="corrupt or incomplete"):
        load_image_dataset("cifar10", root=tmp_path, download=False, sha256=sha)


class Exploit:
    """Unpickling this would create a file: a safe loader must refuse it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_naming_arbitrary_globals_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Exploit(str(marker))}
    blob = pickle.dumps(batch, protocol=2)
    members = {f"cifar-10-batches-py/data_batch_{i}": blob for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = blob
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"a"]}, protocol=2)
    data = make_tar_gz(members)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data)
    with pytest.raises(DataError, match="not allowed"):
        load_image_dataset("cifar10", root=tmp_path, download=False,
                           sha256=hashlib.sha256(data).hexdigest())
    assert not marker.exists()


def test_fake_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    train, test = fake_batch(rng, 6, 100, b"fine_labels"), fake_batch(rng, 2, 100, b"fine_labels")
    train[b"coarse_labels"] = [0] * 6
    names = [f"class{i:03d}".encode() for i in range(100)]
    data = make_tar_gz({"cifar-100-python/train": pickle.dumps(train, protocol=2),
                        "cifar-100-python/test": pickle.dumps(test, protocol=2),
                        "cifar-100-python/meta": pickle.dumps({b"fine_label_names": names}, protocol=2)})
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(data)
    ds = load_image_dataset("cifar100", root=tmp_path, download=False, sha256=hashlib.sha256(data).hexdigest())
    assert len(ds.classes) == 100 and ds.classes[7] == "class007"
    assert ds.train_y.tolist() == train[b"fine_labels"]
    assert torch.equal(ds.test_x, as_images(test))


def test_max_per_class_on_cifar_keeps_the_first_of_each_class(tmp_path):
    _, sha, train, _ = fake_cifar10(tmp_path, n_train=20)
    full = load_image_dataset("cifar10", root=tmp_path, download=False, sha256=sha)
    part = load_image_dataset("cifar10", root=tmp_path, download=False, sha256=sha, max_per_class=2)
    counts = torch.bincount(part.train_y, minlength=10)
    assert counts.max() <= 2
    assert torch.equal(counts, torch.bincount(full.train_y, minlength=10).clamp(max=2))
    for label in range(10):
        idx = (full.train_y == label).nonzero().flatten()[:2]
        assert torch.equal(part.train_x[part.train_y == label], full.train_x[idx])


def test_download_verifies_then_renames(tmp_path, monkeypatch):
    source, sha, train, _ = fake_cifar10(tmp_path)
    target_dir = tmp_path / "cache"
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(CIFAR["cifar10"], url=source.as_uri()))
    ds = load_image_dataset("cifar10", root=target_dir, download=True, sha256=sha)
    assert torch.equal(ds.train_x[:4], as_images(train[0]))
    assert sorted(p.name for p in target_dir.iterdir()) == ["cifar-10-python.tar.gz"]


def test_corrupt_download_is_deleted(tmp_path):
    source, _, _, _ = fake_cifar10(tmp_path)
    dest = tmp_path / "cache" / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match="corrupt"):
        download_file(source.as_uri(), dest, md5=CIFAR["cifar10"].md5)
    assert list(dest.parent.iterdir()) == []


def test_missing_archive_without_download_and_failed_download(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_dataset("cifar100", root=tmp_path, download=False)
    with pytest.raises(DataError, match="could not download"):
        download_file((tmp_path / "nowhere.tar.gz").as_uri(), tmp_path / "x.tar.gz")
    assert not any(tmp_path.iterdir())


def test_unknown_spec_lists_the_choices():
    with pytest.raises(DataError, match="cifar10, cifar100, folder:PATH"):
        load_image_dataset("mnist")


# ---------------------------------------------------------------- image folders

def write_image(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> np.ndarray:
    """Save a PNG whose pixels depend on position and `value`; return its [C, H, W] array."""
    from PIL import Image

    w, h = size
    grid = (np.arange(h)[:, None] * 7 + np.arange(w)[None, :] * 3 + value) % 256
    array = np.stack([grid, (grid + 50) % 256, (grid + 100) % 256], -1).astype(np.uint8)
    if mode == "L":
        array = array[:, :, :1]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode).save(path)
    return array.transpose(2, 0, 1)


def test_image_folder_with_train_and_test(tmp_path):
    expected = {}
    for split in ("train", "test"):
        for value, cls in enumerate(["zebra", "ant"]):
            for i in range(3):
                expected[(split, cls, i)] = write_image(tmp_path / split / cls / f"{i}.png", (8, 6), 10 * i + value)
    ds = load_image_dataset(f"folder:{tmp_path}")
    assert ds.classes == ["ant", "zebra"]
    assert ds.train_x.shape == (6, 3, 6, 8) and ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(ds.train_x[0].numpy(), expected[("train", "ant", 0)])
    assert np.array_equal(ds.test_x[5].numpy(), expected[("test", "zebra", 2)])
    ordered = load_image_dataset(f"folder:{tmp_path}", classes=["zebra", "ant"], max_per_class=2)
    assert ordered.classes == ["zebra", "ant"] and ordered.train_y.tolist() == [0, 0, 1, 1]
    assert np.array_equal(ordered.train_x[0].numpy(), expected[("train", "zebra", 0)])
    with pytest.raises(DataError, match="classes= does not match"):
        load_image_dataset(f"folder:{tmp_path}", classes=["ant"])


def test_flat_folder_is_split_into_train_and_test(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            write_image(tmp_path / cls / f"{i:02d}.png", (4, 4), i)
    ds = load_image_dataset(f"folder:{tmp_path}", test_fraction=0.2, seed=3)
    assert ds.train_x.shape[0] == 16 and ds.test_x.shape[0] == 4
    assert torch.bincount(ds.test_y).tolist() == [2, 2]
    again = load_image_dataset(f"folder:{tmp_path}", test_fraction=0.2, seed=3)
    assert torch.equal(ds.test_x, again.test_x)


def test_mixed_image_sizes_are_rejected_naming_both_files(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", (32, 32), 0)
    write_image(tmp_path / "train" / "b" / "0.png", (32, 32), 0)
    write_image(tmp_path / "test" / "a" / "0.png", (32, 32), 0)
    write_image(tmp_path / "test" / "b" / "odd.png", (40, 30), 0)
    with pytest.raises(DataError, match="mixes image sizes") as info:
        load_image_dataset(f"folder:{tmp_path}")
    message = str(info.value)
    assert "train/a/0.png is 32x32" in message and "test/b/odd.png is 40x30" in message
    assert "resize" in message


def test_grayscale_and_colour_images_mix_as_rgb_and_bad_files_are_named(tmp_path):
    gray = write_image(tmp_path / "a" / "0.png", (4, 4), 1, mode="L")
    write_image(tmp_path / "b" / "0.png", (4, 4), 2)
    write_image(tmp_path / "a" / "1.png", (4, 4), 3)
    write_image(tmp_path / "b" / "1.png", (4, 4), 4)
    ds = images.load_image_folder(tmp_path, test_fraction=0.5)
    assert ds.input_shape == (3, 4, 4)
    (tmp_path / "b" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="b/2.png"):
        images.load_image_folder(tmp_path, test_fraction=0.5)
    assert gray.shape == (1, 4, 4)


def test_tar_of_a_folder_matches_the_folder(tmp_path):
    folder = tmp_path / "data" / "top"
    for split in ("train", "test"):
        for cls in ("x", "y"):
            for i in range(2):
                write_image(folder / split / cls / f"{i}.png", (5, 5), i * 31 + len(cls))
    archive = tmp_path / "top.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="./top")
    from_dir = load_image_dataset(f"folder:{folder}")
    from_tar = load_image_dataset(f"folder:{archive}",
                                  sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    assert torch.equal(from_dir.train_x, from_tar.train_x) and torch.equal(from_dir.test_y, from_tar.test_y)
    with pytest.raises(DataError, match="corrupt"):
        load_image_dataset(f"folder:{archive}", sha256="0" * 64)


@pytest.mark.skipif(not JPEG_TAR.is_file(), reason="shared CIFAR-10 JPEG archive not present")
def test_cifar10_jpeg_archive_slice():
    from PIL import Image

    ds = load_image_dataset(f"folder:{JPEG_TAR}", max_per_class=5)
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.test_x.shape == (50, 3, 32, 32)
    assert ds.classes == CIFAR10_ORDER
    assert ds.train_y.tolist() == [c for c in range(10) for _ in range(5)]
    assert ds.test_y.tolist() == ds.train_y.tolist()
    with tarfile.open(JPEG_TAR) as tar:
        first_truck = np.asarray(Image.open(tar.extractfile("train/truck/0000.jpg")).convert("RGB"))
    assert np.array_equal(ds.train_x[45].numpy(), first_truck.transpose(2, 0, 1))


# ---------------------------------------------------------------- splits, normalization, device

@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(2, 30), min_size=1, max_size=6),
       fraction=st.floats(0.05, 0.6), seed=st.integers(0, 2**31))
def test_stratified_split_is_deterministic_disjoint_and_stratified(counts, fraction, seed):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
    expected = [int(np.floor(n * fraction + 0.5)) for n in counts]
    if sum(expected) == 0 or sum(expected) == len(y):
        with pytest.raises(DataError):
            stratified_split(y, fraction, seed)
        return
    keep, held = stratified_split(y, fraction, seed)
    keep2, held2 = stratified_split(y, fraction, seed)
    assert torch.equal(keep, keep2) and torch.equal(held, held2)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(y)))
    assert torch.bincount(y[held], minlength=len(counts)).tolist() == expected


def test_split_depends_on_the_seed_and_val_fraction_moves_images():
    y = torch.arange(200) % 4
    assert not torch.equal(stratified_split(y, 0.25, 0)[1], stratified_split(y, 0.25, 1)[1])


@pytest.mark.skipif(not JPEG_TAR.is_file(), reason="shared CIFAR-10 JPEG archive not present")
def test_val_fraction_on_a_dataset():
    full = load_image_dataset(f"folder:{JPEG_TAR}", max_per_class=10)
    ds = load_image_dataset(f"folder:{JPEG_TAR}", max_per_class=10, val_fraction=0.2, seed=5)
    assert ds.val_x.shape == (20, 3, 32, 32) and ds.train_x.shape == (80, 3, 32, 32)
    assert torch.bincount(ds.val_y).tolist() == [2] * 10
    pool = {bytes(img.numpy()) for img in full.train_x}
    parts = [bytes(img.numpy()) for img in torch.cat([ds.train_x, ds.val_x])]
    assert set(parts) == pool and len(parts) == len(pool)


@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=60), n=st.integers(1, 5))
def test_first_per_class(labels, n):
    y = torch.tensor(labels)
    idx = first_per_class(y, n).tolist()
    expected = [i for i, v in enumerate(labels) if labels[:i].count(v) < n]
    assert idx == expected


def test_normalize_uint8_and_float_agree_and_match_constants():
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, normalize(x.float() / 255))
    red = (x[:, 0].float() / 255 - 0.4914) / 0.2023
    assert torch.allclose(out[:, 0], red)
    as_tensors = normalize(x, torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD))
    assert torch.equal(as_tensors, out)
    with pytest.raises(DataError):
        normalize(x.long())


def test_channel_mean_std_matches_numpy():
    x = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_mean_std(x, chunk=3)
    values = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255
    assert np.allclose(mean, values.mean(1)) and np.allclose(std, values.std(1))


def test_dataset_to_moves_every_tensor():
    t = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    y = torch.zeros(2, dtype=torch.int64)
    ds = ImageDataset(t, y, t, y, ["a"], "x", val_x=t, val_y=y).to("meta")
    assert all(v.device.type == "meta" for v in (ds.train_x, ds.test_y, ds.val_x, ds.val_y))


def test_bad_arguments():
    with pytest.raises(DataError, match="max_per_class"):
        load_image_dataset("cifar10", max_per_class=0)
    with pytest.raises(DataError, match="val_fraction"):
        load_image_dataset("cifar10", val_fraction=1.0)
    with pytest.raises(DataError, match="does not exist"):
        load_image_dataset("folder:/no/such/folder")


# ---------------------------------------------------------------- augmentation

def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=25, deadline=None)
@given(pad=st.integers(0, 4), flip=st.booleans(), n=st.integers(1, 6), seed=st.integers(0, 1000))
def test_augment_is_seeded_keeps_shape_and_is_a_padded_window(pad, flip, n, seed):
    x = torch.randint(1, 256, (n, 2, 6, 7), dtype=torch.uint8)
    out = Augment(pad, flip)(x, seeded(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, Augment(pad, flip)(x, seeded(seed)))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(n):  # each output is one window of the padded image, maybe mirrored
        windows = [w for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   for w in [padded[i, :, dy:dy + 6, dx:dx + 7]]]
        candidates = windows + ([w.flip(-1) for w in windows] if flip else [])
        assert any(torch.equal(out[i], w) for w in candidates)


def test_augment_moves_pixels_and_uses_both_flips_and_all_offsets():
    x = torch.rand(400, 1, 5, 5)
    x[:, 0, 0, 0] = 2.0  # a marker at the top-left pixel
    out = Augment(crop_padding=0, flip=True)(x, seeded(0))
    flipped = out[:, 0, 0, 4] == 2.0
    assert torch.equal(out[~flipped], x[~flipped]) and torch.equal(out[flipped], x[flipped].flip(-1))
    assert 150 < int(flipped.sum()) < 250
    crops = Augment(crop_padding=2, flip=False)(x, seeded(1))
    marker = (crops == 2.0).flatten(1).float().argmax(1)
    shifted = crops[:, 0, 2, 2] != x[:, 0, 2, 2]
    assert shifted.float().mean() > 0.7
    assert len(set(marker[(crops == 2.0).flatten(1).any(1)].tolist())) == 9  # marker lands at all (dy, dx) in 0..2
    assert not torch.equal(Augment()(x, seeded(2)), Augment()(x, seeded(3)))


def test_augment_hand_made_example():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    gen = seeded(0)
    draws = torch.Generator().manual_seed(0)
    off_y = int(torch.randint(0, 3, (1,), generator=draws))
    off_x = int(torch.randint(0, 3, (1,), generator=draws))
    flip = bool(torch.rand(1, generator=draws) < 0.5)
    expected = torch.nn.functional.pad(x, (1, 1, 1, 1))[:, :, off_y:off_y + 4, off_x:off_x + 4]
    if flip:
        expected = expected.flip(-1)
    assert torch.equal(Augment(crop_padding=1)(x, gen), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_matches_cpu_for_a_cpu_generator():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    cpu = Augment()(x, seeded(7))
    gpu = Augment()(x.cuda(), seeded(7))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    on_device = Augment()(x.cuda(), torch.Generator(device="cuda").manual_seed(7))
    assert on_device.shape == x.shape
