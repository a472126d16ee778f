"""Tasks behind one interface and one registry; prompts with the model's template switches;
progress while methods x tasks run; the question-only scoring the LoRA baseline calls."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from cartridges.evaluation import (
    TASKS,
    EvalConfig,
    Measure,
    Method,
    Metric,
    Need,
    Task,
    build_methods,
    evaluate,
    get_task,
    question_ids,
    question_scores,
    report_metrics,
    score_method,
)
from cartridges.evaluation import answers as answers_module
from cartridges.evaluation.plot import tradeoff_figure
from cartridges.evaluation.tasks import base as tasks_base
from cartridges.initialization import from_token_ids
from tests.evaluation.data import (
    FAST,
    NO_THINKING,
    SWITCH_MARKER,
    SYSTEM_TEXT,
    switch_tokenizer,
)


class AnswerLength(Task):
    """A task added the documented way: one class, one registry line."""

    name = "answer_length"
    summary = "words per greedy answer"
    needs = frozenset({Need.QUESTIONS, Need.ANSWERS})
    measure = Measure(
        "answer_length",
        "Answer length",
        Metric("mean_words", "Words per answer", higher_is_better=False),
        extras=(Metric("longest_words", "Longest answer (words)"),),
    )
    measures = (measure,)

    def score(self, method: Method, inputs) -> list[dict[str, Any]]:
        words = [len(a.split()) for a in inputs.answers(method)]
        return [self.measure.row(sum(words) / len(words), len(words), longest_words=max(words))]


def test_the_registry_holds_the_tasks_in_their_default_order():
    assert tuple(TASKS) == ("qa", "log_perplexity", "fidelity", "chrf", "routing")
    assert EvalConfig().tasks == tuple(TASKS)
    assert {m.task for t in TASKS.values() for m in t.measures} == {
        "qa",
        "multiple_choice",
        "log_perplexity",
        "fidelity",
        "chrf",
        "routing",
    }
    for task in TASKS.values():
        assert get_task(task.name) is task and task.summary and task.needs
        assert all(m.title != m.task and m.plot_metric.label for m in task.measures)
    assert TASKS["qa"].measures[0].plot_column == "exact_match"  # the headline number
    with pytest.raises(ValueError, match=r"Unknown evaluation task 'bleu'; choose from \('qa'"):
        get_task("bleu")


def test_a_new_task_is_one_class_and_one_registry_line(tiny, inputs, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setitem(TASKS, "answer_length", AnswerLength())
    calls = []
    real = tasks_base.answer_questions
    monkeypatch.setattr(
        tasks_base, "answer_questions", lambda *a, **k: calls.append(a[2].name) or real(*a, **k)
    )
    methods = build_methods(model, inputs["context"], {}, 4000)
    config = EvalConfig(
        tasks=("answer_length", "qa"), max_new_tokens=4, decode_tokens=2, cost_repeats=1
    )
    report = evaluate(model, tokenizer, methods, inputs["questions"], [], SYSTEM_TEXT, config)

    assert calls == ["icl", "no_context"]  # answers generated once per method, shared by tasks
    rows = report[report["task"] == "answer_length"].set_index("method")
    assert list(rows.index) == ["icl", "no_context"] and (rows["num_items"] == 3).all()
    assert (rows["longest_words"] >= rows["quality"]).all()  # its extra metric got a column
    assert report.loc[report["task"] == "qa", "longest_words"].isna().all()
    assert "icl.answer_length.longest_words" in report_metrics(report)
    titles = [axis.get_title() for axis in tradeoff_figure(report).axes]
    assert titles[0] == "Answer length"


def test_a_task_needing_questions_refuses_an_empty_set_and_fidelity_waits_for_conversations(
    tiny, inputs
):
    model, tokenizer = tiny
    methods = build_methods(model, inputs["context"], {}, 4000)
    config = EvalConfig(tasks=("fidelity",), decode_tokens=2, cost_repeats=1)
    assert not config.needs(Need.QUESTIONS) and config.needs(Need.CONVERSATIONS)
    assert evaluate(model, tokenizer, methods, [], [], SYSTEM_TEXT, config).empty  # skipped
    with pytest.raises(ValueError, match="question set is empty: the log_perplexity task"):
        evaluate(
            model,
            tokenizer,
            methods,
            [],
            inputs["held_out"],
            SYSTEM_TEXT,
            EvalConfig(tasks=("fidelity", "log_perplexity")),
        )


def test_question_prompts_use_the_model_chat_template_switches(
    tiny, tiny_model_dir, inputs, monkeypatch
):
    model, _ = tiny
    tokenizer = switch_tokenizer(tiny_model_dir)
    marker = tokenizer.convert_tokens_to_ids(SWITCH_MARKER)
    message = [{"role": "user", "content": "Who built the pump?"}]
    no_context = Method("no_context", "no_context", None)
    assert question_ids(tokenizer, no_context, SYSTEM_TEXT, message)[-1] != marker
    assert question_ids(tokenizer, no_context, SYSTEM_TEXT, message, True, NO_THINKING)[-1] == (
        marker
    )

    prompts = []
    real = answers_module.complete
    monkeypatch.setattr(
        answers_module,
        "complete",
        lambda m, r, **k: prompts.extend(q.prompt for q in r) or real(m, r, **k),
    )
    cartridge = from_token_ids(model, inputs["context"][:8])
    methods = build_methods(model, inputs["context"], {"cartridge": cartridge}, 4000)
    config = EvalConfig(tasks=("qa",), max_new_tokens=2, decode_tokens=2, cost_repeats=1)
    evaluate(model, tokenizer, methods, inputs["questions"], [], SYSTEM_TEXT, config, NO_THINKING)
    assert len(prompts) == len(methods) * len(inputs["questions"])
    assert all(p[-1] == marker for p in prompts)


def test_progress_shows_methods_x_tasks_and_logs_each_method(tiny, inputs, capsys, caplog):
    model, tokenizer = tiny
    methods = build_methods(model, inputs["context"], {}, 4000)
    tasks = ("qa", "log_perplexity", "fidelity")
    config = EvalConfig(tasks=tasks, max_new_tokens=2, decode_tokens=2, cost_repeats=1)
    with caplog.at_level(logging.INFO, logger="cartridges.evaluation"):
        evaluate(
            model, tokenizer, methods, inputs["questions"], inputs["held_out"], SYSTEM_TEXT, config
        )

    bar = capsys.readouterr().err
    assert "evaluation" in bar and "100%" in bar  # with ETA
    assert "8/8 results" in bar  # 2 methods x (cost + 3 tasks)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluated")]
    assert [line.split()[1] for line in logged] == ["icl", "no_context"]
    assert "(2/2)" in logged[1] and "qa token_f1" in logged[1] and "fidelity" in logged[1]


def test_score_method_keeps_the_lora_baseline_call(tiny, inputs):
    model, tokenizer = tiny
    method = Method("cartridge", "cartridge", from_token_ids(model, inputs["context"][:8]))
    config = EvalConfig(tasks=("qa", "log_perplexity", "fidelity"), max_new_tokens=2)
    rows = score_method(model, tokenizer, method, inputs["questions"], SYSTEM_TEXT, config)
    assert [r["task"] for r in rows] == ["qa", "multiple_choice", "log_perplexity"]

    scores = question_scores(model, tokenizer, method, inputs["questions"], SYSTEM_TEXT, config)
    assert set(scores) == {"qa", "qa_exact_match", "multiple_choice", "log_perplexity"}
    assert scores["qa_exact_match"] == rows[0]["exact_match"]
    assert question_scores(model, tokenizer, method, [], SYSTEM_TEXT, FAST) == {}


def test_icls_fidelity_to_itself_is_zero_without_a_forward_pass(tiny, inputs, monkeypatch):
    """KL(ICL || ICL) is 0 by definition; computing it cost a full pass per conversation."""
    from cartridges.evaluation.tasks import fidelity as fidelity_module

    model, tokenizer = tiny
    methods = build_methods(model, inputs["context"], {}, 4000)
    scored = []
    real = fidelity_module.token_logprobs

    def counted(model, method, ids, positions):
        scored.append(method.name)
        return real(model, method, ids, positions)

    monkeypatch.setattr(fidelity_module, "token_logprobs", counted)
    config = EvalConfig(tasks=("fidelity",), decode_tokens=2, cost_repeats=1)
    report = evaluate(model, tokenizer, methods, [], inputs["held_out"], SYSTEM_TEXT, config)
    quality = report.set_index("method")["quality"]
    assert quality["icl"] == 0.0 and quality["no_context"] > 0
    conversations = len(inputs["held_out"])
    assert scored.count("no_context") == conversations  # its own distributions
    assert scored.count("icl") == conversations  # only as the reference of no_context
