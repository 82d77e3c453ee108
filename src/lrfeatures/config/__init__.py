"""Typed experiment configs: plain dataclasses, loaded from TOML, validated at the edge.

base.py loads and type-checks; sections.py holds what every kind shares; synthetic.py and
images.py are the two kinds' configs. Both kinds are registered on import, so any config.toml
loads whatever else was imported.
"""

from .base import (CONFIG_KINDS, apply_overrides, check_lrs, check_positive, coerce, dump_toml, from_dict,
                   get_field, load_config, parse_override, preset_names, read_toml, register_config_kind, to_dict)
from .images import (ImageAnalysisConfig, ImageConfig, ImageDataConfig, ImageEngineConfig, ImageFinetuneConfig,
                     ImageOptimizerConfig, ImagePretrainConfig)
from .sections import CurvatureConfig, ModelConfig, SeedsConfig, SphereConfig, SWAConfig, check_curvature, check_shared
from .synthetic import (EngineConfig, FinetuneConfig, PretrainConfig, PretrainStage, SyntheticConfig,
                        SyntheticDataConfig)

register_config_kind("synthetic", SyntheticConfig)
register_config_kind("images", ImageConfig)

__all__ = [
    "CONFIG_KINDS", "CurvatureConfig", "EngineConfig", "FinetuneConfig", "ImageAnalysisConfig", "ImageConfig", "ImageDataConfig",
    "ImageEngineConfig", "ImageFinetuneConfig", "ImageOptimizerConfig", "ImagePretrainConfig", "ModelConfig",
    "PretrainConfig", "PretrainStage", "SWAConfig", "SeedsConfig", "SphereConfig", "SyntheticConfig", "SyntheticDataConfig",
    "apply_overrides", "check_curvature", "check_lrs", "check_positive", "check_shared", "coerce", "dump_toml", "from_dict",
    "get_field", "load_config", "parse_override", "preset_names", "read_toml", "register_config_kind", "to_dict",
]
