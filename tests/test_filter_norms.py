"""Filter-norm histograms (analysis/filter_norms.py, report/filter_norms.py): fixed-bin counts of known norms,
scale invariance, the layers of the ConvNet / ResNet / MLP, the synthetic measurement (with earlier stages)
and the figure."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from lrfeatures.analysis.filter_norms import (BIN_COLUMNS, filter_norms, histogram, layer_rows, module_layers,
                                              synthetic_filter_norms)
from lrfeatures.config import ModelConfig
from lrfeatures.experiments import Experiment
from lrfeatures.models.convnet import SIConvNet
from lrfeatures.models.registry import build_model
from lrfeatures.seeding import generator

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_known_norms_fall_in_their_bins_and_the_overflow():
    norms = torch.tensor([[0.5, 1.5, 1.0, 1.0], [7.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    out = histogram(norms)
    counts = np.stack([out[c] for c in BIN_COLUMNS], 1)
    assert counts.sum(1).tolist() == [4, 4, 4] and out["filters"].tolist() == [4, 4, 4]
    assert counts[0, 5] == 1 and counts[0, 15] == 1 and counts[0, 10] == 2
    assert counts[1, -1] == 1 and counts[1, 0] == 2 and counts[1, 5] == 1       # ratios 3.5 (over), 0, 0.5
    assert counts[2, 10] == 4 and out["ratio_std"][2] == 0                       # equal norms: all at 1
    np.testing.assert_allclose(out["mean_norm"], [1.0, 2.0, 2.0])
    np.testing.assert_allclose(out["ratio_max"], [1.5, 3.5, 1.0])


def test_ratios_on_a_bin_edge_fall_in_the_bin_they_start():
    out = histogram(torch.tensor([[0.3, 1.7]], dtype=torch.float64))   # ratios 0.3 and 1.7 (mean 1)
    assert out["bin_03"][0] == 1 and out["bin_17"][0] == 1


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0])
def test_histograms_are_scale_invariant(c):
    weight = torch.randn(3, 16, 4, 3, 3, generator=generator("w"), dtype=torch.float64)
    base, scaled = histogram(filter_norms(weight)), histogram(filter_norms(c * weight))
    for column in BIN_COLUMNS + ["ratio_std", "ratio_min", "ratio_max"]:
        np.testing.assert_allclose(scaled[column], base[column], rtol=1e-12)
    np.testing.assert_allclose(scaled["mean_norm"], c * base["mean_norm"], rtol=1e-12)


def test_every_convolution_of_the_convnet_and_resnet_and_the_mlp_rows():
    convnet = SIConvNet(3, 8, width=2, depth=2, num_outputs=3)
    layers = module_layers(convnet)
    assert [name for name, _ in layers] == ["features.0", "features.3", "features.7"]
    name, weight = layers[1]
    torch.testing.assert_close(filter_norms(weight)[0], convnet.features[3].weight.flatten(1).norm(dim=1))
    resnet = build_model(ModelConfig(name="resnet18-si", width=4), (3, 8, 8), 3, seed=0)
    convs = [n for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [n for n, _ in module_layers(resnet)] == convs and len(convs) == 20  # stem, 16 block convs, 3 shortcuts
    mlp = build_model(ModelConfig(name="mlp-si", width=5, depth=2), (6,), 1, seed=0)
    assert [(n, tuple(w.shape)) for n, w in module_layers(mlp)] == [("hidden.0.weight", (1, 5, 6)),
                                                                     ("hidden.1.weight", (1, 5, 5))]


def test_rows_skip_diverged_models():
    keys = pd.DataFrame({"stage": "pretrain", "plr": [0.1, 1.0]})
    weight = torch.ones(2, 4, 3)
    weight[1, 0, 0] = float("nan")
    rows = layer_rows(keys, [("w", weight)])
    assert rows["plr"].tolist() == [0.1] and rows["bin_10"].tolist() == [4]


def test_the_synthetic_measurement_covers_final_and_earlier_stage_models(tiny_run):
    from lrfeatures.experiments.synthetic import SyntheticRecipe
    from lrfeatures.store import ExperimentStore

    store = ExperimentStore(tiny_run)
    table = store.table("filter_norms")
    evaluations = store.table("evaluations")
    assert len(table) == 2 * len(evaluations)                    # every final model, both hidden layers
    assert set(table["layer"]) == {"hidden.0.weight", "hidden.1.weight"} and (table["pretrain_stage"] == 0).all()
    assert (table[BIN_COLUMNS].sum(axis=1) == table["filters"]).all() and (table["filters"] == 32).all()
    # A context with earlier-stage models (two-stage pre-training) adds their rows.
    cfg = store.config()
    runner = SyntheticRecipe().open(cfg, store)
    shard = next(s for s in Experiment(cfg, tiny_run).plan() if s.stage == "analyze")
    solutions = runner.solutions(shard)
    keys, theta, frozen = solutions[0]
    stage_keys = keys.assign(pretrain_stage=0)
    ctx = SimpleNamespace(cfg=SimpleNamespace(pretrain=SimpleNamespace(stages=[object()])), solutions=solutions[:1],
                          make_model=runner.make_model, stage_solutions=[(stage_keys, 2 * theta, frozen)])
    rows = synthetic_filter_norms(ctx)
    assert sorted(rows["pretrain_stage"].unique()) == [0, 1] and len(rows) == 4 * len(keys)
    first, second = (rows[rows["pretrain_stage"] == s].reset_index(drop=True) for s in (0, 1))
    pd.testing.assert_frame_equal(first[BIN_COLUMNS], second[BIN_COLUMNS])   # 2θ: same histogram


def test_the_figure_draws_a_row_per_stage(tiny_run, tmp_path, monkeypatch):
    from lrfeatures.report import filter_norms as module
    from lrfeatures.report import load_experiment

    exp = load_experiment(tiny_run)
    assert module.has_filter_norms(exp) and [key for key, _, _ in module.FILTER_NORM_FIGURES] == ["filter_norms"]
    assert module.plot_filter_norms(exp, tmp_path / "one.png").stat().st_size > 0
    # Two-stage pre-training: the same table with an earlier stage added.
    table = pd.read_parquet(tiny_run / "filter_norms.parquet")
    earlier = table[table["stage"] == "pretrain"].assign(pretrain_stage=0)
    monkeypatch.setattr(module, "filter_norm_table",
                        lambda _: pd.concat([earlier, table.assign(pretrain_stage=1)], ignore_index=True))
    assert module.plot_filter_norms(exp, tmp_path / "two.png").stat().st_size > 0
    assert module.checkpoint_names([0, 1]) == {0: "end of stage 1", 1: "end of pre-training"}


def test_a_two_stage_run_reports_its_histograms(make_tiny_config, tmp_path, monkeypatch):
    from lrfeatures.report import write_report
    from lrfeatures.report import figures as figure_sets
    from lrfeatures.report.filter_norms import FILTER_NORM_FIGURES, has_filter_norms

    cfg = make_tiny_config(pretrain={"stages": [{"lr": 0.3, "iterations": 60}]})
    Experiment(cfg, tmp_path / "run").run()
    table = pd.read_parquet(tmp_path / "run" / "filter_norms.parquet")
    # Final models follow the one earlier stage (pretrain_stage 1); the end of that stage is stage 0.
    assert set(table["pretrain_stage"]) == {0, 1}
    assert set(table.query("pretrain_stage == 0")["stage"]) == {"pretrain"}
    assert any(s.figures is FILTER_NORM_FIGURES for s in figure_sets.FIGURE_SETS)  # every report lists them
    html = write_report(tmp_path / "run").read_text()
    assert (tmp_path / "run" / "figures" / "filter_norms.png").is_file() and "Filter-norm histograms" in html
