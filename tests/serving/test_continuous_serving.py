"""The continuous scheduler over HTTP: exact answers under mixed load, joining, leaving, cancelling.

A :class:`Gate` holds the model thread before each step until the test lets it go, so that the
order of arrivals and steps is fixed, not left to timing.
"""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest
import requests

from cartridges.decoding.continuous import ContinuousBatcher
from cartridges.serving.engine import ContinuousEngine
from tests.serving.conftest import API_KEY, cartridges
from tests.serving.test_completions import QUESTION

CARTRIDGE_SETS = [(), ("doc",), ("other",), ("team/nested.safetensors",), ("cartridge",)]


class Gate:
    """Each ``ContinuousBatcher.step`` waits for a permit (``release``) unless the gate is open.

    ``started`` and ``done`` count the steps begun and finished.
    """

    def __init__(self, monkeypatch) -> None:
        self.permits, self.is_open = threading.Semaphore(0), False
        self.started = self.done = 0
        original = ContinuousBatcher.step

        def step(batcher):
            if not self.is_open:
                self.permits.acquire(timeout=30)
            self.started += 1
            try:
                return original(batcher)
            finally:
                self.done += 1

        monkeypatch.setattr(ContinuousBatcher, "step", step)

    def step(self) -> None:
        """Let one step run, and wait until it has."""
        before = self.done
        self.permits.release()
        _wait_for(lambda: self.done > before, "a step")

    def open(self) -> None:
        self.is_open = True
        self.permits.release(1000)

    def close(self) -> None:
        self.permits, self.is_open = threading.Semaphore(0), False


@pytest.fixture
def gate(monkeypatch):
    gate = Gate(monkeypatch)
    yield gate
    gate.open()


def _wait_for(condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out waiting for {what}.")
        time.sleep(0.005)


def _health(server) -> dict:
    return requests.get(f"{server.url}/health", timeout=10).json()


def _engine(server) -> ContinuousEngine:
    return server.server.config.app.state.service.engine


WORDS = [
    ("pump", ["pu", "p p"]),
    ("Halvard", ["dv", "d H"]),
    ("compressor", ["ro", "r c"]),
    ("seal", ["le", "l s"]),
    ("A", ["AA", "A A"]),
]


def _spec(i: int) -> dict:
    """Request ``i`` of the mixed load: endpoint, cartridges, lengths, streaming, stops.

    The tiny model continues a word by repeating it ("pump": "umpump...", "The pump": " pump
    pump..."), so stop strings taken from the repetition end the answer early.
    """
    streamed = i % 3 == 1
    word, stops = WORDS[i % len(WORDS)]
    return dict(
        endpoint="chat" if i % 4 == 0 else "completions",
        ids=CARTRIDGE_SETS[i % len(CARTRIDGE_SETS)],
        max_tokens=[24, 5, 12, 3, 16, 9][i % 6],
        stream=streamed,
        logprobs=streamed or i % 4 == 0,
        stop=stops if i % 5 in (1, 2) else None,
        text=f"{'The ' * (i % 3)}{word}" if i % 4 else f"Question {i}: what is {word}?",
    )


async def _ask(client: openai.AsyncOpenAI, spec: dict) -> tuple:
    """The answer to ``spec``: token ids, text, finish reasons and log-probabilities per choice."""
    options = dict(
        model="tiny",
        max_tokens=spec["max_tokens"],
        temperature=0,
        stop=spec["stop"],
        stream=spec["stream"],
        extra_body=cartridges(*spec["ids"]),
    )
    if spec["endpoint"] == "chat":
        messages = [{"role": "user", "content": spec["text"]}]
        if spec["logprobs"]:
            options.update(logprobs=True, top_logprobs=2)
        answer = await client.chat.completions.create(messages=messages, **options)
    else:
        if spec["logprobs"]:
            options["logprobs"] = 2
        answer = await client.completions.create(prompt=spec["text"], **options)
    if not spec["stream"]:
        return tuple(_whole(spec, choice) for choice in answer.choices)
    pieces = [choice async for chunk in answer for choice in chunk.choices]
    return (_streamed(spec, pieces),)


def _whole(spec: dict, choice) -> tuple:
    if spec["endpoint"] == "chat":
        logprobs = [e.logprob for e in choice.logprobs.content] if choice.logprobs else []
        return choice.token_ids, choice.message.content, [choice.finish_reason], logprobs
    logprobs = choice.logprobs.token_logprobs if choice.logprobs else []
    return choice.token_ids, choice.text, [choice.finish_reason], logprobs


def _streamed(spec: dict, pieces: list) -> tuple:
    chat = spec["endpoint"] == "chat"
    text = "".join((p.delta.content or "") if chat else p.text for p in pieces)
    ids = [t for p in pieces for t in getattr(p, "token_ids", None) or []]
    finishes = [p.finish_reason for p in pieces if p.finish_reason]
    if chat:
        logprobs = [e.logprob for p in pieces if p.logprobs for e in p.logprobs.content]
    else:
        logprobs = [v for p in pieces if p.logprobs for v in p.logprobs.token_logprobs]
    return ids, text, finishes, logprobs


def _same(answer: tuple, expected: tuple) -> None:
    for (ids, text, finishes, logprobs), (ids_, text_, finishes_, logprobs_) in zip(
        answer, expected, strict=True
    ):
        assert (ids, text, finishes) == (ids_, text_, finishes_)
        assert logprobs == pytest.approx(logprobs_, abs=1e-4)


def test_mixed_load_answers_equal_each_request_alone(server, static_server, monkeypatch):
    """Each answer equals the request's alone, decoded by the static scheduler (``generate``)."""
    specs = [_spec(i) for i in range(20)]

    async def one_by_one() -> list[tuple]:
        client = openai.AsyncOpenAI(base_url=static_server.base_url, api_key=API_KEY, max_retries=0)
        return [await _ask(client, spec) for spec in specs]

    alone = asyncio.run(one_by_one())
    assert len({len(a[0][0]) for a in alone}) >= 5  # different lengths
    pairs = zip(specs, alone, strict=True)
    assert any(s["stream"] and s["logprobs"] and a[0][2] == ["stop"] for s, a in pairs)
    joins, original = [], ContinuousBatcher.step

    def step(batcher):
        tokens = original(batcher)
        joins.append({t.index == 0 for t in tokens} == {True, False})  # joined running ones
        return tokens

    monkeypatch.setattr(ContinuousBatcher, "step", step)

    async def arriving() -> list[tuple]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)

        async def later(i: int, spec: dict) -> tuple:
            await asyncio.sleep(0.01 * i)
            return await _ask(client, spec)

        return await asyncio.gather(*(later(i, spec) for i, spec in enumerate(specs)))

    for answer, expected in zip(asyncio.run(arriving()), alone, strict=True):
        _same(answer, expected)
    assert any(joins)  # requests started while others were decoding
    assert _health(server)["running"] == 0


def test_a_request_arriving_mid_decode_finishes_before_the_running_one(server, client, gate):
    gate.open()
    alone_long = client.completions.create(
        model="tiny", prompt="pump", max_tokens=24, temperature=0
    )
    alone_short = client.completions.create(
        model="tiny", prompt="The Aurora", max_tokens=3, temperature=0
    )
    gate.close()
    stream = client.completions.create(
        model="tiny", prompt="pump", max_tokens=24, temperature=0, stream=True
    )
    chunks = iter(stream)
    first = gate.done
    gate.step()  # the long request's prefill: its first token
    texts = [next(chunks).choices[0].text]
    requests_before, short = _health(server)["requests"], []
    thread = threading.Thread(
        target=lambda: short.append(
            client.completions.create(
                model="tiny", prompt="The Aurora", max_tokens=3, temperature=0
            )
        )
    )
    thread.start()
    _wait_for(lambda: _health(server)["requests"] == requests_before + 1, "the short request")
    while thread.is_alive() and gate.done - first < 24:
        gate.step()
        thread.join(timeout=0.3)
    assert short and short[0].choices[0].text == alone_short.choices[0].text
    assert gate.done - first < 24  # the long request needs 24 steps: it is still decoding
    health = _health(server)
    assert health["scheduler"] == "continuous" and health["running"] == 1
    assert health["max_batch_rows"] >= 2
    gate.open()
    texts += [chunk.choices[0].text for chunk in chunks]
    assert "".join(texts) == alone_long.choices[0].text


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_disconnects_cancels_its_requests(server, gate, monkeypatch, streamed):
    withdrawn, original = threading.Event(), ContinuousEngine.withdraw

    def withdraw(engine, job):
        original(engine, job)
        withdrawn.set()

    monkeypatch.setattr(ContinuousEngine, "withdraw", withdraw)
    generated = _health(server)["generated_tokens"]
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=1.0)
    options = dict(model="tiny", prompt="pump", max_tokens=30, temperature=0)
    if streamed:
        stream = client.completions.create(stream=True, **options)
        gate.step()
        assert next(iter(stream)).choices[0].text == "ump"
        stream.close()
    else:  # the client gives up after 1 s while its request waits for its first step
        with pytest.raises(openai.APITimeoutError):
            client.completions.create(**options)
    assert withdrawn.wait(timeout=20)  # asked while the model thread waits at the gate
    for _ in range(3):
        if _engine(server).running == 0 and _engine(server).pending == 0:
            break
        gate.step()
    health = _health(server)
    assert health["running"] == 0 and health["waiting"] == 0
    assert health["generated_tokens"] - generated <= 3  # of the 30 it asked for


def test_sampled_choices_follow_seed_plus_their_index(client, tiny):
    import torch

    from cartridges.chat import chat_ids
    from cartridges.generation import generate

    model, tokenizer = tiny
    options = dict(model="tiny", messages=QUESTION, temperature=2.0, max_tokens=10)
    options["extra_body"] = {"return_token_ids": True}
    answer = client.chat.completions.create(n=3, seed=40, **options)
    prompt = chat_ids(tokenizer, QUESTION, True)
    for choice in answer.choices:
        (expected,) = generate(
            model,
            [prompt],
            max_new_tokens=10,
            temperature=2.0,
            stop_token_ids=[tokenizer.eos_token_id],
            generator=torch.Generator().manual_seed(40 + choice.index),
        )
        assert choice.token_ids == expected.token_ids
    alone = client.chat.completions.create(n=1, seed=41, **options)
    assert alone.choices[0].token_ids == answer.choices[1].token_ids
    assert len({tuple(c.token_ids) for c in answer.choices}) > 1
