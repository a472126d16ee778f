"""A stand-in teacher: an OpenAI-compatible server that answers after a fixed delay.

It returns vLLM-shaped chat completions (``token_id:<id>`` tokens, top-k log-probabilities with
their ``bytes``) of realistic size without running a model, so the self-study client and a
fleet set-up can be load-tested, and their failure handling tested, on any machine. Answers are
a pure function of the request (messages, seed, limits), so a run against it is reproducible.

Faults can be switched on: one request in n (chosen by content) fails its first attempt with an
HTTP status, a dropped connection or a malformed body, or every request after the first n
fails; and requests whose system message contains a marker can be made slower than the rest
(batches then complete out of order). The last requests can be kept and read back, to check
what a client sends.

Run ``python -m cartridges_testing.stand_in_teacher --help``; from Python, ``StandInTeacher``
starts it in a subprocess (its own interpreter, so the client's CPU is measured alone).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class TeacherSettings:
    """What the stand-in answers and how (``--help`` lists them)."""

    delay_ms: float = 200.0
    answer_tokens: int = 256  # an answer's natural length; max_tokens may cut it
    question_tokens: int = 24
    vocab_size: int = 512
    tokenizer: str | None = None  # a tokenizer directory: /tokenize and readable text
    model: str = "stand-in"
    fail_every: int = 0  # >0: one request in fail_every (by content) fails its first attempt
    fail_after: int = 0  # >0: every request after the first fail_after fails
    fail_with: str = "503"  # an HTTP status, "drop" (close the connection) or "malformed"
    slow_marker: str = ""  # requests whose system message contains it wait slow_delay_ms
    slow_delay_ms: float = 0.0
    pool: int = 64  # distinct answers per shape, encoded once
    record_requests: int = 0  # >0: keep the last n chat request bodies (GET /requests)


class _Teacher:
    def __init__(self, settings: TeacherSettings) -> None:
        self.settings = settings
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.tokenizer = None
        if settings.tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
        self._bodies: dict[tuple, list[bytes]] = {}
        self._attempts: dict[bytes, int] = {}
        self.recorded: collections.deque[dict] = collections.deque(
            maxlen=max(settings.record_requests, 0)
        )

    # ------------------------------------------------------------------ answers
    def _answer(self, index: int, length: int, top_k: int, stopped: bool) -> bytes:
        """One encoded chat completion (a pool entry for this shape)."""
        rng = np.random.default_rng(index * 7919 + length * 31 + top_k)
        vocab = self.settings.vocab_size
        special = 8  # leave the low ids (special tokens in the project's tokenizers) alone
        ids = rng.integers(special, vocab, size=length)
        content = []
        for token_id in ids.tolist():
            top = rng.choice(np.arange(special, vocab), size=max(top_k, 1), replace=False)
            top[0] = token_id
            logprobs = np.sort(rng.uniform(-12.0, -0.05, size=len(top)))[::-1]
            entry = {"token": f"token_id:{token_id}", "logprob": float(logprobs[0])}
            entry["bytes"] = list(f"t{token_id}".encode())
            entry["top_logprobs"] = [
                {"token": f"token_id:{t}", "logprob": float(v), "bytes": list(f"t{t}".encode())}
                for t, v in zip(top.tolist(), logprobs.tolist(), strict=True)
            ]
            content.append(entry)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        else:
            text = " ".join(f"t{t}" for t in ids.tolist())
        body = {
            "id": f"chatcmpl-{index}",
            "object": "chat.completion",
            "created": 0,
            "model": self.settings.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if stopped else "length",
                    "logprobs": {"content": content},
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": length, "total_tokens": length},
        }
        return json.dumps(body).encode()

    def completion(self, request: dict) -> bytes:
        natural = self.settings.answer_tokens
        if int(request.get("top_logprobs") or 0) <= 1:
            natural = self.settings.question_tokens  # a question: short, no top-k wanted
        max_tokens = int(request.get("max_tokens") or natural)
        length, stopped = min(natural, max_tokens), natural <= max_tokens
        top_k = int(request.get("top_logprobs") or 0) if request.get("logprobs") else 0
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).digest()
        index = int.from_bytes(digest[:4], "little") % self.settings.pool
        shape = (length, top_k, stopped)
        pool = self._bodies.setdefault(shape, [None] * self.settings.pool)
        if pool[index] is None:
            pool[index] = self._answer(index, length, top_k, stopped)
        return pool[index]

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            counts = {"requests": self.requests, "peak_in_flight": self.peak_in_flight}
            return await _reply(send, 200, counts)
        if method == "GET" and path == "/requests":
            return await _reply(send, 200, {"requests": list(self.recorded)})
        if method == "GET" and path == "/v1/models":
            model = {"id": self.settings.model, "object": "model", "root": self.settings.model}
            return await _reply(send, 200, {"object": "list", "data": [model]})
        if method == "POST" and path == "/tokenize":
            request = json.loads(body)
            if self.tokenizer is None:
                return await _reply(send, 404, {"error": "no tokenizer"})
            special = bool(request.get("add_special_tokens", True))
            ids = self.tokenizer(request["prompt"], add_special_tokens=special)["input_ids"]
            return await _reply(send, 200, {"tokens": ids, "count": len(ids)})
        if method == "POST" and path == "/v1/chat/completions":
            return await self._chat(json.loads(body), send)
        return await _reply(send, 404, {"error": f"no route {method} {path}"})

    async def _chat(self, request: dict, send) -> None:
        self.requests += 1
        if self.recorded.maxlen:
            self.recorded.append(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await self._answer_chat(request, send, number=self.requests)
        finally:
            self.in_flight -= 1

    async def _answer_chat(self, request: dict, send, number: int) -> None:
        settings = self.settings
        messages = request.get("messages") or [{}]
        system = messages[0].get("content") or "" if messages[0].get("role") == "system" else ""
        slow = settings.slow_marker and settings.slow_marker in system
        await asyncio.sleep((settings.slow_delay_ms if slow else settings.delay_ms) / 1000)
        # Which requests fail depends on their content, not on arrival order, so a retried
        # request succeeds however requests interleave.
        key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).digest()
        self._attempts[key] = self._attempts.get(key, 0) + 1
        chosen = int.from_bytes(key[4:8], "little") % max(settings.fail_every, 1) == 0
        failing = settings.fail_every and chosen and self._attempts[key] == 1
        if failing or (settings.fail_after and number > settings.fail_after):
            if settings.fail_with == "drop":
                raise ConnectionAbortedError("stand-in teacher drops this connection")
            if settings.fail_with == "malformed":
                return await _send(send, 200, b'{"choices": [{"message": {"content": "x"}, ')
            return await _reply(send, int(settings.fail_with), {"error": "stand-in failure"})
        await _send(send, 200, self.completion(request))


async def _reply(send, status: int, body: dict) -> None:
    await _send(send, status, json.dumps(body).encode())


async def _send(send, status: int, payload: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# --------------------------------------------------------------------------- process
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StandInTeacher:
    """The stand-in in a subprocess on 127.0.0.1; a context manager that yields its base URL."""

    def __init__(self, settings: TeacherSettings | None = None, port: int | None = None) -> None:
        self.settings = settings or TeacherSettings()
        self.port = port or _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> StandInTeacher:
        arguments = [sys.executable, "-m", "cartridges_testing.stand_in_teacher"]
        arguments += ["--port", str(self.port)]
        for name, value in asdict(self.settings).items():
            if value is not None:
                arguments += [f"--{name.replace('_', '-')}", str(value)]
        self._process = subprocess.Popen(arguments, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"The stand-in teacher exited with {self._process.returncode}.")
            try:
                self.requests()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise TimeoutError(f"The stand-in teacher did not start on port {self.port} in 60 s.")

    def requests(self) -> int:
        """Chat completion requests received so far."""
        return self.health()["requests"]

    def recorded_requests(self) -> list[dict]:
        """The last chat request bodies received (``record_requests`` of them), oldest first."""
        root = self.base_url.removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/requests", timeout=5) as response:
            return json.loads(response.read())["requests"]

    def health(self) -> dict[str, int]:
        """``requests`` received and the ``peak_in_flight`` (most served at once) so far."""
        root = self.base_url.removesuffix("/v1")
        with urllib.request.urlopen(f"{root}/health", timeout=5) as response:
            return json.loads(response.read())

    def __exit__(self, *_exc) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    for name, value in asdict(TeacherSettings()).items():
        kind = type(value) if value is not None else str
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    arguments = vars(parser.parse_args(argv))
    port = arguments.pop("port")
    import uvicorn

    teacher = _Teacher(TeacherSettings(**arguments))
    uvicorn.run(
        teacher,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        backlog=4096,
        access_log=False,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
