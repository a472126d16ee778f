"""The toy_world pipeline: pretrain the embedded toy-world model."""

from cartridges.pipelines.toy_world.pipeline import create_pipeline

__all__ = ["create_pipeline"]
