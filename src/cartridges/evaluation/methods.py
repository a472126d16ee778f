"""The methods compared: ways of giving a model its corpus, each a KV prefix (or none).

Every method is a prefix followed by the same question tokens, so the comparison differs only in
what the prefix holds and how many bytes it takes: the whole corpus in context (ICL), nothing,
the first p context tokens (truncated ICL at a cartridge's budget), a trained cartridge, or,
with cartridges trained on one document each, each of those alone and their composition, next to
ICL over the composed documents, and a library of them routed per question (a retriever picks
which cartridges each question is answered with; the oracle picks its own document's). A method
may be scored on the questions about some documents only (a document's cartridge on its own
document's questions).
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges.cartridge import Cartridge, CartridgeMismatchError, compose
from cartridges.chat import TemplateKwargs
from cartridges.context import corpus_context
from cartridges.corpus import require_documents, text_digest
from cartridges.initialization import from_token_ids
from cartridges.lineage import catalog_version
from cartridges.modeling import context_length, synchronize
from cartridges.routing import RoutingConfig, make_retriever, select

if TYPE_CHECKING:
    from cartridges.evaluation.questions import Question

logger = logging.getLogger(__name__)

_SELECTIONS_KEPT = 8  # compositions a routed method keeps between questions

KINDS: dict[str, str] = {
    "icl": "ICL (whole corpus)",
    "no_context": "no context",
    "truncated_icl": "truncated ICL",
    "cartridge": "cartridge",
    "document_cartridge": "cartridge of one document",
    "document_icl": "ICL (composed documents)",
    "composition": "composed document cartridges",
    "routed": "routed document cartridges",
    "oracle_selection": "oracle-selected document cartridges",
}
"""The kinds of method, with their human names (legends, tables)."""


@dataclass
class Method:
    """A way to answer: a KV prefix (``None``: no context) that the question tokens follow.

    Attributes:
        name: report name (``icl``, ``no_context``, ``truncated_icl_p32``, ``cartridge``, ...).
        kind: ``icl``, ``no_context``, ``truncated_icl``, ``cartridge`` or ``composition``.
        prefix: the KV the questions follow.
        context_ids: the tokens an in-context prefix is the KV of (``None`` for a cartridge,
            which is stored, not computed); prefill time counts computing them.
        version: the catalog version of a trained cartridge.
        note: a caveat shown in the report (e.g. the context was cut to fit the model).
        documents: names of the documents whose questions it is scored on (``None``: all).
        uncut_tokens: for a context cut to fit the model, how many tokens it has whole (the
            compression of every method is measured against the whole corpus in context).
        kv_seconds: how long computing the prefix from ``context_ids`` took when it was built
            (the prefill a request pays that does not have it), so that timing it is not
            repeated; ``None``: not timed.
        routes: for a routed method, the prefix of each question (:meth:`for_question`);
            ``prefix`` is then the largest any question gets, for the cost columns.
    """

    name: str
    kind: str
    prefix: Cartridge | None
    context_ids: list[int] | None = None
    version: str = ""
    note: str = ""
    documents: tuple[str, ...] | None = None
    uncut_tokens: int | None = None
    kv_seconds: float | None = None
    routes: Routes | None = None

    def for_question(self, question: Question) -> Method:
        """The method that answers ``question``: itself, or for a routed method the composition
        of the cartridges its router picks for that question."""
        return self if self.routes is None else self.routes.method(self, question)

    @property
    def whole_kv_bytes(self) -> float:
        """KV bytes of the whole context this prefix holds (more than ``kv_bytes`` when cut)."""
        if not self.num_tokens:
            return 0.0
        return self.kv_bytes * (self.uncut_tokens or self.num_tokens) / self.num_tokens

    @property
    def questions(self) -> str:
        """Which questions it answers, as the report says: ``all`` or the documents' names."""
        return "+".join(self.documents) if self.documents is not None else "all"

    @property
    def num_tokens(self) -> int:
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def kv_bytes(self) -> int:
        """Exact KV cache bytes of the prefix: p x layers x (K, V) x kv_heads x head_dim x dtype."""
        return self.prefix.kv_bytes if self.prefix is not None else 0


@dataclass
class Routes:
    """Per question, the composition of a library's cartridges that a router picks.

    Attributes:
        cartridges: the library by document name, in composition order, on the model's device.
        choose: question -> the documents to load, in library order (:func:`cartridges.routing.
            select`).
        identity: what else decides the choice (router, top-k), for the saved results' digest.
    """

    cartridges: Mapping[str, Cartridge]
    choose: Callable[[Question], tuple[str, ...]]
    identity: str
    _methods: OrderedDict[tuple[str, ...], Method] = field(default_factory=OrderedDict, repr=False)

    def method(self, routed: Method, question: Question) -> Method:
        """The method ``routed`` answers ``question`` with: one per selection, the last few
        kept (a composition of several cartridges is a KV cache of its own)."""
        names = self.choose(question)
        if not names:
            raise ValueError(f"{routed.name} selected no cartridge for {question.question!r}.")
        if names in self._methods:
            self._methods.move_to_end(names)
            return self._methods[names]
        parts = [self.cartridges[name] for name in names]
        self._methods[names] = replace(
            routed,
            name=f"{routed.name}[{'+'.join(names)}]",
            prefix=parts[0] if len(parts) == 1 else compose(parts),
            routes=None,
        )
        while len(self._methods) > _SELECTIONS_KEPT:
            self._methods.popitem(last=False)
        return self._methods[names]


def context_budget(model: PreTrainedModel, reserve_tokens: int, limit: int | None = None) -> int:
    """How many context tokens fit: the model's positions minus room for questions and answers."""
    limit = limit or context_length(model.config)
    if limit is None:
        raise ValueError(
            f"The config of '{model.name_or_path}' does not say its context length "
            "(max_position_embeddings): set evaluation.max_context_tokens."
        )
    return max(limit - reserve_tokens, 1)


@dataclass
class DocumentCartridges:
    """Cartridges trained on one document each, to be scored alone and composed.

    Attributes:
        cartridges: by document name, in the order to compose them.
        context: token ids of the system message carrying those documents together (the ICL
            the composition is compared with).
        versions: catalog version of each, for the report (of the whole library).
        compose: also evaluate their composition (with two or more).
        library: every document cartridge, routed per question when ``routing`` asks for it.
        texts: the library's documents' texts, by document name (what a retriever indexes).
        routing: how questions are routed to the library; ``None``: not at all.
    """

    cartridges: Mapping[str, Cartridge]
    context: Sequence[int]
    versions: Mapping[str, str] = field(default_factory=dict)
    compose: bool = True
    library: Mapping[str, Cartridge] = field(default_factory=dict)
    texts: Mapping[str, str] = field(default_factory=dict)
    routing: RoutingConfig | None = None

    @classmethod
    def select(
        cls,
        available: Mapping[str, Cartridge],
        names: Sequence[str],
        texts: Mapping[str, str],
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str,
        template_kwargs: TemplateKwargs = None,
        compose: bool = True,
        routing: RoutingConfig | None = None,
    ) -> DocumentCartridges | None:
        """The cartridges of the documents ``names`` (in that order; all when empty), with the
        ICL context of those documents together, and the whole library for ``routing``;
        ``None`` when there is none.

        Args:
            available: the trained document cartridges by document name.
            texts: every document's text by document name (the corpus).

        Raises:
            ValueError: a name has no cartridge, or a cartridge no document in the corpus.
        """
        unknown = [name for name in names if name not in available]
        if unknown:
            raise ValueError(
                f"evaluation.documents names {unknown}, which have no document cartridge; the "
                f"latest document_cartridges has {sorted(available) or 'none'} (set "
                "distill_training.document_compression to train one per document)."
            )
        chosen = {name: available[name] for name in names} if names else dict(available)
        if not chosen:
            return None
        routed = routing is not None and routing.top_k > 0
        needed = {**chosen, **available} if routed else chosen
        require_documents(needed, texts, "The document cartridges", "the corpus")
        together = [texts[name] for name in chosen]
        return cls(
            chosen,
            corpus_context(together, tokenizer, system_prompt, template_kwargs).ids,
            {name: catalog_version(cartridge) for name, cartridge in available.items()},
            compose,
            library=dict(available) if routed else {},
            texts={name: texts[name] for name in available} if routed else {},
            routing=routing if routed else None,
        )


def build_methods(
    model: PreTrainedModel,
    context: Sequence[int],
    cartridges: Mapping[str, Cartridge],
    budget: int,
    versions: Mapping[str, str] | None = None,
    documents: DocumentCartridges | None = None,
) -> list[Method]:
    """ICL, no context, per cartridge the cartridge and ICL truncated to its size p, and the
    cartridges of single documents (alone, composed, and ICL over their documents).

    Args:
        model: the frozen model every prefix is computed with and checked against.
        context: token ids of the system message carrying the whole corpus.
        cartridges: trained cartridges by report name, in the order to report them.
        budget: the most context tokens that fit the model (see :func:`context_budget`); a
            longer ICL context is cut to its first ``budget`` tokens and flagged.
        versions: catalog version of each cartridge, for the report.
        documents: cartridges of one document each; each is scored on its own document's
            questions, their composition and the ICL of their documents on theirs.

    Raises:
        CartridgeMismatchError: a cartridge was made for another model.
    """
    whole = len(context)
    context, note = _fit(list(context), budget, "ICL")
    methods = [
        _in_context(model, "icl", "icl", context, note=note, uncut_tokens=whole),
        Method("no_context", "no_context", None),
    ]
    versions = dict(versions or {})
    for name, cartridge in cartridges.items():
        _check(cartridge, model, name)
        cartridge = cartridge.to(model.device, model.dtype)
        methods.append(Method(name, "cartridge", cartridge, version=versions.get(name, "")))
        p = cartridge.num_tokens
        truncated = f"truncated_icl_p{p}"
        if p > len(context):
            logger.warning("No %s: the context has only %d tokens.", truncated, len(context))
        elif all(m.name != truncated for m in methods):
            prefix = context[:p]
            methods.append(_in_context(model, truncated, "truncated_icl", prefix))
    if documents is not None and (documents.cartridges or documents.routing is not None):
        methods += _document_methods(model, documents, budget)
    return methods


def _document_methods(
    model: PreTrainedModel, documents: DocumentCartridges, budget: int
) -> list[Method]:
    """Each document's cartridge on its questions; composed with ICL over the documents."""
    ready = {}  # checked and on the model's device, once each
    for name, cartridge in {**documents.cartridges, **documents.library}.items():
        _check(cartridge, model, f"the cartridge of document {name}")
        ready[name] = cartridge.to(model.device, model.dtype)
    methods = [
        Method(
            f"document_{name}",
            "document_cartridge",
            ready[name],
            version=documents.versions.get(name, ""),
            documents=(name,),
        )
        for name in documents.cartridges
    ]
    if documents.routing is not None:
        library = {name: ready[name] for name in documents.library}
        methods += _routed_methods(library, documents, documents.routing, budget)
    names = tuple(documents.cartridges)
    if not documents.compose or len(names) < 2:
        return methods
    composed = compose(list(documents.cartridges.values()))
    if composed.num_tokens > budget:
        logger.warning(
            "No composition: its %d tokens exceed the %d the model has room for.",
            composed.num_tokens,
            budget,
        )
        return methods
    context, note = _fit(list(documents.context), budget, "ICL of the composed documents")
    methods.append(
        _in_context(
            model,
            "icl_documents",
            "document_icl",
            context,
            note=note,
            documents=names,
            uncut_tokens=len(documents.context),
        )
    )
    methods.append(
        Method(
            "composition",
            "composition",
            composed.to(model.device, model.dtype),
            # The composition's row names the exact versions it is made of.
            version=" + ".join(documents.versions.get(name, "") for name in names),
            note=f"cartridges of {', '.join(names)}, trained separately, concatenated",
            documents=names,
        )
    )
    return methods


def _routed_methods(
    library: Mapping[str, Cartridge],
    documents: DocumentCartridges,
    routing: RoutingConfig,
    budget: int,
) -> list[Method]:
    """The ``library`` (checked, on the model's device) routed per question by the retriever,
    and by the oracle (each question's own document), each scored on the questions about any
    document of the library."""
    names = list(library)
    top_k = min(routing.top_k, len(names))
    largest_pick = sorted(names, key=lambda name: -library[name].num_tokens)[:top_k]
    largest = sum(library[name].num_tokens for name in largest_pick)
    if largest > budget:
        logger.warning(
            "No routed method: %d cartridges can take %d tokens, more than the %d the model has "
            "room for (lower evaluation.routing.top_k).",
            top_k,
            largest,
            budget,
        )
        return []
    retriever = make_retriever(
        routing.retriever, [documents.texts[name] for name in names], **routing.retriever_options
    )
    chosen: dict[Question, tuple[str, ...]] = {}
    unmatched: list[str] = []

    def route(question: Question) -> tuple[str, ...]:
        if question not in chosen:
            scores = retriever.scores(question.question)
            if not (scores > 0).any() and not unmatched:
                unmatched.append(question.question)
                logger.warning(
                    "Routing %r: no document shares a word with it, so it goes to the first %d "
                    "of the library (and any other such question).",
                    question.question,
                    top_k,
                )
            chosen[question] = select(scores, names, top_k)
        return chosen[question]

    version = " + ".join(documents.versions.get(name, "") for name in names)
    scope = tuple(names)
    methods = [
        Method(
            f"routed_top{top_k}",
            "routed",
            compose([library[name] for name in largest_pick]),  # the largest a question gets
            version=version,
            note=f"per question, the top {top_k} of {len(names)} document cartridges by "
            f"{routing.retriever}, composed",
            documents=scope,
            routes=Routes(library, route, _routing_identity(routing, documents.texts, names)),
        )
    ]
    if routing.oracle:
        methods.append(
            Method(
                "oracle_selection",
                "oracle_selection",
                library[names[0]],
                version=version,
                note="per question, the cartridge of the document it is about",
                documents=scope,
                routes=Routes(library, lambda question: (question.document,), "oracle"),
            )
        )
    return methods


def _routing_identity(routing: RoutingConfig, texts: Mapping[str, str], names: list[str]) -> str:
    """What a routed method's picks depend on besides its cartridges: the retriever, its
    settings and version, top-k and the texts it indexes (for the saved results' digest)."""
    indexed = text_digest("\0".join(f"{name}\0{text_digest(texts[name])}" for name in names))
    package = "bm25s" if routing.retriever == "bm25" else routing.retriever.split(".")[0]
    try:
        library_version = importlib.metadata.version(package.split(":")[0])
    except importlib.metadata.PackageNotFoundError:
        library_version = ""
    options = sorted(routing.retriever_options.items())
    return f"{routing.retriever} {library_version} {options} {routing.top_k} {indexed}"


def _fit(context: list[int], budget: int, what: str) -> tuple[list[int], str]:
    """The context cut to the budget, and the caveat the report shows when it was cut."""
    if len(context) <= budget:
        return context, ""
    note = f"context truncated from {len(context)} to {budget} tokens to fit the model"
    logger.warning("%s: %s", what, note)
    return context[:budget], note


def _in_context(
    model: PreTrainedModel, name: str, kind: str, token_ids: list[int], **fields: Any
) -> Method:
    """A method whose prefix is the KV of ``token_ids``, with the time computing it took."""
    synchronize(model)
    started = time.perf_counter()
    prefix = from_token_ids(model, token_ids, num_frozen_tokens=0, initializer="context")
    synchronize(model)
    seconds = time.perf_counter() - started
    return Method(name, kind, prefix, token_ids, kv_seconds=seconds, **fields)


def _check(cartridge: Cartridge, model: PreTrainedModel, name: str) -> None:
    try:
        cartridge.check_compatible(model)
    except CartridgeMismatchError as error:
        raise CartridgeMismatchError(
            f"Refusing to evaluate '{name}' with model '{model.name_or_path}': {error} "
            "Evaluate it with the model it was trained for, or train a cartridge for this one."
        ) from error
