"""The distill_training pipeline."""

from cartridges.pipelines.distill_training.pipeline import create_pipeline

__all__ = ["create_pipeline"]
