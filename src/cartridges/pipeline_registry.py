"""Project pipelines: document_prep -> self_study -> distill_training -> evaluation."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

DATA_FLOW = ("document_prep", "self_study", "distill_training", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register every pipeline; ``__default__`` runs the four stages in data-flow order.

    ``kedro run --pipeline X`` makes Kedro import only ``X``, so ``__default__`` is built from
    the stages that were found.
    """
    pipelines = find_pipelines(raise_errors=True)
    found = [pipelines[name] for name in DATA_FLOW if name in pipelines]
    pipelines["__default__"] = sum(found, Pipeline([]))
    return pipelines
