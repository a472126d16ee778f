"""Streaming sends each token while its batch is still decoding, and the text a whole answer has."""

from __future__ import annotations

import asyncio
import threading

import openai
import pytest

from cartridges.decoding.shared_prefix import BATCH_KWARG
from cartridges.generation import generate
from cartridges.serving import static as static_module
from cartridges.serving.engine import ContinuousEngine
from cartridges.serving.jobs import Job, Row, StreamToken
from cartridges.serving.static import StaticEngine
from cartridges.serving.text import TextStream, render
from tests.serving.test_completions import QUESTION


class LockStep:
    """The static engine's ``generate`` (or the continuous engine's delivery of a step's tokens),
    holding the model thread after each step until the client has received that step's token.

    A server that sends tokens only once decoding is over never lets it go on: every wait then
    times out (the first after ``timeout_s``, the others at once) and is counted.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s, self.decoded, self.timeouts = timeout_s, 0, 0
        self.received = threading.Semaphore(0)

    def generate(self, *args, on_step=None, **kwargs):
        def step(step):
            self.decoded += 1
            if on_step is not None:
                on_step(step)
            if not self.received.acquire(timeout=0.01 if self.timeouts else self.timeout_s):
                self.timeouts += 1

        return generate(*args, on_step=step, **kwargs)

    def deliver(self, engine: ContinuousEngine, tokens) -> None:
        DELIVER(engine, tokens)
        if tokens:
            self.decoded += 1
            if not self.received.acquire(timeout=0.01 if self.timeouts else self.timeout_s):
                self.timeouts += 1

    def hold(self, scheduler: str, monkeypatch) -> None:
        """Hold ``scheduler``'s model thread after each step."""
        if scheduler == "static":
            monkeypatch.setattr(static_module, "generate", self.generate)
        else:
            monkeypatch.setattr(ContinuousEngine, "_deliver", lambda e, t: self.deliver(e, t))


DELIVER = ContinuousEngine._deliver


def break_the_third_forward(scheduler: str, monkeypatch, model) -> None:
    """Make decoding fail after two steps: ``generate`` (static) or the model's third
    shared-prefix forward (continuous: the prefill, one decode step, then the failure)."""
    if scheduler == "static":
        monkeypatch.setattr(static_module, "generate", failing_generate)
        return
    forward, calls = model.forward, []

    def failing_forward(*args, **kwargs):
        if BATCH_KWARG in kwargs:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("decoding broke")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing_forward)


def failing_generate(*args, on_step=None, **kwargs):
    """``generate`` that breaks after its second step."""

    def step(step):
        on_step(step)
        if step.index == 1:
            raise RuntimeError("decoding broke")

    return generate(*args, on_step=step, **kwargs)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_each_token_reaches_the_client_before_the_next_is_decoded(scheduled, monkeypatch, endpoint):
    scheduler, client = scheduled
    lock = LockStep()
    lock.hold(scheduler, monkeypatch)
    options = dict(model="tiny", max_tokens=6, temperature=0, stream=True)
    options["extra_body"] = {"return_token_ids": True}
    if endpoint == "chat":
        stream = client.chat.completions.create(messages=QUESTION, **options)
    else:
        stream = client.completions.create(prompt="pump", **options)
    decoded_on_arrival, texts = [], []
    for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.text if endpoint == "completions" else "")
            for _ in getattr(choice, "token_ids", None) or []:
                decoded_on_arrival.append(lock.decoded)
                lock.received.release()
    assert lock.timeouts == 0
    assert decoded_on_arrival == [1, 2, 3, 4, 5, 6]  # token i arrived when i steps were decoded
    if endpoint == "completions":
        assert len([text for text in texts if text]) == 6 and "".join(texts) == "ump" * 6


@pytest.mark.parametrize(
    ("stop", "text", "finish_reason"),
    [
        (None, "ump" * 8, "length"),
        (["pu"], "um", "stop"),
        (["ump"], "", "stop"),  # the first token completes it
        (["mpx"], "ump" * 8, "length"),  # "mp" waits at every step, then goes out at the end
        (["zzz", "mpu"], "u", "stop"),
    ],
)
def test_streamed_completions_equal_the_whole_ones(client, stop, text, finish_reason):
    options = dict(
        model="tiny",
        prompt=["pump", "The Aurora"],
        n=2,
        max_tokens=8,
        temperature=0,
        stop=stop,
        logprobs=2,
        extra_body={"return_token_ids": True},
    )
    whole = client.completions.create(**options)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **options)
    )
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == finish_reason
    for expected in whole.choices:
        streamed = [
            c.choices[0] for c in chunks if c.choices and c.choices[0].index == expected.index
        ]
        assert "".join(c.text for c in streamed) == expected.text
        assert [c.finish_reason for c in streamed if c.finish_reason] == [expected.finish_reason]
        assert [t for c in streamed for t in getattr(c, "token_ids", None) or []] == (
            expected.token_ids
        )
        logprobs = [v for c in streamed if c.logprobs for v in c.logprobs.token_logprobs]
        assert logprobs == pytest.approx(expected.logprobs.token_logprobs, abs=1e-5)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_with_a_stop_string_equals_the_whole_answer(client):
    options = dict(model="tiny", messages=QUESTION, max_tokens=16, temperature=1.0, seed=3)
    full = client.chat.completions.create(**options).choices[0].message.content
    assert len(full) > 4
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    whole = client.chat.completions.create(stop=[stop], **options).choices[0]
    chunks = list(client.chat.completions.create(stop=[stop], stream=True, **options))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert whole.message.content == full[: full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def _stream(stream: TextStream, ids: list[int]) -> list[str]:
    """The pieces a stream releases token by token, the last token ending it by length."""
    pieces = []
    for i, token_id in enumerate(ids):
        finish_reason = "length" if i == len(ids) - 1 else None
        pieces.append(stream.push(StreamToken(0, token_id, finish_reason=finish_reason)))
        if stream.finish_reason is not None:
            break
    return pieces


@pytest.mark.parametrize("stops", [[], ["☃"], ["漢字"], ["ïv"], ["e ☃x", "seal"], ["字 s"]])
def test_text_stream_waits_for_whole_characters_and_joins_to_the_rendered_text(tiny, stops):
    _, tokenizer = tiny
    ids = tokenizer("Pümp ☃ naïve – 漢字 seal", add_special_tokens=False)["input_ids"]
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # tokens inside a character
    rendered = render(tokenizer, Row(token_ids=ids, stopped=False), stops)
    text = TextStream(tokenizer, stops)
    pieces = _stream(text, ids)
    assert "".join(pieces) == rendered.text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) == len(rendered.token_ids)
    assert text.finish_reason == rendered.finish_reason


def _engine(tiny) -> StaticEngine:
    model, tokenizer = tiny
    return StaticEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, batch_wait_ms=200)


def test_a_streamed_job_ends_with_its_own_rows_while_its_batch_decodes_on(tiny):
    model, tokenizer = tiny
    pump, aurora = tokenizer("pump")["input_ids"], tokenizer("The Aurora")["input_ids"]
    engine, log = _engine(tiny), []
    received: dict[str, dict[int, list[StreamToken]]] = {"short": {}, "long": {}}

    async def consume(name: str, job: Job) -> None:
        async for tokens in engine.stream(job):
            log.append(name)
            for token in tokens:
                received[name].setdefault(token.choice, []).append(token)
        log.append(f"{name} ended")

    async def main() -> list[Row]:
        engine.start()
        short = Job([pump], (), None, max_tokens=2)
        long = Job([pump, aurora], (), None, max_tokens=6, logprobs=True, top_logprobs=2)
        rows, *_ = await asyncio.gather(
            engine.submit(Job([aurora], (), None, max_tokens=4)),
            consume("short", short),
            consume("long", long),
        )
        await engine.stop()
        return rows

    rows = asyncio.run(main())
    assert engine.stats.batches == 1 and engine.stats.max_batch_rows == 4
    expected = generate(  # the rows in the order the jobs were queued
        model,
        [aurora, pump, pump, aurora],
        max_new_tokens=6,
        stop_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        top_logprobs=2,
    )
    short, long = received["short"][0], received["long"]
    assert [t.token_id for t in short] == expected[1].token_ids[:2]
    assert [t.finish_reason for t in short] == [None, "length"]
    for choice, generation in zip((0, 1), expected[2:], strict=True):
        assert [t.token_id for t in long[choice]] == generation.token_ids
        assert [t.top_ids for t in long[choice]] == generation.top_ids.tolist()
        assert [t.logprob for t in long[choice]] == generation.top_logprobs[:, 0].tolist()
    assert rows[0].token_ids == expected[0].token_ids[:4]  # a whole answer in the same batch
    assert log.index("short ended") < len(log) - 1 - log[::-1].index("long")


def test_a_decoding_error_reaches_every_job_of_its_batch(tiny, monkeypatch):
    monkeypatch.setattr(static_module, "generate", failing_generate)
    _, tokenizer = tiny
    prompt = tokenizer("pump")["input_ids"]
    engine = _engine(tiny)

    async def consume(job: Job) -> int:
        received = 0
        with pytest.raises(RuntimeError, match="decoding broke"):
            async for tokens in engine.stream(job):
                received += len(tokens)
        return received

    async def main():
        engine.start()
        results = await asyncio.gather(
            consume(Job([prompt], (), None, max_tokens=8)),
            consume(Job([prompt, prompt], (), None, max_tokens=8)),
            engine.submit(Job([prompt], (), None, max_tokens=8)),
            return_exceptions=True,
        )
        await engine.stop()
        return results

    streamed_one, streamed_two, whole = asyncio.run(main())
    assert engine.stats.requests == 3
    assert (streamed_one, streamed_two) == (2, 4)  # two steps went out before the error
    assert isinstance(whole, RuntimeError)


def test_a_decoding_error_ends_the_stream_with_an_error_event(scheduled, monkeypatch, tiny):
    scheduler, client = scheduled
    break_the_third_forward(scheduler, monkeypatch, tiny[0])
    stream = client.completions.create(
        model="tiny", prompt="pump", max_tokens=8, temperature=0, stream=True
    )
    texts = []
    with pytest.raises(openai.APIError, match="Internal server error"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["ump", "ump"]
    monkeypatch.undo()
    answer = client.completions.create(model="tiny", prompt="pump", max_tokens=2, temperature=0)
    assert answer.choices[0].text == "umpump"  # the server goes on serving


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(client):
    options = dict(model="tiny", prompt="pump", max_tokens=30, temperature=0, stream=True)
    with client.completions.create(**options) as stream:
        assert next(iter(stream)).choices[0].text == "ump"
    answer = client.completions.create(model="tiny", prompt="pump", max_tokens=3, temperature=0)
    assert answer.choices[0].text == "ump" * 3


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (leading-space marker, byte fallback), built offline."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"])
    backend.train_from_iterator(["the pump seal leaks when the pump runs dry"] * 20, trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte tokens as ordinary pieces, as SentencePiece has them
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>"
    )


@pytest.mark.parametrize("stops", [[], ["seal"]])
def test_text_stream_matches_the_full_decode_with_a_leading_space_tokenizer(stops):
    tokenizer = _metaspace_tokenizer()
    text = "the pump seal ☃ leaks naïve 漢 when dry"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[1]).startswith("\u2581")  # the marker case
    full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    pieces = _stream(TextStream(tokenizer, stops), ids)
    expected = full[: full.find("seal")] if stops else full
    assert "".join(pieces) == expected
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("stop", [["mpx"], ["pu"]])
def test_streamed_text_offsets_equal_the_whole_ones(client, stop):
    """Text held back while it could begin a stop string does not shift the later offsets."""
    options = dict(model="tiny", prompt="pump", max_tokens=8, temperature=0, stop=stop, logprobs=1)
    whole = client.completions.create(**options).choices[0].logprobs.text_offset
    chunks = client.completions.create(stream=True, **options)
    choices = [choice for chunk in chunks for choice in chunk.choices if choice.logprobs]
    streamed = [offset for choice in choices for offset in choice.logprobs.text_offset]
    assert streamed == whole
