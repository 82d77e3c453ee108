"""Band importance on the bands-redundant task: single-band probe accuracy per model, and its sparsity.

The image analogue of the single-feature probes (analysis/features.py, SPEC §3). On
`bands-redundant` (data/band_redundant.py) every signal band carries the class; probe set i
carries it in band i only, every other band showing an independent class with the task's
statistics. For every final model (PT, FT per FLR, SWA per K) and every probe set i:

    accuracy_i  = the model's accuracy on probe set i (the band importance; chance 1/K)
    margin_i    = (1/K) sum_c E[z_c - mean_j z_j | y = c]   on probe set i (z: the logits)

margin_i is the class-balanced mean centred true-class logit: 0 for a model that ignores band i
(its logits do not depend on the label), and exactly 0 for constant logits whatever the class
counts. For two classes with logits (-z/2, z/2) it is the binary margin (E[z|1] - E[z|0])/2 of
the feature probes, so the band sparsity index below is the feature sparsity index with bands
for features: e_i = m_i^2 / sum_j m_j^2, N_eff = 1 / sum_i e_i^2 and
sparsity = clip((N_0 - N_eff) / (N_0 - 1), 0, 1), N_0 = 1.81 for B = 3 (analysis/features.py);
NaN for a dead model. With B = 3 bands: one band 1, two or three equal bands 0 (N_eff 2 and 3
are not more concentrated than noise over 3 bands).

Table `band_features` (one row per model x band): KEY_COLUMNS, pretrain_stage (-1 for the final
models; 0, 1, ... for the earlier pre-training stages of a two-stage run), band, band_index,
band_lo, band_hi, accuracy, margin, diverged. The measurement acts only on bands-redundant
experiments and returns None for any other data set.

Summary block (`band_features_block`), per (stage, plr, flr, swa_k) over the final models that
did not diverge: per band accuracy and margin (seed mean, std, n), the sorted accuracies
(rank 0 = each model's most important band), how often each band wins (the highest accuracy
of a model; ties go to the lower band), the band winning most often, and the sparsity index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.band_redundant import NAME, BandRedundantConfig, make_probe_sets, signal_bands
from ..engine.images import prepare_input
from .features import margin_effective_features, margin_sparsity
from .measurements import register_measurement
from .tables import KEY_COLUMNS, clean, mean_std

TABLE = "band_features"
COLUMNS = KEY_COLUMNS + ["pretrain_stage", "band", "band_index", "band_lo", "band_hi", "accuracy", "margin",
                         "diverged"]
GROUP_KEYS = ["stage", "plr", "flr", "swa_k"]
CHANCE = 1.0 / BandRedundantConfig().num_classes  # the task has fixed classes


def is_bands_redundant(spec: str) -> bool:
    """Whether a data.dataset spec names the bands-redundant task."""
    return spec.partition(":")[0] == NAME


@torch.no_grad()
def probe_scores(model: nn.Module, probes: torch.Tensor, labels: torch.Tensor,
                 normalization: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy [B], class-balanced centred true-class margin [B]) of an eval-mode model on probe sets [B, N, ...]."""
    model.eval()
    accuracy, margin = [], []
    for x, y in zip(probes, labels):
        logits = torch.cat([model(prepare_input(x[s:s + batch_size], normalization)).float()
                            for s in range(0, len(x), batch_size)]).double()  # [N, K]
        centred = logits.gather(1, y[:, None])[:, 0] - logits.mean(1)  # [N]
        per_class = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
        counts = torch.bincount(y, minlength=num_classes).double()
        per_class.index_add_(0, y, centred)
        present = counts > 0
        margin.append((per_class[present] / counts[present]).mean().item())
        accuracy.append((logits.argmax(1) == y).double().mean().item())
    return np.asarray(accuracy), np.asarray(margin)


def band_feature_rows(keys: list[dict[str, Any]], models: list[nn.Module], probes: dict[int, tuple],
                      normalization, cfg: BandRedundantConfig, batch_size: int) -> pd.DataFrame:
    """Rows of the band_features table for key rows (with data_seed, diverged) and their models."""
    bands = signal_bands(cfg)
    rows = []
    for key, model in zip(keys, models):
        x, y = probes[int(key["data_seed"])]
        accuracy, margin = probe_scores(model, x, y, normalization, cfg.num_classes, batch_size)
        for i, band in enumerate(bands):
            rows.append({**{k: key[k] for k in KEY_COLUMNS}, "pretrain_stage": int(key.get("pretrain_stage", -1)),
                         "band": band.name, "band_index": i, "band_lo": band.lo, "band_hi": band.hi,
                         "accuracy": float(accuracy[i]), "margin": float(margin[i]),
                         "diverged": bool(key.get("diverged", False))})
    return pd.DataFrame(rows, columns=COLUMNS)


def _per_model(table: pd.DataFrame, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(one key row per model, column [models, B] in band order) of the final models."""
    final = table[table["pretrain_stage"] == -1] if "pretrain_stage" in table else table
    final = final.sort_values(KEY_COLUMNS + ["band_index"], kind="stable", ignore_index=True)
    n_bands = int(final["band_index"].max()) + 1
    keys = final.iloc[::n_bands][KEY_COLUMNS + ["diverged"]].reset_index(drop=True)
    return keys, final[column].to_numpy(np.float64).reshape(-1, n_bands)


def band_names(table: pd.DataFrame) -> list[str]:
    """The bands of a band_features table in band_index order."""
    return table.drop_duplicates("band_index").sort_values("band_index")["band"].tolist()


def per_model_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per final model: keys, acc_<band>, margin_<band>, rank_r (sorted accuracy), winner, n_eff, sparsity."""
    names = band_names(table)
    keys, accuracy = _per_model(table, "accuracy")
    margin = _per_model(table, "margin")[1]
    out = keys.copy()
    for i, name in enumerate(names):
        out[f"acc_{name}"], out[f"margin_{name}"] = accuracy[:, i], margin[:, i]
    ranked = -np.sort(-accuracy, axis=1)
    for r in range(len(names)):
        out[f"rank_{r}"] = ranked[:, r]
    out["winner"] = np.asarray(names)[np.argmax(accuracy, axis=1)]  # first maximum: the lower band
    out["n_eff"], out["sparsity"] = margin_effective_features(margin), margin_sparsity(margin)
    return out


def band_features_block(table: pd.DataFrame) -> dict[str, Any]:
    """summary.json block of the band_features measurement (module docstring)."""
    names = band_names(table)
    per_model = per_model_summary(table)
    per_model = per_model[~per_model["diverged"].astype(bool)]
    groups = []
    for values, rows in per_model.groupby(GROUP_KEYS, dropna=False, sort=True):
        key = dict(zip(GROUP_KEYS, values))
        wins = rows["winner"].value_counts()
        share = {name: float(wins.get(name, 0)) / len(rows) for name in names}
        groups.append({"stage": key["stage"], "plr": clean(key["plr"]), "flr": clean(key["flr"]),
                       "swa_k": int(key["swa_k"]), "n_models": int(len(rows)),
                       "accuracy": {n: mean_std(rows[f"acc_{n}"]) for n in names},
                       "margin": {n: mean_std(rows[f"margin_{n}"]) for n in names},
                       "sorted_accuracy": [mean_std(rows[f"rank_{r}"]) for r in range(len(names))],
                       "winner_share": share, "top_band": max(names, key=lambda n: share[n]),
                       "sparsity_index": mean_std(rows["sparsity"]), "n_eff": mean_std(rows["n_eff"])})
    return {"bands": names, "chance": CHANCE, "per_plr": groups}


@register_measurement(TABLE, kinds=("images",), summarize=band_features_block)
def band_feature_importance(ctx: Any) -> pd.DataFrame | None:
    """Single-band probe accuracy and margin of every model of a bands-redundant experiment (else None)."""
    if not is_bands_redundant(ctx.cfg.data.dataset):
        return None
    keys, models = ctx.models()
    keys = [dict(k, pretrain_stage=-1) for k in keys]
    stage_models = getattr(ctx, "stage_models", None)
    if stage_models is not None:
        stage_keys, more = stage_models()
        keys, models = keys + list(stage_keys), list(models) + list(more)
    if not keys:
        return None
    device = ctx.data.test_x.device
    probes = {}
    for seed in sorted({int(k["data_seed"]) for k in keys}):
        x, y = make_probe_sets(BandRedundantConfig(seed=seed))  # the loader's config (data/band_redundant.py)
        probes[seed] = (x.to(device), y.to(device))
    # Probe sets keep the task's input statistics, so the training normalization applies to all of them.
    return band_feature_rows(keys, models, probes, ctx.data.normalization, BandRedundantConfig(),
                             ctx.cfg.engine.eval_batch_size)
