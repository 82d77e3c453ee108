"""Single-feature importance on the synthetic task (SPEC §3) and a scalar sparsity index.

The importance of feature i is the model's accuracy on a probe set where only feature i
is informative. The paper reads sparsity off the sorted curves; we also summarise each
curve by one number built from the accuracies *above chance*:

    a_i   = max(acc_i - chance - floor, 0)    what feature i adds over guessing
    p_i   = a_i / sum_j a_j                    its share of the total
    N_eff = 1 / sum_i p_i^2                    effective number of used features, in [1, F]
    sparsity = (F - N_eff) / (F - 1)           in [0, 1]: 1 = one feature, 0 = all equal

N_eff is the inverse Simpson index (participation ratio): k equally useful features give
N_eff = k whatever their common level. When no feature is above chance (sum_j a_j below
`tol`) there is nothing to share out and both numbers are NaN, on purpose: such a model
(e.g. regime 3) is not "dense", it uses nothing.

`floor` discounts probe noise: a feature the model ignores still scores chance ± the
sampling error of n probe samples, and the best of 16 such features sits visibly above
chance. Experiments use one standard error, floor = sqrt(chance·(1 − chance)/n_probe)
(0.016 for n = 1000), and `tol` = SUMMARY_TOL = 0.05: a model whose accuracies exceed
chance + floor by less than 5 points in total uses no feature (index NaN, as in regime 3).
"""

from __future__ import annotations

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
    """Effective number of features used, 1/sum p_i^2 in [1, F]; NaN if none beats chance."""
    return _effective_and_sparsity(acc, chance, tol, floor)[0]


def sparsity_index(acc, chance: float = 0.5, tol: float = 1e-3, floor: float = 0.0):
    """(F - N_eff)/(F - 1) in [0, 1] per model (1 = one feature); NaN if none beats chance."""
    return _effective_and_sparsity(acc, chance, tol, floor)[1]


def _per_model_matrix(features_df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """(one row of keys per model, accuracies [models, F] ordered by feature index)."""
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
    return keys, table["accuracy"].to_numpy(np.float64).reshape(-1, num_features)


def feature_table_summary(features_df: pd.DataFrame, evaluations_df: pd.DataFrame | None,
                          chance: float = 0.5, floor: float = 0.0, tol: float = 1e-3) -> pd.DataFrame:
    """Per (stage, plr, flr, swa_k): seed mean/std of the sorted importance curve, sparsity and test_acc.

    Columns: GROUP_KEYS, n_models, rank_{r}_mean / rank_{r}_std for r = 0..F-1 (rank 0 = the
    most important feature of each model), sparsity_*, n_eff_*, test_acc_* (NaN when the
    evaluations table has no row for a model). Stds use ddof=1, so one seed gives NaN.
    NaN sparsities (nothing above chance) are skipped by the means; n_sparsity counts the rest.
    """
    keys, acc = _per_model_matrix(features_df)
    num_features = acc.shape[1]
    per_model = keys.copy()
    rank_cols = [f"rank_{r}" for r in range(num_features)]
    per_model[rank_cols] = sorted_importance(acc)
    per_model["n_eff"] = effective_num_features(acc, chance, tol, floor)
    per_model["sparsity"] = sparsity_index(acc, chance, tol, floor)
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
    return stats.reset_index()
