"""Model loading and KV layout, for any causal LM."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import cartridges.modeling as modeling
from cartridges.modeling import (
    MODEL_PLUGINS,
    UNSUPPORTED_ATTENTION_INPUTS,
    ModelNotFoundError,
    kv_layout,
    load_model,
    load_model_plugins,
    model_fingerprint,
    resolve_dtype,
)
from cartridges_testing.tiny_model import build
from tests.architectures import ARCHITECTURES, build_model
from tests.conftest import CORPUS


def test_an_unresolvable_name_says_why_and_how_to_fix(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Read once, when the hub's client is imported (an earlier test may have imported it):
    # without this the lookup waits ~45 s on a network that is not there.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="not a local directory") as error:
        load_model("no-such-org/no-such-model-xyz")
    assert "`hf download no-such-org/no-such-model-xyz`" in str(error.value)  # the hub's CLI


def test_a_local_directory_without_a_model_says_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match="Could not load a model from local path"):
        load_model(str(tmp_path))


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="Unknown dtype 'float64x'"):
        resolve_dtype("float64x")


def test_loaded_model_is_frozen_in_eval_mode(tiny):
    model, tokenizer = tiny
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None and tokenizer.chat_template


def test_fingerprint_survives_a_dtype_change(tiny_model_dir):
    float32, _ = load_model(str(tiny_model_dir), "float32", "cpu")
    bfloat16, _ = load_model(str(tiny_model_dir), "bfloat16", "cpu")
    assert bfloat16.dtype == torch.bfloat16
    assert model_fingerprint(float32) == model_fingerprint(bfloat16)
    assert model_fingerprint(float32) != model_fingerprint(build_model("llama"))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_kv_layout_is_read_from_the_model(architecture):
    model = build_model(architecture)
    layout = kv_layout(model)
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert (layout.num_layers, layout.num_kv_heads) == (config.num_hidden_layers, heads)
    assert layout.head_dim == 16
    assert layout.bytes_per_token(torch.bfloat16) == 2 * 2 * heads * 16 * 2


# ----------------------------------------------------------------------------- model plugins
def test_the_core_library_does_not_import_the_toy_world():
    source = Path(modeling.__file__).read_text(encoding="utf-8")
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [node])
    ]
    assert not [name for name in imported if "toy_world" in name]
    assert "toy_world" not in source


def test_a_saved_toy_model_loads_by_path_through_its_plugin(tmp_path):
    """In a fresh interpreter, loading by path alone finds the toy world's architecture."""
    from cartridges.toy_world import ToyWorldConfig, ToyWorldForCausalLM, build_tokenizer

    tokenizer = build_tokenizer()
    config = ToyWorldConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    ToyWorldForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    script = (
        "import sys\n"
        "from cartridges.modeling import load_model\n"
        "assert 'cartridges.toy_world' not in sys.modules\n"
        f"model, _ = load_model({str(tmp_path)!r})\n"
        "print(type(model).__name__, model.config.model_type)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ToyWorldForCausalLM", "toy_world_llama"]


class _PluginConfig(LlamaConfig):
    model_type = "cartridges_test_plugin"


class _PluginModel(LlamaForCausalLM):
    config_class = _PluginConfig


def _register_plugin() -> None:
    """What a plugin module does when imported."""
    AutoConfig.register(_PluginConfig.model_type, _PluginConfig, exist_ok=True)
    AutoModelForCausalLM.register(_PluginConfig, _PluginModel, exist_ok=True)


@pytest.fixture
def plugins(monkeypatch):
    """Replace the installed entry points of ``cartridges.models`` with the returned list."""
    installed: list = []
    monkeypatch.setattr(
        modeling, "entry_points", lambda group: installed if group == MODEL_PLUGINS else []
    )
    load_model_plugins.cache_clear()
    yield installed
    load_model_plugins.cache_clear()


def test_a_users_architecture_plugs_in_through_the_entry_point_group(plugins, tmp_path):
    model_dir = build(tmp_path / "model", [CORPUS])
    config = _PluginConfig.from_pretrained(model_dir)
    _PluginModel(config).save_pretrained(model_dir)  # an architecture transformers lacks
    plugin = SimpleNamespace(name="mine", value="my_package.modeling", load=_register_plugin)
    if _PluginConfig.model_type not in CONFIG_MAPPING:  # not registered by an earlier test
        with pytest.raises(ModelNotFoundError):  # without the plugin it is unknown
            load_model(str(model_dir))
    plugins.append(plugin)  # as if installed before the process started
    load_model_plugins.cache_clear()
    model, _ = load_model(str(model_dir), "float32", "cpu")
    assert type(model) is _PluginModel
    assert load_model_plugins() == ("mine",)


def test_a_plugin_missing_its_own_dependencies_is_skipped_with_a_warning(plugins, caplog):
    def missing():
        raise ImportError("No module named 'flash_kernels'")

    plugins.append(SimpleNamespace(name="broken", value="broken.modeling", load=missing))
    assert load_model_plugins() == ()
    assert "Skipped model plugin 'broken' (broken.modeling)" in caplog.text


# -------------------------------------------------------------- each caller owns its model
@pytest.fixture(scope="module")
def private_model_dir(tmp_path_factory):
    """A tiny model of these tests' own: one of them changes its weights in place."""
    return str(build(tmp_path_factory.mktemp("private_model"), [CORPUS]))


PROBE = torch.tensor([[1, 5, 9, 14]])


def test_a_peft_adapter_on_one_callers_model_does_not_reach_the_next(private_model_dir):
    model, _ = load_model(private_model_dir)
    before = model(input_ids=PROBE).logits
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, lora)
    assert not torch.equal(peft_model(input_ids=PROBE).logits, before)
    fresh, _ = load_model(private_model_dir)
    assert not [name for name, _ in fresh.named_modules() if "lora" in name]
    assert not hasattr(fresh, "peft_config")
    assert torch.equal(fresh(input_ids=PROBE).logits, before)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_a_forward_hook_on_one_callers_model_does_not_reach_the_next(private_model_dir):
    model, _ = load_model(private_model_dir)
    calls = []
    model.model.layers[0].register_forward_hook(lambda *args: calls.append(args))
    model(input_ids=PROBE)
    assert len(calls) == 1
    fresh, _ = load_model(private_model_dir)
    fresh(input_ids=PROBE)
    assert len(calls) == 1


def test_callers_share_one_copy_of_the_weights_and_not_their_settings(private_model_dir):
    first, first_tokenizer = load_model(private_model_dir)
    first.requires_grad_(True)
    first.train()
    first_tokenizer.padding_side = "left"
    second, second_tokenizer = load_model(private_model_dir)
    pairs = list(zip(first.parameters(), second.parameters(), strict=True))
    assert all(a.data_ptr() == b.data_ptr() for a, b in pairs)  # one copy in memory
    assert all(a is not b for a, b in pairs)
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    assert second_tokenizer.padding_side == "right"


def test_weights_changed_in_place_are_read_again(private_model_dir):
    model, _ = load_model(private_model_dir)
    before = model(input_ids=PROBE).logits
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # shared storage: this reaches the cached weights
    fresh, _ = load_model(private_model_dir)
    assert torch.equal(fresh(input_ids=PROBE).logits, before)
    assert fresh.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()


def _no_weights_read(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("read the model before checking the device")

    monkeypatch.setattr(modeling, "load_tokenizer", forbidden)
    monkeypatch.setattr(modeling, "model_folder", forbidden)


def test_a_cuda_device_on_a_machine_without_one_is_refused_before_loading(monkeypatch):
    _no_weights_read(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"model.device is 'cuda' but no CUDA device .* auto"):
        modeling.load_model("any/model", dtype="float32", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'cuda:2' but this machine has 2 CUDA device\(s\)"):
        modeling.load_model("any/model", dtype="float32", device="cuda:2")


def test_bfloat16_on_a_gpu_without_it_is_refused_naming_what_runs(monkeypatch):
    _no_weights_read(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"bfloat16 is not supported by Tesla T4: use model.dtype"):
        modeling.load_model("any/model", dtype="bfloat16", device="cuda")


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_ATTENTION_INPUTS))
def test_each_attention_input_no_function_here_computes_is_refused_by_both(name):
    """The lists drifted: packed training refused two of the four inputs shared-prefix decoding
    refuses, and would have ignored sinks or ALiBi slopes silently."""
    from cartridges.attention import block_sparse_attention
    from cartridges.decoding.shared_prefix import (
        SharedPrefixBatch,
        UnsupportedModelError,
        shared_prefix_attention,
    )

    module = torch.nn.Module()
    module.layer_idx = 0
    query, key = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4)
    what = UNSUPPORTED_ATTENTION_INPUTS[name]
    with pytest.raises(ValueError, match=f"it passes {re.escape(what)}"):
        block_sparse_attention(module, query, key, key, None, **{name: torch.zeros(2)})
    batch = SharedPrefixBatch(torch.zeros(1, 1), torch.zeros(1, 1), [])
    with pytest.raises(UnsupportedModelError, match=f"it passes {re.escape(what)}"):
        shared_prefix_attention(
            module, query, key, key, None, shared_prefix_batch=batch, **{name: torch.zeros(2)}
        )
