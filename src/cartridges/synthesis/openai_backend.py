"""Self-study through any OpenAI-compatible server (vLLM, SGLang, the project's own server, ...).

Requests run concurrently (asyncio, bounded) over one or more base URLs used round-robin, so a
synthesis run scales with the number of servers. The ``openai`` client retries 429, 5xx,
timeouts and connection errors with exponential backoff. Log-probabilities come back as token
strings; servers that support it (vLLM's ``return_tokens_as_token_ids``, the project's server)
send ``token_id:<id>`` so the ids are exact, otherwise each token string is mapped through the
student's tokenizer and refused if it is unknown. Before anything runs, the server's tokenizer is
checked against the student's: targets in another vocabulary would train nonsense.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence

import openai
from transformers import PreTrainedTokenizerBase

from cartridges.chat import Message
from cartridges.synthesis.backends import Completion

logger = logging.getLogger(__name__)

PROBE_TEXT = "Cartridges: 12 tokens, café, naïve résumé; x = [1, 2, 3]!"


class BackendError(RuntimeError):
    """The server cannot be used: unreachable, wrong tokenizer, or malformed answers."""


class OpenAIBackend:
    """Completes conversations with an OpenAI-compatible chat completions endpoint.

    Args:
        tokenizer: the student's tokenizer (maps tokens to ids, and is checked against the server).
        base_urls: one or more ``http://host:port/v1`` URLs, used round-robin.
        model: the served model's name.
        api_key_env: environment variable holding the API key (a dummy key is used if unset).
        max_concurrency: requests in flight at once, over all servers.
        max_retries: retries per request on 429, 5xx, timeouts and connection errors.
        timeout_s: per-request timeout.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        base_urls: Sequence[str],
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 32,
        max_retries: int = 5,
        timeout_s: float = 120.0,
    ) -> None:
        if not base_urls:
            raise ValueError("self_study.openai.base_urls is empty: give at least one server URL.")
        self.tokenizer, self.model = tokenizer, model
        self.base_urls = list(base_urls)
        self.api_key = os.environ.get(api_key_env) or "unused"
        self.max_concurrency, self.max_retries, self.timeout_s = (
            max_concurrency,
            max_retries,
            timeout_s,
        )

    def _clients(self) -> list[openai.AsyncOpenAI]:
        return [
            openai.AsyncOpenAI(
                base_url=url,
                api_key=self.api_key,
                max_retries=self.max_retries,
                timeout=self.timeout_s,
            )
            for url in self.base_urls
        ]

    # ------------------------------------------------------------------ tokenizer check
    def verify_tokenizer(self) -> None:
        """Refuse a server whose tokenizer differs from the student's (via its /tokenize)."""
        expected = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        for url in self.base_urls:
            root = url.rstrip("/").removesuffix("/v1")
            body = {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
            request = urllib.request.Request(
                f"{root}/tokenize",
                data=json.dumps(body).encode(),
                headers={
                    "Authorization": f"Bearer {self.api_key}",
                    "Content-Type": "application/json",
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    served = json.loads(response.read()).get("tokens")
            except urllib.error.HTTPError as error:
                raise BackendError(
                    f"Server {url} cannot tokenize (HTTP {error.code} from {root}/tokenize), so "
                    "its tokenizer cannot be checked against the student's. Serve the model with "
                    "vLLM, SGLang or the project's server."
                ) from error
            except (urllib.error.URLError, OSError) as error:
                raise BackendError(f"Server {url} is unreachable: {error}") from error
            if served != expected:
                raise BackendError(
                    f"Server {url} tokenizes differently from the student model's tokenizer "
                    f"'{self.tokenizer.name_or_path}': {served[:12] if served else served}... vs "
                    f"{expected[:12]}... Serve the same model as model.name_or_path."
                )

    # ------------------------------------------------------------------ completions
    def complete(
        self,
        system: str,
        conversations: Sequence[Sequence[Message]],
        *,
        temperature: float,
        max_tokens: int,
        top_logprobs: int = 0,
        seed: int = 0,
    ) -> list[Completion]:
        return asyncio.run(
            self._complete_all(system, conversations, temperature, max_tokens, top_logprobs, seed)
        )

    async def _complete_all(
        self, system, conversations, temperature, max_tokens, top_logprobs, seed
    ):
        clients = self._clients()
        semaphore = asyncio.Semaphore(self.max_concurrency)
        turn = itertools.cycle(clients)

        async def one(row: int, messages: Sequence[Message]) -> Completion:
            client = next(turn)
            async with semaphore:
                return await self._request(
                    client,
                    [{"role": "system", "content": system}, *messages],
                    temperature,
                    max_tokens,
                    top_logprobs,
                    seed + row,
                )

        try:
            return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations))))
        finally:
            for client in clients:
                await client.close()

    async def _request(
        self, client, messages, temperature, max_tokens, top_logprobs, seed
    ) -> Completion:
        try:
            response = await client.chat.completions.create(
                model=self.model,
                messages=messages,
                temperature=temperature,
                max_tokens=max_tokens,
                seed=seed,
                logprobs=True,
                top_logprobs=max(top_logprobs, 1),
                extra_body={"return_tokens_as_token_ids": True},
            )
        except (openai.APIConnectionError, openai.APITimeoutError) as error:
            raise BackendError(
                f"Server {client.base_url} is unreachable after {self.max_retries} retries: {error}"
            ) from error
        except openai.APIStatusError as error:
            raise BackendError(
                f"Server {client.base_url} answered HTTP {error.status_code} after retries: "
                f"{error.message}"
            ) from error
        return self._parse(response, top_logprobs)

    def _token_id(self, token: str) -> int:
        if token.startswith("token_id:"):
            return int(token.removeprefix("token_id:"))
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise BackendError(
                f"Server returned token {token!r}, unknown to the student tokenizer."
            )
        return token_id

    def _parse(self, response, top_logprobs: int) -> Completion:
        if not response.choices:
            raise BackendError("Malformed server response: no choices.")
        choice = response.choices[0]
        content = choice.logprobs.content if choice.logprobs is not None else None
        if not content:
            raise BackendError(
                "Malformed server response: no logprobs. The server must support "
                "`logprobs`/`top_logprobs` on chat completions."
            )
        token_ids = [self._token_id(entry.token) for entry in content]
        top_ids, top_values = [], []
        if top_logprobs:
            for entry in content:
                if not entry.top_logprobs:
                    raise BackendError("Malformed server response: a token has no top_logprobs.")
                top = entry.top_logprobs[:top_logprobs]
                top_ids.append([self._token_id(t.token) for t in top])
                top_values.append([float(t.logprob) for t in top])
        stopped = choice.finish_reason == "stop"
        eos = self.tokenizer.eos_token_id
        if stopped and token_ids[-1] != eos:
            # Servers often leave the stop token out; the turn still ends with it, but with no
            # teacher distribution to distil at that position.
            token_ids.append(eos)
        return Completion(
            token_ids=token_ids,
            text=(choice.message.content or "").strip(),
            stopped=stopped,
            top_ids=top_ids,
            top_logprobs=top_values,
        )
