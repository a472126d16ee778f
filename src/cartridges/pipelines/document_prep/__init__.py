"""The document_prep pipeline."""

from cartridges.pipelines.document_prep.pipeline import create_pipeline

__all__ = ["create_pipeline"]
