"""How a method reads a question: its prompt tokens, its greedy answers, its log-probabilities.

A method's question tokens follow the chat convention of the project: after a prefix they are
``continuation_ids(system_text, messages)`` (the prefix stands in for the system message that
carries the corpus); with no prefix they are a fresh chat. Every rendering takes the model's
chat-template switches (``template_kwargs``, e.g. Qwen3's ``enable_thinking``), so a question is
asked exactly as the model is asked everywhere else. Scoring the answers is the tasks' business.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.chat import Message, TemplateKwargs, chat_ids, continuation_ids
from cartridges.decoding.continuous import Request, complete
from cartridges.decoding.shared_prefix import UnsupportedModelError
from cartridges.evaluation.methods import Method
from cartridges.evaluation.questions import Question, prompt_text
from cartridges.generation import default_stop_ids, generate
from cartridges.modeling import kv_layout, pad_token_id
from cartridges.prefix import forward_with_prefix, head_only_at

logger = logging.getLogger(__name__)

QUESTION_BATCH = 16  # questions answered (or their reference answers scored) together

_WARNED: weakref.WeakSet[PreTrainedModel] = weakref.WeakSet()  # models already warned about


def user_message(question: Question) -> Message:
    """The user turn that asks ``question`` (options listed for multiple choice)."""
    return {"role": "user", "content": prompt_text(question)}


def question_ids(
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    system_text: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    template_kwargs: TemplateKwargs = None,
) -> list[int]:
    """The tokens that follow the method's prefix: the chat continuation, or a fresh chat."""
    if method.prefix is None:
        return chat_ids(tokenizer, messages, add_generation_prompt, template_kwargs)
    return continuation_ids(
        tokenizer, system_text, messages, add_generation_prompt, template_kwargs
    )


def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    questions: Sequence[Question],
    system_text: str,
    max_new_tokens: int,
    batch_size: int = QUESTION_BATCH,
    template_kwargs: TemplateKwargs = None,
) -> list[str]:
    """Greedy answers of ``method`` to each question (options listed for multiple choice).

    Decoded as the server decodes (:func:`cartridges.decoding.continuous.complete`: the prefix held
    once for all ``batch_size`` rows); a model whose attention cannot share a prefix decodes with
    :func:`cartridges.generation.generate`, ``batch_size`` questions at a time. Both give the
    tokens ``generate`` gives each question alone. A routed method answers each group of
    questions that share a selection after that selection's prefix.
    """
    if method.routes is not None:
        groups: dict[tuple[str, ...], list[int]] = {}
        for index, question in enumerate(questions):
            groups.setdefault(method.routes.choose(question), []).append(index)
        answers = [""] * len(questions)
        for indices in groups.values():
            asked = [questions[i] for i in indices]
            group = answer_questions(
                model,
                tokenizer,
                method.for_question(asked[0]),
                asked,
                system_text,
                max_new_tokens,
                batch_size,
                template_kwargs,
            )
            for index, answer in zip(indices, group, strict=True):
                answers[index] = answer
        return answers
    prompts = [
        question_ids(
            tokenizer, method, system_text, [user_message(q)], template_kwargs=template_kwargs
        )
        for q in questions
    ]
    stop, pad = default_stop_ids(model, tokenizer), pad_token_id(tokenizer)
    try:
        requests = [Request(p, method.prefix, max_new_tokens, stop_token_ids=stop) for p in prompts]
        answers = [
            [token.token_id for token in tokens]
            for tokens in complete(model, requests, max_batch_size=batch_size, pad_token_id=pad)
        ]
    except UnsupportedModelError as error:
        _warn_once(model, error)
        answers = []
        for start in range(0, len(prompts), batch_size):
            generations = generate(
                model,
                prompts[start : start + batch_size],
                prefix=method.prefix,
                max_new_tokens=max_new_tokens,
                stop_token_ids=stop,
                pad_token_id=pad,
            )
            answers += [g.token_ids for g in generations]
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]


def _warn_once(model: PreTrainedModel, error: UnsupportedModelError) -> None:
    if model in _WARNED:
        return
    _WARNED.add(model)
    logger.warning("Answers decoded one fixed batch at a time (prefix copied per row): %s", error)


def generation_suffix(tokenizer: PreTrainedTokenizerBase, template_kwargs: TemplateKwargs) -> int:
    """How many tokens ``add_generation_prompt`` appends after a finished turn."""
    messages = [{"role": "user", "content": "x"}]
    prompted = chat_ids(tokenizer, messages, True, template_kwargs)
    return len(prompted) - len(chat_ids(tokenizer, messages, False, template_kwargs))


@torch.no_grad()
def token_logprobs(
    model: PreTrainedModel, method: Method, token_ids: Sequence[int], positions: Iterable[int]
) -> torch.Tensor:
    """``[N, V]`` float32 log-probabilities of the tokens at ``positions``, after the prefix."""
    return rows_logprobs(model, method, [(token_ids, list(positions))])[0]


# Keys and values a batched forward may hold for its rows (each row extends its own copy of the
# prefix): 256 MiB, e.g. 5.8k tokens on a 135M model in float32 (16 rows of 360 tokens, or one
# row of a 5k-token context), 2k on an 8B model in bfloat16.
_BATCH_KV_BYTES = 1 << 28


@torch.no_grad()
def rows_logprobs(
    model: PreTrainedModel,
    method: Method,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int = 0,
) -> list[torch.Tensor]:
    """:func:`token_logprobs` of each ``(token ids, positions)`` row, in one right-padded
    forward (a row's tokens never attend to the padding after them)."""
    longest = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), longest), pad_token_id, device=model.device)
    mask = torch.zeros_like(ids)
    for row, (row_ids, _) in enumerate(rows):
        ids[row, : len(row_ids)] = torch.tensor(list(row_ids), device=model.device)
        mask[row, : len(row_ids)] = 1
    at_row = [row for row, (_, positions) in enumerate(rows) for _ in positions]
    columns = [p - 1 for _, positions in rows for p in positions]  # i-1 predicts i
    cache = method.prefix.as_cache(len(rows), model.config) if method.prefix is not None else None
    with head_only_at(
        model, torch.tensor(at_row, device=model.device), torch.tensor(columns, device=model.device)
    ):
        logits = forward_with_prefix(model, cache, ids, mask, use_cache=False).logits[0]  # [N, V]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return list(torch.split(logprobs, [len(positions) for _, positions in rows]))


def logprob_batches(
    model: PreTrainedModel, method: Method, lengths: Sequence[int], most_rows: int
) -> list[range]:
    """Consecutive rows of ``lengths`` tokens taken together by :func:`rows_logprobs`: at most
    ``most_rows``, and no more KV than ``_BATCH_KV_BYTES`` for their copies of the prefix."""
    per_token = kv_layout(model).bytes_per_token(model.dtype)
    batches, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and end - start < most_rows:
            span = method.num_tokens + max(lengths[start : end + 1])
            if (end + 1 - start) * span * per_token > _BATCH_KV_BYTES:
                break
            end += 1
        batches.append(range(start, end))
        start = end
    return batches
