"""The toy world's example corpus on disk: registry documents and their held-out questions.

This is what the project's default configuration reads (``data/01_raw``): a few registries written
as ``<doc_id>.txt`` files, and a JSONL of questions with their exact answers for evaluation. Run
``python -m cartridges.toy_world.example_corpus`` to write it.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from cartridges.files import atomic_write
from cartridges.toy_world.language import HELDOUT_TEMPLATES, TOWN_SIZE, TOWNS
from cartridges.toy_world.registry import Registry, heldout_questions, make_registry

logger = logging.getLogger(__name__)


def example_registries(n_docs: int = 4, n_facts: int = 32, seed: int = 0) -> list[Registry]:
    """One document per town (so together they form one consistent registry: no name twice)."""
    if n_docs > len(TOWNS) or n_facts > TOWN_SIZE:
        raise ValueError(f"at most {len(TOWNS)} documents of at most {TOWN_SIZE} records")
    rng = random.Random(seed)
    return [make_registry(rng, n_facts, doc_id=f"town_{k}", town=k) for k in range(n_docs)]


def write_example_corpus(
    corpus_dir: str | Path,
    questions_path: str | Path,
    n_docs: int = 4,
    n_facts: int = 32,
    seed: int = 0,
    template: str = HELDOUT_TEMPLATES[0],
) -> list[Registry]:
    """Write ``<doc_id>.txt`` documents and a held-out questions JSONL (one question per fact).

    Each JSONL row: ``question``, ``answer`` (the exact full expected reply, e.g.
    ``ada owns plum``), ``document`` (the document's file stem), plus ``name``/``item`` for
    lenient scoring. Each file is written atomically.
    """
    corpus_dir, questions_path = Path(corpus_dir), Path(questions_path)
    docs = example_registries(n_docs, n_facts, seed)
    rng = random.Random(seed + 1)
    rows = []
    for doc in docs:
        with atomic_write(corpus_dir / f"{doc.doc_id}.txt") as temporary:
            temporary.write_text(doc.text + "\n", encoding="utf-8")
        for qa in heldout_questions(doc, rng, n=None, template=template):
            rows.append(
                {
                    "question": qa.question,
                    "answer": qa.answer,
                    "document": qa.doc_id,
                    "name": qa.name,
                    "item": qa.item,
                }
            )
    with atomic_write(questions_path) as temporary:
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    logger.info(
        "wrote %d documents to %s and %d questions to %s",
        len(docs),
        corpus_dir,
        len(rows),
        questions_path,
    )
    return docs


def main() -> None:
    """Write the example corpus and its held-out questions (the project's default inputs)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--corpus-dir", default="data/01_raw/corpus", help="where documents go")
    parser.add_argument("--questions", default="data/01_raw/questions.jsonl", help="JSONL output")
    parser.add_argument("--docs", type=int, default=1, help="number of documents")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the generated world")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    write_example_corpus(args.corpus_dir, args.questions, n_docs=args.docs, seed=args.seed)


if __name__ == "__main__":
    main()
