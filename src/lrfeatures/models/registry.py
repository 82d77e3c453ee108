"""Model registry: name -> `ModelEntry` (builder plus metadata), timm style.

A model is an `nn.Module` with a method `si_parameters()` returning the list of parameters
that together form one scale-invariant group: f(c·θ) = f(θ) for all c > 0 when θ is their
concatenation. Frozen parameters have requires_grad=False. Each entry says how its trainable
parameters relate to that group (`si_group`): "all" (every trainable parameter is in it),
"partial" (an SI group plus ordinary trainable parameters) or "none" (no SI group at all).

A model with its own options (`ModelConfig.options`, e.g. the ViT's heads) declares them as a
dataclass; `resolve_options` checks a config's dict against it and `build_model` hands the
builder the resulting object. Builders of models without options take (cfg, shape, outputs),
builders of models with options take (cfg, shape, outputs, options).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import ModelConfig, coerce
from ..errors import ConfigError

ModelBuilder = Callable[..., nn.Module]
INPUT_KINDS = {"vector": "flat vector inputs of shape (D,)", "image": "image inputs of shape (C, H, W)"}
INPUT_RANKS = {"vector": 1, "image": 3}
SI_GROUPS = ("all", "partial", "none")
# Engines that run any model of an input kind; a model lists more (e.g. "native") itself.
DEFAULT_ENGINES = {"vector": ("grid", "reference"), "image": ("images",)}


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: how to build it and what it is."""

    name: str
    builder: ModelBuilder
    input_kind: str                 # "vector" or "image"
    si_group: str                   # "all", "partial" or "none"
    options: type | None = None     # dataclass of the model's own options (ModelConfig.options)
    engines: tuple[str, ...] = ()   # engines / kernels that can train it
    description: str = ""

    @property
    def has_si_group(self) -> bool:
        """Whether the model has parameters trained on the sphere."""
        return self.si_group != "none"


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, input_kind: str = "vector", si_group: str = "all",
                   options: type | None = None, engines: tuple[str, ...] | None = None,
                   description: str = "") -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder under `name` with its metadata (engines default by input kind)."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"register_model({name!r}): input_kind must be one of {', '.join(INPUT_KINDS)}")
    if si_group not in SI_GROUPS:
        raise ValueError(f"register_model({name!r}): si_group must be one of {', '.join(SI_GROUPS)}")
    if options is not None and not dataclasses.is_dataclass(options):
        raise ValueError(f"register_model({name!r}): options must be a dataclass type")

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        """Record the entry; the builder itself is returned unchanged."""
        doc = (builder.__doc__ or "").strip().splitlines()
        MODELS[name] = ModelEntry(name, builder, input_kind, si_group, options,
                                  tuple(engines) if engines is not None else DEFAULT_ENGINES[input_kind],
                                  description or (doc[0] if doc else ""))
        return builder

    return wrap


def model_entry(name: str) -> ModelEntry:
    """The registered entry of model `name` (ConfigError listing the known names otherwise)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_names(input_kind: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally only those taking `input_kind` inputs."""
    if input_kind is not None and input_kind not in INPUT_KINDS:
        raise ConfigError(f"unknown input kind {input_kind!r}; choose one of: {', '.join(INPUT_KINDS)}")
    return sorted(n for n, e in MODELS.items() if input_kind in (None, e.input_kind))


def options_object(name: str, options: dict[str, Any]) -> Any:
    """`options` checked against model `name`'s options dataclass: an instance of it, or None."""
    entry = model_entry(name)
    if not isinstance(options, dict):
        raise ConfigError(f"model.options must be a table such as {{heads = 4}}; got {options!r}")
    if entry.options is None:
        if options:
            raise ConfigError(f"model {name} takes no options, but model.options sets "
                              f"{', '.join(sorted(options))}; remove them")
        return None
    hints = typing.get_type_hints(entry.options)
    known = [f.name for f in dataclasses.fields(entry.options)]
    for key in options:
        if key not in known:
            raise ConfigError(f"unknown model option {key!r} for {name}; known: {', '.join(known)}")
    # The dataclass's own checks (__post_init__) reject bad values, naming model.options.<field>.
    return entry.options(**{k: coerce(hints[k], v, f"model.options.{k}") for k, v in options.items()})


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Model `name`'s options from `options`, validated, as a full dict with defaults filled in."""
    obj = options_object(name, options)
    return {} if obj is None else dataclasses.asdict(obj)


def check_input_shape(entry: ModelEntry, input_shape: tuple[int, ...]) -> None:
    """ConfigError unless `input_shape` is of the model's input kind."""
    if len(input_shape) != INPUT_RANKS[entry.input_kind]:
        others = ", ".join(n for n in model_names() if MODELS[n].input_kind != entry.input_kind)
        raise ConfigError(f"{entry.name} needs {INPUT_KINDS[entry.input_kind]}, got shape "
                          f"{tuple(input_shape)}; use matching data or another model ({others})")


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int,
                seed: int) -> nn.Module:
    """Build model `cfg.name` with its weights drawn from `seed` (global RNG untouched)."""
    entry = model_entry(cfg.name)
    check_input_shape(entry, input_shape)
    # Options are checked before seeding: they draw nothing, so the weights depend on the seed only.
    options = options_object(cfg.name, cfg.options)
    extra = () if entry.options is None else (options,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.builder(cfg, tuple(input_shape), num_outputs, *extra)


def si_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's declared scale-invariant group."""
    if not hasattr(model, "si_parameters"):
        raise ConfigError(f"{type(model).__name__} does not declare si_parameters(); "
                          "add that method to train it on the sphere")
    return list(model.si_parameters())


def freeze_to_norm_(weight: nn.Parameter, norm: float) -> None:
    """Rescale a last-layer weight to Frobenius norm `norm` and freeze it."""
    with torch.no_grad():
        weight.mul_(norm / weight.norm())
    weight.requires_grad_(False)
