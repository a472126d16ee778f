"""Download one http(s) document with a time limit and a size cap, or say why not.

Plain ``urllib``: one GET, redirects followed, the body read in pieces so that an oversized or
endless response is cut off at the cap instead of filling memory.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.error
import urllib.request
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from cartridges.documents.loaders import SUFFIXES, Unusable

logger = logging.getLogger(__name__)

_CONTENT_TYPES = {
    "text/html": "html",
    "application/xhtml+xml": "html",
    "application/pdf": "pdf",
    "application/json": "json",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/json-lines": "jsonl",
    "text/markdown": "markdown",
    "text/x-tex": "latex",
    "application/x-tex": "latex",
}
_READ_BYTES = 1 << 16


def fetch_url(url: str, timeout_s: float, max_bytes: int) -> tuple[bytes, str, str | None]:
    """GET ``url`` and return ``(body, format, declared charset)``.

    Args:
        url: an ``http://`` or ``https://`` address.
        timeout_s: limit for connecting and for the whole download, in seconds.
        max_bytes: larger responses are refused (by ``Content-Length`` or while reading).

    Raises:
        Unusable: timeout, too large, an HTTP error status, a network error, or a content type
            that no loader reads.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise Unusable(f"unsupported URL scheme '{scheme}' (http and https only)")
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "cartridges-document-prep"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise Unusable(f"too large: {int(length)} bytes, limit {max_bytes}")
            body = bytearray()
            while piece := response.read(_READ_BYTES):
                body += piece
                if len(body) > max_bytes:
                    raise Unusable(f"too large: over {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError
            content_type = response.headers.get_content_type()
            charset = response.headers.get_content_charset()
    except urllib.error.HTTPError as error:
        raise Unusable(f"HTTP error {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise Unusable(f"timed out after {timeout_s:g} s") from None
        raise Unusable(f"cannot fetch: {error.reason}") from None
    except TimeoutError:
        raise Unusable(f"timed out after {timeout_s:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise Unusable(f"cannot fetch: {type(error).__name__}: {error}") from None
    return bytes(body), _format(url, content_type), charset


def _format(url: str, content_type: str) -> str:
    """The content type when it is specific, else the URL's suffix; plain text as a last resort."""
    if content_type in _CONTENT_TYPES:
        return _CONTENT_TYPES[content_type]
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if content_type.startswith("text/"):
        return "text"
    raise Unusable(f"unsupported content type '{content_type}'")
