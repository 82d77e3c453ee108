"""Experiments: one runtime (runtime.py) and one recipe per kind (synthetic, images, bands).

Importing this package registers the built-in kinds in `runtime.KINDS`, the table the CLI and
the executors read.
"""

from . import images, synthetic  # noqa: F401  (each registers its kind)
from .runtime import (KINDS, Experiment, Recipe, Shard, Stage, dependencies, load_experiment_config, pending_cost,
                      plan_shards, recipe_for, register_kind, run_shard, shard_cost)

__all__ = ["KINDS", "Experiment", "Recipe", "Shard", "Stage", "dependencies", "load_experiment_config",
           "pending_cost", "plan_shards", "recipe_for", "register_kind", "run_shard", "shard_cost"]
