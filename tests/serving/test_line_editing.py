"""The terminal chat's prompt edits lines with readline: arrow keys recall the saved history."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

readline = pytest.importorskip("readline")

from cartridges.serving.terminal import line_editing  # noqa: E402

# Reads one line at the chat's prompt, as the command does, and shows what input() returned.
PROMPT_ONCE = """
import sys
from cartridges.serving.terminal import line_editing
with line_editing(sys.argv[1]):
    line = input("you> ")
print("GOT", repr(line))
"""


def _type_at_prompt(history_file, keys: bytes, timeout_s: float = 30.0) -> str:
    """Run PROMPT_ONCE on a pseudo-terminal, type ``keys`` at the prompt; all it printed."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-c", PROMPT_ONCE, str(history_file)],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    output, typed, deadline = b"", False, time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    output += os.read(leader, 4096)
                except OSError:  # the child closed the terminal
                    break
            if not typed and b"you> " in output:
                os.write(leader, keys)
                typed = True
            if process.poll() is not None and not ready:
                break
    finally:
        process.kill()
        process.wait()
        os.close(leader)
    return output.decode(errors="replace")


def test_the_up_arrow_recalls_the_saved_history_instead_of_printing_escapes(tmp_path):
    history = tmp_path / "history"
    history.write_text("Which alarm signals a seal leak?\n")
    output = _type_at_prompt(history, b"\x1b[A\r")
    assert "GOT 'Which alarm signals a seal leak?'" in output, output
    assert "^[[A" not in output and "\\x1b" not in output


def test_history_is_read_and_written_back(tmp_path):
    path = tmp_path / "nested" / "history"
    readline.clear_history()
    try:
        with line_editing(path) as editing:
            assert editing
            readline.add_history("first question")
        assert path.read_text().splitlines()[-1] == "first question"
        readline.clear_history()
        with line_editing(path):
            length = readline.get_current_history_length()
            assert readline.get_history_item(length) == "first question"
            readline.add_history("second question")
        assert path.read_text().splitlines()[-2:] == ["first question", "second question"]
    finally:
        readline.clear_history()


def test_no_history_file_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    readline.clear_history()
    with line_editing(""):
        readline.add_history("kept in memory only")
    readline.clear_history()
    assert list(tmp_path.iterdir()) == []
