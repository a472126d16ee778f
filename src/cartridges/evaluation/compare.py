"""The whole comparison in one call: a corpus, cartridges and question sets -> the report.

It puts the corpus in context, chooses the document cartridges, decides what the evaluation
needs from the selected tasks (questions, held-out conversations), budgets the ICL context so
that the longest question and answer still fit the model, builds the methods and runs them.
Where the inputs come from (catalog versions, parameters) is the pipeline's business; scoring
is the tasks'.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.cartridge import Cartridge
from cartridges.chat import TemplateKwargs
from cartridges.context import corpus_context
from cartridges.corpus_tables import texts_by_document
from cartridges.evaluation.answers import question_ids, user_message
from cartridges.evaluation.config import EvalConfig
from cartridges.evaluation.conversations import (
    HeldOutConversation,
    held_out_conversations,
    held_out_ids,
)
from cartridges.evaluation.methods import (
    DocumentCartridges,
    Method,
    build_methods,
    context_budget,
)
from cartridges.evaluation.questions import Question, QuestionsError
from cartridges.evaluation.report import format_report
from cartridges.evaluation.run import evaluate
from cartridges.evaluation.tasks import Need
from cartridges.routing import RoutingConfig
from cartridges.tables import ShardedTable

logger = logging.getLogger(__name__)


def compare_methods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: pd.DataFrame,
    system_prompt: str,
    cartridges: Mapping[str, Cartridge],
    questions: Sequence[Question],
    conversations: pd.DataFrame | ShardedTable,
    teacher_logprobs: pd.DataFrame | ShardedTable,
    config: EvalConfig,
    *,
    versions: Mapping[str, str] | None = None,
    document_cartridges: Mapping[str, Cartridge] | None = None,
    documents: Sequence[str] = (),
    compose: bool = True,
    routing: RoutingConfig | None = None,
    max_context_tokens: int | None = None,
    template_kwargs: TemplateKwargs = None,
    results_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """ICL, no context, truncated ICL, ``cartridges`` and the document cartridges on
    ``config``'s tasks.

    Args:
        corpus: the corpus table (``doc_id``, ``source``, ``text``): ICL reads all of it in
            ``system_prompt`` (:func:`cartridges.context.corpus_context`).
        cartridges: by report name, in report order.
        questions: the question set (ignored unless a selected task needs questions).
        conversations, teacher_logprobs: self-study's tables; the conversations no cartridge
            trained on are used when a selected task needs held-out conversations.
        versions: catalog version of each cartridge, for the report.
        document_cartridges: cartridges of one document each, by document name: those of
            ``documents`` (all when empty) each scored on its own document's questions, with
            ``compose`` their composition on the questions about any of them, and with
            ``routing`` every one a candidate per question (:meth:`DocumentCartridges.select`).
        max_context_tokens: the ICL budget; ``None``: the model's context length.
        template_kwargs: the model's chat-template switches, used for every prompt.
        results_dir: where each (method, task) result is kept as it completes, so that a rerun
            with the same inputs resumes (:mod:`cartridges.evaluation.results`).
    """
    context = corpus_context(list(corpus["text"]), tokenizer, system_prompt, template_kwargs)
    documents = DocumentCartridges.select(
        document_cartridges or {},
        documents,
        texts_by_document(corpus) if document_cartridges else {},
        tokenizer,
        system_prompt,
        template_kwargs,
        compose,
        routing,
    )
    questions = list(questions) if config.needs(Need.QUESTIONS) else []
    held_out = []
    if config.needs(Need.CONVERSATIONS):
        held_out = held_out_conversations(
            conversations,
            teacher_logprobs,
            held_out_ids(cartridges),
            config.fidelity_conversations,
        )
        if not held_out:
            logger.warning("No held-out conversation with teacher targets: fidelity skipped.")
    if questions and documents is not None:
        _check_documents_asked(questions, documents.cartridges)
    reserve = _longest_input(tokenizer, questions, held_out, template_kwargs)
    budget = context_budget(model, reserve + config.max_new_tokens, max_context_tokens)
    methods = build_methods(model, context.ids, cartridges, budget, versions, documents)
    report = evaluate(
        model,
        tokenizer,
        methods,
        questions,
        held_out,
        context.system_text,
        config,
        template_kwargs,
        results_dir,
    )
    logger.info("Evaluation report:\n%s", format_report(report))
    return report


def _check_documents_asked(questions: Sequence[Question], documents: Mapping[str, Cartridge]):
    """Refuse a document cartridge that no question is about (it could not be scored)."""
    asked = {question.document for question in questions}
    missing = [name for name in documents if name not in asked]
    if missing:
        raise QuestionsError(
            f"No question is about the document(s) {missing} that have their own cartridge: "
            'give each question the "document" it is about (the file name without extension).'
        )


def _longest_input(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    conversations: Sequence[HeldOutConversation],
    template_kwargs: TemplateKwargs,
) -> int:
    """Tokens the longest question prompt or held-out conversation takes after the context."""
    no_context = Method("no_context", "no_context", None)
    prompts = [
        len(question_ids(tokenizer, no_context, "", [user_message(q)], True, template_kwargs))
        for q in questions
    ]
    return max([*prompts, *(len(c.token_ids) for c in conversations), 1])
