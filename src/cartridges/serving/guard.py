"""The request guard: API key and body size, checked before FastAPI reads or parses anything.

A pure ASGI middleware so that an unauthenticated or oversized request is refused first,
whatever its body holds. It does not look at what the body means: field checks belong to
:mod:`cartridges.serving.validation`.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cartridges.serving.errors import error_response

# Paths answered without the API key; everything else needs it (an allowlist, so that odd
# spellings such as "//v1/models" cannot slip past the check).
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class Guard:
    """Refuses a missing or wrong Bearer key (401) and a body over ``max_body_bytes`` (413).

    The body is buffered (it is small by then) and replayed to the app, so that its size is
    counted as it arrives, also when no ``Content-Length`` announces it.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            refusal = self._check_key(headers.get("authorization"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await self._too_large()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` as soon as it grows past the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _check_key(self, authorization: str | None) -> JSONResponse | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            return None
        message = (
            "Invalid API key."
            if authorization
            else "Missing API key: send the header 'Authorization: Bearer <key>'."
        )
        return error_response(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )

    def _too_large(self) -> JSONResponse:
        return error_response(
            413,
            f"Request body exceeds this server's limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
        )
