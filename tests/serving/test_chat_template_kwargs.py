"""``chat_template_kwargs``: the model block's switches, merged under a request's own, reach the
chat template (e.g. Qwen3's ``enable_thinking``)."""

from __future__ import annotations

import openai
import pytest
import yaml
from openai import OpenAI
from transformers import AutoTokenizer

from cartridges.chat import chat_ids, continuation_ids
from cartridges.serving import BackgroundServer, ServingConfig, cli, create_app
from cartridges_testing.tiny_model import CHAT_TEMPLATE
from tests.serving.conftest import cartridges, make_config

# The tiny template, plus a thinking switch and a second variable after the generation prompt.
SWITCHED_TEMPLATE = CHAT_TEMPLATE + (
    "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
    "NOTHINK{% endif %}"
    "{% if add_generation_prompt and persona is defined %}[{{ persona }}]{% endif %}"
)
QUESTION = [{"role": "user", "content": "Which alarm signals a seal leak?"}]
DEFAULTS = {"enable_thinking": False, "persona": "terse"}


@pytest.fixture(scope="module")
def switched(tiny, tiny_model_dir):
    """A tokenizer of the tiny model whose chat template has the switches."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = SWITCHED_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def switched_client(tiny, switched, tiny_model_dir, cartridge_root):
    config = make_config(
        tiny_model_dir, cartridge_root, api_key=None, chat_template_kwargs=DEFAULTS
    )
    with BackgroundServer(create_app(config, tiny[0], switched)) as server:
        yield OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def prompt_ids(client, *ids, **switches) -> list[int]:
    extra = {**cartridges(*ids), **({"chat_template_kwargs": switches} if switches else {})}
    answer = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=1, temperature=0, extra_body=extra
    )
    return answer.model_extra["prompt_token_ids"]


def test_the_configured_switches_render_the_prompt(switched_client, switched):
    prompt = prompt_ids(switched_client)
    assert prompt == chat_ids(switched, QUESTION, True, DEFAULTS)
    assert switched.decode(prompt).endswith("<|assistant|>NOTHINK[terse]")


def test_a_request_switch_is_merged_over_the_configured_ones(switched_client, switched):
    thinking = prompt_ids(switched_client, enable_thinking=True)
    assert thinking == chat_ids(switched, QUESTION, True, {**DEFAULTS, "enable_thinking": True})
    assert switched.decode(thinking).endswith("<|assistant|>[terse]")  # persona kept
    assert thinking != prompt_ids(switched_client)


def test_switches_also_apply_after_a_cartridge(switched_client, switched):
    prompt = prompt_ids(switched_client, "doc", persona="chatty")
    switches = {**DEFAULTS, "persona": "chatty"}
    assert prompt == continuation_ids(switched, "context", QUESTION, True, switches)
    assert switched.decode(prompt).endswith("NOTHINK[chatty]")


@pytest.mark.parametrize("name", ["tokenize", "chat_template", "messages", "eos_token"])
def test_names_the_rendering_sets_itself_are_refused(switched_client, name):
    with pytest.raises(openai.BadRequestError) as refused:
        prompt_ids(switched_client, **{name: "x"})
    error = refused.value.body
    assert error["param"] == "chat_template_kwargs"
    assert error["message"].startswith(f"chat_template_kwargs may not set ['{name}']")


def test_the_default_comes_from_the_model_block(tmp_path):
    model = {"name_or_path": "m", "chat_template_kwargs": {"enable_thinking": False}}
    assert ServingConfig.from_params({}, model).chat_template_kwargs == {"enable_thinking": False}
    assert ServingConfig.from_params({}, {"name_or_path": "m"}).chat_template_kwargs == {}
    base = tmp_path / "conf" / "base"
    base.mkdir(parents=True)
    (tmp_path / "conf" / "local").mkdir()
    (base / "parameters.yml").write_text(yaml.safe_dump({"model": model}))
    (base / "catalog.yml").write_text("{}")
    config = cli.load_project_config(tmp_path)
    assert config.chat_template_kwargs == {"enable_thinking": False}


def test_the_serving_block_does_not_set_them():
    with pytest.raises(ValueError, match="set model.chat_template_kwargs instead"):
        ServingConfig.from_params({"chat_template_kwargs": {"enable_thinking": True}}, {})
