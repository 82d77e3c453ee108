"""The paper's qualitative picture on the synthetic task (SPEC §1, §3), end to end.

A reduced `synthetic-quick` (2 training seeds, 2 FLRs) on the full 23-PLR grid:
- regime 1 (small PLRs) fits the training set and learns no single feature strongly;
- just above the convergence threshold one feature stands out and fine-tuned accuracy peaks;
- large PLRs stay at chance.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrfeatures.analysis.features import sorted_importance
from lrfeatures.config import load_config
from lrfeatures.experiments import Experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """Per-PLR means over seeds of the quantities the picture is about."""
    cfg = load_config("synthetic-quick", ["seeds.train=[0,1]", "finetune.lrs=[3.16228e-05,0.00749894]",
                                          "finetune.iterations=3000", "swa.ks=[5]"])
    root = tmp_path_factory.mktemp("quick")
    experiment = Experiment(cfg, root)
    summary = experiment.run()
    evaluations, features = experiment.store.table("evaluations"), experiment.store.table("features")
    pretrain = evaluations[evaluations["stage"] == "pretrain"].groupby("plr")[["train_acc", "test_acc"]].mean()
    finetune = evaluations[evaluations["stage"] == "finetune"].groupby("plr")["test_acc"].max()
    feats = features[features["stage"] == "pretrain"].sort_values(["plr", "train_seed", "feature"])
    acc = feats["accuracy"].to_numpy().reshape(len(cfg.pretrain.lrs), len(cfg.seeds.train), -1)
    ranked = sorted_importance(acc).mean(1)  # [plr, rank], averaged over seeds
    return pretrain.assign(finetune=finetune, top1=ranked[:, 0], top2=ranked[:, 1]), summary


def test_regime_one_fits_and_spreads_features(picture):
    """PLRs well below the 1/2 boundary reach train accuracy ~1 with no dominant feature."""
    table, _ = picture
    small = table[table.index <= 3.2e-3]
    assert (small["train_acc"] > 0.99).all()
    assert (small["top1"] < 0.6).all()


def test_one_feature_stands_out_above_the_threshold(picture):
    """Somewhere in 7.5e-3..2.4e-2 one feature is far above the rest and fine-tuning is best."""
    table, _ = picture
    window = table[(table.index >= 7e-3) & (table.index <= 2.4e-2)]
    sparse = window[(window["top1"] > 0.62) & (window["top2"] < 0.58)]
    assert len(sparse) >= 1, window
    best_plr = table["finetune"].idxmax()
    assert 7e-3 <= best_plr <= 2.4e-2
    assert table["finetune"].max() > table.loc[table.index <= 3.2e-3, "finetune"].max() + 0.02


def test_large_plrs_are_at_chance(picture):
    """PLRs of 0.1 and above are at chance after pre-training."""
    table, _ = picture
    assert (table.loc[table.index >= 0.1, "test_acc"] < 0.55).all()


def test_detected_boundaries_near_the_paper(picture):
    """The detected 1/2 and 2/3 boundaries fall within a factor ~2 of the paper's 7.5e-3 and 5.6e-2."""
    _, summary = picture
    boundaries = summary["regimes"]["boundaries"]
    assert 3.7e-3 <= boundaries["1/2"]["estimate"] <= 1.5e-2
    assert 2.8e-2 <= boundaries["2/3"]["estimate"] <= 1.2e-1
    assert np.isfinite(boundaries["1/2"]["margin"])
