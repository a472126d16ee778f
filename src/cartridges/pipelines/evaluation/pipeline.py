"""evaluation: corpus + cartridges + questions + held-out conversations -> report and plot.

The questions file is a parameter (``evaluation.questions_path``), read by the node's own loader
so that a malformed line is reported with its number.
"""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.evaluation.nodes import evaluate_methods, plot_tradeoff


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate_methods,
                inputs=[
                    "corpus",
                    "cartridge",
                    "cartridge_sweep",
                    "conversations",
                    "teacher_logprobs",
                    "params:evaluation",
                    "params:model",
                    "params:system_prompt",
                ],
                outputs=["evaluation_report", "evaluation_metrics"],
                name="evaluate_methods_node",
            ),
            Node(
                plot_tradeoff,
                inputs="evaluation_report",
                outputs="tradeoff_plot",
                name="plot_tradeoff_node",
            ),
        ]
    )
