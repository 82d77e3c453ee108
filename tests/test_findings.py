"""The findings block: every claim S1-S5 judged on constructed summaries with a known verdict."""

import math

import pytest

from lrfeatures.analysis.findings import FAILS, HOLDS, UNMEASURABLE, build_findings

# The paper's picture on a 9-PLR grid: 1 1 1 1 2A 2A 2B 3 3.
PLRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
REGIMES = ["1", "1", "1", "1", "2A", "2A", "2B", "3", "3"]
FLRS = [1e-5, 1e-4, 1e-3]
PICTURE = {  # per regime: PT sparsity, FT test acc per FLR, SWA test acc, test barrier (%)
    "1": (0.05, [0.85, 0.86, 0.87], 0.85, 12.0),
    "2A": (0.8, [0.93, 0.93, 0.94], 0.94, 0.2),
    "2B": (0.1, [0.80, 0.85, 0.90], 0.86, 3.0),
    "3": (None, [0.6, 0.6, 0.6], 0.5, None),
}


def entry(plr, regime, picture=PICTURE):
    sparsity, finetune, swa, barrier = picture[regime]
    mean = lambda v: {"mean": v, "std": 0.01, "n": 4}  # noqa: E731
    return {"plr": plr, "regime": regime,
            "pretrain": {"test_acc": mean(0.8), "sparsity_index": {"mean": sparsity, "std": 0.1}},
            "finetune": {repr(flr): {"test_acc": mean(acc)} for flr, acc in zip(FLRS, finetune)},
            "swa": {"5": {"test_acc": mean(swa)}},
            "geometry": {pair: {"test_barrier": {"median": barrier}}
                         for pair in ("ft_low-ft_high", "swa-ft_high", "swa-ft_low")}}


def summary(regimes=REGIMES, picture=PICTURE, plrs=PLRS):
    return {"per_plr": [entry(p, r, picture) for p, r in zip(plrs, regimes)]}


def verdicts(findings):
    return {key: f["verdict"] for key, f in findings.items()}


def test_the_papers_picture_holds_everywhere():
    findings = build_findings(summary())
    assert verdicts(findings) == dict.fromkeys(["S1", "S2", "S3", "S4", "S5"], HOLDS)
    assert findings["S1"]["numbers"] == {"sparsity_2A_max": 0.8, "sparsity_lower_1_max": 0.05}
    assert findings["S4"]["numbers"]["spread_2A"] == pytest.approx(0.01)
    assert findings["S4"]["numbers"]["spread_2B"] == pytest.approx(0.10)
    assert all(f["rule"] and f["claim"] for f in findings.values())


def test_the_opposite_picture_does_not_hold():
    picture = dict(PICTURE)
    picture["1"] = (0.7, [0.95, 0.95, 0.95], 0.95, 0.1)   # regime 1 as sparse, as good, one basin
    picture["2A"] = (0.75, [0.90, 0.93, 0.94], 0.94, 2.0)  # 2A spread like 2B, with barriers
    picture["2B"] = (0.7, [0.90, 0.92, 0.93], 0.93, 3.0)
    assert verdicts(build_findings(summary(picture=picture))) == dict.fromkeys(
        ["S1", "S2", "S3", "S4", "S5"], FAILS)


def test_without_2a_nothing_is_measurable():
    regimes = ["1", "1", "1", "1", "2B", "2B", "2B", "3", "3"]
    assert verdicts(build_findings(summary(regimes=regimes))) == dict.fromkeys(
        ["S1", "S2", "S3", "S4", "S5"], UNMEASURABLE)


def test_missing_tables_and_regimes_are_not_measurable():
    bare = summary()
    for e in bare["per_plr"]:
        del e["geometry"], e["pretrain"]["sparsity_index"]  # an image run: no features, no geometry
    found = verdicts(build_findings(bare))
    assert found == {"S1": UNMEASURABLE, "S2": HOLDS, "S3": UNMEASURABLE, "S4": HOLDS, "S5": UNMEASURABLE}
    no_2b = verdicts(build_findings(summary(regimes=["1"] * 4 + ["2A"] * 2 + ["3"] * 3)))
    assert no_2b["S3"] == no_2b["S4"] == UNMEASURABLE and no_2b["S1"] == HOLDS
    assert verdicts(build_findings({"per_plr": []})) == dict.fromkeys(["S1", "S2", "S3", "S4", "S5"], UNMEASURABLE)


def test_numbers_are_json_safe():
    findings = build_findings(summary(regimes=["1", "1", "1", "1", "2B", "2B", "2B", "3", "3"]))
    for f in findings.values():
        assert all(v is None or math.isfinite(v) for v in f["numbers"].values())


def band_block(sparsity_by_regime, winner="mid"):
    """A measurements.band_features block: PT band sparsity per PLR from its regime."""
    rows = [{"stage": "pretrain", "plr": p, "flr": None, "swa_k": 0,
             "sparsity_index": {"mean": sparsity_by_regime.get(r), "std": 0.05, "n": 3},
             "winner_share": {"low": 0.0, "mid": 0.0, "high": 0.0} | {winner: 1.0}}
            for p, r in zip(PLRS, REGIMES)]
    return {"measurements": {"band_features": {"bands": ["low", "mid", "high"], "per_plr": rows}}}


def test_band_claims_only_with_a_band_block_and_each_verdict():
    assert "B1" not in build_findings(summary())  # a synthetic (or plain image) run has no band claims
    sparse = build_findings(summary() | band_block({"1": 0.1, "2A": 0.8, "2B": 0.3}, winner="high"))
    assert sparse["B1"]["verdict"] == sparse["B2"]["verdict"] == HOLDS
    assert sparse["B1"]["numbers"] == {"band_sparsity_2A_max": 0.8, "band_sparsity_lower_1_max": 0.1}
    assert sparse["B1"]["top_band_2A"] == "high"
    dense = build_findings(summary() | band_block({"1": 0.9, "2A": 0.8, "2B": 0.3}))
    assert dense["B1"]["verdict"] == dense["B2"]["verdict"] == FAILS
    no_2a = build_findings(summary(regimes=["1"] * 4 + ["2B"] * 3 + ["3"] * 2)
                           | band_block({"1": 0.1, "2A": 0.8}))
    assert no_2a["B1"]["verdict"] == UNMEASURABLE and no_2a["B2"]["verdict"] == HOLDS
