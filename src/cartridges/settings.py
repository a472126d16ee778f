"""Kedro settings for the project."""

import os

from kedro.config import OmegaConfigLoader

from cartridges.logs import quiet_known_warnings

quiet_known_warnings()  # before the imports below, which raise some of them

from cartridges.hooks import (  # noqa: E402
    LineageHook,
    OutputsTogetherHook,
    RankZeroOutputsHook,
    process_rank,
)
from cartridges.params import ParametersHook  # noqa: E402

# Telemetry is off for the project: it must run offline and never phone home.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

# ParametersHook checks a run's parameters before its first node (and before any model loads).
HOOKS = (ParametersHook(), RankZeroOutputsHook(), LineageHook(), OutputsTogetherHook())
# Under torchrun only rank 0 tracks the run in MLflow; the other ranks would open runs of their own.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow",) if process_rank() > 0 else ()

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # kedro-mlflow reads mlflow.yml through the config loader.
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    # An environment (conf/llm, conf/local) overrides single nested parameters, not whole blocks.
    "merge_strategy": {"parameters": "soft"},
    "custom_resolvers": {"env": lambda name, default="": os.environ.get(name, default)},
}
