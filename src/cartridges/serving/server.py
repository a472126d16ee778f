"""Run the app with uvicorn: in the foreground (``cartridges-serve``) or on a background thread.

The background server binds its socket before starting, so that port 0 gives a free port with
no race; tests, the in-process chat and scripts use it to talk real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class BackgroundServer:
    """``with BackgroundServer(app) as server: OpenAI(base_url=server.base_url)``.

    Args:
        app: the ASGI app.
        host: interface to bind.
        port: 0 picks a free port.
        startup_timeout_s: how long to wait for the app's lifespan to finish starting.
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 60
    ) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.startup_timeout_s = startup_timeout_s
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``."""
        return f"{self.url}/v1"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The server on {self.url} did not start.")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` in the foreground until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level="info")
