"""Loading typed configs: TOML presets and files, `--set` overrides, type checks, the kind table.

A preset is a TOML file in `lrfeatures/presets/`; `load_config` reads a preset name or a
path, applies `--set a.b=value` overrides and checks every field. Unknown fields are errors.
Every experiment kind's config class is registered here (config/__init__.py), so a store's
config.toml loads whatever else was imported.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from ..errors import ConfigError


CONFIG_KINDS: dict[str, type] = {}


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
    migrate_vit_section(data)
    migrate_bf16_flag(data)
    cfg = from_dict(CONFIG_KINDS[kind], data)
    cfg.validate()
    return cfg


def migrate_vit_section(data: dict[str, Any]) -> None:
    """Move a 0.1 store's top-level [vit] section into model.options (the ViT's own options now)."""
    vit = data.pop("vit", None)
    if vit is None:
        return
    model = data.setdefault("model", {})
    if isinstance(model, dict) and str(model.get("name", "")) in ("vit", "vit-si"):
        model["options"] = {**vit, **model.get("options", {})}


def migrate_bf16_flag(data: dict[str, Any]) -> None:
    """Turn a 0.2 image store's engine.bf16 flag into engine.precision."""
    engine = data.get("engine")
    if data.get("kind") == "images" and isinstance(engine, dict) and "bf16" in engine:
        flag = engine.pop("bf16")
        engine.setdefault("precision", "bf16" if flag is True else "fp32")


def dump_toml(cfg: Any) -> str:
    """The config as TOML text."""
    return tomli_w.dumps(to_dict(cfg))
