"""Band importance of every model of an image experiment (SPEC §5): test accuracy per Fourier band.

For each model of an image experiment (pre-trained, fine-tuned per FLR, SWA per K; every data
seed, training seed and PLR) the test images are split into the default bands (lrfeatures/fourier.py)
and the model is evaluated on
    keep    only one band kept, every other DFT coefficient zeroed;
    remove  one band zeroed, the rest kept (the image minus its keep-band image).
Models are rebuilt exactly as the experiment evaluates them: the stored final state (BN
running statistics included) for PT and FT, and for SWA the stored average put at norm rho
with BN recomputed on the training set (`ImageRunner.swa_model`). All run in eval mode, with
the experiment's bf16 / channels_last settings.

Normalization of band images (`normalization`, recorded in every row; see fourier.py):
    "train"                  (x_band - mean) / std with the training normalization, as in training;
    "none"                   the raw filtered values in [0, 1] units;
    "train_background_only"  "train" for the images that contain the DC term (keep background,
                             and remove of any other band), "none" for the others (the authors'
                             ViT code normalized only the band-0 image);
    "train_additive"         "train" for the images that contain the DC term, x_band / std for the
                             others: the training normalization split over the bands, so the
                             normalized keep-band images add up to the normalized image (a band
                             image sits on the training mean colour instead of on black).

Work is split per (data seed, training seed, PLR) into store shards named
`bands-<normalization>-d<D>-s<S>-plr<III>` (the bands recipe, experiments/bands.py), so a run resumes and several processes (or machines
sharing the directory) can share it: a shard is published atomically, and if two processes
happen to compute the same one the first to finish is kept. The shards are merged into
DIR/bands.parquet (one row per model x mode x band):
    stage, data_seed, train_seed, plr, flr, swa_k, mode ("keep" | "remove"), band, band_lo,
    band_hi, normalization, accuracy (fraction in [0, 1]), diverged (the model's flag)
Each shard also stores the first test image (`example.safetensors`) for the report's figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..engine.images import amp_context
from ..errors import ConfigError, DataError
from ..fourier import MODES, NORMALIZATIONS, Band, BandFilter, normalize_band_images
from ..store import ExperimentStore, write_json
from .measurements import register_measurement
from .tables import KEY_COLUMNS, mean_std

BAND_NORMALIZATIONS = NORMALIZATIONS + ("train_additive",)

TABLE = "bands"
COLUMNS = KEY_COLUMNS + ["mode", "band", "band_lo", "band_hi", "normalization", "accuracy", "diverged"]


@dataclass
class BandsConfig:
    """How band accuracies are computed (not part of the experiment's identity)."""

    # Default "train_additive": on the band-signal ground truth it is the only choice with which
    # a BN convnet scores its signal band (keep) and only it (remove); plain "train" turns every
    # zero-mean band into a dark image that breaks the stored BN statistics.
    normalization: str = "train_additive"
    device: str = ""               # "" = the experiment's engine.device
    chunk_size: int = 0            # test images filtered at once (0 = engine.eval_batch_size)

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        if self.normalization not in BAND_NORMALIZATIONS:
            raise ConfigError(f"band normalization {self.normalization!r} is unknown; use one of "
                              f"{', '.join(BAND_NORMALIZATIONS)}")
        if self.chunk_size < 0:
            raise ConfigError(f"chunk_size={self.chunk_size} must be >= 0 (0 = engine.eval_batch_size)")


# ---------------------------------------------------------------- evaluation core

def normalize_band(x: torch.Tensor, normalization: str, mean, std, mode: str, band: Band) -> torch.Tensor:
    """Normalize keep- or remove-band images [..., C, H, W] as `normalization` says (module docstring)."""
    # A keep image holds the DC term iff its band does; a remove image iff its band does not.
    has_dc = (band.lo == 0) == (mode == "keep")
    if normalization == "train_additive":
        if has_dc:
            return normalize_band_images(x, "train", mean, std)
        return normalize_band_images(x, "train", torch.zeros_like(torch.as_tensor(std)), std)
    # normalize_band_images decides "train_background_only" from whether its band contains d = 0
    return normalize_band_images(x, normalization, mean, std, Band("dc" if has_dc else "no-dc", int(not has_dc),
                                                                    int(not has_dc)))


@torch.no_grad()
def band_correct(models: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, band_filter: BandFilter,
                 normalization: str = "train", mean=None, std=None, chunk_size: int = 500,
                 batch_size: int = 1000, bf16: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Correct predictions [n_models, 2 (keep, remove), n_bands] of eval-mode models on band images.

    `images` uint8 [N, C, H, W] (or float in [0, 1]) on the models' device. Each chunk of images
    is filtered once (remove = x - keep), every (mode, band) image is normalized, and all of
    them go through each model in batches of `batch_size`.
    """
    if images.ndim != 4 or labels.ndim != 1 or not 0 < len(labels) == len(images):
        raise DataError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match; "
                        "pass images [N, C, H, W] and labels [N] with N > 0")
    n_bands, device = band_filter.n_bands, images.device
    correct = torch.zeros(len(models), len(MODES), n_bands, dtype=torch.long, device=device)
    for model in models:
        model.eval()
    for start in range(0, len(images), chunk_size):
        x = images[start:start + chunk_size]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        y = labels[start:start + chunk_size]
        keep = band_filter(x, "keep")                       # [n_bands, B, C, H, W]
        filtered = torch.stack([keep, x.unsqueeze(0) - keep])  # [2, n_bands, B, C, H, W], order of MODES
        for m, mode in enumerate(MODES):
            for b, band in enumerate(band_filter.bands):
                filtered[m, b] = normalize_band(filtered[m, b], normalization, mean, std, mode, band)
        flat = filtered.reshape(-1, *x.shape[1:])
        for i, model in enumerate(models):
            predictions = []
            for s in range(0, len(flat), batch_size):
                xb = flat[s:s + batch_size]
                if channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with amp_context(model, bf16):
                    predictions.append(model(xb).float().argmax(1))
            hits = torch.cat(predictions).view(len(MODES), n_bands, -1) == y
            correct[i] += hits.sum(-1)
    return correct


# ---------------------------------------------------------------- one PLR's table

def band_table(keys: list[dict[str, Any]], models: list[nn.Module], data, bands_cfg: BandsConfig,
               eval_batch_size: int, bf16: bool = False, channels_last: bool = False) -> pd.DataFrame:
    """The bands rows of some models (key rows with a `diverged` flag) on the test images of `data`."""
    height, width = data.test_x.shape[-2:]
    band_filter = BandFilter(height, width)
    correct = band_correct(models, data.test_x, data.test_y, band_filter, bands_cfg.normalization, data.mean,
                           data.std, bands_cfg.chunk_size or eval_batch_size, eval_batch_size, bf16, channels_last)
    accuracy = (correct.double() / len(data.test_y)).cpu().numpy()
    rows = []
    for i, key in enumerate(keys):
        for m, mode in enumerate(MODES):
            for b, band in enumerate(band_filter.bands):
                rows.append({**{k: key[k] for k in KEY_COLUMNS}, "mode": mode, "band": band.name,
                             "band_lo": band.lo, "band_hi": band.hi, "normalization": bands_cfg.normalization,
                             "accuracy": float(accuracy[i, m, b]), "diverged": key["diverged"]})
    return pd.DataFrame(rows, columns=COLUMNS)


@register_measurement("bands", kinds=("images",), summarize=None, automatic=False)
def band_importance(ctx: Any) -> pd.DataFrame:
    """Keep- and remove-band test accuracy of one PLR's models (run by `lrfeatures fourier`)."""
    keys, models = ctx.models()
    engine = ctx.cfg.engine
    return band_table(keys, models, ctx.data, ctx.options, engine.eval_batch_size, ctx.runner.bf16,
                      ctx.runner.channels_last)


# ---------------------------------------------------------------- summaries

def _per_mode(group: pd.DataFrame) -> dict[str, dict[str, dict]]:
    group = group[~group["diverged"].astype(bool)]
    return {mode: {band: mean_std(rows["accuracy"]) for band, rows in at_mode.groupby("band", sort=False)}
            for mode, at_mode in group.groupby("mode", sort=False)}


def bands_block(table: pd.DataFrame, plr: float) -> dict[str, Any]:
    """summary.json block of one PLR: {normalization: {stage: {mode: {band: {mean, std, n}}}}}.

    Fine-tuned models are keyed by repr(flr) and SWA models by str(K), as elsewhere in summary.json.
    """
    at = table[np.isclose(table["plr"].astype(float), plr)]
    block = {}
    for normalization, rows in at.groupby("normalization", sort=True):
        entry: dict[str, Any] = {"pretrain": _per_mode(rows[rows["stage"] == "pretrain"])}
        finetune = rows[rows["stage"] == "finetune"]
        entry["finetune"] = {repr(float(flr)): _per_mode(g) for flr, g in finetune.groupby("flr", sort=True)}
        swa = rows[rows["stage"] == "swa"]
        entry["swa"] = {str(int(k)): _per_mode(g) for k, g in swa.groupby("swa_k", sort=True)}
        block[str(normalization)] = entry
    return block


def update_summary(store: ExperimentStore) -> dict[str, Any]:
    """Add a `bands` block to every per-PLR entry of summary.json (and the band list at the top)."""
    from .summary import write_summary

    path = store.root / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else write_summary(store)
    table = store.table(TABLE)
    if table.empty:
        return summary
    ranges = table[["band", "band_lo", "band_hi"]].drop_duplicates("band").sort_values("band_lo")
    summary["bands"] = {"bands": [{"name": r.band, "lo": int(r.band_lo), "hi": int(r.band_hi)}
                                  for r in ranges.itertuples()],
                        "modes": list(MODES), "normalizations": sorted(table["normalization"].unique())}
    for entry in summary.get("per_plr", []):
        entry["bands"] = bands_block(table, entry["plr"])
    write_json(path, summary)
    return summary


def band_means(table: pd.DataFrame, stage: str = "pretrain", mode: str = "keep",
               normalization: str | None = None, flr: float | None = None, swa_k: int | None = None) -> pd.DataFrame:
    """PLR x band table of seed-mean accuracies (diverged models left out), bands in frequency order."""
    rows = table[(table["stage"] == stage) & (table["mode"] == mode) & ~table["diverged"].astype(bool)]
    if normalization is not None:
        rows = rows[rows["normalization"] == normalization]
    if flr is not None:
        rows = rows[np.isclose(rows["flr"].astype(float), flr)]
    if swa_k is not None:
        rows = rows[rows["swa_k"] == swa_k]
    order = table.drop_duplicates("band").sort_values("band_lo")["band"].tolist()
    means = rows.pivot_table(index="plr", columns="band", values="accuracy", aggfunc="mean")
    return means[[b for b in order if b in means.columns]]
