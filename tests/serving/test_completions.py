"""Answers through the OpenAI client over real HTTP equal what the library computes directly."""

from __future__ import annotations

import asyncio

import pytest
import requests
import torch

from cartridges.cartridge import compose
from cartridges.chat import chat_ids, continuation_ids
from cartridges.checkpoint import load_cartridge
from cartridges.generation import generate
from tests.serving.conftest import NEW_VERSION, OLD_VERSION, SYSTEM_TEXT, cartridges

QUESTION = [{"role": "user", "content": "Which alarm signals a seal leak?"}]


def direct(tiny, prompt, prefix=None, max_new_tokens=12, top_logprobs=0):
    model, tokenizer = tiny
    (generation,) = generate(
        model,
        [prompt],
        prefix=prefix,
        max_new_tokens=max_new_tokens,
        stop_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        top_logprobs=top_logprobs,
    )
    return generation


def ask(client, messages=QUESTION, *ids, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    extra_body = {**cartridges(*ids), **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, extra_body=extra_body, **kwargs
    )


def loaded(cartridge_root, name):
    return load_cartridge(cartridge_root / "cartridges" / f"{name}.safetensors")


def test_models_and_health(client, server):
    assert client.models.list().data[0].id == "tiny"  # the base model, then its cartridges
    health = requests.get(f"{server.url}/health", timeout=10).json()  # no key needed
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_chat_without_cartridge_is_plain_greedy_chat(client, tiny):
    _, tokenizer = tiny
    answer = ask(client)
    expected = direct(tiny, chat_ids(tokenizer, QUESTION, True))
    choice = answer.choices[0]
    assert choice.token_ids == expected.token_ids  # extension: return_token_ids
    assert choice.message.content == tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if expected.stopped else "length")
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.prompt_tokens == len(chat_ids(tokenizer, QUESTION, True))


def test_cartridge_from_a_document_answers_like_the_document_in_context(client, tiny):
    in_context = ask(
        client,
        [{"role": "system", "content": SYSTEM_TEXT}, *QUESTION],
        top_logprobs=3,
        logprobs=True,
    )
    with_cartridge = ask(client, QUESTION, "doc", top_logprobs=3, logprobs=True)
    without = ask(client, QUESTION, top_logprobs=3, logprobs=True)
    assert with_cartridge.choices[0].token_ids == in_context.choices[0].token_ids
    assert with_cartridge.choices[0].message.content == in_context.choices[0].message.content
    for a, b in zip(
        with_cartridge.choices[0].logprobs.content,
        in_context.choices[0].logprobs.content,
        strict=True,
    ):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # the cartridge is really used: without it the distribution differs
    first = lambda r: r.choices[0].logprobs.content[0].logprob  # noqa: E731
    assert first(without) != pytest.approx(first(with_cartridge), abs=1e-4)
    assert with_cartridge.usage.cartridge_tokens == len(
        chat_ids(tiny[1], [{"role": "system", "content": SYSTEM_TEXT}])
    )


def test_composed_cartridges_equal_compose_in_order(client, tiny, cartridge_root):
    _, tokenizer = tiny
    prompt = continuation_ids(tokenizer, "x", QUESTION, True)
    for order in (("doc", "other"), ("other", "doc")):
        prefix = compose([loaded(cartridge_root, name) for name in order])
        expected = direct(tiny, prompt, prefix)
        assert ask(client, QUESTION, *order).choices[0].token_ids == expected.token_ids
        assert ask(client, QUESTION, *order).usage.cartridge_tokens == prefix.num_tokens


def test_catalog_ids_resolve_to_latest_or_named_version(client, tiny, cartridge_root):
    _, tokenizer = tiny
    prompt = continuation_ids(tokenizer, "x", QUESTION, True)
    catalog = cartridge_root / "catalog" / "cartridge.safetensors"
    for cartridge_id, version in (
        ("cartridge", NEW_VERSION),
        (f"cartridge@{NEW_VERSION}", NEW_VERSION),
        (f"cartridge@{OLD_VERSION}", OLD_VERSION),
    ):
        prefix = load_cartridge(catalog / version / "cartridge.safetensors")
        answer = ask(client, QUESTION, cartridge_id)
        assert answer.usage.cartridge_tokens == prefix.num_tokens
        assert answer.choices[0].token_ids == direct(tiny, prompt, prefix).token_ids
    nested = ask(client, QUESTION, "team/nested.safetensors")
    assert nested.usage.cartridge_tokens == 8


def test_logprobs_carry_token_ids_and_match_generate(client, tiny, cartridge_root):
    _, tokenizer = tiny
    prefix = loaded(cartridge_root, "doc")
    expected = direct(
        tiny, continuation_ids(tokenizer, "x", QUESTION, True), prefix, top_logprobs=4
    )
    answer = ask(client, QUESTION, "doc", logprobs=True, top_logprobs=4)
    as_ids = ask(
        client,
        QUESTION,
        "doc",
        logprobs=True,
        top_logprobs=4,
        extra_body={"return_tokens_as_token_ids": True},
    )
    content, content_ids = answer.choices[0].logprobs.content, as_ids.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids)
    for i, (entry, entry_ids) in enumerate(zip(content, content_ids, strict=True)):
        token_id = expected.token_ids[i]
        assert entry.token_id == token_id and entry_ids.token == f"token_id:{token_id}"
        assert entry.token == tokenizer.decode([token_id])
        assert entry.logprob == pytest.approx(float(expected.top_logprobs[i, 0]), abs=1e-5)
        assert [t.token_id for t in entry.top_logprobs] == expected.top_ids[i].tolist()
        assert [t.token for t in entry_ids.top_logprobs] == [
            f"token_id:{t}" for t in expected.top_ids[i].tolist()
        ]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            expected.top_logprobs[i].tolist(), abs=1e-5
        )


def test_sampled_tokens_get_their_exact_logprob(client, tiny):
    model, tokenizer = tiny
    answer = client.chat.completions.create(
        model="tiny",
        messages=QUESTION,
        temperature=2.0,
        seed=7,
        max_tokens=10,
        logprobs=True,
        top_logprobs=1,
        extra_body={"return_token_ids": True},
    )
    again = client.chat.completions.create(
        model="tiny",
        messages=QUESTION,
        temperature=2.0,
        seed=7,
        max_tokens=10,
        extra_body={"return_token_ids": True},
    )
    generated = answer.choices[0].token_ids
    assert again.choices[0].token_ids == generated  # seeded sampling is reproducible
    prompt = chat_ids(tokenizer, QUESTION, True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + generated])).logits[0]
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    expected = logprobs.gather(-1, torch.tensor(generated)[:, None]).squeeze(-1).tolist()
    reported = [entry.logprob for entry in answer.choices[0].logprobs.content]
    assert reported == pytest.approx(expected, abs=1e-4)


def test_streaming_chat_sends_the_same_answer_token_by_token(client):
    whole = ask(client, QUESTION, "doc", logprobs=True, top_logprobs=2)
    stream = ask(
        client,
        QUESTION,
        "doc",
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    streamed_ids = [
        e.token_id
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed_ids == whole.choices[0].token_ids
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_text_completions_with_text_and_token_prompts(client, tiny, cartridge_root):
    _, tokenizer = tiny
    prefix = loaded(cartridge_root, "doc")
    ids = tokenizer("<|user|>Which alarm", add_special_tokens=False)["input_ids"]
    expected = direct(tiny, ids, prefix, max_new_tokens=10, top_logprobs=3)
    for prompt in ("<|user|>Which alarm", ids):
        answer = client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            logprobs=3,
            extra_body=cartridges("doc"),
        )
        choice = answer.choices[0]
        assert choice.token_ids == expected.token_ids
        assert choice.logprobs.token_ids == expected.token_ids
        assert choice.logprobs.top_token_ids == expected.top_ids.tolist()
        assert choice.logprobs.token_logprobs == pytest.approx(
            expected.top_logprobs[:, 0].tolist(), abs=1e-5
        )
        assert len(choice.logprobs.top_logprobs) == len(expected.token_ids)
    stream = client.completions.create(
        model="tiny",
        prompt=ids,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body=cartridges("doc"),
    )
    assert "".join(c.choices[0].text for c in stream) == answer.choices[0].text
    many = client.completions.create(
        model="tiny", prompt=["a", "b"], max_tokens=3, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text  # greedy choices agree


def test_stop_strings_cut_the_answer(client):
    full = client.completions.create(model="tiny", prompt="pump", max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    cut = client.completions.create(
        model="tiny", prompt="pump", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_are_batched_and_equal_their_sequential_answers(
    client, async_client, server
):
    sets = [(), ("doc",), ("other",), ("doc", "other")]
    requests_ = [
        dict(
            messages=[{"role": "user", "content": f"Question {i}: what does alarm E{i} mean?"}],
            max_tokens=4 + i % 5,
            extra_body=cartridges(*sets[i % 4]),
        )
        for i in range(32)
    ]

    def tokens(answer):
        return [c.token_ids for c in answer.choices], answer.choices[0].message.content

    sequential = [
        tokens(client.chat.completions.create(model="tiny", temperature=0, **r)) for r in requests_
    ]

    async def all_at_once():
        calls = [
            async_client.chat.completions.create(model="tiny", temperature=0, **r)
            for r in requests_
        ]
        return await asyncio.gather(*calls)

    before = requests.get(f"{server.url}/health", timeout=10).json()
    concurrent = [tokens(answer) for answer in asyncio.run(all_at_once())]
    after = requests.get(f"{server.url}/health", timeout=10).json()
    assert concurrent == sequential
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32  # requests shared generate() calls
    assert after["max_batch_rows"] > 1
