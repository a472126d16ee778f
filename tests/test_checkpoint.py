"""Cartridge files: our format, PEFT adapters, reference checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from cartridges.cartridge import CartridgeMismatchError
from cartridges.checkpoint import (
    CartridgeFormatError,
    export_peft,
    export_reference,
    import_peft,
    import_reference,
    load_cartridge,
    read_metadata,
    save_cartridge,
)
from cartridges.initialization import from_token_ids
from cartridges.modeling import model_fingerprint
from cartridges.prefix import forward_with_prefix
from tests.architectures import build_model

DOCUMENT = list(range(5, 35))
QUERY = torch.tensor([[7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def model():
    return build_model("llama")


@pytest.fixture()
def cartridge(model):
    cartridge = from_token_ids(model, DOCUMENT, num_frozen_tokens=1)
    with torch.no_grad():
        cartridge.trainable_keys.add_(0.01 * torch.randn_like(cartridge.trainable_keys))
    return cartridge


def test_round_trip_is_bitwise_and_keeps_metadata(model, cartridge, tmp_path):
    path = tmp_path / "c.safetensors"
    save_cartridge(cartridge, path)
    loaded = load_cartridge(path, model)
    for name in ("frozen_keys", "frozen_values", "trainable_keys", "trainable_values"):
        assert torch.equal(getattr(loaded, name), getattr(cartridge, name))
    assert loaded.num_frozen_tokens == 1
    assert loaded.info == cartridge.info
    metadata = read_metadata(path)
    assert metadata["num_tokens"] == "30" and metadata["dtype"] == "float32"
    assert json.loads(metadata["info"])["model_fingerprint"] == model_fingerprint(model)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_model_with_other_shapes_is_refused_naming_both(cartridge, tmp_path):
    path = tmp_path / "c.safetensors"
    save_cartridge(cartridge, path)
    with pytest.raises(CartridgeMismatchError, match=r"layers=2, kv_heads=2.*kv_heads=4"):
        load_cartridge(path, build_model("gpt_neox"))


def test_a_model_with_same_shapes_but_other_weights_is_refused(cartridge, tmp_path):
    path = tmp_path / "c.safetensors"
    save_cartridge(cartridge, path)
    with pytest.raises(CartridgeMismatchError, match="fingerprint .* but the loaded model"):
        load_cartridge(path, build_model("llama", seed=1))


def test_non_cartridge_files_are_refused(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CartridgeFormatError, match="is not a cartridge file"):
        load_cartridge(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CartridgeFormatError, match="not a readable safetensors file"):
        load_cartridge(garbage)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_changed_byte_is_refused_with_both_digests(model, cartridge, tmp_path, dtype):
    """A same-size edit of the tensors loaded as a different cartridge without a word."""
    path = tmp_path / "c.safetensors"
    save_cartridge(cartridge.to("cpu", dtype), path)
    assert load_cartridge(path).dtype == dtype
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    expected = read_metadata(path)["content_sha256"]
    with pytest.raises(
        CartridgeFormatError, match=rf"hash to [0-9a-f]{{64}}, its header records {expected}"
    ):
        load_cartridge(path)


@pytest.mark.parametrize("architecture", ["llama", "qwen3", "gpt_neox", "gemma2"])
def test_peft_export_loads_in_peft_with_identical_logits(architecture, tmp_path):
    model = build_model(architecture)
    cartridge = from_token_ids(model, DOCUMENT, num_frozen_tokens=1)
    ours = forward_with_prefix(model, cartridge.as_cache(1, model.config), QUERY).logits
    export_peft(cartridge, model, tmp_path)
    peft_model = PeftModel.from_pretrained(build_model(architecture), str(tmp_path))
    theirs = peft_model(input_ids=QUERY, attention_mask=torch.ones_like(QUERY)).logits
    assert (ours - theirs).abs().max() <= 1e-5
    back = import_peft(tmp_path, model)
    assert torch.equal(back.keys, cartridge.keys) and torch.equal(back.values, cartridge.values)
    assert back.num_frozen_tokens == 1


def test_peft_import_refuses_wrong_directories(model, cartridge, tmp_path):
    with pytest.raises(CartridgeFormatError, match="is not a PEFT adapter"):
        import_peft(tmp_path, model)
    export_peft(cartridge, model, tmp_path)
    with pytest.raises(CartridgeFormatError, match=r"needs 256 \(layers=2 x 2 x kv_heads=4"):
        import_peft(tmp_path, build_model("gpt_neox"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(CartridgeFormatError, match="holds a LORA adapter"):
        import_peft(tmp_path, model)


def _reference_file(cartridge, path, prefix: str, container) -> None:
    """Write a checkpoint the way the reference implementation saves its cache."""
    layers = range(cartridge.keys.shape[0])

    def per_layer(tensor, part):
        return container([nn.Parameter(tensor[i : i + 1, :, part].clone()) for i in layers])

    torch.save(
        {
            "trainable_keys": per_layer(cartridge.keys, slice(1, None)),
            "trainable_values": per_layer(cartridge.values, slice(1, None)),
            f"{prefix}_keys": per_layer(cartridge.keys, slice(0, 1)),
            f"{prefix}_values": per_layer(cartridge.values, slice(0, 1)),
        },
        path,
    )


@pytest.mark.parametrize(("prefix", "container"), [("frozen", nn.ParameterList), ("fixed", list)])
def test_reference_checkpoints_import(model, cartridge, tmp_path, prefix, container):
    path = tmp_path / "cache.pt"
    _reference_file(cartridge, path, prefix, container)
    imported = import_reference(path, model)
    assert torch.equal(imported.keys, cartridge.keys)
    assert torch.equal(imported.values, cartridge.values)
    assert imported.num_frozen_tokens == 1


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_reference_import_never_runs_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"trainable_keys": _Exploit()}, handle)
    with pytest.raises(CartridgeFormatError, match="Could not read"):
        import_reference(path)


def test_reference_import_names_missing_keys(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"trainable_keys": [torch.zeros(1, 2, 3, 4)]}, path)
    with pytest.raises(CartridgeFormatError, match=r"lacks \['trainable_values'"):
        import_reference(path)


@pytest.mark.parametrize("frozen", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_export_round_trips_and_has_the_reference_layout(model, tmp_path, frozen, dtype):
    cartridge = from_token_ids(model, list(range(3, 11)), num_frozen_tokens=frozen).to(dtype=dtype)
    path = export_reference(cartridge, tmp_path / "cache.pt")
    layout = cartridge.layout
    # What the reference's loader reads: four per-layer lists of (1, heads, T, head_dim).
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert sorted(state) == ["fixed_keys", "fixed_values", "trainable_keys", "trainable_values"]
    for name, tokens in [("fixed_keys", frozen), ("trainable_values", 8 - frozen)]:
        assert isinstance(state[name], nn.ParameterList) and len(state[name]) == layout.num_layers
        assert tuple(state[name][0].shape) == (1, layout.num_kv_heads, tokens, layout.head_dim)
        assert state[name][0].dtype == dtype
    back = import_reference(path, model)
    assert torch.equal(back.keys, cartridge.keys) and torch.equal(back.values, cartridge.values)
    assert back.num_frozen_tokens == frozen
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]  # written atomically
