"""Band importance of image-experiment models: table shape, faithful model rebuild, resume, CLI, report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lrfeatures import cli
from lrfeatures.analysis import bands as bands_mod
from lrfeatures.analysis.bands import COLUMNS, BandsConfig, band_correct
from lrfeatures.fourier import MODES, Band, BandFilter, band_accuracy, default_bands
from lrfeatures.config import load_config
from lrfeatures.data.images import CIFAR_MEAN, CIFAR_STD
from lrfeatures.engine.images import prepare_input
from lrfeatures.errors import ConfigError
from lrfeatures.experiments import Experiment, plan_shards
from lrfeatures.experiments.bands import run_bands
from lrfeatures.experiments.images import ImageAnalysis, ImageRunner
from lrfeatures.store import ExperimentStore

DEFAULT = BandsConfig().normalization

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE = 16
CONFIG = {"kind": "images", "name": "tiny-bands",
          "model": {"name": "convnet-si", "width": 2, "depth": 2},
          "pretrain": {"lrs": [1e-2, 0.3], "epochs": 3, "batch_size": 16},
          "finetune": {"lrs": [1e-3, 1e-2], "epochs": 2},
          "swa": {"ks": [1, 2]}, "analysis": {"geometry_points": 3}}
MODELS_PER_PLR = 1 + 2 + 2  # PT, FT per FLR, SWA per K


def write_folder(root: Path, n_per_class: int = 16) -> Path:
    """3 classes of 16x16 PNGs, told apart by a stripe frequency (so bands matter) plus noise."""
    rng = np.random.default_rng(1)
    grid = np.arange(SIZE)
    for c, name in enumerate(["low", "mid", "high"]):
        (root / name).mkdir(parents=True)
        stripes = np.cos(2 * np.pi * (1 + 3 * c) * grid / SIZE)[None, :, None]
        for i in range(n_per_class):
            pixels = 128 + 50 * stripes + rng.normal(0, 30, (SIZE, SIZE, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny image experiment (2 PLRs, 2 FLRs, 2 SWA Ks); tests work on copies."""
    folder = write_folder(tmp_path_factory.mktemp("images") / "set")
    root = tmp_path_factory.mktemp("run") / "exp"
    Experiment(load_config({**CONFIG, "data": {"dataset": f"folder:{folder}"}}), root).run()
    return root


@pytest.fixture(scope="module")
def with_bands(trained, tmp_path_factory) -> Path:
    """A copy of the experiment after `lrfeatures fourier` (with its report)."""
    root = tmp_path_factory.mktemp("bands") / "exp"
    shutil.copytree(trained, root)
    assert cli.main(["fourier", str(root), "--quiet"]) == 0
    return root


def test_fourier_writes_one_row_per_model_mode_and_band(with_bands):
    table = pd.read_parquet(with_bands / "bands.parquet")
    evaluations = pd.read_parquet(with_bands / "evaluations.parquet")
    bands = default_bands(SIZE)
    assert list(table.columns) == COLUMNS
    assert len(table) == 2 * MODELS_PER_PLR * len(MODES) * len(bands)
    keys = ["stage", "plr", "flr", "swa_k"]
    models = lambda t: set(t[keys].astype(str).itertuples(index=False))  # noqa: E731  (NaN-safe)
    assert models(table) == models(evaluations)
    for _, rows in table.groupby(keys + ["mode"], dropna=False):
        assert list(rows["band"]) == [b.name for b in bands]
        assert list(rows["band_lo"]) == [b.lo for b in bands] and list(rows["band_hi"]) == [b.hi for b in bands]
    assert set(table["mode"]) == set(MODES) and set(table["normalization"]) == {DEFAULT}
    assert table["accuracy"].between(0, 1).all()
    n_test = json.loads((with_bands / "dataset.json").read_text())["n_test"]
    assert np.allclose(table["accuracy"] * n_test, np.round(table["accuracy"] * n_test))  # whole images


def test_summary_gets_a_bands_block_per_plr(with_bands):
    summary = json.loads((with_bands / "summary.json").read_text())
    table = pd.read_parquet(with_bands / "bands.parquet")
    assert [b["name"] for b in summary["bands"]["bands"]] == [b.name for b in default_bands(SIZE)]
    for entry in summary["per_plr"]:
        block = entry["bands"][DEFAULT]
        assert set(block["finetune"]) == {repr(1e-3), repr(1e-2)} and set(block["swa"]) == {"1", "2"}
        mid = table[(table["stage"] == "pretrain") & np.isclose(table["plr"], entry["plr"])
                    & (table["mode"] == "keep") & (table["band"] == "mid")]
        if not mid["diverged"].any():
            assert block["pretrain"]["keep"]["mid"]["mean"] == pytest.approx(mid["accuracy"].mean())
    assert "regimes" in summary and "per_plr" in summary  # the rest of the summary is kept


def test_report_includes_the_band_figures(with_bands):
    page = (with_bands / "report.html").read_text()
    for name in ("band_keep", "band_remove", "band_heatmap", "band_example"):
        assert (with_bands / "figures" / f"{name}.png").stat().st_size > 1000
        assert f"<b>{name}.png</b>:" in page  # drawn, not "not drawn"
    assert "Band accuracy after pre-training" in page


def test_report_without_bands_has_no_band_figures(trained, tmp_path):
    from lrfeatures.report import write_report

    root = tmp_path / "exp"
    shutil.copytree(trained, root)
    page = write_report(root).read_text()
    assert "band_" not in page and not (root / "figures" / "band_keep.png").exists()


def test_rerun_resumes_and_a_new_normalization_adds_rows(with_bands, tmp_path, monkeypatch):
    root = tmp_path / "exp"
    shutil.copytree(with_bands, root)
    before = pd.read_parquet(root / "bands.parquet")
    done = {p.parent.name: p.read_text() for p in (root / "shards").glob("bands-*/done.json")}
    assert len(done) == len(list((root / "shards").glob("pretrain-*")))  # one band shard per training shard

    def no_work(*args, **kwargs):
        raise AssertionError("a finished band shard was recomputed")

    monkeypatch.setattr(bands_mod, "band_correct", no_work)
    pd.testing.assert_frame_equal(run_bands(root), before)
    assert {p.parent.name: p.read_text() for p in (root / "shards").glob("bands-*/done.json")} == done
    monkeypatch.undo()
    table = run_bands(root, BandsConfig(normalization="none"))
    assert len(table) == 2 * len(before) and set(table["normalization"]) == {DEFAULT, "none"}
    kept = table[table["normalization"] == DEFAULT].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before)


def test_whole_band_accuracy_equals_the_stored_test_accuracy(trained):
    """Rebuilt PT, FT and SWA (BN recomputed) models score exactly the experiment's test accuracy."""
    store = ExperimentStore(trained)
    cfg = store.config()
    runner = ImageRunner(cfg, store)
    evaluations = pd.read_parquet(trained / "evaluations.parquet")
    everything = BandFilter(SIZE, bands=[Band("all", 0, SIZE)])
    for shard in (s for s in plan_shards(cfg) if s.stage == "pretrain"):
        data = runner.data(shard.data_seed)
        keys, models = ImageAnalysis(cfg, shard, data, runner).models()
        correct = band_correct(models, data.test_x, data.test_y, everything, "train", data.mean, data.std,
                               chunk_size=7, batch_size=5)
        for key, count in zip(keys, correct[:, 0, 0].tolist()):
            row = evaluations[(evaluations["stage"] == key["stage"]) & np.isclose(evaluations["plr"], key["plr"])
                              & (evaluations["swa_k"] == key["swa_k"])
                              & (evaluations["flr"].isna() if math.isnan(key["flr"])
                                 else np.isclose(evaluations["flr"], key["flr"]))]
            assert len(row) == 1
            assert count / len(data.test_y) == pytest.approx(row["test_acc"].iloc[0], abs=1e-12), key
    assert len(keys) == MODELS_PER_PLR * len(cfg.pretrain.lrs)  # one shard holds every PLR of its seed


def linear_model(seed: int) -> torch.nn.Module:
    """A random linear classifier of 3x8x8 images (its predictions vary with the input)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()


class Recorder(torch.nn.Module):
    """Keeps every input batch and predicts class 0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(len(x), 3)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), chunk=st.integers(1, 40), normalization=st.sampled_from(["train", "none"]))
def test_batched_counts_match_the_per_band_reference(seed, chunk, normalization):
    """One batched pass over models, modes and bands gives band_accuracy's counts for each model."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (23,), generator=gen)
    models = [linear_model(seed), linear_model(seed + 1)]
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    band_filter = BandFilter(8)
    correct = band_correct(models, images, labels, band_filter, normalization, mean, std, chunk, batch_size=9)
    for i, model in enumerate(models):
        for m, mode in enumerate(MODES):
            reference = band_accuracy(model, images, labels, band_filter, mode, normalization, mean, std)
            assert (correct[i, m].double() / 23).tolist() == pytest.approx(list(reference.values()), abs=1e-12)


@pytest.mark.parametrize("normalization", ["train", "none", "train_background_only", "train_additive"])
def test_models_see_the_documented_band_images(normalization):
    """keep = the band, remove = x - band; background_only normalizes exactly the images with the DC term."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    recorder = Recorder()
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    band_filter = BandFilter(8)
    band_correct([recorder], images, torch.zeros(5, dtype=torch.long), band_filter, normalization, mean, std)
    seen = torch.cat(recorder.seen).view(2, band_filter.n_bands, 5, 3, 8, 8)
    x = images.float() / 255
    keep = band_filter(x, "keep")
    for m, filtered in enumerate([keep, x - keep]):
        for b, band in enumerate(band_filter.bands):
            has_dc = (band.lo == 0) == (m == 0)
            shifted = normalization == "train" or (normalization in ("train_background_only", "train_additive")
                                                   and has_dc)
            scaled = shifted or normalization == "train_additive"
            expected = filtered[b] - (mean[:, None, None] if shifted else 0)
            expected = expected / std[:, None, None] if scaled else expected
            torch.testing.assert_close(seen[m, b], expected, atol=1e-5, rtol=0)
    if normalization == "train_additive":  # the normalized bands add up to the normalized image
        torch.testing.assert_close(seen[0].sum(0), prepare_input(images, (mean, std)), atol=1e-5, rtol=0)


def test_whole_image_through_band_correct_matches_prepare_input():
    torch.manual_seed(3)
    images = torch.randint(0, 256, (17, 3, 8, 8), dtype=torch.uint8)
    model = linear_model(3)
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    labels = model(prepare_input(images, (mean, std))).argmax(1)  # every image right on whole inputs
    counts = band_correct([model], images, labels, BandFilter(8, bands=[Band("all", 0, 8)]), "train", mean, std)
    assert counts[0, 0, 0] == 17


def test_fourier_refuses_a_synthetic_experiment(tmp_path, capsys, make_tiny_config):
    ExperimentStore.create(tmp_path / "syn", make_tiny_config())
    assert cli.main(["fourier", str(tmp_path / "syn"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "synthetic" in err and "image experiment" in err


def test_fourier_refuses_an_unfinished_experiment(trained, tmp_path, capsys):
    root = tmp_path / "exp"
    shutil.copytree(trained, root)
    shutil.rmtree(root / "shards" / "swa-d0-s0-0-n1")
    assert cli.main(["fourier", str(root), "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "swa-d0-s0-0-n1" in err and "lrfeatures images" in err
    # Every training shard is checked before any band shard runs: nothing is computed for a half-done store.
    assert not any((root / "shards").glob("bands-*"))


def test_bad_normalization_is_a_config_error(trained):
    with pytest.raises(ConfigError, match="normalization"):
        run_bands(trained, BandsConfig(normalization="cifar"))
