"""Kedro settings for the project."""

import os

from kedro.config import OmegaConfigLoader

# Telemetry is off for the project: it must run offline and never phone home.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # kedro-mlflow reads mlflow.yml through the config loader.
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    "custom_resolvers": {"env": lambda name, default="": os.environ.get(name, default)},
}
