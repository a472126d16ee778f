"""The self_study pipeline."""

from cartridges.pipelines.self_study.pipeline import create_pipeline

__all__ = ["create_pipeline"]
