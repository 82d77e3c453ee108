"""Two-stage pre-training (pretrain.stages): equal to running stage 1, then stage 2 from its weights by hand;
typed and validated; part of the experiment's identity; the synthetic-two-stage preset."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lrfeatures.config import load_config
from lrfeatures.engine.common import GridTask
from lrfeatures.engine.grid import GridTrainer
from lrfeatures.errors import ConfigError, StoreError
from lrfeatures.experiments import Experiment
from lrfeatures.store import ExperimentStore

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STAGE_1 = {"lr": 0.3, "iterations": 60}


def shard_of(exp: Experiment, stage: str):
    """The one shard of a stage of a tiny experiment."""
    return next(s for s in exp.plan() if s.stage == stage)


def test_two_stage_run_equals_stage_one_then_stage_two_by_hand(make_tiny_config, tmp_path):
    cfg = make_tiny_config(pretrain={"stages": [STAGE_1]})
    exp = Experiment(cfg, tmp_path / "two")
    exp.run()
    stored = exp.store.shard_tensors(shard_of(exp, "pretrain").name, "weights")
    runner, shard, plrs = exp.worker, shard_of(exp, "pretrain"), cfg.pretrain.lrs
    seeds = shard.train_seeds
    data = runner.data(0)
    init = torch.stack([runner.initial_state(0, s)[0] for s in seeds]).repeat_interleave(len(plrs), 0)
    frozen = runner.frozen_of(shard, len(plrs))
    models = torch.arange(len(seeds)).repeat_interleave(len(plrs))
    trainer = GridTrainer(runner.make_model, 1.0, native=cfg.engine.native)

    def train(init, lrs, stream, iterations, **checkpoints):
        task = GridTask(init, frozen, torch.tensor(lrs, dtype=torch.float64), models,
                        [("order", stream, 0, s) for s in seeds], iterations, cfg.pretrain.batch_size,
                        cfg.sphere.rho, log_every=cfg.pretrain.log_every, **checkpoints)
        return trainer.train(task, data.x_train, data.y_train, data.x_test, data.y_test)

    first = train(init, [STAGE_1["lr"]] * len(init), "pretrain-stage0", STAGE_1["iterations"])
    second = train(first.final, plrs * len(seeds), "pretrain", cfg.pretrain.iterations,
                   ckpt_every=cfg.pretrain.ckpt_every, keep_checkpoints=cfg.checkpoints_kept)
    assert torch.equal(stored["final"], second.final)
    assert torch.equal(stored["checkpoints"], second.checkpoints)
    assert stored["checkpoint_steps"].tolist() == [STAGE_1["iterations"] + s for s in second.checkpoint_steps]
    # The metrics run on one step axis; the second stage's step 0 (the first's end) is not repeated.
    metrics = pd.read_parquet(tmp_path / "two" / "metrics.parquet")
    steps = sorted(metrics.loc[metrics["stage"] == "pretrain", "step"].unique())
    assert steps == [0, 50, 60, 110, 160, 210, 260]
    # Fine-tuning starts from the last stage's weights.
    finetune = GridTask(second.final.repeat_interleave(len(cfg.finetune.lrs), 0),
                        runner.frozen_of(shard, len(plrs) * len(cfg.finetune.lrs)),
                        torch.tensor(cfg.finetune.lrs * len(plrs) * len(seeds), dtype=torch.float64),
                        torch.arange(len(seeds)).repeat_interleave(len(plrs) * len(cfg.finetune.lrs)),
                        [("order", "finetune", 0, s) for s in seeds], cfg.finetune.iterations,
                        cfg.pretrain.batch_size, cfg.sphere.rho, log_every=cfg.finetune.log_every)
    tuned = trainer.train(finetune, data.x_train, data.y_train, data.x_test, data.y_test)
    assert torch.equal(exp.store.shard_tensors(shard_of(exp, "finetune").name, "weights")["final"], tuned.final)


def test_a_stage_scaled_to_the_grid_plr_differs_per_plr(make_tiny_config, tmp_path):
    short = {"finetune": {"lrs": [1e-3], "iterations": 20, "log_every": 20}, "swa": {"ks": [2]}}
    cfg = make_tiny_config(pretrain={"stages": [{"lr_scale": 3.0, "iterations": 40}], "iterations": 40,
                                     "keep_checkpoints": 2}, **short)
    exp = Experiment(cfg, tmp_path / "scaled")
    exp.run()
    plain = Experiment(make_tiny_config(pretrain={"iterations": 40, "keep_checkpoints": 2}, **short),
                       tmp_path / "plain")
    plain.run()
    two = exp.store.shard_tensors(shard_of(exp, "pretrain").name, "weights")["final"]
    one = plain.store.shard_tensors(shard_of(plain, "pretrain").name, "weights")["final"]
    assert not torch.equal(two, one) and torch.isfinite(two[0]).all()
    assert len(set(map(tuple, two.tolist()))) == len(two)  # no two PLRs share their first stage


def test_the_schedule_is_part_of_the_identity(make_tiny_config, tmp_path):
    Experiment(make_tiny_config(pretrain={"stages": [STAGE_1]}), tmp_path / "run")
    assert "lr = 0.3" in (tmp_path / "run" / "config.toml").read_text()
    with pytest.raises(StoreError, match="different config"):
        Experiment(make_tiny_config(pretrain={"stages": [{"lr": 0.1, "iterations": 60}]}), tmp_path / "run")
    assert ExperimentStore(tmp_path / "run").config().pretrain.stages[0].lr == 0.3


@pytest.mark.parametrize("stages, message", [
    ([{}], r"pretrain.stages\[0\] is empty"),
    ([{"lr": -0.1, "iterations": 10}], r"pretrain.stages\[0\].lr=-0.1 must be > 0"),
    ([{"lr": 0.0, "iterations": 10}], "exactly one of lr"),
    ([{"lr_scale": -2.0, "iterations": 10}], r"lr_scale=-2.0 must be > 0"),
    ([{"lr": 0.1, "lr_scale": 2.0, "iterations": 10}], "exactly one of lr"),
    ([{"lr": 0.1}], r"iterations=0 must be > 0"),
    ([{"lr": 0.1, "iterations": 10, "epochs": 3}], "unknown config field 'pretrain.stages\\[0\\].epochs'"),
])
def test_bad_stages_are_one_line_errors(make_tiny_config, stages, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_tiny_config(pretrain={"stages": stages})
    assert "\n" not in str(err.value)


def test_the_two_stage_preset_loads_with_curvature_on():
    cfg = load_config("synthetic-two-stage")
    assert cfg.curvature.enabled and len(cfg.pretrain.stages) == 1 and cfg.pretrain.stages[0].lr > 0
    assert not load_config("synthetic-quick").curvature.enabled


@pytest.mark.slow
def test_the_two_stage_preset_runs_end_to_end_and_reports_curvature(tmp_path):
    from lrfeatures import cli

    out = tmp_path / "two-stage"
    assert cli.main(["run", "synthetic-two-stage", "--out", str(out), "--quiet",
                     "--set", "seeds.train=[0]", "--set", "pretrain.lrs=[0.001, 0.01, 0.1]"]) == 0
    assert (out / "figures" / "curvature.png").is_file() and (out / "figures" / "grad_noise.png").is_file()
    assert len(pd.read_parquet(out / "curvature.parquet")) > 0
