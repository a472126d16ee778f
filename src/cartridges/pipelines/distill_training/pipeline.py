"""distill_training: conversations + teacher_logprobs (+ corpus for init) -> cartridge, the size
sweep and (optionally) one cartridge per document."""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.distill_training.nodes import (
    distill_cartridge,
    distill_cartridge_sweep,
    distill_document_cartridges,
    initialize_cartridge,
)

# What every training node reads: self-study's output, then the parameter blocks it checks.
TRAINING_DATA = ["chunk_set", "conversations", "teacher_logprobs"]
SETTINGS = ["params:distill_training", "params:model", "params:system_prompt"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                initialize_cartridge,
                inputs=["corpus", *SETTINGS],
                outputs="initial_cartridge",
                name="initialize_cartridge_node",
            ),
            Node(
                distill_cartridge,
                inputs=["initial_cartridge", *TRAINING_DATA, *SETTINGS],
                outputs=["cartridge", "training_metrics"],
                name="distill_cartridge_node",
            ),
            Node(
                distill_cartridge_sweep,
                inputs=["corpus", *TRAINING_DATA, *SETTINGS],
                outputs="cartridge_sweep",
                name="distill_cartridge_sweep_node",
            ),
            Node(
                distill_document_cartridges,
                inputs=["corpus", *TRAINING_DATA, *SETTINGS],
                outputs="document_cartridges",
                name="distill_document_cartridges_node",
            ),
        ]
    )
