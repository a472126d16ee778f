"""Serving settings: one frozen dataclass filled from ``params:serving`` and ``params:model``.

Kept free of Kedro so that the app factory can be built from a plain dict in tests and scripts;
only :mod:`cartridges.serving.cli` reads the project's ``conf/`` folder.
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Annotated, Any

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cartridges.checks import Problems

SCHEDULERS = ("continuous", "static")


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CartridgeSetConfig:
    """One named set of ``serving.cartridge_sets``.

    Args:
        cartridges: a folder of ``<document>.safetensors``, or a versioned set dataset's
            ``filepath`` (``document_cartridges``: its latest complete version is served).
        corpus_dir: the documents the cartridges were trained on (``document_prep.corpus_dir``):
            the retriever indexes their text; each cartridge's document must be there.
        select: cartridges a request gets when it gives no ``select``.
        retriever: a key of :data:`cartridges.routing.RETRIEVERS` or ``"package.module:Class"``.
        retriever_options: keyword arguments of the retriever.
    """

    cartridges: str
    corpus_dir: str
    select: Annotated[int, Field(ge=1)] = 1
    retriever: str = "bm25"
    retriever_options: dict[str, Any] = field(default_factory=dict)


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ServingConfig:
    """What the server serves and the limits it enforces.

    Args:
        model_name_or_path: the frozen LLM (hub name or local directory).
        dtype: its parameter dtype.
        device: ``cpu``, ``cuda``, ... or ``auto``.
        served_model_name: the id clients pass as ``model``; defaults to ``model_name_or_path``.
        host: interface to bind; ``127.0.0.1`` keeps the server local.
        port: TCP port.
        cartridge_dir: cartridge ids that are not catalog names resolve to files inside it.
        catalog_datasets: catalog dataset name -> its versioned ``filepath`` (``name`` is the
            latest version, ``name@<version>`` a given one).
        cartridge_sets: named libraries of document cartridges a request selects from per
            question (``{"set": name, "select": k}``; see :mod:`cartridges.serving.sets`).
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
        max_tokens: largest ``max_tokens`` a request may ask for.
        default_max_tokens: used when a request names none.
        max_messages: most messages in one chat request.
        max_body_bytes: largest request body; bigger ones get 413 before parsing.
        max_top_logprobs: largest ``top_logprobs`` / ``logprobs`` a request may ask for.
        max_n: most choices per request.
        max_cartridges: most cartridges composed in one request.
        cartridge_cache_size: loaded (and composed) cartridges kept in memory, LRU.
        scheduler: ``continuous`` (requests join and leave a running decode at every step;
            rows with different cartridges decode in one forward) or ``static`` (requests that
            share a cartridge set are grouped into one ``generate`` call, and a request arriving
            during a decode waits for it). ``continuous`` falls back to ``static``, with one log
            line, for a model that shared-prefix attention cannot reproduce exactly.
        max_batch_size: most rows (choices) decoded at once.
        kv_budget_tokens: continuous scheduler: most KV tokens held at once, each cartridge
            counted once and each request at its worst case (prompt + ``max_tokens``); requests
            wait for room beyond it, and one that could never fit is refused. ``None``: no bound
            but ``max_batch_size``.
        batch_wait_ms: static scheduler: how long it waits for more requests once one has
            arrived.
        chat_template_kwargs: chat-template switches for every chat request (e.g.
            ``{"enable_thinking": False}`` for Qwen3), from the ``model`` block, so that the
            server renders conversations as the pipelines do; a request's own
            ``chat_template_kwargs`` are merged over them.
    """

    model_name_or_path: str = "data/06_models/tiny_llama"
    dtype: str = "float32"
    device: str = "auto"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    cartridge_dir: str = "data/06_models/cartridges"
    catalog_datasets: dict[str, str] | None = None
    cartridge_sets: dict[str, CartridgeSetConfig] = field(default_factory=dict)
    api_key: str | None = None
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_messages: int = 64
    max_body_bytes: int = 1_048_576
    max_top_logprobs: int = 20
    max_n: int = 8
    max_cartridges: int = 8
    cartridge_cache_size: int = 8
    scheduler: str = "continuous"
    max_batch_size: int = 32
    kv_budget_tokens: int | None = None
    batch_wait_ms: float = 5.0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = Problems()
        problems.at_least(
            self,
            1,
            "max_tokens",
            "default_max_tokens",
            "max_messages",
            "max_body_bytes",
            "max_n",
            "max_cartridges",
            "cartridge_cache_size",
            "max_batch_size",
            prefix="serving.",
        )
        problems.require(
            self.default_max_tokens <= self.max_tokens,
            f"serving.default_max_tokens ({self.default_max_tokens}) exceeds "
            f"serving.max_tokens ({self.max_tokens}).",
        )
        problems.require(
            self.max_top_logprobs >= 0 and self.batch_wait_ms >= 0,
            "serving.max_top_logprobs and serving.batch_wait_ms must be >= 0.",
        )
        problems.require(
            self.scheduler in SCHEDULERS,
            f"serving.scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}.",
        )
        problems.require(
            self.kv_budget_tokens is None or self.kv_budget_tokens >= 1,
            f"serving.kv_budget_tokens must be null (no bound) or >= 1, got "
            f"{self.kv_budget_tokens}.",
        )
        problems.require(
            self.api_key is None or bool(self.api_key),
            "serving.api_key must be null (no key) or a non-empty string.",
        )
        problems.raise_any()

    @property
    def model_id(self) -> str:
        """The model id this server answers to."""
        return self.served_model_name or self.model_name_or_path

    @classmethod
    def from_params(
        cls, serving: dict[str, Any], model: dict[str, Any] | None = None, **overrides: Any
    ) -> ServingConfig:
        """Build from the ``serving`` and ``model`` parameter blocks; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in (serving or {}).items() if value is not None}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown serving parameters {unknown}; known: {sorted(known)}.")
        if "chat_template_kwargs" in values:
            raise ValueError(
                f"serving.chat_template_kwargs={values['chat_template_kwargs']!r}: set "
                "model.chat_template_kwargs instead, so that the server renders conversations "
                "as the pipelines do."
            )
        for key, target in (
            ("name_or_path", "model_name_or_path"),
            ("dtype", "dtype"),
            ("device", "device"),
            ("chat_template_kwargs", "chat_template_kwargs"),
        ):
            if model and model.get(key) is not None:
                values.setdefault(target, model[key])
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)
