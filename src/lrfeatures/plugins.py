"""Plugins: the user's extension modules, imported by name before anything reads a registry."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from .errors import LrfError

ENV = "LRFEATURES_PLUGINS"


def load_plugins(names: list[str]) -> None:
    """Import the user's extension modules: `names` (--plugin), $LRFEATURES_PLUGINS and installed entry points.

    The names are written back to $LRFEATURES_PLUGINS, so worker processes started from here
    (`--workers`) register the same models, data sets and measurements.
    """
    names = list(dict.fromkeys(names + [n.strip() for n in os.environ.get(ENV, "").split(",")
                                        if n.strip()]))
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise LrfError(f"--plugin {name!r} cannot be imported ({err}); give an importable module name "
                           "(on PYTHONPATH or installed)") from None
    for point in entry_points(group="lrfeatures.plugins"):
        point.load()
    if names:
        os.environ[ENV] = ",".join(names)
