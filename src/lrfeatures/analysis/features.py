"""Single-feature importance on the synthetic task (SPEC §3) and a scalar sparsity index.

The importance of feature i is measured on a probe set where only feature i is informative.
The paper reads sparsity off the sorted accuracy curves; we also summarise each model by one
number, built from each probe set's class-balanced mean signed logit (column `margin`):

    m_i   = (E[z | y=1] - E[z | y=0]) / 2            on probe set i (z: the model's logit)
    e_i   = m_i^2 / sum_j m_j^2                       feature i's share of the class signal
    N_eff = 1 / sum_i e_i^2                           effective number of used features, in [1, F]
    N_0   = E[N_eff] when every m_i is i.i.d. Gaussian probe noise (6.45 for F = 16, 1.81 for F = 3)
    sparsity = clip((N_0 - N_eff) / (N_0 - 1), 0, 1)  1 = one feature, 0 = no more concentrated than noise

Why the margin and not the accuracy: at n_probe = 1000 a weakly used feature moves the
accuracy by less than its sampling error (0.016), so in regime 1 every accuracy sits at
0.48-0.56 (SPEC §8) and "above chance" is mostly noise; flooring those values at chance
zeroes half of them and reads noise as sparsity (issue 15). The margin is continuous, uses
the logit's size and not only its sign, and a constant logit (a dead model) scores exactly 0
whatever the probe set's class counts.

Why squared margins: squared separations are what add up over independent cues (a linear
read-out's d'^2 is the sum of the per-cue d_i'^2), so e_i is the fraction of the model's
class signal that feature i carries, and the shares sum to 1. Shares of |m_i| do not add: 2
features at 0.5 each separate as well as one at 0.71, not one at 1.0. N_eff is the inverse
Simpson index of these shares: k equally used features give N_eff = k at any strength.
No floor: the sampling noise of m_i is symmetric around its true value, so clamping would
turn noise into zeros. Both signs are reliance on feature i (a negative margin is reliance in
the wrong direction on that probe distribution).

Why N_0: when all m_i are noise of one scale (a model that uses no feature beyond the probes'
sampling error) N_eff is not F but about N_0, so dense use and pure noise are both told apart
from concentrated use, not from each other: the index measures concentration beyond what noise
produces, and is 0 for both. N_0 is computed once per F by a fixed-seed Monte Carlo
(`noise_effective_features`), so it is the same number everywhere.

effective_features is N_eff; the index is a decreasing function of it, so the two agree.
Both are NaN when sum_i |m_i| < MARGIN_TOL (a dead model: its logit ignores every feature).

Tables written before the margin column existed fall back, clearly marked (basis
"accuracy"), to the earlier accuracy index: a_i = max(acc_i - chance - floor, 0) with the
floor one standard error sqrt(chance (1 - chance) / n_probe) and NaN when sum a_i < SUMMARY_TOL
(0.05), N_eff = (sum a)^2 / sum a^2 and sparsity (F - N_eff) / (F - 1).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from lrfeatures.errors import DataError

from .tables import KEY_COLUMNS

GROUP_KEYS = ["stage", "plr", "flr", "swa_k"]


def _as_tensor(acc):
    """(tensor view of acc, function mapping a result back to acc's type)."""
    if isinstance(acc, torch.Tensor):
        return acc, lambda t: t
    # A copy: pandas hands out read-only arrays, which torch refuses to wrap.
    return torch.tensor(np.asarray(acc, dtype=np.float64)), lambda t: t.numpy()


def sorted_importance(acc):
    """Feature accuracies [..., F] sorted in descending order along the last axis."""
    tensor, back = _as_tensor(acc)
    return back(torch.sort(tensor, dim=-1, descending=True).values)


SUMMARY_TOL = 0.05  # total excess accuracy below which a model "uses nothing"


def noise_floor(n_probe: int, chance: float = 0.5) -> float:
    """One standard error of a chance-level accuracy measured on n_probe samples."""
    return (chance * (1 - chance) / n_probe) ** 0.5


MARGIN_TOL = 1e-6  # summed |margin| (logit units) below which the model's logit ignores every feature


NOISE_DRAWS = 200_000  # Monte Carlo draws for N_0: its standard error is below 1e-3


@lru_cache(maxsize=None)
def noise_effective_features(num_features: int) -> float:
    """N_0: the mean N_eff of i.i.d. Gaussian margins over num_features (fixed-seed Monte Carlo)."""
    rng = np.random.default_rng(0)
    energy = rng.standard_normal((NOISE_DRAWS, num_features)) ** 2
    return float((energy.sum(1) ** 2 / (energy ** 2).sum(1)).mean())


def margin_effective_features(margin, tol: float = MARGIN_TOL):
    """1 / sum_i e_i^2 with e_i = m_i^2 / sum m^2, in [1, F] per model over the last axis; NaN for a dead model."""
    tensor, back = _as_tensor(margin)
    if tensor.shape[-1] < 2:
        raise DataError(f"sparsity needs at least 2 features, got {tensor.shape[-1]}; "
                        "pass margins with the features on the last axis")
    energy = tensor.square()
    n_eff = energy.sum(-1).square() / energy.square().sum(-1).clamp_min(torch.finfo(tensor.dtype).tiny)
    dead = tensor.abs().sum(-1) < tol
    return back(torch.where(dead, torch.full_like(n_eff, float("nan")), n_eff))


def margin_sparsity(margin, tol: float = MARGIN_TOL):
    """clip((N_0 - N_eff) / (N_0 - 1), 0, 1) per model: 1 = one feature, 0 = no more concentrated than noise."""
    tensor, back = _as_tensor(margin)
    n_eff = _as_tensor(margin_effective_features(tensor, tol))[0]
    noise = noise_effective_features(tensor.shape[-1])
    return back(((noise - n_eff) / (noise - 1)).clamp(0, 1))  # NaN stays NaN


def _effective_and_sparsity(acc, chance: float, tol: float, floor: float = 0.0):
    tensor, back = _as_tensor(acc)
    num_features = tensor.shape[-1]
    if num_features < 2:
        raise DataError(f"sparsity needs at least 2 features, got {num_features}; "
                        "pass accuracies with the features on the last axis")
    above = (tensor - chance - floor).clamp_min(0)
    total = above.sum(-1)
    # (sum a)^2 / sum a^2 equals 1 / sum p^2 without dividing by a possibly zero total first.
    n_eff = total.square() / above.square().sum(-1).clamp_min(torch.finfo(tensor.dtype).tiny)
    n_eff = torch.where(total < tol, torch.full_like(n_eff, float("nan")), n_eff)
    sparsity = (num_features - n_eff) / (num_features - 1)
    return back(n_eff), back(sparsity)


def effective_num_features(acc, chance: float = 0.5, tol: float = 1e-3, floor: float = 0.0):
    """Accuracy basis (old tables): 1/sum p_i^2 in [1, F] of the floored excess accuracies; NaN if none beats chance."""
    return _effective_and_sparsity(acc, chance, tol, floor)[0]


def sparsity_index(acc, chance: float = 0.5, tol: float = 1e-3, floor: float = 0.0):
    """Accuracy basis (old tables): (F - N_eff)/(F - 1) in [0, 1] per model; NaN if none beats chance."""
    return _effective_and_sparsity(acc, chance, tol, floor)[1]


def _per_model_matrix(features_df: pd.DataFrame, column: str = "accuracy") -> tuple[pd.DataFrame, np.ndarray]:
    """(one row of keys per model, `column` [models, F] ordered by feature index)."""
    missing = [c for c in KEY_COLUMNS + ["feature", "accuracy"] if c not in features_df]
    if missing:
        raise DataError(f"features table lacks columns {missing}; "
                        "pass the features.parquet table written by the store")
    if features_df.empty:
        raise DataError("features table is empty; run the feature probes before summarising")
    table = features_df.sort_values(KEY_COLUMNS + ["feature"], na_position="last",
                                    kind="stable", ignore_index=True)
    num_features = int(table["feature"].max()) + 1
    sizes = table.groupby(KEY_COLUMNS, dropna=False, sort=False).size()
    expected = np.tile(np.arange(num_features), len(sizes))
    if (sizes != num_features).any() or len(table) != len(expected) \
            or not np.array_equal(table["feature"].to_numpy(), expected):
        raise DataError(f"features table must hold features 0..{num_features - 1} exactly once "
                        "per model; re-run the feature probes for the incomplete models")
    keys = table.iloc[::num_features][KEY_COLUMNS].reset_index(drop=True)
    return keys, table[column].to_numpy(np.float64).reshape(-1, num_features)


def sparsity_basis(features_df: pd.DataFrame) -> str:
    """"margin" when the table has the margin column filled, else "accuracy" (tables written before it)."""
    return "margin" if "margin" in features_df and features_df["margin"].notna().any() else "accuracy"


def model_sparsity(features_df: pd.DataFrame, chance: float = 0.5, floor: float = 0.0,
                   tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(N_eff, sparsity) per model, in `_per_model_matrix` order, on the table's basis (module docstring)."""
    if sparsity_basis(features_df) == "margin":
        margin = _per_model_matrix(features_df, "margin")[1]
        return margin_effective_features(margin), margin_sparsity(margin)
    acc = _per_model_matrix(features_df)[1]
    return effective_num_features(acc, chance, tol, floor), sparsity_index(acc, chance, tol, floor)


def feature_table_summary(features_df: pd.DataFrame, evaluations_df: pd.DataFrame | None,
                          chance: float = 0.5, floor: float = 0.0, tol: float = 1e-3) -> pd.DataFrame:
    """Per (stage, plr, flr, swa_k): seed mean/std of the sorted importance curve, sparsity and test_acc.

    Columns: GROUP_KEYS, n_models, rank_{r}_mean / rank_{r}_std for r = 0..F-1 (rank 0 = the
    most important feature of each model), sparsity_*, n_eff_*, test_acc_* (NaN when the
    evaluations table has no row for a model), basis ("margin" or "accuracy": `sparsity_basis`).
    Stds use ddof=1, so one seed gives NaN. NaN sparsities (dead models) are skipped by the
    means; n_sparsity counts the rest. chance, floor and tol apply to the accuracy basis only.
    """
    keys, acc = _per_model_matrix(features_df)
    num_features = acc.shape[1]
    per_model = keys.copy()
    rank_cols = [f"rank_{r}" for r in range(num_features)]
    per_model[rank_cols] = sorted_importance(acc)
    per_model["n_eff"], per_model["sparsity"] = model_sparsity(features_df, chance, floor, tol)
    if evaluations_df is not None:
        if "test_acc" not in evaluations_df or any(c not in evaluations_df for c in KEY_COLUMNS):
            raise DataError("evaluations table lacks test_acc or key columns; "
                            "pass the evaluations.parquet table written by the store")
        tests = evaluations_df[KEY_COLUMNS + ["test_acc"]].drop_duplicates(KEY_COLUMNS, keep="last")
        per_model = per_model.merge(tests, on=KEY_COLUMNS, how="left")  # NaN keys match NaN
    else:
        per_model["test_acc"] = np.nan

    value_cols = rank_cols + ["sparsity", "n_eff", "test_acc"]
    grouped = per_model.groupby(GROUP_KEYS, dropna=False, sort=True)
    stats = grouped[value_cols].agg(["mean", "std"])
    stats.columns = [f"{col}_{stat}" for col, stat in stats.columns]
    stats.insert(0, "n_models", grouped.size())
    stats.insert(1, "n_sparsity", grouped["sparsity"].count())
    return stats.reset_index().assign(basis=sparsity_basis(features_df))
