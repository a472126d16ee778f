"""Choosing the scheduler, its KV budget, its fallback, and a forward that fails mid-decode."""

from __future__ import annotations

import asyncio
import logging
import threading

import openai
import pytest
from fastapi.testclient import TestClient

from cartridges.decoding.continuous import ContinuousBatcher, StepFailed
from cartridges.decoding.shared_prefix import BATCH_KWARG, UnsupportedModelError
from cartridges.generation import generate
from cartridges.serving import BackgroundServer, ServingConfig, create_app
from cartridges.serving.engine import ContinuousEngine
from cartridges.serving.jobs import Job
from tests.serving.conftest import API_KEY, make_config
from tests.serving.test_continuous_serving import Gate, _wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_scheduler_and_budget_settings_are_checked():
    with pytest.raises(ValueError, match=r"scheduler must be one of .* got 'fast'"):
        ServingConfig(scheduler="fast")
    with pytest.raises(ValueError, match="kv_budget_tokens must be null .* got 0"):
        ServingConfig(kv_budget_tokens=0)
    assert ServingConfig().scheduler == "continuous" and ServingConfig().kv_budget_tokens is None


def test_a_model_the_continuous_scheduler_refuses_is_served_statically(
    tiny, tiny_model_dir, cartridge_root, monkeypatch, caplog
):
    def refuse(batcher) -> None:
        raise UnsupportedModelError("its attention passes sinks")

    monkeypatch.setattr(ContinuousBatcher, "_check_model", refuse)
    with caplog.at_level(logging.INFO, logger="cartridges.serving"):
        app = create_app(make_config(tiny_model_dir, cartridge_root), *tiny)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("cartridges.serving")]
    assert lines == ["Serving with the static scheduler: its attention passes sinks"]
    with TestClient(app) as http:
        assert http.get("/health").json()["scheduler"] == "static"
        body = dict(model="tiny", prompt="pump", max_tokens=3, temperature=0)
        answer = http.post("/v1/completions", json=body, headers=AUTH).json()
    assert answer["choices"][0]["text"] == "ump" * 3


def test_requests_wait_for_room_in_the_kv_budget(tiny, tiny_model_dir, cartridge_root, monkeypatch):
    gate = Gate(monkeypatch)
    config = make_config(tiny_model_dir, cartridge_root, kv_budget_tokens=20)
    with BackgroundServer(create_app(config, *tiny)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError, match=r"needs 33 KV tokens .* budget of 20"):
            client.completions.create(model="tiny", prompt="pump", max_tokens=30)
        engine = server.server.config.app.state.service.engine
        answers: list[str] = []

        def ask() -> None:  # prompt (3 tokens) + 10: one such request fits the budget at a time
            answer = client.completions.create(
                model="tiny", prompt="pump", max_tokens=10, temperature=0
            )
            answers.append(answer.choices[0].text)

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: engine.stats.requests == 3, "three requests")
        gate.step()  # the first request to arrive starts; the others are added after the step
        gate.step()  # all three are queued: what the budget admits starts
        _wait_for(lambda: engine.pending + engine.running == 3, "three queued requests")
        assert (engine.running, engine.pending) == (1, 2)
        gate.open()
        for thread in threads:
            thread.join(timeout=30)
    assert answers == ["ump" * 10] * 3


def test_a_failed_forward_fails_its_jobs_and_the_others_decode_on(tiny, monkeypatch):
    model, tokenizer = tiny
    pump, aurora = tokenizer("pump")["input_ids"], tokenizer("The Aurora Aurora")["input_ids"]
    forward = model.forward

    def failing(*args, **kwargs):  # the prefill of the Aurora prompts fails
        if BATCH_KWARG in kwargs and kwargs["input_ids"].shape[1] == len(aurora):
            raise RuntimeError("decoding broke")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    engine = ContinuousEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)

    async def main() -> tuple[list[int], Exception]:
        engine.start()
        stream = engine.stream(Job([pump], (), None, max_tokens=8))
        received = [token.token_id for token in await anext(stream)]  # it is running
        failed = engine.submit(Job([aurora, aurora], (), None, max_tokens=4))
        error = (await asyncio.gather(failed, return_exceptions=True))[0]
        async for tokens in stream:
            received += [token.token_id for token in tokens]
        await engine.stop()
        return received, error

    received, error = asyncio.run(main())
    assert isinstance(error, StepFailed) and "decoding broke" in str(error)
    monkeypatch.undo()
    (expected,) = generate(model, [pump], max_new_tokens=8, stop_token_ids=[tokenizer.eos_token_id])
    assert received == expected.token_ids
    assert engine.running == 0 and engine.pending == 0
