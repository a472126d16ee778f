"""Serve cartridges over an OpenAI-compatible HTTP API, and chat with them in a terminal."""

from cartridges.serving.app import create_app
from cartridges.serving.config import ServingConfig
from cartridges.serving.server import BackgroundServer

__all__ = ["BackgroundServer", "ServingConfig", "create_app"]
