"""toy_world: pretrain the embedded model (run on demand: kedro run --pipelines toy_world)."""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.toy_world.nodes import pretrain_toy_world


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                pretrain_toy_world,
                inputs="params:toy_world",
                outputs=["toy_world_model", "toy_world_metrics"],
                name="pretrain_toy_world_node",
            )
        ]
    )
