"""Cut tokenised documents into the chunks that self-study conversations are about."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    token_start: int
    token_end: int


def random_windows(
    documents: Sequence[tuple[str, int]],
    num_chunks: int,
    min_tokens: int,
    max_tokens: int,
    seed: int,
) -> list[Chunk]:
    """Random token windows of ``min_tokens..max_tokens``, documents drawn by their length.

    A document shorter than ``min_tokens`` is always taken whole. The same inputs and seed give
    the same chunks.

    Args:
        documents: ``(doc_id, n_tokens)`` pairs.
        num_chunks: how many windows to draw.
        min_tokens: shortest window.
        max_tokens: longest window.
        seed: random seed.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"Need 0 < min_tokens <= max_tokens, got {min_tokens} and {max_tokens}.")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
    documents = [(doc_id, n) for doc_id, n in documents if n > 0]
    if not documents:
        raise ValueError("No document has any token to chunk.")
    rng = random.Random(seed)
    weights = [n for _, n in documents]
    chunks = []
    for index in range(num_chunks):
        doc_id, n_tokens = rng.choices(documents, weights=weights)[0]
        length = min(n_tokens, rng.randint(min_tokens, max_tokens))
        start = rng.randint(0, n_tokens - length)
        chunks.append(Chunk(f"chunk-{index:06d}", doc_id, start, start + length))
    return chunks
