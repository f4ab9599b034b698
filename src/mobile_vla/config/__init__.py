"""Configuration: dataclasses, YAML files with ``parent:`` inheritance, dotted overrides.

Every key that exists has an effect; unknown keys are refused with the closest valid key
suggested; values are type-checked and range-checked where they enter, with the key named.

    cfg = load_config("configs/builtin_frozen.yaml", ["data.window_size=4", "--seed=3"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

from mobile_vla.config.loading import (
    config_to_yaml,
    from_dict,
    load_config,
    parse_override,
    read_yaml_tree,
    save_config,
    to_dict,
    unknown_key_error,
)
from mobile_vla.config.schema import (
    ACTION_NAMES,
    CHANNEL_ORDERS,
    DEFAULT_INSTRUCTION_TEMPLATE,
    DISTANCES,
    LAYOUTS,
    SIDES,
    TARGETS,
    AugmentConfig,
    BackboneConfig,
    BuiltinConfig,
    Config,
    DataConfig,
    HeadConfig,
    ResamplerConfig,
    SimConfig,
    TrainerConfig,
    TrainSetup,
    bad_value,
)
from mobile_vla.config.strategies import (
    ALL_PARTS_OFF,
    ALL_PARTS_ON,
    STRATEGIES,
    STRATEGY_FLAGS,
    STRATEGY_PRESETS,
)

__all__ = [
    "ACTION_NAMES",
    "ALL_PARTS_OFF",
    "ALL_PARTS_ON",
    "CHANNEL_ORDERS",
    "DEFAULT_INSTRUCTION_TEMPLATE",
    "DISTANCES",
    "LAYOUTS",
    "SIDES",
    "STRATEGIES",
    "STRATEGY_FLAGS",
    "STRATEGY_PRESETS",
    "TARGETS",
    "AugmentConfig",
    "BackboneConfig",
    "BuiltinConfig",
    "Config",
    "DataConfig",
    "HeadConfig",
    "ResamplerConfig",
    "SimConfig",
    "TrainSetup",
    "TrainerConfig",
    "bad_value",
    "config_to_yaml",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml_tree",
    "save_config",
    "to_dict",
    "unknown_key_error",
]
