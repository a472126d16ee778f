"""Deterministic distillation data for training tests: a document, conversations, teacher top-k."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch

from cartridges.batching import Example
from cartridges.initialization import from_token_ids
from cartridges.prefix import forward_with_prefix
from cartridges.synthesis.runs import conversation_tables
from cartridges.synthesis.self_study import Conversation
from tests.architectures import VOCAB_SIZE, build_model

TOP_K = 8


@torch.no_grad()
def make_examples(model, document: list[int], count: int, seed: int = 0) -> list[Example]:
    """Conversations of random tokens; targets: the model's top-k with the document in context."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(6, 14, (1,), generator=generator))
        tokens = torch.randint(3, VOCAB_SIZE, (length,), generator=generator)
        logits = model(input_ids=torch.tensor([document + tokens.tolist()])).logits[0]
        logprobs = torch.log_softmax(logits[len(document) : -1], dim=-1)  # predicts tokens[1:]
        values, ids = logprobs.topk(TOP_K, dim=-1)
        examples.append(Example(tokens, torch.arange(1, length), ids, values))
    return examples


def setting(seed: int = 0):
    """``(model, document, examples, cartridge)`` with the cartridge from the document's start."""
    # Large initial weights make the context matter to a random model, so there is a gap to close.
    model = build_model("llama", initializer_range=0.5)
    generator = torch.Generator().manual_seed(seed + 100)
    document = torch.randint(3, VOCAB_SIZE, (48,), generator=generator).tolist()
    examples = make_examples(model, document, 24, seed)
    cartridge = from_token_ids(model, document[:1] + document[-11:], num_frozen_tokens=1)
    return model, document, examples, cartridge


def assert_rows_match_alone(model, cartridge, examples, rows, packed) -> None:
    """Each conversation of a packed batch gets the logits it gets alone after the cartridge."""
    logits = forward_with_prefix(
        model,
        cartridge.as_cache(len(rows), model.config),
        packed.input_ids,
        packed.attention_mask,
        position_ids=packed.position_ids,
    ).logits
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            tokens = examples[index].token_ids
            alone = forward_with_prefix(
                model, cartridge.as_cache(1, model.config), tokens[None]
            ).logits
            assert (logits[r, offset : offset + len(tokens)] - alone[0]).abs().max() <= 1e-5
            offset += len(tokens)


def to_tables(conversations: Iterable[Conversation]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``conversations`` and ``teacher_logprobs`` tables of ``conversations``, in memory, as
    self-study writes them."""
    conversations_table, targets_table = conversation_tables(list(conversations))
    return conversations_table.to_pandas(), targets_table.to_pandas()
