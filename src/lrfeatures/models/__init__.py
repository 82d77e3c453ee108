"""Models: a registry of networks with metadata, each declaring its scale-invariant parameter group."""

from . import convnet, mlp, resnet, vit  # noqa: F401  (each registers its models)
from .registry import (MODELS, ModelEntry, build_model, model_entry, model_names, register_model,
                       resolve_options, si_parameters)
from .vit import ViTOptions

__all__ = ["MODELS", "ModelEntry", "ViTOptions", "build_model", "model_entry", "model_names",
           "register_model", "resolve_options", "si_parameters"]
