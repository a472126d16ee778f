"""Serve cartridges over an OpenAI-compatible HTTP API, and chat with them in a terminal.

The exports are imported on first use, so that the terminal chat's modules load without the
model stack (torch, transformers) that only the server needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cartridges.serving.app import create_app
    from cartridges.serving.config import ServingConfig
    from cartridges.serving.server import BackgroundServer

__all__ = ["BackgroundServer", "ServingConfig", "create_app"]
_HOMES = {
    "BackgroundServer": "cartridges.serving.server",
    "ServingConfig": "cartridges.serving.config",
    "create_app": "cartridges.serving.app",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
