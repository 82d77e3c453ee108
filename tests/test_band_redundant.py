"""bands-redundant: the class in low, mid and high at once; single-band probe sets read only their band."""

import json
from dataclasses import replace

import pytest
import torch

from lrfeatures.data.band_redundant import (BandRedundantConfig, band_filter, class_patterns, components,
                                            make_bands_redundant_images, make_probe_sets, to_pixels)
from lrfeatures.data.images import load_image_dataset
from lrfeatures.data.registry import image_dataset_names
from lrfeatures.errors import ConfigError, DataError
from lrfeatures.fourier import BandFilter, band_energy

SMALL = BandRedundantConfig(n_train=600, n_test=200, n_probe=600)
CHANCE = 1 / SMALL.num_classes


def test_deterministic_seeded_balanced_uint8():
    a, b = make_bands_redundant_images(SMALL), make_bands_redundant_images(SMALL)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = make_bands_redundant_images(SMALL, seed=1)
    assert not torch.equal(a[0], c[0])
    x_train, y_train, x_test, y_test = a
    assert x_train.shape == (600, 3, 16, 16) and x_test.shape == (200, 3, 16, 16)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    assert torch.bincount(y_train).tolist() == [60] * 10
    probes, labels = make_probe_sets(SMALL)
    assert probes.shape == (3, 600, 3, 16, 16) and labels.shape == (3, 600)
    assert torch.equal(probes, make_probe_sets(SMALL)[0])


def test_bands_sum_back_and_signals_stay_in_their_band():
    noise, signals, labels, carried = components(SMALL, 200, "train")
    x = noise + signals.sum(0)
    partition = BandFilter(16)  # background / low / mid / high: every coefficient once
    assert torch.allclose(partition(x).sum(0), x, atol=1e-5)
    bands = band_filter(SMALL)
    for b in range(3):
        kept = bands(signals[b])  # [3, N, C, H, W]: signal b projected on every signal band
        assert torch.allclose(kept[b], signals[b], atol=1e-5)
        others = [o for o in range(3) if o != b]
        assert kept[others].abs().max() < 1e-5
    assert torch.equal(carried, labels.repeat(3, 1))  # on the task, every band carries the label


def test_class_signal_energies_equal_per_band_and_noise_spectrum_flat():
    patterns = class_patterns(SMALL)  # [bands, 2, K, C, H, W]
    rms = patterns.square().mean((-3, -2, -1)).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-5)
    inner = (patterns[:, 0] * patterns[:, 1]).sum((-3, -2, -1))
    assert inner.abs().max() < 1e-3  # B orthogonal to A: energy independent of the phase
    noise, signals, _, _ = components(replace(SMALL, n_train=2000), 2000, "train")
    energy = signals.square().sum((-3, -2, -1)).mean(1)  # [bands]
    assert (energy.max() - energy.min()) / energy.mean() < 0.05
    bands = band_filter(SMALL)
    masks = bands.masks("keep", shifted=False)  # [bands, H, W]
    per_coefficient = band_energy(noise, bands).mean(0) / (masks.sum((1, 2)) * SMALL.channels)
    assert (per_coefficient.max() - per_coefficient.min()) / per_coefficient.mean() < 0.05


def test_probe_sets_keep_the_input_statistics():
    cfg = replace(SMALL, n_train=2000, n_probe=2000)
    x_train = make_bands_redundant_images(cfg, dtype="float32")[0]
    probes = make_probe_sets(cfg, dtype="float32")[0]
    bands = band_filter(cfg)
    task_energy = band_energy(x_train - 0.5, bands).mean(0)
    for i in range(3):
        assert torch.allclose(band_energy(probes[i] - 0.5, bands).mean(0), task_energy, rtol=0.05)
        assert torch.allclose(probes[i].mean((0, 2, 3)), x_train.mean((0, 2, 3)), atol=2e-3)
        assert torch.allclose(probes[i].std((0, 2, 3)), x_train.std((0, 2, 3)), rtol=0.02)
    _, _, labels, carried = components(cfg, 2000, "probe-low", probe_band=0)
    assert torch.equal(carried[0], labels)
    assert (carried[1:] == labels).float().mean() < 0.15  # other bands: independent classes


def centroid_classifier(x, y, num_classes):
    """Nearest class mean on flattened images: a linear classifier fitted on (x, y)."""
    flat = x.flatten(1)
    means = torch.stack([flat[y == c].mean(0) for c in range(num_classes)])  # [K, D]
    bias = -(means.square().sum(1)) / 2

    def predict(images):
        return (images.flatten(1) @ means.T + bias).argmax(1)

    return predict


def accuracy(predict, x, y) -> float:
    return (predict(x) == y).double().mean().item()


def test_linear_probe_on_the_full_task_reads_probe_i_only_through_band_i():
    cfg = replace(SMALL, n_train=2000, n_probe=1000)
    x_train, y_train, x_test, y_test = (t.float() / 255 if t.dtype == torch.uint8 else t
                                        for t in make_bands_redundant_images(cfg))
    probes, labels = make_probe_sets(cfg, dtype="float32")
    center = x_train.mean(0)
    predict = centroid_classifier(x_train - center, y_train, cfg.num_classes)
    assert accuracy(predict, x_test - center, y_test) > 0.8  # the full task: all bands agree
    bands = band_filter(cfg)
    train_parts = bands(x_train - center)  # [band, N, C, H, W]
    probe_parts = [bands(probes[j] - center) for j in range(3)]
    for i in range(3):
        x = probes[i] - center
        assert accuracy(predict, x, labels[i]) > CHANCE + 0.15
        without_i = x - probe_parts[i][i]  # band i removed: only the class-independent bands are left
        assert abs(accuracy(predict, without_i, labels[i]) - CHANCE) < 0.04
        # A reader of band i alone, fitted on the task: informative on probe set i, chance elsewhere.
        reader = centroid_classifier(train_parts[i], y_train, cfg.num_classes)
        for j in range(3):
            acc = accuracy(reader, probe_parts[j][i], labels[j])
            assert acc > 0.5 if j == i else abs(acc - CHANCE) < 0.04


def test_registered_loader_and_bad_config():
    assert "bands-redundant" in image_dataset_names()
    dataset = load_image_dataset("bands-redundant", seed=3, max_per_class=20)
    assert dataset.train_x.shape == (200, 3, 16, 16) and dataset.num_classes == 10
    expected = make_bands_redundant_images(BandRedundantConfig(seed=3))[0]
    assert torch.equal(dataset.train_x[0], expected[0])
    with pytest.raises(DataError, match="fixed classes"):
        load_image_dataset("bands-redundant", classes=["a", "b"])
    with pytest.raises(ConfigError, match="bands"):
        make_bands_redundant_images(replace(SMALL, bands=("low", "ultra")))
    with pytest.raises(ConfigError, match="signal_strength"):
        make_bands_redundant_images(replace(SMALL, signal_strength=-1.0))
    with pytest.raises(ConfigError, match="dtype"):
        to_pixels(SMALL, torch.zeros(1, 3, 16, 16), dtype="int8")


# ---------------------------------------------------------------- the band_features measurement

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from torch import nn  # noqa: E402

from lrfeatures.analysis.band_features import (band_feature_importance, band_features_block,  # noqa: E402
                                               per_model_summary, probe_scores)
from lrfeatures.analysis.tables import KEY_COLUMNS  # noqa: E402

PROBE = replace(SMALL, n_train=1000, n_probe=500)
UNIT = (torch.zeros(3), torch.ones(3) / 255)  # prepare_input then hands the models raw 0..255 pixel values


class CentroidReader(nn.Module):
    """Nearest class mean of (optionally band-filtered) images: a fixed linear model of the task."""

    def __init__(self, x_train, y_train, band: int | None):
        super().__init__()
        self.filter, self.band = band_filter(PROBE), band
        self.center = x_train.float().mean(0)
        flat = self.view(x_train.float())
        self.means = torch.stack([flat[y_train == c].mean(0) for c in range(10)])

    def view(self, x):
        x = x - self.center
        return (x if self.band is None else self.filter(x)[self.band]).flatten(1)

    def forward(self, x):
        return (self.view(x) @ self.means.T - self.means.square().sum(1) / 2) / 100


class Constant(nn.Module):
    def forward(self, x):
        return torch.arange(10.0).expand(len(x), 10)


def test_probe_scores_find_the_band_a_model_reads():
    x_train, y_train = make_bands_redundant_images(PROBE)[:2]
    probes, labels = make_probe_sets(PROBE)
    acc, margin = probe_scores(CentroidReader(x_train, y_train, band=1), probes, labels, UNIT, 10)
    assert acc[1] > 0.5 and all(abs(acc[j] - CHANCE) < 0.04 for j in (0, 2))
    assert margin[1] > 10 * max(abs(margin[0]), abs(margin[2]))
    acc_all, margin_all = probe_scores(CentroidReader(x_train, y_train, band=None), probes, labels, UNIT, 10)
    assert (acc_all > CHANCE + 0.15).all() and acc_all.max() - acc_all.min() < 0.1
    acc_const, margin_const = probe_scores(Constant(), probes, labels, UNIT, 10)
    assert np.allclose(margin_const, 0.0, atol=1e-12)  # constant logits: exactly no margin
    assert np.allclose(acc_const, (labels == 9).double().mean(1).numpy())


def band_rows(stage, seed, acc, margin, diverged=False, plr=0.01):
    return [{"stage": stage, "data_seed": 0, "train_seed": seed, "plr": plr, "flr": np.nan, "swa_k": 0,
             "pretrain_stage": -1, "band": name, "band_index": i, "band_lo": 0, "band_hi": 0,
             "accuracy": acc[i], "margin": margin[i], "diverged": diverged}
            for i, name in enumerate(["low", "mid", "high"])]


def test_block_sorts_importance_names_the_winner_and_scores_sparsity():
    table = pd.DataFrame(band_rows("pretrain", 0, [0.1, 0.9, 0.1], [0.0, 2.0, 0.0])
                         + band_rows("pretrain", 1, [0.1, 0.8, 0.2], [0.01, 1.5, -0.01])
                         + band_rows("pretrain", 2, [0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
                         + band_rows("pretrain", 3, [0.9, 0.1, 0.1], [3.0, 0.0, 0.0], diverged=True))
    per_model = per_model_summary(table)
    assert per_model["winner"].tolist() == ["mid", "mid", "low", "low"]  # ties: the lower band
    assert per_model["sparsity"].tolist()[:3] == pytest.approx([1.0, 1.0, 0.0], abs=0.03)
    (group,) = band_features_block(table)["per_plr"]
    assert group["n_models"] == 3 and group["top_band"] == "mid"  # the diverged seed is left out
    assert group["winner_share"] == pytest.approx({"low": 1 / 3, "mid": 2 / 3, "high": 0.0})
    assert group["sorted_accuracy"][0]["mean"] == pytest.approx((0.9 + 0.8 + 0.5) / 3)
    assert group["accuracy"]["mid"]["mean"] == pytest.approx((0.9 + 0.8 + 0.5) / 3)
    assert set(KEY_COLUMNS) <= set(table.columns)


def test_measurement_skips_other_data_sets():
    ctx = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(dataset="cifar10")), kind="images",
                          models=lambda: pytest.fail("models() must not be built for another data set"))
    assert band_feature_importance(ctx) is None


@pytest.mark.slow
def test_preset_runs_end_to_end_with_band_importance(tmp_path, torch_one_thread):
    from lrfeatures import cli
    from lrfeatures.report.bands import BAND_FEATURE_FIGURES, has_band_features
    from lrfeatures.report.load import load_experiment
    from lrfeatures.store import ExperimentStore

    out = tmp_path / "bands"
    assert cli.main(["run", "images-bands-quick", "--out", str(out), "--quiet", "--no-report",
                     "--set", "pretrain.lrs=[0.003]", "--set", "seeds.train=[0]", "--set", "pretrain.epochs=4",
                     "--set", "swa.ks=[2]", "--set", "finetune.lrs=[0.001]",
                     "--set", "finetune.epochs=1"]) == 0
    table = ExperimentStore(out).table("band_features")
    assert len(table) == 3 * 3  # PT, FT, SWA; three bands each
    assert table["accuracy"].between(0, 1).all() and table["margin"].notna().all()
    assert table["accuracy"].max() > CHANCE + 0.05  # some band is read after a few epochs
    block = json.loads((out / "summary.json").read_text())["measurements"]["band_features"]
    assert block["bands"] == ["low", "mid", "high"] and len(block["per_plr"]) == 3
    exp = load_experiment(out)
    assert has_band_features(exp)
    for key, draw, caption in BAND_FEATURE_FIGURES:
        assert draw(exp, tmp_path / f"{key}.png").stat().st_size > 0 and caption
