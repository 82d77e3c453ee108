"""Regime detection on hand-built traces and evaluation tables with a known answer."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.analysis.regimes import (RegimeCriteria, _monotone_labels, detect_regimes,
                                         run_statistics)
from lrfeatures.errors import ConfigError, DataError

PLRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
CLEAN = ["1", "1", "1", "1", "2A", "2A", "2B", "3", "3"]
SEEDS = [(d, t) for d in range(2) for t in range(3)]
FLRS = [1e-4, 1e-3, 3e-3]
STEPS = np.arange(0, 40001, 400)


def trace(kind: str, rng: np.random.Generator) -> dict:
    """Loss / accuracy / grad-norm curves of one pre-training run of a given kind."""
    t = STEPS / STEPS[-1]
    noise = rng.normal(size=(3, len(t)))
    if kind == "converged":
        loss = 0.7 * np.exp(-12 * t) + 1e-5
        acc = 1 - 0.5 * np.exp(-12 * t)
        grad = 2.0 * np.exp(-12 * t) + 1e-4
    elif kind == "bouncing":  # settles fast at a non-zero level and keeps bouncing
        loss = 0.15 + 0.55 * np.exp(-60 * t) + 0.02 * np.abs(noise[0])
        acc = 0.94 + 0.01 * noise[1]
        grad = 2.0 + 0.2 * np.abs(noise[2])
    elif kind == "chance":  # random walk: loss and accuracy of a guess
        loss = 0.69 + 0.02 * np.abs(noise[0])
        acc = 0.5 + 0.01 * noise[1]
        grad = 5.0 + 0.5 * np.abs(noise[2])
    elif kind == "descending":  # still converging, slowly (1/t), loss above the threshold
        loss = 0.05 / (t + 0.02)
        acc = 0.9 + 0.0 * t
        grad = 1.0 + 0.0 * t
    elif kind == "grad_collapse":  # loss plateaus above threshold but the gradient vanishes
        loss = 0.05 + 0.6 * np.exp(-30 * t)
        acc = 0.97 + 0.0 * t
        grad = 2.0 * np.exp(-30 * t) + 1e-3
    else:
        raise ValueError(kind)
    return {"train_loss": loss, "train_acc": acc, "grad_norm": grad}


def quality(regime: str, plr: float, rng) -> dict:
    """Test accuracy of the fine-tuned (per FLR) and SWA models of one run."""
    jitter = lambda: 0.002 * rng.normal()  # noqa: E731
    if regime == "2A":
        ft = {flr: 0.95 + jitter() for flr in FLRS}
        swa = 0.95 + jitter()
    elif regime == "2B":
        ft = {flr: 0.80 + 0.04 * i + jitter() for i, flr in enumerate(FLRS)}
        swa = 0.86 + jitter()
    elif regime == "3":
        ft = {flr: 0.80 + jitter() for flr in FLRS}
        swa = 0.5 + jitter()
    else:  # regime 1: FLR < PLR changes nothing, FLR > PLR helps a bit
        ft = {flr: (0.85 if flr < plr else 0.88) + jitter() for flr in FLRS}
        swa = 0.85 + jitter()
    return {"ft": ft, "swa": swa}


KIND = {"1": "converged", "2A": "bouncing", "2B": "bouncing", "3": "chance"}


def tables(regimes=CLEAN, plrs=PLRS, override=None, with_evals=True, seed=0):
    """(metrics, evaluations) for a grid; override[(plr_index, seed_index)] = trace kind."""
    rng = np.random.default_rng(seed)
    override = override or {}
    metric_rows, eval_rows = [], []
    for p, (plr, regime) in enumerate(zip(plrs, regimes)):
        for s, (data_seed, train_seed) in enumerate(SEEDS):
            keys = dict(plr=plr, data_seed=data_seed, train_seed=train_seed)
            curves = trace(override.get((p, s), KIND[regime]), rng)
            frame = pd.DataFrame({"stage": "pretrain", **keys, "flr": np.nan, "swa_k": 0,
                                  "step": STEPS, **curves, "diverged": False})
            frame["grad_norm_mean"] = frame["grad_norm"]
            metric_rows.append(frame)
            q = quality(regime, plr, rng)
            for flr, acc in q["ft"].items():
                eval_rows.append(dict(stage="finetune", **keys, flr=flr, swa_k=0, test_acc=acc,
                                      diverged=False))
            for k in (2, 5):  # K=2 is the bouncing model itself: it must be ignored by default
                acc = q["swa"] if k == 5 else 0.7
                eval_rows.append(dict(stage="swa", **keys, flr=np.nan, swa_k=k, test_acc=acc, diverged=False))
    metrics = pd.concat(metric_rows, ignore_index=True)
    evaluations = pd.DataFrame(eval_rows) if with_evals else None
    return metrics, evaluations


def test_clean_grid_finds_every_regime_and_boundary():
    report = detect_regimes(*tables())
    per = report.per_plr
    assert list(per["plr"]) == PLRS
    assert list(per["regime"]) == CLEAN
    assert (per["confidence"] == 1).all() and not per["relabelled"].any()
    for name, (low, high) in {"1/2": (3e-3, 1e-2), "2A/2B": (3e-2, 1e-1), "2/3": (1e-1, 3e-1)}.items():
        b = report.boundaries[name]
        assert (b.lower_plr, b.upper_plr) == (low, high)
        assert b.estimate == pytest.approx(math.sqrt(low * high))
        assert b.margin == pytest.approx(0.5 * math.log10(high / low))
        assert b.confidence == 1
    assert report.global_best == pytest.approx(0.95, abs=0.01)


def test_trace_statistics_separate_the_kinds():
    metrics, _ = tables()
    stats = run_statistics(metrics, RegimeCriteria()).groupby("plr").median(numeric_only=True)
    assert stats.loc[1e-4, "tail_train_loss"] < 1e-3 and stats.loc[1e-4, "grad_ratio"] < 0.01
    assert 0.1 < stats.loc[1e-2, "tail_train_loss"] < 0.2
    assert 0.8 < stats.loc[1e-2, "descent_ratio"] < 1.2 and stats.loc[1e-2, "grad_ratio"] > 0.5
    assert abs(stats.loc[1.0, "tail_train_acc"] - 0.5) < 0.02


def test_grid_without_regime_3_or_2():
    report = detect_regimes(*tables(regimes=["1", "1", "2A", "2B"], plrs=PLRS[:4]))
    assert list(report.per_plr["regime"]) == ["1", "1", "2A", "2B"]
    assert report.boundaries["2/3"] is None and report.boundaries["1/2"] is not None
    only_1 = detect_regimes(*tables(regimes=["1"] * 4, plrs=PLRS[:4]))
    assert set(only_1.per_plr["regime"]) == {"1"}
    assert all(b is None for b in only_1.boundaries.values())


def test_without_finetuning_regime_2_is_not_split():
    report = detect_regimes(*tables(with_evals=False))
    assert list(report.per_plr["regime"]) == ["1"] * 4 + ["2"] * 3 + ["3"] * 2
    assert report.boundaries["2A/2B"] is None
    assert report.boundaries["1/2"].upper_plr == 1e-2 and report.boundaries["2/3"].upper_plr == 3e-1


def test_minority_seeds_lower_confidence_not_label():
    # Two of six seeds at the first regime-2 PLR still converge.
    report = detect_regimes(*tables(override={(4, 0): "converged", (4, 1): "converged"}))
    row = report.per_plr.iloc[4]
    assert row["regime"] == "2A" and row["confidence"] == pytest.approx(4 / 6)
    assert report.boundaries["1/2"].confidence == pytest.approx(4 / 6)


def test_non_monotone_votes_are_resolved_with_lower_confidence():
    # PLR 3e-2 (inside 2A) converges for 4/6 seeds: raw sequence 1 1 1 1 2A 1 2B 3 3.
    override = {(5, s): "converged" for s in range(4)}
    # PLR 1e-3 (inside regime 1) sits at chance for every seed: raw 3 in the middle of regime 1.
    override |= {(2, s): "chance" for s in range(6)}
    report = detect_regimes(*tables(override=override))
    per = report.per_plr
    assert list(per["raw_regime"]) == ["1", "1", "3", "1", "2A", "1", "2B", "3", "3"]
    # 3e-2 must be regime 2 (monotone), but only 2 of its 6 seeds vote 2A: no majority, so "2".
    assert list(per["regime"]) == ["1", "1", "1", "1", "2A", "2", "2B", "3", "3"]
    assert list(per["relabelled"]) == [False, False, True, False, False, True, False, False, False]
    # Confidence is the share of seeds voting the final label, nothing else.
    assert per.loc[5, "confidence"] == pytest.approx(2 / 6)
    assert per.loc[2, "confidence"] == 0
    assert report.boundaries["2A/2B"].lower_plr == 1e-2 and report.boundaries["2A/2B"].confidence == 1


def test_confidence_is_the_vote_share_of_the_label():
    override = {(4, 0): "converged", (6, 1): "chance", (6, 2): "chance"}
    per = detect_regimes(*tables(override=override)).per_plr
    for _, row in per.iterrows():
        assert row["confidence"] == pytest.approx(row[f"frac_{row['regime']}"] if row["regime"] != "2"
                                                  else row[["frac_2", "frac_2A", "frac_2B"]].sum())
    assert per.loc[4, "confidence"] == pytest.approx(5 / 6) and per.loc[6, "confidence"] == pytest.approx(4 / 6)
    for _, row in per[per["regime"].isin(["2A", "2B"])].iterrows():
        assert row["confidence"] > 0.5  # a 2A/2B label is backed by most of its seeds


def test_a_run_at_chance_is_never_converged():
    # A random walk whose loss happens to fall over the run (what a PLR of 1e6 does on a sparse
    # grid): "still descending" by the loss alone, but its accuracy is at chance.
    metrics, evaluations = tables(regimes=["1", "1", "3"], plrs=[1e-4, 1e-3, 1e6])
    late = (metrics["plr"] == 1e6) & (metrics["step"] > 30000)
    metrics.loc[late, "train_loss"] *= 0.3
    per = detect_regimes(metrics, evaluations).per_plr
    assert per.loc[2, "descent_ratio"] < RegimeCriteria().descent_ratio
    assert per.loc[2, "regime"] == "3" and per.loc[2, "confidence"] == 1


def test_descent_and_grad_collapse_mean_convergence():
    report = detect_regimes(*tables(regimes=["1", "1", "2A"], plrs=PLRS[4:7],
                                    override={(0, s): "descending" for s in range(6)}
                                    | {(1, s): "grad_collapse" for s in range(6)}))
    assert list(report.per_plr["regime"][:2]) == ["1", "1"]
    off = RegimeCriteria(descent_ratio=None, grad_collapse_ratio=None)
    report = detect_regimes(*tables(regimes=["1", "1", "2A"], plrs=PLRS[4:7],
                                    override={(0, s): "descending" for s in range(6)}
                                    | {(1, s): "grad_collapse" for s in range(6)}), off)
    assert all(label.startswith("2") for label in report.per_plr["raw_regime"][:2])


def test_chance_is_a_parameter():
    metrics, evaluations = tables(regimes=["2A"], plrs=[1e-2])
    metrics["train_acc"] = 0.3  # a 10-class model well above its chance of 0.1
    evaluations = None
    assert detect_regimes(metrics, evaluations).per_plr["regime"][0] == "3"
    assert detect_regimes(metrics, evaluations, RegimeCriteria(chance=0.1)).per_plr["regime"][0] == "2"


def test_diverged_runs_vote_3():
    metrics, evaluations = tables(regimes=["2A"], plrs=[1e-2])
    late = metrics["step"] > 30000
    metrics.loc[late, "train_loss"] = np.nan
    metrics.loc[late, "diverged"] = True
    per = detect_regimes(metrics, evaluations).per_plr
    assert per["regime"][0] == "3" and per["n_diverged"][0] == 6


def test_only_finetuning_below_plr_counts():
    metrics, evaluations = tables(regimes=["2A"], plrs=[1e-2])
    extra = evaluations[evaluations["stage"] == "finetune"].drop_duplicates(["data_seed", "train_seed"])
    evaluations = pd.concat([evaluations, extra.assign(flr=3e-2, test_acc=0.6)], ignore_index=True)
    assert detect_regimes(metrics, evaluations).per_plr["regime"][0] == "2A"
    assert detect_regimes(metrics, evaluations, RegimeCriteria(finetune_below_plr_only=False)
                          ).per_plr["regime"][0] == "2B"
    # Counting the K=2 SWA model as a variant spreads the results too.
    assert detect_regimes(metrics, evaluations, RegimeCriteria(swa_ks=(2, 5))).per_plr["regime"][0] == "2B"


def test_to_json_is_plain_json():
    payload = detect_regimes(*tables(regimes=["1"] * 3, plrs=PLRS[:3])).to_json()
    text = json.dumps(payload, allow_nan=False)
    assert json.loads(text)["boundaries"]["1/2"] is None
    assert payload["per_plr"][0]["regime"] == "1"


def test_bad_inputs_raise():
    metrics, evaluations = tables(regimes=["1"], plrs=[1e-4])
    with pytest.raises(DataError):
        detect_regimes(metrics.drop(columns="grad_norm"), evaluations)
    with pytest.raises(DataError):
        detect_regimes(metrics.assign(stage="finetune"), evaluations)
    with pytest.raises(ConfigError):
        RegimeCriteria(tail_fraction=0.0)
    with pytest.raises(ConfigError):
        RegimeCriteria(aggregate="mode")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.floats(0, 3), min_size=3, max_size=3), min_size=1, max_size=6))
def test_monotone_dp_is_optimal(cost_rows):
    cost = np.array(cost_rows)
    labels = _monotone_labels(cost)
    assert np.all(np.diff(labels) >= 0)
    best = min(sum(cost[p, seq[p]] for p in range(len(cost)))
               for seq in itertools.product(range(3), repeat=len(cost)) if list(seq) == sorted(seq))
    assert cost[np.arange(len(cost)), labels].sum() == pytest.approx(best)
