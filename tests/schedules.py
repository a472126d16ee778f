"""Run requests through a ContinuousBatcher on a schedule, and check each against generate alone."""

from __future__ import annotations

from dataclasses import replace

import torch

from cartridges.decoding.continuous import ContinuousBatcher, Request, Token
from cartridges.generation import generate

TOLERANCE = 1e-5


def run_schedule(
    batcher: ContinuousBatcher, schedule: list[tuple[int, Request]], max_steps: int = 500
) -> list[list[Token]]:
    """Add each request at its step (0: before the first); return each one's tokens in order."""
    tokens: dict[int, list[Token]] = {}
    order: dict[int, int] = {}
    for step in range(max_steps):
        for index, (at, request) in enumerate(schedule):
            if at == step:
                order[batcher.add(replace(request))] = index
        for token in batcher.step():
            tokens.setdefault(order[token.request_id], []).append(token)
        if step >= max(at for at, _ in schedule) and not batcher.has_work:
            return [tokens.get(index, []) for index in range(len(schedule))]
    raise AssertionError(f"The schedule did not finish within {max_steps} steps.")


def assert_same_as_generate(model, request: Request, tokens: list[Token]) -> None:
    """Token ids, finish and log-probabilities equal ``generate``'s for the request alone."""
    k = max(request.top_logprobs, 1)
    generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
    (expected,) = generate(
        model,
        [list(request.prompt)],
        prefix=request.prefix,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        stop_token_ids=request.stop_token_ids,
        top_logprobs=k,
        generator=generator,
    )
    assert [t.token_id for t in tokens] == expected.token_ids
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert [t.finished for t in tokens] == [False] * (len(tokens) - 1) + [True]
    assert tokens[-1].finish_reason == ("stop" if expected.stopped else "length")
    if request.logprobs or request.top_logprobs:
        hits = expected.top_ids == torch.tensor([t.token_id for t in tokens])[:, None]
        for token, row_hits, values in zip(tokens, hits, expected.top_logprobs, strict=True):
            if row_hits.any():  # the chosen token is among generate's top k (always when greedy)
                assert abs(token.logprob - float(values[row_hits][0])) < TOLERANCE
    if request.top_logprobs:
        top_ids = torch.tensor([t.top_ids for t in tokens])
        top_values = torch.tensor([t.top_logprobs for t in tokens])
        assert torch.equal(top_ids, expected.top_ids)
        assert torch.allclose(top_values, expected.top_logprobs, atol=TOLERANCE, rtol=0)
