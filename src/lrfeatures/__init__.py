"""lrfeatures: how the initial learning rate shapes what a neural network learns."""

__version__ = "0.2.0"
