"""document_prep: raw documents -> corpus -> chunk_set, with a statistics report."""

from kedro.pipeline import Node, Pipeline

from cartridges.pipelines.document_prep.nodes import (
    chunk_documents,
    load_documents,
    summarise_corpus,
)


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
            Node(
                summarise_corpus,
                inputs=["corpus", "skipped_documents", "chunk_set"],
                outputs=["corpus_statistics", "document_prep_metrics"],
                name="summarise_corpus_node",
            ),
        ]
    )
