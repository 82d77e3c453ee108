"""The findings: each claim of the synthetic picture (SPEC §1, §3, §6) checked against summary.json.

Every claim gets the numbers it is judged on and a verdict, "holds", "does not hold" or "not
measurable" (the grid lacks a regime the claim needs, or the experiment lacks the table).
Inputs are summary.json's per-PLR blocks and regime labels, so a claim reads the same
numbers as the tables of the report. The rules (all thresholds are constants below):

  S1  sparsity in 2A vs regime 1: a = the highest pre-training sparsity-index seed mean over
      the 2A PLRs, b = the highest over the lower half of regime 1 (its ceil(n/2) smallest
      PLRs). Holds if a - b >= SPARSITY_GAP.
  S2  the best fine-tuned/SWA model comes from 2A: post(PLR) = the best seed-mean test
      accuracy over every FLR below the PLR and every SWA K. Holds if the best post over the
      2A PLRs is above the best over every other PLR.
  S3  sparsity is lost past 2A: c = the mean pre-training sparsity over the 2B PLRs (NaN ones,
      dead models, left out). Holds if a - c >= SPARSITY_GAP.
  S4  the FLR spread: spread(PLR) = max - min over the FLRs below the PLR of the seed-mean
      fine-tuned test accuracy, averaged over the 2A and over the 2B PLRs. Holds if the 2B
      spread >= SPREAD_RATIO x the 2A spread and exceeds it by >= SPREAD_GAP.
  S5  one basin in 2A: barrier(PLR) = the highest median test barrier over the geometry
      pairs, averaged over the 2A PLRs and over the lower half of regime 1. Holds if the 2A
      barrier <= BARRIER_2A and the regime-1 one exceeds it by >= BARRIER_GAP points.

Band claims, only for experiments with the band_features measurement (the bands-redundant
image task, analysis/band_features.py; summary.json's measurements.band_features block):

  B1  2A relies on fewer bands than regime 1: a = the highest pre-training band-sparsity seed
      mean over the 2A PLRs, b = the highest over the lower half of regime 1. Holds if
      a - b >= SPARSITY_GAP. The block also names the band that wins most often in 2A.
  B2  regime 1 uses all bands: b (as in B1) <= DENSE_MAX, the band sparsity of three about
      equally used bands plus probe noise (two or three equal bands score 0, one band 1).

The S2 rule repeats part of what makes a PLR 2A (best variant within the best tolerance of the
best anywhere), so it mostly checks that the regime labels and the tables agree.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from . import band_features  # noqa: F401  (registers the band measurement; its block feeds B1, B2)

HOLDS, FAILS, UNMEASURABLE = "holds", "does not hold", "not measurable"
SPARSITY_GAP = 0.2    # S1, S3: index points between 2A and the regime it is compared with
SPREAD_RATIO = 2.0    # S4: the 2B FLR spread must be at least this many times the 2A one ...
SPREAD_GAP = 0.02     # ... and larger by this much (two test-accuracy standard errors on 2,000 samples)
BARRIER_2A = 1.0      # S5: largest 2A test barrier (%) that counts as "one basin"
DENSE_MAX = 0.35      # B2: highest band sparsity that still reads "uses all bands"
BARRIER_GAP = 2.0     # S5: how much higher (points of %) the lower regime-1 barrier must be: twice the
                      # ~1-point standard error of a test error on 2,000 samples


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _max(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(max(finite)) if finite else math.nan


def _value(block: dict | None, *path: str) -> float:
    """A nested number of a summary block, NaN where missing or null."""
    for key in path:
        block = block.get(key) if isinstance(block, dict) else None
    return float(block) if isinstance(block, (int, float)) else math.nan


def _sparsity(entry: dict) -> float:
    return _value(entry.get("pretrain"), "sparsity_index", "mean")


def _post(entry: dict) -> float:
    """Best seed-mean test accuracy over FLRs below the PLR and every SWA K."""
    finetune = [_value(b, "test_acc", "mean") for flr, b in entry.get("finetune", {}).items()
                if float(flr) < entry["plr"]]
    return _max(finetune + [_value(b, "test_acc", "mean") for b in entry.get("swa", {}).values()])


def _spread(entry: dict) -> float:
    values = [_value(b, "test_acc", "mean") for flr, b in entry.get("finetune", {}).items()
              if float(flr) < entry["plr"]]
    values = [v for v in values if math.isfinite(v)]
    return max(values) - min(values) if len(values) > 1 else math.nan


def _barrier(entry: dict) -> float:
    return _max([_value(pair, "test_barrier", "median") for pair in (entry.get("geometry") or {}).values()])


def _finding(claim: str, rule: str, numbers: dict[str, float], holds: bool | None) -> dict[str, Any]:
    """One claim's block; holds None (a number is NaN) means not measurable."""
    clean = {k: (round(v, 4) if math.isfinite(v) else None) for k, v in numbers.items()}
    verdict = UNMEASURABLE if holds is None else HOLDS if holds else FAILS
    return {"claim": claim, "rule": rule, "numbers": clean, "verdict": verdict}


def _compare(numbers: dict[str, float], test: Callable[..., bool]) -> bool | None:
    return None if any(not math.isfinite(v) for v in numbers.values()) else bool(test(*numbers.values()))


def _band_entries(summary: dict) -> dict[float, dict]:
    """Pre-training blocks of the band_features measurement, by PLR (empty without it)."""
    block = (summary.get("measurements") or {}).get("band_features") or {}
    return {e["plr"]: e for e in block.get("per_plr", []) if e.get("stage") == "pretrain" and e.get("plr")}


def band_findings(summary: dict, two_a: list[dict], lower_one: list[dict]) -> dict[str, dict[str, Any]]:
    """B1, B2 of the module docstring; {} when the experiment has no band_features block."""
    bands = _band_entries(summary)
    if not bands:
        return {}

    def sparsity(entries: list[dict]) -> float:
        return _max([_value(bands.get(e["plr"]), "sparsity_index", "mean") for e in entries])

    b1 = {"band_sparsity_2A_max": sparsity(two_a), "band_sparsity_lower_1_max": sparsity(lower_one)}
    b2 = {"band_sparsity_lower_1_max": b1["band_sparsity_lower_1_max"]}
    wins: dict[str, float] = {}
    for e in two_a:
        for name, share in (bands.get(e["plr"]) or {}).get("winner_share", {}).items():
            wins[name] = wins.get(name, 0.0) + share
    found = {
        "B1": _finding("regime 2A relies on fewer frequency bands than regime 1",
                       f"max 2A PT band sparsity - max lower-half regime-1 PT band sparsity >= {SPARSITY_GAP}",
                       b1, _compare(b1, lambda a, b: a - b >= SPARSITY_GAP)),
        "B2": _finding("regime 1 uses all frequency bands",
                       f"max lower-half regime-1 PT band sparsity <= {DENSE_MAX}", b2,
                       _compare(b2, lambda b: b <= DENSE_MAX)),
    }
    found["B1"]["top_band_2A"] = max(wins, key=wins.get) if wins else None
    return found


def build_findings(summary: dict) -> dict[str, dict[str, Any]]:
    """The findings block of summary.json (S1-S5, and B1-B2 for band experiments; see the module docstring)."""
    entries = sorted(summary.get("per_plr", []), key=lambda e: e["plr"])
    by_regime: dict[str, list[dict]] = {}
    for entry in entries:
        by_regime.setdefault(entry.get("regime") or "", []).append(entry)
    two_a, two_b, one = by_regime.get("2A", []), by_regime.get("2B", []), by_regime.get("1", [])
    lower_one = one[:math.ceil(len(one) / 2)]
    others = [e for e in entries if e.get("regime") != "2A"]

    sparse_2a, sparse_1 = _max([_sparsity(e) for e in two_a]), _max([_sparsity(e) for e in lower_one])
    s1 = {"sparsity_2A_max": sparse_2a, "sparsity_lower_1_max": sparse_1}
    post_2a, post_other = _max([_post(e) for e in two_a]), _max([_post(e) for e in others])
    s2 = {"best_post_2A": post_2a, "best_post_elsewhere": post_other}
    s3 = {"sparsity_2A_max": sparse_2a, "sparsity_2B_mean": _mean([_sparsity(e) for e in two_b])}
    s4 = {"spread_2A": _mean([_spread(e) for e in two_a]), "spread_2B": _mean([_spread(e) for e in two_b])}
    s5 = {"barrier_2A": _mean([_barrier(e) for e in two_a]),
          "barrier_lower_1": _mean([_barrier(e) for e in lower_one])}
    # With no other PLR to compare with, 2A is the best by default.
    s2_holds = None if not math.isfinite(post_2a) else not post_other >= post_2a  # NaN compares False
    return {
        "S1": _finding("regime 2A relies on a sparser set of features than regime 1",
                       f"max 2A PT sparsity - max lower-half regime-1 PT sparsity >= {SPARSITY_GAP}",
                       s1, _compare(s1, lambda a, b: a - b >= SPARSITY_GAP)),
        "S2": _finding("the best fine-tuned / SWA model is pre-trained in 2A",
                       "best 2A post-training test acc > best of every other PLR", s2, s2_holds),
        "S3": _finding("the sparsity is lost past 2A (in 2B)",
                       f"max 2A PT sparsity - mean 2B PT sparsity >= {SPARSITY_GAP}",
                       s3, _compare(s3, lambda a, c: a - c >= SPARSITY_GAP)),
        "S4": _finding("fine-tuning gives the same result for every FLR in 2A, different ones in 2B",
                       f"mean 2B FLR spread >= {SPREAD_RATIO:g} x the 2A one and >= 2A spread + {SPREAD_GAP}",
                       s4, _compare(s4, lambda a, b: b >= SPREAD_RATIO * a and b >= a + SPREAD_GAP)),
        "S5": _finding("2A solutions lie in one basin, regime-1 ones are separated by barriers",
                       f"mean 2A test barrier <= {BARRIER_2A}% and mean lower-half regime-1 barrier "
                       f">= 2A + {BARRIER_GAP} points", s5,
                       _compare(s5, lambda a, b: a <= BARRIER_2A and b >= a + BARRIER_GAP)),
        **band_findings(summary, two_a, lower_one),
    }
