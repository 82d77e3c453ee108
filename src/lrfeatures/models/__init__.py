"""Models: a registry of networks, each declaring its scale-invariant parameter group."""

from . import convnet, mlp, resnet, vit  # noqa: F401  (each registers its models)
from .registry import MODELS, build_model, register_model, si_parameters

__all__ = ["MODELS", "build_model", "register_model", "si_parameters"]
