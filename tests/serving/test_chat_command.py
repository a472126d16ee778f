"""The terminal chat, driven programmatically: through a running server and in-process."""

from __future__ import annotations

import builtins

import yaml
from openai import OpenAI

from cartridges.serving import cli
from cartridges.serving.terminal import chat_loop
from tests.serving.conftest import API_KEY, cartridges


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


def test_chat_command_in_process_reads_the_project_conf(
    tiny_model_dir, cartridge_root, tmp_path, monkeypatch, capsys
):
    base = tmp_path / "conf" / "base"
    base.mkdir(parents=True)
    (tmp_path / "conf" / "local").mkdir()
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
    config = cli.load_project_config(tmp_path)
    assert config.catalog_datasets == {"cartridge": catalog["cartridge"]["filepath"]}
    assert config.max_tokens == 8 and config.api_key is None
    monkeypatch.setattr(builtins, "input", scripted(["Hi", "Again"]))
    cli.chat_main(["--project-dir", str(tmp_path), "-c", "cartridge", "--max-tokens", "4"])
    output = capsys.readouterr().out
    assert output.count("assistant> ") == 2
