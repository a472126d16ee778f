"""Project pipelines: document_prep -> self_study -> distill_training -> evaluation."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

DATA_FLOW = ("document_prep", "self_study", "distill_training", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register every pipeline; ``__default__`` runs the four stages in data-flow order."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum((pipelines[name] for name in DATA_FLOW), Pipeline([]))
    return pipelines
