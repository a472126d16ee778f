"""lora_baseline: cartridge (for its size) + conversations + targets -> a LoRA adapter."""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.lora_baseline.nodes import train_lora_baseline


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_lora_baseline,
                inputs=[
                    "corpus",
                    "questions",
                    "cartridge",
                    "chunk_set",
                    "conversations",
                    "teacher_logprobs",
                    "params:distill_training",
                    "params:lora_baseline",
                    "params:evaluation",
                    "params:model",
                    "params:system_prompt",
                ],
                outputs=["lora_baseline", "lora_baseline_report"],
                name="train_lora_baseline_node",
            )
        ]
    )
