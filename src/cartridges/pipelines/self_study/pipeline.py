"""self_study: chunk_set -> conversations + teacher_logprobs."""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.self_study.nodes import synthesize_conversations


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                synthesize_conversations,
                inputs=[
                    "corpus",
                    "chunk_set",
                    "params:self_study",
                    "params:model",
                    "params:system_prompt",
                ],
                outputs=["conversations", "teacher_logprobs", "self_study_metrics"],
                name="synthesize_conversations_node",
            )
        ]
    )
