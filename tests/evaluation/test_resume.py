"""Evaluation as a resumable stream of (method, task) results; work computed once and shared.

A stopped evaluation rerun with the same inputs computes only what is missing and reports the
same scores; other inputs never reuse a result. Fidelity runs the teacher once per conversation
for all methods; answers and decode timings take the serving path, with the same tokens as
``generate``, and fall back to it for a model that cannot share a prefix.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pandas as pd
import pytest

from cartridges.decoding.shared_prefix import UnsupportedModelError
from cartridges.evaluation import (
    TASKS,
    Method,
    answer_questions,
    build_methods,
    evaluate,
    fidelity_kl,
    measure_cost,
)
from cartridges.evaluation import answers as answers_module
from cartridges.evaluation import cost as cost_module
from cartridges.evaluation import run as run_module
from cartridges.evaluation.answers import question_ids, user_message
from cartridges.evaluation.cost import decode_rate
from cartridges.evaluation.tasks import fidelity as fidelity_module
from cartridges.generation import default_stop_ids, generate
from cartridges.initialization import from_token_ids
from cartridges.modeling import pad_token_id
from tests.evaluation.data import FAST, SYSTEM_TEXT

CONFIG = replace(FAST, tasks=("qa", "log_perplexity", "fidelity"))
TIMINGS = ["prefill_ms", "decode_tok_s_b1", "decode_tok_s_b16"]


@pytest.fixture()
def methods(tiny, inputs):
    model, _ = tiny
    cartridge = from_token_ids(model, inputs["context"][:8])
    return build_methods(model, inputs["context"], {"cartridge": cartridge}, 4000)


def _evaluate(tiny, inputs, methods, results_dir, config=CONFIG):
    model, tokenizer = tiny
    return evaluate(
        model,
        tokenizer,
        methods,
        inputs["questions"],
        inputs["held_out"],
        SYSTEM_TEXT,
        config,
        results_dir=results_dir,
    )


def _scores(report: pd.DataFrame) -> pd.DataFrame:
    return report.drop(columns=TIMINGS).reset_index(drop=True)


def _count_scoring(monkeypatch) -> list[tuple[str, str]]:
    calls = []
    real = run_module._compute

    def counted(inputs, method, name, icl):
        calls.append((method.name, name))
        return real(inputs, method, name, icl)

    monkeypatch.setattr(run_module, "_compute", counted)
    return calls


def test_a_rerun_reads_every_result_and_reports_the_same(
    tiny, inputs, methods, tmp_path, caplog, monkeypatch
):
    tmp_path = tmp_path / "results"
    first = _evaluate(tiny, inputs, methods, tmp_path)
    saved = list(tmp_path.glob("*/*/*.json"))
    assert len(saved) == 4 * 4  # 4 methods x (cost + 3 tasks)

    with caplog.at_level(logging.INFO, logger="cartridges.evaluation"):
        calls = _count_scoring(monkeypatch)
        again = _evaluate(tiny, inputs, methods, tmp_path)
    assert calls == []
    pd.testing.assert_frame_equal(first, again)  # timings too: they are read back
    assert any("16 of 16 results there, computing 0" in r.getMessage() for r in caplog.records)


def test_a_stopped_evaluation_resumes_with_only_what_is_missing(
    tiny, inputs, methods, tmp_path, monkeypatch
):
    whole = _evaluate(tiny, inputs, methods, tmp_path / "whole")

    real = TASKS["log_perplexity"].score
    stopped = []

    def stop_at_the_cartridge(method, task_inputs):
        if method.name == "cartridge":
            stopped.append(method.name)
            raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) in the third method
        return real(method, task_inputs)

    monkeypatch.setattr(TASKS["log_perplexity"], "score", stop_at_the_cartridge)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tiny, inputs, methods, tmp_path / "stopped")
    assert stopped == ["cartridge"]
    monkeypatch.setattr(TASKS["log_perplexity"], "score", real)

    calls = _count_scoring(monkeypatch)
    resumed = _evaluate(tiny, inputs, methods, tmp_path / "stopped")
    done_before = {("icl", n) for n in ("cost", "qa", "log_perplexity", "fidelity")}
    done_before |= {("no_context", n) for n in ("cost", "qa", "log_perplexity", "fidelity")}
    done_before |= {("cartridge", "cost"), ("cartridge", "qa")}
    # fidelity of every method was computed in one pass, during no_context's turn
    done_before |= {("cartridge", "fidelity"), ("truncated_icl_p8", "fidelity")}
    everything = {
        (m.name, n) for m in methods for n in ("cost", "qa", "log_perplexity", "fidelity")
    }
    assert set(calls) == everything - done_before
    pd.testing.assert_frame_equal(_scores(resumed), _scores(whole))


def test_other_inputs_never_reuse_a_result(tiny, inputs, methods, tmp_path, monkeypatch):
    tmp_path = tmp_path / "results"
    _evaluate(tiny, inputs, methods, tmp_path)
    calls = _count_scoring(monkeypatch)
    _evaluate(tiny, inputs, methods, tmp_path, replace(CONFIG, max_new_tokens=3))
    assert len(calls) == 16 - 2  # all again (two fidelities come in no_context's pass)
    assert sorted(len(list(key.glob("*/*.json"))) for key in tmp_path.iterdir()) == [16, 16]
    calls.clear()
    model, _ = tiny
    retrained = from_token_ids(model, inputs["context"][1:9])  # same name and size, other KV
    other = build_methods(model, inputs["context"], {"cartridge": retrained}, 4000)
    _evaluate(tiny, inputs, other, tmp_path)
    assert sorted(calls) == [("cartridge", n) for n in ("cost", "fidelity", "log_perplexity", "qa")]


def test_fidelity_runs_the_teacher_once_per_conversation_for_all_methods(
    tiny, inputs, methods, monkeypatch
):
    model, tokenizer = tiny
    expected = {
        m.name: fidelity_kl(model, tokenizer, methods[0], m, inputs["held_out"], SYSTEM_TEXT)
        for m in methods[1:]
    }
    calls = []
    real = fidelity_module.token_logprobs
    monkeypatch.setattr(
        fidelity_module,
        "token_logprobs",
        lambda model, method, *a: calls.append(method.name) or real(model, method, *a),
    )
    report = _evaluate(tiny, inputs, methods, None, replace(CONFIG, tasks=("fidelity",)))
    conversations = len(inputs["held_out"])
    assert calls.count("icl") == conversations  # was once per method
    assert len(calls) == conversations * len(methods)
    fidelity = report.set_index("method")["quality"]
    assert fidelity["icl"] == 0.0
    for name, kl in expected.items():
        assert fidelity[name] == kl  # the same numbers as one method at a time


def test_answers_are_those_generate_gives_each_question_alone(tiny, inputs, methods, caplog):
    model, tokenizer = tiny
    questions = inputs["questions"]
    for method in methods:
        answers = answer_questions(model, tokenizer, method, questions, SYSTEM_TEXT, 6, 2)
        alone = []
        for question in questions:
            prompt = question_ids(tokenizer, method, SYSTEM_TEXT, [user_message(question)])
            (generation,) = generate(
                model,
                [prompt],
                prefix=method.prefix,
                max_new_tokens=6,
                stop_token_ids=default_stop_ids(model, tokenizer),
                pad_token_id=pad_token_id(tokenizer),
            )
            alone.append(tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip())
        assert answers == alone, method.name


def test_a_model_that_cannot_share_a_prefix_decodes_with_generate(
    tiny, inputs, methods, monkeypatch, caplog
):
    model, tokenizer = tiny
    questions = inputs["questions"]
    shared = [answer_questions(model, tokenizer, m, questions, SYSTEM_TEXT, 6, 2) for m in methods]

    def unsupported(*args, **kwargs):
        raise UnsupportedModelError("this model's attention has sinks")

    monkeypatch.setattr(answers_module, "complete", unsupported)
    monkeypatch.setattr(cost_module, "complete", unsupported)
    monkeypatch.setattr(answers_module, "_WARNED", type(answers_module._WARNED)())
    with caplog.at_level(logging.WARNING, logger="cartridges.evaluation"):
        fallback = [
            answer_questions(model, tokenizer, m, questions, SYSTEM_TEXT, 6, 2) for m in methods
        ]
    assert fallback == shared
    warnings = [r.getMessage() for r in caplog.records if "one fixed batch" in r.getMessage()]
    assert len(warnings) == 1 and "sinks" in warnings[0]  # once per model, with the reason
    prompt = question_ids(tokenizer, methods[0], SYSTEM_TEXT, [user_message(questions[0])])
    assert decode_rate(model, methods[0], [prompt] * 2, 3) > 0
    assert decode_rate(model, methods[0], [prompt], 1) > 0


def test_the_bar_weighs_methods_by_their_prefix(tiny, methods):
    model, _ = tiny
    weights = run_module._work_weights(model, methods)
    assert weights["no_context"] == 1.0
    assert weights["icl"] > weights["truncated_icl_p8"] == weights["cartridge"] > 1.0


def test_decoding_is_timed_over_the_steps_a_full_context_leaves(tiny, inputs):
    """An ICL context filling the model up to its answers failed the timing's 16 tokens."""
    model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    prompt = question_ids(
        tokenizer, Method("icl", "icl", None), SYSTEM_TEXT, [user_message(inputs["questions"][0])]
    )
    context = (inputs["context"] * limit)[: limit - len(prompt) - 3]
    (icl,) = build_methods(model, context, {}, limit)[:1]
    costs = measure_cost(model, icl, prompt, decode_tokens=16, batch_sizes=(1, 2), repeats=1)
    assert costs["decode_tok_s_b1"] > 0 and costs["decode_tok_s_b2"] > 0
