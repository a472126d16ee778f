"""Nodes of document_prep: documents -> ``corpus`` -> ``chunk_set`` -> ``corpus_statistics``.

Each node validates its parameter blocks and calls ``cartridges.corpus_tables``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cartridges.corpus_tables import chunk_table, corpus_table, summarise
from cartridges.modeling import load_tokenizer
from cartridges.params import DocumentPrepParams, ModelParams, parse


def load_documents(
    params: DocumentPrepParams | dict[str, Any], model: ModelParams | dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the corpus folder, extra paths and URLs into one row per document.

    Args:
        params: ``document_prep`` parameters (see ``CorpusConfig``).
        model: the shared ``model`` parameters; token counts use its tokenizer.

    Returns:
        ``corpus`` (one row per document, ``CORPUS_COLUMNS``) and ``skipped_documents``
        (source, reason), so that every input is accounted for.
    """
    params, model = parse("document_prep", params), parse("model", model)
    return corpus_table(params.corpus, load_tokenizer(model.name_or_path))


def chunk_documents(
    corpus: pd.DataFrame,
    params: DocumentPrepParams | dict[str, Any],
    model: ModelParams | dict[str, Any],
) -> pd.DataFrame:
    """Cut the corpus into chunks by ``chunking.method`` (token windows or structural).

    Returns:
        ``chunk_set``: ``CHUNK_COLUMNS``, one row per chunk.
    """
    params, model = parse("document_prep", params), parse("model", model)
    return chunk_table(corpus, load_tokenizer(model.name_or_path), params.chunking)


def summarise_corpus(
    corpus: pd.DataFrame, skipped_documents: pd.DataFrame, chunk_set: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Describe the corpus and its chunks.

    Returns:
        ``corpus_statistics`` (a JSON report) and ``document_prep_metrics`` (kedro-mlflow's
        ``{"value", "step"}`` format: counts, totals and token-length percentiles; the catalog
        entry's prefix names them ``document_prep.<name>`` in MLflow).
    """
    report, numbers = summarise(corpus, skipped_documents, chunk_set)
    return report, {name: {"value": value, "step": 0} for name, value in numbers.items()}
