"""The kinds of self-study backend, by the name ``self_study.backend`` gives them.

Each kind is one module (its backend class, its settings and a builder) and one entry here; the
parameters (``cartridges.params``: the ``backend`` choices and one ``self_study.<kind>`` block
per kind with settings) and the pipeline read this table and nothing else, so adding a kind
touches no other file. A built backend names itself for the run's resume key
(``Backend.identity``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cartridges.synthesis import local_backend, openai_backend
from cartridges.synthesis.backends import Backend


@dataclass(frozen=True)
class BackendKind:
    """How to make one kind of backend."""

    build: Callable[[Any, Any], Backend]
    """``(its validated settings or None, the model block) -> a backend ready to run``."""
    settings: type | None = None
    """The validated ``self_study.<kind>`` block; ``None``: the kind has no settings."""


BACKENDS: dict[str, BackendKind] = {
    "local": BackendKind(local_backend.from_settings),
    "openai": BackendKind(openai_backend.from_settings, openai_backend.OpenAISettings),
}
DEFAULT_BACKEND = "local"


def build_backend(kind: str, settings: Any, model: Any) -> Backend:
    """The backend of ``kind``, from its settings and the ``model`` block (``ModelParams``)."""
    if kind not in BACKENDS:
        raise ValueError(f"Unknown self-study backend {kind!r}; use one of {sorted(BACKENDS)}.")
    return BACKENDS[kind].build(settings, model)
