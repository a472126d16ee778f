"""The project's parameters: one typed, strict model per block of ``conf/*/parameters*.yml``.

Every block a pipeline takes (``params:<block>``) is validated here, by pydantic, and nowhere
else: an unknown key is an error that names the closest valid key, a value of the wrong type or
range is an error that names the key and the value, and all the errors of a run come in one
message. The defaults live in these models (and the library configs they build on:
``TrainConfig``, ``SelfStudyConfig``, ``EvalConfig``, ``CorpusConfig``, ``ChunkingConfig``,
``PretrainConfig``, ``ServingConfig``, ``DistillConfig``), never in the nodes. The self-study
backends' choices and settings come from their registry (``cartridges.synthesis.registry``).

``ParametersHook`` checks a run's blocks before its first node, so that ``kedro run --params``
with a typo fails in seconds rather than after the model has loaded; each node also validates its
blocks with :func:`parse`, so a node called from Python is checked the same way.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, field, fields
from typing import TYPE_CHECKING, Annotated, Any

import pluggy
import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cartridges.chunking import ChunkingConfig
from cartridges.corpus import CorpusConfig
from cartridges.distillation import DistillConfig
from cartridges.evaluation.config import EvalConfig
from cartridges.modeling import resolve_dtype
from cartridges.routing import RoutingConfig
from cartridges.serving.config import ServingConfig
from cartridges.synthesis.registry import BACKENDS, DEFAULT_BACKEND, BackendKind
from cartridges.synthesis.self_study import SelfStudyConfig
from cartridges.training import TrainConfig

if TYPE_CHECKING:
    from cartridges.lora_baseline import LoraSettings

# Kedro's own hook marker (``kedro.framework.hooks.hook_impl``), made here so that the models
# import, and serve the library and the serving CLI, without Kedro.
hook_impl = pluggy.HookimplMarker("kedro")

logger = logging.getLogger(__name__)

STRICT = ConfigDict(extra="forbid")


class ParameterError(ValueError):
    """Invalid parameters: one line per problem, every block of the run checked at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            lines = "\n".join(f"  - {problem}" for problem in problems)
            super().__init__(f"{len(problems)} parameter errors:\n{lines}")


# --------------------------------------------------------------------------- shared blocks
@pydantic_dataclass(config=STRICT)
class ModelParams:
    """The ``model`` block: the frozen LLM every pipeline loads."""

    name_or_path: str  # hub name or local directory; no sensible default
    dtype: str = "float32"
    device: str = "auto"  # cpu, cuda, cuda:1, ... or auto (cuda when available)
    # Chat-template switches used wherever the model reads a conversation (the answering bot of
    # self-study, training targets, evaluation, serving), e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        resolve_dtype(value)  # raises with the accepted names
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError as error:
                raise ValueError(f"not a device ({error}); use cpu, cuda, cuda:N or auto") from None
        return value


def _has_chunk_slot(prompt: str) -> str:
    if "{chunk}" not in prompt:
        raise ValueError("the system prompt must contain '{chunk}' where the context goes")
    return prompt


SystemPrompt = Annotated[str, AfterValidator(_has_chunk_slot)]


# --------------------------------------------------------------------------- pipeline blocks
@pydantic_dataclass(config=STRICT)
class DocumentPrepParams(CorpusConfig):
    """The ``document_prep`` block: where documents come from (``CorpusConfig``) + ``chunking``."""

    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)

    @property
    def corpus(self) -> CorpusConfig:
        return _library(self, CorpusConfig)


def _with_backends(cls: type, backends: Mapping[str, BackendKind] = BACKENDS) -> type:
    """``cls`` plus ``backend`` (a registered kind) and one sub-block per kind with settings.

    The sub-block is named after its kind (``self_study.openai``), so a new kind in the
    registry needs no change here.
    """
    kinds = {name: kind.settings for name, kind in backends.items() if kind.settings is not None}
    annotations = {"backend": typing.Literal[tuple(backends)], **kinds}
    defaults = {name: field(default_factory=settings) for name, settings in kinds.items()}
    namespace = {
        "__annotations__": annotations,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "backend": DEFAULT_BACKEND,
        **defaults,
    }
    return pydantic_dataclass(type(cls.__name__, (cls,), namespace), config=STRICT)


@_with_backends
@pydantic_dataclass(config=STRICT)
class SelfStudyParams(SelfStudyConfig):
    """The ``self_study`` block: ``SelfStudyConfig`` + the backend, its settings, the shard folder.

    The system prompt is the shared top-level ``system_prompt`` and the answering bot's template
    switches are the ``model`` block's ``chat_template_kwargs``: neither is a key of this block.
    """

    shard_dir: str = "data/03_primary/self_study_shards"  # finished batches; a rerun resumes
    # Warn when the chunks the batches read cover less than this share of the corpus's tokens.
    min_coverage: Annotated[float, Field(ge=0, le=1)] = 1.0

    @field_validator("system_prompt")
    @classmethod
    def _not_here(cls, value: str) -> str:
        raise ValueError("set the top-level `system_prompt` parameter; self-study reads it there")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _model_switches(cls, value: dict) -> dict:
        raise ValueError(
            f"got {value!r}; set `model.chat_template_kwargs` (the answering bot's, as wherever "
            "the model reads a conversation) or `self_study.question_chat_template_kwargs`"
        )

    @property
    def backend_settings(self) -> Any:
        """The chosen kind's own sub-block (``None`` for a kind without settings)."""
        return getattr(self, self.backend, None)

    def config(
        self, system_prompt: str, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> SelfStudyConfig:
        """The library config (its resume identity leaves out the backend and shard_dir).

        ``chat_template_kwargs`` are the model's, read by the answering bot and the student.
        """
        values = asdict(_library(self, SelfStudyConfig))
        values["system_prompt"] = system_prompt
        values["chat_template_kwargs"] = dict(chat_template_kwargs or {})
        return SelfStudyConfig(**values)


@pydantic_dataclass(config=STRICT)
class DistillTrainingParams(DistillConfig):
    """The ``distill_training`` block: ``DistillConfig`` (its recipe, ``train``, the sweep)."""


def _overrides(name: str, cls: type) -> type[BaseModel]:
    """A strict model of ``cls``'s fields, all optional: a block that overrides some of another."""
    optional = {
        key: (info.annotation | None, None) for key, info in cls.__pydantic_fields__.items()
    }
    return create_model(name, __config__=STRICT, __module__=__name__, **optional)


TrainOverrides = _overrides("TrainOverrides", TrainConfig)


@pydantic_dataclass(config=STRICT)
class LoraBaselineParams:
    """The ``lora_baseline`` block; ``train`` overrides keys of ``distill_training.train``."""

    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    train: TrainOverrides = field(default_factory=TrainOverrides)  # type: ignore[valid-type]
    checkpoint_dir: str | None = None  # None: no resumable checkpoints

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with this block's overrides (only the keys it sets)."""
        return TrainConfig(**{**asdict(base), **self.train.model_dump(exclude_unset=True)})

    def settings(self, distill: DistillConfig) -> LoraSettings:
        """How the adapter trains: distill_training's loop and backend, with this block's
        overrides."""
        from cartridges.lora_baseline import LoraSettings  # PEFT, only for the LoRA baseline

        return LoraSettings(
            self.target_modules,
            self.train_config(distill.train),
            distill.distributed_backend,
            self.checkpoint_dir,
        )


@pydantic_dataclass(frozen=True, config=STRICT)
class EvaluationParams(EvalConfig):
    """The ``evaluation`` block: ``EvalConfig`` + which cartridges to compare."""

    cartridge_versions: tuple[str, ...] = ()  # versions of `cartridge`; empty: the catalog's one
    include_sweep: bool = True  # also the latest cartridge_sweep
    # Cartridges of one document each (distill_training.document_compression): each on its own
    # document's questions, and with compose their concatenation on the questions of all.
    compose: bool = True
    documents: tuple[str, ...] = ()  # whose cartridges, in composition order; empty: all
    max_context_tokens: Annotated[int, Field(ge=1)] | None = None  # None: the model's maximum
    # The library of document cartridges routed per question (top_k of them by a retriever).
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # Each (method, task) result as it completes; a rerun with the same inputs resumes. None: off.
    results_dir: str | None = None  # conf/base: under the data folder

    @property
    def eval_config(self) -> EvalConfig:
        return _library(self, EvalConfig)


def _serving_block() -> type[BaseModel]:
    """The ``serving`` block that ``cartridges-serve`` reads: ``ServingConfig``'s fields and
    defaults, minus those the ``model`` block sets; ``catalog_datasets`` names catalog entries."""
    taken = {
        "model_name_or_path",
        "dtype",
        "device",
        "catalog_datasets",
        "chat_template_kwargs",
    }
    own = {
        name: (info.annotation, info)
        for name, info in ServingConfig.__pydantic_fields__.items()
        if name not in taken
    }
    return create_model(
        "ServingParams",
        __config__=STRICT,
        __module__=__name__,
        __validators__={"_serving_checks": model_validator(mode="after")(_serving_checks)},
        catalog_datasets=(list[str], ["cartridge"]),  # catalog entries served by name
        **own,
    )


def _serving_checks(block: BaseModel) -> BaseModel:
    """``ServingConfig``'s own checks across fields (e.g. default_max_tokens <= max_tokens)."""
    ServingConfig(**block.model_dump(exclude={"catalog_datasets"}))
    return block


ServingParams = _serving_block()


# --------------------------------------------------------------------------- validation
SCHEMAS: dict[str, Any] = {
    "model": ModelParams,
    "system_prompt": SystemPrompt,
    "document_prep": DocumentPrepParams,
    "self_study": SelfStudyParams,
    "distill_training": DistillTrainingParams,
    "lora_baseline": LoraBaselineParams,
    "evaluation": EvaluationParams,
    # The toy world plugs in from outside the core: its block is imported when first used.
    "toy_world": "cartridges.toy_world.pretrain:PretrainConfig",
    "serving": ServingParams,
}


def _library(params: Any, cls: type) -> Any:
    """The library config ``cls`` from the fields of a parameter block built on it."""
    return cls(**{f.name: getattr(params, f.name) for f in fields(cls)})


def _schema(block: str) -> Any:
    """A block's model; a ``"module:Class"`` entry is imported on first use."""
    schema = SCHEMAS[block]
    if isinstance(schema, str):
        module, _, name = schema.partition(":")
        schema = SCHEMAS[block] = getattr(importlib.import_module(module), name)
    return schema


@functools.cache
def _adapter(block: str) -> TypeAdapter:
    return TypeAdapter(_schema(block))


def parse(block: str, value: Any) -> Any:
    """The validated object of one parameter block (returned as is when already validated).

    Raises:
        ParameterError: unknown keys, wrong types or values, every problem in one message.
    """
    schema = _schema(block)
    if isinstance(schema, type) and isinstance(value, schema):
        return value
    return validate_parameters({block: value})[block]


def validate_parameters(
    parameters: Mapping[str, Any], blocks: Iterable[str] | None = None
) -> dict[str, Any]:
    """Validate ``blocks`` of ``parameters`` (all of them by default) and every top-level key.

    Returns:
        ``{block: validated object}`` for the blocks asked for.

    Raises:
        ParameterError: with every problem found, so that one run shows them all.
    """
    problems = [_unknown(name, list(SCHEMAS)) for name in parameters if name not in SCHEMAS]
    validated = {}
    for block in sorted(parameters if blocks is None else blocks):
        if block not in SCHEMAS:
            continue  # reported above when present
        if block not in parameters:
            problems.append(f"Missing parameter block '{block}'.")
            continue
        try:
            validated[block] = _adapter(block).validate_python(parameters[block])
        except ValidationError as error:
            problems += _describe(block, error)
    if problems:
        raise ParameterError(problems)
    return validated


def _describe(block: str, error: ValidationError) -> list[str]:
    """One line per pydantic error, with the dotted key, the offending value and a hint."""
    lines = []
    for item in error.errors(include_url=False):
        loc = tuple(str(part) for part in item["loc"])
        key = ".".join((block, *loc))
        kind = item["type"]
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(_unknown(key, _keys_at(_schema(block), item["loc"][:-1])))
        elif kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
            lines.append(f"Missing parameter '{key}'.")
        else:
            cause = item.get("ctx", {}).get("error")
            message = str(cause) if kind == "value_error" and cause else item["msg"]
            for problem in message.splitlines():  # a config's checks raise theirs together
                problem = problem.rstrip(".")
                if _is_arguments(item["input"]):  # a check across fields: the message names them
                    lines.append(f"Invalid parameter '{key}': {problem}.")
                else:
                    lines.append(f"Invalid parameter '{key}' = {item['input']!r}: {problem}.")
    return lines


def _is_arguments(value: Any) -> bool:
    """Whether a pydantic error's input is a whole block (its fields are in the message)."""
    return isinstance(value, Mapping) or type(value).__name__ == "ArgsKwargs"


def _unknown(key: str, valid: list[str]) -> str:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f"Unknown parameter '{key}'; did you mean '{close[0]}'?"
    return f"Unknown parameter '{key}'; valid keys: {', '.join(sorted(valid))}."


def _keys_at(schema: Any, path: tuple) -> list[str]:
    """The valid keys of the block nested at ``path`` inside ``schema``."""
    for part in path:
        info = _fields(schema).get(part)
        if info is None:
            return []
        schema = _unwrap(info.annotation)
    return list(_fields(schema))


def _fields(schema: Any) -> dict[str, Any]:
    return dict(getattr(schema, "__pydantic_fields__", None) or {})


def _unwrap(annotation: Any) -> Any:
    """``X`` from ``X | None`` (or ``Annotated[X, ...] | None``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _unwrap(args[0])
    if typing.get_origin(annotation) is Annotated:
        return args[0]
    return annotation


# --------------------------------------------------------------------------- Kedro hook
class ParametersHook:
    """Checks the parameter blocks a pipeline's nodes take, before any of them runs."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        inputs = pipeline.inputs()
        blocks = {
            name.removeprefix("params:").split(".")[0]
            for name in inputs
            if name.startswith("params:")
        }
        parameters = catalog.load("parameters") if "parameters" in catalog else {}
        if "parameters" in inputs:
            blocks |= set(parameters) & set(SCHEMAS)
        validate_parameters(parameters, blocks)
        if blocks:
            logger.info("Parameters checked: %s.", ", ".join(sorted(blocks)))
