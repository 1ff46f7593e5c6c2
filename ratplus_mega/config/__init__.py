from .load import CONFIG_ROOT, ConfigLoadError, dump_config, load_config
from .schema import ConfigError, DataConfig, ModelConfig, ParallelConfig, PatternConfig, RunConfig, TrainConfig

__all__ = [
    "CONFIG_ROOT", "ConfigError", "ConfigLoadError", "DataConfig", "ModelConfig", "ParallelConfig",
    "PatternConfig", "RunConfig", "TrainConfig", "dump_config", "load_config",
]
