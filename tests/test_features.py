"""Sorted importance curves, the sparsity index and the per-PLR feature summary."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lrfeatures.analysis.features import (effective_num_features, feature_table_summary, margin_effective_features,
                                          margin_sparsity, noise_effective_features, sorted_importance,
                                          sparsity_index)
from lrfeatures.errors import DataError

F = 16


def test_sorted_importance_is_descending_per_model_and_keeps_type():
    acc = np.array([[0.5, 0.9, 0.7], [0.6, 0.55, 0.8]])
    np.testing.assert_array_equal(sorted_importance(acc), [[0.9, 0.7, 0.5], [0.8, 0.6, 0.55]])
    out = sorted_importance(torch.tensor(acc, dtype=torch.float32))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[0.9, 0.7, 0.5], [0.8, 0.6, 0.55]], dtype=torch.float32))


def test_hand_made_cases():
    one = np.full(F, 0.5)
    one[3] = 0.97
    assert effective_num_features(one) == pytest.approx(1) and sparsity_index(one) == pytest.approx(1)
    equal = np.full(F, 0.8)
    assert effective_num_features(equal) == pytest.approx(F) and sparsity_index(equal) == pytest.approx(0)
    two = np.full(F, 0.45)  # below chance counts as chance
    two[[0, 9]] = 0.9
    assert effective_num_features(two) == pytest.approx(2)
    assert sparsity_index(two) == pytest.approx((F - 2) / (F - 1))
    none = np.full(F, 0.5)
    none[0] = 0.5005  # below the 1e-3 tolerance on the summed excess
    assert math.isnan(effective_num_features(none)) and math.isnan(sparsity_index(none))


def test_batched_and_chance_parameter():
    acc = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1]], dtype=torch.float64)
    n_eff = effective_num_features(acc, chance=0.1)
    assert torch.allclose(n_eff, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert sparsity_index(acc, chance=0.1).shape == (2,)
    with pytest.raises(DataError):
        sparsity_index(np.array([0.9]))


accuracies = arrays(np.float64, F, elements=st.floats(0.0, 1.0))


@settings(max_examples=25, deadline=None)
@given(accuracies, st.randoms(use_true_random=False))
def test_permutation_invariance_and_range(acc, rnd):
    perm = list(range(F))
    rnd.shuffle(perm)
    s, s_perm = sparsity_index(acc), sparsity_index(acc[perm])
    if math.isnan(s):
        assert math.isnan(s_perm)
    else:
        assert s == pytest.approx(s_perm, abs=1e-12)
        assert -1e-12 <= s <= 1 + 1e-12
        assert 1 - 1e-9 <= effective_num_features(acc) <= F + 1e-9


@settings(max_examples=25, deadline=None)
@given(st.floats(0.55, 0.9), st.lists(st.floats(0.0, 0.3), min_size=2, max_size=10))
def test_sparsity_grows_as_the_top_feature_pulls_away(rest_level, steps):
    # Others fixed at one level above chance; raising the top feature only concentrates use.
    tops = rest_level + np.cumsum(np.array(steps) + 1e-3)
    values = []
    for top in np.clip(tops, None, 1.5):
        acc = np.full(F, rest_level)
        acc[0] = top
        values.append(sparsity_index(acc))
    assert np.all(np.diff(values) >= -1e-12)


def test_sparsity_grows_as_the_rest_fall_to_chance():
    values = [sparsity_index(np.r_[0.95, np.full(F - 1, level)]) for level in np.linspace(0.95, 0.5, 10)]
    assert np.all(np.diff(values) > 0) and values[-1] == pytest.approx(1)


def _features_table(rng):
    rows = []
    for plr, top_feature_level in [(1e-3, 0.75), (1e-2, 0.95)]:
        for seed in range(3):
            acc = np.full(F, 0.75 if plr == 1e-3 else 0.5)
            acc[rng.integers(F)] = top_feature_level  # the top feature differs by seed
            for stage, flr, k in [("pretrain", np.nan, 0), ("finetune", 1e-4, 0), ("swa", np.nan, 5)]:
                for feature in rng.permutation(F):  # store order is arbitrary
                    rows.append(dict(stage=stage, data_seed=0, train_seed=seed, plr=plr, flr=flr,
                                     swa_k=k, feature=int(feature), accuracy=acc[feature]))
    return pd.DataFrame(rows)


def test_feature_table_summary():
    features = _features_table(np.random.default_rng(0))
    keys = ["stage", "data_seed", "train_seed", "plr", "flr", "swa_k"]
    evaluations = features.drop_duplicates(keys)[keys].assign(test_acc=lambda d: 0.8 + 0.1 * d["train_seed"])
    summary = feature_table_summary(features, evaluations)
    assert len(summary) == 6 and (summary["n_models"] == 3).all()
    sparse = summary[(summary["plr"] == 1e-2) & (summary["stage"] == "finetune")].iloc[0]
    assert sparse["flr"] == 1e-4 and sparse["rank_0_mean"] == pytest.approx(0.95)
    assert sparse["rank_1_mean"] == pytest.approx(0.5) and sparse["rank_0_std"] == pytest.approx(0)
    assert sparse["sparsity_mean"] == pytest.approx(1) and sparse["n_eff_mean"] == pytest.approx(1)
    assert sparse["test_acc_mean"] == pytest.approx(0.9) and sparse["test_acc_std"] == pytest.approx(0.1)
    dense = summary[(summary["plr"] == 1e-3) & (summary["stage"] == "swa")].iloc[0]
    assert dense["swa_k"] == 5 and math.isnan(dense["flr"])
    assert dense["sparsity_mean"] == pytest.approx(0) and dense["test_acc_mean"] == pytest.approx(0.9)
    curve = summary[[f"rank_{r}_mean" for r in range(F)]].to_numpy()
    assert np.all(np.diff(curve, axis=1) <= 1e-12)


def test_feature_table_summary_rejects_incomplete_models():
    features = _features_table(np.random.default_rng(1))
    with pytest.raises(DataError):
        feature_table_summary(features.iloc[1:], None)
    with pytest.raises(DataError):
        feature_table_summary(features.drop(columns="accuracy"), None)


# ----- the margin index (analysis.features docstring) ------------------------------------------

def test_margin_index_one_strong_feature():
    margin = np.zeros(F)
    margin[5] = 2.0
    assert margin_effective_features(margin) == pytest.approx(1) and margin_sparsity(margin) == pytest.approx(1)
    margin[[0, 9]] = 0.02  # the rest at a hundredth of it: still one feature
    assert margin_sparsity(margin) > 0.95


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("strength", [0.05, 1.0, 20.0])
def test_margin_index_k_equal_features_at_any_strength(k, strength):
    margin = np.zeros(F)
    margin[:k] = strength
    noise = noise_effective_features(F)
    assert margin_effective_features(margin) == pytest.approx(k)
    assert margin_sparsity(margin) == pytest.approx(max(0.0, (noise - k) / (noise - 1)))


def test_margin_index_all_features_weakly_and_equally_used_is_zero():
    weak = np.full(F, 0.03)
    assert margin_effective_features(weak) == pytest.approx(F) and margin_sparsity(weak) == 0
    # The same with probe noise on top (signal-to-noise 1 per feature): still dense, near 0.
    rng = np.random.default_rng(0)
    noisy = margin_sparsity(weak + 0.03 * rng.normal(size=(2000, F)))
    assert noisy.mean() < 0.1


def test_margin_index_pure_noise_reads_zero_on_average():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(20000, F)) * 0.2
    assert margin_effective_features(noise).mean() == pytest.approx(noise_effective_features(F), rel=0.02)
    values = margin_sparsity(noise)
    # Clipped at 0 below N_0, so the mean is > 0: one large noise draw concentrates the energy.
    assert values.mean() < 0.15 and np.median(values) < 0.05


def test_margin_index_dead_model_is_undefined():
    dead = np.zeros((2, F))
    assert np.isnan(margin_effective_features(dead)).all() and np.isnan(margin_sparsity(dead)).all()


def test_margin_index_orders_sparse_above_dense_and_keeps_type():
    sparse, dense = np.r_[1.5, np.full(F - 1, 0.1)], np.full(F, 0.3)
    values = margin_sparsity(torch.tensor(np.stack([sparse, dense])))
    assert isinstance(values, torch.Tensor) and values[0] > 0.6 > values[1]
    with pytest.raises(DataError):
        margin_sparsity(np.array([1.0]))


def test_feature_table_summary_uses_the_margin_when_present():
    features = _features_table(np.random.default_rng(2))
    assert feature_table_summary(features, None)["basis"].eq("accuracy").all()
    features["margin"] = (features["accuracy"] - 0.5) * 4  # sparse in 1e-2 (one feature), dense in 1e-3
    summary = feature_table_summary(features, None)
    assert summary["basis"].eq("margin").all()
    sparse = summary[summary["plr"] == 1e-2]
    dense = summary[summary["plr"] == 1e-3]
    assert (sparse["sparsity_mean"] > 0.95).all() and (sparse["n_eff_mean"] < 1.1).all()
    assert (dense["sparsity_mean"] == 0).all() and (dense["n_eff_mean"] > 10).all()
