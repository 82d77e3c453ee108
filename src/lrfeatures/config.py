"""Typed experiment configs: plain dataclasses, loaded from TOML, validated at the edge.

A preset is a TOML file in `lrfeatures/presets/`; `load_config` reads a preset name or a
path, applies `--set a.b=value` overrides and checks every field. Unknown fields are errors.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from .errors import ConfigError


@dataclass
class SyntheticDataConfig:
    """The 2-D feature data set of SPEC §3."""

    shape: str = "tick"
    n_features: int = 16
    n_train: int = 512
    n_test: int = 2000
    n_probe: int = 1000
    margin: float = 0.1
    informative_prob: float = 1.0
    label_noise: float = 0.0


@dataclass
class ModelConfig:
    """Which network to build; fields a model does not use are ignored by it."""

    name: str = "mlp-si"
    width: int = 32
    depth: int = 2
    activation: str = "relu"
    last_layer_norm: float = 10.0
    norm_eps: float = 1e-7


@dataclass
class SphereConfig:
    """Training on the sphere: the joint norm rho of the SI group and the step rule."""

    rho: float = 1.0
    step: str = "projected"  # "projected" or "riemannian"


@dataclass
class PretrainConfig:
    """Pre-training over a grid of effective learning rates (PLRs)."""

    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    iterations: int = 1000
    batch_size: int = 16
    ckpt_every: int = 100
    log_every: int = 100
    keep_checkpoints: int = 0  # 0: keep as many as the largest SWA K needs


@dataclass
class FinetuneConfig:
    """Fine-tuning every PLR's final weights over a grid of FLRs."""

    lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3])
    iterations: int = 500
    log_every: int = 100


@dataclass
class SWAConfig:
    """Stochastic weight averaging of the last K pre-training checkpoints."""

    ks: list[int] = field(default_factory=lambda: [2, 5])


@dataclass
class SeedsConfig:
    """Data seeds (one data set each) and training seeds (init and batch order)."""

    data: list[int] = field(default_factory=lambda: [0])
    train: list[int] = field(default_factory=lambda: [0])


@dataclass
class EngineConfig:
    """How to run the grid: engine, device and memory budget."""

    name: str = "grid"  # "grid" or "reference"
    device: str = "cpu"
    memory_budget_gb: float = 4.0
    train_seeds_per_shard: int = 0  # 0: all training seeds of a data seed in one shard
    compile: bool = False  # torch.compile the grid step (~2x on CPU; a few seconds to compile)
    native: bool = True  # SI MLPs on CPU: the compiled C kernel (engine/native.py), ~5x the torch kernels


@dataclass
class SyntheticConfig:
    """A full synthetic experiment: pretrain -> finetune -> SWA -> feature importance."""

    kind: str = "synthetic"
    name: str = "synthetic"
    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sphere: SphereConfig = field(default_factory=SphereConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and how to fix it."""
        check_lrs("pretrain.lrs", self.pretrain.lrs)
        check_lrs("finetune.lrs", self.finetune.lrs, allow_empty=True)
        for name in ("pretrain.iterations", "pretrain.batch_size", "pretrain.ckpt_every",
                     "pretrain.log_every", "finetune.iterations", "finetune.log_every",
                     "data.n_features", "data.n_train", "data.n_test", "data.n_probe",
                     "model.width", "model.depth"):
            check_positive(name, get_field(self, name))
        if self.pretrain.batch_size > self.data.n_train:
            raise ConfigError(f"pretrain.batch_size={self.pretrain.batch_size} exceeds data.n_train="
                              f"{self.data.n_train}; lower the batch size or add training samples")
        if self.sphere.step not in ("projected", "riemannian"):
            raise ConfigError(f"sphere.step={self.sphere.step!r} is unknown; use 'projected' or 'riemannian'")
        check_positive("sphere.rho", self.sphere.rho)
        if not 0.0 <= self.data.label_noise < 0.5:
            raise ConfigError(f"data.label_noise={self.data.label_noise} must be in [0, 0.5)")
        if not 0.0 <= self.data.informative_prob <= 1.0:
            raise ConfigError(f"data.informative_prob={self.data.informative_prob} must be in [0, 1]")
        if self.data.margin < 0:
            raise ConfigError(f"data.margin={self.data.margin} must be >= 0")
        if not self.seeds.data or not self.seeds.train:
            raise ConfigError("seeds.data and seeds.train must each list at least one seed")
        for name in ("seeds.data", "seeds.train", "pretrain.lrs", "finetune.lrs", "swa.ks"):
            values = get_field(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} has repeated values {values}; list each once")
        n_ckpts = self.pretrain.iterations // self.pretrain.ckpt_every
        for k in self.swa.ks:
            if not 1 <= k <= n_ckpts:
                raise ConfigError(f"swa.ks holds {k} but pre-training saves only {n_ckpts} checkpoints; "
                                  f"use K in 1..{n_ckpts} or more iterations")
        if self.engine.name not in ("grid", "reference"):
            raise ConfigError(f"engine.name={self.engine.name!r} is unknown; use 'grid' or 'reference'")
        check_positive("engine.memory_budget_gb", self.engine.memory_budget_gb)
        if self.engine.train_seeds_per_shard < 0:
            raise ConfigError("engine.train_seeds_per_shard must be >= 0 (0 = all seeds in one shard)")

    @property
    def checkpoints_kept(self) -> int:
        """How many of the most recent pre-training checkpoints are stored per model."""
        return self.pretrain.keep_checkpoints or max(self.swa.ks, default=1)


CONFIG_KINDS: dict[str, type] = {"synthetic": SyntheticConfig}


def register_config_kind(kind: str, cls: type) -> None:
    """Make `kind = "<kind>"` in a TOML file load as `cls`."""
    CONFIG_KINDS[kind] = cls


def check_lrs(name: str, lrs: list[float], allow_empty: bool = False) -> None:
    """Learning rates must be finite and > 0; a grid must not be empty."""
    if not lrs and not allow_empty:
        raise ConfigError(f"{name} is empty; give at least one learning rate, e.g. --set {name}=[0.01]")
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"{name} holds {lr!r}; every learning rate must be a finite number > 0")


def check_positive(name: str, value: float) -> None:
    """A count or scale must be finite and > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={value!r} must be > 0")


def get_field(cfg: Any, dotted: str) -> Any:
    """cfg.a.b for dotted='a.b'."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown fields and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config field {path!r}{hint}")
        kwargs[key] = coerce(hints[key], value, path)
    return cls(**kwargs)


def coerce(hint: Any, value: Any, path: str) -> Any:
    """Check `value` against a type hint, converting ints to floats where a float is expected."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, e.g. [1, 2]; got {value!r}")
        return [coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return coerce(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}={value!r} has the wrong type")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path} must be empty")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number; got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be a whole number; got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false; got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string; got {value!r}")
        return value
    if hint is Any or hint is dict or origin is dict:
        return value
    raise ConfigError(f"{path}: unsupported field type {hint}")  # pragma: no cover


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested data (what gets written to config.toml)."""
    return dataclasses.asdict(cfg)


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("lrfeatures.presets").iterdir()
                  if p.name.endswith(".toml"))


def read_toml(source: str) -> dict[str, Any]:
    """Read a preset by name (e.g. 'synthetic-quick') or a TOML file by path."""
    path = Path(source)
    if source.endswith(".toml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {source!r} does not exist; give a preset name "
                              f"({', '.join(preset_names())}) or a path to a .toml file")
        text = path.read_text()
    else:
        preset = resources.files("lrfeatures.presets") / f"{source}.toml"
        if not preset.is_file():
            raise ConfigError(f"unknown preset {source!r}; choose one of: {', '.join(preset_names())}")
        text = preset.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: invalid TOML ({err}); fix the file's syntax") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse 'a.b=value', where value is a TOML literal (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty field name")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override in a nested dict (validation happens later, in from_dict)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return data


def load_config(source: str | dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                kind: str | None = None) -> Any:
    """Load, override and validate a config from a preset name, a TOML path or a dict."""
    data = dict(source) if isinstance(source, dict) else read_toml(source)
    data = apply_overrides(data, list(overrides))
    kind = data.get("kind", kind or "synthetic")
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown experiment kind {kind!r}; choose one of: {', '.join(CONFIG_KINDS)}")
    data["kind"] = kind
    cfg = from_dict(CONFIG_KINDS[kind], data)
    cfg.validate()
    return cfg


def dump_toml(cfg: Any) -> str:
    """The config as TOML text."""
    return tomli_w.dumps(to_dict(cfg))
