"""Live logging to the tools researchers watch runs in: TensorBoard, MLflow, Weights & Biases.

    feed.py                 what is logged, from the store's own tables (group and model curves)
    session.py              the background thread that feeds the loggers as shards commit
    tensorboard_logger.py   event files under DIR/tensorboard/ (per-PLR mean and spread; HParams)
    mlflow_logger.py        a parent run per experiment, a nested run per shard (file store DIR/mlruns)
    wandb_logger.py         offline W&B runs grouped by experiment, under DIR/wandb/

Each logger is an optional extra (`pip install 'lrfeatures[tensorboard]'`, ...) and off by
default; `check_loggers` raises the one-line install hint before anything is written. The
loggers write nothing the store does not hold: they are views of it, and `lrfeatures export`
rebuilds them from a finished store.
"""

from __future__ import annotations

import importlib.util

from ..errors import ConfigError
from .session import Tracker

# logger name -> the module it needs (its extra has the logger's name)
LOGGERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}

__all__ = ["LOGGERS", "Tracker", "check_loggers", "install_hint"]


def install_hint(name: str) -> str:
    """The pip command that installs a logger's extra."""
    return f"pip install 'lrfeatures[{name}]'"


def check_loggers(names: list[str] | tuple[str, ...]) -> None:
    """ConfigError naming the fix for an unknown logger or one whose package is not installed."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--log {name!r} is unknown; use one of: {', '.join(LOGGERS)}")
        if importlib.util.find_spec(LOGGERS[name]) is None:
            raise ConfigError(f"--log {name} needs the {LOGGERS[name]} package, which is not installed; "
                              f"install it with: {install_hint(name)}")
