"""Finished (method, task) results of an evaluation, kept (on disk or an object store) to resume.

Each result (a task's report rows for one method, or a method's cost columns) is written, whole
and atomically, as soon as it is computed, under a folder named by a digest of everything the
evaluation's numbers depend on: the model, the tokenizer and its chat template, the questions,
the held-out conversations, the system text and the settings, and the device that timed the
costs. A rerun with the same inputs reads what is there and computes only what is missing; any
change of input is another folder, so a result is never paired with inputs it was not computed
from. Within a folder each method has its own digest (its name, kind, documents, version and the
prefix it answers from: the context tokens of an in-context method, the KV of a cartridge).
Timings read back are those of the run that measured them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cartridges import lineage
from cartridges.chat import TemplateKwargs
from cartridges.evaluation.config import EvalConfig
from cartridges.evaluation.conversations import HeldOutConversation
from cartridges.evaluation.methods import Method
from cartridges.evaluation.questions import Question
from cartridges.modeling import model_fingerprint
from cartridges.storage import Location

logger = logging.getLogger(__name__)

COST = "cost"  # the result name of a method's cost columns


class EvaluationResults:
    """Results by (method, task): in memory, and in ``directory`` when one is given.

    Args:
        directory: where results of every evaluation are kept (one sub-folder per set of
            inputs); ``None``: nothing is kept beyond this run.
        key: the digest of this evaluation's inputs (:func:`evaluation_key`).
    """

    def __init__(self, directory: str | os.PathLike | None = None, key: str = "") -> None:
        self.folder = Location.of(directory) / key if directory is not None else None
        self._digests: dict[int, str] = {}

    def load(self, method: Method, task: str) -> Any | None:
        """What was saved for ``(method, task)``, or ``None``."""
        path = self._path(method, task)
        if path is None:
            return None
        try:
            return json.loads(path.read_text())["value"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as error:  # written atomically: not expected
            logger.warning("Ignoring unreadable evaluation result %s (%s).", path, error)
            return None

    def save(self, method: Method, task: str, value: Any) -> None:
        """Keep ``value`` (JSON-able rows or columns) as ``(method, task)``'s result."""
        path = self._path(method, task)
        if path is None:
            return
        record = {"method": method.name, "task": task, "value": value}
        path.write_text(json.dumps(record, default=_plain))  # whole or not at all

    def _path(self, method: Method, task: str) -> Location | None:
        if self.folder is None:
            return None
        if id(method) not in self._digests:
            self._digests[id(method)] = method_digest(method)
        return self.folder / f"{method.name}-{self._digests[id(method)]}" / f"{task}.json"


def evaluation_key(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Question],
    conversations: Sequence[HeldOutConversation],
    system_text: str,
    config: EvalConfig,
    template_kwargs: TemplateKwargs = None,
) -> str:
    """A digest of every input an evaluation's results depend on (apart from the methods)."""
    inputs = {
        "model": model_fingerprint(model),
        "dtype": str(model.dtype),
        "device": model.device.type,
        "tokenizer": [type(tokenizer).__name__, len(tokenizer), tokenizer.chat_template or ""],
        "vocabulary": _digest(json.dumps(sorted(tokenizer.get_vocab().items()))),
        "questions": [asdict(question) for question in questions],
        "conversations": [
            [c.conversation_id, c.token_ids, c.positions, c.messages] for c in conversations
        ],
        "system_text": system_text,
        "config": asdict(config),
        "template_kwargs": dict(template_kwargs or {}),
    }
    return _digest(json.dumps(inputs, sort_keys=True, default=str))


def method_digest(method: Method) -> str:
    """A digest of what a method answers from: its prefix and its place in the report."""
    if method.prefix is None:
        prefix = "none"
    elif method.context_ids is not None:
        prefix = _digest(json.dumps(list(method.context_ids)))
    else:
        prefix = lineage.digest(method.prefix) or ""
    identity = [method.name, method.kind, method.documents, method.version, method.note, prefix]
    if method.routes is not None:  # what each question is answered with
        library = [lineage.digest(c) or "" for c in method.routes.cartridges.values()]
        identity += [method.routes.identity, list(method.routes.cartridges), library]
    return _digest(json.dumps(identity, default=str))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """numpy scalars and the like, as JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"Cannot keep {type(value).__name__} in an evaluation result.")
