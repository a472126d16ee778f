"""document_prep: raw documents -> corpus -> chunk_set."""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.document_prep.nodes import chunk_documents, load_documents


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                load_documents,
                inputs=["params:document_prep", "params:model"],
                outputs=["corpus", "skipped_documents"],
                name="load_documents_node",
            ),
            Node(
                chunk_documents,
                inputs=["corpus", "params:document_prep", "params:model"],
                outputs="chunk_set",
                name="chunk_documents_node",
            ),
        ]
    )
