"""Fields the server cannot honour are refused by name, never silently ignored.

Also: a system message next to cartridges is refused, since a cartridge replaces it.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.serving.conftest import API_KEY, cartridges

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}

CHAT_FIELDS = {
    "tools": [TOOL],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "functions": [{"name": "lookup", "parameters": {}}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "logit_bias": {"5": 10},
    "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
    "best_of": 2,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "high",
    "web_search_options": {},
    "top_k": 5,
    "min_p": 0.1,
    "repetition_penalty": 1.2,
}
COMPLETION_FIELDS = {
    "logit_bias": {"5": 10},
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "best_of": 2,
    "suffix": "end",
    "top_k": 5,
    "chat_template_kwargs": {"enable_thinking": False},
}


def post(server, path, body):
    return requests.post(f"{server.url}/v1/{path}", data=json.dumps(body), headers=AUTH, timeout=30)


def chat_body(**fields):
    return {"model": "tiny", "messages": USER, "max_tokens": 2, "temperature": 0, **fields}


def completion_body(**fields):
    return {"model": "tiny", "prompt": "pump", "max_tokens": 2, "temperature": 0, **fields}


def refusal(response):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_parameter"
    return error


@pytest.mark.parametrize(("field", "value"), list(CHAT_FIELDS.items()))
def test_chat_refuses_each_field_it_would_ignore_naming_it(server, field, value):
    error = refusal(post(server, "chat/completions", chat_body(**{field: value})))
    assert error["param"] == field and f"'{field}'" in error["message"]


@pytest.mark.parametrize(("field", "value"), list(COMPLETION_FIELDS.items()))
def test_completions_refuse_each_field_they_would_ignore_naming_it(server, field, value):
    error = refusal(post(server, "completions", completion_body(**{field: value})))
    assert error["param"] == field and f"'{field}'" in error["message"]


def test_the_openai_client_gets_a_400_for_tools_and_response_format(client):
    with pytest.raises(openai.BadRequestError, match="'tools'.*tool and function calling"):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, tools=[TOOL])
    with pytest.raises(openai.BadRequestError, match="'response_format'.*structured output"):
        client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=2, response_format={"type": "json_object"}
        )


def test_every_refused_field_is_named_and_the_first_is_the_param(server):
    body = chat_body(response_format={"type": "json_object"}, tools=[TOOL])
    error = refusal(post(server, "chat/completions", body))
    assert error["param"] == "tools"  # in the order of the server's table
    assert "'tools'" in error["message"] and "'response_format'" in error["message"]


def test_tool_calls_in_a_message_are_refused(server):
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}, *USER]
    error = refusal(post(server, "chat/completions", chat_body(messages=messages)))
    assert error["param"] == "messages[1].tool_calls"


def test_null_default_and_bookkeeping_values_are_accepted(server):
    neutral = dict(
        tools=[],
        tool_choice="none",
        parallel_tool_calls=None,
        functions=None,
        response_format={"type": "text"},
        logit_bias={},
        frequency_penalty=0,
        presence_penalty=0.0,
        best_of=1,
        modalities=["text"],
        user="me",
        metadata={"team": "support"},
        store=False,
        service_tier="auto",
    )
    assert post(server, "chat/completions", chat_body(**neutral)).status_code == 200
    fields = dict(suffix="", best_of=1, logit_bias={}, chat_template_kwargs={}, user="me")
    assert post(server, "completions", completion_body(**fields)).status_code == 200


# --------------------------------------------------------------------------- system + cartridges
@pytest.mark.parametrize("role", ["system", "developer"])
def test_a_system_message_with_cartridges_is_refused_saying_why(server, role):
    messages = [{"role": role, "content": "Answer briefly."}, *USER]
    body = chat_body(messages=messages, **cartridges("doc"))
    response = post(server, "chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "system_message_with_cartridges" and error["param"] == "messages"
    assert f"messages[0] is a {role} message" in error["message"]
    assert "stands in for the system message" in error["message"]
    # without cartridges the same messages are a plain chat
    assert post(server, "chat/completions", chat_body(messages=messages)).status_code == 200
