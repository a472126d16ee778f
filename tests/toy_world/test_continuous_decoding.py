"""Continuous batching on the toy-world model, whose per-row state lives on the cache object."""

from __future__ import annotations

import random

from tests.schedules import assert_same_as_generate, run_schedule

from cartridges.decoding.continuous import ContinuousBatcher, Request
from cartridges.initialization import from_token_ids
from cartridges.toy_world import registry
from cartridges.toy_world.tokenizer import encode_conversation


def test_answers_equal_generate_alone_while_rows_join_and_leave(tokenizer, make_tiny):
    model = make_tiny(shift_width=3, init_std=0.5, seed=1)
    documents = [registry.make_registry(random.Random(seed), n) for seed, n in ((0, 2), (1, 3))]
    cartridges = [
        from_token_ids(
            model, encode_conversation(tokenizer, [{"role": "system", "content": d.text}])[0]
        )
        for d in documents
    ]
    prompts = [
        tokenizer(f"<user> what does {d.facts[0][0]} own ? <end> <assistant>")["input_ids"]
        for d in documents
    ]
    stop = (tokenizer.eos_token_id,)
    schedule = [
        (0, Request(prompts[0], cartridges[0], 12, stop_token_ids=(), top_logprobs=2)),
        (0, Request(prompts[1][:5], None, 4, stop_token_ids=(), logprobs=True)),
        (2, Request(prompts[1], cartridges[1], 14, stop_token_ids=stop, logprobs=True)),
        (3, Request(prompts[0][2:], cartridges[1], 9, stop_token_ids=())),
        (6, Request(prompts[1], cartridges[0], 8, stop_token_ids=(), top_logprobs=1)),
    ]
    answers = run_schedule(ContinuousBatcher(model, pad_token_id=tokenizer.pad_token_id), schedule)
    for (_, request), tokens in zip(schedule, answers, strict=True):
        assert_same_as_generate(model, request, tokens)
    generated = {t.token_id for tokens in answers for t in tokens}
    assert len(generated - set(model.config.segment_start_token_ids)) >= 5  # the shift matters
