"""Image experiment: sphere steps keep the norm, SWA + BN recompute, divergence, resume, errors, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lrfeatures import cli
from lrfeatures.config import ModelConfig, load_config
from lrfeatures.data.images import CIFAR_MEAN, CIFAR_STD
from lrfeatures.engine.images import (DeviceImages, ImageTask, SphereSGD, evaluate, load_si_, recompute_bn,
                                      train_image_model)
from lrfeatures.errors import ConfigError, DataError
from lrfeatures.experiments import Experiment, load_experiment_config, plan_shards
from lrfeatures.experiments.images import image_config
from lrfeatures.models.convnet import SIConvNet
from lrfeatures.models.registry import si_parameters
from lrfeatures.sphere import flatten

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSES = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, colour_folder) -> Path:
    """4 classes x 20 images of 16x16 (the flat layout: 20% of each class becomes the test set)."""
    return colour_folder(tmp_path_factory.mktemp("images") / "set", CLASSES, seed=0)


def tiny_images(folder: Path, **sections) -> dict:
    """An image config that trains in well under a second per shard."""
    data = {"kind": "images", "name": "tiny-images",
            "data": {"dataset": f"folder:{folder}", "val_fraction": 0.25},
            "model": {"name": "convnet-si", "width": 2, "depth": 2},
            "pretrain": {"lrs": [1e-3, 0.3], "epochs": 3, "batch_size": 16},
            "finetune": {"lrs": [1e-3, 1e-2], "epochs": 2},
            "swa": {"ks": [1, 2]}, "analysis": {"geometry_points": 3}}
    for section, fields in sections.items():
        data[section] = {**data.get(section, {}), **fields}
    return data


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory) -> Path:
    """A complete run of the tiny image experiment."""
    root = tmp_path_factory.mktemp("run")
    Experiment(load_config(tiny_images(folder)), root).run()
    return root


def tiny_net(seed: int = 0) -> SIConvNet:
    """A 2-block SI ConvNet for 8x8 images."""
    torch.manual_seed(seed)
    return SIConvNet(3, 8, width=2, depth=2, num_outputs=3)


NORM = (torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD))


# ---------------------------------------------------------------- training on the sphere

@settings(max_examples=15, deadline=None)
@given(lr=st.floats(1e-4, 10.0), rho=st.floats(0.5, 30.0), rule=st.sampled_from(["projected", "riemannian"]))
def test_sphere_steps_keep_the_si_norm_and_the_frozen_head(lr, rho, rule):
    model = tiny_net()
    load_si_(model, flatten(si_parameters(model)).detach(), rho)
    head = model.head.weight.clone()
    before = flatten(si_parameters(model)).detach().clone()
    optimizer = SphereSGD(model, lr, rho, rule)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        optimizer.step(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    after = flatten(si_parameters(model)).detach()
    assert float(after.norm()) == pytest.approx(rho, rel=1e-5)
    assert not torch.equal(after, before)  # it did move
    assert torch.equal(model.head.weight, head)
    assert optimizer.read_and_reset()["diverged"] is False


def test_train_image_model_logs_epochs_and_keeps_norm(folder):
    from lrfeatures.data.images import load_image_dataset

    data = DeviceImages.from_dataset(load_image_dataset(f"folder:{folder}"), "cpu")
    model = SIConvNet(3, 16, width=2, depth=2, num_outputs=4)
    rho = 3.0
    load_si_(model, flatten(si_parameters(model)).detach(), rho)
    task = ImageTask(0.01, 4, 16, rho, ("order", 0), log_every=2, keep_checkpoints=3, swa_ks=(2, 4))
    result = train_image_model(model, data, task)
    assert result.metrics["step"] == [2, 4]
    assert result.checkpoint_epochs == [2, 3, 4]
    assert result.checkpoints.norm(dim=1).numpy() == pytest.approx([rho] * 3, rel=1e-5)
    # The online SWA sums are the plain averages of the last K checkpoints.
    torch.testing.assert_close(result.swa[2], result.checkpoints[-2:].mean(0))
    assert not result.diverged and all(np.isfinite(result.metrics["test_acc"]))
    assert 0 <= result.final["train_acc"] <= 1


def test_divergence_is_recorded_and_freezes_the_model(folder, nan_after):
    from lrfeatures.data.images import load_image_dataset

    data = DeviceImages.from_dataset(load_image_dataset(f"folder:{folder}"), "cpu")
    model = nan_after(SIConvNet(3, 16, width=2, depth=2, num_outputs=4), after=5)
    task = ImageTask(0.01, 4, 16, 1.0, ("order", 0), keep_checkpoints=4)
    result = train_image_model(model, data, task)  # 4 steps per epoch: diverges in epoch 2
    assert result.diverged
    assert result.metrics["diverged"] == [False, True, True, True]
    assert math.isnan(result.metrics["train_loss"][1])
    assert model.calls == 8  # training stopped after the epoch that diverged
    # Frozen at the last finite weights, still on the sphere.
    assert torch.isfinite(result.checkpoints).all()
    torch.testing.assert_close(result.checkpoints[1], result.checkpoints[3])


# ---------------------------------------------------------------- BN recompute and SWA

def manual_bn_forward(model: SIConvNet, x: torch.Tensor, chunks: int = 1, x_eval: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The eval output on x_eval (default x) with BN statistics computed by hand over x in `chunks` parts.

    As in a train-mode pass, each chunk is normalized by its own (biased) statistics on the way
    through; each BN keeps the chunk-average of the mean and of the unbiased variance.
    """
    stats = []
    for part in x.chunk(chunks):
        h, seen = part, []
        for layer in model.features:
            if isinstance(layer, nn.BatchNorm2d):
                flat = h.transpose(0, 1).reshape(h.shape[1], -1)
                seen.append((flat.mean(1), flat.var(1)))
                h = (h - flat.mean(1).view(1, -1, 1, 1)) / torch.sqrt(
                    flat.var(1, unbiased=False).view(1, -1, 1, 1) + layer.eps)
            else:
                h = layer(h)
        stats.append(seen)
    h, bn = (x if x_eval is None else x_eval), 0
    for layer in model.features:
        if isinstance(layer, nn.BatchNorm2d):
            mean = torch.stack([s[bn][0] for s in stats]).mean(0).view(1, -1, 1, 1)
            var = torch.stack([s[bn][1] for s in stats]).mean(0).view(1, -1, 1, 1)
            h, bn = (h - mean) / torch.sqrt(var + layer.eps), bn + 1
        else:
            h = layer(h)
    return model.head(h)


@pytest.mark.parametrize("chunks", [1, 2])
def test_recompute_bn_matches_a_hand_computed_pass(chunks):
    model = tiny_net()
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=gen, dtype=torch.uint8)
    with torch.no_grad():  # stale statistics that the recompute must discard
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(5.0)
    recompute_bn(model, x, 16 // chunks, NORM)
    assert not model.training
    xn = (x.float() / 255 - NORM[0].view(1, 3, 1, 1)) / NORM[1].view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(xn), manual_bn_forward(model, xn, chunks), rtol=1e-4, atol=1e-5)


def test_swa_shard_equals_hand_average_with_bn_recomputed(finished):
    from lrfeatures.data.images import load_image_dataset
    from lrfeatures.store import ExperimentStore

    store = ExperimentStore(finished)
    cfg = store.config()
    # One shard holds every PLR of the seed; the PLR index is part of each tensor's name.
    weights = {k.removeprefix("s0-plr000."): v for k, v in
               store.shard_tensors("pretrain-d0-s0-0-n1", "weights").items() if k.startswith("s0-plr000.")}
    # Average the last two checkpoints by hand; the pretrain shard's online average must agree.
    by_hand = weights["checkpoints"][-2:].mean(0)
    torch.testing.assert_close(weights["swa.k2"], by_hand)
    # Load the average (at norm rho) into the trained net, recompute BN by hand, evaluate.
    model = SIConvNet(3, 16, width=2, depth=2, num_outputs=4)
    model.load_state_dict({k[6:]: v for k, v in weights.items() if k.startswith("final.")})
    load_si_(model, by_hand, float(weights["rho"]))
    dataset = load_image_dataset(cfg.data.dataset, val_fraction=0.25, seed=0)
    train, test = ((x.float() / 255 - NORM[0].view(1, 3, 1, 1)) / NORM[1].view(1, 3, 1, 1)
                   for x in (dataset.train_x, dataset.test_x))
    chunks, rest = divmod(len(train), cfg.pretrain.batch_size)
    assert rest == 0  # equal chunks, so the hand-made average of chunk statistics is exact
    with torch.no_grad():
        train_logits = manual_bn_forward(model, train, chunks)
        test_logits = manual_bn_forward(model, train, chunks, x_eval=test)
    row = store.table("evaluations").query("stage == 'swa' and swa_k == 2 and plr == 0.001").iloc[0]
    assert row["train_loss"] == pytest.approx(F.cross_entropy(train_logits, dataset.train_y).item(), rel=1e-4)
    assert row["test_loss"] == pytest.approx(F.cross_entropy(test_logits, dataset.test_y).item(), rel=1e-4)
    assert row["test_acc"] == pytest.approx((test_logits.argmax(1) == dataset.test_y).double().mean().item())


# ---------------------------------------------------------------- the experiment

def test_tables_follow_the_store_schema(finished):
    metrics = pd.read_parquet(finished / "metrics.parquet")
    evaluations = pd.read_parquet(finished / "evaluations.parquet")
    geometry = pd.read_parquet(finished / "geometry.parquet")
    keys = ["stage", "data_seed", "train_seed", "plr", "flr", "swa_k"]
    assert set(keys + ["step", "train_loss", "train_acc", "test_loss", "test_acc", "grad_norm", "grad_norm_mean",
                       "batch_loss_mean", "diverged", "val_loss", "val_acc"]) <= set(metrics.columns)
    assert sorted(metrics.query("stage == 'pretrain'")["step"].unique()) == [1, 2, 3]
    assert len(evaluations) == 2 * (1 + 2 + 2)  # per PLR: pretrain, 2 FLRs, 2 SWA Ks
    pre = evaluations.query("stage == 'pretrain'")
    assert "epochs_to_convergence" in pre and pre["epochs_to_convergence"].isna().all() | (
        pre["epochs_to_convergence"] >= 1).all()
    assert set(geometry["pair"]) == {"ft_low-ft_high", "swa-ft_high", "swa-ft_low"}
    assert geometry[["angle", "train_barrier", "test_barrier"]].notna().all().all()
    assert ((geometry["angle"] >= 0) & (geometry["angle"] <= math.pi)).all()
    assert (geometry["swa_k"] == 2).all()
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["chance"] == 0.25 and summary["dataset"]["num_classes"] == 4
    assert [p["plr"] for p in summary["per_plr"]] == [1e-3, 0.3]
    assert all(p["regime"] in ("1", "2", "2A", "2B", "3") for p in summary["per_plr"])


def test_resume_after_one_shard_gives_identical_tables(folder, finished, tmp_path):
    cfg = load_config(tiny_images(folder))
    first = plan_shards(cfg)[0]
    assert first.stage == "pretrain"
    Experiment(cfg, tmp_path).run_shard(first)  # "interrupted" after one shard
    done = (tmp_path / "shards" / first.name / "done.json").read_text()
    Experiment(cfg, tmp_path).run()
    assert (tmp_path / "shards" / first.name / "done.json").read_text() == done  # not recomputed
    for table in ("metrics", "evaluations", "geometry"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{table}.parquet"),
                                      pd.read_parquet(finished / f"{table}.parquet"))


@pytest.mark.parametrize("override, error", [
    ({"data": {"dataset": "imagenet"}}, ConfigError),
    ({"pretrain": {"lrs": [0.0]}}, ConfigError),
    ({"pretrain": {"lrs": [-1e-3]}}, ConfigError),
    ({"pretrain": {"lrs": [float("nan")]}}, ConfigError),
    ({"pretrain": {"lrs": []}}, ConfigError),
    ({"finetune": {"lrs": [1e-3, 0.0]}}, ConfigError),
    ({"model": {"name": "mlp-si"}}, ConfigError),
    ({"swa": {"ks": [10]}}, ConfigError),
    ({"sphere": {"rho": -1.0}}, ConfigError),
    ({"data": {"normalization": "imagenet"}}, ConfigError),
])
def test_bad_configs_are_config_errors(folder, override, error):
    with pytest.raises(error):
        load_experiment_config(tiny_images(folder, **override))


def test_missing_folder_is_a_data_error(tmp_path):
    cfg = load_config(tiny_images(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist"):
        Experiment(cfg, tmp_path / "run").run()


def test_batch_larger_than_the_training_set_is_a_config_error(folder, tmp_path):
    cfg = load_config(tiny_images(folder, pretrain={"batch_size": 1000}))
    with pytest.raises(ConfigError, match="batch_size"):
        Experiment(cfg, tmp_path).run()


def test_preset_variants_follow_the_model():
    assert image_config("paper").model.name == "resnet18-si"
    convnet = image_config("paper", model="convnet-si")
    assert convnet.name == "images-paper-convnet" and convnet.sphere.rho == 12.0
    small = image_config("cpu-small", model="resnet18-si", dataset="cifar100")
    assert small.model.name == "resnet18-si" and small.data.dataset == "cifar100" and small.sphere.rho == 0.0


# ---------------------------------------------------------------- CLI

CLI_OVERRIDES = ["pretrain.lrs=[0.001, 0.3]", "pretrain.epochs=2", "pretrain.batch_size=16", "finetune.epochs=1",
                 "swa.ks=[1, 2]", "data.max_per_class=0", "model.width=2", "model.depth=2",
                 "analysis.geometry_points=2"]


def test_cli_images_end_to_end(folder, tmp_path, monkeypatch, capsys):
    import lrfeatures.report as report

    def broken_report(root):
        raise RuntimeError("no figures today")

    monkeypatch.setattr(report, "write_report", broken_report)
    argv = ["images", "--dataset", f"folder:{folder}", "--model", "convnet-si", "--preset", "cpu-small",
            "--out", str(tmp_path / "run"), "--quiet"]
    for override in CLI_OVERRIDES:
        argv += ["--set", override]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "warning: report not written" in out.err  # a report failure never fails the run
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["name"] == "images-cpu-small" and len(summary["per_plr"]) == 2
    assert cli.main(argv + ["--no-report"]) == 0  # resuming a finished run is a no-op


def test_cli_bad_dataset_exits_2(tmp_path, capsys):
    assert cli.main(["images", "--dataset", "imagenet", "--out", str(tmp_path), "--quiet"]) == 2
    assert "data.dataset" in capsys.readouterr().err
