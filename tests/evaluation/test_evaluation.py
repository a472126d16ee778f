"""The evaluation library on the tiny model: exactness, KV bytes, tasks and bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cartridges.cartridge import Cartridge, CartridgeInfo, CartridgeMismatchError
from cartridges.context import corpus_context
from cartridges.evaluation import (
    DocumentCartridges,
    EvalConfig,
    QuestionsError,
    build_methods,
    choose_option,
    chrf,
    evaluate,
    load_questions,
)
from cartridges.evaluation import answers as answers_module
from cartridges.evaluation.answers import answer_questions
from cartridges.evaluation.methods import Method
from cartridges.evaluation.results import method_digest
from cartridges.evaluation.tasks.log_perplexity import answer_log_perplexity
from cartridges.initialization import from_token_ids
from cartridges.modeling import kv_layout
from cartridges.routing import RoutingConfig
from tests.architectures import ARCHITECTURES, VOCAB_SIZE, build_model
from tests.evaluation.data import FAST, SYSTEM_TEXT


def test_icl_and_a_cartridge_of_the_whole_context_score_identically(tiny, inputs):
    model, tokenizer = tiny
    whole = from_token_ids(model, inputs["context"], num_frozen_tokens=1)
    small = from_token_ids(model, inputs["context"][:8])
    methods = build_methods(model, inputs["context"], {"whole": whole, "small": small}, 4000)
    report = evaluate(
        model, tokenizer, methods, inputs["questions"], inputs["held_out"], SYSTEM_TEXT, FAST
    )

    assert set(report["task"]) == {"qa", "multiple_choice", "log_perplexity", "fidelity", "chrf"}
    quality = report.pivot(index="task", columns="method", values="quality")
    assert (quality["whole"] == quality["icl"]).all()  # every task, exactly
    assert quality.loc["fidelity", "icl"] == 0.0 and quality.loc["fidelity", "whole"] == 0.0
    assert {"no_context", "truncated_icl_p8"} <= set(report["method"])
    assert "composition" not in set(report["method"])  # only cartridges of separate documents
    assert set(report["questions"]) == {"all"}
    assert quality.loc["fidelity", "no_context"] > 0


def _document_questions(questions):
    """The question set with the first two questions about ``a`` and the third about ``b``."""
    return [replace(q, document=d) for q, d in zip(questions, ["a", "a", "b"], strict=True)]


def test_document_cartridges_are_chosen_by_name_in_order_and_refused_when_unknown(tiny):
    model, tokenizer = tiny
    cartridges = {name: from_token_ids(model, [1, 2, 3]) for name in ("a", "b")}
    texts = {"a": "Pump P1 hums.", "b": "Valve V2 leaks."}
    chosen = DocumentCartridges.select(cartridges, ("b", "a"), texts, tokenizer, "{chunk}")
    assert list(chosen.cartridges) == ["b", "a"]
    together = corpus_context([texts["b"], texts["a"]], tokenizer, "{chunk}").ids
    assert chosen.context == together  # the ICL of the chosen documents, in that order
    assert list(
        DocumentCartridges.select(cartridges, (), texts, tokenizer, "{chunk}").cartridges
    ) == ["a", "b"]
    assert DocumentCartridges.select({}, (), texts, tokenizer, "{chunk}") is None
    with pytest.raises(ValueError, match=r"names \['c'\], which have no document cartridge"):
        DocumentCartridges.select(cartridges, ("c",), texts, tokenizer, "{chunk}")
    with pytest.raises(ValueError, match=r"\['b'\] have no document of that name in the corpus"):
        DocumentCartridges.select(cartridges, ("b",), {"a": "x"}, tokenizer, "{chunk}")


def test_document_cartridges_answer_their_own_questions_alone_and_all_composed(tiny, inputs):
    model, tokenizer = tiny
    context = inputs["context"]
    first, second = from_token_ids(model, context[:6]), from_token_ids(model, context[:10])
    documents = DocumentCartridges({"a": first, "b": second}, context[:40], {"a": "v1", "b": "v2"})
    methods = build_methods(model, context, {}, 4000, documents=documents)
    by_name = {method.name: method for method in methods}
    assert list(by_name) == [
        "icl",
        "no_context",
        "document_a",
        "document_b",
        "icl_documents",
        "composition",
    ]
    assert by_name["composition"].num_tokens == 16
    assert by_name["composition"].version == "v1 + v2"
    assert by_name["icl_documents"].context_ids == context[:40]
    questions = _document_questions(inputs["questions"])
    report = evaluate(
        model, tokenizer, methods, questions, inputs["held_out"], SYSTEM_TEXT, FAST
    ).set_index(["method", "task"])
    # Each document's cartridge answers its own document's questions only; the composition and
    # ICL of the documents answer the questions of both; none of them takes held-out
    # conversations (those are about the whole corpus).
    assert report.loc[("document_a", "qa"), "num_items"] == 2  # the two open questions of a
    assert ("document_a", "multiple_choice") not in report.index
    assert report.loc[("document_b", "multiple_choice"), "num_items"] == 1  # b's only one
    assert ("document_b", "qa") not in report.index
    assert report.loc[("composition", "log_perplexity"), "num_items"] == 3
    assert report.loc[("document_a", "qa"), "questions"] == "a"
    assert report.loc[("composition", "qa"), "questions"] == "a+b"
    assert ("document_a", "fidelity") not in report.index
    assert ("composition", "fidelity") not in report.index
    assert ("icl", "fidelity") in report.index


def test_a_composition_over_the_budget_is_left_out(tiny, inputs):
    model, _ = tiny
    context = inputs["context"]
    halves = {"a": from_token_ids(model, context[:12]), "b": from_token_ids(model, context[:12])}
    methods = build_methods(model, context, {}, 20, documents=DocumentCartridges(halves, context))
    names = [method.name for method in methods]
    assert "composition" not in names and "icl_documents" not in names
    assert {"document_a", "document_b"} <= set(names)


def test_kv_bytes_are_exact_and_compression_is_their_ratio(tiny, inputs):
    model, tokenizer = tiny
    cartridge = from_token_ids(model, inputs["context"][:8])
    methods = build_methods(model, inputs["context"], {"cartridge": cartridge}, 4000)
    config = EvalConfig(tasks=("log_perplexity",), decode_tokens=2, cost_repeats=1)
    report = evaluate(model, tokenizer, methods, inputs["questions"], [], SYSTEM_TEXT, config)
    rows = report.set_index("method")
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # K+V, fp32
    assert rows.loc["cartridge", "kv_bytes"] == 8 * per_token
    assert rows.loc["truncated_icl_p8", "kv_bytes"] == 8 * per_token
    assert rows.loc["icl", "kv_bytes"] == len(inputs["context"]) * per_token
    assert rows.loc["no_context", "kv_bytes"] == 0
    assert rows.loc["cartridge", "compression_vs_icl"] == len(inputs["context"]) / 8
    assert (report["prefill_ms"] > 0).all() and (report["decode_tok_s_b16"] > 0).all()


def test_icl_longer_than_the_model_is_cut_and_flagged(tiny, inputs):
    model, _ = tiny
    methods = build_methods(model, inputs["context"], {}, budget=16)
    assert methods[0].num_tokens == 16
    assert "truncated from" in methods[0].note and "to 16 tokens" in methods[0].note
    # Compression stays measured against the whole corpus in context.
    whole = len(inputs["context"])
    assert methods[0].uncut_tokens == whole
    assert methods[0].whole_kv_bytes == methods[0].kv_bytes * whole / 16


def test_a_cartridge_for_another_model_is_refused(tiny, inputs):
    model, _ = tiny
    cartridge = from_token_ids(model, inputs["context"][:4])
    cartridge.info = CartridgeInfo(model_name="other/llm", model_fingerprint="0123456789abcdef")
    with pytest.raises(CartridgeMismatchError, match="Refusing to evaluate 'mine'.*other/llm"):
        build_methods(model, inputs["context"], {"mine": cartridge}, 4000)
    wrong_shape = Cartridge(torch.zeros(3, 1, 4, 8), torch.zeros(3, 1, 4, 8))
    with pytest.raises(CartridgeMismatchError, match="does not match"):
        build_methods(model, inputs["context"], {"mine": wrong_shape}, 4000)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n', r"line 2: not valid"),
        ('\n["q", "a"]\n', r"line 2: expected a JSON object"),
        ('{"question": "q", "answer": "a", "document": 3}\n', r"line 1: 'document' must be a"),
        ('{"question": "q"}\n', r"line 1: 'answer' must be a non-empty string"),
        ('{"question": "q", "answer": "a", "options": ["a"]}\n', r"line 1: 'options' has 1 entry"),
        ('{"question": "q", "answer": "z", "options": ["a", "b"]}\n', r"line 1: answer 'z'"),
        ("\n  \n", r"holds no question"),
    ],
)
def test_bad_questions_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "questions.jsonl"
    path.write_text(content)
    with pytest.raises(QuestionsError, match=message):
        load_questions(path)


def test_a_missing_questions_file_says_where_to_put_one(tmp_path):
    with pytest.raises(QuestionsError, match=r"not found.*the `questions` catalog entry"):
        load_questions(tmp_path / "absent.jsonl")


def test_an_empty_question_set_is_refused(tiny, inputs):
    model, tokenizer = tiny
    methods = build_methods(model, inputs["context"], {}, 4000)
    with pytest.raises(QuestionsError, match="question set is empty"):
        evaluate(model, tokenizer, methods, [], [], SYSTEM_TEXT, FAST)


def test_unknown_tasks_are_refused():
    with pytest.raises(ValueError, match=r"Unknown or no evaluation tasks \['bleu'\]"):
        EvalConfig(tasks=("qa", "bleu"))


def test_multiple_choice_letters_and_restated_options():
    options = ["low suction pressure", "seal leak", "motor over-temperature"]
    assert choose_option("B", options) == 1
    assert choose_option("The answer is (C).", options) == 2
    assert choose_option("a seal leak", options) == 1  # the text, not the article "a"
    assert choose_option("motor too hot", options) == 2  # closest option


def test_chrf_is_sacrebleus():
    assert chrf(["the seal leaks"], ["the seal leaks"]) == 100.0
    assert 0 < chrf(["the seal leak"], ["the seal leaks"]) < 100
    assert math.isclose(chrf(["abc"], ["xyz"]), 0.0)


LIBRARY_TEXTS = {
    "a": "Halvard Industrial built the pump. Its seal is replaced every 18 months.",
    "b": "Alarm E21 means a seal leak. Alarm E12 means a low inlet pressure.",
}


def _library(model, context, top_k=1, oracle=True):
    cartridges = {"a": from_token_ids(model, context[:6]), "b": from_token_ids(model, context[:10])}
    return DocumentCartridges(
        {},
        [],
        {"a": "v1", "b": "v2"},
        library=cartridges,
        texts=LIBRARY_TEXTS,
        routing=RoutingConfig(top_k=top_k, retriever_options={"passage_words": 8}, oracle=oracle),
    )


def test_a_routed_library_answers_each_question_after_the_cartridges_chosen_for_it(tiny, inputs):
    model, tokenizer = tiny
    context = inputs["context"]
    documents = _library(model, context)
    methods = {m.name: m for m in build_methods(model, context, {}, 4000, documents=documents)}
    routed, oracle = methods["routed_top1"], methods["oracle_selection"]
    assert (routed.kind, oracle.kind) == ("routed", "oracle_selection")
    assert routed.version == "v1 + v2" and routed.documents == ("a", "b")
    questions = _document_questions(inputs["questions"])  # about a, a, b
    picked = [routed.for_question(q) for q in questions]
    assert [m.name for m in picked] == ["routed_top1[a]", "routed_top1[a]", "routed_top1[b]"]
    assert picked[0] is picked[1]  # one method per selection
    # Exact: each answer is the one its own cartridge gives alone.
    alone = {
        name: Method(name, "document_cartridge", cartridge.to(model.device, model.dtype))
        for name, cartridge in documents.library.items()
    }
    routed_answers = answer_questions(model, tokenizer, routed, questions, SYSTEM_TEXT, 4, 2)
    expected = [
        answer_questions(model, tokenizer, alone[q.document], [q], SYSTEM_TEXT, 4, 2)[0]
        for q in questions
    ]
    assert routed_answers == expected
    for q in questions:  # and each log-likelihood, where the two cartridges differ
        nll = {
            name: answer_log_perplexity(model, tokenizer, m, [q], SYSTEM_TEXT)
            for name, m in alone.items()
        }
        assert nll["a"] != nll["b"]
        assert answer_log_perplexity(model, tokenizer, routed, [q], SYSTEM_TEXT) == nll[q.document]
    report = evaluate(
        model,
        tokenizer,
        list(methods.values()),
        questions,
        inputs["held_out"],
        SYSTEM_TEXT,
        replace(FAST, tasks=("qa", "log_perplexity", "fidelity", "routing")),
    ).set_index(["method", "task"])
    assert report.loc[("routed_top1", "routing"), "quality"] == 1.0
    assert report.loc[("oracle_selection", "routing"), "quality"] == 1.0
    assert report.loc[("routed_top1", "log_perplexity"), "num_items"] == 3
    assert ("routed_top1", "fidelity") not in report.index  # held-out conversations: whole corpus
    assert ("icl", "routing") not in report.index  # only routed methods route
    assert report.loc[("routed_top1", "qa"), "questions"] == "a+b"


def test_routing_accuracy_counts_questions_whose_document_was_not_chosen(tiny, inputs):
    model, tokenizer = tiny
    context = inputs["context"]
    methods = build_methods(model, context, {}, 4000, documents=_library(model, context))
    questions = [  # the third is about b's alarms but labelled a
        replace(q, document=d) for q, d in zip(inputs["questions"], "aaa", strict=True)
    ]
    routed = next(m for m in methods if m.kind == "routed")
    report = evaluate(
        model,
        tokenizer,
        [methods[0], routed],
        questions,
        [],
        SYSTEM_TEXT,
        replace(FAST, tasks=("routing",)),
    ).set_index(["method", "task"])
    assert report.loc[("routed_top1", "routing"), "quality"] == pytest.approx(2 / 3)


def test_a_routed_selection_that_cannot_fit_the_model_is_left_out(tiny, inputs, caplog):
    model, _ = tiny
    context = inputs["context"]
    methods = build_methods(model, context, {}, 12, documents=_library(model, context, top_k=2))
    assert not [m for m in methods if m.kind in ("routed", "oracle_selection")]
    assert "No routed method: 2 cartridges can take 16 tokens" in caplog.text


def test_a_routed_methods_saved_results_depend_on_the_texts_it_routes_by(tiny, inputs):
    """The picks follow the indexed texts: results saved for other texts must not be reused."""
    model, _ = tiny
    context = inputs["context"]

    def routed(texts):
        documents = replace(_library(model, context), texts=texts)
        methods = build_methods(model, context, {}, 4000, documents=documents)
        return next(m for m in methods if m.kind == "routed")

    swapped = {"a": LIBRARY_TEXTS["b"], "b": LIBRARY_TEXTS["a"]}
    assert method_digest(routed(LIBRARY_TEXTS)) == method_digest(routed(dict(LIBRARY_TEXTS)))
    assert method_digest(routed(LIBRARY_TEXTS)) != method_digest(routed(swapped))


def test_a_question_no_document_shares_a_word_with_is_routed_first_and_logged(tiny, inputs, caplog):
    model, _ = tiny
    context = inputs["context"]
    methods = build_methods(model, context, {}, 4000, documents=_library(model, context))
    routed = next(m for m in methods if m.kind == "routed")
    stray = replace(inputs["questions"][0], question="Zebras?", document="b")
    assert routed.routes.choose(stray) == ("a",)
    assert "Routing 'Zebras?': no document shares a word with it" in caplog.text


def test_the_library_needs_every_documents_text_only_when_it_is_routed(tiny):
    model, tokenizer = tiny
    cartridges = {name: from_token_ids(model, [1, 2, 3]) for name in ("a", "b")}
    only_a = {"a": "Pump P1 hums."}
    chosen = DocumentCartridges.select(cartridges, ("a",), only_a, tokenizer, "{chunk}")
    assert list(chosen.cartridges) == ["a"] and chosen.library == {} and chosen.routing is None
    routing = RoutingConfig(top_k=1)
    with pytest.raises(ValueError, match=r"\['b'\] have no document of that name"):
        DocumentCartridges.select(cartridges, ("a",), only_a, tokenizer, "{chunk}", routing=routing)


def test_reference_answers_scored_in_batches_match_one_at_a_time(tiny, inputs):
    model, tokenizer = tiny
    questions = _document_questions(inputs["questions"])
    assert len({len(q.answer) for q in questions}) > 1  # rows of several lengths, padded
    cartridge = from_token_ids(model, inputs["context"][:8])
    documents = _library(model, inputs["context"], top_k=2)
    methods = build_methods(
        model, inputs["context"], {"cartridge": cartridge}, 4000, documents=documents
    )
    assert "routed_top2" in {m.name for m in methods}
    for method in methods:
        one = answer_log_perplexity(model, tokenizer, method, questions, SYSTEM_TEXT, batch_size=1)
        many = answer_log_perplexity(model, tokenizer, method, questions, SYSTEM_TEXT)
        assert many == pytest.approx(one, rel=1e-5), method.name
    rows = [(list(range(1, 9)), [5, 6, 7]), (list(range(1, 5)), [2, 3])]
    batched = answers_module.rows_logprobs(model, methods_of(model, inputs)[0], rows)
    for (ids, positions), logprobs in zip(rows, batched, strict=True):
        alone = answers_module.token_logprobs(model, methods_of(model, inputs)[0], ids, positions)
        torch.testing.assert_close(logprobs, alone, rtol=1e-5, atol=1e-5)


def test_logprob_batches_hold_no_more_kv_than_their_budget(tiny, inputs, monkeypatch):
    model, _ = tiny
    icl = methods_of(model, inputs)[0]
    per_token = kv_layout(model).bytes_per_token(model.dtype)
    lengths = [10, 30, 20, 5, 5]
    assert answers_module.logprob_batches(model, icl, lengths, 16) == [range(0, 5)]
    assert answers_module.logprob_batches(model, icl, lengths, 2) == [
        range(0, 2), range(2, 4), range(4, 5)
    ]  # fmt: skip
    two_rows = 2 * (icl.num_tokens + 30) * per_token
    monkeypatch.setattr(answers_module, "_BATCH_KV_BYTES", two_rows)
    batches = answers_module.logprob_batches(model, icl, [30, 30, 30], 16)
    assert batches == [range(0, 2), range(2, 3)]
    monkeypatch.setattr(answers_module, "_BATCH_KV_BYTES", 1)  # a row alone, whatever its size
    assert len(answers_module.logprob_batches(model, icl, lengths, 16)) == 5


def methods_of(model, inputs) -> list[Method]:
    return build_methods(model, inputs["context"], {}, 4000)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_padded_rows_after_a_prefix_score_as_each_alone_on_every_architecture(architecture):
    """Right padding on every architecture, sliding windows shorter than prefix + row too."""
    model = build_model(architecture, sliding_window=16) if "gemma" in architecture else None
    model = model or build_model(architecture)
    generator = torch.Generator().manual_seed(0)
    prefix = from_token_ids(
        model, torch.randint(3, VOCAB_SIZE, (20,), generator=generator).tolist()
    )
    method = Method("cartridge", "cartridge", prefix)
    rows = [
        (torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist(), list(range(1, n)))
        for n in (30, 7, 18)
    ]
    batched = answers_module.rows_logprobs(model, method, rows)
    for (ids, positions), logprobs in zip(rows, batched, strict=True):
        alone = answers_module.token_logprobs(model, method, ids, positions)
        torch.testing.assert_close(logprobs, alone, rtol=1e-4, atol=1e-5)
