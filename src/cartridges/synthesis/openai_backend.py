"""The ``openai`` self-study backend: OpenAI-compatible servers (vLLM, SGLang, the project's own).

Requests from many batches run concurrently under one bound (``max_concurrency`` in flight over
all batches and all servers); each request goes to the server with the fewest requests in
flight, so a fleet of unequal servers stays busy. Transient failures (connection errors and
drops, timeouts, 408/409/429/5xx, a malformed body) are retried with exponential backoff and
jitter, honouring ``Retry-After``; then the error names the server and the request.

Responses are read by ``openai_responses`` (token ids, top-k, the student's vocabulary).
Before anything runs, the server's tokenizer is checked against the student's: targets in
another vocabulary would train nonsense. Chat-template switches go in the request body as
``chat_template_kwargs`` (vLLM's and SGLang's field), only when some are set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import aiohttp
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from transformers import PreTrainedTokenizerBase

from cartridges.chat import Message
from cartridges.modeling import load_tokenizer
from cartridges.synthesis.backends import BackendError, BlockingCalls, Completion, Sampling
from cartridges.synthesis.openai_responses import MalformedResponse, ResponseReader

__all__ = ["BackendError", "OpenAIBackend", "OpenAISettings"]

logger = logging.getLogger(__name__)

PROBE_TEXT = "Cartridges: 12 tokens, café, naïve résumé; x = [1, 2, 3]!"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0
# What identifies a served model in vLLM's /v1/models, besides its name (``created`` changes
# at every restart, so it is not used).
IDENTITY_FIELDS = ("root", "parent", "max_model_len")
TOKENIZE_HINT = (
    ". The tokenizer check needs /tokenize for a served model: set self_study.openai.model to "
    "a name the server lists at /v1/models, and serve with vLLM, SGLang or the project's server."
)


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class OpenAISettings:
    """``self_study.openai``: the servers and how to reach them (``OpenAIBackend``'s arguments)."""

    base_urls: Annotated[list[str], Field(min_length=1)] = field(
        default_factory=lambda: ["http://127.0.0.1:8000/v1"]
    )
    model: str = "default"  # the served model's name
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: Annotated[int, Field(ge=1)] = 32
    max_retries: Annotated[int, Field(ge=0)] = 5
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    backoff_s: Annotated[float, Field(ge=0)] = 0.5  # first retry's wait, doubled per retry


@dataclass
class _Server:
    url: str
    client: aiohttp.ClientSession
    in_flight: int = 0


@dataclass
class _Session:
    """Connections and the concurrency bound of one event loop."""

    servers: list[_Server]
    semaphore: asyncio.Semaphore
    loop: asyncio.AbstractEventLoop
    turn: int = 0
    waits: list[float] = field(default_factory=list)


class OpenAIBackend(BlockingCalls):
    """Completes conversations with an OpenAI-compatible chat completions endpoint.

    Args:
        tokenizer: the student's tokenizer (maps tokens to ids, and is checked against the server).
        base_urls: one or more ``http://host:port/v1`` URLs; each request goes to the one with
            the fewest requests in flight.
        model: the served model's name.
        **settings: the other fields of :class:`OpenAISettings` (their defaults and checks are
            there): ``api_key_env`` (a dummy key is used if it is unset), ``max_concurrency``
            (requests in flight over all batches and servers), ``max_retries`` (on transient
            failures, see the module docstring), ``timeout_s`` (per request), ``backoff_s`` (the
            first retry's delay; each further retry doubles it, with jitter).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        base_urls: Sequence[str],
        model: str,
        **settings: Any,
    ) -> None:
        checked = OpenAISettings(base_urls=list(base_urls), model=model, **settings)
        self.tokenizer, self.model = tokenizer, model
        self.base_urls = [url.rstrip("/") for url in checked.base_urls]
        self.api_key = os.environ.get(checked.api_key_env) or "unused"
        self.max_concurrency, self.max_retries = checked.max_concurrency, checked.max_retries
        self.timeout_s, self.backoff_s = checked.timeout_s, checked.backoff_s
        self.max_length: int | None = None  # the servers refuse what does not fit
        self._session: _Session | None = None
        self._reader = ResponseReader(tokenizer)

    @property
    def requests_in_flight(self) -> int:
        """Requests sent and not yet answered (0 outside a run)."""
        session = self._session
        return sum(server.in_flight for server in session.servers) if session else 0

    def batches_in_flight(self, batch_size: int) -> int:
        """Batches to keep going at once so that ``max_concurrency`` requests stay in flight.

        Twice the bound: a batch waits for its slowest row between rounds, and the spare
        batches' requests fill the gap.
        """
        return max(1, -(-2 * self.max_concurrency // batch_size))

    # ------------------------------------------------------------------ tokenizer check
    def verify_tokenizer(self) -> None:
        """Refuse a server whose tokenizer differs from the student's (via its /tokenize).

        A server that refuses the check is quoted: most often ``model`` names a model it does
        not serve, and its own message lists the names it does.
        """
        expected = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        for url in self.base_urls:
            served = self._probe_tokens(url)
            if served != expected:
                raise BackendError(
                    f"Server {url} tokenizes differently from the student model's tokenizer "
                    f"'{self.tokenizer.name_or_path}': {served[:12] if served else served}... vs "
                    f"{expected[:12]}... Serve the same model as model.name_or_path."
                )

    def identity(self) -> str:
        """What the servers serve, as a string for the resume key of a run.

        The served name alone would let another model, later served under the same name, resume
        into the old shards. So the identity adds what each server reports about the model in
        ``/v1/models`` (vLLM's ``root``, ``parent`` and ``max_model_len``: the weights' source
        and the context; ``created`` changes at every restart and is left out) and a digest of
        its tokens for a probe text. Every server of the fleet must report the same.
        """
        reports = {url: self._model_report(url) for url in self.base_urls}
        distinct = {json.dumps(report, sort_keys=True) for report in reports.values()}
        if len(distinct) > 1:
            raise BackendError(
                f"The servers report different models under the name '{self.model}': "
                + "; ".join(f"{url}: {report}" for url, report in reports.items())
            )
        digest = hashlib.sha256(distinct.pop().encode()).hexdigest()[:16]
        return f"openai:{self.model}:{digest}"

    def _model_report(self, url: str) -> dict:
        """The server's description of ``self.model``, reduced to fields stable across restarts."""
        listing = self._call(url, "/models", None)
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(entries, list):
            raise BackendError(f"Server {url} answered {url}/models without a model list.")
        served = [entry for entry in entries if isinstance(entry, dict)]
        entry = next((e for e in served if e.get("id") == self.model), None)
        if entry is None:
            names = ", ".join(repr(e.get("id")) for e in served) or "none"
            raise BackendError(
                f"Server {url} does not serve a model named '{self.model}' (it serves: {names}). "
                "Set self_study.openai.model to one of those."
            )
        report = {key: entry.get(key) for key in IDENTITY_FIELDS}
        probe = json.dumps(self._probe_tokens(url)).encode()
        report["tokenizer_probe"] = hashlib.sha256(probe).hexdigest()[:16]
        return report

    def _probe_tokens(self, url: str) -> list[int] | None:
        body = {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
        answer = self._call(url, "/tokenize", body, hint=TOKENIZE_HINT)
        return answer.get("tokens") if isinstance(answer, dict) else None

    def _call(self, url: str, path: str, body: dict | None, hint: str = "") -> object:
        """GET (``body`` None) or POST JSON to ``path`` (outside ``/v1`` for ``/tokenize``).

        An HTTP error becomes a :class:`BackendError` quoting the server's own message.
        """
        target = f"{url.removesuffix('/v1')}{path}" if path == "/tokenize" else f"{url}{path}"
        request = urllib.request.Request(
            target,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.api_key}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise BackendError(
                f"Server {url} answered HTTP {error.code} to {target} for model '{self.model}': "
                f"{_server_message(error)}{hint}"
            ) from error
        except (urllib.error.URLError, OSError) as error:
            raise BackendError(f"Server {url} is unreachable: {error}") from error
        except ValueError as error:
            raise BackendError(f"Server {url} answered {target} with invalid JSON.") from error

    # ------------------------------------------------------------------ completions
    async def acomplete(
        self, system: str, conversations: Sequence[Sequence[Message]], sampling: Sampling
    ) -> list[Completion]:
        """Complete every conversation (row ``i`` is sampled with ``seed + i``), concurrently."""
        session = self._open()
        requests = [
            self._request(
                session,
                _body(self.model, system, messages, sampling, row),
                sampling.top_logprobs,
                f"row {row} (seed {sampling.seed + row})",
            )
            for row, messages in enumerate(conversations)
        ]
        return list(await asyncio.gather(*requests))

    async def aclose(self) -> None:
        """Close the connections of the current session (a later call opens new ones)."""
        session, self._session = self._session, None
        if session is not None:
            await asyncio.gather(*(server.client.close() for server in session.servers))

    def _open(self) -> _Session:
        loop = asyncio.get_running_loop()
        if self._session is not None and self._session.loop is loop:
            return self._session
        headers = {"Authorization": f"Bearer {self.api_key}"}

        def client() -> aiohttp.ClientSession:
            # Every server may carry the whole bound; the semaphore keeps the total.
            return aiohttp.ClientSession(
                # Idle connections are dropped before a server would (uvicorn: after 5 s), so
                # a request is rarely sent on a connection the server is closing.
                connector=aiohttp.TCPConnector(limit=self.max_concurrency, keepalive_timeout=4),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers=headers,
            )

        servers = [_Server(url, client()) for url in self.base_urls]
        self._session = _Session(servers, asyncio.Semaphore(self.max_concurrency), loop)
        return self._session

    def _pick(self, session: _Session) -> _Server:
        """The server with the fewest requests in flight; ties go round-robin."""
        count = len(session.servers)
        order = [session.servers[(session.turn + i) % count] for i in range(count)]
        session.turn = (session.turn + 1) % count
        return min(order, key=lambda server: server.in_flight)

    async def _request(
        self, session: _Session, body: dict, top_logprobs: int, what: str
    ) -> Completion:
        payload = json.dumps(body).encode()
        async with session.semaphore:
            for attempt in range(self.max_retries + 1):
                server = self._pick(session)
                server.in_flight += 1
                retry_after = None
                try:
                    async with server.client.post(
                        f"{server.url}/chat/completions",
                        data=payload,
                        headers={"Content-Type": "application/json"},
                    ) as response:
                        raw = await response.read()
                    if response.status == 200:
                        return self._reader.completion(raw, top_logprobs)
                    failure = f"answered HTTP {response.status}"
                    detail = raw[:300].decode(errors="replace")
                    if response.status not in RETRY_STATUSES:
                        break
                    retry_after = _retry_after(response.headers)
                except (TimeoutError, aiohttp.ClientError) as error:
                    failure, detail = "is unreachable", f"{type(error).__name__}: {error}"
                except MalformedResponse as error:
                    failure, detail = "sent a malformed response", str(error)
                except BackendError as error:
                    raise BackendError(f"Server {server.url}: {error} Request: {what}.") from error
                finally:
                    server.in_flight -= 1
                if attempt < self.max_retries:
                    delay = retry_after or self._backoff(attempt)
                    logger.warning(
                        "Server %s %s (%s); retrying %s in %.1f s",
                        server.url,
                        failure,
                        detail,
                        what,
                        delay,
                    )
                    await asyncio.sleep(delay)
        retries = f"after {attempt} retries" if attempt else "(not retried)"
        raise BackendError(f"Server {server.url} {failure} {retries}: {detail}; request: {what}.")

    def _backoff(self, attempt: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def _body(
    model: str, system: str, messages: Sequence[Message], sampling: Sampling, row: int
) -> dict[str, Any]:
    """The chat completion request of one row."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, *messages],
        "temperature": sampling.temperature,
        "max_tokens": sampling.max_tokens,
        "seed": sampling.seed + row,
        "logprobs": True,
        "top_logprobs": max(sampling.top_logprobs, 1),  # the sampled token's id comes with it
        "return_tokens_as_token_ids": True,
    }
    if sampling.template_kwargs:  # left out when unset: not every server knows the field
        body["chat_template_kwargs"] = dict(sampling.template_kwargs)
    return body


def from_settings(settings: OpenAISettings, model: Any) -> OpenAIBackend:
    """The registry's builder: the servers of ``settings``, checked against the model's tokens."""
    backend = OpenAIBackend(load_tokenizer(model.name_or_path), **asdict(settings))
    backend.verify_tokenizer()
    return backend


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's ``Retry-After`` in seconds, when it gives one as a number."""
    value = headers.get("retry-after")
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _server_message(error: urllib.error.HTTPError) -> str:
    """The message of an error response: OpenAI's ``error.message``, ``message`` or ``detail``."""
    try:
        raw = error.read(4096).decode(errors="replace").strip()
    except OSError:
        raw = ""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:500] or str(error.reason)
    for candidate in (body.get("error"), body) if isinstance(body, dict) else ():
        if isinstance(candidate, str):
            return candidate
        for key in ("message", "detail"):
            if isinstance(candidate, dict) and isinstance(candidate.get(key), str):
                return candidate[key]
    return raw[:500]
