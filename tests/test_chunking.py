"""Chunkers: random token windows (seeded) and structural chunks, on a whitespace 'tokenizer'."""

from __future__ import annotations

import re

import pytest

from cartridges.chunking import (
    ChunkingConfig,
    chunk_corpus,
    coverage,
    random_windows,
    structural_chunks,
)


def encode(text: str) -> list[tuple[int, int]]:
    """One token per word, with its leading whitespace, as byte-level BPE tokenizers do."""
    return [m.span() for m in re.finditer(r"\s*\S+", text)]


def corpus(*texts: str) -> tuple[list[str], list[int], list[str]]:
    """``(doc_ids, n_tokens, texts)``, the first three arguments of ``chunk_corpus``."""
    return [f"doc{i}" for i in range(len(texts))], [len(encode(t)) for t in texts], list(texts)


def words(n: int, word: str = "w") -> str:
    return " ".join(f"{word}{i}" for i in range(n))


def test_random_windows_are_reproducible_and_in_range():
    documents = [("long", 5000), ("short", 10)]
    first = random_windows(documents, num_chunks=50, min_tokens=64, max_tokens=128, seed=3)
    assert first == random_windows(documents, 50, 64, 128, 3)
    assert first != random_windows(documents, 50, 64, 128, 4)
    for chunk in first:
        length = chunk.token_end - chunk.token_start
        if chunk.doc_id == "short":  # shorter than min_tokens: taken whole
            assert (chunk.token_start, chunk.token_end) == (0, 10)
        else:
            assert 64 <= length <= 128 and chunk.token_end <= 5000
    # Drawn in proportion to length: the 10-token document is rarely picked.
    assert sum(c.doc_id == "short" for c in first) <= 2


def test_token_windows_text_is_the_exact_span_and_only_drawn_documents_are_encoded():
    texts = [words(300, "a"), words(5, "b"), words(200, "c")]
    calls = []

    def counting_encode(text):
        calls.append(text)
        return encode(text)

    config = ChunkingConfig(num_chunks=6, min_tokens=20, max_tokens=40, seed=1)
    rows = chunk_corpus(*corpus(*texts), counting_encode, config)
    assert [r["chunk_id"] for r in rows] == [f"chunk-{i:06d}" for i in range(6)]
    drawn = {r["doc_id"] for r in rows}
    assert len(calls) == len(drawn)
    for row in rows:
        text = texts[int(row["doc_id"][3:])]
        offsets = encode(text)
        span = text[offsets[row["token_start"]][0] : offsets[row["token_end"] - 1][1]]
        assert row["text"] == span and row["n_tokens"] == len(encode(span))
    assert rows == chunk_corpus(*corpus(*texts), encode, config)


def test_description_line_is_prepended():
    config = ChunkingConfig(num_chunks=2, min_tokens=2, max_tokens=3, description="Pump manual.")
    rows = chunk_corpus(*corpus("one two three four"), encode, config)
    assert all(r["text"].startswith("Pump manual.\n\n") for r in rows)
    assert all(r["n_tokens"] <= 3 for r in rows)  # the description is not part of the span


def test_token_counts_must_match_the_tokenizer():
    with pytest.raises(ValueError, match="doc0 has 3 tokens under this tokenizer but n_tokens=7"):
        config = ChunkingConfig(min_tokens=1, max_tokens=2)
        chunk_corpus(["doc0"], [7], ["a b c"], encode, config)


def test_structural_chunks_follow_sections_and_paragraphs():
    text = (
        f"# Intro\n{words(10)}\n\n{words(10)}\n\n"
        f"## Usage\n{words(30)}\n\n"
        f"## Alarms\n{words(5)}\n\n{words(100)}\n\n{words(4)}"
    )
    offsets = encode(text)
    chunks = structural_chunks("d", text, offsets, min_tokens=10, max_tokens=40)
    pieces = [
        text[offsets[c.token_start][0] : offsets[c.token_end - 1][1]].lstrip() for c in chunks
    ]
    # Spans are contiguous and cover the document.
    assert chunks[0].token_start == 0 and chunks[-1].token_end == len(offsets)
    assert all(a.token_end == b.token_start for a, b in zip(chunks, chunks[1:], strict=False))
    assert all(c.token_end - c.token_start <= 40 for c in chunks)
    # Sections start chunks; a 100-word paragraph is cut into windows of max_tokens.
    assert pieces[0].startswith("# Intro") and pieces[1].startswith("## Usage")
    assert pieces[2].startswith("## Alarms")
    assert [c.token_end - c.token_start for c in chunks[3:]] == [40, 40, 24]
    assert [c.chunk_id for c in chunks[:2]] == ["d-0000", "d-0001"]


def test_structural_merges_small_sections_and_keeps_short_documents_whole():
    text = "# A\none two\n\n# B\nthree four\n\n\\section{C}\nfive six"
    offsets = encode(text)
    merged = structural_chunks("d", text, offsets, min_tokens=50, max_tokens=100)
    assert [(c.token_start, c.token_end) for c in merged] == [(0, len(offsets))]
    split = structural_chunks("d", text, offsets, min_tokens=2, max_tokens=100)
    starts = [text[offsets[c.token_start][0] :].lstrip()[:3] for c in split]
    assert starts == ["# A", "# B", "\\se"]


def test_structural_method_through_chunk_corpus():
    texts = [f"# One\n{words(8)}\n\n# Two\n{words(8)}", words(3)]
    config = ChunkingConfig(method="structural", min_tokens=5, max_tokens=12)
    rows = chunk_corpus(*corpus(*texts), encode, config)
    assert [(r["chunk_id"], r["n_tokens"]) for r in rows] == [
        ("doc0-0000", 10),
        ("doc0-0001", 10),
        ("doc1-0000", 3),
    ]
    assert rows[1]["text"].lstrip().startswith("# Two")


def test_config_is_checked():
    with pytest.raises(ValueError, match="method must be one of"):
        ChunkingConfig(method="sentences")
    with pytest.raises(ValueError, match="0 < min_tokens <= max_tokens"):
        ChunkingConfig(min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="num_chunks must be at least 1"):
        ChunkingConfig(num_chunks=0)


def test_the_first_pass_of_windows_covers_every_token_ends_included():
    """Uniformly placed windows rarely reach a document's ends; a pass of windows tiles it."""
    documents = [("a", 2223), ("b", 700), ("c", 90)]
    min_tokens, max_tokens = 256, 512
    one_pass = sum(-(-n // min_tokens) for _, n in documents)  # at most this many windows
    for seed in range(5):
        chunks = random_windows(documents, 64, min_tokens, max_tokens, seed)
        spans = [(c.doc_id, c.token_start, c.token_end) for c in chunks[:one_pass]]
        covered = coverage(documents, spans)
        assert covered.fraction == 1.0 and covered.uncovered == []
        for chunk in chunks:
            assert chunk.token_end - chunk.token_start <= max_tokens
            n = dict(documents)[chunk.doc_id]
            assert chunk.token_end - chunk.token_start >= min(min_tokens, n)


def test_coverage_merges_overlaps_and_names_the_gaps():
    documents = [("a", 100), ("b", 50), ("c", 10)]
    spans = [("a", 10, 40), ("a", 30, 60), ("a", 59, 61), ("b", 0, 50), ("a", 90, 120)]
    covered = coverage(documents, spans)
    assert covered.covered_tokens == 51 + 10 + 50  # a: 10-61 and 90-100; b whole; c none
    assert covered.total_tokens == 160
    assert covered.uncovered == [("a", 0, 10), ("a", 61, 90), ("c", 0, 10)]
    assert covered.describe_uncovered(limit=2) == "a tokens 0-10, a tokens 61-90 and 1 more ranges"


def test_a_chunk_set_that_misses_tokens_is_reported_with_the_ranges(caplog):
    import pandas as pd

    from cartridges.corpus_tables import chunk_coverage, report_coverage

    corpus_table = pd.DataFrame({"doc_id": ["a", "b"], "n_tokens": [100, 20]})
    chunk_set = pd.DataFrame({"doc_id": ["a"], "token_start": [0], "token_end": [80]})
    with caplog.at_level("INFO"):
        share = report_coverage(chunk_coverage(corpus_table, chunk_set), "Self-study's chunks")
    assert share == 80 / 120
    assert "cover 66.7% of the corpus's tokens (80 of 120)" in caplog.text
    assert "never in any chunk: a tokens 80-100, b tokens 0-20" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        report_coverage(chunk_coverage(corpus_table, chunk_set), "The chunks", min_share=0.5)
    assert "never in any chunk" not in caplog.text and "cover 66.7%" in caplog.text


def _long_text(paragraphs: int = 120) -> str:
    import random

    rng = random.Random(0)
    words = ["pump", "P2", "seal", "Mira", "Okafor's", "3.5", "bar", "(spare)", "café", "--"]
    lines = []
    for _ in range(paragraphs):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
        lines.append(sentence + rng.choice([".", "!", ":", ";"]) + rng.choice(["\n", "\n\n", "  "]))
    return "".join(lines) * 4


def _trained_tokenizer(text: str, kind: str):
    """A SentencePiece-style tokenizer (word starts marked, a space prepended to the text), or
    one without pre-tokenization, whose tokens may span spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize("kind", ["byte_level", "metaspace", "across_spaces"])
def test_a_long_text_is_tokenised_in_pieces_with_the_tokens_of_the_whole(tiny, kind, monkeypatch):
    """One 50 MB document was encoded whole: gigabytes of encoding for one table row."""
    from cartridges import corpus_tables

    text = _long_text()
    tokenizer = tiny[1] if kind == "byte_level" else _trained_tokenizer(text, kind)
    whole = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    monkeypatch.setattr(corpus_tables, "PIECE_CHARS", 2_000)
    longest = []
    backend = tokenizer.backend_tokenizer

    class Watched:  # records the longest text any encode call sees
        def __getattr__(self, name):
            method = getattr(backend, name)

            def call(texts, *args, **kwargs):
                longest.append(max(map(len, texts)) if isinstance(texts, list) else len(texts))
                return method(texts, *args, **kwargs)

            return call

    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: Watched()))
    assert corpus_tables.token_counter(tokenizer)(text) == len(whole.ids)
    offsets = corpus_tables.offsets_encoder(tokenizer)(text)
    assert list(offsets) == whole.offsets
    assert [offsets[i] for i in (0, 1234, len(whole) - 1)] == [
        whole.offsets[i] for i in (0, 1234, len(whole) - 1)
    ]
    assert len(text) > 20 * 2_000 and max(longest) < 2 * 2_000 + 600  # never the whole text
