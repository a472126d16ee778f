"""Nodes of document_prep: a folder of documents -> ``corpus`` and ``chunk_set`` tables."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from cartridges.chunking import random_windows
from cartridges.corpus import load_corpus
from cartridges.modeling import load_tokenizer

logger = logging.getLogger(__name__)


def load_documents(
    params: dict[str, Any], model: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the corpus directory into one row per document and one row per skipped input.

    Args:
        params: ``document_prep`` parameters (``corpus_dir``, ``include``, ``exclude``, ``strict``).
        model: the shared ``model`` parameters; token counts use its tokenizer.

    Returns:
        ``corpus`` (doc_id, source, title, text, sha256, n_chars, n_tokens) and
        ``skipped_documents`` (source, reason).
    """
    documents, skipped = load_corpus(
        params["corpus_dir"],
        params["include"],
        params.get("exclude", []),
        params.get("strict", False),
    )
    tokenizer = load_tokenizer(model["name_or_path"])
    corpus = pd.DataFrame([vars(d) for d in documents])
    corpus["n_chars"] = corpus["text"].str.len()
    corpus["n_tokens"] = [len(ids) for ids in tokenizer(list(corpus["text"]))["input_ids"]]
    logger.info(
        "Corpus: %d documents, %d tokens, %d skipped",
        len(corpus),
        corpus["n_tokens"].sum(),
        len(skipped),
    )
    return corpus, pd.DataFrame([vars(s) for s in skipped], columns=["source", "reason"])


def chunk_documents(
    corpus: pd.DataFrame, params: dict[str, Any], model: dict[str, Any]
) -> pd.DataFrame:
    """Draw random token windows from the corpus, each optionally led by a corpus description.

    Returns:
        ``chunk_set``: chunk_id, doc_id, token_start, token_end, n_tokens, text.
    """
    tokenizer = load_tokenizer(model["name_or_path"])
    token_ids = {
        row.doc_id: tokenizer(row.text, add_special_tokens=False)["input_ids"]
        for row in corpus.itertuples()
    }
    settings = params["chunking"]
    chunks = random_windows(
        [(doc_id, len(ids)) for doc_id, ids in token_ids.items()],
        num_chunks=settings["num_chunks"],
        min_tokens=settings["min_tokens"],
        max_tokens=settings["max_tokens"],
        seed=settings["seed"],
    )
    description = settings.get("description") or ""
    rows = []
    for chunk in chunks:
        text = tokenizer.decode(token_ids[chunk.doc_id][chunk.token_start : chunk.token_end])
        rows.append(
            {
                **vars(chunk),
                "n_tokens": chunk.token_end - chunk.token_start,
                "text": f"{description}\n\n{text}" if description else text,
            }
        )
    return pd.DataFrame(rows)
