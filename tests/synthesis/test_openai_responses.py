"""Reading a server's chat completion into the student's tokens: how a stopped turn ends."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cartridges.chat import end_of_turn_id
from cartridges.synthesis.openai_responses import ResponseReader

GEMMA_LIKE = (  # the end of an assistant's turn is a special token that is not the eos
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def gemma_like(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_LIKE
    return tokenizer


def _response(tokenizer, text: str, finish_reason: str, stop_token: str | None = None) -> bytes:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if stop_token is not None:
        ids.append(tokenizer.convert_tokens_to_ids(stop_token))
    entries = [
        {
            "token": f"token_id:{i}",
            "logprob": -0.1,
            "top_logprobs": [{"token": f"token_id:{i}", "logprob": -0.1}],
        }
        for i in ids
    ]
    choice = {
        "message": {"content": text},
        "finish_reason": finish_reason,
        "logprobs": {"content": entries},
    }
    return json.dumps({"choices": [choice]}).encode()


def test_the_end_of_turn_is_the_token_the_template_writes_after_an_answer(tiny, gemma_like):
    _, tokenizer = tiny
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id  # its template ends with eos
    assert end_of_turn_id(gemma_like) == gemma_like.convert_tokens_to_ids("<end_of_turn>")
    assert gemma_like.convert_tokens_to_ids("<end_of_turn>") != gemma_like.eos_token_id
    without_template = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    without_template.chat_template = None
    assert end_of_turn_id(without_template) == tokenizer.eos_token_id


def test_a_stopped_reply_without_its_stop_token_ends_with_the_templates_end_of_turn(gemma_like):
    reader = ResponseReader(gemma_like)
    end = gemma_like.convert_tokens_to_ids("<end_of_turn>")
    answer = gemma_like("pump P2", add_special_tokens=False)["input_ids"]
    stopped = reader.completion(_response(gemma_like, "pump P2", "stop"), top_logprobs=1)
    assert stopped.token_ids == [*answer, end] and stopped.text == "pump P2"
    assert stopped.stopped and len(stopped.top_ids) == len(answer)  # nothing to distil at it
    returned = reader.completion(
        _response(gemma_like, "pump P2", "stop", "<end_of_turn>"), top_logprobs=1
    )
    assert returned.token_ids == [*answer, end] and returned.text == "pump P2"
    cut = reader.completion(_response(gemma_like, "pump P2", "length"), top_logprobs=1)
    assert cut.token_ids == answer and not cut.stopped
