"""Measurements: what the analyze stage of an experiment computes from trained models.

A measurement reads the final models of one analyze shard (through the analysis context its
experiment kind hands it) and returns one table whose rows carry the standard key columns
(`analysis.tables.KEY_COLUMNS`, or the subset that names its models). It never trains. The
runtime writes the table into the shard, merges it into DIR/<name>.parquet, and the summary
adds the measurement's `summarize` block under summary.json's "measurements".

    @register_measurement("hessian_trace", kinds=("synthetic",))
    def hessian_trace(ctx) -> pd.DataFrame:
        ...  # one row per model: KEY_COLUMNS + your columns

What a context offers depends on the kind (see `SyntheticAnalysis` and `ImageAnalysis` in
lrfeatures.experiments): its config, data, and the shard's solutions with an evaluate function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from ..errors import ConfigError
from .tables import KEY_COLUMNS, clean

Measure = Callable[[Any], "pd.DataFrame | None"]


def per_plr_means(table: pd.DataFrame) -> dict[str, Any]:
    """Default summary block: per model group (stage, PLR, FLR, SWA K), the seed mean of every numeric column."""
    keys = [c for c in KEY_COLUMNS if c in table]
    values = [c for c in table.select_dtypes("number").columns if c not in keys]
    if "plr" not in table or not values:
        return {"rows": int(len(table))}
    groups = [c for c in ("stage", "plr", "flr", "swa_k") if c in table]
    means = table.groupby(groups, sort=True, dropna=False)[values].mean().reset_index()

    def key(name: str, value: Any) -> Any:
        return value if name == "stage" else int(value) if name == "swa_k" else clean(value)

    return {"rows": int(len(table)),
            "per_plr": [{**{g: key(g, r[g]) for g in groups}, **{v: clean(r[v]) for v in values}}
                        for _, r in means.iterrows()]}


@dataclass
class Measurement:
    """One registered measurement: a table name and, per experiment kind, the function that fills it."""

    name: str                                        # the table: shards/*/<name>.parquet, DIR/<name>.parquet
    implementations: dict[str, Measure] = field(default_factory=dict)  # kind -> measure(ctx) -> table | None
    summarize: Callable[[pd.DataFrame], dict] | None = per_plr_means   # summary.json block (None: none)
    automatic: bool = True                           # run in the analyze stage; False: on demand
    description: str = ""

    @property
    def kinds(self) -> tuple[str, ...]:
        """The experiment kinds this measurement supports."""
        return tuple(self.implementations)

    def measure(self, ctx: Any) -> pd.DataFrame | None:
        """The table of one analyze shard (`ctx.kind` picks the implementation)."""
        return self.implementations[ctx.kind](ctx)


MEASUREMENTS: dict[str, Measurement] = {}


def register_measurement(name: str, kinds: tuple[str, ...], summarize: Callable | None = per_plr_means,
                         automatic: bool = True, description: str = "") -> Callable[[Measure], Measure]:
    """Decorator: register `measure(ctx) -> table` as measurement `name` for the given experiment kinds.

    One name may have one implementation per kind (the synthetic and image geometry, say).
    """

    def wrap(measure: Measure) -> Measure:
        entry = MEASUREMENTS.setdefault(name, Measurement(name, {}, summarize, automatic,
                                                          description or (measure.__doc__ or "").strip()
                                                          .split("\n")[0]))
        for kind in kinds:
            if entry.implementations.get(kind, measure) is not measure:
                raise ConfigError(f"measurement {name!r} already has an implementation for {kind!r}; "
                                  "choose another name")
            entry.implementations[kind] = measure
        return measure

    return wrap


def unregister_measurement(name: str) -> None:
    """Remove a measurement (tests and interactive sessions)."""
    MEASUREMENTS.pop(name, None)


def measurements_for(kind: str, automatic: bool = True) -> list[Measurement]:
    """The measurements an analyze stage of `kind` runs, in registration order."""
    return [m for m in MEASUREMENTS.values() if kind in m.implementations and m.automatic == automatic]


def measurement_blocks(tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """summary.json's "measurements": the summarize block of each measurement with a non-empty table."""
    return {name: MEASUREMENTS[name].summarize(table) for name, table in tables.items()
            if name in MEASUREMENTS and MEASUREMENTS[name].summarize is not None and len(table)}
