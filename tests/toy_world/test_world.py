"""World generator: deterministic, consistent, with held-out phrasings distinct from self-study."""

from __future__ import annotations

import json
import random

from cartridges.toy_world import conversations, example_corpus, language, registry


def test_vocabulary_sizes():
    assert len(set(language.NAMES)) == len(language.NAMES) == 128
    assert len(set(language.ITEMS)) == len(language.ITEMS) == 64


def test_registries_are_deterministic():
    a = registry.make_registry(random.Random(7), 20)
    b = registry.make_registry(random.Random(7), 20)
    assert a == b and a.text == b.text
    assert len({n for n, _ in a.facts}) == 20
    assert example_corpus.example_registries(seed=3) == example_corpus.example_registries(seed=3)


def test_conversations_are_deterministic():
    assert conversations.sample_conversation(
        random.Random(5), 8, 6
    ) == conversations.sample_conversation(random.Random(5), 8, 6)


def test_heldout_templates_are_never_written_in_self_study():
    rng = random.Random(0)
    doc = registry.make_registry(rng, 16)
    heldout_forms = {t.format(name="{}") for t in language.HELDOUT_TEMPLATES}
    for _ in range(300):
        st = rng.choice(language.SEED_TYPES)
        msg = conversations.seed_reply(doc, st, rng)
        form = " ".join("{}" if w in dict(doc.facts) else w for w in msg.split())
        assert form not in heldout_forms
    assert len(language.HELDOUT_TEMPLATES) >= 1 and len(language.ASK_TEMPLATES) >= 1
    assert not set(language.HELDOUT_TEMPLATES) & set(language.ASK_TEMPLATES)


def test_seed_prompts_cover_all_types():
    assert set(language.SEED_PROMPTS) == set(language.SEED_TYPES)
    assert {"question", "structuring", "summarization", "use_case", "creative", "generic"} == set(
        language.SEED_TYPES
    )


def test_assistant_replies():
    doc = registry.make_registry(random.Random(1), 5)
    (n1, i1), (n2, i2) = doc.facts[:2]
    for tpl in language.ASK_TEMPLATES + language.HELDOUT_TEMPLATES + language.USE_CASE_TEMPLATES:
        assert conversations.assistant_reply(doc, registry.question(n1, tpl)) == f"{n1} owns {i1}"
    assert (
        conversations.assistant_reply(doc, f"name {n1} item fig")
        == f"the record says {n1} owns {i1}"
    )
    two = language.STATEMENT_TEMPLATES["summarization"].format(
        name=n1, item="x", name2=n2, item2="y"
    )
    assert (
        conversations.assistant_reply(doc, two)
        == f"the records say {n1} owns {i1} and {n2} owns {i2}"
    )


def test_write_example_corpus(tmp_path):
    docs = example_corpus.write_example_corpus(
        tmp_path / "corpus", tmp_path / "questions.jsonl", n_docs=3, n_facts=10, seed=0
    )
    files = sorted((tmp_path / "corpus").glob("*.txt"))
    assert [f.stem for f in files] == [d.doc_id for d in docs]
    rows = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    names = [n for d in docs for n, _ in d.facts]
    assert len(set(names)) == len(names)  # one consistent registry across files
    by_id = {d.doc_id: d for d in docs}
    for row in rows:
        assert set(row) >= {"question", "answer", "document"}
        doc = by_id[row["document"]]
        assert row["answer"] == conversations.assistant_reply(doc, row["question"])
        assert row["question"] == registry.question(row["name"], language.HELDOUT_TEMPLATES[0])
