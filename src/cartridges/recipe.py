"""How a cartridge is sized, where it starts, and which examples it trains and is measured on.

These rules are shared by the method (distill_training) and its parameterisation ablation
(lora_baseline): the adapter is compared with the cartridge on exactly the same training and
held-out conversations, so both read the split from here.

- Size: ``num_cartridge_tokens``, or the corpus in context (``cartridges.context``) divided by
  ``compression``.
- Start: the KV of the corpus's first p context tokens (``text``, the paper's best), of random
  tokens, or random vectors (``cartridges.initialization`` builds each).
- Examples: the conversations, shuffled by the seed and split into training and held-out; the
  ``objective`` picks the training targets (the teacher's top-k, the answer tokens only, or the
  raw chunks); optionally only those about some documents.
- Companions: frozen prefixes (the KV of chunks of the same corpus) that training may read the
  cartridge beside, so that it composes with others (``train.companion_prob``).

How the cartridge is then trained is ``cartridges.distillation``'s part.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Annotated

import pandas as pd
import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.batching import Example
from cartridges.cartridge import Cartridge
from cartridges.chat import TemplateKwargs, context_ids
from cartridges.context import CorpusContext
from cartridges.initialization import from_random_tokens, from_random_vectors, from_token_ids
from cartridges.modeling import context_length
from cartridges.tables import ShardedTable
from cartridges.target_store import LazyExamples, select, to_examples
from cartridges.targets import memorization_examples, one_hot, unsure_conversations

logger = logging.getLogger(__name__)
OBJECTIVES = ("distillation", "cross_entropy", "memorization")
INITIALIZERS = ("text", "random_tokens", "random_vectors")


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class Recipe:
    """The cartridge's size, start, objective and held-out share (``distill_training`` keys)."""

    num_cartridge_tokens: Annotated[int, Field(ge=1)] | None = None  # p; None: from compression
    compression: Annotated[float, Field(ge=1)] = 4.0  # p = corpus context tokens / compression
    num_frozen_tokens: Annotated[int, Field(ge=0)] = 1
    initializer: str = "text"
    objective: str = "distillation"
    held_out_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Leave out conversations in which the teacher gave its most likely answer token less than
    # this probability somewhere (it was guessing: the question asks what its chunk does not
    # hold); 0: keep all (the paper).
    min_teacher_confidence: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @field_validator("initializer", "objective")
    @classmethod
    def _known_choice(cls, value: str, info: ValidationInfo) -> str:
        choices = {"initializer": INITIALIZERS, "objective": OBJECTIVES}[info.field_name]
        if value not in choices:
            raise ValueError(f"Unknown {info.field_name} {value!r}; use one of {list(choices)}")
        return value

    def cartridge_size(self, context_tokens: int, compression: float | None = None) -> int:
        """``num_cartridge_tokens``, or the corpus context length divided by the compression.

        An explicit ``compression`` (a sweep's) always applies; at least one trainable token.
        """
        if compression is None and self.num_cartridge_tokens is not None:
            return self.num_cartridge_tokens
        ratio = self.compression if compression is None else compression
        return max(self.num_frozen_tokens + 1, round(context_tokens / ratio))


def initial_cartridge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: CorpusContext,
    recipe: Recipe,
    seed: int,
    compression: float | None = None,
) -> Cartridge:
    """The starting cartridge of ``recipe.cartridge_size`` tokens, by ``recipe.initializer``.

    Raises:
        ValueError: a ``text`` start longer than the corpus in context, or a cartridge that
            fills the model's positions (checked before any key or value is computed).
    """
    size = recipe.cartridge_size(context.num_tokens, compression)
    limit = context_length(model.config)
    if limit is not None and size >= limit:
        asked = (
            f"num_cartridge_tokens={size}"
            if compression is None and recipe.num_cartridge_tokens is not None
            else f"compression={compression or recipe.compression:g} of {context.num_tokens} "
            "corpus tokens"
        )
        raise ValueError(
            f"A cartridge of p={size} tokens ({asked}) does not fit '{model.name_or_path}', "
            f"which attends over {limit} positions shared by the cartridge and the "
            f"conversation after it. Set distill_training.num_cartridge_tokens below {limit} "
            f"(e.g. {limit // 2}) or a compression above {context.num_tokens / limit:.3g}."
        )
    frozen, how = recipe.num_frozen_tokens, recipe.initializer
    generator = torch.Generator().manual_seed(seed)
    if how == "random_tokens":
        return from_random_tokens(model, tokenizer, size, frozen, generator)
    if how == "random_vectors":
        return from_random_vectors(model, size, frozen, generator)
    if size > context.num_tokens:
        raise ValueError(
            f"num_cartridge_tokens={size} exceeds the {context.num_tokens} tokens of the corpus "
            "in context; lower it or use initializer: random_tokens."
        )
    return from_token_ids(
        model, context.ids[:size], frozen, initializer="text", source_sha256=context.sha256
    )


@dataclass
class Split:
    """Training and held-out examples, and the held-out conversations' ids (in example order)."""

    training: Sequence[Example]
    held_out: Sequence[Example]
    held_out_ids: list[str]


def split_examples(
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    chunk_set: pd.DataFrame,
    recipe: Recipe,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    documents: Collection[str] | None = None,
    held_out_ids: Sequence[str] | None = None,
) -> Split:
    """The examples of ``recipe.objective``, held out by ``held_out_fraction`` (seeded shuffle).

    ``documents`` (``doc_id``s) keeps only the conversations about chunks of those documents,
    and their chunks: a cartridge of one document learns nothing of the others. With shard
    handles the examples stay on disk: only an index is built here. ``held_out_ids`` (the ones
    a cartridge records) are held out instead of a fresh draw, so that a comparison trained
    later is measured on the cartridge's own held-out set whatever the parameters are now.

    Raises:
        ValueError: a conversation of ``held_out_ids`` is not among the examples.
    """
    examples, conversation_ids, order = _examples(
        conversations, teacher_logprobs, recipe, tokenizer
    )
    if documents is not None:
        about, kept = _documents_of(conversations, chunk_set), set(documents)
        order = [i for i in order if about.get(conversation_ids[i]) in kept]
    return _split(
        examples,
        conversation_ids,
        order,
        chunk_set,
        documents,
        recipe,
        seed,
        tokenizer,
        held_out_ids,
    )


def split_by_document(
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    chunk_set: pd.DataFrame,
    recipe: Recipe,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
) -> dict[str, Split]:
    """:func:`split_examples` for each of ``documents`` alone, reading the tables' index and the
    conversations' chunks once for all of them.

    A document no conversation is about is left out.
    """
    examples, conversation_ids, confident = _examples(
        conversations, teacher_logprobs, recipe, tokenizer
    )
    about = _documents_of(conversations, chunk_set)
    orders: dict[str, list[int]] = {document: [] for document in documents}
    for index in confident:
        order = orders.get(about.get(conversation_ids[index]))
        if order is not None:
            order.append(index)
    return {
        document: _split(
            examples, conversation_ids, order, chunk_set, [document], recipe, seed, tokenizer
        )
        for document, order in orders.items()
        if order
    }


def _examples(
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[Sequence[Example], Sequence[str], list[int]]:
    """The objective's examples (lazy over shards), each one's conversation id, and the indices
    of those whose teacher was sure enough to train on (``min_teacher_confidence``)."""
    examples = to_examples(conversations, teacher_logprobs, len(tokenizer))
    if isinstance(examples, LazyExamples):
        conversation_ids = examples.conversation_ids
    else:
        targeted = set(teacher_logprobs["conversation_id"])
        ids = conversations["conversation_id"]
        conversation_ids = list(ids[ids.isin(targeted)])
    if recipe.objective == "cross_entropy":
        examples = one_hot(examples)
    return examples, conversation_ids, _confident(conversation_ids, teacher_logprobs, recipe)


def _confident(
    conversation_ids: Sequence[str],
    teacher_logprobs: pd.DataFrame | ShardedTable,
    recipe: Recipe,
) -> list[int]:
    """Indices of the examples whose teacher was sure enough (``min_teacher_confidence``)."""
    unsure = unsure_conversations(teacher_logprobs, recipe.min_teacher_confidence)
    order = [i for i, name in enumerate(conversation_ids) if name not in unsure]
    if unsure:
        logger.info(
            "min_teacher_confidence=%g leaves out %d of %d conversations",
            recipe.min_teacher_confidence,
            len(conversation_ids) - len(order),
            len(conversation_ids),
        )
    if conversation_ids and not order:
        raise ValueError(
            f"min_teacher_confidence={recipe.min_teacher_confidence} leaves no conversation to "
            "train on: in every one the teacher was less sure than that; lower it."
        )
    return order


def _split(
    examples: Sequence[Example],
    conversation_ids: Sequence[str],
    order: list[int],
    chunk_set: pd.DataFrame,
    documents: Collection[str] | None,
    recipe: Recipe,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    held_out_ids: Sequence[str] | None = None,
) -> Split:
    """Shuffle ``order`` (indices of examples) by the seed and hold out the recipe's share,
    or exactly ``held_out_ids``."""
    if documents is not None:
        if not order:
            raise ValueError(f"No self-study conversation is about the documents {documents}.")
        chunk_set = chunk_set[chunk_set["doc_id"].isin(set(documents))]
    order = list(order)
    random.Random(seed).shuffle(order)
    if held_out_ids is None:
        count = max(1, int(len(order) * recipe.held_out_fraction)) if len(order) > 1 else 0
        held_out, train = order[:count], order[count:]
    else:
        index = {conversation_ids[i]: i for i in order}
        missing = [c for c in held_out_ids if c not in index]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(held_out_ids)} held-out conversations the "
                f"cartridge records are not among these conversations (e.g. '{missing[0]}'): "
                "pair the cartridge with the conversations it was trained on."
            )
        held_out = [index[c] for c in held_out_ids]
        kept = set(held_out)
        train = [i for i in order if i not in kept]
    training = select(examples, train)
    if recipe.objective == "memorization":
        # The baseline trains on the raw chunks; held-out KL is still measured on conversations.
        chunks = tokenizer(list(chunk_set["text"]), add_special_tokens=False)["input_ids"]
        training = memorization_examples(chunks)
    return Split(training, select(examples, held_out), [conversation_ids[i] for i in held_out])


def _documents_of(conversations: pd.DataFrame | ShardedTable, chunk_set: pd.DataFrame) -> dict:
    """``{conversation id: doc_id}`` from the conversations' chunks (two columns are read)."""
    columns = ["conversation_id", "chunk_id"]
    if isinstance(conversations, ShardedTable):
        rows = conversations.to_pandas(columns=columns)
    else:
        rows = conversations[columns]
    document = dict(zip(chunk_set["chunk_id"], chunk_set["doc_id"], strict=True))
    return dict(zip(rows["conversation_id"], rows["chunk_id"].map(document), strict=True))


@dataclass(frozen=True)
class Companions:
    """Where a cartridge's training companions come from: chunks of text, in context.

    A companion is a frozen prefix, the KV of one chunk in the system prompt, of at most the
    cartridge's size: a stand-in for the other cartridges it may be composed with
    (``train.companion_prob`` sets how often). The chunks are of its own corpus, or for a
    document cartridge with ``document_companions: others``, of the other documents
    (distractors); only their KV is read, never their conversations.
    """

    chunk_texts: Sequence[str]
    system_prompt: str
    template_kwargs: TemplateKwargs = None

    def prefixes(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        size: int,
        count: int,
        seed: int,
    ) -> list[Cartridge]:
        """Up to ``count`` companions of at most ``size`` tokens (a seeded choice of chunks)."""
        texts = list(dict.fromkeys(self.chunk_texts))
        chosen = random.Random(seed).sample(texts, min(count, len(texts)))
        prefixes = []
        for text in chosen:
            system_text = self.system_prompt.format(chunk=text)
            ids = context_ids(tokenizer, system_text, self.template_kwargs)[:size]
            prefixes.append(from_token_ids(model, ids, num_frozen_tokens=len(ids)))
        return prefixes
