"""A cartridge holding a document's KV must behave exactly like the document in context."""

from __future__ import annotations

import pytest
import torch
import transformers

from cartridges.generation import generate
from cartridges.initialization import from_token_ids
from cartridges.prefix import forward_with_prefix, head_only_at
from tests.architectures import ARCHITECTURES, VOCAB_SIZE, _llama_like, build_model

DOC_LEN = 40
QUERY_LENGTHS = (5, 9, 3)


def _random_ids(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist()


def _padded(queries: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    width = max(map(len, queries))
    ids = torch.zeros(len(queries), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    spans = []
    for row, query in enumerate(queries):
        span = slice(0, len(query)) if side == "right" else slice(width - len(query), width)
        ids[row, span] = torch.tensor(query)
        mask[row, span] = 1
        spans.append(span)
    return ids, mask, spans


def _max_logit_error(model, document: list[int], queries: list[list[int]], side: str) -> float:
    cartridge = from_token_ids(model, document)
    ids, mask, spans = _padded(queries, side)
    batched = forward_with_prefix(model, cartridge.as_cache(len(queries), model.config), ids, mask)
    error = 0.0
    for row, (query, span) in enumerate(zip(queries, spans, strict=True)):
        reference = model(input_ids=torch.tensor([document + query])).logits[0, len(document) :]
        error = max(error, (batched.logits[row, span] - reference).abs().max().item())
    return error


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_cartridge_of_whole_document_equals_document_in_context(architecture, side):
    model = build_model(architecture)
    generator = torch.Generator().manual_seed(1)
    document = _random_ids(generator, DOC_LEN)
    queries = [_random_ids(generator, n) for n in QUERY_LENGTHS]
    assert _max_logit_error(model, document, queries, side) <= 1e-4


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_head_only_at_targets_equals_full_logits_gathered(architecture):
    """Training's gathered head gives the logits the full head gives at the same positions."""
    model = build_model(architecture)
    generator = torch.Generator().manual_seed(2)
    cartridge = from_token_ids(model, _random_ids(generator, DOC_LEN))
    ids, mask, _ = _padded([_random_ids(generator, n) for n in QUERY_LENGTHS], "right")
    rows, columns = torch.tensor([0, 2, 1, 0, 1]), torch.tensor([4, 0, 8, 1, 3])
    full = forward_with_prefix(model, cartridge.as_cache(3, model.config), ids, mask).logits
    with head_only_at(model, rows, columns):
        gathered = forward_with_prefix(model, cartridge.as_cache(3, model.config), ids, mask)
    assert gathered.logits.shape == (1, len(rows), model.config.vocab_size)
    assert (gathered.logits[0] - full[rows, columns]).abs().max() <= 1e-5
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone afterwards


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_batched_greedy_generation_matches_document_in_context(architecture):
    model = build_model(architecture)
    generator = torch.Generator().manual_seed(2)
    document = _random_ids(generator, DOC_LEN)
    prompts = [_random_ids(generator, n) for n in QUERY_LENGTHS]
    ours = generate(
        model, prompts, prefix=from_token_ids(model, document), max_new_tokens=10, stop_token_ids=()
    )
    for prompt, generation in zip(prompts, ours, strict=True):
        reference = model.generate(
            torch.tensor([document + prompt]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[0, DOC_LEN + len(prompt) :]
        assert generation.token_ids == reference.tolist()


SLIDING = {
    "mistral": lambda: _llama_like(transformers.MistralConfig, sliding_window=16),
    "gemma2": lambda: _llama_like(
        transformers.Gemma2Config, head_dim=16, sliding_window=16, attn_implementation="eager"
    ),
    "gemma3": lambda: _llama_like(
        transformers.Gemma3TextConfig, head_dim=16, sliding_window=16, attn_implementation="eager"
    ),
}


@pytest.mark.parametrize("architecture", sorted(SLIDING))
def test_prefix_longer_than_sliding_window_stays_exact(architecture):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(SLIDING[architecture]()).eval()
    generator = torch.Generator().manual_seed(3)
    document = _random_ids(generator, DOC_LEN)  # 40 tokens > window of 16
    queries = [_random_ids(generator, n) for n in QUERY_LENGTHS]
    assert _max_logit_error(model, document, queries, "right") <= 1e-4
    # Left padding would shift the windows: refused in a forward pass, avoided by generate().
    with pytest.raises(ValueError, match="sliding-window attention layers"):
        _max_logit_error(model, document, queries, "left")
    ours = generate(
        model, queries, prefix=from_token_ids(model, document), max_new_tokens=8, stop_token_ids=()
    )
    for prompt, generation in zip(queries, ours, strict=True):
        reference = model.generate(
            torch.tensor([document + prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None
        )[0, DOC_LEN + len(prompt) :]
        assert generation.token_ids == reference.tolist()


def _random_batch(model, generator: torch.Generator, prefix_len: int):
    from cartridges.batching import Example, make_batch

    examples = []
    for length in (7, 12, 5):
        ids = torch.tensor(_random_ids(generator, length))
        values, top = torch.randn(length - 1, 4, generator=generator).log_softmax(-1).topk(3)
        examples.append(Example(ids, torch.arange(1, length), top, values))
    return make_batch(examples, [[0], [1], [2]], 0, prefix_len, model.dtype)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_the_chunked_loss_equals_the_whole_loss_and_its_gradient(architecture):
    from cartridges.objective import loss_sum

    # A soft cap small enough to matter, so that the chunked logits must reproduce it.
    capped = {"final_logit_softcapping": 0.5} if architecture.startswith("gemma") else {}
    model = build_model(architecture, **capped)
    generator = torch.Generator().manual_seed(3)
    cartridge = from_token_ids(model, _random_ids(generator, DOC_LEN))
    batch = _random_batch(model, generator, cartridge.num_tokens)
    results = []
    for chunk_size in (0, 4):  # 21 targets: one piece, or six chunks
        cartridge.trainable_keys.grad = None
        loss = loss_sum(model, cartridge.as_cache(3, model.config), batch, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), cartridge.trainable_keys.grad.clone()))
    (whole, whole_grad), (chunked, chunked_grad) = results
    assert torch.allclose(chunked, whole, rtol=1e-5)
    assert torch.allclose(chunked_grad, whole_grad, rtol=1e-4, atol=1e-7)


def test_a_model_whose_logits_are_not_reproduced_is_refused_by_the_chunked_loss():
    from cartridges.objective import loss_sum

    model = build_model("llama")
    model.config.final_logit_softcapping = 0.5  # Llama ignores it; the chunked loss would not
    generator = torch.Generator().manual_seed(3)
    cartridge = from_token_ids(model, _random_ids(generator, DOC_LEN))
    batch = _random_batch(model, generator, cartridge.num_tokens)
    with pytest.raises(ValueError, match=r"post-processes its logits .* loss_chunk_size: 0"):
        loss_sum(model, cartridge.as_cache(3, model.config), batch, chunk_size=4)
