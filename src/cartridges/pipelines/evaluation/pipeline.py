"""evaluation: corpus + cartridges + questions + held-out conversations -> report and plots."""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.evaluation.nodes import evaluate_methods, plot_tradeoff


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate_methods,
                inputs=[
                    "corpus",
                    "questions",
                    "cartridge",
                    "cartridge_history",
                    "cartridge_sweep",
                    "document_cartridges",
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
                outputs=["tradeoff_plot", "tradeoff_plot_svg"],
                name="plot_tradeoff_node",
            ),
        ]
    )
