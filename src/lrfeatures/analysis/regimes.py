"""Automatic detection of the training regimes 1, 2A, 2B, 3 along the PLR grid (SPEC §1).

Inputs are the store's tables (notes: metrics = pre-training traces, evaluations = final
models). Every threshold lives in `RegimeCriteria`; the rules are:

Per pre-training run (one PLR, one (data_seed, train_seed)), over its logged steps in order:
  tail  = the last `tail_fraction` of the logs, head = the first `head_fraction`,
  mid   = a window as long as the tail that ends at the middle of the run.
  tail_train_loss, tail_train_acc = mean train loss / accuracy over the tail;
  grad_ratio    = mean grad norm over the tail / over the head (grad_norm_mean, falling back
                  to grad_norm where it is missing);
  descent_ratio = tail_train_loss / mean train loss over mid.
Post-training quality: the test accuracy of every fine-tuned model with FLR <= flr_ratio x PLR
(when `finetune_below_plr_only`; an FLR at or near the PLR keeps bouncing and is not fine-tuning)
and of the SWA models with K in `swa_ks` (None: the K of `tables.swa_k_of_choice`, 5 or the
nearest, as the geometry uses: a 2-checkpoint average is still the bouncing pre-trained model,
and a very long average at a large PLR mixes far-apart points of the trajectory). A diverged
model counts as chance. Each such model is a "variant".

Regime vote of one seed, in this order:
  "3" if the run diverged (non-finite loss can be neither convergence nor equilibrium), or if it
      is at chance: tail_train_acc < chance + chance_margin (a run that learnt nothing is never
      "converged" or "still descending": its loss and gradient move with noise);
  "1" if it converges: tail_train_loss < loss_threshold, OR grad_ratio < grad_collapse_ratio
      (the stochastic gradient collapses at a minimum but not in a bouncing equilibrium), OR
      descent_ratio < descent_ratio threshold (the loss is still falling, so it has not
      settled at a non-zero level). Any criterion set to None is off;
  "3" if its best variant test accuracy <= chance + post_chance_margin (no better than a random walk);
  "2" otherwise, split into
  "2A" if its variants agree and are its best anywhere: spread (max - min over its variants)
       <= spread_tolerance AND best >= seed_global_best - best_tolerance, where seed_global_best
       is the same seed's best variant over all PLRs (the data seed moves every accuracy
       together); "2B" otherwise; "2" if the seed has no variant (no fine-tuning / SWA data).

Labels are read from the votes only, so that a label and its confidence use the same
statistics: per PLR, share(r) = fraction of its seeds voting r (2 counts 2, 2A and 2B).
raw_regime = the plurality vote. Monotonicity: regimes must be ordered 1 < 2 < 3 in PLR, and
2A < 2B inside regime 2. The final labels are the monotone sequence that leaves the fewest seed
votes unmatched (the sum over PLRs of 1 - share(label)), solved exactly by dynamic programming,
first over {1, 2, 3}, then over {2A, 2B} inside the regime-2 block; a PLR whose 2A/2B label
has no majority of its seeds' votes is labelled "2" (regime 2, sub-regime undecided), so every
2A or 2B label is backed by most of its seeds.

confidence = share(final label): the fraction of the PLR's seeds whose own vote is its label
(so a label set by the monotone rule against its seeds shows a low confidence).
relabelled = final label != plurality vote.
The per-PLR statistics (the `aggregate`, median by default, over seeds; post_best and
post_spread of the per-variant seed means) are reported for the reader and not voted on.
A boundary lies between the last PLR of the lower regime and the first of
the upper one: estimate = their geometric mean, margin = half their log10 gap (decades),
confidence = the lower of the two PLRs' confidences. A boundary is None when the grid lacks
either side (e.g. every PLR converges).

Convergence time (SPEC §4): `steps_to_convergence` gives, per pre-training run, the first
logged step (iteration for the synthetic task, epoch for images) whose train loss is below
CONVERGED_LOSS, and +inf when no logged step is: a right-censored time, so the median over
seeds is finite exactly when more than half of the seeds converged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from lrfeatures.errors import ConfigError, DataError

from .tables import RUN_KEYS, swa_k_of_choice

BOUNDARY_NAMES = ("1/2", "2A/2B", "2/3")
NO_REGIME_REASON = ("training regimes are defined for an SI group trained on the sphere at a fixed effective "
                    "LR (SPEC §1-2); this model has no SI group, so no regime is assigned")


@dataclass(frozen=True)
class RegimeCriteria:
    """Thresholds of the regime rules (see the module docstring); None turns a criterion off."""

    chance: float = 0.5                        # 0.5 synthetic, 1/classes for images
    tail_fraction: float = 0.1                 # last part of the logs used for "final" values
    head_fraction: float = 0.1                 # first part: the early grad-norm level
    loss_threshold: float | None = 1e-2        # 1: final train loss below this
    grad_collapse_ratio: float | None = 0.1    # 1: tail grad norm below this × head grad norm
    descent_ratio: float | None = 0.7          # 1: tail loss below this × mid-run loss
    chance_margin: float = 0.05                # 3: final train acc below chance + this
    post_chance_margin: float | None = 0.02    # 3: best fine-tuned/SWA test acc <= chance + this
    # One seed's test accuracies (2,000 test samples: SE ~0.01 each) are noisier than seed means,
    # and a seed votes with its own: the 2A tolerances leave room for that noise.
    spread_tolerance: float = 0.05             # 2A: max - min test acc over a seed's variants
    best_tolerance: float = 0.04               # 2A: a seed's best variant within this of its best anywhere
    finetune_below_plr_only: bool = True       # variants: only FLR <= flr_ratio x PLR
    flr_ratio: float = 0.5                     # an FLR close to the PLR still bounces: not fine-tuning
    swa_ks: tuple[int, ...] | None = None      # variants: SWA K values (None: nearest 5; (): none)
    aggregate: str = "median"                  # "median" or "mean" over seeds (reported statistics)

    def __post_init__(self):
        if not 0 < self.chance < 1:
            raise ConfigError(f"chance={self.chance} must lie in (0, 1); use 1/num_classes")
        for name in ("tail_fraction", "head_fraction"):
            if not 0 < getattr(self, name) <= 0.5:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in (0, 0.5]; e.g. 0.1")
        if not self.flr_ratio > 0:
            raise ConfigError(f"flr_ratio={self.flr_ratio} must be > 0; e.g. 0.5 (FLR at most half the PLR)")
        if self.aggregate not in ("median", "mean"):
            raise ConfigError(f"aggregate={self.aggregate!r} is unknown; use 'median' or 'mean'")
        for name in ("loss_threshold", "grad_collapse_ratio", "descent_ratio", "chance_margin",
                     "post_chance_margin", "spread_tolerance", "best_tolerance"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}={value} is negative; use a value >= 0 (or None to disable)")


@dataclass(frozen=True)
class Boundary:
    """Where one regime ends and the next starts on the PLR grid."""

    lower_plr: float    # last PLR of the lower regime
    upper_plr: float    # first PLR of the upper regime
    estimate: float     # geometric mean of the two
    margin: float       # half the log10 gap: the estimate is uncertain by ± this many decades
    confidence: float   # the lower confidence of the two PLRs


@dataclass
class RegimeReport:
    """Per-PLR regimes with the statistics behind them, and the boundaries between regimes."""

    per_plr: pd.DataFrame
    boundaries: dict[str, Boundary | None]
    criteria: RegimeCriteria = field(default_factory=RegimeCriteria)
    global_best: float = float("nan")

    def to_json(self) -> dict:
        """A JSON-serialisable dict (NaN becomes None)."""
        finite = lambda x: float(x) if x is not None and math.isfinite(x) else None  # noqa: E731
        return {
            "criteria": asdict(self.criteria),
            "global_best": finite(self.global_best),
            "per_plr": json.loads(self.per_plr.to_json(orient="records", double_precision=15)),
            "boundaries": {name: None if b is None else {k: finite(v) for k, v in asdict(b).items()}
                           for name, b in self.boundaries.items()},
        }


def _require(table: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in table]
    if missing:
        raise DataError(f"{name} table lacks columns {missing}; pass the {name}.parquet table "
                        "written by the store")


def _ratio(numerator, denominator):
    """numerator / denominator, NaN where the denominator is not positive."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def run_statistics(metrics: pd.DataFrame, criteria: RegimeCriteria) -> pd.DataFrame:
    """Per pre-training run (plr, data_seed, train_seed): tail/head/mid trace statistics."""
    _require(metrics, ["stage", *RUN_KEYS, "step", "train_loss", "train_acc", "grad_norm"], "metrics")
    pre = metrics[metrics["stage"] == "pretrain"]
    if pre.empty:
        raise DataError("metrics table has no pretrain rows; run pre-training before detecting regimes")
    pre = pre.sort_values(RUN_KEYS + ["step"], kind="stable", ignore_index=True)
    runs = pre.groupby(RUN_KEYS, sort=False)
    n = runs["step"].transform("size").to_numpy()
    pos = runs.cumcount().to_numpy()
    tail_len = np.maximum(1, np.ceil(criteria.tail_fraction * n))
    tail = pos >= n - tail_len
    head = pos < np.maximum(1, np.ceil(criteria.head_fraction * n))
    mid_end = np.maximum(1, n // 2)
    mid = (pos < mid_end) & (pos >= mid_end - tail_len)
    grad = pre["grad_norm"]
    if "grad_norm_mean" in pre:
        grad = pre["grad_norm_mean"].fillna(grad)
    diverged = pre["diverged"].astype(bool) if "diverged" in pre else pd.Series(False, index=pre.index)
    diverged = diverged | ~np.isfinite(pre["train_loss"].to_numpy(float))
    frame = pd.DataFrame({
        **{k: pre[k] for k in RUN_KEYS},
        "tail_train_loss": pre["train_loss"].where(tail),
        "tail_train_acc": pre["train_acc"].where(tail),
        "grad_tail": grad.where(tail),
        "grad_head": grad.where(head),
        "mid_train_loss": pre["train_loss"].where(mid),
        "diverged": diverged,
    })
    stats = frame.groupby(RUN_KEYS, sort=True).agg(
        tail_train_loss=("tail_train_loss", "mean"), tail_train_acc=("tail_train_acc", "mean"),
        grad_tail=("grad_tail", "mean"), grad_head=("grad_head", "mean"),
        mid_train_loss=("mid_train_loss", "mean"), diverged=("diverged", "any"),
    ).reset_index()
    stats["grad_ratio"] = _ratio(stats["grad_tail"], stats["grad_head"])
    stats["descent_ratio"] = _ratio(stats["tail_train_loss"], stats["mid_train_loss"])
    return stats


CONVERGED_LOSS = 1e-2  # "converged": a logged train loss below this (as the image engine's epochs_to_convergence)


def steps_to_convergence(metrics: pd.DataFrame, threshold: float = CONVERGED_LOSS) -> pd.DataFrame:
    """Per pre-training run: RUN_KEYS, steps_to_convergence (first logged step with train loss < threshold; +inf if none)."""
    _require(metrics, ["stage", *RUN_KEYS, "step", "train_loss"], "metrics")
    pre = metrics[metrics["stage"] == "pretrain"]
    below = pre["train_loss"].astype(float) < threshold  # NaN (diverged) is never below
    if "diverged" in pre:
        below &= ~pre["diverged"].astype(bool)
    first = pre["step"].astype(float).where(below, np.inf)
    return (pre[RUN_KEYS].assign(steps_to_convergence=first).groupby(RUN_KEYS, sort=True)
            ["steps_to_convergence"].min().reset_index())


def variant_accuracies(evaluations: pd.DataFrame | None, criteria: RegimeCriteria) -> pd.DataFrame:
    """Test accuracy of every post-training variant: columns RUN_KEYS, variant, test_acc."""
    columns = RUN_KEYS + ["variant", "test_acc"]
    if evaluations is None or evaluations.empty:
        return pd.DataFrame({"plr": pd.Series(dtype=float), "data_seed": pd.Series(dtype="int64"),
                             "train_seed": pd.Series(dtype="int64"), "variant": pd.Series(dtype=str),
                             "test_acc": pd.Series(dtype=float)})
    _require(evaluations, ["stage", *RUN_KEYS, "flr", "swa_k", "test_acc"], "evaluations")
    finetune = evaluations[evaluations["stage"] == "finetune"]
    if criteria.finetune_below_plr_only:
        finetune = finetune[finetune["flr"] <= criteria.flr_ratio * finetune["plr"]]
    swa = evaluations[evaluations["stage"] == "swa"]
    if criteria.swa_ks is None:
        swa = swa[swa["swa_k"] == swa_k_of_choice(swa["swa_k"].unique())]
    else:
        swa = swa[swa["swa_k"].isin(criteria.swa_ks)]
    finetune = finetune.assign(variant="flr=" + finetune["flr"].map(repr).astype(str))  # str even when empty
    swa = swa.assign(variant="swa_k=" + swa["swa_k"].map(str).astype(str))
    variants = pd.concat([finetune, swa], ignore_index=True)
    acc = variants["test_acc"].astype(float)
    if "diverged" in variants:
        acc = acc.where(~variants["diverged"].astype(bool), criteria.chance)
    return variants.assign(test_acc=acc.fillna(criteria.chance))[columns]


def _label_123(diverged, loss, acc, grad_ratio, descent, post_best, c: RegimeCriteria) -> np.ndarray:
    """Vectorised 1 / 2 / 3 rule of the module docstring; NaN statistics never satisfy a test."""
    with np.errstate(invalid="ignore"):
        converged = np.zeros(len(loss), bool)
        if c.loss_threshold is not None:
            converged |= np.asarray(loss, float) < c.loss_threshold
        if c.grad_collapse_ratio is not None:
            converged |= np.asarray(grad_ratio, float) < c.grad_collapse_ratio
        if c.descent_ratio is not None:
            converged |= np.asarray(descent, float) < c.descent_ratio
        # A run at chance has learnt nothing: its loss and gradient move with noise, not descent.
        train_at_chance = ~(np.asarray(acc, float) >= c.chance + c.chance_margin)
        post_at_chance = np.zeros(len(loss), bool)
        if c.post_chance_margin is not None:
            post_at_chance = np.asarray(post_best, float) <= c.chance + c.post_chance_margin
    label = np.where(converged, "1", np.where(post_at_chance, "3", "2"))
    return np.where(np.asarray(diverged, bool) | train_at_chance, "3", label)


def _label_2ab(spread, best, global_best, c: RegimeCriteria) -> np.ndarray:
    """'2A' / '2B', or '' where there is no variant to judge."""
    spread, best = np.asarray(spread, float), np.asarray(best, float)
    with np.errstate(invalid="ignore"):
        is_a = (spread <= c.spread_tolerance) & (best >= global_best - c.best_tolerance)
    return np.where(np.isnan(best), "", np.where(is_a, "2A", "2B"))


def _monotone_labels(cost: np.ndarray) -> np.ndarray:
    """Non-decreasing label indices [n] minimising the summed cost[p, label] (exact DP)."""
    n, k = cost.shape
    total, back = cost.copy(), np.zeros((n, k), int)
    for p in range(1, n):
        prev = total[p - 1]
        best_prev = np.array([int(np.argmin(prev[:label + 1])) for label in range(k)])
        back[p] = best_prev
        total[p] += prev[best_prev]
    labels = np.empty(n, int)
    labels[-1] = int(np.argmin(total[-1]))
    for p in range(n - 1, 0, -1):
        labels[p - 1] = back[p, labels[p]]
    return labels


def _resolve(shares: np.ndarray, names: list[str]) -> np.ndarray:
    """Monotone labels [n] that leave the fewest seed votes unmatched; shares[p, j] = votes for names[j]."""
    return np.asarray(names)[_monotone_labels(1 - np.nan_to_num(shares, nan=0.0))]


def _plurality(shares: np.ndarray, names: list[str]) -> np.ndarray:
    """The most voted name per row ('' where no seed voted; ties: the earlier name)."""
    voted = np.nansum(shares, axis=1) > 0
    return np.where(voted, np.asarray(names)[np.argmax(np.nan_to_num(shares, nan=-1.0), axis=1)], "")


def _boundary(per_plr: pd.DataFrame, lower: set[str], upper: set[str]) -> Boundary | None:
    low = per_plr[per_plr["regime"].isin(lower)]
    high = per_plr[per_plr["regime"].isin(upper)]
    if low.empty or high.empty:
        return None
    last, first = low.iloc[-1], high.iloc[0]
    confidence = np.nanmin([last["confidence"], first["confidence"]]) \
        if np.isfinite([last["confidence"], first["confidence"]]).any() else float("nan")
    return Boundary(lower_plr=float(last["plr"]), upper_plr=float(first["plr"]),
                    estimate=float(math.sqrt(last["plr"] * first["plr"])),
                    margin=float(0.5 * math.log10(first["plr"] / last["plr"])),
                    confidence=float(confidence))


def _seed_votes(seeds: pd.DataFrame, variants: pd.DataFrame, c: RegimeCriteria) -> pd.DataFrame:
    """Every seed's statistics and its own vote: vote_group (1/2/3) and vote (1/2/2A/2B/3)."""
    post = variants.groupby(RUN_KEYS)["test_acc"].agg(seed_best="max", seed_min="min")
    post["seed_spread"] = post["seed_best"] - post["seed_min"]
    # "The best anywhere" is judged against the same seed's best over the grid: the data seed moves
    # every accuracy together, and a seed is compared with itself as the PLR's label is with its votes.
    post["seed_global_best"] = post.groupby(["data_seed", "train_seed"])["seed_best"].transform("max")
    seeds = seeds.merge(post.reset_index(), on=RUN_KEYS, how="left")
    group = _label_123(seeds["diverged"], seeds["tail_train_loss"], seeds["tail_train_acc"],
                       seeds["grad_ratio"], seeds["descent_ratio"], seeds["seed_best"], c)
    sub = _label_2ab(seeds["seed_spread"], seeds["seed_best"], seeds["seed_global_best"], c)
    return seeds.assign(vote_group=group, vote=np.where((group == "2") & (sub != ""), sub, group))


def detect_regimes(metrics: pd.DataFrame, evaluations: pd.DataFrame | None,
                   criteria: RegimeCriteria = RegimeCriteria()) -> RegimeReport:
    """Label every PLR with regime 1 / 2A / 2B / 3 and locate the boundaries (see module docstring)."""
    c = criteria
    stats = run_statistics(metrics, c)  # first: it checks the metrics table
    variants = variant_accuracies(evaluations, c)
    seeds = _seed_votes(stats, variants, c)

    # Per-PLR statistics, for the reader: the aggregate of each seed statistic, and the
    # spread and best of the per-variant seed means.
    variant_means = variants.groupby(["plr", "variant"])["test_acc"].mean().groupby(level="plr")
    per_plr_post = pd.DataFrame({"post_best": variant_means.max(),
                                 "post_spread": variant_means.max() - variant_means.min(),
                                 "n_variants": variant_means.size()})
    global_best = float(per_plr_post["post_best"].max()) if len(per_plr_post) else float("nan")
    stat_cols = ["tail_train_loss", "tail_train_acc", "grad_ratio", "descent_ratio"]
    by_plr = seeds.groupby("plr", sort=True)
    per_plr = by_plr[stat_cols].agg(c.aggregate)
    per_plr.insert(0, "n_seeds", by_plr.size())
    per_plr.insert(1, "n_diverged", by_plr["diverged"].sum())
    per_plr = per_plr.join(per_plr_post, how="left").reset_index()
    per_plr["n_variants"] = per_plr["n_variants"].fillna(0).astype(int)

    # Vote shares per PLR over all its seeds; the labels are read from these shares only.
    names = ["1", "2", "2A", "2B", "3"]
    counts = pd.crosstab(seeds["plr"], seeds["vote"]).reindex(index=per_plr["plr"], columns=names, fill_value=0)
    frac = {name: counts[name].to_numpy(float) / per_plr["n_seeds"].to_numpy(float) for name in names}
    group_shares = np.stack([frac["1"], frac["2"] + frac["2A"] + frac["2B"], frac["3"]], axis=1)
    sub_shares = np.stack([frac["2A"], frac["2B"]], axis=1)
    raw_group, raw_sub = _plurality(group_shares, ["1", "2", "3"]), _plurality(sub_shares, ["2A", "2B"])
    per_plr["raw_regime"] = np.where((raw_group == "2") & (raw_sub != ""), raw_sub, raw_group)

    # Monotone resolution: first 1 < 2 < 3, then 2A < 2B inside the regime-2 block.
    final = _resolve(group_shares, ["1", "2", "3"]).astype(object)
    block = np.flatnonzero(final == "2")
    if len(block) and (raw_sub[block] != "").any():
        sub = _resolve(sub_shares[block], ["2A", "2B"])
        # A split the PLR's own seeds do not back (no majority) stays "2": regime 2, sub-regime open.
        backed = np.choose((sub == "2B").astype(int), sub_shares[block].T) > 0.5
        final[block] = np.where(backed, sub, "2")
    per_plr["regime"] = final.astype(str)

    own = {"1": frac["1"], "2": group_shares[:, 1], "2A": frac["2A"], "2B": frac["2B"], "3": frac["3"]}
    confidence = np.choose(pd.Categorical(final, categories=list(own)).codes, list(own.values()))
    per_plr["confidence"] = confidence
    per_plr["relabelled"] = final != per_plr["raw_regime"].to_numpy()
    for name, values in frac.items():
        per_plr[f"frac_{name}"] = values

    ordered = ["plr", "regime", "confidence", "raw_regime", "relabelled", "n_seeds", "n_diverged"]
    per_plr = per_plr[ordered + [col for col in per_plr if col not in ordered]]
    boundaries = {
        "1/2": _boundary(per_plr, {"1"}, {"2", "2A", "2B"}),
        "2A/2B": _boundary(per_plr, {"2A"}, {"2B"}),
        "2/3": _boundary(per_plr, {"2", "2A", "2B"}, {"3"}),
    }
    return RegimeReport(per_plr=per_plr, boundaries=boundaries, criteria=c, global_best=global_best)
