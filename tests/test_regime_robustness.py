"""Regimes on grids and seeds no preset uses: the boundaries hold, 2A is backed by its seeds (issue 15).

Two synthetic runs of the quick preset's task and training length (10k pre-training, 5k
fine-tuning iterations: the preset's own, at which its regimes show), each on held-out seeds:
  shifted  the quick grid moved half a step (geometric midpoints), data seed 11, seeds 20-22;
  sparse   every other PLR of the quick grid plus a chance-level PLR 1e6, data seed 12, seeds 30-32.
To stay within about a minute each, the grids keep the window 3e-3 .. 0.11 around the regimes
(regime 1 below it is the same label all the way down), 3 training seeds (an odd count, so a
2A/2B vote cannot tie), 3 FLRs and SWA K = 5.

Reference: the quick preset's own boundaries (data seed 0, seeds 0-3), as detected by
`detect_regimes` on its store: 1/2 between 5.62e-3 and 7.50e-3, 2A/2B between 1.33e-2 and
2.37e-2, 2/3 between 4.22e-2 and 5.62e-2. "Moved by at most one grid step": the geometric
midpoints differ by at most the log10 gap of the run's own bracket around that boundary.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lrfeatures.analysis.regimes import detect_regimes
from lrfeatures.config import load_config, read_toml
from lrfeatures.experiments import Experiment
from lrfeatures.store import ExperimentStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]

QUICK = read_toml("synthetic-quick")["pretrain"]["lrs"]
WINDOW = (3e-3, 0.11)
REFERENCE = {"1/2": (5.62341e-3, 7.49894e-3), "2A/2B": (1.33352e-2, 2.37137e-2), "2/3": (4.21697e-2, 5.62341e-2)}
SHIFTED = [math.sqrt(a * b) for a, b in zip(QUICK, QUICK[1:]) if WINDOW[0] <= math.sqrt(a * b) <= WINDOW[1]]
SPARSE = [p for p in QUICK[::2] if WINDOW[0] <= p <= WINDOW[1]] + [1e6]
RUNS = {"shifted": (SHIFTED, 11, [20, 21, 22]), "sparse": (SPARSE, 12, [30, 31, 32])}


def regimes_of(root, plrs, data_seed, train_seeds):
    """Run the quick preset on another grid and seeds; its RegimeReport."""
    config = read_toml("synthetic-quick")
    config["pretrain"].update(lrs=plrs)
    config["finetune"].update(lrs=[1.78e-4, 1e-3, 3.16e-3])
    config["swa"]["ks"] = [5]
    config["seeds"] = {"data": [data_seed], "train": train_seeds}
    Experiment(load_config(config), root).run()
    store = ExperimentStore(root)
    return detect_regimes(store.table("metrics"), store.table("evaluations"))


@pytest.fixture(scope="module", params=list(RUNS))
def report(request, tmp_path_factory):
    plrs, data_seed, train_seeds = RUNS[request.param]
    return request.param, regimes_of(tmp_path_factory.mktemp(request.param), plrs, data_seed, train_seeds)


def test_grids_are_new():
    for plrs, _, _ in RUNS.values():
        assert not set(np.round(plrs, 12)) <= set(np.round(QUICK, 12))
        assert len(plrs) >= 6


def test_boundaries_move_at_most_one_grid_step(report):
    name, regimes = report
    for boundary, (lower, upper) in REFERENCE.items():
        found = regimes.boundaries[boundary]
        assert found is not None, f"{name}: no {boundary} boundary"
        moved = abs(math.log10(found.estimate) - 0.5 * math.log10(lower * upper))
        step = math.log10(found.upper_plr / found.lower_plr)
        assert moved <= step + 1e-9, f"{name}: {boundary} moved {moved:.3f} decades, grid step {step:.3f}"


def test_2a_is_present_and_backed_by_most_of_its_seeds(report):
    name, regimes = report
    two_a = regimes.per_plr[regimes.per_plr["regime"] == "2A"]
    assert len(two_a), f"{name}: no 2A PLR"
    assert (two_a["frac_2A"] > 0.5).all() and (two_a["confidence"] == two_a["frac_2A"]).all()


def test_chance_level_plr_is_regime_3_not_a_confident_1(report):
    name, regimes = report
    if name != "sparse":
        pytest.skip("only the sparse grid has the chance-level PLR")
    row = regimes.per_plr[np.isclose(regimes.per_plr["plr"], 1e6)].iloc[0]
    assert row["regime"] == "3" or row["confidence"] < 0.5
    assert not (row["regime"] == "1" and row["confidence"] == 1.0)
