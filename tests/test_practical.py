"""Practical setting (SPEC §4): split optimizer, weight decay off the sphere, regular models end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lrfeatures.config import ModelConfig, load_config
from lrfeatures.engine.images import (SplitOptimizer, free_parameters, load_tracked_, tracked_parameters)
from lrfeatures.errors import ConfigError
from lrfeatures.config import ImageConfig, ImageDataConfig
from lrfeatures.experiments import Experiment, load_experiment_config, plan_shards
from lrfeatures.data.augment import AugmentPipeline
from lrfeatures.experiments.images import image_config, model_refs
from lrfeatures.models import build_model, model_entry
from lrfeatures.models.registry import si_parameters
from lrfeatures.optim import OptimizerConfig, ScheduleConfig
from lrfeatures.sphere import flatten

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSES = ["ant", "bee", "cat"]
TINY_VIT = {"heads": 2, "dim_head": 8, "mlp_dim": 32, "patch": 4, "dropout": 0.0, "emb_dropout": 0.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, colour_folder) -> Path:
    """3 classes x 20 images of 16x16 (16 train + 4 test per class)."""
    return colour_folder(tmp_path_factory.mktemp("practical") / "set", CLASSES, seed=1)


def practical(folder: Path, **sections) -> dict:
    """A regular ResNet-18 of width 4 with SGD + momentum + weight decay, crop/flip + RandAugment."""
    data = {"kind": "images", "name": "tiny-practical",
            "data": {"dataset": f"folder:{folder}", "augment": True, "randaugment": [2, 14]},
            "model": {"name": "resnet18", "width": 4},
            "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
            "pretrain": {"lrs": [0.01, 0.1], "epochs": 1, "batch_size": 16},
            "finetune": {"lrs": [1e-3, 1e-2], "epochs": 1},
            "swa": {"ks": [1]}, "analysis": {"geometry_points": 3}}
    for section, fields in sections.items():
        data[section] = {**data.get(section, {}), **fields}
    return data


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory) -> Path:
    """A complete run of the tiny practical experiment."""
    root = tmp_path_factory.mktemp("run")
    Experiment(load_config(practical(folder)), root).run()
    return root


def tiny_vit_si(seed: int = 0) -> nn.Module:
    """A one-block SI ViT for 8x8 images (no dropout, so steps are deterministic)."""
    return build_model(ModelConfig(name="vit-si", width=16, depth=1, options=TINY_VIT), (3, 8, 8), 3, seed)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random normalized batch of 8x8 images and labels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)


# ---------------------------------------------------------------- the split optimizer

@settings(max_examples=15, deadline=None)
@given(lr=st.floats(1e-4, 1.0), rho=st.floats(0.5, 20.0), name=st.sampled_from(["sgd", "adam", "adamw"]))
def test_si_group_stays_on_the_sphere_while_the_rest_moves_with_the_optimizer(lr, rho, name):
    model = tiny_vit_si()
    si, free = si_parameters(model), free_parameters(model)
    assert si and free and {id(p) for p in si}.isdisjoint(id(p) for p in free)
    with torch.no_grad():
        flat = flatten(si)
        for p in si:
            p.mul_(rho / flat.norm())
    si_before, free_before = flatten(si).detach().clone(), flatten(free).detach().clone()
    optimizer = SplitOptimizer(model, lr, rho, free=OptimizerConfig(name, lr=1e-3), total_steps=3)
    assert optimizer.optimizer.param_groups[0]["lr"] == 1e-3  # its own LR, not the ELR
    for step in range(3):
        optimizer.step(*batch(step))
    si_after, free_after = flatten(si).detach(), flatten(free).detach()
    assert float(si_after.norm()) == pytest.approx(rho, rel=1e-5)
    assert not torch.equal(si_after, si_before)
    assert not torch.equal(free_after, free_before)
    assert optimizer.read_and_reset()["diverged"] is False


@settings(max_examples=15, deadline=None)
@given(lr=st.floats(1e-3, 0.5), wd=st.floats(1e-4, 0.1), name=st.sampled_from(["sgd", "adamw"]))
def test_weight_decay_applies_to_the_non_si_parameters_only(lr, wd, name):
    # One step from the same point on the same batch, with and without weight decay: for SGD (L2)
    # and AdamW (decoupled) the non-SI weights then differ by exactly -lr * wd * p0, the SI ones not at all.
    runs = []
    for decay in (0.0, wd):
        model = tiny_vit_si()
        rho = float(flatten(si_parameters(model)).detach().norm())
        start = flatten(free_parameters(model)).detach().clone()
        optimizer = SplitOptimizer(model, 0.05, rho, free=OptimizerConfig(name, lr=lr, weight_decay=decay))
        optimizer.step(*batch())
        runs.append((flatten(si_parameters(model)).detach(), flatten(free_parameters(model)).detach(), start))
    (si_plain, free_plain, start), (si_decayed, free_decayed, _) = runs
    assert torch.equal(si_plain, si_decayed)
    torch.testing.assert_close(free_decayed - free_plain, -lr * wd * start, rtol=1e-3, atol=1e-6)


def test_schedule_steps_once_per_optimizer_step():
    model = tiny_vit_si()
    rho = float(flatten(si_parameters(model)).detach().norm())
    optimizer = SplitOptimizer(model, 0.01, rho, free=OptimizerConfig("adam", lr=1e-2),
                               schedule=ScheduleConfig("cosine", final_factor=0.1), total_steps=4)
    for step in range(4):
        optimizer.step(*batch(step))
    assert optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_a_non_finite_step_freezes_the_non_si_parameters(nan_after):
    cfg = ImageConfig(model=ModelConfig(name="resnet18", width=2))
    model = nan_after(build_model(cfg.model, (3, 8, 8), 3, 0), after=2)
    optimizer = SplitOptimizer(model, 0.1, 0.0, free=OptimizerConfig("sgd", lr=0.1, momentum=0.9))
    for step in range(2):
        optimizer.step(*batch(step))
    good = flatten(tracked_parameters(model)).detach().clone()
    for step in range(2, 5):
        optimizer.step(*batch(step))
    torch.testing.assert_close(flatten(tracked_parameters(model)).detach(), good, rtol=0, atol=0)
    assert optimizer.read_and_reset()["diverged"] is True


def test_load_tracked_puts_the_si_part_at_rho_and_the_rest_as_is():
    model = tiny_vit_si()
    n_si = flatten(si_parameters(model)).numel()
    vector = torch.randn(flatten(tracked_parameters(model)).numel(), generator=torch.Generator().manual_seed(3))
    load_tracked_(model, vector, rho=2.5)
    assert float(flatten(si_parameters(model)).detach().norm()) == pytest.approx(2.5, rel=1e-5)
    torch.testing.assert_close(flatten(free_parameters(model)).detach(), vector[n_si:])
    with pytest.raises(ConfigError, match="does not fit"):
        load_tracked_(model, vector[:-1])


def test_augment_pipeline_is_seeded_and_keeps_uint8():
    pipeline = AugmentPipeline.from_config(ImageDataConfig(augment=True, randaugment=[2, 14]))
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = (pipeline(x, torch.Generator().manual_seed(7)) for _ in range(2))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert AugmentPipeline.from_config(ImageDataConfig()) is None


# ---------------------------------------------------------------- the experiment

def test_tiny_practical_run_writes_tables_and_a_summary_without_regimes(finished):
    metrics = pd.read_parquet(finished / "metrics.parquet")
    evaluations = pd.read_parquet(finished / "evaluations.parquet")
    geometry = pd.read_parquet(finished / "geometry.parquet")
    assert set(evaluations["stage"]) == {"pretrain", "finetune", "swa"}
    assert len(evaluations) == 2 * (1 + 2 + 1)  # per PLR: pretrain, 2 FLRs, 1 SWA K
    assert metrics[["train_loss", "test_acc", "grad_norm"]].notna().all().all()
    assert set(geometry["pair"]) == {"ft_low-ft_high", "swa-ft_high", "swa-ft_low"}
    assert ((geometry["angle"] > 0) & (geometry["angle"] <= math.pi)).all()
    summary = json.loads((finished / "summary.json").read_text())
    assert [p["regime"] for p in summary["per_plr"]] == [None, None]
    assert summary["regimes"]["defined"] is False and "SI group" in summary["regimes"]["reason"]
    assert summary["per_plr"][0]["swa"]["1"]["test_acc"]["mean"] is not None
    # Nothing on the sphere: rho is 0 and the stored SWA vector covers every trainable parameter.
    from lrfeatures.store import ExperimentStore

    weights = {k.removeprefix("s0-plr000."): v for k, v in
               ExperimentStore(finished).shard_tensors("pretrain-d0-s0-0-n1", "weights").items()}
    assert float(weights["rho"]) == 0.0
    cfg = load_config(practical(Path("unused")))
    model = build_model(cfg.model, (3, 16, 16), 3, 0)
    assert weights["swa.k1"].numel() == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_report_loads_a_run_without_regimes(finished):
    from lrfeatures.report import load_experiment, regime_table

    exp = load_experiment(finished)
    assert exp.regimes.runs() == [] and not any(exp.regimes.boundaries.values())
    assert list(regime_table(exp)["regime"]) == ["–", "–"]


def test_resume_after_one_shard_gives_identical_tables(folder, finished, tmp_path):
    cfg = load_config(practical(folder))
    first = plan_shards(cfg)[0]
    Experiment(cfg, tmp_path).run_shard(first)  # "interrupted" after one shard
    done = (tmp_path / "shards" / first.name / "done.json").read_text()
    Experiment(cfg, tmp_path).run()
    assert (tmp_path / "shards" / first.name / "done.json").read_text() == done  # not recomputed
    for table in ("metrics", "evaluations", "geometry"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / f"{table}.parquet"),
                                      pd.read_parquet(finished / f"{table}.parquet"))


def test_vit_si_pretrain_is_split_and_reproducible_with_dropout(folder, tmp_path):
    cfg = load_config(practical(folder, model={"name": "vit-si", "width": 16, "depth": 1,
                                           "options": {**TINY_VIT, "dropout": 0.1}},
                                optimizer={"name": "adam", "momentum": 0.0, "weight_decay": 1e-4,
                                           "lr_scale": 0.5},
                                pretrain={"lrs": [0.01], "epochs": 2}, swa={"ks": [2]}))
    shard = plan_shards(cfg)[0]
    assert shard.stage == "pretrain"
    weights = []
    for seed, run in enumerate(("a", "b")):
        experiment = Experiment(cfg, tmp_path / run)
        ref = model_refs(cfg, shard)[0]
        assert experiment.worker.task(0.01, 1, 1.0, "pretrain", ref, 1, 1, 0, ()).optimizer.lr == 0.005
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # as a fresh process would: dropout must not depend on the global RNG
            experiment.run_shard(shard)
        weights.append(experiment.store.shard_tensors(shard.name, "weights"))
    key = f"{ref.tag}.checkpoints"
    torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)
    model, rho = experiment.worker.make_model(0, 0)
    n_si = flatten(si_parameters(model)).numel()
    assert rho > 0 and weights[0][key].shape[1] > n_si
    norms = weights[0][key][:, :n_si].norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, rho), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- configs and presets

@pytest.mark.parametrize("override", [
    {"optimizer": {"name": "lion"}},
    {"optimizer": {"name": "adam", "momentum": 0.9}},
    {"optimizer": {"weight_decay": -1.0}},
    {"optimizer": {"betas": [0.9]}},
    {"optimizer": {"lr_scale": 0.0}},
    {"schedule": {"name": "step"}},              # step needs step_size
    {"schedule": {"name": "warm"}},
    {"data": {"randaugment": [2]}},
    {"data": {"randaugment": [2, 31]}},
    {"model": {"name": "vit", "options": {"dropout": 1.0}}},
    {"model": {"name": "resnet18", "options": {"heads": 2}}},
    {"model": {"name": "mlp-si"}},
])
def test_bad_practical_configs_are_config_errors(folder, override):
    with pytest.raises(ConfigError):
        load_experiment_config(practical(folder, **override))


@pytest.mark.parametrize("name", ["practical-resnet18-cpu-small", "practical-resnet18-paper",
                                  "vit-small-cpu-small", "vit-small-paper"])
def test_practical_presets_load(name):
    cfg = image_config(name)
    assert cfg.name == name and not model_entry(cfg.model.name).has_si_group
    assert cfg.schedule.name == "constant" and cfg.data.augment


def test_model_choice_selects_the_practical_presets():
    assert image_config("cpu-small", model="resnet18").name == "practical-resnet18-cpu-small"
    vit_si = image_config("paper", model="vit-si")
    assert vit_si.name == "vit-small-paper" and vit_si.model.name == "vit-si" and model_entry(vit_si.model.name).has_si_group
    assert vit_si.optimizer.name == "adam" and vit_si.data.randaugment == [2, 14]
    assert image_config("cpu-small", model="resnet18-si").name == "images-cpu-small"
