"""Interactive terminal chat with a cartridge, over the OpenAI API of a cartridges server.

The loop keeps the conversation history and prints the answer as its SSE chunks arrive. It takes
its input and output as functions so that tests can drive it without a terminal. Around it:
line editing and a history file (stdlib ``readline``, when the platform has it), and a check of
the server and the cartridges before the first prompt, so that a wrong id ends the command at
once with one line rather than at the first question. Ctrl-C and Ctrl-D end the chat cleanly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import openai
from openai import OpenAI

from cartridges.files import atomic_write

logger = logging.getLogger(__name__)

HELP = "Commands: /reset (forget the conversation), /history, /help, /exit (or Ctrl-D)."
HISTORY_FILE = "~/.cartridges_chat_history"
HISTORY_LENGTH = 1000


class ChatSetupError(Exception):
    """The server or a cartridge cannot be used; the message is one line for the terminal."""


@contextmanager
def line_editing(history_file: str | Path | None = HISTORY_FILE) -> Iterator[bool]:
    """Arrow keys, line editing and history for ``input()``; yields whether they are on.

    Importing ``readline`` is what makes ``input()`` edit lines (without it an arrow key
    prints ``^[[A``). The history is read from ``history_file`` (``~`` expanded; ``None`` or
    ``""``: no file) and written back, atomically, on the way out.
    """
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        yield False
        return
    path = Path(history_file).expanduser() if history_file else None
    readline.set_history_length(HISTORY_LENGTH)
    if path is not None and path.is_file():
        try:
            readline.read_history_file(str(path))
        except OSError as error:
            logger.warning("Could not read the chat history %s: %s", path, error)
    try:
        yield True
    finally:
        if path is not None:
            try:
                with atomic_write(path) as temporary:
                    readline.write_history_file(str(temporary))
            except OSError as error:
                logger.warning("Could not save the chat history to %s: %s", path, error)


def served_model(client: OpenAI) -> str:
    """The base model a server serves: the first listed model without a ``parent``."""
    try:
        listed = client.models.list().data
    except openai.APIError as error:
        raise ChatSetupError(_reason(error)) from error
    base = [m.id for m in listed if getattr(m, "parent", None) is None]
    if not base:
        raise ChatSetupError(f"The server at {client.base_url} lists no model.")
    return base[0]


def check_cartridges(client: OpenAI, model: str, cartridges: Sequence[str]) -> None:
    """Ask for one token with ``cartridges``: the server resolves, loads and checks each."""
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=1,
            temperature=0.0,
            extra_body=_cartridges_field(cartridges),
        )
    except openai.APIError as error:
        raise ChatSetupError(_reason(error)) from error


def _reason(error: openai.APIError) -> str:
    """The server's own message for a refusal, or why it could not be reached."""
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        reason = f"{body.get('message') or error.message} (HTTP {error.status_code})"
    else:
        reason = f"{error.message} ({error.request.url})"
    return " ".join(reason.split())  # one line


def chat_loop(
    client: OpenAI,
    model: str,
    cartridges: Sequence[str] = (),
    *,
    read: Callable[[str], str] | None = None,
    write: Callable[[str], object] | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    system: str | None = None,
) -> list[dict[str, str]]:
    """Chat until ``/exit``, end of input (Ctrl-D) or Ctrl-C; returns the conversation.

    Args:
        client: an OpenAI client pointed at a cartridges server.
        model: the served model id.
        cartridges: ids of the cartridges to answer with, composed in order.
        read: reads one line after a prompt (``input`` by default).
        write: writes text as is, no newline added (default: stdout, flushed).
        max_tokens: answer length cap.
        temperature: 0 for greedy answers.
        seed: makes sampled answers reproducible.
        system: an optional system message (used only without cartridges: a cartridge takes
            the system message's place).
    """
    read, write = read or input, write or _write
    history: list[dict[str, str]] = []
    opening = [] if system is None or cartridges else [{"role": "system", "content": system}]
    options = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
    try:
        while True:
            line = read("you> ").strip()
            if line in ("/exit", "/quit"):
                break
            if not line or _command(line, history, write):
                continue
            history.append({"role": "user", "content": line})
            write("assistant> ")
            answer = _answer(client, model, [*opening, *history], cartridges, write, options)
            history.append({"role": "assistant", "content": answer})
    except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C: leave on a fresh line
        write("\n")
        if history and history[-1]["role"] == "user":
            history.pop()  # its answer was interrupted
    return history


def _command(line: str, history: list[dict[str, str]], write: Callable[[str], object]) -> bool:
    """Run ``line`` if it is a chat command; whether it was one."""
    if line == "/help":
        write(HELP + "\n")
    elif line == "/reset":
        history.clear()
        write("(conversation cleared)\n")
    elif line == "/history":
        for message in history:
            write(f"{message['role']}> {message['content']}\n")
    else:
        return False
    return True


def _answer(
    client: OpenAI,
    model: str,
    messages: list[dict[str, str]],
    cartridges: Sequence[str],
    write: Callable[[str], object],
    options: dict,
) -> str:
    """Stream the answer to ``messages`` to ``write``; returns its text."""
    pieces = []
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        extra_body=_cartridges_field(cartridges),
        **options,
    )
    with stream:  # closes the connection also when Ctrl-C stops the answer
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                    write(choice.delta.content)
    write("\n")
    return "".join(pieces)


def _cartridges_field(cartridges: Sequence[str]) -> dict:
    return {"cartridges": [{"id": c, "source": "local"} for c in cartridges]}


def _write(text: str) -> None:
    print(text, end="", flush=True)  # noqa: T201 - the terminal chat's own output
