"""What every table of a store shares: key columns, geometry pairs, the SWA-K rule, seed statistics.

One place for each, so the analyze stages, the summary and the report cannot disagree.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

# Identify one trained model in every table (flr is NaN outside fine-tuning, swa_k 0 outside SWA).
KEY_COLUMNS = ["stage", "data_seed", "train_seed", "plr", "flr", "swa_k"]
# One training run (a PLR and its seeds), shared by all stages of that run.
RUN_KEYS = ["plr", "data_seed", "train_seed"]
# The three solution pairs of SPEC §6, in table order: (first, second) model of each path.
GEOMETRY_PAIRS = ("ft_low-ft_high", "swa-ft_high", "swa-ft_low")
GEOMETRY_POINTS = 21  # points on each linear interpolation path (SPEC §6)
PAPER_SWA_K = 5       # the paper averages the last 5 checkpoints


def swa_k_of_choice(ks: Iterable[int]) -> int | None:
    """The SWA K that geometry, regimes and the report use: 5 as in the paper, else the nearest (ties: smaller)."""
    ks = sorted({int(k) for k in ks})
    return min(ks, key=lambda k: (abs(k - PAPER_SWA_K), k)) if ks else None


def clean(value: Any) -> float | None:
    """A JSON-safe float (None for NaN/inf)."""
    value = float(value)
    return value if math.isfinite(value) else None


def mean_std(values: pd.Series) -> dict[str, float | None]:
    """Mean and sample std over seeds (NaN values left out; None where undefined), and the count."""
    values = values.astype(float).dropna()
    return {"mean": clean(values.mean()) if len(values) else None,
            "std": clean(values.std(ddof=1)) if len(values) > 1 else None, "n": int(len(values))}
