"""Interactive terminal chat with a cartridge, over the OpenAI API of a cartridges server.

The loop keeps the conversation history and prints the answer as its SSE chunks arrive. It takes
its input and output as functions so that tests can drive it without a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from openai import OpenAI

HELP = "Commands: /reset (forget the conversation), /history, /help, /exit (or Ctrl-D)."


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
    """Chat until ``/exit`` or end of input; returns the conversation.

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
    extra = {"cartridges": [{"id": c, "source": "local"} for c in cartridges]}
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/help":
            write(HELP + "\n")
            continue
        if line == "/reset":
            history.clear()
            write("(conversation cleared)\n")
            continue
        if line == "/history":
            for message in history:
                write(f"{message['role']}> {message['content']}\n")
            continue
        history.append({"role": "user", "content": line})
        messages = (
            history
            if system is None or cartridges
            else [
                {"role": "system", "content": system},
                *history,
            ]
        )
        write("assistant> ")
        answer = []
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            stream=True,
            extra_body=extra,
        )
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    answer.append(choice.delta.content)
                    write(choice.delta.content)
        write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
    return history


def _write(text: str) -> None:
    print(text, end="", flush=True)  # noqa: T201 - the terminal chat's own output
