"""Errors in OpenAI's ``{"error": {...}}`` shape, and the handlers that answer every failure so.

A client of an OpenAI-compatible server reads ``error.message``, ``error.param`` and
``error.code``; every refusal here, from a missing key to a malformed body, is answered in that
shape, never with FastAPI's default ``{"detail": ...}``. Unexpected failures answer 500 with no
details (they go to the server log instead).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServingError(Exception):
    """An error answered in OpenAI's ``{"error": {...}}`` shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every exception a route can raise in OpenAI's error shape."""

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, error: ServingError) -> JSONResponse:
        return error_response(error.status, str(error), error.code, error.param, error.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _invalid_body(error.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("Unhandled error while serving a request")
        return error_response(
            500, "Internal server error; see the server log.", kind="server_error"
        )


def _invalid_body(errors: list[dict]) -> JSONResponse:
    """400 for a body that is not JSON, 422 (naming the first bad field) for a wrong field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", detail.get("msg", ""))
        return error_response(400, f"Malformed JSON body: {reason}", code="invalid_json")
    parts = []
    for e in errors[:5]:
        location = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{location or 'body'}: {e.get('msg', 'invalid')}")
    first = ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") if errors else None
    return error_response(422, "Invalid request: " + "; ".join(parts), param=first or None)
