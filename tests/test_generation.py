"""Batched decoding after a prefix."""

from __future__ import annotations

import pytest
import torch

from cartridges.generation import generate, left_pad
from cartridges.initialization import from_text
from tests.conftest import CORPUS


def test_top_logprobs_are_those_of_the_full_forward(tiny):
    model, tokenizer = tiny
    prompt = tokenizer("Which alarm signals a seal leak?")["input_ids"]
    (generation,) = generate(model, [prompt], max_new_tokens=6, top_logprobs=5)
    full = torch.tensor([prompt + generation.token_ids])
    logprobs = torch.log_softmax(model(input_ids=full).logits[0, len(prompt) - 1 : -1], dim=-1)
    expected_values, expected_ids = logprobs.topk(5, dim=-1)
    assert torch.equal(generation.top_ids, expected_ids)
    assert torch.allclose(generation.top_logprobs, expected_values, atol=1e-5)
    assert generation.token_ids == expected_ids[:, 0].tolist()  # greedy picks the top entry


def test_stop_tokens_end_rows_and_cut_rows_are_flagged(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer("pump")["input_ids"], tokenizer("the seal of the pump")["input_ids"]]
    free = generate(model, prompts, max_new_tokens=5)
    assert all(len(g.token_ids) == 5 and not g.stopped for g in free)
    stop = free[0].token_ids[2]
    stopped = generate(model, prompts, max_new_tokens=5, stop_token_ids=[stop])
    for row, generation in enumerate(stopped):
        expected = free[row].token_ids  # rows do not disturb each other when one finishes
        cut = expected.index(stop) + 1 if stop in expected else len(expected)
        assert generation.token_ids == expected[:cut]
        assert generation.stopped == (stop in expected)
    assert stopped[0].stopped


def test_sampling_is_reproducible_with_a_generator(tiny):
    model, tokenizer = tiny
    prefix = from_text(model, tokenizer, CORPUS)
    prompt = [tokenizer("Tell me about the pump")["input_ids"]] * 3

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        outputs = generate(model, prompt, prefix=prefix, temperature=1.0, generator=generator)
        return [g.token_ids for g in outputs]

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_empty_prompts_are_refused(tiny):
    model, _ = tiny
    assert generate(model, []) == []
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
