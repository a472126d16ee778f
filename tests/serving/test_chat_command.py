"""The terminal chat, driven programmatically: through a running server and in-process."""

from __future__ import annotations

import builtins

import pytest
import yaml
from openai import OpenAI

from cartridges.serving import cli
from cartridges.serving.terminal import chat_loop
from tests.serving.conftest import API_KEY, cartridges


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A home folder of the test's own: the chat keeps its line history there by default."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def scripted(lines):
    """A ``read`` that answers the prompts with ``lines`` and then ends the input."""
    remaining = list(lines)

    def read(prompt: str) -> str:
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return read


def test_chat_loop_keeps_history_and_streams_answers(server):
    client = OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    written: list[str] = []
    history = chat_loop(
        client,
        "tiny",
        ["doc"],
        read=scripted(["Which alarm?", "", "/history", "And the seal?", "/reset", "Hello"]),
        write=written.append,
        max_tokens=6,
        temperature=1.0,  # the random tiny model's greedy answers are special tokens only
        seed=3,
    )
    output = "".join(written)
    assert [m["role"] for m in history] == ["user", "assistant"]  # /reset kept only the last turn
    assert history[0]["content"] == "Hello"
    # the streamed answer equals the non-streamed one for the same conversation
    expected = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=1.0,
        seed=3,
        extra_body=cartridges("doc"),
    )
    assert history[1]["content"] == expected.choices[0].message.content
    assert "user> Which alarm?" in output and "(conversation cleared)" in output
    assert history[1]["content"]
    assert len(written) > 12  # answers arrived in pieces, not as one string


def test_chat_command_against_a_server_url(server, monkeypatch, capsys):
    monkeypatch.setattr(builtins, "input", scripted(["Which alarm?", "/exit"]))
    cli.chat_main(
        ["--url", server.base_url, "--api-key", API_KEY, "-c", "doc", "--max-tokens", "4"]
    )
    output = capsys.readouterr().out
    assert "Commands:" in output and "assistant> " in output


def write_project(project, tiny_model_dir, cartridge_root) -> dict:
    """A Kedro project's conf/ serving the tiny model; returns its catalog."""
    base = project / "conf" / "base"
    base.mkdir(parents=True)
    (project / "conf" / "local").mkdir()
    parameters = {
        "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32", "device": "cpu"}
    }
    serving = {
        "serving": {
            "cartridge_dir": str(cartridge_root / "cartridges"),
            "max_tokens": 8,
            "default_max_tokens": 4,
        }
    }
    catalog = {
        "cartridge": {
            "type": "cartridges.datasets.CartridgeDataset",
            "filepath": str(cartridge_root / "catalog" / "cartridge.safetensors"),
            "versioned": True,
        }
    }
    (base / "parameters.yml").write_text(yaml.safe_dump(parameters))
    (base / "parameters_serving.yml").write_text(yaml.safe_dump(serving))
    (base / "catalog.yml").write_text(yaml.safe_dump(catalog))
    return catalog


def test_chat_command_in_process_reads_the_project_conf(
    tiny_model_dir, cartridge_root, tmp_path, monkeypatch, capsys
):
    catalog = write_project(tmp_path, tiny_model_dir, cartridge_root)
    config = cli.load_project_config(tmp_path)
    assert config.catalog_datasets == {"cartridge": catalog["cartridge"]["filepath"]}
    assert config.max_tokens == 8 and config.api_key is None
    monkeypatch.setattr(builtins, "input", scripted(["Hi", "Again"]))
    cli.chat_main(["--project-dir", str(tmp_path), "-c", "cartridge", "--max-tokens", "4"])
    output = capsys.readouterr().out
    assert output.count("assistant> ") == 2


def interrupted_after(lines, error):
    """A ``read`` that answers the prompts with ``lines``, then raises ``error`` (Ctrl-C/D)."""
    remaining = list(lines)

    def read(prompt: str) -> str:
        if not remaining:
            raise error
        return remaining.pop(0)

    return read


@pytest.mark.parametrize("key", [KeyboardInterrupt, EOFError], ids=["ctrl-c", "ctrl-d"])
def test_ctrl_c_and_ctrl_d_end_the_chat_cleanly(server, monkeypatch, capsys, key, home):
    monkeypatch.setattr(builtins, "input", interrupted_after(["Which alarm?"], key()))
    cli.chat_main(["--url", server.base_url, "--api-key", API_KEY, "-c", "doc", "--max-tokens=2"])
    output = capsys.readouterr()
    assert output.out.count("assistant> ") == 1 and output.out.endswith("\n")
    assert "Traceback" not in output.err
    assert (home / ".cartridges_chat_history").is_file()  # the line history, saved on the way out


def test_ctrl_c_while_an_answer_streams_ends_the_chat_and_drops_that_turn(server):
    client = OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    written: list[str] = []

    def write(text: str) -> None:
        written.append(text)
        if len(written) == 4:  # "assistant> " of the second question, then its first piece
            raise KeyboardInterrupt

    history = chat_loop(
        client, "tiny", ["doc"], read=scripted(["Hi", "Again"]), write=write, max_tokens=3
    )
    assert [m["content"] for m in history if m["role"] == "user"] == ["Hi"]
    assert client.chat.completions.create(  # the server goes on serving
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    ).choices


def no_prompt(prompt: str) -> str:
    raise AssertionError(f"prompted ({prompt!r}) although a cartridge is missing")


def test_an_unknown_cartridge_ends_the_command_before_the_first_prompt(server, monkeypatch, capsys):
    monkeypatch.setattr(builtins, "input", no_prompt)
    with pytest.raises(SystemExit) as exited:
        cli.chat_main(["--url", server.base_url, "--api-key", API_KEY, "-c", "doc", "-c", "nope"])
    assert exited.value.code == 1
    output = capsys.readouterr()
    assert output.out == ""  # not even the help line
    assert output.err == (
        "cartridges-chat: Cartridge 'nope' not found in the cartridge directory. (HTTP 404)\n"
    )


def test_a_wrong_api_key_ends_the_command_before_the_first_prompt(server, monkeypatch, capsys):
    monkeypatch.setattr(builtins, "input", no_prompt)
    with pytest.raises(SystemExit) as exited:
        cli.chat_main(["--url", server.base_url, "--api-key", "wrong", "-c", "doc"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == "cartridges-chat: Invalid API key. (HTTP 401)\n"


def test_an_unknown_cartridge_ends_the_in_process_command_too(
    tiny_model_dir, cartridge_root, tmp_path, monkeypatch, capsys
):
    write_project(tmp_path, tiny_model_dir, cartridge_root)
    monkeypatch.setattr(builtins, "input", no_prompt)
    with pytest.raises(SystemExit) as exited:
        cli.chat_main(["--project-dir", str(tmp_path), "-c", "cartridge@2000-01-01T00.00.00.000Z"])
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("cartridges-chat: Cartridge 'cartridge@2000-01-01T00.00.00.000Z'")
    assert error.count("\n") == 1


def test_a_system_message_with_cartridges_is_refused_before_anything_loads(monkeypatch, capsys):
    monkeypatch.setattr(builtins, "input", no_prompt)
    with pytest.raises(SystemExit) as exited:
        cli.chat_main(["-c", "doc", "--system", "Answer in French."])
    assert exited.value.code == 2  # a usage error, like any other bad argument
    error = capsys.readouterr().err
    assert "--system cannot be combined with -c/--cartridge: a cartridge stands in" in error
