"""Batched decoding after a prefix."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cartridges.cartridge import CartridgeMismatchError
from cartridges.generation import Step, decoding_cache, default_stop_ids, generate, left_pad
from cartridges.initialization import from_text, from_token_ids
from cartridges.modeling import sliding_window
from cartridges_testing.tiny_model import build_model as build_tiny_model
from tests.architectures import build_model
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
    free = generate(model, prompts, max_new_tokens=5, stop_token_ids=())
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


def generate_reporting_steps(model, prompts, **kwargs):
    """``generate``'s outputs and what ``on_step`` saw: the steps, and each row's tokens."""
    steps: list[Step] = []
    tokens: dict[int, list[int]] = {row: [] for row in range(len(prompts))}

    def on_step(step: Step) -> None:
        steps.append(step)
        for row, token in zip(step.rows, step.token_ids.tolist(), strict=True):
            tokens[row].append(token)

    return generate(model, prompts, on_step=on_step, **kwargs), steps, tokens


def test_on_step_reports_the_tokens_generate_returns(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(text)["input_ids"] for text in ("pump", "the seal", "Alarm E21 signals")]
    free = generate(model, prompts, max_new_tokens=6, stop_token_ids=())
    stop = free[1].token_ids[1]  # ends row 1 (at least) early, the others decode on
    kwargs = dict(max_new_tokens=6, stop_token_ids=[stop], top_logprobs=3)
    plain = generate(model, prompts, **kwargs)
    reported, steps, tokens = generate_reporting_steps(model, prompts, **kwargs)
    assert [tokens[row] for row in range(3)] == [g.token_ids for g in plain]
    assert any(len(step.rows) < 3 for step in steps)  # a stopped row is no longer reported
    for ours, theirs in zip(reported, plain, strict=True):  # the callback changes nothing
        assert ours.token_ids == theirs.token_ids and ours.stopped == theirs.stopped
        assert torch.equal(ours.top_ids, theirs.top_ids)
        assert torch.equal(ours.top_logprobs, theirs.top_logprobs)
    for step in steps:
        assert step.index == steps.index(step)
        for i, row in enumerate(step.rows):
            assert torch.equal(step.top_ids[i], plain[row].top_ids[step.index])
            assert step.logprobs[i] == plain[row].top_logprobs[step.index, 0]  # greedy: top-1


def test_on_step_maps_sliding_window_groups_back_to_their_rows():
    model = build_model("gemma2")
    assert sliding_window(model.config) is not None
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15], [16, 17, 18, 19, 20]]
    free = generate(model, prompts, max_new_tokens=5, stop_token_ids=())
    stop = free[2].token_ids[1]
    plain = generate(model, prompts, max_new_tokens=5, stop_token_ids=[stop])
    reported, steps, tokens = generate_reporting_steps(
        model, prompts, max_new_tokens=5, stop_token_ids=[stop]
    )
    assert [tokens[row] for row in range(4)] == [g.token_ids for g in plain]
    assert [g.token_ids for g in reported] == [g.token_ids for g in plain]
    assert steps[0].rows == [0, 2]  # equal-length prompts decode together, one group after another
    assert [0] in [step.rows for step in steps]  # row 2 stopped, row 0 went on
    assert {row for step in steps for row in step.rows} == {0, 1, 2, 3}
    assert all(step.logprobs.numel() == 0 for step in steps)  # none asked


# ------------------------------------------------------------------- end of sequence
def test_rows_stop_at_the_models_end_of_sequence_unless_told_otherwise():
    model = build_model("llama")
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    free = generate(model, prompts, max_new_tokens=8, stop_token_ids=())
    eos = free[0].token_ids[3]
    model.generation_config.eos_token_id = [eos, 95]  # a list, as Llama 3 has
    ended = generate(model, prompts, max_new_tokens=8)
    for row, generation in enumerate(ended):
        expected = free[row].token_ids
        cut = expected.index(eos) + 1 if eos in expected else len(expected)
        assert generation.token_ids == expected[:cut]
        assert generation.stopped == (eos in expected)
    assert ended[0].stopped
    unstopped = generate(model, prompts, max_new_tokens=8, stop_token_ids=())
    assert [g.token_ids for g in unstopped] == [g.token_ids for g in free]


def test_the_default_stop_ids_are_the_models_and_the_tokenizers_end_of_sequence():
    model = build_model("llama")
    model.generation_config.eos_token_id = [7, 3]
    assert default_stop_ids(model) == [3, 7]
    assert default_stop_ids(model, SimpleNamespace(eos_token_id=11)) == [3, 7, 11]
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = 4  # a model saved without a generation config
    assert default_stop_ids(model, SimpleNamespace(eos_token_id=None)) == [4]


def test_generate_stops_at_the_tokenizers_end_of_sequence_when_given_one():
    model = build_model("qwen2")  # its config names no end-of-sequence token
    assert default_stop_ids(model) == []
    prompts = [[5, 6, 7]]
    (free,) = generate(model, prompts, max_new_tokens=8)
    eos = free.token_ids[2]
    tokenizer = SimpleNamespace(eos_token_id=eos)
    (ended,) = generate(model, prompts, max_new_tokens=8, tokenizer=tokenizer)
    assert ended.stopped and ended.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]


# ---------------------------------------------------------------- another model's cartridge
@pytest.mark.parametrize(
    ("shape", "theirs"),
    [
        ({"num_hidden_layers": 3}, "layers=3, kv_heads=2, head_dim=16"),
        ({"num_key_value_heads": 1}, "layers=2, kv_heads=1, head_dim=16"),
    ],
)
def test_a_cartridge_made_for_another_kv_layout_is_refused_up_front(tiny, shape, theirs):
    model, tokenizer = tiny
    other = build_tiny_model(len(tokenizer), **shape)
    cartridge = from_token_ids(other, tokenizer(CORPUS)["input_ids"][:6])
    ours = "layers=2, kv_heads=2, head_dim=16"
    message = rf"Cartridge KV layout \({theirs},.*does not match.*\({ours}\)"
    with pytest.raises(CartridgeMismatchError, match=message):
        generate(model, [[1, 2, 3]], prefix=cartridge, max_new_tokens=2)
    with pytest.raises(CartridgeMismatchError, match=message):
        decoding_cache(model, cartridge, batch_size=1, capacity=16)
