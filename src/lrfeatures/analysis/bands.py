"""Band importance of every model of an image experiment (SPEC §5): test accuracy per Fourier band.

For each model of an image experiment (pre-trained, fine-tuned per FLR, SWA per K; every data
seed, training seed and PLR) the test images are split into the default bands (analysis/fourier.py)
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
`bands-<normalization>-d<D>-s<S>-plr<III>`, so a run resumes and several processes (or machines
sharing the directory) can share it: a shard is published atomically, and if two processes
happen to compute the same one the first to finish is kept. The shards are merged into
DIR/bands.parquet (one row per model x mode x band):
    stage, data_seed, train_seed, plr, flr, swa_k, mode ("keep" | "remove"), band, band_lo,
    band_hi, normalization, accuracy (fraction in [0, 1]), diverged (the model's flag)
Each shard also stores the first test image (`example.safetensors`) for the report's figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..engine.images import amp_context
from ..errors import ConfigError, DataError
from ..store import ExperimentStore, write_json
from .fourier import MODES, NORMALIZATIONS, Band, BandFilter, normalize_band_images

BAND_NORMALIZATIONS = NORMALIZATIONS + ("train_additive",)

TABLE = "bands"
SHARD_PREFIX = "bands-"
KEYS = ["stage", "data_seed", "train_seed", "plr", "flr", "swa_k"]
COLUMNS = KEYS + ["mode", "band", "band_lo", "band_hi", "normalization", "accuracy", "diverged"]


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


def shard_name(normalization: str, data_seed: int, train_seed: int, plr_index: int) -> str:
    """Store shard of one PLR's band accuracies under one normalization."""
    return f"{SHARD_PREFIX}{normalization}-d{data_seed}-s{train_seed}-plr{plr_index:03d}"


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
                with amp_context(device, bf16):
                    predictions.append(model(xb).float().argmax(1))
            hits = torch.cat(predictions).view(len(MODES), n_bands, -1) == y
            correct[i] += hits.sum(-1)
    return correct


# ---------------------------------------------------------------- models of one PLR

def _image_runner(store: ExperimentStore, cfg, device: str):
    """An ImageRunner on `device` (the store's config is not rewritten: the device is not its identity)."""
    from ..images_experiment import ImageRunner

    if device:
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, device=device))
    return ImageRunner(cfg, store)


def _diverged_flags(store: ExperimentStore, shards: list[str]) -> pd.DataFrame:
    tables = [store.shard_table(s, "evaluations")[KEYS + ["diverged"]] for s in shards]
    return pd.concat(tables, ignore_index=True)


def plr_models(runner, shard) -> tuple[list[dict[str, Any]], list[nn.Module]]:
    """Key rows and eval-mode models (PT, FT per FLR, SWA per K) of one (data seed, training seed, PLR).

    `shard` is the experiment's pretrain ImageShard of that PLR.
    """
    from ..images_experiment import key_row, stages, unprefixed

    cfg, store = runner.cfg, runner.store
    needed = [shard.upstream(s) for s in stages(cfg) if s != "analyze"]
    missing = [s.name for s in needed if not store.is_done(s.name)]
    if missing:
        raise DataError(f"{store.root}: shard {missing[0]} is not finished; run the `lrfeatures images` "
                        "command of this experiment again (same --out) to finish it first")
    plr = cfg.pretrain.lrs[shard.plr_index]
    pretrained = runner.weights(shard, "pretrain")
    keys, models = [], []
    model, _ = runner.make_model(shard.data_seed, shard.train_seed)
    model.load_state_dict(unprefixed("final.", pretrained))
    keys.append(key_row("pretrain", shard, plr))
    models.append(model.eval())
    if "finetune" in stages(cfg):
        finetuned = runner.weights(shard, "finetune")
        for j, flr in enumerate(cfg.finetune.lrs):
            model, _ = runner.make_model(shard.data_seed, shard.train_seed)
            model.load_state_dict(unprefixed(f"flr{j}.", finetuned))
            keys.append(key_row("finetune", shard, plr, flr))
            models.append(model.eval())
    for k in cfg.swa.ks:  # averaged weights at norm rho, BN recomputed on the training set
        keys.append(key_row("swa", shard, plr, swa_k=k))
        models.append(runner.swa_model(shard, k, pretrained).eval())
    flags = _diverged_flags(store, [s.name for s in needed])
    for row in keys:
        match = flags[(flags["stage"] == row["stage"]) & np.isclose(flags["plr"], plr)
                      & (flags["flr"].isna() if math.isnan(row["flr"]) else np.isclose(flags["flr"], row["flr"]))
                      & (flags["swa_k"] == row["swa_k"])]
        row["diverged"] = bool(match["diverged"].any()) if len(match) else False
    return keys, models


def plr_band_table(runner, shard, bands_cfg: BandsConfig) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """The bands rows of one PLR's models, and the example test image stored with them."""
    data = runner.data(shard.data_seed)
    keys, models = plr_models(runner, shard)
    height, width = data.test_x.shape[-2:]
    band_filter = BandFilter(height, width)
    engine = runner.cfg.engine
    correct = band_correct(models, data.test_x, data.test_y, band_filter, bands_cfg.normalization, data.mean,
                           data.std, bands_cfg.chunk_size or engine.eval_batch_size, engine.eval_batch_size,
                           runner.bf16, runner.channels_last)
    accuracy = (correct.double() / len(data.test_y)).cpu().numpy()
    rows = []
    for i, key in enumerate(keys):
        for m, mode in enumerate(MODES):
            for b, band in enumerate(band_filter.bands):
                rows.append({**{k: key[k] for k in KEYS}, "mode": mode, "band": band.name, "band_lo": band.lo,
                             "band_hi": band.hi, "normalization": bands_cfg.normalization,
                             "accuracy": float(accuracy[i, m, b]), "diverged": key["diverged"]})
    example = {"image": data.test_x[0].cpu(), "label": data.test_y[0:1].cpu()}
    return pd.DataFrame(rows, columns=COLUMNS), example


# ---------------------------------------------------------------- experiment level

def open_image_experiment(root: str | Path) -> tuple[ExperimentStore, Any]:
    """The store and config of an image experiment; ConfigError for any other kind."""
    from .. import images_experiment  # noqa: F401  (registers the "images" config kind)

    store = ExperimentStore(root)
    cfg = store.config()
    if getattr(cfg, "kind", None) != "images":
        raise ConfigError(f"{store.root} is a {getattr(cfg, 'kind', 'unknown')} experiment; band accuracy "
                          "needs an image experiment (run `lrfeatures images` first)")
    return store, cfg


def pending_shards(root: str | Path, bands_cfg: BandsConfig | None = None) -> list[str]:
    """Band shards not yet computed under this normalization."""
    bands_cfg = bands_cfg or BandsConfig()
    store, cfg = open_image_experiment(root)
    from ..images_experiment import plan_shards

    names = [shard_name(bands_cfg.normalization, s.data_seed, s.train_seed, s.plr_index)
             for s in plan_shards(cfg) if s.stage == "pretrain"]
    return [n for n in names if not store.is_done(n)]


def clean_partial_bands(store: ExperimentStore, age_s: float = 60.0) -> None:
    """Remove temporary band shards left by an interrupted write (never another stage's in-progress shard)."""
    for path in store.shards_dir.glob(f".tmp-{SHARD_PREFIX}*"):
        if time.time() - path.stat().st_mtime > age_s:
            shutil.rmtree(path, ignore_errors=True)


def run_bands(root: str | Path, bands_cfg: BandsConfig | None = None,
              progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Compute every missing band shard of an image experiment, merge bands.parquet, update summary.json."""
    from ..images_experiment import plan_shards

    bands_cfg = bands_cfg or BandsConfig()
    bands_cfg.validate()
    store, cfg = open_image_experiment(root)
    clean_partial_bands(store)
    runner = _image_runner(store, cfg, bands_cfg.device)
    threads = torch.get_num_threads()
    if cfg.engine.threads:
        torch.set_num_threads(cfg.engine.threads)
    try:
        for shard in (s for s in plan_shards(cfg) if s.stage == "pretrain"):
            name = shard_name(bands_cfg.normalization, shard.data_seed, shard.train_seed, shard.plr_index)
            if store.is_done(name):
                continue
            started = time.time()
            table, example = plr_band_table(runner, shard, bands_cfg)
            writer = store.writer(name)
            try:
                writer.table(TABLE, table)
                writer.tensors("example", example)
                writer.commit({"seconds": time.time() - started, "device": str(runner.device),
                               "normalization": bands_cfg.normalization})
            except BaseException:
                writer.abort()
                raise
            if progress:
                progress(name)
    finally:
        torch.set_num_threads(threads)
    table = store.merge_table(TABLE)
    update_summary(store)
    return table


# ---------------------------------------------------------------- summaries

def _mean_std(values: pd.Series) -> dict[str, float | None]:
    values = values.astype(float).dropna()
    mean = float(values.mean()) if len(values) else math.nan
    std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return {"mean": mean if math.isfinite(mean) else None, "std": std if math.isfinite(std) else None,
            "n": int(len(values))}


def _per_mode(group: pd.DataFrame) -> dict[str, dict[str, dict]]:
    group = group[~group["diverged"].astype(bool)]
    return {mode: {band: _mean_std(rows["accuracy"]) for band, rows in at_mode.groupby("band", sort=False)}
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


def print_progress(name: str) -> None:
    """Default progress line for the CLI."""
    print(f"bands: {name} done", file=sys.stderr, flush=True)
