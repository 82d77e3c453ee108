"""lrfeatures: how the initial learning rate shapes what a neural network learns."""

# Before torch loads its OpenMP runtime: idle OpenMP workers sleep instead of spinning (threads.py).
from . import threads as _threads  # noqa: F401

__version__ = "0.3.0"
