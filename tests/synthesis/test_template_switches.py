"""Chat-template switches in self-study: the answering bot's are the model's, the question
writer's go over them; both backends pass them, and they are part of a run's identity."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from cartridges.modeling import load_tokenizer
from cartridges.synthesis import local_backend
from cartridges.synthesis.local_backend import LocalBackend
from cartridges.synthesis.openai_backend import OpenAIBackend
from cartridges.synthesis.runs import run_key
from cartridges.synthesis.self_study import SelfStudy, SelfStudyConfig
from cartridges_testing.stand_in_teacher import StandInTeacher, TeacherSettings
from cartridges_testing.tiny_model import CHAT_TEMPLATE
from tests.conftest import CORPUS

# Like Qwen3's template: a switched-off thinking mode shows in the assistant's opening.
GENERATION_PROMPT = "{{ '<|assistant|>' }}"
SWITCH = "{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% endif %}"
SETTINGS = dict(
    num_conversations=2,
    conversations_per_chunk=2,
    max_question_tokens=4,
    max_answer_tokens=4,
    top_k=3,
    system_prompt="About:\n{chunk}",
)
NO_THINKING = {"enable_thinking": False}


@pytest.fixture(scope="module")
def switching(tiny_model_dir):
    """The tiny tokenizer with a template that renders ``NOTHINK`` when thinking is off."""
    tokenizer = load_tokenizer(str(tiny_model_dir))  # its own copy: the shared one stays as is
    assert GENERATION_PROMPT in CHAT_TEMPLATE
    tokenizer.chat_template = CHAT_TEMPLATE.replace(GENERATION_PROMPT, GENERATION_PROMPT + SWITCH)
    return tokenizer


def _local_prompts(monkeypatch, tokenizer) -> list[str]:
    """Every prompt the local backend renders, decoded, in order."""
    rendered = []
    render = local_backend.chat_ids

    def recording(tokenizer, messages, add_generation_prompt=False, template_kwargs=None):
        ids = render(tokenizer, messages, add_generation_prompt, template_kwargs)
        rendered.append(tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(local_backend, "chat_ids", recording)
    return rendered


def test_the_local_question_writer_renders_its_own_switches(tiny, switching, monkeypatch):
    model, _ = tiny
    prompts = _local_prompts(monkeypatch, switching)
    config = SelfStudyConfig(**SETTINGS, question_chat_template_kwargs=NO_THINKING)
    conversations = SelfStudy(LocalBackend(model, switching), switching, config).run_batch(
        0, "chunk-a", CORPUS
    )
    questions, answers = prompts[:2], prompts[2:]  # one round of two rows: bot A, then bot B
    assert len(answers) == 2
    assert all(prompt.endswith("<|assistant|>NOTHINK") for prompt in questions)
    assert all(prompt.endswith("<|assistant|>") for prompt in answers)
    for conversation in conversations:  # the student reads what bot B read
        before_answer = switching.decode(conversation.token_ids[: conversation.answer_start])
        assert before_answer.endswith("<|assistant|>") and "NOTHINK" not in before_answer


def test_the_models_switches_reach_the_answers_and_the_students_tokens(
    tiny, switching, monkeypatch
):
    model, _ = tiny
    prompts = _local_prompts(monkeypatch, switching)
    config = SelfStudyConfig(
        **SETTINGS,
        chat_template_kwargs=NO_THINKING,
        question_chat_template_kwargs={"enable_thinking": True},  # over the model's
    )
    conversations = SelfStudy(LocalBackend(model, switching), switching, config).run_batch(
        0, "chunk-a", CORPUS
    )
    questions, answers = prompts[:2], prompts[2:]
    assert not any("NOTHINK" in prompt for prompt in questions)
    assert all(prompt.endswith("<|assistant|>NOTHINK") for prompt in answers)
    for conversation in conversations:
        before_answer = switching.decode(conversation.token_ids[: conversation.answer_start])
        assert before_answer.endswith("<|assistant|>NOTHINK")


@pytest.fixture(scope="module")
def teacher(tiny_model_dir, switching):
    settings = TeacherSettings(
        delay_ms=0,
        answer_tokens=3,
        question_tokens=3,
        vocab_size=len(switching),
        pool=4,
        record_requests=100,
    )
    with StandInTeacher(settings) as running:
        yield running


@pytest.mark.parametrize(
    ("model_switches", "question_switches", "sent_with_questions", "sent_with_answers"),
    [
        ({}, NO_THINKING, NO_THINKING, None),  # unset switches are not sent at all
        (NO_THINKING, {"enable_thinking": True}, {"enable_thinking": True}, NO_THINKING),
    ],
)
def test_the_openai_backend_sends_each_bots_switches(
    teacher, switching, model_switches, question_switches, sent_with_questions, sent_with_answers
):
    backend = OpenAIBackend(switching, [teacher.base_url], "stand-in", max_retries=0)
    config = SelfStudyConfig(
        **SETTINGS,
        chat_template_kwargs=model_switches,
        question_chat_template_kwargs=question_switches,
    )
    seen = len(teacher.recorded_requests())
    conversations = SelfStudy(backend, switching, config).run_batch(0, "chunk-a", CORPUS)
    requests = teacher.recorded_requests()[seen:]
    questions = [r for r in requests if r["top_logprobs"] == 1]
    answers = [r for r in requests if r["top_logprobs"] == SETTINGS["top_k"]]
    assert len(questions) == len(answers) == 2
    assert all(r.get("chat_template_kwargs") == sent_with_questions for r in questions)
    assert all(r.get("chat_template_kwargs") == sent_with_answers for r in answers)
    # The student's tokens are rendered here, with the model's switches, as bot B read them.
    opening = "<|assistant|>NOTHINK" if model_switches else "<|assistant|>"
    for conversation in conversations:
        before_answer = switching.decode(conversation.token_ids[: conversation.answer_start])
        assert before_answer.endswith(opening)


def test_the_switches_are_part_of_the_run_identity_and_unset_ones_change_nothing():
    chunks = [("chunk-a", "The pump P2 seal was replaced in March.")]
    plain = SelfStudyConfig(
        num_conversations=4,
        conversations_per_chunk=2,
        max_question_tokens=5,
        max_answer_tokens=5,
        top_k=4,
        system_prompt="About:\n{chunk}",
    )
    # Unset switches leave the key as it was (runs of the chunk-set order, where batch i reads
    # chunk i mod n; runs of the earlier shuffled order have other keys and never resume here).
    assert run_key(plain, chunks, "local:x:y") == "3e8e8e762f1d74bd"
    keys = {
        run_key(SelfStudyConfig(**{**asdict(plain), **switches}), chunks, "local:x:y")
        for switches in (
            {},
            {"chat_template_kwargs": NO_THINKING},
            {"question_chat_template_kwargs": NO_THINKING},
            {"question_chat_template_kwargs": {"enable_thinking": True}},
        )
    }
    assert len(keys) == 4
