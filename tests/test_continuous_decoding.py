"""Continuous batching with one shared copy of each KV prefix: exact, frugal, and bounded."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cartridges.attention import ATTENTION_NAME as BLOCK_SPARSE
from cartridges.attention import _configs, attention_implementation, block_sparse
from cartridges.cartridge import CartridgeMismatchError
from cartridges.decoding.continuous import ContinuousBatcher, Request, StepFailed
from cartridges.decoding.shared_prefix import (
    ATTENTION_NAME,
    SharedPrefixBatch,
    UnsupportedModelError,
    attending_shared_prefix,
    check_calls,
    expected_windows,
)
from cartridges.generation import generate
from cartridges.initialization import from_token_ids
from cartridges.modeling import kv_layout
from tests.architectures import ARCHITECTURES, VOCAB_SIZE, build_model
from tests.schedules import assert_same_as_generate, run_schedule


def _ids(count: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB_SIZE, (count,), generator=torch.Generator().manual_seed(seed))


def _cartridges(model):
    """A long cartridge (60 tokens: with its prompt and answer, past a 64-token window), a short."""
    return from_token_ids(model, _ids(60, 1).tolist()), from_token_ids(model, _ids(7, 2).tolist())


def _schedule(long, short) -> list[tuple[int, Request]]:
    """Requests with different prefixes (and none), prompt lengths and budgets, joining late."""
    return [
        (0, Request(_ids(3, 3).tolist(), long, 20, stop_token_ids=(), top_logprobs=3)),
        (0, Request(_ids(11, 4).tolist(), None, 12, stop_token_ids=(), logprobs=True)),
        # Its window slides past the whole short prefix (Gemma's 64 positions).
        (2, Request(_ids(2, 5).tolist(), short, 70, stop_token_ids=(), top_logprobs=2)),
        (5, Request(_ids(5, 6).tolist(), long, 25, stop_token_ids=(), logprobs=True)),
        (5, Request(_ids(4, 7).tolist(), short, 1, stop_token_ids=())),  # done at its prefill
    ]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_each_answer_equals_generate_alone(architecture):
    model = build_model(architecture)
    schedule = _schedule(*_cartridges(model))
    implementation = model.config._attn_implementation
    answers = run_schedule(ContinuousBatcher(model, max_batch_size=8), schedule)
    for (_, request), tokens in zip(schedule, answers, strict=True):
        assert_same_as_generate(model, request, tokens)
    assert model.config._attn_implementation == implementation  # switched for each call only


def test_soft_capped_scores_are_capped_in_both_parts():
    model = build_model("gemma2", attn_logit_softcapping=0.05)  # caps every score of this model
    schedule = _schedule(*_cartridges(model))[:3]
    answers = run_schedule(ContinuousBatcher(model), schedule)
    for (_, request), tokens in zip(schedule, answers, strict=True):
        assert_same_as_generate(model, request, tokens)


def test_stop_tokens_and_default_stop_ids_end_requests_as_generate_does():
    model = build_model("llama")
    long, short = _cartridges(model)
    free = generate(model, [[5, 6, 7]], prefix=long, max_new_tokens=12, stop_token_ids=())[0]
    stop = free.token_ids[4]
    schedule = [
        (0, Request([5, 6, 7], long, 12, stop_token_ids=[stop], logprobs=True)),
        (1, Request([9, 9], short, 12, stop_token_ids=None)),  # the model's end of sequence
    ]
    answers = run_schedule(ContinuousBatcher(model), schedule)
    for (_, request), tokens in zip(schedule, answers, strict=True):
        assert_same_as_generate(model, request, tokens)
    assert answers[0][-1].finish_reason == "stop" and answers[0][-1].token_id == stop


def test_sampled_requests_follow_their_own_seed():
    model = build_model("qwen3")
    long, short = _cartridges(model)
    sampled = Request([4, 5, 6], long, 15, temperature=1.0, seed=7, stop_token_ids=())
    schedule = [
        (0, Request([8, 9], short, 10, stop_token_ids=())),
        (1, sampled),
        (1, replace(sampled, prefix=None, seed=8)),
    ]
    answers = run_schedule(ContinuousBatcher(model), schedule)
    for (_, request), tokens in zip(schedule, answers, strict=True):
        assert_same_as_generate(model, request, tokens)
    assert [t.token_id for t in answers[1]] != [t.token_id for t in answers[2]]


def test_cancelled_requests_leave_at_once_and_others_are_unchanged():
    model = build_model("llama")
    long, short = _cartridges(model)
    requests = [Request(_ids(4, seed).tolist(), long, 10, stop_token_ids=()) for seed in (3, 4)]
    requests.insert(1, Request([7, 8, 9], short, 10, stop_token_ids=()))
    batcher = ContinuousBatcher(model, max_batch_size=3)
    ids = [batcher.add(replace(request)) for request in requests]
    waiting = batcher.add(Request([5], None, 4))
    tokens = {request_id: [] for request_id in ids}
    for step in range(10):
        if step == 3:
            before = batcher.memory()
            assert batcher.cancel(ids[1]) and batcher.cancel(waiting)
            assert not batcher.cancel(12345)
        for token in batcher.step():
            tokens[token.request_id].append(token)
        if step == 3:
            assert batcher.num_running == 2 and batcher.num_waiting == 0
            assert batcher.memory().prefix_bytes == long.kv_bytes < before.prefix_bytes
    assert len(tokens[ids[1]]) == 3  # nothing after the cancellation
    assert waiting not in tokens
    for request_id, request in zip((ids[0], ids[2]), (requests[0], requests[2]), strict=True):
        assert_same_as_generate(model, request, tokens[request_id])


def test_a_failed_forward_retires_its_requests_and_the_others_carry_on():
    model = build_model("llama")
    long, short = _cartridges(model)
    kept = Request([4, 5, 6], long, 8, stop_token_ids=())
    batcher = ContinuousBatcher(model)
    kept_id = batcher.add(replace(kept))
    tokens = batcher.step()
    forward = model.forward

    def failing_prefill(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    model.forward = failing_prefill
    failed_id = batcher.add(Request([7, 8], short, 8, stop_token_ids=()))
    with pytest.raises(StepFailed, match="out of memory") as failure:
        batcher.step()
    del model.forward  # back to the class's
    assert failure.value.request_ids == [failed_id]
    tokens += failure.value.tokens  # the running request's token of that step
    while batcher.has_work:
        tokens += batcher.step()
    assert {token.request_id for token in tokens} == {kept_id}
    assert_same_as_generate(model, kept, tokens)
    assert batcher.memory().own_tokens == 0


def test_rows_of_one_cartridge_hold_it_once_plus_their_own_tokens():
    model = build_model("llama")
    cartridge = from_token_ids(model, _ids(32, 1).tolist())
    prompts = [_ids(3 + row, 10 + row).tolist() for row in range(8)]
    batcher = ContinuousBatcher(model, block_size=4)
    for prompt in prompts:
        batcher.add(Request(prompt, cartridge, 20, stop_token_ids=()))
    for _ in range(5):  # the prefill, then four decode steps: each row fed its prompt + 4
        batcher.step()
    bytes_per_token = kv_layout(model).bytes_per_token(model.dtype)
    stored = {id(row.prefix): row.prefix for row in batcher.cache.rows}
    assert len(stored) == 1
    (prefix,) = stored.values()
    assert prefix.keys.nbytes + prefix.values.nbytes == cartridge.kv_bytes
    memory = batcher.memory()
    own_tokens = sum(len(prompt) + 4 for prompt in prompts)
    assert memory.prefix_bytes == cartridge.kv_bytes  # once, not once per row
    assert memory.own_tokens == own_tokens
    assert memory.own_bytes == own_tokens * bytes_per_token
    assert memory.own_bytes <= memory.block_bytes < memory.own_bytes + 8 * 4 * bytes_per_token
    assert memory.pool_bytes == batcher.cache.pool.nbytes
    copies = 8 * cartridge.kv_bytes + memory.own_bytes  # a prefix copy per row, as generate has
    assert memory.prefix_bytes + memory.block_bytes < copies / 2
    while batcher.has_work:
        batcher.step()
    assert batcher.memory().prefix_bytes == 0 and batcher.memory().own_tokens == 0


def test_admission_stays_within_the_budget_and_the_batch_size():
    model = build_model("mistral")
    long, short = _cartridges(model)
    schedule = [(0, Request(_ids(4, seed).tolist(), long, 8, stop_token_ids=())) for seed in (3, 4)]
    schedule += [(0, Request([5, 6], short, 6, stop_token_ids=())) for _ in range(3)]
    budget = long.num_tokens + 2 * (4 + 8)  # the long prefix and two of its requests
    batcher = ContinuousBatcher(model, max_batch_size=2, kv_budget_tokens=budget)
    batcher.add(replace(schedule[0][1]))
    batcher.add(replace(schedule[1][1]))
    batcher.add(replace(schedule[2][1]))
    batcher.step()
    assert batcher.num_running == 2 and batcher.num_waiting == 1
    bytes_per_token = kv_layout(model).bytes_per_token(model.dtype)
    batcher = ContinuousBatcher(model, max_batch_size=2, kv_budget_tokens=budget)
    original_step = batcher.step

    def checked_step():
        tokens = original_step()
        memory = batcher.memory()
        assert batcher.num_running <= 2
        assert (memory.prefix_bytes + memory.own_bytes) // bytes_per_token <= budget
        return tokens

    batcher.step = checked_step
    answers = run_schedule(batcher, schedule)
    for (_, request), tokens in zip(schedule, answers, strict=True):
        assert_same_as_generate(model, request, tokens)
    with pytest.raises(ValueError, match=r"needs 105 KV tokens .* budget of 84"):
        batcher.add(Request([1] * 5, long, 40))


def test_bad_requests_are_refused_with_the_offending_values():
    model = build_model("llama")
    batcher = ContinuousBatcher(model)
    other_layout = from_token_ids(build_model("gpt_neox"), [3, 4, 5])
    with pytest.raises(CartridgeMismatchError, match="does not match model"):
        batcher.add(Request([1, 2], other_layout))
    other_weights = from_token_ids(build_model("llama", seed=1), [3, 4, 5])
    with pytest.raises(CartridgeMismatchError, match="fingerprint"):
        batcher.add(Request([1, 2], other_weights))
    with pytest.raises(ValueError, match="at least one prompt token"):
        batcher.add(Request([]))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        batcher.add(Request([1], max_new_tokens=0))
    with pytest.raises(ValueError, match=r"need 259 positions; the model has 256"):
        batcher.add(Request([1] * 250, max_new_tokens=10))
    assert not batcher.has_work


def test_a_model_it_cannot_reproduce_is_refused_and_left_as_it_was():
    model = build_model("llama", attention_dropout=0.1).train()
    implementation = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match="attention dropout is 0.1"):
        ContinuousBatcher(model)
    assert model.config._attn_implementation == implementation


def test_a_layer_that_does_not_attend_as_its_config_says_is_refused():
    model = build_model("gemma2")
    assert expected_windows(model.config, 2) == {0: 64, 1: None}
    empty = torch.zeros((1, 1), dtype=torch.long)
    batch = SharedPrefixBatch(empty, empty, [], calls={0: 64})  # layer 1 never came
    with pytest.raises(UnsupportedModelError, match=r"expected \{0: 64, 1: None\}"):
        check_calls(model, batch, 2)
    check_calls(model, SharedPrefixBatch(empty, empty, [], calls={0: 64, 1: None}), 2)


def test_attention_implementation_switches_every_config_for_one_call_only():
    model = build_model("gemma2")
    configs = _configs(model)
    before = [config._attn_implementation_internal for config in configs]
    with pytest.raises(RuntimeError, match="inside"), attention_implementation(model, "sdpa"):
        assert {c._attn_implementation_internal for c in configs} == {"sdpa"}
        with block_sparse(model):  # nested: restored to the outer switch
            assert {c._attn_implementation_internal for c in configs} == {BLOCK_SPARSE}
        with attending_shared_prefix(model):
            assert {c._attn_implementation_internal for c in configs} == {ATTENTION_NAME}
        assert {c._attn_implementation_internal for c in configs} == {"sdpa"}
        raise RuntimeError("inside")
    assert [config._attn_implementation_internal for config in configs] == before
