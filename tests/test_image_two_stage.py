"""Image two-stage pre-training and the image recipe on the fused engine: by-hand equality, identity, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from lrfeatures.config import load_config
from lrfeatures.engine.images import train_image_model
from lrfeatures.errors import ConfigError
from lrfeatures.experiments import Experiment, plan_shards
from lrfeatures.experiments.images import ImageAnalysis, model_refs
from lrfeatures.store import ExperimentStore

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, colour_folder) -> Path:
    """3 classes x 20 images of 16x16."""
    return colour_folder(tmp_path_factory.mktemp("two-stage") / "set", CLASSES, seed=3)


def config(folder: Path, **sections) -> dict:
    """A tiny image experiment pre-trained in two stages: 2 epochs at ELR 0.05, then 2 at each PLR."""
    data = {"kind": "images", "name": "tiny-two-stage", "data": {"dataset": f"folder:{folder}"},
            "model": {"name": "convnet-si", "width": 2, "depth": 2},
            "pretrain": {"lrs": [1e-3, 1e-2], "epochs": 2, "batch_size": 12, "stages": [{"lr": 0.05, "epochs": 2}]},
            "finetune": {"lrs": [1e-3], "epochs": 1}, "swa": {"ks": [1, 2]}, "seeds": {"train": [0, 1]},
            "analysis": {"geometry_points": 3}}
    for section, fields in sections.items():
        data[section] = {**data.get(section, {}), **fields}
    return data


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory) -> Path:
    """The two-stage experiment, run to the end on the one-model engine (the by-hand runs use it too;
    fused = single is tested in float64 in tests/test_fused.py and below)."""
    root = tmp_path_factory.mktemp("run")
    Experiment(load_config(config(folder, engine={"name": "single"})), root).run()
    return root


def test_two_stage_equals_stage_one_then_stage_two_by_hand(finished):
    """Every model: stage 1 at its ELR, then stage 2 from those weights at its PLR, on the recipe's batch streams."""
    store = ExperimentStore(finished)
    cfg = store.config()
    exp = Experiment(cfg, finished)
    runner, shard = exp.worker, plan_shards(cfg)[0]
    stored = store.shard_tensors(shard.name, "weights")
    data = runner.data(0)
    for ref in model_refs(cfg, shard):
        model, rho = runner.make_model(ref.data_seed, ref.train_seed)
        first = runner.task(0.05, 2, rho, "pretrain-stage0", ref, 1, 2, 0, ())
        train_image_model(model, data, first, runner.augment)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(stored[f"{ref.tag}.stage0.{key}"], value.cpu(), rtol=0, atol=0)
        second = runner.task(cfg.pretrain.lrs[ref.plr_index], 2, rho, "pretrain", ref, 1, 1, cfg.checkpoints_kept,
                             tuple(cfg.swa.ks))
        result = train_image_model(model, data, second, runner.augment)
        for key, value in result.state.items():
            torch.testing.assert_close(stored[f"{ref.tag}.final.{key}"], value, rtol=0, atol=0)
        torch.testing.assert_close(stored[f"{ref.tag}.swa.k2"], result.swa[2], rtol=0, atol=0)


def test_two_stage_logs_join_on_one_epoch_axis_and_stage_models_load(finished):
    """Pre-training logs count epochs 1..4 over both stages; stage_models rebuilds each stage-1 end state."""
    metrics = pd.read_parquet(finished / "metrics.parquet").query("stage == 'pretrain'")
    assert sorted(metrics["step"].unique()) == [1, 2, 3, 4]
    assert metrics.groupby(["train_seed", "plr"]).size().eq(4).all()
    store = ExperimentStore(finished)
    cfg = store.config()
    exp = Experiment(cfg, finished)
    shard = plan_shards(cfg)[0]
    ctx = ImageAnalysis(cfg, shard, exp.worker.data(0), exp.worker)
    keys, models = ctx.stage_models()
    assert len(keys) == len(models) == 2 * 2 and {k["pretrain_stage"] for k in keys} == {0}
    keys, models = ctx.models()
    assert len(keys) == 2 * 2 * (1 + 1 + 2)  # seeds x PLRs x (PT, FT, 2 SWA)
    assert not any(k["diverged"] for k in keys)


def test_the_schedule_is_part_of_the_identity(folder, finished):
    """Resuming with another stage-1 ELR is refused (the store holds another experiment)."""
    from lrfeatures.errors import StoreError

    other = load_config(config(folder, pretrain={"stages": [{"lr": 0.07, "epochs": 2}]}, engine={"name": "single"}))
    with pytest.raises(StoreError, match="different config"):
        Experiment(other, finished)


def test_fused_and_single_engines_give_the_same_tables(folder, tmp_path):
    """engine.name = fused and single write the same evaluations, to float32 rounding."""
    base = config(folder, pretrain={"stages": []}, seeds={"train": [0]})
    fused = Experiment(load_config({**base, "engine": {"name": "fused"}}), tmp_path / "fused")
    fused.run()
    single = Experiment(load_config({**base, "engine": {"name": "single"}}), tmp_path / "single")
    single.run()
    a, b = (pd.read_parquet(p / "evaluations.parquet") for p in (fused.store.root, single.store.root))
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage, message", [
    ({}, "is empty"),
    ({"lr": -0.1, "epochs": 2}, "must be > 0"),
    ({"lr": 0.1, "epochs": 0}, "epochs=0 must be > 0"),
    ({"lr": 0.1, "lr_scale": 2.0, "epochs": 2}, "exactly one of lr"),
])
def test_bad_stages_are_one_line_errors(folder, stage, message):
    """Empty stages, LRs <= 0 and zero epochs each name the field."""
    with pytest.raises(ConfigError, match=message) as err:
        load_config(config(folder, pretrain={"stages": [stage]}))
    assert "pretrain.stages[0]" in str(err.value) and "\n" not in str(err.value)


def test_unknown_engine_and_precision_are_one_line_errors(folder):
    """engine.name and engine.precision name their choices."""
    with pytest.raises(ConfigError, match="'auto', 'fused' or 'single'"):
        load_config(config(folder, engine={"name": "turbo"}))
    with pytest.raises(ConfigError, match="'fp32' or 'bf16'"):
        load_config(config(folder, engine={"precision": "fp16"}))
    assert math.isfinite(load_config(config(folder, engine={"precision": "bf16"})).engine.memory_budget_gb)
